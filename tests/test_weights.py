"""Weights files: safetensors round trip, refusal of bad files, COCO Mask R-CNN init."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.detection import maskrcnn_resnet50_fpn

from orcnn_core.config import ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.model import build_model
from orcnn_core.predictor import Predictor
from orcnn_core.weights import (
    build_from_file,
    init_from_maskrcnn_state_dict,
    load_weights,
    save_weights,
)
from helpers import CreatesFile
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model and its weights file."""
    model = tiny_model(box_score_thresh=0.0).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(model, model.config, path)
    return model, model.config, path


def test_round_trip_gives_identical_outputs(saved):
    model, cfg, path = saved
    loaded_cfg, state = load_weights(path)
    assert loaded_cfg == cfg
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)

    rebuilt = build_from_file(path)
    assert not rebuilt.training
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model([image])[0], rebuilt([image])[0]
    assert len(a["boxes"]) > 0 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    image_np = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    p1, p2 = Predictor(model, device="cpu")(image_np), Predictor.from_file(path, "cpu")(image_np)
    assert np.array_equal(p1.boxes, p2.boxes) and np.array_equal(p1.rois, p2.rois)
    assert all(np.array_equal(c1, c2) for c1, c2 in zip(p1.crops, p2.crops))


def test_pickle_is_refused_without_unpickling(saved, tmp_path):
    model, _, _ = saved
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(InputError, match=rf"{path}: not a safetensors file .*pickle.*refusing"):
        load_weights(path)

    # A pickle that would create a file when unpickled: it must never run.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(CreatesFile(marker), protocol=4))
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_weights(evil)
    with pytest.raises(InputError, match="evil.safetensors"):
        init_from_maskrcnn_state_dict(model, evil, verbose=False)
    assert not marker.exists()


def test_truncated_and_corrupt_files(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{truncated}: truncated safetensors file"):
        load_weights(truncated)
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[:40])
    with pytest.raises(InputError, match=rf"{cut_header}: truncated"):
        load_weights(cut_header)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a weights file at all" * 10)
    with pytest.raises(InputError, match=rf"{garbage}: not a safetensors file"):
        load_weights(garbage)
    bad_json = tmp_path / "bad_json.safetensors"
    header_len = int.from_bytes(data[:8], "little")
    bad_json.write_bytes(data[:8] + b"{" + b"\x00" * (header_len - 1) + data[8 + header_len:])
    with pytest.raises(InputError, match=rf"{bad_json}: corrupt safetensors header"):
        load_weights(bad_json)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_weights(empty)
    with pytest.raises(InputError, match="no such file"):
        load_weights(tmp_path / "missing.safetensors")


def test_missing_metadata_and_other_architecture(saved, tmp_path):
    model, cfg, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with pytest.raises(InputError, match=rf"{plain}: safetensors file without ORCNN metadata"):
        load_weights(plain)

    def write(config, name):
        path = tmp_path / name
        metadata = {"format": "orcnn", "orcnn_config": json.dumps(config.to_dict())}
        save_file(state, str(path), metadata=metadata)
        return path

    other = write(cfg.replace(variant="amodal_mrcnn"), "amodal.safetensors")
    with pytest.raises(InputError, match=r"another architecture.*unexpected "
                                         r"roi_heads\.visible_mask_head"):
        load_weights(other)
    classes = write(cfg.replace(num_classes=4, class_names=["a", "b", "c"]), "k4.safetensors")
    with pytest.raises(InputError, match=r"wrong shape roi_heads\.box_predictor\.cls_score"):
        load_weights(classes)
    bad_cfg = tmp_path / "bad_cfg.safetensors"
    save_file(state, str(bad_cfg), metadata={"format": "orcnn",
                                             "orcnn_config": '{"backbone": "vgg"}'})
    with pytest.raises(InputError, match=rf"{bad_cfg}: orcnn_config: backbone"):
        load_weights(bad_cfg)
    # Saving refuses a state that does not fit the config.
    with pytest.raises(InputError, match="another architecture"):
        save_weights(model, cfg.replace(class_agnostic_masks=True), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_init_from_torchvision_maskrcnn_state_dict(tmp_path, capsys):
    """The paper's COCO initialisation, through a real torchvision Mask R-CNN file."""
    torch.manual_seed(0)
    source_model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)  # 91 classes
    source = source_model.state_dict()
    path = tmp_path / "maskrcnn_coco.pth"
    torch.save(source, path)
    del source_model

    model = build_model(ModelConfig(num_classes=3, class_names=["a", "b"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_maskrcnn_state_dict(model, path)
    after = model.state_dict()

    for key in ("backbone.body.conv1.weight", "backbone.body.layer4.2.conv3.weight",
                "backbone.fpn.layer_blocks.3.0.weight", "rpn.head.cls_logits.weight",
                "roi_heads.box_head.fc7.weight"):
        assert torch.equal(after[key], source[key]), key
        assert key in report.loaded
    for head in ("amodal", "visible"):
        for suffix in ("_head.0.0.weight", "_head.3.0.bias", "_predictor.conv5_mask.weight"):
            src_key = "roi_heads.mask" + suffix
            assert torch.equal(after[f"roi_heads.{head}_mask{suffix}"], source[src_key])
            assert (src_key, f"roi_heads.{head}_mask{suffix}") in report.copied
    # Class-specific outputs (91 COCO classes vs 3) keep their fresh initialisation.
    for key in ("roi_heads.box_predictor.cls_score.weight",
                "roi_heads.box_predictor.bbox_pred.weight",
                "roi_heads.amodal_mask_predictor.mask_fcn_logits.weight",
                "roi_heads.visible_mask_predictor.mask_fcn_logits.weight"):
        assert torch.equal(after[key], before[key]), key
        assert key in report.initialised
    skipped = dict(report.skipped)
    assert "re-initialised" in skipped["roi_heads.box_predictor.cls_score.weight"]
    assert "re-initialised" in skipped["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    # torchvision's untrained model uses BatchNorm; ORCNN freezes it (no batch counter).
    assert skipped["backbone.body.bn1.num_batches_tracked"] == "not in this model"
    printed = capsys.readouterr().out
    assert f"init from {path}" in printed and "copied 20 keys" in printed
    assert "roi_heads.mask_head.0.0.weight -> roi_heads.visible_mask_head.0.0.weight" in printed


def test_init_accepts_safetensors_and_legacy_torchvision_names(tmp_path):
    # torchvision's COCO_V1 download predates the current key names.
    model = tiny_model(box_score_thresh=0.0)
    state = model.state_dict()
    legacy = {
        "roi_heads.mask_head.mask_fcn1.weight":
            torch.randn_like(state["roi_heads.amodal_mask_head.0.0.weight"]),
        "rpn.head.conv.weight": torch.randn_like(state["rpn.head.conv.0.0.weight"]),
        "roi_heads.keypoint_head.weight": torch.zeros(3),
    }
    path = tmp_path / "legacy.safetensors"
    save_file(legacy, str(path))
    report = init_from_maskrcnn_state_dict(model, path, verbose=False)
    after = model.state_dict()
    src = legacy["roi_heads.mask_head.mask_fcn1.weight"]
    assert torch.equal(after["roi_heads.amodal_mask_head.0.0.weight"], src)
    assert torch.equal(after["roi_heads.visible_mask_head.0.0.weight"], src)
    assert torch.equal(after["rpn.head.conv.0.0.weight"], legacy["rpn.head.conv.weight"])
    assert report.loaded == ["rpn.head.conv.0.0.weight"]
    assert dict(report.skipped) == {"roi_heads.keypoint_head.weight": "not in this model"}


# ------------------------------------------------------------------ files from elsewhere
def _write_pickle(kind, payload, path):
    if kind == "torch.save":
        torch.save({"model": payload}, path)
    elif kind == "torch.save legacy":
        torch.save({"model": payload}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(kind.split()[-1])))


@pytest.mark.parametrize("kind", ["torch.save", "torch.save legacy", "pickle protocol 0",
                                  "pickle protocol 2", "pickle protocol 5"])
def test_pickles_that_would_run_code_are_refused_by_every_loader(saved, tmp_path, kind):
    model, _, _ = saved
    marker = tmp_path / "code_was_run"
    path = tmp_path / "evil.safetensors"
    _write_pickle(kind, CreatesFile(marker), path)
    for load in (load_weights, build_from_file, lambda p: Predictor.from_file(p, "cpu")):
        with pytest.raises(InputError, match=rf"^{path}: not a safetensors file"):
            load(path)
    # The COCO initialisation reads torchvision .pth files, with weights_only=True.
    with pytest.raises(InputError, match=rf"^{path}: (refused|not a safetensors file)"):
        init_from_maskrcnn_state_dict(model, path, verbose=False)
    assert not marker.exists()


def _rewrite_header(src, dst, edit):
    """Copy a safetensors file with its JSON header changed by ``edit(header)``."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the alignment safetensors' own writer keeps
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return dst


def _edit_config(**changes):
    def edit(header):
        config = json.loads(header["__metadata__"]["orcnn_config"])
        config.update(changes)
        header["__metadata__"]["orcnn_config"] = json.dumps(config)
    return edit


def _set_metadata(key, value):
    def edit(header):
        header["__metadata__"][key] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_set_metadata("orcnn_config", '{"backbone": '), "orcnn_config metadata is not valid JSON"),
    (_set_metadata("orcnn_config", "[" * 100000), "orcnn_config metadata is not valid JSON"),
    (_set_metadata("orcnn_config", "[1, 2]"), "orcnn_config: expected a mapping, got list"),
    (_set_metadata("orcnn_config", {"backbone": "resnet18_fpn"}),
     r"corrupt safetensors header \(__metadata__ must map names to strings\)"),
    (_set_metadata("format", "detectron2"), "safetensors file without ORCNN metadata"),
    (_edit_config(min_size=10 ** 9, max_size=10 ** 9),
     "orcnn_config: min_size 1000000000 is implausible"),
    (_edit_config(box_detections_per_img=10 ** 9),
     "orcnn_config: box_detections_per_img 1000000000 is implausible"),
    (_edit_config(image_mean=[float("nan")] * 3),
     r"orcnn_config: image_mean \[nan, nan, nan\] is implausible"),
    (_edit_config(anchor_aspect_ratios=[0.5, float("inf")]),
     "orcnn_config: anchor_aspect_ratios .* is implausible"),
    (_edit_config(num_classes=-1), "orcnn_config: num_classes must be >= 2"),
    (_edit_config(mask_head_channels=32), r"wrong shape roi_heads\.amodal_mask_head"),
    (_edit_config(backdoor="x"), r"orcnn_config: unknown key\(s\) backdoor"),
], ids=["cut JSON", "deep JSON", "JSON list", "config not a string", "other format",
        "huge min_size", "huge detections", "NaN mean", "inf aspect ratio", "num_classes -1",
        "other head width", "unknown key"])
def test_edited_metadata_is_refused_naming_what_is_wrong(saved, tmp_path, edit, expected):
    _, _, path = saved
    edited = _rewrite_header(path, tmp_path / "edited.safetensors", edit)
    with pytest.raises(InputError, match=rf"^{edited}: .*{expected}"):
        load_weights(edited)


def test_the_header_rewrite_itself_keeps_a_loadable_file(saved, tmp_path):
    """Reference for the test above: an unchanged rewrite loads with equal tensors."""
    model, cfg, path = saved
    same = _rewrite_header(path, tmp_path / "same.safetensors", lambda header: None)
    loaded_cfg, state = load_weights(same)
    assert loaded_cfg == cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _foreign(state, change):
    state = dict(state)
    key = "roi_heads.box_predictor.cls_score.weight"
    if change == "extra key":
        state["roi_heads.extra_head.weight"] = torch.zeros(3)
    elif change == "missing key":
        del state[key]
    elif change == "wrong shape":
        state[key] = torch.zeros(7, 7)
    elif change == "float64":
        state[key] = state[key].double()
    elif change == "int32":
        state[key] = state[key].to(torch.int32)
    elif change == "nan":
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
    elif change == "inf":
        state[key] = state[key].clone()
        state[key][0, 0] = float("-inf")
    return state


@pytest.mark.parametrize("change, expected", [
    ("extra key", r"unexpected roi_heads\.extra_head\.weight"),
    ("missing key", r"missing roi_heads\.box_predictor\.cls_score\.weight"),
    ("wrong shape", r"wrong shape roi_heads\.box_predictor\.cls_score\.weight \(7, 7\) "
                    r"\(expected \(3, 64\)\)"),
    ("float64", r"wrong dtype roi_heads\.box_predictor\.cls_score\.weight float64 \(expected "
                r"float32 or float16 or bfloat16\)"),
    ("int32", r"wrong dtype roi_heads\.box_predictor\.cls_score\.weight int32"),
    ("nan", r"NaN or inf values: roi_heads\.box_predictor\.cls_score\.weight"),
    ("inf", r"NaN or inf values: roi_heads\.box_predictor\.cls_score\.weight"),
], ids=["extra key", "missing key", "wrong shape", "float64", "int32", "nan", "inf"])
def test_foreign_tensors_are_refused_naming_the_tensor(saved, tmp_path, change, expected):
    model, cfg, _ = saved
    state = _foreign({k: v.contiguous() for k, v in model.state_dict().items()}, change)
    path = tmp_path / f"{change.replace(' ', '_')}.safetensors"
    save_file(state, str(path), metadata={"format": "orcnn",
                                          "orcnn_config": json.dumps(cfg.to_dict())})
    with pytest.raises(InputError, match=rf"^{path}: .*{expected}"):
        load_weights(path)
    # save_weights applies the same checks: such a file is never written by this code.
    with pytest.raises(InputError, match=expected):
        save_weights(state, cfg, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()


def test_float16_storage_is_accepted(saved, tmp_path):
    model, cfg, _ = saved
    path = save_weights(model, cfg, tmp_path / "half.safetensors", dtype=torch.float16)
    _, state = load_weights(path)
    reference = model.state_dict()
    assert all(state[k].dtype == torch.float16 for k in reference)
    assert all(torch.allclose(state[k].float(), reference[k], rtol=1e-3, atol=1e-3)
               for k in reference)


def test_plausible_values_that_combine_into_a_huge_allocation_are_refused(saved, tmp_path):
    """Each value within PLAUSIBLE_MAX, together beyond MAX_ALLOCATION_BYTES: refused with
    one line naming the values; each of them alone still loads (the reference)."""
    from orcnn_core.weights import MAX_ALLOCATION_BYTES, PLAUSIBLE_MAX, largest_allocation

    _, cfg, path = saved
    detections = PLAUSIBLE_MAX["box_detections_per_img"]
    roi = PLAUSIBLE_MAX["mask_roi_size"]
    for k, change in enumerate(({"box_detections_per_img": detections},
                                {"mask_roi_size": roi},
                                {"min_size": 4096, "max_size": 4096})):
        alone = _rewrite_header(path, tmp_path / f"alone{k}.safetensors", _edit_config(**change))
        assert load_weights(alone)[0] == ModelConfig.from_dict({**cfg.to_dict(), **change})
    both = _rewrite_header(path, tmp_path / "both.safetensors", _edit_config(
        box_detections_per_img=detections, mask_roi_size=roi))
    # By hand: 2 heads x 10000 detections x 16 channels x 256 x 256 float32 = 78.1 GiB.
    expected = 2 * detections * cfg.mask_head_channels * (2 * roi) ** 2 * 4
    assert largest_allocation(ModelConfig.from_dict({**cfg.to_dict(), "mask_roi_size": roi,
                                                     "box_detections_per_img": detections}))[0] \
        == expected > MAX_ALLOCATION_BYTES
    with pytest.raises(InputError) as info:
        load_weights(both)
    message = str(info.value)
    assert message == (f"{both}: orcnn_config: box_detections_per_img 10000, mask_head_channels "
                       f"16, mask_roi_size 128 would need about {expected / 2**30:.1f} GiB for "
                       f"the detections' mask features of one image (at most 2 GiB)")
    # Large frames and many proposals of a wide FPN (refused before its tensors are read):
    # 100000 x 256 x 7 x 7 float32 = 4.7 GiB, more than the finest map's 4.0 GiB.
    proposals = _rewrite_header(path, tmp_path / "proposals.safetensors", _edit_config(
        min_size=8192, max_size=8192, rpn_pre_nms_top_n_test=100_000,
        rpn_post_nms_top_n_test=100_000, fpn_channels=256))
    with pytest.raises(InputError, match=r"orcnn_config: rpn_post_nms_top_n_test 100000, "
                                         r"fpn_channels 256 would need about 4\.7 GiB for "
                                         r"the proposals' box features of one image"):
        load_weights(proposals)
    # Large frames alone: the backbone's first map (stride 2, 64 channels) of an 8192 x 8192
    # input is 4 GiB (torch's allocator failed on it with a traceback before this check).
    large = _rewrite_header(path, tmp_path / "large.safetensors", _edit_config(
        min_size=8192, max_size=8192))
    with pytest.raises(InputError, match=r"orcnn_config: min_size 8192, max_size 8192 would "
                                         r"need about 4\.0 GiB for the backbone's first "
                                         r"feature map of one image"):
        load_weights(large)
