"""The bugs the fuzz tests found, one assertion each (in process, over inprocess.FakeGateway),
and those found but not fixed here (xfail, strict: they pass once fixed, and the mark goes).

Fixed:
- a refusal without `field` (no tokenizer for a text prompt, stop strings without a
  tokenizer, the GenerateRequest checks): an HTTP 400 with `param: null`;
- lone surrogates ("\\ud800", which JSON can carry) in `stop`, `cache_salt`, a chat message,
  or quoted by an error message (an unknown `model`): a 500 (UnicodeEncodeError or the
  tokenizer's TypeError) instead of the 400 / 404;
- `priority` outside int32 over HTTP, and `min_tokens` past uint32 with no max_tokens: a 500
  (ValueError setting the coordinator's proto field) instead of a 400.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from pagedserve.cluster.generation_messages import parse_generate_request
from pagedserve.cluster.grpc_common import MAX_MESSAGE_BYTES
from pagedserve.engine.limits import ModelLimits
from pagedserve.engine.processor import Processor
from pagedserve.errors import InvalidArgument
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.sampling_params import SamplingParams
from tests.fuzz.common import FAKE_MAX_MODEL_LEN, SERVED_NAME
from tests.fuzz.inprocess import asgi_call


def post(fake, path: str, body: dict | bytes):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    reply = fake.run(asgi_call(fake.app, "POST", path, raw))
    fake.run(fake.settle())
    fake.assert_idle()
    return reply


def refused(reply, status: int = 400) -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    return reply.json()["error"]


# ---- refusals name their field ----------------------------------------------------------------

def test_text_prompt_without_a_tokenizer_names_the_prompt(fakes):
    with pytest.raises(InvalidArgument) as raised:
        Processor(None).encode("hello")
    assert raised.value.field == "prompt" and "text" in str(raised.value)
    error = refused(post(fakes["none"], "/v1/completions", {"prompt": "hello"}))
    assert error["param"] == "prompt"


def test_stop_strings_without_a_tokenizer_name_stop(fakes):
    with pytest.raises(InvalidArgument) as raised:
        Processor(None).make_request("r", [1, 2], SamplingParams(stop=["x"]))
    assert raised.value.field == "SamplingParams.stop"
    error = refused(post(fakes["none"], "/v1/completions", {"prompt": [1, 2], "stop": "x"}))
    assert error["param"] == "stop"


@pytest.mark.parametrize(("message", "field"), [
    (pb.GenerateRequest(model="other", token_ids=pb.TokenIds(ids=[1])), "model"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(text=""), "text"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(),
                        beam_search=pb.BeamSearchParams(beam_width=1, max_tokens=1)),
     "beam_search"),
])
def test_generate_request_refusals_carry_their_field(message, field):
    with pytest.raises(InvalidArgument) as raised:
        parse_generate_request(message, SERVED_NAME, "final_only")
    assert raised.value.field == field and field in str(raised.value)


# ---- lone surrogates --------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": [1, 2], "stop": ["\ud800"]}, "stop"),
    ({"prompt": [1, 2], "stop": "a\udfffb"}, "stop"),
    ({"prompt": [1, 2], "cache_salt": "\udc80"}, "cache_salt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["fine", "\ud800"]}, "prompt"),
])
def test_lone_surrogates_in_completion_fields_are_400(fakes, fields, param):
    error = refused(post(fakes["bytes"], "/v1/completions", fields))
    assert error["param"] == param
    assert "not valid Unicode" in error["message"]


@pytest.mark.parametrize("turn", [{"role": "user", "content": "\ud800"},
                                  {"role": "user", "content": [{"type": "text",
                                                                "text": "a\udc00"}]},
                                  {"role": "user", "content": "hi", "name": "\udfff"}])
def test_lone_surrogates_in_chat_messages_are_400(fakes, turn):
    error = refused(post(fakes["bytes"], "/v1/chat/completions", {"messages": [turn]}))
    assert error["param"] == "messages"


def test_an_error_quoting_a_lone_surrogate_renders(fakes):
    error = refused(post(fakes["bytes"], "/v1/completions",
                         {"prompt": [1], "model": "\ud800"}), 404)
    assert error["param"] == "model" and "\\ud800" in error["message"]


def test_stop_strings_and_salt_must_be_unicode_offline_too():
    processor = Processor(object())  # any tokenizer: the checks come before it is used
    for kwargs, field in (({"params": SamplingParams(stop=["\ud800"])}, "SamplingParams.stop"),
                          ({"cache_salt": "\ud800"}, "cache_salt")):
        with pytest.raises(InvalidArgument) as raised:
            processor.make_request("r", [1, 2], **kwargs)
        assert raised.value.field == field


# ---- integers the coordinator's proto cannot hold ---------------------------------------------

@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, 10**30])
def test_priority_outside_int32_is_400(fakes, priority):
    for path, body in (("/v1/completions", {"prompt": [1, 2]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "hi"}]})):
        error = refused(post(fakes["bytes"], path, {**body, "priority": priority}))
        assert error["param"] == "priority"


@pytest.mark.parametrize("priority", [2**31 - 1, -(2**31)])
def test_priority_at_the_int32_bounds_is_served(fakes, priority):
    reply = post(fakes["bytes"], "/v1/completions", {"prompt": [1, 2], "priority": priority})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("min_tokens", [FAKE_MAX_MODEL_LEN + 1, 2**32, 10**20])
def test_min_tokens_past_the_context_is_400(fakes, min_tokens):
    for path, body in (("/v1/completions", {"prompt": [1, 2], "max_tokens": None}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "hi"}]})):
        error = refused(post(fakes["bytes"], path, {**body, "min_tokens": min_tokens}))
        assert error["param"] == "min_tokens" and str(FAKE_MAX_MODEL_LEN) in error["message"]
    limits = ModelLimits(259, FAKE_MAX_MODEL_LEN, 8)
    with pytest.raises(InvalidArgument) as raised:
        limits.check_params(SamplingParams(max_tokens=None, min_tokens=min_tokens))
    assert raised.value.field == "SamplingParams.min_tokens"


def test_min_tokens_up_to_the_context_is_served(fakes):
    reply = post(fakes["bytes"], "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "min_tokens": FAKE_MAX_MODEL_LEN})
    assert reply.status == 200, reply.body


# ---- found, not fixed here (the code is outside this task's files) ---------------------------

@pytest.mark.xfail(strict=True, reason="known bug in openai_server._field_of: an unknown "
                   "field named like a union tag ('str', 'int', 'float', 'bool'), holding "
                   "'[', or empty is dropped from the location, so the 400 has param null; "
                   "one with a '.' is cut there ('a.b' -> 'a'). Fix: param = problem['loc'][1]")
@pytest.mark.parametrize("key", ["str", "int", "float", "bool", "a.b", "x[0]"])
def test_an_unknown_field_is_named_exactly(fakes, key):
    error = refused(post(fakes["bytes"], "/v1/completions", {"prompt": [1, 2], key: 1}))
    assert error["param"] == key


@pytest.mark.xfail(strict=True, reason="known gap: the OpenAI app reads a body of any size "
                   "into memory (gRPC refuses messages over MAX_MESSAGE_BYTES); FastAPI's "
                   "max_body_size in openai_server.build_app would answer 413")
def test_a_body_over_the_message_limit_is_413(fakes):
    reply = post(fakes["bytes"], "/v1/completions", b"x" * (MAX_MESSAGE_BYTES + 1))
    assert reply.status == 413


@pytest.mark.xfail(strict=True, reason="known gap: Gateway.submit tokenizes text on the event "
                   "loop, so a long text prompt (up to 64 MiB over gRPC) stalls every other "
                   "call for its whole tokenization (the byte-level tokenizer on a 2-core "
                   "machine: 0.65 s for a million characters, 21 s for 8 million); a text "
                   "far longer than the context could be refused first, or tokenized off "
                   "the loop")
def test_a_long_text_prompt_does_not_stall_the_gateway(fakes):
    fake = fakes["bytes"]
    text = "a" * 800_000

    async def both() -> float:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def ticker():
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        reply = await asgi_call(fake.app, "POST", "/v1/completions",
                                json.dumps({"prompt": text}).encode())
        assert reply.status == 400  # far longer than the context
        await asyncio.sleep(0.03)
        tick.cancel()
        ticks.append(loop.time())
        assert time.monotonic() - started > 0.2, "too quick to tell"
        return max(b - a for a, b in zip(ticks, ticks[1:], strict=False))

    longest_gap = fake.run(both())
    fake.run(fake.settle())
    assert longest_gap < 0.1, f"the loop stalled for {longest_gap:.2f} s"
