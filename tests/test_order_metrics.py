"""Scoring the published graph and pick order (orcnn_core.order_metrics) on hand-made cases."""

import numpy as np
import pytest

from orcnn_core import masks
from orcnn_core.order_metrics import (
    MIN_IOU,
    ImageOrder,
    OrderCounts,
    encode_masks,
    graph_order,
    image_counts,
    match_by_amodal_iou,
    prediction_from_masks,
    shown_relations,
    summarize,
)

SHAPE = (10, 40)


def columns(c0, c1, shape=SHAPE):
    """RLE of a full-height band of columns c0..c1: the IoU of two bands is the ratio of
    their column overlap to their column union."""
    mask = np.zeros(shape, np.uint8)
    mask[:, c0:c1] = 1
    return masks.encode(mask)


# ----------------------------------------------------------------------------------------
# Matching detections to ground-truth objects


def test_matching_is_greedy_by_score_and_takes_each_object_once():
    assert MIN_IOU == 0.5
    gts = [columns(0, 10), columns(4, 14)]
    exact0 = columns(0, 10)   # IoU 1 with GT 0, 6/14 with GT 1
    between = columns(3, 13)  # IoU 7/13 = 0.54 with GT 0, 9/11 = 0.82 with GT 1
    exact1 = columns(4, 14)   # IoU 6/14 with GT 0, 1 with GT 1
    # Highest score first: exact1 takes GT 1; between's best object is taken, it takes GT 0
    # (0.54 >= 0.5); exact0 fits GT 0 best but comes last and finds it taken.
    match = match_by_amodal_iou(gts, [exact0, between, exact1], [0.7, 0.8, 0.9])
    assert match.dtype == np.int64 and match.tolist() == [-1, 0, 1]
    # Without exact1, between takes its best object, GT 1, and exact0 gets GT 0.
    assert match_by_amodal_iou(gts, [exact0, between], [0.7, 0.8]).tolist() == [0, 1]
    # The scores decide, not the list order.
    assert match_by_amodal_iou(gts, [exact1, between, exact0],
                               [0.9, 0.8, 0.7]).tolist() == [1, 0, -1]


def test_matching_threshold_ties_and_empty_inputs():
    gt = [columns(0, 10)]
    assert match_by_amodal_iou(gt, [columns(0, 5)], [0.5]).tolist() == [0]    # IoU 0.5
    assert match_by_amodal_iou(gt, [columns(0, 4)], [0.5]).tolist() == [-1]   # IoU 0.4
    assert match_by_amodal_iou(gt, [columns(5, 15)], [0.5]).tolist() == [-1]  # IoU 1/3
    assert match_by_amodal_iou(gt, [columns(20, 30)], [0.5]).tolist() == [-1]  # apart
    # Equal scores: the earlier detection first.
    assert match_by_amodal_iou(gt, [columns(0, 10)] * 2, [0.5, 0.5]).tolist() == [0, -1]
    assert match_by_amodal_iou([], [columns(0, 10)] * 2, [0.5, 0.6]).tolist() == [-1, -1]
    none = match_by_amodal_iou(gt, [], [])
    assert none.shape == (0,) and none.dtype == np.int64


# ----------------------------------------------------------------------------------------
# Counts of one image

#: Ground-truth objects 0..4: 0 lies on 1 and on 3, 1 on 2, 3 on 2, 4 on 1. The masks show
#: (0, 1), (1, 2) and (3, 2), not (0, 3) (their overlap hidden under something else);
#: (2, 0) is no relation and must be ignored though listed as shown.
RELATIONS = [(0, 1), (1, 2), (3, 2), (0, 3), (4, 1)]
SHOWN = [(0, 1), (1, 2), (3, 2), (2, 0)]
#: Detections 0..3 are objects 0..3, detection 4 matches nothing; object 4 is missed.
MATCH = np.array([0, 1, 2, 3, -1])
#: Published: 0 on 1 (right), 2 on 1 (the wrong way round), 3 on 2 (right), 0 on 3 (right,
#: not shown), 4 on 2 (an unmatched detection: not judged). 1 on 2 is missed.
EDGES = np.array([[0, 1], [2, 1], [3, 2], [0, 3], [4, 2]])


def scene_counts(pick_order):
    return image_counts(ImageOrder(EDGES, np.asarray(pick_order)), MATCH, RELATIONS, SHOWN)


def test_image_counts_edges_relations_and_pairs():
    counts = scene_counts([0, 3, 1, 2, 4])
    assert counts.images == 1
    # Judged edges: (0, 1), (2, 1), (3, 2), (0, 3); right: all but (2, 1).
    assert (counts.edges_judged, counts.edges_right) == (4, 3)
    # Relations between matched objects: all but (4, 1); found: all but (1, 2).
    assert (counts.relations, counts.relations_found) == (4, 3)
    # Of those the masks show, (0, 1), (1, 2), (3, 2), two were published; (0, 3) is not
    # shown.
    assert (counts.pairs, counts.pairs_right, counts.pairs_not_shown) == (3, 2, 1)
    # An edge listed twice is one edge.
    twice = image_counts(ImageOrder(np.concatenate([EDGES, EDGES[:1]]), np.arange(5)),
                         MATCH, RELATIONS, SHOWN)
    assert (twice.edges_judged, twice.edges_right) == (4, 3)


@pytest.mark.parametrize("order, first_free, picks_free", [
    # 4 matches nothing: not free. 0: nothing lies on it. 3: only 0 lies on it, picked.
    ([4, 0, 3, 1, 2], 0, 2),
    # 3 while 0 still lies on it; 0 free; 2 while 1 still lies on it.
    ([3, 0, 2, 1, 4], 0, 1),
    # 0 free, then 3 (0 gone) free; 1 never is: object 4 lies on it and was not detected.
    ([0, 3, 1, 2, 4], 1, 2),
])
def test_image_counts_first_picks_remove_what_was_picked(order, first_free, picks_free):
    counts = scene_counts(order)
    assert counts.first_free == first_free
    assert (counts.picks, counts.picks_free) == (3, picks_free)


def test_image_counts_with_few_or_no_detections():
    # Two detections, no relations: two picks scored; the unmatched one is not free.
    two = image_counts(ImageOrder(np.zeros((0, 2)), np.array([0, 1])), np.array([0, -1]),
                       [], [])
    assert (two.first_free, two.picks, two.picks_free) == (1, 2, 1)
    assert (two.edges_judged, two.relations, two.pairs) == (0, 0, 0)
    # No detections: the image counts, its first pick is a miss, nothing else is judged.
    empty = image_counts(ImageOrder(np.zeros((0, 2)), np.zeros(0, np.int64)),
                         np.zeros(0, np.int64), [(0, 1)], [(0, 1)])
    assert (empty.images, empty.first_free, empty.picks, empty.relations) == (1, 0, 0, 0)


def test_summarize_ratios_and_no_data():
    total = OrderCounts()
    total.add(scene_counts([0, 3, 1, 2, 4]))
    figures = summarize(total)
    assert figures == {
        "edge_precision": 3 / 4, "edge_recall": 3 / 4, "pair_accuracy": 2 / 3,
        "first_pick_free": 1.0, "first3_free": 2 / 3, "images": 1, "edges_judged": 4,
        "relations": 4, "pairs": 3, "pairs_not_shown": 1, "picks": 3}
    # A second image without detections: one more image whose first pick is a miss.
    total.add(image_counts(ImageOrder(np.zeros((0, 2)), np.zeros(0, np.int64)),
                           np.zeros(0, np.int64), [], []))
    figures = summarize(total)
    assert figures["images"] == 2 and figures["first_pick_free"] == 0.5
    assert figures["first3_free"] == 2 / 3 and figures["edge_precision"] == 3 / 4
    # Nothing to score: -1 for every ratio.
    nothing = summarize(OrderCounts())
    for name in ("edge_precision", "edge_recall", "pair_accuracy", "first_pick_free",
                 "first3_free"):
        assert nothing[name] == -1.0
    assert nothing["images"] == 0 and nothing["picks"] == 0
    # Counts without judged edges or relations but with images and picks.
    only_picks = summarize(image_counts(ImageOrder(np.zeros((0, 2)), np.array([0])),
                                        np.array([0]), [], []))
    assert only_picks["edge_precision"] == only_picks["edge_recall"] == -1.0
    assert only_picks["pair_accuracy"] == -1.0
    assert only_picks["first_pick_free"] == only_picks["first3_free"] == 1.0


# ----------------------------------------------------------------------------------------
# Full masks through the node's rule


def test_prediction_from_masks_makes_tight_label_crops():
    shape = (12, 16)
    amodal = np.zeros((3, *shape), bool)
    visible = np.zeros((3, *shape), bool)
    amodal[0, 2:5, 3:7] = True                  # 3 x 4 at (x 3, y 2)
    visible[0, 2:5, 3:6] = True                 # column x = 6 hidden
    visible[0, 0, 0] = True                     # visible outside the amodal mask: ignored
    amodal[2, 6:8, 10:12] = amodal[2, 8:11, 10] = True   # an L: 5 rows, 2 columns
    visible[2] = amodal[2]
    visible[2, 10, 11] = True                   # in the L's box, outside the L: ignored
    pred = prediction_from_masks(amodal, visible)
    assert pred.rois.dtype == np.int64
    assert pred.rois.tolist() == [[3, 2, 4, 3], [0, 0, 1, 1], [10, 6, 2, 5]]
    assert pred.crops[0].dtype == np.uint8
    assert pred.crops[0].tolist() == [[1, 1, 1, 2]] * 3
    assert pred.crops[1].tolist() == [[0]]      # empty amodal mask: one background pixel
    assert pred.crops[2].tolist() == [[1, 1], [1, 1], [1, 0], [1, 0], [1, 0]]
    assert pred.amodal_areas.tolist() == [12, 0, 7]
    assert pred.scores.dtype == np.float32 and pred.scores.tolist() == [1, 1, 1]
    assert pred.probs is None
    scored = prediction_from_masks(amodal, visible, [0.25, 0.5, 0.75])
    assert scored.scores.dtype == np.float32 and scored.scores.tolist() == [0.25, 0.5, 0.75]


def test_graph_order_and_shown_relations_of_stacked_masks():
    # Object 1 lies on object 0 (a 4 x 4 overlap); object 2 lies apart, fully visible;
    # 2 is listed as lying on 0 too, which the masks cannot show.
    shape = (20, 30)
    amodal = np.zeros((3, *shape), bool)
    amodal[0, 2:10, 2:10] = True
    amodal[1, 6:14, 6:14] = True
    amodal[2, 0:5, 20:25] = True
    visible = amodal.copy()
    visible[0, 6:10, 6:10] = False
    order = graph_order(prediction_from_masks(amodal, visible, [0.9, 0.5, 0.7]))
    assert order.edges.tolist() == [[1, 0]]
    # Nothing lies on 1 or 2 (both free with probability 1): the higher score first; 0
    # last, under 1.
    assert order.pick_order.tolist() == [2, 1, 0]
    assert shown_relations([(1, 0), (2, 0), (0, 1)], amodal, visible) == [(1, 0)]
    rles = encode_masks(amodal)
    assert [masks.decode(r).astype(bool).tolist() for r in rles] == \
        [m.tolist() for m in amodal]
