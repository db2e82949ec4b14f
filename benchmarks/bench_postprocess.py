"""Mask post-processing: ORCNN's label crops vs full-frame pasting as Mask R-CNN does it.

Both start from the heads' output, D detections with amodal and visible M x M mask logits
over their amodal boxes, and end with numpy masks:

* crops: :func:`orcnn_core.predictor.label_crops`, one uint8 crop over each integer amodal
  box (0 background, 1 visible, 2 amodal but hidden, including the part outside the image),
  then the copy to numpy, as :class:`orcnn_core.predictor.Predictor` does;
* paste: torchvision's ``paste_masks_in_image`` (what ``MaskRCNN.forward`` returns) for the
  amodal and for the visible probabilities, each D x H x W, thresholded at 0.5 as a Mask
  R-CNN user does, then to numpy. The amodal part outside the image is lost.

With the ROS 2 workspace sourced (``source install/setup.bash``) it also times turning each
result into the mono8 ``sensor_msgs/Image`` masks a node publishes: for crops the node's own
:func:`orcnn_ros.conversions.instance_array_msg` (the whole AmodalInstanceArray, with areas
and occlusion flags), for pasting one full-frame label image (0 / 1 / 2) per instance.

The detections are synthetic, like a bin-picking scene: boxes 8 to 40 % of the image side,
about one in four cut by the image border, elliptic amodal masks partly hidden. Times are
medians of ``--reps`` repetitions after ``--warmup`` untimed ones, the two methods
alternating; the ratio is paste / crops (how many times faster the crops are).

    python benchmarks/bench_postprocess.py --threads 1
    python benchmarks/bench_postprocess.py --sizes 640x480 --instances 20 --json out.json
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

# Run from a checkout; appended, so that a built orcnn_ros (with its messages) comes first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from orcnn_core.errors import InputError  # noqa: E402
from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_core.devices import resolve_device  # noqa: E402
from orcnn_core.prediction import HIDDEN, VISIBLE, Prediction  # noqa: E402
from orcnn_core.predictor import label_crops  # noqa: E402


def synthetic_detections(count, width, height, cells=28, seed=0):
    """``count`` detections on a width x height image: boxes float [D, 4] (amodal, may leave
    the image), amodal and visible logits float [D, cells, cells]."""
    rng = np.random.default_rng(seed)
    side = min(width, height)
    w = rng.uniform(0.08, 0.4, count) * side
    h = w * rng.uniform(0.6, 1.6, count)
    cx = rng.uniform(0.05, 0.95, count) * width  # a quarter of the boxes cross the border
    cy = rng.uniform(0.05, 0.95, count) * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    # An ellipse inscribed in the box (logit 8 at the centre, 0 on the ellipse) ...
    centres = (np.arange(cells) + 0.5) / cells * 2 - 1
    radius = centres[None, :] ** 2 + centres[:, None] ** 2
    amodal = np.broadcast_to(8 * (1 - radius), (count, cells, cells))
    amodal = amodal + rng.normal(0, 0.5, (count, cells, cells))
    # ... of which everything right of a random vertical cut is hidden by a neighbour.
    cut = rng.uniform(-0.5, 1.5, count)[:, None, None]
    visible = np.where(centres[None, None, :] > cut, -8.0, amodal)
    return (torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(amodal, dtype=torch.float32),
            torch.tensor(visible, dtype=torch.float32))


def crops_to_numpy(boxes, amodal_logits, visible_logits, image_size):
    """ORCNN: label crops, then one device-to-host copy (as Predictor does)."""
    rois, crops = label_crops(boxes, amodal_logits, visible_logits, image_size)
    if not crops:
        return rois.cpu().numpy(), []
    flat = torch.cat([c.flatten() for c in crops]).cpu().numpy()
    pieces = np.split(flat, np.cumsum([c.numel() for c in crops])[:-1])
    return rois.cpu().numpy().astype(np.int32), [p.reshape(c.shape)
                                                 for p, c in zip(pieces, crops)]


def paste_to_numpy(boxes, amodal_logits, visible_logits, image_size):
    """Mask R-CNN: amodal and visible probabilities pasted into full frames, thresholded."""
    masks = []
    for logits in (amodal_logits, visible_logits):
        pasted = paste_masks_in_image(logits.sigmoid()[:, None], boxes, image_size, padding=1)
        masks.append((pasted[:, 0] >= 0.5).cpu().numpy())
    return masks


def _ros():
    """The ROS 2 pieces that build the node's messages, or None where they do not import."""
    try:
        from sensor_msgs.msg import Image
        from std_msgs.msg import Header

        from orcnn_core.occlusion import occlusion_graph
        from orcnn_ros.conversions import instance_array_msg
    except ImportError:
        return None
    return SimpleNamespace(Image=Image, header=Header(frame_id="camera"),
                           occlusion_graph=occlusion_graph,
                           instance_array_msg=instance_array_msg)


def frame_messages(ros, amodal, visible):
    """One full-frame mono8 label image (0 / 1 / 2 as in the crops) per instance."""
    labels = amodal.astype(np.uint8) * HIDDEN
    labels[visible & amodal] = VISIBLE
    height, width = labels.shape[1:]
    return [ros.Image(header=ros.header, height=height, width=width, encoding="mono8",
                      is_bigendian=0, step=width, data=frame.tobytes()) for frame in labels]


def median_ms(fns, reps, warmup, device):
    """Median wall time in ms of each callable; repetitions alternate between them."""
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
    return [statistics.median(t) for t in times]


def bench(width, height, count, args, device, ros):
    boxes, amodal, visible = (t.to(device) for t in
                              synthetic_detections(count, width, height, seed=args.seed))
    size = (height, width)
    rois, crops = crops_to_numpy(boxes, amodal, visible, size)
    full = paste_to_numpy(boxes, amodal, visible, size)
    row = {"image": f"{width}x{height}", "instances": count, "device": device.type,
           "crops_bytes": int(sum(c.nbytes for c in crops)),
           "paste_bytes": int(sum(m.nbytes for m in full))}
    row["crops_ms"], row["paste_ms"] = median_ms(
        [lambda: crops_to_numpy(boxes, amodal, visible, size),
         lambda: paste_to_numpy(boxes, amodal, visible, size)], args.reps, args.warmup, device)
    row["ratio"] = row["paste_ms"] / row["crops_ms"]
    row["crops_messages_ms"] = row["paste_messages_ms"] = None
    if ros is not None:
        fields = dict(boxes=boxes.cpu().numpy(), scores=np.linspace(1, 0.5, count,
                                                                    dtype=np.float32),
                      labels=np.ones(count, np.int64), class_names=["object"] * count,
                      rois=rois, crops=crops, image_size=size)
        # The occlusion graph is not mask post-processing: computed once, untimed.
        graph = ros.occlusion_graph(Prediction(**fields))

        def crop_messages():
            # A new Prediction each time: it caches the areas the message needs.
            ros.instance_array_msg(Prediction(**fields), graph, ros.header)
        row["crops_messages_ms"], row["paste_messages_ms"] = median_ms(
            [crop_messages, lambda: frame_messages(ros, *full)], args.reps, args.warmup,
            torch.device("cpu"))
    return row


def print_table(rows, device, threads, load, messages):
    print(f"\n{platform.processor() or platform.machine()}, device {device}, torch "
          f"{torch.__version__}, {threads} CPU threads, load average {load[0]:.1f} before / "
          f"{load[1]:.1f} after; medians in ms; ratio = paste / crops")
    if not messages:
        print("mask images: not measured (orcnn_ros not importable: source "
              "install/setup.bash)")
    print("\n| image | instances | crops | paste | ratio | crops KB | paste KB "
          "| crops + messages | paste + messages |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        msg = ["-", "-"]
        if r["crops_messages_ms"] is not None:
            msg = [f"{r['crops_ms'] + r['crops_messages_ms']:.2f}",
                   f"{r['paste_ms'] + r['paste_messages_ms']:.2f}"]
        print(f"| {r['image']} | {r['instances']} | {r['crops_ms']:.2f} | "
              f"{r['paste_ms']:.2f} | {r['ratio']:.1f} | {r['crops_bytes'] / 1024:.0f} | "
              f"{r['paste_bytes'] / 1024:.0f} | {msg[0]} | {msg[1]} |")


def _sizes(text):
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be WIDTHxHEIGHT[,...], got {text!r}")
    return sizes


def _counts(text):
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"instances must be positive integers N[,...], got "
                                         f"{text!r}")
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=_sizes("320x240,640x480"),
                        help="image sizes WIDTHxHEIGHT, comma-separated (default: "
                             "320x240,640x480)")
    parser.add_argument("--instances", type=_counts, default=_counts("5,20,50"),
                        help="detections per image, comma-separated (default: 5,20,50)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the detections")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and "
                     f"{args.warmup}")  # exits 2
    try:
        device = resolve_device(args.device)
    except InputError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    ros = _ros()
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        rows = [bench(width, height, count, args, device, ros)
                for width, height in args.sizes for count in args.instances]
    load = (load_before, os.getloadavg()[0])
    print_table(rows, device, torch.get_num_threads(), load, ros is not None)
    if args.json:
        atomic_write_json(args.json, {"device": str(device),
                                      "threads": torch.get_num_threads(),
                                      "load_average": load, "torch": torch.__version__,
                                      "messages_measured": ros is not None,
                                      "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
