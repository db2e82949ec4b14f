"""ORCNN (Follmann et al. 2019): Mask R-CNN with an amodal and a visible mask head.

Built from torchvision's detection parts: GeneralizedRCNNTransform, ResNet/MobileNet FPN
backbones, the RPN, the two-layer box head, MultiScaleRoIAlign and the Mask R-CNN mask head
(4 x conv3x3 + ReLU, deconv, 1x1 predictor). What ORCNN changes:

* the RPN and the box head are trained on the **amodal** boxes (which may exceed the image);
* two mask heads of the Mask R-CNN shape run on the same RoI features: amodal and visible;
* occlusion logits = amodal logits - ReLU(visible logits) (:func:`losses.occlusion_logits`);
* mask targets are resampled from the original-resolution, padded masks (``mask_padding``)
  so the part of a truncated object's amodal mask outside the image is learnt too.

Training targets per image (dict of tensors): ``boxes`` float [N, 4] amodal xyxy in image
pixels, ``labels`` int64 [N], ``amodal_masks`` and ``visible_masks`` uint8 [N, H+2P, W+2P],
optional ``mask_padding`` int P (default 0), optional ``occlusion_relations`` int64 [K, 2]
(upper, lower) instance indices (the order head's targets). In training mode
``model(images, targets)`` returns the loss dict (keys: the names of the functions in
:mod:`orcnn_core.losses`); in eval mode ``model(images)`` returns per image ``boxes``
[D, 4] (original image pixels, amodal, may exceed the image), ``labels`` [D], ``scores``
[D], ``amodal_mask_logits`` and ``visible_mask_logits`` [D, M, M] (M = 2 * mask_roi_size)
on the box of each detection.
With ``order_head`` on, each detection dict also has ``order_probs`` [D, D]: entry (a, b)
is P(a lies on b), 0 for pairs whose boxes do not overlap.
Masks are not pasted into the full image here: :mod:`orcnn_core.predictor` does the cheap
per-box resampling the node needs.
"""

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet, resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from orcnn_core.config import MASK_HEAD_CONVS, ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.losses import (
    invisible_target,
    loss_amodal_mask,
    loss_box_reg,
    loss_classifier,
    loss_invisible_mask,
    loss_objectness,
    loss_occlusion_order,
    loss_rpn_box_reg,
    loss_visible_mask,
    occlusion_logits,
)

__all__ = ["ORCNN", "ORCNNRoIHeads", "ORCNNRPN", "PairOrderHead", "build_model",
           "build_backbone", "project_masks_on_boxes", "image_mask_targets",
           "overlapping_box_pairs", "pair_order_targets"]


# ---------------------------------------------------------------------------------- backbone
def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """Backbone body (randomly initialised) + FPN with ``cfg.fpn_channels`` channels.

    ResNets give 5 feature maps ("0".."3" at strides 4..32 and "pool"); MobileNetV3-Large
    gives torchvision's 3 (two stride-32 maps and "pool"). Layers below
    ``cfg.trainable_backbone_layers`` (counted from the top) are frozen, as in torchvision.
    """
    norm_layer = FrozenBatchNorm2d if cfg.backbone_norm == "frozen_bn" else nn.BatchNorm2d
    if cfg.backbone.startswith("resnet"):
        arch = cfg.backbone[: -len("_fpn")]
        body = resnet.__dict__[arch](weights=None, norm_layer=norm_layer)
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][
            : cfg.trainable_backbone_layers]
        if cfg.trainable_backbone_layers == 5:
            layers_to_train.append("bn1")
        for name, parameter in body.named_parameters():
            if not any(name.startswith(layer) for layer in layers_to_train):
                parameter.requires_grad_(False)
        return_layers = {f"layer{k}": str(k - 1) for k in range(1, 5)}
        stage2 = body.inplanes // 8  # 64 (ResNet-18/34) or 256 (ResNet-50/101)
        in_channels = [stage2 * 2 ** (k - 1) for k in range(1, 5)]
        return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels)

    # mobilenet_v3_fpn: torchvision's fasterrcnn_mobilenet_v3_large_fpn layout.
    features = mobilenet.mobilenet_v3_large(weights=None, norm_layer=norm_layer).features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] \
        + [len(features) - 1]
    trainable = cfg.trainable_backbone_layers
    freeze_before = len(features) if trainable == 0 else stages[len(stages) - trainable]
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    returned = [len(stages) - 2, len(stages) - 1]
    return_layers = {str(stages[k]): str(v) for v, k in enumerate(returned)}
    in_channels = [features[stages[k]].out_channels for k in returned]
    return BackboneWithFPN(features, return_layers, in_channels, cfg.fpn_channels)


def roi_feature_names(cfg: ModelConfig) -> list:
    """Feature maps the RoI heads pool from (all but the extra "pool" level)."""
    return [str(i) for i in range(len(cfg.anchor_sizes) - 1)]


# ---------------------------------------------------------------------------------- RPN
class ORCNNRPN(RegionProposalNetwork):
    """torchvision's RPN; its loss is split into :func:`loss_objectness` and
    :func:`loss_rpn_box_reg`. Trained on the amodal boxes of the targets."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        # Same sampling as torchvision; the loss terms are the named pure functions.
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled = torch.where(torch.cat(sampled_pos) | torch.cat(sampled_neg))[0]
        labels = torch.cat(labels)[sampled]
        return (
            loss_objectness(objectness.flatten()[sampled], labels),
            loss_rpn_box_reg(pred_bbox_deltas[sampled], torch.cat(regression_targets)[sampled],
                             labels),
        )


# ---------------------------------------------------------------------------------- masks
def project_masks_on_boxes(amodal_masks: torch.Tensor, visible_masks: torch.Tensor,
                           rois: torch.Tensor, matched_idxs: torch.Tensor,
                           size: int) -> torch.Tensor:
    """Resample amodal, visible and invisible ground truth onto RoIs (Mask R-CNN targets).

    Args:
        amodal_masks, visible_masks: uint8/bool [N, Hc, Wc], the masks on their canvas.
        rois: float [R, 4], xyxy in canvas pixels.
        matched_idxs: int64 [R], the ground-truth instance of each RoI.
        size: M, the mask head's output size.
    Returns:
        float [R, 3, M, M] in [0, 1]: channel 0 amodal, 1 visible, 2 invisible
        (``amodal AND NOT visible``), by RoIAlign like torchvision's
        ``project_masks_on_boxes`` (aligned=False, spatial scale 1).
    """
    if rois.shape[0] == 0:
        return rois.new_zeros((0, 3, size, size))
    # Only the instances and the canvas window the RoIs touch are converted to float: the
    # masks live at the original (padded) resolution, which can be large. One pixel of margin
    # (two after the exclusive end) keeps RoIAlign's bilinear neighbours inside the window,
    # so the result equals RoIAlign on the whole canvas.
    ids, inverse = torch.unique(matched_idxs, return_inverse=True)
    height, width = amodal_masks.shape[-2:]
    x0 = min(max(math.floor(rois[:, 0].min().item()) - 1, 0), width)
    y0 = min(max(math.floor(rois[:, 1].min().item()) - 1, 0), height)
    x1 = min(max(math.ceil(rois[:, 2].max().item()) + 2, x0), width)
    y1 = min(max(math.ceil(rois[:, 3].max().item()) + 2, y0), height)
    if x1 <= x0 or y1 <= y0:  # every RoI lies outside the canvas
        return rois.new_zeros((rois.shape[0], 3, size, size))
    amodal = amodal_masks[ids, y0:y1, x0:x1] != 0
    visible = visible_masks[ids, y0:y1, x0:x1] != 0
    stacked = torch.stack([amodal, visible, invisible_target(amodal, visible)], 1).to(rois)
    shifted = rois - rois.new_tensor([x0, y0, x0, y0])
    indexed = torch.cat([inverse[:, None].to(rois), shifted], dim=1)
    return roi_align(stacked, indexed, (size, size), 1.0)


def image_mask_targets(target: dict, rois: torch.Tensor, matched_idxs: torch.Tensor,
                       image_size, original_size, size: int) -> torch.Tensor:
    """Mask targets [R, 3, M, M] (amodal, visible, invisible) of one image's RoIs.

    ``rois`` [R, 4] are in the resized image the network sees (``image_size``); the masks
    in ``target`` are at ``original_size`` on a canvas padded by ``mask_padding``. The RoIs
    are mapped back with the exact inverse of the transform's box resize, then shifted onto
    the canvas, so no full-size mask is ever resized.
    """
    rois = resize_boxes(rois, list(image_size), list(original_size))
    pad = int(target.get("mask_padding", 0))
    return project_masks_on_boxes(target["amodal_masks"], target["visible_masks"], rois + pad,
                                  matched_idxs, size)


# ---------------------------------------------------------------------------------- order
#: The order head's classes: A lies on B, B lies on A, neither.
A_ON_B, B_ON_A, NEITHER = 0, 1, 2


def overlapping_box_pairs(boxes: torch.Tensor) -> torch.Tensor:
    """int64 [P, 2]: the index pairs (i, j), i < j, of boxes [N, 4] (xyxy) whose areas
    intersect; only such objects can lie on one another."""
    n = boxes.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=boxes.device)
    width = torch.min(boxes[i, 2], boxes[j, 2]) - torch.max(boxes[i, 0], boxes[j, 0])
    height = torch.min(boxes[i, 3], boxes[j, 3]) - torch.max(boxes[i, 1], boxes[j, 1])
    keep = (width > 0) & (height > 0)
    return torch.stack([i[keep], j[keep]], 1)


def pair_order_targets(pairs: torch.Tensor, matched: torch.Tensor,
                       relations: torch.Tensor) -> torch.Tensor:
    """Order-head targets [P] of RoI pairs (:data:`A_ON_B`, :data:`B_ON_A`, :data:`NEITHER`).

    Args:
        pairs: int64 [P, 2], RoI indices (A, B).
        matched: int64 [R], the ground-truth instance of each RoI.
        relations: int64 [K, 2], ground-truth (upper, lower): upper lies on lower.
    """
    targets = torch.full((pairs.shape[0],), NEITHER, dtype=torch.int64, device=pairs.device)
    if pairs.numel() == 0 or relations.numel() == 0:
        return targets
    a, b = matched[pairs[:, 0]], matched[pairs[:, 1]]
    size = int(max(matched.max().item(), relations.max().item())) + 1
    on = torch.zeros((size, size), dtype=torch.bool, device=pairs.device)
    on[relations[:, 0], relations[:, 1]] = True
    targets[on[b, a]] = B_ON_A
    targets[on[a, b]] = A_ON_B
    return targets


def _masks_on_union(probs: torch.Tensor, boxes: torch.Tensor, union: torch.Tensor,
                    members: torch.Tensor, size: int) -> torch.Tensor:
    """Each pair member's soft masks [R, 2, M, M] (over its own box) resampled onto the
    pair's union box: float [P, 2, size, size], zero outside the member's box."""
    cells = probs.shape[-1]
    own = boxes[members]
    scale_x = cells / (own[:, 2] - own[:, 0]).clamp_min(1e-3)
    scale_y = cells / (own[:, 3] - own[:, 1]).clamp_min(1e-3)
    in_mask = torch.stack([(union[:, 0] - own[:, 0]) * scale_x,
                           (union[:, 1] - own[:, 1]) * scale_y,
                           (union[:, 2] - own[:, 0]) * scale_x,
                           (union[:, 3] - own[:, 1]) * scale_y], 1)
    rois = torch.cat([members[:, None].to(in_mask), in_mask], 1)
    return roi_align(probs, rois, (size, size), 1.0, sampling_ratio=2, aligned=True)


class PairOrderHead(nn.Module):
    """Pairwise occlusion order (in the spirit of InstaOrderNet, Lee & Park 2022).

    For a pair (A, B): RoIAlign features of the union of both boxes, stacked with the
    amodal and visible probabilities of A and of B resampled onto that box, through two
    convolutions and two fully connected layers to logits of (A on B, B on A, neither).
    The head runs on (A, B) and on (B, A) and averages, so swapping A and B swaps the
    first two probabilities exactly. The first convolution is split into its feature and
    its mask channels (the same function): the feature part, most of the cost, is computed
    once per pair for both directions.
    """

    def __init__(self, in_channels: int, width: int, size: int):
        super().__init__()
        self.size = size
        half = (size + 1) // 2
        self.feature_conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mask_conv = nn.Conv2d(4, width, 3, padding=1, bias=False)
        self.reduce = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1),
                                    nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(width * half * half, width),
                                nn.ReLU(inplace=True), nn.Linear(width, 3))

    def forward(self, union_features: torch.Tensor, masks_a: torch.Tensor,
                masks_b: torch.Tensor) -> torch.Tensor:
        """Logits [P, 3] from union features [P, C, S, S] and masks [P, 2, S, S] each."""
        shared = self.feature_conv(union_features)
        both_ways = torch.cat([shared + self.mask_conv(torch.cat([masks_a, masks_b], 1)),
                               shared + self.mask_conv(torch.cat([masks_b, masks_a], 1))])
        forward, backward = self.fc(self.reduce(F.relu(both_ways))).chunk(2)
        return (forward + backward[:, [B_ON_A, A_ON_B, NEITHER]]) / 2


class ORCNNRoIHeads(RoIHeads):
    """torchvision's RoIHeads (box sampling, box head, box post-processing) + two mask heads.

    The amodal and the visible mask head run on the same RoIAlign features of the same boxes.
    ``visible_mask_head`` is None for the ``amodal_mrcnn`` variant. With ``independent``, the
    visible head sees detached RoI features and the occlusion logits detached amodal logits,
    so L_VM and L_IVM train the visible head only. With ``shared_mask_convs`` k > 0 (not
    with ``independent``) the visible head continues from the output of the amodal head's
    first k layers (its own layers are the remaining ones).
    """

    def __init__(self, *args, mask_roi_pool, amodal_mask_head, amodal_mask_predictor,
                 visible_mask_head=None, visible_mask_predictor=None,
                 mask_losses=("loss_amodal_mask",), independent=False, box_clip_margin=0.5,
                 order_head=None, order_pairs_per_image=64, shared_mask_convs=0, **kwargs):
        # mask_head/mask_predictor stay None in the base class: its Mask R-CNN path (and its
        # check for a "masks" target) is unused; the mask heads below replace it.
        super().__init__(*args, mask_roi_pool=mask_roi_pool, **kwargs)
        self.amodal_mask_head = amodal_mask_head
        self.amodal_mask_predictor = amodal_mask_predictor
        self.visible_mask_head = visible_mask_head
        self.visible_mask_predictor = visible_mask_predictor
        self.mask_losses = tuple(mask_losses)
        self.independent = independent
        self.box_clip_margin = box_clip_margin
        self.order_head = order_head
        self.order_pairs_per_image = order_pairs_per_image
        self.shared_mask_convs = shared_mask_convs

    def mask_logits(self, features, boxes, image_shapes):
        """Amodal and visible logits [R, C, M, M] of the boxes (visible is None for
        amodal_mrcnn)."""
        roi_features = self.mask_roi_pool(features, boxes, image_shapes)
        if self.shared_mask_convs:
            amodal_layers = list(self.amodal_mask_head)
            for layer in amodal_layers[:self.shared_mask_convs]:
                roi_features = layer(roi_features)
            amodal_features = roi_features
            for layer in amodal_layers[self.shared_mask_convs:]:
                amodal_features = layer(amodal_features)
        else:
            amodal_features = self.amodal_mask_head(roi_features)
        amodal = self.amodal_mask_predictor(amodal_features)
        if self.visible_mask_head is None:
            return amodal, None
        if self.independent:
            roi_features = roi_features.detach()
        visible = self.visible_mask_predictor(self.visible_mask_head(roi_features))
        return amodal, visible

    def pair_order_logits(self, features, boxes, probs, pairs, image_shapes):
        """Order-head logits [sum P_i, 3] of the RoI pairs of each image.

        Args:
            features: dict of FPN maps [B, C, h, w].
            boxes: list of B float [R_i, 4], RoIs in resized image pixels.
            probs: float [sum R_i, 2, M, M], amodal and visible probabilities of the RoIs.
            pairs: list of B int64 [P_i, 2], RoI indices within their image.
            image_shapes: list of B (height, width) after resizing.
        """
        union = [torch.cat([torch.min(b[p[:, 0], :2], b[p[:, 1], :2]),
                            torch.max(b[p[:, 0], 2:], b[p[:, 1], 2:])], 1)
                 for b, p in zip(boxes, pairs)]
        union_features = self.box_roi_pool(features, union, image_shapes)
        offsets = [0]
        for b in boxes[:-1]:
            offsets.append(offsets[-1] + b.shape[0])
        first = torch.cat([p[:, 0] + o for p, o in zip(pairs, offsets)])
        second = torch.cat([p[:, 1] + o for p, o in zip(pairs, offsets)])
        all_boxes, all_union = torch.cat(boxes), torch.cat(union)
        size = union_features.shape[-1]
        return self.order_head(union_features,
                               _masks_on_union(probs, all_boxes, all_union, first, size),
                               _masks_on_union(probs, all_boxes, all_union, second, size))

    def _order_probabilities(self, features, boxes, amodal, visible, image_shapes) -> list:
        """Per image float [D, D]: entry (a, b) is P(detection a lies on detection b); 0
        for pairs whose boxes do not overlap."""
        pairs = [overlapping_box_pairs(b) for b in boxes]
        probs = torch.stack([amodal, visible], 1).sigmoid()
        softmax = self.pair_order_logits(features, boxes, probs, pairs, image_shapes) \
            .softmax(1).split([p.shape[0] for p in pairs])
        matrices = []
        for b, p, s in zip(boxes, pairs, softmax):
            matrix = b.new_zeros((b.shape[0], b.shape[0]))
            matrix[p[:, 0], p[:, 1]] = s[:, A_ON_B]
            matrix[p[:, 1], p[:, 0]] = s[:, B_ON_A]
            matrices.append(matrix)
        return matrices

    def _order_loss(self, features, boxes, matched, amodal, visible, targets,
                    image_shapes) -> torch.Tensor:
        """:func:`loss_occlusion_order` on pairs of foreground RoIs of different objects
        whose boxes overlap (at most ``order_pairs_per_image``, evenly spread, so no random
        draw changes a resumed run), for images whose targets carry
        ``occlusion_relations``. The masks enter as detached probabilities."""
        pairs, pair_targets = [], []
        for b, m, t in zip(boxes, matched, targets):
            p = overlapping_box_pairs(b)
            p = p[m[p[:, 0]] != m[p[:, 1]]] if "occlusion_relations" in t else p[:0]
            if p.shape[0] > self.order_pairs_per_image:
                p = p[torch.linspace(0, p.shape[0] - 1, self.order_pairs_per_image,
                                     device=p.device).round().long()]
            pairs.append(p)
            relations = t.get("occlusion_relations", m.new_zeros((0, 2)))
            pair_targets.append(pair_order_targets(p, m, relations.to(m.device)))
        probs = torch.stack([amodal, visible], 1).detach().sigmoid()
        logits = self.pair_order_logits(features, boxes, probs, pairs, image_shapes)
        return loss_occlusion_order(logits, torch.cat(pair_targets))

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        # torchvision clips boxes to the image, but amodal boxes of objects cut by the border
        # extend beyond it. Box decoding is relative to the proposal (translation-equivariant)
        # and NMS is translation-invariant, so torchvision's code run on proposals shifted
        # into a grown canvas clips to the image grown by box_clip_margin instead.
        offsets, grown = [], []
        for height, width in image_shapes:
            dx, dy = round(self.box_clip_margin * width), round(self.box_clip_margin * height)
            offsets.append(proposals[0].new_tensor([dx, dy, dx, dy]))
            grown.append((height + 2 * dy, width + 2 * dx))
        shifted = [p + o for p, o in zip(proposals, offsets)]
        boxes, scores, labels = super().postprocess_detections(
            class_logits, box_regression, shifted, grown)
        return [b - o for b, o in zip(boxes, offsets)], scores, labels

    def forward(self, features, proposals, image_shapes, targets=None,
                original_image_sizes=None):
        """Box head + the two mask heads.

        Args:
            features: dict of FPN maps [B, C, h, w].
            proposals: list of B float [P_i, 4] RPN boxes (resized image pixels).
            image_shapes: list of B (height, width) after resizing.
            targets: training targets (see module docstring), boxes already resized.
            original_image_sizes: list of B (height, width) before resizing; the masks are
                at this resolution (plus padding). Needed in training only.
        Returns:
            (detections, losses) as torchvision's RoIHeads; see the module docstring.
        """
        if self.training:
            if targets is None or original_image_sizes is None:
                raise ValueError("training needs targets and original_image_sizes")
            proposals, matched_idxs, labels, regression_targets = \
                self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        if not self.training:
            boxes, scores, labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes)
            amodal, visible = self.mask_logits(features, boxes, image_shapes)
            if visible is None:  # amodal_mrcnn: the visible mask is the amodal mask
                visible = amodal
            all_labels = torch.cat(labels)
            channel = all_labels if amodal.shape[1] > 1 else torch.zeros_like(all_labels)
            index = torch.arange(channel.shape[0], device=channel.device)
            counts = [b.shape[0] for b in boxes]
            amodal, visible = amodal[index, channel], visible[index, channel]
            result = [
                {"boxes": b, "labels": lab, "scores": s,
                 "amodal_mask_logits": a, "visible_mask_logits": v}
                for b, lab, s, a, v in zip(boxes, labels, scores, amodal.split(counts),
                                           visible.split(counts))
            ]
            if self.order_head is not None:
                orders = self._order_probabilities(features, boxes, amodal, visible,
                                                   image_shapes)
                for r, order in zip(result, orders):
                    r["order_probs"] = order
            return result, {}

        all_labels = torch.cat(labels)
        losses = {
            "loss_classifier": loss_classifier(class_logits, all_labels),
            "loss_box_reg": loss_box_reg(box_regression, all_labels,
                                         torch.cat(regression_targets)),
        }
        losses.update(self._mask_losses(features, proposals, labels, matched_idxs, targets,
                                        image_shapes, original_image_sizes))
        return [], losses

    def _mask_losses(self, features, proposals, labels, matched_idxs, targets, image_shapes,
                     original_image_sizes) -> dict:
        """The mask losses of the variant (and the order loss) on the foreground RoIs."""
        losses = {}
        # Mask heads on the foreground RoIs, targets from the original-resolution masks.
        mask_boxes, pos_matched, mask_labels = [], [], []
        for i in range(len(proposals)):
            pos = torch.where(labels[i] > 0)[0]
            mask_boxes.append(proposals[i][pos])
            pos_matched.append(matched_idxs[i][pos])
            mask_labels.append(labels[i][pos])
        amodal, visible = self.mask_logits(features, mask_boxes, image_shapes)
        mask_targets = torch.cat([
            image_mask_targets(t, b, m, size, original, amodal.shape[-1])
            for t, b, m, size, original in zip(targets, mask_boxes, pos_matched, image_shapes,
                                               original_image_sizes)])
        mask_labels = torch.cat(mask_labels)

        if "loss_amodal_mask" in self.mask_losses:
            losses["loss_amodal_mask"] = loss_amodal_mask(amodal, mask_targets[:, 0],
                                                          mask_labels)
        if "loss_visible_mask" in self.mask_losses:
            losses["loss_visible_mask"] = loss_visible_mask(visible, mask_targets[:, 1],
                                                            mask_labels)
        if "loss_invisible_mask" in self.mask_losses:
            occlusion = occlusion_logits(amodal.detach() if self.independent else amodal,
                                         visible)
            losses["loss_invisible_mask"] = loss_invisible_mask(occlusion, mask_targets[:, 2],
                                                                mask_labels)
        if self.order_head is not None:
            index = torch.arange(mask_labels.shape[0], device=mask_labels.device)
            channel = mask_labels if amodal.shape[1] > 1 else torch.zeros_like(mask_labels)
            amodal = amodal[index, channel]
            visible = amodal if visible is None else visible[index, channel]
            losses["loss_occlusion_order"] = self._order_loss(
                features, mask_boxes, pos_matched, amodal, visible, targets, image_shapes)
        return losses


# ---------------------------------------------------------------------------------- model
def mask_heads(cfg: ModelConfig, channels: int) -> dict:
    """The mask heads and predictors of ORCNNRoIHeads (visible ones None without a visible
    head). With ``visible_head_shared_convs`` k the visible head holds only its own layers,
    numbered as in a full head (k..3), so a separate-head file's visible layers land in
    their places (``init_weights``) and its first k are left out."""
    width = cfg.mask_head_channels

    def mask_head():
        return MaskRCNNHeads(channels, (width,) * MASK_HEAD_CONVS, 1)

    def mask_predictor():
        return MaskRCNNPredictor(width, width, cfg.mask_classes)

    heads = dict(amodal_mask_head=mask_head(), amodal_mask_predictor=mask_predictor(),
                 visible_mask_head=None, visible_mask_predictor=None)
    if cfg.has_visible_head:
        shared = cfg.visible_head_shared_convs
        visible = mask_head()
        if shared:
            visible = nn.Sequential(OrderedDict(
                (str(i), layer) for i, layer in enumerate(visible) if i >= shared))
        heads.update(visible_mask_head=visible, visible_mask_predictor=mask_predictor())
    return heads


#: Parameter and buffer name prefixes of the heads that turn RoI features into masks and
#: order: what ``init_mask_heads: false`` leaves at its random initialisation.
MASK_HEAD_PREFIXES = ("roi_heads.amodal_mask_", "roi_heads.visible_mask_",
                      "roi_heads.order_head.")


class ORCNN(GeneralizedRCNN):
    """The ORCNN model; build it with :func:`build_model`. ``self.config`` is its config."""

    def __init__(self, cfg: ModelConfig):
        backbone = build_backbone(cfg)
        channels = backbone.out_channels
        anchor_generator = AnchorGenerator(
            tuple((s,) for s in cfg.anchor_sizes),
            (tuple(cfg.anchor_aspect_ratios),) * len(cfg.anchor_sizes))
        rpn = ORCNNRPN(
            anchor_generator,
            RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
            cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh,
            cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction,
            dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
            dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
            cfg.rpn_nms_thresh)

        names = roi_feature_names(cfg)
        box_roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        heads = mask_heads(cfg, channels)
        roi_heads = ORCNNRoIHeads(
            box_roi_pool,
            TwoMLPHead(channels * 7 * 7, cfg.box_head_dim),
            FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes),
            cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh,
            cfg.box_batch_size_per_image, cfg.box_positive_fraction,
            None,  # bbox_reg_weights: torchvision's (10, 10, 5, 5)
            cfg.box_score_thresh, cfg.box_nms_thresh, cfg.box_detections_per_img,
            mask_roi_pool=MultiScaleRoIAlign(featmap_names=names,
                                             output_size=cfg.mask_roi_size, sampling_ratio=2),
            **heads,
            mask_losses=cfg.mask_losses,
            independent=cfg.variant == "orcnn_independent",
            box_clip_margin=cfg.box_clip_margin,
            order_head=PairOrderHead(channels, cfg.order_head_channels, 7) if cfg.order_head
            else None,
            order_pairs_per_image=cfg.order_pairs_per_image,
            shared_mask_convs=cfg.visible_head_shared_convs,
        )
        transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size,
                                             list(cfg.image_mean), list(cfg.image_std))
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = cfg
        self.only_order_head = False

    def train_only_order_head(self) -> None:
        """Freeze every parameter but the order head's, to add a head to a trained model:
        the rest gets no gradient (backward stops at the head) and its batch-norm
        statistics stay as trained."""
        if self.roi_heads.order_head is None:
            raise InputError("the model has no order head (model config order_head: false)")
        self.only_order_head = True
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith("roi_heads.order_head."))
        self.train(self.training)

    def train(self, mode: bool = True) -> "ORCNN":
        """Set training or eval mode, and the memory layout of the convolution weights.

        On the CPU, eval mode stores the 4-D weights channels-last (NHWC), oneDNN's native
        layout: each convolution then skips two reorders of its activations. Inference with
        30 detections got 25 % faster at 320 x 240 (ResNet-18-FPN, MobileNetV3-FPN) and 8 %
        at 640 x 480 (see benchmarks/bench_model.py); the outputs agree with the contiguous
        layout to float rounding. Training mode and other devices keep the contiguous layout
        (the channels-last backward pass is slower on the CPU). Switching copies the weights
        once; the Parameter objects, and so optimiser references, stay the same.
        """
        super().train(mode)
        if mode and self.only_order_head:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # frozen: the statistics stay those of the trained model
        on_cpu = all(p.device.type == "cpu" for p in self.parameters())
        layout = torch.channels_last if on_cpu and not mode else torch.contiguous_format
        # Normal tensors even when eval() is called under inference_mode: the same
        # parameters may be trained later.
        with torch.inference_mode(False):
            self.to(memory_format=layout)
        return self

    def forward(self, images: list, targets: Optional[list] = None):
        """Training: ``model(images, targets) -> loss dict``; eval: ``model(images) ->
        list of detections``. Images: list of float [3, H, W] RGB in [0, 1]."""
        original_image_sizes = [tuple(img.shape[-2:]) for img in images]
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            _check_targets(targets, original_image_sizes)
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        proposals, proposal_losses = self.rpn(images, features, targets)
        detections, detector_losses = self.roi_heads(
            features, proposals, images.image_sizes, targets, original_image_sizes)
        if self.training:
            return {**detector_losses, **proposal_losses}
        # Rescales the boxes to the original image; there is no "masks" key to paste.
        return self.transform.postprocess(detections, images.image_sizes, original_image_sizes)


def _check_targets(targets, image_sizes) -> None:
    """Shape checks with messages that say which target and which key is wrong."""
    for i, (t, (height, width)) in enumerate(zip(targets, image_sizes)):
        for key in ("boxes", "labels", "amodal_masks", "visible_masks"):
            if key not in t:
                raise InputError(f"target {i}: missing {key!r}")
        boxes = t["boxes"]
        n = boxes.shape[0]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise InputError(f"target {i}: boxes must be float N x 4, got "
                             f"{tuple(boxes.shape)} {boxes.dtype}")
        if n and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise InputError(f"target {i}: boxes must have x2 > x1 and y2 > y1")
        if t["labels"].shape != (n,) or t["labels"].dtype != torch.int64:
            raise InputError(f"target {i}: labels must be int64 of shape ({n},), got "
                             f"{tuple(t['labels'].shape)} {t['labels'].dtype}")
        pad = int(t.get("mask_padding", 0))
        if pad < 0:
            raise InputError(f"target {i}: mask_padding must be >= 0, got {pad}")
        relations = t.get("occlusion_relations")
        if relations is not None and (relations.dim() != 2 or relations.shape[1] != 2
                                      or relations.dtype != torch.int64
                                      or bool(((relations < 0) | (relations >= n)).any())):
            raise InputError(f"target {i}: occlusion_relations must be int64 K x 2 indices "
                             f"into the {n} instances, got {tuple(relations.shape)} "
                             f"{relations.dtype}")
        expected = (n, height + 2 * pad, width + 2 * pad)
        for key in ("amodal_masks", "visible_masks"):
            if tuple(t[key].shape) != expected:
                raise InputError(f"target {i}: {key} must be N x (H+2P) x (W+2P) = "
                                 f"{expected} (mask_padding {pad}), got {tuple(t[key].shape)}")


def build_model(cfg: ModelConfig) -> ORCNN:
    """A randomly initialised ORCNN for ``cfg`` (train mode, on the CPU)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a ModelConfig, got {type(cfg).__name__}")
    return ORCNN(cfg)
