"""Amodal instance segmentation metrics (Follmann et al. 2019, section 3.3).

``AP_A`` and ``AP_V`` are COCO mask AP on amodal resp. visible masks; ``AP_AV`` counts a
detection as a true positive at IoU threshold t only when amodal *and* visible IoU with the
same ground truth reach t. The *occluded* evaluation ignores non-occluded ground truths as
COCO ignores ground truths (the COCOA amodal API's rule, the default; ``"paper"`` also
ignores the detections meant for them: amodal IoU >= 0.5 with one, and higher than with any
occluded ground truth of the class), and adds ``AP_IV50`` (invisible-mask AP at IoU 0.5).
On top: occlusion-order accuracy of matched pairs and a breakdown by occlusion level,
truncation and object size. docs/evaluation.md defines every figure; all AP values are
fractions in [0, 1], -1 where undefined (no ground truth).

COCO matching (crowd regions, area ranges, 100 detections, 101-point interpolated
precision) is pycocotools' own: :class:`_MatrixEval` feeds ``COCOeval`` precomputed IoU
matrices, so ``AP_A``/``AP_V`` equal pycocotools' segm AP on the same masks.

The ground truth is read by orcnn_core.data (any layout it reads, checked there); this
module checks only the predictions.
"""

import contextlib
import io
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.cocoeval import COCOeval

from orcnn_core import masks
from orcnn_core.data import (
    AmodalDataset,
    ImageRecord,
    InstanceRecord,
    check_bbox,
    covered,
    derive_relations,
    load_json,
    parse_dataset,
    require,
    require_int,
    require_list,
)
from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_json, check_not_an_input, check_regular_file
from orcnn_core.imageio import check_output_file
from orcnn_core.order_metrics import (ImageOrder, OrderCounts, graph_order, image_counts,
                                      match_by_amodal_iou, prediction_from_crops, summarize)

#: Detections with amodal IoU >= this with an ignored ground truth are ignored (paper 3.3).
IGNORE_IOU = 0.5
#: Amodal IoU at which detections are matched to ground truths for the occlusion order.
ORDER_IOU = 0.5
#: Occlusion levels by occlusion rate r = |amodal AND NOT visible| / |amodal|:
#: none r = 0, partial 0 < r < HEAVY_OCCLUSION, heavy r >= HEAVY_OCCLUSION.
HEAVY_OCCLUSION = 0.5
MASK_KINDS = ("AV", "A", "V")
#: Rules for the detections of ignored ground truths in the occluded evaluation and the
#: breakdown groups: "reference" (COCO's: a detection matched to an ignored ground truth
#: is ignored, as the COCOA amodal API does; the default) or "paper" (Follmann et al.
#: 2019, 3.3: also every detection with amodal IoU >= IGNORE_IOU with one, see
#: docs/evaluation.md).
OCCLUDED_RULES = ("reference", "paper")


# ----------------------------------------------------------------------------------------
# The inputs: ground truth from orcnn_core.data's reader, predictions checked here


class _Instance:
    """One ground truth or detection with its masks on the image's padded canvas."""

    __slots__ = ("uid", "image_id", "category_id", "score", "iscrowd", "ignore", "amodal",
                 "visible", "invisible", "has_visible", "area", "rate", "truncated", "order")

    def __init__(self, uid, image_id, category_id, amodal, visible, invisible, score=1.0,
                 iscrowd=0, ignore=False):
        self.uid = uid                  # 1.. (COCOeval reads id 0 as "unmatched")
        self.image_id = image_id
        self.category_id = category_id
        self.score = score
        self.iscrowd = iscrowd
        self.ignore = ignore            # ground truth flagged "ignore" (KINS)
        self.amodal = amodal
        self.visible = visible or amodal
        self.has_visible = visible is not None
        self.invisible = invisible      # None: amodal AND NOT visible, computed when needed
        self.area = float(mask_utils.area(amodal))
        self.rate = 0.0                 # occlusion rate (ground truth only)
        self.truncated = False          # amodal mask reaches the padding (ground truth only)
        self.order = None               # the published order entry (detections only)

    @property
    def counted(self) -> bool:
        """A ground truth to be found: not a crowd region, not flagged ignore."""
        return not (self.iscrowd or self.ignore)


def _ground_truth(gt, name: str, fmt: str = "auto", annotators: str = "first"):
    """The data set of ``gt``: a parsed annotation file in any layout orcnn_core.data reads
    (images need no ``file_name``: none is read), or an :class:`AmodalDataset` as is."""
    if isinstance(gt, AmodalDataset):
        return gt
    return parse_dataset(gt, name, fmt, need_file_names=False, annotators=annotators)


def _gt_instances(dataset: AmodalDataset):
    """Ground-truth instances (uids 1.., crowd regions included), relations (set of
    (occluder uid, occludee uid)) and where these come from: "annotations" (stated by the
    file) or "masks" (derived from the masks, by orcnn_core.data.derive_relations, when
    the file states none or was written with derived ones)."""
    category_ids = [c["id"] for c in dataset.categories]
    instances, relations = [], set()
    for image in dataset.records:
        inside = _image_area(image)
        first = len(instances) + 1
        for k, record in enumerate(image.instances):
            instances.append(_gt_instance(record, image, first + k,
                                          category_ids[record.label - 1], inside))
        pairs = image.relations if dataset.relations_given else derive_relations(image)
        relations.update((first + upper, first + lower) for upper, lower in pairs)
    source = "annotations" if dataset.relations_source == "given" else "masks"
    return instances, relations, source


def _canvas(image: ImageRecord):
    pad = image.padding
    return image.height + 2 * pad, image.width + 2 * pad


def _image_area(image: ImageRecord):
    """RLE of the image inside its padded canvas (None without padding)."""
    pad = image.padding
    if pad == 0:
        return None
    height, width = _canvas(image)
    box = np.array([[pad, pad, image.width, image.height]], np.float64)
    rle = mask_utils.frPyObjects(box, height, width)[0]
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _gt_instance(record: InstanceRecord, image: ImageRecord, uid: int, category_id: int,
                 inside) -> _Instance:
    """Occlusion rate and truncation of one ground truth (``inside``: the image area on the
    canvas, see :func:`_image_area`)."""
    inst = _Instance(uid, image.image_id, category_id, record.amodal, record.visible,
                     record.invisible, iscrowd=int(record.iscrowd), ignore=record.ignore)
    if record.occlude_rate is not None:
        inst.rate = record.occlude_rate
    elif inst.area > 0:
        both = mask_utils.merge([inst.amodal, inst.visible], intersect=True)
        inst.rate = (inst.area - float(mask_utils.area(both))) / inst.area
    if inside is not None and inst.area > 0:
        kept = mask_utils.merge([inst.amodal, inside], intersect=True)
        inst.truncated = float(mask_utils.area(kept)) < inst.area
    return inst


def _prediction_rle(segm, image: ImageRecord, where: str) -> dict:
    """Canvas RLE of a predicted mask that is image-sized or canvas-sized."""
    height, width = _canvas(image)
    pad = image.padding
    size = masks.rle_size(segm, where)
    if size is not None and pad > 0 and size == (image.height, image.width):
        rle = masks.to_rle(segm, size[0], size[1], where)
        return masks.encode(masks.pad_mask(masks.decode(rle), pad))
    if size is not None and size != (height, width):
        raise InputError(f"{where}: RLE size {list(size)} disagrees with image "
                         f"{image.image_id} ([{image.height}, {image.width}] or its padded "
                         f"canvas [{height}, {width}])")
    return masks.to_rle(segm, height, width, where, polygon_offset=pad)


def _read_predictions(predictions, images: dict, categories, name: str):
    """Detection instances of a COCO results list, checked against the ground truth
    (``images``: image id -> :class:`ImageRecord`)."""
    if not isinstance(predictions, list):
        raise InputError(f"{name}: predictions must be a JSON list of results")
    categories = set(categories)
    detections = []
    for index, pred in enumerate(predictions):
        where = f"{name}: prediction #{index}"
        image_id = require_int(pred, "image_id", where)
        where = f"{name}: prediction #{index} (image_id {image_id})"
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in the ground truth")
        category_id = require_int(pred, "category_id", where)
        if category_id not in categories:
            raise InputError(f"{where}: category_id {category_id} is not in the ground truth")
        score = require(pred, "score", where)
        if not masks.is_number(score):
            raise InputError(f"{where}: 'score' must be a finite number, got "
                             f"{masks.short_repr(score)}")
        if pred.get("bbox") is not None:  # segm evaluation does not use it: only checked
            check_bbox(pred["bbox"], f"{where}: bbox")
        image = images[image_id]
        amodal = _prediction_rle(require(pred, "segmentation", where), image,
                                 f"{where}: segmentation")
        visible = invisible = None
        if pred.get("visible_mask") is not None:
            visible = _prediction_rle(pred["visible_mask"], image, f"{where}: visible_mask")
        if pred.get("invisible_mask") is not None:
            invisible = _prediction_rle(pred["invisible_mask"], image,
                                        f"{where}: invisible_mask")
        detection = _Instance(len(detections) + 1, image_id, category_id, amodal, visible,
                              invisible, score=float(score))
        if pred.get("order") is not None:
            detection.order = _read_order(pred["order"], f"{where}: order")
        detections.append(detection)
    return detections


def _check_orders(found: list) -> None:
    """The ``order`` entries of one image's detections must describe one graph: every
    detection has one, indices and pick ranks are each a permutation of 0..n-1, and
    ``lies_on`` names other detections of the image."""
    where = f"predictions of image {found[0].image_id}: order"
    if any(d.order is None for d in found):
        raise InputError(f"{where}: given for some detections only (all or none)")
    everyone = list(range(len(found)))
    for k, name in ((0, "index"), (1, "pick_rank")):
        if sorted(d.order[k] for d in found) != everyone:
            raise InputError(f"{where}: the {name} values must be 0..{len(found) - 1}, each "
                             f"once")
    for d in found:
        if any(j == d.order[0] or not 0 <= j < len(found) for j in d.order[2]):
            raise InputError(f"{where}: lies_on of index {d.order[0]} names {d.order[2]}, "
                             f"not other detections of the image")


def _read_order(order, where: str) -> tuple:
    """(index, pick rank, [occludee index, ...]) of a result's ``order`` entry."""
    if not isinstance(order, dict):
        raise InputError(f"{where}: must be an object with index, pick_rank and lies_on")
    index = require_int(order, "index", where)
    rank = require_int(order, "pick_rank", where)
    lies_on = require_list(order, "lies_on", where)
    below = []
    for k, item in enumerate(lies_on):
        if not isinstance(item, list) or len(item) != 2 or isinstance(item[0], bool) \
                or not isinstance(item[0], int) or not masks.is_number(item[1]) \
                or not 0 <= item[1] <= 1:
            raise InputError(f"{where}: lies_on[{k}] must be [instance index, confidence in "
                             f"[0, 1]], got {masks.short_repr(item)}")
        below.append(item[0])
    return index, rank, below


# ----------------------------------------------------------------------------------------
# COCO evaluation on precomputed IoU matrices


def _invisible(inst: _Instance) -> dict:
    """Invisible mask: the given one, else amodal AND NOT visible (computed once, on the
    RLEs)."""
    if inst.invisible is None:
        inst.invisible = masks.rle_difference(inst.amodal, inst.visible)
    return inst.invisible


def _iou(dets: list, gts: list, crowd: list) -> np.ndarray:
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou(dets, gts, crowd), dtype=float)


class _MatrixEval(COCOeval):
    """``COCOeval`` ('segm', useCats) on given instances and full IoU matrices.

    ``gts``/``dts`` map (image id, category id) to records ``{"id", "area", "iscrowd",
    "ignore"}`` resp. ``{"id", "area", "score"}``; ``ious`` maps the same keys to a
    len(dts) x len(gts) matrix in list order. Detections in ``ignored_dets`` (ids) never
    match and are ignored at every IoU threshold; all else is COCOeval's own code.
    """

    def __init__(self, gts, dts, ious, image_ids, category_ids, iou_thresholds=None,
                 all_area_ranges=True, ignored_dets=frozenset()):
        super().__init__(iouType="segm")
        self._given = (gts, dts, ious)
        self._ignored_dets = ignored_dets
        params = self.params
        params.imgIds = list(image_ids)
        params.catIds = list(category_ids)
        if iou_thresholds is not None:
            params.iouThrs = np.asarray(iou_thresholds, dtype=float)
        if not all_area_ranges:
            params.areaRng, params.areaRngLbl = params.areaRng[:1], params.areaRngLbl[:1]

    def _prepare(self):
        gts, dts, _ = self._given
        self._gts = defaultdict(list, {key: [dict(g) for g in value]
                                       for key, value in gts.items()})
        self._dts = defaultdict(list, {key: [dict(d) for d in value]
                                       for key, value in dts.items()})
        self.evalImgs = defaultdict(list)
        self.eval = {}

    def computeIoU(self, imgId, catId):
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gts or not dts:
            return []
        ious = np.array(self._given[2][imgId, catId], dtype=float)
        for row, det in enumerate(dts):
            if det["id"] in self._ignored_dets:
                ious[row] = -1.0
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        return ious[order[:self.params.maxDets[-1]]]

    def evaluateImg(self, imgId, catId, aRng, maxDet):
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is not None and self._ignored_dets:
            ignored = [det_id in self._ignored_dets for det_id in result["dtIds"]]
            result["dtIgnore"][:, np.array(ignored, dtype=bool)] = True
        return result

    def run(self):
        """evaluate() and accumulate(), without COCOeval's progress printing."""
        with contextlib.redirect_stdout(io.StringIO()):
            self.evaluate()
            self.accumulate()
        return self


def _ap(run: _MatrixEval, iou=None, area_index=0) -> float:
    """COCOeval.summarize's AP (maxDets 100): mean precision over categories with GT."""
    params = run.params
    precision = run.eval["precision"]
    if iou is not None:
        precision = precision[np.isclose(params.iouThrs, iou)]
    values = precision[:, :, :, area_index, -1]
    values = values[values > -1]
    return float(np.mean(values)) if values.size else -1.0


def _ap_triplet(run: _MatrixEval, kind: str, area_index=0) -> dict:
    return {f"AP_{kind}": _ap(run, None, area_index), f"AP50_{kind}": _ap(run, 0.5, area_index),
            f"AP75_{kind}": _ap(run, 0.75, area_index)}


class _Evaluator:
    """Ground truths and detections grouped per (image, category), IoUs computed once."""

    def __init__(self, images, categories, gts, dets, occluded_rule="reference"):
        self.images = images
        self.categories = categories
        self.rule = occluded_rule
        self.gts = defaultdict(list)
        self.dets = defaultdict(list)
        for inst in gts:
            self.gts[inst.image_id, inst.category_id].append(inst)
        for inst in dets:
            self.dets[inst.image_id, inst.category_id].append(inst)
        self.ious = {"A": {}, "V": {}, "AV": {}}
        for key in set(self.gts) | set(self.dets):
            g, d = self.gts[key], self.dets[key]
            crowd = [inst.iscrowd for inst in g]
            amodal = _iou([x.amodal for x in d], [x.amodal for x in g], crowd)
            visible = _iou([x.visible for x in d], [x.visible for x in g], crowd)
            self.ious["A"][key], self.ious["V"][key] = amodal, visible
            self.ious["AV"][key] = np.minimum(amodal, visible)    # both IoUs reach t

    def invisible_ious(self, occluded) -> dict:
        """IoUs of invisible masks; only pairs with an ``occluded`` GT need the masks (the
        others' invisible masks are empty: IoU 0)."""
        ious = {}
        for key, g in self.gts.items():     # holds every key (defaultdict, see __init__)
            d = self.dets[key]
            if d and any(occluded(inst) for inst in g):
                ious[key] = _iou([_invisible(x) for x in d], [_invisible(x) for x in g],
                                 [inst.iscrowd for inst in g])
            else:
                ious[key] = np.zeros((len(d), len(g)))
        return ious

    def ignored_detections(self, member) -> frozenset:
        """Ids of detections meant for an ignored GT: amodal IoU >= IGNORE_IOU with a
        non-member (non-crowd, same category) and higher than with every member.

        The paper ignores every detection with IoU >= 0.5 with an ignored GT; "higher than
        with every member" keeps a detection that fits a member better (two objects of a
        class stacked on each other), else perfect predictions would score below 1.
        """
        ignored = set()
        for key, d in self.dets.items():
            gts = self.gts.get(key, ())
            outside = [col for col, g in enumerate(gts) if g.counted and not member(g)]
            inside = [col for col, g in enumerate(gts) if g.counted and member(g)]
            if d and outside:
                ious = self.ious["A"][key]
                best_out = ious[:, outside].max(axis=1)
                best_in = ious[:, inside].max(axis=1) if inside else np.zeros(len(d))
                hit = (best_out >= IGNORE_IOU) & (best_out > best_in)
                ignored.update(det.uid for det, flag in zip(d, hit) if flag)
        return frozenset(ignored)

    def run(self, ious, member=None, iou_thresholds=None, all_area_ranges=False):
        """COCOeval on ``ious``; with ``member``, GTs it rejects are ignored (and, by the
        "paper" rule, the detections meant for them)."""
        gts = {key: [{"id": g.uid, "area": g.area, "iscrowd": g.iscrowd,
                      "ignore": int(not g.counted or (member is not None and not member(g)))}
                     for g in value] for key, value in self.gts.items()}
        dts = {key: [{"id": d.uid, "area": d.area, "score": d.score} for d in value]
               for key, value in self.dets.items()}
        ignored = frozenset()
        if member is not None and self.rule == "paper":
            ignored = self.ignored_detections(member)
        return _MatrixEval(gts, dts, ious, sorted(self.images), self.categories,
                           iou_thresholds, all_area_ranges, ignored).run()

    def subset(self, member) -> dict:
        """AP_AV, AP_A, AP_V (+50/75) with only the GTs ``member`` accepts."""
        result = {}
        for kind in MASK_KINDS:
            result.update(_ap_triplet(self.run(self.ious[kind], member), kind))
        result["num_gt"] = sum(1 for value in self.gts.values() for g in value
                               if g.counted and member(g))
        return result


# ----------------------------------------------------------------------------------------
# Occlusion order


def _on_top(upper: _Instance, lower: _Instance) -> float:
    """Evidence that ``upper`` lies on ``lower``: its visible mask over ``lower``'s hidden part,
    minus the converse (on the RLEs)."""
    return covered(upper.visible, _invisible(lower)) - covered(lower.visible, _invisible(upper))


def _order_accuracy(run_a: _MatrixEval, gts: list, dets: list, relations: set,
                    source: str) -> dict:
    """Accuracy of the predicted "who is on top" for GT relations whose both GTs are matched
    (amodal IoU >= ORDER_IOU, COCOeval's matching) and that the GT masks show (the upper
    one's visible mask covers more of the lower one's invisible part than conversely);
    ``source`` says where the relations came from."""
    mutual = {pair for pair in relations if pair[::-1] in relations}
    tind = int(np.argmin(np.abs(run_a.params.iouThrs - ORDER_IOU)))
    match = {}
    for entry in run_a.evalImgs:
        if entry is None or entry["aRng"] != run_a.params.areaRng[0]:
            continue
        for det_id, gt_id in zip(entry["dtIds"], entry["dtMatches"][tind]):
            if gt_id > 0:
                match[int(gt_id)] = det_id
    gt_by_uid = {g.uid: g for g in gts}
    det_by_uid = {d.uid: d for d in dets}
    correct = undecided = pairs = skipped = 0
    for upper, lower in sorted(relations - mutual):
        if upper not in match or lower not in match:
            continue
        if not (gt_by_uid[upper].counted and gt_by_uid[lower].counted):
            continue
        if _on_top(gt_by_uid[upper], gt_by_uid[lower]) <= 0:
            skipped += 1        # e.g. the overlap is hidden under a third object
            continue
        pairs += 1
        evidence = _on_top(det_by_uid[match[upper]], det_by_uid[match[lower]])
        correct += evidence > 0
        undecided += evidence == 0
    return {"accuracy": correct / pairs if pairs else -1.0, "correct": correct,
            "pairs": pairs, "undecided": undecided, "skipped": skipped, "relations": source}


def _published_order(gts: list, dets: list, relations: set) -> dict:
    """The published graph and pick order scored (:mod:`orcnn_core.order_metrics`): of the
    detections (their ``order`` entries, else the node's rule on their masks) and of the
    ground-truth masks fed through the same rule."""
    gts_by_image, dets_by_image = defaultdict(list), defaultdict(list)
    for g in gts:
        if g.counted:
            gts_by_image[g.image_id].append(g)
    for d in dets:
        dets_by_image[d.image_id].append(d)
    model, gt_masks = OrderCounts(), OrderCounts()
    for image_id, group in gts_by_image.items():
        index = {g.uid: k for k, g in enumerate(group)}
        related = [(index[a], index[b]) for a, b in relations if a in index and b in index]
        # Shown: the upper object's visible part covers some of the lower one's hidden part
        # (amodal AND NOT visible, as the node's rule sees masks).
        shown = [(a, b) for a, b in related
                 if covered(group[a].visible,
                            masks.rle_difference(group[b].amodal, group[b].visible)) > 0]
        truth = _crop_prediction(group)
        gt_masks.add(image_counts(graph_order(truth), np.arange(len(group)), related, shown))
        found = dets_by_image.get(image_id, [])
        match = match_by_amodal_iou([g.amodal for g in group], [d.amodal for d in found],
                                    [d.score for d in found])
        model.add(image_counts(_detections_order(found), match, related, shown))
    return {"model": summarize(model), "gt_masks": summarize(gt_masks)}


def _crop_prediction(instances: list, scores=None):
    """The node's prediction-like object of instances' masks, each decoded only over its
    amodal box (orcnn_core.order_metrics.prediction_from_crops)."""
    boxes = np.asarray(mask_utils.toBbox([i.amodal for i in instances]), np.int64)
    rois, amodal, visible = [], [], []
    for inst, (x, y, w, h) in zip(instances, boxes.reshape(-1, 4)):
        window = (x, y, x + w, y + h)
        present = w > 0 and h > 0
        rois.append((x, y, w, h) if present else None)
        amodal.append(masks.decode_window(inst.amodal, *window) if present else None)
        visible.append(masks.decode_window(inst.visible, *window) if present else None)
    return prediction_from_crops(rois, amodal, visible, scores)


def _detections_order(found: list) -> ImageOrder:
    """The published order of one image's detections: from their ``order`` entries when
    every detection has one, else by the node's rule on their (hard) masks."""
    if found and any(d.order is not None for d in found):
        _check_orders(found)
        position = {d.order[0]: k for k, d in enumerate(found)}
        edges = [(k, position[j]) for k, d in enumerate(found) for j in d.order[2]]
        ranks = [d.order[1] for d in found]
        return ImageOrder(np.asarray(edges, np.int64).reshape(-1, 2),
                          np.argsort(ranks, kind="stable"))
    if not found:
        return ImageOrder(np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    return graph_order(_crop_prediction(found, [d.score for d in found]))


# ----------------------------------------------------------------------------------------
# Public API


def evaluate_loaded(gt, predictions: list, gt_name: str = "ground truth",
                    predictions_name: str = "predictions", occluded_rule: str = "reference",
                    fmt: str = "auto", annotators: str = "first") -> dict:
    """Amodal metrics of ``predictions`` (a COCO results list) against ``gt``: a parsed
    annotation file (a dict in any layout :func:`orcnn_core.data.parse_dataset` reads, as
    ``fmt`` and ``annotators`` say) or an already read
    :class:`orcnn_core.data.AmodalDataset`. ``occluded_rule`` is one of
    :data:`OCCLUDED_RULES`. The names appear in :class:`InputError` messages."""
    if occluded_rule not in OCCLUDED_RULES:
        raise InputError(f"occluded rule {occluded_rule!r}: one of "
                         f"{', '.join(OCCLUDED_RULES)}")
    dataset = _ground_truth(gt, gt_name, fmt, annotators)
    images = {image.image_id: image for image in dataset.records}
    categories = [c["id"] for c in dataset.categories]
    gts, relations, source = _gt_instances(dataset)
    dets = _read_predictions(predictions, images, categories, predictions_name)
    ev = _Evaluator(images, categories, gts, dets, occluded_rule)

    metrics = {}
    runs = {kind: ev.run(ev.ious[kind], all_area_ranges=True) for kind in MASK_KINDS}
    for kind in MASK_KINDS:
        metrics.update(_ap_triplet(runs[kind], kind))

    def occluded(g):
        return g.rate > 0

    metrics["occluded"] = ev.subset(occluded)
    iv = ev.run(ev.invisible_ious(occluded), occluded, iou_thresholds=[0.5])
    metrics["occluded"]["AP_IV50"] = _ap(iv)
    metrics["order"] = _order_accuracy(runs["A"], gts, dets, relations, source)
    metrics["published_order"] = _published_order(gts, dets, relations)

    levels = {"none": lambda g: g.rate == 0,
              "partial": lambda g: 0 < g.rate < HEAVY_OCCLUSION,
              "heavy": lambda g: g.rate >= HEAVY_OCCLUSION}
    breakdown = {"occlusion": {level: ev.subset(test) for level, test in levels.items()},
                 "truncation": {"truncated": ev.subset(lambda g: g.truncated),
                                "not_truncated": ev.subset(lambda g: not g.truncated)},
                 "area": {}}
    params = runs["A"].params
    for index, label in enumerate(params.areaRngLbl[1:], start=1):
        low, high = params.areaRng[index]
        group = {}
        for kind in MASK_KINDS:
            group.update(_ap_triplet(runs[kind], kind, index))
        group["num_gt"] = sum(1 for g in gts if g.counted and low <= g.area <= high)
        breakdown["area"][label] = group
    metrics["breakdown"] = breakdown
    metrics["num_images"] = len(images)
    metrics["num_gt"] = sum(1 for g in gts if g.counted)
    metrics["num_crowd"] = sum(1 for g in gts if g.iscrowd)
    metrics["num_ignored"] = sum(1 for g in gts if g.ignore and not g.iscrowd)
    metrics["protocol"] = {"format": dataset.layout, "occluded_rule": occluded_rule,
                           "relations": source}
    metrics["num_predictions"] = len(dets)
    metrics["num_predictions_without_visible"] = sum(1 for d in dets if not d.has_visible)
    return metrics


def evaluate(gt_path, predictions_path, occluded_rule: str = "reference", fmt: str = "auto",
             annotators: str = "first") -> dict:
    """Amodal metrics of a predictions file against a ground-truth file (see
    :func:`evaluate_loaded`); bad input raises :class:`InputError` naming file and entry."""
    gt = load_json(gt_path, "ground-truth")
    predictions = load_json(predictions_path, "predictions")
    return evaluate_loaded(gt, predictions, str(gt_path), str(predictions_path),
                           occluded_rule, fmt, annotators)


def _cell(value) -> str:
    return "-" if value is None or value < 0 else f"{value:.3f}"


def format_table(metrics: dict) -> str:
    """Markdown table of :func:`evaluate`'s metrics (fractions, '-' where undefined)."""
    columns = ["AP_AV", "AP_A", "AP_V", "AP50_AV", "AP50_A", "AP50_V", "AP75_AV", "AP75_A",
               "AP75_V", "AP_IV50"]
    rows = [("all", metrics, metrics["num_gt"]), ("occluded", metrics["occluded"], None)]
    breakdown = metrics["breakdown"]
    for group, label in (("occlusion", "occlusion"), ("truncation", ""), ("area", "area")):
        for name, values in breakdown[group].items():
            title = f"{label}: {name}" if label else name.replace("_", " ")
            rows.append((title, values, None))
    lines = ["| evaluation | " + " | ".join(columns) + " | GT |",
             "|---" * (len(columns) + 2) + "|"]
    for title, values, num_gt in rows:
        cells = [_cell(values.get(column)) for column in columns]
        count = values.get("num_gt", num_gt)
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {count} |")
    order = metrics["order"]
    lines.append("")
    lines.append(f"occlusion order: accuracy {_cell(order['accuracy'])} "
                 f"({order['correct']} of {order['pairs']} matched pairs, "
                 f"{order['undecided']} undecided, {order['skipped']} not shown by the GT "
                 f"masks; relations from {order['relations']})")
    for source, label in (("model", "published order"), ("gt_masks", "  with GT masks")):
        o = metrics["published_order"][source]
        lines.append(f"{label}: pair accuracy {_cell(o['pair_accuracy'])} ({o['pairs']} "
                     f"pairs), edge precision {_cell(o['edge_precision'])}, recall "
                     f"{_cell(o['edge_recall'])}, first pick free "
                     f"{_cell(o['first_pick_free'])} of {o['images']} images, first three "
                     f"picks free {_cell(o['first3_free'])}")
    lines.append(f"{metrics['num_images']} images, {metrics['num_gt']} ground truths, "
                 f"{metrics['num_predictions']} predictions "
                 f"({metrics['num_predictions_without_visible']} without visible mask: "
                 f"amodal used); AP as fractions, maxDets 100")
    return "\n".join(lines)


def run_evaluate(gt_path, predictions_path, out_path=None, occluded_rule: str = "reference",
                 fmt: str = "auto", annotators: str = "first") -> int:
    """``orcnn-core evaluate --gt GT.json --predictions PRED.json``: the inputs must be
    regular files and ``--out`` neither of them (checked before either is read); print the
    table, write the metrics JSON atomically."""
    check_regular_file(gt_path, "--gt")
    check_regular_file(predictions_path, "--predictions")
    if out_path is not None:
        check_output_file(out_path, "--out")
        check_not_an_input(out_path, [("--gt", gt_path), ("--predictions", predictions_path)],
                           "--out")
    metrics = evaluate(gt_path, predictions_path, occluded_rule, fmt, annotators)
    if out_path is not None:
        try:
            atomic_write_json(out_path, metrics, indent=2)
        except OSError as exc:
            raise InputError(f"{out_path}: cannot write metrics ({exc.strerror})") from None
    print(format_table(metrics))
    return 0
