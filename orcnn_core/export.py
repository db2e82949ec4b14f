"""ONNX export of an ORCNN for one fixed input size, checked against torch by onnxruntime.

Export boundary: the whole detector (normalise and resize, backbone, RPN, box head with
NMS and the score threshold, both mask heads), traced by torch's TorchScript-based
exporter (``torch.onnx.export(dynamo=False)``), which torchvision's detection models
support from opset 11 on. The image size is fixed at export time: the resize and the
anchors are constants of the graph, while the number of detections D stays data dependent
(0 .. ``box_detections_per_img``). Masks are not pasted: like the torch model the graph
returns the M x M logits over each box, and :func:`orcnn_core.predictor.label_crops` (or the
consumer's own code) resamples them.

Exported interface (names of the ONNX inputs and outputs):

* input ``image``: float32 [3, H, W], RGB in [0, 1], exactly the exported H x W;
* ``boxes``: float32 [D, 4], amodal x1, y1, x2, y2 in image pixels (may exceed the image);
* ``labels``: int64 [D], classes 1..K (``model.config.class_names[label - 1]``);
* ``scores``: float32 [D], descending, each >= the score threshold baked into the graph;
* ``amodal_mask_logits``, ``visible_mask_logits``: float32 [D, M, M] (M = 2 x
  ``mask_roi_size``), the detection's class channel, over its box; probability =
  sigmoid(logit), a pixel is amodal at p >= 0.5, occluded = amodal AND NOT visible.

The check runs the exported graph in onnxruntime and the model in torch on one test image
and compares every output; the file is written (atomically) only when all agree within
:data:`TOLERANCES`, so a file at the output path always passed the check.
"""

import io
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList

from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_bytes

__all__ = ["FixedSizeORCNN", "ExportCheckError", "ExportReport", "export_onnx",
           "export_onnx_checked", "OUTPUT_NAMES", "TOLERANCES", "MIN_OPSET", "MAX_OPSET",
           "DEFAULT_OPSET", "MIN_SIZE", "MAX_SIZE"]

OUTPUT_NAMES = ("boxes", "labels", "scores", "amodal_mask_logits", "visible_mask_logits")
#: Largest allowed |torch - onnxruntime| per output (labels and the detection count must be
#: equal). Both run float32 on the CPU; the differences are reordered sums, ~1e-5 on the test
#: model, so these bounds leave room for deep models without hiding a wrong graph.
TOLERANCES = {"boxes": 0.05, "scores": 1e-3, "amodal_mask_logits": 1e-2,
              "visible_mask_logits": 1e-2}
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 11, 20, 17
MIN_SIZE, MAX_SIZE = 16, 8192


class FixedSizeORCNN(torch.nn.Module):
    """ORCNN's eval forward for single ``[3, H, W]`` images of one fixed size, returning a
    tuple of tensors (:data:`OUTPUT_NAMES`) instead of a list of dicts.

    While tracing, torchvision's transform reports the resized image size as tensors, which
    ORCNN's box post-processing cannot round; the size is a constant of a fixed-size graph,
    so it is computed once here and passed on as Python ints.
    """

    def __init__(self, model, height: int, width: int):
        super().__init__()
        self.model = model
        self.eval()  # the exporter restores the wrapper's mode, recursively, when done
        self.original_size = (int(height), int(width))
        with torch.no_grad():
            resized = model.transform([torch.zeros(3, height, width)])[0].image_sizes[0]
        self.resized_size = (int(resized[0]), int(resized[1]))

    def forward(self, image: torch.Tensor):
        m = self.model
        # The transform's own resize, to the size it computes for this input (the same
        # bilinear sampling as the eager forward), given as a constant: traced, the
        # transform derives it from a float32 scale, and onnxruntime's rounding of that
        # product can lose a row (e.g. 2500 x 1500 gave 319 x 191 instead of 320 x 192).
        resized = F.interpolate(m.transform.normalize(image)[None], size=self.resized_size,
                                mode="bilinear", align_corners=False)[0]
        images = ImageList(m.transform.batch_images(
            [resized], size_divisible=m.transform.size_divisible), [self.resized_size])
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        detections, _ = m.roi_heads(features, proposals, images.image_sizes)
        det = m.transform.postprocess(detections, images.image_sizes, [self.original_size])[0]
        return tuple(det[name] for name in OUTPUT_NAMES)


@dataclass
class ExportReport:
    """Outcome of the torch vs onnxruntime check of one export."""

    height: int
    width: int
    opset: int
    detections_torch: int
    detections_onnx: int
    max_abs_diff: dict = field(default_factory=dict)    # output name -> max |difference|
    labels_equal: bool = True
    problems: list = field(default_factory=list)
    export_seconds: float = 0.0
    num_bytes: int = 0
    tolerances: dict = field(default_factory=lambda: dict(TOLERANCES))

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        diffs = ", ".join(f"{name} {value:.2e} (tol {self.tolerances[name]:g})"
                          for name, value in self.max_abs_diff.items())
        return (f"check on a {self.width}x{self.height} test image: torch "
                f"{self.detections_torch} detections, onnxruntime {self.detections_onnx}; "
                f"max abs difference: {diffs or 'n/a'}; labels "
                f"{'equal' if self.labels_equal else 'DIFFER'}")


class ExportCheckError(RuntimeError):
    """onnxruntime's outputs disagree with torch's; ``report`` says how."""

    def __init__(self, report: ExportReport):
        super().__init__("; ".join(report.problems))
        self.report = report


def _compare(expected, actual, report: ExportReport, tolerances: dict) -> None:
    """Fill ``report`` with the differences of torch's (``expected``) and onnxruntime's
    outputs, both in :data:`OUTPUT_NAMES` order, judged by ``tolerances``."""
    report.detections_torch = int(expected[0].shape[0])
    report.detections_onnx = int(actual[0].shape[0])
    if report.detections_torch != report.detections_onnx:
        report.problems.append(f"torch found {report.detections_torch} detections, "
                               f"onnxruntime {report.detections_onnx}")
        return
    for name, ref, got in zip(OUTPUT_NAMES, expected, actual):
        ref = ref.detach().cpu().numpy()
        got = np.asarray(got)
        if ref.shape != got.shape:
            report.problems.append(f"{name}: shape {got.shape} in onnxruntime, {ref.shape} "
                                   f"in torch")
            continue
        if name == "labels":
            report.labels_equal = bool(np.array_equal(ref, got))
            if not report.labels_equal:
                report.problems.append("labels differ")
            continue
        diff = float(np.abs(ref.astype(np.float64) - got).max()) if ref.size else 0.0
        report.max_abs_diff[name] = diff
        if not diff <= tolerances[name]:  # also catches NaN
            report.problems.append(f"{name}: max abs difference {diff:.3g} > tolerance "
                                   f"{tolerances[name]:g}")


def export_onnx(model, path, height: int, width: int, *, check_image,
                opset: int = DEFAULT_OPSET, tolerances=None) -> ExportReport:
    """Export ``model`` (an ORCNN; moved to the CPU) for ``height`` x ``width`` images to
    ``path`` and check it.

    ``check_image``: RGB uint8 [height, width, 3] for the check; pick one with objects the
    model detects (an image without detections only checks the empty outputs). The graph
    is built in memory, run by onnxruntime and compared with the torch model's own forward
    on the CPU; ``path`` is written atomically only when the check passes, else
    :class:`ExportCheckError` is raised and nothing is written. ``tolerances`` overrides
    some of :data:`TOLERANCES`. Returns the check's report.
    """
    data, report, _session = export_onnx_checked(model, height, width, check_image=check_image,
                                                 opset=opset, tolerances=tolerances)
    atomic_write_bytes(path, data)
    return report


def export_onnx_checked(model, height: int, width: int, *, check_image,
                        opset: int = DEFAULT_OPSET, tolerances=None, session_options=None):
    """:func:`export_onnx` without the file: ``(graph bytes, report, session)``, where
    ``session`` is the CPU onnxruntime session the check ran (reusable for inference),
    made with ``session_options`` (an ``onnxruntime.SessionOptions``; default: onnxruntime's
    defaults with this process's torch thread count).
    Raises :class:`ExportCheckError` when the check fails."""
    import onnx
    import onnxruntime

    if np.shape(check_image) != (height, width, 3) or np.asarray(check_image).dtype != np.uint8:
        raise InputError(f"check image must be uint8 [{height}, {width}, 3] (the export "
                         f"size), got {np.shape(check_image)} "
                         f"{np.asarray(check_image).dtype}")
    model = model.to("cpu").eval()
    wrapper = FixedSizeORCNN(model, height, width)
    image = torch.from_numpy(np.ascontiguousarray(check_image)).permute(2, 0, 1).float() / 255

    start = time.perf_counter()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing turns shapes into constants and says so in warnings (intended: the graph
        # is for one input size); torch adds notes on torchvision's internals and on the
        # TorchScript exporter's deprecation. None is actionable for the user; the check
        # against torch below is what proves the graph right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (image,), buffer, dynamo=False, opset_version=opset,
            input_names=["image"], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "detections"} for name in OUTPUT_NAMES},
            do_constant_folding=True)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    seconds = time.perf_counter() - start

    with torch.no_grad():
        det = model.eval()([image])[0]  # the model's own forward, not the wrapper: checks both
    expected = [det[name] for name in OUTPUT_NAMES]
    options = session_options
    if options is None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    actual = session.run(list(OUTPUT_NAMES), {"image": image.numpy()})

    report = ExportReport(height, width, opset, 0, 0, export_seconds=seconds,
                          num_bytes=len(data), tolerances={**TOLERANCES, **(tolerances or {})})
    _compare(expected, actual, report, report.tolerances)
    if not report.ok:
        raise ExportCheckError(report)
    return data, report, session
