"""End-to-end token streams through the fake model: every configuration yields the same tokens.

The fake model reads each request's history back from a fake KV store through the block tables
the worker rebuilt from the scheduler output, so equal streams prove that block tables, slot
mappings, copy-on-write copies and swaps are right under preemption, chunking and prefix hits.
"""

from __future__ import annotations

import pytest
from sched_harness import (
    FakeWorker,
    Spec,
    expected_outputs,
    next_token,
    reference_stream,
    run_workload,
)

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import FinishReason, Request
from pagedserve.scheduler.scheduler import Scheduler

MAX_MODEL_LEN = 48
SHARED = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def workload() -> list[Spec]:
    """Shared prefixes, n > 1, mixed lengths, staggered arrivals; no EOS so lengths are known."""
    return [
        Spec("a", SHARED + [1, 2, 3], SamplingParams(max_tokens=14, seed=1)),
        Spec("b", SHARED + [4], SamplingParams(max_tokens=9, seed=2)),
        Spec("c", SHARED[:8], SamplingParams(max_tokens=12, n=3, seed=30), arrival_step=1),
        Spec("d", list(range(40, 61)), SamplingParams(max_tokens=10, seed=4), arrival_step=2),
        Spec("e", [7], SamplingParams(max_tokens=6, n=2, seed=50), arrival_step=3),
        Spec("f", SHARED + [1, 2, 3], SamplingParams(max_tokens=None, seed=6), arrival_step=5),
        Spec("g", [9, 8, 7, 6, 5], SamplingParams(max_tokens=8, seed=7, min_tokens=3),
             eos=0, arrival_step=6),
    ]


CONFIGS = {
    "huge_pool": (dict(), dict(num_gpu_blocks=512)),
    "tiny_pool_recompute": (dict(), dict(num_gpu_blocks=13)),
    "tiny_pool_swap": (dict(preemption_mode="swap"), dict(num_gpu_blocks=13, num_cpu_blocks=64)),
    "tiny_pool_swap_small_cpu": (dict(preemption_mode="swap"),
                                 dict(num_gpu_blocks=13, num_cpu_blocks=4)),
    "chunked_small_budget": (dict(max_num_batched_tokens=5), dict(num_gpu_blocks=512)),
    "chunked_threshold": (dict(max_num_batched_tokens=64, long_prefill_token_threshold=3),
                          dict(num_gpu_blocks=512)),
    "no_prefix_cache": (dict(), dict(num_gpu_blocks=512, enable_prefix_caching=False)),
    "tiny_no_prefix_cache": (dict(max_num_batched_tokens=7),
                             dict(num_gpu_blocks=13, enable_prefix_caching=False)),
    "max_seqs_2": (dict(max_num_seqs=2), dict(num_gpu_blocks=512)),
    "priority_tiny": (dict(policy="priority"), dict(num_gpu_blocks=13)),
    "no_chunking": (dict(enable_chunked_prefill=False, max_num_batched_tokens=MAX_MODEL_LEN),
                    dict(num_gpu_blocks=512)),
}


def run_config(name: str, specs=None):
    sched_kwargs, cache_kwargs = CONFIGS[name]
    sched = SchedulerConfig(max_model_len=MAX_MODEL_LEN, watermark=0.0,
                            **{"max_num_batched_tokens": 32, **sched_kwargs})
    cache = CacheConfig(block_size=4, **cache_kwargs)
    return run_workload(specs or workload(), sched, cache)


def test_reference_generator_is_a_function_of_history():
    params = SamplingParams(max_tokens=4, seed=3)
    tokens, reason = reference_stream([1, 2, 3], params, None, 100, 3)
    assert reason is FinishReason.LENGTH and len(tokens) == 4
    assert tokens[0] == next_token(3, [1, 2, 3])
    assert tokens[1] == next_token(3, [1, 2, 3, tokens[0]])
    assert all(0 <= t < 61 for t in tokens)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streams_match_reference(name):
    result = run_config(name)
    expected = expected_outputs(workload(), MAX_MODEL_LEN)
    assert result.outputs == expected


def test_configs_actually_exercise_preemption_swap_and_copy():
    """Guard against the comparison above silently becoming trivial."""
    huge = run_config("huge_pool")
    assert huge.num_preemptions == 0
    assert huge.saw_copy  # n > 1 with a partial last prompt block forces copy-on-write
    recompute = run_config("tiny_pool_recompute")
    assert recompute.num_preemptions > 0 and not recompute.saw_swap
    swap = run_config("tiny_pool_swap")
    assert swap.num_preemptions > 0 and swap.saw_swap
    chunked = run_config("chunked_small_budget")
    assert chunked.max_batched_tokens == 5
    assert chunked.num_steps > huge.num_steps


def test_streams_identical_across_all_configs():
    results = {name: run_config(name).outputs for name in CONFIGS}
    first = results["huge_pool"]
    for name, outputs in results.items():
        assert outputs == first, name


def test_children_diverge_and_each_matches_its_seed():
    outputs = run_config("huge_pool").outputs
    c_streams = [outputs[f"c/{i}"][0] for i in range(3)]
    assert len({tuple(s) for s in c_streams}) == 3
    assert "c" not in outputs  # the parent sequence never produces tokens itself


def test_broken_copy_on_write_is_detected():
    """Sanity of the harness: dropping the CoW copies must change some child's stream."""

    class NoCopyScheduler(Scheduler):
        def schedule(self):
            out = super().schedule()
            out.blocks_to_copy = []
            return out

    specs = [Spec("p", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=6, n=3, seed=9))]
    sched = SchedulerConfig(max_model_len=MAX_MODEL_LEN, watermark=0.0)
    cache = CacheConfig(block_size=4, num_gpu_blocks=64)
    assert run_workload(specs, sched, cache).outputs == expected_outputs(specs, MAX_MODEL_LEN)
    with pytest.raises(AssertionError):
        result = run_workload(specs, sched, cache, scheduler_factory=NoCopyScheduler)
        assert result.outputs == expected_outputs(specs, MAX_MODEL_LEN)


def test_broken_swap_in_is_detected():
    """Sanity of the harness: swapping in to the wrong blocks must be noticed."""

    class WrongSwapScheduler(Scheduler):
        def schedule(self):
            out = super().schedule()
            pairs = out.blocks_to_swap_in
            out.blocks_to_swap_in = [(c, g) for (c, _), (_, g) in zip(pairs, reversed(pairs),
                                                                         strict=True)]
            return out

    sched_kwargs, cache_kwargs = CONFIGS["tiny_pool_swap"]
    sched = SchedulerConfig(max_model_len=MAX_MODEL_LEN, watermark=0.0, **sched_kwargs)
    cache = CacheConfig(block_size=4, **cache_kwargs)
    with pytest.raises(AssertionError):
        result = run_workload(workload(), sched, cache, scheduler_factory=WrongSwapScheduler)
        assert result.outputs == expected_outputs(workload(), MAX_MODEL_LEN)


def test_fake_worker_reads_through_block_table():
    scheduler = Scheduler(SchedulerConfig(watermark=0.0), CacheConfig(block_size=4,
                                                                       num_gpu_blocks=8))
    worker = FakeWorker(4, 8, 0)
    scheduler.add_request(Request("r", [5, 6, 7, 8, 9], SamplingParams(max_tokens=2, seed=1)))
    out = scheduler.schedule()
    sampled = worker.execute(out)
    assert worker.tables == {"r": [0, 1]}
    assert worker.gpu[:5] == [5, 6, 7, 8, 9]
    assert sampled == {"r": next_token(1, [5, 6, 7, 8, 9])}
