"""Overlay of a :class:`~orcnn_core.prediction.Prediction` on its image (debug images, CLI).

Per instance, in its class colour: the visible pixels tinted with the colour, the hidden
pixels (label 2: occluded) tinted with a lighter tone of it, the amodal outline, and the
instance's pick order number (1 = pick first, from the occlusion graph) at the centroid of
its visible pixels (of the amodal mask when nothing is visible).

Speed matters (the ROS node draws every frame): all work is done on each instance's roi
window, never on a full-frame mask per instance.
"""

import cv2
import numpy as np

from orcnn_core.occlusion import occlusion_graph
from orcnn_core.prediction import HIDDEN, VISIBLE, Prediction

__all__ = ["draw_prediction", "class_colour", "PALETTE"]

#: RGB colours of classes 1, 2, ... (cycled): saturated mid tones, so a lighter tone of each
#: still differs from it and white text stays readable on both.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 170, 170), (200, 50, 200), (150, 150, 20), (170, 110, 40), (128, 0, 0),
    (0, 128, 128), (0, 0, 128), (128, 128, 0), (200, 30, 30), (30, 100, 30),
], np.uint8)
#: Opacity of the tint over the image (the same for visible and hidden pixels, so hidden
#: pixels come out lighter than visible ones on any background).
TINT_ALPHA = 0.5
#: Hidden tone = colour + LIGHTEN * (white - colour).
LIGHTEN = 0.6


def class_colour(label: int, color_order: str = "rgb") -> tuple:
    """The overlay colour of class ``label`` (1..K) as a tuple in ``color_order``."""
    rgb = PALETTE[(int(label) - 1) % len(PALETTE)]
    return tuple(int(v) for v in (rgb[::-1] if color_order == "bgr" else rgb))


def _tint(window: np.ndarray, selected: np.ndarray, colour) -> None:
    """``window[selected] = (1 - TINT_ALPHA) * window + TINT_ALPHA * colour``, in place.

    ``window`` is a view into the output image. cv2 blends the whole (small) window and
    copies it back under the mask: several times faster than numpy's boolean gather and
    scatter of the same pixels.
    """
    tinted = cv2.add(cv2.convertScaleAbs(window, alpha=1.0 - TINT_ALPHA),
                     tuple(TINT_ALPHA * float(c) for c in colour) + (0.0,))
    cv2.copyTo(tinted, selected.view(np.uint8), window)


def _pick_numbers(prediction: Prediction, graph) -> np.ndarray:
    """1-based pick rank of every instance (rank[i] = 1 + position of i in pick_order)."""
    n = len(prediction)
    if graph is None:
        graph = occlusion_graph(prediction)
    order = np.asarray(graph.pick_order, np.int64)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"graph.pick_order must be a permutation of the {n} instances, got "
                         f"{order.tolist()}")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(1, n + 1)
    return rank


def _draw_number(out: np.ndarray, text: str, centre, scale: float, thickness: int) -> None:
    """White ``text`` with a black rim, centred on ``centre`` (x, y)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = (int(round(centre[0] - tw / 2)), int(round(centre[1] + th / 2)))
    cv2.putText(out, text, origin, font, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(out, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def draw_prediction(image: np.ndarray, prediction: Prediction, graph=None,
                    color_order: str = "rgb") -> np.ndarray:
    """The overlay of ``prediction`` on ``image`` (H x W x 3 uint8), a new array of the same
    shape, dtype and ``color_order`` ("rgb" or "bgr"; only the class colours depend on it).

    ``graph`` is the :class:`orcnn_core.occlusion.OcclusionGraph` of the prediction (its
    ``pick_order`` numbers the instances); None computes it with
    :func:`orcnn_core.occlusion.occlusion_graph`. An empty prediction returns an unchanged
    copy of the image.
    """
    if color_order not in ("rgb", "bgr"):
        raise ValueError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        raise ValueError(f"image must be an H x W x 3 uint8 array, got "
                         f"{getattr(image, 'shape', type(image).__name__)} "
                         f"{getattr(image, 'dtype', '')}")
    height, width = image.shape[:2]
    if tuple(prediction.image_size) != (height, width):
        raise ValueError(f"prediction is for a {prediction.image_size} image, the image is "
                         f"{(height, width)}")
    out = np.ascontiguousarray(image).copy()
    n = len(prediction)
    if n == 0:
        return out
    rank = _pick_numbers(prediction, graph)
    colours = [np.array(class_colour(label, color_order), np.uint8)
               for label in prediction.labels]
    windows = []
    for (x, y, w, h), crop in zip(prediction.rois, prediction.crops):
        # The part of the roi inside the image; the crop may reach outside it.
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        inside = crop[y0 - y:y1 - y, x0 - x:x1 - x] if x1 > x0 and y1 > y0 else None
        windows.append((x0, y0, x1, y1, inside))

    # Hidden tints first, visible ones over them: where an object hides another, its own
    # visible tint stays the stronger colour and the hidden one shows through as a haze.
    for label_value in (HIDDEN, VISIBLE):
        for i, (x0, y0, x1, y1, inside) in enumerate(windows):
            if inside is None:
                continue
            selected = inside == label_value
            if not selected.any():
                continue
            colour = colours[i]
            if label_value == HIDDEN:
                colour = (colour + LIGHTEN * (255.0 - colour)).round().astype(np.uint8)
            _tint(out[y0:y1, x0:x1], selected, colour)

    # Amodal outline: contours of the whole crop shifted to the image; cv2 clips what lies
    # outside the image, so a truncated object's outline simply ends at the border.
    thickness = max(1, int(round(min(height, width) / 320)))
    for (x, y, _, _), crop, colour in zip(prediction.rois, prediction.crops, colours):
        contours, _ = cv2.findContours((crop != 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE, offset=(int(x), int(y)))
        if contours:
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness,
                             cv2.LINE_8)

    # Pick numbers last, so no tint or outline covers them.
    scale = max(0.4, min(height, width) / 640)
    text_thickness = max(1, int(round(scale * 1.5)))
    for i, ((x, y, _, _), crop) in enumerate(zip(prediction.rois, prediction.crops)):
        m = cv2.moments((crop == VISIBLE).view(np.uint8), binaryImage=True)
        if m["m00"] == 0:
            m = cv2.moments((crop != 0).view(np.uint8), binaryImage=True)
        if m["m00"] == 0:
            continue  # empty mask: nothing to label
        # Centroid in pixel indices, moved into the image for wholly hidden truncated parts.
        cx = min(max(x + m["m10"] / m["m00"], 0), width - 1)
        cy = min(max(y + m["m01"] / m["m00"], 0), height - 1)
        _draw_number(out, str(int(rank[i])), (cx, cy), scale, text_thickness)
    return out
