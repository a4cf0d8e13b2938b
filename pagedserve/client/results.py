"""Typed results of generate() and beam_search(), shaped like the offline RequestOutput.

`GenerationResult` mirrors pagedserve.RequestOutput (request_id, prompt, prompt_token_ids,
outputs, finished, prompt_logprobs, usage) and `Completion` mirrors CompletionOutput (index,
text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason), plus what only the
server knows: `score` (beam search), cached prompt tokens and timing. They are plain dataclasses
built from the protos here; nothing in them needs the engine. ModelInfo and ServerLoad are
the answers of model_info() and load().
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pagedserve.protos.v1 import generation_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one chosen token, its rank (1 = most likely) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_proto(cls, message: pb.TokenLogprob) -> TokenLogprob:
        return cls(message.token_id, message.logprob, message.rank,
                   [TopLogprob(t.token_id, t.logprob) for t in message.top])


def logprobs_from_proto(messages: Sequence[pb.TokenLogprob],
                        requested: bool) -> list[TokenLogprob] | None:
    """Per-token logprobs; None when the request did not ask for them (as offline)."""
    if not requested and not messages:
        return None
    return [TokenLogprob.from_proto(m) for m in messages]


@dataclass
class Completion:
    """One generated sequence of a request (n > 1 gives several; beam search gives the beams)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    """'stop', 'length' or 'abort'; None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sequence, if any."""
    score: float | None = None
    """Beam search: cumulative logprob / length ** length_penalty."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, message: pb.Completion, logprobs_requested: bool) -> Completion:
        completion = cls(index=message.index, text=message.text,
                         token_ids=list(message.token_ids),
                         logprobs=logprobs_from_proto(message.logprobs, logprobs_requested))
        completion.set_finish(message)
        return completion

    def set_finish(self, message: pb.Completion) -> None:
        """Take the finish reason, stop reason, cumulative logprob and score of `message`."""
        self.finish_reason = FINISH_REASONS.get(message.finish_reason)
        kind = message.WhichOneof("stop_reason")
        self.stop_reason = None if kind is None else getattr(message, kind)
        if message.HasField("cumulative_logprob"):
            self.cumulative_logprob = message.cumulative_logprob
        if message.HasField("score"):
            self.score = message.score


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_proto(cls, message: pb.Usage) -> Usage:
        return cls(message.prompt_tokens, message.completion_tokens,
                   message.cached_prompt_tokens)


@dataclass(frozen=True)
class Timing:
    """Server-side seconds: waiting in the queue, to the first token, and in all."""

    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0

    @classmethod
    def from_proto(cls, message: pb.Timing) -> Timing:
        return cls(message.queue_seconds, message.time_to_first_token_seconds,
                   message.total_seconds)


@dataclass
class GenerationResult:
    """A finished request: its prompt, its completions, and what it cost."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    usage: Usage = field(default_factory=Usage)
    timing: Timing = field(default_factory=Timing)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """One entry per prompt token; the first is None (nothing precedes it), as offline."""
    finished: bool = True


def prompt_logprobs_from_proto(messages: Sequence[pb.TokenLogprob],
                               requested: bool) -> list[TokenLogprob | None] | None:
    """Proto entry i belongs to prompt token i + 1; offline puts None first."""
    if not requested and not messages:
        return None
    return [None, *(TokenLogprob.from_proto(m) for m in messages)]


def requested(request: pb.GenerateRequest) -> tuple[bool, bool]:
    """Whether `request` asked for (logprobs, prompt_logprobs)."""
    if not request.HasField("sampling"):
        return False, False
    return (request.sampling.HasField("logprobs"), request.sampling.HasField("prompt_logprobs"))


def prompt_text(request: pb.GenerateRequest) -> str | None:
    return request.text if request.WhichOneof("prompt") == "text" else None


def result_from_proto(response: pb.GenerateResponse,
                      request: pb.GenerateRequest) -> GenerationResult:
    """The typed result of a Generate response (`request` tells what was asked for)."""
    want_logprobs, want_prompt_logprobs = requested(request)
    return GenerationResult(
        request_id=response.request_id,
        prompt=prompt_text(request),
        prompt_token_ids=list(response.prompt_token_ids),
        outputs=[Completion.from_proto(c, want_logprobs) for c in response.completions],
        usage=Usage.from_proto(response.usage),
        timing=Timing.from_proto(response.timing),
        prompt_logprobs=prompt_logprobs_from_proto(response.prompt_logprobs,
                                                   want_prompt_logprobs),
    )



def _from_message(cls: type, message: Any) -> Any:
    values = {}
    for f in fields(cls):
        value = getattr(message, f.name)
        values[f.name] = list(value) if f.name.endswith("_ids") else value
    return cls(**values)


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the replicas' limits."""

    model: str
    max_model_len: int
    """Prompt + generated tokens of one sequence."""
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1
    block_size: int = 0
    num_kv_blocks: int = 0
    dtype: str = ""
    max_num_seqs: int = 0
    """Also the largest n and beam_width."""
    num_replicas: int = 0
    kv_cache_dtype: str = ""
    """The KV cache's element type: the model dtype, or float8_e4m3fn."""
    kv_cache_capacity_tokens: int = 0
    """Tokens one replica's KV pool holds (num_kv_blocks x block_size)."""

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> ModelInfo:
        return _from_message(cls, message)


@dataclass(frozen=True)
class ServerLoad:
    """A load snapshot: the engines' queues and KV cache, and the gateway's admission."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of the KV blocks in use, in [0, 1]."""
    num_preemptions_total: int = 0
    gateway_in_flight: int = 0
    gateway_queue_limit: int = 0
    num_replicas_up: int = 0

    @classmethod
    def from_proto(cls, message: pb.ServerLoad) -> ServerLoad:
        return _from_message(cls, message)
