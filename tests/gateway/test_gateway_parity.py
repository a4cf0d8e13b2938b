"""Served == offline: what the gateway returns over gRPC equals pagedserve.LLM with the same
EngineConfig, token for token (unary Generate and the concatenated deltas of GenerateStream).

The embedded default model (byte-level tokenizer) is served, so text prompts, detokenized text
and stop strings are covered too. Only the raw generated stubs are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest

from pagedserve import LLM, BeamSearchParams, SamplingParams
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import collect_stream, started_server

pytestmark = pytest.mark.timeout(120)

LOGPROB_TOLERANCE = 1e-6
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_ABORT: "abort"}
ENGINE_FIELDS = dict(device="cpu", num_gpu_blocks_override=128, max_model_len=256,
                     cpu_threads=1, seed=0)
IDS_PROMPT = [40, 41, 42, 43, 44, 45, 46, 47]
TEXT_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def offline(default_model_path):
    llm = LLM(model=default_model_path, **ENGINE_FIELDS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def served(aio, ray_cluster, default_model_path):
    config = EngineConfig(model=default_model_path, **ENGINE_FIELDS)
    with started_server(aio, config, ServeOptions(host="127.0.0.1", port=0)) as server:
        yield server


@pytest.fixture(scope="module")
def served_call(aio, served):
    """(request) -> (unary response, (stream deltas, stream final)) from the served system."""

    def call(request: pb.GenerateRequest):
        async def body():
            async with grpc.aio.insecure_channel(served.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                unary = await stub.Generate(request, timeout=60)
                stream = await collect_stream(stub.GenerateStream(request, timeout=60))
                return unary, stream

        return aio.run(body(), timeout=100)

    return call


# ---- normal forms: offline outputs and served responses become the same plain dicts -----------

def _logprob(entry) -> dict[str, Any]:
    return {"token_id": entry.token_id, "logprob": entry.logprob, "rank": entry.rank,
            "top": [(token_id, logprob) for token_id, logprob in entry.top]}


def _proto_logprob(message: pb.TokenLogprob) -> dict[str, Any]:
    return {"token_id": message.token_id, "logprob": message.logprob, "rank": message.rank,
            "top": [(t.token_id, t.logprob) for t in message.top]}


def _offline_request(output) -> dict[str, Any]:
    completions = []
    for completion in output.outputs:
        completions.append({
            "index": completion.index, "token_ids": list(completion.token_ids),
            "text": completion.text, "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
            "logprobs": [_logprob(e) for e in completion.logprobs or ()],
            "cumulative_logprob": completion.cumulative_logprob})
    prompt_logprobs = [_logprob(e) for e in (output.prompt_logprobs or [])[1:]]
    return {"prompt_token_ids": list(output.prompt_token_ids), "completions": completions,
            "prompt_logprobs": prompt_logprobs}


def _stop_reason(completion: pb.Completion):
    which = completion.WhichOneof("stop_reason")
    return None if which is None else getattr(completion, which)


def _served_unary(response: pb.GenerateResponse) -> dict[str, Any]:
    completions = []
    for completion in response.completions:
        completions.append({
            "index": completion.index, "token_ids": list(completion.token_ids),
            "text": completion.text, "finish_reason": FINISH[completion.finish_reason],
            "stop_reason": _stop_reason(completion),
            "logprobs": [_proto_logprob(e) for e in completion.logprobs],
            "cumulative_logprob": completion.cumulative_logprob
            if completion.HasField("cumulative_logprob") else None})
    return {"prompt_token_ids": list(response.prompt_token_ids), "completions": completions,
            "prompt_logprobs": [_proto_logprob(e) for e in response.prompt_logprobs]}


def _served_stream(deltas: list[pb.GenerateStreamResponse],
                   final: pb.GenerateResponse) -> dict[str, Any]:
    """The deltas concatenated per completion index, with the final message's reasons."""
    normal = _served_unary(final)
    for completion in final.completions:  # tokens and text come in the deltas only
        assert not completion.token_ids and not completion.text
    by_index = {c["index"]: c for c in normal["completions"]}
    for message in deltas:
        delta = message.delta
        assert delta.index in by_index, f"a delta for unknown completion {delta.index}"
        if delta.logprobs:
            assert len(delta.logprobs) == len(delta.token_ids)
        target = by_index[delta.index]
        target["token_ids"].extend(delta.token_ids)
        target["text"] += delta.text
        target["logprobs"].extend(_proto_logprob(e) for e in delta.logprobs)
    return normal


def _assert_logprobs_close(served: list[dict], offline: list[dict], where: str) -> None:
    assert len(served) == len(offline), where
    for position, (got, want) in enumerate(zip(served, offline, strict=True)):
        at = f"{where}[{position}]"
        assert got["token_id"] == want["token_id"], at
        assert got["rank"] == want["rank"], at
        assert got["logprob"] == pytest.approx(want["logprob"], abs=LOGPROB_TOLERANCE), at
        assert [t for t, _ in got["top"]] == [t for t, _ in want["top"]], at
        assert [v for _, v in got["top"]] == pytest.approx([v for _, v in want["top"]],
                                                           abs=LOGPROB_TOLERANCE), at


def assert_same(served: dict[str, Any], offline: dict[str, Any], what: str) -> None:
    assert served["prompt_token_ids"] == offline["prompt_token_ids"], what
    _assert_logprobs_close(served["prompt_logprobs"], offline["prompt_logprobs"],
                           f"{what}: prompt_logprobs")
    got = sorted(served["completions"], key=lambda c: c["index"])
    want = sorted(offline["completions"], key=lambda c: c["index"])
    assert [c["index"] for c in got] == [c["index"] for c in want], what
    for served_one, offline_one in zip(got, want, strict=True):
        at = f"{what}: completion {offline_one['index']}"
        for key in ("token_ids", "text", "finish_reason", "stop_reason"):
            assert served_one[key] == offline_one[key], f"{at}: {key}"
        _assert_logprobs_close(served_one["logprobs"], offline_one["logprobs"],
                               f"{at}: logprobs")
        if offline_one["cumulative_logprob"] is not None and served_one["cumulative_logprob"] \
                is not None:
            assert served_one["cumulative_logprob"] == pytest.approx(
                offline_one["cumulative_logprob"], abs=1e-5), f"{at}: cumulative_logprob"


def _request(prompt: str | list[int], **sampling: Any) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _offline(offline: LLM, prompt: str | list[int], **sampling: Any) -> dict[str, Any]:
    [output] = offline.generate([prompt], SamplingParams(**sampling), use_tqdm=False)
    return _offline_request(output)


CASES = {
    "greedy-ids": (IDS_PROMPT, dict(temperature=0.0, max_tokens=12)),
    "greedy-text": (TEXT_PROMPT, dict(temperature=0.0, max_tokens=12)),
    "seeded-text": (TEXT_PROMPT, dict(temperature=0.8, seed=1234, max_tokens=12)),
    "seeded-ids-top-p-k": (IDS_PROMPT, dict(temperature=0.8, seed=99, top_p=0.9, top_k=20,
                                            max_tokens=12)),
    "seeded-n2": (TEXT_PROMPT, dict(temperature=0.8, seed=7, n=2, max_tokens=10)),
    "greedy-n2": (IDS_PROMPT, dict(temperature=0.0, n=2, max_tokens=6)),
    "logprobs-greedy": (TEXT_PROMPT, dict(temperature=0.0, max_tokens=8, logprobs=3,
                                          prompt_logprobs=2)),
    "logprobs-seeded-n2": (IDS_PROMPT, dict(temperature=0.8, seed=5, n=2, max_tokens=8,
                                            logprobs=2, prompt_logprobs=0)),
    "seeded-n2-stop-strings": (TEXT_PROMPT, dict(temperature=0.8, seed=11, n=2,
                                                 max_tokens=24, stop=[" ", "e"])),
    "logit-bias-min-tokens": (IDS_PROMPT, dict(temperature=0.0, max_tokens=8, min_tokens=4,
                                               logit_bias={70: 5.0, 71: -100.0})),
    "penalties": (TEXT_PROMPT, dict(temperature=0.0, max_tokens=12, repetition_penalty=1.3,
                                    presence_penalty=0.5, frequency_penalty=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_and_stream_equal_offline(case, offline, served_call):
    prompt, sampling = CASES[case]
    want = _offline(offline, prompt, **sampling)
    assert all(c["token_ids"] for c in want["completions"])
    if sampling.get("logprobs") is not None:  # the comparison below is not vacuous
        assert all(len(c["logprobs"]) == len(c["token_ids"]) for c in want["completions"])
    if sampling.get("prompt_logprobs") is not None:
        assert len(want["prompt_logprobs"]) == len(want["prompt_token_ids"]) - 1
    unary, (deltas, final) = served_call(_request(prompt, **sampling))
    assert_same(_served_unary(unary), want, f"{case}: Generate")
    assert_same(_served_stream(deltas, final), want, f"{case}: GenerateStream")
    completion_tokens = sum(len(c["token_ids"]) for c in want["completions"])
    assert unary.usage.completion_tokens == completion_tokens
    assert final.usage.completion_tokens == completion_tokens
    assert unary.usage.prompt_tokens == final.usage.prompt_tokens == len(
        want["prompt_token_ids"])


@pytest.mark.parametrize("include", [False, True], ids=["stop-excluded", "stop-included"])
def test_stop_string_text_and_reason_equal_offline(include, offline, served_call):
    plain = _offline(offline, TEXT_PROMPT, temperature=0.0, max_tokens=32)
    text = plain["completions"][0]["text"]
    assert len(text) >= 12, text
    stop = text[8:10]  # present in the output; the sequence stops at its first occurrence
    sampling = dict(temperature=0.0, max_tokens=32, stop=[stop, "never-appears-here"],
                    include_stop_str_in_output=include)
    want = _offline(offline, TEXT_PROMPT, **sampling)
    [completion] = want["completions"]
    assert completion["finish_reason"] == "stop"
    assert completion["stop_reason"] == stop
    assert completion["text"].endswith(stop) == include
    unary, (deltas, final) = served_call(_request(TEXT_PROMPT, **sampling))
    assert_same(_served_unary(unary), want, "stop: Generate")
    assert_same(_served_stream(deltas, final), want, "stop: GenerateStream")
    assert unary.completions[0].stop_string == stop
    assert final.completions[0].stop_string == stop


def test_stop_token_id_equal_offline(offline, served_call):
    plain = _offline(offline, IDS_PROMPT, temperature=0.0, max_tokens=16)
    stop_token = plain["completions"][0]["token_ids"][3]
    sampling = dict(temperature=0.0, max_tokens=16, stop_token_ids=[stop_token])
    want = _offline(offline, IDS_PROMPT, **sampling)
    assert want["completions"][0]["finish_reason"] == "stop"
    assert want["completions"][0]["stop_reason"] == stop_token
    unary, (deltas, final) = served_call(_request(IDS_PROMPT, **sampling))
    assert_same(_served_unary(unary), want, "stop token: Generate")
    assert_same(_served_stream(deltas, final), want, "stop token: GenerateStream")
    assert unary.completions[0].stop_token_id == stop_token


BEAM_CASES = {
    "ids-width3": (IDS_PROMPT, BeamSearchParams(beam_width=3, max_tokens=6)),
    "text-width2-penalty": (TEXT_PROMPT, BeamSearchParams(beam_width=2, max_tokens=5,
                                                          length_penalty=0.5)),
}


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_equal_offline(case, offline, served_call):
    prompt, params = BEAM_CASES[case]
    [want] = offline.beam_search([prompt], params)
    assert len(want.sequences) == params.beam_width
    request = pb.GenerateRequest(beam_search=pb.BeamSearchParams(
        beam_width=params.beam_width, max_tokens=params.max_tokens,
        length_penalty=params.length_penalty))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    unary, (deltas, final) = served_call(request)
    assert not deltas, "a beam search streams one final message only"
    for response in (unary, final):
        assert list(response.prompt_token_ids) == list(want.prompt_token_ids)
        assert [list(c.token_ids) for c in response.completions] == [
            list(s.token_ids) for s in want.sequences], "beams' tokens and order"
        assert [c.index for c in response.completions] == list(range(len(want.sequences)))
        assert [c.text for c in response.completions] == [s.text for s in want.sequences]
        assert [c.cumulative_logprob for c in response.completions] == pytest.approx(
            [s.cumulative_logprob for s in want.sequences], abs=1e-5)
        assert [c.score for c in response.completions] == pytest.approx(
            [s.score for s in want.sequences], abs=1e-5)
        assert response.usage.completion_tokens == sum(len(s.token_ids)
                                                       for s in want.sequences)


def test_request_id_echoed_and_fields_default_like_offline(offline, served_call):
    """An unset SamplingParams takes offline's defaults (max_tokens 16 and so on)."""
    want = _offline(offline, IDS_PROMPT, seed=3)  # every other field at its default
    defaults = dataclasses.asdict(SamplingParams())
    assert defaults["max_tokens"] == 16
    request = _request(IDS_PROMPT, seed=3)
    request.request_id = "parity-defaults-1"
    unary, (deltas, final) = served_call(request)
    assert unary.request_id == "parity-defaults-1"
    assert final.request_id == "parity-defaults-1"
    assert all(m.request_id == "parity-defaults-1" for m in deltas)
    assert_same(_served_unary(unary), want, "defaults: Generate")
    assert_same(_served_stream(deltas, final), want, "defaults: GenerateStream")
