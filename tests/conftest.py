"""Shared test set-up: each test run talks DDS on a domain of its own."""

import os
import random

import pytest


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
