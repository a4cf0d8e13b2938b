"""Fast layer, gRPC: random pagedserve.v1 request messages through the gateway's own code, in
process (no engine: inprocess.FakeGateway).

Each GenerateRequest goes twice through what the gateway runs: first the checks of
`Gateway.submit` called directly (`parse_generate_request`, then `submit`: Processor.make_request
and the ModelLimits checks, before anything leaves for a replica), which gives the exception
itself; then the gRPC handler (`Generate` or `GenerateStream`, sometimes left by its client
after the first message), which gives the status. Either it is accepted (the handler answers;
what went to the replica parses back at the coordinator unchanged, inside the limits) or it
raises InvalidArgument, whose status is INVALID_ARGUMENT and whose message names a field the
request set; never another exception; nothing is left at the gateway afterwards.

The other messages (Tokenize, Detokenize, Abort, GetModelInfo) are checked against what their
handlers document.
"""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import event, given
from hypothesis import strategies as st

from pagedserve.cluster.generation_messages import parse_generate_request
from pagedserve.errors import PagedServeError
from pagedserve.protos.v1 import generation_pb2 as pb
from tests.fuzz import strategies as fz
from tests.fuzz.common import FAKE_MAX_NUM_SEQS, GATEWAYS, SERVED_NAME, VOCAB, fuzz_settings
from tests.fuzz.inprocess import (
    CallAborted,
    FakeContext,
    assert_coordinator_accepts,
    call_stream,
    call_unary,
)
from tests.fuzz.oracles import check_refused_error

RPCS = st.sampled_from(["Generate", "GenerateStream", "GenerateStream-left-after-one"])


def run_generate(fake, message: pb.GenerateRequest, rpc: str) -> str:
    """One GenerateRequest both ways; 'accepted' or 'refused'."""
    gateway, replica = fake.gateway, fake.replica
    output_kind = "final_only" if rpc == "Generate" else "delta"

    async def case() -> str:
        sent_before = len(replica.added)
        try:
            stream = await gateway.submit(parse_generate_request(message, gateway.model_name,
                                                                 output_kind))
        except PagedServeError as error:
            refusal = error
        else:
            refusal = None
            stream.close()  # its client left at once: aborted at the (fake) replica
            assert len(replica.added) == sent_before + 1
            assert_coordinator_accepts(replica.added[-1], fake.limits)
        await fake.settle()
        if rpc == "Generate":
            response, aborted = await call_unary(gateway.Generate, message)
        else:
            read = 1 if rpc.endswith("left-after-one") else None
            messages, aborted = await call_stream(gateway.GenerateStream, message, read)
        if refusal is not None:
            check_refused_error(refusal, message)
            assert aborted is not None, "the handler accepted what submit refused"
            assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT, aborted
            assert aborted.details == str(refusal)
            return "refused"
        assert aborted is None, f"the handler refused what submit accepted: {aborted}"
        beam = message.HasField("beam_search")
        expected = message.beam_search.beam_width if beam else (
            message.sampling.n if message.sampling.HasField("n") else 1)
        if rpc == "Generate":
            assert len(response.completions) == expected
            assert all(list(c.token_ids) for c in response.completions)
        elif read is None:
            assert messages[-1].WhichOneof("event") == "final"
            assert len(messages[-1].final.completions) == expected
        return "accepted"

    outcome = fake.run(case())
    fake.run(fake.settle())
    fake.assert_idle()
    event(outcome)  # --hypothesis-show-statistics: how many of each
    return outcome


@fuzz_settings(2600)
@given(which=GATEWAYS, rpc=RPCS, message=fz.generate_requests(SERVED_NAME, VOCAB))
def test_any_generate_request(fakes, which, rpc, message):
    run_generate(fakes[which], message, rpc)


@fuzz_settings(1800)
@given(which=GATEWAYS, rpc=RPCS,
       message=fz.generate_requests(SERVED_NAME, VOCAB, prompt=True))
def test_generate_request_parameters(fakes, which, rpc, message):
    """A valid prompt, so that the sampling and beam parameters are what is tried."""
    run_generate(fakes[which], message, rpc)


@fuzz_settings(600)
@given(message=fz.generate_requests(SERVED_NAME, VOCAB, prompt=True))
def test_generate_request_over_the_wire_bytes(fakes, message):
    """What a client serializes the server parses to the same request (then as above)."""
    parsed = pb.GenerateRequest.FromString(message.SerializeToString())
    assert parsed == message
    run_generate(fakes["bytes"], parsed, "Generate")


@fuzz_settings(400)
@given(which=GATEWAYS, message=fz.tokenize_requests(SERVED_NAME))
def test_tokenize_request(fakes, which, message):
    fake = fakes[which]
    response, aborted = fake.run(call_unary(fake.gateway.Tokenize, message))
    if message.model not in ("", SERVED_NAME):
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT and "model" in aborted.details
    elif which == "none":
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT, aborted
        assert "text" in aborted.details and "tokenizer" in aborted.details
    else:
        assert aborted is None, aborted
        assert list(response.token_ids) == fake.gateway.tokenizer.encode(message.text)


@fuzz_settings(400)
@given(which=GATEWAYS, message=fz.detokenize_requests(SERVED_NAME, VOCAB))
def test_detokenize_request(fakes, which, message):
    fake = fakes[which]
    response, aborted = fake.run(call_unary(fake.gateway.Detokenize, message))
    vocab = fake.limits.vocab_size
    if message.model not in ("", SERVED_NAME):
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT and "model" in aborted.details
    elif which == "none":
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT, aborted
        assert "no tokenizer" in aborted.details
    elif any(t >= vocab for t in message.token_ids):
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT, aborted
        assert "token_ids" in aborted.details
    else:
        assert aborted is None, aborted
        skip = message.skip_special_tokens if message.HasField("skip_special_tokens") else True
        assert response.text == fake.gateway.tokenizer.decode(list(message.token_ids),
                                                              skip_special_tokens=skip)


@fuzz_settings(300)
@given(message=fz.abort_requests(), data=st.data())
def test_abort_request(fakes, message, data):
    """Requests in flight (never answered) that the Abort names end, with finish_reason ABORT
    (beam search: CANCELLED), and are aborted at their replica; the others go on; unknown ids
    (any strings, up to 10,000 of them) are ignored."""
    fake = fakes["bytes"]
    gateway = fake.gateway
    kinds = data.draw(st.lists(st.sampled_from(["sampling", "n2", "beam"]), max_size=3))
    ids = [f"in-flight-{i}" for i in range(len(kinds))]
    named = data.draw(st.lists(st.sampled_from(ids), max_size=4)) if ids else []
    mixed = list(message.request_ids)
    for request_id in named:
        mixed.insert(data.draw(st.integers(0, len(mixed))), request_id)
    request = pb.AbortRequest(request_ids=mixed)

    def in_flight(request_id: str, kind: str) -> pb.GenerateRequest:
        message = pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=[5, 6]))
        if kind == "beam":
            message.beam_search.CopyFrom(pb.BeamSearchParams(beam_width=2, max_tokens=4))
        else:
            message.sampling.CopyFrom(pb.SamplingParams(n=2 if kind == "n2" else 1))
        return message

    async def case():
        fake.replica.answer = False
        aborts_before = len(fake.replica.aborted)
        try:
            calls = [gateway.GenerateStream(in_flight(i, k), FakeContext()) for i, k in
                     zip(ids, kinds, strict=True)]
            pending = [asyncio.ensure_future(_first(call)) for call in calls]
            await fake.settle()
            assert fake.replica.in_flight == len(ids)
            response, aborted = await call_unary(gateway.Abort, request)
            assert aborted is None
            assert list(response.aborted_request_ids) == [i for i in mixed if i in ids]
            for task, request_id, kind, call in zip(pending, ids, kinds, calls, strict=True):
                if request_id not in named:
                    assert not task.done()
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await call.aclose()
                    continue
                outcome = await task
                if kind == "beam":
                    assert getattr(outcome, "code", None) == grpc.StatusCode.CANCELLED, outcome
                else:
                    assert outcome.WhichOneof("event") == "final", outcome
                    assert {c.finish_reason for c in outcome.final.completions} == {
                        pb.FINISH_REASON_ABORT}
                await call.aclose()
        finally:
            fake.replica.answer = True
        await fake.settle()
        # Every one was aborted at its replica: by the Abort, or by its client leaving.
        assert set(ids) <= set(fake.replica.aborted[aborts_before:])

    fake.run(case())
    fake.assert_idle()


async def _first(call):
    """The stream's first message, or the abort that ended it."""
    try:
        return await anext(call)
    except CallAborted as aborted:
        return aborted


@fuzz_settings(200)
@given(which=GATEWAYS, message=fz.model_info_requests(SERVED_NAME))
def test_model_info_request(fakes, which, message):
    fake = fakes[which]
    response, aborted = fake.run(call_unary(fake.gateway.GetModelInfo, message))
    if message.model in ("", SERVED_NAME):
        assert aborted is None and response.model == SERVED_NAME
        assert response.max_num_seqs == FAKE_MAX_NUM_SEQS
    else:
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT and "model" in aborted.details


def test_load_and_status_answer(fakes):
    for which in ("bytes", "none"):
        gateway = fakes[which].gateway
        load, aborted = fakes[which].run(call_unary(gateway.GetServerLoad,
                                                    pb.GetServerLoadRequest()))
        assert aborted is None and load.num_replicas_up == 1
        status, aborted = fakes[which].run(call_unary(gateway.GetServerStatus,
                                                      pb.GetServerStatusRequest()))
        assert aborted is None and status.model == SERVED_NAME
