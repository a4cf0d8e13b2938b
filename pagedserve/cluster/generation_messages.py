"""The pagedserve.v1 Generation messages on the gateway's side: a GenerateRequest to the
front-neutral `GatewayRequest`, and a finished request to the final GenerateResponse."""

from __future__ import annotations

import time
from typing import Any

from pagedserve.cluster import wire
from pagedserve.cluster.gateway_request import GatewayRequest
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.engine.outputs import RequestOutput
from pagedserve.errors import InvalidArgument
from pagedserve.protos.v1 import generation_pb2 as pb


def check_model(model: str, served_name: str) -> None:
    """The gRPC API's rule: `model` is the served name or empty."""
    if model and model != served_name:
        raise InvalidArgument(f"model must be {served_name!r} (or empty), got {model!r}",
                              field="model")


def parse_generate_request(request: pb.GenerateRequest, served_name: str,
                           output_kind: str) -> GatewayRequest:
    """Checked (InvalidArgument naming the field) and converted; `output_kind` is how the
    gateway reports it ('final_only' for Generate, 'delta' for GenerateStream)."""
    check_model(request.model, served_name)
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidArgument("prompt must be set: text or token_ids", field="prompt")
    if which == "text" and not request.text:
        raise InvalidArgument("prompt text must not be empty", field="text")
    prompt = request.text if which == "text" else list(request.token_ids.ids)
    if request.HasField("beam_search"):
        if request.HasField("sampling"):
            raise InvalidArgument("sampling and beam_search are exclusive; set one",
                                  field="beam_search")
        params: Any = wire.beam_from_proto(request.beam_search)
    else:
        params = wire.sampling_from_proto(request.sampling, output_kind=output_kind)
    return GatewayRequest(prompt, params, request_id=request.request_id,
                          priority=request.priority,
                          cache_salt=request.cache_salt if request.HasField("cache_salt")
                          else None)


def final_response(core_request: EngineCoreRequest, output: Any, with_text: bool,
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
