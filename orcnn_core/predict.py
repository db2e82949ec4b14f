"""Running a weights file over image files: ``orcnn-core predict`` and ``evaluate --weights``.

Both share one path from an image file to COCO result entries (:func:`predict_file`), so
``evaluate --weights`` gives exactly the metrics of ``predict --gt`` followed by the
file-to-file ``evaluate``. Every input (image list, output folder, ground truth, weights)
is checked before the first image is processed; bad input raises
:class:`~orcnn_core.errors.InputError` naming the file or parameter.
"""

import contextlib
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_bytes, atomic_write_json

__all__ = ["IMAGE_SUFFIXES", "find_images", "read_image", "check_writable_dir",
           "predict_file", "run_predict", "evaluate_weights", "run_evaluate_weights"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------ inputs
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


def _check_decodable(paths) -> None:
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


def _check_output_file(path, what: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder, expected a file name")
    check_writable_dir(path.parent, what)


def _load_predictor(weights, device, score_thresh, backend="eager"):
    from orcnn_core.predictor import Predictor

    return Predictor.from_file(weights, device=device, score_thresh=score_thresh,
                               backend=backend)


# ------------------------------------------------------------------------------ ground truth
class _GroundTruth:
    """A D2S-amodal-style annotation file: the parsed dict (for evaluation), the validated
    data set (image sizes, mask padding, category order) and file name lookups."""

    def __init__(self, path, images_dir=None):
        from orcnn_core.data import load_dataset
        from orcnn_core.evaluation import load_json

        self.path = Path(path)
        self.dataset = load_dataset(self.path, images_dir)  # validates the whole file
        self.dict = load_json(self.path, "ground-truth")
        self.images_dir = self.path.parent if images_dir is None else Path(images_dir)
        self.file_names = {entry["id"]: entry["file_name"] for entry in self.dict["images"]}
        self.category_ids = [c["id"] for c in self.dataset.categories]

    def check_classes(self, class_names) -> None:
        """The model's labels 1..K must be the file's categories in id order."""
        names = [c["name"] for c in self.dataset.categories]
        if len(class_names) != len(names):
            raise InputError(f"{self.path}: {len(names)} categories ({', '.join(names)}), but "
                             f"the model has {len(class_names)} classes "
                             f"({', '.join(class_names)})")
        if list(class_names) != names:
            print(f"warning: the model's class names ({', '.join(class_names)}) differ from "
                  f"the categories of {self.path} ({', '.join(names)}); label k is scored "
                  f"as the k-th category by id", file=sys.stderr)

    def image_path(self, image_id: int) -> Path:
        """The file of an image: ``images_dir/file_name``, else ``images_dir/basename``
        (for an images folder given directly); missing: :class:`InputError`."""
        file_name = self.file_names[image_id]
        for candidate in (self.images_dir / file_name, self.images_dir / Path(file_name).name):
            if candidate.is_file():
                return candidate
        raise InputError(f"{self.images_dir / file_name}: image {image_id} of {self.path} not "
                         f"found (--images folder {self.images_dir})")

    def match(self, paths) -> list:
        """Dataset index of each image file: by path (``file_name`` relative to the
        annotation file's folder), else by unique base name."""
        by_path, by_name = {}, {}
        for index, image_id in enumerate(self.dataset.image_ids):
            file_name = self.file_names[image_id]
            by_path[os.path.realpath(self.path.parent / file_name)] = index
            by_name.setdefault(Path(file_name).name, []).append(index)
        indices, seen = [], {}
        for path in paths:
            index = by_path.get(os.path.realpath(path))
            if index is None:
                candidates = by_name.get(path.name, [])
                if len(candidates) != 1:
                    problem = "no image entry has this file name" if not candidates else \
                        f"{len(candidates)} image entries have this base name"
                    raise InputError(f"{path}: not an image of --gt {self.path} ({problem})")
                index = candidates[0]
            if index in seen:
                raise InputError(f"{path}: same --gt image "
                                 f"{self.dataset.image_ids[index]} as {seen[index]}")
            seen[index] = path
            indices.append(index)
        return indices


# ------------------------------------------------------------------------------ prediction
def predict_file(predictor, path, image_id: int, mask_padding: int = 0, category_ids=None,
                 expected_size=None):
    """Run ``predictor`` on one image file: returns (BGR image, Prediction, COCO entries).

    ``expected_size`` (height, width), when given, must be the image's size (the ground
    truth's). Entries are on the canvas padded by ``mask_padding``
    (:func:`orcnn_core.results.prediction_to_coco`).
    """
    from orcnn_core.results import prediction_to_coco

    image = read_image(path)
    if expected_size is not None and image.shape[:2] != tuple(expected_size):
        raise InputError(f"{path}: image is {image.shape[1]} x {image.shape[0]}, the "
                         f"ground truth says {expected_size[1]} x {expected_size[0]} "
                         f"(image {image_id})")
    prediction = predictor(image, color_order="bgr")
    return image, prediction, prediction_to_coco(prediction, image_id, mask_padding,
                                                 category_ids)


def _overlay_names(paths):
    """(overlay file name of each image, the images' common folder): the image's path
    below that folder, as PNG (the full name + .png where two images would share one, e.g.
    a.jpg and a.png)."""
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    relative = [p.resolve().relative_to(root) for p in paths]
    names = [r.with_suffix(".png") for r in relative]
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [r.with_name(r.name + ".png") if counts[n] > 1 else n
            for r, n in zip(relative, names)], root


def _encode_png(image_bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def run_predict(args) -> int:
    """``orcnn-core predict``: overlays, ``predictions.json`` and (without ``--gt``)
    ``images.json`` in ``args.out``."""
    from orcnn_core.visualize import draw_prediction

    paths = find_images(args.images)
    out = check_writable_dir(args.out, "--out")
    gt = None
    if args.gt is not None:
        gt = _GroundTruth(args.gt)
        indices = gt.match(paths)
    _check_decodable(paths)
    predictor = _load_predictor(args.weights, args.device, args.score_thresh, args.backend)
    if gt is not None:
        gt.check_classes(predictor.config.class_names)

    overlay_names, root = _overlay_names(paths)
    results, images = [], []
    start = time.perf_counter()
    for k, (path, overlay_name) in enumerate(zip(paths, overlay_names)):
        if gt is None:
            image_id, padding, size, category_ids = k + 1, 0, None, None
        else:
            sample = gt.dataset[indices[k]]
            image_id, padding = sample.image_id, sample.mask_padding
            size, category_ids = (sample.height, sample.width), gt.category_ids
        image, prediction, entries = predict_file(predictor, path, image_id, padding,
                                                  category_ids, size)
        results.extend(entries)
        overlay = draw_prediction(image, prediction, color_order="bgr")
        atomic_write_bytes(out / "overlays" / overlay_name, _encode_png(overlay))
        images.append({"id": image_id, "file_name": str(path.resolve().relative_to(root)),
                       "width": int(image.shape[1]), "height": int(image.shape[0])})
    took = time.perf_counter() - start

    atomic_write_json(out / "predictions.json", results)
    written = [out / "predictions.json"]
    if gt is None:
        # Without a ground truth the image ids are 1..N in sorted file order; this file maps
        # them back (COCO "images" entries relative to images_dir, and the categories).
        categories = [{"id": k + 1, "name": name}
                      for k, name in enumerate(predictor.config.class_names)]
        atomic_write_json(out / "images.json", {"images_dir": str(root), "images": images,
                                                "categories": categories}, indent=1)
        written.append(out / "images.json")
    print(f"{len(paths)} images, {len(results)} detections (score >= "
          f"{predictor.score_thresh:g}) in {took:.1f} s; wrote {out / 'overlays'}/, "
          + ", ".join(str(p) for p in written)
          + (f" (image ids of {gt.path})" if gt is not None else ""))
    return 0


# ------------------------------------------------------------------------------ evaluation
def evaluate_weights(weights, data, images_dir=None, score_thresh=None, device="auto",
                     out=None, backend="eager") -> dict:
    """Metrics (:func:`orcnn_core.evaluation.evaluate_loaded`) of a weights file on the
    images of ground-truth file ``data`` (in ``images_dir``, default the file's folder).
    ``out``, when given, is only checked for writability here, before the model runs."""
    from orcnn_core.evaluation import evaluate_loaded

    gt = _GroundTruth(data, images_dir)
    paths = [gt.image_path(image_id) for image_id in gt.dataset.image_ids]
    _check_decodable(paths)
    if out is not None:
        _check_output_file(out, "--out")
    predictor = _load_predictor(weights, device, score_thresh, backend)
    gt.check_classes(predictor.config.class_names)
    results = []
    for index, path in enumerate(paths):
        sample = gt.dataset[index]
        _, _, entries = predict_file(predictor, path, sample.image_id, sample.mask_padding,
                                     gt.category_ids, (sample.height, sample.width))
        results.extend(entries)
    return evaluate_loaded(gt.dict, results, str(gt.path), f"predictions of {weights}")


def run_evaluate_weights(args) -> int:
    """``orcnn-core evaluate --weights W --data GT.json``: print the table, write the
    metrics JSON atomically."""
    from orcnn_core.evaluation import format_table

    metrics = evaluate_weights(args.weights, args.data, args.images, args.score_thresh,
                               args.device or "auto", args.out, args.backend or "eager")
    if args.out is not None:
        try:
            atomic_write_json(args.out, metrics, indent=2)
        except OSError as exc:
            raise InputError(f"{args.out}: cannot write metrics ({exc.strerror})") from None
    print(format_table(metrics))
    return 0
