"""The gateway: the public gRPC API (pagedserve.v1.Generation) in front of the replicas.

It validates (a bad field is INVALID_ARGUMENT naming it), tokenizes, picks a replica, sends
token ids to its coordinator, and turns the per-step token ids that come back into text:
incremental detokenization, stop strings (a hit finishes the sequence at the coordinator),
deltas then one final message. A cancelled call or a passed deadline aborts the request at its
coordinator, which frees its blocks at once. Admission is bounded per replica
(RESOURCE_EXHAUSTED with a `retry-after-ms` hint when full); no replica up is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from typing import Any

import grpc

from pagedserve.cluster import wire
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
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from pagedserve.sampling_params import BeamSearchParams

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
RETRY_AFTER_MS = 100


class _Lost:
    """Queue item: the request's replica failed."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReplicaError(PagedServeError):
    """A request failed at its replica; carries the status the coordinator gave."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = status if status in grpc.StatusCode.__members__ else "INTERNAL"


class Gateway(generation_pb2_grpc.GenerationServicer):
    """The Generation service over `replicas` (ReplicaClient, started by `start`)."""

    def __init__(self, model_name: str, tokenizer: Any, replica_addresses: list[str],
                 max_queue_per_replica: int = 1024) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.processor = Processor(tokenizer)
        self.outputs = OutputProcessor(tokenizer)
        self.max_queue_per_replica = max_queue_per_replica
        subscriber = f"gateway-{uuid.uuid4().hex[:12]}"
        self.replicas = [ReplicaClient(address, subscriber, self._on_batch, self._on_lost)
                         for address in replica_addresses]
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, ReplicaClient] = {}
        self._prompts: dict[str, list[int]] = {}
        self._round_robin = itertools.count()
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

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()

    # ---- from the replicas ------------------------------------------------------------------

    def _on_batch(self, replica: ReplicaClient, batch) -> None:
        updates = [wire.update_from_proto(u) for u in batch.updates]
        beams = [wire.beam_result_from_proto(b, self._prompts.get(b.request_id, []))
                 for b in batch.beam_results]
        outputs, stops = self.outputs.process(EngineCoreOutputs(
            updates=updates, beam_outputs=[], timestamp=time.monotonic()))
        for output in outputs:
            self._put(output.request_id, output)
        for beam in beams:
            self._put(beam.request_id, self.outputs.finish_beam_search(beam))
        for failure in batch.failures:
            self._put(failure.request_id, _Lost(ReplicaError(failure.status, failure.message)))
        if stops:
            sequence_ids = [sequence_id for sequence_id, _ in stops]
            asyncio.ensure_future(self._abort_quietly(replica, sequence_ids))

    def _put(self, request_id: str, item: Any) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _on_lost(self, replica: ReplicaClient, error: BaseException) -> None:
        lost = _Lost(Unavailable(f"the replica serving this request failed ({error}); retry"))
        for request_id, owner in list(self._owner.items()):
            if owner is replica:
                self._put(request_id, lost)
        if self.health is not None and not any(r.up for r in self.replicas):
            asyncio.ensure_future(set_serving(self.health, [SERVICE], False))

    @staticmethod
    async def _abort_quietly(replica: ReplicaClient, request_ids: list[str]) -> None:
        try:
            await replica.abort(request_ids)
        except grpc.aio.AioRpcError as error:  # the replica is gone; so are its requests
            logger.warning("abort at %s failed: %s", replica.address, error.details())

    # ---- admission --------------------------------------------------------------------------

    def _parse(self, request: pb.GenerateRequest, output_kind: str) -> tuple[EngineCoreRequest,
                                                                            str | None]:
        if request.model and request.model != self.model_name:
            raise InvalidArgument(f"model must be {self.model_name!r} (or empty), got "
                                  f"{request.model!r}")
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidArgument("prompt must be set: text or token_ids")
        if which == "text" and not request.text:
            raise InvalidArgument("prompt text must not be empty")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        if request.HasField("beam_search"):
            if request.HasField("sampling"):
                raise InvalidArgument("sampling and beam_search are exclusive; set one")
            params: Any = wire.beam_from_proto(request.beam_search)
        else:
            params = wire.sampling_from_proto(request.sampling, output_kind=output_kind)
        request_id = request.request_id or uuid.uuid4().hex
        if "/" in request_id:
            raise InvalidArgument(f"request_id must not contain '/', got {request_id!r}")
        core_request = self.processor.make_request(
            request_id, prompt, params, priority=request.priority,
            cache_salt=request.cache_salt if request.HasField("cache_salt") else None,
            arrival_time=time.monotonic())
        limits = self.limits
        limits.check_prompt(core_request.prompt_token_ids)
        limits.check_params(params)
        limits.check_length(len(core_request.prompt_token_ids), params.max_tokens)
        return core_request, request.text if which == "text" else None

    def _pick_replica(self) -> ReplicaClient:
        up = [r for r in self.replicas if r.up]
        if not up:
            raise Unavailable("no replica is up; retry later")
        open_ones = [r for r in up if r.in_flight < self.max_queue_per_replica]
        if not open_ones:
            raise ResourceExhausted(f"every replica has {self.max_queue_per_replica} requests "
                                    "in flight; retry later")
        return min(open_ones, key=lambda r: (r.in_flight, next(self._round_robin)))

    async def _admit(self, request: pb.GenerateRequest, output_kind: str, context):
        """Checked, registered and sent to a replica: (core request, queue, replica)."""
        try:
            core_request, text = self._parse(request, output_kind)
            request_id = core_request.request_id
            if request_id in self._queues:
                raise AlreadyExists(f"request id {request_id!r} is already in flight")
            replica = self._pick_replica()
        except PagedServeError as error:
            await _abort_call(context, error)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._owner[request_id] = replica
        self._prompts[request_id] = core_request.prompt_token_ids
        replica.in_flight += 1
        if not isinstance(core_request.params, BeamSearchParams):
            self.outputs.add_request(request_id, text, core_request.prompt_token_ids,
                                     core_request.params, core_request.arrival_time)
        try:
            await replica.add([wire.core_request_to_proto(core_request)])
        except grpc.aio.AioRpcError as error:
            self._forget(request_id)
            await context.abort(error.code(), error.details())
        return core_request, queue, replica

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._prompts.pop(request_id, None)
        replica = self._owner.pop(request_id, None)
        if replica is not None:
            replica.in_flight -= 1
        self.outputs.abort_request(request_id)

    async def _finish(self, request_id: str, done: bool) -> None:
        """After a call ends: abort at the coordinator unless the request finished there."""
        replica = self._owner.get(request_id)
        self._forget(request_id)
        if not done and replica is not None and replica.up:
            await self._abort_quietly(replica, [request_id])

    # ---- the public API ---------------------------------------------------------------------

    async def Generate(self, request, context):
        core_request, queue, _ = await self._admit(request, "final_only", context)
        done = False
        try:
            item = await queue.get()
            if isinstance(item, _Lost):
                await _abort_call(context, item.error)
            done = True
            return _final_response(core_request, item, with_text=True,
                                   eos_token_ids=self._eos_token_ids)
        finally:
            await self._finish(core_request.request_id, done)

    async def GenerateStream(self, request, context):
        core_request, queue, _ = await self._admit(request, "delta", context)
        request_id = core_request.request_id
        done = False
        prompt_logprobs = None
        generated = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Lost):
                    await _abort_call(context, item.error)
                if not isinstance(item, RequestOutput):  # a beam search: one final message
                    done = True
                    yield pb.GenerateStreamResponse(request_id=request_id, final=_final_response(
                        core_request, item, with_text=True, eos_token_ids=self._eos_token_ids))
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
                    done = True
                    final = dataclasses.replace(item, prompt_logprobs=prompt_logprobs)
                    response = _final_response(core_request, final, with_text=False)
                    response.usage.completion_tokens = generated
                    yield pb.GenerateStreamResponse(request_id=request_id, final=response)
                    return
        finally:
            await self._finish(request_id, done)

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
                self._put(request_id, _Lost(Cancelled(f"request {request_id!r} was aborted")))
                continue
            for output in self.outputs.fail([SequenceUpdate(request_id, index,
                                                            finish_reason="abort")
                                             for index in range(count)]):
                self._put(request_id, output)
        return pb.AbortResponse(aborted_request_ids=aborted)

    async def Tokenize(self, request, context):
        try:
            self._check_model(request.model)
            return pb.TokenizeResponse(token_ids=self.processor.encode(request.text))
        except PagedServeError as error:
            await _abort_call(context, error)

    async def Detokenize(self, request, context):
        try:
            self._check_model(request.model)
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
            self._check_model(request.model)
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

    def _check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise InvalidArgument(f"model must be {self.model_name!r} (or empty), got {model!r}")


async def _abort_call(context, error: BaseException) -> None:
    if isinstance(error, ResourceExhausted):
        context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
    await context.abort(status_of(error), str(error))


def _final_response(core_request: EngineCoreRequest, output: Any, with_text: bool,
                    eos_token_ids: frozenset[int] = frozenset()) -> pb.GenerateResponse:
    """The final message: a RequestOutput (its completions; with text and tokens unless they
    were streamed) or a beam search's BeamSearchOutput."""
    response = pb.GenerateResponse(request_id=core_request.request_id,
                                   prompt_token_ids=core_request.prompt_token_ids)
    prompt_tokens = len(core_request.prompt_token_ids)
    if not isinstance(output, RequestOutput):
        for index, beam in enumerate(output.sequences):
            ended_on_eos = bool(beam.token_ids) and beam.token_ids[-1] in eos_token_ids
            response.completions.append(pb.Completion(
                index=index, text=beam.text, token_ids=beam.token_ids,
                finish_reason=pb.FINISH_REASON_STOP if ended_on_eos else pb.FINISH_REASON_LENGTH,
                cumulative_logprob=beam.cumulative_logprob, score=beam.score))
        response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(
            len(b.token_ids) for b in output.sequences)))
        return response
    for completion in output.outputs:
        message = pb.Completion(index=completion.index,
                                finish_reason=wire.FINISH_REASONS[completion.finish_reason])
        if with_text:
            message.text = completion.text
            message.token_ids.extend(completion.token_ids)
            message.logprobs.extend(wire.logprob_to_proto(e) for e in completion.logprobs or ())
        if completion.cumulative_logprob is not None:
            message.cumulative_logprob = completion.cumulative_logprob
        if isinstance(completion.stop_reason, str):
            message.stop_string = completion.stop_reason
        elif completion.stop_reason is not None:
            message.stop_token_id = completion.stop_reason
        response.completions.append(message)
    response.prompt_logprobs.extend(wire.logprob_to_proto(e)
                                    for e in (output.prompt_logprobs or [])[1:])
    metrics = output.metrics
    response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens,
                                     completion_tokens=output.usage.completion_tokens,
                                     cached_prompt_tokens=metrics.num_cached_tokens))
    start = metrics.arrival_time
    response.timing.CopyFrom(pb.Timing(
        queue_seconds=(metrics.first_scheduled_time or start) - start,
        time_to_first_token_seconds=(metrics.first_token_time or start) - start,
        total_seconds=(metrics.finished_time or time.monotonic()) - start))
    return response
