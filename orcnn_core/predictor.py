"""Inference for applications: numpy image in, numpy :class:`Prediction` out.

:class:`Predictor` is the only seam the ROS node uses. Per instance it returns a small
label crop over the integer amodal box (0 background, 1 visible, 2 amodal but hidden:
occluded or outside the image) instead of full-frame masks: resampling D masks of 28 x 28
onto their boxes costs far less than pasting D full-image masks. :func:`paste_crops` makes
full-image masks for users who want them.
"""

import math

import numpy as np
import torch

from orcnn_core.backends import check_backend_name, create_backend
from orcnn_core.devices import resolve_device
from orcnn_core.errors import InputError
from orcnn_core.prediction import Prediction, paste_crops
from orcnn_core.weights import build_from_file

# Prediction, paste_crops and resolve_device are re-exported: users import them from here.
__all__ = ["Prediction", "Predictor", "paste_crops", "resolve_device", "label_crops"]

#: Largest D x h_max x w_max that :func:`label_crops` resamples in one batch (16 MiB per
#: float32 plane); more detections are processed in several batches.
CROP_BATCH_PIXELS = 1 << 22


def _bilinear_weights(first: torch.Tensor, size: int, low: torch.Tensor, high: torch.Tensor,
                      cells: int, limit: int):
    """Bilinear resampling weights along one axis, for pixels ``first + k`` (k < size).

    Args:
        first: int [D], the first pixel of each detection's integer box.
        low, high: float [D], the float box edges the ``cells`` mask cells span.
        limit: the image size along this axis.
    Returns:
        (weights, weights_in_image), float [D, size, cells]. A pixel centre at mask coordinate
        u (cell centres at 0 .. cells - 1, as ``grid_sample`` with ``align_corners=False``)
        gives cell j the weight max(0, 1 - |u - j|): bilinear interpolation with zeros
        outside the mask. The second copy is zero for pixels outside [0, limit).
    """
    pixels = torch.arange(size, device=first.device)[None, :] + first[:, None]
    scale = cells / (high - low).clamp_min(1e-6)
    u = (pixels + 0.5 - low[:, None]) * scale[:, None] - 0.5
    centres = torch.arange(cells, device=first.device, dtype=u.dtype)
    weights = (1 - (u[..., None] - centres).abs()).clamp_min_(0)
    in_image = ((pixels >= 0) & (pixels < limit)).to(weights.dtype)
    return weights, weights * in_image[..., None]


def _label_batch(boxes, rois, probs, height, width, rows, cols, with_probs=False):
    """uint8 labels [D, rows, cols] of D detections whose integer boxes fit rows x cols;
    with ``with_probs`` also their probabilities, uint8 [D, 2, rows, cols] (amodal, visible;
    255 = 1)."""
    cells = probs.shape[-1]
    boxes = boxes.to(probs.dtype)
    ry, ry_in_image = _bilinear_weights(rois[:, 1], rows, boxes[:, 1], boxes[:, 3], cells,
                                        height)
    rx, rx_in_image = _bilinear_weights(rois[:, 0], cols, boxes[:, 0], boxes[:, 2], cells,
                                        width)
    # Separable bilinear resampling: P_crop = R_y @ P_mask @ R_x^T, per detection.
    p_amodal = ry @ probs[:, 0] @ rx.transpose(1, 2)
    # Weights zeroed outside the image make p_visible 0 there: nothing outside is visible.
    p_visible = ry_in_image @ probs[:, 1] @ rx_in_image.transpose(1, 2)
    amodal, visible = p_amodal >= 0.5, p_visible >= 0.5
    # VISIBLE (1) on every amodal pixel, one more where it is hidden: HIDDEN (2).
    labels = amodal.view(torch.uint8) + (amodal & ~visible).view(torch.uint8)
    if not with_probs:
        return labels, None
    quantised = torch.stack([p_amodal, p_visible], 1).mul_(255).round_().clamp_(0, 255)
    return labels, quantised.to(torch.uint8)


def label_crops(boxes: torch.Tensor, amodal_logits: torch.Tensor,
                visible_logits: torch.Tensor, image_size, with_probs: bool = False):
    """Resample each detection's M x M masks onto its integer amodal box and label them.

    Args:
        boxes: float [D, 4], amodal xyxy in image pixels.
        amodal_logits, visible_logits: float [D, M, M] over each box.
        image_size: (height, width).
    Returns:
        (rois int64 [D, 4] as x, y, width, height; list of D uint8 tensors [h, w]); with
        ``with_probs`` a third item, D uint8 tensors [2, h, w]: the resampled amodal and
        visible probabilities, quantised to 0..255 (the occlusion order's evidence).
    The M x M mask spans the float box; each crop pixel takes the bilinear interpolation of
    the mask probabilities at its centre (zeros outside the mask). A pixel is amodal when
    p_amodal >= 0.5, visible when it is amodal, p_visible >= 0.5 and inside the image;
    label 2 is amodal and not visible. All detections are resampled together (in batches
    of at most :data:`CROP_BATCH_PIXELS` padded pixels); the crops are views of the batch.
    """
    height, width = image_size
    x0 = boxes[:, 0].floor()
    y0 = boxes[:, 1].floor()
    w = torch.maximum(boxes[:, 2].ceil() - x0, torch.ones_like(x0))
    h = torch.maximum(boxes[:, 3].ceil() - y0, torch.ones_like(y0))
    rois = torch.stack([x0, y0, w, h], 1).long()
    probs = torch.stack([amodal_logits, visible_logits], 1).float().sigmoid()  # [D, 2, M, M]
    sizes = rois[:, 2:].tolist()  # one device sync for all detections
    crops, prob_crops = [], []
    start = 0
    while start < len(sizes):
        # Grow the batch while its padded size stays within the budget (at least one).
        end, rows, cols = start, 0, 0
        while end < len(sizes):
            wi, hi = sizes[end]
            if end > start and (end + 1 - start) * max(rows, hi) * max(cols, wi) \
                    > CROP_BATCH_PIXELS:
                break
            rows, cols, end = max(rows, hi), max(cols, wi), end + 1
        labels, quantised = _label_batch(boxes[start:end], rois[start:end], probs[start:end],
                                         height, width, rows, cols, with_probs)
        crops += [labels[i, :hi, :wi] for i, (wi, hi) in enumerate(sizes[start:end])]
        if with_probs:
            prob_crops += [quantised[i, :, :hi, :wi]
                           for i, (wi, hi) in enumerate(sizes[start:end])]
        start = end
    return (rois, crops, prob_crops) if with_probs else (rois, crops)


class Predictor:
    """ORCNN inference on numpy images.

    >>> predictor = Predictor.from_file("model.safetensors", device="auto")
    >>> prediction = predictor(image_bgr, color_order="bgr")   # H x W x 3 uint8

    ``backend`` runs the detector: eager (default), torchscript, onnxruntime or tensorrt
    (:mod:`orcnn_core.backends`); everything after the detections is the same for all.
    :meth:`set_limits` is the one place that changes the score threshold and the instance
    cap; every back-end reads them from ``self.model``.
    """

    def __init__(self, model, device="auto", score_thresh=None, backend="eager"):
        check_backend_name(backend)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.set_limits(score_threshold=score_thresh)
        self.class_names = ["__background__"] + list(self.config.class_names)
        self.backend = create_backend(backend, self.model, self.device)

    @classmethod
    def from_file(cls, path, device="auto", score_thresh=None, backend="eager") -> "Predictor":
        """Load a weights file written by :func:`orcnn_core.weights.save_weights`."""
        check_backend_name(backend)  # before the (slower) load
        return cls(build_from_file(path, device="cpu"), device=device,
                   score_thresh=score_thresh, backend=backend)

    def set_limits(self, score_threshold=None, max_instances=None) -> None:
        """Minimum score and maximum number of detections per image (None: unchanged).

        Both apply inside the model, before the mask heads, so fewer boxes cost less; the
        fixed-size back-ends build a new graph for a new setting (a constant of the graph).
        """
        if score_threshold is not None:
            if isinstance(score_threshold, bool) \
                    or not isinstance(score_threshold, (int, float)) \
                    or math.isnan(score_threshold) or not 0.0 <= score_threshold <= 1.0:
                raise InputError(f"score_thresh must be in [0, 1], got {score_threshold!r}")
            self.model.roi_heads.score_thresh = float(score_threshold)
        if max_instances is not None:
            if isinstance(max_instances, bool) or not isinstance(max_instances, int) \
                    or max_instances < 1:
                raise InputError(f"max_instances must be an integer >= 1, got "
                                 f"{max_instances!r}")
            self.model.roi_heads.detections_per_img = int(max_instances)

    @property
    def score_thresh(self) -> float:
        """The score threshold in use."""
        return self.model.roi_heads.score_thresh

    @property
    def max_instances(self) -> int:
        """The most detections one image gives."""
        return self.model.roi_heads.detections_per_img

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
            detections = self.backend(x)
            return self._prediction(detections, (height, width))

    def _prediction(self, det: dict, image_size) -> Prediction:
        boxes = det["boxes"]
        if boxes.shape[0] == 0:
            return Prediction.empty(image_size)
        rois, crops, probs = label_crops(boxes, det["amodal_mask_logits"],
                                         det["visible_mask_logits"], image_size,
                                         with_probs=True)
        labels = det["labels"].cpu().numpy().astype(np.int64)
        return Prediction(
            boxes=boxes.float().cpu().numpy(),
            scores=det["scores"].float().cpu().numpy(),
            labels=labels,
            class_names=[self.class_names[i] for i in labels],
            rois=rois.cpu().numpy().astype(np.int32),
            crops=_to_numpy(crops),
            image_size=tuple(image_size),
            probs=_to_numpy(probs),
            order=None if "order_probs" not in det
            else det["order_probs"].float().cpu().numpy(),
        )


def _to_numpy(tensors: list) -> list:
    """numpy copies of same-dtype tensors with one device-to-host copy for all."""
    flat = torch.cat([t.flatten() for t in tensors]).cpu().numpy()
    pieces = np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])
    return [p.reshape(t.shape) for p, t in zip(pieces, tensors)]
