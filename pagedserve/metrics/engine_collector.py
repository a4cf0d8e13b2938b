"""Engine and GPU metrics of every replica, read at scrape time from what the gateway last
heard: the engine snapshot of the replica's latest step batch (or of its idle report) and its
GPU telemetry. Counters and the step histogram are the coordinator's own cumulative values,
so every gateway in front of a replica shows the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pagedserve.metrics import names
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import generation_pb2 as pb

ENGINE_GAUGES = (
    (names.NUM_REQUESTS_RUNNING, "Sequences in the running batch."),
    (names.NUM_REQUESTS_WAITING, "Sequences waiting for their first step."),
    (names.NUM_REQUESTS_SWAPPED, "Sequences swapped out to CPU memory."),
    (names.KV_CACHE_USAGE_PERC, "Fraction of KV-cache blocks in use (1 = all)."))
ENGINE_COUNTERS = (
    (names.NUM_PREEMPTIONS, "Preemptions since the replica started."),
    (names.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache."),
    (names.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache."))
GPU_GAUGES = (
    (names.GPU_MEMORY_USED_BYTES, "GPU memory in use (every process)."),
    (names.GPU_MEMORY_TOTAL_BYTES, "GPU memory installed."),
    (names.GPU_UTILIZATION_PERC, "Fraction of time a kernel ran (1 = always)."),
    (names.GPU_POWER_WATTS, "Power draw of the board."),
    (names.GPU_TEMPERATURE_CELSIUS, "GPU temperature."))


class ReplicaView(Protocol):
    """What the collector reads of one replica (a cluster.replica_client.ReplicaClient)."""

    label: str
    up: bool
    stats: cpb.EngineSnapshot | None
    gpus: list[pb.GpuStats]


class EngineCollector(Collector):
    """The engine gauges, counters and step histogram, and the GPU gauges, of the replicas
    that are up."""

    def __init__(self, model_name: str, replicas: Callable[[], Sequence[ReplicaView]]) -> None:
        self.model_name = model_name
        self._replicas = replicas

    def describe(self) -> list[Metric]:
        return []  # the families are built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        labels = list(names.LABELS)
        gauges = _families(GaugeMetricFamily, ENGINE_GAUGES, labels)
        counters = _families(CounterMetricFamily, ENGINE_COUNTERS, labels)
        iteration_tokens = HistogramMetricFamily(names.ITERATION_TOKENS,
                                                 "Tokens computed per engine step.",
                                                 labels=labels)
        gpu_gauges = _families(GaugeMetricFamily, GPU_GAUGES, list(names.GPU_LABELS))
        for replica in self._replicas():
            if not replica.up or replica.stats is None:
                continue
            values = [self.model_name, replica.label]
            stats = replica.stats
            for name, value in ((names.NUM_REQUESTS_RUNNING, stats.num_running),
                                (names.NUM_REQUESTS_WAITING, stats.num_waiting),
                                (names.NUM_REQUESTS_SWAPPED, stats.num_swapped),
                                (names.KV_CACHE_USAGE_PERC, stats.kv_blocks_used
                                 / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)):
                gauges[name].add_metric(values, value)
            for name, value in ((names.NUM_PREEMPTIONS, stats.num_preemptions),
                                (names.PREFIX_CACHE_QUERIES, stats.prefix_cache_queries),
                                (names.PREFIX_CACHE_HITS, stats.prefix_cache_hits)):
                counters[name].add_metric(values, value)
            buckets = _cumulative_buckets(stats.iteration_tokens_counts)
            if buckets is not None:
                iteration_tokens.add_metric(values, buckets, stats.iteration_tokens_sum)
            for gpu in replica.gpus:
                self._add_gpu(gpu_gauges, [*values, str(gpu.index), gpu.uuid], gpu)
        yield from gauges.values()
        yield from counters.values()
        yield iteration_tokens
        yield from gpu_gauges.values()

    @staticmethod
    def _add_gpu(gauges: dict[str, GaugeMetricFamily], values: list[str],
                 gpu: pb.GpuStats) -> None:
        gauges[names.GPU_MEMORY_USED_BYTES].add_metric(values, gpu.memory_used_bytes)
        gauges[names.GPU_MEMORY_TOTAL_BYTES].add_metric(values, gpu.memory_total_bytes)
        for name, field in ((names.GPU_UTILIZATION_PERC, "utilization"),
                            (names.GPU_POWER_WATTS, "power_watts"),
                            (names.GPU_TEMPERATURE_CELSIUS, "temperature_celsius")):
            if gpu.HasField(field):
                gauges[name].add_metric(values, getattr(gpu, field))


def _families(kind: type, specs: tuple[tuple[str, str], ...],
              labels: list[str]) -> dict[str, Metric]:
    return {name: kind(name, documentation, labels=labels) for name, documentation in specs}


def _cumulative_buckets(counts: Sequence[int]) -> list[tuple[str, float]] | None:
    """Prometheus's (le, cumulative count) pairs, `le` written as prometheus_client's own
    histograms write it ("8.0"); None for a snapshot of other bounds (a coordinator of
    another version)."""
    bounds = names.ITERATION_TOKENS_BUCKETS
    if len(counts) != len(bounds) + 1:
        return None
    pairs, total = [], 0
    for bound, count in zip((*map(floatToGoString, bounds), "+Inf"), counts,
                             strict=True):
        total += count
        pairs.append((bound, total))
    return pairs
