"""`orcnn-core evaluate` on real public annotation files (tests/data/, sources in
tests/data/README.md) against pycocotools on masks converted here, by each format's own
rules:

- COCOA (amodalAPI): one entry per image and annotator; only the first annotator of an
  image is ground truth (the reference evaluation's "for multi gt, simply use first
  annotation"); region ``segmentation`` (a polygon) is amodal, ``visible_mask`` is visible
  and is given only for occluded regions (else visible = amodal); ``depth_constraint``
  "1-2" says the region of ``order`` 1 lies on the one of ``order`` 2.
- UOAIS / OSD-Amodal: COCO annotations with ``segmentation`` amodal, ``visible_mask``.
- KINS: 2019 ``segmentation`` amodal, ``inmodal_seg`` visible; 2020 ``a_segm`` amodal,
  ``i_segm`` visible, ``oco_id`` (occlusion cluster, 0 = overlaps nothing) and ``ico_id``
  (order in the cluster from the front, 1 = in front). No KINS sample could be found under a
  licence that allows shipping it, so these files are laid out here from the real COCOA
  masks.

Predictions are the ground truth with dropped, shifted and spurious instances, so that AP is
well below 1; AP_A and AP_V must equal COCOeval's segm AP on the same masks.
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from orcnn_core import evaluation

DATA = Path(__file__).resolve().parent / "data"
COCOA = DATA / "cocoa" / "cocoa_val2014_sample.json"
UOAIS = DATA / "uoais" / "osd_amodal_sample.json"
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------
# Masks by each format's rules (pycocotools only, nothing from orcnn_core)


def rle_to_str(rle) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode() if isinstance(counts, bytes) else counts}


def polygon_rle(polygon, height, width) -> dict:
    """RLE of a COCOA polygon: a flat coordinate list, or a list of such lists."""
    polygons = polygon if polygon and isinstance(polygon[0], list) else [polygon]
    return rle_to_str(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def encode(mask) -> dict:
    return rle_to_str(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def decode(rle) -> np.ndarray:
    return mask_utils.decode(rle).astype(np.uint8)


def first_annotators(cocoa: dict) -> list:
    """The COCOA entries that are ground truth: the first per image, in file order."""
    seen, entries = set(), []
    for entry in cocoa["annotations"]:
        if entry["image_id"] not in seen:
            seen.add(entry["image_id"])
            entries.append(entry)
    return entries


def cocoa_instances(cocoa: dict) -> list:
    """Ground-truth instances of a COCOA file: image id, category (1 object, 2 stuff),
    amodal and visible RLEs, order, polygon."""
    size = {image["id"]: (image["height"], image["width"]) for image in cocoa["images"]}
    instances = []
    for entry in first_annotators(cocoa):
        height, width = size[entry["image_id"]]
        for region in entry["regions"]:
            amodal = polygon_rle(region["segmentation"], height, width)
            instances.append({
                "image_id": entry["image_id"], "category_id": 2 if region["isStuff"] else 1,
                "amodal": amodal, "visible": region.get("visible_mask") or amodal,
                "order": region.get("order"), "polygon": region["segmentation"]})
    return instances


def uoais_instances(uoais: dict) -> list:
    return [{"image_id": ann["image_id"], "category_id": ann["category_id"],
             "amodal": ann["segmentation"], "visible": ann["visible_mask"]}
            for ann in uoais["annotations"]]


# ----------------------------------------------------------------------------------------
# Predictions and the pycocotools reference


def shifted(mask, dy, dx) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels; what leaves the image is lost."""
    out = np.zeros_like(mask)
    height, width = mask.shape
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def perturbed_predictions(instances: list, seed: int) -> list:
    """The ground truth as results: about 15 % dropped, the rest shifted by 0 to 3 pixels
    (amodal and visible independently), one in five with an extra, far-shifted duplicate."""
    rng = np.random.default_rng(seed)
    results = []
    for inst in instances:
        amodal, visible = decode(inst["amodal"]), decode(inst["visible"])
        for copy in range(2):
            if copy == 0 and rng.random() < 0.15 or copy == 1 and rng.random() >= 0.2:
                continue
            reach = 3 if copy == 0 else 40
            dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
            vy, vx = (int(v) for v in rng.integers(-1, 2, 2))
            results.append({
                "image_id": inst["image_id"], "category_id": inst["category_id"],
                "score": round(float(rng.random()), 3),
                "segmentation": encode(shifted(amodal, dy, dx)),
                "visible_mask": encode(shifted(visible, dy + vy, dx + vx))})
    return results


def exact_predictions(instances: list) -> list:
    return [{"image_id": inst["image_id"], "category_id": inst["category_id"],
             "score": 1.0 - 0.001 * k, "segmentation": inst["amodal"],
             "visible_mask": inst["visible"]} for k, inst in enumerate(instances)]


def reference_ap(images: list, instances: list, results: list, key: str) -> float:
    """COCOeval segm AP (IoU 0.50:0.95, all areas, 100 detections) with the ground truth's
    ``key`` masks ("amodal" or "visible") and the results' matching masks."""
    mask_of = {"amodal": "segmentation", "visible": "visible_mask"}[key]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i["id"], "height": i["height"], "width": i["width"]} for i in images],
        "categories": [{"id": c} for c in sorted({i["category_id"] for i in instances})],
        "annotations": [{"id": k + 1, "image_id": inst["image_id"],
                         "category_id": inst["category_id"], "iscrowd": 0,
                         "segmentation": inst[key],
                         "area": float(mask_utils.area(inst[key])),
                         "bbox": mask_utils.toBbox(inst[key]).tolist()}
                        for k, inst in enumerate(instances)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": r["image_id"], "category_id": r["category_id"],
                          "score": r["score"], "segmentation": r[mask_of]} for r in results])
        run = COCOeval(gt, dt, "segm")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return float(run.stats[0])


def run_cli(tmp_path, gt_path, results, *extra) -> dict:
    """Metrics of ``orcnn-core evaluate --gt gt_path --predictions ... --out ...``."""
    pred_path, out_path = tmp_path / "predictions.json", tmp_path / "metrics.json"
    pred_path.write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "-m", "orcnn_core.cli", "evaluate", "--gt",
                           str(gt_path), "--predictions", str(pred_path), "--out",
                           str(out_path), *extra],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(out_path.read_text())


def assert_ap_matches(metrics, images, instances, results):
    for kind, key in (("A", "amodal"), ("V", "visible")):
        expected = reference_ap(images, instances, results, key)
        assert 0.2 < expected < 0.95, (kind, expected)   # the perturbation bites
        found = metrics[f"AP_{kind}"]
        assert abs(found - expected) <= TOLERANCE, (kind, found, expected)


# ----------------------------------------------------------------------------------------
# COCOA


def test_cocoa_ap_matches_pycocotools(tmp_path):
    cocoa = json.loads(COCOA.read_text())
    instances = cocoa_instances(cocoa)
    results = perturbed_predictions(instances, seed=1)
    metrics = run_cli(tmp_path, COCOA, results)
    assert metrics["num_images"] == 5 and metrics["num_gt"] == len(instances) == 48
    assert_ap_matches(metrics, cocoa["images"], instances, results)
    # The file states no depth_constraint: relations come from the masks.
    assert metrics["order"]["relations"] == "masks"


def overlapping_pairs(instances: list) -> list:
    """Index pairs (i, j), i < j, of instances of one image whose amodal masks overlap."""
    pairs = []
    for i, a in enumerate(instances):
        for j in range(i + 1, len(instances)):
            b = instances[j]
            if a["image_id"] == b["image_id"] and mask_utils.area(
                    mask_utils.merge([a["amodal"], b["amodal"]], intersect=True)) > 0:
                pairs.append((i, j))
    return pairs


def test_cocoa_depth_constraint_gives_order_metrics():
    """With COCOA's depth_constraint (here: every amodally overlapping pair, the lower
    ``order`` in front, as COCOA defines it), order metrics come from the annotations:
    exact predictions score every relation the masks show, and all of them right."""
    cocoa = json.loads(COCOA.read_text())
    instances = cocoa_instances(cocoa)
    constraints = {entry["image_id"]: [] for entry in cocoa["annotations"]}
    for i, j in overlapping_pairs(instances):
        front, back = sorted((instances[i], instances[j]), key=lambda inst: inst["order"])
        constraints[front["image_id"]].append(f"{front['order']}-{back['order']}")
    for entry in cocoa["annotations"]:
        entry["depth_constraint"] = ",".join(constraints[entry["image_id"]])
    metrics = evaluation.evaluate_loaded(cocoa, exact_predictions(instances))
    order = metrics["order"]
    assert order["relations"] == "annotations"
    assert order["pairs"] + order["skipped"] == sum(map(len, constraints.values())) > 10
    assert order["correct"] == order["pairs"] > 0 and order["undecided"] == 0
    assert metrics["AP_A"] == metrics["AP_V"] == 1.0


def second_annotator(entry: dict, dx: float) -> dict:
    """Another annotator's entry for the same image: the polygons moved by ``dx``."""
    regions = [{"segmentation": [v + dx if k % 2 == 0 else v
                                 for k, v in enumerate(region["segmentation"])],
                "isStuff": region["isStuff"], "order": region["order"], "name": "moved"}
               for region in entry["regions"]]
    return {"image_id": entry["image_id"], "id": entry["id"] + 100000, "author": "second",
            "regions": regions}


def test_cocoa_first_annotator_is_ground_truth_unless_all_asked(tmp_path):
    """An image annotated twice: by default only the first annotator is ground truth, so
    exact predictions of it score 1; ``--annotators all`` keeps both."""
    cocoa = json.loads(COCOA.read_text())
    instances = cocoa_instances(cocoa)
    cocoa["annotations"] += [second_annotator(entry, 60.0) for entry in cocoa["annotations"]]
    gt_path = tmp_path / "two_annotators.json"
    gt_path.write_text(json.dumps(cocoa))
    results = exact_predictions(instances)
    metrics = run_cli(tmp_path, gt_path, results)
    assert metrics["num_gt"] == len(instances)
    assert metrics["AP_A"] == metrics["AP_V"] == 1.0
    merged = run_cli(tmp_path, gt_path, results, "--annotators", "all")
    assert merged["num_gt"] == 2 * len(instances)
    assert merged["AP_A"] < 1.0


# ----------------------------------------------------------------------------------------
# UOAIS (OSD-Amodal)


def test_uoais_ap_matches_pycocotools(tmp_path):
    uoais = json.loads(UOAIS.read_text())
    instances = uoais_instances(uoais)
    results = perturbed_predictions(instances, seed=2)
    metrics = run_cli(tmp_path, UOAIS, results)
    assert metrics["num_images"] == 5 and metrics["num_gt"] == len(instances) == 44
    assert_ap_matches(metrics, uoais["images"], instances, results)
    assert metrics["order"]["relations"] == "masks"
    assert metrics["occluded"]["num_gt"] == sum(a["occluded_rate"] > 0
                                                for a in uoais["annotations"])


# ----------------------------------------------------------------------------------------
# KINS layouts (masks of the COCOA file)


def nested(polygon) -> list:
    return polygon if polygon and isinstance(polygon[0], list) else [polygon]


def kins_images(cocoa: dict) -> list:
    return [{"id": i["id"], "file_name": i["file_name"], "height": i["height"],
             "width": i["width"]} for i in cocoa["images"]]


def test_kins_2019_layout_reads_inmodal_seg_as_visible():
    cocoa = json.loads(COCOA.read_text())
    instances = cocoa_instances(cocoa)
    kins = {"images": kins_images(cocoa),
            "categories": [{"id": 1, "name": "object"}, {"id": 2, "name": "stuff"}],
            "annotations": [{"id": k + 1, "image_id": inst["image_id"],
                             "category_id": inst["category_id"], "iscrowd": 0,
                             "segmentation": nested(inst["polygon"]),
                             "bbox": mask_utils.toBbox(inst["amodal"]).tolist(),
                             "inmodal_seg": inst["visible"],
                             "inmodal_bbox": mask_utils.toBbox(inst["visible"]).tolist()}
                            for k, inst in enumerate(instances)]}
    results = perturbed_predictions(instances, seed=3)
    metrics = evaluation.evaluate_loaded(kins, results)
    assert_ap_matches(metrics, kins["images"], instances, results)


def on_top(a: dict, b: dict) -> bool:
    """a lies on b: a's visible mask covers more of b's hidden part than conversely."""
    def cover(upper, lower):
        hidden = decode(lower["amodal"]) & (1 - decode(lower["visible"]))
        return int((decode(upper["visible"]) & hidden).sum())
    return cover(a, b) > cover(b, a)


def occlusion_ids(instances: list) -> tuple:
    """KINS-2020 ``oco_id`` (cluster of amodally overlapping instances, 0 for none) and
    ``ico_id`` (1 + the longest chain of instances lying on it within its cluster)."""
    pairs = overlapping_pairs(instances)
    cluster = list(range(len(instances)))

    def root(i):
        while cluster[i] != i:
            i = cluster[i]
        return i
    for i, j in pairs:
        cluster[root(j)] = root(i)
    above = {i: set() for i in range(len(instances))}
    for i, j in pairs:
        if on_top(instances[i], instances[j]):
            above[j].add(i)
        elif on_top(instances[j], instances[i]):
            above[i].add(j)
    depth = [1] * len(instances)
    for _ in instances:                       # longest path in a small graph
        depth = [1 + max((depth[u] for u in above[i]), default=0) for i in range(len(depth))]
    overlapping = {i for pair in pairs for i in pair}
    oco = [root(i) + 1 if i in overlapping else 0 for i in range(len(instances))]
    ico = [depth[i] if i in overlapping else 0 for i in range(len(instances))]
    return oco, ico


def test_kins_2020_layout_carries_relations():
    cocoa = json.loads(COCOA.read_text())
    instances = cocoa_instances(cocoa)
    oco, ico = occlusion_ids(instances)
    kins = {"images": kins_images(cocoa),
            "categories": [{"id": 1, "name": "object"}, {"id": 2, "name": "stuff"}],
            "annotations": [{"id": k + 1, "image_id": inst["image_id"],
                             "category_id": inst["category_id"], "iscrowd": 0,
                             "a_segm": nested(inst["polygon"]),
                             "a_bbox": mask_utils.toBbox(inst["amodal"]).tolist(),
                             "i_segm": inst["visible"],
                             "i_bbox": mask_utils.toBbox(inst["visible"]).tolist(),
                             "oco_id": oco[k], "ico_id": ico[k]}
                            for k, inst in enumerate(instances)]}
    assert max(ico) >= 2
    results = perturbed_predictions(instances, seed=4)
    metrics = evaluation.evaluate_loaded(kins, results)
    assert_ap_matches(metrics, kins["images"], instances, results)
    assert metrics["order"]["relations"] == "annotations"
    exact = evaluation.evaluate_loaded(kins, exact_predictions(instances))["order"]
    assert exact["correct"] == exact["pairs"] > 0
