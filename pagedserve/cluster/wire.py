"""Conversions between the pagedserve.v1 protos and the engine's plain data (torch-free).

Proto -> SamplingParams goes through SamplingParams' own validation, so a bad field raises the
same InvalidArgument offline and on the wire (the servers map it to INVALID_ARGUMENT). Unset
optional fields take SamplingParams' defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagedserve.engine.beam_search import BeamSearchOutput, BeamSequence
from pagedserve.engine.core import EngineCoreRequest, SequenceUpdate
from pagedserve.metrics.coordinator_metrics import EngineSnapshot, RequestStart
from pagedserve.metrics.gpu import GpuReading
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.output import TokenLogprobs

_OPTIONAL_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "max_tokens",
                      "logprobs", "prompt_logprobs", "skip_special_tokens")
_PLAIN_SAMPLING = ("min_tokens", "include_stop_str_in_output", "ignore_eos")

@dataclass
class RequestFailed:
    """A request that ended with an error instead of a result (its replica failed)."""

    request_id: str
    error: BaseException


class StepDelivery(list):
    """One step's (request id, item) pairs for one subscriber, with the step's time (the
    coordinator's time.monotonic()) and the RequestStarts of the first tokens among them."""

    def __init__(self, items: Iterable[tuple[str, object]] = (), step_time: float = 0.0,
                 starts: Iterable[RequestStart] = ()) -> None:
        super().__init__(items)
        self.step_time = step_time
        self.starts = list(starts)


FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}
FINISH_NAMES = {value: name for name, value in FINISH_REASONS.items()}


def sampling_from_proto(message: pb.SamplingParams, **overrides) -> SamplingParams:
    fields = {name: getattr(message, name) for name in _OPTIONAL_SAMPLING
              if message.HasField(name)}
    fields.update({name: getattr(message, name) for name in _PLAIN_SAMPLING})
    if message.stop:
        fields["stop"] = list(message.stop)
    if message.stop_token_ids:
        fields["stop_token_ids"] = list(message.stop_token_ids)
    if message.logit_bias:
        fields["logit_bias"] = dict(message.logit_bias)
    fields.update(overrides)
    return SamplingParams(**fields)


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(
        min_tokens=params.min_tokens, include_stop_str_in_output=params.include_stop_str_in_output,
        ignore_eos=params.ignore_eos, stop=params.stop or [],
        stop_token_ids=params.stop_token_ids or [], logit_bias=params.logit_bias or {})
    for name in _OPTIONAL_SAMPLING:
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    return message


def beam_from_proto(message: pb.BeamSearchParams) -> BeamSearchParams:
    fields = {"beam_width": message.beam_width, "max_tokens": message.max_tokens,
              "ignore_eos": message.ignore_eos}
    if message.HasField("length_penalty"):
        fields["length_penalty"] = message.length_penalty
    return BeamSearchParams(**fields)


def beam_to_proto(params: BeamSearchParams) -> pb.BeamSearchParams:
    return pb.BeamSearchParams(beam_width=params.beam_width, max_tokens=params.max_tokens,
                               ignore_eos=params.ignore_eos,
                               length_penalty=params.length_penalty)


def core_request_to_proto(request: EngineCoreRequest) -> cpb.CoreRequest:
    message = cpb.CoreRequest(request_id=request.request_id,
                              prompt_token_ids=request.prompt_token_ids,
                              priority=request.priority)
    if isinstance(request.params, BeamSearchParams):
        message.beam_search.CopyFrom(beam_to_proto(request.params))
    else:
        message.sampling.CopyFrom(sampling_to_proto(request.params))
    if request.cache_salt is not None:
        message.cache_salt = request.cache_salt
    return message


def core_request_from_proto(message: cpb.CoreRequest) -> EngineCoreRequest:
    params = beam_from_proto(message.beam_search) if message.HasField("beam_search") \
        else sampling_from_proto(message.sampling)
    return EngineCoreRequest(message.request_id, list(message.prompt_token_ids), params,
                             priority=message.priority,
                             cache_salt=message.cache_salt if message.HasField("cache_salt")
                             else None)


def logprob_to_proto(entry: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in entry.top])


def logprob_from_proto(message: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(message.token_id, message.logprob, message.rank,
                         [(t.token_id, t.logprob) for t in message.top])


def _set_stop_reason(message, stop_reason: int | str | None) -> None:
    if isinstance(stop_reason, str):
        message.stop_string = stop_reason
    elif stop_reason is not None:
        message.stop_token_id = stop_reason


def stop_reason_of(message) -> int | str | None:
    which = message.WhichOneof("stop_reason")
    return None if which is None else getattr(message, which)


def update_to_proto(update: SequenceUpdate) -> cpb.SequenceUpdate:
    message = cpb.SequenceUpdate(
        request_id=update.request_id, index=update.index, new_token_ids=update.new_token_ids,
        logprobs=[logprob_to_proto(e) for e in update.logprobs or ()],
        finish_reason=FINISH_REASONS.get(update.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        num_cached_tokens=update.num_cached_tokens, num_preemptions=update.num_preemptions)
    if update.prompt_logprobs is not None:
        start, entries = update.prompt_logprobs
        message.prompt_logprobs.CopyFrom(cpb.PromptLogprobsChunk(
            start=start, entries=[logprob_to_proto(e) for e in entries]))
    _set_stop_reason(message, update.stop_reason)
    return message


def update_from_proto(message: cpb.SequenceUpdate) -> SequenceUpdate:
    prompt_logprobs = None
    if message.HasField("prompt_logprobs"):
        prompt_logprobs = (message.prompt_logprobs.start,
                           [logprob_from_proto(e) for e in message.prompt_logprobs.entries])
    return SequenceUpdate(
        message.request_id, message.index, list(message.new_token_ids),
        logprobs=[logprob_from_proto(e) for e in message.logprobs] if message.logprobs else None,
        prompt_logprobs=prompt_logprobs,
        finish_reason=FINISH_NAMES.get(message.finish_reason),
        stop_reason=stop_reason_of(message), num_cached_tokens=message.num_cached_tokens,
        num_preemptions=message.num_preemptions)


def beam_result_to_proto(output: BeamSearchOutput) -> cpb.BeamResult:
    return cpb.BeamResult(request_id=output.request_id, sequences=[
        cpb.BeamSequence(token_ids=s.token_ids, cumulative_logprob=s.cumulative_logprob,
                         score=s.score) for s in output.sequences])


def beam_result_from_proto(message: cpb.BeamResult,
                           prompt_token_ids: list[int]) -> BeamSearchOutput:
    return BeamSearchOutput(message.request_id, prompt_token_ids, [
        BeamSequence(list(s.token_ids), s.cumulative_logprob, score=s.score)
        for s in message.sequences])


def snapshot_to_proto(snapshot: EngineSnapshot) -> cpb.EngineSnapshot:
    stats = snapshot.stats
    return cpb.EngineSnapshot(
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        num_swapped=stats.num_swapped, num_requests=stats.num_requests,
        kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
        num_preemptions=stats.num_preemptions, prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        iteration_tokens_counts=snapshot.iteration_tokens_counts,
        iteration_tokens_sum=snapshot.iteration_tokens_sum)


def gpu_to_proto(rank: int, reading: GpuReading) -> pb.GpuStats:
    message = pb.GpuStats(rank=rank, index=reading.index, uuid=reading.uuid, name=reading.name,
                          memory_used_bytes=reading.memory_used_bytes,
                          memory_total_bytes=reading.memory_total_bytes)
    for name in ("utilization", "power_watts", "temperature_celsius"):
        value = getattr(reading, name)
        if value is not None:
            setattr(message, name, value)
    return message
