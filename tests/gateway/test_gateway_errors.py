"""The served system's edges over raw gRPC: cancellation, deadlines and Abort free KV blocks;
every bad input gets its status code and names its field; health and server reflection; no
authentication when no token is configured.

One Server on the tiny random Llama (token-id prompts only: it has no tokenizer), with a
2048-token context so that a 2,000-token request runs far longer than any bound here: an abort
is then told apart from a request that merely finished.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import (
    assert_back_to_idle,
    coordinator_requests,
    free_blocks,
    ids_request,
    rpc_error,
    started_server,
    stream_error,
)

pytestmark = pytest.mark.timeout(90)

MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 8
LONG_TOKENS = 2000  # thousands of steps: only an abort ends it within the bounds below
PROMPT = [5, 6, 7, 8]
SERVICE = "pagedserve.v1.Generation"


def tiny_config(path: str) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", num_gpu_blocks_override=256,
                        max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, cpu_threads=1)


@pytest.fixture(scope="module")
def served(aio, ray_cluster, tiny_checkpoint):
    with started_server(aio, tiny_config(tiny_checkpoint)) as server:
        yield server


@pytest.fixture
def idle_free(served) -> int:
    """Free blocks with nothing in flight (checked again after the test)."""
    assert coordinator_requests(served) == 0
    return free_blocks(served)


def steps(server) -> int:
    import ray

    return sum(ray.get(h.health.remote(), timeout=30)["num_steps"] for h in server.coordinators)


def long_request(request_id: str = "") -> pb.GenerateRequest:
    request = ids_request(PROMPT, temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True)
    request.request_id = request_id
    return request


async def gateway_in_flight(stub) -> int:
    return (await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=10)).gateway_in_flight


# ---- cancellation, deadlines, Abort -----------------------------------------------------------

CANCELLED_KINDS = {
    # kind: (request, its max_tokens: the steps it would need to finish, deltas to read first)
    "stream": (long_request(), LONG_TOKENS, 2),
    "stream-n2-seeded": (ids_request(PROMPT, temperature=0.8, seed=3, n=2, max_tokens=1500,
                                     ignore_eos=True), 1500, 2),
    "stream-beam-search": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                                              beam_search=pb.BeamSearchParams(
                                                  beam_width=2, max_tokens=600,
                                                  ignore_eos=True)), 600, 0),
    "unary": (long_request(), LONG_TOKENS, 0),
}


async def _until_blocks_held(server, idle_free: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await server.coordinators[0].free_blocks.remote() >= idle_free:
        assert asyncio.get_running_loop().time() < deadline, "the request never held a block"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", list(CANCELLED_KINDS))
def test_cancelled_call_frees_its_blocks(kind, aio, served, idle_free):
    request, needed_steps, deltas = CANCELLED_KINDS[kind]
    steps_before = steps(served)

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            if kind == "unary":
                call = stub.Generate(request, timeout=60)
            else:
                call = stub.GenerateStream(request, timeout=60)
            for _ in range(deltas):
                message = await call.read()
                assert message.WhichOneof("event") == "delta"
                assert len(message.delta.token_ids) >= 1
            await _until_blocks_held(served, idle_free)
            assert call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED

    aio.run(body(), timeout=60)
    assert_back_to_idle(served, idle_free)
    assert steps(served) - steps_before < needed_steps, "the request ran on after the cancel"


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_deadline_exceeded_frees_its_blocks(rpc, aio, served, idle_free):
    steps_before = steps(served)

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            if rpc == "Generate":
                error = await rpc_error(stub.Generate(long_request(), timeout=0.05))
            else:
                error = await stream_error(stub.GenerateStream(long_request(), timeout=0.05))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error

    aio.run(body(), timeout=60)
    assert_back_to_idle(served, idle_free)
    assert steps(served) - steps_before < LONG_TOKENS, "the request ran on past its deadline"


def test_abort_rpc_ends_a_stream_from_another_connection(aio, served, idle_free):
    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel, \
                grpc.aio.insecure_channel(served.address) as other:
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.GenerateStream(long_request("abort-me"), timeout=60)
            first = await call.read()
            assert first.WhichOneof("event") == "delta"
            response = await generation_pb2_grpc.GenerationStub(other).Abort(
                pb.AbortRequest(request_ids=["abort-me", "no-such-request"]), timeout=10)
            assert list(response.aborted_request_ids) == ["abort-me"]
            finals = []
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("event") == "final":
                    finals.append(message)
            assert await call.code() == grpc.StatusCode.OK
            assert len(finals) == 1
            assert [c.finish_reason for c in finals[0].final.completions] == [
                pb.FINISH_REASON_ABORT]
            assert await gateway_in_flight(stub) == 0

    aio.run(body(), timeout=60)
    assert_back_to_idle(served, idle_free)


@pytest.mark.parametrize("kind", ["sampling-n2", "beam-search"])
def test_abort_rpc_ends_a_unary_call(kind, aio, served, idle_free):
    """A sampled request's Generate returns its completions with finish_reason ABORT; a beam
    search (no per-sequence state at the gateway) ends its call CANCELLED."""
    if kind == "beam-search":
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                                     beam_search=pb.BeamSearchParams(beam_width=2,
                                                                     max_tokens=600,
                                                                     ignore_eos=True))
    else:
        request = ids_request(PROMPT, temperature=0.8, seed=1, n=2, max_tokens=1500,
                              ignore_eos=True)
    request.request_id = f"abort-unary-{kind}"

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.Generate(request, timeout=60)
            await _until_blocks_held(served, idle_free)
            response = await stub.Abort(pb.AbortRequest(request_ids=[request.request_id]),
                                        timeout=10)
            assert list(response.aborted_request_ids) == [request.request_id]
            if kind == "beam-search":
                error = await rpc_error(call)
                assert error.code() == grpc.StatusCode.CANCELLED, error
            else:
                result = await call
                assert [c.finish_reason for c in result.completions] == [
                    pb.FINISH_REASON_ABORT] * 2
                assert all(len(c.token_ids) < 1500 for c in result.completions)
            assert await gateway_in_flight(stub) == 0

    aio.run(body(), timeout=60)
    assert_back_to_idle(served, idle_free)


# ---- bad inputs: status code, and the field named ---------------------------------------------

def _with(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields)


BAD_INPUTS = {
    "no-prompt": (_with(), "prompt"),
    "empty-text": (_with(text=""), "prompt"),
    "empty-token-ids": (_with(token_ids=pb.TokenIds(ids=[])), "prompt"),
    "out-of-vocab-token": (ids_request([5, 9999]), "prompt_token_ids"),
    "prompt-fills-context": (ids_request([5] * MAX_MODEL_LEN), "prompt"),
    "prompt-plus-max-tokens-over-context": (ids_request([5] * 48, max_tokens=2001),
                                            "max_tokens"),
    "max-tokens-zero": (ids_request(PROMPT, max_tokens=0), "max_tokens"),
    "top-p-2": (ids_request(PROMPT, top_p=2.0), "top_p"),
    "temperature-negative": (ids_request(PROMPT, temperature=-1.0), "temperature"),
    "n-over-max-num-seqs": (ids_request(PROMPT, n=MAX_NUM_SEQS + 1), "n"),
    "stop-token-out-of-vocab": (ids_request(PROMPT, stop_token_ids=[100000]),
                                "stop_token_ids"),
    "beam-width-0": (_with(token_ids=pb.TokenIds(ids=PROMPT),
                           beam_search=pb.BeamSearchParams(beam_width=0, max_tokens=4)),
                     "beam_width"),
    "beam-width-over-max-num-seqs": (_with(token_ids=pb.TokenIds(ids=PROMPT),
                                           beam_search=pb.BeamSearchParams(
                                               beam_width=MAX_NUM_SEQS + 1, max_tokens=4)),
                                     "beam_width"),
    "sampling-and-beam-search": (_with(token_ids=pb.TokenIds(ids=PROMPT),
                                       sampling=pb.SamplingParams(max_tokens=4),
                                       beam_search=pb.BeamSearchParams(beam_width=2,
                                                                       max_tokens=4)),
                                 "beam_search"),
    "unknown-model": (_with(model="no-such-model", token_ids=pb.TokenIds(ids=PROMPT)),
                      "model"),
    "request-id-with-slash": (_with(request_id="a/b", token_ids=pb.TokenIds(ids=PROMPT)),
                              "request_id"),
    "text-without-tokenizer": (_with(text="hello"), "text"),
}


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_naming_its_field(case, rpc, aio, served, idle_free):
    request, field_name = BAD_INPUTS[case]

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            if rpc == "Generate":
                error = await rpc_error(stub.Generate(request, timeout=20))
            else:
                error = await stream_error(stub.GenerateStream(request, timeout=20))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(),
                                                                      error.details())
            assert field_name in error.details(), error.details()
            assert await gateway_in_flight(stub) == 0

    aio.run(body(), timeout=30)
    assert free_blocks(served) == idle_free
    assert coordinator_requests(served) == 0


def test_sampling_and_beam_search_names_both(aio, served):
    request, _ = BAD_INPUTS["sampling-and-beam-search"]

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            error = await rpc_error(generation_pb2_grpc.GenerationStub(channel).Generate(
                request, timeout=20))
            assert "sampling" in error.details() and "beam_search" in error.details()

    aio.run(body(), timeout=30)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_duplicate_request_id_in_flight_is_already_exists(rpc, aio, served, idle_free):
    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            first = stub.GenerateStream(long_request("twice"), timeout=60)
            assert (await first.read()).WhichOneof("event") == "delta"
            again = long_request("twice")
            if rpc == "Generate":
                error = await rpc_error(stub.Generate(again, timeout=20))
            else:
                error = await stream_error(stub.GenerateStream(again, timeout=20))
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
            assert "twice" in error.details()
            # The refused duplicate left the first one running.
            assert (await first.read()).WhichOneof("event") == "delta"
            first.cancel()

    aio.run(body(), timeout=60)
    assert_back_to_idle(served, idle_free)

    async def reuse():  # once the first is gone, its id is free again
        async with grpc.aio.insecure_channel(served.address) as channel:
            request = ids_request(PROMPT, temperature=0.0, max_tokens=3)
            request.request_id = "twice"
            response = await generation_pb2_grpc.GenerationStub(channel).Generate(
                request, timeout=30)
            assert response.request_id == "twice"
            assert len(response.completions[0].token_ids) == 3

    aio.run(reuse(), timeout=40)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_message_over_the_size_limit_is_resource_exhausted(rpc, aio, served, idle_free):
    """grpc's own check (max_receive_message_length, 64 MiB): RESOURCE_EXHAUSTED."""
    from pagedserve.cluster.grpc_common import MAX_MESSAGE_BYTES

    request = pb.GenerateRequest(text="a" * (MAX_MESSAGE_BYTES + 16))

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            if rpc == "Generate":
                error = await rpc_error(stub.Generate(request, timeout=30))
            else:
                error = await stream_error(stub.GenerateStream(request, timeout=30))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            # The server is fine afterwards.
            response = await stub.Generate(ids_request(PROMPT, max_tokens=2), timeout=30)
            assert len(response.completions[0].token_ids) == 2

    aio.run(body(), timeout=60)
    assert free_blocks(served) == idle_free


# ---- health, reflection, auth off ---------------------------------------------------------------

@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_is_serving(service, aio, served):
    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    aio.run(body(), timeout=20)


async def _reflect(channel, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=10)
    responses = [response async for response in call]
    assert len(responses) == 1
    assert not responses[0].HasField("error_response"), responses[0].error_response
    return responses[0]


def test_a_client_that_knows_only_reflection_gets_tokens(aio, served):
    """Discover the service, build its messages from the served descriptors (a fresh pool,
    none of pagedserve's generated code) and stream a generation with a generic call."""

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(
                list_services=""))
            names = {s.name for s in listed.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names, names
            files = await _reflect(channel, reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=SERVICE))
            protos = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                      for raw in files.file_descriptor_response.file_descriptor_proto]
            pool = descriptor_pool.DescriptorPool()
            pending = {p.name: p for p in protos}
            while pending:  # dependencies first
                ready = [p for p in pending.values() if all(
                    d not in pending for d in p.dependency)]
                assert ready, f"unresolvable dependencies: {list(pending)}"
                for proto in ready:
                    pool.Add(proto)
                    del pending[proto.name]
            service = pool.FindServiceByName(SERVICE)
            method = service.methods_by_name["GenerateStream"]
            assert method.server_streaming and not method.client_streaming
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            request = request_class(token_ids={"ids": PROMPT},
                                    sampling={"temperature": 0.0, "max_tokens": 5})
            call = channel.unary_stream(f"/{SERVICE}/GenerateStream",
                                        request_serializer=request_class.SerializeToString,
                                        response_deserializer=response_class.FromString)
            tokens, finals = [], []
            async for message in call(request, timeout=30):
                if message.WhichOneof("event") == "delta":
                    tokens.extend(message.delta.token_ids)
                else:
                    finals.append(message.final)
            assert len(tokens) == 5
            assert len(finals) == 1
            assert finals[0].usage.completion_tokens == 5
            # The same request through the generated stub gives the same tokens.
            stub = generation_pb2_grpc.GenerationStub(channel)
            typed = await stub.Generate(ids_request(PROMPT, temperature=0.0, max_tokens=5),
                                        timeout=30)
            assert list(typed.completions[0].token_ids) == tokens

    aio.run(body(), timeout=60)


def test_auth_off_calls_need_no_token(aio, served):
    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.max_model_len == MAX_MODEL_LEN
            assert info.max_num_seqs == MAX_NUM_SEQS
            response = await stub.Generate(ids_request(PROMPT, max_tokens=3), timeout=30)
            assert len(response.completions[0].token_ids) == 3
            # A token sent anyway is ignored.
            deltas = [m async for m in stub.GenerateStream(
                ids_request(PROMPT, max_tokens=3), timeout=30,
                metadata=(("authorization", "Bearer whatever"),))]
            assert deltas[-1].WhichOneof("event") == "final"

    aio.run(body(), timeout=40)


# ---- known bugs ---------------------------------------------------------------------------------

def test_a_second_server_can_share_the_ray_cluster(aio, served, tiny_checkpoint):
    with started_server(aio, tiny_config(tiny_checkpoint)) as second:
        async def body():
            for server in (served, second):
                async with grpc.aio.insecure_channel(server.address) as channel:
                    response = await generation_pb2_grpc.GenerationStub(channel).Generate(
                        ids_request(PROMPT, temperature=0.0, max_tokens=3), timeout=30)
                    assert len(response.completions[0].token_ids) == 3

        aio.run(body(), timeout=40)
