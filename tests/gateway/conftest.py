"""Fixtures of the gateway tests (the served system end to end, over real gRPC on 127.0.0.1).

One local Ray cluster serves the whole folder (it is shut down as soon as the last test here
has run), one event-loop thread carries every grpc.aio object, and each module starts its own
Server(s), one at a time (see test_gateway_errors.py: two Servers cannot share a Ray cluster).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.gateway_utils import LoopThread
from tests.helpers.folder_ray import FolderRay
from tests.helpers.tiny_models import save_tiny_checkpoint
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

ray = pytest.importorskip("ray")

# Logical CPUs: a Server takes two (its coordinator and one rank); room to spare for a second.
RAY_CPUS = 8
HERE = Path(__file__).resolve().parent
_ray = FolderRay(HERE, RAY_CPUS)


@pytest.fixture(scope="session")
def aio():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray cluster for this folder (tests/helpers/folder_ray.py)."""
    return _ray.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of this folder has torn down its fixtures: stop its Ray cluster."""
    try:
        return (yield)
    finally:
        _ray.stop_when_leaving(nextitem)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (no tokenizer), with a 2048-token context: long enough that a
    request of 2,000 tokens runs for seconds, so an abort is told apart from a finish."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("gateway-tiny"), "llama",
                                    max_position_embeddings=2048))


@pytest.fixture(scope="session")
def default_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded default model (byte-level tokenizer), written under a temporary
    PAGEDSERVE_CACHE."""
    from pagedserve.engine.default_model import ensure_tiny_test_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.mktemp("pagedserve-cache")))
        return ensure_tiny_test_model()
