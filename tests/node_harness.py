"""The perception node under test over real DDS, and a client node that talks to it.

A test spins the client node itself (``spin_until``, ``spin_for``); the nodes under test
(perception nodes, sim cameras) spin on a background executor in a thread of their own.
All share one context of their own on the run's ROS_DOMAIN_ID, so every message crosses
the middleware. Import it after ``pytest.importorskip("rclpy")``.
"""

import threading
import time

import rclpy
from rcl_interfaces.msg import Log
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy

from orcnn_ros.perception_node import PerceptionNode
from orcnn_ros.sim_camera import SimCamera

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
BEST_EFFORT = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


def stamp_ns(msg) -> int:
    """A message's header stamp in nanoseconds."""
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


class Harness:
    """The client node ``name`` (spun by the test thread, every ``poll`` seconds at the
    longest while nothing arrives) and the background executor, in a new context.

    ``rosout``: collect every /rosout message (``log_lines``). ``first_stamp``: the stamp
    seconds before the first of ``next_stamp()``.
    """

    def __init__(self, name, poll=0.05, rosout=True, first_stamp=1000):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.background = SingleThreadedExecutor(context=self.context)
        self.thread = threading.Thread(target=self.background.spin, daemon=True)
        self.thread.start()
        self.poll = poll
        self.stamp = first_stamp
        self.logs = []
        if rosout:
            self.node.create_subscription(Log, "/rosout", self.logs.append,
                                          QoSProfile(depth=1000,
                                                     reliability=ReliabilityPolicy.RELIABLE))

    def close(self):
        self.background.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ nodes under test
    def add(self, node):
        """Spin ``node`` on the background executor; returns it."""
        self.background.add_node(node)
        return node

    def destroy(self, node):
        """Take ``node`` off the background executor and destroy it."""
        self.background.remove_node(node)
        node.destroy_node()

    def start_node(self, model_path, namespace="", **params) -> PerceptionNode:
        """A perception node on the CPU with ``model_path``, score threshold 0, at most 20
        instances and the other ``params``, spinning in the background."""
        values = dict(model_path=str(model_path), device="cpu", score_threshold=0.0,
                      max_instances=20)
        values.update(params)
        return self.add(PerceptionNode(context=self.context, namespace=namespace,
                                       parameter_overrides=[Parameter(k, value=v)
                                                            for k, v in values.items()]))

    def start_sim_camera(self, width, height, frames, rate=30.0, scenes=3) -> SimCamera:
        """The sim camera sending ``frames`` frames (``scenes`` scenes in turn) of
        ``width`` x ``height`` at ``rate`` Hz, spinning in the background."""
        return self.add(SimCamera(context=self.context, namespace="", parameter_overrides=[
            Parameter("rate", value=rate), Parameter("width", value=width),
            Parameter("height", value=height), Parameter("num_scenes", value=scenes),
            Parameter("num_frames", value=frames)]))

    # ------------------------------------------------------------------ the test's side
    def spin_until(self, predicate, timeout=30.0, what="condition"):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.executor.spin_once(timeout_sec=self.poll)

    def spin_for(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=self.poll)

    def call(self, future, timeout=30.0, what="service call"):
        self.spin_until(future.done, timeout, what)
        return future.result()

    def next_stamp(self) -> int:
        """Fresh stamp seconds for a frame; ``self.stamp`` is the last one given."""
        self.stamp += 1
        return self.stamp

    def log_lines(self, logger_name, level=None):
        return [m.msg for m in self.logs if m.name == logger_name
                and (level is None or m.level == level)]


class Collector:
    """Messages of one topic in arrival order, with when each arrived (wall clock) and
    when its publisher sent it (source timestamp), in ns."""

    def __init__(self, harness, msg_type, topic, qos=RELIABLE):
        self.messages = []
        self.arrived = []
        self.published = []
        self.subscription = harness.node.create_subscription(
            msg_type, topic, self._on_message, qos)

    def _on_message(self, msg, info):
        self.arrived.append(time.time_ns())
        self.published.append(info["source_timestamp"])
        self.messages.append(msg)

    def by_stamp(self, sec):
        return [m for m in self.messages if m.header.stamp.sec == sec]

    def stamps(self):
        return [stamp_ns(m) for m in self.messages]

    def stamped_after(self, t_ns):
        return [m for m in self.messages if stamp_ns(m) > t_ns]

    def published_after(self, t_ns):
        return [m for m, p in zip(self.messages, self.published) if p > t_ns]


def accounted(snapshot) -> int:
    """Frames of a node's stats snapshot that are answered or counted otherwise."""
    return (snapshot["processed"] + snapshot["dropped"] + snapshot["malformed"]
            + snapshot["failed"])


def in_node(node) -> int:
    """Frames the node received and did not answer or count otherwise yet (waiting or in
    inference)."""
    snapshot = node.stats.snapshot()
    return snapshot["received"] - accounted(snapshot)


def idle(node) -> bool:
    """Every frame the node received is answered or counted, and none waits."""
    return node._pending is None and in_node(node) == 0
