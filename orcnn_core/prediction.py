"""What a prediction is: per-instance label crops over integer amodal boxes (numpy only).

A :class:`Prediction` holds, per instance, a small label crop over the integer amodal box
(0 background, 1 visible, 2 amodal but hidden: occluded or outside the image) instead of
full-frame masks. :func:`paste_crops` makes full-image masks for users who want them. This
module is the bottom of the library: it imports neither torch nor any other project module.
"""

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Prediction", "paste_crops", "BACKGROUND", "VISIBLE", "HIDDEN"]

BACKGROUND, VISIBLE, HIDDEN = 0, 1, 2


@dataclass
class Prediction:
    """Detections of one image; N instances, all numpy.

    ``boxes`` float32 [N, 4] amodal xyxy in image pixels (may exceed the image);
    ``scores`` float32 [N]; ``labels`` int64 [N] (1..K); ``class_names`` N names;
    ``rois`` int32 [N, 4] ``(x, y, width, height)`` of the integer amodal box
    (``floor(x1), floor(y1), ceil(x2) - floor(x1), ceil(y2) - floor(y1)``, at least 1 x 1;
    x and y may be negative); ``crops`` N uint8 arrays [height, width] of the roi with values
    0 background, 1 visible, 2 amodal but hidden; ``image_size`` (height, width);
    ``probs`` (optional) N uint8 arrays [2, height, width]: the amodal and visible mask
    probabilities over the roi, 255 = 1 (0 outside the image for visible), the evidence the
    occlusion order is decided on (:mod:`orcnn_core.occlusion`); None when only the labels
    are known (then the order is decided on the labels); ``order`` (optional) float32
    [N, N]: entry (i, j) is the order head's probability that instance i lies on instance j
    (0 where their boxes do not overlap), None for a model without an order head.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list
    rois: np.ndarray
    crops: list
    image_size: tuple
    probs: list = None
    order: np.ndarray = None
    _stats: dict = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, image_size) -> "Prediction":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), [], np.zeros((0, 4), np.int32), [],
                   tuple(image_size), probs=[])

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def subset(self, indices) -> "Prediction":
        """A new Prediction of the instances at ``indices`` (any int sequence or array, in
        that order; repeats allowed), ``probs`` and ``order`` included when present; this
        one is not changed. The per-instance crops are shared, not copied."""
        index = np.asarray(indices, np.int64).reshape(-1)
        picked = index.tolist()
        return type(self)(
            boxes=self.boxes[index], scores=self.scores[index], labels=self.labels[index],
            class_names=[self.class_names[i] for i in picked], rois=self.rois[index],
            crops=[self.crops[i] for i in picked], image_size=tuple(self.image_size),
            probs=None if self.probs is None else [self.probs[i] for i in picked],
            order=None if self.order is None else self.order[np.ix_(index, index)])

    def _counts(self) -> dict:
        if self._stats is None:
            height, width = self.image_size
            amodal, visible, inside = [], [], []
            for (x, y, w, h), crop in zip(self.rois.tolist(), self.crops):
                amodal.append(int(np.count_nonzero(crop)))
                visible.append(int(np.count_nonzero(crop == VISIBLE)))
                if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
                    inside.append(amodal[-1])  # the roi lies inside the image
                    continue
                window = crop[max(-y, 0):max(min(height - y, h), 0),
                              max(-x, 0):max(min(width - x, w), 0)]
                inside.append(int(np.count_nonzero(window)))
            self._stats = {k: np.asarray(v, np.int64) for k, v in
                           (("amodal", amodal), ("visible", visible), ("inside", inside))}
        return self._stats

    @property
    def amodal_areas(self) -> np.ndarray:
        """int64 [N]: pixels labelled 1 or 2 (including those outside the image)."""
        return self._counts()["amodal"]

    @property
    def visible_areas(self) -> np.ndarray:
        """int64 [N]: pixels labelled 1."""
        return self._counts()["visible"]

    @property
    def occlusion_ratios(self) -> np.ndarray:
        """float32 [N]: 1 - visible area / amodal area (0 for an empty amodal mask)."""
        amodal = self.amodal_areas
        ratio = 1.0 - self.visible_areas / np.maximum(amodal, 1)
        return np.where(amodal > 0, ratio, 0.0).astype(np.float32)

    @property
    def truncated(self) -> np.ndarray:
        """bool [N]: the amodal mask reaches past the image border."""
        return self._counts()["amodal"] > self._counts()["inside"]


def paste_crops(prediction: Prediction):
    """Full-image masks: ``(amodal, visible)``, each bool [N, H, W] (parts outside the image
    are cut off)."""
    height, width = prediction.image_size
    n = len(prediction)
    amodal = np.zeros((n, height, width), bool)
    visible = np.zeros((n, height, width), bool)
    for i, ((x, y, w, h), crop) in enumerate(zip(prediction.rois, prediction.crops)):
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            continue
        window = crop[y0 - y:y1 - y, x0 - x:x1 - x]
        amodal[i, y0:y1, x0:x1] = window != BACKGROUND
        visible[i, y0:y1, x0:x1] = window == VISIBLE
    return amodal, visible
