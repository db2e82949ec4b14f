"""Benchmark the perception node as deployed: its overhead around the model, and latency,
frame age and drops under a 30 Hz camera, all over DDS.

    source .venv/bin/activate && source install/setup.bash
    python benchmarks/bench_node.py                        # tiny untrained model, ~70 s
    python benchmarks/bench_node.py --model bundled        # the bundled demo model, ~100 s
    python benchmarks/bench_node.py --model PATH --json results.json

The node runs as its own process (``python -P -m orcnn_ros.perception_node``), exactly as
deployed, with ``OMP_NUM_THREADS`` set to ``--threads`` (default 1); this process is the
client (its answer times include deserialising the answer, as for any subscriber). ``--model tiny``
(default) is an untrained model with score threshold 0: 20 instances in every frame at
little model cost, so the node's own work (occlusion graph, message) weighs most.

1. One frame at a time (``--frames``; 320 x 240 rgb8, reliable): this process publishes a
   frame, stamped when sent, and waits for its AmodalInstanceArray. Per frame: the round
   trip (sent -> answer received), the node's ``latency_ms`` (subscription callback ->
   publish) and ``inference_ms`` (the model). *Node overhead* = ``latency_ms -
   inference_ms``: what the node adds to the model (conversion, occlusion graph, message).
   *Round-trip overhead* = round trip - ``inference_ms``: that plus DDS both ways,
   (de)serialisation on both sides and the executors' wake-ups. Measured with
   ``max_instances`` instances per frame (score threshold 0), then with none (score
   threshold 1, a black frame): the difference is the cost of the instances.
2. Camera: ``orcnn_ros.sim_camera`` publishes at ``--rate`` Hz (best effort, as a camera
   driver does) for ``--seconds`` per ``fresh_frame_wait`` value (``--fresh-frame-wait``,
   set at run time, same camera and node). *Frame age* = answer received - camera stamp,
   also in inference periods (age / the answer's ``inference_ms``). *Drop rate* = frames
   the node dropped (replaced by a newer one before the model got to them) / frames it
   received, from its /diagnostics counters.

Prints markdown tables of p50 / p95 (medians and 95th percentiles over frames); ``--json
PATH`` also writes every number. Timings on a shared machine are noisy: compare numbers
taken side by side in one run, and repeat.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_TOPIC = "/bench/image"
DIAGNOSTICS_PERIOD = 0.25


def model_file(name: str):
    """The weights file ``--model`` names; None for the tiny model (made later)."""
    if name == "tiny":
        return None
    if name == "bundled":
        from orcnn_ros.perception_node import default_model_path

        return default_model_path()
    return Path(name)


def start(module: str, ros_args: list, log: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-P", "-m", module, "--ros-args", *ros_args],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def summary(values) -> dict:
    """n, p50, p95, max (ms or ratios) of a list of numbers; {} when empty."""
    if not len(values):
        return {}
    values = np.asarray(values, np.float64)
    return dict(n=int(values.size), p50=round(float(np.percentile(values, 50)), 3),
                p95=round(float(np.percentile(values, 95)), 3),
                max=round(float(values.max()), 3))


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


class Client:
    """This process's node: publishes frames, collects answers and the node's counters."""

    def __init__(self, node_name: str):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter_client import AsyncParameterClient
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from orcnn_ros.msg import AmodalInstanceArray

        self.node = rclpy.create_node("orcnn_bench_client")
        # An executor of its own: rclpy.spin_once adds and removes the node on every call.
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.answers = []  # (message, arrival time ns)
        self.node.create_subscription(AmodalInstanceArray, "/amodal_instances",
                                      lambda m: self.answers.append((m, time.time_ns())),
                                      reliable)
        self.counters = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._diagnostics, 10)
        self.pub = self.node.create_publisher(Image, IMAGE_TOPIC, reliable)
        self.params = AsyncParameterClient(self.node, node_name)

    def _diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(": inference"):
                values = {kv.key: kv.value for kv in status.values}
                if values.get("state") == "active":
                    self.counters = dict(values, at=time.monotonic())

    def spin_until(self, predicate, timeout: float, what: str, node_proc=None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_node: no {what} within {timeout:.0f} s")
            if node_proc is not None and node_proc.poll() is not None:
                raise SystemExit(f"bench_node: the node exited ({node_proc.returncode})")
            self.executor.spin_once(timeout_sec=0.01)

    def spin_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.01)

    def set_parameters(self, **values) -> None:
        from rclpy.parameter import Parameter

        future = self.params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        self.spin_until(future.done, 30, "parameter service answer")
        for name, result in zip(values, future.result().results):
            if not result.successful:
                raise SystemExit(f"bench_node: the node rejected {name}: {result.reason}")

    def fresh_counters(self) -> dict:
        """The node's counters from a /diagnostics message sent after this call."""
        asked = time.monotonic()
        self.spin_until(lambda: self.counters.get("at", 0.0) > asked + DIAGNOSTICS_PERIOD,
                        10, "diagnostics message")
        return {k: int(self.counters[k]) for k in ("received", "processed", "dropped")}


def one_at_a_time(client, frames: int, image, node_proc) -> dict:
    """Publish ``frames`` frames one by one (3 more to warm up); per-frame timings."""
    from orcnn_ros.conversions import array_to_image_msg

    rows = []
    for k in range(frames + 3):
        msg = array_to_image_msg(image, "rgb8")
        sent = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
        client.answers.clear()
        client.pub.publish(msg)
        client.spin_until(lambda: any(stamp_ns(m) == sent for m, _ in client.answers), 60,
                          f"answer to frame {k}", node_proc)
        out, arrived = next((m, t) for m, t in client.answers if stamp_ns(m) == sent)
        if k >= 3:
            rows.append(((arrived - sent) / 1e6, out.latency_ms, out.inference_ms,
                         len(out.instances)))
        client.spin_for(0.05)
    round_trip, latency, inference, instances = (list(c) for c in zip(*rows))
    return dict(
        instances=summary(instances), inference_ms=summary(inference),
        latency_ms=summary(latency), round_trip_ms=summary(round_trip),
        node_overhead_ms=summary([a - b for a, b in zip(latency, inference)]),
        round_trip_overhead_ms=summary([a - b for a, b in zip(round_trip, inference)]))


def camera_window(client, seconds: float, rate: float) -> dict:
    """Answers to the running camera's frames over ``seconds``, and the node's counters."""
    before = client.fresh_counters()
    client.answers.clear()
    start = time.time_ns()
    client.spin_for(seconds)
    end = time.time_ns()
    after = client.fresh_counters()
    answers = [(m, t) for m, t in client.answers if start <= t <= end
               and m.header.frame_id == "sim_camera_optical_frame"]
    ages = [(t - stamp_ns(m)) / 1e6 for m, t in answers]
    inference = [m.inference_ms for m, _ in answers]
    latency = [m.latency_ms for m, _ in answers]
    delta = {k: after[k] - before[k] for k in after}
    span = (end - start) / 1e9
    return dict(
        seconds=round(span, 2), received_rate_hz=round(delta["received"] / span, 2),
        answers=len(answers), output_rate_hz=round(len(answers) / span, 2),
        received=delta["received"], dropped=delta["dropped"],
        processed=delta["processed"],
        drop_rate=round(delta["dropped"] / delta["received"], 3) if delta["received"] else None,
        frame_age_ms=summary(ages), inference_ms=summary(inference),
        latency_ms=summary(latency),
        frame_age_inferences=summary([a / i for a, i in zip(ages, inference)]),
        node_overhead_ms=summary([a - b for a, b in zip(latency, inference)]))


def fmt(stats: dict, digits: int = 1) -> str:
    if not stats:
        return "-"
    return f"{stats['p50']:.{digits}f} / {stats['p95']:.{digits}f}"


def report(results: dict) -> str:
    lines = [f"model {results['model']} ({results['instances_asked']} instances asked), "
             f"{results['image']} frames, node with {results['threads']} thread(s), "
             f"ROS_DOMAIN_ID {results['domain']}", "",
             "One frame at a time (p50 / p95, ms):", "",
             "| | " + " | ".join(results["one_at_a_time"]) + " |",
             "|---|" + "---|" * len(results["one_at_a_time"])]
    columns = list(results["one_at_a_time"].values())
    for key, label in (("instances", "instances"), ("inference_ms", "model (inference_ms)"),
                       ("node_overhead_ms", "**node overhead** (latency_ms - inference_ms)"),
                       ("latency_ms", "node latency (latency_ms)"),
                       ("round_trip_ms", "round trip"),
                       ("round_trip_overhead_ms", "round trip - inference_ms")):
        lines.append(f"| {label} | " + " | ".join(fmt(c[key]) for c in columns) + " |")
    cams = results["camera"]
    lines += ["", f"{results['rate_hz']:g} Hz sim camera, {results['seconds']:g} s per "
              "fresh_frame_wait (p50 / p95):", "",
              "| fresh_frame_wait | " + " | ".join(cams) + " |",
              "|---|" + "---|" * len(cams)]
    rows = (("frame age, ms", lambda c: fmt(c["frame_age_ms"])),
            ("frame age / inference_ms", lambda c: fmt(c["frame_age_inferences"], 2)),
            ("model (inference_ms)", lambda c: fmt(c["inference_ms"])),
            ("node latency, ms", lambda c: fmt(c["latency_ms"])),
            ("node overhead, ms", lambda c: fmt(c["node_overhead_ms"])),
            ("answers per second", lambda c: f"{c['output_rate_hz']:.1f}"),
            ("frames per second received by the node",
             lambda c: f"{c['received_rate_hz']:.1f}"),
            ("drop rate (dropped / received by the node)",
             lambda c: "-" if c["drop_rate"] is None
             else f"{c['drop_rate']:.2f} ({c['dropped']} / {c['received']})"))
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(c) for c in cams.values()) + " |")
    return "\n".join(lines)


def parse_waits(text: str) -> list:
    """"1.0,0" -> [1.0, 0.0]; "none" -> [None] (leave the node's setting alone)."""
    if text.strip().lower() == "none":
        return [None]
    try:
        waits = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1.0,0 or none, got {text!r}")
    if not waits or any(not 0.0 <= w <= 2.0 for w in waits):
        raise argparse.ArgumentTypeError(f"values must be in [0, 2], got {text!r}")
    return waits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny (an untrained model, default), bundled (the demo model) or "
                             "a weights file")
    parser.add_argument("--max-instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=40, help="frames one at a time")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="camera seconds per fresh_frame_wait value")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    parser.add_argument("--fresh-frame-wait", type=parse_waits, default=[1.0, 0.0],
                        help="values to measure the camera with, e.g. 1.0,0; none: the "
                             "node's default only (default 1.0,0)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the node (1: sane on a shared machine)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be positive" for name, value in (
        ("frames", args.frames), ("seconds", args.seconds), ("rate", args.rate),
        ("threads", args.threads), ("max-instances", args.max_instances),
        ("width", args.width - 15), ("height", args.height - 15)) if value <= 0]
    model = model_file(args.model)
    if model is not None and not model.is_file():
        problems.append(f"--model: {model} does not exist")
    if problems:
        parser.error("; ".join(problems))  # exits 2
    # A domain of its own unless one is set: other DDS traffic must not mix in.
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(150, 230)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    import rclpy

    from orcnn_core.fileio import atomic_write_json
    from orcnn_core.synth import SynthConfig, generate_samples

    work = Path(tempfile.mkdtemp(prefix="orcnn_bench_node_"))
    from orcnn_ros.soak import tiny_model

    model = model or tiny_model(work / "tiny.safetensors")
    scene = next(iter(generate_samples(1, 5, SynthConfig(width=args.width,
                                                         height=args.height)))).image
    node_args = ["-r", f"image:={IMAGE_TOPIC}", "-p", f"model_path:={model}",
                 "-p", "device:=cpu", "-p", "score_threshold:=0.0",
                 "-p", f"max_instances:={args.max_instances}",
                 "-p", f"diagnostics_period:={DIAGNOSTICS_PERIOD}"]
    node = start("orcnn_ros.perception_node", node_args, work / "node.log", args.threads)
    camera = None
    rclpy.init()
    client = Client("orcnn_perception")
    results = dict(model=str(model), image=f"{args.width}x{args.height}",
                   instances_asked=args.max_instances, threads=args.threads,
                   domain=int(os.environ["ROS_DOMAIN_ID"]), rate_hz=args.rate,
                   seconds=args.seconds, one_at_a_time={}, camera={})
    try:
        try:
            client.spin_until(lambda: client.pub.get_subscription_count() > 0
                              and client.node.count_publishers("/amodal_instances") > 0
                              and client.params.wait_for_services(timeout_sec=0.01),
                              120, "node coming up", node)
        except SystemExit:
            print((work / "node.log").read_text(), file=sys.stderr)
            raise
        results["one_at_a_time"][f"{args.max_instances} instances"] = one_at_a_time(
            client, args.frames, scene, node)
        client.set_parameters(score_threshold=1.0)
        results["one_at_a_time"]["no instances"] = one_at_a_time(
            client, args.frames, np.zeros_like(scene), node)
        client.set_parameters(score_threshold=0.0)

        camera = start("orcnn_ros.sim_camera", [
            "-r", f"image:={IMAGE_TOPIC}", "-p", f"rate:={args.rate}",
            "-p", f"width:={args.width}", "-p", f"height:={args.height}",
            "-p", "reliable:=false"], work / "camera.log", 1)
        client.spin_until(lambda: client.answers and any(
            m.header.frame_id == "sim_camera_optical_frame" for m, _ in client.answers),
            60, "answer to a camera frame", node)
        for wait in args.fresh_frame_wait:
            if wait is not None:
                client.set_parameters(fresh_frame_wait=wait)
            client.spin_for(1.0)  # settle: the node learns the camera interval
            key = "node default" if wait is None else f"{wait:g}"
            results["camera"][key] = camera_window(client, args.seconds, args.rate)
    finally:
        if camera is not None:
            stop(camera)
        stop(node)
        client.executor.shutdown()
        client.node.destroy_node()
        rclpy.try_shutdown()

    print(report(results))
    if args.json:
        atomic_write_json(args.json, results, indent=2)
    return 0 if all(c["answers"] for c in results["camera"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
