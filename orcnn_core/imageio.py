"""Image files: finding, reading and writing them.

One place for what the library accepts as an image file (:data:`IMAGE_SUFFIXES`), how it
decodes one (a bad file raises :class:`~orcnn_core.errors.InputError` naming it) and how
it writes one (PNG).
"""

import contextlib
import glob
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from orcnn_core.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "find_images", "read_image", "check_decodable",
           "check_writable_dir", "check_output_file", "encode_png"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(spec) -> list:
    """Image files of ``spec``: a folder (its image files, not recursive), a glob pattern
    (``**`` recurses) or one file; sorted. No image: :class:`InputError`."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and _is_image_name(p)]
        where = f"folder {spec}"
    elif path.is_file():
        found = [path]
        where = spec
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True)]
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


def read_image(path) -> np.ndarray:
    """BGR uint8 H x W x 3 image of ``path``; a file that cannot be read or decoded raises
    :class:`InputError` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc.strerror})") from None
    with _quiet_decoders():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise InputError(f"{path}: cannot decode image (not an image file, or truncated)")
    return image


def check_decodable(paths) -> None:
    """Refuse files whose header no image decoder recognises, before any model work
    (a file with a good header but corrupt data is found when it is read)."""
    for path in paths:
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: cannot read image (no permission)")
        if not cv2.haveImageReader(str(path)):
            raise InputError(f"{path}: not an image file cv2 can decode")


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
