"""Round trip of the public messages between two processes over real DDS."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from orcnn_core.occlusion import OcclusionGraph  # noqa: E402
from orcnn_core.prediction import Prediction  # noqa: E402
from orcnn_ros.conversions import instance_array_msg  # noqa: E402
from orcnn_ros.msg import AmodalInstance, AmodalInstanceArray, OcclusionEdge  # noqa: E402

PUBLISHER = Path(__file__).with_name("instance_array_publisher.py")


def make_spec(seed: int) -> dict:
    """A message description with every field set to a non-default, distinct value."""
    rng = np.random.default_rng(seed)
    instances = []
    for i in range(4):
        w, h = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        mask = rng.integers(0, 3, size=(h, w), dtype=np.uint8)
        amodal = int((mask > 0).sum())
        visible = int((mask == 1).sum())
        instances.append({
            "id": i, "class_id": int(rng.integers(1, 9)), "class_name": f"class_é{i}",
            "score": float(rng.random()), "roi_x": int(rng.integers(-20, 100)),
            "roi_y": int(rng.integers(-20, 100)), "roi_width": w, "roi_height": h,
            "mask": mask.ravel().tolist(), "amodal_area": amodal, "visible_area": visible,
            "occlusion_ratio": 1.0 - visible / max(amodal, 1), "truncated": bool(i % 2),
            "layer": int(rng.integers(0, 4)),
        })
    return {
        "stamp": [int(rng.integers(1, 2**31)), int(rng.integers(0, 10**9))],
        "frame_id": "camera_color_optical_frame", "image_width": 320, "image_height": 240,
        "instances": instances,
        "edges": [{"occluder": 0, "occludee": 2, "overlap_pixels": 17, "overlap_ratio": 0.25,
                   "confidence": 0.875},
                  {"occluder": 3, "occludee": 1, "overlap_pixels": 5, "overlap_ratio": 0.125,
                   "confidence": float(rng.random())}],
        "pick_order": [3, 0, 1, 2], "has_cycle": True, "model_name": "orcnn_demo",
        "inference_ms": float(rng.random() * 100), "latency_ms": float(rng.random() * 100),
    }


def message_as_spec(msg: AmodalInstanceArray) -> dict:
    """The received message in the form of make_spec, for field-by-field comparison."""
    instances = []
    for m in msg.instances:
        assert m.mask.encoding == "mono8"
        expected_shape = (m.roi_height, m.roi_width, m.roi_width)
        assert (m.mask.height, m.mask.width, m.mask.step) == expected_shape
        instances.append({
            "id": m.id, "class_id": m.class_id, "class_name": m.class_name, "score": m.score,
            "roi_x": m.roi_x, "roi_y": m.roi_y, "roi_width": m.roi_width,
            "roi_height": m.roi_height, "mask": list(bytes(m.mask.data)),
            "amodal_area": m.amodal_area, "visible_area": m.visible_area,
            "occlusion_ratio": m.occlusion_ratio, "truncated": m.truncated, "layer": m.layer,
        })
    return {
        "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec],
        "frame_id": msg.header.frame_id, "image_width": msg.image_width,
        "image_height": msg.image_height, "instances": instances,
        "edges": [{"occluder": e.occluder, "occludee": e.occludee,
                   "overlap_pixels": e.overlap_pixels, "overlap_ratio": e.overlap_ratio,
                   "confidence": e.confidence}
                  for e in msg.edges],
        "pick_order": list(msg.pick_order), "has_cycle": msg.has_cycle,
        "model_name": msg.model_name, "inference_ms": msg.inference_ms,
        "latency_ms": msg.latency_ms,
    }


def as_float32(value):
    """float32 fields travel as float32: compare against the rounded sent value."""
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def test_instance_array_round_trip_between_processes(tmp_path, ros_domain_id):
    spec = make_spec(seed=ros_domain_id)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    topic = "/amodal_instances_roundtrip"
    publisher = subprocess.Popen([sys.executable, str(PUBLISHER), str(spec_path), topic],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    received = []
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("roundtrip_listener", context=context)
        node.create_subscription(AmodalInstanceArray, topic, received.append, 10)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 30.0
        while not received and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        publisher.terminate()
        output = publisher.communicate(timeout=10)[0]
    assert received, f"no message received within 30 s; publisher said:\n{output}"
    msg = received[0]
    assert len(msg.instances) == len(spec["instances"])
    assert message_as_spec(msg) == as_float32(spec)


def test_confidence_fields_survive_serialisation():
    """The graph's edge confidences and free probabilities, through a Prediction + graph ->
    message -> CDR bytes -> message round trip, bit for bit (float32 both sides)."""
    rois = np.array([[0, 0, 3, 2], [1, 0, 3, 2], [2, 1, 3, 2], [30, 30, 2, 2]], np.int32)
    crops = [np.ones((2, c), np.uint8) for c in rois[:, 2].tolist()]
    boxes = np.concatenate([rois[:, :2], rois[:, :2] + rois[:, 2:]], 1).astype(np.float32)
    prediction = Prediction(boxes=boxes, scores=np.array([0.9, 0.8, 0.7, 0.6], np.float32),
                            labels=np.array([1, 1, 2, 2]), class_names=["a", "a", "b", "b"],
                            rois=rois, crops=crops, image_size=(40, 40))
    confidence = np.array([0.875, 0.5, 1.0, 1 / 3], np.float32)
    free = np.array([1.0, 0.125, 0.0, 0.7], np.float32)
    graph = OcclusionGraph(
        edges=np.array([[0, 1], [0, 2], [1, 2], [3, 2]], np.int64),
        overlap_pixels=np.array([4, 3, 2, 1], np.int64),
        overlap_ratio=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
        confidence=confidence, layers=np.array([0, 1, 2, 0], np.int64),
        free_probability=free, pick_order=np.array([0, 3, 1, 2], np.int64),
        has_cycle=False, dropped_edges=np.zeros((0, 2), np.int64))
    sent = instance_array_msg(prediction, graph, Header(frame_id="cam"), "m")
    received = deserialize_message(serialize_message(sent), AmodalInstanceArray)
    for msg in (sent, received):
        assert [[e.occluder, e.occludee] for e in msg.edges] == graph.edges.tolist()
        assert [e.overlap_pixels for e in msg.edges] == [4, 3, 2, 1]
        assert [e.overlap_ratio for e in msg.edges] == graph.overlap_ratio.tolist()
        assert [e.confidence for e in msg.edges] == confidence.tolist()
        assert [i.free_probability for i in msg.instances] == free.tolist()
        assert [i.layer for i in msg.instances] == [0, 1, 2, 0]
        assert list(msg.pick_order) == [0, 3, 1, 2]
    # A message built without the new fields carries their defaults.
    bare = deserialize_message(serialize_message(AmodalInstanceArray(
        instances=[AmodalInstance()], edges=[OcclusionEdge()])), AmodalInstanceArray)
    assert bare.instances[0].free_probability == 0.0 and bare.edges[0].confidence == 0.0
