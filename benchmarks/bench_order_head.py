"""Cost of the occlusion-order head: the same model with and without it, from the image to
the published graph (Predictor, then ``occlusion_graph``).

Both models hold the same weights (the order head's are the extra ones; without a head
file, a randomly initialised head is added to the given model): the head changes only the
order, so the difference is its own cost (union-box RoIAlign, two convolutions and two
fully connected layers per pair of overlapping detections, run both ways) plus deciding
the graph from its probabilities instead of the pixel evidence. Synthetic 320 x 240
scenes, the score threshold at 0 and the cap at ``--instances``; the two paths alternate
and the table gives medians.

    python -P benchmarks/bench_order_head.py --threads 1 --weights models/orcnn_demo.safetensors
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

from orcnn_core.model import build_model  # noqa: E402
from orcnn_core.occlusion import occlusion_graph  # noqa: E402
from orcnn_core.predictor import Predictor  # noqa: E402
from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402
from orcnn_core.weights import load_weights  # noqa: E402


def predictors(weights: str, instances: int):
    """(without head, with head) Predictors of the same weights on the CPU."""
    cfg, state = load_weights(weights)
    torch.manual_seed(0)
    models = []
    for head in (False, True):
        model = build_model(cfg.replace(order_head=head, box_score_thresh=0.0,
                                        box_detections_per_img=instances))
        model.load_state_dict(state, strict=False)  # a head the file lacks stays random
        models.append(Predictor(model, device="cpu", score_thresh=0.0))
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(ROOT / "models" / "orcnn_demo.safetensors"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, headed = predictors(args.weights, args.instances)
    images = [s.image for s in generate_samples(args.frames, 4242, SynthConfig())]
    times = {"without head": [], "with head": []}
    counts = []
    for _ in range(args.reps):
        for image in images:
            for name, predictor in (("without head", plain), ("with head", headed)):
                start = time.perf_counter()
                prediction = predictor(image)
                occlusion_graph(prediction)
                times[name].append((time.perf_counter() - start) * 1e3)
            counts.append(len(prediction))
    medians = {k: statistics.median(v) for k, v in times.items()}
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() \
        else "?"
    print(f"{torch.get_num_threads()} torch threads, load average {load}; medians in ms over "
          f"{len(times['with head'])} frames, {min(counts)}-{max(counts)} instances\n")
    print("| model | image to graph ms | extra ms | ratio |\n|---|---|---|---|")
    for name in times:
        extra = medians[name] - medians["without head"]
        print(f"| {name} | {medians[name]:.1f} | {extra:+.1f} | "
              f"{medians[name] / medians['without head']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians_ms": medians, "instances": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
