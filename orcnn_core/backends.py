"""Inference back-ends: the same detector run by eager torch, TorchScript, onnxruntime or
TensorRT, chosen by name.

Every back-end is a callable with one contract: ``backend(image) -> detections``, where
``image`` is float32 [3, H, W], RGB in [0, 1], on the device the back-end was made for, and
``detections`` is the eager model's output dict (:mod:`orcnn_core.model`) on that device:
``boxes`` float32 [D, 4] amodal xyxy in image pixels, ``labels`` int64 [D], ``scores``
float32 [D], ``amodal_mask_logits`` and ``visible_mask_logits`` float32 [D, M, M].
:class:`orcnn_core.predictor.Predictor` turns them into label crops with the same code
whatever the back-end.

Back-ends (:data:`BACKENDS`):

* ``eager`` (default): the torch model's own forward.
* ``torchscript``: the forward for one image size traced by ``torch.jit.trace`` (through
  :class:`orcnn_core.export.FixedSizeORCNN`) and frozen (batch norm folded into the
  convolutions). NMS, the score threshold and the box selection stay in the graph, so the
  number of detections D is data dependent as in eager mode. ``torch.jit.script`` is not
  used: it rejects ORCNN's forward (the dict unpacking that merges the training losses).
* ``onnxruntime``: the graph of :func:`orcnn_core.export.export_onnx_checked` for the frame
  size, exported in memory and run by onnxruntime's CPUExecutionProvider, or its
  CUDAExecutionProvider when the device is CUDA and the provider is installed
  (``onnxruntime-gpu``; without it the CPU provider runs and the description says so).
* ``tensorrt``: the same ONNX graph run by onnxruntime's TensorrtExecutionProvider (with the
  CUDA provider for the nodes TensorRT does not take). Needs a CUDA device and an
  onnxruntime built with TensorRT; otherwise a :class:`BackendError` says what is missing.
  ``torch_tensorrt`` is not used: the ONNX graph is the one whose outputs are checked.

``torch.compile`` is not a back-end: asking for ``compile`` raises :class:`BackendError`
with the measured reason (:data:`REFUSED`; figures in docs/performance.md).

The fixed-size back-ends (torchscript, onnxruntime, tensorrt) build a graph on the first
frame of each image size, and again when the inference limits of the model (score
threshold, NMS threshold, detection cap; set by
:meth:`orcnn_core.predictor.Predictor.set_limits`) change, because they are constants of
the graph. Each new graph is compared with the eager model on a fixed synthetic scene of
that size (:func:`orcnn_core.synth.check_scene`, :data:`orcnn_core.export.TOLERANCES`)
before it is used. At most :data:`MAX_GRAPHS` graphs
are kept, least recently used dropped. A build takes seconds (docs/performance.md); each is
logged and listed in ``backend.builds``. A failed build is not retried for the same key:
later calls raise a RuntimeError that repeats its message. These back-ends suit a camera
stream (one size); a data set of many image sizes pays one build per size.
"""

import copy
import importlib.util
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from orcnn_core.backend_names import BACKENDS, REFUSED, BackendError, check_backend_name
from orcnn_core.export import TOLERANCES, FixedSizeORCNN, export_onnx_checked
from orcnn_core.synth import check_scene

# BACKENDS, REFUSED, BackendError and check_backend_name are re-exported: their home is
# orcnn_core.backend_names.
__all__ = ["BACKENDS", "REFUSED", "MAX_GRAPHS", "BackendError", "Build", "EagerBackend",
           "TorchScriptBackend", "OnnxRuntimeBackend", "TensorRTBackend", "create_backend",
           "check_backend_name", "compare_detections"]

#: Graphs kept per fixed-size back-end (one per image size and threshold setting).
MAX_GRAPHS = 4
#: Failed builds remembered per fixed-size back-end (so that they fail fast).
MAX_FAILED = 64
DETECTION_KEYS = ("boxes", "labels", "scores", "amodal_mask_logits", "visible_mask_logits")

log = logging.getLogger(__name__)


def create_backend(name: str, model, device: torch.device):
    """The back-end ``name`` for ``model`` (an ORCNN in eval mode, already on ``device``)."""
    check_backend_name(name)
    device = torch.device(device)
    if name == "eager":
        return EagerBackend(model, device)
    if name == "torchscript":
        return TorchScriptBackend(model, device)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(model, device)
    return TensorRTBackend(model, device)


def compare_detections(reference: dict, result: dict) -> dict:
    """How far ``result`` is from ``reference`` (both detection dicts, any device).

    Returns ``{"detections": (D_reference, D_result), "labels_equal": bool}`` plus, when the
    counts agree, the max absolute difference of each float output (0.0 when D = 0).
    """
    n_ref, n_got = len(reference["boxes"]), len(result["boxes"])
    report = {"detections": (n_ref, n_got), "labels_equal": False}
    if n_ref != n_got:
        return report
    report["labels_equal"] = bool(torch.equal(reference["labels"].cpu(),
                                              result["labels"].cpu()))
    for key in ("boxes", "scores", "amodal_mask_logits", "visible_mask_logits"):
        diff = (reference[key].cpu().double() - result[key].cpu().double()).abs()
        report[key] = float(diff.max()) if diff.numel() else 0.0
    return report


def _problems(report: dict, tolerances: dict) -> list:
    """What in a :func:`compare_detections` report exceeds ``tolerances`` (empty: none)."""
    n_ref, n_got = report["detections"]
    if n_ref != n_got:
        return [f"{n_got} detections instead of {n_ref}"]
    problems = [] if report["labels_equal"] else ["labels differ"]
    problems += [f"{key} differs by {report[key]:.3g} > {tol:g}"
                 for key, tol in tolerances.items() if not report[key] <= tol]
    return problems


class EagerBackend:
    """The torch model's own forward."""

    name = "eager"

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.builds = []
        self.log = log.info

    def describe(self) -> str:
        return self.name

    def __call__(self, image: torch.Tensor) -> dict:
        return self.model([image])[0]


@dataclass
class Build:
    """One graph built by a fixed-size back-end."""

    height: int
    width: int
    seconds: float


class _FixedSizeBackend:
    """Shared part of the back-ends that run a graph built for one image size: the graph
    cache, keyed by the size and the inference limits baked into the graph."""

    name = ""

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.builds = []  # Build per graph built, oldest first
        self.log = log.info  # called with one line per build (the ROS node passes its own)
        self._graphs = OrderedDict()
        # key -> message of a failed build, repeated without retrying. Messages only (an
        # exception's traceback would keep the build's tensors alive), at most MAX_FAILED.
        self._failed = OrderedDict()

    def describe(self) -> str:
        return self.name

    def _key(self, height: int, width: int) -> tuple:
        heads = self.model.roi_heads
        return (height, width, float(heads.score_thresh), float(heads.nms_thresh),
                int(heads.detections_per_img))

    def __call__(self, image: torch.Tensor) -> dict:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        key = self._key(height, width)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._build_and_keep(key)
        else:
            self._graphs.move_to_end(key)
        return self._run(graph, image)

    def _build_and_keep(self, key: tuple):
        """Build the graph for ``key``, log it and cache it."""
        height, width = key[:2]
        if key in self._failed:  # a build costs seconds: not again for every frame
            raise RuntimeError(f"{self.describe()} back-end: no graph for {width}x{height} "
                               f"images, its build failed: {self._failed[key]}")
        start = time.perf_counter()
        # Built outside inference mode: tracing and export need ordinary tensors.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # Tracing warns that shapes become constants (intended: one graph per size) and
            # that the TorchScript tools are deprecated; the check against the eager model
            # is what proves each graph right.
            warnings.simplefilter("ignore")
            try:
                graph = self._build(height, width)
            except Exception as exc:
                self._failed[key] = str(exc)
                while len(self._failed) > MAX_FAILED:
                    self._failed.popitem(last=False)
                raise
        seconds = time.perf_counter() - start
        self.builds.append(Build(height, width, seconds))
        self.log(f"{self.describe()} back-end: graph for {width}x{height} images (score "
                 f"threshold {key[2]:g}, at most {key[4]} detections) built in "
                 f"{seconds:.1f} s")
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    def _build(self, height: int, width: int):
        """The graph for ``height`` x ``width`` images, checked against the eager model on
        :func:`orcnn_core.synth.check_scene` (a fixed scene with objects, so that a failed
        check is a property of the graph, not of one camera frame)."""
        raise NotImplementedError

    def _check_image(self, height: int, width: int) -> torch.Tensor:
        scene = check_scene(height, width)
        return torch.from_numpy(scene).to(self.device).permute(2, 0, 1).float().div(255)

    def _run(self, graph, image: torch.Tensor) -> dict:
        raise NotImplementedError


class TorchScriptBackend(_FixedSizeBackend):
    """``torch.jit.trace`` of the eager forward for one image size, frozen."""

    name = "torchscript"

    def _build(self, height: int, width: int):
        image = self._check_image(height, width)
        traced = torch.jit.trace(FixedSizeORCNN(self.model, height, width), (image,),
                                 check_trace=False)
        graph = torch.jit.freeze(traced)
        # The trace records one run; the comparison shows it generalises to the scene's
        # detections (tracing a branch that depends on the data would fail here).
        report = compare_detections(self.model([image])[0], self._run(graph, image))
        problems = _problems(report, TOLERANCES)
        if problems:
            raise RuntimeError(f"torchscript back-end: the traced graph for {width}x{height} "
                               f"disagrees with the eager model: {'; '.join(problems)}")
        return graph

    def _run(self, graph, image: torch.Tensor) -> dict:
        return dict(zip(DETECTION_KEYS, graph(image)))


class OnnxRuntimeBackend(_FixedSizeBackend):
    """The exported ONNX graph of each frame size, run by onnxruntime."""

    name = "onnxruntime"

    def __init__(self, model, device: torch.device):
        super().__init__(model, device)
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendError(f"{self.name} back-end needs the onnxruntime package (pip "
                               f"install onnxruntime, or onnxruntime-gpu for CUDA)")
        import onnxruntime

        self.providers = self._providers(onnxruntime.get_available_providers())

    def _providers(self, available) -> list:
        if self.device.type == "cuda" and "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                    "CPUExecutionProvider"]
        if self.device.type == "cuda":
            log.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): "
                        "the onnxruntime back-end runs on the CPU")
        return ["CPUExecutionProvider"]

    def describe(self) -> str:
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        return f"{self.name} ({names[0]})"

    def _build(self, height: int, width: int):
        import onnxruntime

        # The export runs on the CPU; a model on the GPU is exported from a CPU copy, made
        # per build so that it carries the model's current inference limits.
        source = self.model if self.device.type == "cpu" \
            else copy.deepcopy(self.model).to("cpu").eval()
        scene = check_scene(height, width)
        data, _report, session = export_onnx_checked(source, height, width, check_image=scene)
        if self.providers != ["CPUExecutionProvider"]:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = max(1, torch.get_num_threads())
            session = onnxruntime.InferenceSession(data, options, providers=self.providers)
            # GPU providers set up on the first run (TensorRT builds its engines then): do
            # it here, so that it counts as part of the build.
            image = self._check_image(height, width)
            session.run(None, {"image": np.ascontiguousarray(image.cpu().numpy())})
        return session

    def _run(self, session, image: torch.Tensor) -> dict:
        outputs = session.run(list(DETECTION_KEYS),
                              {"image": np.ascontiguousarray(image.cpu().numpy())})
        return {key: torch.from_numpy(value).to(self.device)
                for key, value in zip(DETECTION_KEYS, outputs)}


class TensorRTBackend(OnnxRuntimeBackend):
    """The exported ONNX graph run by onnxruntime's TensorRT execution provider (CUDA)."""

    name = "tensorrt"

    def _providers(self, available) -> list:
        if self.device.type != "cuda":
            raise BackendError(f"tensorrt back-end needs a CUDA device, got {self.device}")
        if "TensorrtExecutionProvider" not in available:
            raise BackendError(
                "tensorrt back-end needs onnxruntime with the TensorrtExecutionProvider "
                "(onnxruntime-gpu and TensorRT installed); this onnxruntime has "
                + ", ".join(available))
        index = self.device.index or 0
        return [("TensorrtExecutionProvider", {"device_id": index}),
                ("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
