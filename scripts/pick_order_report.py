#!/usr/bin/env python3
"""How often is the node's first pick really free? Held-out synthetic scenes, one model.

For every scene the Predictor runs, the occlusion graph gives the pick order, and the first
pick is matched to a ground-truth object (amodal IoU >= 0.5, same class not required). The
pick is right when that object exists and nothing lies on it in the ground truth. Also
prints the amodal metrics of the same scenes (orcnn_core.evaluation).

    python scripts/pick_order_report.py --weights models/orcnn_demo.safetensors \
        --num-images 200 --seed 2000
"""

import argparse
import json
import sys

import numpy as np

from orcnn_core.data import write_amodal_coco
from orcnn_core.evaluation import evaluate_loaded, format_table
from orcnn_core.masks import pad_mask
from orcnn_core.occlusion import occlusion_graph
from orcnn_core.predictor import Predictor, paste_crops
from orcnn_core.results import prediction_to_coco
from orcnn_core.synth import SynthConfig, generate_samples


def first_pick_is_free(prediction, graph, sample) -> str:
    """'right', 'wrong' (the object has something on it, or matches nothing) or 'empty'."""
    if len(prediction) == 0:
        return "empty"
    first = int(graph.pick_order[0])
    amodal, _ = paste_crops(prediction)
    mask = pad_mask(amodal[first].astype(np.uint8), sample.mask_padding).astype(bool)
    gt = sample.amodal_masks.astype(bool)
    inter = (gt & mask).sum(axis=(1, 2))
    union = (gt | mask).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    best = int(np.argmax(iou)) if len(iou) else -1
    if best < 0 or iou[best] < 0.5:
        return "wrong"
    covered = {int(lower) for _, lower in sample.occlusion_relations}
    return "wrong" if best in covered else "right"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    predictor = Predictor.from_file(args.weights, device="cpu")
    width, height = (int(v) for v in args.size.split("x"))
    classes = len(predictor.config.class_names)
    samples = list(generate_samples(args.num_images, args.seed,
                                    SynthConfig(width=width, height=height,
                                                num_classes=classes)))
    outcomes = {"right": 0, "wrong": 0, "empty": 0}
    results = []
    for sample in samples:
        prediction = predictor(sample.image)
        graph = occlusion_graph(prediction)
        outcomes[first_pick_is_free(prediction, graph, sample)] += 1
        results += prediction_to_coco(prediction, sample.image_id, sample.mask_padding)
    gt = _ground_truth(samples, SynthConfig(width=width, height=height, num_classes=classes))
    metrics = evaluate_loaded(gt, results)
    decided = outcomes["right"] + outcomes["wrong"]
    figures = {
        "images": len(samples), "seed": args.seed, **outcomes,
        "first_pick_free_rate": outcomes["right"] / len(samples),
        "first_pick_free_rate_when_any": outcomes["right"] / decided if decided else None,
        "metrics": metrics,
    }
    print(format_table(metrics))
    print(f"first pick free of occluders: {outcomes['right']} of {len(samples)} scenes "
          f"({100 * figures['first_pick_free_rate']:.1f} %); wrong {outcomes['wrong']}, "
          f"no detection {outcomes['empty']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    return 0


def _ground_truth(samples, cfg) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        return write_amodal_coco(iter(samples), tmp.name, categories=cfg.categories)


if __name__ == "__main__":
    sys.exit(main())
