"""Fixtures of the chaos tests: a local Ray cluster per module (the coordinators live in it,
so they outlive the gateway processes a test kills) and a tiny checkpoint with a long
context (requests of 1,500 tokens run for seconds)."""

from __future__ import annotations

import pytest

from tests.helpers.tiny_models import save_tiny_checkpoint
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

ray = pytest.importorskip("ray")

RAY_CPUS = 8


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local cluster (never one that RAY_ADDRESS or `ray start` left running)."""
    if ray.is_initialized():  # a connection another module left behind
        ray.shutdown()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("chaos-tiny"), "llama",
                                    max_position_embeddings=2048))
