"""Image files: finding, reading and writing them.

One place for what the library accepts as an image file (:data:`IMAGE_SUFFIXES`), how it
decodes one (a bad file raises :class:`~orcnn_core.errors.InputError` naming it) and how
it writes one (PNG).

Image size limits: before a file is decoded, its header's width and height are checked
against :data:`MAX_PIXELS`, :data:`MAX_SIDE` and :data:`MAX_ASPECT_RATIO`, so that a small
file cannot make the decoder allocate a huge image. The defaults pass a 4K camera
(3840 x 2160) with room to spare; the environment variables named in :data:`LIMIT_ENV`
raise them (e.g. ``ORCNN_MAX_IMAGE_PIXELS=200000000``). The perception node applies the same
limits to camera frames (:func:`size_problem`), and the fixed-size inference back-ends to
the sizes they build graphs for.

JPEG decode budget: a progressive JPEG is decoded once per scan, and nothing in the format
bounds the number of scans: a few hundred kilobytes of repeated scans can keep a decoder
busy for tens of seconds. :func:`jpeg_decode_problem` refuses, from the stream alone, more
than :data:`MAX_JPEG_SCANS` scans or more than :data:`MAX_JPEG_SCAN_PIXELS` pixels x scans.
"""

import contextlib
import glob
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from orcnn_core.errors import InputError
from orcnn_core.fileio import check_regular_file

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "MAX_SIDE", "MAX_ASPECT_RATIO", "LIMIT_ENV",
           "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_PIXELS", "image_limits", "size_problem",
           "jpeg_scans", "jpeg_decode_problem", "image_size", "check_image_size",
           "find_images", "read_image",
           "check_decodable", "check_writable_dir", "check_output_file", "encode_png"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Most pixels (width x height) an image file or camera frame may have: 64 Mpx, 8x a 4K
#: frame, 192 MB once decoded.
MAX_PIXELS = 64 * 1024 * 1024
#: Longest side in pixels.
MAX_SIDE = 16384
#: Longest side over shortest side (a 4K frame is 1.78; a 360-degree panorama 2 to 4).
MAX_ASPECT_RATIO = 16.0
#: The environment variable that raises (or lowers) each limit.
LIMIT_ENV = {"pixels": "ORCNN_MAX_IMAGE_PIXELS", "side": "ORCNN_MAX_IMAGE_SIDE",
             "aspect_ratio": "ORCNN_MAX_IMAGE_ASPECT_RATIO",
             "jpeg_scan_pixels": "ORCNN_MAX_JPEG_SCAN_PIXELS"}
#: Most scans a JPEG stream may have, whatever its size. A baseline JPEG has 1 (3 when its
#: components are not interleaved), libjpeg's progressive mode 10, a full successive
#: approximation script about 200; each scan is one more pass of the decoder.
MAX_JPEG_SCANS = 256
#: Most pixels x scans a JPEG stream may cost to decode: a 4K frame (8.3 Mpx) with 32 scans,
#: a 64 Mpx frame with 4. Measured with libjpeg-turbo through OpenCV on one core: under a
#: second at this budget, where 1,000 scans of a 1 Mpx frame took 2.9 s (docs/security.md).
MAX_JPEG_SCAN_PIXELS = 256 * 1024 * 1024
_JPEG_SOS = b"\xff\xda"


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _plain_component(component: str) -> str:
    """Regular expression of one glob path component: ``*``, ``?`` and ``[...]`` never
    cross a ``/``."""
    out, i = [], 0
    while i < len(component):
        c = component[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in component[i + 2:]:
            end = component.index("]", i + 2)
            body = component[i + 1:end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace("\\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _first_visit(folder: str, seen: set) -> bool:
    """Whether ``folder`` (a link to one resolved) is seen for the first time; records it."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _recursive_glob(spec: str) -> list:
    """Files matching a pattern with ``**`` (any number of folders, none included), found
    with ``os.walk``, which follows symbolic links to folders but enters each real folder
    once: a link loop ends the walk instead of being followed without end, as ``glob``'s
    ``**`` does. Hidden names match only a pattern component that starts with a dot, as
    with ``glob``."""
    parts = spec.split("/")
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = "/".join(parts[:fixed]) or ("/" if spec.startswith("/") else ".")
    prefix = "/".join(parts[:fixed]) + "/" if fixed else ""
    regex = []
    for k, part in enumerate(parts[fixed:]):
        last = k == len(parts) - fixed - 1
        if part == "**":
            regex.append("(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*")
        else:
            regex.append(_plain_component(part) + ("" if last else "/"))
    matcher = re.compile(re.escape(prefix) + "".join(regex) + r"\Z", re.DOTALL)
    hidden_ok = parts[-1].startswith(".")
    found, seen = [], set()
    _first_visit(root, seen)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in sorted(dirs)
                   if not d.startswith(".") and _first_visit(os.path.join(folder, d), seen)]
        relative = os.path.relpath(folder, root)
        base = prefix + ("" if relative == "." else relative + "/")
        for name in files:
            if (hidden_ok or not name.startswith(".")) and matcher.match(base + name):
                found.append(Path(base + name))
    return found


def find_images(spec) -> list:
    """Image files of ``spec``: a folder (its image files, not recursive), a glob pattern
    (``**`` recurses, without following links to folders) or one file; sorted. No image:
    :class:`InputError`."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and _is_image_name(p)]
        where = f"folder {spec}"
    elif path.is_file():
        found = [path]
        where = spec
    else:
        found = _recursive_glob(spec) if "**" in spec \
            else [Path(p) for p in glob.glob(spec)]
        found = [p for p in found if p.is_file() and _is_image_name(p)]
        where = f"pattern {spec!r}"
    if not found:
        raise InputError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {where}")
    return sorted(found)


@contextlib.contextmanager
def _quiet_decoders():
    """Silence what image decoders print on bad data while decoding one image.

    cv2 logs its own warning, and libpng/libjpeg write to file descriptor 2 directly (e.g.
    "libpng error: PNG input buffer is incomplete"); the InputError that follows names the
    file and says it better. Descriptor 2 is pointed at /dev/null for the one call.
    """
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        cv2.utils.logging.setLogLevel(level)


def image_limits() -> dict:
    """The size limits in force: the module defaults, or the environment variables of
    :data:`LIMIT_ENV`; a bad value of one raises :class:`InputError` naming it."""
    limits = {"pixels": MAX_PIXELS, "side": MAX_SIDE, "aspect_ratio": MAX_ASPECT_RATIO,
              "jpeg_scan_pixels": MAX_JPEG_SCAN_PIXELS}
    for key, variable in LIMIT_ENV.items():
        raw = os.environ.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = float(raw) if key == "aspect_ratio" else int(raw)
        except ValueError:
            value = None
        if value is None or not value >= 1 or value == float("inf"):
            raise InputError(f"environment variable {variable}={raw!r}: expected "
                             f"{'a number' if key == 'aspect_ratio' else 'an integer'} >= 1")
        limits[key] = value
    return limits


def size_problem(width: int, height: int, limits=None):
    """None when a ``width`` x ``height`` image is within ``limits`` (default:
    :func:`image_limits`), else ``(what is wrong, LIMIT_ENV key of the limit)``, e.g.
    ``("an aspect ratio above 16", "aspect_ratio")``."""
    limits = image_limits() if limits is None else limits
    long_side, short_side = max(width, height), min(width, height)
    if short_side < 1:
        return "an empty image", None
    if long_side > limits["side"]:
        return f"a side longer than {limits['side']} px", "side"
    if width * height > limits["pixels"]:
        return f"more than {limits['pixels']} pixels", "pixels"
    if long_side / short_side > limits["aspect_ratio"]:
        return f"an aspect ratio above {limits['aspect_ratio']:g}", "aspect_ratio"
    return None


def jpeg_scans(data) -> int:
    """How many scans (start-of-scan markers) a JPEG stream holds. Entropy-coded data never
    contains the marker (a 0xFF byte there is followed by 0x00 or a restart marker); an
    embedded thumbnail's scans count too, which errs on the safe side."""
    return bytes(data).count(_JPEG_SOS)


def jpeg_decode_problem(data, width: int, height: int, limits=None):
    """None when decoding the JPEG stream ``data`` of ``width`` x ``height`` (from its
    header) fits the decode budget, else what exceeds it: more than :data:`MAX_JPEG_SCANS`
    scans, or more pixels x scans than ``limits["jpeg_scan_pixels"]`` (default:
    :func:`image_limits`, :data:`MAX_JPEG_SCAN_PIXELS` unless its variable raises it)."""
    budget = (image_limits() if limits is None else limits)["jpeg_scan_pixels"]
    scans = jpeg_scans(data)
    if scans > MAX_JPEG_SCANS:
        return f"{scans} scans (at most {MAX_JPEG_SCANS} are decoded)"
    if scans * width * height > budget:
        return (f"{scans} scans of {width} x {height} pixels, more than the decode budget of "
                f"{budget} pixels x scans ({LIMIT_ENV['jpeg_scan_pixels']} raises it)")
    return None


def image_size(path) -> tuple:
    """(width, height) of an image file from its header alone (nothing is decoded);
    a file whose header no reader recognises raises :class:`InputError`."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limits apply, after the size is known
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return tuple(int(v) for v in image.size)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (its header is not one of "
                         f"{', '.join(IMAGE_SUFFIXES)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read image header "
                         f"({exc.strerror or exc})") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{path}: corrupt image header ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_image_size(path) -> tuple:
    """(width, height) of an image file after checking them, from its header, against
    :func:`image_limits`: one :class:`InputError` naming the limit and how to raise it."""
    check_regular_file(path, "")
    width, height = image_size(path)
    problem = size_problem(width, height)
    if problem is None:
        return width, height
    what, key = problem
    if key is None:
        raise InputError(f"{path}: image is {width} x {height}, {what}")
    raise InputError(f"{path}: image is {width} x {height}, {what} (the limit; set "
                     f"{LIMIT_ENV[key]} to raise it)")


def read_image(path) -> np.ndarray:
    """BGR uint8 H x W x 3 image of ``path``; a file that cannot be read or decoded, is
    larger than the size limits (:func:`check_image_size`, checked before decoding) or is a
    JPEG beyond the decode budget (:func:`jpeg_decode_problem`) raises :class:`InputError`
    naming it."""
    width, height = check_image_size(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc.strerror})") from None
    if data[:3] == b"\xff\xd8\xff":
        problem = jpeg_decode_problem(data, width, height)
        if problem:
            raise InputError(f"{path}: JPEG with {problem}")
    with _quiet_decoders():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise InputError(f"{path}: cannot decode image (not an image file, or truncated)")
    return image


def check_decodable(paths) -> None:
    """Refuse files whose header no image decoder recognises or whose size exceeds the
    limits, before any model work (a file with a good header but corrupt data is found
    when it is read)."""
    for path in paths:
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: cannot read image (no permission)")
        if not cv2.haveImageReader(str(path)):
            raise InputError(f"{path}: not an image file cv2 can decode")
        check_image_size(path)


def check_writable_dir(path, what: str) -> Path:
    """Create folder ``path`` when missing and prove it writable with a temporary file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".orcnn-write-test.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except FileExistsError:
        raise InputError(f"{what} {path}: exists and is not a folder") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write there ({exc.strerror})") from None
    return path


def check_output_file(path, what: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory, expected a file name")
    check_writable_dir(path.parent, what)


def encode_png(image: np.ndarray, color_order: str = "bgr") -> bytes:
    """PNG bytes of an H x W x 3 uint8 image (fast compression; deterministic)."""
    if color_order == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
