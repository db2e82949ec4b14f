"""Tiny untrained ORCNN models and training configs for the tests: fast on one CPU thread.

One base configuration; a test that needs another detail (input size, classes, heads)
passes it as a change, so the rest stays the same everywhere.
"""

from pathlib import Path

import torch
import yaml

from orcnn_core.config import ModelConfig
from orcnn_core.model import build_model
from orcnn_core.weights import save_weights

#: ModelConfig.small narrowed to 64 x 64 input, classes red and blue, 7 x 7 mask RoIs,
#: anchors for small objects, small RPN and RoI batches (quick training steps) and at most
#: 5 detections.
TINY = dict(
    min_size=64, max_size=64, num_classes=3, class_names=["red", "blue"], fpn_channels=32,
    box_head_dim=64, mask_head_channels=16, mask_roi_size=7, anchor_sizes=(8, 16, 24, 32, 48),
    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
    rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
    box_detections_per_img=5)

#: The changes for the model the node tests run (conftest.py's tiny_model_path): 160 x 120
#: input, classes box and can, wider mask heads with ModelConfig.small's anchors and
#: 14 x 14 mask RoIs; score threshold 0 makes it emit up to 20 detections on any image.
NODE_MODEL = dict(
    min_size=120, max_size=160, class_names=["box", "can"], mask_head_channels=32,
    mask_roi_size=14, anchor_sizes=(16, 32, 64, 128, 256), box_detections_per_img=20,
    box_score_thresh=0.0)


def tiny_config(**changes) -> ModelConfig:
    """The tiny model's configuration with ``changes`` (ModelConfig field values)."""
    return ModelConfig.small(**{**TINY, **changes})


def tiny_model(seed=0, **changes):
    """An untrained model of ``tiny_config(**changes)``, initialised from torch seed
    ``seed``: the same weights on every call."""
    torch.manual_seed(seed)
    return build_model(tiny_config(**changes))


def save_tiny_model(path, **changes) -> Path:
    """Write the weights file of ``tiny_model(**changes)`` to ``path``; returns the path."""
    model = tiny_model(**changes)
    return save_weights(model, model.config, path)


def train_config(*, backbone, trainable_backbone_layers, anchor_sizes, width, height,
                 train_images, val_images, iterations, steps, warmup_iters) -> dict:
    """An ``orcnn-core train`` config (the YAML's contents) of a narrow model on synthetic
    scenes of ``width`` x ``height`` (two categories) at their own size, on the CPU: a
    checkpoint and a log record every iteration, evaluation only at the end."""
    return {
        "model": {
            "backbone": backbone, "backbone_norm": "bn",
            "trainable_backbone_layers": trainable_backbone_layers,
            "min_size": height, "max_size": width, "fpn_channels": 16, "box_head_dim": 32,
            "mask_head_channels": 16, "anchor_sizes": list(anchor_sizes),
            "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
            "box_batch_size_per_image": 32, "box_detections_per_img": 10,
        },
        "data": {
            "synth_train": {"num_images": train_images, "seed": 0, "width": width,
                            "height": height, "num_classes": 2},
            "synth_val": {"num_images": val_images, "seed": 1000, "width": width,
                          "height": height, "num_classes": 2},
        },
        "solver": {"iterations": iterations, "images_per_batch": 2, "lr": 0.005,
                   "steps": list(steps), "warmup_iters": warmup_iters},
        "checkpoint_period": 1, "eval_period": 0, "log_period": 1, "device": "cpu",
    }


def write_train_config(path, config: dict) -> Path:
    """Write a train_config() as YAML to ``path``; returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
