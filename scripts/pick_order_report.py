#!/usr/bin/env python3
"""What the robot receives, scored: the node's occlusion graph and pick order on held-out
synthetic scenes, with the model's masks and with the ground-truth masks fed through the
same rule (orcnn_core.order_metrics), plus the amodal AP of the same scenes.

    python -P scripts/pick_order_report.py --weights models/orcnn_demo.safetensors \
        --num-images 40 --seed 7100

``--grid`` also scores every combination of the rule's thresholds given (for tuning on a
validation seed; never tune on the seed you report). ``--rules`` scores the same detections
with each way of deciding the order (a table row each): ``hard`` on the thresholded label
crops, ``soft`` on the mask probabilities, ``head`` on the order head's probabilities (for
a model with an order head; the node's default then). ``--errors`` lists the relations the
masks show between two matched objects that the published graph misses, ``undecided`` (no
edge either way) or ``reversed``, with the evidence both ways, the overlap the ground-truth
masks show, and whether the lower object's amodal box reaches the upper one's visible mask.
"""

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile

import numpy as np

from orcnn_core import order_metrics as om
from orcnn_core.data import write_amodal_coco
from orcnn_core.evaluation import evaluate_loaded
from orcnn_core.occlusion import (MIN_CONFIDENCE, MIN_OVERLAP_PIXELS, MIN_OVERLAP_RATIO,
                                  PRIOR_PIXELS, edge_confidence, occlusion_graph,
                                  pair_evidence)
from orcnn_core.prediction import VISIBLE
from orcnn_core.predictor import Predictor
from orcnn_core.results import prediction_to_coco
from orcnn_core.synth import SynthConfig, generate_samples


def scene_records(predictor, samples):
    """Per scene: (prediction, its COCO entries, ground-truth match, relations, shown)."""
    records = []
    for sample in samples:
        prediction = predictor(sample.image)
        entries = prediction_to_coco(prediction, sample.image_id, sample.mask_padding)
        gt_rles = om.encode_masks(sample.amodal_masks)
        match = om.match_by_amodal_iou(gt_rles, [e["segmentation"] for e in entries],
                                       prediction.scores)
        amodal, visible = sample.amodal_masks.astype(bool), sample.visible_masks.astype(bool)
        relations = [tuple(r) for r in sample.occlusion_relations.tolist()]
        shown = om.shown_relations(relations, amodal, visible)
        records.append((prediction, entries, match, relations, shown,
                        om.prediction_from_masks(amodal, visible)))
    return records


def score(records, params: dict, use_gt_masks: bool) -> dict:
    total = om.OrderCounts()
    for prediction, _entries, match, relations, shown, gt_prediction in records:
        source = gt_prediction if use_gt_masks else prediction
        graph = occlusion_graph(source, **params)
        order = om.ImageOrder(graph.edges, graph.pick_order)
        total.add(om.image_counts(order, np.arange(len(gt_prediction.crops))
                                  if use_gt_masks else match, relations, shown))
    return om.summarize(total)


#: The head and the soft rule averaged (not a library rule: an experiment of the ablation),
#: scored with this edge confidence threshold.
AVERAGED_MIN_CONFIDENCE = 0.3


def evidence_table(prediction, probs=None) -> np.ndarray:
    """float [N, N]: entry (i, j) the evidence that instance i lies on instance j."""
    n = len(prediction.crops)
    pairs, evidence = pair_evidence(prediction.rois, prediction.crops, probs)
    table = np.zeros((n, n))
    table[pairs[:, 0], pairs[:, 1]] = evidence
    return table


def soft_confidence(prediction) -> np.ndarray:
    """float [N, N]: the soft rule's P(i lies on j)."""
    table = evidence_table(prediction, prediction.probs)
    return edge_confidence(table, table.T)


def rule_view(prediction, rule: str):
    """The prediction as one way of deciding the order sees it."""
    if rule == "hard":
        return dataclasses.replace(prediction, probs=None, order=None)
    if rule == "soft":
        return dataclasses.replace(prediction, order=None)
    if rule == "head+soft":
        averaged = (prediction.order + soft_confidence(prediction)) / 2
        return dataclasses.replace(prediction, order=averaged.astype(np.float32))
    return prediction


def rules_table(records, params: dict, has_head: bool) -> list:
    """Markdown rows: the published order of the same detections under each rule."""
    rows = ["| rule | pair accuracy | first pick free | first 3 free | edge precision | "
            "edge recall |", "|---|---|---|---|---|---|"]
    for rule in ("hard", "soft", "head", "head+soft") if has_head else ("hard", "soft"):
        view = [(rule_view(r[0], rule),) + tuple(r[1:]) for r in records]
        m = score(view, {**params, "min_confidence": AVERAGED_MIN_CONFIDENCE}
                  if rule == "head+soft" else params, False)
        rows.append(f"| {rule} | {m['pair_accuracy']:.3f} "
                    f"({round(m['pair_accuracy'] * m['pairs'])}/{m['pairs']}) | "
                    f"{m['first_pick_free']:.3f} | {m['first3_free']:.3f} | "
                    f"{m['edge_precision']:.3f} | {m['edge_recall']:.3f} |")
    return rows


def visible_in_box(prediction, upper: int, lower: int) -> int:
    """Visible pixels (labels) of ``upper`` inside the amodal box (roi) of ``lower``."""
    (xu, yu, _, _), (xl, yl, wl, hl) = prediction.rois[upper], prediction.rois[lower]
    crop = np.asarray(prediction.crops[upper])
    window = crop[max(yl - yu, 0):max(yl + hl - yu, 0), max(xl - xu, 0):max(xl + wl - xu, 0)]
    return int(np.count_nonzero(window == VISIBLE))


def missed_relations(records) -> list:
    """One row per relation the ground-truth masks show between two matched objects that the
    published graph (default thresholds) does not have in its direction."""
    rows = []
    for image, (prediction, _entries, match, relations, shown, gt_prediction) in \
            enumerate(records):
        graph = occlusion_graph(prediction)
        published = {tuple(e) for e in graph.edges.tolist()}
        detection = {int(g): i for i, g in enumerate(match.tolist()) if g >= 0}
        evidence = evidence_table(prediction, prediction.probs)
        gt_overlap = evidence_table(gt_prediction)
        for upper, lower in sorted({tuple(r) for r in relations} & {tuple(r) for r in shown}):
            a, b = detection.get(upper), detection.get(lower)
            if a is None or b is None or (a, b) in published:
                continue
            rows.append({"image": image, "upper": a, "lower": b,
                         "kind": "reversed" if (b, a) in published else "undecided",
                         "evidence_up": evidence[a, b], "evidence_down": evidence[b, a],
                         "gt_overlap": int(gt_overlap[upper, lower]),
                         "upper_visible_in_lower_box": visible_in_box(prediction, a, b)})
    return rows


def errors_table(rows: list) -> list:
    """Markdown rows: the missed relations by kind, with medians."""
    lines = ["| missed as | relations | median e(upper, lower) | median e(lower, upper) | "
             "median overlap (GT masks) | lower box misses upper visible |",
             "|---|---|---|---|---|---|"]
    for kind in ("undecided", "reversed"):
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        medians = [np.median([r[k] for r in group])
                   for k in ("evidence_up", "evidence_down", "gt_overlap")]
        misses = sum(r["upper_visible_in_lower_box"] == 0 for r in group)
        lines.append(f"| {kind} | {len(group)} | {medians[0]:.1f} | {medians[1]:.1f} | "
                     f"{medians[2]:.0f} | {misses} |")
    return lines


def grid(records, priors, confidences, pixels) -> list:
    rows = []
    for prior, conf, px in itertools.product(priors, confidences, pixels):
        params = {"min_overlap_pixels": px, "min_overlap_ratio": 0.0,
                  "min_confidence": conf, "prior_pixels": prior}
        rows.append({**params, "model": score(records, params, False),
                     "gt_masks": score(records, params, True)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="published instances score at least this (the node's default)")
    parser.add_argument("--grid", action="store_true", help="score a grid of thresholds")
    parser.add_argument("--rules", action="store_true",
                        help="score the same detections with each order rule (a table)")
    parser.add_argument("--errors", action="store_true",
                        help="list the shown relations the published graph misses")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    predictor = Predictor.from_file(args.weights, device="cpu",
                                    score_thresh=args.score_thresh)
    width, height = (int(v) for v in args.size.split("x"))
    cfg = SynthConfig(width=width, height=height,
                      num_classes=len(predictor.config.class_names))
    samples = list(generate_samples(args.num_images, args.seed, cfg))
    records = scene_records(predictor, samples)
    defaults = {"min_overlap_pixels": MIN_OVERLAP_PIXELS,
                "min_overlap_ratio": MIN_OVERLAP_RATIO,
                "min_confidence": MIN_CONFIDENCE, "prior_pixels": PRIOR_PIXELS}
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        gt = write_amodal_coco(iter(samples), tmp.name, categories=cfg.categories)
    metrics = evaluate_loaded(gt, [e for r in records for e in r[1]])
    # The published order as orcnn-core evaluate scores it (the entries carry the node's
    # graph and pick order); the grid re-scores the same scenes with other thresholds.
    figures = {"seed": args.seed, "images": len(samples), **defaults,
               **metrics["published_order"], "AP_AV": metrics["AP_AV"],
               "AP_A": metrics["AP_A"], "AP_V": metrics["AP_V"]}
    check = {"model": score(records, defaults, False), "gt_masks": score(records, defaults, True)}
    assert check == metrics["published_order"], (check, metrics["published_order"])
    if args.grid:
        figures["grid"] = grid(records, [0.5, 1, 2, 4, 8, 16, 32], [0.3, 0.4, 0.5, 0.6],
                               [0, 0.5, 1, 2, 5, 10, 20])
        for row in figures["grid"]:
            m, g = row["model"], row["gt_masks"]
            print(f"prior {row['prior_pixels']:5g} conf {row['min_confidence']:.2f} px "
                  f"{row['min_overlap_pixels']:4g} | model pair {m['pair_accuracy']:.3f} "
                  f"first {m['first_pick_free']:.3f} first3 {m['first3_free']:.3f} "
                  f"P {m['edge_precision']:.3f} R {m['edge_recall']:.3f} | gt pair "
                  f"{g['pair_accuracy']:.3f} first {g['first_pick_free']:.3f}")
    if args.rules:
        print("\n".join(rules_table(records, defaults, predictor.config.order_head)))
    if args.errors:
        figures["missed_relations"] = missed_relations(records)
        print("\n".join(errors_table(figures["missed_relations"])))
    print(json.dumps({k: v for k, v in figures.items()
                      if k not in ("grid", "missed_relations")}, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
