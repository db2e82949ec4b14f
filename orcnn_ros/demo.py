"""The end-to-end demo behind ``make demo``: sim camera -> perception node -> consumer.

    python -P -m orcnn_ros.demo [--frames 30] [--out demo_output] [--model PATH]

Starts the simulated camera (:mod:`orcnn_ros.sim_camera`) and the perception node with the
bundled model and ``config/perception.yaml`` as two processes, then consumes
``/amodal_instances`` here: one line per frame (instances, how many have something on top,
pick order, latency), the node's overlay of every frame as a PNG, and a summary JSON, all
in ``--out``. It stops after ``--frames`` frames or ``--timeout`` seconds, shuts both
processes down, and exits 1 when the node produced nothing. ``ORCNN_DEMO_MODEL`` (or
``--model``) replaces the bundled model, e.g. to try the demo with a model of your own.
"""

import importlib.util
import os
import sys

if __name__ == "__main__" and not sys.flags.safe_path \
        and importlib.util.find_spec("orcnn_ros.msg") is None:  # pragma: no cover
    # Started from the repository root, where the source folder shadows the built package.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "orcnn_ros.demo", *sys.argv[1:]])

import argparse  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from orcnn_core.fileio import atomic_write_json  # noqa: E402
from orcnn_ros.conversions import image_to_array  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402
from orcnn_ros.perception_node import (BUNDLED_MODEL, bundled_model_candidates,  # noqa: E402
                                       default_model_path)

CAMERA_TOPIC = "/orcnn_demo/image"
OUTPUT_TOPIC = "/amodal_instances"
OVERLAY_TOPIC = "/orcnn_perception/debug_image"


def params_file():
    """The installed config/perception.yaml, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory("orcnn_ros")) / "config" / "perception.yaml"
        if path.is_file():
            return path
    except Exception:  # not installed through ament
        pass
    path = Path(__file__).resolve().parents[1] / "config" / "perception.yaml"
    return path if path.is_file() else None


def child_env() -> dict:
    env = dict(os.environ)
    # Keep the demo's DDS traffic on this machine unless the user says otherwise.
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(args: list, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w", encoding="utf-8")
    try:
        return subprocess.Popen([sys.executable, "-P", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
    finally:
        log.close()  # the child holds its own descriptor


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGINT (a clean rclpy shutdown), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            proc.send_signal(sig)
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode


def frame_line(index: int, msg, age_ms: float) -> str:
    occluded = sum(1 for inst in msg.instances if inst.layer > 0)
    pick = " ".join(str(i) for i in list(msg.pick_order)[:10])
    more = " ..." if len(msg.pick_order) > 10 else ""
    cycle = " (cycle broken)" if msg.has_cycle else ""
    return (f"frame {index:3d} | {len(msg.instances):2d} instances, {occluded:2d} occluded "
            f"| pick {pick}{more}{cycle} | latency {msg.latency_ms:5.0f} ms (model "
            f"{msg.inference_ms:4.0f} ms), frame age {age_ms:5.0f} ms")


def run(args) -> int:
    """The demo as the command line describes it; returns the exit status."""
    model = demo_model(args.model)
    if model is None:
        return 2
    out = Path(args.out).resolve()
    overlays, logs = prepare_output(out)
    print(f"demo: model {model}, camera {args.width}x{args.height} at {args.rate:g} Hz, "
          f"{args.frames} frames, output in {out}")
    rclpy.init()
    consumer = Consumer()
    node = start(node_command(args, model), logs / "perception_node.log")
    camera = start(camera_command(args), logs / "sim_camera.log")
    interrupted = False
    try:
        consumer.collect(node, args.frames, args.timeout)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        camera_rc = stop(camera)
        node_rc = stop(node)
        consumer.destroy_node()
        rclpy.try_shutdown()
    records = consumer.records
    written = write_overlays(records, consumer.overlays, overlays)
    summary = dict(
        model=str(model), device=consumer.diagnostics.get("device"), frames=len(records),
        frames_requested=args.frames, camera=dict(width=args.width, height=args.height,
                                                  rate_hz=args.rate),
        output_rate_hz=output_rate(records, consumer.first_at),
        **record_statistics(records), overlays_written=written,
        node_diagnostics=consumer.diagnostics, node_exit_code=node_rc,
        camera_exit_code=camera_rc, interrupted=interrupted, records=records)
    atomic_write_json(out / "summary.json", summary, indent=2)
    if not records:
        print_node_failure(args.timeout, logs / "perception_node.log")
        return 1
    print(f"demo: {len(records)} frames, {summary['instances_mean']} instances and "
          f"{summary['occluded_mean']} occluded per frame, latency "
          f"{summary['latency_ms_median']} ms median (model {summary['inference_ms_mean']} "
          f"ms), frame age {summary['frame_age_ms_median']} ms median; {written} overlays "
          f"and summary.json in {out}")
    return 130 if interrupted else 0


def demo_model(model_arg: str):
    """The model file the demo runs (``--model``, else the bundled model); None, after
    saying why, when it is missing."""
    model = Path(model_arg) if model_arg else default_model_path()
    if model.is_file():
        return model
    if model_arg:
        print(f"demo: the model {model} is missing.", file=sys.stderr)
    else:
        looked = " and ".join(str(p) for p in bundled_model_candidates())
        print(f"demo: the bundled model {BUNDLED_MODEL} is missing (looked for {looked})."
              f" The demo runs it; to try another model, set ORCNN_DEMO_MODEL or pass "
              f"--model PATH.", file=sys.stderr)
    return None


def prepare_output(out: Path):
    """(overlay folder, log folder) in ``out``, without the overlays of an earlier run."""
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for old in overlays.glob("frame_*.png"):
        old.unlink()
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    return overlays, logs


def node_command(args, model: Path) -> list:
    """Arguments of ``python -P`` that start the perception node on the demo camera."""
    command = ["-m", "orcnn_ros.perception_node", "--ros-args"]
    config = params_file()
    if config is not None:
        command += ["--params-file", str(config)]
    command += ["-r", f"image:={CAMERA_TOPIC}", "-p", f"model_path:={model}",
                "-p", f"device:={args.device}"]
    if args.score_threshold is not None:
        command += ["-p", f"score_threshold:={args.score_threshold}"]
    return command


def camera_command(args) -> list:
    """Arguments of ``python -P`` that start the simulated camera."""
    return ["-m", "orcnn_ros.sim_camera", "--ros-args", "-r", f"image:={CAMERA_TOPIC}",
            "-p", f"rate:={float(args.rate)}", "-p", f"width:={args.width}",
            "-p", f"height:={args.height}", "-p", f"seed:={args.seed}"]


class Consumer:
    """The demo's own ROS node: collects the node's answers, overlays and diagnostics."""

    def __init__(self):
        self.node = rclpy.create_node("orcnn_demo_consumer")
        self.arrays = []  # [(AmodalInstanceArray, arrival time ns)]
        self.records = []  # frame_record() of each answer shown, in arrival order
        self.first_at = None  # time.monotonic() of the first record
        self.overlays = {}  # (stamp sec, nanosec) -> overlay Image
        self.diagnostics = {}  # the node's last diagnostic values, level and message
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(AmodalInstanceArray, OUTPUT_TOPIC, self._on_array,
                                      reliable)
        self.node.create_subscription(Image, OVERLAY_TOPIC, self._on_overlay, reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics,
                                      10)

    def _on_array(self, msg) -> None:
        self.arrays.append((msg, self.node.get_clock().now().nanoseconds))

    def _on_overlay(self, msg) -> None:
        self.overlays[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith("orcnn_perception"):
                self.diagnostics.update({kv.key: kv.value for kv in status.values},
                                        level=int.from_bytes(status.level, "little"),
                                        message=status.message)

    def collect(self, node: subprocess.Popen, frames: int, timeout: float) -> None:
        """Record each answer (and print its line) until ``frames`` answers, ``timeout``
        seconds or the exit of the ``node`` process."""
        records = self.records
        started = time.monotonic()
        shown = 0
        while len(records) < frames and time.monotonic() - started < timeout:
            rclpy.spin_once(self.node, timeout_sec=0.1)
            if node.poll() is not None:
                self.node.get_logger().error(
                    f"the perception node exited with code {node.returncode}")
                break
            while shown < len(self.arrays) and len(records) < frames:
                msg, received_ns = self.arrays[shown]
                shown += 1
                stamp_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                age_ms = (received_ns - stamp_ns) / 1e6
                self.first_at = self.first_at or time.monotonic()
                records.append(frame_record(msg, age_ms))
                print(frame_line(len(records), msg, age_ms), flush=True)
        # Overlays of the last frames may still be on their way, and a short run can end
        # before the node's first diagnostics (one per second) arrive.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and (len(self.overlays) < len(records)
                                               or "device" not in self.diagnostics):
            rclpy.spin_once(self.node, timeout_sec=0.1)

    def destroy_node(self) -> None:
        self.node.destroy_node()


def frame_record(msg, age_ms: float) -> dict:
    """One answer as summary.json keeps it."""
    return dict(
        stamp=[msg.header.stamp.sec, msg.header.stamp.nanosec],
        instances=len(msg.instances),
        occluded=sum(1 for i in msg.instances if i.layer > 0),
        classes=[i.class_name for i in msg.instances],
        scores=[round(float(i.score), 3) for i in msg.instances],
        occlusion_ratios=[round(float(i.occlusion_ratio), 3) for i in msg.instances],
        edges=[[e.occluder, e.occludee] for e in msg.edges],
        pick_order=list(msg.pick_order), has_cycle=bool(msg.has_cycle),
        latency_ms=round(float(msg.latency_ms), 1),
        inference_ms=round(float(msg.inference_ms), 1),
        frame_age_ms=round(age_ms, 1))


def write_overlays(records: list, overlay_msgs: dict, folder: Path) -> int:
    """Write the overlay of each record that has one as a PNG (named in the record);
    returns how many."""
    written = 0
    for i, record in enumerate(records, 1):
        overlay = overlay_msgs.get(tuple(record["stamp"]))
        if overlay is None:
            continue
        image, order = image_to_array(overlay)
        if order == "rgb":
            image = np.ascontiguousarray(image[:, :, ::-1])
        cv2.imwrite(str(folder / f"frame_{i:04d}.png"), image)
        record["overlay"] = f"overlays/frame_{i:04d}.png"
        written += 1
    return written


def output_rate(records: list, first_at) -> float:
    """Answers per second from the first answer on (None with fewer than two)."""
    elapsed = time.monotonic() - first_at if first_at and len(records) > 1 else 0.0
    return round((len(records) - 1) / elapsed, 2) if elapsed else None


def record_statistics(records: list) -> dict:
    """Means and medians over the records, in the order summary.json lists them."""
    def mean(key):
        values = [r[key] for r in records]
        return round(statistics.fmean(values), 1) if values else None

    def median(key):
        values = [r[key] for r in records]
        return round(statistics.median(values), 1) if values else None

    return dict(instances_mean=mean("instances"), occluded_mean=mean("occluded"),
                latency_ms_mean=mean("latency_ms"), latency_ms_median=median("latency_ms"),
                inference_ms_mean=mean("inference_ms"),
                frame_age_ms_mean=mean("frame_age_ms"),
                frame_age_ms_median=median("frame_age_ms"))


def print_node_failure(timeout: float, log_path: Path) -> None:
    print(f"demo: FAILED, the node published nothing within {timeout:g} s; see "
          f"{log_path}:", file=sys.stderr)
    log_text = log_path.read_text(errors="replace").splitlines()
    for line in log_text[-15:]:
        print(f"  {line}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orcnn_ros.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=30, help="stop after N frames")
    parser.add_argument("--timeout", type=float, default=150.0,
                        help="stop after this many seconds at the latest")
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--model", default=os.environ.get("ORCNN_DEMO_MODEL", ""),
                        help="weights file (default: $ORCNN_DEMO_MODEL, else the bundled "
                             "model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="override config/perception.yaml's score_threshold")
    parser.add_argument("--rate", type=float, default=5.0, help="camera frames per second")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0, help="scene seed")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.timeout <= 0 or args.rate <= 0:
        parser.error("--frames, --timeout and --rate must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
