"""Frames of odd and large sizes against the perception node on a fixed-size back-end.

    source .venv/bin/activate && source install/setup.bash
    python -P scripts/node_size_attack.py [--model models/orcnn_demo.safetensors] \
        [--backend onnxruntime] [--large 4096] [--address-space-gb 10]

Starts the node as deployed (``python -P -m orcnn_ros.perception_node``, CPU, the given
back-end) under an address-space cap (``resource.RLIMIT_AS``), then, from a client node in
this process over DDS:

1. one normal 320 x 240 frame (answered: the baseline resident size, RSS, is taken then);
2. a dozen odd sizes: real frames of unusual sizes, which each cost a graph build, and
   frames whose header claims a size beyond the image limits (``orcnn_core.imageio``: too
   many pixels, a side too long, an extreme aspect ratio), which must be refused as
   malformed without any build;
3. one ``--large`` x ``--large`` frame; then the normal frame again, which must be answered;
4. a frame of another large size, and SIGTERM once the node logs that it builds its graph:
   the time until the process is gone and its exit status.

Prints one table: what was sent, what the node did, how long each answer took, the RSS
growth over the baseline (target < 500 MB), whether /diagnostics reported the build, and the
stop time (target < 5 s) and exit status (0). Exit status: 0 when every target is met, else 1.
"""

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from orcnn_core.synth import check_scene
from orcnn_ros.conversions import array_to_image_msg
from orcnn_ros.msg import AmodalInstanceArray

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "size_attack"
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
NORMAL = (320, 240)
#: (width, height, real data?): real frames of odd sizes, and headers claiming sizes beyond
#: the limits (64 Mpx, 16384 px sides, aspect ratio 16) with a few bytes of data.
ODD_SIZES = [(641, 479, True), (1, 1, True), (97, 1031, True), (1280, 720, True),
             (333, 777, True), (2000, 1999, True), (10000, 10, True), (10, 10000, True),
             (9000, 9000, False), (20000, 100, False), (65535, 65535, False),
             (16384, 1, False)]


def node_rss_mb(pid: int) -> tuple:
    """(current, peak) resident size of process ``pid`` in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def start_node(model: str, backend: str, cap_gb: float, log_path: Path):
    cap = int(cap_gb * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    log = open(log_path, "w", encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "orcnn_ros.perception_node", "--ros-args",
         "-r", f"__ns:=/{NAMESPACE}", "-r", f"/diagnostics:=/{NAMESPACE}/diagnostics",
         "-p", f"model_path:={model}", "-p", "device:=cpu", "-p", f"backend:={backend}",
         "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


class Client:
    """Publishes frames to the node and collects its answers and diagnostics."""

    def __init__(self):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("size_attack_client", context=self.context)
        self.pub = self.node.create_publisher(Image, f"/{NAMESPACE}/image", RELIABLE)
        self.answers, self.builds_reported = [], set()
        self.counters = {}
        self.node.create_subscription(AmodalInstanceArray, f"/{NAMESPACE}/amodal_instances",
                                      self.answers.append, RELIABLE)
        self.node.create_subscription(DiagnosticArray, f"/{NAMESPACE}/diagnostics",
                                      self._on_diagnostics, RELIABLE)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.stamp = 0

    def _on_diagnostics(self, msg):
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            self.counters = values
            if "graph_build" in values:
                self.builds_reported.add(values["graph_build"])

    def send(self, msg) -> int:
        """Publish ``msg`` (from :func:`frame`); returns its stamp (seconds)."""
        self.stamp += 1
        msg.header.stamp.sec = self.stamp
        self.pub.publish(msg)
        return self.stamp

    def wait(self, predicate, timeout) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def answered(self, stamp) -> bool:
        return any(m.header.stamp.sec == stamp for m in self.answers)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def frame(width, height, real=True) -> Image:
    """A frame of ``width`` x ``height``: a synthetic scene (rendered at most 640 px wide
    and scaled up, as rendering a large scene takes seconds), or with ``real`` False the
    header alone, with 12 bytes of data: the node must refuse it before reading any."""
    if not real:
        return Image(height=height, width=width, encoding="rgb8", step=width * 3,
                     data=bytes(12))
    scale = min(1.0, 640 / max(width, height))
    scene = check_scene(max(1, round(height * scale)), max(1, round(width * scale)))
    scene = cv2.resize(scene, (width, height), interpolation=cv2.INTER_NEAREST)
    return array_to_image_msg(scene, "rgb8")


def send_and_wait(client, proc, width, height, real, timeout) -> tuple:
    """(what happened, seconds from sending to then) for one frame: answered, or counted
    malformed or failed (learnt from /diagnostics, at most a second late)."""
    before = {k: int(client.counters.get(k, 0)) for k in ("malformed", "failed")}
    msg = frame(width, height, real)
    start = time.monotonic()
    stamp = client.send(msg)

    def settled():
        return (client.answered(stamp) or proc.poll() is not None
                or any(int(client.counters.get(k, 0)) > v for k, v in before.items()))

    client.wait(settled, timeout)
    seconds = time.monotonic() - start
    if proc.poll() is not None:
        return f"node exited ({proc.returncode})", seconds
    if client.answered(stamp):
        return "answered", seconds
    for key, value in before.items():
        if int(client.counters.get(key, 0)) > value:
            return key, seconds
    return "no answer", seconds


def sigterm_during_build(client, proc, log_path, width, height) -> tuple:
    """(seconds from SIGTERM to exit, exit status, build was running) for a frame of a
    new size, SIGTERM sent once the node logs the start of its graph build."""
    client.send(frame(width, height))
    marker = f"building a graph for {width}x{height}"
    client.wait(lambda: marker in log_path.read_text() or proc.poll() is not None, 120)
    time.sleep(0.5)  # well into the build
    building = f"graph for {width}x{height} images" not in \
        log_path.read_text().split(marker)[-1]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    return time.monotonic() - start, status, building


def run(args) -> int:
    log_path = Path(tempfile.mkdtemp(prefix="size_attack.")) / "node.log"
    proc = start_node(args.model, args.backend, args.address_space_gb, log_path)
    client = Client()
    rows, ok = [], True
    try:
        if not client.wait(lambda: client.pub.get_subscription_count() > 0
                           or proc.poll() is not None, 180):
            raise SystemExit(f"the node did not subscribe; its log: {log_path}")
        result, seconds = send_and_wait(client, proc, *NORMAL, True, 120)
        rows.append((f"{NORMAL[0]}x{NORMAL[1]} (normal)", result, seconds))
        baseline = node_rss_mb(proc.pid)[0]
        for width, height, real in ODD_SIZES + [(args.large, args.large, True), (*NORMAL, True)]:
            result, seconds = send_and_wait(client, proc, width, height, real, 300)
            label = f"{width}x{height}" + ("" if real else " (header only)")
            rows.append((label, result, seconds))
        rss, peak = node_rss_mb(proc.pid)
        ok &= rows[-1][1] == "answered" and rss - baseline < 500
        large = f"{args.large}x{args.large}"
        stop_s, status, building = sigterm_during_build(client, proc, log_path,
                                                        args.large - 96, args.large - 64)
        ok &= stop_s < 5.0 and status == 0 and building
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
    print_table(rows, baseline, rss, peak, large in client.builds_reported or
                any(b.startswith(str(args.large)) for b in client.builds_reported),
                stop_s, status, building, args)
    print(f"node log: {log_path}")
    return 0 if ok else 1


def print_table(rows, baseline, rss, peak, reported, stop_s, status, building, args):
    print(f"node: {args.backend} back-end, {Path(args.model).name}, CPU, address space "
          f"capped at {args.address_space_gb:g} GB")
    print("| frame | node | seconds |")
    print("|---|---|---|")
    for label, result, seconds in rows:
        print(f"| {label} | {result} | {seconds:.2f} |")
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| RSS after the normal frame | {baseline:.0f} MB | |")
    print(f"| RSS after the sizes above | {rss:.0f} MB (+{rss - baseline:.0f} MB) | "
          f"growth < 500 MB |")
    print(f"| peak RSS | {peak:.0f} MB | under the cap |")
    print(f"| /diagnostics reported the large build | {'yes' if reported else 'no'} | yes |")
    print(f"| SIGTERM during a graph build ({'under way' if building else 'already done'})"
          f" -> exit | {stop_s:.2f} s, status {status} | < 5 s, status 0 |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "orcnn_demo.safetensors"))
    parser.add_argument("--backend", default="onnxruntime",
                        choices=("onnxruntime", "torchscript"))
    parser.add_argument("--large", type=int, default=4096, help="side of the large frame")
    parser.add_argument("--address-space-gb", type=float, default=10.0)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
