"""The perception node over real DDS: the real node class, real messages, a tiny model.

The node under test runs in this process with its own executor thread; the test talks to
it through a second node (publishers, subscriptions, parameter and lifecycle services) on
the run's own ROS_DOMAIN_ID, so every message crosses the middleware.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.event_handler import PublisherEventCallbacks  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402
from orcnn_ros.conversions import array_to_image_msg  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402
from orcnn_ros.perception_node import bundled_model_candidates  # noqa: E402
from node_harness import (BEST_EFFORT, RELIABLE, Collector, Harness, idle,  # noqa: E402
                          stamp_ns)

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 160, 120
SCENES = [s.image for s in generate_samples(3, 11, SynthConfig(width=WIDTH, height=HEIGHT))]


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path


@pytest.fixture(scope="module")
def harness(ros_domain_id):
    with Harness("test_client") as h:
        yield h


@pytest.fixture(scope="module")
def perception(harness, model_path):
    """The node under test: raw images on /image, default QoS (best effort)."""
    node = harness.start_node(model_path)
    pub = harness.node.create_publisher(Image, "/image", RELIABLE)
    out = Collector(harness, AmodalInstanceArray, "/amodal_instances")
    harness.spin_until(lambda: pub.get_subscription_count() > 0
                       and node._out_pub.get_subscription_count() > 0, 30, "discovery")
    yield node, pub, out
    harness.destroy(node)


def send(harness, pub, msg, out, expect=True, timeout=60.0):
    """Publish ``msg`` with a fresh stamp; return the answer (or None when not expected)."""
    sec = harness.next_stamp()
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, 123456
    msg.header.frame_id = "test_camera"
    pub.publish(msg)
    if not expect:
        return sec
    harness.spin_until(lambda: out.by_stamp(sec), timeout, f"an answer to frame {sec}")
    return out.by_stamp(sec)[0]


def encoded(image_rgb, encoding):
    if encoding == "rgb8":
        return array_to_image_msg(image_rgb, "rgb8")
    if encoding == "bgr8":
        return array_to_image_msg(image_rgb[:, :, ::-1], "bgr8")
    if encoding == "rgba8":
        alpha = np.full(image_rgb.shape[:2] + (1,), 255, np.uint8)
        return array_to_image_msg(np.concatenate([image_rgb, alpha], 2), "rgba8")
    if encoding == "bgra8":
        alpha = np.full(image_rgb.shape[:2] + (1,), 7, np.uint8)
        return array_to_image_msg(np.concatenate([image_rgb[:, :, ::-1], alpha], 2), "bgra8")
    if encoding == "rgb8-padded":  # rows padded to a multiple of 64 bytes
        step = (image_rgb.shape[1] * 3 + 63) // 64 * 64
        rows = np.zeros((image_rgb.shape[0], step), np.uint8)
        rows[:, :image_rgb.shape[1] * 3] = image_rgb.reshape(image_rgb.shape[0], -1)
        return Image(height=image_rgb.shape[0], width=image_rgb.shape[1], encoding="rgb8",
                     step=step, data=rows.tobytes())
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    if encoding == "mono8":
        return array_to_image_msg(gray, "mono8")
    assert encoding == "mono16"
    return Image(height=gray.shape[0], width=gray.shape[1], encoding="mono16",
                 step=gray.shape[1] * 2, data=(gray.astype("<u2") * 257).tobytes())


def masks_of(msg):
    return [np.frombuffer(bytes(i.mask.data), np.uint8).reshape(i.roi_height, i.roi_width)
            for i in msg.instances]


def signature(msg):
    """What identifies a result: boxes and masks of all instances, in order."""
    return [(i.roi_x, i.roi_y, i.roi_width, i.roi_height, bytes(i.mask.data))
            for i in msg.instances]


def boxes(msg):
    """Boxes, classes and scores (masks aside: with fewer boxes in the mask-head batch, an
    untrained model's near-0.5 mask probabilities may round differently)."""
    return [(i.roi_x, i.roi_y, i.roi_width, i.roi_height, i.class_id, i.score)
            for i in msg.instances]


def check_array(msg, width, height, max_instances=None, min_score=0.0):
    """Every documented invariant of one AmodalInstanceArray, computed from its masks."""
    assert (msg.image_width, msg.image_height) == (width, height)
    n = len(msg.instances)
    if max_instances is not None:
        assert n <= max_instances
    masks = masks_of(msg)
    for k, (inst, mask) in enumerate(zip(msg.instances, masks)):
        assert inst.id == k
        assert inst.mask.encoding == "mono8"
        assert (inst.mask.width, inst.mask.height, inst.mask.step) == \
            (inst.roi_width, inst.roi_height, inst.roi_width)
        assert inst.mask.header.stamp == msg.header.stamp
        assert set(np.unique(mask).tolist()) <= {0, 1, 2}
        assert inst.score >= min_score - 1e-6
        assert inst.class_id >= 1 and inst.class_name in ("box", "can")
        amodal, vis = int(np.count_nonzero(mask)), int(np.count_nonzero(mask == 1))
        assert (inst.amodal_area, inst.visible_area) == (amodal, vis)
        expected_ratio = 1 - vis / amodal if amodal else 0.0
        assert inst.occlusion_ratio == pytest.approx(expected_ratio, abs=1e-6)
        # Visible pixels lie inside the image; truncated = amodal pixels outside it.
        ys, xs = np.nonzero(mask == 1)
        assert np.all((xs + inst.roi_x >= 0) & (xs + inst.roi_x < width))
        assert np.all((ys + inst.roi_y >= 0) & (ys + inst.roi_y < height))
        ys, xs = np.nonzero(mask)
        outside = (xs + inst.roi_x < 0) | (xs + inst.roi_x >= width) \
            | (ys + inst.roi_y < 0) | (ys + inst.roi_y >= height)
        assert inst.truncated == bool(outside.any())
    # Edges: evidence from the mask probabilities (not in the message), so only what the
    # message itself implies: a positive overlap, its ratio, a confidence >= 0.5 and the
    # occludee's free probability at most 1 - that confidence.
    free = [i.free_probability for i in msg.instances]
    assert all(0.0 <= f <= 1.0 for f in free)
    for e in msg.edges:
        assert e.overlap_pixels >= 1
        amodal_area = msg.instances[e.occludee].amodal_area
        assert abs(e.overlap_ratio * amodal_area - e.overlap_pixels) <= 0.5 + 1e-3
        assert 0.5 <= e.confidence <= 1.0
        assert free[e.occludee] <= 1.0 - e.confidence + 1e-6
    # Pick order: a permutation in which nothing comes before what lies on it, the most
    # likely free of the instances with nothing left on them first.
    order = list(msg.pick_order)
    assert sorted(order) == list(range(n))
    position = {v: i for i, v in enumerate(order)}
    layers = [i.layer for i in msg.instances]
    for e in msg.edges:
        assert position[e.occluder] < position[e.occludee]
    for k in range(n):
        above = [e.occluder for e in msg.edges if e.occludee == k]
        assert layers[k] == (1 + max(layers[a] for a in above) if above else 0)
    if order:
        on_top = {e.occludee for e in msg.edges}
        assert free[order[0]] == max(free[k] for k in range(n) if k not in on_top)
    return masks


# ---------------------------------------------------------------------------------- tests
# The program-level tests come first: they run on the domain before the module's in-process
# node (named orcnn_perception too) exists.
def run_module(module, *args, timeout=120, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=os.environ)


def test_program_rejects_invalid_parameters_with_the_reason():
    # From the repository root on purpose: the program must not import the source folder.
    for param, reason in (("score_threshold:=2.0", "score_threshold"),
                          ("color_order:=grb", "color_order must be one of"),
                          ("device:=gpu", "device must be auto, cpu, cuda or cuda:N")):
        result = run_module("orcnn_ros.perception_node", "--ros-args", "-p", param)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "invalid parameter" in result.stderr and reason in result.stderr, \
            result.stderr
        assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end(tmp_path, model_path):
    result = run_module("orcnn_ros.demo", "--model", str(model_path), "--frames", "3",
                        "--out", str(tmp_path / "demo"), "--width", str(WIDTH), "--height",
                        str(HEIGHT), "--score-threshold", "0.0", "--timeout", "90",
                        timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("frame ")]
    assert len(lines) == 3 and "instances" in lines[0] and "pick" in lines[0]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["device"] == "cpu"
    assert summary["overlays_written"] >= 1
    assert len(list((tmp_path / "demo" / "overlays").glob("frame_*.png"))) \
        == summary["overlays_written"]
    for record in summary["records"]:
        assert sorted(record["pick_order"]) == list(range(record["instances"]))
    missing = run_module("orcnn_ros.demo", "--model", str(tmp_path / "none.safetensors"),
                         "--out", str(tmp_path / "demo2"))
    assert missing.returncode == 2 and "none.safetensors is missing" in missing.stderr
    env = {k: v for k, v in os.environ.items() if k != "ORCNN_DEMO_MODEL"}
    if not any(p.is_file() for p in bundled_model_candidates()):
        bundled = subprocess.run([sys.executable, "-m", "orcnn_ros.demo", "--out",
                                  str(tmp_path / "demo3")], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT, env=env)
        assert bundled.returncode == 2
        assert "bundled model orcnn_demo.safetensors is missing" in bundled.stderr


def test_image_in_array_out_for_every_encoding(harness, perception):
    node, pub, out = perception
    results = {}
    for encoding in ("rgb8", "bgr8", "rgba8", "bgra8", "rgb8-padded", "mono8", "mono16"):
        msg = send(harness, pub, encoded(SCENES[0], encoding), out)
        assert msg.header.frame_id == "test_camera"
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (harness.stamp, 123456)
        check_array(msg, WIDTH, HEIGHT, max_instances=20)
        assert msg.model_name == "tiny"
        assert 0 < msg.inference_ms <= msg.latency_ms
        results[encoding] = msg
    assert len(results["rgb8"].instances) > 0, "the tiny model should detect something"
    # The same picture in any colour encoding gives the same result.
    for encoding in ("bgr8", "rgba8", "bgra8", "rgb8-padded"):
        assert signature(results[encoding]) == signature(results["rgb8"]), encoding
    assert signature(results["mono8"]) == signature(results["mono16"])
    assert signature(results["mono8"]) != signature(results["rgb8"])


def test_malformed_frames_are_skipped_and_the_next_good_frame_is_answered(harness,
                                                                          perception):
    node, pub, out = perception
    good = encoded(SCENES[1], "rgb8")
    bad = [
        ("encoding", Image(height=HEIGHT, width=WIDTH, encoding="yuv422", step=WIDTH * 2,
                           data=bytes(WIDTH * HEIGHT * 2))),
        ("step", Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH,
                       data=bytes(WIDTH * HEIGHT))),
        ("height/width", Image(height=0, width=0, encoding="rgb8", step=0, data=b"")),
        ("data", Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3,
                       data=bytes(WIDTH * 3 * HEIGHT - 100))),
        ("data", Image(height=HEIGHT, width=WIDTH, encoding="bgr8", step=WIDTH * 3,
                       data=b"")),
    ]
    before = node.stats.snapshot()
    skipped = []
    for field, msg in bad:
        skipped.append(send(harness, pub, msg, out, expect=False))
        count = before["malformed"] + len(skipped)
        harness.spin_until(lambda: node.stats.snapshot()["malformed"] >= count, 30,
                           f"the node to reject the bad {field}")
    answer = send(harness, pub, good, out)
    check_array(answer, WIDTH, HEIGHT)
    harness.spin_for(0.5)
    assert not any(out.by_stamp(sec) for sec in skipped)
    after = node.stats.snapshot()
    assert after["malformed"] - before["malformed"] == len(bad)
    assert after["failed"] == before["failed"]
    # Logged (throttled: the first one at least) with the field and the topic.
    harness.spin_until(lambda: any("skipping malformed frame" in m for m in
                                   harness.log_lines("orcnn_perception")), 10, "the log")
    warnings = [m for m in harness.log_lines("orcnn_perception", Log.WARN)
                if "skipping malformed frame" in m]
    assert warnings and "/image" in warnings[0] and "encoding: 'yuv422'" in warnings[0]


def test_live_parameter_changes_take_effect_and_bad_values_are_rejected(harness, perception):
    node, pub, out = perception
    client = AsyncParameterClient(harness.node, "orcnn_perception")
    assert client.wait_for_services(timeout_sec=20.0)
    image = encoded(SCENES[2], "rgb8")
    full = send(harness, pub, image, out)
    assert len(full.instances) > 3

    def set_params(**values):
        future = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        return harness.call(future, what="set_parameters").results

    try:
        assert all(r.successful for r in set_params(max_instances=3))
        capped = send(harness, pub, image, out)
        assert boxes(capped) == boxes(full)[:3]  # the three best
        scores = [i.score for i in full.instances]
        threshold = float(sorted(scores)[-2]) - 1e-4
        assert all(r.successful for r in set_params(max_instances=20,
                                                    score_threshold=threshold))
        high = send(harness, pub, image, out)
        assert len(high.instances) == sum(s >= threshold for s in scores) >= 2
        assert boxes(high) == boxes(full)[:len(high.instances)]
        check_array(high, WIDTH, HEIGHT, min_score=threshold)
        assert all(r.successful for r in set_params(score_threshold=0.0,
                                                    min_overlap_pixels=10_000_000))
        no_edges = send(harness, pub, image, out)
        assert len(no_edges.edges) == 0 and len(no_edges.instances) == len(full.instances)

        rejected = {
            "score_threshold": (1.5, ""),
            "max_instances": (0, ""),
            "min_overlap_ratio": (-0.5, ""),
            "min_edge_confidence": (1.5, ""),
            "color_order": ("grb", "color_order must be one of auto, rgb, bgr"),
            "device": ("cuda:0", "read-only"),
            "model_path": ("/x.safetensors", "read-only"),
            "use_compressed": (True, "read-only"),
        }
        for name, (value, reason) in rejected.items():
            (result,) = set_params(**{name: value})
            assert not result.successful, name
            assert result.reason, name
            assert reason.lower() in result.reason.lower(), (name, result.reason)
        assert node.get_parameter("score_threshold").value == 0.0
        assert node.get_parameter("color_order").value == "auto"
    finally:
        set_params(score_threshold=0.0, max_instances=20, min_overlap_pixels=1)


def test_overlay_is_published_only_while_someone_subscribes(harness, perception):
    node, pub, out = perception
    image = encoded(SCENES[0], "bgr8")
    drawn = node.stats.snapshot()["overlays"]
    send(harness, pub, image, out)
    assert node.stats.snapshot()["overlays"] == drawn
    overlays = Collector(harness, Image, "/orcnn_perception/debug_image")
    harness.spin_until(lambda: node._debug_pub.get_subscription_count() > 0, 20,
                       "the overlay subscriber to match")
    answer = send(harness, pub, image, out)
    harness.spin_until(lambda: overlays.by_stamp(harness.stamp), 20, "the overlay")
    overlay = overlays.by_stamp(harness.stamp)[0]
    assert (overlay.width, overlay.height, overlay.encoding) == (WIDTH, HEIGHT, "bgr8")
    assert overlay.header.stamp == answer.header.stamp
    pixels = np.frombuffer(bytes(overlay.data), np.uint8).reshape(HEIGHT, WIDTH, 3)
    assert not np.array_equal(pixels, SCENES[0][:, :, ::-1])  # something was drawn
    assert node.stats.snapshot()["overlays"] == drawn + 1
    harness.node.destroy_subscription(overlays.subscription)
    harness.spin_until(lambda: node._debug_pub.get_subscription_count() == 0, 20,
                       "the overlay subscriber to leave")
    send(harness, pub, image, out)
    assert node.stats.snapshot()["overlays"] == drawn + 1


def test_diagnostics(harness, perception):
    node, pub, out = perception
    diagnostics = Collector(harness, DiagnosticArray, "/diagnostics", 10)
    send(harness, pub, encoded(SCENES[0], "rgb8"), out)

    def ours():
        return [s for m in diagnostics.messages for s in m.status
                if s.name == "orcnn_perception: inference"
                and dict((kv.key, kv.value) for kv in s.values).get("state") == "active"]

    harness.spin_until(ours, 10, "a diagnostics message")
    status = ours()[-1]
    values = {kv.key: kv.value for kv in status.values}
    assert status.hardware_id == "cpu"
    assert values["model"] == "tiny" and values["device"] == "cpu"
    for key in ("rate_hz", "latency_ms", "inference_ms", "dropped", "received", "processed"):
        assert key in values
    assert int(values["processed"]) >= 1
    harness.node.destroy_subscription(diagnostics.subscription)


def test_latest_frame_only_under_a_fast_camera(harness, perception):
    """A 30 Hz camera feeding the node: only the newest frame is processed, the rest are
    dropped and counted, and the output stays at most about one inference behind."""
    node, pub, out = perception
    before = node.stats.snapshot()
    start = len(out.messages)
    camera = harness.start_sim_camera(WIDTH, HEIGHT, frames=60)
    try:
        harness.spin_until(lambda: camera.done, 30, "the camera's 60 frames")
        # Every received frame ends up answered or counted as dropped.
        harness.spin_until(lambda: idle(node), 30, "the node to finish the last frame")
        harness.spin_for(0.5)  # the last answer's delivery
    finally:
        harness.destroy(camera)
    answers = [m for m in out.messages[start:] if m.header.frame_id == "sim_camera_optical_frame"]
    after = node.stats.snapshot()
    received = after["received"] - before["received"]
    processed = after["processed"] - before["processed"]
    dropped = after["dropped"] - before["dropped"]
    assert received >= 10, "the camera's frames should reach the node"
    assert len(answers) == processed > 0
    assert received == processed + dropped
    if np.median([m.inference_ms for m in answers]) > 1.5 * 1000 / 30:
        assert dropped > 0 and processed < received  # slower than the camera: it skips
    # Answers come in camera order. A frame waits at most for the inference running when
    # it arrived (that of the previous answer), then its own: no queue builds up.
    stamps = [stamp_ns(m) for m in answers]
    assert stamps == sorted(stamps)
    for previous, m in zip([None] + answers[:-1], answers):
        waited = previous.inference_ms if previous is not None else 0.0
        assert m.latency_ms <= m.inference_ms + waited + 500, (m.latency_ms, m.inference_ms)
    for m in answers[:3]:
        check_array(m, WIDTH, HEIGHT)


def test_lifecycle_transitions(harness, perception, model_path):
    node, pub, out = perception
    change = harness.node.create_client(ChangeState, "/orcnn_perception/change_state")
    get = harness.node.create_client(GetState, "/orcnn_perception/get_state")
    assert change.wait_for_service(timeout_sec=20.0) and get.wait_for_service(timeout_sec=20.0)

    def transition(tid):
        return harness.call(change.call_async(ChangeState.Request(
            transition=Transition(id=tid))), what=f"transition {tid}").success

    def state():
        return harness.call(get.call_async(GetState.Request())).current_state.id

    assert state() == State.PRIMARY_STATE_ACTIVE
    try:
        assert transition(Transition.TRANSITION_DEACTIVATE)
        assert state() == State.PRIMARY_STATE_INACTIVE
        harness.spin_until(lambda: pub.get_subscription_count() == 0, 20,
                           "the node to unsubscribe")
        silent = send(harness, pub, encoded(SCENES[0], "rgb8"), out, expect=False)
        harness.spin_for(1.5)
        assert not out.by_stamp(silent)
        assert transition(Transition.TRANSITION_ACTIVATE)
        harness.spin_until(lambda: pub.get_subscription_count() > 0, 20, "resubscription")
        check_array(send(harness, pub, encoded(SCENES[0], "rgb8"), out), WIDTH, HEIGHT)

        assert transition(Transition.TRANSITION_DEACTIVATE)
        assert transition(Transition.TRANSITION_CLEANUP)
        assert state() == State.PRIMARY_STATE_UNCONFIGURED
        assert node._predictor is None and node._worker is None
        harness.spin_until(lambda: harness.node.count_publishers("/amodal_instances") == 0,
                           20, "the output publisher to go")
        assert not transition(Transition.TRANSITION_ACTIVATE)  # not from unconfigured
        assert transition(Transition.TRANSITION_CONFIGURE)
        assert transition(Transition.TRANSITION_ACTIVATE)
        harness.spin_until(lambda: pub.get_subscription_count() > 0
                           and node._out_pub.get_subscription_count() > 0, 20, "rediscovery")
        check_array(send(harness, pub, encoded(SCENES[1], "rgb8"), out), WIDTH, HEIGHT)
    finally:
        if node.lifecycle_state() != "active":
            if node.lifecycle_state() == "unconfigured":
                node.trigger_configure()
            node.trigger_activate()


def test_configure_fails_clearly_for_a_missing_or_bad_model(harness, tmp_path, model_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    missing = tmp_path / "missing.safetensors"
    diagnostics = Collector(harness, DiagnosticArray, "/diagnostics", 10)
    for namespace, path, words in (("bad1", missing, "does not exist"),
                                   ("bad2", bad, "not a safetensors file")):
        node = harness.start_node(path, namespace=namespace)
        try:
            assert node.lifecycle_state() == "unconfigured"
            assert node._predictor is None
            logger = f"{namespace}.orcnn_perception"
            harness.spin_until(lambda: harness.log_lines(logger, Log.ERROR), 10, "the error")
            line = harness.log_lines(logger, Log.ERROR)[0]
            assert "configure failed" in line and str(path) in line and words in line

            def errors():
                return [s for m in diagnostics.messages for s in m.status
                        if s.level == DiagnosticStatus.ERROR and str(path) in s.message]

            harness.spin_until(errors, 10, "an ERROR diagnostic")
        finally:
            harness.destroy(node)
    manual = harness.start_node(model_path, namespace="manual", autostart=False)
    try:
        assert manual.lifecycle_state() == "unconfigured" and manual._predictor is None
    finally:
        harness.destroy(manual)
    harness.node.destroy_subscription(diagnostics.subscription)


def test_compressed_input_and_incompatible_qos(harness, perception, model_path):
    """A second node in namespace cam2: CompressedImage input, reliable QoS."""
    raw_node, raw_pub, raw_out = perception
    node = harness.start_node(model_path, namespace="cam2", use_compressed=True,
                              qos_reliability="reliable")
    try:
        out = Collector(harness, AmodalInstanceArray, "/cam2/amodal_instances")
        pub = harness.node.create_publisher(CompressedImage, "/cam2/image/compressed",
                                            RELIABLE)
        harness.spin_until(lambda: pub.get_subscription_count() > 0
                           and node._out_pub.get_subscription_count() > 0, 30, "discovery")
        bgr = np.ascontiguousarray(SCENES[0][:, :, ::-1])
        png = CompressedImage(format="png", data=cv2.imencode(".png", bgr)[1].tobytes())
        from_png = send(harness, pub, png, out)
        check_array(from_png, WIDTH, HEIGHT)
        # PNG is lossless: the same result as the raw frame on the other node.
        from_raw = send(harness, raw_pub, encoded(SCENES[0], "rgb8"), raw_out)
        assert signature(from_png) == signature(from_raw)
        jpeg = CompressedImage(format="jpeg", data=cv2.imencode(".jpg", bgr)[1].tobytes())
        check_array(send(harness, pub, jpeg, out), WIDTH, HEIGHT)
        skipped = send(harness, pub, CompressedImage(format="jpeg", data=b"\xff\xd8junk"),
                       out, expect=False)
        harness.spin_until(lambda: node.stats.snapshot()["malformed"] == 1, 30,
                           "the node to reject the undecodable frame")
        check_array(send(harness, pub, png, out), WIDTH, HEIGHT)
        assert not out.by_stamp(skipped)

        # A best-effort publisher cannot serve a reliable subscription: logged once, with
        # the parameter to change.
        logger = "cam2.orcnn_perception"
        quiet = PublisherEventCallbacks(incompatible_qos=lambda event: None)
        publishers = [harness.node.create_publisher(CompressedImage, "/cam2/image/compressed",
                                                    BEST_EFFORT, event_callbacks=quiet)
                      for _ in range(2)]
        harness.spin_until(lambda: any("incompatible QoS" in m
                                       for m in harness.log_lines(logger)), 20,
                           "the incompatible-QoS log line")
        harness.spin_for(1.0)
        lines = [m for m in harness.log_lines(logger) if "incompatible QoS" in m]
        assert len(lines) == 1, lines
        assert "RELIABILITY" in lines[0] and "qos_reliability:=best_effort" in lines[0]
        for p in publishers + [pub]:
            harness.node.destroy_publisher(p)
    finally:
        harness.destroy(node)


def test_launch_arguments_fall_back_to_the_params_file(tmp_path):
    """autostart and model_path: the launch argument when given, else the params file's
    value, else the default (a params file's `autostart: false` still holds under launch)."""
    try:
        import yaml
        from launch import LaunchContext
    except ImportError:
        pytest.skip("ROS 2 launch not importable")
    spec = importlib.util.spec_from_file_location("perception_launch",
                                                  ROOT / "launch" / "perception.launch.py")
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"/**/orcnn_perception": {"ros__parameters": {
        "autostart": False, "model_path": "/models/m.safetensors"}}}))
    context = LaunchContext()
    context.launch_configurations.update(
        {"params_file": str(params), "autostart": "", "model_path": ""})

    def value(name, default=""):
        return launch_file.ArgumentOrParamsFile(name, default).perform(context)

    assert (value("autostart", "true"), value("model_path")) == ("false",
                                                                 "/models/m.safetensors")
    context.launch_configurations.update({"autostart": "true", "model_path": "/other"})
    assert (value("autostart", "true"), value("model_path")) == ("true", "/other")
    params.write_text(yaml.safe_dump({"/**/orcnn_perception": {"ros__parameters": {}}}))
    context.launch_configurations.update({"autostart": "", "model_path": ""})
    assert (value("autostart", "true"), value("model_path")) == ("true", "")


def test_launch_file_arguments():
    tree = ast.parse((ROOT / "launch" / "perception.launch.py").read_text())
    declared = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "")
                == "DeclareLaunchArgument"}
    assert declared == {"image_topic", "params_file", "model_path", "namespace",
                        "use_compressed", "autostart"}
    try:
        from launch.launch_description_sources import PythonLaunchDescriptionSource
        from launch_ros.actions import Node
    except ImportError:
        pytest.skip("ROS 2 launch not importable; checked the declared arguments only")
    source = PythonLaunchDescriptionSource(str(ROOT / "launch" / "perception.launch.py"))
    description = source.try_get_launch_description_without_context()
    nodes = [e for e in description.entities if isinstance(e, Node)]
    assert len(nodes) == 1
    assert (nodes[0].node_package, nodes[0].node_executable) == ("orcnn_ros", "perception_node")
    assert {a.name for a in description.get_launch_arguments()} == declared
