"""The gateway: admission and routing in front of the replicas, and the public gRPC API
(pagedserve.v1.Generation) over them.

`Gateway.submit` is the one entry of every front (this gRPC service, the OpenAI HTTP API): it
checks a request against the model's limits (a bad field raises InvalidArgument naming it),
tokenizes, picks a replica, sends token ids to its coordinator, and returns a `RequestStream`
of the outputs, which the per-step token ids that come back become: incremental
detokenization, stop strings (a hit finishes the sequence at the coordinator), deltas then a
final output. Closing that stream early (a cancelled call, a passed deadline, a client gone)
aborts the request at its coordinator, which frees its blocks at once. Admission is bounded
per replica (ResourceExhausted when full, RESOURCE_EXHAUSTED with a `retry-after-ms` hint over
gRPC); no replica up is Unavailable.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from pagedserve.cluster.gateway_status import refresh_gpus, server_status
from pagedserve.cluster.generation_messages import (
    check_model,
    final_response,
    parse_generate_request,
)
from pagedserve.cluster.grpc_common import set_serving, status_of
from pagedserve.cluster.replica_client import ReplicaClient
from pagedserve.engine.core import EngineCoreOutputs, EngineCoreRequest, SequenceUpdate
from pagedserve.engine.limits import ModelLimits
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.processor import Processor
from pagedserve.errors import (
    AlreadyExists,
    Cancelled,
    InvalidArgument,
    PagedServeError,
    ResourceExhausted,
    Unavailable,
)
from pagedserve.metrics.gateway_metrics import GatewayMetrics
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from pagedserve.sampling_params import BeamSearchParams

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
RETRY_AFTER_MS = 100


class ReplicaError(PagedServeError):
    """A request failed at its replica; carries the status the coordinator gave."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = status if status in grpc.StatusCode.__members__ else "INTERNAL"


class Gateway(generation_pb2_grpc.GenerationServicer):
    """Admission and routing over `replicas` (ReplicaClient, started by `start`), and the
    Generation service on top."""

    def __init__(self, model_name: str, tokenizer: Any, replica_addresses: list[str],
                 max_queue_per_replica: int = 1024,
                 resolvers: list[Callable[[], Awaitable[str]]] | None = None) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.processor = Processor(tokenizer)
        self.outputs = OutputProcessor(tokenizer)
        self.max_queue_per_replica = max_queue_per_replica
        self.metrics = GatewayMetrics(model_name, lambda: self.replicas)
        """Prometheus exposition of this gateway and its replicas: `render()` serves GET
        /metrics."""
        subscriber = f"gateway-{uuid.uuid4().hex[:12]}"
        resolvers = resolvers or [None] * len(replica_addresses)
        self.replicas = [ReplicaClient(address, subscriber, self._on_batch, self._on_lost,
                                       label=str(index), resolve=resolve,
                                       on_back=self._on_back)
                         for index, (address, resolve) in enumerate(
                             zip(replica_addresses, resolvers, strict=True))]
        self._gpu_refresh: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, ReplicaClient] = {}
        self._prompts: dict[str, list[int]] = {}
        self._requests: dict[str, EngineCoreRequest] = {}
        """What was sent for each request in flight (to send it on if its replica fails)."""
        self._round_robin = itertools.count()
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
        self.limits = ModelLimits(info.vocab_size, info.max_model_len, info.max_num_seqs)
        self._eos_token_ids = frozenset(info.eos_token_ids)
        self.metrics.start(info.max_model_len, info.eos_token_ids)
        self._gpu_refresh = asyncio.get_running_loop().create_task(refresh_gpus(self.replicas))

    async def close(self) -> None:
        if self._gpu_refresh is not None:
            self._gpu_refresh.cancel()
            await asyncio.gather(self._gpu_refresh, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        for replica in self.replicas:
            await replica.close()

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
        lost = ReplicaLost(Unavailable(f"the replica serving this request failed ({error}); "
                                       "retry"))
        for request_id, owner in list(self._owner.items()):
            if owner is replica and not self._send_on(request_id, replica):
                self._put(request_id, lost)
        if self.health is not None and not any(r.up for r in self.replicas):
            self._in_background(set_serving(self.health, [SERVICE], False))

    def _on_back(self, replica: ReplicaClient) -> None:
        if self.health is not None:
            self._in_background(set_serving(self.health, [SERVICE], True))

    def _send_on(self, request_id: str, lost: ReplicaClient) -> bool:
        """Give a failed replica's request to another replica that is up, whole or as a
        continuation (`failover.continuation`); False if none can take it or it cannot go
        on unchanged."""
        request = self._requests.get(request_id)
        targets = [r for r in self.replicas if r.up and r is not lost
                   and r.in_flight < self.max_queue_per_replica]
        if request is None or not targets:
            return False
        generated = None if isinstance(request.params, BeamSearchParams) \
            else self.outputs.generated_token_ids(request_id)
        request = continuation(request, generated)
        if request is None:
            return False
        target = min(targets, key=lambda r: r.in_flight)
        lost.in_flight -= 1
        target.in_flight += 1
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
        if request_id in self._queues:
            raise AlreadyExists(f"request id {request_id!r} is already in flight")
        core_request = self.processor.make_request(
            request_id, request.prompt, request.params, priority=request.priority,
            cache_salt=request.cache_salt, arrival_time=time.monotonic())
        params = core_request.params
        limits = self.limits
        limits.check_prompt(core_request.prompt_token_ids)
        limits.check_params(params)
        limits.check_length(len(core_request.prompt_token_ids), params.max_tokens)
        replica = self._pick_replica()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._owner[request_id] = replica
        self._prompts[request_id] = core_request.prompt_token_ids
        self._requests[request_id] = core_request
        replica.in_flight += 1
        self.metrics.requests.admitted(request_id, replica.label,
                                       len(core_request.prompt_token_ids),
                                       core_request.arrival_time)
        if not isinstance(params, BeamSearchParams):
            text = request.prompt if isinstance(request.prompt, str) else None
            self.outputs.add_request(request_id, text, core_request.prompt_token_ids, params,
                                     core_request.arrival_time)
        try:
            await replica.add([wire.core_request_to_proto(core_request)])
        except grpc.aio.AioRpcError as error:
            self._forget(request_id)
            raise ReplicaError(error.code().name, error.details()) from None
        except BaseException:  # cancelled while sending: the coordinator may have it
            self._finish(request_id, False)
            raise
        return RequestStream(core_request, queue, self._finish)

    def _pick_replica(self) -> ReplicaClient:
        up = [r for r in self.replicas if r.up]
        if not up:
            raise Unavailable("no replica is up; retry later")
        open_ones = [r for r in up if r.in_flight < self.max_queue_per_replica]
        if not open_ones:
            raise ResourceExhausted(f"every replica has {self.max_queue_per_replica} requests "
                                    "in flight; retry later")
        return min(open_ones, key=lambda r: (r.in_flight, next(self._round_robin)))

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._prompts.pop(request_id, None)
        self._requests.pop(request_id, None)
        replica = self._owner.pop(request_id, None)
        if replica is not None:
            replica.in_flight -= 1
        self.outputs.abort_request(request_id)
        self.metrics.requests.discard(request_id)

    def _finish(self, request_id: str, done: bool) -> None:
        """A front let go of a request: abort it at the coordinator unless it finished there."""
        replica = self._owner.get(request_id)
        self.metrics.requests.finished(request_id)
        self._forget(request_id)
        if not done and replica is not None and replica.up:
            self._in_background(self._abort_quietly(replica, [request_id]))

    # ---- the gRPC API -----------------------------------------------------------------------

    async def _submit_call(self, request: pb.GenerateRequest, output_kind: str,
                           context) -> RequestStream:
        try:
            return await self.submit(parse_generate_request(request, self.model_name,
                                                            output_kind))
        except PagedServeError as error:
            await _abort_call(context, error)

    async def Generate(self, request, context):
        async with await self._submit_call(request, "final_only", context) as stream:
            try:
                output = await anext(stream)
            except PagedServeError as error:
                await _abort_call(context, error)
            return final_response(stream.core_request, output, with_text=True,
                                  eos_token_ids=self._eos_token_ids)

    async def GenerateStream(self, request, context):
        async with await self._submit_call(request, "delta", context) as stream:
            request_id = stream.request_id
            prompt_logprobs = None
            generated = 0
            try:
                async for item in stream:
                    if not isinstance(item, RequestOutput):  # a beam search: one final message
                        yield pb.GenerateStreamResponse(request_id=request_id, final=final_response(
                            stream.core_request, item, with_text=True,
                            eos_token_ids=self._eos_token_ids))
                        return
                    prompt_logprobs = prompt_logprobs or item.prompt_logprobs
                    for completion in item.outputs:
                        generated += len(completion.token_ids)
                        if completion.token_ids or completion.text:
                            yield pb.GenerateStreamResponse(request_id=request_id, delta=pb.Delta(
                                index=completion.index, token_ids=completion.token_ids,
                                text=completion.text,
                                logprobs=[wire.logprob_to_proto(e)
                                          for e in completion.logprobs or ()]))
                    if item.finished:
                        final = dataclasses.replace(item, prompt_logprobs=prompt_logprobs)
                        response = final_response(stream.core_request, final, with_text=False)
                        response.usage.completion_tokens = generated
                        yield pb.GenerateStreamResponse(request_id=request_id, final=response)
            except PagedServeError as error:
                await _abort_call(context, error)

    async def Abort(self, request, context):
        """End requests of this gateway: their calls finish with finish_reason 'abort'."""
        aborted = []
        for request_id in request.request_ids:
            replica = self._owner.get(request_id)
            if replica is None:
                continue
            aborted.append(request_id)
            await self._abort_quietly(replica, [request_id])
            try:
                count = len(self.outputs.sequence_ids(request_id))
            except KeyError:  # beam search: no per-sequence state here
                self._put(request_id,
                          ReplicaLost(Cancelled(f"request {request_id!r} was aborted")))
                continue
            for output in self.outputs.fail([SequenceUpdate(request_id, index,
                                                            finish_reason="abort")
                                             for index in range(count)]):
                self._put(request_id, output)
        return pb.AbortResponse(aborted_request_ids=aborted)

    async def Tokenize(self, request, context):
        try:
            check_model(request.model, self.model_name)
            return pb.TokenizeResponse(token_ids=self.processor.encode(request.text))
        except PagedServeError as error:
            await _abort_call(context, error)

    async def Detokenize(self, request, context):
        try:
            check_model(request.model, self.model_name)
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") \
                else True
            bad = [t for t in request.token_ids if t >= self.limits.vocab_size]
            if bad:
                raise InvalidArgument(f"token_ids must be in [0, {self.limits.vocab_size}), "
                                      f"got {bad[:5]}")
            return pb.DetokenizeResponse(text=self.tokenizer.decode(
                list(request.token_ids), skip_special_tokens=skip))
        except PagedServeError as error:
            await _abort_call(context, error)

    async def GetModelInfo(self, request, context):
        try:
            check_model(request.model, self.model_name)
        except PagedServeError as error:
            await _abort_call(context, error)
        return self.model_info

    async def GetServerLoad(self, request, context):
        total = pb.ServerLoad(gateway_queue_limit=self.max_queue_per_replica
                              * len(self.replicas))
        for replica in self.replicas:
            total.gateway_in_flight += replica.in_flight
            if not replica.up:
                continue
            total.num_replicas_up += 1
            load = await replica.load()
            for name in ("num_running", "num_waiting", "num_swapped", "num_requests",
                         "kv_blocks_used", "kv_blocks_total", "num_preemptions_total"):
                setattr(total, name, getattr(total, name) + getattr(load, name))
        if total.kv_blocks_total:
            total.kv_cache_usage = total.kv_blocks_used / total.kv_blocks_total
        return total

    async def GetServerStatus(self, request, context):
        return await server_status(self)


async def _abort_call(context, error: BaseException) -> None:
    if isinstance(error, ResourceExhausted):
        context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
    await context.abort(status_of(error), str(error))
