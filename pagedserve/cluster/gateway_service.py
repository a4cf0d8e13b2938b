"""The public gRPC API, pagedserve.v1.Generation, over a gateway's `submit`.

`GenerationService` is the base class of `gateway.Gateway`: its handlers run on the gateway's
state (`submit`, the output processor, the replicas). A refusal is an `errors` class, sent as
its status code; RESOURCE_EXHAUSTED carries a `retry-after-ms` hint.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from pagedserve.cluster import wire
from pagedserve.cluster.gateway_request import ReplicaLost, RequestStream
from pagedserve.cluster.gateway_status import server_status
from pagedserve.cluster.generation_messages import (
    check_model,
    final_response,
    parse_generate_request,
)
from pagedserve.cluster.grpc_common import status_of
from pagedserve.engine.core import SequenceUpdate
from pagedserve.engine.outputs import RequestOutput
from pagedserve.errors import Cancelled, InvalidArgument, PagedServeError, ResourceExhausted
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc

RETRY_AFTER_MS = 100
"""The retry hint of RESOURCE_EXHAUSTED (gRPC trailing metadata, HTTP Retry-After)."""


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """The Generation handlers of a Gateway (its subclass, whose state they use)."""

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
            return pb.TokenizeResponse(token_ids=await self.prompts.encode(request.text))
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
        up = [replica for replica in self.replicas if replica.up]
        loads = await asyncio.gather(*(replica.load() for replica in up),
                                     return_exceptions=True)
        for load in loads:
            if isinstance(load, grpc.aio.AioRpcError):
                continue  # lost since it was last seen up: not counted as up
            if isinstance(load, BaseException):
                raise load
            total.num_replicas_up += 1
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
