"""The gateway in this process, with no engine behind it: the fuzz tests' fast layer.

`FakeGateway` is a real `Gateway` (started by its own `start`) whose replicas are
`FakeReplica`s: AddRequests is taken at once and answered on the next loop turn with one token
per sequence (finish reason 'length'; logprobs when asked; the beams of a beam search), so
every gRPC handler and every HTTP route runs its whole path, admission to response, in
microseconds. What the gateway sent is kept, so a test can check that the coordinator would
take it too (`assert_coordinator_accepts`).

`FakeContext` stands in for grpc.aio's servicer context (`abort` raises `CallAborted` with the
status and details, as grpc.aio raises AbortError), and `asgi_call` drives the FastAPI app of
`openai_server.build_app` without a socket (an exception the app lets out is raised here).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from pagedserve.cluster import wire
from pagedserve.cluster.gateway import Gateway
from pagedserve.engine.limits import ModelLimits
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.sampling_params import BeamSearchParams

FAKE_TOKEN = 70  # a printable byte of the byte-level tokenizer; inside every fake vocabulary


class FakeReplica:
    """What `Gateway` uses of a `ReplicaClient`, answering every request at once."""

    def __init__(self, gateway: Gateway, info: pb.ModelInfo, label: str = "0") -> None:
        self.gateway = gateway
        self.model_info = info
        self.address = f"fake-replica-{label}"
        self.label = label
        self.up = False
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.draining = False
        self.stats = cpb.EngineSnapshot()
        self.gpus: list[pb.GpuStats] = []
        self.added: list[cpb.CoreRequest] = []
        self.aborted: list[str] = []
        self.answer = True
        """False: requests are taken and never answered (a test then closes them)."""

    async def start(self, timeout_s: float = 30.0) -> None:
        self.up = True

    def release(self, tokens: int) -> None:
        self.in_flight -= 1
        self.in_flight_tokens -= tokens

    async def close(self) -> None:
        self.up = False

    async def refresh_gpus(self, timeout_s: float = 10.0) -> None:
        return None

    async def load(self) -> pb.ServerLoad:
        return pb.ServerLoad(kv_blocks_total=64)

    async def add(self, requests: list[cpb.CoreRequest], timeout_s: float = 30.0) -> None:
        # What the channel would send; a message that cannot be serialized fails here.
        cpb.AddRequestsRequest(subscriber="fake", requests=requests).SerializeToString()
        self.added.extend(requests)
        if self.answer:
            asyncio.get_running_loop().call_soon(self._answer, list(requests))

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    def _answer(self, requests: list[cpb.CoreRequest]) -> None:
        batch = cpb.StepBatch(step_time=0.0, stats=self.stats)
        for request in requests:
            if request.HasField("beam_search"):
                beam = cpb.BeamSequence(token_ids=[FAKE_TOKEN], cumulative_logprob=-1.0,
                                        score=-1.0)
                batch.beam_results.append(cpb.BeamResult(
                    request_id=request.request_id,
                    sequences=[beam] * request.beam_search.beam_width))
                continue
            sampling = request.sampling
            n = sampling.n if sampling.HasField("n") else 1
            logprobs = []
            if sampling.HasField("logprobs"):
                top = [pb.TopLogprob(token_id=t, logprob=-1.0 - t)
                       for t in range(sampling.logprobs)]
                logprobs = [pb.TokenLogprob(token_id=FAKE_TOKEN, logprob=-0.5, rank=1, top=top)]
            for index in range(n):
                batch.updates.append(cpb.SequenceUpdate(
                    request_id=request.request_id, index=index, new_token_ids=[FAKE_TOKEN],
                    logprobs=logprobs, finish_reason=pb.FINISH_REASON_LENGTH))
        self.gateway._on_batch(self, batch)


class FakeGateway:
    """A started `Gateway` over one `FakeReplica`, on a loop of its own (`run`)."""

    def __init__(self, name: str, tokenizer: Any, vocab_size: int, max_model_len: int,
                 max_num_seqs: int, max_queue_per_replica: int = 64) -> None:
        self.loop = asyncio.new_event_loop()
        self.gateway = Gateway(name, tokenizer, [], max_queue_per_replica)
        info = pb.ModelInfo(model=name, max_model_len=max_model_len, vocab_size=vocab_size,
                            eos_token_ids=[2], tensor_parallel_size=1, block_size=16,
                            num_kv_blocks=64, dtype="float32", max_num_seqs=max_num_seqs)
        self.replica = FakeReplica(self.gateway, info)
        self.gateway.replicas = [self.replica]
        self.run(self.gateway.start())
        self.limits = ModelLimits(vocab_size, max_model_len, max_num_seqs)
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from pagedserve.cluster.openai_server import build_app

            self._app = build_app(self.gateway, [])
        return self._app

    def run(self, coro, timeout: float = 20.0) -> Any:
        """The coroutine's result (a case that takes longer than `timeout` is a hang)."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def settle(self) -> None:
        """Let the answers, aborts and other background work of the last case finish."""
        for _ in range(3):
            await asyncio.sleep(0)
        await asyncio.gather(*list(self.gateway._background), return_exceptions=True)

    def assert_idle(self) -> None:
        """Nothing of any earlier case is left at the gateway."""
        gateway = self.gateway
        assert self.replica.in_flight == 0, f"{self.replica.in_flight} requests in flight"
        assert not gateway._queues, f"queues left: {list(gateway._queues)[:3]}"
        assert not gateway._owner, f"owners left: {list(gateway._owner)[:3]}"
        assert not gateway.outputs.has_unfinished_requests(), "output state left"

    def close(self) -> None:
        self.run(self.gateway.close())
        self.loop.close()


def assert_coordinator_accepts(sent: cpb.CoreRequest, limits: ModelLimits) -> None:
    """What the gateway admitted is what the coordinator will take: the message parses back
    (`wire.core_request_from_proto`, the coordinator's own step) into parameters equal to
    what was sent, inside the model's limits."""
    request = wire.core_request_from_proto(sent)
    limits.check_prompt(request.prompt_token_ids)
    limits.check_params(request.params)
    again = wire.core_request_to_proto(request)
    if isinstance(request.params, BeamSearchParams):
        assert again.beam_search == sent.beam_search
    else:
        assert again.sampling == sent.sampling
    assert list(again.prompt_token_ids) == list(sent.prompt_token_ids)


# ---- gRPC handlers in process ----------------------------------------------------------------

class CallAborted(Exception):
    """What `FakeContext.abort` raises (grpc.aio raises AbortError there)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    def __init__(self) -> None:
        self.trailing_metadata: tuple = ()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise CallAborted(code, details)


async def call_unary(handler, request) -> tuple[Any, CallAborted | None]:
    """(response, None) or (None, the abort) of one unary handler."""
    try:
        return await handler(request, FakeContext()), None
    except CallAborted as aborted:
        return None, aborted


async def call_stream(handler, request, read: int | None = None
                      ) -> tuple[list[Any], CallAborted | None]:
    """(the messages, None or the abort) of one server-streaming handler; with `read`, only
    that many are read before the client goes away (the generator is closed, as grpc.aio
    cancels it)."""
    messages: list[Any] = []
    stream: AsyncIterator = handler(request, FakeContext())
    try:
        async for message in stream:
            messages.append(message)
            if read is not None and len(messages) >= read:
                break
    except CallAborted as aborted:
        return messages, aborted
    finally:
        await stream.aclose()
    return messages, None


# ---- the HTTP app in process -----------------------------------------------------------------

@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
    events: list[str] = field(default_factory=list)
    """Server-sent events' data (a streamed answer)."""

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_call(app, method: str, path: str, body: bytes = b"",
                    content_type: str | None = "application/json") -> HttpReply:
    """One request through the ASGI app, as uvicorn would make it; the client stays until the
    answer is complete."""
    delivered = False
    client_stays = asyncio.Event()

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await client_stays.wait()  # never set: no disconnect
        return {"type": "http.disconnect"}

    start: dict = {}
    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    headers = [(b"host", b"fuzz"), (b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 8000), "state": {}}
    await app(scope, receive, send)
    assert start, "the app sent no response"
    reply = HttpReply(start["status"], {k.decode().lower(): v.decode()
                                        for k, v in start.get("headers", [])}, b"".join(chunks))
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        reply.events = [line[len("data: "):] for line in reply.body.decode().split("\n")
                        if line.startswith("data: ")]
    return reply
