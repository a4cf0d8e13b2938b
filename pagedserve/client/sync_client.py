"""Client: the blocking SDK over a grpc channel (one per target address).

    from pagedserve.client import Client

    with Client("127.0.0.1:50051", api_key="...") as client:
        result = client.generate("Hello, my name is", temperature=0.8, max_tokens=32)
        print(result.outputs[0].text, result.outputs[0].finish_reason, result.usage)
        with client.generate_stream("Once upon a time", max_tokens=64) as stream:
            for event in stream:
                if isinstance(event, StreamDelta):
                    print(event.text, end="", flush=True)

It is safe to share one Client between threads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

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


class GenerationStream:
    """Events of one GenerateStream call: StreamDelta, ..., then one StreamFinal.

    The RPC starts at the first `next()`; a call that has received nothing yet is retried (see
    retry.py), one that has is not. `close()` cancels the RPC, and so the request on the server
    (its KV blocks are freed at once); leaving a `with` block closes it, and so does breaking
    out of `for event in client.generate_stream(...)` (the dropped stream is closed when it is
    collected). After a close, iteration ends quietly.
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
        """The request's id: the caller's, or the gateway's once the first event is in."""
        return self._assembler.request_id

    @property
    def final(self) -> StreamFinal | None:
        """The final event, once it has arrived (its `result()` is the whole generation)."""
        return self._assembler.final

    def _open(self) -> Any:
        attempts = self._channels.attempts(self._timeout)
        while True:
            stub = self._channels.stub(attempts.target)
            self._call = stub.GenerateStream(self._request, timeout=attempts.start(),
                                             metadata=self._channels.metadata)
            try:
                message = next(self._call)
            except grpc.RpcError as error:
                delay = None if self._closed else attempts.next_delay(error)
                if delay is None:
                    raise
                time.sleep(delay)
                if self._closed:
                    raise StopIteration from None
                continue
            self._channels.succeeded(attempts)
            return message

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._done:
            raise StopIteration
        try:
            message = self._open() if self._call is None else next(self._call)
        except StopIteration:
            self._done = True
            if self.final is None and not self._closed:
                raise Internal("the stream ended without its final message") from None
            raise
        except grpc.RpcError as error:
            self._done = True
            if self._closed:
                raise StopIteration from None
            raise_stream_error(error, self._assembler.num_tokens)
        except BaseException:
            self.close()
            raise
        return self._assembler.add(message)

    def close(self) -> None:
        """Cancel the RPC unless it has ended; the server aborts the request."""
        self._closed = True
        if not self._done:
            self._done = True
            if self._call is not None:
                self._call.cancel()

    cancel = close

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class Client(ClientBase):
    """A blocking client of a pagedserve gateway.

    target: "host:port", or several (each call goes to the one that answered last and moves on
    to the next on UNAVAILABLE). api_key: sent as `authorization: Bearer <api_key>`. tls: a
    TLSConfig (root certificates, a client certificate and key for mTLS, a server name), True
    (TLS with the system roots), False (plaintext), or None: plaintext to loopback addresses,
    TLS elsewhere. timeout: the default deadline of every call in seconds (None: none); a call's
    own `timeout=` replaces it, and covers its retries. retry: a RetryPolicy (see retry.py).
    model: the served model to ask for ("" = the gateway's). The rest tune the channels (see
    options.py); `channel_options` are extra gRPC channel arguments.
    """

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
        self._channels = ChannelSet(self.options, aio=False)

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        attempts = self._channels.attempts(self.call_timeout(timeout))
        while True:
            rpc = getattr(self._channels.stub(attempts.target), method)
            future = rpc.future(request, timeout=attempts.start(),
                                metadata=self._channels.metadata)
            try:
                response = future.result()
            except grpc.RpcError as error:
                delay = attempts.next_delay(error)
                if delay is None:
                    raise_from_rpc(error)
                time.sleep(delay)
                continue
            except BaseException:  # KeyboardInterrupt: cancel, so the server aborts it
                future.cancel()
                raise
            self._channels.succeeded(attempts)
            return response

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Generate until every completion finishes; see ClientBase for the arguments."""
        sampling, call = split_call_kwargs("generate", kwargs)
        request = generate_request(prompt, sampling, call, self.options.model)
        return result_from_proto(self._unary("Generate", request, call.get("timeout")), request)

    def generate_stream(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationStream:
        """A stream of StreamDelta events, then one StreamFinal; arguments as generate()."""
        sampling, call = split_call_kwargs("generate_stream", kwargs)
        request = generate_request(prompt, sampling, call, self.options.model)
        return GenerationStream(self._channels, request, self.call_timeout(call.get("timeout")))

    def beam_search(self, prompt: str | Sequence[int], beam_width: int = 4,
                    max_tokens: int = 16, *, ignore_eos: bool = False,
                    length_penalty: float | None = None, **kwargs: Any) -> GenerationResult:
        """Beam search; the outputs are the beams, best first, each with its `score`."""
        _, call = split_call_kwargs("beam_search", kwargs, sampling_allowed=False)
        request = beam_search_request(prompt, beam_width, max_tokens, ignore_eos,
                                      length_penalty, call, self.options.model)
        return result_from_proto(self._unary("Generate", request, call.get("timeout")), request)

    def abort(self, request_ids: str | Iterable[str], *,
              timeout: float | None = None) -> list[str]:
        """Abort requests by id (e.g. from another process); returns the ids aborted."""
        response = self._unary("Abort", self.abort_request(request_ids), timeout)
        return list(response.aborted_request_ids)

    def tokenize(self, text: str, *, model: str | None = None,
                 timeout: float | None = None) -> list[int]:
        response = self._unary("Tokenize", self.tokenize_request(text, model), timeout)
        return list(response.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool | None = None,
                   model: str | None = None, timeout: float | None = None) -> str:
        request = self.detokenize_request(token_ids, skip_special_tokens, model)
        return self._unary("Detokenize", request, timeout).text

    def model_info(self, *, model: str | None = None,
                   timeout: float | None = None) -> ModelInfo:
        response = self._unary("GetModelInfo", self.model_info_request(model), timeout)
        return ModelInfo.from_proto(response)

    def load(self, *, timeout: float | None = None) -> ServerLoad:
        return ServerLoad.from_proto(self._unary("GetServerLoad", self.load_request(), timeout))

    def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._channels.take_channels():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
