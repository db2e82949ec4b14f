"""Amodal metrics (orcnn_core.evaluation) against pycocotools and hand-computed cases."""

import json
import subprocess
import sys
import time

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from orcnn_core import cli, evaluation
from orcnn_core.data import derive_relations, parse_dataset
from orcnn_core.masks import encode
from helpers import IgnoringEval, coco_segm_stats

#: COCO's 101 recall thresholds: precision 1 up to recall 0.5, then nothing, gives 51/101.
HALF = 51 / 101


# ----------------------------------------------------------------------------------------
# Helpers: masks, GT files, prediction lists


def box(shape, y0, x0, y1, x1):
    mask = np.zeros(shape, np.uint8)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return mask


def ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def gt_file(images, anns, categories=(1, 2, 3), relations=None):
    data = {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in categories],
            "annotations": anns}
    if relations is not None:
        data["occlusion_relations"] = [{"image_id": i, "occluder_id": a, "occludee_id": b}
                                       for i, a, b in relations]
    return data


def gt_ann(ann_id, image_id, amodal, visible=None, category=1, iscrowd=0):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": iscrowd,
           "segmentation": encode(amodal), "area": int(amodal.sum()),
           "bbox": [0, 0, 1, 1]}
    if visible is not None:
        ann["visible_mask"] = encode(visible)
    return ann


def pred(image_id, amodal, visible=None, score=0.9, category=1):
    entry = {"image_id": image_id, "category_id": category, "score": score,
             "bbox": [0, 0, 1, 1], "segmentation": encode(amodal)}
    if visible is not None:
        entry["visible_mask"] = encode(visible)
    return entry


def random_case(seed):
    """Random images (some padded), GTs (some crowd, many occluded) and detections.

    Returns the GT dict, the predictions, and for the pycocotools reference the canvas
    masks of every GT and detection (predictions may be stored image-sized).
    """
    rng = np.random.default_rng(seed)
    images, anns, preds, ref = [], [], [], {"gt": [], "dt": []}
    ann_id = 100
    for image_id in range(1, 7):
        height, width = rng.integers(50, 90, 2)
        pad = int(rng.choice([0, 5]))
        canvas = (height + 2 * pad, width + 2 * pad)
        images.append({"id": image_id, "width": int(width), "height": int(height),
                       "mask_padding": pad})
        inside = box(canvas, pad, pad, pad + height, pad + width)
        for _ in range(rng.integers(0, 6)):
            cy, cx = rng.integers(0, canvas[0]), rng.integers(0, canvas[1])
            ry, rx = rng.integers(3, 30, 2)
            amodal = (box(canvas, cy - ry, cx - rx, cy + ry, cx + rx) if rng.random() < 0.5
                      else ellipse(canvas, cy, cx, ry, rx))
            oy, ox = cy + rng.integers(-ry, ry + 1), cx + rng.integers(-rx, rx + 1)
            occluder = box(canvas, oy - 4, ox - 4, oy + 4, ox + 4) * (rng.random() < 0.6)
            visible = amodal & (1 - occluder) & inside
            if visible.sum() == 0:       # never matchable in AP_V (IoU of empty masks: 0)
                continue
            category = int(rng.integers(1, 4))
            crowd = int(rng.random() < 0.1)
            anns.append(gt_ann(ann_id, image_id, amodal, visible, category, crowd))
            ref["gt"].append((ann_id, image_id, category, crowd, amodal, visible))
            ann_id += 1
            for _ in range(rng.integers(0, 3)):     # detections near this object
                dy, dx = rng.integers(-2, 3, 2)
                det_a = np.roll(amodal, (dy, dx), axis=(0, 1))
                det_v = np.roll(visible, (int(rng.integers(-2, 3)), 0), axis=0) & det_a
                det_category = category if rng.random() < 0.9 else int(rng.integers(1, 4))
                preds.append((image_id, det_a, det_v, det_category, None))
        for _ in range(rng.integers(0, 4)):         # false positives
            cy, cx = rng.integers(0, canvas[0]), rng.integers(0, canvas[1])
            det_a = ellipse(canvas, cy, cx, *rng.integers(2, 9, 2))
            preds.append((image_id, det_a, det_a & inside, int(rng.integers(1, 4)), None))
        if image_id == 6:                           # more than 100 detections
            for k in range(110):
                det_a = box(canvas, k % 20, k % 15, k % 20 + 10, k % 15 + 10)
                preds.append((image_id, det_a, det_a, 1, 0.3 * rng.random()))
    image_by_id = {image["id"]: image for image in images}
    predictions = []
    for image_id, det_a, det_v, category, score in preds:
        score = float(np.round(rng.random() if score is None else score, 2))  # ties happen
        entry = pred(image_id, det_a, det_v, score, category)
        image = image_by_id[image_id]
        pad = image["mask_padding"]
        if pad and rng.random() < 0.4:              # image-sized RLEs
            det_a, det_v = (np.pad(m[pad:-pad, pad:-pad], pad) for m in (det_a, det_v))
            entry["segmentation"] = encode(det_a[pad:-pad, pad:-pad])
            entry["visible_mask"] = encode(det_v[pad:-pad, pad:-pad])
        predictions.append(entry)
        ref["dt"].append((image_id, category, score, det_a, det_v))
    return gt_file(images, anns), predictions, ref


def pycocotools_stats(ref, images, which):
    """COCOeval segm stats[0:6] (AP, AP50, AP75, AP small/medium/large) on the canvas
    masks (which: 0 amodal, 1 visible; GT areas are amodal)."""
    dataset = {"images": [{"id": image["id"],
                           "height": image["height"] + 2 * image["mask_padding"],
                           "width": image["width"] + 2 * image["mask_padding"]}
                          for image in images],
               "categories": [{"id": c} for c in (1, 2, 3)],
               "annotations": [{"id": ann_id, "image_id": image_id, "category_id": category,
                                "iscrowd": crowd, "area": float(amodal.sum()),
                                "segmentation": encode((amodal, visible)[which]),
                                "bbox": [0, 0, 1, 1]}
                               for ann_id, image_id, category, crowd, amodal, visible
                               in ref["gt"]]}
    results = [{"image_id": image_id, "category_id": category, "score": score,
                "segmentation": encode((det_a, det_v)[which])}
               for image_id, category, score, det_a, det_v in ref["dt"]]
    return coco_segm_stats(dataset, results)[:6]


# ----------------------------------------------------------------------------------------
# Against pycocotools


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_a_and_ap_v_equal_pycocotools_segm_ap(seed):
    gt, predictions, ref = random_case(seed)
    metrics = evaluation.evaluate_loaded(gt, predictions)
    for which, kind in enumerate(("A", "V")):
        expected = pycocotools_stats(ref, gt["images"], which)
        got = [metrics[f"AP_{kind}"], metrics[f"AP50_{kind}"], metrics[f"AP75_{kind}"]]
        assert np.allclose(got, expected[:3], rtol=0, atol=1e-9), (kind, got, expected)
        assert 0 < expected[0] < 1            # a case that can tell right from wrong
    # Size ranges on the amodal area: pycocotools' detection areas are those of the masks
    # it evaluates, so only the amodal run compares.
    by_area = [metrics["breakdown"]["area"][size]["AP_A"]
               for size in ("small", "medium", "large")]
    expected = pycocotools_stats(ref, gt["images"], 0)[3:]
    assert np.allclose(by_area, expected, rtol=0, atol=1e-9), (by_area, expected)
    assert sum(value > -1 for value in by_area) >= 2
    assert metrics["AP_AV"] <= min(metrics["AP_A"], metrics["AP_V"]) + 1e-12
    assert metrics["num_predictions"] == len(predictions)


def test_ap_av_equals_ap_a_when_visible_is_amodal():
    gt, predictions, _ = random_case(3)
    for ann in gt["annotations"]:
        del ann["visible_mask"]                   # GT: visible := amodal
    for entry in predictions:
        del entry["visible_mask"]                 # predictions: amodal used as visible
    metrics = evaluation.evaluate_loaded(gt, predictions)
    for suffix in ("", "50", "75"):
        assert metrics[f"AP{suffix}_AV"] == metrics[f"AP{suffix}_A"] \
            == metrics[f"AP{suffix}_V"]
    assert 0 < metrics["AP_A"] < 1
    assert metrics["num_predictions_without_visible"] == len(predictions)
    assert metrics["occluded"]["num_gt"] == 0 and metrics["occluded"]["AP_AV"] == -1


# ----------------------------------------------------------------------------------------
# Hand-built cases

SHAPE = (40, 40)


def test_ap_av_hand_case_amodal_matches_but_visible_does_not():
    """GT1 and GT2 (8x8, apart). det1 (0.9): amodal IoU 7/8, visible IoU 1 with GT1;
    det2 (0.8): amodal IoU 1, visible IoU 5/8 with GT2."""
    gt1 = box(SHAPE, 2, 2, 10, 10)
    gt2 = box(SHAPE, 20, 20, 28, 28)
    gt = gt_file([{"id": 1, "width": 40, "height": 40}],
                 [gt_ann(1, 1, gt1, gt1), gt_ann(2, 1, gt2, gt2)])
    predictions = [pred(1, box(SHAPE, 2, 2, 10, 9), gt1, 0.9),     # 56 / 64
                   pred(1, gt2, box(SHAPE, 20, 20, 25, 28), 0.8)]  # 40 / 64
    m = evaluation.evaluate_loaded(gt, predictions)
    # Thresholds .5 .55 .6: both TP. .65-.85 (5): det1 TP, det2 FP. .9 .95: neither.
    assert m["AP_AV"] == pytest.approx((3 + 5 * HALF) / 10, abs=1e-12)
    assert m["AP50_AV"] == pytest.approx(1.0) and m["AP75_AV"] == pytest.approx(HALF)
    # Amodal: det1 fails only at .9/.95 (then det2 TP after one FP: precision 1/2).
    assert m["AP_A"] == pytest.approx((8 + 2 * HALF / 2) / 10, abs=1e-12)
    # Visible: det2 fails above .6.
    assert m["AP_V"] == pytest.approx((3 + 7 * HALF) / 10, abs=1e-12)


def occluded_case():
    """GT1 is not occluded (ignored), GT2 is. det_c overlaps GT1 with amodal IoU 0.45,
    det_d with IoU exactly 0.5 and det_a with 0.64, det_b is GT2 exactly."""
    gt1 = box(SHAPE, 0, 0, 8, 8)                                   # 64 px, visible
    gt2 = box(SHAPE, 20, 20, 30, 30)                               # 100 px, occluded
    gt2_visible = box(SHAPE, 20, 20, 30, 26)                       # 40 % hidden
    gt = gt_file([{"id": 1, "width": 40, "height": 40}],
                 [gt_ann(1, 1, gt1, gt1), gt_ann(2, 1, gt2, gt2_visible)])
    det_c = box(SHAPE, 0, 0, 8, 4) | box(SHAPE, 0, 8, 1, 16)       # I 32, U 72: 0.444
    det_d = box(SHAPE, 0, 0, 8, 4)                                 # I 32, U 64: 0.5
    det_a = box(SHAPE, 0, 0, 10, 10)                               # I 64, U 100: 0.64
    for det, expected in ((det_c, 32 / 72), (det_d, 0.5), (det_a, 0.64)):
        assert (det & gt1).sum() / (det | gt1).sum() == pytest.approx(expected)
    predictions = [pred(1, det_c, det_c, 0.95), pred(1, det_a, det_a, 0.9),
                   pred(1, det_d, det_d, 0.85), pred(1, gt2, gt2_visible, 0.8)]
    return gt, predictions


def test_occluded_evaluation_reference_rule_is_cocos_ignore():
    """COCOA amodal API / COCOeval: a detection matched to the ignored GT1 is ignored at
    that threshold, every other one counts. Ranked det_c, det_a, det_d, det_b: at IoU 0.5
    to 0.6 det_a takes GT1 (ignored) and det_c, det_d are false positives (GT1 is taken),
    precision 1/3 at recall 1; above 0.6 three false positives first: 1/4."""
    gt, predictions = occluded_case()
    m = evaluation.evaluate_loaded(gt, predictions)
    occ = m["occluded"]
    assert m["protocol"]["occluded_rule"] == "reference" and occ["num_gt"] == 1
    assert occ["AP50_A"] == pytest.approx(1 / 3, abs=1e-12)
    assert occ["AP_A"] == pytest.approx((3 / 3 + 7 / 4) / 10, abs=1e-12)
    # Invisible masks: the three detections of GT1 hide nothing, IoU 0: false positives.
    assert occ["AP_IV50"] == pytest.approx(1 / 4, abs=1e-12)
    assert evaluation.evaluate_loaded(gt, predictions, occluded_rule="reference") == m


def test_occluded_evaluation_paper_rule_also_ignores_detections_of_ignored_gts():
    """det_c (IoU 0.45 with GT1) stays a false positive; det_d (IoU exactly 0.5) and det_a
    (0.64) are ignored at every threshold."""
    gt, predictions = occluded_case()
    m = evaluation.evaluate_loaded(gt, predictions, occluded_rule="paper")
    occ = m["occluded"]
    assert occ["num_gt"] == 1
    # Ranked: det_c FP, (det_a, det_d ignored), det_b TP -> precision 1/2 up to recall 1.
    for key in ("AP_A", "AP_V", "AP_AV", "AP50_A", "AP75_AV", "AP_IV50"):
        assert occ[key] == pytest.approx(0.5, abs=1e-12), key
    # Without the rule det_a would be a FP above IoU 0.6 (COCOeval alone ignores it only
    # where it matches GT1) and det_d above 0.5.
    assert m["breakdown"]["occlusion"]["partial"]["AP_A"] == pytest.approx(0.5, abs=1e-12)
    assert m["breakdown"]["occlusion"]["none"]["num_gt"] == 1
    # In the full evaluation det_c, det_d, det_a are ordinary detections of GT1.
    assert m["AP50_A"] < 1


def test_ignore_rule_keeps_detections_that_fit_a_counted_gt_better():
    """Two objects of one class stacked: GT 2 (occluded) lies under GT 1 (not occluded),
    amodal IoU 0.8. The exact detection of GT 2 has IoU 0.8 >= 0.5 with the ignored GT 1 but
    fits GT 2 better: it counts. A detection that fits GT 1 best is ignored."""
    upper = box(SHAPE, 0, 0, 10, 10)
    lower = box(SHAPE, 0, 0, 10, 8)
    gt = gt_file([{"id": 1, "width": 40, "height": 40}],
                 [gt_ann(1, 1, upper, upper), gt_ann(2, 1, lower, lower & 0)])
    m = evaluation.evaluate_loaded(gt, [pred(1, upper, upper, 0.9),
                                        pred(1, lower, lower & 0, 0.8)], occluded_rule="paper")
    assert m["occluded"]["num_gt"] == 1
    assert m["occluded"]["AP_A"] == pytest.approx(1.0)
    assert m["breakdown"]["occlusion"]["none"]["AP_A"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 6])
def test_perfect_predictions_score_one_everywhere(seed):
    """By the paper's rule; by the reference rule only the whole evaluation must (an exact
    detection of an ignored GT may take an overlapping occluded GT of its class)."""
    gt, _, _ = random_case(seed)
    predictions = [{"image_id": a["image_id"], "category_id": a["category_id"],
                    "score": 1 - 0.01 * k, "segmentation": a["segmentation"],
                    "visible_mask": a["visible_mask"]}
                   for k, a in enumerate(gt["annotations"]) if not a["iscrowd"]]
    m = evaluation.evaluate_loaded(gt, predictions, occluded_rule="paper")
    groups = [m, m["occluded"], *m["breakdown"]["occlusion"].values(),
              *m["breakdown"]["truncation"].values(), *m["breakdown"]["area"].values()]
    values = [v for group in groups for k, v in group.items() if k.startswith("AP")]
    assert values and all(v == pytest.approx(1.0) or v == -1 for v in values)
    reference = evaluation.evaluate_loaded(gt, predictions)
    assert all(reference[k] == pytest.approx(1.0) for k in ("AP_A", "AP_V", "AP_AV"))
    assert m["occluded"]["AP_IV50"] == pytest.approx(1.0)
    assert m["order"]["accuracy"] in (1.0, -1.0) and m["order"]["undecided"] == 0


def test_occluded_ap_iv50_uses_invisible_masks():
    gt2 = box(SHAPE, 20, 20, 30, 30)
    gt2_visible = box(SHAPE, 20, 20, 30, 25)                       # hidden: x 25..30
    gt = gt_file([{"id": 1, "width": 40, "height": 40}], [gt_ann(2, 1, gt2, gt2_visible)])
    good = evaluation.evaluate_loaded(gt, [pred(1, gt2, gt2_visible)])["occluded"]
    assert good["AP_IV50"] == pytest.approx(1.0)
    # Hidden part predicted 2 columns wide instead of 5: IoU 0.4 -> a miss.
    bad = evaluation.evaluate_loaded(gt, [pred(1, gt2, box(SHAPE, 20, 20, 30, 28))])
    assert bad["occluded"]["AP_IV50"] == 0 and bad["occluded"]["AP_A"] == pytest.approx(1.0)
    # No visible mask: the amodal mask is the visible one, nothing is predicted hidden.
    none = evaluation.evaluate_loaded(gt, [pred(1, gt2)])["occluded"]
    assert none["AP_IV50"] == 0 and none["AP_A"] == pytest.approx(1.0)


def order_case(swap_visible=False, with_relations=True, visible=True, relation=(1, 1, 2)):
    """GT 1 lies on GT 2 (overlapping squares); detections copy the GT masks."""
    top = box(SHAPE, 5, 5, 20, 20)
    under = box(SHAPE, 12, 12, 30, 30)
    under_visible = under & (1 - top)
    gt = gt_file([{"id": 1, "width": 40, "height": 40}],
                 [gt_ann(1, 1, top, top), gt_ann(2, 1, under, under_visible, category=2)],
                 relations=[relation] if with_relations else None)
    visible_top, visible_under = top, under_visible
    if swap_visible:        # detection of GT 1 claims to be under detection of GT 2
        visible_top, visible_under = top & (1 - under), under
    predictions = [pred(1, top, visible_top if visible else None, 0.9),
                   pred(1, under, visible_under if visible else None, 0.8, category=2)]
    return evaluation.evaluate_loaded(gt, predictions)["order"]


def test_occlusion_order_accuracy():
    assert order_case() == {"accuracy": 1.0, "correct": 1, "pairs": 1, "undecided": 0,
                            "skipped": 0, "relations": "annotations"}
    assert order_case(swap_visible=True)["accuracy"] == 0.0
    undecided = order_case(visible=False)
    assert undecided["pairs"] == 1 and undecided["undecided"] == 1
    assert undecided["accuracy"] == 0.0
    derived = order_case(with_relations=False)
    assert derived["relations"] == "masks" and derived["accuracy"] == 1.0
    # A relation the GT masks contradict (or cannot show) is not scored.
    contradicted = order_case(relation=(1, 2, 1))
    assert contradicted["skipped"] == 1 and contradicted["pairs"] == 0
    assert contradicted["accuracy"] == -1


def test_breakdown_by_occlusion_level_and_truncation():
    """Padded image: one object cut by the border, one heavily and one slightly occluded,
    one free; perfect predictions give 1.0 in every non-empty group."""
    pad = 4
    canvas = (48, 48)
    inside = box(canvas, pad, pad, pad + 40, pad + 40)
    cut = box(canvas, 0, 10, 10, 20)                   # rows 0..3 in the padding
    heavy = box(canvas, 20, 20, 30, 30)
    heavy_visible = box(canvas, 20, 20, 30, 25)        # 50 % hidden: heavy
    slight = box(canvas, 34, 5, 44, 15)
    slight_visible = box(canvas, 34, 5, 44, 14)        # 10 % hidden
    free = box(canvas, 10, 34, 16, 40)
    anns = [gt_ann(1, 1, cut, cut & inside), gt_ann(2, 1, heavy, heavy_visible),
            gt_ann(3, 1, slight, slight_visible), gt_ann(4, 1, free, free)]
    anns[3]["occlude_rate"] = 0.0
    gt = gt_file([{"id": 1, "width": 40, "height": 40, "mask_padding": pad}], anns)
    predictions = [pred(1, a, v, 0.9 - 0.1 * k) for k, (a, v) in
                   enumerate([(cut, cut & inside), (heavy, heavy_visible),
                              (slight, slight_visible), (free, free)])]
    m = evaluation.evaluate_loaded(gt, predictions)
    b = m["breakdown"]
    assert b["occlusion"]["none"]["num_gt"] == 1
    assert b["occlusion"]["partial"]["num_gt"] == 2    # the cut one: 40 % in the padding
    assert b["occlusion"]["heavy"]["num_gt"] == 1
    assert b["truncation"]["truncated"]["num_gt"] == 1
    assert b["truncation"]["not_truncated"]["num_gt"] == 3
    assert m["occluded"]["num_gt"] == 3
    for group in (*b["occlusion"].values(), *b["truncation"].values(), m["occluded"]):
        assert group["AP_AV"] == pytest.approx(1.0)
    assert m["occluded"]["AP_IV50"] == pytest.approx(1.0)
    assert b["area"]["small"]["num_gt"] == 4 and b["area"]["large"]["AP_A"] == -1


def test_mask_padding_is_inferred_from_rle_sizes():
    gt, predictions, _ = random_case(5)
    expected = evaluation.evaluate_loaded(gt, predictions)
    assert {image["mask_padding"] for image in gt["images"]} == {0, 5}
    for image in gt["images"]:
        del image["mask_padding"]
    assert evaluation.evaluate_loaded(gt, predictions) == expected
    padded = next(a for a in gt["annotations"]
                  if a["segmentation"]["size"][0] > gt["images"][a["image_id"] - 1]["height"])
    padded["visible_mask"] = encode(np.zeros([v + 2 for v in padded["segmentation"]["size"]],
                                             np.uint8))
    with pytest.raises(evaluation.InputError, match=f"annotation {padded['id']}: "
                                                    "visible_mask: .* implies mask padding 6"):
        evaluation.evaluate_loaded(gt, predictions)


def test_a_read_data_set_scores_like_its_dict():
    gt, predictions, _ = random_case(2)
    dataset = parse_dataset(gt, "gt.json", need_file_names=False)
    assert evaluation.evaluate_loaded(dataset, predictions) == \
        evaluation.evaluate_loaded(gt, predictions)


# ----------------------------------------------------------------------------------------
# Command line


def write_case(tmp_path, gt, predictions):
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt) if not isinstance(gt, str) else gt)
    pred_path.write_text(json.dumps(predictions) if not isinstance(predictions, str)
                         else predictions)
    return gt_path, pred_path


def small_case():
    a = box(SHAPE, 2, 2, 10, 10)
    gt = gt_file([{"id": 1, "width": 40, "height": 40}], [gt_ann(7, 1, a, a)])
    return gt, [pred(1, a, a, 0.9), pred(1, a, a, 0.5)]


def test_cli_writes_metrics_json_and_prints_table(tmp_path):
    gt, predictions, _ = random_case(4)
    gt_path, pred_path = write_case(tmp_path, gt, predictions)
    out = tmp_path / "out" / "metrics.json"
    result = subprocess.run([sys.executable, "-m", "orcnn_core.cli", "evaluate", "--gt",
                             str(gt_path), "--predictions", str(pred_path), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| all |" in result.stdout and "| occluded |" in result.stdout
    metrics = json.loads(out.read_text())
    for key in ("AP_A", "AP50_A", "AP75_A", "AP_V", "AP50_V", "AP75_V", "AP_AV", "AP50_AV",
                "AP75_AV", "num_images", "num_gt", "num_predictions"):
        assert isinstance(metrics[key], (int, float)), key
    assert {"AP_A", "AP_V", "AP_AV", "AP_IV50", "AP50_AV", "num_gt"} <= set(
        metrics["occluded"])
    assert {"accuracy", "pairs", "undecided"} <= set(metrics["order"])
    assert set(metrics["breakdown"]) == {"occlusion", "truncation", "area"}
    assert metrics == json.loads(json.dumps(evaluation.evaluate(gt_path, pred_path)))


def test_cli_reads_every_layout_the_data_reader_reads(tmp_path, capsys):
    """A KINS file (category ids 4 and 2, visible masks as ``i_segm``), auto-detected."""
    car, person = box(SHAPE, 5, 4, 20, 28), box(SHAPE, 2, 20, 28, 26)
    car_visible = car & (1 - person)
    gt = {"images": [{"id": 1, "file_name": "k.png", "width": 40, "height": 40}],
          "categories": [{"id": 2, "name": "pedestrian"}, {"id": 4, "name": "car"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "a_segm": encode(car),
                           "i_segm": encode(car_visible)},
                          {"id": 2, "image_id": 1, "category_id": 2,
                           "a_segm": encode(person), "i_segm": encode(person)}]}
    predictions = [pred(1, car, car_visible, 0.9, category=4),
                   pred(1, person, person, 0.8, category=2)]
    gt_path, pred_path = write_case(tmp_path, gt, predictions)
    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--gt", str(gt_path), "--predictions", str(pred_path),
                     "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["AP_AV"] == pytest.approx(1.0) and metrics["num_gt"] == 2
    assert metrics["occluded"]["num_gt"] == 1 and metrics["order"]["relations"] == "masks"
    assert metrics["order"]["pairs"] == 1 and metrics["order"]["accuracy"] == 1.0
    assert "| all |" in capsys.readouterr().out


def bad_gt(mutate):
    gt, predictions = small_case()
    mutate(gt)
    return gt, predictions


def bad_pred(mutate):
    gt, predictions = small_case()
    mutate(predictions)
    return gt, predictions


def _polygon(gt):
    gt["annotations"][0]["segmentation"] = [[1, 1, 5, 1]]


def _gt_rle_size(gt):
    gt["annotations"][0]["visible_mask"]["size"] = [41, 40]


def _gt_padding_size(gt):
    gt["images"][0]["mask_padding"] = 2        # RLEs are image-sized, not 44 x 44


BAD_INPUTS = {
    "gt not json": (lambda: ('{"images": [', small_case()[1]), "gt.json", "not valid JSON"),
    "pred not json": (lambda: (small_case()[0], "[{]"), "pred.json", "not valid JSON"),
    "gt missing key": (lambda: bad_gt(lambda g: g["annotations"][0].pop("category_id")),
                       "gt.json: annotation 7", "key 'category_id' missing"),
    "pred missing key": (lambda: bad_pred(lambda p: p[1].pop("score")),
                         "pred.json: prediction #1", "key 'score' missing"),
    "pred unknown image": (lambda: bad_pred(lambda p: p[1].update(image_id=5)),
                           "pred.json: prediction #1", "image_id 5 is not in"),
    "pred unknown category": (lambda: bad_pred(lambda p: p[0].update(category_id=9)),
                              "pred.json: prediction #0", "category_id 9 is not in"),
    "gt unknown category": (lambda: bad_gt(lambda g: g["annotations"][0].update(
        category_id=9)), "gt.json: annotation 7", "category_id 9"),
    "gt rle size": (lambda: bad_gt(_gt_rle_size), "gt.json: annotation 7", "[41, 40]"),
    "gt rle vs padding": (lambda: bad_gt(_gt_padding_size), "gt.json: annotation 7",
                          "disagrees"),
    "pred rle size": (lambda: bad_pred(lambda p: p[1]["visible_mask"].update(size=[30, 30])),
                      "pred.json: prediction #1 (image_id 1): visible_mask", "[30, 30]"),
    "gt polygon": (lambda: bad_gt(_polygon), "gt.json: annotation 7: segmentation",
                   "at least 3"),
    "pred not list": (lambda: (small_case()[0], {"a": 1}), "pred.json", "list"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_bad_input_is_one_line_exit_2_and_no_output(name, tmp_path, capsys):
    make, place, message = BAD_INPUTS[name]
    gt_path, pred_path = write_case(tmp_path, *make())
    out = tmp_path / "metrics.json"
    code = cli.main(["evaluate", "--gt", str(gt_path), "--predictions", str(pred_path),
                     "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and place in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.json", "pred.json"]


def test_cli_bad_input_from_the_console_has_no_traceback(tmp_path):
    gt_path, pred_path = write_case(tmp_path, *bad_gt(_polygon))
    missing = tmp_path / "nope.json"
    for args in (["--gt", str(gt_path), "--predictions", str(pred_path)],
                 ["--gt", str(missing), "--predictions", str(pred_path)]):
        result = subprocess.run([sys.executable, "-m", "orcnn_core.cli", "evaluate", *args,
                                 "--out", str(tmp_path / "m.json")],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "m.json").exists()
    assert "nope.json: cannot read" in result.stderr


def published_order_case(with_order=True):
    """Three objects: A (id 1) lies on B (id 2) and on C (id 3); B lies on C only where A
    covers both (a relation the masks cannot show). Detections: A and B as in the GT, C
    claiming to be fully visible, and a false positive apart. The ``order`` entries are
    what the node would have published: the false positive first, A on B, C on B (wrong)."""
    a = box(SHAPE, 10, 10, 20, 30)
    b = box(SHAPE, 0, 0, 20, 20)
    c = box(SHAPE, 10, 15, 30, 35)
    b_visible, c_visible = b & (1 - a), c & (1 - a)
    gt = gt_file([{"id": 1, "width": 40, "height": 40}],
                 [gt_ann(1, 1, a, a), gt_ann(2, 1, b, b_visible), gt_ann(3, 1, c, c_visible)],
                 relations=[(1, 1, 2), (1, 1, 3), (1, 2, 3)])
    false_positive = box(SHAPE, 32, 0, 38, 6)
    # Listed C, FP, A, B: "index" is the instance's place in the published message.
    entries = [(pred(1, c, c, 0.8), {"index": 2, "pick_rank": 2, "free_probability": 0.9,
                                     "lies_on": [[1, 0.55]]}),
               (pred(1, false_positive, false_positive, 0.3),
                {"index": 3, "pick_rank": 0, "free_probability": 1.0, "lies_on": []}),
               (pred(1, a, a, 0.9), {"index": 0, "pick_rank": 1, "free_probability": 1.0,
                                     "lies_on": [[1, 0.97]]}),
               (pred(1, b, b_visible, 0.7), {"index": 1, "pick_rank": 3,
                                             "free_probability": 0.01, "lies_on": []})]
    predictions = []
    for entry, order in entries:
        if with_order:
            entry["order"] = order
        predictions.append(entry)
    return evaluation.evaluate_loaded(gt, predictions)["published_order"]


def test_published_order_from_order_entries_and_from_masks():
    counts = {"images": 1, "edges_judged": 2, "relations": 3, "pairs": 2,
              "pairs_not_shown": 1, "picks": 3}
    # Published edges A -> B (right) and C -> B (wrong); relations A on B (shown, found),
    # A on C (shown, missed), B on C (not shown, missed). Picks FP (matches nothing), A
    # (free), C (B still on it).
    published = published_order_case()
    assert published["model"] == {
        "edge_precision": 1 / 2, "edge_recall": 1 / 3, "pair_accuracy": 1 / 2,
        "first_pick_free": 0.0, "first3_free": 1 / 3, **counts}
    # Without order entries the node's rule runs on the predicted masks: A's visible part
    # covers 100 hidden pixels of B, C's 50 (C has no hidden part): edges A -> B and
    # C -> B again; A, C and FP are free for sure, B is not. Each pick is removed before
    # the next: A (1, score 0.9), then C (1, 0.8; B still has C on it), then B, nothing
    # left on it (1, 0.7), before FP (1, 0.3). Same edges, but the first pick is now A, a
    # free object, and of the first three picks A and B are free (C has B on it): 2/3.
    from_masks = published_order_case(with_order=False)
    assert from_masks["model"] == {
        "edge_precision": 1 / 2, "edge_recall": 1 / 3, "pair_accuracy": 1 / 2,
        "first_pick_free": 1.0, "first3_free": 2 / 3, **counts}
    # The GT masks through the same rule: A -> B (100 px), A -> C (150 px), nothing shows
    # B on C; picks A, then B and C, both free 1 once A is gone: the same score (GT masks
    # score 1), so the lower index, B, goes first; each is free when picked.
    for result in (published, from_masks):
        assert result["gt_masks"] == {
            "edge_precision": 1.0, "edge_recall": 2 / 3, "pair_accuracy": 1.0,
            "first_pick_free": 1.0, "first3_free": 1.0, **counts}


# ----------------------------------------------------------------------------------------
# The occluded evaluation against pycocotools; relations from masks at scale


@pytest.mark.parametrize("seed", [1, 3])
def test_occluded_ap_equals_pycocotools_with_non_occluded_gts_ignored(seed):
    gt, predictions, ref = random_case(seed)
    metrics = evaluation.evaluate_loaded(gt, predictions)["occluded"]
    images = {image["id"]: image for image in gt["images"]}
    for which, kind in enumerate(("A", "V")):
        dataset = {"images": [{"id": i, "height": im["height"] + 2 * im["mask_padding"],
                               "width": im["width"] + 2 * im["mask_padding"]}
                              for i, im in images.items()],
                   "categories": [{"id": c} for c in (1, 2, 3)],
                   "annotations": [{"id": ann_id, "image_id": image_id, "category_id": cat,
                                    "iscrowd": crowd, "area": float(amodal.sum()),
                                    "flag": int(not (amodal != visible).any()),
                                    "segmentation": encode((amodal, visible)[which]),
                                    "bbox": [0, 0, 1, 1]}
                                   for ann_id, image_id, cat, crowd, amodal, visible
                                   in ref["gt"]]}
        results = [{"image_id": i, "category_id": c, "score": s,
                    "segmentation": encode((a, v)[which])} for i, c, s, a, v in ref["dt"]]
        reference = coco_segm_stats(dataset, results, IgnoringEval)[0]
        assert abs(metrics[f"AP_{kind}"] - reference) <= 1e-4, kind


def test_relations_from_masks_of_4000_small_objects_take_seconds():
    """Only pairs with overlapping amodal boxes are compared: 4000 objects of 10 x 10
    pixels in a 1200 x 1200 image (a few hundred touching pairs)."""
    rng = np.random.default_rng(0)
    anns = []
    for k in range(4000):
        x, y = (int(v) for v in rng.integers(0, 1188, 2))
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1,
                     "segmentation": [[x, y, x + 10, y, x + 10, y + 10, x, y + 10]]})
    # Every other object lies on what it overlaps: its visible mask is all of it.
    gt = {"images": [{"id": 1, "width": 1200, "height": 1200}],
          "categories": [{"id": 1, "name": "a"}], "annotations": anns,
          "info": {"format": "d2s_amodal"}}
    dataset = parse_dataset(gt, "gt.json", need_file_names=False)
    start = time.perf_counter()
    relations = derive_relations(dataset.records[0])
    took = time.perf_counter() - start
    boxes = np.array([a["segmentation"][0][:2] for a in anns])
    touching = sum(int(np.sum((np.abs(boxes[i + 1:] - boxes[i]) < 10).all(axis=1)))
                   for i in range(len(boxes)))
    assert touching > 100 and relations == []  # visible = amodal: nothing hidden
    assert took < 5, f"{took:.1f} s"


def test_relations_from_masks_on_the_largest_canvas_stay_small_in_memory():
    """Two overlapping objects on a 32000 x 32000 canvas: no canvas is decoded (one would
    be 1 GB); the process stays far below that."""
    code = (
        "from orcnn_core.data import derive_relations, parse_dataset\n"
        "from orcnn_core.masks import rle_difference\n"
        "square = lambda x0, x1: [[x0, x0, x1, x0, x1, x1, x0, x1]]\n"
        "gt = {'images': [{'id': 1, 'width': 32000, 'height': 32000}],\n"
        "      'categories': [{'id': 1, 'name': 'a'}], 'info': {'format': 'd2s_amodal'},\n"
        "      'annotations': [{'id': k, 'image_id': 1, 'category_id': 1,\n"
        "                       'segmentation': square(*s)}\n"
        "                      for k, s in ((1, (100, 5000)), (2, (3000, 9000)))]}\n"
        "record = parse_dataset(gt, 'gt', need_file_names=False).records[0]\n"
        "upper, lower = record.instances\n"
        "lower.visible = rle_difference(lower.amodal, upper.amodal)  # upper lies on it\n"
        "peak = [line.split()[1] for line in open('/proc/self/status')\n"
        "        if line.startswith('VmHWM')][0]  # kB; ru_maxrss would include pytest's\n"
        "print(derive_relations(record), int(peak) // 1024)\n")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    relations, megabytes = result.stdout.rsplit(" ", 1)
    assert relations == "[(0, 1)]" and int(megabytes) < 400, result.stdout


@pytest.mark.parametrize("seed", [0, 2])
def test_relations_from_masks_equal_the_full_canvas_rule(seed):
    """derive_relations on RLEs and boxes equals the rule on decoded full-canvas masks."""
    gt, _, _ = random_case(seed)
    for record in parse_dataset(gt, "gt.json", need_file_names=False).records:
        counted = [k for k, inst in enumerate(record.instances) if not inst.iscrowd]
        amodal = {k: mask_utils.decode(record.instances[k].amodal) for k in counted}
        visible = {k: mask_utils.decode(record.instances[k].visible) for k in counted}
        expected = []
        for i in counted:
            for j in (j for j in counted if j > i and (amodal[i] & amodal[j]).any()):
                evidence = (int((visible[i] & amodal[j] & (1 - visible[j])).sum())
                            - int((visible[j] & amodal[i] & (1 - visible[i])).sum()))
                if evidence:
                    expected.append((i, j) if evidence > 0 else (j, i))
        assert sorted(derive_relations(record)) == sorted(expected)
