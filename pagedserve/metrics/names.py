"""Metric names and histogram buckets: vLLM's, under the `pagedserve:` prefix instead of
`vllm:`, so that dashboards and autoscaling rules written for vLLM port by swapping the prefix.

The bucket boundaries are vLLM's (vllm/v1/metrics/loggers.py); token-count histograms use its
1-2-5 series up to the model's context length.
"""

from __future__ import annotations

PREFIX = "pagedserve:"
LABELS = ("model_name", "replica")
"""Every engine and request metric carries these: the served model and the replica's index."""
GPU_LABELS = (*LABELS, "index", "uuid")
"""GPU metrics add the GPU's NVML index on its node and its UUID."""

# Engine state, from each coordinator's latest snapshot.
NUM_REQUESTS_RUNNING = PREFIX + "num_requests_running"
NUM_REQUESTS_WAITING = PREFIX + "num_requests_waiting"
NUM_REQUESTS_SWAPPED = PREFIX + "num_requests_swapped"
KV_CACHE_USAGE_PERC = PREFIX + "kv_cache_usage_perc"
NUM_PREEMPTIONS = PREFIX + "num_preemptions"
PREFIX_CACHE_QUERIES = PREFIX + "prefix_cache_queries"
PREFIX_CACHE_HITS = PREFIX + "prefix_cache_hits"
ITERATION_TOKENS = PREFIX + "iteration_tokens_total"

# Requests, observed at the gateway.
PROMPT_TOKENS = PREFIX + "prompt_tokens"
GENERATION_TOKENS = PREFIX + "generation_tokens"
REQUEST_SUCCESS = PREFIX + "request_success"
TIME_TO_FIRST_TOKEN = PREFIX + "time_to_first_token_seconds"
INTER_TOKEN_LATENCY = PREFIX + "inter_token_latency_seconds"
E2E_REQUEST_LATENCY = PREFIX + "e2e_request_latency_seconds"
REQUEST_QUEUE_TIME = PREFIX + "request_queue_time_seconds"
REQUEST_PREFILL_TIME = PREFIX + "request_prefill_time_seconds"
REQUEST_DECODE_TIME = PREFIX + "request_decode_time_seconds"
REQUEST_PROMPT_TOKENS = PREFIX + "request_prompt_tokens"
REQUEST_GENERATION_TOKENS = PREFIX + "request_generation_tokens"

# GPUs, read through NVML in the rank actors.
GPU_MEMORY_USED_BYTES = PREFIX + "gpu_memory_used_bytes"
GPU_MEMORY_TOTAL_BYTES = PREFIX + "gpu_memory_total_bytes"
GPU_UTILIZATION_PERC = PREFIX + "gpu_utilization_perc"
GPU_POWER_WATTS = PREFIX + "gpu_power_watts"
GPU_TEMPERATURE_CELSIUS = PREFIX + "gpu_temperature_celsius"

TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
"""End to end, queue, prefill and decode times."""
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10
