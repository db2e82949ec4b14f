"""The synthetic scene generator: determinism, exact ground truth, command line, speed."""

import json
import subprocess
import time

import cv2
import numpy as np
import pytest

from orcnn_core.data import load_dataset, mask_boxes
from orcnn_core.errors import InputError
from orcnn_core.synth import (CLASS_NAMES, SynthConfig, flat_colour, generate_dataset,
                              generate_samples, render_scene)
from helpers import assert_same_arrays

SMALL = dict(width=96, height=72)


def samples(n, seed, **kw):
    return list(generate_samples(n, seed, SynthConfig(**dict(SMALL, **kw))))


def assert_same(a, b):
    assert_same_arrays(a, b, ("image", "amodal_masks", "visible_masks", "labels", "boxes",
                              "occlusion_relations"))


def test_same_seed_same_scene_and_prefix():
    first, second = samples(5, 7), samples(8, 7)
    for a, b in zip(first, second):  # a longer run starts with the shorter one
        assert_same(a, b)
    assert [s.image_id for s in second] == list(range(1, 9))
    ids = np.concatenate([s.annotation_ids for s in second])
    assert (ids == np.arange(1, len(ids) + 1)).all()  # unique over the data set


def test_different_seed_different_scene():
    a, b = samples(3, 1), samples(3, 2)
    assert any(x.image.shape != y.image.shape or (x.image != y.image).any()
               for x, y in zip(a, b))


def test_rendering_uses_no_global_rng():
    np.random.seed(0)
    a = render_scene(np.random.default_rng(5), SynthConfig(**SMALL))
    np.random.seed(1)
    np.random.random(10)
    b = render_scene(np.random.default_rng(5), SynthConfig(**SMALL))
    assert_same(a, b)


def test_dataset_files_are_byte_identical(tmp_path):
    paths = [generate_dataset(tmp_path / name, 4, 3, size=(64, 48), num_classes=5)
             for name in ("one", "two")]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    for k in range(1, 5):
        png = f"images/{k:06d}.png"
        assert (tmp_path / "one" / png).read_bytes() == (tmp_path / "two" / png).read_bytes()
    other = generate_dataset(tmp_path / "three", 4, 4, size=(64, 48), num_classes=5)
    assert other.read_bytes() != paths[0].read_bytes()


def visible_reference(sample):
    """Visible masks recomputed bottom up: amodal, inside the image, under nothing later."""
    p, h, w = sample.mask_padding, sample.height, sample.width
    n = len(sample)
    in_image = np.zeros(sample.amodal_masks.shape[1:], np.uint8)
    in_image[p:p + h, p:p + w] = 1
    above = np.zeros_like(in_image)
    ref = np.zeros_like(sample.amodal_masks)
    for i in reversed(range(n)):
        ref[i] = sample.amodal_masks[i] & in_image & (1 - above)
        above |= sample.amodal_masks[i]
    return ref


def test_ground_truth_is_consistent():
    cfg = SynthConfig(**SMALL)
    cut = 0
    for s in samples(25, 11):
        n, p = len(s), s.mask_padding
        assert p == 96 // 8 and s.amodal_masks.shape == (n, 72 + 2 * p, 96 + 2 * p)
        assert s.image.shape == (72, 96, 3) and s.image.dtype == np.uint8
        assert set(np.unique(s.amodal_masks)) <= {0, 1}
        np.testing.assert_array_equal(s.visible_masks, visible_reference(s))
        assert not (s.visible_masks & (1 - s.amodal_masks)).any()  # visible within amodal
        if n:
            assert s.visible_masks.sum(0).max() <= 1  # visible masks are disjoint
            # Amodal masks never touch the canvas edge: nothing of them is cut off.
            edge = s.amodal_masks[:, [0, -1], :].any() or s.amodal_masks[:, :, [0, -1]].any()
            assert not edge
        np.testing.assert_array_equal(s.boxes, mask_boxes(s.amodal_masks, p))
        cut += int(((s.boxes[:, :2] < 0) | (s.boxes[:, 2:] > [96, 72])).any(1).sum())
        vis_area = s.visible_masks.reshape(n, -1).sum(1)
        amodal_area = s.amodal_masks.reshape(n, -1).sum(1)
        assert (vis_area >= np.maximum(cfg.min_visible_fraction * amodal_area,
                                       cfg.min_visible_pixels)).all()
        assert ((s.labels >= 1) & (s.labels <= cfg.num_classes)).all()
    assert cut > 0  # some objects are cut by the image border


def test_relations_are_exactly_the_overlaps():
    checked = 0
    for s in samples(25, 12):
        rel = set(map(tuple, s.occlusion_relations.tolist()))
        for j in range(len(s)):
            for i in range(j):
                overlap = s.amodal_masks[i] & s.amodal_masks[j]
                assert ((j, i) in rel) == bool(overlap.any())
                assert (i, j) not in rel  # the upper one is drawn later
                if overlap.any():
                    checked += 1
                    # Where the upper one lies, the lower one is hidden.
                    assert not (overlap & s.visible_masks[i]).any()
                    assert (overlap <= s.invisible_masks[i]).all()
    assert checked > 10


def test_image_shows_exactly_the_visible_masks():
    """Flat shading paints object k in colour k over black: the image is the segmentation."""
    textured = samples(12, 21)
    flat = samples(12, 21, flat_shading=True)
    for t, f in zip(textured, flat):
        np.testing.assert_array_equal(t.amodal_masks, f.amodal_masks)  # same geometry
        p = f.mask_padding
        seg = f.crop_to_image(f.visible_masks)
        expected = np.zeros_like(f.image)
        for k in range(len(f)):
            expected[seg[k].astype(bool)] = flat_colour(k)
        np.testing.assert_array_equal(f.image, expected)
        assert p > 0


def test_textured_object_pixels_differ_from_background():
    """Objects are drawn where their visible mask is: those pixels changed from the empty
    scene (same looks seed, but no objects)."""
    s = samples(6, 31)
    empty = samples(6, 31, min_objects=0, max_objects=0)
    for a, b in zip(s, empty):
        seg = a.crop_to_image(a.visible_masks).astype(bool)
        diff = np.abs(a.image.astype(int) - b.image.astype(int)).sum(2)
        for k in range(len(a)):
            assert np.median(diff[seg[k]]) > 20


def test_classes_and_categories():
    cfg = SynthConfig(**SMALL, num_classes=3)
    assert [c["name"] for c in cfg.categories] == list(CLASS_NAMES[:3])
    labels = np.concatenate([s.labels for s in samples(10, 5, num_classes=3)])
    assert set(labels.tolist()) == {1, 2, 3}


@pytest.mark.parametrize("kw,pattern", [
    (dict(num_classes=len(CLASS_NAMES) + 1), "classes 11"),
    (dict(num_classes=0), "classes 0"),
    (dict(width=8), "size 8x72"),
    (dict(min_objects=5, max_objects=2), "objects 5..2"),
])
def test_bad_config(kw, pattern):
    with pytest.raises(InputError, match=pattern):
        SynthConfig(**dict(SMALL, **kw)).validate()


def test_cli_writes_a_loadable_data_set(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run(["orcnn-core", "synth", "--out", str(out), "--num-images", "3",
                           "--seed", "4", "--size", "80x60", "--classes", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = load_dataset(out / "annotations.json")
    assert len(ds) == 3 and ds.format == "d2s_amodal"
    assert [c["name"] for c in ds.categories] == list(CLASS_NAMES[:4])
    mem = samples(3, 4, width=80, height=60, num_classes=4)
    for a, b in zip(ds, mem):
        np.testing.assert_array_equal(a.load_image(), b.image)
        np.testing.assert_array_equal(a.amodal_masks, b.amodal_masks)
        np.testing.assert_array_equal(a.visible_masks, b.visible_masks)
        np.testing.assert_array_equal(a.occlusion_relations, b.occlusion_relations)
    obj = json.loads((out / "annotations.json").read_text())
    ann = obj["annotations"][0]
    assert {"segmentation", "visible_mask", "invisible_mask", "occlude_rate",
            "bbox"} <= set(ann)
    assert obj["images"][0]["mask_padding"] == 10
    assert cv2.imread(str(out / "images" / "000001.png")).shape == (60, 80, 3)


@pytest.mark.parametrize("args,pattern", [
    (["--size", "320by240"], "--size '320by240'"),
    (["--size", "8x8"], "size 8x8"),
    (["--classes", "99"], "classes 99"),
    (["--num-images", "0"], "num-images 0"),
    (["--seed", "-1"], "seed -1"),
])
def test_cli_bad_input_exit_2_no_output(tmp_path, args, pattern):
    out = tmp_path / "never"
    proc = subprocess.run(["orcnn-core", "synth", "--out", str(out)] + args,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert pattern in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not out.exists()


def test_speed_320x240():
    """The issue asks for >= 30 images/s on one core; the bound here is loose for shared
    CI machines (python -m orcnn_core.synth --bench measures it properly)."""
    cv2.setNumThreads(1)
    cfg = SynthConfig()
    list(generate_samples(2, 0, cfg))  # warm up
    start = time.perf_counter()
    n = len(list(generate_samples(30, 1, cfg)))
    rate = n / (time.perf_counter() - start)
    assert rate > 10, f"{rate:.1f} images/s"
