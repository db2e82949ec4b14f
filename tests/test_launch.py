"""The launch file as users run it: launch_pytest brings up launch/perception.launch.py (the
installed one) on a ROS_DOMAIN_ID of the test's own; the test drives the node with
`ros2 lifecycle set` and `ros2 param set` and talks to it over DDS. Launch failures (bad
arguments, a missing params file) are checked through `ros2 launch`.

The node runs the tiny test model (tests/tiny_models.py) on the CPU; each launch costs
a few seconds, mostly the node's import of torch.
"""

import os
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

try:
    import launch_pytest
    from launch import LaunchDescription
    from launch.actions import IncludeLaunchDescription, RegisterEventHandler
    from launch.event_handlers import OnProcessExit, OnProcessIO
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    import launch_ros  # noqa: F401
    import ros2lifecycle  # noqa: F401
    import ros2param  # noqa: F401
except ImportError as exc:
    pytest.skip(f"the ROS 2 launch system and command line are not installed here ({exc}): "
                "these tests need launch, launch_ros, launch_pytest and ros2cli, as a ROS 2 "
                "distribution provides them", allow_module_level=True)
if shutil.which("ros2") is None:
    pytest.skip("the `ros2` command is not on PATH (source a ROS 2 distribution)",
                allow_module_level=True)

import rclpy  # noqa: E402
import yaml  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from lifecycle_msgs.msg import State  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import parameter_value_to_python  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402
from orcnn_ros.conversions import array_to_image_msg  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402

pytestmark = pytest.mark.ros

LAUNCH_FILE = Path(get_package_share_directory("orcnn_ros")) / "launch" / "perception.launch.py"
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
SCENES = [s.image for s in generate_samples(2, 11, SynthConfig(width=160, height=120))]
#: Node start-up (torch import, model load, warm-up) on a busy 2-core machine.
START_TIMEOUT = 90.0


# ---------------------------------------------------------------------------------- set-up
@pytest.fixture
def domain(monkeypatch):
    """A ROS_DOMAIN_ID for this test alone (not the run's): the launched node, the `ros2`
    commands (both inherit the environment) and the test's client all use it."""
    used = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    chosen = random.SystemRandom().choice([d for d in range(1, 102) if d != used])
    monkeypatch.setenv("ROS_DOMAIN_ID", str(chosen))
    return chosen


def write_params(path, model_path, **changes):
    """A params file under the key users write (any namespace) with values that differ
    from the node's defaults: ``model_path`` on the CPU, score threshold 0 (default 0.5),
    at most 7 instances (default 50), and ``changes``."""
    path.write_text(yaml.safe_dump({"/**/orcnn_perception": {"ros__parameters": {
        "model_path": str(model_path), "device": "cpu", "score_threshold": 0.0,
        "max_instances": 7, "diagnostics_period": 5.0, **changes}}}))
    return path


@pytest.fixture
def params_file(tmp_path, tiny_model_path):
    return write_params(tmp_path / "params.yaml", tiny_model_path)


class ProcessRecord:
    """What the launched processes wrote and how they ended (launch events)."""

    def __init__(self):
        self.output = []
        self.exit_codes = []

    def handlers(self):
        return [
            RegisterEventHandler(OnProcessIO(
                on_stdout=lambda event: self.output.append(event.text.decode()),
                on_stderr=lambda event: self.output.append(event.text.decode()))),
            RegisterEventHandler(OnProcessExit(
                on_exit=lambda event, _context: self.exit_codes.append(event.returncode))),
        ]

    def text(self) -> str:
        return "".join(self.output)


def perception_launch(record, **arguments):
    """The installed launch file with ``arguments``, ready to test at once."""
    return LaunchDescription([
        *record.handlers(),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments={k: str(v) for k, v in arguments.items()}
                                 .items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.fixture
def record():
    return ProcessRecord()


class Client:
    """The test's node on ``domain``, spun by a thread of its own."""

    def __init__(self, domain):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("launch_test_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.stamp = 1000

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def wait(self, predicate, what, timeout=30.0, record=None):
        deadline = time.monotonic() + timeout
        while not predicate():
            if record is not None and record.exit_codes:
                raise AssertionError(f"the node exited ({record.exit_codes}) while waiting "
                                     f"for {what}:\n{record.text()}")
            if time.monotonic() > deadline:
                extra = f"; node output:\n{record.text()}" if record is not None else ""
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for "
                                     f"{what}{extra}")
            time.sleep(0.05)

    def call(self, client, request, timeout=10.0):
        future = client.call_async(request)
        self.wait(future.done, f"a reply from {client.srv_name}", timeout)
        return future.result()

    def state(self, node_name) -> int:
        client = self.node.create_client(GetState, f"{node_name}/get_state")
        try:
            if not client.wait_for_service(timeout_sec=1.0):
                return State.PRIMARY_STATE_UNKNOWN
            return self.call(client, GetState.Request()).current_state.id
        finally:
            self.node.destroy_client(client)

    def wait_for_state(self, node_name, state, record, timeout=START_TIMEOUT):
        self.wait(lambda: self.state(node_name) == state, f"{node_name} in state {state}",
                  timeout, record)

    def parameter(self, node_name, name):
        client = self.node.create_client(GetParameters, f"{node_name}/get_parameters")
        try:
            assert client.wait_for_service(timeout_sec=10.0)
            reply = self.call(client, GetParameters.Request(names=[name]))
            return parameter_value_to_python(reply.values[0])
        finally:
            self.node.destroy_client(client)

    def answer(self, pub, out, what, compressed=False):
        """Publish a fresh frame on ``pub`` (once a subscriber is there) and return the
        node's answer to it from the collected ``out`` messages."""
        self.wait(lambda: pub.get_subscription_count() > 0, f"a subscriber to {what}", 30)
        self.stamp += 1
        sec = self.stamp
        image = SCENES[sec % len(SCENES)]
        if compressed:
            import cv2

            msg = CompressedImage(format="png",
                                  data=cv2.imencode(".png", image[:, :, ::-1])[1].tobytes())
        else:
            msg = array_to_image_msg(image, "rgb8")
        msg.header.stamp.sec = sec
        msg.header.frame_id = "camera"

        def answered():
            return [m for m in out if m.header.stamp.sec == sec]

        # Best effort input: send again every few seconds until the answer comes (a first
        # frame can be lost while discovery completes on either side).
        deadline = time.monotonic() + 30.0
        while not answered() and time.monotonic() < deadline:
            pub.publish(msg)
            resend = time.monotonic() + 5.0
            while not answered() and time.monotonic() < resend:
                time.sleep(0.05)
        assert answered(), f"no answer on the output to the frame sent on {what}"
        return answered()[0]


@pytest.fixture
def client(domain):
    c = Client(domain)
    yield c
    c.close()


def ros2(*args, timeout=60.0) -> subprocess.CompletedProcess:
    """A `ros2` command as a user types it (without the daemon, which would outlive the
    test), on the test's domain (the environment)."""
    return subprocess.run(["ros2", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ)


def ros2_no_daemon(verb, *args, **kwargs):
    """``ros2 <verb> --no-daemon ARGS``; without the daemon the command discovers the graph
    itself, for --spin-time seconds (0.5 by default: too short on a busy machine). A
    command that did not discover the node in that time ("Node not found", the command's
    own discovery) is run again, twice at most."""
    command, sub = verb.split()
    for _attempt in range(3):
        result = ros2(command, sub, "--no-daemon", "--spin-time", "2", *args, **kwargs)
        if "Node not found" not in result.stdout + result.stderr:
            break
    return result


# ---------------------------------------------------------------------------------- launches
def launch_fixture(function):
    """``launch_pytest.fixture`` (function scope: one launch per test). Releases of
    launch_pytest written for pytest < 8.4 read the fixture's scope from an attribute that
    pytest's fixture definitions no longer have; it is supplied here when missing."""
    fixture = launch_pytest.fixture(function)
    if not hasattr(fixture, "_pytestfixturefunction"):
        fixture._pytestfixturefunction = getattr(fixture, "_fixture_function_marker", None)
    return fixture


@launch_fixture
def robot_launch(domain, params_file, record):
    return perception_launch(record, namespace="robot1", image_topic="/test_cam/image_raw",
                             params_file=params_file)


@launch_fixture
def compressed_manual_launch(domain, tmp_path, tiny_model_path, record):
    return perception_launch(record, namespace="robot2", image_topic="/test_cam2/image_raw",
                             params_file=write_params(tmp_path / "p.yaml", tiny_model_path),
                             use_compressed="true", autostart="false")


@launch_fixture
def bad_model_launch(domain, params_file, tmp_path, record):
    return perception_launch(record, namespace="robot3", params_file=params_file,
                             model_path=tmp_path / "missing_model.safetensors")


# ---------------------------------------------------------------------------------- tests
@pytest.mark.launch(fixture=robot_launch)
def test_namespace_params_file_remap_and_live_parameters(client, record):
    node = "/robot1/orcnn_perception"
    client.wait_for_state(node, State.PRIMARY_STATE_ACTIVE, record)
    # The params file applied under the namespace (values that are not the defaults).
    assert client.parameter(node, "max_instances") == 7
    assert client.parameter(node, "score_threshold") == 0.0
    out = []
    client.node.create_subscription(AmodalInstanceArray, "/robot1/amodal_instances",
                                    out.append, RELIABLE)
    pub = client.node.create_publisher(Image, "/test_cam/image_raw", RELIABLE)
    assert len(client.answer(pub, out, "/test_cam/image_raw").instances) == 7
    # What a planner's developer reads with `ros2 topic echo --field pick_order`.
    # The type is named and the daemon left out, so the command subscribes at once instead
    # of waiting for a daemon to start and discover the topic's type (slow on a busy host).
    echo = subprocess.Popen(
        ["ros2", "topic", "echo", "--no-daemon", "/robot1/amodal_instances",
         "orcnn_ros/msg/AmodalInstanceArray", "--field", "pick_order", "--once",
         "--qos-reliability", "reliable"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client.wait(lambda: (client.node.count_subscribers("/robot1/amodal_instances") >= 2
                             or echo.poll() is not None),
                    "`ros2 topic echo` to subscribe", 60)
        assert echo.poll() is None, f"`ros2 topic echo` exited: {echo.communicate()[0]}"
        # Seeing the subscription does not mean the node's publisher has matched it yet, so
        # frames go in until the command prints one of the answers.
        deadline, published = time.monotonic() + 60, []
        while True:
            published.append(list(client.answer(pub, out, "/test_cam/image_raw").pick_order))
            try:
                printed, _ = echo.communicate(timeout=2)
                break
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "`ros2 topic echo` printed nothing in 60 s"
    finally:
        echo.kill()
    assert all(sorted(order) == list(range(7)) for order in published)
    numbers = printed.split("---")[0].split("[", 1)[-1]
    assert [int(v) for v in re.findall(r"-?\d+", numbers)] in published, printed
    # No colour codes in what the node writes (emulate_tty is off by default).
    assert "\x1b[" not in record.text()

    result = ros2_no_daemon("param set", node, "max_instances", "1")
    assert result.returncode == 0 and "Set parameter successful" in result.stdout, \
        result.stdout + result.stderr
    assert len(client.answer(pub, out, "/test_cam/image_raw").instances) == 1

    result = ros2_no_daemon("param set", node, "score_threshold", "2.0")
    refused = result.stdout + result.stderr
    assert "Setting parameter failed" in refused and "score_threshold" in refused, refused
    assert client.parameter(node, "score_threshold") == 0.0
    assert len(client.answer(pub, out, "/test_cam/image_raw").instances) == 1


@pytest.mark.launch(fixture=compressed_manual_launch)
def test_compressed_input_and_lifecycle_set(client, record):
    node = "/robot2/orcnn_perception"
    # autostart:=false: the node waits, unconfigured, for `ros2 lifecycle set`.
    client.wait_for_state(node, State.PRIMARY_STATE_UNCONFIGURED, record)
    for transition in ("configure", "activate"):
        result = ros2_no_daemon("lifecycle set", node, transition)
        assert result.returncode == 0 and "Transitioning successful" in result.stdout, \
            result.stdout + result.stderr
    assert client.state(node) == State.PRIMARY_STATE_ACTIVE
    out = []
    client.node.create_subscription(AmodalInstanceArray, "/robot2/amodal_instances",
                                    out.append, RELIABLE)
    pub = client.node.create_publisher(CompressedImage, "/test_cam2/image_raw/compressed",
                                       RELIABLE)
    answer = client.answer(pub, out, "/test_cam2/image_raw/compressed", compressed=True)
    assert answer.image_width == 160 and len(answer.instances) == 7
    assert client.node.count_subscribers("/test_cam2/image_raw") == 0

    result = ros2_no_daemon("lifecycle set", node, "deactivate")
    assert result.returncode == 0 and "Transitioning successful" in result.stdout, \
        result.stdout + result.stderr
    client.wait(lambda: pub.get_subscription_count() == 0, "the node to unsubscribe")
    assert client.state(node) == State.PRIMARY_STATE_INACTIVE


@pytest.mark.launch(fixture=bad_model_launch)
def test_bad_model_path_ends_the_node_with_an_error(client, record, tmp_path):
    client.wait(lambda: record.exit_codes, "the node to exit", START_TIMEOUT)
    assert record.exit_codes == [1], record.text()
    path = str(tmp_path / "missing_model.safetensors")
    errors = [line for line in record.text().splitlines() if path in line]
    assert any("ERROR" in line and "does not exist" in line for line in errors), \
        record.text()
    assert any("FATAL" in line and "exiting with status 1" in line for line in errors), \
        record.text()


def test_bad_arguments_fail_the_launch_clearly(domain, tmp_path):
    result = ros2("launch", "orcnn_ros", "perception.launch.py", "use_compressed:=yes")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "use_compressed" in output and "'true', 'false'" in output, output
    assert "perception_node" not in output  # nothing was started

    missing = tmp_path / "no_such_params.yaml"
    result = ros2("launch", "orcnn_ros", "perception.launch.py", f"params_file:={missing}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"params_file '{missing}' does not exist" in output, output
    assert "perception_node" not in output
