"""Predictor: label crops, pasting, input checks, and a short overfit run on two images."""

import numpy as np
import pytest
import torch

from orcnn_core.config import ModelConfig
from orcnn_core.errors import InputError
from orcnn_core.model import build_model
from orcnn_core.predictor import Prediction, Predictor, label_crops, paste_crops

SIZE, PAD = 96, 16
RED, BLUE = (230, 30, 30), (30, 50, 230)


def ellipse(box, pad=PAD, size=SIZE):
    """Filled ellipse inscribed in ``box`` (image pixels) on the padded canvas, bool."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[:size + 2 * pad, :size + 2 * pad] - pad + 0.5
    return ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 \
        + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1


def scene(objects):
    """objects: (box, label, colour), bottom first. Returns the uint8 image and the target
    (amodal masks are the full ellipses, visible masks what the later ones leave uncovered
    inside the image)."""
    canvas = np.full((SIZE + 2 * PAD, SIZE + 2 * PAD, 3), 128, np.uint8)
    inside = np.zeros(canvas.shape[:2], bool)
    inside[PAD:PAD + SIZE, PAD:PAD + SIZE] = True
    amodal = [ellipse(box) for box, _, _ in objects]
    visible = []
    for i, mask in enumerate(amodal):
        canvas[mask] = objects[i][2]
        above = np.any(amodal[i + 1:], axis=0) if i + 1 < len(amodal) else False
        visible.append(mask & ~above & inside)
    target = {
        "boxes": torch.tensor([box for box, _, _ in objects], dtype=torch.float32),
        "labels": torch.tensor([label for _, label, _ in objects]),
        "amodal_masks": torch.from_numpy(np.stack(amodal).astype(np.uint8)),
        "visible_masks": torch.from_numpy(np.stack(visible).astype(np.uint8)),
        "mask_padding": PAD,
    }
    return canvas[PAD:PAD + SIZE, PAD:PAD + SIZE].copy(), target


SCENES = [
    # red (1) partly under blue (2)
    [((20, 20, 60, 56), 1, RED), ((44, 36, 84, 80), 2, BLUE)],
    # blue under red; the red one cut by the right image border (amodal x up to 106)
    [((16, 12, 64, 50), 2, BLUE), ((62, 34, 106, 84), 1, RED)],
]


def overfit_config():
    return ModelConfig.small(
        min_size=SIZE, max_size=SIZE, num_classes=3, class_names=["red", "blue"],
        fpn_channels=64, mask_head_channels=64, box_head_dim=256,
        anchor_sizes=(16, 24, 32, 48, 64), rpn_batch_size_per_image=64,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=64, box_detections_per_img=10)


@pytest.fixture(scope="module")
def trained():
    """ORCNN (ResNet-18-FPN, narrow heads) trained 100 steps on the two scenes (~15 s)."""
    torch.manual_seed(0)
    model = build_model(overfit_config())
    data = [scene(objects) for objects in SCENES]
    images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in data]
    targets = [t for _, t in data]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(100):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return Predictor(model, device="cpu", score_thresh=0.5), data


def canvas_masks(prediction, i):
    """Prediction i's amodal and visible masks on the padded canvas (outside parts kept)."""
    x, y, w, h = prediction.rois[i]
    n = SIZE + 2 * PAD
    amodal, visible = np.zeros((n, n), bool), np.zeros((n, n), bool)
    crop = prediction.crops[i]
    y0, x0 = max(y + PAD, 0), max(x + PAD, 0)
    y1, x1 = min(y + PAD + h, n), min(x + PAD + w, n)
    window = crop[y0 - y - PAD:y1 - y - PAD, x0 - x - PAD:x1 - x - PAD]
    amodal[y0:y1, x0:x1] = window > 0
    visible[y0:y1, x0:x1] = window == 1
    return amodal, visible


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_overfit_two_images_reaches_amodal_and_visible_iou(trained):
    predictor, data = trained
    for image, target in data:
        prediction = predictor(image)
        assert len(prediction) >= 2
        for j in range(len(target["labels"])):
            gt_amodal = target["amodal_masks"][j].numpy().astype(bool)
            gt_visible = target["visible_masks"][j].numpy().astype(bool)
            best = max(
                ((iou(a, gt_amodal), iou(v, gt_visible))
                 for i in range(len(prediction)) if prediction.labels[i] == target["labels"][j]
                 for a, v in [canvas_masks(prediction, i)]),
                default=(0.0, 0.0))
            assert best[0] > 0.5 and best[1] > 0.5, (j, best)
    # The truncated red object of scene 2: its amodal box leaves the image, its crop marks
    # the part outside the image hidden (2).
    prediction = predictor(data[1][0])
    red = [i for i in range(len(prediction)) if prediction.class_names[i] == "red"]
    assert prediction.truncated[red[0]]
    assert prediction.boxes[red[0], 2] > SIZE


def test_image_without_objects_gives_empty_prediction(trained):
    predictor, _ = trained
    prediction = predictor(np.full((SIZE, SIZE, 3), 128, np.uint8))
    assert len(prediction) == 0
    assert prediction.boxes.shape == (0, 4) and prediction.boxes.dtype == np.float32
    assert prediction.scores.shape == (0,) and prediction.labels.dtype == np.int64
    assert prediction.rois.shape == (0, 4) and prediction.rois.dtype == np.int32
    assert prediction.crops == [] and prediction.class_names == []
    assert prediction.amodal_areas.shape == (0,) and prediction.truncated.shape == (0,)
    amodal, visible = paste_crops(prediction)
    assert amodal.shape == visible.shape == (0, SIZE, SIZE)


def test_score_threshold_one_gives_no_detections():
    torch.manual_seed(0)
    predictor = Predictor(build_model(overfit_config()), device="cpu", score_thresh=1.0)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    prediction = predictor(image)
    assert len(prediction) == 0 and prediction.image_size == (50, 70)


def test_bgr_input_equals_rgb_input():
    torch.manual_seed(0)
    cfg = overfit_config().replace(box_score_thresh=0.0)
    predictor = Predictor(build_model(cfg), device="cpu")
    rgb = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    a, b = predictor(rgb), predictor(rgb[:, :, ::-1], color_order="bgr")
    assert len(a) > 0
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.rois, b.rois)
    assert all(np.array_equal(x, y) for x, y in zip(a.crops, b.crops))
    # The other order is a different image for the network.
    c = predictor(rgb, color_order="bgr")
    assert not np.array_equal(a.boxes, c.boxes)


def test_invalid_inputs_are_input_errors():
    predictor = Predictor(build_model(overfit_config()), device="cpu")
    with pytest.raises(InputError, match=r"shape \(10, 10\) dtype uint8"):
        predictor(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="dtype float32"):
        predictor(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError, match=r"shape \(10, 10, 4\)"):
        predictor(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(InputError, match="color_order"):
        predictor(np.zeros((10, 10, 3), np.uint8), color_order="hsv")
    with pytest.raises(InputError, match="score_thresh"):
        Predictor(build_model(overfit_config()), device="cpu", score_thresh=2)
    with pytest.raises(InputError, match="device"):
        Predictor(build_model(overfit_config()), device="tpu:7")


# ------------------------------------------------------------------------------ crops
def test_label_crops_box_beyond_image_hand_computed():
    # Image 8 x 8. Box x in [-4, 12), y in [2.5, 10): integer box x -4..12, y 2..10.
    boxes = torch.tensor([[-4.0, 2.5, 12.0, 10.0]])
    high = torch.full((1, 4, 4), 10.0)
    rois, crops = label_crops(boxes, high, high, (8, 8))
    assert rois.tolist() == [[-4, 2, 16, 8]]
    expected = np.full((8, 16), 2, np.uint8)  # amodal everywhere in the box...
    expected[:6, 4:12] = 1  # ...visible where inside the image (rows 2..7, columns 0..7)
    # Bilinear sampling reads zeros beyond the mask. Row 0 (y = 2) has its centre on the box
    # edge 2.5: p = 0.5 * sigmoid(10) < 0.5. The corners of the last row (centre 9.5, mask
    # row 3.23; x centres -3.5 and 11.5, mask columns -0.375 and 3.375) get
    # p = 0.767 * 0.625 < 0.5.
    expected[0] = 0
    expected[7, 0] = expected[7, 15] = 0
    assert np.array_equal(crops[0].numpy(), expected)
    # Not visible anywhere: all amodal pixels are hidden (2); not amodal: background.
    rois, crops = label_crops(boxes, high, -high, (8, 8))
    assert set(np.unique(crops[0].numpy())) == {0, 2}
    rois, crops = label_crops(boxes, -high, high, (8, 8))
    assert not crops[0].numpy().any()


def test_label_crops_resample_mask_geometry():
    # A 4 x 4 mask over the box [0, 8) x [0, 8): left half amodal. Crop pixel x has its
    # centre at mask coordinate (x + 0.5) / 2 - 0.5: x = 3 -> 1.25 (p = 0.75 * 1 + 0.25 * 0),
    # x = 4 -> 1.75 (p = 0.25), x = 0 -> -0.25 (p = 0.75, a quarter from zero padding):
    # columns 0..3 amodal, 4..7 not, in every row.
    logits = torch.full((1, 4, 4), -30.0)
    logits[0, :, :2] = 30.0
    rois, crops = label_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), logits, logits, (8, 8))
    assert rois.tolist() == [[0, 0, 8, 8]]
    expected = np.zeros((8, 8), np.uint8)
    expected[:, :4] = 1
    assert np.array_equal(crops[0].numpy(), expected)
    # Shifted by 0.6 px the threshold moves by one column: centre of x = 4 is at mask
    # coordinate (4.5 - 0.6) / 2 - 0.5 = 1.45 (p = 0.55).
    _, crops = label_crops(torch.tensor([[0.6, 0.0, 8.6, 8.0]]), logits, logits, (8, 9))
    assert crops[0].shape == (8, 9)
    assert crops[0][3].tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0]


def test_label_crops_probabilities_hand_computed():
    # The geometry of the test above: columns 0..7 of rows 1..6 have p = 0.75, 1, 1, 0.75,
    # 0.25, 0, 0, 0 (logit 30: sigmoid = 1); rows 0 and 7 centre a quarter cell beyond the
    # mask, so 0.75 times that. Quantised: round(255 * p).
    logits = torch.full((1, 4, 4), -30.0)
    logits[0, :, :2] = 30.0
    rois, crops, probs = label_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), logits, -logits,
                                     (8, 8), with_probs=True)
    assert probs[0].dtype == torch.uint8 and tuple(probs[0].shape) == (2, 8, 8)
    # The visible mask is the mirror image (right half 1): zero padding on its right edge.
    columns = np.array([0.75, 1, 1, 0.75, 0.25, 0, 0, 0])
    for row in range(8):
        weight = 0.75 if row in (0, 7) else 1.0
        assert probs[0][0, row].tolist() == np.round(255 * weight * columns).tolist()
        assert probs[0][1, row].tolist() == np.round(255 * weight * columns[::-1]).tolist()
    # The labels are those of the call without probabilities.
    _, plain = label_crops(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), logits, -logits, (8, 8))
    assert torch.equal(crops[0], plain[0])
    # Outside the image nothing is visible: p_visible is 0 there.
    _, _, probs = label_crops(torch.tensor([[-4.0, 0.0, 4.0, 8.0]]), logits, logits, (8, 8),
                              with_probs=True)
    assert not probs[0][1, :, :4].any() and probs[0][1, :, 4:].any()


def test_prediction_properties_and_paste_crops():
    crop_a = np.array([[2, 2, 1], [2, 1, 1]], np.uint8)  # roi at x = -2: first 2 columns out
    crop_b = np.array([[0, 1], [2, 0]], np.uint8)
    prediction = Prediction(
        boxes=np.array([[-2, 0, 1, 2], [3, 3, 5, 5]], np.float32),
        scores=np.array([0.9, 0.8], np.float32), labels=np.array([1, 2]),
        class_names=["a", "b"], rois=np.array([[-2, 0, 3, 2], [3, 3, 2, 2]], np.int32),
        crops=[crop_a, crop_b], image_size=(4, 5))
    assert prediction.amodal_areas.tolist() == [6, 2]
    assert prediction.visible_areas.tolist() == [3, 1]
    np.testing.assert_allclose(prediction.occlusion_ratios, [0.5, 0.5])
    # b's hidden pixel (value 2, crop row 1) lies on image row 4: outside the 4-row image.
    assert prediction.truncated.tolist() == [True, True]
    amodal, visible = paste_crops(prediction)
    expected = np.zeros((2, 4, 5), bool)
    expected[0, 0:2, 0] = True  # crop_a column 2 (x = 0), rows 0..1: visible
    expected[1, 3, 4] = True  # crop_b row 0 (y = 3): [0, 1] at x = 3..4
    assert np.array_equal(amodal, expected)
    assert np.array_equal(visible, expected)  # the only hidden pixels lie outside
