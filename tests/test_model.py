"""ORCNN model: variants, gradients, shapes, mask targets, config (tiny sizes, CPU)."""

import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project
from torchvision.models.detection.roi_heads import RoIHeads

from orcnn_core.config import VARIANTS, ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.model import build_model, image_mask_targets, project_masks_on_boxes
from orcnn_core.weights import build_from_file, save_weights
from tiny_models import tiny_config, tiny_model

ALL_MASK_LOSSES = {"loss_amodal_mask", "loss_visible_mask", "loss_invisible_mask"}
BOX_RPN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def sample(pad=8, size=64):
    """A square image with two objects: object 1 partly under object 0 and object 0 cut
    by the left image border (its amodal mask reaches into the padding)."""
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    canvas = size + 2 * pad
    amodal = torch.zeros(2, canvas, canvas, dtype=torch.uint8)
    amodal[0, pad + 10:pad + 40, pad - 6:pad + 30] = 1  # x from -6: truncated
    amodal[1, pad + 20:pad + 60, pad + 20:pad + 56] = 1
    visible = amodal.clone()
    visible[0, :, :pad] = 0  # outside the image nothing is visible
    visible[1] &= 1 - amodal[0]  # object 0 lies on object 1
    target = {"boxes": torch.tensor([[-6.0, 10.0, 30.0, 40.0], [20.0, 20.0, 56.0, 60.0]]),
              "labels": torch.tensor([1, 2]),
              "amodal_masks": amodal, "visible_masks": visible, "mask_padding": pad}
    return image, target


def empty_sample(size=64):
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(2))
    return image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                   "amodal_masks": torch.zeros(0, size, size, dtype=torch.uint8),
                   "visible_masks": torch.zeros(0, size, size, dtype=torch.uint8)}


def train_losses(cfg, samples=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    samples = samples or [sample()]
    losses = model([s[0] for s in samples], [s[1] for s in samples])
    return model, losses


# ------------------------------------------------------------------------------ variants
EXPECTED_MASK_LOSSES = {
    "orcnn": ALL_MASK_LOSSES,
    "amodal_mrcnn": {"loss_amodal_mask"},
    "orcnn_no_invisible_loss": {"loss_amodal_mask", "loss_visible_mask"},
    "orcnn_no_visible_loss": {"loss_amodal_mask", "loss_invisible_mask"},
    "orcnn_independent": ALL_MASK_LOSSES,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_keys_per_variant(variant):
    _, losses = train_losses(tiny_config(variant=variant))
    assert set(losses) == BOX_RPN_LOSSES | EXPECTED_MASK_LOSSES[variant]
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    # Ground-truth boxes join the proposals, so there are foreground RoIs: mask losses > 0.
    assert losses["loss_amodal_mask"].item() > 0


def test_amodal_mrcnn_has_no_visible_head_and_predicts_visible_as_amodal():
    model = tiny_model(variant="amodal_mrcnn", box_score_thresh=0.0).eval()
    assert not any("visible" in k for k in model.state_dict())
    with torch.no_grad():
        out = model([sample()[0]])[0]
    assert len(out["boxes"]) > 0
    assert torch.equal(out["visible_mask_logits"], out["amodal_mask_logits"])


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _param_groups(model):
    rh = model.roi_heads
    return {
        "amodal head": [p for m in (rh.amodal_mask_head, rh.amodal_mask_predictor)
                        for p in m.parameters()],
        "visible head": [p for m in (rh.visible_mask_head, rh.visible_mask_predictor)
                         for p in m.parameters()],
        "backbone": [p for p in model.backbone.parameters() if p.requires_grad],
    }


def test_independent_variant_stops_visible_and_invisible_gradients():
    model, losses = train_losses(tiny_config(variant="orcnn_independent"))
    groups = _param_groups(model)
    assert groups["backbone"], "the tiny config trains the backbone"
    vis_inv = losses["loss_visible_mask"] + losses["loss_invisible_mask"]
    for name in ("amodal head", "backbone"):
        assert all(torch.count_nonzero(g) == 0 for g in _grads(vis_inv, groups[name])), name
    assert any(torch.count_nonzero(g) > 0 for g in _grads(vis_inv, groups["visible head"]))
    for name in ("amodal head", "backbone"):
        grads = _grads(losses["loss_amodal_mask"], groups[name])
        assert any(torch.count_nonzero(g) > 0 for g in grads), name


def test_orcnn_visible_and_invisible_losses_reach_shared_features():
    # The contrast to the test above: in plain ORCNN both losses train everything.
    model, losses = train_losses(tiny_config(variant="orcnn"))
    groups = _param_groups(model)
    vis_inv = losses["loss_visible_mask"] + losses["loss_invisible_mask"]
    for name in ("amodal head", "backbone", "visible head"):
        assert any(torch.count_nonzero(g) > 0 for g in _grads(vis_inv, groups[name])), name
    # Without L_V the visible head still learns, through L_IV only.
    model, losses = train_losses(tiny_config(variant="orcnn_no_visible_loss"))
    grads = _grads(losses["loss_invisible_mask"], _param_groups(model)["visible head"])
    assert any(torch.count_nonzero(g) > 0 for g in grads)


@pytest.mark.parametrize("shared", [2, 4])
def test_shared_mask_trunk_feeds_both_heads(shared, tmp_path):
    separate = build_model(tiny_config())
    torch.manual_seed(0)
    model = build_model(tiny_config(visible_head_shared_convs=shared))
    rh = model.roi_heads
    trunk_size = sum(p.numel() for layer in list(rh.amodal_mask_head)[:shared]
                     for p in layer.parameters())
    assert sum(p.numel() for p in separate.parameters()) \
        - sum(p.numel() for p in model.parameters()) == trunk_size
    assert len(rh.visible_mask_head) == 4 - shared
    # Reference: the amodal head's first layers, then each branch, composed by hand.
    model.eval()
    features = {"0": torch.rand(1, model.backbone.out_channels, 16, 16)}
    boxes, shapes = [torch.tensor([[1.0, 2.0, 40.0, 50.0]])], [(64, 64)]
    with torch.no_grad():
        amodal, visible = rh.mask_logits(features, boxes, shapes)
        trunk = rh.mask_roi_pool(features, boxes, shapes)
        for layer in list(rh.amodal_mask_head)[:shared]:
            trunk = layer(trunk)
        branch = trunk
        for layer in list(rh.amodal_mask_head)[shared:]:
            branch = layer(branch)
        assert torch.equal(amodal, rh.amodal_mask_predictor(branch))
        assert torch.equal(visible, rh.visible_mask_predictor(rh.visible_mask_head(trunk)))
    # Both visible losses train the shared layers (they are the amodal head's first ones).
    model.train()
    losses = model(*zip(sample()))
    vis_inv = losses["loss_visible_mask"] + losses["loss_invisible_mask"]
    trunk_params = [p for layer in list(rh.amodal_mask_head)[:shared] for p in layer.parameters()]
    assert all(torch.count_nonzero(g) > 0 for g in _grads(vis_inv, trunk_params))
    # A separate-head model's weights fill the visible head's own layers in their places.
    missing, unexpected = model.load_state_dict(separate.state_dict(), strict=False)
    assert not missing
    assert sorted({k.split(".")[2] for k in unexpected}) == [str(i) for i in range(shared)]
    for i in range(shared, 4):
        assert torch.equal(getattr(rh.visible_mask_head, str(i))[0].weight,
                           separate.roi_heads.visible_mask_head[i][0].weight)
    for variant in ("amodal_mrcnn", "orcnn_independent"):
        with pytest.raises(InputError, match="visible_head_shared_convs"):
            tiny_config(variant=variant, visible_head_shared_convs=shared)
    # A weights file rebuilds the same layout.
    rebuilt = build_from_file(save_weights(model, model.config, tmp_path / "shared.safetensors"))
    assert rebuilt.config.visible_head_shared_convs == shared
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("agnostic", [False, True])
def test_mask_head_shapes_and_inference_outputs(agnostic):
    model = tiny_model(class_agnostic_masks=agnostic, box_score_thresh=0.0)
    cfg = model.config
    channels = 1 if agnostic else cfg.num_classes
    for head in ("amodal", "visible"):
        predictor = getattr(model.roi_heads, f"{head}_mask_predictor")
        assert predictor.mask_fcn_logits.out_channels == channels
    losses = model(*zip(sample()))
    assert set(losses) >= ALL_MASK_LOSSES
    model.eval()
    image = torch.rand(3, 48, 80)
    with torch.no_grad():
        out = model([image, image[:, :40, :60]])
    for det in out:
        d = det["boxes"].shape[0]
        assert 0 < d <= cfg.box_detections_per_img
        assert det["labels"].shape == det["scores"].shape == (d,)
        m = 2 * cfg.mask_roi_size
        assert det["amodal_mask_logits"].shape == det["visible_mask_logits"].shape == (d, m, m)
        assert "masks" not in det  # nothing pasted into the full image


def test_empty_targets_train():
    cfg = tiny_config()
    _, losses = train_losses(cfg, samples=[empty_sample()])
    assert set(losses) == BOX_RPN_LOSSES | ALL_MASK_LOSSES
    for name in ALL_MASK_LOSSES | {"loss_box_reg", "loss_rpn_box_reg"}:
        assert losses[name].item() == 0.0, name
    assert losses["loss_classifier"].item() > 0  # all RoIs are background, still learnt
    sum(losses.values()).backward()
    # A batch mixing an empty image with a full one trains too.
    _, losses = train_losses(cfg, samples=[empty_sample(), sample()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_amodal_mask"].item() > 0


def test_target_shape_errors_name_the_problem():
    model = build_model(tiny_config())
    image, target = sample()
    target["visible_masks"] = target["visible_masks"][:, :-1]
    with pytest.raises(InputError, match=r"target 0: visible_masks must be .*mask_padding 8"):
        model([image], [target])
    image, target = sample()
    target["mask_padding"] = 0
    with pytest.raises(InputError, match="amodal_masks"):
        model([image], [target])


# ------------------------------------------------------------------------------ mask targets
def test_project_masks_equals_torchvision_on_whole_canvas():
    g = torch.Generator().manual_seed(0)
    amodal = (torch.rand(3, 50, 70, generator=g) > 0.4).to(torch.uint8)
    visible = amodal & (torch.rand(3, 50, 70, generator=g) > 0.5).to(torch.uint8)
    xy = torch.rand(12, 2, generator=g) * torch.tensor([60.0, 40.0]) - 5
    wh = torch.rand(12, 2, generator=g) * 20 + 1
    rois = torch.cat([xy, xy + wh], 1)
    matched = torch.tensor([0, 2, 2, 0, 2, 0, 2, 2, 0, 0, 2, 2])  # instance 1 unused
    out = project_masks_on_boxes(amodal, visible, rois, matched, 14)
    assert out.shape == (12, 3, 14, 14)
    invisible = amodal * (1 - visible)
    for channel, masks in enumerate((amodal, visible, invisible)):
        expected = tv_project(masks, rois, matched, 14)  # torchvision's, whole canvas
        torch.testing.assert_close(out[:, channel], expected, rtol=0, atol=1e-4)


def test_image_mask_targets_map_rois_to_original_padded_canvas():
    # Original image 40 x 40 with padding 10; the network saw it resized to 80 x 80. An
    # object is the square x in [-10, 10), y in [5, 25) of the image: half outside it.
    pad = 10
    amodal = torch.zeros(1, 60, 60, dtype=torch.uint8)
    amodal[0, pad + 5:pad + 25, 0:pad + 10] = 1
    visible = amodal.clone()
    visible[0, :, :pad] = 0
    target = {"amodal_masks": amodal, "visible_masks": visible, "mask_padding": pad}
    roi_resized = torch.tensor([[-20.0, 10.0, 20.0, 50.0]])  # the square, at scale 2
    out = image_mask_targets(target, roi_resized, torch.tensor([0]), (80, 80), (40, 40), 4)
    # On the canvas the square is x in [0, 20), y in [15, 35).
    canvas_roi = torch.tensor([[0.0, 15.0, 20.0, 35.0]])
    for channel, masks in enumerate((amodal, visible, amodal * (1 - visible))):
        expected = tv_project(masks, canvas_roi, torch.tensor([0]), 4)
        torch.testing.assert_close(out[:, channel], expected, rtol=0, atol=1e-5)
    amodal_t, visible_t, invisible_t = out[0]
    # Away from the edges (RoIAlign with aligned=False samples half a pixel off, as in
    # torchvision): amodal everywhere, visible only right of the image border at column 2.
    assert (amodal_t[:3, :3] == 1).all()
    assert (visible_t[:, 0] == 0).all() and (visible_t[:3, 2] == 1).all()
    assert (invisible_t[:, 0] == amodal_t[:, 0]).all() and (invisible_t[:, 2:] == 0).all()


# ------------------------------------------------------------------------------ boxes
def test_postprocess_keeps_amodal_boxes_beyond_the_image():
    model = build_model(tiny_config(box_score_thresh=0.0, box_clip_margin=0.5))
    heads = model.roi_heads
    proposals = [torch.tensor([[2.0, 5.0, 30.0, 40.0], [2.0, 5.0, 30.0, 40.0]])]
    class_logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    deltas = torch.zeros(2, 12)
    # Box coder weights (10, 10, 5, 5): dx = 10 * shift / width. Class 1 of proposal 0
    # moves 10 px left (to x = -8); class 2 of proposal 1 moves 40 px left (to x = -38),
    # past the margin of 0.5 * 64 = 32 px.
    deltas[0, 4] = 10 * -10 / 28
    deltas[1, 8] = 10 * -40 / 28
    boxes, scores, labels = heads.postprocess_detections(class_logits, deltas, proposals,
                                                         [(64, 64)])
    by_label = {int(lab): b for b, lab, s in zip(boxes[0], labels[0], scores[0]) if s > 0.5}
    torch.testing.assert_close(by_label[1], torch.tensor([-8.0, 5.0, 20.0, 40.0]))
    torch.testing.assert_close(by_label[2], torch.tensor([-32.0, 5.0, -10.0, 40.0]))
    # torchvision's own post-processing would have clipped the first box at x = 0.
    tv_boxes = RoIHeads.postprocess_detections(heads, class_logits, deltas, proposals,
                                               [(64, 64)])[0][0]
    assert tv_boxes[:, 0].min().item() == 0.0


# ------------------------------------------------------------------------------ config
def test_config_round_trip_and_errors():
    cfg = tiny_config(variant="orcnn_independent", class_agnostic_masks=True)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again.anchor_sizes, tuple)
    with pytest.raises(InputError, match="unknown key.*mask_head_width"):
        ModelConfig.from_dict({**cfg.to_dict(), "mask_head_width": 3})
    with pytest.raises(InputError, match="variant"):
        ModelConfig(variant="orcnn_plus")
    with pytest.raises(InputError, match="class_names"):
        ModelConfig(num_classes=3, class_names=["a"])
    with pytest.raises(InputError, match="anchor_sizes"):
        ModelConfig(anchor_sizes=(32, 64))
    with pytest.raises(InputError, match="box_nms_thresh"):
        ModelConfig(box_nms_thresh=1.5)
    with pytest.raises(InputError, match="weights.yaml: backbone"):
        ModelConfig.from_dict({"backbone": "vgg16"}, source="weights.yaml")
    paper = ModelConfig()
    assert (paper.box_batch_size_per_image, paper.min_size, paper.max_size) == (256, 800, 1111)
