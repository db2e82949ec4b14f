"""ORCNN vs torchvision Mask R-CNN: inference and one training step, same run.

Both models get the same backbone, image size, proposal counts, heads and (copied) weights,
so they find the same detections; ORCNN differs by its second (visible) mask head, the
occlusion logits and its losses. Mask R-CNN's inference is torchvision's forward, which
pastes every mask into the full image; ORCNN's forward returns 28 x 28 logits per box and
its Predictor (also timed) turns them into label crops over each amodal box.

Untrained models score every box alike, so the box score threshold is 0 and every image
yields exactly ``--detections`` detections: the mask heads run on that many boxes, as they
would on a scene with that many objects.

    python benchmarks/bench_model.py                       # small preset, 320x240, CPU
    python benchmarks/bench_model.py --preset paper --backbones resnet50_fpn --size 640x480
    python benchmarks/bench_model.py --backbones resnet18_fpn,mobilenet_v3_fpn,resnet50_fpn

Prints a markdown table of medians (warm-up excluded) and the ORCNN / Mask R-CNN ratios;
``--json PATH`` also writes the numbers. On a shared machine use ``--threads 1``: with two
threads on two cores, another busy process makes OpenMP threads spin and timings explode.

Measured (2-core CPU, --threads 1, 30 detections, inference ms ORCNN / Mask R-CNN):

    small preset 320x240   resnet18_fpn 185 / 138 (1.34)  mobilenet_v3_fpn 113 / 77 (1.48)
                           resnet50_fpn 272 / 218 (1.25)
    small preset 320x240, 10 detections   resnet18_fpn 105 / 93 (1.13)
    small preset 640x480   resnet18_fpn 370 / 340 (1.09)
    paper preset 640x480   resnet50_fpn 1194 / 1067 (1.12)

The difference is ORCNN's second mask head, as many FLOPs as Mask R-CNN's own mask head;
it weighs most with small images and many detections. Training steps differ by 3-11 %.
"""

import argparse
import os
import platform
import statistics
import sys
import time
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

from orcnn_core.config import ModelConfig  # noqa: E402
from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_core.model import build_backbone, build_model, roi_feature_names  # noqa: E402
from orcnn_core.predictor import Predictor, resolve_device  # noqa: E402

# Anchor sizes (one per feature map) scaled for the image size: the 5-level FPN of the
# ResNets, the 3 maps of torchvision's MobileNetV3 FPN.
ANCHORS = {5: (16, 32, 64, 128, 256), 3: (32, 64, 128)}


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


def build_maskrcnn(cfg: ModelConfig, orcnn) -> MaskRCNN:
    """torchvision's Mask R-CNN with ORCNN's parts and weights (amodal head as mask head)."""
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
        mask_head=MaskRCNNHeads(channels, (width,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(width, width, cfg.mask_classes),
    )
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


def bench_backbone(backbone, args, device):
    width, height = args.size
    cfg = bench_config(backbone, args.preset, width, height, args.detections, args.rpn_pre,
                       args.rpn_post)
    torch.manual_seed(0)
    orcnn = build_model(cfg)
    mrcnn = build_maskrcnn(cfg, orcnn)
    orcnn.to(device)
    mrcnn.to(device)
    rng = np.random.default_rng(0)
    image, target = synthetic_sample(width, height, rng)
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
    orcnn_target = {k: v.to(device) for k, v in target.items()}
    mrcnn_target = {"boxes": orcnn_target["boxes"], "labels": orcnn_target["labels"],
                    "masks": orcnn_target["amodal_masks"]}
    models = {"Mask R-CNN": (mrcnn, mrcnn_target), "ORCNN": (orcnn, orcnn_target)}

    # Inference: the two forwards and ORCNN's Predictor (image -> label crops).
    predictor = Predictor(orcnn, device=device)
    mrcnn.eval()
    with torch.inference_mode():
        detections = {name: len(m([x])[0]["boxes"]) for name, (m, _) in models.items()}
        infer_mr, infer_or, pred = median_ms(
            [lambda: mrcnn([x]), lambda: orcnn([x]), lambda: predictor(image)],
            args.reps, args.warmup, device)

    # One training step each (forward, backward, SGD update).
    steps = []
    for model, tgt in models.values():
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=1e-5, momentum=0.9)

        def step(model=model, tgt=tgt, optimizer=optimizer):
            losses = model([x], [tgt])
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        steps.append(step)
    train_mr, train_or = median_ms(steps, args.reps, args.warmup, device)

    rows = []
    for name, infer, pred_ms, train in (("Mask R-CNN", infer_mr, None, train_mr),
                                        ("ORCNN", infer_or, pred, train_or)):
        rows.append({
            "model": name, "backbone": backbone, "preset": args.preset,
            "image": f"{width}x{height}", "detections": detections[name],
            "inference_ms": infer[0], "inference_min_ms": infer[1],
            "predictor_ms": pred_ms[0] if pred_ms else None,
            "train_step_ms": train[0], "train_step_min_ms": train[1],
            "params_m": sum(p.numel() for p in models[name][0].parameters()) / 1e6,
            "inference_ratio": infer[0] / infer_mr[0], "train_ratio": train[0] / train_mr[0],
        })
    return rows


def print_table(rows, device, threads, load):
    print(f"\ndevice {device} ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}, {threads} threads, load average {load[0]:.1f} before / "
          f"{load[1]:.1f} after; medians in ms\n")
    print("| model | backbone | preset | image | dets | inference | predictor | train step "
          "| params (M) | inference ratio | train ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pred = f"{r['predictor_ms']:.1f}" if r["predictor_ms"] is not None else "-"
        print(f"| {r['model']} | {r['backbone']} | {r['preset']} | {r['image']} | "
              f"{r['detections']} | {r['inference_ms']:.1f} | {pred} | "
              f"{r['train_step_ms']:.1f} | {r['params_m']:.1f} | {r['inference_ratio']:.2f} | "
              f"{r['train_ratio']:.2f} |")


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
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    # Other processes on the machine distort CPU timings; the load average shows how much.
    load_before = os.getloadavg()[0]
    for backbone in args.backbones.split(","):
        rows += bench_backbone(backbone.strip(), args, device)
        print(f"done {backbone}", file=sys.stderr)
    load = (load_before, os.getloadavg()[0])
    print_table(rows, device, torch.get_num_threads(), load)
    if args.json:
        atomic_write_json(args.json, {"device": str(device),
                                      "threads": torch.get_num_threads(), "load_average": load,
                                      "torch": torch.__version__, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
