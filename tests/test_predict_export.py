"""``orcnn-core predict``, ``evaluate --weights`` and ``export`` on a tiny untrained model.

With score threshold 0 an untrained ORCNN still returns ``box_detections_per_img``
detections per image, enough to check files, ids and agreement between code paths. The
consistency check scores against a ground truth built from the model's own detections
(with other image and category ids than the files' order), so its AP is neither 0 nor 1
and wrong ids or categories would show.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch

from orcnn_core.cli import main
from orcnn_core.data import AmodalSample, write_amodal_coco
from orcnn_core.export import (OUTPUT_NAMES, TOLERANCES, ExportCheckError, export_onnx,
                               export_onnx_checked)
from orcnn_core.masks import decode
from orcnn_core.predictor import Predictor
from orcnn_core.results import prediction_to_coco
from orcnn_core.synth import check_scene, generate_dataset
from orcnn_core.weights import build_from_file
from helpers import assert_one_line_error
from tiny_models import NODE_MODEL, save_tiny_model, tiny_model

torch.set_num_threads(2)

WIDTH, HEIGHT = 128, 96
CLASSES = ["cereal_box", "soup_can"]  # the synthetic data set's first two categories
#: Ground-truth ids of the synthetic images 1, 2, 3 and category ids of labels 1, 2.
GT_IMAGE_IDS = [30, 10, 20]
GT_CATEGORY_IDS = [3, 7]


SCRIPT = shutil.which("orcnn-core", path=os.path.dirname(sys.executable))


def orcnn_core(*args, timeout=300):
    """Run the installed console script (``python -m orcnn_core.cli`` where the environment
    has none); returns the CompletedProcess."""
    command = [SCRIPT] if SCRIPT else [sys.executable, "-m", "orcnn_core.cli"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def weights(work) -> Path:
    return save_tiny_model(work / "tiny.safetensors", **dict(
        NODE_MODEL, class_names=CLASSES, min_size=96, max_size=128, box_detections_per_img=10))


@pytest.fixture(scope="module")
def synth(work) -> Path:
    """3 synthetic images (data/images/00000k.png) and data/annotations.json."""
    return generate_dataset(work / "data", 3, seed=0, size=(WIDTH, HEIGHT), num_classes=2)


@pytest.fixture(scope="module")
def model_gt(work, weights, synth) -> Path:
    """Ground truth = every other detection of the model (the 2nd, 4th, ... by score, with
    non-empty masks) on the synthetic images, in gt/model_gt.json with image ids
    GT_IMAGE_IDS and category ids GT_CATEGORY_IDS. Its file_names (images/00000k.png) do
    not resolve next to it: the images are found by base name or with --images."""
    predictor = Predictor.from_file(weights, device="cpu")
    padding = 16
    samples = []
    for k, image_id in enumerate(GT_IMAGE_IDS):
        bgr = cv2.imread(str(synth.parent / f"images/{k + 1:06d}.png"))
        prediction = predictor(bgr, color_order="bgr")
        entries = prediction_to_coco(prediction, image_id, padding)
        keep = [i for i in range(1, len(entries), 2)
                if prediction.visible_areas[i] > 0 and prediction.amodal_areas[i] > 0]
        assert keep
        samples.append(AmodalSample(
            image=None, boxes=prediction.boxes[keep], labels=prediction.labels[keep],
            amodal_masks=np.stack([decode(entries[i]["segmentation"]) for i in keep]),
            visible_masks=np.stack([decode(entries[i]["visible_mask"]) for i in keep]),
            mask_padding=padding, image_id=image_id, file_name=f"images/{k + 1:06d}.png",
            annotation_ids=np.arange(1, len(keep) + 1) + 100 * k))
    path = work / "gt" / "model_gt.json"
    write_amodal_coco(samples, path, categories=[
        {"id": cid, "name": name} for cid, name in zip(GT_CATEGORY_IDS, CLASSES)])
    return path


# ------------------------------------------------------------------------------ predict
def test_predict_writes_overlays_and_predictions_of_the_predictor(work, weights, synth):
    out = work / "pred"
    images = synth.parent / "images"
    result = orcnn_core("predict", "--weights", weights, "--images", images, "--out", out,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "3 images, 30 detections" in result.stdout

    files = sorted(images.glob("*.png"))
    overlays = sorted((out / "overlays").iterdir())
    assert [p.name for p in overlays] == [p.name for p in files]
    for image_path, overlay_path in zip(files, overlays):
        image, overlay = cv2.imread(str(image_path)), cv2.imread(str(overlay_path))
        assert overlay.shape == image.shape
        assert (overlay != image).any(axis=2).mean() > 0.05  # something drawn

    # Ids 1..N in sorted file order, mapped back in images.json.
    index = json.loads((out / "images.json").read_text())
    assert [(e["id"], e["file_name"], e["width"], e["height"]) for e in index["images"]] \
        == [(k + 1, p.name, WIDTH, HEIGHT) for k, p in enumerate(files)]
    assert [c["name"] for c in index["categories"]] == CLASSES

    predictions = json.loads((out / "predictions.json").read_text())
    predictor = Predictor.from_file(weights, device="cpu")
    for k, path in enumerate(files):
        expected = predictor(cv2.imread(str(path)), color_order="bgr")
        got = [p for p in predictions if p["image_id"] == k + 1]
        assert len(got) == len(expected) == 10
        np.testing.assert_allclose([p["score"] for p in got], expected.scores, atol=1e-5)
        assert [p["category_id"] for p in got] == expected.labels.tolist()
        for p in got:  # image-sized RLEs without a ground truth
            assert p["segmentation"]["size"] == p["visible_mask"]["size"] == [HEIGHT, WIDTH]

    # The file-to-file evaluation accepts it (ids 1..3 are also the synthetic GT's ids).
    result = orcnn_core("evaluate", "--gt", synth, "--predictions", out / "predictions.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| evaluation | AP_AV | AP_A | AP_V |")
    assert "30 predictions" in result.stdout


def test_evaluate_weights_equals_predict_then_evaluate(work, weights, synth, model_gt):
    out = work / "pred_gt"
    result = orcnn_core("predict", "--weights", weights, "--images",
                        synth.parent / "images" / "*.png", "--gt", model_gt, "--out", out,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert not (out / "images.json").exists()  # ids come from the ground truth
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted({p["image_id"] for p in predictions}) == sorted(GT_IMAGE_IDS)
    assert {p["category_id"] for p in predictions} <= set(GT_CATEGORY_IDS)
    # Masks on the ground truth's padded canvas.
    assert all(p["segmentation"]["size"] == [HEIGHT + 32, WIDTH + 32] for p in predictions)

    files = orcnn_core("evaluate", "--gt", model_gt, "--predictions", out / "predictions.json",
                       "--out", work / "metrics_files.json")
    assert files.returncode == 0, files.stderr
    direct = orcnn_core("evaluate", "--weights", weights, "--data", model_gt, "--images",
                        synth.parent, "--device", "cpu", "--out", work / "metrics_model.json")
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == files.stdout
    assert "| all |" in direct.stdout and "| occluded |" in direct.stdout

    metrics = json.loads((work / "metrics_model.json").read_text())
    assert metrics == json.loads((work / "metrics_files.json").read_text())
    documented = {"AP_AV", "AP_A", "AP_V", "AP50_AV", "AP50_A", "AP50_V", "AP75_AV", "AP75_A",
                  "AP75_V", "occluded", "order", "breakdown", "num_images", "num_gt",
                  "num_crowd", "num_predictions", "num_predictions_without_visible"}
    assert documented <= set(metrics)
    assert "AP_IV50" in metrics["occluded"]
    assert metrics["num_images"] == 3 and metrics["num_predictions"] == 30
    # Half of the detections are the ground truth: found only with the right image and
    # category ids; the other half are false positives, some ranked above them.
    assert 0.2 < metrics["AP50_A"] < 1.0


# ------------------------------------------------------------------------------ export
def test_export_onnx_matches_torch(work, weights, synth):
    out = work / "tiny.onnx"
    result = orcnn_core("export", "--weights", weights, "--format", "onnx", "--out", out,
                        "--height", HEIGHT, "--width", WIDTH, "--opset", 17)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches torch" in result.stdout
    for name in ("boxes", "scores", "amodal_mask_logits", "visible_mask_logits"):
        assert name in result.stdout

    # Check again independently, on another image (a real synthetic image file).
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == [3, HEIGHT, WIDTH]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    rgb = cv2.cvtColor(cv2.imread(str(synth.parent / "images" / "000002.png")),
                       cv2.COLOR_BGR2RGB)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        det = build_from_file(weights)([image])[0]
    onnx_out = dict(zip(OUTPUT_NAMES, session.run(None, {"image": image.numpy()})))
    assert onnx_out["boxes"].shape == (10, 4)
    assert onnx_out["amodal_mask_logits"].shape == (10, 28, 28)
    np.testing.assert_array_equal(onnx_out["labels"], det["labels"].numpy())
    for name in TOLERANCES:
        np.testing.assert_allclose(onnx_out[name], det[name].numpy(), rtol=0,
                                   atol=TOLERANCES[name], err_msg=name)


def test_export_that_fails_its_check_writes_nothing(work, weights):
    out = work / "never.onnx"
    impossible = {name: -1.0 for name in TOLERANCES}  # no difference is below -1
    with pytest.raises(ExportCheckError) as info:
        export_onnx(build_from_file(weights), out, HEIGHT, WIDTH,
                    check_image=check_scene(HEIGHT, WIDTH), tolerances=impossible)
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".never.onnx")]
    report = info.value.report
    assert report.detections_torch == report.detections_onnx == 10 and report.labels_equal
    assert set(report.max_abs_diff) == set(TOLERANCES)
    assert all(0 <= d < TOLERANCES[n] for n, d in report.max_abs_diff.items())
    assert "boxes: max abs difference" in str(info.value)


# ------------------------------------------------------------------------------ bad input
def run_main(capfd, *args):
    """``orcnn-core ARGS`` in this process: (exit code, stderr); fd-level capture also
    catches what C libraries (cv2) would print."""
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.err


def test_bad_weights_and_images_exit_2(work, weights, synth, capfd):
    images = synth.parent / "images"
    out = work / "bad_out"
    missing = work / "missing.safetensors"
    assert_one_line_error(*run_main(capfd, "predict", "--weights", missing, "--images",
                                    images, "--out", out), missing, "no such file")
    corrupt = work / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert_one_line_error(*run_main(capfd, "predict", "--weights", corrupt, "--images",
                                    images, "--out", out), corrupt)
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    work / "nothing*.png", "--out", out), "--images",
                          "nothing*.png")

    garbage_dir = work / "garbage"
    garbage_dir.mkdir()
    (garbage_dir / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1])
    (garbage_dir / "b.png").write_bytes(b"not an image")
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    garbage_dir, "--out", out), garbage_dir / "b.png")
    assert not (out / "overlays").exists()  # refused before any image was processed

    truncated_dir = work / "truncated"
    truncated_dir.mkdir()
    good = (images / "000001.png").read_bytes()
    (truncated_dir / "t.png").write_bytes(good[: len(good) // 2])
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    truncated_dir, "--out", out), truncated_dir / "t.png",
                          "cannot decode")
    assert not (out / "predictions.json").exists()

    blocker = work / "a_file"
    blocker.write_text("x")
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    images, "--out", blocker / "sub"), "--out", blocker)


def test_bad_ground_truth_and_evaluate_forms_exit_2(work, weights, synth, capfd):
    images = synth.parent / "images"
    broken = work / "broken.json"
    broken.write_text('{"images": [')
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    images, "--gt", broken, "--out", work / "o"), broken)
    assert_one_line_error(*run_main(capfd, "evaluate", "--weights", weights, "--data",
                                    broken), broken)
    missing = work / "nope.json"
    assert_one_line_error(*run_main(capfd, "evaluate", "--weights", weights, "--data",
                                    missing), missing)
    # The ground truth's images must exist, checked before the model runs.
    assert_one_line_error(*run_main(capfd, "evaluate", "--weights", weights, "--data", synth,
                                    "--images", work / "no_such_dir"), "000001.png",
                          "not found")
    # An image that is not in the ground truth.
    stray = work / "stray"
    stray.mkdir()
    (stray / "zzz.png").write_bytes((images / "000001.png").read_bytes())
    assert_one_line_error(*run_main(capfd, "predict", "--weights", weights, "--images",
                                    stray, "--gt", synth, "--out", work / "o"), "zzz.png",
                          "not an image of --gt")

    assert_one_line_error(*run_main(capfd, "evaluate", "--gt", synth, "--weights", weights),
                          "cannot be mixed", "--gt", "--weights")
    assert_one_line_error(*run_main(capfd, "evaluate", "--weights", weights),
                          "missing --data")
    assert_one_line_error(*run_main(capfd, "evaluate", "--gt", synth, "--predictions", broken,
                                    "--device", "cpu"), "cannot be mixed", "--device")
    assert_one_line_error(*run_main(capfd, "evaluate", "--predictions", broken),
                          "missing --gt")
    assert_one_line_error(*run_main(capfd, "evaluate"), "--gt", "--weights")


def test_bad_export_arguments_exit_2(work, weights, capfd):
    out = work / "x.onnx"
    assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out", out,
                                    "--opset", 9), "--opset 9", "[11, 20]")
    assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out", out,
                                    "--height", 4), "--height 4")
    assert_one_line_error(*run_main(capfd, "export", "--weights", work / "no.safetensors",
                                    "--out", out), "no.safetensors")
    assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out", work),
                          "is a directory")
    assert_one_line_error(*run_main(capfd, "export", "--weights", weights, "--out", out,
                                    "--check-image", work / "no.png"), "--check-image",
                          "no.png")
    assert not out.exists()


def test_console_script_exit_code_and_message():
    """The installed process: exit code 2 and one line on stderr, no traceback."""
    result = orcnn_core("evaluate", "--gt", "gt.json", "--data", "gt.json")
    assert result.returncode == 2
    assert result.stderr.startswith("orcnn-core evaluate: error: --gt")
    assert len(result.stderr.strip().splitlines()) == 1


def test_exported_resize_keeps_every_row_of_awkward_sizes():
    """Traced, the transform's resize size came from a float32 scale and onnxruntime's
    rounding of it lost a row at 2500 x 1500 (320 x 191 instead of 320 x 192), so the
    graph disagreed with torch and the size could not be served."""
    model = tiny_model(min_size=240, max_size=320, box_score_thresh=0.0).eval()
    image = (np.random.default_rng(0).random((1500, 2500, 3)) * 255).astype(np.uint8)
    _data, report, _session = export_onnx_checked(model, 1500, 2500, check_image=image)
    assert report.ok and report.detections_torch == report.detections_onnx > 0
