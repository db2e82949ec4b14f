"""Inference back-ends side by side: time per image through Predictor and distance to eager.

Cases: ``demo``, the bundled model (models/orcnn_demo.safetensors, trained on the synthetic
scenes) on 320 x 240 synthetic scenes at its own score threshold; ``paper``, a randomly
initialised model of the paper's size (256-wide heads; ``--backbones``) on 640 x 480 scenes,
score threshold 0 so that every image yields ``--detections`` detections (the mask heads run
on that many boxes, as on a cluttered scene). Its last mask layers are scaled so that mask
logits span +-20 as a trained model's do: with raw random weights they reach ~650, where
float32 rounding alone exceeds the absolute tolerance of the back-ends' build check.

    python benchmarks/bench_backends.py                       # demo + paper (resnet50_fpn)
    python benchmarks/bench_backends.py --cases paper --backbones resnet18_fpn,resnet50_fpn
    python benchmarks/bench_backends.py --json backends.json

Per back-end: the first call (for torchscript and onnxruntime it builds the graph for the
image size: trace or export, plus a check against eager) apart, then the median ms per
image over ``--reps`` rounds after ``--warmup`` rounds; each round runs every back-end on
the same image in turn, so load from other processes hits all alike. "vs eager" is the
ratio of medians to eager on the same device. Differences are max |back-end - eager| over
all images of the raw detections (boxes in pixels, scores, mask logits) and the smallest
share of equal pixels of the full-image amodal and visible masks. CUDA rows (eager fp32,
eager with fp16 autocast, onnxruntime's CUDA provider, tensorrt) need a GPU; without one
they say "not measured (no GPU)". Prints a markdown table; ``--json PATH`` writes the rows.

On a shared machine keep ``--threads 1`` (the default): with two threads on two cores,
another busy process makes OpenMP threads spin and timings explode.

Measured (2-core CPU shared with other jobs, load average 2-2.5, --threads 1; median ms,
ratio to eager, first call in s including the graph build):

    case                     eager   torchscript             onnxruntime
    demo 320x240               180   163 (0.90, 1.9 s)       130 (0.72, 4.0 s)
    paper resnet50 640x480    3426   3459 (1.01, 14 s)       3480 (1.02, 20 s)

(an earlier run, at load 2-3, gave ratios 0.89 / 0.72 and 0.91 / 0.93).
Differences to eager: boxes <= 9e-3 px, scores <= 4e-5, mask logits <= 2e-3, all mask
pixels equal. CUDA rows were not measured (no GPU).
"""

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout, also with -P

from bench_model import bench_config  # noqa: E402

from orcnn_core.backends import compare_detections  # noqa: E402
from orcnn_core.errors import InputError  # noqa: E402
from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_core.model import build_model  # noqa: E402
from orcnn_core.predictor import Predictor, paste_crops  # noqa: E402
from orcnn_core.synth import SynthConfig, generate_samples  # noqa: E402
from orcnn_core.weights import build_from_file  # noqa: E402

DEMO_MODEL = ROOT / "models" / "orcnn_demo.safetensors"
CPU_BACKENDS = ("eager", "torchscript", "onnxruntime")
# (row label, back-end, fp16 autocast)
CUDA_ROWS = (("eager", "eager", False), ("eager fp16 autocast", "eager", True),
             ("torchscript", "torchscript", False), ("onnxruntime", "onnxruntime", False),
             ("tensorrt", "tensorrt", False))


def scenes(width, height, count):
    """``count`` RGB uint8 synthetic scenes (piles of groceries, as the demo model saw)."""
    cfg = SynthConfig(width=width, height=height)
    return [s.image for s in generate_samples(count, 7, cfg)]


def load_case(case, backbone, args, probe):
    """(model on the CPU in eval mode, width, height, description) of one case; ``probe``
    makes an RGB uint8 scene of a given (width, height)."""
    if case == "demo":
        model = build_from_file(DEMO_MODEL, device="cpu")
        return model, 320, 240, f"demo model ({model.config.backbone})"
    torch.manual_seed(0)
    cfg = bench_config(backbone, "paper", 640, 480, args.detections, 300, 100)
    model = build_model(cfg).eval()
    # Random paper-size weights give mask logits up to ~650 (a trained model's lie within a
    # few tens), where float32 rounding alone (relative 1e-4) exceeds the absolute logit
    # tolerance of the back-ends' build check. Scaling the last mask layers to +-20 keeps
    # the compute and makes the differences those of a trained model's scale.
    heads = model.roi_heads
    x = torch.from_numpy(probe(640, 480)).permute(2, 0, 1).float().div(255)
    with torch.no_grad():
        det = model([x])[0]
        for key, predictor in (("amodal_mask_logits", heads.amodal_mask_predictor),
                               ("visible_mask_logits", heads.visible_mask_predictor)):
            if predictor is not None and len(det[key]):
                scale = 20.0 / max(float(det[key].abs().max()), 1e-6)
                predictor.mask_fcn_logits.weight.mul_(scale)
                predictor.mask_fcn_logits.bias.mul_(scale)
    return model, 640, 480, f"paper-size {backbone}, random weights"


def measure(model, rows, device, images, args):
    """Fill in each row (dict with ``label``, ``backend``, ``fp16``) for one device."""
    predictors, reference = {}, []
    eager = Predictor(copy.deepcopy(model), device=device)
    with torch.inference_mode():
        for image in images:
            x = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div(255)
            reference.append((eager.model([x])[0], eager(image)))
    for row in rows:
        try:
            predictors[row["label"]] = Predictor(copy.deepcopy(model), device=device,
                                                 backend=row["backend"])
        except InputError as exc:
            row["note"] = f"not available: {exc}"

    def call(row, image):
        predictor = predictors[row["label"]]
        autocast = torch.autocast("cuda", dtype=torch.float16) if row["fp16"] \
            else contextlib.nullcontext()
        with autocast:
            return predictor(image)

    for row in rows:  # first call: graph build for the fixed-size back-ends
        if row["label"] in predictors:
            start = time.perf_counter()
            try:
                call(row, images[0])
            except Exception as exc:  # e.g. TensorRT failing to build an engine
                row["note"] = f"failed: {type(exc).__name__}: {exc}"
                del predictors[row["label"]]
                continue
            row["first_call_s"] = time.perf_counter() - start
    live = [row for row in rows if row["label"] in predictors]
    times = {row["label"]: [] for row in live}
    for k in range(args.warmup + args.reps):
        image = images[k % len(images)]
        for row in live:
            start = time.perf_counter()
            call(row, image)
            if k >= args.warmup:
                times[row["label"]].append((time.perf_counter() - start) * 1000)

    for row in live:
        row["median_ms"] = statistics.median(times[row["label"]])
        worst = {"boxes": 0.0, "scores": 0.0, "mask_logits": 0.0}
        equal, count_differs, detections = 1.0, 0, []
        predictor = predictors[row["label"]]
        with torch.inference_mode():
            for image, (ref_det, ref_pred) in zip(images, reference):
                x = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div(255)
                autocast = torch.autocast("cuda", dtype=torch.float16) if row["fp16"] \
                    else contextlib.nullcontext()
                with autocast:
                    det = predictor.backend(x)
                report = compare_detections(ref_det, det)
                detections.append(report["detections"][1])
                if report["detections"][0] != report["detections"][1]:
                    count_differs += 1
                    continue
                worst["boxes"] = max(worst["boxes"], report["boxes"])
                worst["scores"] = max(worst["scores"], report["scores"])
                worst["mask_logits"] = max(worst["mask_logits"], report["amodal_mask_logits"],
                                           report["visible_mask_logits"])
                got = call(row, image)
                for a, b in zip(paste_crops(got), paste_crops(ref_pred)):
                    equal = min(equal, float(np.mean(a == b)) if a.size else 1.0)
        row.update(max_diff=worst, equal_mask_pixels=equal, count_differs=count_differs,
                   detections=f"{min(detections)}-{max(detections)}")
    eager_ms = next((r["median_ms"] for r in rows if r["label"] == "eager"
                     and "median_ms" in r), None)
    for row in live:
        row["vs_eager"] = row["median_ms"] / eager_ms if eager_ms else None


def bench_case(case, backbone, args):
    model, width, height, what = load_case(case, backbone, args,
                                           lambda w, h: scenes(w, h, 1)[0])
    images = scenes(width, height, args.images)
    result = []
    cpu_rows = [{"label": name, "backend": name, "fp16": False} for name in args.backends]
    measure(model, cpu_rows, torch.device("cpu"), images, args)
    cuda_rows = [{"label": label, "backend": backend, "fp16": fp16}
                 for label, backend, fp16 in CUDA_ROWS]
    if torch.cuda.is_available():
        measure(model, cuda_rows, torch.device("cuda"), images, args)
    else:
        for row in cuda_rows:
            row["note"] = "not measured (no GPU)"
    for device, rows in (("cpu", cpu_rows), ("cuda", cuda_rows)):
        for row in rows:
            result.append({"case": what, "image": f"{width}x{height}", "device": device,
                           **row})
    return result


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows, load):
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.1f} before / "
          f"{load[1]:.1f} after; medians in ms\n")
    print("| case | image | device | back-end | dets | first call s | median ms | vs eager "
          "| max Δ box px | max Δ score | max Δ mask logit | equal mask px |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lead = f"| {r['case']} | {r['image']} | {r['device']} | {r['label']} |"
        if "median_ms" not in r:
            print(f"{lead} {r.get('note', '-')} |  |  |  |  |  |  |  |")
            continue
        diff = r["max_diff"]
        differs = f" ({r['count_differs']} images: other count)" if r["count_differs"] \
            else ""
        print(f"{lead} {r['detections']} | {fmt(r.get('first_call_s'), '.1f')} | "
              f"{r['median_ms']:.1f} | {fmt(r['vs_eager'], '.2f')} | {diff['boxes']:.1e} | "
              f"{diff['scores']:.1e} | {diff['mask_logits']:.1e} | "
              f"{100 * r['equal_mask_pixels']:.2f} %{differs} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="demo,paper",
                        help="comma-separated: demo (bundled model, 320x240), paper "
                             "(paper-size heads, 640x480) (default: %(default)s)")
    parser.add_argument("--backbones", default="resnet50_fpn",
                        help="backbones of the paper case, comma-separated "
                             "(default: %(default)s)")
    parser.add_argument("--backends", default=",".join(CPU_BACKENDS),
                        help="CPU back-ends (default: %(default)s)")
    parser.add_argument("--detections", type=int, default=30,
                        help="detections per image in the paper case (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4, help="distinct scenes, cycled")
    parser.add_argument("--reps", type=int, default=12, help="timed calls per back-end")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",")]
    if "eager" not in args.backends:
        args.backends.insert(0, "eager")  # the reference of every comparison
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for case in (c.strip() for c in args.cases.split(",")):
        if case not in ("demo", "paper"):
            parser.error(f"--cases: unknown case {case!r} (demo, paper)")
        for backbone in (args.backbones.split(",") if case == "paper" else [None]):
            rows += bench_case(case, backbone and backbone.strip(), args)
            print(f"done {case} {backbone or ''}", file=sys.stderr)
    load = (load_before, os.getloadavg()[0])
    print_table(rows, load)
    if args.json:
        atomic_write_json(args.json, {"threads": torch.get_num_threads(), "load_average": load,
                                      "torch": torch.__version__, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
