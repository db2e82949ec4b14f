"""The model configuration: one plain dataclass that a weights file carries in its metadata.

Defaults are the paper's (Follmann et al. 2019, appendix A: shorter image side 800, longer
side at most 1111, 256 RoIs per image, 1000 RPN proposals per FPN level before NMS) and
torchvision's Mask R-CNN defaults where the paper says nothing. A training configuration
built around this one can hold it as a field; :meth:`ModelConfig.from_dict` rejects unknown
keys so that a typo in a YAML file is an error, not a silently ignored value.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from orcnn_core.errors import InputError

#: The paper's Table 6 architectures, one config value each.
#:   orcnn                    amodal + visible heads, L_A + L_V + L_IV
#:   amodal_mrcnn             amodal head only (Mask R-CNN on amodal data); visible := amodal
#:   orcnn_no_invisible_loss  ORCNN without L_IV
#:   orcnn_no_visible_loss    ORCNN without L_V (the visible head learns only through L_IV)
#:   orcnn_independent        L_V and L_IV reach only the visible head, not the amodal head
#:                            nor the RoI / backbone features
VARIANTS = (
    "orcnn",
    "amodal_mrcnn",
    "orcnn_no_invisible_loss",
    "orcnn_no_visible_loss",
    "orcnn_independent",
)

#: Backbones: the paper's ResNet-50/101-FPN and a small one for 2 CPU cores (see
#: ``ModelConfig.small`` and benchmarks/bench_model.py for the measurement behind it).
BACKBONES = ("resnet50_fpn", "resnet101_fpn", "resnet18_fpn", "mobilenet_v3_fpn")

#: Normalisation in the backbone body. "frozen_bn" is the paper's / torchvision's choice for
#: fine-tuning from pretrained weights; "bn" trains batch statistics (training from scratch).
BACKBONE_NORMS = ("frozen_bn", "bn")

#: Convolutions of each mask head before its deconvolution (Mask R-CNN's head).
MASK_HEAD_CONVS = 4

#: Number of feature maps each backbone gives the RPN (one anchor size per map).
NUM_FEATURE_MAPS = {
    "resnet50_fpn": 5,
    "resnet101_fpn": 5,
    "resnet18_fpn": 5,
    "mobilenet_v3_fpn": 3,
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild an ORCNN model (architecture and inference settings)."""

    # --- architecture ---
    backbone: str = "resnet50_fpn"
    num_classes: int = 2  # including the background class 0
    class_names: list = field(default_factory=lambda: ["object"])  # names of classes 1..K
    variant: str = "orcnn"
    class_agnostic_masks: bool = False
    backbone_norm: str = "frozen_bn"
    trainable_backbone_layers: int = 3  # 0..5 (resnet) / 0..6 (mobilenet), from the top
    fpn_channels: int = 256
    box_head_dim: int = 1024  # width of the two fully connected box-head layers
    mask_head_channels: int = 256  # width of the conv + deconv layers of each mask head
    mask_roi_size: int = 14  # RoIAlign output for the mask heads; masks are 2x this (28)
    # The visible head's first k of its 4 convolutions are the amodal head's own (one
    # shared trunk, then a branch each). 0: two separate heads, as in the paper; 4: the
    # heads share every convolution and differ only in their deconvolution and predictor,
    # about Mask R-CNN's cost (docs/performance.md).
    visible_head_shared_convs: int = 0
    # Pairwise occlusion-order head: for pairs of RoIs whose boxes overlap, P(A lies on B),
    # P(B lies on A), P(neither) from the features of their union box and both soft masks;
    # trained on the data's occlusion relations (an extra loss). Off: the order is decided
    # from the masks alone (orcnn_core.occlusion).
    order_head: bool = False
    order_head_channels: int = 32  # width of the order head's convolutions and hidden layer
    order_pairs_per_image: int = 64  # RoI pairs per training image the order loss sees

    # --- input transform ---
    min_size: int = 800  # shorter image side after resizing
    max_size: int = 1111  # longer side at most this
    image_mean: tuple = (0.485, 0.456, 0.406)
    image_std: tuple = (0.229, 0.224, 0.225)

    # --- region proposal network ---
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one per feature map
    anchor_aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 1000  # per feature map
    rpn_pre_nms_top_n_test: int = 1000  # per feature map
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5

    # --- box head ---
    box_batch_size_per_image: int = 256  # RoIs per image (paper)
    box_positive_fraction: float = 0.25
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    # Predicted amodal boxes may leave the image (objects cut by the border): they are
    # clipped to the image grown by this fraction of its width/height on every side.
    box_clip_margin: float = 0.5

    def __post_init__(self):
        if not isinstance(self.class_names, (list, tuple)):
            raise InputError(f"model config: class_names must be a list, got "
                             f"{self.class_names!r}")
        self.class_names = list(self.class_names)
        for name in ("image_mean", "image_std", "anchor_sizes", "anchor_aspect_ratios"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise InputError(f"model config: {name} must be a list, got {value!r}")
            setattr(self, name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def has_visible_head(self) -> bool:
        return self.variant != "amodal_mrcnn"

    @property
    def mask_classes(self) -> int:
        """Channels of each mask predictor: one per class, or one when class-agnostic."""
        return 1 if self.class_agnostic_masks else self.num_classes

    @property
    def mask_losses(self) -> tuple:
        """Names of the mask losses this variant trains with."""
        return {
            "orcnn": ("loss_amodal_mask", "loss_visible_mask", "loss_invisible_mask"),
            "amodal_mrcnn": ("loss_amodal_mask",),
            "orcnn_no_invisible_loss": ("loss_amodal_mask", "loss_visible_mask"),
            "orcnn_no_visible_loss": ("loss_amodal_mask", "loss_invisible_mask"),
            "orcnn_independent": ("loss_amodal_mask", "loss_visible_mask",
                                  "loss_invisible_mask"),
        }[self.variant]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists) that :meth:`from_dict` reads back."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> "ModelConfig":
        """Build from a dict; unknown keys and bad values raise InputError naming ``source``."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except InputError as exc:
            raise InputError(f"{source}: {exc}".replace("model config: ", "")) from None

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def small(cls, **changes) -> "ModelConfig":
        """The CPU configuration: ResNet-18-FPN, 320 px shorter side, 128-wide FPN and heads.

        ResNet-18-FPN rather than the faster MobileNetV3-FPN: torchvision's MobileNetV3 FPN
        sees only stride-32 maps and learns less per second on small objects, while
        ResNet-18-FPN keeps the paper backbones' 5-level FPN (same anchors and key layout as
        ResNet-50/101-FPN). The measurements behind the choice are in docs/performance.md.
        """
        base = dict(
            backbone="resnet18_fpn",
            min_size=320,
            max_size=512,
            fpn_channels=128,
            box_head_dim=512,
            mask_head_channels=128,
            anchor_sizes=(16, 32, 64, 128, 256),
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100,
            box_batch_size_per_image=128,
            box_detections_per_img=30,
            trainable_backbone_layers=5,
        )
        base.update(changes)
        return cls(**base)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise InputError naming the first bad field."""
        def fail(name, problem):
            raise InputError(f"model config: {name} {problem}, got {getattr(self, name)!r}")

        def check_int(name, low, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if value < low or (high is not None and value > high):
                fail(name, f"must be in [{low}, {high}]" if high is not None
                     else f"must be >= {low}")

        def check_float(name, low, high, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                fail(name, "must be a number")
            if value < low or value > high or (low_open and value == low):
                fail(name, f"must be in {'(' if low_open else '['}{low}, {high}]")

        def check_choice(name, choices):
            if getattr(self, name) not in choices:
                fail(name, f"must be one of {', '.join(choices)}")

        check_choice("backbone", BACKBONES)
        check_choice("variant", VARIANTS)
        check_choice("backbone_norm", BACKBONE_NORMS)
        check_int("num_classes", 2)
        if len(self.class_names) != self.num_classes - 1:
            fail("class_names", f"must name the {self.num_classes - 1} classes 1..K "
                 f"(num_classes {self.num_classes} includes the background)")
        if not all(isinstance(n, str) and n for n in self.class_names):
            fail("class_names", "must be non-empty strings")
        for name in ("class_agnostic_masks", "order_head"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        self._validate_shared_convs(fail)
        check_int("trainable_backbone_layers", 0, 6 if self.backbone.startswith("mobilenet")
                  else 5)
        for name in ("fpn_channels", "box_head_dim", "mask_head_channels", "mask_roi_size",
                     "min_size", "max_size", "rpn_pre_nms_top_n_train",
                     "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                     "rpn_post_nms_top_n_test", "rpn_batch_size_per_image",
                     "box_batch_size_per_image", "box_detections_per_img",
                     "order_pairs_per_image", "order_head_channels"):
            check_int(name, 1)
        if self.max_size < self.min_size:
            fail("max_size", f"must be >= min_size {self.min_size}")
        self._validate_lists(fail)
        for name in ("rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
                     "box_fg_iou_thresh", "box_bg_iou_thresh", "box_nms_thresh"):
            check_float(name, 0.0, 1.0)
        check_float("rpn_positive_fraction", 0.0, 1.0, low_open=True)
        check_float("box_positive_fraction", 0.0, 1.0, low_open=True)
        check_float("box_score_thresh", 0.0, 1.0)
        check_float("box_clip_margin", 0.0, 10.0)
        if self.rpn_bg_iou_thresh > self.rpn_fg_iou_thresh:
            fail("rpn_bg_iou_thresh", f"must be <= rpn_fg_iou_thresh {self.rpn_fg_iou_thresh}")
        if self.box_bg_iou_thresh > self.box_fg_iou_thresh:
            fail("box_bg_iou_thresh", f"must be <= box_fg_iou_thresh {self.box_fg_iou_thresh}")

    def _validate_shared_convs(self, fail) -> None:
        """``visible_head_shared_convs``: 0..MASK_HEAD_CONVS, and 0 for the variants without
        a visible head or with one that must not train the amodal head's layers."""
        shared = self.visible_head_shared_convs
        if isinstance(shared, bool) or not isinstance(shared, int) \
                or not 0 <= shared <= MASK_HEAD_CONVS:
            fail("visible_head_shared_convs", f"must be an integer in [0, {MASK_HEAD_CONVS}]")
        if shared and self.variant in ("amodal_mrcnn", "orcnn_independent"):
            fail("visible_head_shared_convs", f"must be 0 with variant {self.variant}")

    def _validate_lists(self, fail) -> None:
        """The list values: normalisation (R, G, B) and anchors (one size per feature
        map); ``fail(name, problem)`` raises."""
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            fail("image_mean" if len(self.image_mean) != 3 else "image_std",
                 "must hold 3 values (R, G, B)")
        if not all(isinstance(s, (int, float)) and s > 0 for s in self.image_std):
            fail("image_std", "must be positive numbers")
        if not all(isinstance(s, (int, float)) for s in self.image_mean):
            fail("image_mean", "must be numbers")
        levels = NUM_FEATURE_MAPS[self.backbone]
        if len(self.anchor_sizes) != levels:
            fail("anchor_sizes", f"must hold {levels} sizes (one per feature map of "
                 f"{self.backbone})")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                   for s in self.anchor_sizes):
            fail("anchor_sizes", "must be positive integers")
        if not self.anchor_aspect_ratios or not all(
                isinstance(r, (int, float)) and r > 0 for r in self.anchor_aspect_ratios):
            fail("anchor_aspect_ratios", "must be positive numbers")
