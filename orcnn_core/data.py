"""Amodal ground truth: the in-memory sample, loaders for the public formats, our writer.

One internal format, :class:`AmodalSample` (see docs/data_format.md), and one reader,
:func:`load_dataset` (:func:`parse_dataset` for a parsed file), for

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
The validated file, whatever its layout, is a list of :class:`ImageRecord` (with their
:class:`InstanceRecord`, crowd regions included): what orcnn_core.evaluation scores
against, so training, prediction and evaluation read every file alike.
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


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class InstanceRecord:
    """One annotated instance as read, independent of the file's layout.

    Masks are compressed RLEs (str counts) on the image's padded canvas, exactly as the file
    gives them: ``visible`` / ``invisible`` are None where the file has none, so that each
    consumer applies its own documented default (samples: visible := amodal cleared in the
    padding; evaluation: visible := amodal, see docs/evaluation.md).
    """

    ann_id: int
    label: int  # 1..K, see AmodalDataset.categories
    box: list  # xyxy, image pixels: the file's box, else the amodal mask's
    amodal: dict
    visible: Optional[dict] = None
    invisible: Optional[dict] = None
    iscrowd: bool = False  # a COCO crowd region: evaluation only, samples leave it out
    occlude_rate: Optional[float] = None  # as given by the file, in [0, 1]


@dataclass
class ImageRecord:
    """One image's validated annotations, instances in file order."""

    image_id: int
    file_name: str  # "" when the file names none (allowed only where no image is read)
    height: int
    width: int
    padding: int
    instances: list = field(default_factory=list)  # InstanceRecord
    relations: list = field(default_factory=list)  # (upper, lower) indices into instances


class AmodalDataset(Sequence):
    """The images of one annotation file; ``dataset[i]`` decodes an :class:`AmodalSample`.

    ``categories`` lists ``{"id", "name"}`` in label order: label ``k`` is
    ``categories[k - 1]`` (labels are contiguous 1..K whatever the file's category ids).
    ``records`` holds the validated :class:`ImageRecord` of every image (what evaluation
    reads); ``relations_given`` is False when the file states no occlusion relations at
    all (then evaluation derives them from the masks). Images are not read: call
    ``sample.load_image()``.
    """

    def __init__(self, path, fmt, categories, records, images_dir, relations_given):
        self.path = str(path)
        self.format = fmt
        self.categories = categories
        self.modal_only = fmt == "coco"
        self.records = records
        self.relations_given = relations_given
        self._images_dir = Path(images_dir)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self.records[index]
        kept = [inst for inst in rec.instances if not inst.iscrowd]
        p = rec.padding
        hc, wc = rec.height + 2 * p, rec.width + 2 * p
        amodal = _decode_stack([inst.amodal for inst in kept], hc, wc)
        visible = _decode_stack([inst.amodal if inst.visible is None else inst.visible
                                 for inst in kept], hc, wc)
        if p:
            # The padding lies outside the image: nothing there is visible.
            visible[:, :p] = 0
            visible[:, -p:] = 0
            visible[:, :, :p] = 0
            visible[:, :, -p:] = 0
        return AmodalSample(
            image=None, boxes=np.asarray([inst.box for inst in kept], np.float32).reshape(-1, 4),
            labels=np.asarray([inst.label for inst in kept], np.int64), amodal_masks=amodal,
            visible_masks=visible, mask_padding=p,
            occlusion_relations=_sample_relations(rec), image_id=rec.image_id,
            file_name=rec.file_name,
            annotation_ids=np.asarray([inst.ann_id for inst in kept], np.int64),
            image_path=str(self._images_dir / rec.file_name) if rec.file_name else None,
            modal_only=self.modal_only)

    @property
    def image_ids(self) -> list:
        return [r.image_id for r in self.records]


def _decode_stack(rles, hc, wc) -> np.ndarray:
    if not rles:
        return np.zeros((0, hc, wc), np.uint8)
    return np.stack([decode(r) for r in rles])


def _sample_relations(rec: ImageRecord) -> np.ndarray:
    """The relations among the instances a sample keeps (crowd regions are left out)."""
    position = {}
    for i, inst in enumerate(rec.instances):
        if not inst.iscrowd:
            position[i] = len(position)
    pairs = [(position[u], position[v]) for u, v in rec.relations
             if u in position and v in position]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- reading


def load_json(path, what: str):
    """Parsed JSON of ``path`` (``what``: e.g. "annotation", for the message); a missing
    file or bad JSON raises :class:`InputError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} file ({exc.strerror or exc})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno} col {exc.colno}: "
                         f"{exc.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as exc:  # bad UTF-8, or an integer beyond Python's digit limit
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def load_dataset(path, images_dir=None, fmt: str = "auto") -> AmodalDataset:
    """Read and validate an amodal (or modal) annotation file (see :func:`parse_dataset`).

    ``images_dir`` defaults to the file's folder. Returns a sequence of
    :class:`AmodalSample` (decoded on access). Bad input raises :class:`InputError` naming
    the file and the annotation.
    """
    path = Path(path)
    return parse_dataset(load_json(path, "annotation"), path, fmt,
                         path.parent if images_dir is None else images_dir)


def parse_dataset(obj, source, fmt: str = "auto", images_dir=".",
                  need_file_names: bool = True) -> AmodalDataset:
    """Validate a parsed annotation file (``source`` names it in messages) into a data set.

    ``fmt`` is one of :data:`FORMATS` or ``"auto"`` (``regions`` → cocoa; ``a_segm``,
    ``i_segm`` or ``inmodal_seg`` → kins; ``visible_mask``, ``invisible_mask``,
    ``mask_padding``, ``occlusion_relations`` or our writer's ``info`` → d2s_amodal;
    else modal coco). With ``need_file_names`` False, images may lack ``file_name``
    (evaluation reads no images). Crowd annotations are checked and kept in the records but
    left out of the samples.
    """
    src = str(source)
    if not isinstance(obj, dict):
        raise InputError(f"{src}: top level must be a JSON object with 'images' and "
                         f"'annotations'")
    for key in ("images", "annotations"):
        require_list(obj, key, src)
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt not in FORMATS:
        raise InputError(f"{src}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")

    images = _parse_images(obj["images"], src, need_file_names)
    if fmt == "cocoa":
        categories, specs, relations = _cocoa_specs(obj, images, src)
        given = any(isinstance(a, dict) and "depth_constraint" in a for a in obj["annotations"])
    else:
        categories, cat_label = _parse_categories(obj, src)
        specs = _flat_specs(obj["annotations"], fmt, images, cat_label, src)
        relations = _parse_relations(obj.get("occlusion_relations", []), src)
        given = "occlusion_relations" in obj
    records = _build_records(images, specs, relations)
    return AmodalDataset(src, fmt, categories, records, images_dir, given)


def detect_format(obj: dict) -> str:
    """Name of the format of a parsed annotation file (see :func:`parse_dataset`)."""
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


# Checks of JSON entries, shared with the predictions reader of orcnn_core.evaluation so that
# both files' messages read alike.


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def require(entry, key, where):
    """``entry[key]``; a non-object entry or a missing key raises :class:`InputError`."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be a JSON object")
    if key not in entry:
        raise InputError(f"{where}: key '{key}' missing")
    return entry[key]


def require_int(entry, key, where, minimum=None) -> int:
    value = require(entry, key, where)
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InputError(f"{where}: '{key}' must be an integer{bound}, got "
                         f"{short_repr(value)}")
    if not -2 ** 63 <= value < 2 ** 63:  # ids end up in int64 arrays
        raise InputError(f"{where}: '{key}' {short_repr(value)} does not fit in 64 bits")
    return int(value)


def require_list(entry, key, where) -> list:
    value = require(entry, key, where)
    if not isinstance(value, list):
        raise InputError(f"{where}: '{key}' must be a list")
    return value


def check_bbox(bbox, where) -> list:
    """xyxy of a COCO ``[x, y, width, height]`` box, checked (``where`` names the box)."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(is_number(v, 2 * MAX_CANVAS_SIDE) for v in bbox)
            or bbox[2] < 0 or bbox[3] < 0):
        raise InputError(f"{where}: a box must be [x, y, width, height] with width, "
                         f"height >= 0 (each at most {2 * MAX_CANVAS_SIDE} in size), got "
                         f"{short_repr(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


@dataclass
class _Image:
    image_id: int
    file_name: str
    height: int
    width: int
    padding: Optional[int]  # None: read off the RLE sizes


def _parse_images(entries, src, need_file_names) -> dict:
    images = {}
    for k, entry in enumerate(entries):
        image_id = require_int(entry, "id", f"{src}: images[{k}]")
        where = f"{src}: image {image_id}"
        if image_id in images:
            raise InputError(f"{where}: duplicate image id")
        file_name = entry.get("file_name")
        if file_name is None and not need_file_names:
            file_name = ""
        elif not isinstance(file_name, str) or (need_file_names and not file_name):
            require(entry, "file_name", where)  # a missing key says so
            raise InputError(f"{where}: 'file_name' must be a non-empty string")
        # null stands for "not given", as for every optional key
        padding = entry.get("mask_padding")
        if padding is not None:
            padding = require_int(entry, "mask_padding", where, minimum=0)
        height = require_int(entry, "height", where, 1)
        width = require_int(entry, "width", where, 1)
        check_canvas(height, width, padding or 0, where)
        images[image_id] = _Image(image_id, file_name, height, width, padding)
    return images


def _parse_categories(obj, src):
    """Categories sorted by id, and category id -> label 1..K."""
    cats = {}
    for k, entry in enumerate(require_list(obj, "categories", src)):
        cat_id = require_int(entry, "id", f"{src}: categories[{k}]")
        if cat_id in cats:
            raise InputError(f"{src}: category {cat_id}: duplicate category id")
        cats[cat_id] = str(entry.get("name", cat_id))
    categories = [{"id": c, "name": cats[c]} for c in sorted(cats)]
    return categories, {c["id"]: k + 1 for k, c in enumerate(categories)}


@dataclass
class _Spec:
    """One instance as read from the file, before conversion to canvas RLEs."""

    image_id: int
    ann_id: int
    label: int
    name: str  # "annotation 7", "annotation 4: region 1"
    where: str  # the file and the name, for messages
    amodal: object  # a COCO segmentation (RLE or polygons), as read
    amodal_key: str
    visible: object = None  # None: not given
    visible_key: str = ""
    invisible: object = None
    bbox: object = None  # xyxy when given
    iscrowd: bool = False
    occlude_rate: Optional[float] = None

    def masks(self):
        """(segmentation, key) of the masks given."""
        return [(segm, key) for segm, key in ((self.amodal, self.amodal_key),
                                              (self.visible, self.visible_key),
                                              (self.invisible, "invisible_mask"))
                if segm is not None]


# Amodal / visible / box keys of each flat format, in order of preference.
_FLAT_KEYS = {
    "d2s_amodal": (("segmentation",), ("visible_mask",), ("bbox",)),
    "kins": (("segmentation", "a_segm"), ("inmodal_seg", "i_segm"), ("bbox", "a_bbox")),
    "coco": (("segmentation",), (), ("bbox",)),
}


def _flat_specs(entries, fmt, images, cat_label, src) -> list:
    specs, seen = [], set()
    for k, entry in enumerate(entries):
        ann_id = require_int(entry, "id", f"{src}: annotations[{k}]")
        if ann_id in seen:
            raise InputError(f"{src}: annotation {ann_id}: duplicate annotation id")
        seen.add(ann_id)
        specs.append(_flat_spec(entry, ann_id, fmt, images, cat_label, src))
    return specs


def _flat_spec(entry, ann_id, fmt, images, cat_label, src) -> _Spec:
    amodal_keys, visible_keys, box_keys = _FLAT_KEYS[fmt]
    name = f"annotation {ann_id}"
    where = f"{src}: {name}"
    image_id = require_int(entry, "image_id", where)
    if image_id not in images:
        raise InputError(f"{where}: image_id {image_id} is not in 'images'")
    cat_id = require_int(entry, "category_id", where)
    if cat_id not in cat_label:
        raise InputError(f"{where}: category_id {cat_id} is not in 'categories'")
    iscrowd = entry.get("iscrowd")
    if iscrowd not in (None, 0, 1):
        raise InputError(f"{where}: 'iscrowd' must be 0 or 1, got {short_repr(iscrowd)}")
    rate = entry.get("occlude_rate")
    if rate is not None and not (is_number(rate) and 0 <= rate <= 1):
        raise InputError(f"{where}: 'occlude_rate' must be a number in [0, 1], got "
                         f"{short_repr(rate)}")
    amodal_key = _first_key(entry, amodal_keys, where, required=True)
    visible_key = _first_key(entry, visible_keys, where, required=(fmt == "kins"))
    box_key = _first_key(entry, box_keys, where, required=False)
    return _Spec(
        image_id, ann_id, cat_label[cat_id], name, where, entry[amodal_key], amodal_key,
        entry[visible_key] if visible_key else None, visible_key,
        entry.get("invisible_mask") if fmt == "d2s_amodal" else None,
        check_bbox(entry[box_key], f"{where}: {box_key}") if box_key else None,
        bool(iscrowd), None if rate is None else float(rate))


def _first_key(entry, keys, where, required):
    for key in keys:
        if key in entry and entry[key] is not None:
            return key
    if required:
        raise InputError(f"{where}: key {' or '.join(repr(k) for k in keys)} missing")
    return ""


def _parse_relations(entries, src) -> list:
    """Raw occluder/occludee annotation id pairs, checked later against the annotations."""
    if not isinstance(entries, list):
        raise InputError(f"{src}: 'occlusion_relations' must be a list")
    pairs = []
    for k, entry in enumerate(entries):
        where = f"{src}: occlusion_relations[{k}]"
        pairs.append((require_int(entry, "image_id", where),
                      require_int(entry, "occluder_id", where),
                      require_int(entry, "occludee_id", where), where))
    return pairs


def _cocoa_specs(obj, images, src):
    """Specs and relations of the original COCOA file (class-agnostic: object / stuff)."""
    categories = [{"id": 1, "name": "object"}, {"id": 2, "name": "stuff"}]
    specs, relations = [], []
    for k, entry in enumerate(obj["annotations"]):
        name = f"annotations[{k}]"
        image_id = require_int(entry, "image_id", f"{src}: {name}")
        if "id" in entry and _is_int(entry["id"]):
            name = f"annotation {entry['id']}"
        where = f"{src}: {name}"
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        regions = require_list(entry, "regions", where)
        order_id = {}
        for r, region in enumerate(regions):
            rname = f"{name}: region {r}"
            segm = require(region, "segmentation", f"{src}: {rname}")
            if isinstance(segm, list) and segm and not isinstance(segm[0], list):
                segm = [segm]  # COCOA stores one polygon as a flat list
            if "order" in region:
                order = require_int(region, "order", f"{src}: {rname}")
                if order in order_id:
                    raise InputError(f"{src}: {rname}: duplicate 'order' {order}")
                order_id[order] = len(specs) + 1
            specs.append(_Spec(image_id, len(specs) + 1, 2 if region.get("isStuff") else 1,
                               rname, f"{src}: {rname}", segm, "segmentation",
                               region.get("visible_mask"), "visible_mask",
                               region.get("invisible_mask")))
        relations += _depth_constraint(entry, order_id, image_id, where)
    return categories, specs, relations


def _depth_constraint(entry, order_id, image_id, where) -> list:
    """Relations of a COCOA ``depth_constraint`` "1-2,1-3" (order 1 lies on 2 and 3)."""
    constraint = entry.get("depth_constraint", "") or ""
    if not isinstance(constraint, str):
        raise InputError(f"{where}: 'depth_constraint' must be a string like '1-2,1-3'")
    relations = []
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
    return relations


def _image_padding(image: _Image, specs) -> int:
    """The image's mask padding: given, or read off its RLE sizes (D2S amodal's zero
    padding), which must then all imply the same padding."""
    if image.padding is not None:
        return image.padding
    padding = first = None
    for spec in specs:
        for segm, key in spec.masks():
            where = f"{spec.where}: {key}"
            size = rle_size(segm, where)
            if size is None:
                continue
            dh, dw = size[0] - image.height, size[1] - image.width
            if dh != dw or dh < 0 or dh % 2:
                raise InputError(
                    f"{where}: RLE size {list(size)} disagrees with image {image.image_id} "
                    f"({image.height} x {image.width}): not a zero padding of the same whole "
                    f"number of pixels on every side")
            if padding is None:
                padding, first = dh // 2, f"the {key} of {spec.name}"
            elif dh // 2 != padding:
                raise InputError(
                    f"{where}: RLE size {list(size)} disagrees with {first} in image "
                    f"{image.image_id}: it implies mask padding {dh // 2}, that one {padding}")
    return padding or 0


def _image_record(image: _Image, specs) -> ImageRecord:
    """The image's instances as canvas RLEs, every mask checked against the canvas."""
    p = _image_padding(image, specs)
    hc, wc = image.height + 2 * p, image.width + 2 * p
    rec = ImageRecord(image.image_id, image.file_name, image.height, image.width, p)
    for spec in specs:
        rles = {key: to_rle(segm, hc, wc, f"{spec.where}: {key}", p)
                for segm, key in spec.masks()}
        amodal = rles[spec.amodal_key]
        box = spec.bbox
        if box is None:
            x, y, w, h = mask_utils.toBbox(
                {"size": amodal["size"], "counts": amodal["counts"].encode()}).tolist()
            box = [x - p, y - p, x - p + w, y - p + h] if w else [0.0] * 4
        rec.instances.append(InstanceRecord(
            spec.ann_id, spec.label, box, amodal, rles.get(spec.visible_key),
            rles.get("invisible_mask"), spec.iscrowd, spec.occlude_rate))
    return rec


def _build_records(images: dict, specs: list, relations: list) -> list:
    by_image = {image_id: [] for image_id in images}
    for spec in specs:
        by_image[spec.image_id].append(spec)
    records = [_image_record(image, by_image[image_id]) for image_id, image in images.items()]
    by_id = {r.image_id: r for r in records}
    index_of = {inst.ann_id: (rec.image_id, i)  # annotation id -> (image id, index)
                for rec in records for i, inst in enumerate(rec.instances)}
    for image_id, upper, lower, where in relations:
        if image_id not in by_id:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        for ann_id, key in ((upper, "occluder_id"), (lower, "occludee_id")):
            if index_of.get(ann_id, (None,))[0] != image_id:
                raise InputError(f"{where}: annotation {ann_id} is not an annotation of "
                                 f"image {image_id} ({key})")
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
