"""Training loop: checkpoints, exact resume, signals, DDP, NaN, bad configs (SIGKILL at
random moments: test_training_faults.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from orcnn_core.train_config import load_train_config
from orcnn_core.model import MASK_HEAD_PREFIXES, build_model
from orcnn_core.training import (CHECKPOINT, FINAL_WEIGHTS, _build_training_objects,
                                 check_output_dir, load_checkpoint, lr_factor, train)
from orcnn_core.weights import build_from_file
from helpers import logged_losses
from tiny_models import train_config, write_train_config

TINY = train_config(
    backbone="resnet18_fpn", trainable_backbone_layers=5, anchor_sizes=[16, 32, 64, 128, 256],
    width=128, height=96, train_images=12, val_images=2, iterations=3, steps=[2],
    warmup_iters=1)


@pytest.fixture
def tiny_config(tmp_path):
    return write_train_config(tmp_path / "tiny.yaml", TINY)


def run_cli(*args, timeout=300, **kwargs):
    return subprocess.run(["orcnn-core", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_three_iterations_write_a_checkpoint_and_weights(tiny_config, tmp_path):
    out = tmp_path / "run"
    cfg = load_train_config(str(tiny_config), [f"output_dir={out}", "checkpoint_period=3"])
    result = train(cfg, progress=False)
    assert result["iteration"] == 3 and result["stopped"] is None
    state = load_checkpoint(out / CHECKPOINT)
    assert state["iteration"] == 3
    assert set(state) >= {"model", "optimizer", "scheduler", "torch_rng"}
    model = build_from_file(out / FINAL_WEIGHTS)
    # The final weights are the checkpoint's model.
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert model.config.class_names == ["cereal_box", "soup_can"]  # from the data
    assert sorted(logged_losses(out)) == [1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP_A", "AP_V", "AP_AV", "occluded", "order"} <= set(metrics)


def test_resume_gives_the_same_next_loss_as_an_uninterrupted_run(tiny_config, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(load_train_config(str(tiny_config), [f"output_dir={whole}"]), progress=False)
    train(load_train_config(str(tiny_config), [f"output_dir={split}",
                                               "solver.iterations=2"]), progress=False)
    result = train(load_train_config(str(tiny_config), [f"output_dir={split}"]),
                   resume=True, progress=False)
    assert result["iteration"] == 3
    assert logged_losses(split)[3] == logged_losses(whole)[3]
    a = build_from_file(whole / FINAL_WEIGHTS).state_dict()
    b = build_from_file(split / FINAL_WEIGHTS).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedule_warms_up_then_steps():
    cfg = load_train_config("synth_demo").solver
    assert lr_factor(0, cfg) == pytest.approx(cfg.warmup_factor)
    assert lr_factor(cfg.warmup_iters, cfg) == 1.0
    assert lr_factor(cfg.steps[0], cfg) == pytest.approx(cfg.gamma)
    assert lr_factor(cfg.steps[1], cfg) == pytest.approx(cfg.gamma ** 2)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_config, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        ["orcnn-core", "train", "--config", str(tiny_config), "--output-dir", str(out),
         "--no-progress", "--set", "solver.iterations=1000", "--set", "checkpoint_period=500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "continue with --resume" in output
    iteration = load_checkpoint(out / CHECKPOINT)["iteration"]
    assert 1 <= iteration < 1000  # saved where it stopped, not at a checkpoint period


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_ddp_on_gloo_keeps_the_replicas_equal(tiny_config, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "orcnn_core.cli", "train",
         "--config", str(tiny_config), "--output-dir", str(out), "--no-progress",
         "--set", "solver.iterations=2", "--set", "solver.images_per_batch=1"],
        capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Both ranks write to the same pipe; find the digests wherever they landed.
    digests = dict(re.findall(r"rank (\d+): weights sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"0", "1"}, result.stdout
    assert digests["0"] == digests["1"]
    assert load_checkpoint(out / CHECKPOINT)["iteration"] == 2


def test_nan_loss_stops_with_iteration_and_last_checkpoint(tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(tiny_config), "--output-dir", str(out),
                     "--no-progress", "--set", "solver.lr=1e30", "--set", "solver.steps=[]",
                     "--set", "solver.optimizer=sgd", "--set", "solver.iterations=6")
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "at iteration" in message and str(out / CHECKPOINT) in message, message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, expected", [
    (["solver.lr_rate=0.1"], "unknown key(s) lr_rate"),
    (["solver.iterations=ten"], "solver.iterations: expected an integer"),
    (["model.variant=orcnn_plus"], "variant must be one of"),
    (["data.train=/nonexistent/annotations.json"], "no such annotation file"),
    (["output_dir=/proc/orcnn"], "not writable"),
    (["solver.steps=[5,2]"], "must be increasing"),
    (["solver.trainable=order_head"], "solver.trainable is order_head, but model.order_head"),
    (["solver.trainable=heads"], "solver.trainable must be all or order_head"),
    (["init_mask_heads=false"], "init_mask_heads is false, but init_weights names no file"),
])
def test_bad_config_fails_before_any_work(tiny_config, tmp_path, overrides, expected):
    args = ["train", "--config", str(tiny_config), "--set", f"output_dir={tmp_path / 'run'}"]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_missing_config_file_names_the_shipped_ones(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "nope.yaml"), timeout=120)
    assert result.returncode == 2
    assert "synth_demo" in result.stderr


def test_init_mask_heads_false_keeps_the_heads_random_and_loads_the_rest(tiny_config,
                                                                         tmp_path):
    trained = tmp_path / "trained"
    train(load_train_config(str(tiny_config), [f"output_dir={trained}"]), progress=False)
    saved = build_from_file(trained / FINAL_WEIGHTS).state_dict()
    # Class-agnostic masks: predictors of another shape than the file's, not loaded.
    cfg = load_train_config(str(tiny_config), [
        f"output_dir={tmp_path / 'ablation'}", f"init_weights={trained / FINAL_WEIGHTS}",
        "init_mask_heads=false", "model.class_agnostic_masks=true",
        # What train() takes from the data: two classes.
        "model.num_classes=3", "model.class_names=[cereal_box,soup_can]"])
    model = _build_training_objects(cfg, resume=False, device="cpu", rank=0)[0]
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model).state_dict()
    heads = [name for name in fresh if name.startswith(MASK_HEAD_PREFIXES)]
    assert any("amodal_mask_head" in n for n in heads) and any("visible" in n for n in heads)
    for name, value in model.state_dict().items():
        expected = fresh[name] if name in heads else saved[name]
        assert torch.equal(value, expected.to(value.dtype)), name
    assert not torch.equal(fresh[heads[0]], saved[heads[0]])  # the two sources differ


def test_a_write_probe_removed_by_another_rank_is_not_an_error(tmp_path, monkeypatch):
    # Rank 0 removes stale temporary files while rank 1 may be proving the folder writable
    # with a probe named like one (a two-process run once failed with "not writable").
    write_bytes = Path.write_bytes

    def write_then_vanish(self, data):
        written = write_bytes(self, data)
        self.unlink()
        return written

    monkeypatch.setattr(Path, "write_bytes", write_then_vanish)
    check_output_dir(tmp_path / "run")
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())
