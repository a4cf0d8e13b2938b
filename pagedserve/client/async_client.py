"""AsyncClient: the asyncio SDK over grpc.aio channels; the same calls as Client, awaited.

    from pagedserve.client import AsyncClient, StreamDelta

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate([1, 2, 3], max_tokens=16, temperature=0)
        async for event in client.generate_stream("Hi", max_tokens=32):
            if isinstance(event, StreamDelta):
                print(event.text, end="")

Channels are made on the first call and belong to the event loop that made them: use one
AsyncClient within one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from pagedserve.client.base import ChannelSet, ClientBase
from pagedserve.client.events import StreamAssembler, StreamEvent, StreamFinal
from pagedserve.client.options import (
    DEFAULT_TARGET,
    KEEPALIVE_TIME_S,
    KEEPALIVE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    ClientOptions,
    TLSConfig,
)
from pagedserve.client.requests import (
    beam_search_request,
    generate_request,
    split_call_kwargs,
)
from pagedserve.client.results import GenerationResult, ModelInfo, ServerLoad, result_from_proto
from pagedserve.client.retry import RetryPolicy, raise_from_rpc, raise_stream_error
from pagedserve.errors import Internal


class AsyncGenerationStream:
    """Async iterator of StreamDelta events, then one StreamFinal (see GenerationStream).

    The RPC starts at the first `__anext__`. `close()` (or `await aclose()`, or leaving an
    `async with` block) cancels it and so the request on the server; a stream dropped after
    breaking out of `async for` is cancelled when it is collected.
    """

    def __init__(self, channels: ChannelSet, request: Any, timeout: float | None) -> None:
        self._channels = channels
        self._request = request
        self._timeout = timeout
        self._assembler = StreamAssembler(request)
        self._call: Any = None
        self._done = False
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._assembler.request_id

    @property
    def final(self) -> StreamFinal | None:
        return self._assembler.final

    async def _open(self) -> Any:
        attempts = self._channels.attempts(self._timeout)
        while True:
            stub = self._channels.stub(attempts.target)
            self._call = stub.GenerateStream(self._request, timeout=attempts.start(),
                                             metadata=self._channels.metadata)
            try:
                message = await self._call.read()
            except grpc.RpcError as error:
                delay = None if self._closed else attempts.next_delay(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                if self._closed:
                    raise StopAsyncIteration from None
                continue
            self._channels.succeeded(attempts)
            return message

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            message = await (self._open() if self._call is None else self._call.read())
        except grpc.RpcError as error:
            self._done = True
            if self._closed:
                raise StopAsyncIteration from None
            raise_stream_error(error, self._assembler.num_tokens)
        except BaseException:
            self.close()
            raise
        if message is grpc.aio.EOF:
            self._done = True
            if self.final is None and not self._closed:
                raise Internal("the stream ended without its final message")
            raise StopAsyncIteration
        return self._assembler.add(message)

    def close(self) -> None:
        """Cancel the RPC unless it has ended; the server aborts the request."""
        self._closed = True
        if not self._done:
            self._done = True
            if self._call is not None:
                self._call.cancel()

    cancel = close

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # the event loop may be gone already
            self.close()


class AsyncClient(ClientBase):
    """An asyncio client of a pagedserve gateway; options as Client's."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *,
                 api_key: str | None = None, tls: TLSConfig | bool | None = None,
                 timeout: float | None = None, retry: RetryPolicy | None = None,
                 model: str = "", keepalive_time_s: float = KEEPALIVE_TIME_S,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 channel_options: Iterable[tuple[str, Any]] = ()) -> None:
        self.options = ClientOptions.create(
            target, api_key=api_key, tls=tls, timeout=timeout, retry=retry, model=model,
            keepalive_time_s=keepalive_time_s, keepalive_timeout_s=keepalive_timeout_s,
            max_message_bytes=max_message_bytes, channel_options=channel_options)
        self._channels = ChannelSet(self.options, aio=True)

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        attempts = self._channels.attempts(self.call_timeout(timeout))
        while True:
            rpc = getattr(self._channels.stub(attempts.target), method)
            call = rpc(request, timeout=attempts.start(), metadata=self._channels.metadata)
            try:
                response = await call
            except grpc.RpcError as error:
                delay = attempts.next_delay(error)
                if delay is None:
                    raise_from_rpc(error)
                await asyncio.sleep(delay)
                continue
            except BaseException:  # the task was cancelled: cancel the RPC too
                call.cancel()
                raise
            self._channels.succeeded(attempts)
            return response

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Generate until every completion finishes; see ClientBase for the arguments."""
        sampling, call = split_call_kwargs("generate", kwargs)
        request = generate_request(prompt, sampling, call, self.options.model)
        response = await self._unary("Generate", request, call.get("timeout"))
        return result_from_proto(response, request)

    def generate_stream(self, prompt: str | Sequence[int],
                        **kwargs: Any) -> AsyncGenerationStream:
        """An async stream of StreamDelta events, then one StreamFinal (not awaited)."""
        sampling, call = split_call_kwargs("generate_stream", kwargs)
        request = generate_request(prompt, sampling, call, self.options.model)
        return AsyncGenerationStream(self._channels, request,
                                     self.call_timeout(call.get("timeout")))

    async def beam_search(self, prompt: str | Sequence[int], beam_width: int = 4,
                          max_tokens: int = 16, *, ignore_eos: bool = False,
                          length_penalty: float | None = None,
                          **kwargs: Any) -> GenerationResult:
        """Beam search; the outputs are the beams, best first, each with its `score`."""
        _, call = split_call_kwargs("beam_search", kwargs, sampling_allowed=False)
        request = beam_search_request(prompt, beam_width, max_tokens, ignore_eos,
                                      length_penalty, call, self.options.model)
        response = await self._unary("Generate", request, call.get("timeout"))
        return result_from_proto(response, request)

    async def abort(self, request_ids: str | Iterable[str], *,
                    timeout: float | None = None) -> list[str]:
        response = await self._unary("Abort", self.abort_request(request_ids), timeout)
        return list(response.aborted_request_ids)

    async def tokenize(self, text: str, *, model: str | None = None,
                       timeout: float | None = None) -> list[int]:
        response = await self._unary("Tokenize", self.tokenize_request(text, model), timeout)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *,
                         skip_special_tokens: bool | None = None, model: str | None = None,
                         timeout: float | None = None) -> str:
        request = self.detokenize_request(token_ids, skip_special_tokens, model)
        return (await self._unary("Detokenize", request, timeout)).text

    async def model_info(self, *, model: str | None = None,
                         timeout: float | None = None) -> ModelInfo:
        response = await self._unary("GetModelInfo", self.model_info_request(model), timeout)
        return ModelInfo.from_proto(response)

    async def load(self, *, timeout: float | None = None) -> ServerLoad:
        response = await self._unary("GetServerLoad", self.load_request(), timeout)
        return ServerLoad.from_proto(response)

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._channels.take_channels():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
