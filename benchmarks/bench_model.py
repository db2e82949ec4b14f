"""ORCNN vs torchvision Mask R-CNN: inference, one training step and peak memory, same run.

Both models get the same backbone, image size, proposal counts, heads and (copied) weights,
so they find the same detections; ORCNN differs by its second (visible) mask head, the
occlusion logits and its losses. A third row is ORCNN whose visible head shares the amodal
head's four convolutions (``visible_head_shared_convs: 4``; its own deconvolution and
predictor only). Mask R-CNN is stock torchvision: its inference pastes every
mask into the full image. ORCNN's forward returns 28 x 28 logits per box and its Predictor
(also timed) turns them into label crops over each amodal box. In eval mode ORCNN keeps its
convolution weights channels-last on the CPU (see ``ORCNN.train``); the stock Mask R-CNN
does not.

Untrained models score every box alike, so the box score threshold is 0 and every image
yields exactly ``--detections`` detections: the mask heads run on that many boxes, as they
would on a scene with that many objects.

    python benchmarks/bench_model.py                       # small preset, 320x240
    python benchmarks/bench_model.py --preset paper --backbones resnet50_fpn --size 640x480
    python benchmarks/bench_model.py --backbones resnet18_fpn,mobilenet_v3_fpn,resnet50_fpn

Rows: CPU float32 always; with a CUDA device also CUDA float32 and float16 / bfloat16
(``torch.autocast``, training with a GradScaler for float16). Without a CUDA device the
CUDA rows are printed as "not measured". Times are medians of ``--reps`` repetitions after
``--warmup`` untimed ones; the repetitions alternate between the models so that load from
other processes hits both alike; ratios are each model / Mask R-CNN. Peak memory: on the CPU each
model runs in a fresh process whose peak resident set (VmHWM, the ru_maxrss of the address
space) is reset after set-up, so it counts what one inference or training step adds to the
loaded model, allocator caches and oneDNN scratch buffers included (torch.profiler's
profile_memory sees only tensor allocations, and one process running both models would
report the larger of the two); on CUDA it is ``torch.cuda.max_memory_allocated``.
``--json PATH`` also writes the numbers. On a shared machine use ``--threads 1``: with two
threads on two cores, another busy process makes OpenMP threads spin and timings explode.

The tables of a run, with the machine, the load and what they mean: docs/performance.md.
"""

import argparse
import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from torchvision.models.detection import MaskRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import (  # noqa: E402
    FastRCNNPredictor, TwoMLPHead)
from torchvision.models.detection.mask_rcnn import (  # noqa: E402
    MaskRCNNHeads, MaskRCNNPredictor)
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from orcnn_core.config import BACKBONES, MASK_HEAD_CONVS, ModelConfig  # noqa: E402
from orcnn_core.errors import InputError  # noqa: E402
from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_core.model import build_backbone, build_model, roi_feature_names  # noqa: E402
from orcnn_core.devices import resolve_device  # noqa: E402
from orcnn_core.predictor import Predictor  # noqa: E402

# Anchor sizes (one per feature map) scaled for the image size: the 5-level FPN of the
# ResNets, the 3 maps of torchvision's MobileNetV3 FPN.
ANCHORS = {5: (16, 32, 64, 128, 256), 3: (32, 64, 128)}
#: Precision name -> autocast dtype (None: plain float32).
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The shared-trunk ORCNN row: ``visible_head_shared_convs`` = all of the mask head's
#: convolutions (the visible head keeps its own deconvolution and predictor).
SHARED = "ORCNN, shared mask trunk"
MODELS = ("Mask R-CNN", "ORCNN", SHARED)


def bench_config(backbone, preset, width, height, detections, rpn_pre, rpn_post):
    levels = 3 if backbone.startswith("mobilenet") else 5
    common = dict(
        backbone=backbone,
        min_size=min(width, height), max_size=max(width, height),
        rpn_pre_nms_top_n_test=rpn_pre, rpn_post_nms_top_n_test=rpn_post,
        rpn_pre_nms_top_n_train=2 * rpn_pre, rpn_post_nms_top_n_train=3 * rpn_post,
        box_detections_per_img=detections, box_score_thresh=0.0,
        anchor_sizes=ANCHORS[levels], trainable_backbone_layers=5,
    )
    if preset == "small":
        return ModelConfig.small(**common)
    return ModelConfig(**common)


def build_maskrcnn(cfg: ModelConfig, orcnn=None) -> MaskRCNN:
    """torchvision's Mask R-CNN with ORCNN's parts; with ``orcnn`` also its weights (the
    amodal head becomes the mask head)."""
    backbone = build_backbone(cfg)
    names = roi_feature_names(cfg)
    channels, width = backbone.out_channels, cfg.mask_head_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes),
                              (tuple(cfg.anchor_aspect_ratios),) * len(cfg.anchor_sizes))
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=TwoMLPHead(channels * 49, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes),
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        mask_roi_pool=MultiScaleRoIAlign(names, cfg.mask_roi_size, 2),
        mask_head=MaskRCNNHeads(channels, (width,) * MASK_HEAD_CONVS, 1),
        mask_predictor=MaskRCNNPredictor(width, width, cfg.mask_classes),
    )
    if orcnn is not None:
        state = {k.replace("amodal_mask_", "mask_"): v for k, v in orcnn.state_dict().items()
                 if "visible_mask_" not in k}
        model.load_state_dict(state, strict=True)
    return model


def synthetic_sample(width, height, rng):
    """An image with 4 overlapping rectangles, amodal/visible masks (later ones on top)."""
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    boxes, amodal = [], []
    for _ in range(4):
        w, h = rng.integers(width // 6, width // 2), rng.integers(height // 6, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        mask = np.zeros((height, width), np.uint8)
        mask[y:y + h, x:x + w] = 1
        boxes.append([x, y, x + w, y + h])
        amodal.append(mask)
    amodal = np.stack(amodal)
    visible = amodal.copy()
    for i in range(len(amodal)):
        for j in range(i + 1, len(amodal)):
            visible[i] &= 1 - amodal[j]
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32),
              "labels": torch.ones(len(boxes), dtype=torch.int64),
              "amodal_masks": torch.from_numpy(amodal),
              "visible_masks": torch.from_numpy(visible)}
    return image, target


def median_ms(fns, reps, warmup, device):
    """(median, min) wall time in ms of each callable; repetitions interleave the callables
    so that load from other processes hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append((time.perf_counter() - start) * 1000)
    return [(statistics.median(t), min(t)) for t in times]


def autocast(device, precision):
    """The autocast context of a precision (none for fp32)."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def setup(backbone, args, device, names=MODELS):
    """Image (numpy), its tensor and ``{name: (model, target)}`` for the named models. All
    get ORCNN's weights (Mask R-CNN its amodal head as the mask head, the shared-trunk ORCNN
    all but the visible head's convolutions), from the same seed."""
    width, height = args.size
    cfg = bench_config(backbone, args.preset, width, height, args.detections, args.rpn_pre,
                       args.rpn_post)
    torch.manual_seed(0)
    orcnn = build_model(cfg)
    image, target = synthetic_sample(width, height, np.random.default_rng(0))
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
    orcnn_target = {k: v.to(device) for k, v in target.items()}
    mrcnn_target = {"boxes": orcnn_target["boxes"], "labels": orcnn_target["labels"],
                    "masks": orcnn_target["amodal_masks"]}
    builders = {"Mask R-CNN": lambda: (build_maskrcnn(cfg, orcnn), mrcnn_target),
                "ORCNN": lambda: (orcnn, orcnn_target),
                SHARED: lambda: (shared_trunk_orcnn(cfg, orcnn), orcnn_target)}
    models = {name: builders[name]() for name in names}
    return image, x, {name: (model.to(device), t) for name, (model, t) in models.items()}


def shared_trunk_orcnn(cfg: ModelConfig, orcnn):
    """ORCNN whose visible head shares all of the amodal head's convolutions
    (``visible_head_shared_convs``), with ``orcnn``'s weights for every layer it has."""
    model = build_model(cfg.replace(visible_head_shared_convs=MASK_HEAD_CONVS))
    keys = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in orcnn.state_dict().items() if k in keys})
    return model


def inference_fn(model, x, device, precision):
    model.eval()

    def infer():
        with torch.inference_mode(), autocast(device, precision):
            return model([x])
    return infer


def train_step_fn(model, x, target, device, precision):
    """One SGD step (forward, backward, update); float16 scales the loss as training does."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with autocast(device, precision):
            losses = model([x], [target])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def cuda_peak_mb(fn):
    """Peak CUDA memory (MB) allocated by tensors while ``fn`` runs once."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def _resident_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(backbone, args, name, mode):
    """Run in a fresh process: (resident MB after set-up, peak resident MB while running
    ``mode`` ("inference" or "train") of model ``name`` warmup + 1 times, CPU float32)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    # Only the measured model stays loaded (the ORCNN its weights come from is freed).
    _, x, models = setup(backbone, args, cpu, names=(name,))
    model, target = models[name]
    fn = (inference_fn(model, x, cpu, "fp32") if mode == "inference"
          else train_step_fn(model, x, target, cpu, "fp32"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = _resident_mb("VmRSS")
    for _ in range(max(args.warmup, 1) + 1):
        fn()
    return before, _resident_mb("VmHWM")


def cpu_peak_mb(backbone, args, name, mode):
    """``memory_probe`` in a fresh (spawned) process; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        before, peak = pool.submit(memory_probe, backbone, args, name, mode).result()
    return {"peak_mb": peak, "added_mb": peak - before}


def bench_backbone(backbone, args, device, precision):
    """Rows (one per model) for one backbone, device and precision."""
    image, x, models = setup(backbone, args, device)

    # Inference: the forwards and ORCNN's Predictor (image -> label crops).
    predictor = Predictor(models["ORCNN"][0], device=device)
    infer = [inference_fn(model, x, device, precision) for model, _ in models.values()]
    detections = {name: len(fn()[0]["boxes"]) for name, fn in zip(MODELS, infer)}

    def predict():
        with autocast(device, precision):
            predictor(image)
    *infer_ms, pred_ms = median_ms(infer + [predict], args.reps, args.warmup, device)
    infer_peak = [cuda_peak_mb(fn) if device.type == "cuda" else None for fn in infer]

    # One training step each (forward, backward, SGD update).
    steps = [train_step_fn(model, x, target, device, precision)
             for model, target in models.values()]
    train_ms = median_ms(steps, args.reps, args.warmup, device)
    train_peak = [cuda_peak_mb(fn) if device.type == "cuda" else None for fn in steps]

    rows = []
    for i, name in enumerate(MODELS):
        if device.type == "cpu" and args.memory:
            cpu_infer = cpu_peak_mb(backbone, args, name, "inference")
            cpu_train = cpu_peak_mb(backbone, args, name, "train")
            infer_peak[i] = cpu_infer and cpu_infer["peak_mb"]
            train_peak[i] = cpu_train and cpu_train["peak_mb"]
            extra = {"inference_added_mb": cpu_infer and cpu_infer["added_mb"],
                     "train_added_mb": cpu_train and cpu_train["added_mb"],
                     "memory_method": "VmHWM of a fresh process, reset after set-up"}
        else:
            extra = {"memory_method": "torch.cuda.max_memory_allocated"
                     if device.type == "cuda" else None}
        rows.append({
            "model": name, "backbone": backbone, "preset": args.preset,
            "image": f"{args.size[0]}x{args.size[1]}", "detections": detections[name],
            "device": device.type, "precision": precision, "measured": True,
            "inference_ms": infer_ms[i][0], "inference_min_ms": infer_ms[i][1],
            "predictor_ms": pred_ms[0] if name == "ORCNN" else None,
            "train_step_ms": train_ms[i][0], "train_step_min_ms": train_ms[i][1],
            "params_m": sum(p.numel() for p in models[name][0].parameters()) / 1e6,
            "inference_peak_mb": infer_peak[i], "train_peak_mb": train_peak[i],
            "inference_ratio": infer_ms[i][0] / infer_ms[0][0],
            "train_ratio": train_ms[i][0] / train_ms[0][0],
            **extra,
        })
    return rows


def not_measured(backbone, args, precision, reason):
    """One row standing for all models of a configuration that was not run."""
    return [{"model": " / ".join(MODELS), "backbone": backbone, "preset": args.preset,
             "image": f"{args.size[0]}x{args.size[1]}", "device": "cuda",
             "precision": precision, "measured": False, "reason": reason}]


def _num(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def _memory(row, mode):
    """Peak MB, with what the run added to the loaded model where known: "812 (+55)"."""
    peak, added = row[f"{mode}_peak_mb"], row.get(f"{mode}_added_mb")
    return _num(peak, 0) + ("" if added is None else f" (+{added:.0f})")


def print_table(rows, threads, load):
    print(f"\n{platform.processor() or platform.machine()} CPU, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}"
          f", torch {torch.__version__}, {threads} CPU threads, load average {load[0]:.1f} "
          f"before / {load[1]:.1f} after; medians in ms; peak memory in MB (CPU: resident "
          f"set of the process, + what the run added to the loaded model)\n")
    print("| model | backbone | preset | image | dets | device | inference | predictor "
          "| train step | params (M) | peak mem inference | peak mem train "
          "| inference ratio | train ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [r for r in rows if r["measured"]]:
        where = f"{r['device']} {r['precision']}"
        print(f"| {r['model']} | {r['backbone']} | {r['preset']} | {r['image']} | "
              f"{r['detections']} | {where} | {r['inference_ms']:.1f} | "
              f"{_num(r['predictor_ms'])} | {r['train_step_ms']:.1f} | {r['params_m']:.1f} | "
              f"{_memory(r, 'inference')} | {_memory(r, 'train')} | "
              f"{r['inference_ratio']:.2f} | {r['train_ratio']:.2f} |")
    # Configurations that were not run: one row each for all backbones.
    skipped = {}
    for r in rows:
        if not r["measured"]:
            skipped.setdefault((r["device"], r["precision"], r["reason"]), r)
    for (device, precision, reason), r in skipped.items():
        print(f"| {r['model']} | all | {r['preset']} | {r['image']} | - | {device} "
              f"{precision} | not measured ({reason}) | | | | | | | |")


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="resnet18_fpn,resnet50_fpn",
                        help="comma-separated backbone names (default: %(default)s)")
    parser.add_argument("--preset", choices=("small", "paper"), default="small",
                        help="small: ModelConfig.small heads (128-wide FPN and mask heads); "
                             "paper: 256-wide heads as in the paper (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default=(320, 240),
                        help="image WIDTHxHEIGHT (default: 320x240)")
    parser.add_argument("--detections", type=int, default=30,
                        help="detections per image (default: %(default)s)")
    parser.add_argument("--rpn-pre", type=int, default=300,
                        help="RPN proposals per level before NMS at test (default: %(default)s)")
    parser.add_argument("--rpn-post", type=int, default=100,
                        help="RPN proposals after NMS at test (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--device", default="auto",
                        help="auto: CPU, and CUDA when available; cpu: CPU only; cuda: CPU "
                             "and CUDA (default: %(default)s)")
    parser.add_argument("--gpu-precisions", default="fp32,fp16,bf16",
                        help="comma-separated CUDA precisions of fp32, fp16, bf16 "
                             "(default: %(default)s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the CPU peak-memory processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.gpu_precisions.split(",")]
    problems = [f"--gpu-precisions: unknown precision {p!r} (fp32, fp16, bf16)"
                for p in precisions if p not in PRECISIONS]
    problems += [f"--{name}: must be >= {low}, got {getattr(args, name)}"
                 for name, low in (("reps", 1), ("warmup", 0), ("detections", 1))
                 if getattr(args, name) < low]
    if args.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device: must be auto, cpu or cuda, got {args.device!r}")
    backbones = [b.strip() for b in args.backbones.split(",")]
    problems += [f"--backbones: unknown backbone {b!r} ({', '.join(BACKBONES)})"
                 for b in backbones if b not in BACKBONES]
    if min(args.size) < 32:
        problems.append(f"--size: width and height must be >= 32, got {args.size}")
    if problems:
        parser.error("; ".join(problems))  # exits 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cuda = None if args.device == "cpu" else resolve_device(args.device)
    except InputError as exc:
        parser.error(str(exc))
    rows = []
    # Other processes on the machine distort CPU timings; the load average shows how much.
    load_before = os.getloadavg()[0]
    for backbone in backbones:
        rows += bench_backbone(backbone, args, torch.device("cpu"), "fp32")
        for precision in precisions:
            if cuda is None:
                rows += not_measured(backbone, args, precision, "--device cpu")
            elif cuda.type != "cuda":
                rows += not_measured(backbone, args, precision, "no CUDA device")
            elif precision == "bf16" and not torch.cuda.is_bf16_supported():
                rows += not_measured(backbone, args, precision, "no bfloat16 on this GPU")
            else:
                rows += bench_backbone(backbone, args, cuda, precision)
        print(f"done {backbone}", file=sys.stderr)
    load = (load_before, os.getloadavg()[0])
    print_table(rows, torch.get_num_threads(), load)
    if args.json:
        atomic_write_json(args.json, {"threads": torch.get_num_threads(),
                                      "load_average": load, "torch": torch.__version__,
                                      "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
