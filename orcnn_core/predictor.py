"""Inference for applications: numpy image in, numpy :class:`Prediction` out.

:class:`Predictor` is the only seam the ROS node uses. Per instance it returns a small
label crop over the integer amodal box (0 background, 1 visible, 2 amodal but hidden:
occluded or outside the image) instead of full-frame masks: resampling D masks of 28 x 28
onto their boxes costs far less than pasting D full-image masks. :func:`paste_crops` makes
full-image masks for users who want them.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from orcnn_core.errors import InputError

__all__ = ["Prediction", "Predictor", "paste_crops", "resolve_device"]

BACKGROUND, VISIBLE, HIDDEN = 0, 1, 2


@dataclass
class Prediction:
    """Detections of one image; N instances, all numpy.

    ``boxes`` float32 [N, 4] amodal xyxy in image pixels (may exceed the image);
    ``scores`` float32 [N]; ``labels`` int64 [N] (1..K); ``class_names`` N names;
    ``rois`` int32 [N, 4] ``(x, y, width, height)`` of the integer amodal box
    (``floor(x1), floor(y1), ceil(x2) - floor(x1), ceil(y2) - floor(y1)``, at least 1 x 1;
    x and y may be negative); ``crops`` N uint8 arrays [height, width] of the roi with values
    0 background, 1 visible, 2 amodal but hidden; ``image_size`` (height, width).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list
    rois: np.ndarray
    crops: list
    image_size: tuple
    _stats: dict = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, image_size) -> "Prediction":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), [], np.zeros((0, 4), np.int32), [],
                   tuple(image_size))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def _counts(self) -> dict:
        if self._stats is None:
            height, width = self.image_size
            amodal, visible, inside = [], [], []
            for (x, y, w, h), crop in zip(self.rois, self.crops):
                amodal.append(int(np.count_nonzero(crop)))
                visible.append(int(np.count_nonzero(crop == VISIBLE)))
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


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise a torch device name."""
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: {device!r} is not a device name (auto, cpu, cuda, "
                         f"cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device} requested but CUDA is not available")
    return device


def label_crops(boxes: torch.Tensor, amodal_logits: torch.Tensor,
                visible_logits: torch.Tensor, image_size):
    """Resample each detection's M x M masks onto its integer amodal box and label them.

    Args:
        boxes: float [D, 4], amodal xyxy in image pixels.
        amodal_logits, visible_logits: float [D, M, M] over each box.
        image_size: (height, width).
    Returns:
        (rois int64 [D, 4] as x, y, width, height; list of D uint8 tensors [h, w]).
    A pixel is amodal when p_amodal >= 0.5, visible when it is amodal, p_visible >= 0.5 and
    inside the image; label 2 is amodal and not visible.
    """
    height, width = image_size
    x0 = boxes[:, 0].floor()
    y0 = boxes[:, 1].floor()
    w = torch.maximum(boxes[:, 2].ceil() - x0, torch.ones_like(x0))
    h = torch.maximum(boxes[:, 3].ceil() - y0, torch.ones_like(y0))
    rois = torch.stack([x0, y0, w, h], 1).long()
    probs = torch.stack([amodal_logits, visible_logits], 1).sigmoid()  # [D, 2, M, M]
    crops = []
    # Python numbers for the loop: one device sync, not one per detection.
    for i, ((xi, yi, wi, hi), (bx0, by0, bx1, by1)) in enumerate(
            zip(rois.tolist(), boxes.tolist())):
        rows = torch.arange(hi, device=boxes.device) + yi  # image pixel coordinates
        cols = torch.arange(wi, device=boxes.device) + xi
        # Pixel centres in the mask's normalised coordinates: the M x M mask spans the float
        # box [bx0, bx1] x [by0, by1] (grid_sample with align_corners=False).
        xs = (cols + 0.5 - bx0) * (2 / max(bx1 - bx0, 1e-6)) - 1
        ys = (rows + 0.5 - by0) * (2 / max(by1 - by0, 1e-6)) - 1
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1)
        sampled = F.grid_sample(probs[i:i + 1], grid[None].to(probs.dtype), mode="bilinear",
                                padding_mode="zeros", align_corners=False)[0]
        amodal = sampled[0] >= 0.5
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))
        visible = amodal & (sampled[1] >= 0.5) & inside
        crop = torch.where(visible, VISIBLE, torch.where(amodal, HIDDEN, BACKGROUND))
        crops.append(crop.to(torch.uint8))
    return rois, crops


class Predictor:
    """ORCNN inference on numpy images.

    >>> predictor = Predictor.from_file("model.safetensors", device="auto")
    >>> prediction = predictor(image_bgr, color_order="bgr")   # H x W x 3 uint8
    """

    def __init__(self, model, device="auto", score_thresh=None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        if score_thresh is not None:
            if isinstance(score_thresh, bool) or not isinstance(score_thresh, (int, float)) \
                    or not 0.0 <= score_thresh <= 1.0 or math.isnan(score_thresh):
                raise InputError(f"score_thresh must be in [0, 1], got {score_thresh!r}")
            self.model.roi_heads.score_thresh = float(score_thresh)
        self.class_names = ["__background__"] + list(self.config.class_names)

    @classmethod
    def from_file(cls, path, device="auto", score_thresh=None) -> "Predictor":
        """Load a weights file written by :func:`orcnn_core.weights.save_weights`."""
        from orcnn_core.weights import build_from_file

        return cls(build_from_file(path, device="cpu"), device=device,
                   score_thresh=score_thresh)

    @property
    def score_thresh(self) -> float:
        return self.model.roi_heads.score_thresh

    def __call__(self, image: np.ndarray, color_order: str = "rgb") -> Prediction:
        """Detect the objects of one H x W x 3 uint8 image (``color_order`` rgb or bgr)."""
        if color_order not in ("rgb", "bgr"):
            raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
        if not isinstance(image, np.ndarray):
            raise InputError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"image must be an H x W x 3 uint8 array, got shape "
                             f"{image.shape} dtype {image.dtype}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise InputError(f"image must not be empty, got shape {image.shape}")
        with torch.inference_mode():
            # uint8 to the device first (4x less to copy than float), then convert there.
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            if color_order == "bgr":
                x = x.flip(-1)
            x = x.permute(2, 0, 1).float().div_(255.0)
            detections = self.model([x])[0]
            return self._prediction(detections, (height, width))

    def _prediction(self, det: dict, image_size) -> Prediction:
        boxes = det["boxes"]
        if boxes.shape[0] == 0:
            return Prediction.empty(image_size)
        rois, crops = label_crops(boxes, det["amodal_mask_logits"], det["visible_mask_logits"],
                                  image_size)
        # One device-to-host copy for all crops.
        flat = torch.cat([c.flatten() for c in crops]).cpu().numpy()
        sizes = [c.numel() for c in crops]
        pieces = np.split(flat, np.cumsum(sizes)[:-1])
        crops_np = [p.reshape(c.shape) for p, c in zip(pieces, crops)]
        labels = det["labels"].cpu().numpy().astype(np.int64)
        return Prediction(
            boxes=boxes.float().cpu().numpy(),
            scores=det["scores"].float().cpu().numpy(),
            labels=labels,
            class_names=[self.class_names[i] for i in labels],
            rois=rois.cpu().numpy().astype(np.int32),
            crops=crops_np,
            image_size=tuple(image_size),
        )
