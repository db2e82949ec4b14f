"""Shared test set-up: each test run talks DDS on a domain of its own."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

# The helper modules next to this file (tiny_models, node_harness, helpers) are imported by
# name; with --import-mode=importlib pytest puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    """Weights file of an untrained, fast model (tiny_models.NODE_MODEL: 160 x 120 input);
    score threshold 0 makes it emit up to 20 detections on any image."""
    from tiny_models import NODE_MODEL, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", **NODE_MODEL)
