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

Large and odd sizes: a size beyond the image limits of :mod:`orcnn_core.imageio`
(:func:`~orcnn_core.imageio.size_problem`: pixels, longest side, aspect ratio) is refused
with an :class:`~orcnn_core.errors.InputError` before anything is built. The check scene of
a size larger than the model's ``max_size`` is rendered at that size and scaled up (the
model scales every image to at most ``max_size`` anyway), so that a 4096 x 4096 frame does
not render a 4096 x 4096 scene. While a graph is built, :attr:`_FixedSizeBackend.building`
says for which size and since when (the ROS node reports it in /diagnostics). onnxruntime
sessions run without the CPU memory arena and memory pattern (each keeps the largest
buffers it ever needed for the life of the session), and after each build, failed or not,
the C heap's free memory is handed back to the system (glibc's ``malloc_trim``).
"""

import copy
import ctypes
import importlib.util
import logging
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from orcnn_core.backend_names import BACKENDS, REFUSED, BackendError, check_backend_name
from orcnn_core.errors import InputError
from orcnn_core.export import TOLERANCES, FixedSizeORCNN, export_onnx_checked
from orcnn_core.imageio import LIMIT_ENV, size_problem
from orcnn_core.synth import check_scene

# BACKENDS, REFUSED, BackendError and check_backend_name are re-exported: their home is
# orcnn_core.backend_names.
__all__ = ["BACKENDS", "REFUSED", "MAX_GRAPHS", "BackendError", "Build", "BuildInProgress",
           "EagerBackend",
           "TorchScriptBackend", "OnnxRuntimeBackend", "TensorRTBackend", "create_backend",
           "check_backend_name", "compare_detections"]

#: Graphs kept per fixed-size back-end (one per image size and threshold setting).
MAX_GRAPHS = 4
#: Failed builds remembered per fixed-size back-end (so that they fail fast).
MAX_FAILED = 64
DETECTION_KEYS = ("boxes", "labels", "scores", "amodal_mask_logits", "visible_mask_logits")

log = logging.getLogger(__name__)


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is another (musl, macOS)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None).malloc_trim
    except (ValueError, OSError, AttributeError):  # no such confstr name, or no symbol
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system. glibc keeps freed blocks for
    reuse, and a build for a large size frees hundreds of megabytes in blocks that would
    otherwise stay in the process's resident size; no-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
    building = None  # builds nothing

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


@dataclass(frozen=True)
class BuildInProgress:
    """The graph a fixed-size back-end is building now: for which size, since when
    (``time.monotonic()``)."""

    height: int
    width: int
    started: float


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
        #: BuildInProgress while a graph is built (read by other threads), else None.
        self.building = None

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
        problem = size_problem(width, height)
        if problem is not None:  # before any work: a build's cost grows with the size
            what, limit = problem
            raise InputError(f"{self.describe()} back-end: no graph for {width}x{height} "
                             f"images, {what}" + (f" (the limit; {LIMIT_ENV[limit]} raises "
                                                  f"it)" if limit else ""))
        if key in self._failed:  # a build costs seconds: not again for every frame
            raise RuntimeError(f"{self.describe()} back-end: no graph for {width}x{height} "
                               f"images, its build failed: {self._failed[key]}")
        self.log(f"{self.describe()} back-end: building a graph for {width}x{height} images")
        start = time.monotonic()
        self.building = BuildInProgress(height, width, start)
        try:
            graph, failure = self._build_quietly(height, width)
        finally:
            self.building = None
        if failure is not None:
            # Out of the except clause, the failed build's frames and tensors are gone: only
            # now is their memory free to hand back. The error keeps no traceback.
            self._failed[key] = str(failure)
            while len(self._failed) > MAX_FAILED:
                self._failed.popitem(last=False)
            release_free_memory()
            raise failure.with_traceback(None)
        seconds = time.monotonic() - start
        self.builds.append(Build(height, width, seconds))
        self.log(f"{self.describe()} back-end: graph for {width}x{height} images (score "
                 f"threshold {key[2]:g}, at most {key[4]} detections) built in "
                 f"{seconds:.1f} s")
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        release_free_memory()
        return graph

    def _build_quietly(self, height: int, width: int) -> tuple:
        """``(graph, None)``, or ``(None, the exception)`` when the build failed."""
        # Built outside inference mode: tracing and export need ordinary tensors.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # Tracing warns that shapes become constants (intended: one graph per size) and
            # that the TorchScript tools are deprecated; the check against the eager model
            # is what proves each graph right.
            warnings.simplefilter("ignore")
            try:
                return self._build(height, width), None
            except Exception as exc:
                # Its traceback and chained exceptions hold the build's frames (tensors of
                # the size being built); the message is what is kept.
                exc.__context__ = exc.__cause__ = None
                return None, exc.with_traceback(None)

    def _build(self, height: int, width: int):
        """The graph for ``height`` x ``width`` images, checked against the eager model on
        :func:`orcnn_core.synth.check_scene` (a fixed scene with objects, so that a failed
        check is a property of the graph, not of one camera frame)."""
        raise NotImplementedError

    def _check_scene(self, height: int, width: int) -> np.ndarray:
        """The check scene of a ``height`` x ``width`` graph, RGB uint8. Rendered at that
        size up to the model's ``max_size``; beyond it, rendered with its longest side at
        ``max_size`` and scaled up: rendering costs memory with the square of the size,
        and the model scales the image down to ``max_size`` before it sees it."""
        scale = self.model.config.max_size / max(height, width)
        if scale >= 1.0:
            return check_scene(height, width)
        small = check_scene(max(1, round(height * scale)), max(1, round(width * scale)))
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    def _check_image(self, height: int, width: int) -> torch.Tensor:
        scene = self._check_scene(height, width)
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


def session_options():
    """The onnxruntime session options of the back-ends' graphs: this process's torch
    thread count; no CPU memory arena and no memory pattern. Both keep, for the life of the
    session, buffers sized for the largest run: a graph for one large frame size held
    about 1.4 GB more that way (docs/security.md)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


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
        scene = self._check_scene(height, width)
        options = session_options()
        data, _report, session = export_onnx_checked(source, height, width, check_image=scene,
                                                     session_options=options)
        if self.providers != ["CPUExecutionProvider"]:
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
