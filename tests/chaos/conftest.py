"""Fixtures of the chaos tests: a local Ray cluster per module (the coordinators live in it,
so they outlive the gateway processes a test kills) and a tiny checkpoint with a long
context (requests of 1,500 tokens run for seconds)."""

from __future__ import annotations

import pytest

from tests.helpers.local_ray import start_local_ray
from tests.helpers.tiny_models import save_tiny_checkpoint
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

ray = pytest.importorskip("ray")

RAY_CPUS = 8


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local cluster (never one that RAY_ADDRESS or `ray start` left running)."""
    yield start_local_ray(RAY_CPUS)
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("chaos-tiny"), "llama",
                                    max_position_embeddings=2048))
