"""The gateway: admission and routing in front of the replicas; the public gRPC API
(pagedserve.v1.Generation) over them is its base class (`gateway_service`).

`Gateway.submit` is the one entry of every front (the gRPC service, the OpenAI HTTP API): it
checks a request against the model's limits (a bad field raises InvalidArgument naming it),
tokenizes, picks a replica (`router`: the routing policy), sends token ids to its
coordinator, and returns a `RequestStream` of the outputs, which the per-step token ids that
come back become: incremental detokenization, stop strings (a hit finishes the sequence at
the coordinator), deltas then a final output. Closing that stream early (a cancelled call, a
passed deadline, a client gone) aborts the request at its coordinator, which frees its blocks
at once. Admission is bounded per replica (ResourceExhausted when full, RESOURCE_EXHAUSTED
with a `retry-after-ms` hint over gRPC); no replica up is Unavailable. Replicas come and go
while it serves (`add_replica`; `drain` then `remove_replica`: the autoscaler's scale-down,
which loses no request).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc

from pagedserve.cluster import wire
from pagedserve.cluster.failover import continuation
from pagedserve.cluster.gateway_request import GatewayRequest, ReplicaLost, RequestStream
from pagedserve.cluster.gateway_service import RETRY_AFTER_MS as RETRY_AFTER_MS  # re-exported
from pagedserve.cluster.gateway_service import GenerationService
from pagedserve.cluster.gateway_status import refresh_gpus
from pagedserve.cluster.grpc_common import set_serving
from pagedserve.cluster.prompt_tokenizer import PromptTokenizer
from pagedserve.cluster.replica_client import ReplicaClient
from pagedserve.cluster.router import Router, RoutingConfig
from pagedserve.engine.core import EngineCoreOutputs, EngineCoreRequest
from pagedserve.engine.limits import ModelLimits
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.processor import Processor
from pagedserve.errors import (
    AlreadyExists,
    InvalidArgument,
    PagedServeError,
    ResourceExhausted,
    Unavailable,
)
from pagedserve.metrics.gateway_metrics import GatewayMetrics
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.sampling_params import BeamSearchParams

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class ReplicaError(PagedServeError):
    """A request failed at its replica; carries the status the coordinator gave."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = status if status in grpc.StatusCode.__members__ else "INTERNAL"


class Gateway(GenerationService):
    """Admission and routing over `replicas` (ReplicaClient, started by `start`), and the
    Generation service on top."""

    def __init__(self, model_name: str, tokenizer: Any, replica_addresses: list[str],
                 max_queue_per_replica: int = 1024,
                 resolvers: list[Callable[[], Awaitable[str]]] | None = None,
                 routing: RoutingConfig | None = None) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.processor = Processor(tokenizer)
        self.prompts = PromptTokenizer(self.processor)
        """Tokenizes long prompts off the event loop."""
        self.outputs = OutputProcessor(tokenizer)
        self.max_queue_per_replica = max_queue_per_replica
        self.metrics = GatewayMetrics(model_name, lambda: self.replicas)
        """Prometheus exposition of this gateway and its replicas: `render()` serves GET
        /metrics."""
        self.router = Router(routing)
        self._subscriber = f"gateway-{uuid.uuid4().hex[:12]}"
        # Labels are never reused: a replica added after one was removed gets a new series.
        self._labels = itertools.count()
        resolvers = resolvers or [None] * len(replica_addresses)
        self.replicas = [self._client(address, resolve)
                         for address, resolve in zip(replica_addresses, resolvers, strict=True)]
        self._gpu_refresh: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, ReplicaClient] = {}
        self._prompts: dict[str, list[int]] = {}
        self._requests: dict[str, EngineCoreRequest] = {}
        """What was sent for each request in flight (to send it on if its replica fails)."""
        self._costs: dict[str, int] = {}
        """Each request's router.request_cost, counted in its replica's in_flight_tokens."""
        # Aborts sent after a front let go (the loop holds tasks only weakly).
        self._background: set[asyncio.Task] = set()
        self.limits: ModelLimits | None = None
        self.model_info: pb.ModelInfo | None = None
        self._eos_token_ids: frozenset[int] = frozenset()
        self.health = None
        """The server's health servicer: NOT_SERVING once no replica is up (set by whoever
        serves this gateway)."""

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()
        info = self.replicas[0].model_info
        self.model_info = pb.ModelInfo()
        self.model_info.CopyFrom(info)
        self.model_info.model = self.model_name
        self.model_info.num_replicas = len(self.replicas)
        self.router.block_size = info.block_size
        self.limits = ModelLimits(info.vocab_size, info.max_model_len, info.max_num_seqs)
        self._eos_token_ids = frozenset(info.eos_token_ids)
        self.metrics.start(info.max_model_len, info.eos_token_ids)
        self._gpu_refresh = asyncio.get_running_loop().create_task(refresh_gpus(self.replicas))

    def _client(self, address: str, resolve: Callable[[], Awaitable[str]] | None
                ) -> ReplicaClient:
        return ReplicaClient(address, self._subscriber, self._on_batch, self._on_lost,
                             label=str(next(self._labels)), resolve=resolve,
                             on_back=self._on_back)

    def use_routing(self, config: RoutingConfig) -> None:
        """Route from now on by `config`, with a fresh view of the replicas' caches."""
        self.router = Router(config)
        if self.model_info is not None:
            self.router.block_size = self.model_info.block_size

    # ---- the replica set --------------------------------------------------------------------

    async def add_replica(self, address: str,
                          resolve: Callable[[], Awaitable[str]] | None = None) -> ReplicaClient:
        """Connect to one more coordinator (serving the same model) and route to it."""
        replica = self._client(address, resolve)
        await replica.start()
        self.replicas.append(replica)
        self.model_info.num_replicas = len(self.replicas)
        if self.health is not None:
            await set_serving(self.health, [SERVICE], True)
        return replica

    async def drain(self, replica: ReplicaClient, timeout_s: float | None = None) -> bool:
        """Route nothing more to `replica` and wait until its requests in flight finished (or
        moved: a lost replica's go on elsewhere); False if `timeout_s` passed first."""
        replica.draining = True
        if replica.in_flight == 0:
            replica.drained.set()
        try:
            await asyncio.wait_for(replica.drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def remove_replica(self, replica: ReplicaClient) -> None:
        """Stop routing to `replica` and close its connection (drain it first: requests still
        in flight there would end UNAVAILABLE)."""
        self.replicas.remove(replica)
        self.router.forget(replica)
        if self.model_info is not None:
            self.model_info.num_replicas = len(self.replicas)
        await replica.close()
        lost = ReplicaLost(Unavailable("the replica serving this request was removed; retry"))
        for request_id, owner in list(self._owner.items()):
            if owner is replica:
                self._put(request_id, lost)

    async def close(self) -> None:
        if self._gpu_refresh is not None:
            self._gpu_refresh.cancel()
            await asyncio.gather(self._gpu_refresh, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        for replica in self.replicas:
            await replica.close()
        self.prompts.close()

    # ---- from the replicas ------------------------------------------------------------------

    def _on_batch(self, replica: ReplicaClient, batch) -> None:
        updates = [wire.update_from_proto(u) for u in batch.updates]
        beams = [wire.beam_result_from_proto(b, self._prompts.get(b.request_id, []))
                 for b in batch.beam_results]
        outputs, stops = self.outputs.process(EngineCoreOutputs(
            updates=updates, beam_outputs=[], timestamp=time.monotonic()))
        self.metrics.requests.on_batch(batch, updates, outputs, stops, beams)
        for output in outputs:
            self._put(output.request_id, output)
        for beam in beams:
            self._put(beam.request_id, self.outputs.finish_beam_search(beam))
        for failure in batch.failures:
            self._put(failure.request_id,
                      ReplicaLost(ReplicaError(failure.status, failure.message)))
        if stops:
            sequence_ids = [sequence_id for sequence_id, _ in stops]
            self._in_background(self._abort_quietly(replica, sequence_ids))

    def _put(self, request_id: str, item: Any) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _on_lost(self, replica: ReplicaClient, error: BaseException) -> None:
        self.router.forget(replica)
        lost = ReplicaLost(Unavailable(f"the replica serving this request failed ({error}); "
                                       "retry"))
        for request_id, owner in list(self._owner.items()):
            if owner is replica and not self._send_on(request_id, replica):
                self._put(request_id, lost)
        if self.health is not None and not any(r.up for r in self.replicas):
            self._in_background(set_serving(self.health, [SERVICE], False))

    def _on_back(self, replica: ReplicaClient) -> None:
        self.router.forget(replica)  # a restarted coordinator starts with an empty cache
        if self.health is not None:
            self._in_background(set_serving(self.health, [SERVICE], True))

    def _send_on(self, request_id: str, lost: ReplicaClient) -> bool:
        """Give a failed replica's request to another replica that is up, whole or as a
        continuation (`failover.continuation`); False if none can take it or it cannot go
        on unchanged."""
        request = self._requests.get(request_id)
        targets = [r for r in self._open({lost}) if r.in_flight < self.max_queue_per_replica]
        if request is None or not targets:
            return False
        generated = None if isinstance(request.params, BeamSearchParams) \
            else self.outputs.generated_token_ids(request_id)
        request = continuation(request, generated)
        if request is None:
            return False
        target = min(targets, key=lambda r: r.in_flight)
        cost = self._costs.get(request_id, 0)
        lost.release(cost)
        target.in_flight += 1
        target.in_flight_tokens += cost
        self._owner[request_id] = target
        logger.warning("request %s moves from lost replica %s to %s", request_id, lost.address,
                       target.address)
        self._in_background(self._resend(request_id, target, request))
        return True

    async def _resend(self, request_id: str, target: ReplicaClient,
                      request: EngineCoreRequest) -> None:
        try:
            await target.add([wire.core_request_to_proto(request)])
        except grpc.aio.AioRpcError as error:
            self._put(request_id, ReplicaLost(ReplicaError(error.code().name, error.details())))

    @staticmethod
    async def _abort_quietly(replica: ReplicaClient, request_ids: list[str]) -> None:
        try:
            await replica.abort(request_ids)
        except grpc.aio.AioRpcError as error:  # the replica is gone; so are its requests
            logger.warning("abort at %s failed: %s", replica.address, error.details())

    def _in_background(self, work: Coroutine) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- admission: the one entry of every front --------------------------------------------

    async def submit(self, request: GatewayRequest) -> RequestStream:
        """Check, tokenize, place and send one request; its outputs come on the returned
        stream. Raises InvalidArgument (naming the field), AlreadyExists, ResourceExhausted
        (every up replica full), Unavailable (none up) or ReplicaError (the coordinator
        refused it, with its status)."""
        request_id = request.request_id or uuid.uuid4().hex
        if "/" in request_id:
            raise InvalidArgument(f"request_id must not contain '/', got {request_id!r}",
                                  field="request_id")
        core_request = await self.prompts.make_request(request_id, request, time.monotonic())
        if request_id in self._queues:  # checked after the wait for a long prompt's tokens
            raise AlreadyExists(f"request id {request_id!r} is already in flight")
        params = core_request.params
        limits = self.limits
        limits.check_prompt(core_request.prompt_token_ids)
        limits.check_params(params)
        limits.check_length(len(core_request.prompt_token_ids), params.max_tokens)
        refused: set[ReplicaClient] = set()
        while True:
            replica, cost = self._pick_replica(core_request, refused)
            queue = self._admit(request, core_request, replica, cost)
            try:
                await replica.add([wire.core_request_to_proto(core_request)])
                break
            except grpc.aio.AioRpcError as error:
                self._forget(request_id)
                # A replica that stopped taking requests (drained by a fleet whose scale-down
                # this gateway has not seen yet, or rebuilding its ranks) refuses with
                # UNAVAILABLE: the request goes to another one, if any is left.
                refused.add(replica)
                if error.code() is not grpc.StatusCode.UNAVAILABLE or not self._open(refused):
                    raise ReplicaError(error.code().name, error.details()) from None
            except BaseException:  # cancelled while sending: the coordinator may have it
                self._finish(request_id, False)
                raise
        return RequestStream(core_request, queue, self._finish)

    def _admit(self, request: GatewayRequest, core_request: EngineCoreRequest,
               replica: ReplicaClient, cost: int) -> asyncio.Queue:
        """Record `core_request` as in flight on `replica` (`_forget` undoes it all); its
        outputs' queue."""
        request_id = core_request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._owner[request_id] = replica
        self._prompts[request_id] = core_request.prompt_token_ids
        self._requests[request_id] = core_request
        self._costs[request_id] = cost
        replica.in_flight += 1
        replica.in_flight_tokens += cost
        self.metrics.requests.admitted(request_id, replica.label,
                                       len(core_request.prompt_token_ids),
                                       core_request.arrival_time)
        params = core_request.params
        if not isinstance(params, BeamSearchParams):
            text = request.prompt if isinstance(request.prompt, str) else None
            self.outputs.add_request(request_id, text, core_request.prompt_token_ids, params,
                                     core_request.arrival_time)
        return queue

    def _open(self, refused: set[ReplicaClient] = frozenset()) -> list[ReplicaClient]:
        """The replicas a new request may go to: up, not draining, not refused it."""
        return [r for r in self.replicas if r.up and not r.draining and r not in refused]

    def _pick_replica(self, request: EngineCoreRequest,
                      refused: set[ReplicaClient] = frozenset()) -> tuple[ReplicaClient, int]:
        """The replica for `request` and the request's cost there (router.Router.pick)."""
        up = self._open(refused)
        if not up:
            raise Unavailable("no replica is up; retry later")
        open_ones = [r for r in up if r.in_flight < self.max_queue_per_replica]
        if not open_ones:
            raise ResourceExhausted(f"every replica has {self.max_queue_per_replica} requests "
                                    "in flight; retry later")
        return self.router.pick(open_ones, request)

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._prompts.pop(request_id, None)
        self._requests.pop(request_id, None)
        replica = self._owner.pop(request_id, None)
        cost = self._costs.pop(request_id, 0)
        if replica is not None:
            replica.release(cost)
        self.outputs.abort_request(request_id)
        self.metrics.requests.discard(request_id)

    def _finish(self, request_id: str, done: bool) -> None:
        """A front let go of a request: abort it at the coordinator unless it finished there."""
        replica = self._owner.get(request_id)
        self.metrics.requests.finished(request_id)
        self._forget(request_id)
        if not done and replica is not None and replica.up:
            self._in_background(self._abort_quietly(replica, [request_id]))
