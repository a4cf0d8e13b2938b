"""Fixtures of the cluster tests: a local Ray cluster per module, tiny checkpoints, HF
references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.engine_utils import HFReference
from tests.helpers.local_ray import start_local_ray
from tests.helpers.tiny_models import save_tiny_checkpoint
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

ray = pytest.importorskip("ray")

# Logical CPUs (the ranks sleep between steps): a TP=2 replica (coordinator + 2 ranks) beside
# another TP=2 one fits, even on a 2-core machine.
RAY_CPUS = 6


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """A fresh local cluster (never one that RAY_ADDRESS or `ray start` left running)."""
    start_local_ray(RAY_CPUS)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """variant -> directory of its tiny random checkpoint (written once per session)."""
    saved: dict[str, Path] = {}

    def get(variant: str = "llama") -> Path:
        if variant not in saved:
            saved[variant] = save_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{variant}"),
                                                  variant)
        return saved[variant]

    return get


@pytest.fixture(scope="session")
def hf() -> HFReference:
    return HFReference()
