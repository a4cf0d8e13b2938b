"""One chaos run: two replicas (coordinators in the test's Ray cluster, restartable), two
gateway processes that join that cluster, and rounds of 64 concurrent streaming clients
through the SDK, ~10% of them cancelling part-way, while seeded faults strike at random
moments: a worker rank killed, a coordinator killed (Ray restarts it), a gateway killed and
started again on its port. `ChaosRun.round` returns each request's outcome; `idle` waits until
the replicas hold nothing; `memory` reads the resident memory of the processes that no fault
restarts (gateway 0, coordinator 0) and the Ray object store's bytes."""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass

import grpc
import ray

from pagedserve.client import AsyncClient, StreamDelta, StreamFinal
from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.config import EngineConfig
from pagedserve.errors import PagedServeError
from tests.chaos.chaos_utils import (
    GatewayProcess,
    actor_pid,
    coordinator_state,
    gateway_load,
    object_store_bytes,
    private_bytes,
    rss_bytes,
    wait_until,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLIENTS = 64
CANCEL_FRACTION = 0.1
VOCAB = 256
REQUEST_TIMEOUT_S = 60.0
"""The SDK deadline of each request (its retries included)."""
HANG_S = 90.0
"""A request with no outcome by then hangs (the test fails)."""
FAULTS = ("rank", "coordinator", "gateway")
MIN_TOKENS, MAX_TOKENS = 32, 256
"""Long enough that a round lasts a few seconds and each fault finds requests in flight."""
STRIKE_S = (0.3, 1.5)
"""When in its round a fault strikes (seconds after the requests went out)."""
NUM_BLOCKS = 1024
TIE = 1e-5
"""Top-two logprobs closer than this are a float tie: which one argmax takes depends on the
batch's shapes (seen once in a 1,920-request soak: -2.8914208 for both, and the offline engine
itself took the other one in another batch), so greedy runs may part there with no fault."""
MAX_RESTARTS = 100
"""Of ranks and of coordinators: a soak's faults never spend them (tests/cluster covers a
replica whose restarts ran out)."""


@dataclass
class Outcome:
    kind: str
    """'full' (every token, greedy-identical), 'cancelled' (by this client), or the status
    code the SDK raised ('UNAVAILABLE', ...), or 'hang'."""
    detail: str = ""
    tokens: int = 0


@dataclass
class Reference:
    """What the fault-free engine makes of a request (greedy)."""

    tokens: list[int]
    ties: frozenset[int]
    """Steps whose two likeliest tokens are within TIE of each other."""


def judge(prompt: list[int], final: StreamFinal, streamed: list[int], max_tokens: int,
          reference: Reference) -> Outcome:
    """'full' if the stream and its final hold every token, the fault-free ones (up to a
    step where those were tied), else 'wrong' saying where they part."""
    got = list(final.outputs[0].token_ids)
    first = next((i for i, pair in enumerate(zip(got, reference.tokens, strict=False))
                  if pair[0] != pair[1]), None)
    whole = (len(got), streamed, final.outputs[0].finish_reason,
             final.usage.completion_tokens) == (max_tokens, got, "length", max_tokens)
    if whole and (first is None or first in reference.ties):
        return Outcome("full", "" if first is None else f"parted at a tie, step {first}",
                       len(got))
    return Outcome("wrong", (
        f"prompt {prompt}: {len(got)} tokens ({len(streamed)} streamed, usage "
        f"{final.usage.completion_tokens}, {final.outputs[0].finish_reason}) differ from "
        f"the fault-free {len(reference.tokens)} from step {first}: "
        f"{got[first:first + 6] if first is not None else []} != "
        f"{reference.tokens[first:first + 6] if first is not None else []}"), len(got))


def _workers(handle) -> list:
    return ray.get(handle.__ray_call__.remote(lambda self: list(self.core.executor.workers)),
                   timeout=30)


class ChaosRun:
    def __init__(self, checkpoint: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.config = EngineConfig(model=checkpoint, device="cpu",
                                   num_gpu_blocks_override=NUM_BLOCKS, cpu_threads=1,
                                   max_num_seqs=64, max_worker_restarts=MAX_RESTARTS)
        context = ray.get_runtime_context()
        self.names = [f"chaos-coordinator-{seed}-{i}" for i in range(2)]
        self.coordinators = [start_coordinator(self.config, name, max_restarts=MAX_RESTARTS)
                             for name in self.names]
        self.start_free = [coordinator_state(h)[0] for h in self.coordinators]
        self.gateway_args = ["--ray-address", context.gcs_address, "--namespace",
                             context.namespace, "--coordinator-names", ",".join(self.names)]
        self.gateways = [GatewayProcess(*self.gateway_args).start() for _ in range(2)]
        self.faults: list[tuple[str, float, int]] = []
        """(fault, seconds after its round began, requests in flight at its victim) of
        every fault so far."""

    # ---- traffic ------------------------------------------------------------------------------

    def draw_requests(self, count: int) -> list[tuple[list[int], int, int | None]]:
        """(prompt, max_tokens, cancel after this many tokens or None) per request."""
        drawn = []
        for _ in range(count):
            prompt = [self.rng.randrange(3, VOCAB) for _ in range(self.rng.randint(4, 40))]
            max_tokens = self.rng.randint(MIN_TOKENS, MAX_TOKENS)
            cancel = self.rng.randint(1, max_tokens - 1) \
                if self.rng.random() < CANCEL_FRACTION else None
            drawn.append((prompt, max_tokens, cancel))
        return drawn

    async def round(self, requests, expected: list[Reference], fault: str | None
                    ) -> list[Outcome]:
        """Every request at once (each client's first address alternates between the two
        gateways), `fault` after a seeded delay; returns when every request and the fault's
        recovery are done."""
        addresses = [g.address for g in self.gateways]
        clients = [AsyncClient(addresses, timeout=REQUEST_TIMEOUT_S),
                   AsyncClient(addresses[::-1], timeout=REQUEST_TIMEOUT_S)]
        try:
            calls = [asyncio.ensure_future(asyncio.wait_for(
                self._one(clients[i % 2], prompt, max_tokens, cancel, expected[i]), HANG_S))
                for i, (prompt, max_tokens, cancel) in enumerate(requests)]
            strike = None
            if fault is not None:
                strike = asyncio.ensure_future(self._strike(fault,
                                                            self.rng.uniform(*STRIKE_S)))
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(await call)
                except TimeoutError:
                    outcomes.append(Outcome("hang"))
            if strike is not None:
                await strike
        finally:
            for client in clients:
                await client.close()
        return outcomes

    @staticmethod
    async def _one(client: AsyncClient, prompt: list[int], max_tokens: int,
                   cancel: int | None, expected: Reference) -> Outcome:
        stream = client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0,
                                        ignore_eos=True)
        tokens: list[int] = []
        try:
            async for event in stream:
                if isinstance(event, StreamDelta):
                    tokens += event.token_ids
                    if cancel is not None and len(tokens) >= cancel:
                        await stream.aclose()
                        return Outcome("cancelled", tokens=len(tokens))
                elif isinstance(event, StreamFinal):
                    return judge(prompt, event, tokens, max_tokens, expected)
            return Outcome("no-final", tokens=len(tokens))
        except PagedServeError as error:
            return Outcome(error.grpc_status, str(error), len(tokens))

    # ---- faults -------------------------------------------------------------------------------

    async def _strike(self, fault: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await asyncio.to_thread(self._fault, fault, delay)

    def _fault(self, fault: str, delay: float) -> None:
        """Kill a rank of replica 0, the coordinator of replica 1 (Ray starts it again), or
        gateway 1 (started again on its port)."""
        if fault == "gateway":
            in_flight = gateway_load(self.gateways[1].address).gateway_in_flight
        else:
            in_flight = coordinator_state(self.coordinators[0 if fault == "rank" else 1])[1]
        self.faults.append((fault, delay, in_flight))
        if fault == "rank":
            ray.kill(_workers(self.coordinators[0])[0])
            assert wait_until(lambda: ray.get(self.coordinators[0].health.remote(),
                                              timeout=30)["healthy"], 60) is not None
        elif fault == "coordinator":
            ray.kill(self.coordinators[1], no_restart=False)
            assert wait_until(self._replica_1_serves, 90) is not None
            # Back in every gateway's routing (they try it again with backoff).
            assert wait_until(self._both_replicas_routed, 30) is not None
        else:
            gateway = self.gateways[1]
            gateway.kill()
            self.gateways[1] = GatewayProcess(*self.gateway_args, port=gateway.port).start()

    def _both_replicas_routed(self) -> bool:
        try:
            return all(gateway_load(g.address).num_replicas_up == 2 for g in self.gateways)
        except grpc.RpcError:  # a gateway's GetServerLoad fails while a replica is lost
            return False

    def _replica_1_serves(self) -> bool:
        try:
            return ray.get(self.coordinators[1].health.remote(), timeout=5)["healthy"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    # ---- state --------------------------------------------------------------------------------

    def idle(self, timeout: float = 30.0) -> str:
        """Wait until every block is free again and nothing runs or waits; '' then, else
        each replica's (free blocks, requests, running, waiting) after `timeout`."""
        def settled() -> bool:
            states = [coordinator_state(h) for h in self.coordinators]
            return states == [(free, 0, 0, 0) for free in self.start_free]

        if wait_until(settled, timeout, interval=0.2) is not None:
            return ""
        return (f"(free blocks, requests, running, waiting) "
                f"{[coordinator_state(h) for h in self.coordinators]}, free at the start "
                f"{self.start_free}")

    def memory(self) -> tuple[int, int, int, int, int]:
        """Private resident bytes of gateway 0 and of coordinator 0 (no fault restarts them),
        then their whole resident bytes (shared pages included), then the bytes of the Ray
        object store's objects."""
        gateway, coordinator = self.gateways[0].pid, actor_pid(self.coordinators[0])
        return (private_bytes(gateway), private_bytes(coordinator), rss_bytes(gateway),
                rss_bytes(coordinator), object_store_bytes())

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for handle in self.coordinators:
            stop_coordinator(handle)
