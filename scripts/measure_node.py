"""Measure the perception node: its overhead around the model, and frame age at 30 Hz.

    source .venv/bin/activate && source install/setup.bash
    python scripts/measure_node.py [--model PATH] [--frames 40] [--seconds 20] [--json OUT]

The node runs as its own process (``python -m orcnn_ros.perception_node``), exactly as
deployed. Without ``--model`` it gets a tiny untrained model with score threshold 0 and
``max_instances`` 20, which returns 20 instances per frame: the message and occlusion-graph
work of a busy scene at little model cost.

1. Overhead: this script publishes one 320 x 240 rgb8 frame at a time (stamped when sent),
   waits for its AmodalInstanceArray and reports ``round trip - inference_ms`` (message in
   -> message out minus model time, DDS both ways included) and the node's own
   ``latency_ms - inference_ms`` (subscription callback -> publish, minus model time).
2. Frame age: the sim camera publishes at 30 Hz for ``--seconds``; the age of each answer
   is its arrival time minus the camera's stamp. With latest-frame-only processing it stays
   near one to two inference times however long the camera runs.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tiny_model(path: Path) -> Path:
    import torch

    from orcnn_core.config import ModelConfig
    from orcnn_core.model import build_model
    from orcnn_core.weights import save_weights

    torch.manual_seed(0)
    cfg = ModelConfig.small(
        num_classes=3, class_names=["box", "can"], min_size=120, max_size=160,
        fpn_channels=32, box_head_dim=64, mask_head_channels=32, rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20, box_detections_per_img=20, box_score_thresh=0.0)
    save_weights(build_model(cfg), cfg, path)
    return path


def start(module: str, *ros_args: str, log: Path) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-P", "-m", module, "--ros-args", *ros_args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def stats(values) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return dict(n=len(values), median=round(statistics.median(values), 2),
                p90=round(values[min(len(values) - 1, int(0.9 * len(values)))], 2),
                max=round(values[-1], 2), mean=round(statistics.fmean(values), 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="weights file (default: a tiny model)")
    parser.add_argument("--score-threshold", type=float, default=0.0)
    parser.add_argument("--max-instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=40, help="frames for the overhead")
    parser.add_argument("--seconds", type=float, default=20.0, help="30 Hz camera run time")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    # A domain of its own unless one is set: other DDS traffic must not mix in.
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(150, 230)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from orcnn_core.synth import SynthConfig, generate_samples
    from orcnn_ros.conversions import array_to_image_msg
    from orcnn_ros.msg import AmodalInstanceArray

    work = Path(tempfile.mkdtemp(prefix="orcnn_measure_"))
    model = Path(args.model) if args.model else tiny_model(work / "tiny.safetensors")
    scenes = [s.image for s in generate_samples(8, 5, SynthConfig(width=args.width,
                                                                  height=args.height))]
    node = start("orcnn_ros.perception_node", "-r", "image:=/measure/image",
                 "-p", f"model_path:={model}", "-p", "device:=cpu",
                 "-p", f"score_threshold:={args.score_threshold}",
                 "-p", f"max_instances:={args.max_instances}", log=work / "node.log")
    rclpy.init()
    probe = rclpy.create_node("orcnn_measure")
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    answers = []
    probe.create_subscription(AmodalInstanceArray, "/amodal_instances",
                              lambda m: answers.append((m, time.time_ns())), reliable)
    pub = probe.create_publisher(Image, "/measure/image", reliable)
    results = dict(model=str(model), image=f"{args.width}x{args.height}",
                   domain=int(os.environ["ROS_DOMAIN_ID"]))
    camera = None
    try:
        deadline = time.monotonic() + 120
        while (pub.get_subscription_count() == 0
               or probe.count_publishers("/amodal_instances") == 0):
            rclpy.spin_once(probe, timeout_sec=0.1)
            if time.monotonic() > deadline or node.poll() is not None:
                print((work / "node.log").read_text(), file=sys.stderr)
                raise SystemExit("the node did not come up")

        # 1. Overhead, one frame at a time (the first few warm up caches).
        round_trip, overhead, in_node, inference, instances = [], [], [], [], []
        for k in range(args.frames + 3):
            msg = array_to_image_msg(scenes[k % len(scenes)], "rgb8")
            sent = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
            answers.clear()
            pub.publish(msg)
            limit = time.monotonic() + 30
            while not answers and time.monotonic() < limit:
                rclpy.spin_once(probe, timeout_sec=0.01)
            if not answers:
                raise SystemExit(f"no answer to frame {k} within 30 s")
            out, arrived = answers[0]
            if k < 3:
                continue
            total = (arrived - sent) / 1e6
            round_trip.append(total)
            overhead.append(total - out.inference_ms)
            in_node.append(out.latency_ms - out.inference_ms)
            inference.append(out.inference_ms)
            instances.append(len(out.instances))
            time.sleep(0.05)
        results["overhead"] = dict(
            instances=stats(instances), inference_ms=stats(inference),
            round_trip_ms=stats(round_trip), overhead_ms=stats(overhead),
            in_node_overhead_ms=stats(in_node))

        # 2. Frame age under a fast camera.
        answers.clear()
        camera = start("orcnn_ros.sim_camera", "-r", "image:=/measure/image",
                       "-p", f"rate:={args.rate}", "-p", f"width:={args.width}",
                       "-p", f"height:={args.height}", "-p", "reliable:=false",
                       log=work / "camera.log")
        first = None
        end = time.monotonic() + args.seconds + 30
        while time.monotonic() < end:
            rclpy.spin_once(probe, timeout_sec=0.05)
            if answers and first is None:
                first = time.monotonic()
                end = first + args.seconds
        stop(camera)
        camera = None
        ages = [(arrived - (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec)) / 1e6
                for m, arrived in answers]
        inference = [m.inference_ms for m, _ in answers]
        span = args.seconds if first else 0
        results["camera"] = dict(
            rate_hz=args.rate, seconds=args.seconds, answers=len(answers),
            output_rate_hz=round(len(answers) / span, 2) if span else 0.0,
            frame_age_ms=stats(ages), inference_ms=stats(inference),
            frame_age_over_inference=round(statistics.median(
                a / i for a, i in zip(ages, inference)), 2) if ages else None,
            age_first_half_ms=stats(ages[:len(ages) // 2]),
            age_second_half_ms=stats(ages[len(ages) // 2:]))
    finally:
        if camera is not None:
            stop(camera)
        stop(node)
        probe.destroy_node()
        rclpy.try_shutdown()

    o, c = results["overhead"], results["camera"]
    print(f"model {results['model']}, {results['image']} frames, "
          f"domain {results['domain']}")
    print(f"overhead at {o['instances']['median']:.0f} instances ({o['overhead_ms']['n']} "
          f"frames): message in -> message out minus model time "
          f"{o['overhead_ms']['median']:.1f} ms median, {o['overhead_ms']['p90']:.1f} ms p90 "
          f"(model {o['inference_ms']['median']:.1f} ms; inside the node "
          f"{o['in_node_overhead_ms']['median']:.1f} ms median)")
    if c["answers"]:
        print(f"{c['rate_hz']:g} Hz camera for {c['seconds']:g} s: {c['answers']} answers "
              f"({c['output_rate_hz']} Hz), frame age {c['frame_age_ms']['median']:.0f} ms "
              f"median, {c['frame_age_ms']['p90']:.0f} ms p90, {c['frame_age_ms']['max']:.0f} "
              f"ms max (model {c['inference_ms']['median']:.0f} ms median; age / inference "
              f"{c['frame_age_over_inference']}; first half "
              f"{c['age_first_half_ms']['median']:.0f} ms, second half "
              f"{c['age_second_half_ms']['median']:.0f} ms median)")
    else:
        print("no answers during the camera run", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if c["answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
