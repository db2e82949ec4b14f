"""ORCNN's losses and its occlusion formula, each a named pure function.

The box and RPN losses are torchvision's Faster R-CNN losses (``fastrcnn_loss`` and
``RegionProposalNetwork.compute_loss``), split into one function per loss term so that the
model's loss dict keys are exactly these function names. The three mask losses are the Mask
R-CNN mask loss (per-pixel sigmoid, binary cross-entropy averaged over the RoIs' M x M
pixels) applied to the amodal, visible and occlusion logits (paper, section 3.2).
"""

import torch
import torch.nn.functional as F

__all__ = [
    "occlusion_logits",
    "invisible_target",
    "loss_classifier",
    "loss_box_reg",
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_amodal_mask",
    "loss_visible_mask",
    "loss_invisible_mask",
    "loss_occlusion_order",
    "total_loss",
]


def occlusion_logits(amodal_logits: torch.Tensor, visible_logits: torch.Tensor) -> torch.Tensor:
    """Occlusion (invisible) mask logits: ``amodal - ReLU(visible)`` (paper, section 3.1).

    The ReLU keeps a pixel that is neither amodal nor visible (both logits negative) from
    getting a positive occlusion logit. Any shape; both inputs must broadcast.
    """
    return amodal_logits - F.relu(visible_logits)


def invisible_target(amodal: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Invisible ground truth ``amodal AND NOT visible``; same shape and dtype as ``amodal``.

    Inputs are binary masks of equal shape (any integer or bool dtype; nonzero is set).
    """
    return ((amodal != 0) & (visible == 0)).to(amodal.dtype)


def loss_classifier(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Box-head classification loss: softmax cross-entropy over the sampled RoIs.

    Args:
        class_logits: float [R, C] (C classes including background 0).
        labels: int64 [R], class per RoI, 0 for background.
    Returns:
        scalar, mean over the R RoIs.
    """
    return F.cross_entropy(class_logits, labels)


def loss_box_reg(box_regression: torch.Tensor, labels: torch.Tensor,
                 regression_targets: torch.Tensor) -> torch.Tensor:
    """Box-head regression loss: smooth-L1 (beta 1/9) on the ground-truth class's deltas.

    Args:
        box_regression: float [R, 4 * C], per-class box deltas.
        labels: int64 [R], class per RoI; only RoIs with label > 0 contribute.
        regression_targets: float [R, 4], encoded deltas to the matched ground-truth box.
    Returns:
        scalar: the sum over foreground RoIs divided by R (all sampled RoIs), as torchvision.
    """
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]
    loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9, reduction="sum")
    return loss / max(labels.numel(), 1)


def loss_objectness(objectness: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RPN objectness loss: sigmoid binary cross-entropy over the sampled anchors.

    Args:
        objectness: float [S], logits of the S sampled anchors.
        labels: float [S], 1.0 for foreground anchors, 0.0 for background.
    Returns:
        scalar, mean over the S anchors.
    """
    return F.binary_cross_entropy_with_logits(objectness, labels)


def loss_rpn_box_reg(pred_bbox_deltas: torch.Tensor, regression_targets: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """RPN box regression loss: smooth-L1 (beta 1/9) on the foreground sampled anchors.

    Args:
        pred_bbox_deltas: float [S, 4], predicted deltas of the S sampled anchors.
        regression_targets: float [S, 4], encoded deltas to each anchor's matched box.
        labels: float [S], 1.0 for foreground anchors (the only ones that contribute).
    Returns:
        scalar: the sum over foreground anchors divided by S.
    """
    pos = torch.where(labels > 0)[0]
    loss = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=1 / 9,
                            reduction="sum")
    return loss / max(labels.numel(), 1)


def _mask_loss(mask_logits: torch.Tensor, mask_targets: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """Mask R-CNN's mask loss on the ground-truth class channel (or the single channel)."""
    if mask_targets.numel() == 0:
        # No foreground RoI: a zero that still depends on the logits, so every parameter
        # gets a (zero) gradient, like torchvision's maskrcnn_loss.
        return mask_logits.sum() * 0
    if mask_logits.shape[1] == 1:
        logits = mask_logits[:, 0]
    else:
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype))


def loss_amodal_mask(mask_logits: torch.Tensor, mask_targets: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """Amodal mask loss L_AM.

    Args:
        mask_logits: float [R, C, M, M], amodal logits of the R foreground RoIs; C is the
            number of classes, or 1 for class-agnostic masks.
        mask_targets: float [R, M, M] in [0, 1], amodal ground truth resampled to each RoI.
        labels: int64 [R], ground-truth class per RoI (selects the channel when C > 1).
    Returns:
        scalar, binary cross-entropy with logits averaged over R * M * M pixels (0 if R = 0).
    """
    return _mask_loss(mask_logits, mask_targets, labels)


def loss_visible_mask(mask_logits: torch.Tensor, mask_targets: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Visible mask loss L_VM; shapes as :func:`loss_amodal_mask` with visible logits/targets."""
    return _mask_loss(mask_logits, mask_targets, labels)


def loss_invisible_mask(mask_logits: torch.Tensor, mask_targets: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """Invisible mask loss L_IVM on :func:`occlusion_logits` against
    :func:`invisible_target`; shapes as :func:`loss_amodal_mask`."""
    return _mask_loss(mask_logits, mask_targets, labels)


def loss_occlusion_order(pair_logits: torch.Tensor, pair_targets: torch.Tensor) -> torch.Tensor:
    """Pairwise occlusion-order loss: softmax cross-entropy over (A on B, B on A, neither).

    Args:
        pair_logits: float [P, 3], the order head's logits of P pairs (A, B) of RoIs.
        pair_targets: int64 [P]: 0 when A lies on B, 1 when B lies on A, 2 when neither.
    Returns:
        scalar, mean over the P pairs (0 if P = 0, still depending on the logits so that
        every parameter gets a gradient).
    """
    if pair_targets.numel() == 0:
        return pair_logits.sum() * 0
    return F.cross_entropy(pair_logits, pair_targets)


def total_loss(losses: dict) -> torch.Tensor:
    """Paper eq. (1) plus the RPN terms: ``L = L_cls + L_box + L_AM + L_VM + L_IVM (+ RPN)``,
    plus the occlusion-order loss when the model has an order head.

    ``losses`` is the model's loss dict; a variant that drops a term (e.g. L_IVM for
    ``orcnn_no_invisible_loss``) simply has no such key. Unweighted sum, as in the paper.
    """
    if not losses:
        raise ValueError("total_loss: empty loss dict")
    return sum(losses.values())
