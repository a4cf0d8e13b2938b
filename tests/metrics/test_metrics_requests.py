"""The request metrics a gateway observes, fed synthetic step batches: token counters, each
request once in every histogram that applies to it, finish reasons, tokens after a stop string
the gateway found left out, beam search, cancelled and refused requests, the log line of each
finished request, and the recent throughput."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from pagedserve.engine.beam_search import BeamSearchOutput, BeamSequence
from pagedserve.engine.core import SequenceUpdate
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.metrics import request_metrics
from pagedserve.metrics.request_metrics import RequestRecorder
from pagedserve.protos.v1 import coordinator_pb2 as cpb

EOS = 2
LABELS = {"model_name": "tiny", "replica": "0"}


class Clock:
    """The gateway's time.monotonic(), moved by the test."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(request_metrics, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


@pytest.fixture
def registry(clock) -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def recorder(registry) -> RequestRecorder:
    return RequestRecorder(registry, "tiny", max_model_len=64, eos_token_ids=[EOS])


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**LABELS, **labels})


def step(step_time: float, *starts: tuple[str, float, float]) -> cpb.StepBatch:
    return cpb.StepBatch(step_time=step_time, starts=[
        cpb.RequestStart(request_id=r, queue_seconds=q, prefill_seconds=p) for r, q, p in starts])


def finished_output(request_id: str, *reasons: str) -> RequestOutput:
    return RequestOutput(request_id, None, [], finished=True, outputs=[
        CompletionOutput(index=i, finish_reason=reason) for i, reason in enumerate(reasons)])


def token(request_id: str, index: int = 0, finish_reason: str | None = None) -> SequenceUpdate:
    return SequenceUpdate(request_id, index, [7], finish_reason=finish_reason)


def test_a_request_is_counted_once_with_its_tokens_and_timings(recorder, registry, clock):
    recorder.admitted("r", "0", num_prompt_tokens=5, arrival=100.0)
    clock.now = 100.5
    recorder.on_batch(step(10.0, ("r", 0.25, 0.125)), [token("r")], [], [], [])
    clock.now = 100.75
    recorder.on_batch(step(10.25), [token("r")], [], [], [])
    clock.now = 101.0
    recorder.on_batch(step(10.75), [token("r", finish_reason="length")],
                      [finished_output("r", "length")], [], [])
    clock.now = 102.0  # the front lets go later: the end is when the final output came
    recorder.finished("r")
    assert metric(registry, "pagedserve:prompt_tokens_total") == 5
    assert metric(registry, "pagedserve:generation_tokens_total") == 3
    assert metric(registry, "pagedserve:request_success_total", finished_reason="length") == 1
    expected = {"time_to_first_token_seconds": (1, 0.5),
                "inter_token_latency_seconds": (2, 0.75),
                "e2e_request_latency_seconds": (1, 1.0),
                "request_queue_time_seconds": (1, 0.25),
                "request_prefill_time_seconds": (1, 0.125),
                "request_decode_time_seconds": (1, 0.75),
                "request_prompt_tokens": (1, 5), "request_generation_tokens": (1, 3)}
    for name, (count, total) in expected.items():
        assert metric(registry, f"pagedserve:{name}_count") == count, name
        assert metric(registry, f"pagedserve:{name}_sum") == total, name
    # vLLM's 1-2-5 token buckets up to the context length (64).
    assert metric(registry, "pagedserve:request_prompt_tokens_bucket", le="2.0") == 0
    assert metric(registry, "pagedserve:request_prompt_tokens_bucket", le="5.0") == 1
    assert metric(registry, "pagedserve:request_prompt_tokens_bucket", le="50.0") == 1
    assert metric(registry, "pagedserve:request_prompt_tokens_bucket", le="100.0") is None


def test_tokens_after_a_stop_string_found_at_the_gateway_are_not_counted(recorder, registry):
    recorder.admitted("r", "0", num_prompt_tokens=3, arrival=100.0)
    recorder.on_batch(step(1.0), [token("r")], [], [], [])
    recorder.on_batch(step(2.0), [token("r")], [finished_output("r", "stop")],
                      [("r", "\n")], [])
    # The coordinator ran one more step before the gateway's abort reached it.
    recorder.on_batch(step(3.0), [token("r")], [], [], [])
    recorder.finished("r")
    assert metric(registry, "pagedserve:generation_tokens_total") == 2
    assert metric(registry, "pagedserve:request_generation_tokens_sum") == 2
    assert metric(registry, "pagedserve:inter_token_latency_seconds_count") == 1
    assert metric(registry, "pagedserve:request_decode_time_seconds_sum") == 1.0
    assert metric(registry, "pagedserve:request_success_total", finished_reason="stop") == 1


def test_n_sequences_count_the_prompt_once_and_take_the_first_reason_in_order(
        recorder, registry):
    recorder.admitted("r", "0", num_prompt_tokens=4, arrival=100.0)
    recorder.on_batch(step(1.0, ("r", 0.5, 0.5)), [token("r", 0), token("r", 1)], [], [], [])
    recorder.on_batch(step(2.0), [token("r", 0, "length"), token("r", 1)],
                      [], [("r/1", "x")], [])
    recorder.on_batch(step(3.0), [token("r", 1)], [finished_output("r", "length", "stop")],
                      [], [])
    recorder.finished("r")
    assert metric(registry, "pagedserve:prompt_tokens_total") == 4
    assert metric(registry, "pagedserve:generation_tokens_total") == 4
    assert metric(registry, "pagedserve:inter_token_latency_seconds_count") == 2
    assert metric(registry, "pagedserve:time_to_first_token_seconds_count") == 1
    assert metric(registry, "pagedserve:request_success_total", finished_reason="length") == 1
    assert metric(registry, "pagedserve:request_success_total", finished_reason="stop") is None


def test_a_cancelled_request_counts_as_abort_and_a_refused_one_nowhere(recorder, registry,
                                                                       clock):
    recorder.admitted("cancelled", "0", num_prompt_tokens=6, arrival=100.0)
    recorder.admitted("refused", "0", num_prompt_tokens=6, arrival=100.0)
    recorder.discard("refused")
    clock.now = 100.25
    recorder.finished("cancelled")
    recorder.finished("refused")  # already gone: nothing more
    assert metric(registry, "pagedserve:request_success_total", finished_reason="abort") == 1
    assert metric(registry, "pagedserve:e2e_request_latency_seconds_count") == 1
    assert metric(registry, "pagedserve:e2e_request_latency_seconds_sum") == 0.25
    assert metric(registry, "pagedserve:request_prompt_tokens_count") == 1
    # No token came: nothing prefilled, no time to first token, no queue or decode time.
    assert metric(registry, "pagedserve:prompt_tokens_total") == 0
    assert metric(registry, "pagedserve:time_to_first_token_seconds_count") == 0
    assert metric(registry, "pagedserve:request_queue_time_seconds_count") == 0
    assert metric(registry, "pagedserve:request_decode_time_seconds_count") == 0


@pytest.mark.parametrize("best, reason", [([5, EOS], "stop"), ([5, 6], "length")])
def test_beam_search_counts_at_its_one_result(recorder, registry, clock, best, reason):
    recorder.admitted("b", "0", num_prompt_tokens=3, arrival=100.0)
    clock.now = 100.5
    beam = BeamSearchOutput("b", [1, 2, 3], [BeamSequence(best, -1.0),
                                             BeamSequence([5, 6, 7], -2.0)])
    recorder.on_batch(step(1.0), [], [], [], [beam])
    recorder.finished("b")
    assert metric(registry, "pagedserve:prompt_tokens_total") == 3
    assert metric(registry, "pagedserve:generation_tokens_total") == 5
    assert metric(registry, "pagedserve:time_to_first_token_seconds_sum") == 0.5
    assert metric(registry, "pagedserve:request_success_total", finished_reason=reason) == 1
    assert metric(registry, "pagedserve:inter_token_latency_seconds_count") == 0
    assert metric(registry, "pagedserve:request_queue_time_seconds_count") == 0


def test_each_finished_request_logs_one_structured_line(recorder, clock, caplog):
    recorder.admitted("r", "0", num_prompt_tokens=5, arrival=100.0)
    clock.now = 100.5
    recorder.on_batch(step(10.0, ("r", 0.25, 0.125)), [token("r", finish_reason="length")],
                      [finished_output("r", "length")], [], [])
    with caplog.at_level(logging.INFO, logger="pagedserve.requests"):
        recorder.finished("r")
    [record] = [r for r in caplog.records if r.name == "pagedserve.requests"]
    assert record.getMessage() == (
        "request finished request_id=r replica=0 finish_reason=length prompt_tokens=5 "
        "generation_tokens=1 queue_s=0.250000 prefill_s=0.125000 ttft_s=0.500000 "
        "decode_s=0.000000 e2e_s=0.500000")
    assert record.request == {"request_id": "r", "replica": "0", "finish_reason": "length",
                              "prompt_tokens": 5, "generation_tokens": 1,
                              "queue_s": 0.25, "prefill_s": 0.125, "ttft_s": 0.5,
                              "decode_s": 0.0, "e2e_s": 0.5}


def test_throughput_averages_the_last_minute(recorder, clock):
    recorder.admitted("r", "0", num_prompt_tokens=10, arrival=100.0)
    clock.now = 120.0
    recorder.on_batch(step(1.0), [token("r", finish_reason="length")],
                      [finished_output("r", "length")], [], [])
    recorder.finished("r")
    throughput = recorder.throughput()
    assert (throughput.window_seconds, throughput.prompt_tokens_per_second,
            throughput.generation_tokens_per_second, throughput.requests_per_second) == (
        20.0, 0.5, 0.05, 0.05)
    clock.now = 200.0  # a minute later, that second has left the window
    throughput = recorder.throughput()
    assert (throughput.window_seconds, throughput.generation_tokens_per_second) == (60.0, 0.0)
