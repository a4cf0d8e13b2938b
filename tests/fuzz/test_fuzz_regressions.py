"""The bugs the fuzz tests found, one assertion each (in process, over inprocess.FakeGateway).

- a refusal without `field` (no tokenizer for a text prompt, stop strings without a
  tokenizer, the GenerateRequest checks): an HTTP 400 with `param: null`;
- lone surrogates ("\\ud800", which JSON can carry) in `stop`, `cache_salt`, a chat message,
  or quoted by an error message (an unknown `model`): a 500 (UnicodeEncodeError or the
  tokenizer's TypeError) instead of the 400 / 404;
- `priority` outside int32 over HTTP, and `min_tokens` past uint32 with no max_tokens: a 500
  (ValueError setting the coordinator's proto field) instead of a 400;
- an unknown field named like a union member ('str', 'int', ...), holding '[' or a '.': named
  wrongly or not at all in the 400's `param`;
- a body of any size read into memory: now 413 over `max_body_bytes` (gRPC's message limit by
  default), by its Content-Length or as the chunks arrive;
- a long text prompt tokenized on the gateway's event loop, stalling every other call for the
  whole encoding: now on a small thread pool (`prompt_tokenizer.PromptTokenizer`).
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
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


# ---- an unknown field is named as sent -------------------------------------------------------

@pytest.mark.parametrize("key", ["str", "int", "float", "bool", "a.b", "x[0]"])
def test_an_unknown_field_is_named_exactly(fakes, key):
    error = refused(post(fakes["bytes"], "/v1/completions", {"prompt": [1, 2], key: 1}))
    assert error["param"] == key
    assert error["message"].startswith(f"invalid request: {key}: Extra inputs")


def test_a_union_member_below_the_field_is_left_out_of_its_name(fakes):
    error = refused(post(fakes["bytes"], "/v1/completions", {"prompt": [1, "x"]}))
    assert error["param"] == "prompt"
    assert "prompt.1: " in error["message"] and "list[int]" not in error["message"]


# ---- the HTTP body limit ------------------------------------------------------------------------

async def chunked_call(app, path: str, chunks: list[bytes]):
    """A POST whose body comes in `chunks` with no Content-Length (chunked encoding); the
    reply, and how many chunks the app read."""
    read = 0
    sent: dict = {"body": []}

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1],
                    "more_body": read < len(chunks)}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        else:
            sent["body"].append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 8000), "state": {},
             "headers": [(b"host", b"fuzz"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")]}
    await app(scope, receive, send)
    return sent["status"], json.loads(b"".join(sent["body"])), read


def test_a_body_over_the_message_limit_is_413(fakes):
    error = refused(post(fakes["bytes"], "/v1/completions", b"x" * (MAX_MESSAGE_BYTES + 1)),
                    413)
    assert error == {"message": f"the request body is over {MAX_MESSAGE_BYTES} bytes (the "
                                "server's max_body_bytes); send a shorter prompt",
                     "type": "request_entity_too_large", "param": None, "code": 413}


def test_the_body_limit_is_configurable_and_counts_chunked_bodies(fakes):
    from pagedserve.cluster.openai_server import build_app

    fake = fakes["bytes"]
    body = json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode()
    app = build_app(fake.gateway, [], max_body_bytes=len(body))
    assert fake.run(asgi_call(app, "POST", "/v1/completions", body)).status == 200
    fake.run(fake.settle())
    padded = body[:-1] + b" }"  # one byte over
    assert fake.run(asgi_call(app, "POST", "/v1/completions", padded)).status == 413
    status, reply, read = fake.run(chunked_call(app, "/v1/completions",
                                                [padded[:10], padded[10:], b"never read"]))
    assert status == 413 and reply["error"]["code"] == 413
    assert read == 2, "the body is refused as soon as it passes the limit"
    status, _, _ = fake.run(chunked_call(app, "/v1/completions", [body[:10], body[10:]]))
    assert status == 200
    fake.run(fake.settle())
    fake.assert_idle()
    with pytest.raises(InvalidArgument, match="max_body_bytes must be an integer >= 1"):
        build_app(fake.gateway, [], max_body_bytes=0)


def test_a_long_text_prompt_does_not_stall_the_gateway(fakes):
    fake = fakes["bytes"]
    text = "a" * 800_000

    async def both() -> float:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []
        # A first request imports and builds what the HTTP front makes lazily: not a stall of
        # the loop under load, and not what this test measures.
        await asgi_call(fake.app, "POST", "/v1/completions", json.dumps({"prompt": "b"}).encode())

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


def test_the_body_limit_over_a_real_socket(fakes):
    """uvicorn on 127.0.0.1: a body over the limit is 413 however it is sent (50 MB refused by
    its Content-Length, a chunked one as it arrives), and the next body is served."""
    import http.client

    from pagedserve.cluster.openai_server import OpenAIHttpServer

    fake = fakes["none"]
    good = json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode()

    def send(port: int, body: bytes, chunked: bool) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            payload = iter([body[:500], body[500:]]) if chunked else body
            connection.request("POST", "/v1/completions", payload,
                               {"Content-Type": "application/json"}, encode_chunked=chunked)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    async def calls():
        server = OpenAIHttpServer(fake.gateway, [], "127.0.0.1", 0, max_body_bytes=1000)
        port = int((await server.start()).rsplit(":", 1)[1])
        try:
            return [await asyncio.to_thread(send, port, body, chunked)
                    for body, chunked in ((b"x" * 50_000_000, False), (b"x" * 5000, True),
                                          (good, False))]
        finally:
            await server.stop(1.0)

    (big, big_body), (chunked, chunked_body), (ok, _) = fake.run(calls(), timeout=60)
    fake.run(fake.settle())
    assert (big, chunked, ok) == (413, 413, 200)
    assert big_body["error"]["code"] == chunked_body["error"]["code"] == 413
    assert big_body["error"]["message"].startswith("the request body is over 1000 bytes")


def test_server_load_skips_a_replica_lost_since_it_was_seen_up():
    # Found by the chaos soak: a coordinator killed between two reads of its state made
    # GetServerLoad fail (UNKNOWN) for the whole gateway instead of counting the others.
    from tests.fuzz.inprocess import FakeGateway, FakeReplica

    fake = FakeGateway("m", None, 256, 512, 8)
    try:
        lost = FakeReplica(fake.gateway, fake.replica.model_info, label="1")

        async def unreachable():
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), details="connection refused")

        lost.up = True
        lost.load = unreachable
        fake.gateway.replicas = [fake.replica, lost]
        load = fake.run(fake.gateway.GetServerLoad(pb.GetServerLoadRequest(), None))
        assert (load.num_replicas_up, load.kv_blocks_total) == (1, 64)
        assert load.gateway_queue_limit == 2 * fake.gateway.max_queue_per_replica
    finally:
        fake.close()


def _refusing(replica, code=grpc.StatusCode.UNAVAILABLE):
    async def add(requests, timeout_s=30.0):
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="this replica takes no new requests")
    replica.add = add
    return replica


def test_a_replica_refusing_with_unavailable_sends_the_request_to_another():
    # A fleet's scale-down makes a coordinator refuse new requests before every gateway's
    # discovery has seen it go: the gateway tries the next replica instead of failing.
    from tests.fuzz.inprocess import FakeGateway, FakeReplica

    fake = FakeGateway("m", None, 256, 512, 8)
    try:
        refusing = [_refusing(FakeReplica(fake.gateway, fake.replica.model_info, label=label))
                    for label in ("1", "2")]
        for replica in refusing:
            replica.up = True
        fake.gateway.replicas = [*refusing, fake.replica]
        for index in range(4):
            reply = post(fake, "/v1/completions",
                         {"model": "m", "prompt": [5 + index, 6, 7], "max_tokens": 1})
            assert reply.status == 200, reply.body[:300]
        assert len(fake.replica.added) == 4
        assert [replica.in_flight for replica in refusing] == [0, 0]

        fake.gateway.replicas = refusing
        error = refused(post(fake, "/v1/completions",
                             {"model": "m", "prompt": [5, 6, 7], "max_tokens": 1}), 503)
        assert "takes no new requests" in error["message"]
    finally:
        fake.close()


def test_a_replica_refusing_with_another_status_is_not_retried_elsewhere():
    from tests.fuzz.inprocess import FakeGateway, FakeReplica

    fake = FakeGateway("m", None, 256, 512, 8)
    try:
        bad = _refusing(FakeReplica(fake.gateway, fake.replica.model_info, label="1"),
                        grpc.StatusCode.INVALID_ARGUMENT)
        bad.up = True
        fake.gateway.replicas = [bad]
        error = refused(post(fake, "/v1/completions",
                             {"model": "m", "prompt": [5, 6, 7], "max_tokens": 1}), 400)
        assert "takes no new requests" in error["message"]
        assert fake.replica.added == []
    finally:
        fake.close()
