"""Hardening of the ``orcnn-core`` commands against hostile or careless input: outputs over
inputs, a run folder that holds an earlier run, oversized images, failures midway through
``predict``, symbolic link loops, a full disk, out-of-range config values and files that
are not regular files. Every refusal is one line on stderr, exit code 2, no traceback, and
leaves the inputs unchanged byte for byte."""

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import pytest

from orcnn_core.cli import main
from orcnn_core.fileio import check_not_an_input
from orcnn_core.imageio import LIMIT_ENV, check_image_size, find_images
from orcnn_core.synth import generate_dataset
from orcnn_core.training import CHECKPOINT, LOG
from helpers import assert_one_line_error, logged_losses
from tiny_models import save_tiny_model, train_config, write_train_config

ENV = dict(os.environ, OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------ helpers
def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): digest(p) if p.is_file() else "dir"
            for p in sorted(Path(folder).rglob("*"))}


def run_main(capfd, *args):
    code = main([str(a) for a in args])
    return code, capfd.readouterr().err


def run_console(*args, timeout=300, preexec_fn=None):
    command = [sys.executable, "-m", "orcnn_core.cli"] + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=preexec_fn)


def assert_console_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], result.stderr


def png_header(path, width, height) -> Path:
    """A small PNG file whose header says ``width`` x ``height`` (its data is cut short):
    what a decompression bomb looks like to a header reader."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data \
            + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                           + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return Path(path)


def jpeg_header(path, width, height) -> Path:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) \
        + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    Path(path).write_bytes(b"\xff\xd8" + app0 + sof + b"\xff\xd9")
    return Path(path)


def _file_size_limit(limit):
    def apply():
        # Ignored SIGXFSZ: a write past the limit fails with EFBIG, as a full disk fails
        # with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def weights(work) -> Path:
    return save_tiny_model(work / "tiny.safetensors")


@pytest.fixture(scope="module")
def synth(work) -> Path:
    """3 synthetic 64 x 48 images in data/images/ and data/annotations.json."""
    return generate_dataset(work / "data", 3, seed=0, size=(64, 48), num_classes=2)


@pytest.fixture(scope="module")
def predictions(work, weights, synth) -> Path:
    out = work / "first"
    assert main(["predict", "--weights", str(weights), "--images",
                 str(synth.parent / "images"), "--out", str(out), "--device", "cpu"]) == 0
    return out / "predictions.json"


# ------------------------------------------------------------------------------ a
def test_an_output_over_an_input_is_refused_before_any_work(work, weights, synth,
                                                            predictions, capfd):
    images = synth.parent / "images"
    before = {p: digest(p) for p in (weights, synth, predictions)}
    before_images = tree_digest(images)
    cases = [
        (["predict", "--weights", weights, "--images", images, "--out", images],
         "--out", "is the input --images"),
        (["predict", "--weights", weights, "--images", images, "--out", synth.parent],
         "holds the input --images"),
        (["predict", "--weights", weights, "--images", images / "*.png", "--out",
          synth.parent], "holds the input --images"),
        (["evaluate", "--gt", synth, "--predictions", predictions, "--out", synth],
         "is the input --gt"),
        (["evaluate", "--gt", synth, "--predictions", predictions, "--out", predictions],
         "is the input --predictions"),
        (["evaluate", "--weights", weights, "--data", synth, "--out", synth],
         "is the input --data"),
        (["export", "--weights", weights, "--out", weights], "is the input --weights"),
    ]
    for args, *fragments in cases:
        assert_one_line_error(*run_main(capfd, *args), *fragments)
    # Through a symbolic link and a hard link too.
    (work / "link.safetensors").symlink_to(weights)
    assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out",
                                    work / "link.safetensors"), "is the input --weights")
    os.link(predictions, work / "hard.json")
    assert_one_line_error(*run_main(capfd, "evaluate", "--gt", synth, "--predictions",
                                    predictions, "--out", work / "hard.json"),
                          "is the input --predictions")
    # predict's own outputs over its ground truth (OUT/predictions.json is --gt).
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    images, "--gt", predictions, "--out", predictions.parent),
                          "is the input --gt")
    assert {p: digest(p) for p in before} == before
    assert tree_digest(images) == before_images
    with pytest.raises(Exception, match="holds the input"):
        check_not_an_input(work, [("--x", weights)], "--out", folder=True)


# ------------------------------------------------------------------------------ b
def test_train_refuses_an_earlier_run_without_resume_or_force(tmp_path, capfd):
    config = write_train_config(tmp_path / "fast.yaml", train_config(
        backbone="mobilenet_v3_fpn", trainable_backbone_layers=6, anchor_sizes=[16, 32, 64],
        width=64, height=48, train_images=2, val_images=1, iterations=1, steps=[],
        warmup_iters=0))
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"the old run's checkpoint")
    (out / LOG).write_text('{"iteration": 1}\n')
    before = tree_digest(out)
    args = ["train", "--config", config, "--output-dir", out, "--no-progress"]
    assert_one_line_error(*run_main(capfd, *args), f"output_dir {out}: holds an earlier run",
                          "--resume", "--force")
    assert_one_line_error(*run_main(capfd, *args, "--resume", "--force"), "give one of them")
    assert tree_digest(out) == before  # the old checkpoint byte for byte, nothing added
    # --force starts over: a fresh checkpoint and a log of this run only.
    code, err = run_main(capfd, *args, "--force")
    assert code == 0, err
    assert digest(out / CHECKPOINT) != before[CHECKPOINT]
    assert logged_losses(out, once=True).keys() == {1}


# ------------------------------------------------------------------------------ c
def test_oversized_images_are_refused_from_their_header(work, weights, synth, capfd,
                                                        monkeypatch):
    big = work / "big"
    big.mkdir()
    cases = [(png_header(big / "square.png", 12000, 12000), "ORCNN_MAX_IMAGE_PIXELS"),
             (png_header(big / "huge.png", 30000, 30000), "ORCNN_MAX_IMAGE_SIDE"),
             (jpeg_header(big / "strip.jpg", 10000, 10), "ORCNN_MAX_IMAGE_ASPECT_RATIO")]
    for path, variable in cases:
        folder = work / f"only_{path.stem}"
        folder.mkdir()
        os.link(path, folder / path.name)
        start = time.monotonic()
        assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                        folder, "--out", work / "big_out"),
                              path.name, "the limit", variable)
        assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out",
                                        work / "big.onnx", "--check-image", path),
                              "--check-image", path.name, variable)
        assert time.monotonic() - start < 10
        assert not (work / "big_out").exists()  # a refused run leaves no folder either
        assert not (work / "big.onnx").exists()
    # evaluate --weights: a ground-truth image with a bomb header is refused before the model
    gt = json.loads(synth.read_text())
    bomb_dir = work / "bomb_images"
    (bomb_dir / "images").mkdir(parents=True)
    for image in gt["images"]:
        png_header(bomb_dir / image["file_name"], 30000, 30000)
    assert_one_line_error(*run_main(capfd, "evaluate", "--weights", weights, "--data", synth,
                                    "--images", bomb_dir), "ORCNN_MAX_IMAGE_SIDE")
    # A 4K camera frame passes; the environment variable raises the limit.
    assert check_image_size(png_header(big / "4k.png", 3840, 2160)) == (3840, 2160)
    assert check_image_size(jpeg_header(big / "4k.jpg", 3840, 2160)) == (3840, 2160)
    monkeypatch.setenv(LIMIT_ENV["pixels"], str(12000 * 12000))
    assert check_image_size(big / "square.png") == (12000, 12000)


PEAK = """
import resource, sys
import orcnn_core.commands
from orcnn_core.cli import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_kib(*args):
    """(peak resident memory in KiB, stderr without its last line) of ``orcnn-core ARGS``
    in a fresh process; no ARGS: the process that only imports the commands."""
    result = subprocess.run([sys.executable, "-c", PEAK] + [str(a) for a in args],
                            capture_output=True, text=True, timeout=120, env=ENV)
    *lines, peak = result.stderr.strip().splitlines()
    return int(peak), "\n".join(lines)


def test_an_image_bomb_costs_little_memory_in_the_real_process(work, weights):
    folder = work / "bomb"
    folder.mkdir()
    png_header(folder / "bomb.png", 16000, 16000)  # 768 MB once decoded
    baseline, _ = peak_kib()  # torch and the rest imported: most of the process
    peak, err = peak_kib("predict", "--weights", weights, "--images", folder, "--out",
                         work / "bomb_out")
    assert "bomb.png" in err and "ORCNN_MAX_IMAGE_PIXELS" in err, err
    assert peak - baseline < 150 * 1024, f"{(peak - baseline) / 1024:.0f} MiB more"


# ------------------------------------------------------------------------------ d
def test_predict_writes_all_or_nothing_with_unique_overlay_names(work, weights, synth, capfd):
    images = work / "mixed"
    images.mkdir()
    frame = cv2.imread(str(synth.parent / "images" / "000001.png"))
    cv2.imwrite(str(images / "a.jpg"), frame)
    cv2.imwrite(str(images / "a.png"), frame)
    out = work / "mixed_out"
    assert main(["predict", "--weights", str(weights), "--images", str(images), "--out",
                 str(out), "--device", "cpu"]) == 0
    capfd.readouterr()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.jpg.png", "a.png.png"]
    assert len(json.loads((out / "images.json").read_text())["images"]) == 2
    first = tree_digest(out)

    # A file with a good header but cut data, sorted last: it fails after two overlays.
    good = (synth.parent / "images" / "000001.png").read_bytes()
    (images / "z.png").write_bytes(good[: len(good) // 2])
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    images, "--out", out, "--device", "cpu"), "z.png")
    assert tree_digest(out) == first  # the earlier run's outputs, unmixed; no temporary
    fresh = work / "fresh_out"
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    images, "--out", fresh, "--device", "cpu"), "z.png")
    assert list(fresh.iterdir()) == []


# ------------------------------------------------------------------------------ e
def test_recursive_pattern_survives_symbolic_link_loops(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/.hidden.png"):
        (root / name).write_bytes(b"x")
    # Two loops: following them as glob's ** does would take exponential time.
    for k in range(3):
        (root / "sub" / f"up{k}").symlink_to("..")
    (root / "self").symlink_to(".")
    start = time.monotonic()
    found = find_images(f"{root}/**/*.*")
    assert time.monotonic() - start < 5
    assert found == [root / "a.png", root / "sub" / "b.jpg"]
    assert find_images(f"{root}/**/b.jpg") == [root / "sub" / "b.jpg"]


# ------------------------------------------------------------------------------ f
def test_a_full_disk_is_one_line_naming_the_file(work, weights, synth):
    images = synth.parent / "images"
    limit = _file_size_limit(2000)  # every overlay PNG and ONNX file is larger
    out = work / "full"
    result = run_console("predict", "--weights", weights, "--images", images, "--out", out,
                         "--device", "cpu", preexec_fn=limit)
    assert_console_error(result, f"cannot write {out / 'overlays'}", "File too large",
                         "nothing written")
    assert list(out.iterdir()) == []  # no partial overlays, no temporary folder

    onnx = work / "full.onnx"
    result = run_console("export", "--weights", weights, "--out", onnx, "--height", 48,
                         "--width", 64, preexec_fn=limit)
    assert_console_error(result, f"cannot write {onnx}", "File too large")
    assert not onnx.exists() and not list(work.glob(".full.onnx*"))

    data = work / "full_synth"
    result = run_console("synth", "--out", data, "--num-images", 2, "--size", "64x48",
                         preexec_fn=limit)
    assert_console_error(result, "cannot write", "File too large", "annotations.json")
    assert not (data / "annotations.json").exists()
    assert not [p for p in data.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ g
@pytest.mark.parametrize("item, expected", [
    ("seed=-1", "seed -1: must be in [0, 4294967295]"),
    ("data.num_workers=-1", "data.num_workers -1: must be in [0, 256]"),
    ("solver.weight_decay=-1", "solver.weight_decay -1.0: must be in [0, 1]"),
    ("solver.lr=1e308", "solver.lr 1e+308: must be in (0, 1e+30]"),
    ("solver.momentum=5", "solver.momentum 5.0: must be in [0, 1)"),
    ("solver.gamma=-1", "solver.gamma -1.0: must be in (0, 1]"),
    ("solver.warmup_factor=-1", "solver.warmup_factor -1.0: must be in (0, 1]"),
    ("solver.warmup_iters=-5", "solver.warmup_iters -5: must be in [0, 1000000000]"),
    ("solver.steps=[0,5]", "solver.steps 0: must be in [1, 1000000000]"),
    ("solver.grad_clip_norm=-1", "solver.grad_clip_norm -1.0: must be in [0, 1e+06]"),
    ("data.synth_train.num_classes=11", "data.synth_train.num_classes 11: must be in [1, 10]"),
    ("model.fpn_channels=1000000", "model.fpn_channels 1000000: must be in [1, 4096]"),
    ("model.anchor_aspect_ratios=[0.5,1.0e+9]", "model.anchor_aspect_ratios 1000000000.0"),
])
def test_out_of_range_set_values_are_refused_by_key_and_range(
        tmp_path, capfd, item, expected):
    out = tmp_path / "run"
    assert_one_line_error(*run_main(capfd, "train", "--config", "synth_demo", "--output-dir",
                                    out, "--set", item), expected)
    assert not out.exists()


# ------------------------------------------------------------------------------ h
def test_fifos_and_folders_are_refused_where_files_are_read(
        work, weights, synth, predictions):
    fifo = work / "fifo"
    os.mkfifo(fifo)
    images = synth.parent / "images"
    cases = [
        (["evaluate", "--gt", fifo, "--predictions", predictions], "--gt", "not a regular"),
        (["evaluate", "--gt", synth, "--predictions", fifo], "--predictions", "not a regular"),
        (["evaluate", "--weights", weights, "--data", fifo], "--data", "not a regular"),
        (["predict", "--weights", weights, "--images", images, "--gt", fifo, "--out",
          work / "o"], "--gt", "not a regular"),
        (["predict", "--weights", fifo, "--images", images, "--out", work / "o"],
         "--weights", "not a regular"),
        (["export", "--weights", fifo, "--out", work / "f.onnx"], "not a regular"),
        (["export", "--weights", weights, "--out", work / "f.onnx", "--check-image", fifo],
         "--check-image", "not a regular"),
        (["predict", "--weights", work, "--images", images, "--out", work / "o"],
         "--weights", "is a directory"),
        (["evaluate", "--gt", work, "--predictions", predictions], "--gt", "is a directory"),
        (["train", "--config", fifo, "--output-dir", work / "t"], "--config",
         "not a regular"),
        (["train", "--config", "synth_demo", "--output-dir", work / "t", "--set",
          f"init_weights={fifo}"], "init_weights", "not a regular"),
    ]
    for args, *fragments in cases:
        assert_console_error(run_console(*args, timeout=120), *fragments)
