"""Pure functions between ROS messages and the ``orcnn_core`` world; no node, no graph.

* image messages -> numpy: :func:`image_to_array`, :func:`compressed_to_array`,
  :func:`message_to_array`. A frame is checked (encoding, size, step, data length; for
  compressed frames the PNG or JPEG header's size, and a JPEG's decode budget) before a
  library touches it, so a malformed frame is one :class:`ValueError` that names the field,
  and header values never make a decoder allocate more than :data:`MAX_PIXELS` pixels.
  The size limits (pixels, longest side, aspect ratio) and the decode budget are
  :mod:`orcnn_core.imageio`'s. :func:`check_message` makes those checks alone, without
  decoding.
  The conversion itself is the ROS distribution's ``cv_bridge`` when it is importable, else
  ``rosbags-image`` (pure Python; the PyPI package called ``cv-bridge`` is not ROS's and
  does not work); packed rgb8 and bgr8 frames, the model's input as they are, are a view of
  the message's bytes without either.
* :func:`select_instances`, :func:`instance_array_msg`: a Prediction and its occlusion graph
  -> ``orcnn_ros/AmodalInstanceArray``.
* :class:`PipelineStats` and :func:`diagnostics_msg`: counters and timings -> /diagnostics.

The input side reads attributes only (``height``, ``width``, ``encoding``, ``step``,
``data``, ...), so it accepts rclpy messages and rosbags' deserialised messages alike.
"""

import math
import threading
import time
from array import array
from collections import deque
from types import SimpleNamespace

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from orcnn_core.imageio import MAX_PIXELS  # noqa: F401  (re-exported, see below)
from orcnn_core.imageio import LIMIT_ENV, jpeg_decode_problem, size_problem
from orcnn_ros.msg import AmodalInstance, AmodalInstanceArray, OcclusionEdge

__all__ = [
    "ENCODINGS", "COLOR_ORDERS", "image_to_array", "compressed_to_array", "message_to_array",
    "check_image", "check_compressed", "check_message", "array_to_image_msg",
    "select_instances", "instance_array_msg",
    "copy_header", "PipelineStats", "diagnostics_msg", "converter_name",
]

#: Supported raw encodings: (channels, bytes per channel).
ENCODINGS = {
    "rgb8": (3, 1), "bgr8": (3, 1), "rgba8": (4, 1), "bgra8": (4, 1),
    "mono8": (1, 1), "mono16": (1, 2),
}
#: ``color_order`` values: "auto" trusts the encoding (and BGR for decoded compressed
#: frames); "rgb" / "bgr" declare the channel order of colour frames whatever their
#: encoding says (cameras that label BGR data rgb8 exist).
COLOR_ORDERS = ("auto", "rgb", "bgr")
# MAX_PIXELS (the largest frame accepted, in pixels) is re-exported from orcnn_core.imageio,
# the owner of the image size limits.


def _ros_cv_bridge():
    """The ROS distribution's CvBridge, or None. ROS's cv_bridge ships the compiled
    ``cv_bridge.boost`` module; a package without it is not the ROS one."""
    try:
        from cv_bridge import CvBridge
        from cv_bridge.boost.cv_bridge_boost import getCvType  # noqa: F401
    except Exception:  # ImportError, or a broken install failing on import
        return None
    return CvBridge()


_BRIDGE = _ros_cv_bridge()


def converter_name() -> str:
    """Which library converts image messages here: "cv_bridge" or "rosbags-image"."""
    return "cv_bridge" if _BRIDGE is not None else "rosbags-image"


# ------------------------------------------------------------------------- images in
def _check_color_order(color_order: str) -> None:
    if color_order not in COLOR_ORDERS:
        raise ValueError(f"color_order: {color_order!r} is not one of {', '.join(COLOR_ORDERS)}")


def check_image(msg) -> int:
    """Validate a sensor_msgs/Image; returns the bytes per row without padding.

    Raises ValueError naming the first bad field: encoding, height/width, step or data.
    """
    encoding = msg.encoding
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: {encoding!r} is not supported (supported: "
                         f"{', '.join(ENCODINGS)})")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ValueError(f"height/width: empty image ({width} x {height})")
    problem = size_problem(width, height)
    if problem is not None:
        raise ValueError(f"height/width: {width} x {height} has {_limit_text(problem)}")
    channels, depth = ENCODINGS[encoding]
    row = width * channels * depth
    if step < row:
        raise ValueError(f"step: {step} bytes per row is less than width x pixel size = "
                         f"{width} x {channels * depth} = {row} for {encoding}")
    if depth > 1 and step % depth:
        raise ValueError(f"step: {step} is not a multiple of the {depth}-byte channel of "
                         f"{encoding}")
    size = len(msg.data)
    if size != step * height:
        what = "truncated" if size < step * height else "too long"
        raise ValueError(f"data: {size} bytes, expected step x height = {step} x {height} = "
                         f"{step * height} ({what})")
    return row


def _row_bytes(msg) -> int:
    """Bytes per row without padding of an Image that passed :func:`check_image`."""
    channels, depth = ENCODINGS[msg.encoding]
    return int(msg.width) * channels * depth


def _limit_text(problem) -> str:
    """An :func:`orcnn_core.imageio.size_problem` result as text, with the variable that
    raises the limit."""
    what, key = problem
    return what if key is None else f"{what} (the limit; {LIMIT_ENV[key]} raises it)"


def _unpadded(msg, row: int):
    """``msg`` itself, or a copy of its fields with the row padding (step > row) removed:
    rosbags-image assumes tightly packed rows."""
    if int(msg.step) == row:
        return msg
    rows = np.frombuffer(msg.data, np.uint8).reshape(int(msg.height), int(msg.step))
    return SimpleNamespace(height=msg.height, width=msg.width, encoding=msg.encoding,
                           is_bigendian=msg.is_bigendian, step=row,
                           data=np.ascontiguousarray(rows[:, :row]).reshape(-1))


def _target_encoding(encoding: str) -> str:
    """What the model gets: 3 channels, 8 bit; rgb8 and bgr8 stay as they are (the
    Predictor swaps channels on its device, which is cheaper than a copy here)."""
    return {"rgb8": "rgb8", "bgr8": "bgr8", "rgba8": "rgb8", "bgra8": "bgr8"}.get(
        encoding, "rgb8")


def image_to_array(msg, color_order: str = "auto", checked: bool = False):
    """sensor_msgs/Image -> ``(H x W x 3 uint8 array, "rgb" | "bgr")``.

    rgba8/bgra8 lose alpha; mono8 is replicated to 3 channels; mono16 is scaled linearly
    from 0..65535 to 0..255 (the cv_bridge convention). The array may share memory with the
    message. Raises ValueError for a malformed or unsupported frame. ``checked``: ``msg``
    has passed :func:`check_image` already (its checks are not repeated).
    """
    _check_color_order(color_order)
    row = _row_bytes(msg) if checked else check_image(msg)
    target = _target_encoding(msg.encoding)
    try:
        if target == msg.encoding and row == int(msg.step):
            # Packed rgb8 / bgr8 is the model's input as it is: a view of the bytes, as
            # either library returns it, without their per-call work (most of a 0.1 ms).
            array = np.frombuffer(msg.data, np.uint8).reshape(int(msg.height), -1, 3)
        elif _BRIDGE is not None:
            array = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding=target)
        else:
            from rosbags.image import image_to_cvimage

            source = _unpadded(msg, row)
            array = image_to_cvimage(source, None if target == msg.encoding else target)
    except Exception as exc:  # the library's own error types
        raise ValueError(f"data: cannot convert {msg.encoding} frame ({exc})") from None
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"encoding: {msg.encoding} converted to an unexpected "
                         f"{array.shape} {array.dtype} array")
    order = target[:3]
    if color_order != "auto" and ENCODINGS[msg.encoding][0] >= 3:
        order = color_order
    return array, order


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (SOF0..SOF15 less DHT 0xC4, JPG 0xC8 and DAC 0xCC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _png_size(data: memoryview):
    """(width, height) from the IHDR chunk that must follow the signature, or None."""
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        return None
    return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))


def _jpeg_size(data: memoryview):
    """(width, height) from the first start-of-frame segment, or None when the marker
    segments before it are broken, too many (real files have a few dozen), or the scan
    starts without one."""
    i, end = 2, len(data)
    for _ in range(1024):
        if i + 4 > end or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan
            return None
        elif marker in _JPEG_SOF:
            if i + 9 > end:
                return None
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"))
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_compressed(msg):
    """Validate a sensor_msgs/CompressedImage without decoding it; returns
    ``("png" | "jpeg", width, height)`` as its header says.

    Raises ValueError (field ``data``) when the data is empty, is neither PNG nor JPEG (the
    formats of ROS's compressed image transport), has no readable header, or the header
    says a size beyond the limits (:func:`orcnn_core.imageio.size_problem`): a few hundred
    bytes of JPEG whose header claims 30000 x 30000 would otherwise decode into gigabytes;
    and for a JPEG, when its scans exceed the decode budget
    (:func:`orcnn_core.imageio.jpeg_decode_problem`): a progressive JPEG of thousands of
    scans would otherwise keep the decoder busy for seconds.
    """
    data = memoryview(msg.data).cast("B")
    if len(data) == 0:
        raise ValueError(f"data: empty compressed frame (format {msg.format!r})")
    if bytes(data[:8]) == _PNG_SIGNATURE:
        kind, size = "png", _png_size(data)
    elif bytes(data[:3]) == b"\xff\xd8\xff":
        kind, size = "jpeg", _jpeg_size(data)
    else:
        raise ValueError(f"data: not a PNG or JPEG stream (format {msg.format!r}, first "
                         f"bytes {bytes(data[:8]).hex()})")
    if size is None:
        raise ValueError(f"data: {kind} stream without a readable image header "
                         f"({len(data)} bytes, format {msg.format!r})")
    width, height = size
    problem = size_problem(width, height)
    if problem is not None:
        raise ValueError(f"data: the {kind} header says {width} x {height} pixels, "
                         f"{_limit_text(problem)}")
    if kind == "jpeg":
        problem = jpeg_decode_problem(data, width, height)
        if problem:
            raise ValueError(f"data: jpeg stream with {problem}")
    return kind, width, height


def check_message(msg) -> None:
    """The checks :func:`message_to_array` makes before decoding, alone: cheap enough for
    a subscription callback. Raises ValueError naming the field."""
    if hasattr(msg, "format"):
        check_compressed(msg)
    else:
        check_image(msg)


def compressed_to_array(msg, color_order: str = "auto", checked: bool = False):
    """sensor_msgs/CompressedImage (jpeg, png) -> ``(H x W x 3 uint8, order)``.

    Raises ValueError when the data fails :func:`check_compressed` or cannot be decoded.
    ``checked``: ``msg`` has passed :func:`check_compressed` already (not repeated).
    """
    _check_color_order(color_order)
    data = msg.data
    if not checked:
        check_compressed(msg)
    try:
        if _BRIDGE is not None:
            array = _BRIDGE.compressed_imgmsg_to_cv2(msg, desired_encoding="passthrough")
        else:
            from rosbags.image import compressed_image_to_cvimage

            array = compressed_image_to_cvimage(msg)
    except Exception:  # decoders fail with assertion, cv2.error or library errors
        array = None
    if array is None or getattr(array, "size", 0) == 0:
        raise ValueError(f"data: cannot decode the {len(data)}-byte compressed frame "
                         f"(format {msg.format!r})")
    array = np.asarray(array)
    if array.dtype == np.uint16:  # 16-bit PNG
        array = (array / 257.0 + 0.5).astype(np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        gray = array.reshape(array.shape[:2])
        return np.repeat(gray[:, :, None], 3, axis=2), "rgb"
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"data: compressed frame decoded to an unsupported "
                         f"{array.shape} {array.dtype} image")
    if array.shape[2] == 4:
        array = np.ascontiguousarray(array[:, :, :3])
    # OpenCV decodes colour images to BGR.
    return array, ("bgr" if color_order == "auto" else color_order)


def message_to_array(msg, color_order: str = "auto", checked: bool = False):
    """Image or CompressedImage (told apart by the ``format`` field) -> (array, order).
    ``checked``: ``msg`` has passed :func:`check_message` already (a subscription callback
    that checks every frame): its checks are not repeated."""
    if hasattr(msg, "format"):
        return compressed_to_array(msg, color_order, checked)
    return image_to_array(msg, color_order, checked)


def array_to_image_msg(array: np.ndarray, encoding: str, header=None) -> Image:
    """A packed H x W x C uint8 array -> sensor_msgs/Image (rgb8, bgr8 or mono8)."""
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=0,
                step=width * channels, data=array.tobytes())
    if header is not None:
        msg.header = header
    return msg


# ------------------------------------------------------------------------- results out
def select_instances(prediction, score_threshold: float, max_instances: int):
    """The instances scoring at least ``score_threshold``, best first, at most
    ``max_instances`` of them: the input itself when it is all of them in that order, else
    a new Prediction (the input is not changed)."""
    scores = np.asarray(prediction.scores)
    # Already best first and within both limits (the Predictor's output as a rule): plain
    # Python comparisons of tens of numbers cost less than the numpy calls below.
    values = scores.tolist()
    if len(values) <= max_instances and all(a >= b for a, b in zip(values, values[1:])) \
            and bool((scores >= score_threshold).all()):
        return prediction
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold][:max(int(max_instances), 0)]
    if len(order) == len(scores) and np.array_equal(order, np.arange(len(scores))):
        return prediction
    return prediction.subset(order)


def instance_array_msg(prediction, graph, header, model_name: str = "",
                       inference_ms: float = 0.0, latency_ms: float = 0.0
                       ) -> AmodalInstanceArray:
    """Build the AmodalInstanceArray of one frame. Instance ``id`` = index in the
    prediction; masks are mono8 over the amodal box, with the frame's header."""
    height, width = prediction.image_size
    out = AmodalInstanceArray(header=header, image_width=int(width), image_height=int(height),
                              model_name=model_name, inference_ms=float(inference_ms),
                              latency_ms=float(latency_ms), has_cycle=bool(graph.has_cycle))
    # Plain Python numbers once per array: indexing numpy arrays per field costs more.
    rows = zip(prediction.rois.tolist(), prediction.labels.tolist(),
               prediction.class_names, prediction.scores.tolist(),
               prediction.amodal_areas.tolist(), prediction.visible_areas.tolist(),
               prediction.occlusion_ratios.tolist(), prediction.truncated.tolist(),
               graph.layers.tolist(), graph.free_probability.tolist())
    instances = []
    for i, (row, crop) in enumerate(zip(rows, prediction.crops, strict=True)):
        # array('B'), what the uint8[] setter stores, filled by one memcpy from the crop
        # (ascontiguousarray returns the Predictor's crops as they are).
        data = array("B")
        data.frombytes(np.ascontiguousarray(crop, np.uint8))
        instances.append(_instance_msg(i, row, header, data))
    out.instances = instances
    out.edges = [_edge_msg(a, b, p, r, c)
                 for (a, b), p, r, c in zip(graph.edges.tolist(), graph.overlap_pixels.tolist(),
                                            graph.overlap_ratio.tolist(),
                                            graph.confidence.tolist())]
    out.pick_order = graph.pick_order.tolist()
    return out


# The messages of the instances are built slot by slot (_bare_message): the generated
# constructors first build a default value for every field (for an AmodalInstance a whole
# Image, Header and Time) and run every setter, about 9 us an instance, most of the cost
# of the message. The values stored are those the setters would store (Python int, float,
# bool and str from tolist(); array('B') pixels), so the messages are the same. Each field
# is stored by name: a loop over keyword arguments took three times as long.
def _non_field_slots(cls) -> tuple:
    """(slot, value) of the slots of message type ``cls`` that hold no field
    (``_check_fields`` in recent ROS 2), as its constructor sets them."""
    fields = cls.get_fields_and_field_types()
    prototype = cls()
    return tuple((slot, getattr(prototype, slot)) for slot in cls.__slots__
                 if slot[1:] not in fields)


_NON_FIELD_SLOTS = {cls: _non_field_slots(cls) for cls in (AmodalInstance, Image, OcclusionEdge)}


def _bare_message(cls):
    """A ``cls`` message whose fields the caller stores in their slots (``msg._name =
    value``, every field). The result is an ordinary message: it serialises and compares
    as one built by the constructor, and with ROS_PYTHON_CHECK_FIELDS=1 its setters check
    later assignments."""
    msg = cls.__new__(cls)
    for slot, value in _NON_FIELD_SLOTS[cls]:
        setattr(msg, slot, value)
    return msg


def _mask_msg(header, width: int, height: int, data: array) -> Image:
    mask = _bare_message(Image)
    mask._header = header
    mask._height = height
    mask._width = width
    mask._encoding = "mono8"
    mask._is_bigendian = 0
    mask._step = width
    mask._data = data
    return mask


def _instance_msg(index: int, row: tuple, header, data: array) -> AmodalInstance:
    """An AmodalInstance from ``row``, one row of instance_array_msg's columns, with the
    mask pixels ``data``."""
    (x, y, w, h), label, name, score, amodal, visible, ratio, truncated, layer, free = row
    instance = _bare_message(AmodalInstance)
    instance._id = index
    instance._class_id = label
    instance._class_name = name
    instance._score = score
    instance._roi_x = x
    instance._roi_y = y
    instance._roi_width = w
    instance._roi_height = h
    instance._mask = _mask_msg(header, w, h, data)
    instance._amodal_area = amodal
    instance._visible_area = visible
    instance._occlusion_ratio = ratio
    instance._truncated = truncated
    instance._layer = layer
    instance._free_probability = free
    return instance


def _edge_msg(occluder: int, occludee: int, pixels: int, ratio: float,
              confidence: float) -> OcclusionEdge:
    edge = _bare_message(OcclusionEdge)
    edge._occluder = occluder
    edge._occludee = occludee
    edge._overlap_pixels = pixels
    edge._overlap_ratio = ratio
    edge._confidence = confidence
    return edge


def copy_header(header) -> Header:
    """An rclpy std_msgs/Header from any object with ``stamp.sec``, ``stamp.nanosec`` and
    ``frame_id`` (e.g. a rosbags message)."""
    return Header(stamp=Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)),
                  frame_id=str(header.frame_id))


# ------------------------------------------------------------------------- diagnostics
class PipelineStats:
    """Thread-safe frame counters and a sliding window of per-frame timings."""

    def __init__(self, window_sec: float = 5.0, clock=time.monotonic):
        self.window_sec = float(window_sec)
        self._clock = clock
        self._lock = threading.Lock()
        self.received = self.processed = self.dropped = self.malformed = self.failed = 0
        self.overlays = 0
        self._frames = deque()  # (publish time, latency ms, inference ms, instances)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def frame_done(self, latency_ms: float, inference_ms: float, instances: int) -> None:
        with self._lock:
            self.processed += 1
            self._frames.append((self._clock(), latency_ms, inference_ms, instances))

    def snapshot(self) -> dict:
        """Counters since start plus rate and means over the last ``window_sec``."""
        with self._lock:
            now = self._clock()
            while self._frames and now - self._frames[0][0] > self.window_sec:
                self._frames.popleft()
            frames = list(self._frames)
            out = dict(received=self.received, processed=self.processed,
                       dropped=self.dropped, malformed=self.malformed, failed=self.failed,
                       overlays=self.overlays)
        if len(frames) >= 2:
            span = frames[-1][0] - frames[0][0]
            out["rate_hz"] = (len(frames) - 1) / span if span > 0 else 0.0
        else:
            out["rate_hz"] = 0.0
        for key, column in (("latency_ms", 1), ("inference_ms", 2), ("instances", 3)):
            values = [f[column] for f in frames]
            out[key] = float(np.mean(values)) if values else math.nan
        out["latency_max_ms"] = max((f[1] for f in frames), default=math.nan)
        return out


def diagnostics_msg(stamp, snapshot: dict, state: str, model: str, device: str,
                    problem: str = "", backend: str = "eager") -> DiagnosticArray:
    """/diagnostics message with one status "orcnn_perception: inference".

    Level: ERROR when ``problem`` is set (e.g. the model failed to load), WARN when active
    without output in the window, else OK.
    """
    if problem:
        level, message = DiagnosticStatus.ERROR, problem
    elif state != "active":
        level, message = DiagnosticStatus.OK, f"{state}: not processing images"
    elif not math.isnan(snapshot["latency_ms"]):  # frames published within the window
        level, message = DiagnosticStatus.OK, f"{snapshot['rate_hz']:.1f} Hz"
    else:
        level, message = DiagnosticStatus.WARN, "active, no images processed recently"

    def fmt(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.2f}"
        return str(value)

    values = [("state", state), ("model", model), ("device", device), ("backend", backend),
              ("converter", converter_name())]
    values += [(key, fmt(snapshot[key])) for key in (
        "rate_hz", "latency_ms", "latency_max_ms", "inference_ms", "instances", "received",
        "processed", "dropped", "malformed", "failed", "overlays")]
    status = DiagnosticStatus(level=level, name="orcnn_perception: inference",
                              message=message, hardware_id=device,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values])
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])
