"""Modal augmentation (paper, sections 4.1 and 4.3): amodal ground truth from modal data.

Whole objects cut out of modally annotated images (their modal mask is their full extent)
are pasted on top of another image. A pasted object's mask is its amodal mask; the objects
it covers keep their amodal masks, lose the covered part of their visible masks and get
"pasted lies on it" relations. Objects a paste leaves (almost) hidden are dropped.
"""

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from orcnn_core.data import AmodalSample, mask_boxes


@dataclass
class ModalObject:
    """One object to paste: an RGB crop, its mask on that crop, its class label."""

    image: np.ndarray  # h x w x 3 uint8 RGB
    mask: np.ndarray  # h x w uint8 (0/1)
    label: int

    def __post_init__(self):
        if self.image.shape[:2] != self.mask.shape or self.image.ndim != 3:
            raise ValueError(f"image {self.image.shape} and mask {self.mask.shape} differ")


def extract_objects(sample: AmodalSample, min_area: int = 64) -> list:
    """The whole objects of a sample, as paste sources.

    Kept: objects that do not touch the image border (not truncated) and, where occlusion
    is known (not ``modal_only``), are not occluded. Their visible mask is their extent.
    """
    image = sample.load_image()
    visible = sample.crop_to_image(sample.visible_masks)
    amodal = sample.crop_to_image(sample.amodal_masks)
    objects = []
    for i in range(len(sample)):
        m = visible[i]
        if m.sum() < min_area:
            continue
        if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
            continue
        if not sample.modal_only and int(sample.amodal_masks[i].sum()) != int(amodal[i].sum()):
            continue  # part of the amodal extent lies outside the image
        if not sample.modal_only and (amodal[i] != m).any():
            continue
        rows = np.flatnonzero(m.any(1))
        cols = np.flatnonzero(m.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        objects.append(ModalObject(image[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].copy(),
                                   int(sample.labels[i])))
    return objects


def paste_objects(target: AmodalSample, sources: Sequence[ModalObject],
                  rng: np.random.Generator, max_objects: int = 3, min_objects: int = 1,
                  min_visible_fraction: float = 0.1, min_visible_pixels: int = 20,
                  flip: bool = True) -> AmodalSample:
    """A copy of ``target`` with 1..``max_objects`` random ``sources`` pasted on top.

    Each paste lands at a random place with its centre in the image and its whole mask on
    the padded canvas (so its amodal mask stays exact where it leaves the image), later
    pastes above earlier ones. An object whose visible area a paste reduced is dropped
    when less than ``min_visible_fraction`` of its amodal area or ``min_visible_pixels``
    stays visible. Deterministic for a given ``rng`` state.
    """
    if not sources or max_objects < 1:
        return target
    layers = _Layers.of(target)
    count = int(rng.integers(min(min_objects, max_objects), max_objects + 1))
    for _ in range(count):
        placement = _random_placement(sources, rng, flip, target)
        if placement is not None:
            layers.paste(*placement)
    return layers.to_sample(target, layers.visible_enough(min_visible_fraction,
                                                          min_visible_pixels))


def _random_placement(sources: Sequence[ModalObject], rng: np.random.Generator, flip: bool,
                      target: AmodalSample):
    """(object, mask, crop, x, y): a random source, flipped at random when ``flip``, with
    the top-left corner (x, y) in image pixels; None when it is larger than the canvas."""
    p, h, w = target.mask_padding, target.height, target.width
    src = sources[int(rng.integers(len(sources)))]
    mask, crop = src.mask, src.image
    if flip and rng.random() < 0.5:
        mask, crop = mask[:, ::-1], crop[:, ::-1]
    oh, ow = mask.shape
    if oh > h + 2 * p or ow > w + 2 * p:
        return None
    # Centre inside the image, mask on the canvas. (Both ranges are non-empty since the
    # crop fits the canvas.)
    x = int(rng.integers(max(-p, -(ow // 2)), min(w + p - ow, w - ow // 2) + 1))
    y = int(rng.integers(max(-p, -(oh // 2)), min(h + p - oh, h - oh // 2) + 1))
    return src, mask, crop, x, y


class _Layers:
    """A sample's image and objects while objects are pasted on it, later ones on top."""

    def __init__(self, image, amodal, visible, labels, boxes, annotation_ids, next_id,
                 relations, padding, height, width):
        self.image, self.amodal, self.visible = image, amodal, visible
        self.labels, self.boxes, self.annotation_ids = labels, boxes, annotation_ids
        self.relations = relations  # (upper, lower) index pairs
        self.padding, self.height, self.width = padding, height, width
        self.next_id = next_id  # annotation id of the next pasted object
        self.touched = set()  # objects whose visible mask a paste may have reduced

    @classmethod
    def of(cls, target: AmodalSample) -> "_Layers":
        return cls(image=target.load_image().copy(), amodal=list(target.amodal_masks),
                   visible=[m.copy() for m in target.visible_masks],
                   labels=target.labels.tolist(), boxes=[b for b in target.boxes],
                   annotation_ids=target.annotation_ids.tolist(),
                   next_id=int(target.annotation_ids.max(initial=0)) + 1,
                   relations=[tuple(r) for r in target.occlusion_relations.tolist()],
                   padding=target.mask_padding, height=target.height, width=target.width)

    def paste(self, src: ModalObject, mask: np.ndarray, crop: np.ndarray, x: int,
              y: int) -> None:
        """Paint ``crop`` where ``mask`` is set with its top-left corner at (x, y) and add
        the object on top of all others."""
        p, h, w = self.padding, self.height, self.width
        oh, ow = mask.shape
        full = np.zeros((h + 2 * p, w + 2 * p), np.uint8)
        full[y + p:y + p + oh, x + p:x + p + ow] = mask
        # Paint the part inside the image.
        ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + ow, w), min(y + oh, h)
        if ix1 > ix0 and iy1 > iy0:
            sub = mask[iy0 - y:iy1 - y, ix0 - x:ix1 - x].astype(bool)
            self.image[iy0:iy1, ix0:ix1][sub] = crop[iy0 - y:iy1 - y, ix0 - x:ix1 - x][sub]
        new = len(self.amodal)
        for i in range(new):
            if (self.amodal[i] & full).any():
                self.relations.append((new, i))
            if (self.visible[i] & full).any():
                self.visible[i] &= 1 - full
                self.touched.add(i)
        visible = full.copy()
        visible[:p] = 0
        visible[p + h:] = 0
        visible[:, :p] = 0
        visible[:, p + w:] = 0
        self.touched.add(new)
        self.amodal.append(full)
        self.visible.append(visible)
        self.labels.append(int(src.label))
        self.boxes.append(mask_boxes(full[None], p)[0])
        self.annotation_ids.append(self.next_id)
        self.next_id += 1

    def visible_enough(self, min_fraction: float, min_pixels: int) -> list:
        """Indices of the objects to keep: untouched ones, and touched ones with enough of
        their amodal area still visible."""
        return [i for i in range(len(self.amodal))
                if i not in self.touched or int(self.visible[i].sum()) >= max(
                    min_pixels, min_fraction * int(self.amodal[i].sum()), 1)]

    def to_sample(self, target: AmodalSample, keep: list) -> AmodalSample:
        """The sample of objects ``keep``, with the relations among them."""
        p = self.padding
        new_index = {old: new for new, old in enumerate(keep)}
        relations = [(new_index[a], new_index[b]) for a, b in self.relations
                     if a in new_index and b in new_index]
        empty = np.zeros((0, self.height + 2 * p, self.width + 2 * p), np.uint8)
        return AmodalSample(
            image=self.image,
            boxes=np.array([self.boxes[i] for i in keep], np.float32).reshape(-1, 4),
            labels=np.array([self.labels[i] for i in keep], np.int64),
            amodal_masks=np.stack([self.amodal[i] for i in keep]) if keep else empty,
            visible_masks=np.stack([self.visible[i] for i in keep]) if keep else empty,
            mask_padding=p, occlusion_relations=np.array(relations, np.int64).reshape(-1, 2),
            image_id=target.image_id, file_name=target.file_name,
            annotation_ids=np.array([self.annotation_ids[i] for i in keep], np.int64),
            image_path=target.image_path, modal_only=target.modal_only,
            relations_known=target.relations_known)


#: Source images tried per draw before an image is left as it is (a source image may hold
#: no whole, untruncated object).
SOURCE_TRIES = 5


def augment(sample: AmodalSample, sources, rng: np.random.Generator, probability: float,
            min_objects: int = 1, max_objects: int = 3) -> AmodalSample:
    """With ``probability``, ``sample`` with objects cut from random images of ``sources``
    (any sequence of samples) pasted on top (:func:`paste_objects`); else ``sample``.
    Deterministic for a given ``rng`` state."""
    if probability <= 0 or len(sources) == 0 or rng.random() >= probability:
        return sample
    for _ in range(SOURCE_TRIES):
        objects = extract_objects(sources[int(rng.integers(len(sources)))])
        if objects:
            return paste_objects(sample, objects, rng, max_objects=max_objects,
                                 min_objects=min_objects)
    return sample
