"""The loss functions and the occlusion formula against hand-computed values."""

import math

import pytest
import torch

from orcnn_core.losses import (
    invisible_target,
    loss_amodal_mask,
    loss_box_reg,
    loss_classifier,
    loss_invisible_mask,
    loss_objectness,
    loss_rpn_box_reg,
    loss_visible_mask,
    occlusion_logits,
    total_loss,
)


def bce(logit, target):
    """Binary cross-entropy of one sigmoid output, written out."""
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def smooth_l1(x, beta=1 / 9):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_occlusion_logits_hand_computed():
    amodal = torch.tensor([[14.0, -3.0], [2.0, -1.0]])
    visible = torch.tensor([[10.0, -5.0], [3.0, 0.5]])
    # amodal - max(visible, 0), element by element
    expected = torch.tensor([[4.0, -3.0], [-1.0, -1.5]])
    assert torch.equal(occlusion_logits(amodal, visible), expected)
    # The paper's example (section 3.2): logits 14 and 10 give an occlusion probability of
    # 1 / (1 + e^-4) = 0.982 without the invisible loss to keep the scales apart.
    assert torch.sigmoid(occlusion_logits(torch.tensor(14.0), torch.tensor(10.0))).item() \
        == pytest.approx(0.982, abs=1e-3)


def test_occlusion_logits_relu_keeps_background_negative():
    # Neither amodal nor visible (both negative): occlusion must not become positive, which
    # plain subtraction (-4 - -9 = 5) would do.
    assert occlusion_logits(torch.tensor(-4.0), torch.tensor(-9.0)).item() == -4.0


def test_invisible_target_is_amodal_and_not_visible():
    amodal = torch.tensor([1, 1, 0, 0, 1], dtype=torch.uint8)
    visible = torch.tensor([1, 0, 1, 0, 0], dtype=torch.uint8)
    out = invisible_target(amodal, visible)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 1, 0, 0, 1]
    assert invisible_target(amodal.bool(), visible.bool()).tolist() == \
        [False, True, False, False, True]


def test_loss_classifier_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    first = -math.log(math.exp(2) / (math.exp(2) + 2))
    second = -math.log(1 / (2 + math.e))
    assert loss_classifier(logits, labels).item() == pytest.approx((first + second) / 2)


def test_loss_box_reg_uses_the_label_channel_of_foreground_rois():
    # 3 RoIs, 3 classes: deltas per class are 4 numbers.
    box_regression = torch.zeros(3, 12)
    box_regression[0, 4:8] = torch.tensor([0.5, -0.05, 0.0, 1.0])  # RoI 0, class 1
    box_regression[0, 8:12] = 100.0  # class 2 of RoI 0: must be ignored
    box_regression[1, 8:12] = torch.tensor([0.0, 0.0, 0.02, 0.0])  # RoI 1, class 2
    box_regression[2] = 50.0  # background RoI: ignored
    labels = torch.tensor([1, 2, 0])
    targets = torch.zeros(3, 4)
    targets[1, 3] = 0.3
    expected = (smooth_l1(0.5) + smooth_l1(-0.05) + smooth_l1(1.0)
                + smooth_l1(0.02) + smooth_l1(-0.3)) / 3  # divided by all sampled RoIs
    assert loss_box_reg(box_regression, labels, targets).item() == pytest.approx(expected)


def test_rpn_losses_hand_computed():
    objectness = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0])
    expected = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    assert loss_objectness(objectness, labels).item() == pytest.approx(expected)

    deltas = torch.tensor([[0.2, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[0.0, 0.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0] * 4])
    expected = (smooth_l1(0.2) + smooth_l1(-0.05)) / 3  # only anchor 0 is foreground
    assert loss_rpn_box_reg(deltas, targets, labels).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss", [loss_amodal_mask, loss_visible_mask, loss_invisible_mask])
def test_mask_loss_selects_ground_truth_class_channel(loss):
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 2] = torch.tensor([[1.0, -2.0], [0.0, 3.0]])  # RoI 0 is class 2
    logits[0, 1] = 50.0  # other channels must not count
    logits[1, 1] = torch.tensor([[-1.0, 0.5], [2.0, -0.5]])  # RoI 1 is class 1
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.25, 0.0]]])
    labels = torch.tensor([2, 1])
    values = [bce(1.0, 1), bce(-2.0, 0), bce(0.0, 1), bce(3.0, 1),
              bce(-1.0, 0), bce(0.5, 1), bce(2.0, 0.25), bce(-0.5, 0)]
    assert loss(logits, targets, labels).item() == pytest.approx(sum(values) / 8)


def test_mask_loss_class_agnostic_uses_the_single_channel():
    logits = torch.tensor([[[[0.0, 2.0]]], [[[-1.0, 1.0]]]])  # [2, 1, 1, 2]
    targets = torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]])
    labels = torch.tensor([3, 7])  # class ids are irrelevant with one channel
    expected = (bce(0.0, 0) + bce(2.0, 1) + bce(-1.0, 1) + bce(1.0, 1)) / 4
    assert loss_amodal_mask(logits, targets, labels).item() == pytest.approx(expected)


def test_mask_loss_without_rois_is_a_differentiable_zero():
    logits = torch.zeros(0, 3, 28, 28, requires_grad=True)
    out = loss_invisible_mask(logits, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert out.item() == 0.0
    out.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_total_loss_is_the_unweighted_sum():
    losses = {"loss_classifier": torch.tensor(0.5), "loss_amodal_mask": torch.tensor(0.25),
              "loss_visible_mask": torch.tensor(2.0)}
    assert total_loss(losses).item() == pytest.approx(2.75)
    with pytest.raises(ValueError):
        total_loss({})
