"""Message conversions, message building, diagnostics and bag replay, without a ROS graph."""

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from orcnn_core.occlusion import PRIOR_PIXELS, occlusion_graph  # noqa: E402
from orcnn_core.prediction import Prediction  # noqa: E402
from orcnn_ros import conversions  # noqa: E402
from orcnn_ros.msg import AmodalInstance, AmodalInstanceArray, OcclusionEdge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def raw(array, encoding, step=None, bigendian=0):
    """An Image whose rows are padded to ``step`` bytes (pad bytes are 0xEE)."""
    height, width = array.shape[:2]
    rows = array.reshape(height, -1).view(np.uint8).reshape(height, -1)
    step = rows.shape[1] if step is None else step
    data = np.full((height, step), 0xEE, np.uint8)
    data[:, :rows.shape[1]] = rows
    return Image(height=height, width=width, encoding=encoding, step=step,
                 is_bigendian=bigendian, data=data.tobytes())


# ------------------------------------------------------------------------- images in
@pytest.mark.parametrize("step_pad", [0, 5])
def test_colour_encodings(step_pad):
    rgb = RGB
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    alpha = np.full(rgb.shape[:2] + (1,), 9, np.uint8)
    cases = {
        "rgb8": (rgb, rgb, "rgb"),
        "bgr8": (bgr, bgr, "bgr"),
        "rgba8": (np.concatenate([rgb, alpha], 2), rgb, "rgb"),
        "bgra8": (np.concatenate([bgr, alpha], 2), bgr, "bgr"),
    }
    for encoding, (data, expected, order) in cases.items():
        row = data.shape[1] * data.shape[2]
        msg = raw(data, encoding, step=row + step_pad)
        array, got_order = conversions.image_to_array(msg)
        assert got_order == order, encoding
        assert array.dtype == np.uint8 and array.shape == (5, 7, 3), encoding
        np.testing.assert_array_equal(array, expected, err_msg=encoding)
        # The same frame reaches the model as the same RGB picture.
        as_rgb = array if got_order == "rgb" else array[:, :, ::-1]
        np.testing.assert_array_equal(as_rgb, rgb, err_msg=encoding)


def test_mono_encodings_become_three_equal_channels():
    gray = RNG.integers(0, 256, size=(4, 6), dtype=np.uint8)
    array, order = conversions.image_to_array(raw(gray, "mono8", step=8))
    assert order == "rgb"
    np.testing.assert_array_equal(array, np.repeat(gray[:, :, None], 3, 2))

    deep = np.array([[0, 65535, 257 * 100], [257 * 3, 1000, 65000]], np.uint16)
    expected = (deep.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    little, _ = conversions.image_to_array(raw(deep.astype("<u2"), "mono16"))
    big, _ = conversions.image_to_array(raw(deep.astype(">u2"), "mono16", bigendian=1))
    for array in (little, big):
        assert array.shape == (2, 3, 3)
        np.testing.assert_array_equal(array[:, :, 0], expected)
        np.testing.assert_array_equal(array[:, :, 2], expected)


def test_color_order_parameter_overrides_the_encoding_of_colour_frames():
    msg = raw(RGB, "rgb8")
    assert conversions.image_to_array(msg, "bgr")[1] == "bgr"
    assert conversions.image_to_array(msg, "auto")[1] == "rgb"
    gray = raw(RGB[:, :, 0], "mono8")
    assert conversions.image_to_array(gray, "bgr")[1] == "rgb"  # no colours to swap
    with pytest.raises(ValueError, match="^color_order"):
        conversions.image_to_array(msg, "grb")


@pytest.mark.parametrize("msg, field", [
    (Image(height=2, width=3, encoding="yuv422", step=6, data=bytes(12)), "encoding"),
    (Image(height=2, width=3, encoding="32FC1", step=12, data=bytes(24)), "encoding"),
    (Image(height=2, width=3, encoding="", step=9, data=bytes(18)), "encoding"),
    (Image(height=0, width=0, encoding="rgb8", step=0, data=b""), "height/width"),
    (Image(height=2, width=0, encoding="rgb8", step=0, data=b""), "height/width"),
    (Image(height=2, width=3, encoding="rgb8", step=6, data=bytes(12)), "step"),
    (Image(height=2, width=3, encoding="mono16", step=7, data=bytes(14)), "step"),
    (Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(17)), "data"),
    (Image(height=2, width=3, encoding="rgb8", step=9, data=b""), "data"),
    (Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(19)), "data"),
    (Image(height=100000, width=100000, encoding="mono8", step=100000, data=b""),
     "height/width"),
], ids=["unknown", "32FC1", "no-encoding", "empty", "zero-width", "short-step",
        "odd-step", "truncated", "no-data", "too-long", "huge"])
def test_malformed_frames_raise_one_value_error_naming_the_field(msg, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        conversions.image_to_array(msg)
    with pytest.raises(ValueError, match=f"^{field}: "):
        conversions.message_to_array(msg)


def test_compressed_frames():
    bgr = cv2.GaussianBlur(np.ascontiguousarray(
        np.repeat(np.repeat(RGB[:, :, ::-1], 8, 0), 8, 1)), (5, 5), 0)
    png = cv2.imencode(".png", bgr)[1].tobytes()
    array, order = conversions.message_to_array(CompressedImage(format="png", data=png))
    assert order == "bgr"
    np.testing.assert_array_equal(array, bgr)
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    array, order = conversions.compressed_to_array(
        CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg))
    assert order == "bgr" and array.shape == bgr.shape
    assert np.abs(array.astype(int) - bgr).mean() < 10  # lossy, but the channels match
    assert np.abs(array[:, :, ::-1].astype(int) - bgr).mean() > 30
    gray = bgr[:, :, 0]
    array, order = conversions.compressed_to_array(
        CompressedImage(format="png", data=cv2.imencode(".png", gray)[1].tobytes()))
    assert order == "rgb" and array.shape == gray.shape + (3,)
    np.testing.assert_array_equal(array[:, :, 1], gray)
    deep = (gray.astype(np.uint16) * 257)
    array, _ = conversions.compressed_to_array(
        CompressedImage(format="png", data=cv2.imencode(".png", deep)[1].tobytes()))
    np.testing.assert_array_equal(array[:, :, 0], gray)
    assert conversions.compressed_to_array(CompressedImage(format="png", data=png),
                                           "rgb")[1] == "rgb"


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_undecodable_compressed_frames(data):
    if data is None:  # a PNG cut in half
        png = cv2.imencode(".png", RGB)[1].tobytes()
        data = png[:len(png) // 2]
    with pytest.raises(ValueError, match="^data: "):
        conversions.message_to_array(CompressedImage(format="png", data=data))


def test_array_to_image_msg_round_trip():
    header = Header(frame_id="cam")
    header.stamp.sec = 5
    msg = conversions.array_to_image_msg(RGB, "rgb8", header)
    assert (msg.height, msg.width, msg.step, msg.encoding) == (5, 7, 21, "rgb8")
    assert msg.header.frame_id == "cam" and msg.header.stamp.sec == 5
    np.testing.assert_array_equal(conversions.image_to_array(msg)[0], RGB)


def test_checked_frames_convert_as_unchecked_ones():
    """checked=True (the node's callback has run check_message) skips the checks only."""
    png = cv2.imencode(".png", RGB)[1].tobytes()
    for msg in (raw(RGB, "rgb8"), raw(RGB, "bgra8", step=40), raw(RGB[:, :, 0], "mono8", step=9),
                CompressedImage(format="png", data=png)):
        conversions.check_message(msg)
        for order in conversions.COLOR_ORDERS:
            expected, expected_order = conversions.message_to_array(msg, order)
            array, got_order = conversions.message_to_array(msg, order, checked=True)
            assert got_order == expected_order
            np.testing.assert_array_equal(array, expected)


# ------------------------------------------------------------------------- results out
def hand_prediction():
    """Three instances on a 40 x 60 image: 1 lies on 0; 2 reaches past the left border."""
    crops = [np.zeros((10, 12), np.uint8), np.ones((6, 8), np.uint8),
             np.zeros((8, 9), np.uint8)]
    crops[0][:, :] = 1
    crops[0][2:8, 4:12] = 2  # hidden under instance 1 (6 x 8 = 48 px)
    crops[2][1:7, 0:4] = 2   # outside the image (x < 0)
    crops[2][1:7, 4:9] = 1
    rois = np.array([[10, 5, 12, 10], [14, 7, 8, 6], [-4, 20, 9, 8]], np.int32)
    boxes = np.concatenate([rois[:, :2], rois[:, :2] + rois[:, 2:]], 1).astype(np.float32)
    return Prediction(boxes=boxes, scores=np.array([0.9, 0.6, 0.75], np.float32),
                      labels=np.array([1, 2, 1]), class_names=["box", "can", "box"],
                      rois=rois, crops=crops, image_size=(40, 60))


def probs_prediction():
    """Three 4 x 4 instances on a 10 x 10 image with mask probabilities: A (0) fully visible
    at x 0..3; B (1) at x 0..3, amodal everywhere, visible 0 in its left half and 0.6 in its
    right half; C (2) at x 2..5, amodal everywhere, visible 0 in its left half (under A and
    B) and 1 in its right half. Evidence: A on B 8 + 8 * 0.4 = 11.2, A on C 8, B on C
    8 * 0.6 = 4.8, nothing the other way."""
    probs = [np.full((2, 4, 4), 255, np.uint8) for _ in range(3)]
    probs[1][1, :, :2], probs[1][1, :, 2:] = 0, 153
    probs[2][1, :, :2] = 0
    crops = [np.ones((4, 4), np.uint8) for _ in range(3)]
    crops[1][:, :2] = crops[2][:, :2] = 2
    rois = np.array([[0, 0, 4, 4], [0, 0, 4, 4], [2, 0, 4, 4]], np.int32)
    boxes = np.concatenate([rois[:, :2], rois[:, :2] + rois[:, 2:]], 1).astype(np.float32)
    return Prediction(boxes=boxes, scores=np.array([0.5, 0.7, 0.9], np.float32),
                      labels=np.array([1, 2, 3]), class_names=["a", "b", "c"], rois=rois,
                      crops=crops, image_size=(10, 10), probs=probs)


def test_select_instances_threshold_and_cap():
    pred = hand_prediction()
    everything = conversions.select_instances(pred, 0.0, 10)
    assert everything.scores.tolist() == pytest.approx([0.9, 0.75, 0.6])
    top = conversions.select_instances(pred, 0.7, 10)
    assert top.scores.tolist() == pytest.approx([0.9, 0.75])
    assert top.class_names == ["box", "box"]
    np.testing.assert_array_equal(top.crops[1], pred.crops[2])
    capped = conversions.select_instances(pred, 0.0, 2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.75])
    assert len(conversions.select_instances(pred, 0.95, 10)) == 0
    assert len(pred) == 3  # the input is untouched
    assert everything.probs is None and top.probs is None


def test_select_instances_matches_a_sort_and_filter_reference():
    """Ordered and unordered scores, ties, NaN, a threshold that float32 scores round to
    (0.7), caps below and above the count: the instances a stable sort by score, the
    threshold (compared as numpy compares) and the cap select, and the input itself when
    that is all of them in their order."""
    cases = [[0.9, 0.7, 0.7, 0.2], [0.2, 0.7, 0.9, 0.7], [0.7, 0.7, 0.7], [0.9, np.nan, 0.5],
             [np.nan, 0.9], [0.5], []]
    for values in cases:
        n = len(values)
        rois = np.tile(np.array([[0, 0, 2, 2]], np.int32), (n, 1))
        pred = Prediction(boxes=rois.astype(np.float32), scores=np.array(values, np.float32),
                          labels=np.arange(n), class_names=[f"c{i}" for i in range(n)],
                          rois=rois, crops=[np.ones((2, 2), np.uint8)] * n, image_size=(4, 4))
        for threshold in (0.0, 0.5, 0.7, 0.95):
            for cap in (0, 1, 3, 10):
                scores = pred.scores
                order = np.argsort(-scores, kind="stable")
                expected = order[scores[order] >= threshold][:cap].tolist()
                sub = conversions.select_instances(pred, threshold, cap)
                assert sub.labels.tolist() == expected, (values, threshold, cap)
                assert (sub is pred) == (expected == list(range(n))), (values, threshold, cap)


def test_select_instances_keeps_probs_aligned():
    pred = probs_prediction()
    assert conversions.select_instances(pred, 0.0, 10) is not pred  # reordered: C, B, A
    for threshold, cap, expected in ((0.0, 10, [2, 1, 0]), (0.6, 10, [2, 1]),
                                     (0.0, 1, [2]), (0.95, 10, [])):
        sub = conversions.select_instances(pred, threshold, cap)
        assert len(sub) == len(sub.probs) == len(sub.crops) == len(expected)
        assert sub.class_names == [pred.class_names[i] for i in expected]
        np.testing.assert_array_equal(sub.rois, pred.rois[expected].reshape(-1, 4))
        for k, i in enumerate(expected):
            np.testing.assert_array_equal(sub.probs[k], pred.probs[i])
            np.testing.assert_array_equal(sub.crops[k], pred.crops[i])
    # The graph of the selection is the graph of the same instances, renumbered.
    sub = conversions.select_instances(pred, 0.6, 10)  # C, B
    graph = occlusion_graph(sub, min_confidence=0.0)
    assert graph.edges.tolist() == [[1, 0]]  # B on C
    assert graph.confidence.tolist() == pytest.approx([4.8 / (4.8 + PRIOR_PIXELS)], rel=1e-5)
    assert len(pred) == 3 and len(pred.probs) == 3  # the input is untouched


def test_instance_array_message_fields():
    pred = hand_prediction()
    graph = occlusion_graph(pred, min_overlap_pixels=10, min_overlap_ratio=0.01)
    header = Header(frame_id="camera_optical")
    header.stamp.sec, header.stamp.nanosec = 1234, 5678
    msg = conversions.instance_array_msg(pred, graph, header, "tiny", 12.5, 20.25)
    # Through CDR and back: what a subscriber receives.
    msg = deserialize_message(serialize_message(msg), AmodalInstanceArray)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1234, 5678)
    assert msg.header.frame_id == "camera_optical"
    assert (msg.image_width, msg.image_height) == (60, 40)
    assert msg.model_name == "tiny"
    assert msg.inference_ms == pytest.approx(12.5) and msg.latency_ms == pytest.approx(20.25)
    assert [(e.occluder, e.occludee, e.overlap_pixels) for e in msg.edges] == [(1, 0, 48)]
    assert msg.edges[0].overlap_ratio == pytest.approx(48 / 120)
    assert list(msg.pick_order) == [2, 1, 0]  # 2 and 1 surely free, by score; then 0
    assert not msg.has_cycle
    for i, inst in enumerate(msg.instances):
        x, y, w, h = pred.rois[i].tolist()
        assert inst.id == i
        assert (inst.roi_x, inst.roi_y, inst.roi_width, inst.roi_height) == (x, y, w, h)
        assert (inst.mask.width, inst.mask.height, inst.mask.step) == (w, h, w)
        assert inst.mask.encoding == "mono8"
        assert inst.mask.header.stamp.sec == 1234
        np.testing.assert_array_equal(
            np.frombuffer(bytes(inst.mask.data), np.uint8).reshape(h, w), pred.crops[i])
        assert inst.class_id == pred.labels[i] and inst.class_name == pred.class_names[i]
        assert inst.score == pytest.approx(pred.scores[i])
    assert [i.amodal_area for i in msg.instances] == [120, 48, 54]
    assert [i.visible_area for i in msg.instances] == [72, 48, 30]
    assert [i.occlusion_ratio for i in msg.instances] == pytest.approx(
        [48 / 120, 0.0, 1 - 30 / 54])
    assert [i.truncated for i in msg.instances] == [False, False, True]
    assert [i.layer for i in msg.instances] == [1, 0, 0]
    # Nothing covers 1's hidden part: P(1 on 0) = 48 / (48 + 0 + prior).
    confidence = 48 / (48 + PRIOR_PIXELS)
    assert [e.confidence for e in msg.edges] == pytest.approx([confidence], rel=1e-6)
    assert [i.free_probability for i in msg.instances] == pytest.approx(
        [1 - confidence, 1.0, 1.0], rel=1e-6)


def test_instance_array_message_carries_confidences_of_mask_probabilities():
    pred = probs_prediction()
    graph = occlusion_graph(pred, min_overlap_pixels=1, min_overlap_ratio=0.0,
                            min_confidence=0.0)
    msg = conversions.instance_array_msg(pred, graph, Header(frame_id="cam"), "m")
    msg = deserialize_message(serialize_message(msg), AmodalInstanceArray)
    evidence = {(0, 1): 11.2, (0, 2): 8.0, (1, 2): 4.8}
    confidence = {edge: e / (e + PRIOR_PIXELS) for edge, e in evidence.items()}
    assert [(e.occluder, e.occludee) for e in msg.edges] == list(evidence)
    assert [e.overlap_pixels for e in msg.edges] == [11, 8, 5]  # the evidence, rounded
    assert [e.overlap_ratio for e in msg.edges] == pytest.approx(
        [e / 16 for e in evidence.values()], rel=1e-5)
    assert [e.confidence for e in msg.edges] == pytest.approx(list(confidence.values()),
                                                              rel=1e-5)
    assert [i.free_probability for i in msg.instances] == pytest.approx(
        [1.0, 1 - confidence[0, 1], (1 - confidence[0, 2]) * (1 - confidence[1, 2])],
        rel=1e-5)
    # float32 in the graph, float32 in the message: the very same numbers.
    assert [e.confidence for e in msg.edges] == graph.confidence.tolist()
    assert [i.free_probability for i in msg.instances] == graph.free_probability.tolist()
    # A lies on B and C, B on C: whatever the scores (C highest), A, then B, then C.
    assert list(msg.pick_order) == graph.pick_order.tolist() == [0, 1, 2]
    assert [i.layer for i in msg.instances] == [0, 1, 2]


def test_empty_prediction_message():
    pred = Prediction.empty((30, 40))
    msg = conversions.instance_array_msg(pred, occlusion_graph(pred), Header(), "m")
    assert (msg.image_width, msg.image_height) == (40, 30)
    assert len(msg.instances) == 0 and len(msg.edges) == 0 and len(msg.pick_order) == 0


def reference_instance_array(prediction, graph, header, model_name):
    """The message's fields spelled out instance by instance and edge by edge, each mask
    from its own crop, as plain Python values."""
    height, width = prediction.image_size
    instances = []
    for i in range(len(prediction)):
        x, y, w, h = (int(v) for v in prediction.rois[i])
        crop = np.asarray(prediction.crops[i])
        amodal, visible = int(np.isin(crop, (1, 2)).sum()), int((crop == 1).sum())
        inside = crop[max(-y, 0):max(min(height - y, h), 0), max(-x, 0):max(min(width - x, w), 0)]
        instances.append(dict(
            id=i, class_id=int(prediction.labels[i]), class_name=prediction.class_names[i],
            score=float(np.float32(prediction.scores[i])), roi=(x, y, w, h),
            mask=(h, w, w, "mono8", crop.astype(np.uint8).tobytes(), header.frame_id),
            amodal_area=amodal, visible_area=visible,
            occlusion_ratio=float(np.float32(1 - visible / amodal if amodal else 0.0)),
            truncated=amodal > int(np.isin(inside, (1, 2)).sum()),
            layer=int(graph.layers[i]), free_probability=float(graph.free_probability[i])))
    edges = [(int(a), int(b), int(p), float(r), float(c)) for (a, b), p, r, c in zip(
        graph.edges, graph.overlap_pixels, graph.overlap_ratio, graph.confidence)]
    return dict(size=(width, height), model=model_name, has_cycle=bool(graph.has_cycle),
                instances=instances, edges=edges, pick_order=graph.pick_order.tolist())


def message_fields(msg):
    """What a subscriber reads of an AmodalInstanceArray, as plain Python values."""
    instances = [dict(
        id=m.id, class_id=m.class_id, class_name=m.class_name, score=m.score,
        roi=(m.roi_x, m.roi_y, m.roi_width, m.roi_height),
        mask=(m.mask.height, m.mask.width, m.mask.step, m.mask.encoding, bytes(m.mask.data),
              m.mask.header.frame_id),
        amodal_area=m.amodal_area, visible_area=m.visible_area,
        occlusion_ratio=m.occlusion_ratio, truncated=m.truncated, layer=m.layer,
        free_probability=m.free_probability) for m in msg.instances]
    edges = [(e.occluder, e.occludee, e.overlap_pixels, e.overlap_ratio, e.confidence)
             for e in msg.edges]
    return dict(size=(msg.image_width, msg.image_height), model=msg.model_name,
                has_cycle=msg.has_cycle, instances=instances, edges=edges,
                pick_order=list(msg.pick_order))


def crowded_prediction(n, seed=5, size=(60, 80)):
    """``n`` overlapping instances whose crops are views into one larger array (as the
    Predictor's are), some reaching past the image, one with an empty mask."""
    rng = np.random.default_rng(seed)
    backing = rng.choice(np.array([0, 1, 2], np.uint8), size=(n, 50, 70), p=[.3, .4, .3])
    rois, crops = [], []
    for i in range(n):
        w, h = int(rng.integers(1, 60)), int(rng.integers(1, 45))
        rois.append((int(rng.integers(-15, 70)), int(rng.integers(-10, 50)), w, h))
        crops.append(backing[i, :h, :w])
    if n > 1:
        crops[1] = np.zeros_like(crops[1])
    rois = np.asarray(rois, np.int32).reshape(-1, 4)
    boxes = np.concatenate([rois[:, :2], rois[:, :2] + rois[:, 2:]], 1).astype(np.float32)
    return Prediction(boxes=boxes, scores=rng.random(n).astype(np.float32),
                      labels=rng.integers(1, 4, n), class_names=[f"c{i}" for i in range(n)],
                      rois=rois, crops=crops, image_size=size)


@pytest.mark.parametrize("n", [0, 1, 2, 12])
def test_instance_array_message_equals_the_field_by_field_reference(n):
    pred = crowded_prediction(n)
    graph = occlusion_graph(pred, min_confidence=0.0)
    header = Header(frame_id="cam")
    msg = conversions.instance_array_msg(pred, graph, header, "m", 3.0, 4.0)
    expected = reference_instance_array(pred, graph, header, "m")
    assert message_fields(msg) == expected
    # And after CDR: what a subscriber receives.
    assert message_fields(deserialize_message(serialize_message(msg),
                                              AmodalInstanceArray)) == expected
    if n == 12:
        assert len(expected["edges"]) > 3 and any(i["truncated"] for i in expected["instances"])


def constructed_instance_array(prediction, graph, header, model_name, inference_ms):
    """instance_array_msg's message built by the generated constructors, with their field
    checks on (types and ranges)."""
    instances = []
    for i in range(len(prediction)):
        x, y, w, h = prediction.rois[i].tolist()
        mask = Image(header=header, height=h, width=w, encoding="mono8", is_bigendian=0,
                     step=w, data=np.asarray(prediction.crops[i], np.uint8).tobytes(),
                     check_fields=True)
        instances.append(AmodalInstance(
            id=i, class_id=int(prediction.labels[i]), class_name=prediction.class_names[i],
            score=float(prediction.scores[i]), roi_x=x, roi_y=y, roi_width=w, roi_height=h,
            mask=mask, amodal_area=int(prediction.amodal_areas[i]),
            visible_area=int(prediction.visible_areas[i]),
            occlusion_ratio=float(prediction.occlusion_ratios[i]),
            truncated=bool(prediction.truncated[i]), layer=int(graph.layers[i]),
            free_probability=float(graph.free_probability[i]), check_fields=True))
    edges = [OcclusionEdge(occluder=a, occludee=b, overlap_pixels=p, overlap_ratio=r,
                           confidence=c, check_fields=True)
             for (a, b), p, r, c in zip(graph.edges.tolist(), graph.overlap_pixels.tolist(),
                                        graph.overlap_ratio.tolist(), graph.confidence.tolist())]
    height, width = prediction.image_size
    return AmodalInstanceArray(
        header=header, image_width=width, image_height=height, instances=instances,
        edges=edges, pick_order=graph.pick_order.tolist(), has_cycle=bool(graph.has_cycle),
        model_name=model_name, inference_ms=inference_ms, check_fields=True)


def slot_values(msg):
    """Every slot of a message, nested messages and lists of them unfolded, with its
    type: == alone holds for 1 == 1.0 == True."""
    out = {}
    for slot in type(msg).__slots__:
        value = getattr(msg, slot)
        if hasattr(type(value), "_fields_and_field_types"):
            out[slot] = slot_values(value)
        elif isinstance(value, list):
            out[slot] = [slot_values(v) for v in value]
        elif slot != "_check_fields":
            out[slot] = (type(value), value)
    return out


@pytest.mark.parametrize("n", [0, 1, 12])
def test_instance_array_message_equals_the_constructors_message(n):
    """The instances, masks and edges built slot by slot hold what the constructors and
    setters (checking every field) would store, type for type, and stay ordinary
    messages: they check later assignments when asked to, and survive CDR."""
    pred = crowded_prediction(n)
    graph = occlusion_graph(pred, min_confidence=0.0)
    header = Header(frame_id="cam")
    msg = conversions.instance_array_msg(pred, graph, header, "m", 3.0)
    expected = constructed_instance_array(pred, graph, header, "m", 3.0)
    assert msg == expected
    assert slot_values(msg) == slot_values(expected)
    assert deserialize_message(serialize_message(msg), AmodalInstanceArray) == expected
    if n == 12:
        instance = msg.instances[3]
        instance._check_fields = instance.mask._check_fields = True
        with pytest.raises(AssertionError, match="roi_width"):
            instance.roi_width = -1
        with pytest.raises(AssertionError, match="height"):
            instance.mask.height = 1.5


def test_instance_array_message_under_ros_python_check_fields():
    """With ROS_PYTHON_CHECK_FIELDS=1 the messages built slot by slot check their fields
    as constructed ones do, and equal them."""
    script = (
        "import numpy as np, pytest, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_conversions as t\n"
        "pred = t.crowded_prediction(12)\n"
        "graph = t.occlusion_graph(pred, min_confidence=0.0)\n"
        "msg = t.conversions.instance_array_msg(pred, graph, t.Header(), 'm', 3.0)\n"
        "assert msg == t.constructed_instance_array(pred, graph, t.Header(), 'm', 3.0)\n"
        "for m in (msg.instances[0], msg.instances[0].mask, msg.edges[0]):\n"
        "    assert m._check_fields is True\n"
        "with pytest.raises(AssertionError):\n"
        "    msg.edges[0].occluder = -1\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-P", "-c", script, str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, ROS_PYTHON_CHECK_FIELDS="1"))
    assert result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------------- diagnostics
def test_pipeline_stats_and_diagnostics():
    now = [100.0]
    stats = conversions.PipelineStats(window_sec=5.0, clock=lambda: now[0])
    stamp = Header().stamp
    snap = stats.snapshot()
    assert snap["rate_hz"] == 0.0 and math.isnan(snap["latency_ms"])
    status = conversions.diagnostics_msg(stamp, snap, "active", "m", "cpu").status[0]
    assert status.level == DiagnosticStatus.WARN
    for k in range(5):
        now[0] = 100.0 + 0.5 * k
        stats.count("received")
        stats.frame_done(latency_ms=40.0 + k, inference_ms=30.0, instances=3)
    stats.count("dropped", 2)
    stats.count("malformed")
    snap = stats.snapshot()
    assert snap["rate_hz"] == pytest.approx(2.0)
    assert snap["latency_ms"] == pytest.approx(42.0)
    assert snap["latency_max_ms"] == pytest.approx(44.0)
    assert (snap["received"], snap["processed"], snap["dropped"], snap["malformed"]) == \
        (5, 5, 2, 1)
    array = conversions.diagnostics_msg(stamp, snap, "active", "orcnn_demo", "cuda:0")
    status = array.status[0]
    assert status.name == "orcnn_perception: inference"
    assert status.hardware_id == "cuda:0"
    assert status.level == DiagnosticStatus.OK
    values = {kv.key: kv.value for kv in status.values}
    assert values["model"] == "orcnn_demo" and values["device"] == "cuda:0"
    assert values["dropped"] == "2" and values["rate_hz"] == "2.00"
    assert float(values["latency_ms"]) == pytest.approx(42.0)
    # The window forgets old frames; the counters do not.
    now[0] = 200.0
    snap = stats.snapshot()
    assert snap["rate_hz"] == 0.0 and snap["processed"] == 5
    error = conversions.diagnostics_msg(stamp, snap, "unconfigured", "", "none",
                                        problem="cannot load the model: x")
    assert error.status[0].level == DiagnosticStatus.ERROR
    assert "cannot load" in error.status[0].message
    inactive = conversions.diagnostics_msg(stamp, snap, "inactive", "m", "cpu")
    assert inactive.status[0].level == DiagnosticStatus.OK


# ------------------------------------------------------------------------- bag replay


def write_input_bag(path, frames, topic="/camera/image_raw"):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    Img = store.types["sensor_msgs/msg/Image"]
    Hdr = store.types["std_msgs/msg/Header"]
    Stamp = store.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=9) as writer:
        conn = writer.add_connection(topic, Img.__msgtype__, typestore=store)
        other = writer.add_connection("/other", "std_msgs/msg/Header", typestore=store)
        for k, (array, encoding) in enumerate(frames):
            height, width = array.shape[:2]
            data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            msg = Img(header=Hdr(stamp=Stamp(sec=50 + k, nanosec=k), frame_id="cam"),
                      height=height, width=width, encoding=encoding, is_bigendian=0,
                      step=data.size // max(height, 1), data=data)
            writer.write(conn, (50 + k) * 10**9, store.serialize_cdr(msg, Img.__msgtype__))
            writer.write(other, (50 + k) * 10**9 + 1,
                         store.serialize_cdr(Hdr(stamp=Stamp(sec=1, nanosec=0), frame_id="x"),
                                             "std_msgs/msg/Header"))


def test_bag_infer_writes_instance_arrays_and_overlays(tmp_path, tiny_model_path):
    from orcnn_core.synth import SynthConfig, generate_samples
    from orcnn_ros.bag_infer import main, make_typestore
    from rosbags.rosbag2 import Reader

    model = tiny_model_path
    scenes = [s.image for s in generate_samples(2, 3, SynthConfig(width=96, height=72))]
    bad = np.zeros((4, 5, 3), np.uint8)
    frames = [(scenes[0], "rgb8"), (bad, "yuv422"), (scenes[1][:, :, ::-1], "bgr8")]
    bag = tmp_path / "in"
    write_input_bag(bag, frames)
    out = tmp_path / "out"
    code = main(["--bag", str(bag), "--topic", "/camera/image_raw", "--out", str(out),
                 "--model", str(model), "--device", "cpu", "--score-threshold", "0.0",
                 "--max-instances", "7"])
    assert code == 0
    store = make_typestore()
    with Reader(out) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        assert topics == {"/amodal_instances": "orcnn_ros/msg/AmodalInstanceArray",
                          "/orcnn_perception/debug_image": "sensor_msgs/msg/Image"}
        arrays, overlays = [], []
        for conn, timestamp, data in reader.messages():
            msg = store.deserialize_cdr(data, conn.msgtype)
            (arrays if conn.topic == "/amodal_instances" else overlays).append(
                (timestamp, msg))
    # The malformed frame is skipped; the others keep their bag time and header.
    assert [t for t, _ in arrays] == [50 * 10**9, 52 * 10**9]
    assert [(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in arrays] == \
        [(50, 0), (52, 2)]
    for _, msg in arrays:
        assert (msg.image_width, msg.image_height) == (96, 72)
        assert msg.model_name == "tiny"
        assert 0 < len(msg.instances) <= 7
        assert sorted(msg.pick_order.tolist()) == list(range(len(msg.instances)))
        for inst in msg.instances:
            assert inst.mask.data.size == inst.roi_width * inst.roi_height
            assert inst.amodal_area == np.count_nonzero(inst.mask.data)
    assert [t for t, _ in overlays] == [50 * 10**9, 52 * 10**9]
    assert all((m.height, m.width, m.encoding) in ((72, 96, "rgb8"), (72, 96, "bgr8"))
               for _, m in overlays)
    # The bgr8 frame holds the same picture as an rgb8 one: same result as a bag with it.
    bag2, out2 = tmp_path / "in2", tmp_path / "out2"
    write_input_bag(bag2, [(scenes[1], "rgb8")])
    assert main(["--bag", str(bag2), "--topic", "/camera/image_raw", "--out", str(out2),
                 "--model", str(model), "--device", "cpu", "--score-threshold", "0.0",
                 "--max-instances", "7", "--no-overlay"]) == 0
    with Reader(out2) as reader:
        assert [c.topic for c in reader.connections] == ["/amodal_instances"]
        (conn, _, data), = list(reader.messages())
        again = store.deserialize_cdr(data, conn.msgtype)
    first = arrays[1][1]
    assert [(i.roi_x, i.roi_y, i.mask.data.tobytes()) for i in again.instances] == \
        [(i.roi_x, i.roi_y, i.mask.data.tobytes()) for i in first.instances]


def test_bag_infer_command_line_errors(tmp_path, capsys, tiny_model_path):
    from orcnn_ros.bag_infer import main

    bag = tmp_path / "in"
    write_input_bag(bag, [(np.zeros((8, 8, 3), np.uint8), "rgb8")])
    model = tiny_model_path
    cases = [
        (["--bag", str(bag), "--topic", "/nope", "--out", str(tmp_path / "o1")],
         "no topic '/nope'"),
        (["--bag", str(bag), "--topic", "/other", "--out", str(tmp_path / "o2")],
         "std_msgs/msg/Header, not"),
        (["--bag", str(bag), "--topic", "/camera/image_raw", "--out", str(bag)],
         "exists already"),
        (["--bag", str(tmp_path / "missing"), "--topic", "/x", "--out", str(tmp_path / "o3")],
         "missing"),
        (["--bag", str(bag), "--topic", "/camera/image_raw", "--out", str(tmp_path / "o4"),
          "--score-threshold", "1.5"], "--score-threshold must be in [0, 1]"),
    ]
    for args, message in cases:
        assert main(args + ["--model", str(model), "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    # As a program, from the repository root (where the source folder would shadow the
    # built package), with a missing model.
    result = subprocess.run([sys.executable, "-m", "orcnn_ros.bag_infer", "--bag", str(bag),
                             "--topic", "/camera/image_raw", "--out", str(tmp_path / "o5"),
                             "--model", str(tmp_path / "absent.safetensors")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "absent.safetensors: no such file" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------- hostile headers
def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose baseline frame header claims ``width`` x ``height``."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (its CRC no longer matches)."""
    return png[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:]


def test_compressed_header_sizes_read_without_decoding():
    from types import SimpleNamespace

    bgr = np.ascontiguousarray(np.repeat(RGB[:, :, ::-1], 3, 0))  # 15 x 7
    png = cv2.imencode(".png", bgr)[1].tobytes()
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    # Fill bytes, a restart-style marker and an application segment before the frame header.
    app = b"\xff\xe1" + (2 + 40).to_bytes(2, "big") + bytes(40)
    padded = jpeg[:2] + b"\xff\xff" + app + jpeg[2:]
    for fmt, data in (("png", png), ("jpeg", jpeg), ("jpeg", padded)):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape[:2] == (15, 7)  # the reference
        msg = CompressedImage(format=fmt, data=data)
        assert conversions.check_compressed(msg) == (fmt, 7, 15)
        assert conversions.check_message(msg) is None
        # A rosbags message carries a numpy array.
        bag_msg = SimpleNamespace(format=fmt, data=np.frombuffer(data, np.uint8))
        assert conversions.check_compressed(bag_msg) == (fmt, 7, 15)
        assert conversions.message_to_array(bag_msg)[0].shape == (15, 7, 3)
    # Large but allowed: checked, not decoded here.
    assert conversions.check_compressed(
        CompressedImage(format="jpeg", data=with_jpeg_size(jpeg, 6000, 6000))) == \
        ("jpeg", 6000, 6000)


def test_compressed_frames_with_absurd_or_broken_headers_are_rejected_before_decoding():
    bgr = np.ascontiguousarray(RGB[:, :, ::-1])
    png = cv2.imencode(".png", bgr)[1].tobytes()
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    bmp = cv2.imencode(".bmp", bgr)[1].tobytes()
    cases = [
        # libjpeg pads the missing data: this 1 kB frame would decode into 243 MB.
        (with_jpeg_size(jpeg, 9000, 9000), "the jpeg header says 9000 x 9000 pixels"),
        (with_jpeg_size(jpeg, 65535, 65535), "the jpeg header says 65535 x 65535"),
        (with_png_size(png, 100_000, 100_000), "the png header says 100000 x 100000"),
        (with_png_size(png, 0, 5), "the png header says 0 x 5"),
        (with_jpeg_size(jpeg, 7, 0), "the jpeg header says 7 x 0"),
        (png[:20], "png stream without a readable image header"),
        (b"\xff\xd8\xff\xda" + bytes(64), "jpeg stream without a readable image header"),
        (b"\xff\xd8" + b"\xff\x01" * 3000 + jpeg[2:], "jpeg stream without a readable"),
        (bmp, "not a PNG or JPEG stream"),
        (b"\xff\xd8junk", "not a PNG or JPEG stream"),
    ]
    for data, message in cases:
        msg = CompressedImage(format="jpeg", data=data)
        for check in (conversions.check_message, conversions.check_compressed,
                      conversions.message_to_array):
            with pytest.raises(ValueError, match=f"^data: {message}"):
                check(msg)


def test_malformed_raw_frames_allocate_nothing_from_their_header():
    import tracemalloc

    frames = [
        Image(height=2**31, width=2**31, encoding="rgb8", step=3 * 2**31, data=b""),
        Image(height=1, width=1, encoding="rgb8", step=2**32 - 1, data=bytes(3)),
        Image(height=4000, width=4000, encoding="mono16", step=8000, data=bytes(100)),
    ]
    tracemalloc.start()
    try:
        for msg in frames:
            for check in (conversions.check_message, conversions.message_to_array):
                with pytest.raises(ValueError, match="^(height/width|data): "):
                    check(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
