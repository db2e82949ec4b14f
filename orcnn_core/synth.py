"""Synthetic amodal scenes: household and grocery objects piled on a table or in a bin.

Top-down views rendered with exact ground truth. Every object is a filled polygon on the
padded canvas (its amodal mask, also beyond the image border); objects are stacked in draw
order, so a later object lies on every earlier one it overlaps. Visible masks are set
algebra on those same masks, and the image paints each object's pixels exactly where its
mask is (hard edges, no antialiasing), so image and ground truth agree to the pixel.
Objects that would be (almost) hidden are decided before rendering and not drawn at all.

Each image ``i`` of a data set with seed ``s`` is rendered from ``default_rng([s, i])``:
the same seed gives the same bytes, and a larger data set starts with the smaller one.

``python -m orcnn_core.synth --bench`` measures the speed.
"""

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from orcnn_core.data import AmodalSample, mask_boxes, write_amodal_coco
from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_bytes
from orcnn_core.imageio import encode_png
from orcnn_core.masks import encode


@dataclass(frozen=True)
class ObjectClass:
    """Shape, size and look of one class.

    ``half_length`` and ``aspect`` give the object's half axes as fractions of the image's
    shorter side (half width = half length / aspect); ``palettes`` are (base, accent) RGB.
    """

    name: str
    shape: str
    half_length: float
    aspect: tuple
    palettes: tuple


CLASSES = (
    ObjectClass("cereal_box", "box", 0.22, (1.35, 1.7),
                (((200, 40, 40), (245, 230, 200)), ((230, 190, 40), (150, 40, 30)),
                 ((40, 90, 180), (250, 250, 250)), ((240, 120, 30), (60, 40, 120)))),
    ObjectClass("soup_can", "can", 0.095, (1.0, 1.0),
                (((180, 180, 185), (120, 120, 125)), ((200, 190, 160), (140, 130, 100)))),
    ObjectClass("bottle", "bottle", 0.21, (2.6, 3.0),
                (((50, 140, 70), (220, 40, 40)), ((60, 110, 190), (245, 245, 245)),
                 ((130, 80, 40), (230, 200, 60)))),
    ObjectClass("chips_bag", "bag", 0.19, (1.2, 1.5),
                (((220, 30, 40), (250, 210, 40)), ((250, 200, 30), (200, 30, 30)),
                 ((40, 150, 60), (245, 245, 245)), ((110, 50, 150), (250, 170, 40)))),
    ObjectClass("apple", "apple", 0.08, (1.0, 1.1),
                (((190, 25, 35), (250, 210, 80)), ((120, 185, 50), (230, 230, 90)))),
    ObjectClass("orange", "orange", 0.085, (1.0, 1.05),
                (((245, 140, 20), (200, 100, 10)),)),
    ObjectClass("banana", "banana", 0.17, (2.2, 2.6),
                (((235, 205, 55), (90, 60, 20)), ((200, 210, 70), (80, 70, 20)))),
    ObjectClass("sponge", "sponge", 0.1, (1.4, 1.7),
                (((240, 215, 70), (60, 140, 60)), ((250, 160, 60), (40, 90, 160)))),
    ObjectClass("milk_carton", "carton", 0.12, (1.0, 1.25),
                (((240, 240, 232), (40, 90, 200)), ((240, 240, 232), (210, 40, 50)))),
    ObjectClass("yogurt_cup", "cup", 0.075, (1.0, 1.0),
                (((235, 130, 170), (250, 250, 250)), ((120, 170, 230), (250, 250, 250)),
                 ((150, 110, 200), (250, 250, 250)))),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)


@dataclass
class SynthConfig:
    """What :func:`render_scene` draws. ``mask_padding`` None: max(width, height) // 8."""

    width: int = 320
    height: int = 240
    num_classes: int = 8
    min_objects: int = 4
    max_objects: int = 10
    mask_padding: Optional[int] = None
    # An object is kept when its visible area is at least both of these; else not drawn.
    min_visible_fraction: float = 0.1
    min_visible_pixels: int = 20
    object_scale: float = 1.0
    shadows: bool = True
    # Testing aid: background black, object k painted in flat colour k + 1, no shadow or
    # noise, so the image itself shows the visible masks. The scene geometry is unchanged.
    flat_shading: bool = False

    @property
    def padding(self) -> int:
        return max(self.width, self.height) // 8 if self.mask_padding is None \
            else self.mask_padding

    @property
    def categories(self) -> list:
        return [{"id": k + 1, "name": CLASS_NAMES[k]} for k in range(self.num_classes)]

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad parameter."""
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192):
            raise InputError(f"size {self.width}x{self.height}: width and height must be "
                             f"16..8192")
        if not 1 <= self.num_classes <= len(CLASSES):
            raise InputError(f"classes {self.num_classes}: must be 1..{len(CLASSES)} "
                             f"({', '.join(CLASS_NAMES)})")
        if not 0 <= self.min_objects <= self.max_objects or self.max_objects > 200:
            raise InputError(f"objects {self.min_objects}..{self.max_objects}: need "
                             f"0 <= min <= max <= 200")
        if self.mask_padding is not None and not 0 <= self.mask_padding <= 4096:
            raise InputError(f"mask_padding {self.mask_padding}: must be 0..4096")
        if not 0.0 <= self.min_visible_fraction <= 1.0 or self.min_visible_pixels < 0:
            raise InputError("min_visible_fraction must be 0..1 and min_visible_pixels >= 0")
        if not 0.1 <= self.object_scale <= 3.0:
            raise InputError(f"object_scale {self.object_scale}: must be 0.1..3")


# --------------------------------------------------------------------------- geometry


def _unit_outline(shape: str, rng) -> list:
    """Polygons (float arrays K x 2) of a shape in local coordinates, within [-1, 1]^2.

    u (first column) runs along the object's long axis, v across it.
    """
    if shape in ("box", "sponge", "carton"):
        radius = {"box": 0.06, "sponge": 0.12, "carton": 0.08}[shape]
        return [_rounded_square(radius)]
    if shape in ("can", "cup"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [np.stack([np.cos(t), np.sin(t)], 1)]
    if shape in ("apple", "orange"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        phase = rng.uniform(0, 2 * np.pi, 3)
        r = 1 + 0.025 * (np.sin(2 * t + phase[0]) + np.sin(3 * t + phase[1])
                         + np.sin(5 * t + phase[2]))
        if shape == "apple":  # the dent at the stem
            d = np.angle(np.exp(1j * (t - np.pi / 2)))
            r = r - 0.14 * np.exp(-(d / 0.35) ** 2)
        r /= r.max()
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    if shape == "bottle":
        return [np.array([(-1, -0.75), (-0.93, -0.95), (-0.78, -1), (0.42, -1), (0.66, -0.42),
                          (0.7, -0.36), (1, -0.36), (1, 0.36), (0.7, 0.36), (0.66, 0.42),
                          (0.42, 1), (-0.78, 1), (-0.93, 0.95), (-1, 0.75)], float)]
    if shape == "bag":
        teeth = 9
        v = np.linspace(-0.92, 0.92, 2 * teeth + 1)
        u_end = np.where(np.arange(2 * teeth + 1) % 2 == 0, 1.0, 0.93)
        u_side = np.linspace(0.88, -0.88, 9)
        bulge = 1.0 - 0.06 * (u_side / 0.88) ** 2
        right = np.stack([u_end, v], 1)
        top = np.stack([u_side, bulge], 1)
        left = np.stack([-u_end[::-1], v[::-1]], 1)
        bottom = np.stack([u_side[::-1], -bulge], 1)
        return [np.concatenate([right, top, left, bottom])]
    if shape == "banana":
        half = 0.95
        t = np.linspace(-half, half, 24)
        width = 0.05 + 0.26 * np.sqrt(1 - (t / half) ** 2)
        outer = np.stack([np.sin(t) * (1.6 + width), (1.6 + width) * np.cos(t)], 1)
        inner = np.stack([np.sin(t) * (1.6 - width), (1.6 - width) * np.cos(t)], 1)[::-1]
        pts = np.concatenate([outer, inner])
        lo, hi = pts.min(0), pts.max(0)
        return [(pts - (lo + hi) / 2) / ((hi - lo) / 2)]
    raise ValueError(f"unknown shape {shape!r}")


def _rounded_square(radius: float) -> np.ndarray:
    t = np.linspace(0, np.pi / 2, 5)
    corners = []
    for cx, cy, start in ((1, 1, 0), (-1, 1, np.pi / 2), (-1, -1, np.pi), (1, -1, 1.5 * np.pi)):
        ox, oy = cx - np.sign(cx) * radius, cy - np.sign(cy) * radius
        corners.append(np.stack([ox + radius * np.cos(start + t),
                                 oy + radius * np.sin(start + t)], 1))
    return np.concatenate(corners)


@dataclass
class _Object:
    label: int  # 1..K
    cls: ObjectClass
    center: np.ndarray  # canvas pixels (x, y)
    angle: float
    half_axes: tuple  # (a, b) pixels
    polygons: list  # canvas pixel polygons
    mask: np.ndarray = None  # canvas uint8
    bbox: tuple = None  # canvas (x0, y0, x1, y1), exclusive


def _sample_object(rng, cfg: SynthConfig, pile_center) -> _Object:
    label = int(rng.integers(cfg.num_classes)) + 1
    cls = CLASSES[label - 1]
    short = min(cfg.width, cfg.height)
    a = cls.half_length * short * cfg.object_scale * rng.uniform(0.85, 1.15)
    b = a / rng.uniform(*cls.aspect)
    angle = rng.uniform(0, 2 * np.pi)
    p = cfg.padding
    if rng.random() < 0.6:  # piled up around the pile centre
        center = pile_center + rng.normal(0, 0.18 * short, 2)
    else:  # anywhere, some cut by the image border
        center = rng.uniform((-0.05 * cfg.width, -0.05 * cfg.height),
                             (1.05 * cfg.width, 1.05 * cfg.height))
    center = center + p
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c * a, s * a], [-s * b, c * b]])  # rows: local u, v axes in pixels
    polygons = [pts @ rot + center for pts in _unit_outline(cls.shape, rng)]
    # Keep the whole amodal extent on the canvas, so that the amodal mask is exact.
    allp = np.concatenate(polygons)
    lo, hi = allp.min(0), allp.max(0)
    size = np.array([cfg.width + 2 * p, cfg.height + 2 * p], float)
    shift = np.maximum(1 - lo, 0) + np.minimum(size - 2 - hi, 0)
    polygons = [q + shift for q in polygons]
    return _Object(label, cls, center + shift, angle, (a, b), polygons)


def _rasterize(obj: _Object, canvas_hw) -> None:
    """The object's amodal mask: its polygons filled (8-connected, sub-pixel vertices)."""
    mask = np.zeros(canvas_hw, np.uint8)
    for poly in obj.polygons:
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    obj.mask = mask
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    obj.bbox = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if rows.size else (0, 0, 0, 0)


# --------------------------------------------------------------------------- looks


def _smooth_noise(rng, h, w, cell) -> np.ndarray:
    """Low-frequency noise in [0, 1], h x w, features about ``cell`` pixels wide."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    return cv2.resize(rng.random((gh, gw), np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng, cfg: SynthConfig, hc, wc) -> np.ndarray:
    """Float32 RGB canvas: a wooden table or a plastic bin floor with walls."""
    p, short = cfg.padding, min(cfg.width, cfg.height)
    y, x = np.mgrid[0:hc, 0:wc].astype(np.float32)
    mottle = _smooth_noise(rng, hc, wc, 0.15 * short)
    fine = rng.random((hc, wc), np.float32)
    if rng.random() < 0.5:  # wooden table: grain along a random direction, plank seams
        phi = rng.uniform(0, np.pi)
        across = x * np.sin(phi) + y * np.cos(phi)
        grain = np.sin(across * (2 * np.pi / (0.035 * short)) + 6 * mottle)
        base = np.array(rng.uniform((120, 80, 45), (185, 135, 90)), np.float32)
        shade = 0.9 + 0.07 * grain + 0.08 * fine
        plank = 0.22 * short
        shade *= np.where(np.mod(across + rng.uniform(0, plank), plank) < 1.5, 0.65, 1.0)
    else:  # plastic bin: mottled floor, darker walls along the image border
        base = np.array([(90, 110, 140), (120, 120, 125), (60, 120, 90),
                         (150, 60, 50)][rng.integers(4)], np.float32) * rng.uniform(0.8, 1.2)
        edge = np.minimum(np.minimum(x - p, cfg.width + p - 1 - x),
                          np.minimum(y - p, cfg.height + p - 1 - y))
        wall = np.clip(edge / (0.07 * short), 0, 1)
        shade = (0.55 + 0.45 * wall) * (0.9 + 0.15 * mottle + 0.05 * fine)
    # Light from one side: a gentle gradient over the whole scene.
    lx, ly = rng.normal(0, 1, 2) / (short * 8)
    shade = shade * (1 + lx * (x - wc / 2) + ly * (y - hc / 2))
    return shade[..., None] * base


def _texture(obj: _Object, rng, x0, y0, x1, y1, light) -> np.ndarray:
    """Float32 RGB of the object over canvas box [x0, x1) x [y0, y1)."""
    cls = obj.cls
    base, accent = (np.array(c, np.float32) for c in cls.palettes[rng.integers(len(cls.palettes))])
    base = np.clip(base * rng.uniform(0.88, 1.12) + rng.normal(0, 6, 3), 0, 255)
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - obj.center[0], yy - obj.center[1]
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    a, b = obj.half_axes
    u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
    r2 = u * u + v * v
    fine = rng.random((h, w), np.float32)
    shade = 1.0 + 0.12 * (dx * light[0] + dy * light[1]) / a
    col = np.broadcast_to(base, (h, w, 3)).copy()
    shape = cls.shape
    if shape == "box":
        band = np.abs(v) < rng.uniform(0.25, 0.4)
        col[band] = accent
        text = band & (np.abs(v) < 0.1) & (np.mod(u * 7, 1) < 0.55) & (np.abs(u) < 0.7)
        col[text] = base * 0.35
        shade = shade * np.where(np.maximum(np.abs(u), np.abs(v)) > 0.9, 0.82, 1.0)
        shade = shade * (0.96 + 0.06 * fine)
    elif shape == "can":
        r = np.sqrt(r2)
        shade = shade * (0.9 + 0.08 * np.cos(r * 28) + 0.04 * fine)
        shade = shade * np.where(r > 0.86, 1.18, 1.0) * np.where((r > 0.78) & (r < 0.84), 0.6, 1)
        tab = ((u - 0.35) / 0.26) ** 2 + (v / 0.14) ** 2 < 1
        col[tab] = accent
    elif shape == "bottle":
        col[(u > -0.55) & (u < 0.1)] = accent * 0.9 + base * 0.1
        cap = np.array([(220, 40, 40), (240, 240, 240), (30, 60, 160)][rng.integers(3)],
                       np.float32)
        col[u > 0.8] = cap
        shade = shade * (0.8 + 0.45 * np.exp(-((v - 0.35) / 0.15) ** 2) - 0.15 * v * v)
    elif shape == "bag":
        logo = (u / 0.45) ** 2 + (v / 0.55) ** 2 < 1
        col[logo] = accent
        col[np.abs(u) > 0.86] = (200, 200, 205)
        wrinkle = _smooth_noise(rng, h, w, 0.4 * b)
        shade = shade * (0.92 + 0.14 * np.sin(10 * u + 6 * v + 5 * wrinkle) + 0.04 * fine)
    elif shape in ("apple", "orange"):
        if shape == "apple":
            col[fine > 0.95] = accent
            stem = (u / 0.07) ** 2 + ((v - 0.72) / 0.16) ** 2 < 1
            col[stem] = (90, 55, 25)
            dimple = 0.07 * _smooth_noise(rng, h, w, 0.3 * b)
        else:
            dimple = 0.12 * cv2.GaussianBlur(fine, (3, 3), 0)
            col[r2 < 0.004] = accent
        highlight = np.exp(-((u + 0.4) ** 2 + (v + 0.4) ** 2) / 0.05)
        shade = shade * (1.08 - 0.38 * r2 + dimple) + 0.35 * highlight
    elif shape == "banana":
        spots = _smooth_noise(rng, h, w, 0.25 * b) > rng.uniform(0.72, 0.9)
        col[spots | (np.abs(u) > 0.9)] = accent
        shade = shade * (1.05 - 0.25 * v * v + 0.04 * fine)
    elif shape == "sponge":
        if rng.random() < 0.5:  # scrub side: fibrous green layer
            col[:] = accent
            shade = shade * (0.8 + 0.3 * fine)
        else:  # foam side: pores
            shade = shade * np.where(fine > 0.82, 0.7, 1.0)
    elif shape == "carton":
        band = (u > 0.35) & (u < 0.7)
        col[band] = accent
        shade = shade * np.where(v < 0, 1.05, 0.88) * np.where(np.abs(v) < 0.05, 1.1, 1.0)
        shade = shade * (0.97 + 0.04 * fine)
    elif shape == "cup":
        r = np.sqrt(r2)
        col[r > 0.84] = accent
        col[(r > 0.45) & (r < 0.52)] = accent
        shade = shade * (1.0 - 0.12 * r2 + 0.03 * fine)
    return col * shade[..., None]


def _cast_shadow(canvas, obj: _Object, light, short) -> None:
    """Darken what lies below the object (drawn before it) by a soft, offset shadow."""
    off = -np.asarray(light) * 0.035 * short / np.hypot(*light)
    ox, oy = int(round(off[0])), int(round(off[1]))
    k = max(3, int(0.03 * short) | 1)
    hc, wc = canvas.shape[:2]
    x0, y0, x1, y1 = obj.bbox
    # Region the shadow can reach, clipped to the canvas.
    rx0, ry0 = max(0, x0 + ox - k), max(0, y0 + oy - k)
    rx1, ry1 = min(wc, x1 + ox + k), min(hc, y1 + oy + k)
    if rx1 <= rx0 or ry1 <= ry0:
        return
    src = np.zeros((ry1 - ry0, rx1 - rx0), np.float32)
    sx0, sy0 = max(rx0, x0 + ox), max(ry0, y0 + oy)
    sx1, sy1 = min(rx1, x1 + ox), min(ry1, y1 + oy)
    if sx1 > sx0 and sy1 > sy0:
        src[sy0 - ry0:sy1 - ry0, sx0 - rx0:sx1 - rx0] = \
            obj.mask[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
    alpha = cv2.GaussianBlur(src, (k, k), 0)
    canvas[ry0:ry1, rx0:rx1] *= (1 - 0.45 * alpha)[..., None]


# --------------------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, cfg: SynthConfig, image_id: int = 1,
                 file_name: str = "", first_annotation_id: int = 1) -> AmodalSample:
    """One synthetic scene with exact amodal and visible masks and "lies on" relations.

    Instances are in draw order (bottom first); relation (i, j) means i lies on j: i is
    drawn later and their amodal masks overlap.
    """
    geom_rng, look_rng = rng.spawn(2)  # looks never change the geometry (flat_shading)
    w, h, p = cfg.width, cfg.height, cfg.padding
    hc, wc = h + 2 * p, w + 2 * p
    short = min(w, h)
    pile_center = geom_rng.uniform((0.25 * w, 0.25 * h), (0.75 * w, 0.75 * h))
    count = int(geom_rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = [_sample_object(geom_rng, cfg, pile_center) for _ in range(count)]
    for obj in objects:
        _rasterize(obj, (hc, wc))

    # Top down: an object is visible where it is in the image and nothing kept lies above.
    in_image = np.zeros((hc, wc), bool)
    in_image[p:p + h, p:p + w] = True
    covered = ~in_image
    kept, visible = [], []
    for obj in reversed(objects):
        vis = obj.mask.astype(bool) & ~covered
        area, vis_area = int(obj.mask.sum()), int(vis.sum())
        if vis_area >= max(cfg.min_visible_pixels, cfg.min_visible_fraction * area, 1):
            kept.append(obj)
            visible.append(vis)
            covered |= obj.mask.astype(bool)
    kept.reverse()
    visible.reverse()

    relations = []
    for j, upper in enumerate(kept):
        for i in range(j):
            lower = kept[i]
            ax0, ay0, ax1, ay1 = upper.bbox
            bx0, by0, bx1, by1 = lower.bbox
            x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            if x1 > x0 and y1 > y0 and (upper.mask[y0:y1, x0:x1]
                                        & lower.mask[y0:y1, x0:x1]).any():
                relations.append((j, i))

    if cfg.flat_shading:
        canvas = np.zeros((hc, wc, 3), np.float32)
    else:
        canvas = _background(look_rng, cfg, hc, wc)
        angle = look_rng.uniform(0, 2 * np.pi)
        light = (np.cos(angle), np.sin(angle))
    for k, obj in enumerate(kept):
        x0, y0, x1, y1 = obj.bbox
        m = obj.mask[y0:y1, x0:x1].astype(bool)
        if cfg.flat_shading:
            canvas[y0:y1, x0:x1][m] = flat_colour(k)
            continue
        if cfg.shadows:
            _cast_shadow(canvas, obj, light, short)
        canvas[y0:y1, x0:x1][m] = _texture(obj, look_rng, x0, y0, x1, y1, light)[m]
    image = canvas[p:p + h, p:p + w]
    if not cfg.flat_shading:  # sensor noise
        image = image + look_rng.integers(-3, 4, image.shape).astype(np.float32)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    n = len(kept)
    amodal = np.stack([o.mask for o in kept]) if n else np.zeros((0, hc, wc), np.uint8)
    vis = np.stack(visible).astype(np.uint8) if n else np.zeros((0, hc, wc), np.uint8)
    return AmodalSample(
        image=image, boxes=mask_boxes(amodal, p),
        labels=np.array([o.label for o in kept], np.int64), amodal_masks=amodal,
        visible_masks=vis, mask_padding=p,
        occlusion_relations=np.array(relations, np.int64).reshape(-1, 2),
        image_id=image_id, file_name=file_name,
        annotation_ids=np.arange(first_annotation_id, first_annotation_id + n))


def flat_colour(k: int) -> tuple:
    """The distinct RGB colour of instance ``k`` under ``flat_shading`` (never black)."""
    k += 1
    return (k & 0xFF, (k >> 8) & 0xFF, 255 - (k % 7) * 30)


def generate_samples(num_images: int, seed: int, cfg: SynthConfig) -> Iterator[AmodalSample]:
    """Render images 1..num_images in memory (image ``i`` from ``default_rng([seed, i])``)."""
    cfg.validate()
    next_ann = 1
    for i in range(num_images):
        sample = render_scene(np.random.default_rng([seed, i]), cfg, image_id=i + 1,
                              file_name=f"images/{i + 1:06d}.png", first_annotation_id=next_ann)
        next_ann += len(sample)
        yield sample


def generate_dataset(out_dir, num_images: int, seed: int, size=(320, 240),
                     num_classes: int = 8, cfg: Optional[SynthConfig] = None) -> Path:
    """Write ``out_dir/images/NNNNNN.png`` and then ``out_dir/annotations.json``.

    ``cfg`` overrides ``size`` (width, height) and ``num_classes``. Bad parameters raise
    :class:`InputError` before anything is written. Returns the annotation file's path.
    """
    if cfg is None:
        cfg = SynthConfig(width=int(size[0]), height=int(size[1]), num_classes=num_classes)
    cfg.validate()
    if not 1 <= num_images <= 10_000_000:
        raise InputError(f"num-images {num_images}: must be at least 1")
    if not 0 <= seed < 2 ** 63:
        raise InputError(f"seed {seed}: must be a non-negative integer")
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder: {exc.strerror}") from None

    def written():
        for sample in generate_samples(num_images, seed, cfg):
            atomic_write_bytes(out / sample.file_name, encode_png(sample.image, "rgb"))
            yield sample

    path = out / "annotations.json"
    try:
        write_amodal_coco(written(), path, categories=cfg.categories,
                          info={"description": "orcnn-core synth", "seed": seed,
                                "width": cfg.width, "height": cfg.height})
    except OSError as exc:  # disk full, file size limit: the failed write left nothing
        raise InputError(f"{out}: cannot write {exc.filename or path} "
                         f"({exc.strerror or exc}); {path.name} not written, the data set "
                         f"is incomplete") from None
    return path


def check_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 scene of ``height`` x ``width``: objects a model trained on
    this data set detects, so that a check of an exported graph against the eager model
    compares real detections rather than empty outputs."""
    return render_scene(np.random.default_rng([seed, 0]),
                        SynthConfig(width=width, height=height)).image


def parse_size(text: str) -> tuple:
    """(width, height) of a ``WxH`` string, else :class:`InputError`."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", str(text))
    if not match:
        raise InputError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 320x240")
    return int(match.group(1)), int(match.group(2))


def run_cli(args) -> int:
    """``orcnn-core synth``: write a synthetic data set (arguments from orcnn_core.cli)."""
    width, height = parse_size(args.size)
    cfg = SynthConfig(width=width, height=height, num_classes=args.classes)
    if args.min_objects is not None:
        cfg.min_objects = args.min_objects
    if args.max_objects is not None:
        cfg.max_objects = args.max_objects
    start = time.perf_counter()
    path = generate_dataset(args.out, args.num_images, args.seed, cfg=cfg)
    took = time.perf_counter() - start
    print(f"wrote {args.num_images} images ({width}x{height}, {cfg.num_classes} classes) "
          f"and {path} in {took:.1f} s ({args.num_images / took:.0f} images/s)")
    return 0


def bench(num_images: int = 200, size=(320, 240), seed: int = 0) -> dict:
    """Images per second of rendering alone and with PNG + RLE encoding (one thread)."""
    cv2.setNumThreads(1)
    cfg = SynthConfig(width=size[0], height=size[1])
    start = time.perf_counter()
    samples = list(generate_samples(num_images, seed, cfg))
    render = time.perf_counter() - start
    start = time.perf_counter()
    for s in samples:
        encode_png(s.image, "rgb")
        for m in (s.amodal_masks, s.visible_masks, s.invisible_masks):
            [encode(x) for x in m]
    encoding = time.perf_counter() - start
    return {"images": num_images, "size": f"{size[0]}x{size[1]}",
            "render_per_s": num_images / render,
            "with_encoding_per_s": num_images / (render + encoding),
            "objects_per_image": sum(len(s) for s in samples) / num_images}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orcnn_core.synth",
                                     description="Benchmark the synthetic scene renderer.")
    parser.add_argument("--bench", action="store_true", help="measure images/s")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--size", default="320x240")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 2
    result = bench(args.num, parse_size(args.size))
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
