"""Training under faults: SIGKILL at random moments (the checkpoint on disk must always be
whole, resume must always work and end with the weights of an uninterrupted run), a full
disk (a real EFBIG from the kernel's file size limit, no mocks), and checkpoints that must
not be loaded (pickled code, foreign files)."""

import hashlib
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from orcnn_core.cli import main
from orcnn_core.errors import InputError
from orcnn_core.train_config import load_train_config
from orcnn_core.training import CHECKPOINT, FINAL_WEIGHTS, load_checkpoint, train
from orcnn_core.weights import load_weights
from helpers import CreatesFile, logged_losses
from tiny_models import train_config, write_train_config

# The smallest model the trainer accepts in reasonable shape: MobileNetV3-FPN on 64 x 48
# scenes (a 25 MB checkpoint, well under a second per iteration on one core).
FAST = train_config(
    backbone="mobilenet_v3_fpn", trainable_backbone_layers=6, anchor_sizes=[16, 32, 64],
    width=64, height=48, train_images=8, val_images=1, iterations=8, steps=[5],
    warmup_iters=2)
ITERATIONS = FAST["solver"]["iterations"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture
def fast_config(tmp_path):
    return write_train_config(tmp_path / "fast.yaml", FAST)


def start_training(config, out, resume, extra=(), **kwargs):
    args = ["orcnn-core", "train", "--config", str(config), "--output-dir", str(out),
            "--no-progress", *extra] + (["--resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, **kwargs)


def temp_files(out):
    return sorted(p.name for p in out.glob(".*.tmp"))


def wait_for(condition, proc, timeout=120, poll=0.002):
    """Poll ``condition()`` until true; False when ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError(f"nothing happened within {timeout} s")


def checkpoint_iteration(out):
    try:
        return load_checkpoint(out / CHECKPOINT)["iteration"]
    except InputError:
        return None


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_weights(
        fast_config, tmp_path, capsys):
    """``orcnn-core train`` killed three times (and resumed with --resume): whatever the
    kill hit, the checkpoint on disk is whole and never set back, the last resume trains
    to the end (exit status 0), and the run ends with the losses and weights of an
    uninterrupted one."""
    reference = tmp_path / "reference"
    train(load_train_config(str(fast_config), [f"output_dir={reference}"]), progress=False)
    seconds = json.loads((reference / "log.jsonl").read_text().splitlines()[-1]).get(
        "seconds_per_iteration", 0.5)

    out = tmp_path / "killed"
    rng = random.Random(20190107)
    kills = mid_write = 0
    # Three kills: two at random moments within the next iterations, one aimed at a
    # checkpoint write (the moment its temporary file exists), retried until it lands.
    plan = ["random", "write", "random"]
    attempts = 0
    reached = 0  # the checkpoint's iteration before this run
    while plan and attempts < 8:
        attempts += 1
        checkpoint = out / CHECKPOINT
        resume = checkpoint.exists()
        stale = set(temp_files(out))
        written = checkpoint.stat().st_mtime_ns if resume else None
        proc = start_training(fast_config, out, resume)
        try:
            if plan[0] == "write":
                landed = wait_for(lambda: set(temp_files(out)) - stale, proc)
            else:
                # Once this run wrote a checkpoint, somewhere in the next iteration or two.
                landed = wait_for(lambda: checkpoint.exists()
                                  and checkpoint.stat().st_mtime_ns != written, proc,
                                  poll=0.02)
                time.sleep(rng.uniform(0.0, 1.5 * seconds))
            proc.kill()
        finally:
            output = proc.communicate(timeout=60)[0]
        if not landed or proc.returncode != -signal.SIGKILL:
            pytest.fail(f"training ended before the kill (code {proc.returncode}):\n{output}")
        kills += 1
        was_mid_write = bool(set(temp_files(out)) - stale)
        # Whatever the kill hit, the checkpoint on disk is whole and loads, never older
        # than before the run; a run killed after it wrote one got further.
        iteration = checkpoint_iteration(out)
        assert iteration is not None, output
        if plan[0] == "random":
            assert iteration > reached, (iteration, reached)
        assert iteration >= reached, (iteration, reached)
        reached = iteration
        if plan[0] == "write" and not was_mid_write:
            continue  # the write finished before the kill arrived: aim again
        mid_write += was_mid_write
        plan.pop(0)
    assert not plan, f"no kill landed during a checkpoint write in {attempts} tries"

    # The last resume runs the command here rather than in a fourth process (same code,
    # one start-up less): it cleans up after the kills and trains to the end.
    code = main(["train", "--config", str(fast_config), "--output-dir", str(out), "--resume",
                 "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"resuming from {out / CHECKPOINT}" in printed.out
    assert kills >= 3 and mid_write >= 1
    assert checkpoint_iteration(out) == ITERATIONS
    assert (out / FINAL_WEIGHTS).is_file()
    assert not temp_files(out), "a killed write's temporary file was not removed"
    # Exact resume: the same losses at every iteration, logged once each, and bit-equal
    # final weights.
    assert logged_losses(out, once=True) == logged_losses(reference, once=True)
    _, killed_state = load_weights(out / FINAL_WEIGHTS)
    _, reference_state = load_weights(reference / FINAL_WEIGHTS)
    assert killed_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(killed_state[key], value), key


def _file_size_limit(limit):
    def apply():
        # Ignored SIGXFSZ: a write past the limit fails with EFBIG instead of killing the
        # process, exactly like a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_stops_with_one_message_and_keeps_the_last_checkpoint(
        fast_config, tmp_path):
    out = tmp_path / "run"
    train(load_train_config(str(fast_config), [f"output_dir={out}",
                                               "solver.iterations=2"]), progress=False)
    checkpoint = out / CHECKPOINT
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # Small files (config, log, TensorBoard) still fit; the next checkpoint does not.
    limit = checkpoint.stat().st_size // 2
    proc = start_training(fast_config, out, resume=True,
                          extra=["--set", "solver.iterations=4"],
                          preexec_fn=_file_size_limit(limit))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("orcnn-core train:")]
    assert errors == [
        f"orcnn-core train: stopped: cannot write {checkpoint} (File too large); the last "
        f"good checkpoint is {checkpoint} (iteration 2); raise the file size limit "
        f"(ulimit -f) and continue with --resume"], output
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    assert load_checkpoint(checkpoint)["iteration"] == 2
    assert not temp_files(out), temp_files(out)

    # With room again, the run continues from that checkpoint; the log keeps one record
    # per iteration (the failed run's iteration 3 is dropped and redone).
    result = train(load_train_config(str(fast_config), [f"output_dir={out}",
                                                        "solver.iterations=4"]),
                   resume=True, progress=False)
    assert result["iteration"] == 4 and result["weights"] is not None
    assert sorted(logged_losses(out, once=True)) == [1, 2, 3, 4]


def test_atomic_write_keeps_the_old_file_and_removes_its_temporary_on_efbig(tmp_path):
    """A real EFBIG in a separate process (its file size limit), through the library call."""
    target = tmp_path / "state.bin"
    target.write_bytes(b"old contents")
    script = textwrap.dedent(f"""
        import errno, resource, signal
        from orcnn_core.fileio import WriteError, atomic_write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_bytes({str(target)!r}, b"x" * 100000)
        except WriteError as exc:
            assert exc.errno == errno.EFBIG, exc
            print("refused:", exc.filename)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"refused: {target}"
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def _resume(config, out, capsys):
    code = main(["train", "--config", str(config), "--output-dir", str(out), "--resume",
                 "--no-progress"])
    return code, capsys.readouterr().err


def test_resume_refuses_a_checkpoint_that_would_run_code(fast_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code_was_run"
    # A torch.save archive (what a checkpoint is) and a raw pickle, both carrying the call.
    torch.save({"model": CreatesFile(marker), "iteration": 1}, out / CHECKPOINT)
    code, err = _resume(fast_config, out, capsys)
    assert code == 2, err
    assert err.startswith(f"orcnn-core train: error: {out / CHECKPOINT}: refused: the "
                          f"checkpoint holds objects other than tensors"), err
    assert "Unsupported global" in err and err.count("\n") == 1
    (out / CHECKPOINT).write_bytes(pickle.dumps(CreatesFile(marker), protocol=2))
    code, err = _resume(fast_config, out, capsys)
    assert code == 2 and "refused" in err, err
    assert not marker.exists()


def test_resume_refuses_foreign_checkpoints_by_name(fast_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = out / CHECKPOINT
    # A plain state dict is not a checkpoint.
    torch.save({"backbone.weight": torch.zeros(3)}, checkpoint)
    code, err = _resume(fast_config, out, capsys)
    assert code == 2 and "not a training checkpoint of orcnn-core train (missing model" in err
    # A checkpoint of another model.
    torch.save({"model": {"backbone.weight": torch.zeros(3)}, "optimizer": {},
                "scheduler": {}, "iteration": 1, "torch_rng": torch.get_rng_state()},
               checkpoint)
    code, err = _resume(fast_config, out, capsys)
    assert code == 2, err
    assert "the checkpoint's model state does not fit this configuration" in err, err
    # Truncated (as no kill can leave it: a copy cut short by hand).
    torch.save({"iteration": 1}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    code, err = _resume(fast_config, out, capsys)
    assert code == 2 and f"{checkpoint}: unreadable checkpoint" in err, err
    assert "Traceback" not in err


def test_config_yaml_cannot_construct_objects(tmp_path, capsys):
    """Configs are read with yaml.safe_load: a tag that would run a command is an error."""
    marker = tmp_path / "code_was_run"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    code = main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"{config}: not valid YAML" in err, err
    assert not marker.exists()
