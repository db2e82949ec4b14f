"""The commands over files: ``orcnn-core predict``, ``evaluate --weights``, ``export`` and
``convert``.

``predict`` and ``evaluate --weights`` share one path from an image file to COCO result
entries (:func:`predict_file`), so ``evaluate --weights`` gives exactly the metrics of
``predict --gt`` followed by the file-to-file ``evaluate``. Every input (image list, output
folder, ground truth, weights) is checked before the first image is processed; bad input
raises :class:`~orcnn_core.errors.InputError` naming the file or parameter. The command
line (:mod:`orcnn_core.cli`) only parses arguments and calls the ``run_*`` functions here.
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from orcnn_core.data import load_dataset, write_dataset
from orcnn_core.errors import InputError
from orcnn_core.evaluation import evaluate_loaded, format_table
from orcnn_core.export import (MAX_OPSET, MAX_SIZE, MIN_OPSET, MIN_SIZE, ExportCheckError,
                               export_onnx)
from orcnn_core.fileio import (TEMP_SUFFIX, atomic_write_bytes, atomic_write_json,
                               check_not_an_input, check_regular_file)
from orcnn_core.imageio import (check_decodable, check_output_file, check_writable_dir,
                                encode_png, find_images, read_image)
from orcnn_core.predictor import Predictor
from orcnn_core.results import prediction_to_coco
from orcnn_core.synth import check_scene
from orcnn_core.visualize import draw_prediction
from orcnn_core.weights import build_from_file

__all__ = ["predict_file", "run_predict", "evaluate_weights", "run_evaluate_weights",
           "run_export", "run_convert"]


# ------------------------------------------------------------------------------ model
def _load_predictor(weights, device, score_thresh, backend="eager"):
    return Predictor.from_file(weights, device=device, score_thresh=score_thresh,
                               backend=backend)


# ------------------------------------------------------------------------------ ground truth
class _GroundTruth:
    """A ground-truth file (any layout :func:`orcnn_core.data.load_dataset` reads): the
    validated data set (records for evaluation, image sizes, mask padding, category order)
    and file name lookups."""

    def __init__(self, path, images_dir=None, what="--gt", fmt="auto", annotators="first"):
        self.path = check_regular_file(path, what)  # a FIFO would block the reader
        # validates the whole file
        self.dataset = load_dataset(self.path, images_dir, fmt, annotators)
        self.images_dir = self.path.parent if images_dir is None else Path(images_dir)
        self.file_names = {r.image_id: r.file_name for r in self.dataset.records}
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
    below that folder, as PNG; the full name + .png where two images would share one (a.jpg
    and a.png give a.jpg.png and a.png.png), and a number where even that is taken."""
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    relative = [p.resolve().relative_to(root) for p in paths]
    names = [r.with_suffix(".png") for r in relative]
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    taken, unique = set(), []
    for r, name in zip(relative, names):
        if counts[name] > 1 or name in taken:
            name = r.with_name(r.name + ".png")
        number = 1
        while name in taken:
            number += 1
            name = r.with_name(f"{r.name}.{number}.png")
        taken.add(name)
        unique.append(name)
    return unique, root


#: What ``predict`` writes in its output folder; nothing else there is touched.
PREDICT_OUTPUTS = ("overlays", "images.json", "predictions.json")


def _check_predict_paths(args, paths) -> Path:
    """Refuse, before any work, inputs that cannot be read and an output folder whose
    writing would destroy an input: ``--out`` may neither be nor hold an image, and none of
    its outputs may be the weights or the ground truth. Returns the (created) folder."""
    check_regular_file(args.weights, "--weights")
    out = Path(args.out)
    images = [("--images", args.images)] if Path(args.images).is_dir() else []
    check_not_an_input(out, images + [("--images", p) for p in paths], "--out", folder=True)
    others = [("--weights", args.weights), ("--gt", args.gt)]
    for name in PREDICT_OUTPUTS:
        check_not_an_input(out / name, others, "--out", folder=(name == "overlays"))
    return check_writable_dir(out, "--out")


@contextlib.contextmanager
def _removed_when_empty_on_failure(folder: Path):
    """A folder this block creates (the output folder, made by the writability check) is
    removed again when the block fails and leaves it empty: a refused run leaves nothing."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


@contextlib.contextmanager
def _staging(out: Path):
    """A temporary folder in ``out`` for a command's outputs, removed on exit whatever
    happens; :func:`_publish` moves its contents into place on success."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=".predict-", suffix=TEMP_SUFFIX, dir=out))
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        yield stage
    except OSError as exc:  # a failed write: disk full, file size limit, permissions
        where = exc.filename or stage
        final = out / os.path.relpath(where, stage) if str(where).startswith(str(stage)) \
            else where
        raise InputError(f"--out {out}: cannot write {final} ({exc.strerror or exc}); "
                         f"nothing written, earlier outputs there are unchanged") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path) -> None:
    """Move the outputs of ``stage`` into ``out`` (renames in one file system), replacing
    those of an earlier run (an output the new run has not got, e.g. images.json after
    a run with --gt, is removed so that no mix remains); predictions.json comes last."""
    old = stage / "replaced"
    old.mkdir()
    for name in PREDICT_OUTPUTS:
        moved = os.path.lexists(out / name)
        if moved:
            os.replace(out / name, old / name)
        try:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        except OSError:
            if moved:  # put the earlier output back before the stage is removed
                os.replace(old / name, out / name)
            raise


def _predict_images(predictor, paths, gt, indices, stage: Path):
    """Run the model on every image; overlays go to ``stage/overlays``. Returns (COCO
    results, images.json entries, the images' common folder)."""
    overlay_names, root = _overlay_names(paths)
    results, images = [], []
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
        atomic_write_bytes(stage / "overlays" / overlay_name, encode_png(overlay))
        images.append({"id": image_id, "file_name": str(path.resolve().relative_to(root)),
                       "width": int(image.shape[1]), "height": int(image.shape[0])})
    return results, images, root


def run_predict(args) -> int:
    """``orcnn-core predict``: overlays, ``predictions.json`` and (without ``--gt``)
    ``images.json`` in ``args.out``. They are written to a temporary folder there and
    moved into place only when every image succeeded: a failure leaves no output of this
    run, and the earlier run's outputs are replaced as a whole, never mixed."""
    paths = find_images(args.images)
    with _removed_when_empty_on_failure(Path(args.out)):
        out = _check_predict_paths(args, paths)
        gt, indices = None, None
        if args.gt is not None:
            gt = _GroundTruth(args.gt, fmt=getattr(args, "format", "auto"))
            indices = gt.match(paths)
        check_decodable(paths)
        predictor = _load_predictor(args.weights, args.device, args.score_thresh,
                                    args.backend)
        if gt is not None:
            gt.check_classes(predictor.config.class_names)

    start = time.perf_counter()
    with _staging(out) as stage:
        results, images, root = _predict_images(predictor, paths, gt, indices, stage)
        took = time.perf_counter() - start
        atomic_write_json(stage / "predictions.json", results)
        written = [out / "predictions.json"]
        if gt is None:
            # Without a ground truth the image ids are 1..N in sorted file order; this file
            # maps them back (COCO "images" entries relative to images_dir, and the
            # categories).
            categories = [{"id": k + 1, "name": name}
                          for k, name in enumerate(predictor.config.class_names)]
            atomic_write_json(stage / "images.json", {"images_dir": str(root),
                                                      "images": images,
                                                      "categories": categories}, indent=1)
            written.append(out / "images.json")
        _publish(stage, out)
    print(f"{len(paths)} images, {len(results)} detections (score >= "
          f"{predictor.score_thresh:g}) in {took:.1f} s; wrote {out / 'overlays'}/, "
          + ", ".join(str(p) for p in written)
          + (f" (image ids of {gt.path})" if gt is not None else ""))
    return 0


# ------------------------------------------------------------------------------ evaluation
def evaluate_weights(weights, data, images_dir=None, score_thresh=None, device="auto",
                     out=None, backend="eager", fmt="auto", annotators="first",
                     occluded_rule="reference") -> dict:
    """Metrics (:func:`orcnn_core.evaluation.evaluate_loaded`) of a weights file on the
    images of ground-truth file ``data`` (in ``images_dir``, default the file's folder;
    layout ``fmt``). ``out``, when given, is only checked for writability here, before the
    model runs."""
    check_regular_file(weights, "--weights")
    gt = _GroundTruth(data, images_dir, "--data", fmt, annotators)
    paths = [gt.image_path(image_id) for image_id in gt.dataset.image_ids]
    if out is not None:
        check_output_file(out, "--out")
        check_not_an_input(out, [("--weights", weights), ("--data", data)]
                           + [("--images", p) for p in paths], "--out")
    check_decodable(paths)
    predictor = _load_predictor(weights, device, score_thresh, backend)
    gt.check_classes(predictor.config.class_names)
    results = []
    for index, path in enumerate(paths):
        sample = gt.dataset[index]
        _, _, entries = predict_file(predictor, path, sample.image_id, sample.mask_padding,
                                     gt.category_ids, (sample.height, sample.width))
        results.extend(entries)
    return evaluate_loaded(gt.dataset, results, str(gt.path), f"predictions of {weights}",
                           occluded_rule)


def run_evaluate_weights(args) -> int:
    """``orcnn-core evaluate --weights W --data GT.json``: print the table, write the
    metrics JSON atomically."""
    metrics = evaluate_weights(args.weights, args.data, args.images, args.score_thresh,
                               args.device or "auto", args.out, args.backend or "eager",
                               args.format, args.annotators, args.occluded_rule)
    if args.out is not None:
        try:
            atomic_write_json(args.out, metrics, indent=2)
        except OSError as exc:
            raise InputError(f"{args.out}: cannot write metrics ({exc.strerror})") from None
    print(format_table(metrics))
    return 0


# ------------------------------------------------------------------------------ export
def _check_int(value, name: str, low: int, high: int) -> int:
    if value is None or not low <= value <= high:
        raise InputError(f"{name} {value}: must be in [{low}, {high}]")
    return int(value)


def _read_check_image(path, height: int, width: int) -> np.ndarray:
    try:
        bgr = read_image(path)
    except InputError as exc:
        raise InputError(f"--check-image {exc}") from None
    if bgr.shape[:2] != (height, width):  # the graph takes only the exported size
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def run_export(args) -> int:
    """``orcnn-core export``: export, check, print the differences; exit 1 on a failed
    check (file not written)."""
    if args.format != "onnx":
        raise InputError(f"--format {args.format}: only onnx is supported")
    height = _check_int(args.height, "--height", MIN_SIZE, MAX_SIZE)
    width = _check_int(args.width, "--width", MIN_SIZE, MAX_SIZE)
    opset = _check_int(args.opset, "--opset", MIN_OPSET, MAX_OPSET)
    out = Path(args.out)
    check_regular_file(args.weights, "--weights")
    check_output_file(out, "--out")  # before the (slow) export
    check_not_an_input(out, [("--weights", args.weights), ("--check-image", args.check_image)],
                       "--out")
    if args.check_image is not None:
        check_image = _read_check_image(args.check_image, height, width)
    else:
        check_image = check_scene(height, width)
    # The Predictor validates and sets the score threshold baked into the graph.
    predictor = Predictor(build_from_file(args.weights, device="cpu"), device="cpu",
                          score_thresh=args.score_thresh)
    try:
        report = export_onnx(predictor.model, out, height, width, check_image=check_image,
                             opset=opset)
    except ExportCheckError as exc:
        print(f"orcnn-core export: error: onnxruntime disagrees with torch, {out} NOT "
              f"written: {exc}\n  {exc.report.summary()}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, file size limit: the atomic write left nothing
        raise InputError(f"--out {out}: cannot write {exc.filename or out} "
                         f"({exc.strerror or exc}); nothing written") from None
    print(f"wrote {out} ({report.num_bytes / 1e6:.1f} MB, opset {opset}, input image float32 "
          f"[3, {height}, {width}] RGB in [0, 1]; exported in {report.export_seconds:.1f} s)")
    print(f"onnxruntime matches torch: {report.summary()}")
    if report.detections_torch == 0:
        print("warning: the check image gave no detections, so only the empty outputs were "
              "compared; pass --check-image with objects (or a lower --score-thresh)",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ convert
def run_convert(args) -> int:
    """``orcnn-core convert IN OUT``: read IN in any supported layout (``--format``,
    ``--annotators``) and write it as our amodal COCO, atomically; OUT may not be IN."""
    source = check_regular_file(args.input, "IN")
    check_output_file(args.output, "OUT")
    check_not_an_input(args.output, [("IN", args.input)], "OUT")
    dataset = load_dataset(source, fmt=args.format, annotators=args.annotators,
                           need_file_names=False)
    try:
        written = write_dataset(dataset, args.output)
    except OSError as exc:  # disk full, permissions: the atomic write left nothing
        raise InputError(f"OUT {args.output}: cannot write ({exc.strerror or exc}); nothing "
                         f"written") from None
    relations = written.get("occlusion_relations")
    told = (f"{len(relations)} occlusion relations ({written['relations_source']})"
            if relations is not None else "no occlusion relations (modal-only source)")
    print(f"wrote {args.output}: {len(written['images'])} images, "
          f"{len(written['annotations'])} annotations, {told}; read as {dataset.layout}"
          + (f", annotators: {args.annotators}" if dataset.format == "cocoa" else ""))
    return 0
