"""The OpenAI completions and chat completions over the gateway: requests admitted through
`Gateway.submit` (the gRPC service's path), outputs turned into OpenAI's response objects or
their server-sent-event chunks.

A list of prompts is one gateway request per prompt; their choices are numbered
prompt index * n + completion index, as OpenAI does. Chat prompts are the tokenizer's chat
template applied to the messages, as `LLM.chat` does, so served chat equals offline chat.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import jinja2

from pagedserve.cluster.gateway import Gateway
from pagedserve.cluster.gateway_request import GatewayRequest, RequestStream
from pagedserve.cluster.openai_protocol import (
    ChatCompletionRequest,
    OpenAIRequest,
)
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.errors import InvalidArgument, NotFound, PagedServeError
from pagedserve.scheduler.output import TokenLogprobs

LOWEST_LOGPROB = -9999.0
"""What -inf (a token masked by top-k/top-p) becomes: JSON has no infinity (vLLM's value)."""


_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""json.dumps(..., separators=(",", ":")) without a new encoder per call."""
_encode_str = json.encoder.encode_basestring_ascii
"""What json.dumps writes for a str (the C encoder's)."""
_NO_REASONS = ',"finish_reason":null,"stop_reason":null'
_DONE = "data: [DONE]\n\n"


def _json(value: Any) -> str:
    """`value` as compact JSON; strings and None without the encoder's overhead."""
    if value is None:
        return "null"
    if type(value) is str:
        return _encode_str(value)
    return _ENCODER.encode(value)


def _json_ids(token_ids: list[int]) -> str:
    return f"[{','.join(map(str, token_ids))}]"


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else _ENCODER.encode(payload)
    return f"data: {data}\n\n"


def error_object(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body; `type` is the HTTP status phrase in snake case. A lone surrogate
    that the message quotes from the request ("\\ud800" in JSON) is written escaped: UTF-8
    has none, and the body would fail to render (a 500 instead of the refusal)."""
    try:
        kind = HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        kind = "error"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def _output_groups(streams: list[RequestStream]
                         ) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
    """Lists of (stream index, output). Of one stream: each output with those that arrived
    behind it while its consumer was busy (written at once); of several, one at a time."""
    if len(streams) > 1:
        async with aclosing(_interleaved(streams)) as outputs:
            async for item in outputs:
                yield [item]
        return
    stream = streams[0]
    async for output in stream:
        group = [(0, output)]
        try:
            while (more := stream.next_ready()) is not None:
                group.append((0, more))
        except Exception as error:  # a failed replica: the outputs before it go first
            yield group
            raise error
        yield group


async def _interleaved(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, output) as each stream produces them."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                pending[asyncio.ensure_future(anext(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


class OpenAIServing:
    """Completions and chat completions of one gateway's model."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.gateway.model_name:
            raise NotFound(f"The model `{model}` does not exist; this server serves "
                           f"`{self.gateway.model_name}`.", field="model")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.gateway.model_name, "object": "model", "created": self.created,
            "owned_by": "pagedserve", "max_model_len": self.gateway.limits.max_model_len}]}

    # ---- admission ------------------------------------------------------------------------

    async def admit(self, body: OpenAIRequest) -> list[RequestStream]:
        """Every prompt of the request admitted, or none (an error closes those already in)."""
        self.check_model(body.model)
        output_kind = "delta" if body.stream else "final_only"
        params = body.sampling_params(output_kind)
        if isinstance(body, ChatCompletionRequest):
            # Off the loop: a template over long messages takes as long as their tokens.
            prompts: list[str | list[int]] = [await self.gateway.prompts.run(
                self._chat_prompt, body)]
        else:
            prompts = body.prompts()
        streams: list[RequestStream] = []
        try:
            for prompt in prompts:
                streams.append(await self.gateway.submit(GatewayRequest(
                    prompt, params, priority=body.priority, cache_salt=body.cache_salt)))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.gateway.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument("this model's tokenizer has no chat template; use "
                                  "/v1/completions", field="messages")
        try:
            ids = tokenizer.apply_chat_template(
                [message.for_template() for message in body.messages], tokenize=True,
                add_generation_prompt=body.add_generation_prompt)
        except jinja2.TemplateError as error:
            raise InvalidArgument(f"messages: the chat template refused them ({error})",
                                  field="messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(token_id) for token_id in ids]

    # ---- whole responses --------------------------------------------------------------------

    async def response(self, body: OpenAIRequest, streams: list[RequestStream]) -> dict:
        """The finished request as one response object."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        async with aclosing(_interleaved(streams)) as outputs:
            async for index, output in outputs:
                finals[index] = output
        chat = isinstance(body, ChatCompletionRequest)
        choices = []
        for prompt_index, output in enumerate(finals):
            for completion in output.outputs:
                choice = self._choice(body, completion, prompt_index)
                if chat:
                    choice["message"] = {"role": "assistant", "content": completion.text}
                else:
                    choice["text"] = completion.text
                if body.return_token_ids:
                    choice["token_ids"] = completion.token_ids
                    if not chat:
                        choice["prompt_token_ids"] = output.prompt_token_ids
                choice["logprobs"] = self._logprobs(body, completion.logprobs, 0)[0]
                choices.append(choice)
        response = self._envelope(body, streams[0].request_id, chat, chunk=False)
        response["choices"] = choices
        response["usage"] = _usage(sum(len(o.prompt_token_ids) for o in finals),
                                   sum(len(c.token_ids) for o in finals for c in o.outputs))
        if chat and body.return_token_ids:
            response["prompt_token_ids"] = finals[0].prompt_token_ids
        return response

    @staticmethod
    def _choice(body: OpenAIRequest, completion: CompletionOutput,
                prompt_index: int) -> dict[str, Any]:
        return {"index": prompt_index * body.n + completion.index,
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def _envelope(self, body: OpenAIRequest, request_id: str, chat: bool,
                  chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat \
            else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "object": kind,
                "created": int(time.time()), "model": self.gateway.model_name}

    # ---- streaming --------------------------------------------------------------------------

    async def events(self, body: OpenAIRequest,
                     streams: list[RequestStream]) -> AsyncIterator[bytes]:
        """Server-sent events, as bytes to write: chunks, the usage chunk if asked, then
        [DONE]. An error after the start comes as one `{"error": ...}` event.

        Each piece is every event of the outputs that were waiting (one engine step's, or
        several when this consumer fell behind): one write each. The last output's events,
        the usage chunk and [DONE] go together. Chunks are formatted from a per-request
        template, byte for byte what json.dumps would write of their dicts."""
        chat = isinstance(body, ChatCompletionRequest)
        envelope = self._envelope(body, streams[0].request_id, chat, chunk=True)
        # Everything of a chunk up to its choice's index, and the text's key.
        head = (f'data: {{"id":{_json(envelope["id"])},"object":{_json(envelope["object"])},'
                f'"created":{envelope["created"]},"model":{_json(envelope["model"])},'
                '"choices":[{"index":')
        text_key, text_end = (',"delta":{"content":', "}") if chat else (',"text":', "")
        with_ids = body.return_token_ids
        n = body.n
        prompt_tokens = generated = 0
        counted_prompts: set[int] = set()
        finished: set[int] = set()
        text_offsets: dict[int, int] = {}
        remaining = len(streams)
        pieces: list[str] = []
        try:
            if chat:
                yield sse({**envelope, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}
                    for index in range(len(streams) * n)]}).encode()
            async with aclosing(_output_groups(streams)) as groups:
                async for group in groups:
                    for prompt_index, output in group:
                        if prompt_index not in counted_prompts:
                            counted_prompts.add(prompt_index)
                            prompt_tokens += len(output.prompt_token_ids)
                        if output.finished:
                            remaining -= 1
                        for completion in output.outputs:
                            token_ids = completion.token_ids
                            generated += len(token_ids)
                            index = prompt_index * n + completion.index
                            ends_now = completion.finished and index not in finished
                            if not (token_ids or completion.text or ends_now):
                                continue
                            if ends_now:
                                finished.add(index)
                                reasons = (f',"finish_reason":{_json(completion.finish_reason)}'
                                           f',"stop_reason":{_json(completion.stop_reason)}')
                            else:
                                reasons = _NO_REASONS
                            ids = f',"token_ids":{_json_ids(token_ids)}' if with_ids else ""
                            if completion.logprobs is None:
                                logprobs = "null"
                            else:
                                entries, text_offsets[index] = self._logprobs(
                                    body, completion.logprobs, text_offsets.get(index, 0))
                                logprobs = _json(entries)
                            pieces.append(f"{head}{index}{reasons}{text_key}"
                                          f"{_encode_str(completion.text)}{text_end}{ids}"
                                          f',"logprobs":{logprobs}}}]}}\n\n')
                    if remaining and pieces:  # else the last: it goes with [DONE]
                        yield "".join(pieces).encode()
                        pieces.clear()
            if body.include_usage():
                pieces.append(sse({**envelope, "choices": [],
                                   "usage": _usage(prompt_tokens, generated)}))
        except PagedServeError as error:
            pieces.append(sse(error_object(str(error), error.http_status)))
        pieces.append(_DONE)
        yield "".join(pieces).encode()

    # ---- logprobs ---------------------------------------------------------------------------

    def _logprobs(self, body: OpenAIRequest, entries: list[TokenLogprobs] | None,
                  text_offset: int) -> tuple[dict | None, int]:
        """(the logprobs object in the endpoint's format or None, the next text offset)."""
        if entries is None:
            return None, text_offset
        if isinstance(body, ChatCompletionRequest):
            return {"content": [{**self._token(e.token_id, e.logprob), "top_logprobs": [
                self._token(token_id, logprob) for token_id, logprob in e.top]}
                for e in entries]}, text_offset
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(self._text_of(entry.token_id))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        return {"tokens": tokens,
                "token_logprobs": [max(e.logprob, LOWEST_LOGPROB) for e in entries],
                "top_logprobs": [{self._text_of(token_id): max(logprob, LOWEST_LOGPROB)
                                  for token_id, logprob in e.top} for e in entries],
                "text_offset": offsets}, text_offset

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._text_of(token_id)
        return {"token": text, "logprob": max(logprob, LOWEST_LOGPROB),
                "bytes": list(text.encode("utf-8"))}

    def _text_of(self, token_id: int) -> str:
        """A token's text ('token_id:<id>' without a tokenizer, as vLLM writes it)."""
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.gateway.tokenizer
            text = f"token_id:{token_id}" if tokenizer is None else tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

