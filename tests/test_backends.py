"""Inference back-ends against eager torch: raw detections, final crops, the graph cache,
bad names, and the ROS node running the onnxruntime back-end over real DDS."""

import numpy as np
import pytest
import torch

from orcnn_core.backends import BackendError
from orcnn_core.errors import InputError
from orcnn_core.predictor import Predictor, paste_crops
from orcnn_core.synth import SynthConfig, generate_samples
from orcnn_core.weights import build_from_file

WIDTH, HEIGHT = 160, 120
SCENES = [s.image for s in generate_samples(3, 11, SynthConfig(width=WIDTH, height=HEIGHT))]
CPU_BACKENDS = ("torchscript", "onnxruntime")

#: Largest |back-end - eager| per output on the tiny model. Every back-end evaluates the same
#: float32 network, so what differs is the order of sums and, for TorchScript, batch norm
#: folded into the convolutions: measured <= 3e-5 px on boxes, <= 3e-7 on scores, <= 3e-4 on
#: mask logits. The bounds sit 10-50x above that, far below what a wrong graph gives (boxes
#: off by pixels, a wrong head's logits off by whole units).
TOLERANCES = {"boxes": 1e-3, "scores": 1e-5, "amodal_mask_logits": 5e-3,
              "visible_mask_logits": 5e-3}
#: Share of full-image mask pixels that must agree: a mask probability within ~1e-3 of 0.5
#: may round to the other side of the 0.5 threshold (the untrained tiny model has such
#: pixels); measured: all pixels equal.
MIN_EQUAL_PIXELS = 0.99
#: Score threshold at which the tiny model's detection count differs between SCENES
#: (its untrained scores lie in 0.32-0.44).
VARYING_THRESHOLD = 0.37


def as_tensor(image):
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)


def assert_close_to_eager(eager_det, det, what):
    assert len(det["boxes"]) == len(eager_det["boxes"]), f"{what}: detection count"
    assert torch.equal(det["labels"].cpu(), eager_det["labels"].cpu()), f"{what}: labels"
    for key, tol in TOLERANCES.items():
        assert det[key].dtype == torch.float32, f"{what}: {key} dtype"
        assert det[key].shape == eager_det[key].shape, f"{what}: {key} shape"
        if len(det[key]):
            diff = float((det[key] - eager_det[key]).abs().max())
            assert diff <= tol, f"{what}: {key} differs by {diff:.3g} > {tol}"


@pytest.fixture(scope="module")
def eager(tiny_model_path):
    return Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_eager(name, eager, tiny_model_path):
    predictor = Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0,
                                    backend=name)
    assert predictor.backend.name == name
    x = as_tensor(SCENES[0])
    with torch.inference_mode():
        reference = eager.model([x])[0]
        det = predictor.backend(x)
    assert len(reference["boxes"]) == 20  # score threshold 0: the detection cap
    assert_close_to_eager(reference, det, name)

    # The whole Predictor: same instances, full-image masks equal but for rounding at 0.5.
    expected, got = eager(SCENES[0]), predictor(SCENES[0])
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.boxes, expected.boxes, atol=TOLERANCES["boxes"])
    for mask_got, mask_expected in zip(paste_crops(got), paste_crops(expected)):
        assert np.mean(mask_got == mask_expected) >= MIN_EQUAL_PIXELS
    assert len(predictor.backend.builds) == 1  # the second call reused the graph

    # The threshold is a constant of the graph: changing it builds a new one, and the
    # detection count stays data dependent (it differs between the scenes).
    eager.set_limits(VARYING_THRESHOLD)
    predictor.set_limits(VARYING_THRESHOLD)
    try:
        counts = []
        with torch.inference_mode():
            for k, image in enumerate(SCENES):
                reference = eager.model([as_tensor(image)])[0]
                assert_close_to_eager(reference, predictor.backend(as_tensor(image)),
                                      f"{name}, scene {k}")
                counts.append(len(reference["boxes"]))
    finally:
        eager.set_limits(0.0)
    assert len(set(counts)) > 1 and min(counts) > 0, counts
    assert [(b.height, b.width) for b in predictor.backend.builds] == [(HEIGHT, WIDTH)] * 2


def test_torchscript_builds_one_graph_per_image_size(eager, tiny_model_path):
    predictor = Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0,
                                    backend="torchscript")
    small = np.ascontiguousarray(SCENES[1][:96, :128])
    for image in (SCENES[1], small, SCENES[1]):
        got, expected = predictor(image), eager(image)
        assert got.image_size == image.shape[:2]
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=TOLERANCES["boxes"])
    assert [(b.height, b.width) for b in predictor.backend.builds] == [(120, 160), (96, 128)]


def test_bad_backend_names_are_refused_with_the_reason(tiny_model_path):
    with pytest.raises(InputError, match="eager, torchscript, onnxruntime, tensorrt"):
        Predictor.from_file(tiny_model_path, device="cpu", backend="tensorflow")
    with pytest.raises(InputError, match="torch.compile .* recompiled"):
        Predictor.from_file(tiny_model_path, device="cpu", backend="compile")
    # A subclass of InputError, so that the node can point at its backend parameter.
    with pytest.raises(BackendError, match="tensorrt back-end needs a CUDA device"):
        Predictor(build_from_file(tiny_model_path), device="cpu", backend="tensorrt")


def test_cli_backend_option(tmp_path, tiny_model_path, capsys):
    import cv2

    from orcnn_core.cli import main

    cv2.imwrite(str(tmp_path / "scene.png"), SCENES[0][:, :, ::-1])
    args = ["predict", "--weights", str(tiny_model_path), "--images", str(tmp_path),
            "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "out"), "--backend", "onnx"]) == 2
    assert "backend 'onnx' is unknown" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "out"), "--backend", "torchscript"]) == 0
    assert (tmp_path / "out" / "predictions.json").is_file()


# ----------------------------------------------------------------------- sizes and failures
def test_sizes_beyond_the_image_limits_are_refused_before_any_build(tiny_model_path,
                                                                    monkeypatch):
    """The image limits of orcnn_core.imageio apply to graph builds: a size beyond them is
    refused in milliseconds, nothing built, and the next frame of a good size works."""
    import time

    from orcnn_core.imageio import LIMIT_ENV

    predictor = Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0,
                                    backend="onnxruntime")
    backend = predictor.backend
    for shape, message in (((10, 10000), "an aspect ratio above 16"),
                           ((1, 17), "an aspect ratio above 16"),
                           ((120, 240), "a side longer than 200 px")):
        if "200 px" in message:  # the limits' environment variables apply too
            monkeypatch.setenv(LIMIT_ENV["side"], "200")
        start = time.perf_counter()
        with pytest.raises(InputError, match=rf"^onnxruntime \(CPUExecutionProvider\) back-end: "
                                             rf"no graph for {shape[1]}x{shape[0]} images, "
                                             rf"{message}"):
            backend(torch.zeros(3, *shape))
        assert time.perf_counter() - start < 0.5
    assert backend.builds == [] and backend.building is None and not backend._failed
    monkeypatch.delenv(LIMIT_ENV["side"])
    predictor(SCENES[0])
    assert [(b.height, b.width) for b in backend.builds] == [(HEIGHT, WIDTH)]
    # The graph's session keeps no memory arena or pattern (buffers of its largest run).
    options = next(iter(backend._graphs.values())).get_session_options()
    assert options.enable_cpu_mem_arena is False and options.enable_mem_pattern is False


def test_a_failed_build_fails_fast_and_keeps_only_its_message(tiny_model_path):
    """A model whose mask logits are NaN fails the check of every graph against eager
    torch: the first frame of the size pays the build, later ones fail at once with the
    same message, and nothing of the build (tensors of the frame size) stays alive."""
    import gc
    import time

    from tiny_models import NODE_MODEL, tiny_model

    model = tiny_model(**NODE_MODEL)
    with torch.no_grad():
        model.roi_heads.amodal_mask_predictor.mask_fcn_logits.bias.fill_(float("nan"))
    predictor = Predictor(model, device="cpu", score_thresh=0.0, backend="onnxruntime")
    height, width = 104, 136  # a size no other tensor here has
    image = np.ascontiguousarray(SCENES[2][:height, :width])
    with pytest.raises(RuntimeError,
                       match="amodal_mask_logits: max abs difference nan") as first:
        predictor(image)
    assert first.value.__cause__ is None and first.value.__context__ is None
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"no graph for {width}x{height} images, its build "
                                           rf"failed: .*amodal_mask_logits: max abs diff"):
        predictor(image)
    assert time.perf_counter() - start < 0.5
    backend = predictor.backend
    assert list(backend._failed) == [backend._key(height, width)]
    assert all(type(message) is str for message in backend._failed.values())
    assert backend.builds == [] and backend.building is None
    del first
    gc.collect()
    alive = [o for o in gc.get_objects()
             if torch.is_tensor(o) and tuple(o.shape[-2:]) == (height, width)]
    assert alive == []


# ----------------------------------------------------------------------------- ROS node
def test_node_runs_the_onnxruntime_backend(tiny_model_path, ros_domain_id):
    pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    from node_harness import RELIABLE, Collector, Harness
    from orcnn_ros.conversions import array_to_image_msg
    from orcnn_ros.msg import AmodalInstanceArray

    with Harness("backend_test_client", rosout=False) as harness:
        node = harness.start_node(tiny_model_path, max_instances=15, backend="onnxruntime")
        try:
            assert node.lifecycle_state() == "active"
            answers = Collector(harness, AmodalInstanceArray, "/amodal_instances")
            diagnostics = Collector(harness, DiagnosticArray, "/diagnostics", 10)
            pub = harness.node.create_publisher(Image, "/image", RELIABLE)
            harness.spin_until(lambda: pub.get_subscription_count() > 0, 60, "discovery")
            # 320 x 240: the size the node warms up with at configure, so its graph exists.
            image = next(generate_samples(1, 5, SynthConfig(width=320, height=240))).image
            pub.publish(array_to_image_msg(image, "rgb8"))
            harness.spin_until(lambda: answers.messages, 60, "an AmodalInstanceArray")
            answer = answers.messages[0]
            assert (answer.image_width, answer.image_height) == (320, 240)
            assert len(answer.instances) == 15
            # One graph: the one built at configure, for the warm-up's size and these
            # settings.
            assert [(b.height, b.width) for b in node._predictor.backend.builds] \
                == [(240, 320)]
            # The same classes and scores as eager torch gives on the same image.
            expected = Predictor.from_file(tiny_model_path, device="cpu", score_thresh=0.0)(
                image)
            assert [i.class_id for i in answer.instances] == expected.labels[:15].tolist()
            np.testing.assert_allclose([i.score for i in answer.instances],
                                       expected.scores[:15], atol=TOLERANCES["scores"])

            def backend_values():
                return [kv.value for m in diagnostics.messages for s in m.status
                        for kv in s.values
                        if s.name == "orcnn_perception: inference" and kv.key == "backend"]

            harness.spin_until(backend_values, 10, "a diagnostics message")
            assert backend_values()[-1] == "onnxruntime"
        finally:
            harness.destroy(node)
