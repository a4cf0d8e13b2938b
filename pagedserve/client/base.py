"""What Client and AsyncClient share: channels, options and the requests of the small RPCs.

Channels: one per target address, made on first use (sync or grpc.aio). Each call goes to the
preferred address (the one that answered last) and moves on to the next on UNAVAILABLE (see
retry.py); channels reconnect by themselves.

Arguments of generate() and generate_stream() (keyword-only, all optional):

- Sampling, named and meaning exactly as the fields of pagedserve.SamplingParams: n,
  temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,
  logit_bias, seed, max_tokens, min_tokens, stop, stop_token_ids, include_stop_str_in_output,
  ignore_eos, logprobs, prompt_logprobs, skip_special_tokens. Left out (or None) means the
  offline default, applied by the server; max_tokens=None (no limit) cannot be sent.
- request_id: the caller's id (unique while in flight), "" or None: the gateway assigns one.
- priority: an int32 for schedulers that order by it.
- cache_salt: requests with different salts never share prefix-cache blocks.
- model: the served model name ("" = the client's `model`, else the gateway's).
- timeout: this call's deadline in seconds, retries included (None: the client's default).

Any other keyword raises TypeError naming it. The prompt is a string or a list of token ids.
Errors are pagedserve.errors classes chosen by gRPC status code (see retry.py), carrying the
server's message: InvalidArgument, ResourceExhausted, Unavailable, Unauthenticated, ...
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from pagedserve.client.options import ClientOptions, TLSConfig
from pagedserve.client.retry import Attempts
from pagedserve.errors import FailedPrecondition, InvalidArgument, InvalidType
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.root_certificates,
                                        private_key=tls.private_key,
                                        certificate_chain=tls.certificate_chain)


class ChannelSet:
    """Channels and Generation stubs to the client's targets."""

    def __init__(self, options: ClientOptions, aio: bool) -> None:
        self.options = options
        self.aio = aio
        self.metadata = options.metadata()
        self.preferred = 0
        self._channels: list[Any] = [None] * len(options.targets)
        self._stubs: list[generation_pb2_grpc.GenerationStub | None] = [None] * len(
            options.targets)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def targets(self) -> tuple[str, ...]:
        return self.options.targets

    def _make_channel(self, target: str) -> Any:
        tls = self.options.tls_for(target)
        args = self.options.grpc_options(tls)
        module = grpc.aio if self.aio else grpc
        if tls is None:
            return module.insecure_channel(target, options=args)
        return module.secure_channel(target, channel_credentials(tls), options=args)

    def stub(self, index: int) -> generation_pb2_grpc.GenerationStub:
        """The stub of target `index`, making its channel on first use."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the client is closed")
            stub = self._stubs[index]
            if stub is None:
                channel = self._make_channel(self.targets[index])
                self._channels[index] = channel
                stub = self._stubs[index] = generation_pb2_grpc.GenerationStub(channel)
            return stub

    def attempts(self, timeout: float | None) -> Attempts:
        """The retry state of a new call, starting at the preferred address."""
        return Attempts(self.options.retry, len(self.targets), self.preferred, timeout)

    def succeeded(self, attempts: Attempts) -> None:
        """Remember the address that answered, for the next call."""
        self.preferred = attempts.target

    def take_channels(self) -> list[Any]:
        """Mark closed and hand over the channels made so far (the caller closes them)."""
        with self._lock:
            self._closed = True
            channels = [c for c in self._channels if c is not None]
            self._channels = [None] * len(self.targets)
            self._stubs = [None] * len(self.targets)
        return channels


class ClientBase:
    """Options and request builders of both clients (not used on its own)."""

    options: ClientOptions
    _channels: ChannelSet

    @property
    def targets(self) -> tuple[str, ...]:
        return self.options.targets

    @property
    def current_target(self) -> str:
        """The address the next call goes to first (the one that answered last)."""
        return self.options.targets[self._channels.preferred]

    def call_timeout(self, timeout: float | None) -> float | None:
        """A call's deadline: its own `timeout`, else the client's default; checked > 0."""
        if timeout is None:
            return self.options.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgument(f"timeout must be None or a number of seconds > 0; "
                                  f"got {timeout!r}")
        return float(timeout)

    def _model(self, model: str | None) -> str:
        return self.options.model if model is None else model

    @staticmethod
    def abort_request(request_ids: str | Iterable[str]) -> pb.AbortRequest:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if not all(isinstance(i, str) and i for i in ids):
            raise InvalidArgument(f"request_ids must be non-empty strings; got {ids!r}")
        return pb.AbortRequest(request_ids=ids)

    def tokenize_request(self, text: str, model: str | None) -> pb.TokenizeRequest:
        if not isinstance(text, str):
            raise InvalidType(f"text must be a string; got {text!r}")
        return pb.TokenizeRequest(model=self._model(model), text=text)

    def detokenize_request(self, token_ids: Sequence[int], skip_special_tokens: bool | None,
                           model: str | None) -> pb.DetokenizeRequest:
        if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence):
            raise InvalidType(f"token_ids must be a list of token ids; got {token_ids!r}")
        request = pb.DetokenizeRequest(model=self._model(model))
        try:
            request.token_ids.extend(token_ids)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"token_ids must be integers >= 0 ({exc})") from None
        if skip_special_tokens is not None:
            request.skip_special_tokens = bool(skip_special_tokens)
        return request

    def model_info_request(self, model: str | None) -> pb.GetModelInfoRequest:
        return pb.GetModelInfoRequest(model=self._model(model))

    @staticmethod
    def load_request() -> pb.GetServerLoadRequest:
        return pb.GetServerLoadRequest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.options.targets)})"
