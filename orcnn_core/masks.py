"""COCO mask encodings (RLE, polygons) to and from numpy, checked against their canvas.

Every function that reads user data takes ``where`` (e.g. ``"gt.json: annotation 7:
visible_mask"``) so that a bad mask fails with one :class:`InputError` naming its place.
User data is checked here before pycocotools sees it: its C code trusts its input (a
polygon point at 1e300 or a canvas of 10^9 x 10^9 pixels crash or exhaust memory).
"""

import math
import numbers

import numpy as np
import pycocotools.mask as mask_utils

from orcnn_core.errors import InputError

#: Largest canvas side (image side + 2 x mask padding) accepted from a file. Keeps every
#: RLE run within pycocotools' 32-bit counts and a decoded mask within 1 GiB.
MAX_CANVAS_SIDE = 32768


def encode(mask: np.ndarray) -> dict:
    """Compressed RLE of a 2-D mask, with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode(rle: dict) -> np.ndarray:
    """uint8 H x W mask of a compressed RLE (``counts`` str or bytes)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle)


def is_number(value, limit=None) -> bool:
    """A finite int or float (not bool), of magnitude at most ``limit`` when given. JSON
    ints have no size limit, so this never raises (``math.isfinite(10**400)`` would)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        if not math.isfinite(value):
            return False
    except OverflowError:
        return False
    return limit is None or abs(value) <= limit


def check_canvas(height: int, width: int, padding: int, where: str) -> None:
    """An image of ``height`` x ``width`` pixels with ``padding`` must fit
    :data:`MAX_CANVAS_SIDE` (the values are known to be integers >= their minimum)."""
    for name, side in (("height", height), ("width", width)):
        if side + 2 * padding > MAX_CANVAS_SIDE:
            raise InputError(f"{where}: {name} {side} with mask padding {padding} exceeds "
                             f"the largest canvas side, {MAX_CANVAS_SIDE} pixels")


def _check_size(size, where):
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                       and 0 <= v <= MAX_CANVAS_SIDE for v in size)):
        raise InputError(f"{where}: RLE 'size' must be [height, width] (at most "
                         f"{MAX_CANVAS_SIDE} each), got {short_repr(size)}")
    return int(size[0]), int(size[1])


def short_repr(value, limit: int = 80) -> str:
    """repr() of user data, cut to ``limit`` characters for a short one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...)"


def _compressed_counts(raw: bytes, where: str) -> list:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString, checked).

    pycocotools reads past the end of a malformed string instead of failing, so user data
    is parsed here first.
    """
    runs = []
    pos = 0
    while pos < len(raw):
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= len(raw):
                raise InputError(f"{where}: corrupt RLE counts (truncated)")
            c = raw[pos] - 48
            if not 0 <= c < 64:
                raise InputError(f"{where}: corrupt RLE counts (byte {raw[pos]!r})")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_size(segm, where: str):
    """(height, width) an RLE declares, or None for polygons."""
    if isinstance(segm, dict):
        if "size" not in segm or "counts" not in segm:
            raise InputError(f"{where}: RLE needs 'size' and 'counts'")
        return _check_size(segm["size"], where)
    return None


def to_rle(segm, height: int, width: int, where: str, polygon_offset: int = 0) -> dict:
    """Compressed RLE (str counts) of a COCO segmentation on a ``height`` x ``width`` canvas.

    Accepts compressed RLE (counts str or bytes), uncompressed RLE (counts a list of ints)
    and polygons (a list of [x0, y0, x1, y1, ...] in image pixels, shifted by
    ``polygon_offset`` onto the canvas). An RLE whose size is not the canvas, a polygon with
    fewer than 3 points, or malformed counts raise :class:`InputError` naming ``where``.
    """
    if isinstance(segm, dict):
        size = rle_size(segm, where)
        if size != (height, width):
            raise InputError(
                f"{where}: RLE size {list(size)} disagrees with the image canvas "
                f"[{height}, {width}]")
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0
                       for c in counts) or sum(counts) != height * width:
                raise InputError(f"{where}: uncompressed RLE counts must be non-negative "
                                 f"integers summing to {height} x {width}")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                         height, width)
        elif isinstance(counts, (str, bytes)):
            try:
                raw = counts.encode("ascii") if isinstance(counts, str) else counts
            except UnicodeEncodeError:
                raise InputError(f"{where}: corrupt RLE counts (not ASCII)") from None
            runs = _compressed_counts(raw, where)
            if any(r < 0 for r in runs) or sum(runs) != height * width:
                raise InputError(f"{where}: corrupt RLE counts (runs do not cover the "
                                 f"{height} x {width} canvas)")
            rle = {"size": [height, width], "counts": raw}
        else:
            raise InputError(f"{where}: RLE counts must be a string or a list of integers")
        counts = rle["counts"]
        return {"size": [height, width],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    if isinstance(segm, list):
        if not segm:
            raise InputError(f"{where}: empty polygon list")
        polygons = []
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2 or not all(map(is_number, poly)):
                raise InputError(f"{where}: a polygon must be a flat list of x, y numbers")
            if len(poly) < 6:
                raise InputError(f"{where}: polygon with {len(poly) // 2} points "
                                 f"(at least 3 needed)")
            shifted = [float(v) + polygon_offset for v in poly]
            # pycocotools rasterises the outline point by point in int coordinates: far
            # points overflow or allocate without bound. One canvas size beyond the canvas
            # is far more than any amodal extent.
            for x, y in zip(shifted[0::2], shifted[1::2]):
                if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
                    raise InputError(f"{where}: polygon point ({x - polygon_offset:g}, "
                                     f"{y - polygon_offset:g}) lies more than a canvas size "
                                     f"outside the {height} x {width} canvas")
            polygons.append(shifted)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    raise InputError(f"{where}: segmentation must be an RLE dict or a list of polygons, "
                     f"got {type(segm).__name__}")


def pad_mask(mask: np.ndarray, pad: int) -> np.ndarray:
    """Place an image-sized mask on a canvas with ``pad`` zero pixels on every side."""
    if pad == 0:
        return mask
    return np.pad(mask, pad, mode="constant")


# RLE arithmetic without decoding the canvas: evaluation and relation derivation on
# canvases up to MAX_CANVAS_SIDE must not hold full-canvas masks (1 GiB each at the limit).


def _runs(rle: dict) -> np.ndarray:
    """Run lengths (int64) of a checked compressed RLE (zeros first)."""
    counts = rle["counts"]
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    return np.asarray(_compressed_counts(raw, "RLE"), np.int64)


def rle_difference(a: dict, b: dict) -> dict:
    """Compressed RLE (str counts) of ``a AND NOT b`` (same canvas), computed on the runs.

    ``a - b = a XOR (a AND b)``, and the boundaries of a XOR of two run sets are the
    symmetric difference of their boundaries.
    """
    both = mask_utils.merge([a, b], intersect=True)
    total = int(a["size"][0]) * int(a["size"][1])
    edges = np.setxor1d(np.cumsum(_runs(a))[:-1], np.cumsum(_runs(both))[:-1])
    edges = edges[edges < total]  # an edge at 0: the mask starts with ones
    runs = np.diff(np.concatenate([[0], edges, [total]]))
    rle = mask_utils.frPyObjects({"size": list(a["size"]), "counts": runs.tolist()},
                                 *a["size"])
    return {"size": list(a["size"]), "counts": rle["counts"].decode("ascii")}


def decode_window(rle: dict, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """uint8 (y1 - y0) x (x1 - x0) window of an RLE's mask, without decoding the rest of
    the canvas: memory grows with the window and the number of runs only."""
    height = int(rle["size"][0])
    ends = np.cumsum(_runs(rle))
    starts, ends = (ends - np.diff(np.concatenate([[0], ends])))[1::2], ends[1::2]
    keep = (ends > starts) & (ends > x0 * height) & (starts < x1 * height)
    starts, ends = starts[keep], ends[keep]
    # Split every run of ones (column-major) into its pieces per column.
    first, last = starts // height, (ends - 1) // height
    pieces = last - first + 1
    run = np.repeat(np.arange(len(starts)), pieces)
    column = first[run] + np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces,
                                                              pieces)
    top = np.clip(starts[run] - column * height, y0, y1)
    bottom = np.clip(ends[run] - column * height, y0, y1)
    inside = (column >= x0) & (column < x1) & (bottom > top)
    change = np.zeros((x1 - x0, y1 - y0 + 1), np.int8)
    np.add.at(change, (column[inside] - x0, top[inside] - y0), 1)
    np.add.at(change, (column[inside] - x0, bottom[inside] - y0), -1)
    return np.ascontiguousarray(np.cumsum(change[:, :-1], axis=1, dtype=np.int8).T
                                ).astype(np.uint8)
