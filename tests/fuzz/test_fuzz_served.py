"""End-to-end layer: the served system on 127.0.0.1 (one Server: the tiny byte-level model,
gRPC and OpenAI HTTP on free ports, a queue of 4 per replica) under random and hostile
clients.

- random GenerateRequests over real gRPC and random bodies over real HTTP (every request that
  could be valid stops within 4 tokens): INVALID_ARGUMENT / 400 naming the field, or a normal
  answer; raw garbage for a message (INVALID_ARGUMENT naming the message, at the gateway and
  at a coordinator) or a body;
- a text prompt of 4 million characters: health answers while it is tokenized;
- messages over the server's receive limit: RESOURCE_EXHAUSTED, and the next call is served;
- a stalled streaming client (GenerateStream, and server-sent events into a socket that is
  never read): the server stays responsive to everyone else, and once that client goes away
  its request's KV blocks are freed;
- a flood past max_queue_per_replica: RESOURCE_EXHAUSTED with retry-after-ms / 429 with
  Retry-After, health answering throughout, and everything admitted again after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import struct
import time
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given
from hypothesis import strategies as st

from pagedserve.cluster.grpc_common import MAX_MESSAGE_BYTES
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.fuzz import strategies as fz
from tests.fuzz.common import SERVED_NAME, VOCAB, fuzz_settings
from tests.fuzz.oracles import check_http_answer, check_proto_refusal
from tests.gateway.gateway_utils import (
    assert_back_to_idle,
    coordinator_requests,
    free_blocks,
    ids_request,
    started_server,
    wait_until,
)
from tests.gateway.openai_utils import hang_up, http_call, open_stream, read_events

pytestmark = pytest.mark.timeout(180)

MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 4
QUEUE = 4
LONG_TOKENS = 2000  # seconds of decoding: only its client going away ends it within a test
PROMPT = [5, 6, 7, 8]
RESPONSIVE_S = 5.0
"""How long any call may take while a stalled client or a flood is going on."""


@pytest.fixture(scope="module")
def served(aio, ray_cluster, default_model_path):
    config = EngineConfig(model=default_model_path, device="cpu", num_gpu_blocks_override=256,
                          max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                          cpu_threads=1)
    options = ServeOptions(host="127.0.0.1", port=0, http_port=0, max_queue_per_replica=QUEUE,
                           served_model_name=SERVED_NAME)
    with started_server(aio, config, options) as server:
        yield server


@pytest.fixture(scope="module")
def channel(aio, served):
    async def make():
        return grpc.aio.insecure_channel(served.address)

    made = aio.run(make())
    yield made
    aio.run(made.close())


@pytest.fixture
def idle_free(served) -> int:
    assert wait_until(lambda: coordinator_requests(served) == 0)
    return free_blocks(served)



async def to_the_end(call) -> None:
    """Await a unary call, or read a streaming one to its end; its error, if any, raises."""
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call

# ---- random requests and bodies --------------------------------------------------------------

@fuzz_settings(200)
@given(message=fz.generate_requests(SERVED_NAME, VOCAB, small=True),
       rpc=st.sampled_from(["Generate", "GenerateStream"]))
def test_random_generate_requests_over_grpc(aio, served, channel, message, rpc):
    stub = generation_pb2_grpc.GenerationStub(channel)

    async def call():
        try:
            if rpc == "Generate":
                return await stub.Generate(message, timeout=30), None
            return [m async for m in stub.GenerateStream(message, timeout=30)], None
        except grpc.aio.AioRpcError as error:
            return None, error

    answer, error = aio.run(call(), timeout=45)
    if error is not None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(),
                                                                  error.details())
        check_proto_refusal(message, error.details())
        event("refused")
        return
    beam = message.HasField("beam_search")
    expected = message.beam_search.beam_width if beam else (
        message.sampling.n if message.sampling.HasField("n") else 1)
    final = answer if rpc == "Generate" else answer[-1].final
    assert len(final.completions) == expected
    event("accepted")


@fuzz_settings(200)
@given(chat=st.booleans(), data=st.data())
def test_random_bodies_over_http(served, chat, data):
    body = data.draw(fz.http_bodies(SERVED_NAME, VOCAB, chat=chat, small=True,
                                    lean=data.draw(st.booleans())))
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = http_call(served, "POST", path, raw, {"Content-Type": "application/json"})
    events = None
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: "):] for line in reply.body.decode().split("\n")
                  if line.startswith("data: ")]
    event(check_http_answer(reply.status, reply.body, body, chat, SERVED_NAME, reply.headers,
                            events))


@fuzz_settings(60)
@given(raw=st.one_of(st.binary(max_size=200), st.builds(
    lambda good, cut: good[:cut],
    fz.generate_requests(SERVED_NAME, VOCAB, small=True).map(lambda m: m.SerializeToString()),
    st.integers(0, 50))))
def test_garbage_messages_over_grpc(aio, served, channel, raw):
    """Bytes that may not parse as a GenerateRequest (truncated messages, bad UTF-8 in a
    string, wrong wire types): refused, never a crash; the server answers the next call."""
    call = channel.unary_unary("/pagedserve.v1.Generation/Generate",
                               request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)

    async def send():
        try:
            await call(raw, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""

    code, details = aio.run(send(), timeout=40)
    try:
        message = pb.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 (what the server's deserializer meets)
        message = None
    event(code.name)
    if message is None:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "pagedserve.v1.GenerateRequest" in details, details
    elif code != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        check_proto_refusal(message, details)
    async def check():
        return await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=RESPONSIVE_S)

    assert aio.run(check()).status == health_pb2.HealthCheckResponse.SERVING


def test_unparseable_message_is_invalid_argument(aio, served, channel):
    call = channel.unary_unary("/pagedserve.v1.Generation/Generate",
                               request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
    stream = channel.unary_stream("/pagedserve.v1.Generation/GenerateStream",
                                  request_serializer=lambda b: b,
                                  response_deserializer=pb.GenerateStreamResponse.FromString)
    truncated = ids_request(PROMPT, max_tokens=2).SerializeToString()[:-1]

    async def send():
        answers = []
        for make in (lambda: call(truncated, timeout=30),
                     lambda: stream(truncated, timeout=30)):
            try:
                await to_the_end(make())
            except grpc.aio.AioRpcError as error:
                answers.append((error.code(), error.details()))
                continue
            answers.append((grpc.StatusCode.OK, ""))
        return answers

    for code, details in aio.run(send(), timeout=40):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith("the request does not parse as "
                                  "pagedserve.v1.GenerateRequest: "), details


def test_unparseable_message_to_a_coordinator_is_invalid_argument(aio, served, idle_free):
    """The coordinator's internal service parses first too: a truncated AddRequests is
    INVALID_ARGUMENT naming its message, and nothing is queued."""
    async def send():
        async with grpc.aio.insecure_channel(served.gateway.replicas[0].address) as internal:
            call = internal.unary_unary("/pagedserve.v1.Coordinator/AddRequests",
                                        request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
            good = cpb.AddRequestsRequest(subscriber="fuzz", requests=[
                cpb.CoreRequest(request_id="cut", prompt_token_ids=PROMPT)])
            try:
                await call(good.SerializeToString()[:-1], timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, ""

    code, details = aio.run(send(), timeout=40)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "pagedserve.v1.AddRequestsRequest" in details, details
    assert coordinator_requests(served) == 0
    assert free_blocks(served) == idle_free


@fuzz_settings(60)
@given(chat=st.booleans(), raw=fz.raw_bodies())
def test_garbage_bodies_over_http(served, chat, raw):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = http_call(served, "POST", path, raw, {"Content-Type": "application/json"})
    try:
        sent = json.loads(raw)
    except ValueError:
        sent = raw
    if isinstance(sent, dict) and reply.status == 200:
        return  # a valid body after all (none of raw_bodies' objects runs for long)
    check_http_answer(reply.status, reply.body, sent, chat, SERVED_NAME, reply.headers)


def test_the_server_is_idle_after_the_random_requests(served):
    assert wait_until(lambda: coordinator_requests(served) == 0, 20)


# ---- oversized messages ----------------------------------------------------------------------

def test_message_over_the_receive_limit_is_resource_exhausted(aio, served, channel, idle_free):
    stub = generation_pb2_grpc.GenerationStub(channel)
    huge_text = "a" * (MAX_MESSAGE_BYTES + 1)

    async def body():
        for call in (lambda: stub.GenerateStream(pb.GenerateRequest(text=huge_text),
                                                 timeout=60),
                     lambda: stub.Tokenize(pb.TokenizeRequest(text=huge_text), timeout=60)):
            try:
                await to_the_end(call())
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            else:
                raise AssertionError("an oversized message was taken")
            response = await stub.Generate(ids_request(PROMPT, max_tokens=2), timeout=30)
            assert len(response.completions[0].token_ids) == 2

    aio.run(body(), timeout=120)
    assert free_blocks(served) == idle_free


def test_large_prompts_under_the_limit_are_refused_by_field(aio, served, channel, idle_free):
    """A million token ids over gRPC, and 4 MB of them over HTTP: INVALID_ARGUMENT / 400
    naming the prompt, within seconds; then normal calls are served."""
    stub = generation_pb2_grpc.GenerationStub(channel)

    async def grpc_side():
        started = time.monotonic()
        try:
            await stub.Generate(ids_request([7] * 1_000_000, max_tokens=1), timeout=60)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            assert "prompt" in error.details()
        else:
            raise AssertionError("a million-token prompt was taken")
        assert time.monotonic() - started < 15

    aio.run(grpc_side(), timeout=60)
    started = time.monotonic()
    reply = http_call(served, "POST", "/v1/completions",
                      {"prompt": [7] * 2_000_000, "max_tokens": 1})
    assert reply.status == 400 and reply.json()["error"]["param"] == "prompt", reply.body[:300]
    assert time.monotonic() - started < 30
    ok = http_call(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert free_blocks(served) == idle_free


# ---- stalled streaming clients ---------------------------------------------------------------

def _long_request() -> pb.GenerateRequest:
    # logprobs: 20 alternatives per token make each delta a few hundred bytes.
    return ids_request(PROMPT, temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True,
                       logprobs=20)


async def _others_are_served(served, channel) -> None:
    """Another client's unary and streamed generation, load, gRPC and HTTP health: each
    answered within RESPONSIVE_S."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    response = await stub.Generate(ids_request(PROMPT, max_tokens=3), timeout=RESPONSIVE_S)
    assert len(response.completions[0].token_ids) == 3
    messages = [m async for m in stub.GenerateStream(ids_request(PROMPT, max_tokens=3),
                                                     timeout=RESPONSIVE_S)]
    assert messages[-1].WhichOneof("event") == "final"
    await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=RESPONSIVE_S)
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RESPONSIVE_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    reply = await asyncio.to_thread(http_call, served, "GET", "/health")
    assert reply.status == 200 and time.monotonic() - started < RESPONSIVE_S


def test_stalled_grpc_stream_client(aio, served, idle_free):
    """A GenerateStream client that reads one message and then nothing: the others are
    served meanwhile; once it goes away (its channel closed, never cancelled) its blocks are
    freed."""
    async def body():
        stalled_channel = grpc.aio.insecure_channel(served.address)
        stalled = generation_pb2_grpc.GenerationStub(stalled_channel).GenerateStream(
            _long_request(), timeout=120)
        first = await stalled.read()
        assert first.WhichOneof("event") == "delta"
        async with grpc.aio.insecure_channel(served.address) as other:
            for _ in range(3):  # the stalled stream keeps its slot and blocks all along
                await _others_are_served(served, other)
                assert await served.coordinators[0].free_blocks.remote() < idle_free
                await asyncio.sleep(0.3)
        await stalled_channel.close()  # the client goes away without a word

    aio.run(body(), timeout=120)
    assert_back_to_idle(served, idle_free, timeout=30)


def _stalled_sse_socket(served, path: str, body: dict) -> socket.socket:
    """A raw connection that sends one streaming POST and never reads: a tiny receive buffer,
    so that the server's writes back up at once."""
    url = urlsplit(served.http_address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((url.hostname, url.port))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                 + payload)
    return sock


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stalled_sse_client(path, aio, served, idle_free):
    """Server-sent events into a socket that is never read: the server's writes back up
    (the request keeps running at most as fast as the client reads, holding its blocks),
    everyone else is served, and when the client resets the connection its blocks are
    freed."""
    body = {"max_tokens": LONG_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "logprobs": True if "chat" in path else 5}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
        body["top_logprobs"] = 5
    else:
        body["prompt"] = PROMPT
    sock = _stalled_sse_socket(served, path, body)
    try:
        assert wait_until(lambda: free_blocks(served) < idle_free), "it never started"

        async def others():
            async with grpc.aio.insecure_channel(served.address) as channel:
                for _ in range(3):
                    await _others_are_served(served, channel)
                    reply = await asyncio.to_thread(
                        http_call, served, "POST", "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": 2})
                    assert reply.status == 200, reply.body
                    await asyncio.sleep(0.3)

        aio.run(others(), timeout=60)
        assert free_blocks(served) < idle_free, "the stalled stream let go of its blocks"
    finally:
        # Reset, as a client that crashes does (SO_LINGER 0: RST instead of FIN).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert_back_to_idle(served, idle_free, timeout=30)


def test_slow_sse_reader_gets_everything(served, idle_free):
    """A client that reads slowly still gets every token, then [DONE]."""
    connection, response = open_stream(served, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "return_token_ids": True})
    try:
        assert response.status == 200
        tokens, events = 0, []
        while not events or events[-1] != "[DONE]":
            events += read_events(response, 1)
            if events[-1] != "[DONE]":
                tokens += sum(len(c.get("token_ids") or []) for c in
                              json.loads(events[-1])["choices"])
            time.sleep(0.05)
        assert tokens == 24
    finally:
        hang_up(connection)
    assert_back_to_idle(served, idle_free)


# ---- a flood past the queue ------------------------------------------------------------------

def test_flood_past_the_queue(aio, served, idle_free):
    """QUEUE long streams fill the replica; 40 gRPC calls and 40 HTTP requests at once are all
    refused with a retry hint while health, load and the running streams carry on; once the
    long ones go, requests are admitted again."""
    http_flood = 40
    grpc_flood = 40

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            running = [stub.GenerateStream(ids_request(PROMPT, temperature=0.0,
                                                       max_tokens=LONG_TOKENS, ignore_eos=True),
                                           timeout=120) for _ in range(QUEUE)]
            for call in running:
                assert (await call.read()).WhichOneof("event") == "delta"

            async def refused_call(i: int):
                call = stub.Generate(ids_request(PROMPT, max_tokens=2), timeout=30) if i % 2 \
                    else stub.GenerateStream(ids_request(PROMPT, max_tokens=2), timeout=30)
                try:
                    if i % 2:
                        await call
                    else:
                        async for _ in call:
                            pass
                except grpc.aio.AioRpcError as error:
                    return error
                return None

            async def health_during(flood: asyncio.Future) -> list[float]:
                latencies = []
                while not flood.done() or len(latencies) < 5:
                    started = time.monotonic()
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""),
                                                timeout=RESPONSIVE_S)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                    reply = await asyncio.to_thread(http_call, served, "GET", "/health")
                    assert reply.status == 200
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.02)
                return latencies

            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(16)
            http_replies = [loop.run_in_executor(pool, http_call, served, "POST",
                                                 "/v1/completions",
                                                 {"prompt": PROMPT, "max_tokens": 2})
                            for _ in range(http_flood)]
            flood = asyncio.gather(*(refused_call(i) for i in range(grpc_flood)),
                                   *http_replies)
            latencies = await health_during(flood)
            results = await flood
            pool.shutdown()
            for error in results[:grpc_flood]:
                assert error is not None, "a call past the queue was admitted"
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                trailing = dict(error.trailing_metadata() or ())
                assert int(trailing["retry-after-ms"]) > 0, trailing
            for reply in results[grpc_flood:]:
                assert reply.status == 429, (reply.status, reply.body)
                assert reply.headers["retry-after"] and int(reply.headers["retry-after-ms"]) > 0
                assert reply.json()["error"]["code"] == 429
            assert max(latencies) < RESPONSIVE_S, latencies
            load = await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=RESPONSIVE_S)
            assert load.gateway_in_flight == QUEUE  # the refused ones took no slot
            for call in running:  # the running ones were not disturbed
                assert (await call.read()).WhichOneof("event") == "delta"
                call.cancel()

    aio.run(body(), timeout=150)
    assert_back_to_idle(served, idle_free, timeout=30)
    after = http_call(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert after.status == 200


# ---- a huge text prompt ----------------------------------------------------------------------

def test_health_is_answered_while_a_huge_prompt_is_tokenized(aio, served, channel):
    """Tokenize of 4 million characters (2-8 seconds of encoding) runs off the gateway's loop:
    gRPC health and HTTP /health answer within half a second all along. (The round that meets
    the reply waits for its 4 million ids to be serialized, sent and parsed on this shared
    loop: 0.30-0.33 s on an AVX2 CI-class machine; an encoding on the loop would hold it for
    seconds.)"""
    health_s = 0.5
    text = "a" * 4_000_000

    async def body():
        tokenize = asyncio.ensure_future(generation_pb2_grpc.GenerationStub(channel).Tokenize(
            pb.TokenizeRequest(text=text), timeout=60))
        health = health_pb2_grpc.HealthStub(channel)
        slowest = 0.0
        answered = 0
        while not tokenize.done():
            started = time.monotonic()
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            http = await asyncio.to_thread(http_call, served, "GET", "/health")
            assert http.status == 200
            slowest = max(slowest, time.monotonic() - started)
            answered += 1
            await asyncio.sleep(0.02)
        return len((await tokenize).token_ids), answered, slowest

    count, answered, slowest = aio.run(body(), timeout=90)
    assert count == 4_000_000
    assert answered >= 3, "too quick to tell"
    assert slowest < health_s, f"a health check took {slowest:.2f} s"
