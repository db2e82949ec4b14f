"""label_crops (all detections resampled at once) against a per-pixel float64 reference."""

import math

import numpy as np
import pytest
import torch

from orcnn_core import predictor
from orcnn_core.predictor import label_crops

HEIGHT, WIDTH, CELLS = 48, 64, 14

# Amodal boxes (x1, y1, x2, y2) on a 64 x 48 image.
BOXES = [
    (10.3, 5.7, 30.9, 28.2),     # inside, fractional edges
    (-12.5, 10.0, 14.2, 30.0),   # cut by the left border
    (50.0, -8.4, 75.6, 20.0),    # cut by the right and the top border
    (20.0, 40.0, 44.0, 59.5),    # cut by the bottom border
    (-10.0, -6.0, 74.0, 55.0),   # larger than the image on all sides
    (70.0, 10.0, 80.0, 20.0),    # entirely outside (right of the image)
    (30.2, 30.4, 30.6, 30.9),    # smaller than a pixel
    (5.0, 5.0, 5.0, 12.0),       # zero width
    (0.0, 0.0, 64.0, 48.0),      # exactly the image
]


def bilinear(image, v, u):
    """Bilinear interpolation of ``image`` [m, m] at row v, column u (cell centres at
    integers), zero outside: the four neighbouring cells weighted by distance."""
    m = image.shape[0]
    j0, i0 = math.floor(v), math.floor(u)
    value = 0.0
    for j, wy in ((j0, 1 - (v - j0)), (j0 + 1, v - j0)):
        for i, wx in ((i0, 1 - (u - i0)), (i0 + 1, u - i0)):
            if 0 <= j < m and 0 <= i < m:
                value += wy * wx * image[j, i]
    return value


def reference_crop(box, amodal_logits, visible_logits, image_size):
    """One detection, pixel by pixel in float64: (roi, labels, ambiguous), where ambiguous
    marks pixels whose probabilities lie within 1e-5 of the 0.5 threshold."""
    height, width = image_size
    x0, y0, x1, y1 = box
    left, top = math.floor(x0), math.floor(y0)
    w, h = max(math.ceil(x1) - left, 1), max(math.ceil(y1) - top, 1)
    m = amodal_logits.shape[0]
    amodal_p, visible_p = (1 / (1 + np.exp(-np.asarray(logits, np.float64)))
                           for logits in (amodal_logits, visible_logits))
    labels = np.zeros((h, w), np.uint8)
    ambiguous = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            x, y = left + c, top + r
            # The mask's m cells span the float box; the pixel centre in cell units.
            u = (x + 0.5 - x0) / max(x1 - x0, 1e-6) * m - 0.5
            v = (y + 0.5 - y0) / max(y1 - y0, 1e-6) * m - 0.5
            pa, pv = bilinear(amodal_p, v, u), bilinear(visible_p, v, u)
            amodal = pa >= 0.5
            visible = amodal and pv >= 0.5 and 0 <= x < width and 0 <= y < height
            labels[r, c] = 1 if visible else (2 if amodal else 0)
            ambiguous[r, c] = abs(pa - 0.5) < 1e-5 or abs(pv - 0.5) < 1e-5
    return (left, top, w, h), labels, ambiguous


def logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(BOXES), CELLS, CELLS, generator=g) * 3


def check_against_reference(rois, crops, amodal, visible):
    assert len(crops) == len(BOXES)
    for i, box in enumerate(BOXES):
        roi, expected, ambiguous = reference_crop(box, amodal[i].numpy(), visible[i].numpy(),
                                                  (HEIGHT, WIDTH))
        assert tuple(rois[i].tolist()) == roi, i
        got = crops[i].numpy()
        assert got.shape == expected.shape and got.dtype == np.uint8, i
        assert ambiguous.sum() <= 2, i  # the comparison below is not vacuous
        assert np.array_equal(got[~ambiguous], expected[~ambiguous]), i


def test_label_crops_equal_per_pixel_reference():
    amodal, visible = logits(0), logits(1)
    rois, crops = label_crops(torch.tensor(BOXES), amodal, visible, (HEIGHT, WIDTH))
    assert rois.dtype == torch.int64 and rois.shape == (len(BOXES), 4)
    check_against_reference(rois, crops, amodal, visible)
    # Every kind of pixel occurs: hidden ones outside the image, visible ones inside.
    labels = np.concatenate([c.numpy().ravel() for c in crops])
    assert set(np.unique(labels)) == {0, 1, 2}
    assert not (crops[5].numpy() == 1).any()  # outside the image nothing is visible


@pytest.mark.parametrize("budget", [1, 700, 5000])
def test_label_crops_in_several_batches_equal_reference(monkeypatch, budget):
    # A small pixel budget splits the detections into batches of one or a few.
    monkeypatch.setattr(predictor, "CROP_BATCH_PIXELS", budget)
    amodal, visible = logits(2), logits(3)
    rois, crops = label_crops(torch.tensor(BOXES), amodal, visible, (HEIGHT, WIDTH))
    check_against_reference(rois, crops, amodal, visible)


def test_label_crops_without_detections():
    empty = torch.zeros(0, CELLS, CELLS)
    rois, crops = label_crops(torch.zeros(0, 4), empty, empty, (HEIGHT, WIDTH))
    assert rois.shape == (0, 4) and rois.dtype == torch.int64
    assert crops == []
