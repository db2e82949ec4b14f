"""A simulated camera: synthetic bin scenes (orcnn_core.synth) as sensor_msgs/Image.

    python -m orcnn_ros.sim_camera --ros-args -p rate:=10.0 -p width:=320 -p height:=240

Publishes on ``image`` (remappable) at ``rate`` Hz, each frame stamped with the time it is
sent. Scenes are rendered and their messages built once at start-up (``num_scenes`` of
them, cycled): a frame only gets its stamp before it is published, so a 30 Hz camera costs
next to no CPU and does not compete with the model it feeds. With
``publish_compressed`` it also publishes PNG frames on ``image/compressed``. After
``num_frames`` frames (0: no limit) it stops publishing and, when run as a program, exits.

    ros2 run orcnn_ros sim_camera --ros-args -r image:=/camera/image_raw -p rate:=5.0

Parameters (read-only, -p name:=value): rate (Hz, 10.0), width (320), height (240),
seed (0), num_scenes (16), num_frames (0: never stop), encoding (rgb8 or bgr8),
frame_id (sim_camera_optical_frame), publish_compressed (false), reliable (true: reliable
QoS; false: best effort).
"""

import importlib.util
import os
import sys

if __name__ == "__main__" and not sys.flags.safe_path \
        and importlib.util.find_spec("orcnn_ros.msg") is None:  # pragma: no cover
    # Started from the repository root, where the source folder shadows the built package.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "orcnn_ros.sim_camera",
                              *sys.argv[1:]])

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange,  # noqa: E402
                                ParameterDescriptor)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402
from orcnn_ros.conversions import array_to_image_msg  # noqa: E402

__all__ = ["SimCamera", "render_frames", "main"]


def render_frames(count: int, width: int, height: int, seed: int, encoding: str = "rgb8"):
    """``count`` synthetic scenes as H x W x 3 uint8 arrays in the channel order of
    ``encoding`` (rgb8 or bgr8)."""
    cfg = SynthConfig(width=width, height=height)
    frames = [s.image for s in generate_samples(count, seed, cfg)]
    if encoding == "bgr8":
        frames = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames]
    return frames


class SimCamera(Node):
    """Node ``sim_camera``: publishes the pre-rendered scenes in a loop."""

    def __init__(self, node_name: str = "sim_camera", **kwargs):
        super().__init__(node_name, **kwargs)

        def declare(name, default, description, limits=None):
            descriptor = ParameterDescriptor(name=name, description=description,
                                             read_only=True)
            if isinstance(default, float) and limits:
                descriptor.floating_point_range = [FloatingPointRange(
                    from_value=limits[0], to_value=limits[1], step=0.0)]
            elif limits:
                descriptor.integer_range = [IntegerRange(from_value=limits[0],
                                                         to_value=limits[1], step=1)]
            return self.declare_parameter(name, default, descriptor).value

        self.rate = declare("rate", 10.0, "frames per second", (0.1, 1000.0))
        width = declare("width", 320, "image width in pixels", (16, 4096))
        height = declare("height", 240, "image height in pixels", (16, 4096))
        seed = declare("seed", 0, "scene seed", (0, 2**31 - 1))
        count = declare("num_scenes", 16, "distinct scenes rendered and cycled", (1, 10000))
        self.num_frames = declare("num_frames", 0, "stop after this many frames (0: never)",
                                  (0, 2**31 - 1))
        self.encoding = declare("encoding", "rgb8", "rgb8 or bgr8")
        self.frame_id = declare("frame_id", "sim_camera_optical_frame", "header frame_id")
        compressed = declare("publish_compressed", False,
                             "also publish PNG frames on image/compressed")
        reliable = declare("reliable", True, "reliable QoS (matches best-effort and "
                           "reliable subscribers); false: best effort")
        if self.encoding not in ("rgb8", "bgr8"):
            raise ValueError(f"encoding must be rgb8 or bgr8, got {self.encoding!r}")

        self.frames = render_frames(count, width, height, seed, self.encoding)
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.pub = self.create_publisher(Image, "image", qos)
        self.compressed_pub = None
        self.png = []
        if compressed:
            self.compressed_pub = self.create_publisher(CompressedImage, "image/compressed",
                                                        qos)
            order = cv2.COLOR_RGB2BGR if self.encoding == "rgb8" else None
            self.png = [cv2.imencode(".png", cv2.cvtColor(f, order) if order else f)[1]
                        .tobytes() for f in self.frames]
        # Built once; publishing serialises a message, so one object can go out every cycle.
        self.messages = [array_to_image_msg(f, self.encoding) for f in self.frames]
        self.compressed = [CompressedImage(format="png", data=png) for png in self.png]
        for msg in self.messages + self.compressed:
            msg.header.frame_id = self.frame_id
        self.sent = 0
        self.done = False
        self.timer = self.create_timer(1.0 / self.rate, self._tick)
        self.get_logger().info(f"publishing {width}x{height} {self.encoding} at "
                               f"{self.rate:g} Hz on {self.pub.topic_name}")

    def _tick(self) -> None:
        if self.num_frames and self.sent >= self.num_frames:
            if not self.done:
                self.done = True
                self.timer.cancel()
            return
        k = self.sent % len(self.messages)
        msg = self.messages[k]
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub.publish(msg)
        if self.compressed_pub is not None:
            compressed = self.compressed[k]
            compressed.header.stamp = msg.header.stamp
            self.compressed_pub.publish(compressed)
        self.sent += 1


def main(argv=None) -> int:
    from rclpy.exceptions import ParameterException
    from rclpy.logging import get_logger
    from rclpy.utilities import remove_ros_args

    args = sys.argv if argv is None else argv
    if any(arg in ("-h", "--help") for arg in remove_ros_args(args)[1:]):
        print("usage: sim_camera [-h] [--ros-args ...]\n\n" + __doc__.strip())
        return 0
    rclpy.init(args=args)
    try:
        try:
            node = SimCamera()
        except (ValueError, ParameterException) as exc:  # value, range or type
            get_logger("sim_camera").error(f"invalid parameter: {exc}")
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            while rclpy.ok() and not node.done:
                executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
