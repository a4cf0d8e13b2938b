"""What a coordinator measures: the per-step token histogram (each step that computed tokens
counted once, in vLLM's buckets) and the engine snapshot as a gateway exposes it; each
request's queue and prefill time in the coordinator's clock."""

from __future__ import annotations

from types import SimpleNamespace

from pagedserve.cluster import wire
from pagedserve.engine.core import EngineCoreOutputs, EngineStats, SequenceUpdate
from pagedserve.metrics import coordinator_metrics
from pagedserve.metrics.coordinator_metrics import RequestStart, RequestTimer, StepRecorder
from pagedserve.metrics.gateway_metrics import GatewayMetrics
from tests.helpers.prometheus_text import parse_samples, value

LABELS = {"model_name": "tiny", "replica": "0"}


def test_steps_fall_in_vllm_iteration_buckets_and_idle_state_replaces_the_gauges():
    recorder = StepRecorder(EngineStats(kv_blocks_total=8))
    for tokens in (1, 8, 9, 16384, 16385, 0):  # 0: the step that only collects the last one
        recorder.observe_step(EngineStats(num_running=2, kv_blocks_used=4, kv_blocks_total=8,
                                          step_tokens=tokens))
    recorder.set_state(EngineStats(kv_blocks_total=8, num_preemptions=3,
                                   prefix_cache_queries=40, prefix_cache_hits=16))
    snapshot = recorder.snapshot()
    assert snapshot.iteration_tokens_counts == (1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1)
    assert snapshot.iteration_tokens_sum == 1 + 8 + 9 + 16384 + 16385
    replica = SimpleNamespace(label="0", up=True, stats=wire.snapshot_to_proto(snapshot),
                              gpus=[])
    samples = parse_samples(GatewayMetrics("tiny", lambda: [replica]).render()[0])
    assert value(samples, "pagedserve:num_requests_running", **LABELS) == 0
    assert value(samples, "pagedserve:kv_cache_usage_perc", **LABELS) == 0
    assert value(samples, "pagedserve:num_preemptions_total", **LABELS) == 3
    assert value(samples, "pagedserve:prefix_cache_queries_total", **LABELS) == 40
    assert value(samples, "pagedserve:prefix_cache_hits_total", **LABELS) == 16
    bucket = "pagedserve:iteration_tokens_total_bucket"
    assert [value(samples, bucket, **LABELS, le=le)
            for le in ("1.0", "8.0", "16.0", "8192.0", "16384.0", "+Inf")] == [1, 2, 3, 3, 4, 5]
    assert value(samples, "pagedserve:iteration_tokens_total_count", **LABELS) == 5
    assert value(samples, "pagedserve:iteration_tokens_total_sum", **LABELS) == 32787


def test_a_replica_that_is_down_is_not_shown():
    replica = SimpleNamespace(label="0", up=False,
                              stats=wire.snapshot_to_proto(StepRecorder(EngineStats(
                                  num_running=5)).snapshot()), gpus=[])
    samples = parse_samples(GatewayMetrics("tiny", lambda: [replica]).render()[0])
    assert value(samples, "pagedserve:num_requests_running", **LABELS) is None


def test_queue_and_prefill_time_end_at_the_first_token(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(coordinator_metrics, "time", SimpleNamespace(monotonic=lambda: now[0]))
    timer = RequestTimer()
    timer.added("r")
    timer.added("never-scheduled")
    now[0] = 10.5
    timer.scheduled(SimpleNamespace(scheduled=[
        SimpleNamespace(request_id="r", new_request=object()),
        SimpleNamespace(request_id="other", new_request=None)]))
    prefill_chunk = EngineCoreOutputs(updates=[SequenceUpdate("r", 0)], timestamp=10.75)
    assert timer.first_tokens(prefill_chunk) == {}
    first = EngineCoreOutputs(updates=[SequenceUpdate("r", 0, [5]),
                                       SequenceUpdate("never-scheduled", 0, [5])],
                              timestamp=11.0)
    assert timer.first_tokens(first) == {"r": RequestStart("r", 0.5, 0.5)}
    assert timer.first_tokens(first) == {}  # reported once
