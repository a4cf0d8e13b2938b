"""What every answer to a fuzzed request must be: accepted, or refused with INVALID_ARGUMENT
(HTTP 400) naming a field of the request that it actually concerns."""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf.message import Message

from pagedserve.errors import InvalidArgument, PagedServeError
from pagedserve.protos.v1 import generation_pb2 as pb

_REQUEST_MESSAGES = (pb.GenerateRequest, pb.SamplingParams, pb.BeamSearchParams, pb.TokenIds,
                     pb.TokenizeRequest, pb.DetokenizeRequest, pb.AbortRequest,
                     pb.GetModelInfoRequest)
PROTO_FIELDS = frozenset(
    {f.name for m in _REQUEST_MESSAGES for f in m.DESCRIPTOR.fields}
    | {o.name for m in _REQUEST_MESSAGES for o in m.DESCRIPTOR.oneofs}
    | {"prompt_token_ids"})  # the token-id prompt, as the engine names it
"""Every field (and oneof) of the public request messages."""

ALWAYS_CONCERNED = frozenset({"prompt", "prompt_token_ids", "max_tokens"})
"""Named by a refusal whatever was set: the prompt (required; its length) and max_tokens (its
default of 16 must fit the context too)."""


def fields_named(text: str) -> list[str]:
    """The proto field names `text` mentions, in order of first appearance."""
    found = []
    for match in re.finditer(r"[A-Za-z_]+", text):
        word = match.group(0)
        if word in PROTO_FIELDS and word not in found:
            found.append(word)
    return found


def touched(message: Message, inner: bool = False) -> set[str]:
    """The fields set (to a non-default value) in `message` and in the messages inside it,
    and every plain scalar of an inner message that is set (BeamSearchParams.beam_width: its
    0 is a value, and invalid)."""
    names: set[str] = set()
    if inner:
        names = {f.name for f in message.DESCRIPTOR.fields
                 if not f.has_presence and not f.is_repeated and f.message_type is None}
    for descriptor, value in message.ListFields():
        names.add(descriptor.name)
        if descriptor.containing_oneof is not None:
            names.add(descriptor.containing_oneof.name)
        if descriptor.message_type is not None and not descriptor.is_repeated:
            names |= touched(value, inner=True)
    return names


def primary_field(error_field: str | None, details: str) -> str | None:
    """The field a refusal is about: its `field` (the last part), else the first field name
    its message mentions."""
    if error_field:
        return error_field.rpartition(".")[2]
    named = fields_named(details)
    return named[0] if named else None


def check_proto_refusal(message: Message, details: str, error_field: str | None = None) -> None:
    """A refusal of `message` (its status already checked) names a field of the request, one
    that the request set or one always concerned."""
    field = primary_field(error_field, details)
    assert field is not None, f"the refusal names no field: {details!r}"
    assert field in PROTO_FIELDS, f"{field!r} is no field of the request: {details!r}"
    concerned = touched(message) | ALWAYS_CONCERNED
    assert field in concerned, (f"the refusal names {field!r}, which the request did not set "
                                f"(set: {sorted(touched(message))}): {details!r}")


def check_refused_error(error: BaseException, message: Message) -> None:
    """An exception out of the gateway's checks: InvalidArgument naming its field."""
    assert isinstance(error, InvalidArgument), f"{type(error).__name__}: {error}"
    assert isinstance(error, PagedServeError) and error.grpc_status == "INVALID_ARGUMENT", (
        error.grpc_status, str(error))
    check_proto_refusal(message, str(error), error.field)


# ---- HTTP ------------------------------------------------------------------------------------

def check_http_answer(status: int, body_bytes: bytes, sent: Any, chat: bool,
                      served_name: str, headers: dict[str, str] | None = None,
                      events: list[str] | None = None, n_prompts: int | None = None) -> str:
    """An answer to `sent` (the body as a Python value; bytes when it was not JSON): a
    response, or an OpenAI error object; 'ok' or 'refused'."""
    if status == 200:
        if events is not None and events:
            assert events[-1] == "[DONE]", events[-3:]
            for event in events[:-1]:
                chunk = json.loads(event)
                assert "error" not in chunk, chunk
                assert chunk["object"] == ("chat.completion.chunk" if chat
                                           else "text_completion"), chunk
        else:
            response = json.loads(body_bytes)
            assert response["object"] == ("chat.completion" if chat else "text_completion")
            assert response["choices"], response
            assert response["usage"]["completion_tokens"] >= 1
        return "ok"
    error = json.loads(body_bytes)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status, error
    param = error["param"]
    if status == 404:
        assert param == "model", error
        assert isinstance(sent, dict) and sent.get("model") != served_name, error
        return "refused"
    assert status == 400, (status, error)
    assert error["type"] == "bad_request", error
    if not isinstance(sent, dict):
        return "refused"  # not a JSON object: there is no field to name
    required = "messages" if chat else "prompt"
    defaults = {required} if required not in sent else set()
    if not chat:
        defaults.add("max_tokens")  # 16 when not given; prompt + 16 must fit the context
    if param is None and not all(_is_text(key) for key in sent):
        return "refused"  # a key that is no Unicode text ("\ud800"): it names no field
    assert param is not None, f"a 400 without param: {error['message']!r}"
    assert param in sent or param in defaults, (
        f"param {param!r} is no field the body has ({sorted(sent)}): {error['message']!r}")
    # The message names the field too, unless the refusal is about the model, not a value.
    assert param in error["message"] or "no chat template" in error["message"], error
    return "refused"


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
