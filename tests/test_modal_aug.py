"""Modal augmentation: pasted objects, the visible masks they cover, dropped hidden objects."""

import json
import subprocess

import cv2
import numpy as np
import pytest

from orcnn_core.data import load_dataset, write_amodal_coco
from orcnn_core.masks import encode
from orcnn_core.modal_aug import ModalObject, extract_objects, paste_objects
from orcnn_core.synth import SynthConfig, flat_colour, generate_samples
from orcnn_core.train_config import ModalAugConfig, SynthDataConfig
from orcnn_core.training import SynthScenes, _TrainingSet, sample_to_tensors
from helpers import assert_same_arrays
from tiny_models import train_config, write_train_config

MAGENTA = (255, 0, 255)  # no flat-shaded synth object or background has this colour


def flat_targets(n, seed=3):
    cfg = SynthConfig(width=96, height=72, flat_shading=True)
    return list(generate_samples(n, seed, cfg))


def triangle_source(h=34, w=46):
    """A right triangle (not symmetric, so flips show) in a unique colour."""
    mask = np.tril(np.ones((h, w), np.uint8), k=(w - h))
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = MAGENTA
    return ModalObject(image, mask, label=2)


def test_single_paste_against_reference():
    """One paste: everything follows from where its colour shows in the image."""
    source = triangle_source()
    thr, min_px = 0.5, 20
    seen = {"dropped": 0, "related": 0, "pasted_dropped": 0}
    for seed, target in enumerate(flat_targets(40)):
        out = paste_objects(target, [source], np.random.default_rng(seed), max_objects=1,
                            min_visible_fraction=thr, min_visible_pixels=min_px)
        p = target.mask_padding
        painted = (out.image == MAGENTA).all(-1)
        np.testing.assert_array_equal(out.image[~painted], target.image[~painted])
        pasted_img = np.pad(painted, p).astype(np.uint8)
        assert pasted_img.any()

        # Originals: kept ones by annotation id, visible minus the paste.
        index = {a: k for k, a in enumerate(out.annotation_ids.tolist())}
        kept_old = []
        for i, ann_id in enumerate(target.annotation_ids.tolist()):
            ref = target.visible_masks[i] & (1 - pasted_img)
            touched = (ref != target.visible_masks[i]).any()
            keep = not touched or ref.sum() >= max(min_px, thr * target.amodal_masks[i].sum())
            assert (ann_id in index) == keep
            if not keep:
                seen["dropped"] += 1
                continue
            kept_old.append(i)
            k = index[ann_id]
            np.testing.assert_array_equal(out.visible_masks[k], ref)
            np.testing.assert_array_equal(out.amodal_masks[k], target.amodal_masks[i])
            np.testing.assert_array_equal(out.boxes[k], target.boxes[i])
            assert out.labels[k] == target.labels[i]

        new = [k for a, k in index.items() if a not in set(target.annotation_ids.tolist())]
        if not new:  # the paste itself was left (almost) hidden outside the image
            seen["pasted_dropped"] += 1
            assert pasted_img.sum() < max(min_px, thr * source.mask.sum())
            continue
        (k,) = new
        assert out.labels[k] == 2
        amodal = out.amodal_masks[k]
        rows, cols = np.flatnonzero(amodal.any(1)), np.flatnonzero(amodal.any(0))
        crop = amodal[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert (crop == source.mask).all() or (crop == source.mask[:, ::-1]).all()
        np.testing.assert_array_equal(out.crop_to_image(out.visible_masks)[k], painted)
        np.testing.assert_array_equal(out.boxes[k], [cols[0] - p, rows[0] - p,
                                                     cols[-1] + 1 - p, rows[-1] + 1 - p])
        expected = {(index[target.annotation_ids[a]], index[target.annotation_ids[b]])
                    for a, b in target.occlusion_relations.tolist()
                    if a in kept_old and b in kept_old}
        for i in kept_old:
            if (target.amodal_masks[i] & amodal).any():
                expected.add((k, index[target.annotation_ids[i]]))
                seen["related"] += 1
        assert set(map(tuple, out.occlusion_relations.tolist())) == expected
    assert seen["dropped"] and seen["related"] > 10


def test_several_pastes_keep_ground_truth_consistent():
    sources = [triangle_source(), triangle_source(20, 12)]
    for seed, target in enumerate(flat_targets(15, seed=8)):
        out = paste_objects(target, sources, np.random.default_rng(seed), max_objects=4,
                            min_visible_fraction=0.1)
        assert not (out.visible_masks & (1 - out.amodal_masks)).any()
        if len(out):
            assert out.visible_masks.sum(0).max() <= 1
        p = out.mask_padding
        assert not out.visible_masks[:, :p].any() and not out.visible_masks[:, :, -p:].any()
        # Every relation pairs overlapping amodal masks, the upper one hiding the lower.
        for a, b in out.occlusion_relations.tolist():
            overlap = out.amodal_masks[a] & out.amodal_masks[b]
            assert overlap.any() and not (overlap & out.visible_masks[b]).any()


def test_deterministic_for_the_rng():
    target = flat_targets(1)[0]
    sources = [triangle_source()]
    a = paste_objects(target, sources, np.random.default_rng(1), max_objects=3)
    b = paste_objects(target, sources, np.random.default_rng(1), max_objects=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.visible_masks, b.visible_masks)
    np.testing.assert_array_equal(a.occlusion_relations, b.occlusion_relations)
    others = [paste_objects(target, sources, np.random.default_rng(s), max_objects=3)
              for s in range(2, 6)]
    assert any((o.image != a.image).any() for o in others)
    assert target.image is not a.image and (target.image == flat_targets(1)[0].image).all()


def modal_coco(tmp_path):
    """A modal COCO file: a whole mug, and a plate cut by the image border."""
    h, w = 40, 60
    img = np.zeros((h, w, 3), np.uint8)
    mug = np.zeros((h, w), np.uint8)
    mug[10:25, 20:32] = 1
    plate = np.zeros((h, w), np.uint8)
    plate[0:12, 40:60] = 1
    img[mug == 1] = (30, 200, 30)  # BGR on disk
    img[plate == 1] = (200, 30, 30)
    cv2.imwrite(str(tmp_path / "m.png"), img)
    obj = {"images": [{"id": 1, "file_name": "m.png", "width": w, "height": h}],
           "categories": [{"id": 47, "name": "cup"}, {"id": 60, "name": "plate"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 47, "segmentation": encode(mug),
                "bbox": [20, 10, 12, 15], "iscrowd": 0},
               {"id": 2, "image_id": 1, "category_id": 60, "segmentation": encode(plate),
                "bbox": [40, 0, 20, 12], "iscrowd": 0}]}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(obj))
    return path, mug


def test_extract_whole_objects_from_modal_coco(tmp_path):
    path, mug = modal_coco(tmp_path)
    (sample,) = load_dataset(path)
    (obj,) = extract_objects(sample)  # the plate touches the border
    assert obj.label == 1
    np.testing.assert_array_equal(obj.mask, mug[10:25, 20:32])
    assert (obj.image == (30, 200, 30)[::-1]).all()


def test_extract_skips_occluded_and_truncated_synth_objects():
    for s in flat_targets(6, seed=4):
        objects = extract_objects(s, min_area=1)
        whole = [i for i in range(len(s))
                 if (s.amodal_masks[i] == s.visible_masks[i]).all()
                 and not s.crop_to_image(s.visible_masks)[i][[0, -1]].any()
                 and not s.crop_to_image(s.visible_masks)[i][:, [0, -1]].any()]
        assert [o.label for o in objects] == [int(s.labels[i]) for i in whole]
        for o, i in zip(objects, whole):  # flat shading: the crop shows the object's colour
            np.testing.assert_array_equal((o.image == flat_colour(i)).all(-1), o.mask)


def test_modal_aug_round_trip(tmp_path):
    path, _ = modal_coco(tmp_path)
    sources = extract_objects(load_dataset(path)[0])
    target = flat_targets(1, seed=9)[0]
    out = paste_objects(target, sources, np.random.default_rng(0), max_objects=3)
    write_amodal_coco([out], tmp_path / "aug.json")
    (again,) = load_dataset(tmp_path / "aug.json")
    assert_same_arrays(again, out, ("amodal_masks", "visible_masks", "occlusion_relations"))


def test_no_sources_is_a_no_op():
    target = flat_targets(1)[0]
    assert paste_objects(target, [], np.random.default_rng(0)) is target


@pytest.mark.parametrize("shape", [(5, 5), (5, 6)])
def test_modal_object_checks_shapes(shape):
    if shape == (5, 5):
        ModalObject(np.zeros((5, 5, 3), np.uint8), np.zeros(shape, np.uint8), 1)
    else:
        with pytest.raises(ValueError):
            ModalObject(np.zeros((5, 5, 3), np.uint8), np.zeros(shape, np.uint8), 1)


# ------------------------------------------------------------------ reachable from training
def test_training_samples_see_pasted_objects_when_configured():
    scenes = SynthScenes(SynthDataConfig(num_images=6, seed=4, width=128, height=96))
    plain = _TrainingSet(scenes, ModalAugConfig(probability=0.0), scenes, seed=0)
    pasted = _TrainingSet(scenes, ModalAugConfig(probability=1.0, min_objects=2,
                                                 max_objects=2), scenes, seed=0)
    more, relations = 0, 0
    for g in range(6):
        index = g
        image, target = plain[(index, False, g)]
        reference_image, _ = sample_to_tensors(scenes[index], False)
        np.testing.assert_array_equal(image.numpy(), reference_image.numpy())
        aug_image, aug = pasted[(index, False, g)]
        assert not np.array_equal(aug_image.numpy(), image.numpy())  # pixels were pasted
        more += len(aug["labels"]) > len(target["labels"])
        relations += len(aug["occlusion_relations"]) > len(target["occlusion_relations"])
        again_image, _ = pasted[(index, False, g)]  # the same draw for the same position
        np.testing.assert_array_equal(again_image.numpy(), aug_image.numpy())
    # Pasted objects are new instances on top of others (some may cover a whole object,
    # which is then dropped, so not every image has more instances).
    assert more >= 4 and relations >= 4, (more, relations)


def test_a_training_run_with_modal_augmentation(tmp_path):
    config = write_train_config(tmp_path / "tiny.yaml", train_config(
        backbone="resnet18_fpn", trainable_backbone_layers=5,
        anchor_sizes=[16, 32, 64, 128, 256], width=128, height=96, train_images=6,
        val_images=1, iterations=2, steps=[2], warmup_iters=1))
    result = subprocess.run(
        ["orcnn-core", "train", "--config", str(config), "--output-dir", str(tmp_path / "run"),
         "--no-progress", "--set", "data.modal_aug.probability=1.0"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    refused = subprocess.run(
        ["orcnn-core", "train", "--config", str(config), "--output-dir", str(tmp_path / "r2"),
         "--set", "data.modal_aug.min_objects=4", "--set", "data.modal_aug.max_objects=2"],
        capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "data.modal_aug.min_objects must be <= max_objects 2" in refused.stderr
    # A sources file must have the training data's categories (a paste keeps its label).
    cfg = SynthConfig(width=64, height=48, num_classes=3)
    other = tmp_path / "other.json"
    write_amodal_coco(generate_samples(1, 0, cfg), other, categories=cfg.categories)
    refused = subprocess.run(
        ["orcnn-core", "train", "--config", str(config), "--output-dir", str(tmp_path / "r3"),
         "--set", "data.modal_aug.probability=0.5", "--set", f"data.modal_aug.sources={other}"],
        capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert f"data.modal_aug.sources {other}: categories" in refused.stderr
    assert "differ from the training data's" in refused.stderr
