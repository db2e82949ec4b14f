"""Cost of the occlusion-order decision per frame: the soft rule against the previous hard
rule, on the bundled model's own detections.

Both paths start from the detector's output (D detections with M x M mask logits) and end
with the graph and pick order the node publishes:

* hard (previous release): label crops thresholded at 0.5, then the previous
  ``occlusion_graph`` (pixel counts, 20 px / 1 % thresholds, pick order by layer), read
  from git (``--previous``, default the release commit);
* soft (this code): label crops plus probability crops (what the Predictor keeps), then
  ``occlusion_graph`` on the probabilities.

The detections are the bundled model's on synthetic scenes at 320 x 240 with the score
threshold at 0 and the cap at ``--instances``, so every frame has that many instances.
Times are medians over frames and repetitions, the two paths alternating; the table gives
the extra milliseconds and the ratio soft / hard.

    python -P benchmarks/bench_order.py --threads 1 --instances 20
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

from orcnn_core.occlusion import occlusion_graph  # noqa: E402
from orcnn_core.predictor import Predictor, label_crops  # noqa: E402
from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402

PREVIOUS = "e31c064"  # the release before the soft rule


def previous_occlusion(commit: str):
    """The ``orcnn_core.occlusion`` module of ``commit`` (imports only orcnn_core.errors)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:orcnn_core/occlusion.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "previous_occlusion.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_occlusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_numpy(tensors):
    flat = torch.cat([t.flatten() for t in tensors]).numpy()
    pieces = np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])
    return [p.reshape(t.shape) for p, t in zip(pieces, tensors)]


class _Frame:
    """What occlusion_graph reads of a prediction."""

    def __init__(self, rois, crops, scores, probs=None):
        self.rois, self.crops, self.scores, self.probs = rois, crops, scores, probs
        self.amodal_areas = np.asarray([np.count_nonzero(c) for c in crops], np.int64)
        visible = np.asarray([np.count_nonzero(c == 1) for c in crops], np.int64)
        self.occlusion_ratios = (1 - visible / np.maximum(self.amodal_areas, 1)).astype(
            np.float32)


def hard_path(det, size, previous):
    rois, crops = label_crops(det["boxes"], det["amodal_mask_logits"],
                              det["visible_mask_logits"], size)
    frame = _Frame(rois.numpy().astype(np.int32), to_numpy(crops), det["scores"].numpy())
    return previous.occlusion_graph(frame, 20, 0.01)


def soft_path(det, size):
    rois, crops, probs = label_crops(det["boxes"], det["amodal_mask_logits"],
                                     det["visible_mask_logits"], size, with_probs=True)
    frame = _Frame(rois.numpy().astype(np.int32), to_numpy(crops), det["scores"].numpy(),
                   to_numpy(probs))
    return occlusion_graph(frame)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(ROOT / "models" / "orcnn_demo.safetensors"))
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--previous", default=PREVIOUS, help="git commit of the hard rule")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    previous = previous_occlusion(args.previous)
    predictor = Predictor.from_file(args.weights, device="cpu")
    predictor.set_limits(0.0, args.instances)
    cfg = SynthConfig(width=320, height=240, num_classes=len(predictor.config.class_names),
                      min_objects=8, max_objects=12)
    size = (240, 320)
    dets = []
    with torch.inference_mode():
        for sample in generate_samples(args.frames, 4242, cfg):
            x = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
            dets.append(predictor.backend(x))
    counts = [len(d["boxes"]) for d in dets]
    hard, soft = [], []
    with torch.inference_mode():
        for _ in range(args.reps):
            for det in dets:
                start = time.perf_counter()
                hard_path(det, size, previous)
                hard.append(time.perf_counter() - start)
                start = time.perf_counter()
                soft_path(det, size)
                soft.append(time.perf_counter() - start)
    h, s = 1e3 * statistics.median(hard), 1e3 * statistics.median(soft)
    figures = {"instances": counts, "hard_ms": h, "soft_ms": s, "extra_ms": s - h,
               "ratio": s / h, "threads": args.threads, "previous": args.previous}
    print("| instances per frame | hard rule (previous) ms | soft rule ms | extra ms | "
          "soft / hard |")
    print("|---|---|---|---|---|")
    print(f"| {min(counts)}-{max(counts)} | {h:.2f} | {s:.2f} | {s - h:+.2f} | "
          f"{s / h:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
