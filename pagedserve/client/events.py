"""Typed events of generate_stream(): deltas, then one final event.

A GenerateStream RPC sends zero or more deltas (new tokens and text of one completion), then
exactly one final message whose completions carry only finish reasons, plus usage and timing.
StreamAssembler turns each message into a StreamDelta or a StreamFinal and keeps the text, token
ids and logprobs of every completion, so that the final event holds the whole result: the same
GenerationResult that generate() returns for the same request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.client.results import (
    Completion,
    GenerationResult,
    Timing,
    TokenLogprob,
    Usage,
    prompt_logprobs_from_proto,
    prompt_text,
    requested,
)
from pagedserve.errors import Internal
from pagedserve.protos.v1 import generation_pb2 as pb


@dataclass(frozen=True)
class StreamDelta:
    """New output of one completion: its next tokens and the text they completed."""

    request_id: str
    index: int
    """Which completion (0 .. n - 1)."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    """One per token in token_ids, when the request asked for logprobs."""


@dataclass(frozen=True)
class StreamFinal:
    """The last event: every completion whole (deltas joined) with finish reasons and usage."""

    request_id: str
    outputs: list[Completion]
    usage: Usage = field(default_factory=Usage)
    timing: Timing = field(default_factory=Timing)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt: str | None = None

    @property
    def finish_reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self.outputs]

    def result(self) -> GenerationResult:
        """The stream as one result, like generate() gives."""
        return GenerationResult(self.request_id, self.prompt, list(self.prompt_token_ids),
                                self.outputs, self.usage, self.timing, self.prompt_logprobs)


StreamEvent = StreamDelta | StreamFinal


class StreamAssembler:
    """Turns the messages of one stream into events, joining the deltas of each completion."""

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        self.want_logprobs, self.want_prompt_logprobs = requested(request)
        self.request_id: str = request.request_id
        self.completions: dict[int, Completion] = {}
        self.final: StreamFinal | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens delivered so far, over every completion."""
        return sum(len(completion.token_ids) for completion in self.completions.values())

    def _completion(self, index: int) -> Completion:
        if index not in self.completions:
            self.completions[index] = Completion(
                index=index, logprobs=[] if self.want_logprobs else None)
        return self.completions[index]

    def add(self, message: pb.GenerateStreamResponse) -> StreamEvent:
        """The event of one stream message."""
        if self.final is not None:
            raise Internal("the server sent a message after the stream's final message")
        if message.request_id:
            self.request_id = message.request_id
        kind = message.WhichOneof("event")
        if kind == "delta":
            return self._delta(message.delta)
        if kind == "final":
            return self._final(message.final)
        raise Internal("the server sent a stream message with neither a delta nor a final")

    def _delta(self, delta: pb.Delta) -> StreamDelta:
        logprobs = [TokenLogprob.from_proto(m) for m in delta.logprobs]
        completion = self._completion(delta.index)
        completion.text += delta.text
        completion.token_ids.extend(delta.token_ids)
        if completion.logprobs is not None or logprobs:
            completion.logprobs = (completion.logprobs or []) + logprobs
        return StreamDelta(self.request_id, delta.index, delta.text, list(delta.token_ids),
                           logprobs if (self.want_logprobs or logprobs) else None)

    def _final(self, response: pb.GenerateResponse) -> StreamFinal:
        if response.request_id:
            self.request_id = response.request_id
        for message in response.completions:
            completion = self._completion(message.index)
            # A final message carries finish reasons only; take text or tokens if a server
            # sends them there anyway (and nothing was streamed for that completion).
            if message.token_ids and not completion.token_ids:
                completion.token_ids = list(message.token_ids)
            if message.text and not completion.text:
                completion.text = message.text
            completion.set_finish(message)
        self.final = StreamFinal(
            request_id=self.request_id,
            outputs=[self.completions[i] for i in sorted(self.completions)],
            usage=Usage.from_proto(response.usage),
            timing=Timing.from_proto(response.timing),
            prompt_token_ids=list(response.prompt_token_ids),
            prompt_logprobs=prompt_logprobs_from_proto(response.prompt_logprobs,
                                                       self.want_prompt_logprobs),
            prompt=prompt_text(self.request),
        )
        return self.final
