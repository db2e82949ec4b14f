"""Kill-and-resume soak of ``orcnn-core train``: many SIGKILLs at random moments.

A tiny model (MobileNetV3-FPN on 64 x 48 synthetic scenes, a checkpoint every iteration)
is trained once without interruption, then again while being killed with SIGKILL over and
over, each restart with ``--resume``. Kills land at three kinds of moments:

    startup   while the process imports, reads its checkpoint or trims its log
    training  somewhere in the next two iterations after the run wrote a checkpoint
    write     while a checkpoint is being written (its temporary file exists)

After every kill the checkpoint must load (never truncated or unreadable), its iteration
must not go back, and the log must hold whole lines. At the end the run must reach the last
iteration with the same per-iteration losses and bit-equal final weights as the
uninterrupted run, and no temporary file may be left. Prints a markdown report, writes the
figures as JSON; exit code 1 when any check failed.

    python -m orcnn_core.soak_training --kills 50 --json soak_training.json
    python -m orcnn_core.soak_training --kills 8 --iterations 20     # a short version

(``python scripts/soak_training.py`` in a checkout runs the same.)
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_json
from orcnn_core.training import CHECKPOINT, FINAL_WEIGHTS, LOG, load_checkpoint
from orcnn_core.weights import load_weights

__all__ = ["CONFIG", "run_soak", "report_markdown", "main"]

CONFIG = {
    "model": {
        "backbone": "mobilenet_v3_fpn", "backbone_norm": "bn", "trainable_backbone_layers": 6,
        "min_size": 48, "max_size": 64, "fpn_channels": 16, "box_head_dim": 32,
        "mask_head_channels": 16, "anchor_sizes": [16, 32, 64],
        "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
        "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
        "box_batch_size_per_image": 32, "box_detections_per_img": 10,
    },
    "data": {
        "synth_train": {"num_images": 16, "seed": 0, "width": 64, "height": 48,
                        "num_classes": 2},
        "synth_val": {"num_images": 1, "seed": 1000, "width": 64, "height": 48,
                      "num_classes": 2},
    },
    "solver": {"images_per_batch": 2, "lr": 0.005, "warmup_iters": 5},
    "checkpoint_period": 1, "eval_period": 0, "log_period": 1, "device": "cpu",
}
#: The moments a kill is aimed at, and how often each is drawn.
KILL_MOMENTS = {"startup": 1, "training": 6, "write": 3}


# ----------------------------------------------------------------------------- processes
def start_training(config: Path, out: Path, resume: bool) -> subprocess.Popen:
    args = ["orcnn-core", "train", "--config", str(config), "--output-dir", str(out),
            "--no-progress"] + (["--resume"] if resume else [])
    # One thread per run: the runs must not slow each other (or the machine) down.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def temp_files(out: Path) -> set:
    return {p.name for p in out.glob(".*.tmp")}


def wait_for(condition, proc, timeout=600, poll=0.002) -> bool:
    """Poll until ``condition()``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise RuntimeError(f"nothing happened within {timeout} s")


def log_losses(out: Path):
    """(iteration -> total loss, number of lines that are not whole JSON records)."""
    losses, partial = {}, 0
    path = out / LOG
    if not path.is_file():
        return losses, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            partial += 1
            continue
        if "losses" in record:
            losses[record["iteration"]] = record["losses"]["total"]
    return losses, partial


# ----------------------------------------------------------------------------- the soak
def run_soak(args) -> dict:
    """The soak ``args`` describe (kills, iterations, seed, startup_seconds, work); returns
    its figures, ``passed`` among them."""
    work = Path(args.work or tempfile.mkdtemp(prefix="soak_training_"))
    config = write_config(work, args.iterations)
    reference, out = work / "reference", work / "killed"
    for folder in (reference, out):
        shutil.rmtree(folder, ignore_errors=True)
    reference_seconds, reference_losses, per_iteration = run_uninterrupted(config, reference)

    figures = {"runs": 0, "kills": dict.fromkeys(KILL_MOMENTS, 0),
               "kills_during_a_checkpoint_write": 0, "checkpoints_checked": 0,
               "unreadable_checkpoints": 0, "iteration_went_back": 0,
               "partial_log_lines": 0, "runs_that_failed": 0, "failures": []}
    t0 = time.monotonic()
    kill_repeatedly(args, config, out, per_iteration, figures)
    finish_without_kills(config, out, figures)
    figures["killed_run_seconds"] = round(time.monotonic() - t0, 1)
    figures["reference_seconds"] = round(reference_seconds, 1)
    compare_with_reference(args, out, reference, reference_losses, figures)
    figures["seed"] = args.seed
    figures["work"] = str(work)
    figures["passed"] = (
        figures["unreadable_checkpoints"] == 0 and figures["iteration_went_back"] == 0
        and figures["partial_log_lines"] == 0 and figures["runs_that_failed"] == 0
        and figures["final_exit_code"] == 0 and figures["final_iteration"] == args.iterations
        and not figures["temporary_files_left"] and figures["losses_equal_to_uninterrupted"]
        and figures["weights_equal_to_uninterrupted"])
    return figures


def write_config(work: Path, iterations: int) -> Path:
    """The training configuration file of both runs, in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    cfg = json.loads(json.dumps(CONFIG))
    cfg["solver"]["iterations"] = iterations
    cfg["solver"]["steps"] = [iterations * 2 // 3]
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return config


def run_uninterrupted(config: Path, reference: Path):
    """The reference run; returns (seconds, its losses by iteration, seconds per
    iteration)."""
    t0 = time.monotonic()
    proc = start_training(config, reference, resume=False)
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{output}")
    seconds = time.monotonic() - t0
    losses, _ = log_losses(reference)
    per_iteration = json.loads((reference / LOG).read_text().splitlines()[-1]).get(
        "seconds_per_iteration", 0.5)
    return seconds, losses, per_iteration


def kill_repeatedly(args, config: Path, out: Path, per_iteration: float,
                    figures: dict) -> None:
    """Start, kill and resume until ``args.kills`` kills landed (or a run ended by itself),
    checking the checkpoint and the log after each kill."""
    rng = random.Random(args.seed)
    last_iteration = 0
    while sum(figures["kills"].values()) < args.kills:
        checkpoint = out / CHECKPOINT
        resume = checkpoint.exists()
        stale = temp_files(out)
        mode = rng.choices(list(KILL_MOMENTS), weights=list(KILL_MOMENTS.values()))[0]
        if not resume and mode == "startup":
            mode = "training"  # a first run killed before its first checkpoint: pointless
        written = checkpoint.stat().st_mtime_ns if resume else None
        proc = start_training(config, out, resume)
        figures["runs"] += 1
        landed = kill_at(mode, proc, out, written, stale, rng, args.startup_seconds,
                         per_iteration)
        output = proc.communicate()[0]
        if not landed or proc.returncode != -signal.SIGKILL:
            if proc.returncode != 0:  # else the run finished before this kill
                figures["runs_that_failed"] += 1
                figures["failures"].append(output[-2000:])
            break
        figures["kills"][mode] += 1
        figures["kills_during_a_checkpoint_write"] += bool(temp_files(out) - stale)
        if checkpoint.exists():
            figures["checkpoints_checked"] += 1
            try:
                iteration = load_checkpoint(checkpoint)["iteration"]
            except InputError as exc:
                figures["unreadable_checkpoints"] += 1
                figures["failures"].append(str(exc))
                continue
            if iteration < last_iteration:
                figures["iteration_went_back"] += 1
            last_iteration = iteration
        figures["partial_log_lines"] += log_losses(out)[1]


def kill_at(mode: str, proc, out: Path, written, stale: set, rng: random.Random,
            startup_seconds: float, per_iteration: float) -> bool:
    """SIGKILL ``proc`` at a moment of kind ``mode``; returns whether the kill landed at
    such a moment (False when the process ended first). ``written`` is the modification
    time of the checkpoint the run started from (None: no checkpoint)."""
    checkpoint = out / CHECKPOINT

    def new_checkpoint():
        return checkpoint.exists() and checkpoint.stat().st_mtime_ns != written

    if mode == "startup":
        time.sleep(rng.uniform(0.0, startup_seconds))
        landed = proc.poll() is None
    elif mode == "training":
        landed = wait_for(new_checkpoint, proc, poll=0.02)
        time.sleep(rng.uniform(0.0, 2.0 * per_iteration))
    else:
        # The second checkpoint write of this run, so that every run makes progress.
        landed = wait_for(new_checkpoint, proc, poll=0.01)
        if landed:
            seen = temp_files(out)
            landed = wait_for(lambda: temp_files(out) - seen - stale, proc)
    proc.kill()
    return landed


def finish_without_kills(config: Path, out: Path, figures: dict) -> None:
    """The last run, left alone to the end."""
    proc = start_training(config, out, resume=(out / CHECKPOINT).exists())
    figures["runs"] += 1
    output = proc.communicate()[0]
    figures["final_exit_code"] = proc.returncode
    if proc.returncode != 0:
        figures["failures"].append(output[-2000:])


def compare_with_reference(args, out: Path, reference: Path, reference_losses: dict,
                           figures: dict) -> None:
    """The final state of the killed run against the uninterrupted one."""
    try:
        figures["final_iteration"] = load_checkpoint(out / CHECKPOINT)["iteration"]
    except InputError as exc:
        figures["final_iteration"] = None
        figures["failures"].append(str(exc))
    figures["iterations"] = args.iterations
    figures["temporary_files_left"] = sorted(temp_files(out))
    losses, partial = log_losses(out)
    figures["partial_log_lines"] += partial
    figures["losses_equal_to_uninterrupted"] = losses == reference_losses
    figures["weights_equal_to_uninterrupted"] = False
    if (out / FINAL_WEIGHTS).is_file():
        _, a = load_weights(out / FINAL_WEIGHTS)
        _, b = load_weights(reference / FINAL_WEIGHTS)
        figures["weights_equal_to_uninterrupted"] = a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- report
def report_markdown(f: dict) -> str:
    """The figures as a markdown table, the verdict and the output of any failure."""
    kills = f["kills"]
    rows = [
        ("processes started", f["runs"]),
        ("kills survived (startup / training / checkpoint write aimed)",
         f"{sum(kills.values())} ({kills['startup']} / {kills['training']} / "
         f"{kills['write']})"),
        ("kills that hit a checkpoint write (temporary file present)",
         f["kills_during_a_checkpoint_write"]),
        ("checkpoints checked after a kill", f["checkpoints_checked"]),
        ("truncated or unreadable checkpoints found", f["unreadable_checkpoints"]),
        ("checkpoint iteration went back", f["iteration_went_back"]),
        ("partial log lines", f["partial_log_lines"]),
        ("temporary files left at the end", len(f["temporary_files_left"])),
        ("final iteration", f"{f['final_iteration']} of {f['iterations']}"),
        ("losses equal to the uninterrupted run, every iteration",
         "yes" if f["losses_equal_to_uninterrupted"] else "NO"),
        ("final weights bit-equal to the uninterrupted run",
         "yes" if f["weights_equal_to_uninterrupted"] else "NO"),
        ("time: uninterrupted run / killed run",
         f"{f['reference_seconds']} s / {f['killed_run_seconds']} s"),
    ]
    lines = ["| check | result |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    lines.append(f"**{'PASSED' if f['passed'] else 'FAILED'}** (seed {f['seed']})")
    for failure in f["failures"]:
        lines.append("")
        lines.append("```\n" + failure.strip() + "\n```")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to survive (50)")
    parser.add_argument("--iterations", type=int,
                        help="training iterations (default: 2 x kills + 10, enough for "
                             "every kill to land before the end)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--startup-seconds", type=float, default=4.0,
                        help="startup kills land within this many seconds of the start")
    parser.add_argument("--work", metavar="DIR",
                        help="work folder (default: a new temporary folder, kept)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    if args.iterations is None:
        args.iterations = 2 * args.kills + 10
    figures = run_soak(args)
    print(report_markdown(figures))
    if args.json:
        atomic_write_json(args.json, figures, indent=2)
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
