"""The prediction overlay: shape and colour order, tones, outline, pick numbers, speed."""

import time

import numpy as np
import pytest

from orcnn_core.occlusion import OcclusionGraph, occlusion_graph
from orcnn_core.prediction import Prediction
from orcnn_core.visualize import class_colour, draw_prediction

H, W = 60, 80
GREY = 128


def make_prediction(instances, image_size=(H, W)):
    """instances: (roi (x, y, w, h), crop uint8 [h, w], label, score)."""
    n = len(instances)
    rois = np.array([roi for roi, _, _, _ in instances], np.int32).reshape(n, 4)
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h in rois], np.float32).reshape(n, 4)
    return Prediction(boxes=boxes, scores=np.array([s for *_, s in instances], np.float32),
                      labels=np.array([lab for _, _, lab, _ in instances], np.int64),
                      class_names=[f"c{lab}" for _, _, lab, _ in instances], rois=rois,
                      crops=[np.asarray(c, np.uint8) for _, c, _, _ in instances],
                      image_size=image_size)


def graph_with_order(order):
    n = len(order)
    empty = np.zeros((0, 2), np.int64)
    return OcclusionGraph(edges=empty, overlap_pixels=np.zeros(0, np.int64),
                          overlap_ratio=np.zeros(0, np.float32),
                          confidence=np.zeros(0, np.float32), layers=np.zeros(n, np.int64),
                          free_probability=np.ones(n, np.float32),
                          pick_order=np.asarray(order, np.int64), has_cycle=False,
                          dropped_edges=empty)


def half_hidden(w=30, h=20):
    """Crop whose left half is visible and right half hidden."""
    crop = np.full((h, w), 2, np.uint8)
    crop[:, : w // 2] = 1
    return crop


def test_shape_dtype_and_colour_order_are_preserved():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    original = image.copy()
    pred = make_prediction([((10, 10, 30, 20), half_hidden(), 1, 0.9),
                            ((30, 25, 40, 30), half_hidden(40, 30), 2, 0.8)])
    rgb = draw_prediction(image, pred, graph_with_order([0, 1]))
    assert rgb.shape == image.shape and rgb.dtype == np.uint8
    assert np.array_equal(image, original)  # the input is not drawn on
    assert not np.array_equal(rgb, image)
    bgr = draw_prediction(image[..., ::-1].copy(), pred, graph_with_order([0, 1]),
                          color_order="bgr")
    # The same picture, channels reversed: class colours follow the colour order.
    assert np.array_equal(bgr[..., ::-1], rgb)
    # Visible pixels are pulled towards the class colour in the image's own order.
    red = np.array(class_colour(1), float)
    inner = (slice(12, 28), slice(12, 14))
    assert np.abs(rgb[inner] - red).mean() < np.abs(image[inner].astype(float) - red).mean()


def test_hidden_pixels_are_a_lighter_tone_than_visible_ones():
    image = np.full((H, W, 3), GREY, np.uint8)
    pred = make_prediction([((10, 10, 30, 20), half_hidden(), 1, 0.9)])
    out = draw_prediction(image, pred, graph_with_order([0])).astype(int)
    # Interior pixels, away from the outline and from the number at the visible centroid.
    visible = np.concatenate([out[12:15, 11:16], out[25:28, 11:16]]).reshape(-1, 3)
    hidden = out[12:28, 34:38].reshape(-1, 3)
    assert (visible == visible[0]).all() and (hidden == hidden[0]).all()
    v, h = visible[0], hidden[0]
    colour = np.array(class_colour(1))
    assert not np.array_equal(v, [GREY] * 3) and not np.array_equal(h, [GREY] * 3)
    assert (h >= v).all() and h.sum() > v.sum() + 60, (v, h)
    # Both are tints of the class colour: the dominant channel is the colour's.
    assert np.argmax(v) == np.argmax(colour) == np.argmax(h)


def test_amodal_outline_in_class_colour_and_clipped_at_the_border():
    image = np.full((H, W, 3), GREY, np.uint8)
    crop = np.ones((20, 30), np.uint8)
    # Second instance starts 5 px left of the image: its mask continues outside.
    pred = make_prediction([((20, 10, 30, 20), crop, 2, 0.9),
                            ((-5, 35, 20, 20), np.ones((20, 20), np.uint8), 3, 0.8)])
    out = draw_prediction(image, pred, graph_with_order([0, 1]))
    assert tuple(out[20, 20]) == class_colour(2)          # left edge of the first box
    assert tuple(out[10, 35]) == class_colour(2)          # top edge
    assert tuple(out[35, 8]) == class_colour(3)           # top edge of the cut one
    # Column 0 of the cut instance is inside its mask, not its outline (which lies at x=-5).
    assert tuple(out[47, 0]) != class_colour(3)
    assert tuple(out[47, 0]) != (GREY,) * 3               # but it is tinted


def differing_pixels(a, b):
    ys, xs = np.nonzero((a != b).any(axis=2))
    return ys, xs


def test_pick_numbers_are_drawn_at_the_centroids():
    image = np.full((H, W, 3), GREY, np.uint8)
    visible_left = half_hidden(24, 20)
    wholly_hidden = np.full((20, 24), 2, np.uint8)
    pred = make_prediction([((2, 4, 24, 20), visible_left, 1, 0.9),
                            ((50, 36, 24, 20), wholly_hidden, 2, 0.8)])
    first = draw_prediction(image, pred, graph_with_order([0, 1]))   # numbers 1, 2
    second = draw_prediction(image, pred, graph_with_order([1, 0]))  # numbers 2, 1
    ys, xs = differing_pixels(first, second)
    assert ys.size > 10
    # Visible centroid of instance 0: x = 2 + 5.5, y = 4 + 9.5; amodal centroid of the wholly
    # hidden instance 1: x = 50 + 11.5, y = 36 + 9.5. Every change lies near one of them.
    near0 = (np.abs(xs - 7.5) <= 8) & (np.abs(ys - 13.5) <= 8)
    near1 = (np.abs(xs - 61.5) <= 8) & (np.abs(ys - 45.5) <= 8)
    assert (near0 | near1).all()
    assert near0.any() and near1.any()
    # White text: near-white pixels at the centroid, where the tint alone is a red grey.
    window = first[9:19, 3:13]
    assert (window.min(axis=2) >= 180).any()


def test_graph_defaults_to_the_occlusion_graph():
    image = np.full((H, W, 3), GREY, np.uint8)
    lower = np.ones((24, 30), np.uint8)
    lower[:, 15:] = 2                       # right half hidden under the upper one
    upper = np.ones((24, 30), np.uint8)
    pred = make_prediction([((5, 10, 30, 24), lower, 1, 0.9), ((20, 10, 30, 24), upper, 2, 0.5)])
    graph = occlusion_graph(pred)
    assert graph.pick_order.tolist() == [1, 0]
    assert np.array_equal(draw_prediction(image, pred), draw_prediction(image, pred, graph))


def test_empty_prediction_returns_the_image_unchanged():
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = draw_prediction(image, Prediction.empty((H, W)))
    assert out is not image and np.array_equal(out, image)


def test_bad_arguments_are_refused():
    image = np.zeros((H, W, 3), np.uint8)
    pred = make_prediction([((2, 4, 24, 20), half_hidden(24, 20), 1, 0.9)])
    with pytest.raises(ValueError, match="color_order"):
        draw_prediction(image, pred, color_order="hsv")
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        draw_prediction(image.astype(np.float32), pred)
    with pytest.raises(ValueError, match="image is"):
        draw_prediction(np.zeros((H + 1, W, 3), np.uint8), pred)
    with pytest.raises(ValueError, match="permutation"):
        draw_prediction(image, pred, graph_with_order([1]))


def test_overlay_of_a_camera_frame_is_fast():
    """30 instances on a 640 x 480 frame, the node's debug image: well under a frame time."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    instances = []
    for k in range(30):
        w, h = (int(v) for v in rng.integers(40, 160, 2))
        x, y = int(rng.integers(-20, 600)), int(rng.integers(-20, 440))
        yy, xx = np.mgrid[:h, :w]
        ellipse = ((xx + 0.5) / w - 0.5) ** 2 + ((yy + 0.5) / h - 0.5) ** 2 <= 0.25
        crop = np.where(xx < w * rng.uniform(0.3, 1.0), 1, 2).astype(np.uint8) * ellipse
        instances.append(((x, y, w, h), crop, k % 5 + 1, 1.0 - k / 40))
    pred = make_prediction(instances, (480, 640))
    graph = occlusion_graph(pred)
    draw_prediction(image, pred, graph)
    start = time.perf_counter()
    for _ in range(5):
        draw_prediction(image, pred, graph)
    per_frame = (time.perf_counter() - start) / 5
    # Noisy shared CPUs: a generous bound; typical is a few milliseconds.
    assert per_frame < 0.1, per_frame
