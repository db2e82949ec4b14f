"""Occlusion graph, layers and pick order on hand-built instances (no model, no ROS)."""

import numpy as np
import pytest

from orcnn_core.errors import InputError
from orcnn_core.occlusion import occlusion_graph, pair_overlaps
from orcnn_core.prediction import Prediction

IMAGE = (100, 120)  # height, width


def canvas_instance(amodal_boxes, visible_boxes, size=IMAGE):
    """Full-frame amodal / visible masks from lists of (x0, y0, x1, y1) rectangles."""
    height, width = size
    amodal = np.zeros((height, width), bool)
    visible = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in amodal_boxes:
        amodal[y0:y1, x0:x1] = True
    for x0, y0, x1, y1 in visible_boxes:
        visible[y0:y1, x0:x1] = True
    return amodal, visible & amodal


def prediction_from_masks(masks, scores, size=IMAGE):
    """A Prediction whose crops are the tight boxes of full-frame (amodal, visible) masks."""
    rois, crops = [], []
    for amodal, visible in masks:
        ys, xs = np.nonzero(amodal)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        crop = np.where(visible, 1, np.where(amodal, 2, 0)).astype(np.uint8)[y0:y1, x0:x1]
        rois.append((x0, y0, x1 - x0, y1 - y0))
        crops.append(crop)
    n = len(crops)
    rois = np.asarray(rois, np.int32).reshape(n, 4)
    boxes = np.concatenate([rois[:, :2], rois[:, :2] + rois[:, 2:]], 1).astype(np.float32)
    return Prediction(boxes=boxes, scores=np.asarray(scores, np.float32),
                      labels=np.ones(n, np.int64), class_names=["object"] * n, rois=rois,
                      crops=crops, image_size=size)


def stacked(lower_box, upper_box, size=IMAGE):
    """(lower, upper) masks of two rectangles where upper lies fully visible on lower."""
    x0, y0, x1, y1 = upper_box
    upper = canvas_instance([upper_box], [upper_box], size)
    lower_amodal, _ = canvas_instance([lower_box], [], size)
    lower_visible = lower_amodal.copy()
    lower_visible[y0:y1, x0:x1] = False
    return (lower_amodal, lower_visible), upper


def positions(order):
    return {int(v): i for i, v in enumerate(order)}


def test_one_object_on_another():
    lower, upper = stacked((10, 10, 50, 40), (30, 20, 70, 60))
    pred = prediction_from_masks([lower, upper], [0.9, 0.8])
    graph = occlusion_graph(pred, min_overlap_pixels=20, min_overlap_ratio=0.01)
    overlap = 20 * 20  # x 30..50, y 20..40
    assert graph.edges.tolist() == [[1, 0]]
    assert graph.overlap_pixels.tolist() == [overlap]
    assert graph.overlap_ratio.dtype == np.float32
    assert graph.overlap_ratio[0] == pytest.approx(overlap / (40 * 30))
    assert graph.layers.tolist() == [1, 0]
    # The upper object goes first although the lower one has the higher score.
    assert graph.pick_order.tolist() == [1, 0]
    assert not graph.has_cycle
    assert graph.dropped_edges.shape == (0, 2)
    assert graph.edges[graph.edges[:, 1] == 0, 0].tolist() == [1]
    for array, dtype in ((graph.edges, np.int64), (graph.overlap_pixels, np.int64),
                         (graph.layers, np.int64), (graph.pick_order, np.int64),
                         (graph.dropped_edges, np.int64)):
        assert array.dtype == dtype


def test_thresholds_decide_which_overlaps_are_edges():
    lower, upper = stacked((10, 10, 50, 40), (45, 35, 70, 60))  # overlap 5 x 5 = 25 px
    pred = prediction_from_masks([lower, upper], [0.9, 0.8])
    assert occlusion_graph(pred, min_overlap_pixels=25).edges.tolist() == [[1, 0]]
    assert occlusion_graph(pred, min_overlap_pixels=26).edges.shape == (0, 2)
    ratio = 25 / (40 * 30)
    assert occlusion_graph(pred, 1, ratio * 0.99).edges.tolist() == [[1, 0]]
    assert occlusion_graph(pred, 1, ratio * 1.01).edges.shape == (0, 2)
    # Thresholds of 0 still need one shared pixel.
    apart = prediction_from_masks([canvas_instance([(0, 0, 10, 10)], []),
                                   canvas_instance([(5, 5, 20, 20)], [(5, 5, 20, 20)])],
                                  [0.5, 0.5])
    assert occlusion_graph(apart, 0, 0.0).edges.tolist() == [[1, 0]]
    no_hidden = prediction_from_masks(
        [canvas_instance([(0, 0, 10, 10)], [(0, 0, 10, 10)]),
         canvas_instance([(5, 5, 20, 20)], [(5, 5, 20, 20)])], [0.5, 0.5])
    graph = occlusion_graph(no_hidden, 0, 0.0)
    assert graph.edges.shape == (0, 2)
    assert graph.layers.tolist() == [0, 0]


def test_hidden_parts_overlapping_each_other_make_no_edge():
    # Both objects are hidden in the shared region (under a third one): only the third
    # lies on them.
    a = canvas_instance([(10, 10, 40, 40)], [(10, 10, 20, 40)])
    b = canvas_instance([(20, 10, 60, 40)], [(45, 10, 60, 40)])
    c = canvas_instance([(25, 5, 45, 45)], [(25, 5, 45, 45)])
    graph = occlusion_graph(prediction_from_masks([a, b, c], [0.5, 0.6, 0.7]))
    assert graph.edges.tolist() == [[2, 0], [2, 1]]
    assert graph.overlap_pixels.tolist() == [15 * 30, 20 * 30]
    assert graph.layers.tolist() == [1, 1, 0]
    assert graph.pick_order.tolist() == [2, 1, 0]


def test_two_cycle_drops_the_weaker_edge():
    # a's visible part covers 30 hidden pixels of b, b's visible part 25 hidden pixels of a.
    a_amodal, _ = canvas_instance([(0, 0, 40, 40)], [])
    b_amodal, _ = canvas_instance([(30, 0, 70, 40)], [])
    a_visible = a_amodal.copy()
    b_visible = b_amodal.copy()
    a_visible[0:5, 35:40] = False  # 25 px of a hidden under b
    b_visible[10:16, 30:35] = False  # 30 px of b hidden under a
    pred = prediction_from_masks([(a_amodal, a_visible),
                                  (b_amodal, b_visible)], [0.5, 0.9])
    pairs, pixels = pair_overlaps(pred.rois, pred.crops)
    assert dict(zip(map(tuple, pairs.tolist()), pixels.tolist())) == {(0, 1): 30, (1, 0): 25}
    graph = occlusion_graph(pred, min_overlap_pixels=10)
    assert graph.has_cycle
    assert graph.dropped_edges.tolist() == [[1, 0]]
    assert graph.edges.tolist() == [[0, 1]]
    assert graph.overlap_pixels.tolist() == [30]
    assert graph.layers.tolist() == [0, 1]
    assert graph.pick_order.tolist() == [0, 1]


def labelled(box, hidden_regions, size):
    """(amodal, visible) of a rectangle with some rectangles of it hidden."""
    amodal, visible = canvas_instance([box], [box], size)
    for x0, y0, x1, y1 in hidden_regions:
        visible[y0:y1, x0:x1] = False
    return amodal, visible


def three_cycle_scene():
    """Instances 0 -> 1 -> 2 -> 0 (50, 40, 30 px) plus a pair 4 -> 3 and a loner 5.

    Squares 0, 1, 2 overlap pairwise; in each overlap a distinct strip is hidden in the
    lower object and visible in the upper one (everything else is visible in all three).
    """
    size = (100, 200)
    ring = [labelled((10, 10, 30, 30), [(15, 24, 20, 30)], size),   # under 2: 5 x 6
            labelled((20, 10, 40, 30), [(20, 10, 30, 15)], size),   # under 0: 10 x 5
            labelled((15, 20, 35, 40), [(30, 20, 35, 28)], size)]   # under 1: 5 x 8
    lower, upper = stacked((100, 10, 150, 60), (130, 40, 180, 90), size)
    loner = canvas_instance([(60, 70, 80, 90)], [(60, 70, 80, 90)], size)
    return ring + [lower, upper, loner], size


def test_three_cycle_and_disconnected_groups():
    masks, size = three_cycle_scene()
    scores = [0.6, 0.5, 0.4, 0.3, 0.95, 0.7]
    pred = prediction_from_masks(masks, scores, size)
    pairs, pixels = pair_overlaps(pred.rois, pred.crops)
    assert dict(zip(map(tuple, pairs.tolist()), pixels.tolist())) == {
        (0, 1): 50, (1, 2): 40, (2, 0): 30, (4, 3): 50 * 20 - 30 * 20 + 20 * 20 - 20 * 20}
    graph = occlusion_graph(pred, min_overlap_pixels=5, min_overlap_ratio=0.0)
    assert graph.has_cycle
    assert graph.dropped_edges.tolist() == [[2, 0]]  # the weakest edge of the ring
    assert graph.edges.tolist() == [[0, 1], [1, 2], [4, 3]]
    assert graph.overlap_pixels.tolist() == [50, 40, 400]
    assert graph.layers.tolist() == [0, 1, 2, 1, 0, 0]
    # Layer 0 by score (4: 0.95, 5: 0.7, 0: 0.6), then layer 1 (1: 0.5, 3: 0.3), then 2.
    assert graph.pick_order.tolist() == [4, 5, 0, 1, 3, 2]
    # Raising the pixel threshold above the weakest ring edge removes the cycle instead.
    graph = occlusion_graph(pred, min_overlap_pixels=31, min_overlap_ratio=0.0)
    assert not graph.has_cycle and graph.dropped_edges.shape == (0, 2)
    assert graph.edges.tolist() == [[0, 1], [1, 2], [4, 3]]


def test_pick_order_ties_break_by_score_then_occlusion():
    # Four separate objects; 1 and 2 share a score, 2 is less occluded (part hidden outside
    # nothing: its amodal mask has a hidden strip, as if a model predicted it).
    a = canvas_instance([(0, 0, 10, 10)], [(0, 0, 10, 10)])
    b = canvas_instance([(20, 0, 30, 10)], [(20, 0, 30, 5)])  # ratio 0.5
    c = canvas_instance([(40, 0, 50, 10)], [(40, 0, 50, 8)])  # ratio 0.2
    d = canvas_instance([(60, 0, 70, 10)], [(60, 0, 70, 10)])
    pred = prediction_from_masks([a, b, c, d], [0.3, 0.8, 0.8, 0.9])
    graph = occlusion_graph(pred)
    assert graph.edges.shape == (0, 2)
    assert graph.pick_order.tolist() == [3, 2, 1, 0]
    same = prediction_from_masks([a, d], [0.5, 0.5])
    assert occlusion_graph(same).pick_order.tolist() == [0, 1]  # full tie: lower index


def brute_force_overlaps(pred, pad):
    """Overlaps by pasting every crop onto a canvas padded by ``pad`` on each side."""
    height, width = pred.image_size
    n = len(pred)
    vis = np.zeros((n, height + 2 * pad, width + 2 * pad), bool)
    hid = np.zeros_like(vis)
    for i, ((x, y, w, h), crop) in enumerate(zip(pred.rois, pred.crops)):
        vis[i, y + pad:y + pad + h, x + pad:x + pad + w] = crop == 1
        hid[i, y + pad:y + pad + h, x + pad:x + pad + w] = crop == 2
    out = {}
    for a in range(n):
        for b in range(n):
            if a != b:
                count = int((vis[a] & hid[b]).sum())
                if count:
                    out[(a, b)] = count
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_instances_match_brute_force_and_order_is_topological(seed):
    rng = np.random.default_rng(seed)
    size, pad = (60, 80), 30
    n = int(rng.integers(2, 14))
    rois, crops = [], []
    for _ in range(n):
        w, h = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        x, y = int(rng.integers(-20, 75)), int(rng.integers(-20, 55))
        rois.append((x, y, w, h))
        crops.append(rng.choice(np.array([0, 1, 2], np.uint8), size=(h, w), p=[.2, .4, .4]))
    rois = np.asarray(rois, np.int32)
    pred = Prediction(boxes=np.zeros((n, 4), np.float32),
                      scores=rng.random(n).astype(np.float32), labels=np.ones(n, np.int64),
                      class_names=["o"] * n, rois=rois, crops=crops, image_size=size)
    pairs, pixels = pair_overlaps(pred.rois, pred.crops)
    found = dict(zip(map(tuple, pairs.tolist()), pixels.tolist()))
    assert found == brute_force_overlaps(pred, pad)
    graph = occlusion_graph(pred, min_overlap_pixels=3, min_overlap_ratio=0.0)
    assert sorted(graph.pick_order.tolist()) == list(range(n))
    where = positions(graph.pick_order)
    for a, b in graph.edges.tolist():
        assert where[a] < where[b]
        assert graph.layers[b] > graph.layers[a]
    for b in range(n):
        above = graph.occluders_of(b)
        expected = 0 if len(above) == 0 else 1 + graph.layers[above].max()
        assert graph.layers[b] == expected
    # Kept and dropped edges together are the overlaps above the threshold.
    assert graph.has_cycle == (len(graph.dropped_edges) > 0)
    kept_and_dropped = {tuple(e) for e in graph.edges.tolist()} \
        | {tuple(e) for e in graph.dropped_edges.tolist()}
    candidates = {e for e, p in zip(map(tuple, pairs.tolist()), pixels.tolist()) if p >= 3}
    assert kept_and_dropped == candidates
    for (a, b), pix, ratio in zip(graph.edges.tolist(), graph.overlap_pixels,
                                  graph.overlap_ratio):
        assert found[(a, b)] == pix
        assert ratio == pytest.approx(pix / pred.amodal_areas[b], rel=1e-6)


def test_empty_and_single_predictions():
    graph = occlusion_graph(Prediction.empty(IMAGE))
    assert graph.edges.shape == (0, 2) and graph.dropped_edges.shape == (0, 2)
    assert graph.layers.shape == (0,) and graph.pick_order.shape == (0,)
    assert not graph.has_cycle and len(graph) == 0
    one = prediction_from_masks([canvas_instance([(0, 0, 5, 5)], [(0, 0, 5, 3)])], [0.4])
    graph = occlusion_graph(one)
    assert graph.pick_order.tolist() == [0] and graph.layers.tolist() == [0]


@pytest.mark.parametrize("kwargs", [dict(min_overlap_pixels=-1),
                                    dict(min_overlap_pixels=2.5),
                                    dict(min_overlap_pixels=True),
                                    dict(min_overlap_ratio=1.5),
                                    dict(min_overlap_ratio=float("nan")),
                                    dict(min_overlap_ratio=-0.1)])
def test_invalid_thresholds_are_rejected(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        occlusion_graph(Prediction.empty(IMAGE), **kwargs)


# ------------------------------------------------------- against straightforward references
def reference_pair_overlaps(rois, crops):
    """Pair by pair, window by window, in the documented order."""
    out_pairs, out_pixels = [], []
    n = len(crops)
    for a in range(n):
        for b in range(a + 1, n):
            (xa, ya, wa, ha), (xb, yb, wb, hb) = rois[a].tolist(), rois[b].tolist()
            x0, y0 = max(xa, xb), max(ya, yb)
            x1, y1 = min(xa + wa, xb + wb), min(ya + ha, yb + hb)
            if x1 <= x0 or y1 <= y0:
                continue
            win_a = crops[a][y0 - ya:y1 - ya, x0 - xa:x1 - xa]
            win_b = crops[b][y0 - yb:y1 - yb, x0 - xb:x1 - xb]
            for (p, q), count in (((a, b), np.sum((win_a == 1) & (win_b == 2))),
                                  ((b, a), np.sum((win_b == 1) & (win_a == 2)))):
                if count:
                    out_pairs.append((p, q))
                    out_pixels.append(int(count))
    return out_pairs, out_pixels


def reference_break_cycles(edges, pixels, ratios):
    """The definition: while a cycle is left, drop the weakest edge lying on one (an edge
    a -> b lies on a cycle when b reaches a)."""
    alive, dropped = list(range(len(edges))), []

    def reaches(start, goal, live):
        seen, todo = {start}, [start]
        while todo:
            v = todo.pop()
            for k in live:
                a, b = edges[k]
                if a == v and b not in seen:
                    if b == goal:
                        return True
                    seen.add(b)
                    todo.append(b)
        return False

    while True:
        on_cycle = [k for k in alive if reaches(edges[k][1], edges[k][0], alive)]
        if not on_cycle:
            return dropped
        weakest = min(on_cycle, key=lambda k: (pixels[k], ratios[k], edges[k]))
        alive.remove(weakest)
        dropped.append(weakest)


def clustered_prediction(rng, n, size=(90, 120)):
    """``n`` instances crowded into a small region: many overlapping pairs and cycles."""
    height, width = size
    rois, crops = [], []
    for _ in range(n):
        w, h = int(rng.integers(4, 45)), int(rng.integers(4, 45))
        x, y = int(rng.integers(-10, 50)), int(rng.integers(-10, 40))
        rois.append((x, y, w, h))
        crop = rng.choice(np.array([0, 1, 2], np.uint8), size=(h, w), p=[.1, .5, .4])
        rows = (np.arange(h) + y)[:, None]
        cols = (np.arange(w) + x)[None, :]
        outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
        crop[outside & (crop == 1)] = 2  # visible pixels lie inside the image
        crops.append(crop)
    return Prediction(boxes=np.zeros((n, 4), np.float32),
                      scores=rng.random(n).astype(np.float32), labels=np.ones(n, np.int64),
                      class_names=["o"] * n, rois=np.asarray(rois, np.int32), crops=crops,
                      image_size=size)


@pytest.mark.parametrize("seed", range(8))
def test_pair_overlaps_and_cycle_breaking_match_the_references(seed, monkeypatch):
    import orcnn_core.occlusion as occlusion

    rng = np.random.default_rng(100 + seed)
    pred = clustered_prediction(rng, int(rng.integers(2, 25)))
    expected_pairs, expected_pixels = reference_pair_overlaps(pred.rois, pred.crops)
    # Every window gathered (in one batch or several) or sliced one by one, or a mix.
    for batch, loop in ((occlusion.BATCH_PIXELS, occlusion.LOOP_PIXELS), (1 << 30, 1 << 30),
                        (1, 1 << 30), (500, 1 << 30), (1 << 30, 0), (500, 100)):
        monkeypatch.setattr(occlusion, "BATCH_PIXELS", batch)
        monkeypatch.setattr(occlusion, "LOOP_PIXELS", loop)
        pairs, pixels = pair_overlaps(pred.rois, pred.crops)
        assert pairs.dtype == np.int64 and pixels.dtype == np.int64
        assert [tuple(p) for p in pairs.tolist()] == expected_pairs
        assert pixels.tolist() == expected_pixels

    graph = occlusion_graph(pred, min_overlap_pixels=1, min_overlap_ratio=0.0)
    amodal = pred.amodal_areas
    ratios = [np.float32(p / max(amodal[b], 1)) for (_, b), p in
              zip(expected_pairs, expected_pixels)]
    dropped = reference_break_cycles(expected_pairs, expected_pixels, ratios)
    assert graph.dropped_edges.tolist() == [list(expected_pairs[k]) for k in dropped]
    kept = sorted(set(range(len(expected_pairs))) - set(dropped),
                  key=lambda k: expected_pairs[k])
    assert graph.edges.tolist() == [list(expected_pairs[k]) for k in kept]
    assert graph.overlap_pixels.tolist() == [expected_pixels[k] for k in kept]
    assert graph.has_cycle == bool(dropped)


def test_crowded_scenes_have_cycles_to_break():
    # The reference comparison above must see cycles, or it would check little.
    rng = np.random.default_rng(7)
    graphs = [occlusion_graph(clustered_prediction(rng, 20), 1, 0.0) for _ in range(3)]
    assert all(g.has_cycle and len(g.dropped_edges) >= 3 for g in graphs)


def test_a_crop_that_does_not_fit_its_roi_is_rejected():
    pred = prediction_from_masks([canvas_instance([(0, 0, 10, 10)], [(0, 0, 10, 5)]),
                                  canvas_instance([(5, 5, 20, 20)], [(5, 5, 20, 20)])],
                                 [0.5, 0.5])
    crops = [pred.crops[0], pred.crops[1][:, :-1]]
    with pytest.raises(InputError, match=r"crops\[1\]: shape \(15, 14\)"):
        pair_overlaps(pred.rois, crops)
    with pytest.raises(InputError, match="1 crops for 2 rois"):
        pair_overlaps(pred.rois, crops[:1])


def test_labels_other_than_visible_and_hidden_count_as_background(monkeypatch):
    import orcnn_core.occlusion as occlusion

    rng = np.random.default_rng(3)
    pred = clustered_prediction(rng, 12)
    expected = pair_overlaps(pred.rois, pred.crops)
    assert len(expected[0]) > 5
    for dtype, junk in ((np.uint8, 7), (np.int16, -1), (np.int64, 3)):
        crops = []
        for crop in pred.crops:
            noisy = crop.astype(dtype)
            noisy[(crop == 0) & (rng.random(crop.shape) < 0.5)] = junk
            crops.append(noisy)
        for loop in (0, 1 << 30):  # sliced and gathered
            monkeypatch.setattr(occlusion, "LOOP_PIXELS", loop)
            pairs, pixels = pair_overlaps(pred.rois, crops)
            assert np.array_equal(pairs, expected[0]) and np.array_equal(pixels, expected[1])
