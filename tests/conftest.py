"""Shared test set-up: each test run talks DDS on a domain of its own."""

import os
import random

import pytest
import torch


def pytest_configure(config):
    # A run-specific ROS_DOMAIN_ID keeps parallel runs (CI jobs, developers) from hearing
    # each other; subprocesses inherit it. Domain ids 1..101 are valid for every RMW.
    if "ORCNN_TEST_DOMAIN_ID" in os.environ:
        domain = int(os.environ["ORCNN_TEST_DOMAIN_ID"])
    else:
        domain = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little")) \
            .randint(1, 101)
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    return int(os.environ["ROS_DOMAIN_ID"])


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: with two, a process busy on the other core of a 2-core machine
    makes OpenMP's waiting threads spin and a test run ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Weights file of an untrained, fast model (160 x 120 input); score threshold 0 makes
    it emit up to 20 detections on any image."""
    from orcnn_core.config import ModelConfig
    from orcnn_core.model import build_model
    from orcnn_core.weights import save_weights

    torch.manual_seed(0)
    cfg = ModelConfig.small(
        num_classes=3, class_names=["box", "can"], min_size=120, max_size=160,
        fpn_channels=32, box_head_dim=64, mask_head_channels=32, rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20, box_detections_per_img=20, box_score_thresh=0.0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(build_model(cfg), cfg, path)
    return path
