"""Streams: leaving early cancels the RPC (the server sees it), errors keep their class."""

from __future__ import annotations

import gc

import grpc
import pytest

from pagedserve.client import Client, StreamDelta
from pagedserve.errors import Internal, InvalidArgument, Unavailable
from tests.client.conftest import FAST_RETRY
from tests.client.fake_gateway import Failure, canned_stream


@pytest.fixture
def held(server):
    """The server sends one delta, then holds the stream open until the client cancels."""
    server.servicer.stream = canned_stream()[:1]
    server.servicer.hold_stream = True
    return server


def _consume_first_and_break(client: Client) -> StreamDelta:
    for event in client.generate_stream("p"):
        first = event
        break
    return first


def test_breaking_out_cancels_the_rpc(held):
    with Client(held.address) as client:
        first = _consume_first_and_break(client)
        assert isinstance(first, StreamDelta)
        gc.collect()  # no-op on CPython (refcounting already dropped the stream)
        assert held.servicer.cancelled.wait(5), "the server never saw the cancellation"


def test_close_cancels_the_rpc(held):
    with Client(held.address) as client:
        stream = client.generate_stream("p")
        assert isinstance(next(stream), StreamDelta)
        assert not held.servicer.cancelled.wait(0.2)  # still running
        stream.close()
        assert held.servicer.cancelled.wait(5)
        assert list(stream) == []  # iteration ends quietly after a close


def test_with_block_cancels_the_rpc(held):
    with Client(held.address) as client:
        with client.generate_stream("p") as stream:
            next(stream)
        assert held.servicer.cancelled.wait(5)


def test_error_in_the_middle_keeps_its_class(server):
    server.servicer.stream = canned_stream()[:2]
    server.servicer.stream_error = Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad thing")
    with Client(server.address) as client:
        stream = client.generate_stream("p")
        assert len([next(stream), next(stream)]) == 2
        with pytest.raises(InvalidArgument, match="bad thing"):
            next(stream)
        assert list(stream) == []


def test_stream_without_final_is_an_internal_error(server):
    server.servicer.stream = canned_stream()[:1]
    client = Client(server.address)
    with client, pytest.raises(Internal, match="final"):
        list(client.generate_stream("p"))


def test_error_before_any_message(server):
    server.servicer.failures = [Failure(grpc.StatusCode.UNAVAILABLE, "no replica")] * 10
    with Client(server.address, retry=FAST_RETRY, timeout=10) as client:
        stream = client.generate_stream("p")
        with pytest.raises(Unavailable, match="no replica"):
            next(stream)
    assert len(server.servicer.calls) == FAST_RETRY.max_attempts


def test_a_stream_cut_after_tokens_says_the_gateway_was_lost(server):
    # UNAVAILABLE after tokens (a gateway killed mid-stream) is never retried: the error says
    # how many tokens came and what to do, not just grpc's "Socket closed".
    server.servicer.stream = canned_stream()[:2]
    server.servicer.stream_error = Failure(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    with Client(server.address) as client:
        stream = client.generate_stream("p")
        delivered = [next(stream), next(stream)]
        tokens = sum(len(event.token_ids) for event in delivered)
        assert tokens > 0
        with pytest.raises(Unavailable, match=rf"the stream was cut after {tokens} tokens "
                                              r"\(Socket closed\): the gateway .* send the "
                                              r"request again"):
            next(stream)
    assert server.servicer.methods("GenerateStream") == ["GenerateStream"]


def test_unavailable_before_any_token_keeps_the_servers_message(server):
    server.servicer.stream = []
    server.servicer.stream_error = Failure(grpc.StatusCode.UNAVAILABLE, "no replica is up")
    with Client(server.address, retry=FAST_RETRY) as client, \
            pytest.raises(Unavailable, match=r"^no replica is up$"):
        next(client.generate_stream("p"))
