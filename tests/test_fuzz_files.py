"""Seeded fuzzing of annotation and prediction files.

Small valid files in each format (D2S amodal, COCOA, KINS, COCO, a predictions list) are
mutated at random: keys dropped, values of the wrong type, huge numbers, NaN/inf, broken
RLEs (bad counts, sizes that do not match), negative sizes, nested garbage, cut or
non-UTF-8 text. Each mutated file must either load (and then decode) or be refused with
exit code 2 and one line naming the file and the entry (annotation id or list index):
never a traceback, never a crash of the C code underneath.
"""

import copy
import json
import random
import re
import subprocess

import numpy as np
import pytest

from orcnn_core.cli import main
from orcnn_core.data import load_dataset
from orcnn_core.errors import InputError
from orcnn_core.masks import encode

H, W, P = 16, 20, 2  # image size and the mask padding of image 1


def rect(x0, y0, x1, y1, h=H, w=W):
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed(mask):
    """COCO uncompressed RLE: column-major run lengths, starting with zeros."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def d2s_amodal():
    """Two images (one padded by P, one not), RLE / uncompressed / polygon masks."""
    ch, cw = H + 2 * P, W + 2 * P
    a11, v11 = rect(2, 2, 12, 10, ch, cw), rect(2, 2, 8, 10, ch, cw)
    a12 = rect(7, 4, 16, 12, ch, cw)
    v21 = rect(3, 3, 9, 9)
    return {
        "info": {"format": "d2s_amodal"},
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H,
                    "mask_padding": P},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "box"}, {"id": 3, "name": "can"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 10, 8],
             "area": int(a11.sum()), "segmentation": encode(a11), "visible_mask": encode(v11),
             "invisible_mask": encode(a11 & (1 - v11)), "occlude_rate": 0.4},
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentation": uncompressed(a12), "visible_mask": encode(a12)},
            {"id": 21, "image_id": 2, "category_id": 1, "bbox": [3, 3, 8, 8],
             "segmentation": [[3, 3, 11, 3, 11, 11, 3, 11]], "visible_mask": encode(v21)},
            {"id": 22, "image_id": 2, "category_id": 3,
             "segmentation": encode(rect(12, 2, 18, 14))},
        ],
        "occlusion_relations": [{"image_id": 1, "occluder_id": 12, "occludee_id": 11}],
    }


def cocoa():
    return {
        "images": [{"id": 1, "file_name": "c.png", "width": W, "height": H}],
        "annotations": [{
            "id": 5, "image_id": 1, "depth_constraint": "1-2",
            "regions": [
                {"segmentation": [2, 2, 12, 2, 12, 10, 2, 10], "order": 1, "isStuff": 0},
                {"segmentation": [[6, 4, 16, 4, 16, 12, 6, 12]], "order": 2, "isStuff": 1,
                 "visible_mask": encode(rect(12, 4, 16, 12)),
                 "invisible_mask": encode(rect(6, 4, 12, 10))},
            ]}],
    }


def kins():
    return {
        "images": [{"id": 1, "file_name": "k.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "a_bbox": [1, 1, 10, 8],
             "a_segm": [[1, 1, 11, 1, 11, 9, 1, 9]], "i_segm": [[1, 1, 6, 1, 6, 9, 1, 9]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 2, 8, 10],
             "segmentation": encode(rect(5, 2, 13, 12)),
             "inmodal_seg": encode(rect(5, 2, 13, 12))},
        ],
    }


def coco():
    return {
        "images": [{"id": 4, "file_name": "m.png", "width": W, "height": H}],
        "categories": [{"id": 7, "name": "cup"}],
        "annotations": [
            {"id": 1, "image_id": 4, "category_id": 7, "iscrowd": 0, "bbox": [2, 2, 6, 6],
             "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
            {"id": 2, "image_id": 4, "category_id": 7, "iscrowd": 0,
             "segmentation": encode(rect(10, 4, 18, 14))},
        ],
    }


def predictions():
    """Results for d2s_amodal(): canvas-sized and image-sized RLEs, a polygon."""
    ch, cw = H + 2 * P, W + 2 * P
    return [
        {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, 10, 8],
         "segmentation": encode(rect(2, 2, 12, 10, ch, cw)),
         "visible_mask": encode(rect(2, 2, 8, 10, ch, cw))},
        {"image_id": 1, "category_id": 3, "score": 0.8,
         "segmentation": encode(rect(5, 2, 14, 10)), "visible_mask": encode(rect(5, 2, 14, 10))},
        {"image_id": 2, "category_id": 1, "score": 0.7,
         "segmentation": [[3, 3, 11, 3, 11, 11, 3, 11]]},
        {"image_id": 2, "category_id": 3, "score": 0.6,
         "segmentation": encode(rect(12, 2, 18, 14)), "invisible_mask": encode(rect(0, 0, 1, 1))},
    ]


# ------------------------------------------------------------------------------ mutations
WRONG_TYPES = [None, True, False, "x", "", [], {}, 1.5, -1, 0, [None], ["a", 1], {"a": 1}]
HUGE = [10 ** 12, 2 ** 63, -(2 ** 63), 10 ** 30, 1e308, 1e300, 4294967296]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
BAD_COUNTS = ["", "0", "a", "\u00e9\u00e9", "\x00\x7f", "0" * 5000, "PPPPPPPPPPP", "~~~~~~~~~",
              [-1, 5], [1, 2, 3], [10 ** 20], [0.5, 1], ["1", "2"], [[1]], None, 7, {}]
RLE_KEYS = ("segmentation", "visible_mask", "invisible_mask", "inmodal_seg", "a_segm",
            "i_segm")


def nested_garbage(rng, depth=40):
    value = rng.choice([None, 1, "x", 1e308])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def walk(obj, path=()):
    """Every (path, value) below ``obj``."""
    yield path, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk(value, path + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from walk(value, path + (index,))


def resolve(obj, path):
    for step in path:
        obj = obj[step]
    return obj


def rle_paths(obj):
    return [path for path, value in walk(obj)
            if isinstance(value, dict) and "counts" in value and "size" in value]


def mutate(obj, rng):
    """Apply one random mutation in place; returns (kind, path)."""
    paths = [p for p, _ in walk(obj) if p]
    kind = rng.choice(["drop", "type", "huge", "nonfinite", "negative", "garbage", "rle",
                       "rle", "rle", "string", "duplicate"])
    rles = rle_paths(obj)
    if kind == "rle" and rles:
        path = rng.choice(rles)
        rle = resolve(obj, path)
        change = rng.choice(["counts", "counts", "size", "size", "drop"])
        if change == "counts":
            rle["counts"] = copy.deepcopy(rng.choice(BAD_COUNTS))
            if isinstance(rle["counts"], str) and rng.random() < 0.3:
                rle["counts"] = encode(rect(0, 0, 3, 3))["counts"][:-1]  # cut short
        elif change == "size":
            size = rle["size"]
            h, w = size if isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) for v in size) else (H, W)
            rle["size"] = rng.choice([[h + 1, w], [h, w - 2], [h + 2, w + 2], [w, h], [-h, w],
                                      [0, 0], [h], [h, w, 1], ["16", w], [10 ** 9, 10 ** 9],
                                      [h + 1e-9, w], None, 16])
        else:
            del rle[rng.choice(["counts", "size"])]
        return f"rle {change}", path
    path = rng.choice(paths)
    parent, key = resolve(obj, path[:-1]), path[-1]
    if kind == "drop" and isinstance(parent, dict):
        del parent[key]
    elif kind == "drop":
        parent.pop(key)
    elif kind == "type":
        parent[key] = copy.deepcopy(rng.choice(WRONG_TYPES))
    elif kind == "huge":
        parent[key] = rng.choice(HUGE)
    elif kind == "nonfinite":
        parent[key] = rng.choice(NON_FINITE)
    elif kind == "negative":
        parent[key] = -rng.randint(1, 10 ** 6)
    elif kind == "garbage":
        parent[key] = nested_garbage(rng)
    elif kind == "string":
        parent[key] = rng.choice(["\u00e9\u4e2d", "\x00", "NaN", "1e999", "x" * 10000])
    else:  # duplicate: another value of the same list / dict
        siblings = list(parent.values() if isinstance(parent, dict) else parent)
        parent[key] = copy.deepcopy(rng.choice(siblings))
    return kind, path


def mutated_text(text: str, rng):
    """A damaged file rather than damaged JSON values."""
    kind = rng.choice(["cut", "bytes", "deep", "empty", "scalar"])
    if kind == "cut":
        return text[:rng.randrange(len(text))].encode()
    if kind == "bytes":
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, 0x00])
        return bytes(raw)
    if kind == "deep":
        return b"[" * 200000 + b"]" * 200000
    if kind == "empty":
        return b""
    return rng.choice([b"null", b"[]", b"42", b'"images"', b"NaN"])


# ---------------------------------------------------------------------------------- checks
LOCATOR = re.compile(r"annotation -?\d+|annotations\[\d+\]|image -?\d+|images\[\d+\]|"
                     r"categories\[\d+\]|category -?\d+|occlusion_relations\[\d+\]|"
                     r"prediction #\d+|region \d+")


def owner(obj, path):
    """(top-level key, index) of the list entry a mutation is in, or (key, None)."""
    if len(path) >= 2 and isinstance(path[1], int):
        return path[0], path[1]
    return (path[0] if path else None), None


def acceptable_locators(original, mutated, path, predictions_file):
    """Names that may stand for the mutated entry in the error message.

    An annotation may be blamed by its id (the original, or the mutated one), by its list
    index, or through another annotation of the same image (e.g. when both imply different
    mask paddings) or the relation that names it.
    """
    if predictions_file:
        return {f"prediction #{path[0]}"} if path and isinstance(path[0], int) else set()
    top, index = owner(original, path)
    if index is None or top not in original or index >= len(original[top]):
        return set()
    names = {f"{top}[{index}]"}
    entry, now = original[top][index], resolve(mutated, path[:2]) if _exists(mutated, path[:2]) \
        else None
    for source in (entry, now):
        if isinstance(source, dict) and isinstance(source.get("id"), int):
            singular = {"annotations": "annotation", "images": "image",
                        "categories": "category"}.get(top)
            if singular:
                names.add(f"{singular} {source['id']}")
    if isinstance(now, dict) and "id" in now and isinstance(mutated.get(top), list):
        # An id made equal to another's: either of the two may be called the duplicate.
        names |= {f"{top}[{k}]" for k, other in enumerate(mutated[top])
                  if isinstance(other, dict) and other.get("id") == now["id"]}
    if top == "annotations" and isinstance(entry, dict):
        image_id = entry.get("image_id")
        names |= {f"annotation {a['id']}" for a in original["annotations"]
                  if a.get("image_id") == image_id and "id" in a}
        names |= {f"occlusion_relations[{k}]"
                  for k, r in enumerate(original.get("occlusion_relations", []))
                  if entry.get("id") in (r.get("occluder_id"), r.get("occludee_id"))}
        names.add(f"image {image_id}")
    if top == "images" and isinstance(entry, dict):
        # A changed image is often noticed by its annotations (size, padding, image_id).
        names |= {f"annotation {a['id']}" for a in original["annotations"]
                  if a.get("image_id") == entry.get("id") and "id" in a}
        names |= {f"annotations[{k}]" for k, a in enumerate(original["annotations"])
                  if a.get("image_id") == entry.get("id")}
        names |= {f"occlusion_relations[{k}]"
                  for k, r in enumerate(original.get("occlusion_relations", []))
                  if r.get("image_id") == entry.get("id")}
    if top == "categories" and isinstance(entry, dict):
        names |= {f"annotation {a['id']}" for a in original["annotations"]
                  if a.get("category_id") == entry.get("id") and "id" in a}
    return names


def _exists(obj, path):
    try:
        resolve(obj, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def check_refusal(message, file_path, case, original=None, mutated=None, path=None,
                  predictions_file=False):
    """One line, naming the file, and the mutated entry when a list entry was changed."""
    assert "\n" not in message.strip(), f"{case}: not one line: {message!r}"
    assert str(file_path) in message, f"{case}: file not named: {message}"
    assert "Traceback" not in message, case
    if path is None or original is None:
        return
    allowed = acceptable_locators(original, mutated, path, predictions_file)
    if allowed:
        found = set(LOCATOR.findall(message))
        assert found & allowed, (f"{case}: names {sorted(found) or 'no entry'}, expected one "
                                 f"of {sorted(allowed)}: {message}")
    elif path and isinstance(path[0], str):
        assert path[0] in message or LOCATOR.search(message), f"{case}: {message}"


def fuzz_cases(make, seed, count):
    """(case name, original, mutated object or raw bytes, mutation path or None)."""
    rng = random.Random(seed)
    original = make()
    text = json.dumps(original)
    for i in range(count):
        if rng.random() < 0.08:
            yield f"seed {seed} case {i}: text", original, mutated_text(text, rng), None
            continue
        obj = copy.deepcopy(original)
        kind, path = mutate(obj, rng)
        if rng.random() < 0.25:  # sometimes two faults at once: blame either
            mutate(obj, rng)
            path = None
        yield f"seed {seed} case {i}: {kind} at {list(path or [])}", original, obj, path


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("fmt, make, count", [
    ("d2s_amodal", d2s_amodal, 150), ("cocoa", cocoa, 80), ("kins", kins, 80),
    ("coco", coco, 60),
])
def test_fuzzed_annotation_files_load_or_are_refused_by_name(tmp_path, fmt, make, count):
    refused = loaded = 0
    for case, original, mutated, path in fuzz_cases(make, seed=len(fmt), count=count):
        file_path = write(tmp_path, f"{fmt}.json", mutated)
        try:
            dataset = load_dataset(file_path, fmt=fmt if path is not None else "auto")
            for sample in dataset:  # masks decode lazily: they must decode too
                assert sample.amodal_masks.shape == sample.visible_masks.shape
            loaded += 1
        except InputError as exc:
            refused += 1
            check_refusal(str(exc), file_path, case, original,
                          mutated if not isinstance(mutated, bytes) else None, path)
    # The fuzzer must mostly produce bad files, and some harmless ones.
    assert refused > count // 2 and refused + loaded == count


def run_evaluate(capsys, gt_path, pred_path):
    code = main(["evaluate", "--gt", str(gt_path), "--predictions", str(pred_path)])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("target, count", [("gt", 100), ("predictions", 100)])
def test_fuzzed_evaluate_inputs_exit_2_with_one_line(tmp_path, capsys, target, count):
    make = d2s_amodal if target == "gt" else predictions
    refused = 0
    for case, original, mutated, path in fuzz_cases(make, seed=7 + len(target), count=count):
        if target == "gt":
            gt_path = write(tmp_path, "gt.json", mutated)
            pred_path = write(tmp_path, "pred.json", predictions())
            bad = gt_path
        else:
            gt_path = write(tmp_path, "gt.json", d2s_amodal())
            pred_path = write(tmp_path, "pred.json", mutated)
            bad = pred_path
        code, err = run_evaluate(capsys, gt_path, pred_path)
        assert code in (0, 2), f"{case}: exit code {code}: {err}"
        if code == 2:
            refused += 1
            assert err.startswith("orcnn-core evaluate: error: "), f"{case}: {err}"
            check_refusal(err, bad, case, original,
                          mutated if not isinstance(mutated, bytes) else None, path,
                          predictions_file=(target == "predictions"))
        else:
            assert err == "", f"{case}: {err}"
    assert refused > count // 2


def test_the_unmutated_files_are_valid(tmp_path, capsys):
    """Reference for the fuzz tests: every base file loads and scores."""
    for fmt, make in (("d2s_amodal", d2s_amodal), ("cocoa", cocoa), ("kins", kins),
                      ("coco", coco)):
        dataset = load_dataset(write(tmp_path, f"{fmt}.json", make()))
        assert dataset.format == fmt and sum(len(s) for s in dataset) >= 2
    code, err = run_evaluate(capsys, write(tmp_path, "gt.json", d2s_amodal()),
                             write(tmp_path, "pred.json", predictions()))
    assert code == 0 and err == ""


@pytest.mark.parametrize("target, content, expected", [
    ("gt", b"[" * 200000 + b"]" * 200000, "nested too deeply"),
    ("gt", "{\"images\": [{\"id\": 1, \"file_name\": \"\u00e9\"".encode("latin-1"),
     "not valid JSON"),
    ("predictions", [{"image_id": 1, "category_id": 1, "score": 0.5,
                      "segmentation": {"size": [H + 2 * P, W + 2 * P], "counts": "\u00e9"}}],
     r"prediction #0 \(image_id 1\): segmentation: corrupt RLE counts"),
], ids=["deep nesting", "cut latin-1 text", "non-ASCII RLE counts"])
def test_console_refusals_have_no_traceback(tmp_path, target, content, expected):
    """A few cases through the real ``orcnn-core`` process (console script, stderr)."""
    gt_path = write(tmp_path, "gt.json", content if target == "gt" else d2s_amodal())
    pred_path = write(tmp_path, "pred.json",
                      content if target == "predictions" else predictions())
    result = subprocess.run(["orcnn-core", "evaluate", "--gt", str(gt_path), "--predictions",
                             str(pred_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    bad = gt_path if target == "gt" else pred_path
    assert re.match(rf"orcnn-core evaluate: error: {re.escape(str(bad))}: .*{expected}",
                    lines[0]), lines[0]
