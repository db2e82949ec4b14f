"""Public annotation layouts as downloaded: read with --format, converted with
``orcnn-core convert``, scored the same before and after, and against pycocotools on masks
rasterised here; KINS occlusion order, COCOA annotators, training on a native file."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from orcnn_core import cli, evaluation
from orcnn_core.data import load_dataset, write_amodal_coco
from orcnn_core.masks import encode
from helpers import IgnoringEval, assert_one_line_error, coco_segm_stats
from tiny_models import train_config, write_train_config

SIZE = 48  # images are SIZE x SIZE


# ------------------------------------------------------------------------------- the scene
# Two images of rectangles; objects listed back to front (a later one lies on an earlier
# one it overlaps). Rectangles are polygons [x0, y0, x1, y0, x1, y1, x0, y1].
SCENE = {
    1: [(1, 4, (4, 4, 24, 20)), (2, 1, (14, 10, 34, 30)), (3, 4, (30, 2, 44, 12))],
    2: [(4, 1, (6, 6, 30, 30)), (5, 4, (20, 20, 40, 40)), (6, 4, (2, 36, 12, 46))],
}
CATEGORIES = [{"id": 1, "name": "cyclist"}, {"id": 4, "name": "car"}]


def polygon(rect):
    x0, y0, x1, y1 = rect
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def raster(rect, pad=0):
    """The mask pycocotools makes of the rectangle's polygon on the (padded) canvas."""
    side = SIZE + 2 * pad
    rle = mask_utils.frPyObjects([[v + pad for v in polygon(rect)]], side, side)
    return mask_utils.decode(mask_utils.merge(rle))


def scene_masks(pad=0):
    """image id -> [(ann id, category id, rect, amodal, visible)], visible = amodal minus
    the objects drawn later, and (image id, upper, lower) for overlapping pairs."""
    out, relations = {}, []
    for image_id, objects in SCENE.items():
        amodal = [raster(rect, pad) for _, _, rect in objects]
        entries = []
        for k, (ann_id, cat, rect) in enumerate(objects):
            visible = amodal[k].copy()
            for later in range(k + 1, len(objects)):
                visible &= 1 - amodal[later]
                if (amodal[k] & amodal[later]).any():
                    relations.append((image_id, objects[later][0], ann_id))
            entries.append((ann_id, cat, rect, amodal[k], visible))
        out[image_id] = entries
    return out, sorted(relations)


def images(pad=None):
    entries = [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE}
               for i in SCENE]
    if pad is not None:
        for e in entries:
            e["mask_padding"] = pad
    return entries


def kins2020(ignore=()):
    masks, _ = scene_masks()
    anns = []
    for image_id, entries in masks.items():
        depth = len(entries)
        for k, (ann_id, cat, rect, amodal, visible) in enumerate(entries):
            overlapping = any((amodal & o[3]).any() for o in entries if o[0] != ann_id)
            x0, y0, x1, y1 = rect
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat,
                         "a_segm": [polygon(rect)], "a_bbox": [x0, y0, x1 - x0, y1 - y0],
                         "i_segm": encode(visible), "iscrowd": 0,
                         # cluster 1 holds the overlapping objects; 1 = front
                         "oco_id": 1 if overlapping else 0,
                         "ico_id": depth - k if overlapping else 0,
                         **({"ignore": 1} if ann_id in ignore else {})})
    return {"images": images(), "categories": CATEGORIES, "annotations": anns}


def kins2019(ignore=()):
    obj = kins2020(ignore)
    for a in obj["annotations"]:
        a["segmentation"], a["inmodal_seg"], a["bbox"] = a.pop("a_segm"), a.pop("i_segm"), \
            a.pop("a_bbox")
        del a["oco_id"], a["ico_id"]
    return obj


def cocoa(second_annotator=True):
    """COCOA: one entry per annotator and image; regions front to back by 'order'."""
    masks, relations = scene_masks()
    anns = []
    for image_id, entries in masks.items():
        order = {ann_id: len(entries) - k for k, (ann_id, *_) in enumerate(entries)}
        regions = []
        for ann_id, _, rect, amodal, visible in sorted(entries, key=lambda e: order[e[0]]):
            region = {"segmentation": polygon(rect), "order": order[ann_id], "isStuff": 0}
            if (visible != amodal).any():
                region["visible_mask"] = encode(visible)
            regions.append(region)
        constraint = ",".join(f"{order[u]}-{order[v]}" for i, u, v in relations
                              if i == image_id)
        anns.append({"id": image_id, "image_id": image_id, "regions": regions,
                     "depth_constraint": constraint})
        if second_annotator:   # another person's (worse) regions of the same image
            anns.append({"id": 100 + image_id, "image_id": image_id, "depth_constraint": "",
                         "regions": [{"segmentation": polygon((0, 0, 10, 10)), "order": 1,
                                      "isStuff": 0}]})
    return {"images": images(), "annotations": anns}


def d2sa(pad=4):
    """D2SA / COCOA-cls: RLEs zero padded by ``pad`` pixels, no mask_padding, no relations."""
    masks, _ = scene_masks(pad)
    inside = np.zeros((SIZE + 2 * pad,) * 2, np.uint8)
    inside[pad:-pad, pad:-pad] = 1
    anns = [{"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
             "segmentation": encode(amodal), "visible_mask": encode(visible & inside),
             "invisible_mask": encode(amodal & (1 - (visible & inside)))}
            for image_id, entries in masks.items()
            for ann_id, cat, _, amodal, visible in entries]
    return {"images": images(), "categories": CATEGORIES, "annotations": anns}


def coco():
    masks, _ = scene_masks()
    anns = [{"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
             "segmentation": [polygon(rect)]}
            for image_id, entries in masks.items() for ann_id, cat, rect, *_ in entries]
    return {"images": images(), "categories": CATEGORIES, "annotations": anns}


def predictions(category=None, pad=0, modal=False):
    """Per object a detection shifted by one pixel (odd ids) or exact, and one false
    positive per image; visible masks shifted alike."""
    masks, _ = scene_masks(pad)
    out, ref = [], []
    for image_id, entries in masks.items():
        for k, (ann_id, cat, _, amodal, visible) in enumerate(entries):
            shift = ann_id % 2
            a, v = np.roll(amodal, shift, axis=1), np.roll(amodal if modal else visible,
                                                           shift, axis=1)
            score = 0.9 - 0.1 * k
            out.append({"image_id": image_id, "category_id": category or cat, "score": score,
                        "segmentation": encode(a), "visible_mask": encode(v)})
            ref.append((image_id, category or cat, score, a, v))
        fp = np.zeros_like(masks[image_id][0][3])
        fp[:6, -6:] = 1
        out.append({"image_id": image_id, "category_id": category or CATEGORIES[0]["id"],
                    "score": 0.85, "segmentation": encode(fp), "visible_mask": encode(fp)})
        ref.append((image_id, category or CATEGORIES[0]["id"], 0.85, fp, fp))
    return out, ref


def pycocotools_ap(gt_masks, ref, which, categories, pad=0, ignore=()):
    """COCO segm AP (stats[0]) of ``ref`` detections on the canvas masks (which: 0 amodal,
    1 visible), ground truths flagged in ``ignore`` ignored as COCO ignores them."""
    side = SIZE + 2 * pad
    dataset = {"images": [{"id": i, "height": side, "width": side} for i in gt_masks],
               "categories": [{"id": c} for c in categories],
               "annotations": [{"id": ann_id, "image_id": i, "category_id": cat,
                                "iscrowd": 0, "area": float(amodal.sum()),
                                "segmentation": encode((amodal, visible)[which]),
                                "bbox": [0, 0, 1, 1], "flag": int(ann_id in ignore)}
                               for i, entries in gt_masks.items()
                               for ann_id, cat, _, amodal, visible in entries]}
    results = [{"image_id": i, "category_id": c, "score": s, "segmentation": encode(m[which])}
               for i, c, s, *m in ref]
    return coco_segm_stats(dataset, results, IgnoringEval)[0]


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def convert(tmp_path, source, *options):
    out = tmp_path / f"{source.stem}.ours.json"
    assert cli.main(["convert", str(source), str(out), *options]) == 0
    return out


def same_metrics(gt_path, converted, preds, **options):
    """The metrics of the source file equal those of its conversion; returns them."""
    before = evaluation.evaluate_loaded(json.loads(gt_path.read_text()), preds, **options)
    after = evaluation.evaluate_loaded(json.loads(converted.read_text()), preds)
    before["protocol"].pop("format")
    after["protocol"].pop("format")  # our layout now
    assert before == after
    return before


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("make, fmt", [(kins2020, "kins2020"), (kins2019, "kins2019")])
def test_kins_reads_visible_masks_ignore_flags_and_scores_like_pycocotools(
        tmp_path, make, fmt):
    path = write(tmp_path / f"{fmt}.json", make(ignore=(3,)))
    masks, _ = scene_masks()
    dataset = load_dataset(path, fmt=fmt)
    assert dataset.layout == fmt and dataset.categories == CATEGORIES
    sample = dataset[0]  # the ignored annotation 3 is not a training sample
    assert sample.annotation_ids.tolist() == [1, 2]
    for k, (ann_id, _, _, amodal, visible) in enumerate(masks[1][:2]):
        np.testing.assert_array_equal(sample.visible_masks[k], visible)  # inmodal: visible
        np.testing.assert_array_equal(sample.amodal_masks[k], amodal)
    preds, ref = predictions()
    metrics = same_metrics(path, convert(tmp_path, path, "--format", fmt), preds)
    assert metrics["num_ignored"] == 1 and metrics["num_gt"] == 5
    for which, kind in enumerate(("A", "V")):
        expected = pycocotools_ap(masks, ref, which, [1, 4], ignore=(3,))
        assert abs(metrics[f"AP_{kind}"] - expected) <= 1e-4, kind


def test_kins_occlusion_order_becomes_relations(tmp_path):
    """oco_id: cluster; ico_id: 1 at the front, +1 per occlusion. A lies on B when both
    are in one cluster, A's ico_id is smaller and their amodal masks overlap: not 1-4 of
    image 2 (no overlap although 6 is ordered 0, the rest of its cluster in order)."""
    _, expected = scene_masks()
    path = write(tmp_path / "kins.json", kins2020())
    dataset = load_dataset(path)
    assert dataset.relations_source == "given"
    found = sorted((r.image_id, r.instances[u].ann_id, r.instances[v].ann_id)
                   for r in dataset.records for u, v in r.relations)
    assert found == expected == [(1, 2, 1), (1, 3, 2), (2, 5, 4)]
    written = json.loads(convert(tmp_path, path).read_text())
    assert written["relations_source"] == "given"
    assert sorted((r["image_id"], r["occluder_id"], r["occludee_id"])
                  for r in written["occlusion_relations"]) == expected
    preds, _ = predictions()
    assert same_metrics(path, tmp_path / "kins.ours.json", preds)["order"]["relations"] == \
        "annotations"


def test_cocoa_first_annotator_by_default_all_merges(tmp_path):
    path = write(tmp_path / "cocoa.json", cocoa())
    first, merged = load_dataset(path), load_dataset(path, annotators="all")
    assert [len(r.instances) for r in first.records] == [3, 3]
    assert [len(r.instances) for r in merged.records] == [4, 4]
    masks, _ = scene_masks()
    assert sorted((r.image_id, r.instances[u].ann_id, r.instances[v].ann_id)
                  for r in first.records for u, v in r.relations) == \
        [(1, 1, 2), (1, 2, 3), (2, 5, 6)]  # region ids 1, 2, ... in file order: front first
    # COCOA is class-agnostic ("object"): score as category 1 against pycocotools.
    cocoa_masks = {i: [(k + 1 + 3 * (i - 1), 1, *e[2:]) for k, e in enumerate(
        sorted(entries, key=lambda e: -e[0]))] for i, entries in masks.items()}
    preds, ref = predictions(category=1)
    metrics = same_metrics(path, convert(tmp_path, path), preds)
    for which, kind in enumerate(("A", "V")):
        assert abs(metrics[f"AP_{kind}"] - pycocotools_ap(cocoa_masks, ref, which, [1, 2])) \
            <= 1e-4
    every = convert(tmp_path, path, "--annotators", "all")
    assert len(json.loads(every.read_text())["annotations"]) == 8
    assert same_metrics(path, every, preds, annotators="all")["num_gt"] == 8


def test_d2sa_without_relations_gets_derived_ones_and_scores_alike(tmp_path):
    pad = 4
    path = write(tmp_path / "d2sa.json", d2sa(pad))
    dataset = load_dataset(path, fmt="d2sa")
    assert dataset.relations_source is None and dataset.records[0].padding == pad
    written = json.loads(convert(tmp_path, path, "--format", "cocoa_cls").read_text())
    _, expected = scene_masks()
    assert written["relations_source"] == "derived"
    assert sorted((r["image_id"], r["occluder_id"], r["occludee_id"])
                  for r in written["occlusion_relations"]) == expected
    preds, ref = predictions(pad=pad)
    metrics = same_metrics(path, tmp_path / "d2sa.ours.json", preds)
    assert metrics["order"]["relations"] == "masks" and metrics["order"]["pairs"] == 3
    masks, _ = scene_masks(pad)
    inside = np.zeros((SIZE + 2 * pad,) * 2, np.uint8)
    inside[pad:-pad, pad:-pad] = 1
    masks = {i: [(*e[:4], e[4] & inside) for e in entries] for i, entries in masks.items()}
    for which, kind in enumerate(("A", "V")):
        expected = pycocotools_ap(masks, ref, which, [1, 4], pad=pad)
        assert abs(metrics[f"AP_{kind}"] - expected) <= 1e-4, kind


def test_plain_coco_converts_modal_only_without_relations(tmp_path):
    path = write(tmp_path / "coco.json", coco())
    written = json.loads(convert(tmp_path, path, "--format", "coco").read_text())
    assert written["info"]["modal_only"] is True
    assert "occlusion_relations" not in written and "relations_source" not in written
    again = load_dataset(tmp_path / "coco.ours.json")
    assert again.modal_only and not again.relations_given
    preds, ref = predictions(modal=True)
    metrics = same_metrics(path, tmp_path / "coco.ours.json", preds)
    masks, _ = scene_masks()
    modal = {i: [(*e[:3], e[3], e[3]) for e in entries] for i, entries in masks.items()}
    assert abs(metrics["AP_A"] - pycocotools_ap(modal, ref, 0, [1, 4])) <= 1e-4


def test_writer_leaves_unknown_relations_out(tmp_path):
    """Samples of a file without relations: no "occlusion_relations": [] (which would
    turn the masks' own relations off); read back, relations are derived again."""
    dataset = load_dataset(write(tmp_path / "d2sa.json", d2sa()))
    written = write_amodal_coco(dataset, tmp_path / "out.json", dataset.categories)
    assert "occlusion_relations" not in written
    assert not load_dataset(tmp_path / "out.json").relations_given
    kins = load_dataset(write(tmp_path / "kins.json", kins2020()))
    written = write_amodal_coco(kins, tmp_path / "k.json", kins.categories)
    assert written["relations_source"] == "given" and len(written["occlusion_relations"]) == 3


@pytest.mark.parametrize("args, fragments", [
    (["--format", "kins2019"], ["kins2020.json", "format 'kins2019' does not fit",
                                "'inmodal_seg'", "'a_segm'"]),
    (["--format", "cocoa"], ["kins2020.json", "'regions'"]),
    (["--format", "lvis"], ["kins2020.json", "unknown format 'lvis'", "kins2019"]),
])
def test_named_format_that_does_not_fit_is_one_line_exit_2(tmp_path, capsys, args, fragments):
    path = write(tmp_path / "kins2020.json", kins2020())
    for command in (["convert", str(path), str(tmp_path / "o.json")],
                    ["evaluate", "--gt", str(path), "--predictions",
                     str(write(tmp_path / "p.json", []))]):
        code = cli.main(command + args)
        assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "o.json").exists()


def test_unknown_layout_and_overwriting_the_input_are_refused(tmp_path, capsys):
    odd = write(tmp_path / "odd.json", {"images": images(), "annotations": [
        {"id": 1, "image_id": 1, "mask": "x"}]})
    code = cli.main(["convert", str(odd), str(tmp_path / "o.json")])
    assert_one_line_error(code, capsys.readouterr().err, "odd.json",
                          "unknown annotation layout", "'mask'", "'regions'", "'a_segm'")
    path = write(tmp_path / "kins.json", kins2020())
    before = path.read_bytes()
    code = cli.main(["convert", str(path), str(path)])
    assert_one_line_error(code, capsys.readouterr().err, "is the input")
    assert path.read_bytes() == before


def test_training_validates_on_a_native_kins_file(tmp_path):
    """Two iterations on a KINS file with the same file as validation set: exit 0,
    metrics.json written."""
    data = tmp_path / "kins"
    data.mkdir()
    for i in SCENE:
        cv2.imwrite(str(data / f"{i}.png"), np.full((SIZE, SIZE, 3), 40 * i, np.uint8))
    annotations = write(data / "kins.json", kins2020())
    cfg = train_config(backbone="resnet18_fpn", trainable_backbone_layers=5,
                       anchor_sizes=[16, 32, 64, 128, 256], width=SIZE, height=SIZE,
                       train_images=2, val_images=2, iterations=2, steps=[2],
                       warmup_iters=1)
    cfg["data"].update(train=str(annotations), val=str(annotations), format="kins2020")
    cfg["model"]["box_score_thresh"] = 0.0  # detections to score, untrained as it is
    config = write_train_config(tmp_path / "kins.yaml", cfg)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--output-dir", str(out),
                     "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_gt"] == 6 and metrics["num_predictions"] > 0
    assert metrics["order"]["relations"] == "annotations"
