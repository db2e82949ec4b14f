"""The training loop: data, optimiser, checkpoints, evaluation, TensorBoard, DDP.

One process trains on one device; ``torchrun --nproc-per-node N -m orcnn_core.cli train``
runs N of them with torch.distributed DDP (gloo on the CPU, nccl on CUDA). The data order
and the flips are a pure function of (seed, iteration), and checkpoints carry the torch RNG
states, so ``--resume`` continues exactly where a run stopped.

Files in the output folder:
    checkpoint_last.pt      model, optimiser, scheduler, iteration, RNG states (atomic)
    model_final.safetensors the trained model (orcnn_core.weights format)
    config.yaml             the configuration the run used
    val_annotations.json    validation ground truth (synthetic validation data)
    metrics.json            the last evaluation
    log.jsonl               losses and lr every log_period iterations, evaluations
    tensorboard/            scalars per loss, lr, metrics; sample overlays

A run killed at any moment (SIGKILL, power cut) leaves the last checkpoint whole: every
file but the append-only log is written to a temporary file and renamed. A failed write
(disk full, file size limit) stops the run with :class:`TrainingStopped` naming the file
and the last good checkpoint, which the failed write leaves untouched.
"""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from orcnn_core.data import (AmodalDataset, AmodalSample, load_dataset, parse_dataset,
                             write_amodal_coco)
from orcnn_core.devices import resolve_device
from orcnn_core.errors import InputError
from orcnn_core.evaluation import evaluate_loaded
from orcnn_core.fileio import (TEMP_SUFFIX, WriteError, atomic_write_bytes, atomic_write_json,
                               check_regular_file)
from orcnn_core.losses import total_loss
from orcnn_core.modal_aug import augment
from orcnn_core.model import MASK_HEAD_PREFIXES, build_model
from orcnn_core.predictor import Predictor
from orcnn_core.results import prediction_to_coco
from orcnn_core.synth import SynthConfig, render_scene
from orcnn_core.train_config import ModalAugConfig, SynthDataConfig, TrainConfig
from orcnn_core.visualize import draw_prediction
from orcnn_core.weights import (
    init_from_maskrcnn_state_dict,
    load_weights,
    save_weights,
    unpickler_reason,
)

CHECKPOINT = "checkpoint_last.pt"
FINAL_WEIGHTS = "model_final.safetensors"
LOG = "log.jsonl"


class TrainingStopped(RuntimeError):
    """Training cannot go on (a NaN loss, a failed write); the message names the iteration or
    file and the last good checkpoint."""


# ------------------------------------------------------------------------------------ data
class SynthScenes:
    """A sequence of synthetic scenes; scene ``i`` is rendered from ``(seed, i)`` on access."""

    def __init__(self, spec: SynthDataConfig):
        self.spec = spec
        self.cfg = SynthConfig(width=spec.width, height=spec.height,
                               num_classes=spec.num_classes)
        self.cfg.validate()
        self.categories = self.cfg.categories

    def __len__(self) -> int:
        return self.spec.num_images

    def __getitem__(self, i: int) -> AmodalSample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return render_scene(np.random.default_rng([self.spec.seed, i]), self.cfg,
                            image_id=i + 1, file_name=f"images/{i + 1:06d}.png")


def open_scenes(source: str, images: str, spec: SynthDataConfig, where: str,
                fmt: str = "auto", annotators: str = "first"):
    """The scenes a ``data.train`` / ``data.val`` setting names (checked before training),
    a file read as ``data.format`` / ``data.annotators`` say."""
    if source == "synth":
        return SynthScenes(spec)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{where}: {source}: no such annotation file")
    images_dir = images or str(path.parent)
    if not Path(images_dir).is_dir():
        raise InputError(f"{where}: image folder {images_dir} does not exist")
    try:
        return load_dataset(path, images_dir=images_dir, fmt=fmt, annotators=annotators)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def sample_to_tensors(sample: AmodalSample, flip: bool):
    """(image float [3, H, W] in [0, 1], target dict) as the model takes them. The target
    carries ``occlusion_relations`` when they are known (``sample.relations_known``: not for
    modal-only samples, nor for files that state none), so an order head never learns
    "neither" from silence."""
    image = sample.load_image()
    amodal, visible, boxes = sample.amodal_masks, sample.visible_masks, sample.boxes.copy()
    if flip:
        # The canvas is padded equally on both sides, so flipping it flips the image part.
        image = image[:, ::-1]
        amodal, visible = amodal[:, :, ::-1], visible[:, :, ::-1]
        boxes[:, [0, 2]] = sample.width - boxes[:, [2, 0]]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    target = {
        "boxes": torch.from_numpy(boxes).float(),
        "labels": torch.from_numpy(sample.labels).long(),
        "amodal_masks": torch.from_numpy(np.ascontiguousarray(amodal)),
        "visible_masks": torch.from_numpy(np.ascontiguousarray(visible)),
        "mask_padding": int(sample.mask_padding),
    }
    if sample.relations_known and not sample.modal_only:
        target["occlusion_relations"] = torch.from_numpy(sample.occlusion_relations).long()
    return x, target


class IterationSampler(torch.utils.data.Sampler):
    """Yields ``(index, flip, g)`` for iterations ``start..iterations-1`` of one rank.

    Global position g = (iteration * world + rank) * batch + j walks through per-epoch
    permutations drawn from (seed, epoch): the order depends on nothing but these numbers.
    """

    def __init__(self, size, batch, world, rank, seed, start, iterations, flip):
        self.size, self.batch, self.world, self.rank = size, batch, world, rank
        self.seed, self.start, self.iterations, self.flip = seed, start, iterations, flip

    def __len__(self) -> int:
        return (self.iterations - self.start) * self.batch

    def __iter__(self):
        perms = {}
        for it in range(self.start, self.iterations):
            for j in range(self.batch):
                g = (it * self.world + self.rank) * self.batch + j
                epoch, pos = divmod(g, self.size)
                if epoch not in perms:
                    perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
                        self.size)}
                flip = self.flip and bool(np.random.default_rng([self.seed, 1, g]).random()
                                          < 0.5)
                yield int(perms[epoch][pos]), flip, g


class _TrainingSet(torch.utils.data.Dataset):
    """The training samples as tensors, with modal augmentation (``data.modal_aug``) drawn
    from (seed, global position g): a resumed run sees the same pastes."""

    def __init__(self, scenes, modal_aug: ModalAugConfig, sources, seed: int):
        self.scenes, self.modal_aug, self.sources, self.seed = scenes, modal_aug, sources, seed

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, item):
        index, flip, g = item
        aug = self.modal_aug
        sample = augment(self.scenes[index], self.sources, np.random.default_rng(
            [self.seed, 2, g]), aug.probability, aug.min_objects, aug.max_objects)
        return sample_to_tensors(sample, flip)


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


# ------------------------------------------------------------------------------ schedule
def lr_factor(iteration: int, solver) -> float:
    """Linear warm-up, then steps: the Detectron schedule the paper trains with."""
    factor = solver.gamma ** sum(iteration >= s for s in solver.steps)
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model, solver):
    params = [p for p in model.parameters() if p.requires_grad]
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=solver.lr, weight_decay=solver.weight_decay)
    return torch.optim.SGD(params, lr=solver.lr, momentum=solver.momentum,
                           weight_decay=solver.weight_decay)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, optimizer, scheduler, iteration: int) -> None:
    """Everything needed to continue exactly, written atomically (temporary file, rename)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain values only).

    ``torch.load(weights_only=True)`` rebuilds tensors and plain containers only: a pickle
    that would create other objects or run code is refused, not executed. A file that is
    not a whole checkpoint of this format raises :class:`InputError` naming what is wrong.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused: the checkpoint holds objects other than tensors "
                         f"and plain values, which could run code when loaded "
                         f"(torch.load weights_only=True: {unpickler_reason(exc)})") from None
    except Exception as exc:  # torch raises several types for damaged archives
        raise InputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _check_checkpoint(state, path)
    return state


def _check_checkpoint(state, path) -> None:
    """The keys and types :func:`save_checkpoint` writes (a state dict or another
    program's checkpoint is refused by name, not with a KeyError later)."""
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a training checkpoint (a {type(state).__name__}, not "
                         f"a mapping)")
    expected = {"model": dict, "optimizer": dict, "scheduler": dict, "iteration": int,
                "torch_rng": torch.Tensor}
    missing = [k for k in expected if k not in state]
    if missing:
        keys = ", ".join(map(str, list(state)[:8])) or "no keys"
        raise InputError(f"{path}: not a training checkpoint of orcnn-core train (missing "
                         f"{', '.join(missing)}; it has {keys})")
    for key, kind in expected.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{path}: checkpoint '{key}' is a {type(value).__name__}, "
                             f"expected a {kind.__name__}")
    if state["iteration"] < 0:
        raise InputError(f"{path}: checkpoint iteration {state['iteration']} is negative")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor)
               for k, v in state["model"].items()):
        raise InputError(f"{path}: checkpoint 'model' is not a mapping of names to tensors")


def _restore(state: dict, path: Path, model, optimizer, scheduler, total: int) -> int:
    """Load a checkpoint into the training objects; returns its iteration."""
    start = state["iteration"]
    if start > total:
        raise InputError(f"{path}: the checkpoint is at iteration {start}, beyond "
                         f"solver.iterations {total}")
    for what, target, source in (("model", model, state["model"]),
                                 ("optimizer", optimizer, state["optimizer"]),
                                 ("scheduler", scheduler, state["scheduler"])):
        try:
            target.load_state_dict(source)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])[:400]
            raise InputError(f"{path}: the checkpoint's {what} state does not fit this "
                             f"configuration ({type(exc).__name__}: {detail})") from None
    try:
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"{path}: bad torch_rng state in the checkpoint ({exc})") from None
    cuda_rng = state.get("cuda_rng") or []
    if torch.cuda.is_available() and cuda_rng:
        torch.cuda.set_rng_state_all(cuda_rng)
    return start


# ---------------------------------------------------------------------------- evaluation
def evaluate_model(model, scenes, gt: AmodalDataset, device, max_images=None) -> dict:
    """Run the model on ``scenes`` and score it against ``gt`` (orcnn_core.evaluation)."""
    was_training = model.training
    predictor = Predictor(model, device=device)
    results = []
    count = len(scenes) if max_images is None else min(len(scenes), max_images)
    image_ids = {r.file_name: r.image_id for r in gt.records}
    category_ids = [c["id"] for c in scenes.categories]
    for i in range(count):
        sample = scenes[i]
        prediction = predictor(sample.load_image())
        image_id = image_ids.get(sample.file_name, sample.image_id)
        results += prediction_to_coco(prediction, image_id, sample.mask_padding, category_ids)
    model.train(was_training)
    return evaluate_loaded(gt, results, gt_name="validation ground truth",
                           predictions_name="validation predictions")


def _overlay(model, sample, device) -> np.ndarray:
    """RGB overlay of one validation image for TensorBoard."""
    was_training = model.training
    image = sample.load_image()
    prediction = Predictor(model, device=device)(image)
    model.train(was_training)
    return draw_prediction(image, prediction)


# ---------------------------------------------------------------------------- main loop
def _distributed():
    """(rank, world size, local rank) from torchrun's environment, after joining the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return rank, world, local_rank


def check_output_dir(path: Path) -> None:
    """Create the output folder when missing and prove it writable.

    Not :func:`orcnn_core.imageio.check_writable_dir`: the probe here carries the temporary
    file suffix, so the stale-file clean-up of the next run removes it when a kill lands
    between its creation and removal.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Named like a temporary file so that a run killed here leaves nothing behind.
        probe = path / f".write-test-{os.getpid()}{TEMP_SUFFIX}"
        probe.write_bytes(b"")
        # Rank 0 of a distributed run may have removed it already as a stale temporary file.
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise InputError(f"output_dir {path}: not writable ({exc.strerror})") from None


#: What marks a folder as holding an earlier run, and what ``--force`` deletes to start over.
RUN_MARKERS = (CHECKPOINT, LOG)
RUN_FILES = (CHECKPOINT, LOG, "metrics.json", FINAL_WEIGHTS)


def check_run_folder(out: Path, resume: bool, force: bool) -> bool:
    """Refuse to start a fresh run over an earlier one (it would overwrite the checkpoint
    and interleave log.jsonl) unless ``force``; returns whether that run's files are to be
    deleted (:func:`_clear_earlier_run`) before the first write."""
    if resume and force:
        raise InputError("--resume continues the run in output_dir, --force starts it over: "
                         "give one of them")
    earlier = [name for name in RUN_MARKERS if os.path.lexists(out / name)]
    if resume or not earlier:
        return False
    if not force:
        raise InputError(f"output_dir {out}: holds an earlier run ({', '.join(earlier)}); "
                         f"continue it with --resume, start over with --force (deletes its "
                         f"{', '.join(RUN_FILES)}) or choose another output_dir")
    return True


def _clear_earlier_run(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          force: bool = False) -> dict:
    """Train as ``cfg`` says; returns ``{"iteration", "weights", "metrics", "stopped"}``.

    Every check of the configuration and the data happens before the first iteration
    (:class:`InputError`). SIGINT / SIGTERM finish the current iteration, save a checkpoint
    and return with ``stopped`` set to the signal's name. A failed write (disk full, file
    size limit) raises :class:`TrainingStopped` naming the file and the last good
    checkpoint; the failed write leaves that checkpoint as it was. An output folder that
    holds an earlier run is refused without ``resume`` unless ``force``, which deletes that
    run's checkpoint, log, metrics and final weights (:func:`check_run_folder`).
    """
    try:
        return _train(cfg, resume, progress, force)
    except OSError as exc:
        raise TrainingStopped(_write_failure(exc, Path(cfg.output_dir))) from None


def _write_failure(exc: OSError, out: Path) -> str:
    """One line on a failed write: which file, why, and what is left to resume from."""
    if isinstance(exc, WriteError):
        what = f"cannot write {exc.filename} ({exc.strerror})"
    elif exc.filename:
        what = f"I/O error on {exc.filename} ({exc.strerror or exc})"
    else:
        what = f"I/O error writing to {out} ({exc.strerror or exc})"
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
           errno.EFBIG: "raise the file size limit (ulimit -f)"}.get(exc.errno, "fix that")
    checkpoint = out / CHECKPOINT
    try:
        iteration = load_checkpoint(checkpoint)["iteration"]
        left = (f"the last good checkpoint is {checkpoint} (iteration {iteration}); {fix} "
                f"and continue with --resume")
    except InputError:
        left = f"no checkpoint was written yet; {fix} and start again"
    return f"{what}; {left}"


@dataclass
class _Run:
    """What the iterations of one run work with, all built before the first of them."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    model: torch.nn.Module
    ddp_model: torch.nn.Module  # the model itself in a one-process run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    val_scenes: object
    start: int  # the first iteration this process runs
    resumed: bool
    use_amp: bool
    scaler: torch.amp.GradScaler
    writer: object = None  # TensorBoard SummaryWriter, rank 0 only
    gt: AmodalDataset = None  # validation ground truth, rank 0 only

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT


def _train(cfg: TrainConfig, resume: bool, progress: bool, force: bool = False) -> dict:
    rank, world, local_rank = _distributed()
    out = Path(cfg.output_dir)
    clear = check_run_folder(out, resume, force)  # before anything is built or written
    device = _training_device(cfg.device, world, local_rank)
    train_scenes, val_scenes = _open_checked_inputs(cfg, resume, out, rank)
    sources = _modal_sources(cfg, train_scenes)
    model, optimizer, scheduler = _build_training_objects(cfg, resume, device, rank)
    start = _resume(out, model, optimizer, scheduler, cfg, rank) if resume else 0
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = _make_loader(cfg, train_scenes, sources, world, rank, start)
    use_amp = cfg.solver.amp and device.type == "cuda"
    run = _Run(cfg=cfg, rank=rank, world=world, device=device, out=out, model=model,
               ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler,
               val_scenes=val_scenes, start=start, resumed=resume, use_amp=use_amp,
               scaler=torch.amp.GradScaler("cuda", enabled=use_amp))
    if rank == 0:
        if clear:
            _clear_earlier_run(out)
        run.writer, run.gt = _start_outputs(cfg, out, val_scenes, start)
    iteration, metrics, stopped = _run_iterations(run, loader, progress)
    if stopped:
        return {"iteration": iteration, "weights": None, "metrics": metrics,
                "stopped": stopped}
    return _finish(run, iteration)


def _training_device(name: str, world: int, local_rank: int) -> torch.device:
    """The device ``name`` resolves to; under DDP on CUDA, this process's own GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _open_checked_inputs(cfg: TrainConfig, resume: bool, out: Path, rank: int):
    """(training scenes, validation scenes), after every check that can fail before the
    first iteration; also removes temporary files a killed run left in ``out``."""
    train_scenes = open_scenes(cfg.data.train, cfg.data.train_images, cfg.data.synth_train,
                               "data.train", cfg.data.format, cfg.data.annotators)
    val_scenes = open_scenes(cfg.data.val, cfg.data.val_images, cfg.data.synth_val,
                             "data.val", cfg.data.format, cfg.data.annotators)
    if cfg.init_weights and not resume:
        check_regular_file(cfg.init_weights, "init_weights")
    check_output_dir(out)
    if rank == 0:
        # Left behind by a run killed while writing; the real files are intact.
        for stale in out.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    if len(train_scenes) == 0:
        raise InputError(f"data.train {cfg.data.train}: no images")
    names = [c["name"] for c in train_scenes.categories]
    val_names = [c["name"] for c in val_scenes.categories]
    if val_names != names:  # validation scores label k as the k-th validation category
        raise InputError(f"data.val {cfg.data.val}: categories {val_names} differ from the "
                         f"training data's {names}")
    if cfg.classes_from_data:
        cfg.model = cfg.model.replace(num_classes=len(names) + 1, class_names=names)
    elif list(cfg.model.class_names) != names:
        raise InputError(f"model.class_names {cfg.model.class_names} differ from the training "
                         f"data's categories {names} (or set classes_from_data: true)")
    checkpoint_path = out / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise InputError(f"{checkpoint_path}: no checkpoint to resume from (train without "
                         f"--resume to start)")
    return train_scenes, val_scenes


def _build_training_objects(cfg: TrainConfig, resume: bool, device, rank: int):
    """(model, optimiser, lr scheduler): the model seeded from ``cfg.seed``, with the
    ``init_weights`` of a fresh run, on ``device`` in training mode."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.init_weights and not resume:
        _load_init_weights(model, cfg, verbose=rank == 0)
    if cfg.solver.trainable == "order_head":
        model.train_only_order_head()
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg.solver))
    return model, optimizer, scheduler


def _load_init_weights(model, cfg: TrainConfig, verbose: bool) -> None:
    """``cfg.init_weights`` into a freshly built model; with ``init_mask_heads`` false the
    mask and order heads keep the model's own (seeded, random) initialisation."""
    skipped = () if cfg.init_mask_heads else MASK_HEAD_PREFIXES
    own_heads = {name: value.clone() for name, value in model.state_dict().items()
                 if skipped and name.startswith(skipped)}
    if cfg.init_weights.endswith(".safetensors"):
        _, state = load_weights(cfg.init_weights)
        # Left out before loading: heads of another shape (class-agnostic masks) do not load.
        model.load_state_dict({name: value for name, value in state.items()
                               if not (skipped and name.startswith(skipped))}, strict=False)
    else:
        init_from_maskrcnn_state_dict(model, cfg.init_weights, verbose=verbose)
    model.load_state_dict(own_heads, strict=False)
    if own_heads and verbose:
        print("init_mask_heads: false: the mask and order heads keep their random "
              "initialisation", flush=True)


def _resume(out: Path, model, optimizer, scheduler, cfg: TrainConfig, rank: int) -> int:
    """Load the last checkpoint into the training objects; returns its iteration."""
    checkpoint_path = out / CHECKPOINT
    state = load_checkpoint(checkpoint_path)
    start = _restore(state, checkpoint_path, model, optimizer, scheduler,
                     cfg.solver.iterations)
    if rank == 0:
        _trim_log(out, start)
        print(f"resuming from {checkpoint_path} at iteration {start}", flush=True)
    return start


def _modal_sources(cfg: TrainConfig, train_scenes):
    """The images whose whole objects modal augmentation pastes (``data.modal_aug``)."""
    aug = cfg.data.modal_aug
    if aug.probability == 0 or aug.sources == "train":
        return train_scenes
    sources = open_scenes(aug.sources, aug.sources_images, cfg.data.synth_train,
                          "data.modal_aug.sources", "auto", cfg.data.annotators)
    names = [c["name"] for c in train_scenes.categories]
    source_names = [c["name"] for c in sources.categories]
    if source_names != names:  # a pasted object keeps its label number
        raise InputError(f"data.modal_aug.sources {aug.sources}: categories {source_names} "
                         f"differ from the training data's {names}")
    return sources


def _make_loader(cfg: TrainConfig, scenes, sources, world: int, rank: int, start: int):
    """The batches of this rank for iterations ``start`` to the last."""
    return torch.utils.data.DataLoader(
        _TrainingSet(scenes, cfg.data.modal_aug, sources, cfg.seed),
        batch_size=cfg.solver.images_per_batch,
        sampler=IterationSampler(len(scenes), cfg.solver.images_per_batch, world, rank,
                                 cfg.seed, start, cfg.solver.iterations,
                                 cfg.data.horizontal_flip),
        collate_fn=_collate, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        # Its own generator: starting the loader must not draw from the global torch RNG,
        # or a resumed run would sample different RoIs than an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed))


def _start_outputs(cfg: TrainConfig, out: Path, val_scenes, start: int):
    """(TensorBoard writer, validation ground truth), after writing config.yaml and, for
    synthetic validation data, val_annotations.json (rank 0's job)."""
    atomic_write_bytes(out / "config.yaml",
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    if isinstance(val_scenes, SynthScenes):
        path = out / "val_annotations.json"
        gt = parse_dataset(write_amodal_coco(iter(val_scenes), path,
                                             categories=val_scenes.categories), str(path))
    else:
        gt = val_scenes  # already read and checked by open_scenes
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=start), gt


class _StopOnSignal:
    """While entered, SIGINT and SIGTERM set :attr:`signal` to the signal's name instead of
    interrupting: the run finishes its iteration, saves a checkpoint and returns."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._request)
                          for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _request(self, signum, _frame):
        self.signal = signal.Signals(signum).name


def _progress_bar(run: _Run, progress: bool):
    """A tqdm bar on rank 0 when ``progress``, else a context that gives None."""
    if run.rank != 0 or not progress:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=run.cfg.solver.iterations, initial=run.start, desc="train",
                dynamic_ncols=True)


def _run_iterations(run: _Run, loader, progress: bool):
    """The iterations; returns (last iteration, last evaluation's metrics, the name of the
    signal that stopped the run early or None)."""
    total, cfg = run.cfg.solver.iterations, run.cfg
    iteration, metrics = run.start, {}
    last_saved = run.start if run.resumed else None
    with _StopOnSignal() as stop, _progress_bar(run, progress) as bar:
        t_start = time.perf_counter()
        for images, targets in loader:
            losses, loss = _training_step(run, images, targets, iteration, last_saved)
            iteration += 1
            if run.rank == 0:
                _log_iteration(run, bar, iteration, losses, loss, t_start)
            done = iteration == total
            if run.rank == 0 and (iteration % cfg.checkpoint_period == 0 or done
                                  or stop.signal):
                save_checkpoint(run.checkpoint_path, run.model, run.optimizer, run.scheduler,
                                iteration)
                last_saved = iteration
            if run.rank == 0 and cfg.eval_period and iteration % cfg.eval_period == 0 \
                    and not done:
                metrics = _evaluate_and_log(run.model, run.val_scenes, run.gt, run.device,
                                            run.writer, iteration, run.out)
            # Every rank learns about a signal any rank received.
            if run.world > 1 and _any_rank_stopping(stop.signal, run.device) \
                    and not stop.signal:
                stop.signal = "SIGTERM"
            if stop.signal:
                if run.rank == 0:
                    print(f"\n{stop.signal}: stopped at iteration {iteration}; checkpoint "
                          f"{run.checkpoint_path}; continue with --resume")
                return iteration, metrics, stop.signal
    return iteration, metrics, None


def _training_step(run: _Run, images, targets, iteration: int, last_saved):
    """One optimiser step on a batch; returns (loss dict, total loss). A loss that is not
    finite stops the run (:class:`TrainingStopped`) before the step changes anything."""
    device = run.device
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, enabled=run.use_amp):
        losses = run.ddp_model(images, targets)
    loss = total_loss(losses)
    if not torch.isfinite(loss):
        where = (f"the last good checkpoint is {run.checkpoint_path} (iteration "
                 f"{last_saved})" if last_saved is not None
                 else "no checkpoint was written yet")
        bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
        raise TrainingStopped(f"loss is {float(loss)} at iteration {iteration + 1} "
                              f"({bad}); {where}; lower solver.lr or enable "
                              f"solver.grad_clip_norm")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.solver.grad_clip_norm > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.solver.grad_clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return losses, loss


def _log_iteration(run: _Run, bar, iteration: int, losses, loss, t_start: float) -> None:
    """Progress bar every iteration; losses, lr and time per iteration to TensorBoard and
    the log every ``log_period`` iterations and at the last (rank 0)."""
    lr = run.scheduler.get_last_lr()[0]
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2g}")
    if iteration % run.cfg.log_period != 0 and iteration != run.cfg.solver.iterations:
        return
    values = {k: v.item() for k, v in losses.items()}
    values["total"] = loss.item()
    seconds = (time.perf_counter() - t_start) / max(iteration - run.start, 1)
    for k, v in values.items():
        run.writer.add_scalar(f"loss/{k}", v, iteration)
    run.writer.add_scalar("lr", lr, iteration)
    run.writer.add_scalar("time/iteration_s", seconds, iteration)
    _append_log(run.out, {"iteration": iteration, "lr": lr, "losses": values,
                          "seconds_per_iteration": seconds})


def _any_rank_stopping(stopping, device) -> bool:
    """True on every rank when any rank was asked to stop (one all-reduce)."""
    flag = torch.tensor([1.0 if stopping else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item())


def _finish(run: _Run, iteration: int) -> dict:
    """After the last iteration: the final weights, evaluation and metrics.json (rank 0)."""
    weights, metrics = None, {}
    if run.world > 1:
        # DDP keeps the replicas' weights equal; each rank prints a digest to show it.
        # One write per line: the ranks share stdout, and print() writes text and newline
        # separately, which lets two ranks' lines run together.
        sys.stdout.write(f"rank {run.rank}: weights sha256 {state_digest(run.model)}\n")
        sys.stdout.flush()
    if run.rank == 0:
        weights = save_weights(run.model, run.cfg.model, run.out / FINAL_WEIGHTS,
                               dtype=getattr(torch, run.cfg.weights_dtype))
        metrics = _evaluate_and_log(run.model, run.val_scenes, run.gt, run.device,
                                    run.writer, iteration, run.out)
        atomic_write_json(run.out / "metrics.json", metrics, indent=2)
        run.writer.close()
    if run.world > 1:
        dist.barrier()
    return {"iteration": iteration, "weights": weights, "metrics": metrics, "stopped": None}


def state_digest(model) -> str:
    """sha256 over the model's parameters (for comparing DDP replicas).

    Buffers are left out: batch-norm running statistics follow each rank's own batches
    (DDP broadcasts rank 0's before every forward pass, and rank 0's are the ones saved).
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.named_parameters()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _append_log(out: Path, record: dict) -> None:
    path = out / LOG
    try:
        # One write() per record: a kill leaves whole lines (a partial one only when the
        # write itself fails, and _trim_log drops that on resume).
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror, str(path)) from None


def _trim_log(out: Path, iteration: int) -> None:
    """Before resuming at ``iteration``: drop the log records of later iterations (the
    resumed run logs them again, as TensorBoard's purge_step does for its events) and a
    partial last line."""
    path = out / LOG
    if not path.is_file():
        return
    raw = path.read_bytes()
    kept = []
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("iteration", 0) if isinstance(record, dict) else None
        if isinstance(step, int) and step <= iteration:
            kept.append(line)
    trimmed = b"".join(line + b"\n" for line in kept)
    if trimmed != raw:
        atomic_write_bytes(path, trimmed)


def _evaluate_and_log(model, val_scenes, gt, device, writer, iteration, out) -> dict:
    metrics = evaluate_model(model, val_scenes, gt, device)
    _append_log(out, {"iteration": iteration, "metrics": metrics})
    for key in ("AP_AV", "AP_A", "AP_V"):
        writer.add_scalar(f"eval/{key}", metrics[key], iteration)
    writer.add_scalar("eval/occluded_AP_IV50", metrics["occluded"]["AP_IV50"], iteration)
    writer.add_scalar("eval/order_accuracy", metrics["order"]["accuracy"], iteration)
    published = metrics["published_order"]["model"]
    for key in ("pair_accuracy", "first_pick_free", "first3_free", "edge_precision",
                "edge_recall"):
        writer.add_scalar(f"eval/published_{key}", published[key], iteration)
    try:
        overlay = _overlay(model, val_scenes[0], device)
        writer.add_image("val/overlay", overlay, iteration, dataformats="HWC")
    except ImportError:
        pass
    model.train()
    return metrics
