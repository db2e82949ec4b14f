"""Amodal ground truth: the in-memory sample, loaders for the public formats, our writer.

One internal format, :class:`AmodalSample` (see docs/data_format.md), and one reader,
:func:`load_dataset` (:func:`parse_dataset` for a parsed file), for

- ``d2s_amodal``: D2S amodal and COCOA cls (flat COCO; ``segmentation`` amodal,
  ``visible_mask``, optional ``invisible_mask``; RLEs may be zero padded), which is also
  what :func:`write_amodal_coco` and ``orcnn-core synth`` write;
- ``cocoa``: the original COCO amodal (one entry per image with ``regions``);
- ``kins``: KINS (2019: ``segmentation``/``inmodal_seg``; 2020: ``a_segm``/``i_segm`` with
  the occlusion order ``oco_id``/``ico_id``);
- ``coco``: plain modal COCO (amodal := visible; samples marked ``modal_only``), the
  source of modal augmentation.

:data:`FORMAT_NAMES` are the names a user may give (``--format``, ``data.format``): these
four, narrower layouts (``kins2019``, ``kins2020``) and other names of ``d2s_amodal``
(``amodal_coco``, ``d2sa``, ``cocoa_cls``). A named format that does not fit the file, or a
file no layout fits, is refused with the keys that were expected. :func:`write_dataset`
writes any read file in our format (``orcnn-core convert``), with the occlusion relations
the source states or, where it states none, those its masks show.

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
    rle_difference,
    rle_size,
    short_repr,
    to_rle,
)

#: The readers (``AmodalDataset.format``).
FORMATS = ("d2s_amodal", "cocoa", "kins", "coco")
#: Every format name a user may give, and the reader it selects. ``kins2019`` and
#: ``kins2020`` accept only their own keys; ``kins`` either.
FORMAT_NAMES = {
    "d2s_amodal": "d2s_amodal", "amodal_coco": "d2s_amodal", "d2sa": "d2s_amodal",
    "cocoa_cls": "d2s_amodal", "cocoa": "cocoa", "kins": "kins", "kins2019": "kins",
    "kins2020": "kins", "coco": "coco",
}
#: How many annotators' regions of a COCOA image are read: the first entry of the image
#: (as the COCOA amodal API evaluates) or all of them, merged.
ANNOTATORS = ("first", "all")
#: Where a file's occlusion relations come from: stated by the source, or derived from
#: its masks (``"relations_source"`` in our format).
RELATION_SOURCES = ("given", "derived")


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
    # False where the file states no relations: an empty occlusion_relations then means
    # "unknown", not "nothing lies on anything".
    relations_known: bool = True

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
    ignore: bool = False  # KINS "ignore": scored as neither found nor missed, not trained

    @property
    def counted(self) -> bool:
        """An object to be found (not a crowd region, not flagged ignore)."""
        return not (self.iscrowd or self.ignore)


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
    reads). ``relations_source`` is ``"given"`` (the file states the relations: ours,
    COCOA ``depth_constraint``, KINS ``oco_id``/``ico_id``), ``"derived"`` (our file,
    written with relations derived from the masks) or None (none stated: evaluation derives
    them with :func:`derive_relations`); ``relations_given`` is whether there are any.
    ``layout`` names what was read (a :data:`FORMAT_NAMES` key). Images are not read: call
    ``sample.load_image()``.
    """

    def __init__(self, path, fmt, categories, records, images_dir, relations_source,
                 layout=None, modal_only=None):
        self.path = str(path)
        self.format = fmt
        self.layout = layout or fmt
        self.categories = categories
        self.modal_only = fmt == "coco" if modal_only is None else modal_only
        self.records = records
        self.relations_source = relations_source
        self._images_dir = Path(images_dir)

    @property
    def relations_given(self) -> bool:
        return self.relations_source is not None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self.records[index]
        kept = [inst for inst in rec.instances if inst.counted]
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
            modal_only=self.modal_only, relations_known=self.relations_given)

    @property
    def image_ids(self) -> list:
        return [r.image_id for r in self.records]


def _decode_stack(rles, hc, wc) -> np.ndarray:
    if not rles:
        return np.zeros((0, hc, wc), np.uint8)
    return np.stack([decode(r) for r in rles])


def _sample_relations(rec: ImageRecord) -> np.ndarray:
    """The relations among the instances a sample keeps (crowd regions and ignored
    instances are left out)."""
    position = {}
    for i, inst in enumerate(rec.instances):
        if inst.counted:
            position[i] = len(position)
    pairs = [(position[u], position[v]) for u, v in rec.relations
             if u in position and v in position]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- relations
# Relations from masks work on RLEs (pycocotools merges runs; nothing is decoded to the
# canvas) and compare only pairs whose amodal boxes overlap: time grows with the number of
# such pairs, memory with the RLEs' size, whatever the canvas size.

#: Cells of the pairwise box test held at once: it runs in chunks of rows, so its memory
#: stays bounded (a few times 4 MiB) however many instances an image has.
_PAIR_CHUNK_CELLS = 1 << 22


def _area(rle) -> float:
    return float(mask_utils.area(rle))


def overlapping_pairs(rles: list) -> list:
    """Index pairs (i < j) of canvas RLEs whose bounding boxes share pixels."""
    if len(rles) < 2:
        return []
    x, y, w, h = np.asarray(mask_utils.toBbox(rles), np.float64).reshape(-1, 4).T
    x1, y1 = x + w, y + h
    present = (w > 0) & (h > 0)
    rows = max(1, _PAIR_CHUNK_CELLS // len(rles))
    pairs = []
    for start in range(0, len(rles), rows):
        i = np.arange(start, min(start + rows, len(rles)))[:, None]
        hit = ((x[i] < x1[None]) & (x[None] < x1[i]) & (y[i] < y1[None]) & (y[None] < y1[i])
               & present[i] & present[None] & (np.arange(len(rles))[None] > i))
        a, b = np.nonzero(hit)
        pairs += zip((a + start).tolist(), b.tolist())
    return pairs


def hidden_part(amodal: dict, visible: Optional[dict], invisible: Optional[dict]):
    """RLE of an instance's occluded part: the given invisible mask, else amodal AND NOT
    visible; None when neither is given (nothing known hidden)."""
    if invisible is not None:
        return invisible
    return None if visible is None else rle_difference(amodal, visible)


def covered(visible: dict, hidden: Optional[dict]) -> float:
    """Pixels of ``hidden`` (one instance's occluded part) that ``visible`` (another's
    visible mask) covers: evidence that the other lies on it."""
    return 0.0 if hidden is None else _area(mask_utils.merge([visible, hidden],
                                                             intersect=True))


def derive_relations(record: ImageRecord) -> list:
    """Relations (upper, lower) of an image whose file states none, from its masks: of two
    counted instances whose amodal masks overlap, the one whose visible mask covers more of
    the other's occluded part lies on top (ties: no relation). Visible masks not given are
    the amodal ones."""
    counted = [k for k, inst in enumerate(record.instances) if inst.counted]
    insts = [record.instances[k] for k in counted]
    hidden = [hidden_part(i.amodal, i.visible, i.invisible) for i in insts]
    relations = []
    for a, b in overlapping_pairs([inst.amodal for inst in insts]):
        if _area(mask_utils.merge([insts[a].amodal, insts[b].amodal], intersect=True)) == 0:
            continue
        evidence = (covered(insts[a].visible or insts[a].amodal, hidden[b])
                    - covered(insts[b].visible or insts[b].amodal, hidden[a]))
        if evidence:
            upper, lower = (a, b) if evidence > 0 else (b, a)
            relations.append((counted[upper], counted[lower]))
    return relations


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


def load_dataset(path, images_dir=None, fmt: str = "auto", annotators: str = "first",
                 need_file_names: bool = True) -> AmodalDataset:
    """Read and validate an amodal (or modal) annotation file (see :func:`parse_dataset`).

    ``images_dir`` defaults to the file's folder. Returns a sequence of
    :class:`AmodalSample` (decoded on access). Bad input raises :class:`InputError` naming
    the file and the annotation.
    """
    path = Path(path)
    return parse_dataset(load_json(path, "annotation"), path, fmt,
                         path.parent if images_dir is None else images_dir,
                         need_file_names, annotators)


def parse_dataset(obj, source, fmt: str = "auto", images_dir=".",
                  need_file_names: bool = True, annotators: str = "first") -> AmodalDataset:
    """Validate a parsed annotation file (``source`` names it in messages) into a data set.

    ``fmt`` is a :data:`FORMAT_NAMES` key or ``"auto"`` (:func:`detect_layout`); a named
    format must fit the file's keys. ``annotators`` (:data:`ANNOTATORS`) applies to COCOA.
    With ``need_file_names`` False, images may lack ``file_name`` (evaluation reads no
    images). Crowd and ignored annotations are checked and kept in the records but left
    out of the samples.
    """
    src = str(source)
    if not isinstance(obj, dict):
        raise InputError(f"{src}: top level must be a JSON object with 'images' and "
                         f"'annotations'")
    for key in ("images", "annotations"):
        require_list(obj, key, src)
    if fmt != "auto" and fmt not in FORMAT_NAMES:
        raise InputError(f"{src}: unknown format {fmt!r} (auto or one of "
                         f"{', '.join(FORMAT_NAMES)})")
    if annotators not in ANNOTATORS:
        raise InputError(f"{src}: annotators must be one of {', '.join(ANNOTATORS)}, got "
                         f"{annotators!r}")
    layout = _checked_layout(obj, fmt, src)
    reader = FORMAT_NAMES[layout]
    images = _parse_images(obj["images"], src, need_file_names)
    if reader == "cocoa":
        categories, specs, relations, given = _cocoa_specs(obj, images, src, annotators)
    else:
        categories, cat_label = _parse_categories(obj, src)
        # Only a named kins2019 / kins2020 insists on its own keys: files mix them.
        keys = layout if fmt in ("kins2019", "kins2020") or reader != "kins" else "kins"
        specs = _flat_specs(obj["annotations"], keys, images, cat_label, src)
        relations = _parse_relations(obj.get("occlusion_relations", []), src)
        given = "occlusion_relations" in obj or any(spec.order for spec in specs)
    records = _build_records(images, specs, relations)
    source_of_relations = _relations_source(obj, src) if given else None
    return AmodalDataset(src, reader, categories, records, images_dir, source_of_relations,
                         layout, _modal_only(obj, reader))


def _relations_source(obj, src) -> str:
    """Our file's ``relations_source`` (default "given"; other files: "given")."""
    value = obj.get("relations_source", "given")
    if value not in RELATION_SOURCES:
        raise InputError(f"{src}: 'relations_source' must be one of "
                         f"{', '.join(RELATION_SOURCES)}, got {short_repr(value)}")
    return value


def _modal_only(obj, reader) -> bool:
    """Plain COCO, or our file converted from it (``info.modal_only``)."""
    info = obj.get("info")
    return reader == "coco" or (isinstance(info, dict) and info.get("modal_only") is True)


# Keys that mark each layout (any annotation having one of them), in detection order, and
# the annotation keys each layout reads, for the messages of refused files.
_SIGNATURES = (
    ("cocoa", ("regions",), "'regions' (COCOA: per annotator 'regions' with "
                            "'segmentation', 'order', optional 'visible_mask')"),
    ("kins2020", ("a_segm", "i_segm"), "'a_segm', 'i_segm' (KINS 2020, with 'a_bbox', "
                                       "'oco_id', 'ico_id')"),
    ("kins2019", ("inmodal_seg",), "'segmentation', 'inmodal_seg' (KINS 2019)"),
    ("d2s_amodal", ("visible_mask", "invisible_mask"),
     "'segmentation' with 'visible_mask' (amodal COCO, D2SA, COCOA-cls)"),
    ("coco", ("segmentation",), "'segmentation' (COCO instances)"),
)


def detect_layout(obj: dict):
    """The :data:`FORMAT_NAMES` key whose keys a parsed file has, None when annotations
    exist but none has a known key (see ``_SIGNATURES``; our writer's ``info``,
    ``mask_padding`` or ``occlusion_relations`` also mark ``d2s_amodal``)."""
    anns = [a for a in obj.get("annotations", []) if isinstance(a, dict)]
    for layout, keys, _ in _SIGNATURES[:3]:
        if any(k in a for a in anns for k in keys):
            return layout
    info = obj.get("info")
    if ((isinstance(info, dict) and info.get("format") == "d2s_amodal")
            or "occlusion_relations" in obj
            or any(k in a for a in anns for k in ("visible_mask", "invisible_mask"))
            or any(isinstance(i, dict) and "mask_padding" in i
                   for i in obj.get("images", []))):
        return "d2s_amodal"
    if anns and not any("segmentation" in a for a in anns):
        return None
    return "coco"


def detect_format(obj: dict) -> str:
    """Name of the reader (:data:`FORMATS`) of a parsed annotation file; "coco" when no
    layout fits."""
    layout = detect_layout(obj)
    return "coco" if layout is None else FORMAT_NAMES[layout]


def _expected_keys() -> str:
    return "; ".join(text for _, _, text in _SIGNATURES)


def _checked_layout(obj, fmt, src) -> str:
    """The layout to read: the detected one (``fmt`` "auto") or ``fmt`` when the file's
    keys fit it; else one :class:`InputError` naming the keys expected."""
    detected = detect_layout(obj)
    first = next((a for a in obj["annotations"] if isinstance(a, dict)), {})
    found = ", ".join(repr(k) for k in list(first)[:12]) or "none"
    if detected is None:
        raise InputError(f"{src}: unknown annotation layout (first annotation's keys: "
                         f"{found}); expected one of: {_expected_keys()}")
    if fmt == "auto" or fmt == detected:
        return detected
    modal = {"d2s_amodal", "coco"}
    if FORMAT_NAMES[fmt] in modal and FORMAT_NAMES[detected] in modal:
        return FORMAT_NAMES[fmt]  # amodal COCO without visible masks reads as either
    if fmt == "kins" and FORMAT_NAMES[detected] == "kins":
        return detected
    if not obj["annotations"]:
        return fmt
    texts = {layout: text for layout, _, text in _SIGNATURES}
    texts["kins"] = f"{texts['kins2020']} or {texts['kins2019']}"
    wanted = texts.get(fmt, texts.get(FORMAT_NAMES[fmt]))
    raise InputError(f"{src}: format {fmt!r} does not fit this file: expected annotation "
                     f"keys {wanted}; found {found} (the keys of {detected!r})")


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
    ignore: bool = False
    order: Optional[tuple] = None  # KINS (oco_id, ico_id) when given

    def masks(self):
        """(segmentation, key) of the masks given."""
        return [(segm, key) for segm, key in ((self.amodal, self.amodal_key),
                                              (self.visible, self.visible_key),
                                              (self.invisible, "invisible_mask"))
                if segm is not None]


# Amodal / visible / box keys of each flat layout, in order of preference.
_FLAT_KEYS = {
    "d2s_amodal": (("segmentation",), ("visible_mask",), ("bbox",)),
    "kins": (("segmentation", "a_segm"), ("inmodal_seg", "i_segm"), ("bbox", "a_bbox")),
    "kins2019": (("segmentation",), ("inmodal_seg",), ("bbox",)),
    "kins2020": (("a_segm",), ("i_segm",), ("a_bbox",)),
    "coco": (("segmentation",), (), ("bbox",)),
}


def _flat_specs(entries, layout, images, cat_label, src) -> list:
    keys = _FLAT_KEYS.get(layout, _FLAT_KEYS[FORMAT_NAMES[layout]])
    fmt = FORMAT_NAMES[layout]
    specs, seen = [], set()
    for k, entry in enumerate(entries):
        ann_id = require_int(entry, "id", f"{src}: annotations[{k}]")
        if ann_id in seen:
            raise InputError(f"{src}: annotation {ann_id}: duplicate annotation id")
        seen.add(ann_id)
        specs.append(_flat_spec(entry, ann_id, fmt, keys, images, cat_label, src))
    return specs


def _flag(entry, key, where) -> bool:
    value = entry.get(key)
    if value not in (None, 0, 1):  # True and False compare equal to 1 and 0
        raise InputError(f"{where}: {key!r} must be 0 or 1, got {short_repr(value)}")
    return bool(value)


def _rate(entry, where) -> Optional[float]:
    rate = entry.get("occlude_rate")
    if rate is not None and not (is_number(rate) and 0 <= rate <= 1):
        raise InputError(f"{where}: 'occlude_rate' must be a number in [0, 1], got "
                         f"{short_repr(rate)}")
    return None if rate is None else float(rate)


def _kins_order(entry, where) -> Optional[tuple]:
    """KINS (oco_id, ico_id): occlusion cluster and place in its depth order, or None."""
    if entry.get("oco_id") is None and entry.get("ico_id") is None:
        return None
    return (require_int(entry, "oco_id", where, minimum=0),
            require_int(entry, "ico_id", where, minimum=0))


def _flat_spec(entry, ann_id, fmt, keys, images, cat_label, src) -> _Spec:
    amodal_keys, visible_keys, box_keys = keys
    name = f"annotation {ann_id}"
    where = f"{src}: {name}"
    image_id = require_int(entry, "image_id", where)
    if image_id not in images:
        raise InputError(f"{where}: image_id {image_id} is not in 'images'")
    cat_id = require_int(entry, "category_id", where)
    if cat_id not in cat_label:
        raise InputError(f"{where}: category_id {cat_id} is not in 'categories'")
    iscrowd = _flag(entry, "iscrowd", where)
    rate = _rate(entry, where)
    amodal_key = _first_key(entry, amodal_keys, where, required=True)
    visible_key = _first_key(entry, visible_keys, where, required=(fmt == "kins"))
    box_key = _first_key(entry, box_keys, where, required=False)
    return _Spec(
        image_id, ann_id, cat_label[cat_id], name, where, entry[amodal_key], amodal_key,
        entry[visible_key] if visible_key else None, visible_key,
        entry.get("invisible_mask") if fmt == "d2s_amodal" else None,
        check_bbox(entry[box_key], f"{where}: {box_key}") if box_key else None,
        iscrowd, rate, fmt != "coco" and _flag(entry, "ignore", where),
        _kins_order(entry, where) if fmt == "kins" else None)


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


def _cocoa_specs(obj, images, src, annotators):
    """Categories, specs, relations and whether relations are stated, of the original
    COCOA file (class-agnostic: object / stuff). Each annotation entry is one annotator's
    regions of its image; ``annotators`` "first" keeps each image's first entry."""
    categories = [{"id": 1, "name": "object"}, {"id": 2, "name": "stuff"}]
    specs, relations, seen, given = [], [], set(), False
    for k, entry in enumerate(obj["annotations"]):
        name = f"annotations[{k}]"
        image_id = require_int(entry, "image_id", f"{src}: {name}")
        if "id" in entry and _is_int(entry["id"]):
            name = f"annotation {entry['id']}"
        where = f"{src}: {name}"
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in 'images'")
        if annotators == "first" and image_id in seen:
            continue
        seen.add(image_id)
        order_id = {}
        for r, region in enumerate(require_list(entry, "regions", where)):
            spec = _region_spec(region, image_id, len(specs) + 1, f"{name}: region {r}", src)
            if "order" in region:
                order = require_int(region, "order", spec.where)
                if order in order_id:
                    raise InputError(f"{spec.where}: duplicate 'order' {order}")
                order_id[order] = spec.ann_id
            specs.append(spec)
        given = given or "depth_constraint" in entry
        relations += _depth_constraint(entry, order_id, image_id, where)
    return categories, specs, relations, given


def _region_spec(region, image_id, ann_id, rname, src) -> _Spec:
    where = f"{src}: {rname}"
    segm = require(region, "segmentation", where)
    if isinstance(segm, list) and segm and not isinstance(segm[0], list):
        segm = [segm]  # COCOA stores one polygon as a flat list
    return _Spec(image_id, ann_id, 2 if region.get("isStuff") else 1, rname, where, segm,
                 "segmentation", region.get("visible_mask"), "visible_mask",
                 region.get("invisible_mask"), occlude_rate=_rate(region, where))


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
            rles.get("invisible_mask"), spec.iscrowd, spec.occlude_rate, spec.ignore))
    return rec


def _kins_relations(rec: ImageRecord, specs: list) -> list:
    """KINS occlusion order as relations of one image (ann ids): within an occlusion
    cluster (same ``oco_id``) depth order ``ico_id`` starts at 1 for the front object and
    grows by one each time an object is occluded once more (0: overlaps nothing). A lies
    on B when both are ordered, A's ``ico_id`` is smaller and their amodal masks overlap."""
    relations = []
    for a, b in overlapping_pairs([inst.amodal for inst in rec.instances]):
        order_a, order_b = specs[a].order, specs[b].order
        if (order_a is None or order_b is None or order_a[0] != order_b[0]
                or 0 in (order_a[1], order_b[1]) or order_a[1] == order_b[1]):
            continue
        if _area(mask_utils.merge([rec.instances[a].amodal, rec.instances[b].amodal],
                                  intersect=True)) == 0:
            continue
        upper, lower = (a, b) if order_a[1] < order_b[1] else (b, a)
        relations.append((rec.image_id, specs[upper].ann_id, specs[lower].ann_id,
                          f"{specs[upper].where}: ico_id"))
    return relations


def _build_records(images: dict, specs: list, relations: list) -> list:
    by_image = {image_id: [] for image_id in images}
    for spec in specs:
        by_image[spec.image_id].append(spec)
    records = [_image_record(image, by_image[image_id]) for image_id, image in images.items()]
    relations = list(relations)  # the caller's list stays as it was
    for rec in records:
        if any(spec.order for spec in by_image[rec.image_id]):
            relations.extend(_kins_relations(rec, by_image[rec.image_id]))
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
                      info: Optional[dict] = None, relations_source: str = "given") -> dict:
    """Write samples as D2S-amodal-style COCO JSON (docs/data_format.md), atomically.

    ``samples`` is consumed once (a generator is fine: only the RLEs are kept).
    ``categories`` lists ``{"id", "name"}`` in label order (label k is
    ``categories[k - 1]``); by default category id = label. Image and annotation ids are
    the samples' own when they are unique positive integers, else renumbered from 1.
    ``occlusion_relations`` (with ``relations_source``) is written only when some sample's
    relations are known: an empty list would say "nothing lies on anything" and turn the
    order scoring of the masks' own relations off. Returns the written object.
    """
    images, annotations, relations = [], [], []
    known = False
    cat_of = None
    if categories is not None:
        cat_of = {k + 1: int(c["id"]) for k, c in enumerate(categories)}
    labels_seen = set()
    for sample in samples:
        known = known or sample.relations_known
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
    }
    if known:
        obj["relations_source"] = relations_source
        obj["occlusion_relations"] = [
            {"image_id": images[i]["id"], "occluder_id": annotations[u]["id"],
             "occludee_id": annotations[v]["id"]} for i, u, v in relations]
    atomic_write_json(path, obj)
    return obj


def write_dataset(dataset: AmodalDataset, path) -> dict:
    """Write a read file in our format (``orcnn-core convert``), atomically: every record
    as read (crowd and ignored instances, masks, ids, occlusion rates kept, so that it
    scores the same), with the relations the source states or, where it states none (and
    is not modal-only), those :func:`derive_relations` finds; ``relations_source`` says
    which. Returns the written object."""
    source = dataset.relations_source or (None if dataset.modal_only else "derived")
    category_ids = [c["id"] for c in dataset.categories]
    images, annotations, relations = [], [], []
    for rec in dataset.records:
        images.append({"id": rec.image_id, "file_name": rec.file_name, "width": rec.width,
                       "height": rec.height, "mask_padding": rec.padding})
        annotations += [_record_entry(inst, rec, category_ids[inst.label - 1])
                        for inst in rec.instances]
        pairs = rec.relations if dataset.relations_given else (
            derive_relations(rec) if source else [])
        relations += [{"image_id": rec.image_id,
                       "occluder_id": rec.instances[upper].ann_id,
                       "occludee_id": rec.instances[lower].ann_id} for upper, lower in pairs]
    info = {"format": "d2s_amodal", "source_format": dataset.layout}
    if dataset.modal_only:
        info["modal_only"] = True
    obj = {"info": info, "images": images, "categories": [
        {"id": c["id"], "name": c["name"]} for c in dataset.categories],
        "annotations": annotations}
    if source:
        obj["relations_source"] = source
        obj["occlusion_relations"] = relations
    atomic_write_json(path, obj)
    return obj


def _record_entry(inst: InstanceRecord, rec: ImageRecord, category_id: int) -> dict:
    """Our annotation entry of a record; optional masks and values only where read."""
    x0, y0, x1, y1 = inst.box
    entry = {"id": inst.ann_id, "image_id": rec.image_id, "category_id": category_id,
             "iscrowd": int(inst.iscrowd), "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": int(_area(inst.amodal)), "segmentation": inst.amodal}
    if inst.ignore:
        entry["ignore"] = 1
    for key, value in (("visible_mask", inst.visible), ("invisible_mask", inst.invisible),
                       ("occlude_rate", inst.occlude_rate)):
        if value is not None:
            entry[key] = value
    return entry


def _renumber(images, annotations):
    """Keep the samples' ids when they are unique positive integers, else number from 1."""
    for entries in (images, annotations):
        ids = [e["id"] for e in entries]
        if not (all(_is_int(i) and i > 0 for i in ids) and len(set(ids)) == len(ids)):
            for k, entry in enumerate(entries):
                entry["id"] = k + 1
