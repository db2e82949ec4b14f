"""The pairwise occlusion-order head: shapes, symmetry, targets, its loss on empty and
one-object images, and that it can learn an order from the soft masks."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from orcnn_core.errors import InputError
from orcnn_core.losses import loss_occlusion_order
from orcnn_core.model import (A_ON_B, B_ON_A, NEITHER, PairOrderHead, build_model,
                              overlapping_box_pairs, pair_order_targets)
from orcnn_core.occlusion import occlusion_graph
from orcnn_core.predictor import Predictor
from orcnn_core.weights import build_from_file, save_weights
from test_model import empty_sample, sample
from test_occlusion import canvas_instance, prediction_from_masks
from tiny_models import tiny_config

BOX_RPN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
MASK_LOSSES = {"loss_amodal_mask", "loss_visible_mask", "loss_invisible_mask"}


def one_object_sample():
    image, target = sample()
    keep = slice(0, 1)
    return image, {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep],
                   "amodal_masks": target["amodal_masks"][keep],
                   "visible_masks": target["visible_masks"][keep],
                   "occlusion_relations": torch.zeros((0, 2), dtype=torch.int64)}


def order_model(seed=0, **changes):
    torch.manual_seed(seed)
    return build_model(tiny_config(order_head=True, **changes))


def test_overlapping_pairs_by_hand():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [10, 0, 20, 10], [30, 30, 40, 40]])
    # 0 and 2 only touch at x = 10 (no area in common); 1 overlaps both.
    assert overlapping_box_pairs(boxes).tolist() == [[0, 1], [1, 2]]
    assert overlapping_box_pairs(boxes[:1]).shape == (0, 2)
    assert overlapping_box_pairs(boxes[:0]).shape == (0, 2)


def test_pair_targets_by_hand():
    pairs = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 3]])
    matched = torch.tensor([5, 7, 9, 5])  # RoI -> ground-truth instance
    relations = torch.tensor([[7, 5], [9, 7]])  # 7 lies on 5, 9 lies on 7
    assert pair_order_targets(pairs, matched, relations).tolist() == [
        B_ON_A, B_ON_A, NEITHER, NEITHER]  # 5-7: 7 on 5; 7-9: 9 on 7; 5-9, 9-5: none
    relations = torch.tensor([[9, 5]])
    assert pair_order_targets(pairs, matched, relations).tolist() == [
        NEITHER, NEITHER, B_ON_A, A_ON_B]
    assert pair_order_targets(pairs, matched, torch.zeros((0, 2), dtype=torch.int64)) \
        .tolist() == [NEITHER] * 4


def test_head_shape_and_exact_symmetry():
    torch.manual_seed(0)
    head = PairOrderHead(8, 16, 7)
    features = torch.randn(5, 8, 7, 7)
    masks_a, masks_b = torch.rand(5, 2, 7, 7), torch.rand(5, 2, 7, 7)
    logits = head(features, masks_a, masks_b)
    assert logits.shape == (5, 3)
    swapped = head(features, masks_b, masks_a)
    torch.testing.assert_close(swapped, logits[:, [B_ON_A, A_ON_B, NEITHER]])
    assert head(features[:0], masks_a[:0], masks_b[:0]).shape == (0, 3)


def test_loss_by_hand_and_on_no_pairs():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([A_ON_B, B_ON_A])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2))
                - math.log(1 / (2 + math.e))) / 2
    assert loss_occlusion_order(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros((0, 3), requires_grad=True)
    loss = loss_occlusion_order(empty, torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad.shape == (0, 3)


@pytest.mark.parametrize("samples", [[empty_sample()], [one_object_sample()]],
                         ids=["empty", "one-object"])
def test_training_on_images_without_pairs(samples):
    model = order_model()
    losses = model([s[0] for s in samples], [s[1] for s in samples])
    assert set(losses) == BOX_RPN_LOSSES | MASK_LOSSES | {"loss_occlusion_order"}
    assert losses["loss_occlusion_order"].item() == 0.0  # no pair of two objects
    sum(losses.values()).backward()
    head = model.roi_heads.order_head
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_training_on_two_objects_uses_the_relation():
    image, target = sample()  # object 0 lies on object 1
    model = order_model()
    with_relation = model([image], [{**target, "occlusion_relations": torch.tensor([[0, 1]])}])
    assert with_relation["loss_occlusion_order"].item() > 0
    # Without stated relations the order loss sees no pair (it is not told "neither").
    unknown = model([image], [target])
    assert unknown["loss_occlusion_order"].item() == 0.0


def test_bad_relations_are_refused_by_target():
    image, target = sample()
    model = order_model()
    for bad in (torch.tensor([[0, 2]]), torch.tensor([0, 1]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(InputError, match="target 0: occlusion_relations"):
            model([image], [{**target, "occlusion_relations": bad}])


def test_inference_order_probabilities(tmp_path):
    model = order_model(box_score_thresh=0.0).eval()
    image, _ = sample()
    with torch.no_grad():
        det = model([image])[0]
    probs, boxes = det["order_probs"], det["boxes"]
    d = boxes.shape[0]
    assert d > 1 and probs.shape == (d, d)
    assert torch.all(probs.diagonal() == 0)
    pairs = {tuple(p) for p in overlapping_box_pairs(boxes).tolist()}
    for a in range(d):
        for b in range(a + 1, d):
            total = probs[a, b] + probs[b, a]
            if (a, b) in pairs:
                assert 0 < total < 1  # the rest is P(neither)
            else:
                assert total == 0
    # The head survives a weights file round trip.
    path = save_weights(model, model.config, tmp_path / "order.safetensors")
    again = build_from_file(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again([image])[0]["order_probs"], probs)
    # An image without detections gives an empty matrix.
    with torch.no_grad():
        empty = model([torch.zeros(3, 64, 64)])[0]
    assert empty["order_probs"].shape == (empty["boxes"].shape[0],) * 2


def test_head_learns_the_order_from_soft_masks():
    """A's visible part covers B's hidden part: the head must learn "A on B" from the masks
    alone (features carry nothing), for both orders of the pair."""
    torch.manual_seed(0)
    size, n = 7, 32
    masks_upper = torch.zeros(n, 2, size, size)
    masks_lower = torch.zeros(n, 2, size, size)
    for k in range(n):
        x = k % 4
        masks_upper[k, :, :, x:x + 3] = 1  # amodal = visible
        masks_lower[k, 0, :, :] = 1
        masks_lower[k, 1, :, :] = 1
        masks_lower[k, 1, :, x:x + 3] = 0  # hidden where the upper one lies
    features = torch.zeros(2 * n, 4, size, size)
    masks_a = torch.cat([masks_upper, masks_lower])
    masks_b = torch.cat([masks_lower, masks_upper])
    targets = torch.cat([torch.full((n,), A_ON_B), torch.full((n,), B_ON_A)])
    head = PairOrderHead(4, 16, size)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        loss_occlusion_order(head(features, masks_a, masks_b), targets).backward()
        optimiser.step()
    predicted = head(features, masks_a, masks_b).argmax(1)
    assert (predicted == targets).all()


# ------------------------------------------------------------------ the head in the graph
def head_prediction(order):
    """Two objects side by side whose label crops touch but do not overlap (the mask rules
    see no evidence), and a third far away; ``order`` is the head's matrix."""
    left = canvas_instance([(10, 10, 40, 40)], [(10, 10, 40, 40)])
    right = canvas_instance([(40, 10, 70, 40)], [(40, 10, 70, 40)])
    far = canvas_instance([(90, 70, 110, 90)], [(90, 70, 110, 90)])
    pred = prediction_from_masks([left, right, far], [0.9, 0.8, 0.7])
    pred.order = np.asarray(order, np.float32)
    return pred


def test_graph_takes_confidence_and_free_probability_from_the_head():
    order = [[0, 0.9, 0], [0.05, 0, 0], [0, 0, 0]]  # 0 lies on 1 (P 0.9); 1 on 0 (P 0.05)
    pred = head_prediction(order)
    graph = occlusion_graph(pred, min_overlap_pixels=0)
    assert graph.edges.tolist() == [[0, 1]]
    assert graph.confidence.tolist() == pytest.approx([0.9])
    assert graph.free_probability.tolist() == pytest.approx([0.95, 0.1, 1.0])
    assert graph.pick_order.tolist() == [2, 0, 1]  # 2 and 0 free (2 more likely), then 1
    # Without the head the masks decide: the crops do not overlap, so no edge at all.
    masks_only = occlusion_graph(dataclasses.replace(pred, order=None), min_overlap_pixels=0)
    assert masks_only.edges.shape == (0, 2)
    # With the default pixel threshold an edge also needs evidence in the masks.
    assert occlusion_graph(pred).edges.shape == (0, 2)
    # Below the confidence threshold: no edge, but the probability still counts.
    weak = occlusion_graph(head_prediction([[0, 0.4, 0], [0, 0, 0], [0, 0, 0]]),
                           min_overlap_pixels=0)
    assert weak.edges.shape == (0, 2)
    assert weak.free_probability.tolist() == pytest.approx([1.0, 0.6, 1.0])


def test_subset_keeps_the_head_matrix_in_step():
    order = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
    pred = head_prediction(order)
    np.testing.assert_allclose(pred.subset([2, 0]).order, [[0.8, 0.6], [0.2, 0.0]],
                               rtol=1e-6)
    with pytest.raises(InputError, match="order must be a finite 3 x 3"):
        occlusion_graph(head_prediction(np.ones((2, 2))))


def test_training_only_the_head_leaves_the_rest_as_trained():
    model = order_model(backbone_norm="bn")
    model.train_only_order_head()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image, target = sample()
    losses = model([image], [{**target, "occlusion_relations": torch.tensor([[0, 1]])}])
    sum(losses.values()).backward()
    optimiser.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("roi_heads.order_head.") for k in changed), changed
    # Batch-norm statistics included (they would move in training mode).
    assert any("running_mean" in k for k in before)
    with pytest.raises(InputError, match="no order head"):
        build_model(tiny_config()).train_only_order_head()


def test_exported_back_ends_carry_the_masks_not_the_head():
    """Fixed-size graphs (TorchScript here; ONNX the same way) are traced for the masks
    only: with them the order is decided from the mask probabilities."""
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    model = order_model(box_score_thresh=0.0)
    eager = Predictor(model, device="cpu")(image)
    traced = Predictor(model, device="cpu", backend="torchscript")(image)
    assert eager.order is not None and eager.order.shape == (len(eager), len(eager))
    assert traced.order is None and len(traced) == len(eager)
