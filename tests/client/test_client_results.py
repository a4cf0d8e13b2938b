"""Typed results from canned responses: the shape of the offline RequestOutput."""

from __future__ import annotations

import pytest

from pagedserve.client import (
    Client,
    Completion,
    StreamDelta,
    StreamFinal,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from pagedserve.protos.v1 import generation_pb2 as pb


def test_generate_result_is_typed(server):
    with Client(server.address) as client:
        result = client.generate("Hey", logprobs=2, prompt_logprobs=0)
    assert result.request_id == "req-1"
    assert result.prompt == "Hey" and result.finished
    assert result.prompt_token_ids == [1, 2, 3]
    first, second = result.outputs
    assert first == Completion(
        index=0, text="Hello", token_ids=[7, 9], cumulative_logprob=-0.8,
        logprobs=[TokenLogprob(7, -0.1, 1, [TopLogprob(7, -0.1), TopLogprob(8, -2.5)]),
                  TokenLogprob(9, -0.7, 2, [])],
        finish_reason="stop", stop_reason="\n")
    assert first.finished and first.score is None
    assert second.finish_reason == "length" and second.stop_reason is None
    assert second.logprobs == [] and second.cumulative_logprob is None
    # As offline: one entry per prompt token, None first.
    assert result.prompt_logprobs == [None, TokenLogprob(2, -3.0, 4), TokenLogprob(3, -1.0, 1)]
    assert result.usage == Usage(prompt_tokens=3, completion_tokens=5, cached_prompt_tokens=2)
    assert result.usage.total_tokens == 8
    assert result.timing.total_seconds == pytest.approx(0.2)
    assert result.timing.time_to_first_token_seconds == pytest.approx(0.05)


def test_logprobs_are_none_when_not_asked(server):
    server.servicer.response = pb.GenerateResponse(
        request_id="x", completions=[pb.Completion(index=0, text="a", token_ids=[1],
                                                   finish_reason=pb.FINISH_REASON_ABORT)])
    with Client(server.address) as client:
        result = client.generate([3])
    (only,) = result.outputs
    assert only.logprobs is None and result.prompt_logprobs is None
    assert only.finish_reason == "abort" and result.prompt is None


def test_stop_token_and_beam_score(server):
    server.servicer.response = pb.GenerateResponse(completions=[
        pb.Completion(index=0, token_ids=[4, 2], finish_reason=pb.FINISH_REASON_STOP,
                      stop_token_id=2, cumulative_logprob=-1.5, score=-0.75),
        pb.Completion(index=1, token_ids=[4, 4], finish_reason=pb.FINISH_REASON_LENGTH,
                      cumulative_logprob=-2.0, score=-1.0)])
    with Client(server.address) as client:
        result = client.beam_search([1], beam_width=2, max_tokens=2)
    assert [o.score for o in result.outputs] == [-0.75, -1.0]
    assert result.outputs[0].stop_reason == 2
    assert isinstance(result.outputs[0].stop_reason, int)


def test_stream_events_then_final(server):
    with Client(server.address) as client, client.generate_stream("p", n=2) as stream:
        events = list(stream)
    deltas, final = events[:-1], events[-1]
    assert [type(e) for e in deltas] == [StreamDelta] * 3
    assert deltas[0] == StreamDelta("req-s", 0, "He", [5], None)
    assert deltas[1] == StreamDelta("req-s", 1, "Yo", [6], None)
    assert isinstance(final, StreamFinal)
    assert stream.final is final and stream.request_id == "req-s"
    assert final.finish_reasons == ["stop", "length"]
    assert final.outputs[0].text == "Hello" and final.outputs[0].token_ids == [5, 7]
    assert final.outputs[0].stop_reason == 2
    assert final.outputs[1].text == "Yo" and final.outputs[1].token_ids == [6]
    assert final.usage == Usage(2, 3)
    result = final.result()
    assert result.prompt == "p" and result.prompt_token_ids == [1, 2]
    assert [o.text for o in result.outputs] == ["Hello", "Yo"]


def test_stream_logprobs_in_deltas(server):
    lp = pb.TokenLogprob(token_id=5, logprob=-0.25, rank=1)
    server.servicer.stream = [
        pb.GenerateStreamResponse(request_id="s", delta=pb.Delta(index=0, token_ids=[5],
                                                                 text="a", logprobs=[lp])),
        pb.GenerateStreamResponse(request_id="s", final=pb.GenerateResponse(
            completions=[pb.Completion(index=0, finish_reason=pb.FINISH_REASON_LENGTH,
                                       cumulative_logprob=-0.25)]))]
    with Client(server.address) as client:
        events = list(client.generate_stream("p", logprobs=0))
    assert events[0].logprobs == [TokenLogprob(5, -0.25, 1)]
    assert events[1].outputs[0].logprobs == [TokenLogprob(5, -0.25, 1)]
    assert events[1].outputs[0].cumulative_logprob == -0.25
