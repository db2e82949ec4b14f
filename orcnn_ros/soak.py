"""Soak runs: long runs under faulty input, with a JSON report and a markdown summary.

    source .venv/bin/activate && source install/setup.bash
    python -P -m orcnn_ros.soak node [--frames 10000] [--rate 30] [--malformed 0.1] \\
        [--inputs raw compressed] [--model PATH] [--out outputs/soak_node]

(``python -P scripts/soak.py node ...`` in a checkout runs the same, its report by default
in the checkout's ``outputs/soak_node``.)

``node``: the perception node as deployed (``python -P -m orcnn_ros.perception_node``, one
process per input transport: ``raw`` sensor_msgs/Image, ``compressed`` PNG) fed by a camera
that publishes the sim camera's scenes at ``--rate`` Hz for ``--frames`` frames, a fraction
``--malformed`` of them malformed (at fixed positions; the kinds are listed in the report).
The node's input QoS is reliable with a queue of a second of frames, so every frame sent
reaches the node and its counters must account for each one. Checked for every node:

* no crash: the process runs to the end without a traceback in its log; SIGTERM then ends
  it with exit status 0 (the time it takes is reported);
* accounting, from the node's last /diagnostics: sent = received = processed + dropped +
  malformed + failed, no frame failed, and the answer of every processed frame arrived;
* answers come in stamp order, no malformed frame is answered, and malformed frames are
  counted as malformed (all those the header fields give away; a frame that only its
  decoder can reject may instead be replaced in the one-slot buffer and count as dropped);
* no growing queue: frames inside the node (received minus accounted, sampled from
  /diagnostics four times a second) never exceed 3, and none is left at the end;
* memory: the node's RSS once 10 % of the frames are sent (warm caches) and at the end; the
  growth must stay under ``--max-rss-growth-mb``.

Without ``--model`` the node gets a tiny untrained model with score threshold 0 (20
instances per frame: the message and occlusion-graph work of a busy scene at little model
cost). The report goes to ``OUT/report.json``, the nodes' logs to ``OUT/logs/``. Exit
status: 0 when every check passes, 1 when one fails, 2 for bad arguments.
"""

import importlib.util
import os
import sys

if __name__ == "__main__" and not sys.flags.safe_path \
        and importlib.util.find_spec("orcnn_ros.msg") is None:  # pragma: no cover
    # Started from the repository root, where the source folder shadows the built package.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "orcnn_ros.soak", *sys.argv[1:]])

import argparse  # noqa: E402
import collections  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import rclpy  # noqa: E402
import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.config import ModelConfig  # noqa: E402
from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_core.model import build_model  # noqa: E402
from orcnn_core.weights import save_weights  # noqa: E402
from orcnn_ros.conversions import array_to_image_msg  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402
from orcnn_ros.sim_camera import render_frames  # noqa: E402

__all__ = ["NodeStream", "run_node_soak", "evaluate_stream", "node_summary_markdown", "main"]

#: Where ``node`` writes its report and logs unless ``--out`` says otherwise.
DEFAULT_OUT = Path("outputs") / "soak_node"
MIB = 1024 * 1024
#: The node's input queue depth (reliable QoS): a second of frames at 30 Hz, so that a busy
#: executor thread never makes DDS drop a frame before the node could count it.
QOS_DEPTH = 30
#: Frames inside a node at any moment: one waiting in the slot, one in inference, and one
#: being counted in the callback when /diagnostics takes its snapshot.
MAX_IN_FLIGHT = 3
COUNTERS = ("received", "processed", "dropped", "malformed", "failed")


# ----------------------------------------------------------------------------- frames
def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` (baseline, as OpenCV writes it) with its frame header claiming ``width`` x
    ``height``; the data stays that of the small picture."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise ValueError("jpeg: no baseline frame header (0xFFC0)")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def malformed_raw_frames(width: int, height: int) -> list:
    """``[(kind, found_by, sensor_msgs/Image)]``: raw frames the node must skip. found_by is
    "header" when the header fields alone give the frame away."""
    row = width * 3
    return [
        ("unknown encoding", "header", Image(height=height, width=width, encoding="yuv422",
                                             step=width * 2, data=bytes(width * height * 2))),
        ("wrong step", "header", Image(height=height, width=width, encoding="rgb8",
                                       step=width, data=bytes(width * height))),
        ("width x height larger than the data", "header",
         Image(height=height, width=width, encoding="rgb8", step=row,
               data=bytes(row * (height // 2)))),
        ("zero size", "header", Image(height=0, width=0, encoding="rgb8", step=0, data=b"")),
        ("absurd dimensions (100000 x 100000)", "header",
         Image(height=100_000, width=100_000, encoding="rgb8", step=300_000,
               data=bytes(row * height))),
    ]


def malformed_compressed_frames(png: bytes, jpeg: bytes) -> list:
    """``[(kind, found_by, sensor_msgs/CompressedImage)]``, from a good PNG and JPEG of the
    scene; found_by "decoder" for the frame whose header is intact."""
    return [
        ("truncated compressed data", "decoder",
         CompressedImage(format="png", data=png[:len(png) // 2])),
        ("zero size", "header", CompressedImage(format="png", data=b"")),
        # Would decode (libjpeg pads the missing data) into a 243 MB image.
        ("absurd dimensions (JPEG header 9000 x 9000)", "header",
         CompressedImage(format="jpeg", data=jpeg_with_size(jpeg, 9000, 9000))),
        ("not an image", "header", CompressedImage(format="png", data=bytes(range(256)) * 4)),
    ]


@dataclass
class NodeStream:
    """One input transport: its node process and everything sent to and heard from it."""

    name: str  # "raw" or "compressed"
    namespace: str
    msg_type: type
    good: list  # messages, cycled
    malformed: list  # [(kind, found_by, message)], cycled
    publisher: object = None
    process: object = None
    log_path: Path = None
    sent: list = field(default_factory=list)  # [(stamp ns, malformed kind or "")]
    answers: list = field(default_factory=list)  # [(stamp ns, latency ms, inference ms,
    #                                                 arrival ns)]
    diagnostics: list = field(default_factory=list)  # [(monotonic s, {counter: int})]
    rss: list = field(default_factory=list)  # [(monotonic s, frames sent, bytes)]
    alive_at_end: bool = False
    exit_status: object = None
    exit_seconds: float = float("nan")

    @property
    def topic(self) -> str:
        suffix = "image/compressed" if self.name == "compressed" else "image"
        return f"{self.namespace}/{suffix}"

    def frame(self, k: int, malformed_index: int):
        """The message for frame ``k``; ``malformed_index`` None for a good frame."""
        if malformed_index is None:
            return "", self.good[k % len(self.good)]
        kind, _, msg = self.malformed[malformed_index % len(self.malformed)]
        return kind, msg

    def in_flight(self, values: dict) -> int:
        """Frames inside the node by its counters: received but not yet accounted for."""
        return values["received"] - sum(values[k] for k in COUNTERS[1:])

    def on_answer(self, msg) -> None:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        self.answers.append((stamp, msg.latency_ms, msg.inference_ms, time.time_ns()))

    def on_diagnostics(self, msg) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if status.name.endswith(": inference") and "received" in values:
                self.diagnostics.append(
                    (time.monotonic(), {k: int(values[k]) for k in COUNTERS}))


def make_streams(inputs, width: int, height: int, seed: int = 0) -> list:
    """One :class:`NodeStream` per input transport in ``inputs``, with the sim camera's
    scenes as good frames and the malformed frames of that transport."""
    scenes = render_frames(8, width, height, seed, "rgb8")
    streams = []
    if "raw" in inputs:
        streams.append(NodeStream("raw", "/soak_raw", Image,
                                  [array_to_image_msg(s, "rgb8") for s in scenes],
                                  malformed_raw_frames(width, height)))
    if "compressed" in inputs:
        bgr = [cv2.cvtColor(s, cv2.COLOR_RGB2BGR) for s in scenes]
        pngs = [cv2.imencode(".png", b)[1].tobytes() for b in bgr]
        jpeg = cv2.imencode(".jpg", bgr[0])[1].tobytes()
        streams.append(NodeStream("compressed", "/soak_png", CompressedImage,
                                  [CompressedImage(format="png", data=p) for p in pngs],
                                  malformed_compressed_frames(pngs[0], jpeg)))
    return streams


def malformed_schedule(frames: int, fraction: float) -> list:
    """For each frame, None (good) or the running index of the malformed frame: exactly
    floor(frames x fraction) of them, evenly spread."""
    schedule, count = [], 0
    for k in range(frames):
        if int((k + 1) * fraction) > int(k * fraction):
            schedule.append(count)
            count += 1
        else:
            schedule.append(None)
    return schedule


def tiny_model(path: Path) -> Path:
    """An untrained model for 160 x 120 input; score threshold 0, up to 20 detections."""
    torch.manual_seed(0)
    cfg = ModelConfig.small(
        num_classes=3, class_names=["box", "can"], min_size=120, max_size=160,
        fpn_channels=32, box_head_dim=64, mask_head_channels=32, rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20, box_detections_per_img=20, box_score_thresh=0.0)
    save_weights(build_model(cfg), cfg, path)
    return path


# ----------------------------------------------------------------------------- processes
def start_node(stream: NodeStream, model: Path, device: str, score_threshold: float,
               max_instances: int, log_dir: Path) -> None:
    """Start the stream's node as deployed, its output in ``log_dir``."""
    stream.log_path = log_dir / f"node_{stream.name}.log"
    compressed = "true" if stream.name == "compressed" else "false"
    command = [sys.executable, "-P", "-m", "orcnn_ros.perception_node", "--ros-args",
               "-r", f"__ns:={stream.namespace}",
               "-r", f"/diagnostics:={stream.namespace}/diagnostics",
               "-p", f"model_path:={model}", "-p", f"device:={device}",
               "-p", f"score_threshold:={score_threshold}",
               "-p", f"max_instances:={max_instances}", "-p", f"use_compressed:={compressed}",
               "-p", "qos_reliability:=reliable", "-p", f"qos_depth:={QOS_DEPTH}",
               "-p", "diagnostics_period:=0.25"]
    with open(stream.log_path, "w", encoding="utf-8") as log:
        stream.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def stop_process(proc: subprocess.Popen, timeout: float = 10.0):
    """SIGTERM, then SIGKILL after ``timeout``; returns (exit status, seconds to exit)."""
    if proc.poll() is not None:
        return proc.returncode, 0.0
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed", time.monotonic() - start
    return status, time.monotonic() - start


# ----------------------------------------------------------------------------- the run
def run_node_soak(model, frames: int = 10_000, rate: float = 30.0, malformed: float = 0.1,
                  inputs=("raw", "compressed"), width: int = 320, height: int = 240,
                  device: str = "cpu", score_threshold: float = 0.0, max_instances: int = 20,
                  max_rss_growth_mb: float = 64.0, out_dir=None, start_timeout: float = 180.0,
                  log=print):
    """Run the node soak; returns ``(report, streams)``: the JSON-ready report and the raw
    records (:class:`NodeStream`: what was sent, answered, sampled). Needs the ROS
    environment (install/setup.bash) and a ROS_DOMAIN_ID of its own."""
    out_dir = Path(out_dir or DEFAULT_OUT)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    streams = make_streams(inputs, width, height)
    schedule = malformed_schedule(frames, malformed)
    probe = Probe(streams)
    sampler = RssSampler(streams)
    started = time.monotonic()
    timing = {}
    try:
        for stream in streams:
            start_node(stream, Path(model), device, score_threshold, max_instances, log_dir)
        wait_until_up(streams, probe, start_timeout, log_dir)
        timing["start_up_s"] = round(time.monotonic() - started, 2)
        log(f"nodes up after {timing['start_up_s']} s; sending {frames} frames at {rate:g} "
            f"Hz")
        sampler.start()
        timing.update(send_frames(streams, schedule, rate, sampler, log))
        timing["drain_s"] = drain(streams)
        sampler.stop()
        for stream in streams:
            sampler.sample(stream)
            stream.alive_at_end = stream.process.poll() is None
    finally:
        sampler.stop()
        for stream in streams:
            if stream.process is not None:
                stream.exit_status, stream.exit_seconds = stop_process(stream.process)
        probe.close()
    timing["total_s"] = round(time.monotonic() - started, 2)
    config = dict(frames=frames, rate_hz=rate, malformed_fraction=malformed,
                  inputs=list(inputs), width=width, height=height, model=str(model),
                  device=device, score_threshold=score_threshold,
                  max_instances=max_instances, qos="reliable, depth %d" % QOS_DEPTH,
                  max_rss_growth_mb=max_rss_growth_mb,
                  ros_domain_id=os.environ.get("ROS_DOMAIN_ID", "0"))
    return node_report(config, timing, streams), streams


class Probe:
    """This process's ROS side: publishes each stream's frames and hears the node's answers
    and /diagnostics, spun by a thread of its own (in a ROS context of its own)."""

    def __init__(self, streams: list):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("soak_probe", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        reliable = QoSProfile(depth=QOS_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        self.answer_subscriptions = []  # one per stream, in the order of the streams
        for stream in streams:
            stream.publisher = self.node.create_publisher(stream.msg_type, stream.topic,
                                                          reliable)
            self.answer_subscriptions.append(self.node.create_subscription(
                AmodalInstanceArray, f"{stream.namespace}/amodal_instances",
                stream.on_answer, QoSProfile(depth=200,
                                             reliability=ReliabilityPolicy.RELIABLE)))
            self.node.create_subscription(DiagnosticArray, f"{stream.namespace}/diagnostics",
                                          stream.on_diagnostics, QoSProfile(depth=50))
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


class RssSampler:
    """Samples each running node's RSS twice a second in a thread, with the number of
    frames sent so far (:attr:`sent`, kept up to date by the sender)."""

    def __init__(self, streams: list):
        self.streams = streams
        self.sent = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def sample(self, stream: NodeStream) -> None:
        stream.rss.append((time.monotonic(), self.sent, rss_bytes(stream.process.pid)))

    def _run(self) -> None:
        while not self._stopped.wait(0.5):
            for stream in self.streams:
                if stream.process.poll() is None:
                    self.sample(stream)


def wait_until_up(streams: list, probe: Probe, timeout: float, log_dir: Path) -> None:
    """Until each node subscribed to its input and its answers and diagnostics reach the
    probe; RuntimeError when a node exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not all(s.publisher.get_subscription_count() > 0 and sub.get_publisher_count() > 0
                  and s.diagnostics for s, sub in zip(streams, probe.answer_subscriptions)):
        dead = [s.name for s in streams if s.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"node(s) {', '.join(dead) or 'all'} did not come up "
                               f"(logs in {log_dir})")
        time.sleep(0.1)


def send_frames(streams: list, schedule: list, rate: float, sampler: RssSampler,
                log) -> dict:
    """Publish frame k of every stream at ``k / rate`` seconds, stamped with the time it
    goes out (malformed where ``schedule`` says); stops early when every node has exited.
    Returns the timing figures: sending time and how late the camera was at most."""
    begin = time.monotonic()
    last_stamp, late_max, next_report = 0, 0.0, begin + 60
    for k, malformed_index in enumerate(schedule):
        delay = begin + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late_max = max(late_max, -delay)
        last_stamp = max(time.time_ns(), last_stamp + 1)
        for stream in streams:
            publish_frame(stream, k, malformed_index, last_stamp)
        sampler.sent = k + 1
        if time.monotonic() > next_report:
            next_report += 60
            log(f"{k + 1} frames sent, " + ", ".join(
                f"{s.name}: {len(s.answers)} answers" for s in streams))
        if all(s.process.poll() is not None for s in streams):
            break
    return {"send_s": round(time.monotonic() - begin, 2),
            "camera_late_max_ms": round(late_max * 1000, 1)}


def publish_frame(stream: NodeStream, k: int, malformed_index, stamp_ns: int) -> None:
    kind, msg = stream.frame(k, malformed_index)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "soak_camera"
    stream.publisher.publish(msg)
    stream.sent.append((stamp_ns, kind))


def drain(streams: list) -> float:
    """Wait until each node has counted every frame it received, and that is all that was
    sent (or its counters have stood still for 20 s), then for one more diagnostics
    message after the last answer went out; returns the seconds it took."""
    drain_start = time.monotonic()
    last_change, previous = drain_start, None
    while not all(_settled(s) for s in streams):
        current = [s.diagnostics[-1][1] if s.diagnostics else None for s in streams]
        if current != previous:
            previous, last_change = current, time.monotonic()
        if time.monotonic() - last_change > 20:
            break
        time.sleep(0.1)
    marks = [len(s.diagnostics) for s in streams]
    limit = time.monotonic() + 5
    while time.monotonic() < limit and any(
            len(s.diagnostics) < m + 2 for s, m in zip(streams, marks)):
        time.sleep(0.05)
    return round(time.monotonic() - drain_start, 2)


def _settled(stream: NodeStream) -> bool:
    if stream.process.poll() is not None or not stream.diagnostics:
        return True
    values = stream.diagnostics[-1][1]
    return stream.in_flight(values) == 0 and values["received"] == len(stream.sent)


# ----------------------------------------------------------------------------- the report
def node_report(config: dict, timing: dict, streams: list) -> dict:
    """The JSON-ready report: configuration, timing, each stream's figures, all checks."""
    report = dict(command="node", config=config, timing=timing, streams={}, checks=[])
    for stream in streams:
        figures, checks = evaluate_stream(stream, config["frames"],
                                          config["max_rss_growth_mb"])
        report["streams"][stream.name] = figures
        report["checks"] += [dict(stream=stream.name, check=name, ok=bool(ok), detail=detail)
                             for name, ok, detail in checks]
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _stats(values) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return dict(n=len(values), median=round(statistics.median(values), 1),
                p90=round(values[min(len(values) - 1, int(0.9 * len(values)))], 1),
                max=round(values[-1], 1))


@dataclass
class StreamTally:
    """What one stream's records add up to: the basis of its figures and checks."""

    final: dict  # the node's last /diagnostics counters
    kinds: collections.Counter  # malformed kind -> frames sent
    malformed_sent: int
    header_sent: int  # malformed frames the header fields give away
    answered_malformed: int
    answered_unknown: int  # answers to a stamp never sent
    in_order: bool
    in_flight: list  # frames inside the node, per /diagnostics sample
    rss_start: int  # bytes, once warm
    rss_end: int
    rss_max: int
    log_text: str
    crashed: bool

    @classmethod
    def of(cls, stream: NodeStream, frames: int) -> "StreamTally":
        final = stream.diagnostics[-1][1] if stream.diagnostics else dict.fromkeys(COUNTERS, 0)
        kinds = collections.Counter(kind for _, kind in stream.sent if kind)
        found_by = {kind: by for kind, by, _ in stream.malformed}
        stamps = [a[0] for a in stream.answers]
        malformed_stamps = {s for s, kind in stream.sent if kind}
        sent_stamps = {s for s, _ in stream.sent}
        warm = [r for r in stream.rss if r[1] >= 0.1 * frames and r[2] > 0] or \
            [r for r in stream.rss if r[2] > 0]
        log_text = stream.log_path.read_text(errors="replace") if stream.log_path else ""
        return cls(
            final=final, kinds=kinds, malformed_sent=sum(kinds.values()),
            header_sent=sum(n for kind, n in kinds.items() if found_by[kind] == "header"),
            answered_malformed=sum(s in malformed_stamps for s in stamps),
            answered_unknown=sum(s not in sent_stamps for s in stamps),
            in_order=all(b > a for a, b in zip(stamps, stamps[1:])),
            in_flight=[stream.in_flight(v) for _, v in stream.diagnostics],
            rss_start=warm[0][2] if warm else 0, rss_end=warm[-1][2] if warm else 0,
            rss_max=max((r[2] for r in warm), default=0), log_text=log_text,
            crashed=not stream.alive_at_end or "Traceback" in log_text)

    @property
    def growth_mb(self) -> float:
        return (self.rss_end - self.rss_start) / MIB


def evaluate_stream(stream: NodeStream, frames: int, max_rss_growth_mb: float):
    """Figures and checks ``[(name, ok, detail)]`` of one stream's records."""
    tally = StreamTally.of(stream, frames)
    figures = stream_figures(stream, tally)
    return figures, stream_checks(stream, tally, figures, max_rss_growth_mb)


def stream_figures(stream: NodeStream, tally: StreamTally) -> dict:
    final, in_flight = tally.final, tally.in_flight
    quarter = max(1, len(stream.answers) // 4)
    latency = [a[1] for a in stream.answers]
    return dict(
        frames_sent=len(stream.sent), malformed_sent=tally.malformed_sent,
        malformed_kinds=dict(tally.kinds), received=final["received"],
        answered=len(stream.answers), processed=final["processed"],
        dropped=final["dropped"], malformed_counted=final["malformed"],
        failed=final["failed"], crashes=int(tally.crashed),
        malformed_answered=tally.answered_malformed, answers_in_stamp_order=tally.in_order,
        in_flight_max=max(in_flight, default=0), in_flight_end=in_flight[-1] if in_flight
        else 0, diagnostics_samples=len(in_flight),
        rss_start_mb=round(tally.rss_start / MIB, 1), rss_end_mb=round(tally.rss_end / MIB, 1),
        rss_growth_mb=round(tally.growth_mb, 1), rss_max_mb=round(tally.rss_max / MIB, 1),
        latency_ms=_stats(latency),
        latency_first_quarter_ms=_stats(latency[:quarter]),
        latency_last_quarter_ms=_stats(latency[-quarter:]),
        inference_ms=_stats(a[2] for a in stream.answers),
        frame_age_ms=_stats((a[3] - a[0]) / 1e6 for a in stream.answers),
        malformed_warnings_logged=tally.log_text.count("skipping malformed frame"),
        exit_status=stream.exit_status, exit_seconds=round(stream.exit_seconds, 3),
        log=str(stream.log_path))


def stream_checks(stream: NodeStream, tally: StreamTally, figures: dict,
                  max_rss_growth_mb: float) -> list:
    """``[(name, ok, detail)]``: the checks the module help lists, for one stream."""
    final, sent, crashed = tally.final, len(stream.sent), tally.crashed
    accounted = final["processed"] + final["dropped"] + final["malformed"] + final["failed"]
    return [
        ("no crash", not crashed, "process alive to the end, no traceback in its log"
         if not crashed else f"see {stream.log_path}"),
        ("clean exit on SIGTERM", stream.exit_status == 0,
         f"exit status {stream.exit_status} after {stream.exit_seconds:.2f} s"),
        ("every frame sent was received", final["received"] == sent,
         f"sent {sent}, received {final['received']}"),
        ("received = processed + dropped + malformed + failed", final["received"] == accounted,
         f"{final['received']} = {final['processed']} + {final['dropped']} + "
         f"{final['malformed']} + {final['failed']}"),
        ("no failed frame", final["failed"] == 0, f"failed {final['failed']}"),
        ("every processed frame answered", len(stream.answers) == final["processed"],
         f"answers {len(stream.answers)}, processed {final['processed']}"),
        ("answers in stamp order", tally.in_order, f"{len(stream.answers)} answers"),
        ("no malformed frame answered",
         tally.answered_malformed == 0 and tally.answered_unknown == 0,
         f"{tally.answered_malformed} malformed and {tally.answered_unknown} unknown stamps "
         f"answered"),
        ("malformed frames counted",
         tally.header_sent <= final["malformed"] <= tally.malformed_sent,
         f"{tally.header_sent} <= {final['malformed']} <= {tally.malformed_sent} "
         f"(header-detectable <= counted <= sent)"),
        ("no growing queue", figures["in_flight_max"] <= MAX_IN_FLIGHT
         and figures["in_flight_end"] == 0,
         f"frames inside the node: max {figures['in_flight_max']} (bound {MAX_IN_FLIGHT}), "
         f"{figures['in_flight_end']} at the end"),
        ("RSS growth bounded", tally.growth_mb <= max_rss_growth_mb,
         f"{tally.growth_mb:+.1f} MB from {tally.rss_start / MIB:.0f} MB "
         f"(bound {max_rss_growth_mb:g})"),
    ]


def node_summary_markdown(report: dict) -> str:
    """The report as a markdown table and check list."""
    config, timing = report["config"], report["timing"]
    names = list(report["streams"])
    rows = [
        ("frames sent", "frames_sent"), ("malformed sent", "malformed_sent"),
        ("received by the node", "received"), ("answered", "answered"),
        ("dropped (latest frame only)", "dropped"), ("malformed counted", "malformed_counted"),
        ("failed", "failed"), ("crashes", "crashes"),
        ("frames inside the node, max (queue)", "in_flight_max"),
    ]
    lines = [f"## Node soak: {config['frames']} frames at {config['rate_hz']:g} Hz, "
             f"{config['malformed_fraction']:.0%} malformed, {config['width']}x"
             f"{config['height']}, {Path(config['model']).name} on {config['device']} "
             f"({timing.get('total_s', 0):.0f} s)", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    streams = report["streams"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(str(streams[n][key]) for n in names) + " |")

    def per(fn):
        return " | ".join(fn(streams[n]) for n in names)

    lines += [
        "| RSS start / end / growth / max (MB) | " + per(
            lambda s: f"{s['rss_start_mb']} / {s['rss_end_mb']} / {s['rss_growth_mb']:+} / "
                      f"{s['rss_max_mb']}") + " |",
        "| latency in the node, median first / last quarter (ms) | " + per(
            lambda s: f"{s['latency_first_quarter_ms'].get('median', '-')} / "
                      f"{s['latency_last_quarter_ms'].get('median', '-')}") + " |",
        "| inference median (ms) | " + per(
            lambda s: str(s["inference_ms"].get("median", "-"))) + " |",
        "| frame age at the subscriber, median / p90 (ms) | " + per(
            lambda s: f"{s['frame_age_ms'].get('median', '-')} / "
                      f"{s['frame_age_ms'].get('p90', '-')}") + " |",
        "| exit after SIGTERM | " + per(
            lambda s: f"{s['exit_seconds']:.2f} s, status {s['exit_status']}") + " |",
        "",
        f"Duration: start-up {timing.get('start_up_s', '-')} s, sending "
        f"{timing.get('send_s', '-')} s (camera at most {timing.get('camera_late_max_ms', '-')}"
        f" ms late), drain {timing.get('drain_s', '-')} s.",
        "",
        "Malformed kinds sent: " + "; ".join(
            f"{n}: " + ", ".join(f"{kind} x{count}" for kind, count in
                                 streams[n]["malformed_kinds"].items()) for n in names),
        "",
    ]
    for check in report["checks"]:
        mark = "x" if check["ok"] else " "
        lines.append(f"- [{mark}] {check['stream']}: {check['check']} ({check['detail']})")
    lines.append("")
    lines.append("**all checks pass**" if report["ok"] else "**CHECKS FAILED**")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_node_command(subparsers, default_out: Path = DEFAULT_OUT) -> None:
    node = subparsers.add_parser(
        "node", help="the perception node under a glitchy 30 Hz camera",
        description="The perception node under a glitchy camera; see the module help.")
    node.add_argument("--frames", type=_positive_int, default=10_000)
    node.add_argument("--rate", type=_positive_float, default=30.0, help="camera rate (Hz)")
    node.add_argument("--malformed", type=_fraction, default=0.1,
                      help="fraction of malformed frames (default 0.1)")
    node.add_argument("--inputs", nargs="+", choices=("raw", "compressed"),
                      default=["raw", "compressed"], help="one node per input transport")
    node.add_argument("--width", type=_positive_int, default=320)
    node.add_argument("--height", type=_positive_int, default=240)
    node.add_argument("--model", default="", help="weights file (default: a tiny model)")
    node.add_argument("--device", default="cpu", help="the node's device parameter")
    node.add_argument("--score-threshold", type=float, default=0.0)
    node.add_argument("--max-instances", type=_positive_int, default=20)
    node.add_argument("--max-rss-growth-mb", type=_positive_float, default=64.0,
                      help="bound on a node's RSS growth after warm-up (MB)")
    node.add_argument("--out", default=str(default_out),
                      help="folder for report.json and the nodes' logs")
    node.set_defaults(run=run_node_command)


def run_node_command(args) -> int:
    if args.model and not Path(args.model).is_file():
        print(f"soak.py node: --model {args.model} does not exist", file=sys.stderr)
        return 2
    # A domain of its own unless one is set: other DDS traffic must not mix in.
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(150, 230)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else tiny_model(out / "tiny.safetensors")
    try:
        report, _ = run_node_soak(
            model, frames=args.frames, rate=args.rate, malformed=args.malformed,
            inputs=args.inputs, width=args.width, height=args.height, device=args.device,
            score_threshold=args.score_threshold, max_instances=args.max_instances,
            max_rss_growth_mb=args.max_rss_growth_mb, out_dir=out,
            log=lambda line: print(line, file=sys.stderr, flush=True))
    except RuntimeError as exc:  # a node did not come up
        print(f"soak.py node: {exc}", file=sys.stderr)
        return 1
    atomic_write_json(out / "report.json", report, indent=2)
    print(node_summary_markdown(report))
    print(f"\nreport: {out / 'report.json'}")
    return 0 if report["ok"] else 1


def main(argv=None, default_out: Path = DEFAULT_OUT) -> int:
    """The command line; ``default_out`` is the default of ``node --out``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_node_command(commands, default_out)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
