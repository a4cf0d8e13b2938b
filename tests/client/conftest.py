"""Fixtures of the client tests: a fake gateway on 127.0.0.1 and an address nobody serves."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pagedserve.client import RetryPolicy
from tests.client.fake_gateway import FakeServer

# Short backoffs keep the retry tests fast; the bounds stay those of the default policy.
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.stop()


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A 127.0.0.1 port that is bound but not listening: connecting is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
