"""A gateway that dies (SIGKILL, no clean-up) leaves nothing behind at its coordinators: its
Subscribe stream ends with its connection, and the coordinator aborts every request of that
subscriber, so the KV blocks are free again and no request runs or waits. A subscriber that
adds requests and never streams (it died in between) loses them after the grace period. The
SDK moves to another gateway address, and reconnects to a gateway restarted on its port.

The coordinator lives in this test's Ray cluster; the gateways are processes of their own
(tests/chaos/gateway_process.py) connecting to it by address."""

from __future__ import annotations

import time

import grpc
import pytest

from pagedserve.client import Client, StreamDelta
from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.config import EngineConfig
from pagedserve.errors import Unavailable
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import coordinator_pb2_grpc
from pagedserve.protos.v1 import generation_pb2 as pb
from tests.chaos.chaos_utils import GatewayProcess, coordinator_state, wait_until

pytestmark = pytest.mark.timeout(240)

GRACE_S = 2.0
"""The coordinator's unsubscribed_grace_s here (10 s by default)."""
RELEASE_S = 10.0
"""How long a dead gateway's requests may hold their blocks (a local connection's end is seen
at once; keepalive finds a vanished host within about 30 s)."""
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def coordinator(ray_cluster, tiny_checkpoint):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=256,
                          cpu_threads=1)
    handle = start_coordinator(config, unsubscribed_grace_s=GRACE_S)
    address = ray_cluster.get(handle.serve_grpc.remote("127.0.0.1"), timeout=60)
    yield handle, address
    stop_coordinator(handle)


@pytest.fixture
def idle_free(coordinator) -> int:
    handle, _ = coordinator
    assert wait_until(lambda: coordinator_state(handle)[1:] == (0, 0, 0), 15) is not None
    return coordinator_state(handle)[0]


@pytest.fixture
def gateways(coordinator):
    started: list[GatewayProcess] = []

    def start(port: int = 0) -> GatewayProcess:
        started.append(GatewayProcess("--coordinators", coordinator[1], port=port).start())
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def test_a_killed_gateway_s_requests_are_aborted_at_the_coordinator(coordinator, idle_free,
                                                                     gateways):
    handle, _ = coordinator
    gateway = gateways()
    with Client(gateway.address, timeout=60) as client:
        streams = [client.generate_stream([5 + i, 6, 7], **LONG) for i in range(4)]
        assert all(isinstance(next(stream), StreamDelta) for stream in streams)
        free, held, running, waiting = coordinator_state(handle)
        assert (held, running + waiting) == (4, 4) and free < idle_free
        gateway.kill()
        took = wait_until(lambda: coordinator_state(handle) == (idle_free, 0, 0, 0), RELEASE_S)
        assert took is not None, f"after {RELEASE_S} s: {coordinator_state(handle)}"
        for stream in streams:  # whatever had arrived, then the lost connection
            with pytest.raises(Unavailable):
                for _ in stream:
                    pass
    print(f"blocks free again {took:.2f} s after the SIGKILL")


def test_the_sdk_moves_to_another_gateway_and_back_to_a_restarted_one(coordinator, idle_free,
                                                                      gateways):
    handle, _ = coordinator
    first, second = gateways(), gateways()
    first.kill()
    with Client([first.address, second.address], timeout=60) as client:
        result = client.generate([5, 6, 7], max_tokens=5, temperature=0.0, ignore_eos=True)
        assert len(result.outputs[0].token_ids) == 5
        events = list(client.generate_stream([8, 9], max_tokens=4, temperature=0.0,
                                             ignore_eos=True))
        assert sum(len(e.token_ids) for e in events if isinstance(e, StreamDelta)) == 4
    restarted = gateways(port=first.port)
    assert restarted.address == first.address
    second.kill()
    with Client([second.address, restarted.address], timeout=60) as client:
        assert len(client.generate([5, 6], max_tokens=3, temperature=0.0,
                                   ignore_eos=True).outputs[0].token_ids) == 3
    assert wait_until(lambda: coordinator_state(handle) == (idle_free, 0, 0, 0), RELEASE_S)


def _add(address: str, subscriber: str, request_id: str, **sampling) -> None:
    with grpc.insecure_channel(address) as channel:
        coordinator_pb2_grpc.CoordinatorStub(channel).AddRequests(cpb.AddRequestsRequest(
            subscriber=subscriber, requests=[cpb.CoreRequest(
                request_id=request_id, prompt_token_ids=[5, 6, 7],
                sampling=pb.SamplingParams(**sampling))]), timeout=30)


def test_requests_of_a_subscriber_that_never_streams_are_aborted(coordinator, idle_free):
    handle, address = coordinator
    _add(address, "ghost", "ghost-1", **LONG)
    assert coordinator_state(handle)[1] == 1
    took = wait_until(lambda: coordinator_state(handle) == (idle_free, 0, 0, 0),
                      GRACE_S + RELEASE_S)
    assert took is not None, coordinator_state(handle)
    assert took > GRACE_S - 0.5, "aborted before its grace period"


def test_a_subscriber_that_streams_within_the_grace_period_keeps_its_requests(coordinator,
                                                                               idle_free):
    handle, address = coordinator
    _add(address, "late", "late-1", max_tokens=6, temperature=0.0, ignore_eos=True)
    time.sleep(GRACE_S / 4)
    tokens = []
    with grpc.insecure_channel(address) as channel:
        for batch in coordinator_pb2_grpc.CoordinatorStub(channel).Subscribe(
                cpb.SubscribeRequest(subscriber="late"), timeout=30):
            for update in batch.updates:
                tokens += update.new_token_ids
                finished = update.finish_reason
            if len(tokens) == 6:
                break
    time.sleep(GRACE_S)  # the check ran while it streamed: nothing aborted
    assert len(tokens) == 6 and finished == pb.FINISH_REASON_LENGTH
    assert wait_until(lambda: coordinator_state(handle) == (idle_free, 0, 0, 0), RELEASE_S)
