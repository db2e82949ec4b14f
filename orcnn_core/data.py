"""Amodal ground truth: the in-memory sample, loaders for the public formats, our writer.

One internal format, :class:`AmodalSample` (see docs/data_format.md), and one reader,
:func:`load_dataset`, for

- ``d2s_amodal``: D2S amodal and COCOA cls (flat COCO; ``segmentation`` amodal,
  ``visible_mask``, optional ``invisible_mask``; RLEs may be zero padded), which is also
  what :func:`write_amodal_coco` and ``orcnn-core synth`` write;
- ``cocoa``: the original COCO amodal (one entry per image with ``regions``);
- ``kins``: KINS (``segmentation``/``inmodal_seg`` or the 2020 ``a_segm``/``i_segm``);
- ``coco``: plain modal COCO (amodal := visible; samples marked ``modal_only``), the
  source of modal augmentation.

The whole file is validated when it is read, so a bad annotation fails at once with one
:class:`InputError` naming the file and the annotation; masks stay compressed (RLE) and
images on disk until a sample is asked for, so a training loop can hold a large set.
"""

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from orcnn_core.errors import InputError
from orcnn_core.fileio import atomic_write_json
from orcnn_core.masks import (
    MAX_CANVAS_SIDE,
    check_canvas,
    decode,
    encode,
    is_number,
    rle_size,
    short_repr,
    to_rle,
)

FORMATS = ("d2s_amodal", "cocoa", "kins", "coco")


@dataclass
class AmodalSample:
    """One image with amodal ground truth (the table in docs/data_format.md).

    Masks live on the padded canvas (H + 2P) x (W + 2P); image pixel (y, x) is canvas pixel
    (y + P, x + P). ``image`` may be None for samples read from a file: :meth:`load_image`
    then reads it from ``image_path``, so a data set need not hold all images in memory.
    """

    image: Optional[np.ndarray]
    boxes: np.ndarray
    labels: np.ndarray
    amodal_masks: np.ndarray
    visible_masks: np.ndarray
    mask_padding: int = 0
    occlusion_relations: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 2), np.int64))
    image_id: Optional[int] = None
    file_name: str = ""
    annotation_ids: np.ndarray = None
    image_path: Optional[str] = None
    # True for samples from modal-only annotations (plain COCO): their amodal masks are the
    # visible masks and nothing is known about occlusion.
    modal_only: bool = False

    def __post_init__(self):
        n = len(self.labels)
        if self.annotation_ids is None:
            self.annotation_ids = np.arange(1, n + 1, dtype=np.int64)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(n, 4)
        self.labels = np.asarray(self.labels, np.int64)
        self.annotation_ids = np.asarray(self.annotation_ids, np.int64).reshape(n)
        self.occlusion_relations = np.asarray(self.occlusion_relations,
                                              np.int64).reshape(-1, 2)
        if (self.amodal_masks.ndim != 3 or self.amodal_masks.shape[0] != n
                or self.visible_masks.shape != self.amodal_masks.shape):
            raise ValueError(f"masks must be {n} x H x W, got {self.amodal_masks.shape} and "
                             f"{self.visible_masks.shape}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask padding {self.mask_padding} leaves no image in a canvas "
                             f"of {self.amodal_masks.shape[1:]}")
        if self.image is not None and self.image.shape[:2] != (self.height, self.width):
            raise ValueError(f"image {self.image.shape} does not match the masks' image size "
                             f"{(self.height, self.width)}")

    @property
    def height(self) -> int:
        return self.amodal_masks.shape[1] - 2 * self.mask_padding

    @property
    def width(self) -> int:
        return self.amodal_masks.shape[2] - 2 * self.mask_padding

    def __len__(self) -> int:
        """Number of instances."""
        return len(self.labels)

    def __bool__(self) -> bool:
        # A sample without instances is still a sample (``if sample:`` must not skip it).
        return True

    @property
    def invisible_masks(self) -> np.ndarray:
        """Occluded parts: amodal AND NOT visible."""
        return self.amodal_masks & (1 - self.visible_masks)

    def crop_to_image(self, masks: np.ndarray) -> np.ndarray:
        """The image part (N x H x W) of canvas masks."""
        p = self.mask_padding
        return masks[:, p:p + self.height, p:p + self.width]

    def load_image(self) -> np.ndarray:
        """The RGB image: ``image`` when set, else read from ``image_path`` (not cached)."""
        if self.image is not None:
            return self.image
        if not self.image_path:
            raise InputError(f"image {self.image_id}: no image data and no image path")
        bgr = cv2.imread(str(self.image_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{self.image_path}: cannot read image (image {self.image_id})")
        if bgr.shape[:2] != (self.height, self.width):
            raise InputError(f"{self.image_path}: image is {bgr.shape[1]} x {bgr.shape[0]}, "
                             f"the annotations say {self.width} x {self.height} "
                             f"(image {self.image_id})")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mask_boxes(masks: np.ndarray, padding: int) -> np.ndarray:
    """xyxy boxes (float32 N x 4, image pixels) of canvas masks; zeros for empty masks."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(m.any(axis=0))
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    boxes[np.any(boxes != 0, axis=1)] -= padding
    return boxes


# --------------------------------------------------------------------------- reading


@dataclass
class _Record:
    """One image's validated annotations, masks kept as RLE on the canvas."""

    image_id: int
    file_name: str
    height: int
    width: int
    padding: int
    ann_ids: list
    labels: list
    boxes: list  # xyxy, image pixels
    amodal: list  # RLE dicts
    visible: list
    relations: list  # (upper index, lower index)


class AmodalDataset(Sequence):
    """The images of one annotation file; ``dataset[i]`` decodes an :class:`AmodalSample`.

    ``categories`` lists ``{"id", "name"}`` in label order: label ``k`` is
    ``categories[k - 1]`` (labels are contiguous 1..K whatever the file's category ids).
    Images are not read: call ``sample.load_image()``.
    """

    def __init__(self, path, fmt, categories, records, images_dir, modal_only):
        self.path = str(path)
        self.format = fmt
        self.categories = categories
        self.modal_only = modal_only
        self._records = records
        self._images_dir = Path(images_dir)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self._records[index]
        p = rec.padding
        hc, wc = rec.height + 2 * p, rec.width + 2 * p
        amodal = _decode_stack(rec.amodal, hc, wc)
        visible = _decode_stack(rec.visible, hc, wc)
        if p:
            # The padding lies outside the image: nothing there is visible.
            visible[:, :p] = 0
            visible[:, -p:] = 0
            visible[:, :, :p] = 0
            visible[:, :, -p:] = 0
        return AmodalSample(
            image=None, boxes=np.asarray(rec.boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(rec.labels, np.int64), amodal_masks=amodal,
            visible_masks=visible, mask_padding=p,
            occlusion_relations=np.asarray(rec.relations, np.int64).reshape(-1, 2),
            image_id=rec.image_id, file_name=rec.file_name,
            annotation_ids=np.asarray(rec.ann_ids, np.int64),
            image_path=str(self._images_dir / rec.file_name), modal_only=self.modal_only)

    @property
    def image_ids(self) -> list:
        return [r.image_id for r in self._records]


def _decode_stack(rles, hc, wc) -> np.ndarray:
    if not rles:
        return np.zeros((0, hc, wc), np.uint8)
    return np.stack([decode(r) for r in rles])


def load_dataset(path, images_dir=None, fmt: str = "auto") -> AmodalDataset:
    """Read and validate an amodal (or modal) annotation file.

    ``fmt`` is one of :data:`FORMATS` or ``"auto"`` (``regions`` → cocoa; ``a_segm``,
    ``i_segm`` or ``inmodal_seg`` → kins; ``visible_mask``, ``invisible_mask``,
    ``mask_padding``, ``occlusion_relations`` or our writer's ``info`` → d2s_amodal;
    else modal coco).
    ``images_dir`` defaults to the file's folder. Crowd annotations are skipped.
    Returns a sequence of :class:`AmodalSample` (decoded on access). Bad input raises
    :class:`InputError` naming the file and the annotation.
    """
    path = Path(path)
    src = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{src}: cannot read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{src}: not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{src}: JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise InputError(f"{src}: top level must be a JSON object")
    for key in ("images", "annotations"):
        if key not in obj:
            raise InputError(f"{src}: key '{key}' missing")
        if not isinstance(obj[key], list):
            raise InputError(f"{src}: '{key}' must be a list")
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt not in FORMATS:
        raise InputError(f"{src}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")

    images = _parse_images(obj["images"], src)
    if fmt == "cocoa":
        categories, specs, relations = _cocoa_specs(obj, images, src)
    else:
        categories, cat_label = _parse_categories(obj, src)
        specs = _flat_specs(obj["annotations"], fmt, images, cat_label, src)
        relations = _parse_relations(obj.get("occlusion_relations", []), src)
    records = _build_records(images, specs, relations, src)
    return AmodalDataset(path, fmt, categories, records,
                         path.parent if images_dir is None else images_dir,
                         modal_only=(fmt == "coco"))


def detect_format(obj: dict) -> str:
    """Name of the format of a parsed annotation file (see :func:`load_dataset`)."""
    anns = [a for a in obj.get("annotations", []) if isinstance(a, dict)]
    if any("regions" in a for a in anns):
        return "cocoa"
    if any(k in a for a in anns for k in ("a_segm", "i_segm", "inmodal_seg")):
        return "kins"
    info = obj.get("info")
    if ((isinstance(info, dict) and info.get("format") == "d2s_amodal")
            or "occlusion_relations" in obj
            or any(k in a for a in anns for k in ("visible_mask", "invisible_mask"))
            or any(isinstance(i, dict) and "mask_padding" in i
                   for i in obj.get("images", []))):
        return "d2s_amodal"
    return "coco"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _get(entry, key, where):
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be a JSON object")
    if key not in entry:
        raise InputError(f"{where}: key '{key}' missing")
    return entry[key]


def _get_int(entry, key, where, minimum=None):
    value = _get(entry, key, where)
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InputError(f"{where}: '{key}' must be an integer{bound}, got "
                         f"{short_repr(value)}")
    return int(value)


@dataclass
class _Image:
    image_id: int
    file_name: str
    height: int
    width: int
    padding: Optional[int]


def _parse_images(entries, src) -> dict:
    images = {}
    for k, entry in enumerate(entries):
        where = f"{src}: images[{k}]"
        image_id = _get_int(entry, "id", where)
        where = f"{src}: image {image_id}"
        if image_id in images:
            raise InputError(f"{where}: duplicate image id")
        file_name = _get(entry, "file_name", where)
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f"{where}: 'file_name' must be a non-empty string")
        padding = None
        if "mask_padding" in entry:
            padding = _get_int(entry, "mask_padding", where, minimum=0)
        height, width = _get_int(entry, "height", where, 1), _get_int(entry, "width", where, 1)
        check_canvas(height, width, padding or 0, where)
        images[image_id] = _Image(image_id, file_name, height, width, padding)
    return images


def _parse_categories(obj, src):
    """Categories sorted by id, and category id -> label 1..K."""
    entries = _get(obj, "categories", src)
    if not isinstance(entries, list):
        raise InputError(f"{src}: 'categories' must be a list")
    cats = {}
    for k, entry in enumerate(entries):
        where = f"{src}: categories[{k}]"
        cat_id = _get_int(entry, "id", where)
        if cat_id in cats:
            raise InputError(f"{src}: category {cat_id}: duplicate category id")
        name = entry.get("name", str(cat_id))
        cats[cat_id] = str(name)
    categories = [{"id": c, "name": cats[c]} for c in sorted(cats)]
    return categories, {c["id"]: k + 1 for k, c in enumerate(categories)}


@dataclass
class _Spec:
    """One instance as read from the file, before conversion to canvas RLEs."""

    image_id: int
    ann_id: int
    label: int
    where: str
    amodal: object  # a COCO segmentation (RLE or polygons), as read
    amodal_key: str
    visible: object = None  # None: visible := amodal
    visible_key: str = ""
    invisible: object = None
    bbox: object = None


# Amodal / visible / box keys of each flat format, in order of preference.
_FLAT_KEYS = {
    "d2s_amodal": (("segmentation",), ("visible_mask",), ("bbox",)),
    "kins": (("segmentation", "a_segm"), ("inmodal_seg", "i_segm"), ("bbox", "a_bbox")),
    "coco": (("segmentation",), (), ("bbox",)),
}


def _flat_specs(entries, fmt, images, cat_label, src) -> list:
    amodal_keys, visible_keys, box_keys = _FLAT_KEYS[fmt]
    specs, seen = [], set()
    for k, entry in enumerate(entries):
        ann_id = _get_int(entry, "id", f"{src}: annotations[{k}]")
        where = f"{src}: annotation {ann_id}"
        if ann_id in seen:
            raise InputError(f"{where}: duplicate annotation id")
        seen.add(ann_id)
        if entry.get("iscrowd", 0):
            continue
        image_id = _get_int(entry, "image_id", where)
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        cat_id = _get_int(entry, "category_id", where)
        if cat_id not in cat_label:
            raise InputError(f"{where}: category_id {cat_id} is not in 'categories'")
        amodal_key = _first_key(entry, amodal_keys, where, required=True)
        visible_key = _first_key(entry, visible_keys, where, required=(fmt == "kins"))
        box_key = _first_key(entry, box_keys, where, required=False)
        specs.append(_Spec(
            image_id, ann_id, cat_label[cat_id], where, entry[amodal_key], amodal_key,
            entry[visible_key] if visible_key else None, visible_key,
            entry.get("invisible_mask") if fmt == "d2s_amodal" else None,
            _check_bbox(entry[box_key], f"{where}: {box_key}") if box_key else None))
    return specs


def _first_key(entry, keys, where, required):
    for key in keys:
        if key in entry and entry[key] is not None:
            return key
    if required:
        raise InputError(f"{where}: key {' or '.join(repr(k) for k in keys)} missing")
    return ""


def _check_bbox(bbox, where):
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(is_number(v, 2 * MAX_CANVAS_SIDE) for v in bbox)
            or bbox[2] < 0 or bbox[3] < 0):
        raise InputError(f"{where}: a box must be [x, y, width, height] with width, "
                         f"height >= 0 (each at most {2 * MAX_CANVAS_SIDE} in size), got "
                         f"{short_repr(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _parse_relations(entries, src) -> list:
    """Raw occluder/occludee annotation id pairs, checked later against the annotations."""
    if not isinstance(entries, list):
        raise InputError(f"{src}: 'occlusion_relations' must be a list")
    pairs = []
    for k, entry in enumerate(entries):
        where = f"{src}: occlusion_relations[{k}]"
        pairs.append((_get_int(entry, "image_id", where),
                      _get_int(entry, "occluder_id", where),
                      _get_int(entry, "occludee_id", where), where))
    return pairs


def _cocoa_specs(obj, images, src):
    """Specs and relations of the original COCOA file (class-agnostic: object / stuff)."""
    categories = [{"id": 1, "name": "object"}, {"id": 2, "name": "stuff"}]
    specs, relations = [], []
    next_id = 1
    for k, entry in enumerate(obj["annotations"]):
        where = f"{src}: annotations[{k}]"
        image_id = _get_int(entry, "image_id", where)
        if "id" in entry and _is_int(entry["id"]):
            where = f"{src}: annotation {entry['id']}"
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        regions = _get(entry, "regions", where)
        if not isinstance(regions, list):
            raise InputError(f"{where}: 'regions' must be a list")
        order_id = {}
        for r, region in enumerate(regions):
            rwhere = f"{where}: region {r}"
            segm = _get(region, "segmentation", rwhere)
            if isinstance(segm, list) and segm and not isinstance(segm[0], list):
                segm = [segm]  # COCOA stores one polygon as a flat list
            if "order" in region:
                order = _get_int(region, "order", rwhere)
                if order in order_id:
                    raise InputError(f"{rwhere}: duplicate 'order' {order}")
                order_id[order] = next_id
            specs.append(_Spec(image_id, next_id, 2 if region.get("isStuff") else 1, rwhere,
                               segm, "segmentation", region.get("visible_mask"),
                               "visible_mask", region.get("invisible_mask")))
            next_id += 1
        constraint = entry.get("depth_constraint", "") or ""
        if not isinstance(constraint, str):
            raise InputError(f"{where}: 'depth_constraint' must be a string like '1-2,1-3'")
        for pair in filter(None, (p.strip() for p in constraint.split(","))):
            parts = pair.split("-")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise InputError(f"{where}: depth_constraint {pair!r} is not 'front-back'")
            front, back = (int(p) for p in parts)
            for order in (front, back):
                if order not in order_id:
                    raise InputError(f"{where}: depth_constraint {pair!r} names order "
                                     f"{order}, which no region has")
            relations.append((image_id, order_id[front], order_id[back], where))
    return categories, specs, relations


def _image_padding(image, specs, src) -> int:
    """The image's mask padding: given, or read off the first RLE (D2S amodal style)."""
    if image.padding is not None:
        return image.padding
    for spec in specs:
        for segm, key in ((spec.amodal, spec.amodal_key), (spec.visible, spec.visible_key),
                          (spec.invisible, "invisible_mask")):
            size = rle_size(segm, f"{spec.where}: {key}")
            if size is None or size == (image.height, image.width):
                continue
            dh, dw = size[0] - image.height, size[1] - image.width
            if dh != dw or dh < 0 or dh % 2:
                raise InputError(
                    f"{spec.where}: {key}: RLE size {list(size)} disagrees with image "
                    f"{image.image_id} ({image.height} x {image.width}): not a zero padding "
                    f"of the same whole number of pixels on every side")
            return dh // 2
    return 0


def _build_records(images, specs, relations, src) -> list:
    by_image = {image_id: [] for image_id in images}
    for spec in specs:
        by_image[spec.image_id].append(spec)
    index_of = {}  # annotation id -> (image id, index in its image)
    records = []
    for image_id, image in images.items():
        p = _image_padding(image, by_image[image_id], src)
        hc, wc = image.height + 2 * p, image.width + 2 * p
        rec = _Record(image_id, image.file_name, image.height, image.width, p,
                      [], [], [], [], [], [])
        for spec in by_image[image_id]:
            amodal = to_rle(spec.amodal, hc, wc, f"{spec.where}: {spec.amodal_key}", p)
            visible = amodal if spec.visible is None else to_rle(
                spec.visible, hc, wc, f"{spec.where}: {spec.visible_key}", p)
            if spec.invisible is not None:  # checked, then derived again on use
                to_rle(spec.invisible, hc, wc, f"{spec.where}: invisible_mask", p)
            box = spec.bbox
            if box is None:
                x, y, w, h = mask_utils.toBbox(
                    {"size": amodal["size"], "counts": amodal["counts"].encode()}).tolist()
                box = [x - p, y - p, x - p + w, y - p + h] if w else [0.0] * 4
            index_of[spec.ann_id] = (image_id, len(rec.ann_ids))
            rec.ann_ids.append(spec.ann_id)
            rec.labels.append(spec.label)
            rec.boxes.append(box)
            rec.amodal.append(amodal)
            rec.visible.append(visible)
        records.append(rec)
    by_id = {r.image_id: r for r in records}
    for image_id, upper, lower, where in relations:
        if image_id not in by_id:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        for ann_id in (upper, lower):
            if index_of.get(ann_id, (None,))[0] != image_id:
                raise InputError(f"{where}: annotation {ann_id} is not an annotation of "
                                 f"image {image_id}")
        if upper == lower:
            raise InputError(f"{where}: annotation {upper} cannot lie on itself")
        by_id[image_id].relations.append((index_of[upper][1], index_of[lower][1]))
    return records


# --------------------------------------------------------------------------- writing


def write_amodal_coco(samples: Iterable[AmodalSample], path, categories=None,
                      info: Optional[dict] = None) -> dict:
    """Write samples as D2S-amodal-style COCO JSON (docs/data_format.md), atomically.

    ``samples`` is consumed once (a generator is fine: only the RLEs are kept).
    ``categories`` lists ``{"id", "name"}`` in label order (label k is
    ``categories[k - 1]``); by default category id = label. Image and annotation ids are
    the samples' own when they are unique positive integers, else renumbered from 1.
    Returns the written object.
    """
    images, annotations, relations = [], [], []
    cat_of = None
    if categories is not None:
        cat_of = {k + 1: int(c["id"]) for k, c in enumerate(categories)}
    labels_seen = set()
    for sample in samples:
        p = sample.mask_padding
        ann_base = len(annotations)
        image_id = None if sample.image_id is None else int(sample.image_id)
        images.append({"id": image_id, "file_name": sample.file_name,
                       "width": sample.width, "height": sample.height, "mask_padding": p})
        for i in range(len(sample)):
            amodal = sample.amodal_masks[i]
            visible = sample.visible_masks[i]
            area = int(amodal.sum())
            x0, y0, x1, y1 = (float(v) for v in sample.boxes[i])
            label = int(sample.labels[i])
            labels_seen.add(label)
            if cat_of is not None and label not in cat_of:
                raise ValueError(f"image {sample.image_id}: label {label} has no category")
            annotations.append({
                "id": int(sample.annotation_ids[i]), "image_id": len(images) - 1,
                "category_id": label if cat_of is None else cat_of[label], "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area,
                "segmentation": encode(amodal), "visible_mask": encode(visible),
                "invisible_mask": encode(amodal & (1 - visible)),
                "occlude_rate": 1.0 - float(visible.sum()) / area if area else 0.0})
        for upper, lower in sample.occlusion_relations.tolist():
            relations.append((len(images) - 1, ann_base + upper, ann_base + lower))
    _renumber(images, annotations)
    for entry in annotations:  # "image_id" held the image's position until now
        entry["image_id"] = images[entry["image_id"]]["id"]
    if categories is None:
        categories = [{"id": k, "name": f"class_{k}"} for k in sorted(labels_seen)]
    obj = {
        "info": dict(info or {}, format="d2s_amodal"),
        "images": images,
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
        "annotations": annotations,
        "occlusion_relations": [
            {"image_id": images[i]["id"], "occluder_id": annotations[u]["id"],
             "occludee_id": annotations[v]["id"]} for i, u, v in relations],
    }
    atomic_write_json(path, obj)
    return obj


def _renumber(images, annotations):
    """Keep the samples' ids when they are unique positive integers, else number from 1."""
    for entries in (images, annotations):
        ids = [e["id"] for e in entries]
        if not (all(_is_int(i) and i > 0 for i in ids) and len(set(ids)) == len(ids)):
            for k, entry in enumerate(entries):
                entry["id"] = k + 1
