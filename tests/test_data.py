"""Loaders and writer of amodal annotations (orcnn_core.data), on fixtures written here from
the published descriptions of each format; expected masks are drawn with numpy."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from orcnn_core.data import AmodalSample, load_dataset, parse_dataset, write_amodal_coco
from orcnn_core.errors import InputError
from orcnn_core.masks import decode, encode
from helpers import assert_same_arrays

W, H = 40, 30  # fixture image size


def rect(x0, y0, x1, y1, h=H, w=W):
    """uint8 mask with pixels [x0, x1) x [y0, y1) set (clipped to the h x w canvas)."""
    m = np.zeros((h, w), np.uint8)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return m


def uncompressed(mask):
    """COCO uncompressed RLE: column-major run lengths, starting with zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def poly_mask(poly, h, w, offset=0):
    """Reference raster of a polygon (pycocotools, the COCO definition)."""
    shifted = [[v + offset for v in poly]]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(shifted, h, w)))


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_image(path, w=W, h=H, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)
    return img[..., ::-1]  # RGB


def same_sample(a: AmodalSample, b: AmodalSample):
    assert a.image_id == b.image_id and a.file_name == b.file_name
    assert a.mask_padding == b.mask_padding
    assert_same_arrays(a, b, ("amodal_masks", "visible_masks", "labels", "boxes",
                              "annotation_ids", "occlusion_relations"))


def round_trip(ds, tmp_path):
    """load -> write ours -> load: identical samples and categories."""
    out = tmp_path / "ours.json"
    write_amodal_coco(ds, out, categories=ds.categories)
    again = load_dataset(out, images_dir=tmp_path)
    assert again.format == "d2s_amodal"
    assert again.categories == ds.categories
    assert len(again) == len(ds)
    for a, b in zip(ds, again):
        same_sample(a, b)
    return again


# --------------------------------------------------------------------------- fixtures

P = 8  # D2S fixture padding
A_AMODAL = rect(5 + P, 4 + P, 20 + P, 16 + P, H + 2 * P, W + 2 * P)
B_POLY = [15, 10, 30, 10, 30, 25, 15, 25]
C_AMODAL = rect(32 + P, -6 + P, 46 + P, 8 + P, H + 2 * P, W + 2 * P)  # cut by the border


def d2s_fixture(tmp_path, **image_extra):
    """Two images: A under B (B a polygon, no visible mask), C cut by the right border."""
    hc, wc = H + 2 * P, W + 2 * P
    b_amodal = poly_mask(B_POLY, hc, wc, P)
    a_visible = A_AMODAL & (1 - b_amodal)
    c_visible = C_AMODAL.copy()
    c_visible[:, P + W:] = 0
    c_visible[:P] = 0
    obj = {
        "images": [dict({"id": 11, "file_name": "a.png", "width": W, "height": H},
                        **image_extra),
                   {"id": 12, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 3, "name": "cup"}, {"id": 5, "name": "box"},
                       {"id": 9, "name": "can"}],
        "annotations": [
            {"id": 7, "image_id": 11, "category_id": 3, "bbox": [5, 4, 15, 12],
             "segmentation": uncompressed(A_AMODAL), "visible_mask": encode(a_visible),
             "invisible_mask": encode(A_AMODAL & (1 - a_visible)), "occlude_rate": 0.1},
            {"id": 8, "image_id": 11, "category_id": 5, "segmentation": [B_POLY]},
            {"id": 9, "image_id": 12, "category_id": 9, "bbox": [32, -6, 14, 14],
             "segmentation": encode(C_AMODAL), "visible_mask": encode(c_visible)},
        ],
        "occlusion_relations": [{"image_id": 11, "occluder_id": 8, "occludee_id": 7}],
    }
    return obj, {"a_visible": a_visible, "b_amodal": b_amodal, "c_visible": c_visible}


def test_d2s_amodal_padding_inferred_and_round_trip(tmp_path):
    obj, ref = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    assert ds.format == "d2s_amodal" and not ds.modal_only
    assert [c["name"] for c in ds.categories] == ["cup", "box", "can"]
    a, b = ds[0], ds[1]
    assert a.mask_padding == P and (a.height, a.width) == (H, W)
    np.testing.assert_array_equal(a.labels, [1, 2])  # contiguous labels of ids 3, 5
    np.testing.assert_array_equal(a.amodal_masks[0], A_AMODAL)
    np.testing.assert_array_equal(a.visible_masks[0], ref["a_visible"])
    np.testing.assert_array_equal(a.amodal_masks[1], ref["b_amodal"])
    np.testing.assert_array_equal(a.visible_masks[1], ref["b_amodal"])  # not occluded
    np.testing.assert_array_equal(a.occlusion_relations, [[1, 0]])
    np.testing.assert_array_equal(a.annotation_ids, [7, 8])
    np.testing.assert_array_equal(a.boxes[0], [5, 4, 20, 16])
    # No bbox in the file: the box of the amodal mask.
    np.testing.assert_array_equal(a.boxes[1], [15, 10, 30, 25])
    np.testing.assert_array_equal(b.amodal_masks[0], C_AMODAL)
    np.testing.assert_array_equal(b.visible_masks[0], ref["c_visible"])
    np.testing.assert_array_equal(b.boxes[0], [32, -6, 46, 8])
    np.testing.assert_array_equal(b.invisible_masks[0], C_AMODAL & (1 - ref["c_visible"]))
    round_trip(ds, tmp_path)


def test_d2s_amodal_explicit_padding_and_auto_equals_explicit(tmp_path):
    obj, _ = d2s_fixture(tmp_path, mask_padding=P)
    obj["images"][1]["mask_padding"] = P
    path = write_json(tmp_path / "d2s.json", obj)
    for a, b in zip(load_dataset(path), load_dataset(path, fmt="d2s_amodal")):
        same_sample(a, b)


def test_written_file_matches_the_spec(tmp_path):
    obj, ref = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    written = write_amodal_coco(ds, tmp_path / "ours.json", categories=ds.categories)
    on_disk = json.loads((tmp_path / "ours.json").read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert on_disk["images"][0]["mask_padding"] == P
    ann = {a["id"]: a for a in on_disk["annotations"]}
    assert ann[7]["category_id"] == 3 and ann[9]["category_id"] == 9
    assert ann[7]["bbox"] == [5, 4, 15, 12]
    assert ann[7]["area"] == int(A_AMODAL.sum())
    occluded = int((A_AMODAL & (1 - ref["a_visible"])).sum())
    assert ann[7]["occlude_rate"] == pytest.approx(occluded / A_AMODAL.sum())
    assert ann[8]["occlude_rate"] == 0.0
    invisible = ann[7]["invisible_mask"]
    np.testing.assert_array_equal(
        mask_utils.decode({"size": invisible["size"], "counts": invisible["counts"].encode()}),
        A_AMODAL & (1 - ref["a_visible"]))
    assert on_disk["occlusion_relations"] == [
        {"image_id": 11, "occluder_id": 8, "occludee_id": 7}]


def test_cocoa_original(tmp_path):
    front = [10, 5, 30, 5, 30, 20, 10, 20]  # order 1
    back = [2, 2, 20, 2, 20, 15, 2, 15]  # order 2, partly under front
    stuff = [0, 0, 39, 0, 39, 29, 0, 29]  # order 3, the table
    back_amodal = poly_mask(back, H, W)
    front_amodal = poly_mask(front, H, W)
    back_visible = back_amodal & (1 - front_amodal)
    obj = {
        "images": [{"id": 5, "file_name": "c.jpg", "width": W, "height": H}],
        "annotations": [{
            "image_id": 5, "id": 1, "depth_constraint": "1-2,1-3",
            "regions": [
                {"segmentation": back, "order": 2, "name": "book", "isStuff": 0,
                 "visible_mask": encode(back_visible),
                 "invisible_mask": encode(back_amodal & front_amodal)},
                {"segmentation": front, "order": 1, "name": "cup", "isStuff": 0},
                {"segmentation": [stuff], "order": 3, "name": "table", "isStuff": 1},
            ]}],
    }
    ds = load_dataset(write_json(tmp_path / "cocoa.json", obj))
    assert ds.format == "cocoa"
    s = ds[0]
    np.testing.assert_array_equal(s.labels, [1, 1, 2])  # object, object, stuff
    np.testing.assert_array_equal(s.amodal_masks[0], back_amodal)
    np.testing.assert_array_equal(s.visible_masks[0], back_visible)
    np.testing.assert_array_equal(s.visible_masks[1], front_amodal)
    np.testing.assert_array_equal(s.amodal_masks[2], poly_mask(stuff, H, W))
    # "1-2": order 1 (region 1) in front of order 2 (region 0); "1-3" likewise.
    np.testing.assert_array_equal(s.occlusion_relations, [[1, 0], [1, 2]])
    assert len(set(s.annotation_ids.tolist())) == 3
    round_trip(ds, tmp_path)


@pytest.mark.parametrize("keys", [
    ("segmentation", "bbox", "inmodal_seg", "inmodal_bbox"),  # KINS
    ("a_segm", "a_bbox", "i_segm", "i_bbox"),  # KINS 2020
])
def test_kins(tmp_path, keys):
    seg, box, iseg, ibox = keys
    car = [4, 6, 28, 6, 28, 20, 4, 20]
    person = [20, 2, 26, 2, 26, 28, 20, 28]  # in front of the car
    car_amodal, person_amodal = poly_mask(car, H, W), poly_mask(person, H, W)
    car_visible = car_amodal & (1 - person_amodal)
    obj = {
        "images": [{"id": 1, "file_name": "k.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "cyclist"}, {"id": 2, "name": "pedestrian"},
                       {"id": 4, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, seg: [car], box: [4, 6, 24, 14],
             iseg: encode(car_visible), ibox: [4, 6, 24, 14], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, seg: [person], box: [20, 2, 6, 26],
             iseg: [person], ibox: [20, 2, 6, 26]},
        ],
    }
    ds = load_dataset(write_json(tmp_path / "kins.json", obj))
    assert ds.format == "kins"
    s = ds[0]
    np.testing.assert_array_equal(s.labels, [3, 2])
    np.testing.assert_array_equal(s.amodal_masks, [car_amodal, person_amodal])
    np.testing.assert_array_equal(s.visible_masks, [car_visible, person_amodal])
    np.testing.assert_array_equal(s.boxes, [[4, 6, 28, 20], [20, 2, 26, 28]])
    round_trip(ds, tmp_path)


def test_plain_coco_is_modal_only(tmp_path):
    mug = rect(3, 3, 15, 12)
    obj = {
        "images": [{"id": 3, "file_name": "m.png", "width": W, "height": H}],
        "categories": [{"id": 47, "name": "cup"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 47, "segmentation": encode(mug),
             "bbox": [3, 3, 12, 9], "area": 108, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 47, "segmentation": [[20, 5, 35, 5, 27, 20]],
             "bbox": [20, 5, 15, 15], "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 47, "segmentation": uncompressed(mug),
             "bbox": [3, 3, 12, 9], "iscrowd": 1},  # crowd: skipped
        ],
    }
    ds = load_dataset(write_json(tmp_path / "coco.json", obj))
    assert ds.format == "coco" and ds.modal_only
    s = ds[0]
    assert s.modal_only and len(s) == 2
    np.testing.assert_array_equal(s.amodal_masks, s.visible_masks)
    np.testing.assert_array_equal(s.amodal_masks[0], mug)
    np.testing.assert_array_equal(s.amodal_masks[1], poly_mask([20, 5, 35, 5, 27, 20], H, W))
    assert len(s.occlusion_relations) == 0
    round_trip(ds, tmp_path)


def test_images_are_read_lazily(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    path = write_json(tmp_path / "d2s.json", obj)
    # Evaluation needs no images: loading works without them.
    ds = load_dataset(path)
    assert ds[0].image is None
    with pytest.raises(InputError, match="a.png"):
        ds[0].load_image()
    rgb = write_image(tmp_path / "a.png")
    np.testing.assert_array_equal(ds[0].load_image(), rgb)
    write_image(tmp_path / "b.png", w=W + 1)
    with pytest.raises(InputError, match=r"b.png.*image 12"):
        ds[1].load_image()
    # images_dir elsewhere
    (tmp_path / "imgs").mkdir()
    rgb = write_image(tmp_path / "imgs" / "a.png", seed=3)
    np.testing.assert_array_equal(load_dataset(path, images_dir=tmp_path / "imgs")[0]
                                  .load_image(), rgb)


def test_writer_is_atomic(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))

    def failing():
        yield ds[0]
        raise InputError("stop")

    out = tmp_path / "out" / "gt.json"
    with pytest.raises(InputError):
        write_amodal_coco(failing(), out)
    assert not out.exists() and not list(tmp_path.glob("out/*"))


def test_writer_renumbers_clashing_ids(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    s = ds[0]
    twice = [s, s]  # same image and annotation ids twice
    written = write_amodal_coco(twice, tmp_path / "two.json")
    assert [i["id"] for i in written["images"]] == [1, 2]
    assert [a["id"] for a in written["annotations"]] == [1, 2, 3, 4]
    assert [a["image_id"] for a in written["annotations"]] == [1, 1, 2, 2]
    assert written["occlusion_relations"] == [
        {"image_id": 1, "occluder_id": 2, "occludee_id": 1},
        {"image_id": 2, "occluder_id": 4, "occludee_id": 3}]
    assert [c["id"] for c in written["categories"]] == [1, 2]  # labels as ids
    again = load_dataset(tmp_path / "two.json")
    np.testing.assert_array_equal(again[1].amodal_masks, s.amodal_masks)


def test_records_keep_the_masks_as_given(tmp_path):
    """What evaluation reads: masks as the file gives them (None where it gives none)."""
    obj, ref = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    assert ds.relations_given and [r.image_id for r in ds.records] == [11, 12]
    a, b = ds.records[0].instances
    assert (a.ann_id, a.label, a.iscrowd, a.occlude_rate) == (7, 1, False, 0.1)
    np.testing.assert_array_equal(decode(a.invisible), A_AMODAL & (1 - ref["a_visible"]))
    assert b.visible is None and b.invisible is None and b.occlude_rate is None
    assert ds.records[0].relations == [(1, 0)] and ds.records[0].padding == P
    del obj["occlusion_relations"]
    assert not load_dataset(write_json(tmp_path / "d2s.json", obj)).relations_given


def test_crowd_regions_are_checked_and_kept_out_of_samples(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    _ann(obj, 7)["iscrowd"] = 1
    obj["occlusion_relations"].append({"image_id": 11, "occluder_id": 7, "occludee_id": 8})
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    assert [i.iscrowd for i in ds.records[0].instances] == [True, False]
    assert ds.records[0].relations == [(1, 0), (0, 1)]
    s = ds[0]
    np.testing.assert_array_equal(s.annotation_ids, [8])
    assert s.occlusion_relations.shape == (0, 2)  # both name the crowd region
    _ann(obj, 7)["category_id"] = 4  # a crowd region is checked like any annotation
    with pytest.raises(InputError, match=r"annotation 7: category_id 4 is not in"):
        load_dataset(write_json(tmp_path / "d2s.json", obj))


def test_images_need_no_file_name_where_none_is_read(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    del obj["images"][0]["file_name"]
    with pytest.raises(InputError, match=r"image 11: key 'file_name' missing"):
        parse_dataset(obj, "gt.json")
    ds = parse_dataset(obj, "gt.json", need_file_names=False)
    assert ds.records[0].file_name == "" and ds[1].image_path.endswith("b.png")
    with pytest.raises(InputError, match=r"image 11: no image data and no image path"):
        ds[0].load_image()


# --------------------------------------------------------------------------- bad input


def _d2s_with(tmp_path, edit):
    obj, _ = d2s_fixture(tmp_path)
    edit(obj)
    return write_json(tmp_path / "broken_gt.json", obj)


def _ann(obj, ann_id):
    return next(a for a in obj["annotations"] if a["id"] == ann_id)


BAD = {
    "missing segmentation": (lambda o: _ann(o, 7).pop("segmentation"),
                             r"annotation 7: key 'segmentation' missing"),
    "unknown image": (lambda o: _ann(o, 7).update(image_id=99),
                      r"annotation 7: image_id 99 is not in 'images'"),
    "unknown category": (lambda o: _ann(o, 8).update(category_id=4),
                         r"annotation 8: category_id 4 is not in 'categories'"),
    "rle size vs image": (lambda o: _ann(o, 9)["visible_mask"].update(size=[H, W]),
                          r"annotation 9: visible_mask: RLE size \[30, 40\] disagrees"),
    "padding not whole": (lambda o: [_ann(o, 9).update(segmentation=encode(rect(
        0, 0, 3, 3, H + 3, W + 3))), _ann(o, 9).pop("visible_mask")],
        r"annotation 9: segmentation: RLE size \[33, 43\] disagrees with image 12"),
    "short polygon": (lambda o: _ann(o, 8).update(segmentation=[[1, 1, 5, 5]]),
                      r"annotation 8: segmentation: polygon with 2 points"),
    "corrupt counts": (lambda o: _ann(o, 7)["visible_mask"].update(counts="#"),
                       r"annotation 7: visible_mask: corrupt RLE"),
    "bad bbox": (lambda o: _ann(o, 7).update(bbox=[1, 2, 3]), r"annotation 7: bbox"),
    "duplicate id": (lambda o: _ann(o, 8).update(id=7), r"annotation 7: duplicate"),
    "missing annotation id": (lambda o: _ann(o, 8).pop("id"),
                              r"annotations\[1\]: key 'id' missing"),
    "missing images": (lambda o: o.pop("images"), r"key 'images' missing"),
    "missing categories": (lambda o: o.pop("categories"), r"key 'categories' missing"),
    "image without size": (lambda o: o["images"][0].pop("width"),
                           r"image 11: key 'width' missing"),
    "relation to unknown annotation": (
        lambda o: o["occlusion_relations"][0].update(occludee_id=9),
        r"occlusion_relations\[0\]: annotation 9 is not an annotation of image 11"),
    "negative padding": (lambda o: o["images"][0].update(mask_padding=-1),
                         r"image 11: 'mask_padding' must be an integer >= 0"),
    "bad iscrowd": (lambda o: _ann(o, 8).update(iscrowd="yes"),
                    r"annotation 8: 'iscrowd' must be 0 or 1, got 'yes'"),
    "bad occlude_rate": (lambda o: _ann(o, 7).update(occlude_rate=1.5),
                         r"annotation 7: 'occlude_rate' must be a number in \[0, 1\]"),
    "id beyond 64 bits": (lambda o: _ann(o, 8).update(id=2 ** 63),
                          r"annotations\[1\]: 'id' 9223372036854775808 does not fit in 64 bits"),
    "paddings disagree": (lambda o: _ann(o, 9).update(visible_mask=encode(rect(
        0, 0, 3, 3, H + 2 * P + 2, W + 2 * P + 2))),
        r"annotation 9: visible_mask: RLE size \[48, 58\] disagrees with the segmentation "
        r"of annotation 9 in image 12: it implies mask padding 9, that one 8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_and_annotation(tmp_path, case):
    edit, pattern = BAD[case]
    path = _d2s_with(tmp_path, edit)
    with pytest.raises(InputError, match=pattern) as info:
        load_dataset(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["{", "[1, 2]", "", "\xff\xfe"])
def test_malformed_json(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=r"bad.json: (not valid JSON|top level)"):
        load_dataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.json: cannot read"):
        load_dataset(tmp_path / "nope.json")


def test_unknown_format(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    with pytest.raises(InputError, match="unknown format 'lvis'"):
        load_dataset(write_json(tmp_path / "x.json", obj), fmt="lvis")


@pytest.mark.parametrize("constraint,pattern", [
    ("1-5", r"depth_constraint '1-5' names order 5"),
    ("1+2", r"depth_constraint '1\+2' is not 'front-back'"),
])
def test_cocoa_bad_depth_constraint(tmp_path, constraint, pattern):
    obj = {"images": [{"id": 5, "file_name": "c.jpg", "width": W, "height": H}],
           "annotations": [{"image_id": 5, "id": 4, "depth_constraint": constraint,
                            "regions": [{"segmentation": [1, 1, 9, 1, 9, 9], "order": 1},
                                        {"segmentation": [2, 2, 8, 2, 8, 8], "order": 2}]}]}
    path = write_json(tmp_path / "cocoa_bad.json", obj)
    with pytest.raises(InputError, match=pattern) as info:
        load_dataset(path)
    assert "cocoa_bad.json: annotation 4" in str(info.value)


def test_cocoa_bad_region_names_region(tmp_path):
    obj = {"images": [{"id": 5, "file_name": "c.jpg", "width": W, "height": H}],
           "annotations": [{"image_id": 5, "id": 4,
                            "regions": [{"segmentation": [1, 1, 9, 1, 9, 9]},
                                        {"segmentation": [2, 2, 8, 2],
                                         "visible_mask": encode(rect(0, 0, 2, 2))}]}]}
    with pytest.raises(InputError, match=r"cocoa.json: annotation 4: region 1: "
                                         r"segmentation: polygon with 2 points"):
        load_dataset(write_json(tmp_path / "cocoa.json", obj))


def test_kins_needs_visible_mask(tmp_path):
    obj = {"images": [{"id": 1, "file_name": "k.png", "width": W, "height": H}],
           "categories": [{"id": 1, "name": "car"}],
           "annotations": [{"id": 3, "image_id": 1, "category_id": 1,
                            "a_segm": [[1, 1, 9, 1, 9, 9]]}]}
    with pytest.raises(InputError, match=r"kins.json: annotation 3: key 'inmodal_seg' or "
                                         r"'i_segm' missing"):
        load_dataset(write_json(tmp_path / "kins.json", obj), fmt="kins")


def test_relations_source_and_ignore_flags_are_read_and_checked(tmp_path):
    obj, _ = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    assert ds.relations_source == "given"
    obj["relations_source"] = "derived"
    _ann(obj, 8)["ignore"] = 1
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    assert ds.relations_source == "derived" and ds.records[0].relations == [(1, 0)]
    assert [i.ignore for i in ds.records[0].instances] == [False, True]
    assert ds[0].annotation_ids.tolist() == [7] and len(ds[0].occlusion_relations) == 0
    obj["relations_source"] = "guessed"
    with pytest.raises(InputError, match="'relations_source' must be one of given, derived, "
                                         "got 'guessed'"):
        load_dataset(write_json(tmp_path / "bad.json", obj))
    obj["relations_source"] = "given"
    _ann(obj, 8)["ignore"] = 2
    with pytest.raises(InputError, match="annotation 8: 'ignore' must be 0 or 1"):
        load_dataset(write_json(tmp_path / "bad.json", obj))


def test_synthetic_samples_write_their_relations(tmp_path):
    """Samples whose relations are known (the file states them) keep the key."""
    obj, _ = d2s_fixture(tmp_path)
    ds = load_dataset(write_json(tmp_path / "d2s.json", obj))
    written = write_amodal_coco(ds, tmp_path / "out.json", categories=ds.categories)
    assert written["relations_source"] == "given"
    assert written["occlusion_relations"] == [{"image_id": 11, "occluder_id": 8,
                                               "occludee_id": 7}]
