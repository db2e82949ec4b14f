"""Frames of odd and large sizes, and compressed frames that are costly to decode, against
the perception node and bag_infer, with the tiny model (real DDS, real onnxruntime).

* The node as a program on the onnxruntime back-end: an extreme aspect ratio is a
  malformed frame (a warning, not an error); a large new size builds its graph while
  /diagnostics says so and counts the frames skipped meanwhile, without keeping the build's
  memory; SIGTERM during such a build ends the process within 5 s, status 0.
* Progressive JPEGs beyond the decode budget of orcnn_core.imageio: refused from the
  stream, by the node (the next frame is answered) and by the image reader.
* bag_infer: malformed and failing frames are skipped and counted, and the output bag is
  readable even when the run stops midway.
"""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

rclpy = pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from orcnn_core.errors import InputError  # noqa: E402
from orcnn_core.imageio import MAX_JPEG_SCANS, read_image  # noqa: E402
from orcnn_core.predictor import Predictor  # noqa: E402
from orcnn_core.synth import check_scene  # noqa: E402
from orcnn_ros import conversions  # noqa: E402
from orcnn_ros.msg import AmodalInstanceArray  # noqa: E402
from node_harness import RELIABLE, Collector, Harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "hardening"
WIDTH, HEIGHT = 160, 120
#: RSS the node may keep after a 3000 x 3000 frame's graph build and inference. Measured
#: with the tiny model: +300 to +330 MB; with onnxruntime's memory arena and memory pattern
#: and without malloc_trim, +550 MB.
MAX_RSS_GROWTH_MB = 430


def progressive_jpeg(image: np.ndarray, extra_scans: int = 0) -> bytes:
    """A progressive JPEG of the RGB ``image`` (Pillow: 10 scans) with its last scan
    repeated ``extra_scans`` times; libjpeg decodes every repeat (and warns of an
    inconsistent progression)."""
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    assert data.endswith(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last_scan * extra_scans + b"\xff\xd9"


def with_progressive_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A progressive JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc2")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


# ---------------------------------------------------------------------- decode budget
def test_progressive_jpegs_beyond_the_decode_budget_are_refused_from_the_stream(
        tmp_path, monkeypatch):
    scene = check_scene(HEIGHT, WIDTH)
    normal = progressive_jpeg(scene)
    many = progressive_jpeg(scene, extra_scans=MAX_JPEG_SCANS)
    # The references: both decode (libjpeg takes them), so the check is what refuses one.
    for data in (normal, many):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (HEIGHT, WIDTH, 3)
    assert conversions.check_compressed(CompressedImage(format="jpeg", data=normal)) == \
        ("jpeg", WIDTH, HEIGHT)
    cases = [(many, f"{MAX_JPEG_SCANS + 10} scans \\(at most {MAX_JPEG_SCANS} are decoded\\)"),
             # 20 scans of a claimed 4096 x 4096: 335 M pixel-scans > 268 M.
             (with_progressive_size(progressive_jpeg(scene, 10), 4096, 4096),
              "20 scans of 4096 x 4096 pixels, more than the decode budget")]
    for data, message in cases:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=f"^data: jpeg stream with {message}"):
            conversions.message_to_array(CompressedImage(format="jpeg", data=data))
        assert time.perf_counter() - start < 0.2
    # The budget's variable raises it.
    big = CompressedImage(format="jpeg", data=cases[1][0])
    monkeypatch.setenv("ORCNN_MAX_JPEG_SCAN_PIXELS", str(20 * 4096 * 4096))
    assert conversions.check_compressed(big)[1:] == (4096, 4096)
    monkeypatch.delenv("ORCNN_MAX_JPEG_SCAN_PIXELS")
    with pytest.raises(ValueError, match="ORCNN_MAX_JPEG_SCAN_PIXELS raises it"):
        conversions.check_compressed(big)
    # 10 scans of the same claimed size are within the budget (the limit, not the size).
    assert conversions.check_compressed(CompressedImage(
        format="jpeg", data=with_progressive_size(normal, 4096, 4096)))[1:] == (4096, 4096)
    # The image reader of the command line applies the same budget.
    path = tmp_path / "scans.jpg"
    path.write_bytes(many)
    with pytest.raises(InputError, match=rf"^{path}: JPEG with {MAX_JPEG_SCANS + 10} scans"):
        read_image(path)
    (tmp_path / "ok.jpg").write_bytes(normal)
    assert read_image(tmp_path / "ok.jpg").shape == (HEIGHT, WIDTH, 3)


def test_node_warns_once_about_a_costly_jpeg_and_answers_the_next_frame(tiny_model_path,
                                                                        ros_domain_id):
    scene = check_scene(HEIGHT, WIDTH)
    attack = progressive_jpeg(scene, extra_scans=2 * MAX_JPEG_SCANS)
    with Harness("jpeg_budget_client") as harness:
        node = harness.start_node(tiny_model_path, "jpeg_budget", use_compressed=True,
                                  qos_reliability="reliable", qos_depth=10)
        try:
            answers = Collector(harness, AmodalInstanceArray, "/jpeg_budget/amodal_instances")
            pub = harness.node.create_publisher(CompressedImage, "/jpeg_budget/image/compressed",
                                                RELIABLE)
            harness.spin_until(lambda: pub.get_subscription_count() > 0, 60, "discovery")
            stamps = []
            for data in (attack, attack, progressive_jpeg(scene)):
                msg = CompressedImage(format="jpeg", data=data)
                msg.header.stamp.sec = harness.next_stamp()
                stamps.append(msg.header.stamp.sec)
                pub.publish(msg)
            harness.spin_until(lambda: answers.by_stamp(stamps[-1]), 60, "the good frame's answer")
            assert [m.header.stamp.sec for m in answers.messages] == [stamps[-1]]
            assert node.stats.snapshot()["malformed"] == 2
            logger = "jpeg_budget.orcnn_perception"
            harness.spin_until(lambda: harness.log_lines(logger, Log.WARN), 10, "the warning")
            warnings = [line for line in harness.log_lines(logger, Log.WARN) if "scans" in line]
            assert len(warnings) == 1, warnings  # throttled
            assert f"{2 * MAX_JPEG_SCANS + 10} scans (at most {MAX_JPEG_SCANS}" in warnings[0]
            assert harness.log_lines(logger, Log.ERROR) == []
        finally:
            harness.destroy(node)


# ---------------------------------------------------------------------- sizes, on a program
@pytest.fixture(scope="module")
def node_program(tmp_path_factory, tiny_model_path, ros_domain_id):
    """The node as a program on the onnxruntime back-end (reliable input, so that large
    frames arrive whole), started with the module: its start-up overlaps the tests above."""
    log_path = tmp_path_factory.mktemp("program") / "node.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "orcnn_ros.perception_node", "--ros-args",
             "-r", f"__ns:=/{NAMESPACE}", "-r", f"/diagnostics:=/{NAMESPACE}/diagnostics",
             "-p", f"model_path:={tiny_model_path}", "-p", "device:=cpu",
             "-p", "score_threshold:=0.0", "-p", "backend:=onnxruntime",
             "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def gray(width, height) -> Image:
    """A mono8 frame (a third of the bytes of rgb8 to send)."""
    return conversions.array_to_image_msg(np.full((height, width), 128, np.uint8), "mono8")


class Program:
    """The test's side of the node program: frames out, answers and diagnostics in."""

    def __init__(self, harness, proc, log_path):
        self.harness, self.proc, self.log_path = harness, proc, log_path
        self.answers = Collector(harness, AmodalInstanceArray, f"/{NAMESPACE}/amodal_instances")
        self.diagnostics = Collector(harness, DiagnosticArray, f"/{NAMESPACE}/diagnostics")
        self.pub = harness.node.create_publisher(Image, f"/{NAMESPACE}/image", RELIABLE)

    def log(self) -> str:
        return self.log_path.read_text()

    def send(self, msg) -> int:
        msg.header.stamp.sec = self.harness.next_stamp()
        self.pub.publish(msg)
        return msg.header.stamp.sec

    def wait_answer(self, stamp, what, timeout=120):
        self.harness.spin_until(
            lambda: self.answers.by_stamp(stamp) or self.proc.poll() is not None, timeout, what)
        assert self.proc.poll() is None, self.log()

    def wait_log(self, text, timeout=60):
        self.harness.spin_until(lambda: text in self.log() or self.proc.poll() is not None,
                                timeout, repr(text))
        assert self.proc.poll() is None, self.log()

    def statuses(self):
        return [s for m in self.diagnostics.messages for s in m.status
                if s.name == "orcnn_perception: inference"]


def test_node_program_on_onnxruntime_survives_odd_and_large_frames(node_program):
    proc, log_path = node_program
    with Harness("hardening_client", rosout=False) as harness:
        program = Program(harness, proc, log_path)
        harness.spin_until(lambda: program.pub.get_subscription_count() > 0
                           or proc.poll() is not None, 120, "the program to subscribe")
        assert proc.poll() is None, program.log()
        normal = conversions.array_to_image_msg(check_scene(HEIGHT, WIDTH), "rgb8")
        program.wait_answer(program.send(normal), "a normal frame's answer")
        baseline = rss_mb(proc.pid)

        # An extreme aspect ratio: a malformed frame, a warning, the next frame answered.
        program.send(gray(10000, 10))
        program.wait_log("10000 x 10 has an aspect ratio above 16")
        program.wait_answer(program.send(normal), "the frame after the thin one")

        # A large new size: the build runs on the worker, /diagnostics says so, the frames
        # that arrive meanwhile wait in the slot (the newest) or are skipped (the others).
        large = program.send(gray(3000, 3000))
        program.wait_log("building a graph for 3000x3000 images")
        during = [program.send(normal) for _ in range(3)]
        harness.spin_until(lambda: any("building the graph for 3000x3000" in s.message
                                       for s in program.statuses()), 30, "the build's status")
        status = next(s for s in program.statuses() if "building the graph" in s.message)
        assert status.level == DiagnosticStatus.WARN
        assert ("graph_build", "3000x3000") in [(v.key, v.value) for v in status.values]
        program.wait_answer(during[-1], "the newest frame after the build")
        assert program.answers.by_stamp(large)
        assert not any(program.answers.by_stamp(s) for s in during[:2])

        def after_build():
            last = program.statuses()[-1]
            keys = [v.key for v in last.values]
            return last.message.endswith("Hz") and "graph_build" not in keys

        harness.spin_until(after_build, 10, "the status after the build")
        values = {v.key: v.value for v in program.statuses()[-1].values}
        assert values["frames_skipped_during_build"] == "2"
        growth = rss_mb(proc.pid) - baseline
        print(f"RSS growth after the 3000x3000 frame: {growth:.0f} MB")
        assert growth < MAX_RSS_GROWTH_MB, f"RSS grew by {growth:.0f} MB"
        assert "[ERROR]" not in program.log(), program.log()

        # SIGTERM while the graph of another large size is built: gone within 5 s, status 0,
        # without waiting for the build (it never logs its end).
        program.send(gray(2992, 3000))
        program.wait_log("building a graph for 2992x3000 images")
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        seconds = time.monotonic() - start
        print(f"SIGTERM during a graph build -> exit: {seconds:.2f} s")
        output = program.log()
        assert status == 0, output
        assert seconds < 5.0, f"exit took {seconds:.2f} s during a graph build"
        assert "graph for 2992x3000 images (score" not in output, output
        assert "Traceback" not in output, output


# ---------------------------------------------------------------------- bag_infer
def write_bag(path, frames, topic="/camera/image_raw"):
    """A rosbag2 of sensor_msgs/Image frames ((array, encoding) each), one a second."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    image_type = store.types["sensor_msgs/msg/Image"]
    header, stamp = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=9) as writer:
        connection = writer.add_connection(topic, image_type.__msgtype__, typestore=store)
        for k, (array, encoding) in enumerate(frames):
            height, width = array.shape[:2]
            data = np.ascontiguousarray(array).reshape(-1)
            msg = image_type(header=header(stamp=stamp(sec=10 + k, nanosec=0), frame_id="cam"),
                             height=height, width=width, encoding=encoding, is_bigendian=0,
                             step=data.size // height, data=data)
            writer.write(connection, (10 + k) * 10**9,
                         store.serialize_cdr(msg, image_type.__msgtype__))


def read_results(path) -> list:
    """Time stamps (s) of the AmodalInstanceArray messages of an output bag."""
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        return [t // 10**9 for c, t, _ in reader.messages() if c.topic == "/amodal_instances"]


def test_bag_infer_skips_bad_frames_and_always_finalises_its_bag(tmp_path, tiny_model_path):
    from tiny_models import NODE_MODEL, tiny_model

    from orcnn_ros.bag_infer import infer_bag

    scene = check_scene(HEIGHT, WIDTH)
    frames = [(scene, "rgb8"), (np.zeros((10, 10000), np.uint8), "mono8"), (scene, "rgb8"),
              (scene, "rgb8")]
    bag = tmp_path / "in"
    write_bag(bag, frames)
    predictor = Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0)

    # Stopped midway (Ctrl-C while the second result is logged): the bag holds the frames
    # before and is readable.
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("frame 2:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_bag(bag, "/camera/image_raw", tmp_path / "stopped", predictor, log=log,
                  score_threshold=0.0)
    assert any("skipping malformed frame at 11000000000 ns: height/width: 10000 x 10 has an "
               "aspect ratio above 16" in line for line in lines), lines
    assert read_results(tmp_path / "stopped") == [10, 12]
    assert lines[-1].startswith("stopped after 2 frames (KeyboardInterrupt")

    # Inference failing on every frame (a model whose graphs fail their check): each is
    # skipped and counted, the run ends, the bag is readable and empty.
    model = tiny_model(**NODE_MODEL)
    with torch.no_grad():
        model.roi_heads.amodal_mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    failing = Predictor(model, device="cpu", score_thresh=0.0, backend="onnxruntime")
    lines = []
    summary = infer_bag(bag, "/camera/image_raw", tmp_path / "failed", failing,
                        log=lines.append, overlay_topic=None)
    assert (summary["frames"], summary["malformed"], summary["failed"]) == (0, 1, 3)
    assert sum("inference failed" in line for line in lines) == 3
    assert read_results(tmp_path / "failed") == []
