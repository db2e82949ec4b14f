"""The training configuration: a dataclass tree read from YAML, unknown keys rejected by name.

    model:   ModelConfig (orcnn_core/config.py): architecture and inference settings
    data:    where training and validation scenes come from
    solver:  optimiser and learning-rate schedule
    (top):   run settings: output folder, periods, seed, device, initial weights

Shipped configurations live in ``orcnn_core/configs/``; ``--config synth_demo`` names one.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orcnn_core.config import ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.fileio import check_regular_file
from orcnn_core.synth import CLASSES as SYNTH_CLASSES
from orcnn_core.weights import PLAUSIBLE_MAX

CONFIG_DIR = Path(__file__).with_name("configs")

_SEED_MAX = 2 ** 32 - 1  # numpy's legacy seeding takes no more
_COUNT_MAX = 10 ** 9

#: Allowed range of every number outside ``model``: key -> (low, high, low_open,
#: high_open), checked with the types before anything is built. solver.lr stops at 1e30 so
#: that lr x gradient stays finite in float32 (a diverging lr then stops at the NaN-loss
#: check with its iteration and last checkpoint, instead of failing inside torch).
RANGES = {
    "seed": (0, _SEED_MAX, False, False),
    "checkpoint_period": (1, _COUNT_MAX, False, False),
    "eval_period": (0, _COUNT_MAX, False, False),
    "log_period": (1, _COUNT_MAX, False, False),
    "data.num_workers": (0, 256, False, False),
    "solver.iterations": (1, _COUNT_MAX, False, False),
    "solver.images_per_batch": (1, 1024, False, False),
    "solver.lr": (0.0, 1e30, True, False),
    "solver.momentum": (0.0, 1.0, False, True),
    "solver.weight_decay": (0.0, 1.0, False, False),
    "solver.steps": (1, _COUNT_MAX, False, False),  # each step
    "solver.gamma": (0.0, 1.0, True, False),
    "solver.warmup_iters": (0, _COUNT_MAX, False, False),
    "solver.warmup_factor": (0.0, 1.0, True, False),
    "solver.grad_clip_norm": (0.0, 1e6, False, False),
    "data.modal_aug.probability": (0.0, 1.0, False, False),
    "data.modal_aug.min_objects": (1, 100, False, False),
    "data.modal_aug.max_objects": (1, 100, False, False),
}
for _name in ("synth_train", "synth_val"):
    RANGES.update({f"data.{_name}.num_images": (1, 10_000_000, False, False),
                   f"data.{_name}.seed": (0, _SEED_MAX, False, False),
                   f"data.{_name}.width": (16, 8192, False, False),
                   f"data.{_name}.height": (16, 8192, False, False),
                   f"data.{_name}.num_classes": (1, len(SYNTH_CLASSES), False, False)})
#: Ranges of the model's list values; ModelConfig checks the scalars' lower bounds and
#: :data:`orcnn_core.weights.PLAUSIBLE_MAX` gives their upper bounds (the bounds a weights
#: file is held to, so a trained model always loads).
MODEL_LIST_RANGES = {
    "anchor_sizes": (1, PLAUSIBLE_MAX["max_size"], False, False),
    "anchor_aspect_ratios": (1e-3, 1e3, False, False),
    "image_mean": (-1e3, 1e3, False, False),
    "image_std": (1e-6, 1e3, False, False),
}


@dataclass
class SynthDataConfig:
    """Synthetic scenes rendered on the fly: scene ``i`` comes from ``seed`` and ``i``."""

    num_images: int = 2000
    seed: int = 0
    width: int = 320
    height: int = 240
    num_classes: int = 8


@dataclass
class ModalAugConfig:
    """Modal augmentation (paper, section 4.1): whole objects cut out of other images (an
    object's modal mask is its full extent) pasted onto training images; a pasted object's
    mask is its amodal mask, the objects it covers lose visible pixels and get "pasted
    lies on it" relations (orcnn_core.modal_aug)."""

    probability: float = 0.0  # share of training images that get pasted objects; 0: off
    min_objects: int = 1  # objects pasted on such an image: min_objects..max_objects
    max_objects: int = 3
    # "train": objects cut from other training images; else an annotation file (any layout
    # data.train takes, e.g. plain COCO instances; the training data's categories) whose
    # whole, untruncated objects are cut
    sources: str = "train"
    sources_images: str = ""  # image folder of that file; default: the file's folder


@dataclass
class DataConfig:
    # "synth" renders scenes (see synth_train / synth_val); anything else is the path of an
    # annotation file (D2S amodal / COCOA / KINS / COCO, detected from its keys).
    train: str = "synth"
    train_images: str = ""  # image folder; default: the annotation file's folder
    val: str = "synth"
    val_images: str = ""
    # Layout of the annotation files: auto (detected from the keys) or a name of
    # orcnn_core.data.FORMAT_NAMES (amodal_coco, coco, cocoa, kins2019, ...); COCOA images
    # with several annotators: the first one's regions, or all merged.
    format: str = "auto"
    annotators: str = "first"
    synth_train: SynthDataConfig = field(default_factory=SynthDataConfig)
    synth_val: SynthDataConfig = field(
        default_factory=lambda: SynthDataConfig(num_images=50, seed=1000))
    horizontal_flip: bool = True
    num_workers: int = 0  # DataLoader worker processes
    modal_aug: ModalAugConfig = field(default_factory=ModalAugConfig)


@dataclass
class SolverConfig:
    iterations: int = 10000
    images_per_batch: int = 2  # per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.0025
    momentum: float = 0.9
    weight_decay: float = 1e-4
    steps: tuple = (6000, 8000)  # iterations where lr is multiplied by gamma
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    grad_clip_norm: float = 0.0  # 0: off
    amp: bool = True  # mixed precision; used on CUDA only
    # all: train every trainable layer; order_head: only the order head (the rest frozen,
    # e.g. to add the head to a trained model with init_weights)
    trainable: str = "all"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    output_dir: str = "outputs/train"
    # A torchvision Mask R-CNN COCO state dict (.pth) or an ORCNN .safetensors file; "" for
    # random initialisation.
    init_weights: str = ""
    # false: the mask heads and the order head keep their random initialisation and only the
    # rest (backbone, RPN, box head) comes from init_weights: a trained detector whose mask
    # heads are learnt anew, as the ablation does (docs/ablation.md).
    init_mask_heads: bool = True
    # Take model.num_classes and model.class_names from the training data's categories.
    classes_from_data: bool = True
    # Precision of the floating-point tensors in model_final.safetensors: float32 | float16.
    weights_dtype: str = "float32"
    checkpoint_period: int = 500
    eval_period: int = 1000  # 0: evaluate only at the end
    log_period: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def to_dict(self) -> dict:
        return _to_plain(self)


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _build(cls, data, source: str, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, checking keys and scalar types.

    Errors read ``<source>: <section.key>: <problem>``.
    """
    section = prefix.rstrip(".") or "top level"
    if cls is ModelConfig:
        return ModelConfig.from_dict(data, source=f"{source}: {section}")
    if not isinstance(data, dict):
        raise InputError(f"{source}: {section}: expected a mapping, got "
                         f"{type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{source}: {section}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}{name}")
    return cls(**kwargs)


def _convert(hint, value, source, key):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{key}.")

    def fail(expected):
        raise InputError(f"{source}: {key}: expected {expected}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            fail("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if hint is tuple:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            fail("a list of integers")
        return tuple(value)
    return value


def _range_text(low, high, low_open, high_open) -> str:
    def number(v):
        return str(v) if isinstance(v, int) else f"{v:g}"
    return f"{'(' if low_open else '['}{number(low)}, {number(high)}{')' if high_open else ']'}"


def _check_range(where: str, key: str, values, bounds) -> None:
    low, high, low_open, high_open = bounds
    for value in values:
        if value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            raise InputError(f"{where}: {key} {value!r}: must be in "
                             f"{_range_text(*bounds)}")


def check_ranges(cfg: TrainConfig, where: str) -> None:
    """Every number of the tree within its range (:data:`RANGES`, the model's within
    :data:`orcnn_core.weights.PLAUSIBLE_MAX` and :data:`MODEL_LIST_RANGES`); one
    InputError naming the key and the allowed range."""
    for key, bounds in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        _check_range(where, key, value if isinstance(value, tuple) else (value,), bounds)
    for name, high in PLAUSIBLE_MAX.items():
        _check_range(where, f"model.{name}", (getattr(cfg.model, name),),
                     (1, high, False, False))
    for name, bounds in MODEL_LIST_RANGES.items():
        _check_range(where, f"model.{name}", getattr(cfg.model, name), bounds)


def validate(cfg: TrainConfig, where: str) -> TrainConfig:
    """Range checks that the types alone do not give; raise InputError naming the key."""
    s = cfg.solver

    def fail(key, problem):
        raise InputError(f"{where}: {key} {problem}")

    for key, value in (("solver.iterations", s.iterations),
                       ("solver.images_per_batch", s.images_per_batch),
                       ("checkpoint_period", cfg.checkpoint_period),
                       ("log_period", cfg.log_period)):
        if value < 1:
            fail(key, f"must be >= 1, got {value}")
    if cfg.eval_period < 0:
        fail("eval_period", f"must be >= 0, got {cfg.eval_period}")
    if s.optimizer not in ("sgd", "adamw"):
        fail("solver.optimizer", f"must be sgd or adamw, got {s.optimizer!r}")
    if not s.lr > 0:
        fail("solver.lr", f"must be > 0, got {s.lr}")
    if cfg.data.modal_aug.min_objects > cfg.data.modal_aug.max_objects:
        fail("data.modal_aug.min_objects", f"must be <= max_objects "
             f"{cfg.data.modal_aug.max_objects}, got {cfg.data.modal_aug.min_objects}")
    if s.trainable not in ("all", "order_head"):
        fail("solver.trainable", f"must be all or order_head, got {s.trainable!r}")
    if s.trainable == "order_head" and not cfg.model.order_head:
        fail("solver.trainable", "is order_head, but model.order_head is false")
    if not cfg.init_mask_heads and not cfg.init_weights:
        fail("init_mask_heads", "is false, but init_weights names no file to load the rest "
             "from")
    if not cfg.init_mask_heads and s.trainable == "order_head":
        fail("init_mask_heads", "is false with solver.trainable order_head: the new mask "
             "heads would never train")
    if list(s.steps) != sorted(s.steps):
        fail("solver.steps", f"must be increasing, got {list(s.steps)}")
    if cfg.weights_dtype not in ("float32", "float16"):
        fail("weights_dtype", f"must be float32 or float16, got {cfg.weights_dtype!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        fail("device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    for name in ("synth_train", "synth_val"):
        synth = getattr(cfg.data, name)
        if synth.num_images < 1 or synth.width < 16 or synth.height < 16:
            fail(f"data.{name}", "needs num_images >= 1 and width, height >= 16")
    check_ranges(cfg, where)
    return cfg


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped one (``synth_demo``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():  # a folder, FIFO or device: say what it is
        check_regular_file(path, "--config")
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise InputError(f"{name_or_path}: no such config file (shipped configs: {names})")


def load_train_config(name_or_path: str, overrides=()) -> TrainConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate.

    Overrides' values are parsed as YAML (``solver.lr=0.01``, ``solver.steps=[10,20]``).
    """
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    cfg = _build(TrainConfig, data, str(path))
    return validate(cfg, str(path))
