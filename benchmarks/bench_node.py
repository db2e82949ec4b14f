"""Benchmark the perception node as deployed: its overhead around the model (against the
previous version of the code, in the same run), and latency, frame age and drops under a
30 Hz camera, all over DDS.

    source .venv/bin/activate && source install/setup.bash
    python -P benchmarks/bench_node.py --threads 1                  # tiny untrained model
    python -P benchmarks/bench_node.py --threads 1 --model bundled  # the bundled demo model
    python -P benchmarks/bench_node.py --model PATH --json results.json

The nodes run as their own processes (``python -P -m orcnn_ros.perception_node``), exactly
as deployed, with ``OMP_NUM_THREADS`` set to ``--threads`` (default 1); this process is the
client (its answer times include deserialising the answer, as for any subscriber). ``--model
tiny`` (default) is an untrained model with score threshold 0: up to 20 instances in every
frame at little model cost, so the node's own work (occlusion graph, message) weighs most.

*Node overhead* = ``latency_ms - inference_ms`` of an answer: subscription callback ->
result ready, minus the model (``inference_ms`` includes the label and probability crops):
what the node adds (conversion, occlusion graph and pick order, message).

1. Previous version as peer (``--previous``, default commit bcc6d3e; ``none`` skips it): the
   node of that commit (``git archive`` into a temporary folder, run on the message package
   built here, so the message definitions must be the same, and it must read the model
   file) and this checkout's node, both with score threshold 0 and ``max_instances`` each
   of ``--instances`` (5, 20, 50), take turns frame by frame (``--frames`` each): p50 / p95
   of the node overhead of both.
2. One frame at a time (``--frames``; 320 x 240 rgb8, reliable), this node alone: per frame
   the round trip (sent -> answer received), ``latency_ms`` and ``inference_ms``, with
   ``--max-instances`` instances per frame (score threshold 0), then with none (score
   threshold 1, a black frame): the difference is the cost of the instances.
   *Round-trip overhead* = round trip - ``inference_ms``: the node overhead plus DDS both
   ways, (de)serialisation on both sides and the executors' wake-ups.
3. Camera: ``orcnn_ros.sim_camera`` publishes at ``--rate`` Hz (best effort, as a camera
   driver does) for ``--seconds`` per ``fresh_frame_wait`` value (``--fresh-frame-wait``,
   set at run time, same camera and node). *Frame age* = answer received - camera stamp,
   also in inference periods (age / the answer's ``inference_ms``). *Drop rate* = frames
   the node dropped (replaced by a newer one before the model got to them) / frames it
   received, from its /diagnostics counters.

Prints markdown tables of p50 / p95 (medians and 95th percentiles over frames) and the load
average before and after; ``--json PATH`` also writes every number. Timings on a shared
machine are noisy: compare numbers taken side by side in one run, and repeat.
"""

import argparse
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOPIC = "/bench/image"
PREVIOUS_TOPICS = ("/bench/previous/image", "/bench/previous/amodal_instances")
DIAGNOSTICS_PERIOD = 0.25
#: The node before its messages were built slot by slot. Older versions cannot read the
#: bundled model's config (fields they do not know), so the peer has to be this recent.
PREVIOUS = "bcc6d3e"


def model_file(name: str):
    """The weights file ``--model`` names; None for the tiny model (made later)."""
    if name == "tiny":
        return None
    if name == "bundled":
        from orcnn_ros.perception_node import default_model_path

        return default_model_path()
    return Path(name)


def start(module: str, ros_args: list, log: Path, threads: int,
          python_path: str = "") -> subprocess.Popen:
    """``python -P -m module``; ``python_path`` goes in front of PYTHONPATH (a previous
    version's source tree)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, env.get("PYTHONPATH"))
                                            if p)
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


class Target:
    """One node under test as the client sees it: where its frames go, its answers (message,
    arrival time ns) and its parameter service."""

    def __init__(self, client_node, node_name: str, image_topic: str, out_topic: str):
        from rclpy.parameter_client import AsyncParameterClient
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from orcnn_ros.msg import AmodalInstanceArray

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.out_topic = out_topic
        self.answers = []
        client_node.create_subscription(AmodalInstanceArray, out_topic,
                                        lambda m: self.answers.append((m, time.time_ns())),
                                        reliable)
        self.pub = client_node.create_publisher(Image, image_topic, reliable)
        self.params = AsyncParameterClient(client_node, node_name)


class Client:
    """This process's node: publishes frames, collects answers and the node's counters.
    ``pub``, ``answers`` and ``params`` are this checkout's node's (the first target)."""

    def __init__(self, node_name: str):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        self.node = rclpy.create_node("orcnn_bench_client")
        # An executor of its own: rclpy.spin_once adds and removes the node on every call.
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.current = Target(self.node, node_name, IMAGE_TOPIC, "/amodal_instances")
        self.pub, self.answers, self.params = (self.current.pub, self.current.answers,
                                               self.current.params)
        self.counters = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._diagnostics, 10)

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

    def set_parameters(self, target=None, **values) -> None:
        from rclpy.parameter import Parameter

        params = (target or self.current).params
        future = params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        self.spin_until(future.done, 30, "parameter service answer")
        for name, result in zip(values, future.result().results):
            if not result.successful:
                raise SystemExit(f"bench_node: the node rejected {name}: {result.reason}")

    def ready(self, target) -> bool:
        """Whether ``target``'s node subscribes to its frames, publishes its answers and
        answers parameter requests."""
        return (target.pub.get_subscription_count() > 0
                and self.node.count_publishers(target.out_topic) > 0
                and target.params.wait_for_services(timeout_sec=0.01))

    def fresh_counters(self) -> dict:
        """The node's counters from a /diagnostics message sent after this call."""
        asked = time.monotonic()
        self.spin_until(lambda: self.counters.get("at", 0.0) > asked + DIAGNOSTICS_PERIOD,
                        10, "diagnostics message")
        return {k: int(self.counters[k]) for k in ("received", "processed", "dropped")}


def exchange(client, target, image, what: str, node_proc):
    """Send ``image`` to ``target``'s node, stamped now, and wait for its answer: (answer,
    round trip ms)."""
    from orcnn_ros.conversions import array_to_image_msg

    msg = array_to_image_msg(image, "rgb8")
    sent = time.time_ns()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(sent, 10**9)
    target.answers.clear()
    target.pub.publish(msg)
    client.spin_until(lambda: any(stamp_ns(m) == sent for m, _ in target.answers), 60,
                      f"answer to {what}", node_proc)
    out, arrived = next((m, t) for m, t in target.answers if stamp_ns(m) == sent)
    return out, (arrived - sent) / 1e6


def one_at_a_time(client, frames: int, image, node_proc) -> dict:
    """Publish ``frames`` frames one by one (3 more to warm up); per-frame timings."""
    rows = []
    for k in range(frames + 3):
        out, round_trip = exchange(client, client.current, image, f"frame {k}", node_proc)
        if k >= 3:
            rows.append((round_trip, out.latency_ms, out.inference_ms, len(out.instances)))
        client.spin_for(0.05)
    round_trip, latency, inference, instances = (list(c) for c in zip(*rows))
    return dict(
        instances=summary(instances), inference_ms=summary(inference),
        latency_ms=summary(latency), round_trip_ms=summary(round_trip),
        node_overhead_ms=summary([a - b for a, b in zip(latency, inference)]),
        round_trip_overhead_ms=summary([a - b for a, b in zip(round_trip, inference)]))


def against_previous(client, peers: dict, counts: list, frames: int, image) -> dict:
    """Node overhead of each node in ``peers`` ({label: (target, process)}) with
    ``max_instances`` at each of ``counts``, the nodes taking turns frame by frame (3 frames
    each to warm up): {count: {label: {"instances": ..., "node_overhead_ms": ...}}}."""
    results = {}
    for count in counts:
        for target, _ in peers.values():
            client.set_parameters(target, max_instances=count)
        rows = {label: [] for label in peers}
        for k in range(frames + 3):
            for label, (target, proc) in peers.items():
                out, _ = exchange(client, target, image, f"frame {k} ({label})", proc)
                if k >= 3:
                    rows[label].append((out.latency_ms - out.inference_ms, len(out.instances)))
                client.spin_for(0.02)
        results[count] = {label: dict(node_overhead_ms=summary([r[0] for r in rs]),
                                      instances=summary([r[1] for r in rs]))
                          for label, rs in rows.items()}
    return results


def previous_tree(commit: str, work: Path) -> Path:
    """This repository at ``commit`` under ``work``, with the message package built here
    linked into its ``orcnn_ros`` (a source tree has no generated messages): the folder to
    put in front of PYTHONPATH. Exits with status 2 when the commit cannot be read or its
    message definitions differ from this checkout's."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 check=True, capture_output=True).stdout
        changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", commit, "--",
                                  "msg"], capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise SystemExit(f"bench_node: --previous {commit}: cannot read it from git "
                         f"({detail.decode(errors='replace').strip() or exc})") from None
    if changed:
        raise SystemExit(f"bench_node: --previous {commit}: its msg/ definitions differ "
                         f"from this checkout's; run with --previous none")
    root = work / "previous"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    built = Path(importlib.util.find_spec("orcnn_ros.msg").origin).parents[1]
    for entry in built.iterdir():
        link = root / "orcnn_ros" / entry.name
        if entry.name != "__pycache__" and not link.exists():
            link.symlink_to(entry.resolve())
    return root


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


def previous_report(results: dict) -> list:
    """The node-overhead table of this code against the previous version (markdown lines)."""
    previous = results.get("previous")
    if not previous:
        return []
    commit = results["previous_commit"]
    lines = [f"Node overhead (latency_ms - inference_ms), previous version {commit} and this "
             f"code taking turns frame by frame, score threshold 0, {results['frames']} "
             "frames each (p50 / p95, ms):", "",
             f"| max_instances | instances | previous ({commit}) | this code | this / previous "
             "(p50) |", "|---|---|---|---|---|"]
    for count, pair in previous.items():
        old, new = pair["previous"], pair["this code"]
        ratio = new["node_overhead_ms"]["p50"] / max(old["node_overhead_ms"]["p50"], 1e-9)
        lines.append(f"| {count} | {new['instances']['p50']:g} "
                     f"| {fmt(old['node_overhead_ms'], 2)} | {fmt(new['node_overhead_ms'], 2)} "
                     f"| {ratio:.2f} |")
    return lines + [""]


def report(results: dict) -> str:
    lines = [f"model {results['model']} ({results['instances_asked']} instances asked), "
             f"{results['image']} frames, nodes with {results['threads']} thread(s), "
             f"ROS_DOMAIN_ID {results['domain']}, load average {results['load_before']} "
             f"before / {results['load_after']} after", ""]
    lines += previous_report(results)
    lines += ["One frame at a time, this code (p50 / p95, ms):", "",
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


def parse_counts(text: str) -> list:
    """"5,20,50" -> [5, 20, 50]: the instance caps of the comparison with the previous
    version."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 5,20,50, got {text!r}")
    if not counts or any(not 1 <= c <= 1000 for c in counts):
        raise argparse.ArgumentTypeError(f"values must be in [1, 1000], got {text!r}")
    return counts


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny (an untrained model, default), bundled (the demo model) or "
                             "a weights file")
    parser.add_argument("--max-instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=40,
                        help="frames one at a time (per node and instance cap)")
    parser.add_argument("--previous", default=PREVIOUS,
                        help=f"git commit of the previous version to compare the node overhead "
                             f"with (default {PREVIOUS}); none: no comparison")
    parser.add_argument("--instances", type=parse_counts, default=[5, 20, 50],
                        help="max_instances values of that comparison (default 5,20,50)")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="camera seconds per fresh_frame_wait value")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    parser.add_argument("--fresh-frame-wait", type=parse_waits, default=[1.0, 0.0],
                        help="values to measure the camera with, e.g. 1.0,0; none: the "
                             "node's default only (default 1.0,0)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the nodes (1: sane on a shared machine)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be positive" for name, value in (
        ("frames", args.frames), ("seconds", args.seconds), ("rate", args.rate),
        ("threads", args.threads), ("max-instances", args.max_instances),
        ("width", args.width - 15), ("height", args.height - 15)) if value <= 0]
    args.model_path = model_file(args.model)
    if args.model_path is not None and not args.model_path.is_file():
        problems.append(f"--model: {args.model_path} does not exist")
    if problems:
        parser.error("; ".join(problems))  # exits 2
    args.previous = None if args.previous.lower() == "none" else args.previous
    return args


def tiny_weights(path: Path, previous_root) -> Path:
    """The tiny model of ``orcnn_ros.soak``, written by the previous version when there is
    one (so that both versions read the file: a newer file may carry settings the previous
    version does not know)."""
    if previous_root is None:
        from orcnn_ros.soak import tiny_model

        return tiny_model(path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(previous_root), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-P", "-c", "import sys; from pathlib import Path; "
                    "from orcnn_ros.soak import tiny_model; tiny_model(Path(sys.argv[1]))",
                    str(path)], check=True, env=env)
    return path


def load_average() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def wait_for_nodes(client, peers: dict, logs: dict) -> None:
    """Until every node in ``peers`` ({label: (target, process)}) is up; its log on
    failure."""
    for label, (target, proc) in peers.items():
        try:
            client.spin_until(lambda: client.ready(target), 120, f"{label} node coming up",
                              proc)
        except SystemExit as exc:
            print(logs[label].read_text(), file=sys.stderr)
            if label == "previous":  # e.g. a model file newer than that version reads
                raise SystemExit(f"{exc}; the previous version's node did not come up (its "
                                 f"log is above): pass --previous with a newer commit, or "
                                 f"--previous none") from None
            raise


def measure(client, args, scene, node, previous_node, work: Path, results: dict) -> None:
    """The benchmark's three parts (see the module doc), into ``results``."""
    peers = {"this code": (client.current, node)}
    logs = {"this code": work / "node.log", "previous": work / "previous_node.log"}
    if previous_node is not None:
        target = Target(client.node, "orcnn_perception_previous", *PREVIOUS_TOPICS)
        peers = {"previous": (target, previous_node), **peers}
    wait_for_nodes(client, peers, logs)
    if previous_node is not None:
        results["previous"] = against_previous(client, peers, args.instances, args.frames,
                                               scene)
        stop(previous_node)
        client.set_parameters(max_instances=args.max_instances)
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
    try:
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
        stop(camera)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A domain of its own unless one is set: other DDS traffic must not mix in.
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(150, 230)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    import rclpy

    from orcnn_core.fileio import atomic_write_json
    from orcnn_core.synth import SynthConfig, generate_samples

    work = Path(tempfile.mkdtemp(prefix="orcnn_bench_node_"))
    previous_root = previous_tree(args.previous, work) if args.previous else None
    model = args.model_path or tiny_weights(work / "tiny.safetensors", previous_root)
    scene = next(iter(generate_samples(1, 5, SynthConfig(width=args.width,
                                                         height=args.height)))).image
    node_args = ["-p", f"model_path:={model}", "-p", "device:=cpu",
                 "-p", "score_threshold:=0.0", "-p", f"max_instances:={args.max_instances}",
                 "-p", f"diagnostics_period:={DIAGNOSTICS_PERIOD}"]
    results = dict(model=str(model), image=f"{args.width}x{args.height}",
                   instances_asked=args.max_instances, threads=args.threads,
                   domain=int(os.environ["ROS_DOMAIN_ID"]), rate_hz=args.rate,
                   seconds=args.seconds, frames=args.frames, previous_commit=args.previous,
                   load_before=load_average(), one_at_a_time={}, camera={})
    node = start("orcnn_ros.perception_node", ["-r", f"image:={IMAGE_TOPIC}", *node_args],
                 work / "node.log", args.threads)
    previous_node = None
    if previous_root is not None:
        previous_node = start("orcnn_ros.perception_node", [
            "-r", "__node:=orcnn_perception_previous", "-r", f"image:={PREVIOUS_TOPICS[0]}",
            "-r", f"amodal_instances:={PREVIOUS_TOPICS[1]}", *node_args],
            work / "previous_node.log", args.threads, python_path=str(previous_root))
    rclpy.init()
    client = Client("orcnn_perception")
    try:
        measure(client, args, scene, node, previous_node, work, results)
    finally:
        for proc in (previous_node, node):
            if proc is not None:
                stop(proc)
        client.executor.shutdown()
        client.node.destroy_node()
        rclpy.try_shutdown()
    results["load_after"] = load_average()
    print(report(results))
    if args.json:
        atomic_write_json(args.json, results, indent=2)
    return 0 if all(c["answers"] for c in results["camera"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
