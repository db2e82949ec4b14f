"""Model weights on disk: one ``.safetensors`` file that carries its model config.

* :func:`save_weights` writes the state dict and, in the file's metadata, the
  :class:`ModelConfig` as JSON, so the file alone rebuilds the model (:func:`build_from_file`).
* :func:`load_weights` never unpickles: a ``torch.save`` archive or a pickle is refused, a
  truncated or corrupt file, a file without ORCNN metadata, a config with implausible
  values, and tensors that do not fit the config (missing or extra keys, shapes, dtypes,
  NaN/inf values) are each one :class:`InputError` naming the file and the problem.
* :func:`init_from_maskrcnn_state_dict` initialises an ORCNN from a torchvision Mask R-CNN
  (COCO) state dict, as the paper does: backbone, RPN and box head are loaded, the mask
  head is copied into both the amodal and the visible head, and layers whose shapes differ
  (the class-specific outputs) keep their fresh initialisation. That file is a torchvision
  ``.pth`` (read with ``torch.load(weights_only=True)``, which cannot run code) or a
  ``.safetensors`` file.
"""

import functools
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from orcnn_core import __version__
from orcnn_core.config import ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_bytes
from orcnn_core.model import build_model

__all__ = ["save_weights", "load_weights", "build_from_file", "init_from_maskrcnn_state_dict",
           "InitReport", "FORMAT", "unpickler_reason", "PLAUSIBLE_MAX",
           "MAX_ALLOCATION_BYTES", "largest_allocation"]

FORMAT = "orcnn"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
#: Storage dtypes accepted for floating-point tensors (loading copies them into float32).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Upper bounds on config values a weights file may carry. The model would build with
#: larger ones, but only to exhaust memory or time at the first image: a file from
#: elsewhere with such values is refused before anything is allocated.
PLAUSIBLE_MAX = {
    "min_size": 8192, "max_size": 8192, "mask_roi_size": 128, "num_classes": 100_000,
    "fpn_channels": 4096, "box_head_dim": 16384, "mask_head_channels": 4096,
    "rpn_pre_nms_top_n_train": 100_000, "rpn_pre_nms_top_n_test": 100_000,
    "rpn_post_nms_top_n_train": 100_000, "rpn_post_nms_top_n_test": 100_000,
    "rpn_batch_size_per_image": 100_000, "box_batch_size_per_image": 100_000,
    "box_detections_per_img": 10_000, "order_head_channels": 4096,
    "order_pairs_per_image": 100_000,
}
#: Largest single tensor one image may need at inference, estimated from the config by
#: :func:`largest_allocation` (2 GiB; a model for 4K frames, min_size 2160, max_size 3840
#: with 256 FPN channels, needs about 0.5 GiB). Values each within :data:`PLAUSIBLE_MAX`
#: can still combine beyond it: min_size 8192 with 100000 proposals would ask for 5 GB
#: for one image's proposal features.
MAX_ALLOCATION_BYTES = 2 * 1024 ** 3
#: Bytes of a float32 value; the side of the box head's RoI features (torchvision's pooler).
_FLOAT_BYTES, _BOX_ROI_SIDE = 4, 7


# ---------------------------------------------------------------------------------- saving
def save_weights(model_or_state, cfg: ModelConfig, path, dtype=None) -> Path:
    """Write the model's (or a state dict's) tensors and ``cfg`` to ``path`` atomically.

    The state must fit ``cfg`` (same keys and shapes as ``build_model(cfg)``): a file that
    cannot rebuild its own model is refused here rather than at load time. ``dtype`` (e.g.
    ``torch.float16``) stores the floating-point tensors at that precision to halve the
    file; loading copies them back into the float32 model.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) \
        else model_or_state
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _check_architecture(cfg, tensors, path)
    _check_values(tensors, path)  # e.g. a weight beyond float16's range became inf
    metadata = {
        "format": FORMAT,
        "orcnn_config": json.dumps(cfg.to_dict()),
        "orcnn_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))
    return path


# ---------------------------------------------------------------------------------- loading
def load_weights(path):
    """Read an ORCNN weights file: returns ``(ModelConfig, state_dict)`` (CPU tensors)."""
    path = Path(path)
    metadata = _read_header(path)[1]
    if metadata.get("format") != FORMAT or "orcnn_config" not in metadata:
        raise InputError(f"{path}: safetensors file without ORCNN metadata (format "
                         f"{metadata.get('format')!r}, keys {sorted(metadata)}); not an "
                         f"ORCNN weights file (a torchvision state dict goes through "
                         f"init_from_maskrcnn_state_dict)")
    text = metadata["orcnn_config"]
    if not isinstance(text, str):
        raise InputError(f"{path}: orcnn_config metadata must be a JSON string, got "
                         f"{type(text).__name__}")
    try:
        config_dict = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: orcnn_config metadata is not valid JSON ({exc})") from None
    cfg = ModelConfig.from_dict(config_dict, source=f"{path}: orcnn_config")
    _check_plausible(cfg, path)
    state = _load_tensors(path)
    _check_architecture(cfg, state, path)
    _check_values(state, path)
    return cfg, state


def build_from_file(path, device="cpu"):
    """Rebuild the model a weights file describes and load its weights (eval mode)."""
    cfg, state = load_weights(path)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)  # keys and shapes were checked above
    return model.to(device).eval()


def _open(path: Path):
    """The weights file opened for reading; checked to be a regular file first (opening a
    FIFO would block forever)."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError
        if os.path.exists(path) and not os.path.isfile(path):
            raise InputError(f"{path}: is not a regular file (a FIFO, socket or device), not "
                             f"a weights file")
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a weights file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _pickle_kind(head: bytes):
    """What a file starting with ``head`` is if it is a pickle, else None."""
    if head[:4] == b"PK\x03\x04":
        return "pickle/torch.save archive"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle (legacy torch.save) file"
    return None


def _read_header(path: Path):
    """Validate a safetensors file's header without reading its tensors.

    Returns (tensor entries, metadata dict). Refuses pickles and torch.save archives by
    their magic bytes, and files whose tensors would end past the end of the file.
    """
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        kind = _pickle_kind(head)
        if kind:
            raise InputError(f"{path}: not a safetensors file (looks like a {kind}); "
                             f"refusing to unpickle")
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes; truncated "
                             f"or empty)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > _MAX_HEADER or f.read(1) != b"{":
            raise InputError(f"{path}: not a safetensors file (no JSON header at the start)")
        if 8 + n > size:
            raise InputError(f"{path}: truncated safetensors file (header of {n} bytes, file "
                             f"has {size} bytes)")
        raw = b"{" + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map names "
                         f"to strings)")
    body = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            ok = 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{path}: corrupt safetensors header (bad entry {name!r})")
        if end > body:
            raise InputError(f"{path}: truncated safetensors file (tensor {name!r} ends at "
                             f"byte {end} of a {body}-byte data section)")
    return header, metadata


def _load_tensors(path: Path) -> dict:
    try:
        return safetensors_load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad content
        raise InputError(f"{path}: corrupt safetensors file ({exc})") from None


@functools.lru_cache(maxsize=16)
def _expected_shapes(config_json: str):
    """(key -> shape, key -> dtype) of ``build_model(cfg)``'s state dict, built on the meta
    device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build_model(ModelConfig.from_dict(json.loads(config_json)))
    state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {k: v.dtype for k, v in state.items()}


def _check_plausible(cfg: ModelConfig, path) -> None:
    """Refuse config values no real model has (:data:`PLAUSIBLE_MAX`, finite positive
    anchors and normalisation); ModelConfig itself checks types and lower bounds."""
    for name, high in PLAUSIBLE_MAX.items():
        value = getattr(cfg, name)
        if value > high:
            raise InputError(f"{path}: orcnn_config: {name} {value} is implausible (at most "
                             f"{high})")
    checks = (("anchor_sizes", cfg.anchor_sizes, 1, PLAUSIBLE_MAX["max_size"]),
              ("anchor_aspect_ratios", cfg.anchor_aspect_ratios, 1e-3, 1e3),
              ("image_mean", cfg.image_mean, -1e3, 1e3),
              ("image_std", cfg.image_std, 1e-6, 1e3))
    for name, values, low, high in checks:
        if not all(math.isfinite(v) and low <= v <= high for v in values):
            raise InputError(f"{path}: orcnn_config: {name} {list(values)} is implausible "
                             f"(each in [{low:g}, {high:g}])")
    _check_allocation(cfg, path)


def largest_allocation(cfg: ModelConfig) -> tuple:
    """``(bytes, what, the config values it comes from)``: the estimated largest tensor of
    one image's inference, the biggest of

    * the backbone's first feature map: min_size x max_size / 4 pixels (stride 2) x 64
      channels (ResNet's stem; MobileNetV3's has 16), which also bounds the resized image
      (3 channels at full size);
    * the finest feature map: min_size x max_size / 16 pixels (stride 4) x fpn_channels;
    * the proposals' box features: rpn_post_nms_top_n_test x fpn_channels x 7 x 7;
    * the detections' mask features, both heads: 2 x box_detections_per_img x
      mask_head_channels x (2 mask_roi_size)^2;
    * with an order head, its union-box features of every pair of detections (all may
      overlap): D (D - 1) / 2 x fpn_channels x 7 x 7, D = box_detections_per_img;

    each float32. An estimate to refuse absurd configs with, not a memory budget."""
    stem = 16 if cfg.backbone.startswith("mobilenet") else 64
    terms = [
        (cfg.min_size * cfg.max_size // 4 * stem, "the backbone's first feature map",
         ("min_size", "max_size")),
        (cfg.min_size * cfg.max_size // 16 * cfg.fpn_channels, "the finest feature map",
         ("min_size", "max_size", "fpn_channels")),
        (cfg.rpn_post_nms_top_n_test * cfg.fpn_channels * _BOX_ROI_SIDE ** 2,
         "the proposals' box features", ("rpn_post_nms_top_n_test", "fpn_channels")),
        (2 * cfg.box_detections_per_img * cfg.mask_head_channels
         * (2 * cfg.mask_roi_size) ** 2, "the detections' mask features",
         ("box_detections_per_img", "mask_head_channels", "mask_roi_size")),
    ]
    if cfg.order_head:
        pairs = cfg.box_detections_per_img * (cfg.box_detections_per_img - 1) // 2
        terms.append((pairs * cfg.fpn_channels * _BOX_ROI_SIDE ** 2,
                      "the order head's pair features",
                      ("order_head", "box_detections_per_img", "fpn_channels")))
    values, what, names = max(terms, key=lambda term: term[0])
    return values * _FLOAT_BYTES, what, names


def _check_allocation(cfg: ModelConfig, path) -> None:
    """Refuse a config whose values, each plausible, combine into a huge allocation
    (:data:`MAX_ALLOCATION_BYTES`, :func:`largest_allocation`)."""
    size, what, names = largest_allocation(cfg)
    if size > MAX_ALLOCATION_BYTES:
        values = ", ".join(f"{name} {getattr(cfg, name)}" for name in names)
        raise InputError(f"{path}: orcnn_config: {values} would need about "
                         f"{size / 1024 ** 3:.1f} GiB for {what} of one image (at most "
                         f"{MAX_ALLOCATION_BYTES / 1024 ** 3:g} GiB)")


def _check_values(state: dict, path) -> None:
    """Floating-point tensors must be finite: NaN or inf weights give garbage output."""
    bad = [k for k, v in state.items()
           if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{path}: tensor(s) with NaN or inf values: {', '.join(bad[:4])}"
                         + (f", ... ({len(bad)} in all)" if len(bad) > 4 else ""))


def _check_architecture(cfg: ModelConfig, state: dict, path) -> None:
    expected, expected_dtypes = _expected_shapes(json.dumps(cfg.to_dict(), sort_keys=True))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    wrong_dtype = []
    for key, dtype in expected_dtypes.items():
        if key not in state:
            continue
        allowed = FLOAT_DTYPES if dtype.is_floating_point else (dtype,)
        if state[key].dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            wrong_dtype.append(f"{key} {str(state[key].dtype).replace('torch.', '')} "
                               f"(expected {names})")
    if not (missing or unexpected or wrong or wrong_dtype):
        return

    def few(items):
        return ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {few(wrong)}")
    if wrong_dtype:
        problems.append(f"wrong dtype {few(wrong_dtype)}")
    raise InputError(f"{path}: weights of another architecture than its config (backbone "
                     f"{cfg.backbone}, variant {cfg.variant}, {cfg.num_classes} classes): "
                     + "; ".join(problems))


# ---------------------------------------------------------------------------------- COCO init
@dataclass
class InitReport:
    """What :func:`init_from_maskrcnn_state_dict` did with each key."""

    path: str
    loaded: list = field(default_factory=list)  # same key in both models
    copied: list = field(default_factory=list)  # (source key, model key), mask head copies
    skipped: list = field(default_factory=list)  # (source key, reason)
    initialised: list = field(default_factory=list)  # model keys that kept their init

    def __str__(self) -> str:
        groups = {}
        for key in self.loaded:
            group = ".".join(key.split(".")[:2])
            groups[group] = groups.get(group, 0) + 1
        lines = [f"init from {self.path}:",
                 f"  loaded {len(self.loaded)} keys: "
                 + ", ".join(f"{g} ({n})" for g, n in groups.items())]
        lines.append(f"  copied {len(self.copied)} keys (mask head -> amodal/visible heads):")
        lines += [f"    {src} -> {dst}" for src, dst in self.copied]
        lines.append(f"  skipped {len(self.skipped)} keys:")
        counters = [key for key, _ in self.skipped if key.endswith(".num_batches_tracked")]
        lines += [f"    {key}: {reason}" for key, reason in self.skipped
                  if not key.endswith(".num_batches_tracked")]
        if counters:  # one per BatchNorm layer: a line each would drown the rest
            lines.append(f"    {len(counters)} BatchNorm counters (*.num_batches_tracked, e.g. "
                         f"{counters[0]}): not in this model")
        lines.append(f"  kept the fresh initialisation of {len(self.initialised)} keys:")
        lines += [f"    {key}" for key in self.initialised]
        return "\n".join(lines)


# Mask R-CNN key prefix -> the ORCNN prefixes that receive a copy.
_MASK_HEAD_COPIES = {
    "roi_heads.mask_head.": ("roi_heads.amodal_mask_head.", "roi_heads.visible_mask_head."),
    "roi_heads.mask_predictor.": ("roi_heads.amodal_mask_predictor.",
                                  "roi_heads.visible_mask_predictor."),
}


def _modern_key(key: str) -> str:
    """Keys of torchvision's older Mask R-CNN files (the COCO_V1 download) -> current names
    (what MaskRCNNHeads / RPNHead._load_from_state_dict do for version-1 state dicts)."""
    for i in range(1, 5):
        for kind in ("weight", "bias"):
            old = f"roi_heads.mask_head.mask_fcn{i}.{kind}"
            if key == old:
                return f"roi_heads.mask_head.{i - 1}.0.{kind}"
    for kind in ("weight", "bias"):
        if key == f"rpn.head.conv.{kind}":
            return f"rpn.head.conv.0.0.{kind}"
    return key


def unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights_only refusal that says what it refused (the rest
    explains how to load the file unsafely, which is not advice to pass on)."""
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(exc), re.M)
    if match:
        return match.group(1).strip()
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _load_foreign_state_dict(path: Path) -> dict:
    """A torchvision Mask R-CNN state dict from a .pth (weights_only) or .safetensors file."""
    with _open(path) as f:
        head = f.read(8)
    if _pickle_kind(head):
        try:
            # weights_only=True: the restricted unpickler that only rebuilds tensors and
            # plain containers, never arbitrary objects or code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (zipfile.BadZipFile, EOFError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: corrupt or truncated torch.save file ({first})") from None
        except Exception as exc:  # e.g. UnpicklingError: objects beyond tensors and dicts
            raise InputError(f"{path}: refused: not a plain state dict (torch.load with "
                             f"weights_only=True: {unpickler_reason(exc)})") from None
    else:
        _read_header(path)
        state = _load_tensors(path)
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def init_from_maskrcnn_state_dict(model, path, verbose: bool = True) -> InitReport:
    """Initialise a freshly built ORCNN from a torchvision Mask R-CNN state dict file.

    Keys present in both models with equal shapes are loaded; the Mask R-CNN mask head
    (``roi_heads.mask_head`` / ``mask_predictor``) is copied into the amodal and the visible
    head; keys whose shapes differ (class count, FPN width) or that the model lacks are
    skipped, and the model keeps its own initialisation for those. Prints the report when
    ``verbose``; returns it.
    """
    path = Path(path)
    source = _load_foreign_state_dict(path)
    target = model.state_dict()
    report = InitReport(str(path))
    new_state = {}
    for key, value in source.items():
        key_modern = _modern_key(key)
        destinations, is_copy = [key_modern], False
        for prefix, copies in _MASK_HEAD_COPIES.items():
            if key_modern.startswith(prefix):
                rest = key_modern[len(prefix):]
                destinations = [c + rest for c in copies if c + rest in target]
                is_copy = True
        if not destinations or destinations[0] not in target:
            report.skipped.append((key, "not in this model"))
            continue
        for dest in destinations:
            if tuple(target[dest].shape) != tuple(value.shape):
                report.skipped.append((key, f"shape {tuple(value.shape)} != {dest} "
                                            f"{tuple(target[dest].shape)}: re-initialised"))
                continue
            new_state[dest] = value
            if is_copy:
                report.copied.append((key, dest))
            else:
                report.loaded.append(dest)
    result = model.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # destinations come from target
    report.initialised = [k for k in target if k not in new_state]
    if verbose:
        print(report)
    return report
