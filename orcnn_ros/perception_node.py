"""The ORCNN perception node: camera images in, ``amodal_instances`` out.

    python -m orcnn_ros.perception_node --ros-args -p model_path:=/path/model.safetensors
    ros2 run orcnn_ros perception_node --ros-args -r image:=/camera/image_raw

A lifecycle node (``orcnn_perception``): configure loads the model, activate subscribes and
publishes, deactivate stops, cleanup frees the model; with ``autostart`` (default) it
configures and activates itself. The node is thin: image conversion and message building
are in :mod:`orcnn_ros.conversions`, the occlusion graph in :mod:`orcnn_core.occlusion`.

Threading: the subscription callback only stores the newest frame in a one-slot buffer
(replacing a frame still waiting counts as a drop) and wakes a worker thread, which
converts, runs the model, builds the message and publishes. A plain worker thread rather
than a callback group of a MultiThreadedExecutor keeps the executor free for lifecycle
services, parameters and diagnostics whatever executor the node is spun by, and makes the
latest-frame-only policy explicit: the output lags the camera by at most the inference
running when a frame arrives plus its own. Freshness: a frame that has waited in the slot
for more than a tenth of the camera interval (estimated from arrival times) is not worth
an inference when the next frame is due; the worker waits for that one instead, at most
``fresh_frame_wait`` camera intervals (:func:`fresh_frame_wait`), so results are about one
inference old and a stopped camera's last frame is still answered. The callback already
rejects malformed frames (:func:`orcnn_ros.conversions.check_message`, no decoding), so a
glitching camera never displaces a good frame waiting in the slot. Every received frame is
counted once: processed, dropped (replaced in the slot, or still in the node at
deactivate), malformed or failed.

New frame sizes: the fixed-size back-ends (torchscript, onnxruntime, tensorrt) build a graph
for each new frame size, seconds for a large one, on the worker thread; the subscription
keeps taking frames meanwhile (the newest waits in the slot, the others count as dropped).
A build is logged when it starts and ends, and while it runs /diagnostics says so (WARN,
"building the graph for WxH images", with the frames skipped meanwhile). Sizes beyond the
image limits of :mod:`orcnn_core.imageio` (pixels, longest side, aspect ratio) and
compressed frames beyond its JPEG decode budget are malformed frames: refused in the
callback, before any decoding or build.

Stopping: SIGINT or SIGTERM destroys the node and ends the program with exit status 0 (a
stop on request is a clean exit, as launch and systemd expect) within a fraction of a second
plus the inference running at that moment, at most :data:`WORKER_JOIN_TIMEOUT` more: a graph
build still running then is abandoned (the worker is a daemon thread, and the program skips
the interpreter's teardown of torch, :func:`exit_process`). During start-up, before the
node spins, the process ends at once, with status 0 too (once the native library loading at
that moment is in).
"""

import importlib.util
import os
import signal
import sys

if __name__ == "__main__" and not sys.flags.safe_path \
        and importlib.util.find_spec("orcnn_ros.msg") is None:  # pragma: no cover
    # Started from the repository root: the source folder orcnn_ros/ (without the generated
    # orcnn_ros.msg) shadows the built package. Run again without the cwd on sys.path.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "orcnn_ros.perception_node",
                              *sys.argv[1:]])

if __name__ == "__main__":
    # Until main() takes over, a stop request has nothing to clean up.
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, lambda signum, frame: os._exit(0))

import ctypes  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange,  # noqa: E402
                                ParameterDescriptor, SetParametersResult)
from rclpy.event_handler import (PublisherEventCallbacks,  # noqa: E402
                                 SubscriptionEventCallbacks)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn  # noqa: E402
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSPolicyKind,  # noqa: E402
                       QoSProfile, ReliabilityPolicy)
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.backend_names import BACKENDS, BackendError  # noqa: E402  (no torch)
from orcnn_core.occlusion import (MIN_CONFIDENCE, MIN_OVERLAP_PIXELS,  # noqa: E402
                                  MIN_OVERLAP_RATIO, occlusion_graph)
from orcnn_core.visualize import draw_prediction  # noqa: E402
from orcnn_ros import conversions  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402

__all__ = ["PerceptionNode", "default_model_path", "bundled_model_candidates", "main",
           "exit_process", "fresh_frame_wait", "BUNDLED_MODEL", "PARAMETERS"]

BUNDLED_MODEL = "orcnn_demo.safetensors"
NODE_NAME = "orcnn_perception"


def bundled_model_candidates() -> list:
    """Where the bundled model may be: ``<share>/orcnn_ros/models/`` of the installed
    package, then ``models/`` of the source tree this module comes from (a development
    build links the sources, so a model added there is found before a rebuild)."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("orcnn_ros")) / "models"
                          / BUNDLED_MODEL)
    except Exception:  # not installed through ament (e.g. plain source checkout)
        pass
    candidates.append(Path(__file__).resolve().parents[1] / "models" / BUNDLED_MODEL)
    return candidates


def default_model_path() -> Path:
    """The bundled model (first existing candidate); when none exists, the first candidate,
    for the error message."""
    candidates = bundled_model_candidates()
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


# name: (default, description, read_only, range or choices)
PARAMETERS = {
    "autostart": (True, "configure and activate when the node starts", True, None),
    "exit_on_configure_failure": (True, "with autostart: end the process with exit status 1 "
                                  "when configure fails (e.g. a bad model file); false: stay "
                                  "unconfigured and wait for lifecycle transitions", True,
                                  None),
    "model_path": ("", "ORCNN weights file (.safetensors written by orcnn-core); empty: the "
                   "bundled model share/orcnn_ros/models/" + BUNDLED_MODEL, True, None),
    "device": ("auto", "inference device: auto (CUDA when available), cpu, cuda or cuda:N",
               True, None),
    "backend": ("eager", "inference back-end: eager (torch), torchscript, onnxruntime, or "
                "tensorrt (CUDA); the fixed-size ones build a graph on the first frame of each "
                "size and after a score_threshold or max_instances change (seconds, logged)",
                True, None),
    "score_threshold": (0.5, "minimum detection score of a published instance", False,
                        (0.0, 1.0)),
    "max_instances": (50, "at most this many instances per frame (the highest scores)",
                      False, (1, 1000)),
    "min_overlap_pixels": (int(MIN_OVERLAP_PIXELS), "occlusion edge A->B needs at least "
                           "this much evidence: (expected) pixels of B's hidden part under "
                           "A's visible part", False, (0, 10_000_000)),
    "min_overlap_ratio": (MIN_OVERLAP_RATIO, "occlusion edge A->B needs that evidence to be "
                          "at least this fraction of B's amodal area", False, (0.0, 1.0)),
    "min_edge_confidence": (MIN_CONFIDENCE, "occlusion edge A->B needs P(A lies on B) at "
                            "least this", False, (0.0, 1.0)),
    "use_compressed": (False, "subscribe to image/compressed (sensor_msgs/CompressedImage) "
                       "instead of image (sensor_msgs/Image)", True, None),
    "qos_reliability": ("best_effort", "input QoS reliability: best_effort (sensor data; "
                        "matches every publisher) or reliable", True, None),
    "qos_depth": (1, "input QoS history depth", True, (1, 100)),
    "color_order": ("auto", "channel order of colour frames: auto (from the encoding; BGR "
                    "for compressed), rgb or bgr (for cameras that mislabel their frames)",
                    False, None),
    "diagnostics_period": (1.0, "seconds between /diagnostics messages", True, (0.1, 60.0)),
    "fresh_frame_wait": (1.0, "when the frame waiting for the model is older than a tenth "
                         "of the camera interval, wait up to this many camera intervals "
                         "(estimated from arrival times) for the next frame instead, so that "
                         "results are about one inference old; 0: process it at once",
                         False, (0.0, 2.0)),
}
CHOICES = {"qos_reliability": ("best_effort", "reliable"), "color_order": conversions.COLOR_ORDERS,
           "backend": BACKENDS}


def _descriptor(name: str) -> ParameterDescriptor:
    default, description, read_only, limits = PARAMETERS[name]
    descriptor = ParameterDescriptor(name=name, description=description, read_only=read_only)
    if name in CHOICES:
        descriptor.additional_constraints = "one of: " + ", ".join(CHOICES[name])
    elif name == "device":
        descriptor.additional_constraints = "auto, cpu, cuda or cuda:N"
    if isinstance(limits, tuple) and isinstance(default, float):
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(limits[0]), to_value=float(limits[1]), step=0.0)]
    elif isinstance(limits, tuple):
        descriptor.integer_range = [IntegerRange(from_value=limits[0], to_value=limits[1],
                                                 step=1)]
    return descriptor


#: A frame that has waited longer than this fraction of the camera interval is stale: the
#: worker waits for the next one (see fresh_frame_wait).
STALE_FRACTION = 0.1
#: Seconds a stop of the program (SIGINT, SIGTERM: the ROS context is shut down) waits for
#: the worker's frame in inference; a graph build for a new large frame size can take
#: longer and is left to end in the background (the worker is a daemon thread and publishes
#: nothing after the stop).
WORKER_JOIN_TIMEOUT = 1.0
#: Seconds a lifecycle cleanup or shutdown of a running program waits for that frame, so
#: that the next configure does not hold two models at once.
CLEANUP_JOIN_TIMEOUT = 60.0


def fresh_frame_wait(age: float, interval: float, max_wait: float) -> float:
    """Seconds the worker may wait for a newer frame before processing the one in the slot.

    ``age``: seconds that frame has waited for the worker (0 when it arrived while the
    worker was idle); ``interval``: camera interval in seconds (0 when
    not known yet); ``max_wait``: the ``fresh_frame_wait`` parameter, in camera intervals.
    0 (process it now) when the frame is younger than :data:`STALE_FRACTION` of the
    interval, the interval is unknown or ``max_wait`` is 0; else ``max_wait`` intervals.
    The worker stops waiting as soon as a frame arrives, so it waits about the time until
    the next frame is due; the bound only matters when the camera is late or has stopped.
    """
    if max_wait <= 0.0 or interval <= 0.0 or age <= STALE_FRACTION * interval:
        return 0.0
    return max_wait * interval


def check_parameter(name: str, value):
    """None when ``value`` is acceptable for ``name``, else the reason (beyond the type
    and range checks rclpy makes from the descriptors)."""
    if name in CHOICES and value not in CHOICES[name]:
        return f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}"
    if name == "device":
        base, _, index = str(value).partition(":")
        if value not in ("auto", "cpu", "cuda") and not (
                base == "cuda" and index.isdigit()):
            return f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    return None


@dataclass(frozen=True)
class Settings:
    """One consistent snapshot of the parameters; the worker reads one per frame."""

    model_path: str
    device: str
    score_threshold: float
    max_instances: int
    min_overlap_pixels: int
    min_overlap_ratio: float
    min_edge_confidence: float
    use_compressed: bool
    qos_reliability: str
    qos_depth: int
    color_order: str
    fresh_frame_wait: float


class PerceptionNode(LifecycleNode):
    """Lifecycle node ``orcnn_perception``; keyword arguments go to rclpy's Node
    (``context``, ``namespace``, ``parameter_overrides``, ``cli_args``, ...)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self._cond = threading.Condition()
        self._pending = None  # (message, monotonic receive time)
        self._arrivals = deque(maxlen=9)  # receive times of the last frames
        self._publish_lock = threading.Lock()  # orders publishing against deactivate
        self._epoch = 0  # +1 at each deactivate; the worker's frame must be of the current
        self._worker = None
        self._stop_worker = threading.Event()  # the current worker's; a new one per worker
        self._build_seen = None  # the back-end's last BuildInProgress the callback saw
        self._build_skipped = 0  # frames dropped in the slot during that build
        self._predictor = None
        self._model_name = ""
        self._device = "none"
        self._problem = ""
        self._active = False
        self._subscription = None
        self._input_name = "image"  # resolved topic name, for log lines
        self._out_pub = None
        self._debug_pub = None
        self._qos_reported = False
        self._applied = None  # (score_threshold, max_instances) set on the model
        self.stats = conversions.PipelineStats()
        #: Set when the configure of autostart failed (the reason is in ``problem``).
        self.autostart_failed = False

        # Registered before declaring, so that start-up values are checked too.
        self.add_on_set_parameters_callback(self._validate_parameters)
        for name, (default, *_rest) in PARAMETERS.items():
            self.declare_parameter(name, default, _descriptor(name))
        self._settings = self._read_settings()
        self.add_post_set_parameters_callback(lambda _params: self._refresh_settings())

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            self.get_parameter("diagnostics_period").value, self._publish_diagnostics)
        if self.get_parameter("autostart").value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()
            else:
                self.autostart_failed = True

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name not in PARAMETERS:
                continue
            reason = check_parameter(param.name, param.value)
            if reason:
                self.get_logger().warning(f"rejected parameter: {reason}")
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _read_settings(self) -> Settings:
        return Settings(**{name: self.get_parameter(name).value
                           for name in Settings.__dataclass_fields__})

    def _refresh_settings(self) -> None:
        self._settings = self._read_settings()

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def problem(self) -> str:
        """Why the last configure failed ("" after a successful one)."""
        return self._problem

    @property
    def input_topic(self) -> str:
        return "image/compressed" if self._settings.use_compressed else "image"

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        settings = self._settings
        path = Path(settings.model_path) if settings.model_path else default_model_path()
        try:
            if not path.is_file():
                what = "the bundled model " if not settings.model_path else ""
                raise FileNotFoundError(f"{what}{path} does not exist")
            backend = self.get_parameter("backend").value
            # torch loads here, not at import: bad parameters, --help and a stop during
            # start-up answer at once.
            from orcnn_core.predictor import Predictor

            predictor = Predictor.from_file(path, device=settings.device, backend=backend)
            predictor.backend.log = self.get_logger().info  # graph builds (fixed-size ones)
            # The limits the worker keeps: a fixed-size back-end's graph for the warm-up
            # below is then the one frames of that size use.
            predictor.set_limits(settings.score_threshold, settings.max_instances)
            # One inference at configure time: the first frames of a fresh model are several
            # times slower (allocator, kernel selection), which belongs to start-up.
            predictor(np.zeros((240, 320, 3), np.uint8))
        except Exception as exc:  # InputError (bad file), FileNotFoundError, CUDA errors
            self._problem = f"cannot load the model: {exc}"
            hint = "set the backend parameter to one that runs here" \
                if isinstance(exc, BackendError) \
                else "set the model_path parameter to an ORCNN .safetensors file"
            self.get_logger().error(
                f"configure failed, node stays unconfigured: {self._problem} ({hint})")
            return TransitionCallbackReturn.FAILURE
        self._problem = ""
        self._predictor = predictor
        self._applied = None
        self._model_name = path.stem
        self._device = str(predictor.device)
        # Output at the namespace root: /amodal_instances without a namespace.
        self._out_pub = self.create_lifecycle_publisher(
            AmodalInstanceArray, "amodal_instances",
            QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE),
            event_callbacks=PublisherEventCallbacks(
                incompatible_qos=self._on_incompatible_subscriber))
        self._debug_pub = self.create_lifecycle_publisher(
            Image, "~/debug_image", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self._stop_worker = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._stop_worker,),
                                        name="orcnn_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(f"model {path} loaded on {self._device}, back-end "
                               f"{predictor.backend.describe()}")
        return super().on_configure(state)

    def on_activate(self, state) -> TransitionCallbackReturn:
        settings = self._settings
        reliability = ReliabilityPolicy.RELIABLE if settings.qos_reliability == "reliable" \
            else ReliabilityPolicy.BEST_EFFORT
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=settings.qos_depth,
                         reliability=reliability, durability=DurabilityPolicy.VOLATILE)
        msg_type = CompressedImage if settings.use_compressed else Image
        self._qos_reported = False
        self._subscription = self.create_subscription(
            msg_type, self.input_topic, self._on_image, qos,
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos))
        self._input_name = self._subscription.topic_name
        self._active = True
        self.get_logger().info(
            f"active: {self._subscription.topic_name} ({msg_type.__name__}, "
            f"{settings.qos_reliability}, depth {settings.qos_depth}) -> "
            f"{self._out_pub.topic_name}")
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop_input()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._stop_input()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        self._stop_input()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_input(self) -> None:
        with self._publish_lock:  # once this returns, the worker publishes nothing more
            self._active = False
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None
        with self._cond:
            if self._pending is not None:
                self.stats.count("dropped")
            self._pending = None
            self._epoch += 1  # the frame in inference now is not answered after re-activate

    def _release(self) -> None:
        """Stop the worker and free the model (and its GPU memory)."""
        worker = self._worker
        if worker is not None:
            with self._cond:
                self._stop_worker.set()
                self._cond.notify_all()
            worker.join(timeout=CLEANUP_JOIN_TIMEOUT if self.context.ok()
                        else WORKER_JOIN_TIMEOUT)
            # After SIGTERM the context is shut down and /rosout gone: the process ends anyway.
            if worker.is_alive() and self.context.ok():
                build = self._graph_build()
                what = f"building the graph for {build.width}x{build.height} images" \
                    if build is not None else "a frame in inference"
                self.get_logger().warning(f"stopping without waiting for the inference "
                                          f"worker ({what}); it ends in the background")
            self._worker = None
        for pub in (self._out_pub, self._debug_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._out_pub = self._debug_pub = None
        device = self._predictor.device if self._predictor is not None else None
        self._predictor = None
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        self._device = "none"

    def destroy_node(self):
        self._stop_input()
        self._release()
        return super().destroy_node()

    # ------------------------------------------------------------------ input
    def _on_image(self, msg) -> None:
        received = time.monotonic()
        try:
            conversions.check_message(msg)
        except ValueError as exc:
            self.stats.count("received")
            self.stats.count("malformed")
            self.get_logger().warning(
                f"skipping malformed frame from {self._input_name}: {exc}",
                throttle_duration_sec=5.0)
            return
        with self._cond:
            self.stats.count("received")
            if self._pending is not None:
                self.stats.count("dropped")
                self._count_build_skip()
            self._pending = (msg, received)
            self._arrivals.append(received)
            self._cond.notify()
        # Let the worker take the GIL now rather than after the executor's bookkeeping that
        # follows this callback (most of a millisecond before the frame is converted).
        time.sleep(0)

    def _on_incompatible_qos(self, info) -> None:
        if self._qos_reported:
            return
        self._qos_reported = True
        policy = QoSPolicyKind(info.last_policy_kind)
        if policy == QoSPolicyKind.RELIABILITY:
            hint = ("the publisher is best effort: set qos_reliability:=best_effort "
                    "(the default)")
        else:
            hint = (f"make the publisher's {policy.name.lower()} policy compatible or "
                    f"change qos_reliability/qos_depth")
        self.get_logger().error(
            f"incompatible QoS on {self._input_name}: a publisher's "
            f"{policy.name} policy does not match this subscription "
            f"({self._settings.qos_reliability}); no frames arrive from it. Fix: {hint}")

    def _on_incompatible_subscriber(self, info) -> None:
        policy = QoSPolicyKind(info.last_policy_kind)
        out_pub = self._out_pub
        topic = out_pub.topic_name if out_pub is not None else "amodal_instances"
        self.get_logger().warning(
            f"incompatible QoS on {topic}: a subscriber's {policy.name} "
            f"policy does not match this publisher (reliable, volatile, depth 5); it gets no "
            f"results. Fix: make the subscription's {policy.name.lower()} policy compatible "
            f"(e.g. volatile durability)", throttle_duration_sec=5.0)

    # ------------------------------------------------------------------ worker
    def _work(self, stop: threading.Event) -> None:
        """The worker thread's loop, until ``stop`` (its own event: a worker left behind
        by a stop ends after its frame even when the node is configured again)."""
        free_since = -math.inf  # when the worker finished its last frame
        while True:
            with self._cond:
                while self._pending is None and not stop.is_set():
                    self._cond.wait()
                if stop.is_set():
                    return
                frame = self._pending
                # Only a frame that arrived during an inference has waited for the worker.
                waited = time.monotonic() - frame[1] if frame[1] < free_since else 0.0
                wait = fresh_frame_wait(waited, self._camera_interval(),
                                        self._settings.fresh_frame_wait)
                if wait > 0.0:
                    # Stale: the next frame is due. One wait at most, then the newest goes.
                    self._cond.wait_for(lambda: self._pending is not frame
                                        or stop.is_set(), wait)
                    if stop.is_set():
                        return
                    if self._pending is None:  # deactivated meanwhile
                        continue
                msg, received = self._pending
                self._pending = None
                epoch = self._epoch  # this worker's own: a later worker has another
            try:
                self._process(msg, received, epoch)
            except Exception as exc:  # never let one frame end the node
                self.stats.count("failed")
                self.get_logger().error(f"frame failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=5.0)
            free_since = time.monotonic()

    def _graph_build(self):
        """The back-end's graph build under way (orcnn_core.backends.BuildInProgress), or
        None."""
        predictor = self._predictor
        return None if predictor is None else predictor.backend.building

    def _count_build_skip(self) -> None:
        """A frame was dropped from the slot: count it against the graph build under way,
        if any (call with ``_cond`` held)."""
        build = self._graph_build()
        if build is None:
            return
        if build is not self._build_seen:
            self._build_seen, self._build_skipped = build, 0
        self._build_skipped += 1

    def _camera_interval(self) -> float:
        """Median gap between the last frames' arrivals in seconds; 0 before three frames
        (call with ``_cond`` held)."""
        times = list(self._arrivals)
        if len(times) < 3:
            return 0.0
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    def _apply_model_settings(self, predictor, settings: Settings) -> None:
        """Run-time score threshold and instance cap, set between frames through the
        Predictor so that fewer boxes reach the mask heads; select_instances enforces both
        on the output as well."""
        wanted = (settings.score_threshold, settings.max_instances)
        if wanted == self._applied:
            return
        predictor.set_limits(float(settings.score_threshold), int(settings.max_instances))
        self._applied = wanted

    def _process(self, msg, received: float, epoch: int) -> None:
        """Answer one frame taken from the slot in ``epoch``: it is published only while
        the node is active in that same epoch (not after a deactivate or reconfigure)."""
        settings = self._settings
        predictor = self._predictor
        if predictor is None:
            self.stats.count("dropped")
            return
        try:
            # The subscription callback has checked the frame (check_message) already.
            image, order = conversions.message_to_array(msg, settings.color_order,
                                                        checked=True)
        except ValueError as exc:
            self.stats.count("malformed")
            self.get_logger().warning(
                f"skipping malformed frame from {self._input_name}: {exc}",
                throttle_duration_sec=5.0)
            return
        self._apply_model_settings(predictor, settings)
        start = time.perf_counter()
        prediction = predictor(image, color_order=order)
        inference_ms = (time.perf_counter() - start) * 1000.0
        prediction = conversions.select_instances(prediction, settings.score_threshold,
                                                  settings.max_instances)
        graph = occlusion_graph(prediction, settings.min_overlap_pixels,
                                settings.min_overlap_ratio, settings.min_edge_confidence)
        out = conversions.instance_array_msg(prediction, graph, msg.header, self._model_name,
                                             inference_ms)
        out.latency_ms = (time.monotonic() - received) * 1000.0
        with self._publish_lock:
            if not self._active or epoch != self._epoch:
                self.stats.count("dropped")  # deactivated during its inference
                return
            self._out_pub.publish(out)
            self.stats.frame_done(out.latency_ms, inference_ms, len(prediction))
        debug_pub = self._debug_pub
        if debug_pub is not None and debug_pub.get_subscription_count() > 0:
            overlay = draw_prediction(image, prediction, graph, color_order=order)
            debug_pub.publish(conversions.array_to_image_msg(overlay, order + "8", msg.header))
            self.stats.count("overlays")

    # ------------------------------------------------------------------ diagnostics
    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    def _publish_diagnostics(self) -> None:
        msg = conversions.diagnostics_msg(
            self.get_clock().now().to_msg(), self.stats.snapshot(), self.lifecycle_state(),
            self._model_name, self._device, self._problem,
            backend=self.get_parameter("backend").value)
        build = self._graph_build()
        if build is not None:
            self._report_build(msg.status[0], build)
        else:
            with self._cond:
                skipped = self._build_skipped
            msg.status[0].values.append(KeyValue(key="frames_skipped_during_build",
                                                 value=str(skipped)))
        self._diag_pub.publish(msg)

    def _report_build(self, status, build) -> None:
        """Say in ``status`` that a graph build holds up the frames: WARN, for which size,
        for how long so far and how many frames were skipped meanwhile (after the build,
        ``frames_skipped_during_build`` keeps the count of the last one)."""
        with self._cond:
            skipped = self._build_skipped if build is self._build_seen else 0
        seconds = time.monotonic() - build.started
        if status.level < DiagnosticStatus.WARN:
            status.level = DiagnosticStatus.WARN
            status.message = (f"building the graph for {build.width}x{build.height} images "
                              f"({seconds:.1f} s so far, {skipped} frames skipped)")
        status.values += [KeyValue(key="graph_build", value=f"{build.width}x{build.height}"),
                          KeyValue(key="graph_build_s", value=f"{seconds:.2f}"),
                          KeyValue(key="frames_skipped_during_build", value=str(skipped))]


def exit_process(code: int) -> None:
    """End the program with ``code`` now: after :func:`main` has returned (node destroyed,
    ROS context shut down), skipping the interpreter's teardown of torch's modules, 1-3 s of
    CPU that would hold up launch or systemd stopping the node. Python's and the C
    library's output buffers (console, ROS log file) are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library symbols to reach: nothing buffered
        pass
    os._exit(code)


def usage() -> str:
    """The text of ``--help``: how to start the node, and its parameters."""
    lines = [
        "usage: perception_node [-h] [--ros-args ...]",
        "",
        "The ORCNN perception node (lifecycle node orcnn_perception): sensor_msgs/Image on",
        "`image` (or CompressedImage on `image/compressed`) in, orcnn_ros/AmodalInstanceArray",
        "on `amodal_instances` out, overlays on ~/debug_image, status on /diagnostics.",
        "",
        "  ros2 run orcnn_ros perception_node --ros-args -r image:=/camera/image_raw \\",
        "      --params-file config/perception.yaml -p model_path:=/path/model.safetensors",
        "  ros2 launch orcnn_ros perception.launch.py image_topic:=/camera/image_raw",
        "",
        "Exit status: 0 after Ctrl-C / SIGTERM; 1 when configure at start-up fails (with",
        "autostart and exit_on_configure_failure); 2 for an invalid parameter value.",
        "",
        "parameters (-p name:=value; ros2 param describe for ranges):",
    ]
    for name, (default, description, read_only, _limits) in PARAMETERS.items():
        tag = " (read-only)" if read_only else ""
        lines.append(f"  {name} [{default!r}]{tag}: {description}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The program: run the node until Ctrl-C / SIGTERM, then return 0; 1 when configure at
    start-up fails (autostart with exit_on_configure_failure); 2 when a parameter value is
    invalid. A stop request during start-up ends the process at once (status 0)."""
    from rclpy.exceptions import (InvalidParameterTypeException,
                                  InvalidParameterValueException)
    from rclpy.logging import get_logger
    from rclpy.utilities import remove_ros_args

    args = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help") for arg in remove_ros_args(args)[1:]):
        print(usage())
        return 0

    starting = True

    def on_stop_request(signum, frame):
        # rclpy's handler (installed by init, calling this one after its own) shuts the
        # context down, which ends a spinning executor cleanly. Until then nothing would
        # notice (loading the model takes seconds), and an exception raised inside the
        # loading of native libraries can abort the process; nothing is published yet.
        if starting:
            exit_process(0)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_stop_request)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
    rclpy.init(args=args)
    try:
        try:
            node = PerceptionNode()
        except (InvalidParameterValueException, InvalidParameterTypeException) as exc:
            get_logger(NODE_NAME).error(f"invalid parameter: {exc}")
            return 2
        if node.autostart_failed and node.get_parameter("exit_on_configure_failure").value:
            node.get_logger().fatal(
                f"exiting with status 1: configure at start-up failed ({node.problem}); "
                f"set exit_on_configure_failure:=false to keep the node running "
                f"unconfigured for lifecycle transitions")
            node.destroy_node()
            return 1
        # One thread spins the executor (services, parameters, diagnostics); inference has
        # its own worker thread, so a single-threaded executor never waits on the model.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        starting = False
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except Exception:
            # A signal can shut the context down between the executor's check of it and its
            # wait, which then fails (RCLError: context not valid): a stop all the same.
            if rclpy.ok():
                raise
        finally:
            node.destroy_node()
    finally:
        starting = False
        rclpy.try_shutdown()
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be restored
                signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    exit_process(main())
