"""Fixtures of the fuzz tests.

The fast layer (test_fuzz_messages.py, test_fuzz_http_bodies.py, test_fuzz_regressions.py)
needs no engine: `fakes` is two in-process gateways over fake replicas (inprocess.py), one
with the tiny byte-level model's tokenizer and chat template, one without a tokenizer (as the
tiny random Llama).

The end-to-end layer (test_fuzz_served.py) is the tests/gateway pattern: one local Ray cluster
for this folder (shut down after its last test, so later folders neither share nor pay for
it), one event-loop thread for every grpc.aio object, one Server at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.common import (
    FAKE_MAX_MODEL_LEN,
    FAKE_MAX_NUM_SEQS,
    NO_TOKENIZER_VOCAB,
    SERVED_NAME,
)
from tests.fuzz.inprocess import FakeGateway
from tests.gateway.gateway_utils import LoopThread
from tests.helpers.folder_ray import FolderRay
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

RAY_CPUS = 8
HERE = Path(__file__).resolve().parent
_ray = FolderRay(HERE, RAY_CPUS)


@pytest.fixture(scope="session")
def default_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded tiny byte-level model (a tokenizer with a chat template), written under a
    temporary PAGEDSERVE_CACHE."""
    from pagedserve.engine.default_model import ensure_tiny_test_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.mktemp("pagedserve-cache")))
        return ensure_tiny_test_model()


@pytest.fixture(scope="session")
def byte_tokenizer(default_model_path):
    from pagedserve.workers.models.loader import load_tokenizer

    return load_tokenizer(default_model_path)


class Fakes:
    def __init__(self, byte_tokenizer) -> None:
        self.bytes = FakeGateway(SERVED_NAME, byte_tokenizer, len(byte_tokenizer),
                                 FAKE_MAX_MODEL_LEN, FAKE_MAX_NUM_SEQS)
        self.none = FakeGateway(SERVED_NAME, None, NO_TOKENIZER_VOCAB, FAKE_MAX_MODEL_LEN,
                                FAKE_MAX_NUM_SEQS)

    def __getitem__(self, which: str) -> FakeGateway:
        return self.bytes if which == "bytes" else self.none

    def close(self) -> None:
        self.bytes.close()
        self.none.close()


@pytest.fixture(scope="module")
def fakes(byte_tokenizer):
    made = Fakes(byte_tokenizer)
    yield made
    made.close()


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
