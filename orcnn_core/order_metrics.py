"""How well the published occlusion graph and pick order answer "what can I pick now?".

Scores exactly what the perception node publishes: the graph and pick order of
:func:`orcnn_core.occlusion.occlusion_graph`, against the ground truth's "lies on"
relations. Per image the detections are matched to ground-truth objects by amodal mask
IoU >= :data:`MIN_IOU` (greedy, highest score first, each object matched once, classes not
compared: a robot picks objects, whatever their label). Figures (docs/evaluation.md):

* ``edge_precision``: of the published edges between two matched detections, the share
  whose objects the ground truth relates in that direction;
* ``edge_recall``: of the ground-truth relations between two matched objects, the share
  published as an edge in that direction;
* ``pair_accuracy``: the same on the relations the ground-truth masks show (the upper
  object's visible part covers some of the lower one's hidden part): those a single image
  can reveal; ``pairs_not_shown`` counts the others;
* ``first_pick_free``: share of images whose first pick is a matched object that no
  ground-truth object lies on (on the full canvas, truncated objects included; an image
  without detections counts as a miss);
* ``first3_free``: share of the first three picks that were free when picked, removing
  the picked objects as the robot would (a pick matching nothing is not free).

Pure functions over numpy arrays and RLE masks; no model, no files.
"""

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from orcnn_core.masks import encode
from orcnn_core.occlusion import occlusion_graph
from orcnn_core.prediction import VISIBLE

__all__ = ["MIN_IOU", "ImageOrder", "OrderCounts", "match_by_amodal_iou", "image_counts",
           "summarize", "prediction_from_masks", "prediction_from_crops", "graph_order",
           "shown_relations", "encode_masks"]

#: Amodal mask IoU at which a detection is the ground-truth object it overlaps.
MIN_IOU = 0.5
#: Picks per image scored by ``first3_free``.
PICKS = 3


@dataclass
class ImageOrder:
    """What was published for one image: ``edges`` int [E, 2] (occluder, occludee)
    detection indices and ``pick_order`` int [N] (first = pick first)."""

    edges: np.ndarray
    pick_order: np.ndarray


@dataclass
class OrderCounts:
    """Counts behind the figures of :func:`summarize`, summed over images."""

    images: int = 0
    edges_judged: int = 0
    edges_right: int = 0
    relations: int = 0
    relations_found: int = 0
    pairs: int = 0
    pairs_right: int = 0
    pairs_not_shown: int = 0
    first_free: int = 0
    picks: int = 0
    picks_free: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, other: "OrderCounts") -> None:
        for name in self.__dataclass_fields__:
            if name != "extra":
                setattr(self, name, getattr(self, name) + getattr(other, name))


def match_by_amodal_iou(gt_rles: list, pred_rles: list, scores) -> np.ndarray:
    """int64 [P]: the ground-truth index each detection matches, -1 for none.

    Greedy by descending score: a detection takes the unmatched ground truth of highest
    amodal IoU when that IoU is >= :data:`MIN_IOU`.
    """
    match = np.full(len(pred_rles), -1, np.int64)
    if not gt_rles or not pred_rles:
        return match
    iou = np.asarray(mask_utils.iou(list(pred_rles), list(gt_rles),
                                    [0] * len(gt_rles))).reshape(len(pred_rles), -1)
    taken = np.zeros(len(gt_rles), bool)
    for p in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        candidates = np.where(taken, -1.0, iou[p])
        best = int(np.argmax(candidates))
        if candidates[best] >= MIN_IOU:
            match[p] = best
            taken[best] = True
    return match


def image_counts(order: ImageOrder, match: np.ndarray, relations, shown) -> OrderCounts:
    """The counts of one image.

    ``order``: what was published; ``match`` int [N]: ground-truth index of each detection
    or -1 (:func:`match_by_amodal_iou`); ``relations``: ground-truth pairs (upper, lower);
    ``shown``: the subset of ``relations`` the ground-truth masks show.
    """
    relations = {tuple(int(v) for v in r) for r in relations}
    shown = {tuple(int(v) for v in r) for r in shown} & relations
    counts = OrderCounts(images=1)
    published = set()
    for a, b in np.asarray(order.edges, np.int64).reshape(-1, 2).tolist():
        ga, gb = int(match[a]), int(match[b])
        if ga >= 0 and gb >= 0 and ga != gb:
            published.add((ga, gb))
    counts.edges_judged = len(published)
    counts.edges_right = len(published & relations)
    matched = set(match[match >= 0].tolist())
    judged = {r for r in relations if r[0] in matched and r[1] in matched}
    counts.relations, counts.relations_found = len(judged), len(judged & published)
    counts.pairs = len(judged & shown)
    counts.pairs_right = len(judged & shown & published)
    counts.pairs_not_shown = len(judged - shown)
    _count_picks(counts, order.pick_order, match, relations)
    return counts


def _count_picks(counts: OrderCounts, pick_order, match, relations: set) -> None:
    """First-pick and first-three figures: a pick is free when it matches an object all of
    whose ground-truth occluders were picked before it."""
    on_top = {}
    for upper, lower in relations:
        on_top.setdefault(lower, set()).add(upper)
    removed = set()
    for rank, detection in enumerate(list(pick_order)[:PICKS]):
        target = int(match[detection])
        free = target >= 0 and target not in removed \
            and on_top.get(target, set()) <= removed
        counts.picks += 1
        counts.picks_free += int(free)
        if rank == 0:
            counts.first_free = int(free)
        if target >= 0:
            removed.add(target)


def summarize(counts: OrderCounts) -> dict:
    """The figures of the module doc (-1 where there is nothing to score) and the counts."""
    def ratio(num, den):
        return num / den if den else -1.0

    return {
        "edge_precision": ratio(counts.edges_right, counts.edges_judged),
        "edge_recall": ratio(counts.relations_found, counts.relations),
        "pair_accuracy": ratio(counts.pairs_right, counts.pairs),
        "first_pick_free": ratio(counts.first_free, counts.images),
        "first3_free": ratio(counts.picks_free, counts.picks),
        "images": counts.images, "edges_judged": counts.edges_judged,
        "relations": counts.relations, "pairs": counts.pairs,
        "pairs_not_shown": counts.pairs_not_shown, "picks": counts.picks,
    }


def prediction_from_masks(amodal: np.ndarray, visible: np.ndarray, scores=None):
    """A prediction-like object (rois, label crops, scores, amodal areas) of full masks,
    bool [N, H, W] each, for :func:`~orcnn_core.occlusion.occlusion_graph`: how the
    ground-truth masks are fed through the node's own rule."""
    rois, amodal_crops, visible_crops = [], [], []
    for a, v in zip(amodal, visible):
        ys, xs = np.nonzero(a)
        if not len(ys):
            rois.append(None)
            amodal_crops.append(None)
            visible_crops.append(None)
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        rois.append((x0, y0, x1 - x0, y1 - y0))
        amodal_crops.append(a[y0:y1, x0:x1])
        visible_crops.append(v[y0:y1, x0:x1])
    return prediction_from_crops(rois, amodal_crops, visible_crops, scores)


def prediction_from_crops(rois, amodal_crops, visible_crops, scores=None):
    """:func:`prediction_from_masks` of masks given as crops over their amodal boxes
    (``rois`` [x, y, w, h] each, or None with None crops for an empty mask), so that no
    full-canvas mask is needed."""
    n = len(rois)
    boxes = np.zeros((n, 4), np.int64)
    crops = []
    for i, (roi, a, v) in enumerate(zip(rois, amodal_crops, visible_crops)):
        if roi is None:
            boxes[i] = (0, 0, 1, 1)
            crops.append(np.zeros((1, 1), np.uint8))
            continue
        boxes[i] = roi
        a = np.asarray(a, bool)
        v = np.asarray(v, bool) & a
        # VISIBLE (1) on every amodal pixel, one more where it is hidden: HIDDEN (2).
        crops.append(a.astype(np.uint8) * VISIBLE + (a & ~v).astype(np.uint8))
    return _MaskPrediction(boxes, crops, np.ones(n, np.float32) if scores is None
                           else np.asarray(scores, np.float32))


@dataclass
class _MaskPrediction:
    rois: np.ndarray
    crops: list
    scores: np.ndarray
    probs: list = None

    @property
    def amodal_areas(self) -> np.ndarray:
        return np.asarray([np.count_nonzero(c) for c in self.crops], np.int64)


def graph_order(prediction) -> ImageOrder:
    """The published order of a prediction-like object, by the node's own rule."""
    graph = occlusion_graph(prediction)
    return ImageOrder(graph.edges, graph.pick_order)


def shown_relations(relations, amodal: np.ndarray, visible: np.ndarray) -> list:
    """The relations (upper, lower) whose masks show them: the upper object's visible part
    covers some of the lower one's hidden part."""
    hidden = amodal & ~visible
    return [(a, b) for a, b in relations if np.any(visible[a] & hidden[b])]


def encode_masks(masks: np.ndarray) -> list:
    """COCO RLEs of masks [N, H, W]."""
    return [encode(np.asarray(m, np.uint8)) for m in masks]
