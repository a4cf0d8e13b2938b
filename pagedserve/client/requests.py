"""Keyword arguments to GenerateRequest protos.

Sampling arguments are named exactly like the fields of pagedserve.SamplingParams (see
SAMPLING_FIELDS). An argument left out, or given as None where the offline field accepts None,
leaves the proto field unset, so the server applies the offline default. Values are checked by
the server, which names the field and its range in INVALID_ARGUMENT; here only what cannot be
put in the proto at all (a wrong type, a negative count) is refused, as InvalidArgument or
InvalidType naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pagedserve.errors import InvalidArgument, InvalidType
from pagedserve.protos.v1 import generation_pb2 as pb

# Fields whose proto is `optional`: None leaves them unset (the offline default).
OPTIONAL_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "max_tokens", "logprobs",
                   "prompt_logprobs", "skip_special_tokens")
SCALAR_FIELDS = ("min_tokens", "include_stop_str_in_output", "ignore_eos")
LIST_FIELDS = ("stop", "stop_token_ids")
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias", "seed", "max_tokens",
                   "min_tokens", "stop", "stop_token_ids", "include_stop_str_in_output",
                   "ignore_eos", "logprobs", "prompt_logprobs", "skip_special_tokens")
"""Every SamplingParams field a request can set, in the order of the proto."""
CALL_FIELDS = ("request_id", "priority", "cache_salt", "model", "timeout")
"""Per-call arguments besides sampling: ids, scheduling, the served model and the deadline."""


def check_kwargs(method: str, kwargs: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Raise TypeError naming the first keyword argument `method` does not take."""
    for name in kwargs:
        if name not in allowed:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}; "
                            f"it takes {', '.join(allowed)}")


def _set(message: Any, name: str, value: Any) -> None:
    try:
        setattr(message, name, value)
    except TypeError as exc:
        raise InvalidType(f"SamplingParams.{name} has the wrong type: {value!r} ({exc})") from None
    except ValueError as exc:
        raise InvalidArgument(f"SamplingParams.{name} is out of range: {value!r} ({exc})") from None


def sampling_proto(sampling: Mapping[str, Any]) -> pb.SamplingParams:
    """A SamplingParams proto from keyword arguments named like SamplingParams fields."""
    check_kwargs("sampling", sampling, SAMPLING_FIELDS)
    message = pb.SamplingParams()
    for name, value in sampling.items():
        if name in OPTIONAL_FIELDS:
            if value is None and name == "max_tokens":
                raise InvalidArgument(
                    "SamplingParams.max_tokens=None (up to the context length) has no wire "
                    "form: pass an integer >= 1, e.g. model_info().max_model_len minus the "
                    "prompt length, or leave it out for the default of 16")
            if value is not None:
                _set(message, name, value)
        elif name in SCALAR_FIELDS:
            _set(message, name, value)
        elif name == "logit_bias":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise InvalidType(f"SamplingParams.logit_bias must be None or a dict of token "
                                  f"id -> bias; got {value!r}")
            for token_id, bias in value.items():
                try:
                    message.logit_bias[token_id] = bias
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(f"SamplingParams.logit_bias must map token ids >= 0 "
                                          f"to numbers; got {token_id!r}: {bias!r} ({exc})"
                                          ) from None
        elif name in LIST_FIELDS:
            if value is None:
                continue
            if name == "stop" and isinstance(value, str):
                value = [value]
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise InvalidType(f"SamplingParams.{name} must be None or a list; got {value!r}")
            try:
                getattr(message, name).extend(value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"SamplingParams.{name} has an invalid entry: {value!r} "
                                      f"({exc})") from None
    return message


def set_prompt(request: pb.GenerateRequest, prompt: str | Sequence[int]) -> None:
    """Put a text prompt or a list of token ids in the request's `prompt` oneof."""
    if isinstance(prompt, str):
        request.text = prompt
        return
    if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
        raise InvalidType(f"prompt must be a string or a list of token ids; got {prompt!r}")
    request.token_ids.SetInParent()
    try:
        request.token_ids.ids.extend(prompt)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"prompt token ids must be integers >= 0 ({exc})") from None


def _call_fields(request: pb.GenerateRequest, call: Mapping[str, Any], model: str) -> None:
    request.request_id = call.get("request_id") or ""
    request.model = call.get("model") or model
    priority = call.get("priority")
    if priority is not None:
        try:
            request.priority = priority
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"priority must be a 32-bit integer; got {priority!r} "
                                  f"({exc})") from None
    if call.get("cache_salt") is not None:
        request.cache_salt = call["cache_salt"]


def split_call_kwargs(method: str, kwargs: Mapping[str, Any],
                      sampling_allowed: bool = True) -> tuple[dict, dict]:
    """(sampling, per-call) arguments of `method`; an unknown name raises TypeError."""
    allowed = (*SAMPLING_FIELDS, *CALL_FIELDS) if sampling_allowed else CALL_FIELDS
    check_kwargs(method, kwargs, allowed)
    sampling = {k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS}
    call = {k: v for k, v in kwargs.items() if k in CALL_FIELDS}
    return sampling, call


def generate_request(prompt: str | Sequence[int], sampling: Mapping[str, Any],
                     call: Mapping[str, Any], model: str) -> pb.GenerateRequest:
    """The GenerateRequest of generate() and generate_stream()."""
    request = pb.GenerateRequest(sampling=sampling_proto(sampling))
    set_prompt(request, prompt)
    _call_fields(request, call, model)
    return request


def beam_search_request(prompt: str | Sequence[int], beam_width: int, max_tokens: int,
                        ignore_eos: bool, length_penalty: float | None,
                        call: Mapping[str, Any], model: str) -> pb.GenerateRequest:
    """The GenerateRequest of beam_search(): `beam_search` set, `sampling` unset."""
    request = pb.GenerateRequest()
    beam = request.beam_search
    for name, value in (("beam_width", beam_width), ("max_tokens", max_tokens),
                        ("ignore_eos", ignore_eos), ("length_penalty", length_penalty)):
        if value is None:
            continue
        try:
            setattr(beam, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"BeamSearchParams.{name} is invalid: {value!r} "
                                  f"({exc})") from None
    request.beam_search.SetInParent()
    set_prompt(request, prompt)
    _call_fields(request, call, model)
    return request
