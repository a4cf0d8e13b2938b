"""Retries, failover, deadlines, credentials and the mapping of status codes to errors."""

from __future__ import annotations

import time

import grpc
import pytest

from pagedserve import errors
from pagedserve.client import Client, RetryPolicy, StreamDelta, StreamFinal
from pagedserve.client.retry import ERROR_CLASSES, Attempts, retry_after_s
from tests.client.conftest import FAST_RETRY
from tests.client.fake_gateway import Failure, canned_stream

UNAVAILABLE = Failure(grpc.StatusCode.UNAVAILABLE, "no replica can serve")
EXHAUSTED = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "full, retry later")


def test_unavailable_twice_then_success_is_three_attempts(server):
    server.servicer.failures = [UNAVAILABLE, UNAVAILABLE]
    with Client(server.address, retry=FAST_RETRY) as client:
        assert client.generate("x").request_id == "req-1"
    assert server.servicer.methods() == ["Generate"] * 3


def test_resource_exhausted_is_retried(server):
    server.servicer.failures = [EXHAUSTED]
    with Client(server.address, retry=FAST_RETRY) as client:
        assert client.tokenize("a") == [97]
    assert server.servicer.methods() == ["Tokenize"] * 2


def test_attempts_are_bounded(server):
    server.servicer.failures = [UNAVAILABLE] * 10
    client = Client(server.address, retry=FAST_RETRY)
    with client, pytest.raises(errors.Unavailable, match="no replica can serve"):
        client.generate("x")
    assert len(server.servicer.calls) == FAST_RETRY.max_attempts


def test_no_retry_policy(server):
    server.servicer.failures = [UNAVAILABLE]
    client = Client(server.address, retry=RetryPolicy(max_attempts=1))
    with client, pytest.raises(errors.Unavailable):
        client.load()
    assert len(server.servicer.calls) == 1


def test_invalid_argument_is_raised_at_once_with_the_message(server):
    message = "SamplingParams.top_p must be in (0, 1]; got 2.0"
    server.servicer.failures = [Failure(grpc.StatusCode.INVALID_ARGUMENT, message)]
    client = Client(server.address, retry=FAST_RETRY)
    with client, pytest.raises(errors.InvalidArgument) as info:
        client.generate("x", top_p=2.0)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)  # as offline
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.grpc_code == "INVALID_ARGUMENT"
    assert len(server.servicer.calls) == 1


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
    (grpc.StatusCode.UNIMPLEMENTED, errors.Unsupported),
    (grpc.StatusCode.INTERNAL, errors.Internal),
    (grpc.StatusCode.UNKNOWN, errors.Internal),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
])
def test_status_codes_map_to_error_classes(server, code, cls):
    server.servicer.failures = [Failure(code, f"because {code.name}")]
    client = Client(server.address, retry=FAST_RETRY)
    with client, pytest.raises(cls, match=f"because {code.name}"):
        client.model_info()
    assert len(server.servicer.calls) == 1


def test_every_error_class_matches_its_status():
    for name, cls in ERROR_CLASSES.items():
        assert issubclass(cls, errors.PagedServeError)
        if name not in ("UNKNOWN", "DATA_LOSS", "OUT_OF_RANGE"):
            assert cls.grpc_status == name


def test_stream_is_retried_before_the_first_delta(server):
    server.servicer.failures = [UNAVAILABLE, EXHAUSTED]
    with Client(server.address, retry=FAST_RETRY) as client:
        events = list(client.generate_stream("p"))
    assert isinstance(events[-1], StreamFinal) and len(events) == 4
    assert server.servicer.methods() == ["GenerateStream"] * 3


def test_stream_is_never_retried_after_a_delta(server):
    server.servicer.stream = canned_stream()[:1]
    server.servicer.stream_error = UNAVAILABLE
    with Client(server.address, retry=FAST_RETRY) as client:
        stream = client.generate_stream("p")
        assert isinstance(next(stream), StreamDelta)
        with pytest.raises(errors.Unavailable, match="no replica"):
            next(stream)
    assert server.servicer.methods() == ["GenerateStream"]


def test_server_retry_hint_replaces_the_backoff(server):
    hinted = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("retry-after-ms", "50"),))
    server.servicer.failures = [hinted]
    slow = RetryPolicy(max_attempts=2, initial_backoff_s=30, max_backoff_s=30)
    with Client(server.address, retry=slow) as client:
        start = time.monotonic()
        client.load()
        elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < 5
    assert len(server.servicer.calls) == 2


def test_retry_hint_parsing():
    assert retry_after_s([("retry-after-ms", "1500")]) == 1.5
    assert retry_after_s([("Retry-After-Ms", b"20.5")]) == pytest.approx(0.0205)
    assert retry_after_s([("other", "1")]) is None
    assert retry_after_s([("retry-after-ms", "soon")]) is None


def test_full_jitter_backoff_stays_within_its_ceiling():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    for round_number, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (8, 0.3)):
        delays = [policy.backoff(round_number) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jittered over the range, not fixed


def test_rounds_go_over_every_address_first():
    class Err(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def trailing_metadata(self):
            return ()

    attempts = Attempts(RetryPolicy(max_attempts=2, initial_backoff_s=0), 3, 1, None)
    targets, delays = [], []
    while True:
        attempts.start()
        targets.append(attempts.target)
        delay = attempts.next_delay(Err())
        if delay is None:
            break
        delays.append(delay)
    assert targets == [1, 2, 0, 1, 2, 0]  # 2 rounds x 3 addresses
    assert delays == [0.0] * 5


def test_deadline_covers_the_call(server):
    server.servicer.delay_s = 2.0
    with Client(server.address, retry=FAST_RETRY) as client:
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            client.generate("x", timeout=0.2)
        assert time.monotonic() - start < 1.5


def test_default_timeout_of_the_client(server):
    server.servicer.delay_s = 2.0
    client = Client(server.address, timeout=0.2)
    with client, pytest.raises(errors.DeadlineExceeded):
        client.tokenize("x")


def test_next_address_on_unavailable(server, dead_address):
    with Client([dead_address, server.address], retry=FAST_RETRY) as client:
        assert client.generate("x").request_id == "req-1"
        assert client.current_target == server.address
        assert list(client.generate_stream("p"))[-1].finish_reasons == ["stop", "length"]
    assert server.servicer.methods() == ["Generate", "GenerateStream"]


def test_every_address_down(dead_address):
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    client = Client([dead_address, dead_address], retry=policy)
    with client, pytest.raises(errors.Unavailable):
        client.generate("x", timeout=10)


def test_bearer_token_is_sent(server):
    with Client(server.address, api_key="sekret") as client:
        client.generate("x")
        list(client.generate_stream("y"))
    for call in server.servicer.calls:
        assert call.metadata["authorization"] == "Bearer sekret"
        assert call.metadata["user-agent"].startswith("pagedserve-client/")


def test_no_token_no_authorization_header(server):
    with Client(server.address) as client:
        client.load()
    assert "authorization" not in server.servicer.calls[0].metadata
