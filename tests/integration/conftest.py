import os

import pytest


@pytest.fixture(scope="module")
def sim_cluster():
    """Two simulated BI150 nodes (2 devices each) plus a driver-only head, all on 127.0.0.1."""
    from bi150_ray.demo import simulated_cluster

    with simulated_cluster(nodes=2, devices_per_node=2) as cluster:
        yield cluster


@pytest.fixture(autouse=True, scope="session")
def _ray_env():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
