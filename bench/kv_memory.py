"""KV-cache memory efficiency of paged allocation versus contiguous reservation (vLLM paper, §6).

Everything runs the real pure-Python scheduler and block manager with a fake model that emits one
fixed token id; no tensors, no torch. Four parts:

1. Memory efficiency. A ShareGPT-like trace (seeded) is replayed through `Scheduler` at several KV
   memory sizes. All requests arrive at t=0 (an offline batch, like vLLM's throughput benchmark),
   so the KV memory is the binding limit for most of the run. Per step, after `schedule()` (when
   this step's slots are allocated and the step's KV writes are accounted for) we record the
   tokens whose KV is stored (sum of running requests' computed tokens) and the slots of blocks
   taken from the pool (pool size minus free blocks; free blocks that still hold a cached prefix
   count as free). useful fraction = sum over steps of stored tokens / sum over steps of
   allocated slots, i.e. the ratio of the two time averages. The same trace then runs through two
   contiguous allocators simulated with the scheduler's step rules (token budget, chunked
   prefill, FCFS admission while the reservation fits in the same number of token slots):
   "contiguous-max" reserves max_model_len per request (Orca-max), "contiguous-oracle" reserves
   prompt + max_tokens (Orca-oracle). Their useful fraction is stored tokens / reserved slots.
   External fragmentation is ignored, which flatters both baselines. "useful" measures waste
   inside allocations only (it barely depends on the memory size); "pool@sat" is stored tokens /
   all slots of the memory, over the steps when requests are still waiting for memory.
2. Block size 8/16/32 for the paged allocator at the headline memory (same token slots).
3. Sharing. Parallel sampling n=2,4,6 through the scheduler (SamplingParams(n=k), prefix caching
   on) versus k independent requests per prompt with prefix caching off; saving = 1 - (block
   steps shared / block steps unshared), block steps = sum over steps of blocks taken from the
   pool. Beam search (widths 2/4/6) is emulated on an Alpaca-like trace with
   KVCacheManager.fork: every step each survivor forks from its parent beam, the old beams are
   freed, and each new beam writes one token (copy-on-write of a shared partial last block).
   Its no-sharing reference is what each beam would hold alone: ceil(tokens / block size).
4. Scheduler CPU cost per step (`schedule()` + `update()`) in steady decode at 64/256/1024
   running sequences.

Length model: lognormal per direction with log-space sigma 1.2 (input) / 0.9 (output) for
ShareGPT and 0.6 / 0.6 for Alpaca, which gives heavy tails with the median about half the mean
as in the published histograms. Lengths are rounded and clipped to [4, max_model_len] with
prompt + output <= max_model_len, and mu is fitted so each drawn trace's mean equals the vLLM
paper's (Fig. 11: ShareGPT 161.31 in / 337.99 out; Alpaca 19.31 in / 58.45 out). The realized
means and medians are reported next to the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.request import Request
from pagedserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("kv_memory")

MAX_MODEL_LEN = 2048
MIN_LEN = 4
CALIBRATION_ROUNDS = 8
FAKE_TOKEN_ID = 7
"""Every sampled token; requests set ignore_eos so output lengths are exactly max_tokens."""
VOCAB_SIZE = 32000
"""Prompt token ids are drawn uniformly from this range, so prompts never share a prefix."""
MAX_NUM_BATCHED_TOKENS = 8192
MAX_NUM_SEQS = 1024
"""High enough that KV memory, not the sequence cap, limits the batch at every memory size."""
HEADLINE_BLOCK_SIZE = 16
HEADLINE_NUM_BLOCKS = 2048
MEMORY_SIZES_BLOCKS = (1024, 2048, 4096, 8192)
BLOCK_SIZES = (8, 16, 32)
PARALLEL_SAMPLING_N = (2, 4, 6)
BEAM_WIDTHS = (2, 4, 6)
BEAM_VOCAB_SIZE = 1000
BEAM_LOGIT_STD = 2.0
"""Random model of beam search: iid normal logits per beam and step over a small vocabulary."""
DECODE_BATCH_SIZES = (64, 256, 1024)
DECODE_PROMPT_LEN = 128
DECODE_WARMUP_STEPS = 20
DECODE_TIMED_STEPS = 300


@dataclass(frozen=True)
class LengthModel:
    """Lognormal input/output lengths given by their means and log-space sigmas."""

    name: str
    mean_input: float
    sigma_input: float
    mean_output: float
    sigma_output: float

    def draw(self, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """(prompt length, output length) pairs, clipped so prompt + output <= MAX_MODEL_LEN."""
        prompts = _fitted_lognormal(
            rng.standard_normal(count), self.sigma_input, self.mean_input, MAX_MODEL_LEN - MIN_LEN
        )
        outputs = _fitted_lognormal(
            rng.standard_normal(count), self.sigma_output, self.mean_output, MAX_MODEL_LEN - prompts
        )
        return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def _fitted_lognormal(
    normals: np.ndarray, sigma: float, target_mean: float, upper: int | np.ndarray
) -> np.ndarray:
    """Lengths exp(mu + sigma * normals), rounded and clipped to [MIN_LEN, upper], with mu fitted
    so that the sample mean after clipping equals target_mean.

    Matching the sample rather than the distribution keeps a small, heavy-tailed trace (one
    draw of sigma 1.2 has a standard error of several tokens) on the published mean.
    """
    # Start from the mu whose unclipped mean is the target: E[X] = exp(mu + sigma^2 / 2).
    mu = math.log(target_mean) - sigma**2 / 2
    for _ in range(CALIBRATION_ROUNDS):
        lengths = np.clip(np.rint(np.exp(mu + sigma * normals)), MIN_LEN, upper)
        mu += math.log(target_mean / lengths.mean())
    return np.clip(np.rint(np.exp(mu + sigma * normals)), MIN_LEN, upper).astype(np.int64)


SHAREGPT = LengthModel("sharegpt", 161.31, 1.2, 337.99, 0.9)
ALPACA = LengthModel("alpaca", 19.31, 0.6, 58.45, 0.6)


@dataclass
class Trace:
    lengths: list[tuple[int, int]]
    prompts: list[list[int]]

    @classmethod
    def draw(cls, model: LengthModel, count: int, rng: np.random.Generator) -> Trace:
        lengths = model.draw(count, rng)
        prompts = [rng.integers(0, VOCAB_SIZE, prompt_len).tolist() for prompt_len, _ in lengths]
        return cls(lengths, prompts)

    def summary(self) -> dict[str, float]:
        prompt_lens = [p for p, _ in self.lengths]
        output_lens = [o for _, o in self.lengths]
        return {
            "num_requests": len(self.lengths),
            "mean_input": statistics.fmean(prompt_lens),
            "median_input": statistics.median(prompt_lens),
            "max_input": max(prompt_lens),
            "mean_output": statistics.fmean(output_lens),
            "median_output": statistics.median(output_lens),
            "max_output": max(output_lens),
        }


@dataclass
class AllocatorRun:
    """One trace through one allocator at one memory size."""

    allocator: str
    block_size: int
    num_blocks: int
    useful_fraction: float
    saturated_pool_fraction: float
    """Stored tokens / all pool slots, over the steps with requests still waiting (when the
    KV memory is what limits the batch): how much of the whole memory holds real tokens."""
    mean_running: float
    steps: int
    output_tokens_per_step: float
    preemptions: int


def make_scheduler(
    block_size: int,
    num_blocks: int,
    *,
    max_num_seqs: int = MAX_NUM_SEQS,
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=MAX_MODEL_LEN,
        ),
        CacheConfig(
            block_size=block_size,
            num_gpu_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
    )


def step_fake_model(scheduler: Scheduler) -> int:
    """One schedule() + update() with the fixed-token model; returns the tokens sampled."""
    out = scheduler.schedule()
    if out.is_empty:
        raise RuntimeError("scheduler made no progress with unfinished requests")
    sampled = {item.request_id: FAKE_TOKEN_ID for item in out.scheduled if item.sample}
    scheduler.update(out, sampled)
    return len(sampled)


def run_paged(trace: Trace, block_size: int, num_blocks: int) -> AllocatorRun:
    scheduler = make_scheduler(block_size, num_blocks)
    for index, (prompt, (_, output_len)) in enumerate(
        zip(trace.prompts, trace.lengths, strict=True)
    ):
        # Distinct arrival times keep the newest-first victim policy deterministic.
        scheduler.add_request(
            Request(
                f"req-{index}",
                prompt,
                SamplingParams(max_tokens=output_len, ignore_eos=True),
                arrival_time=float(index),
            )
        )
    pool = scheduler.kv.pool
    stored_token_steps = allocated_slot_steps = running_steps = steps = generated = 0
    saturated_stored = saturated_steps = 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if out.is_empty:
            raise RuntimeError("scheduler made no progress with unfinished requests")
        steps += 1
        stored = sum(r.num_computed_tokens for r in scheduler.running)
        stored_token_steps += stored
        if len(scheduler.waiting):
            saturated_stored += stored
            saturated_steps += 1
        allocated_slot_steps += (pool.num_blocks - pool.num_free_blocks) * block_size
        running_steps += len(scheduler.running)
        sampled = {item.request_id: FAKE_TOKEN_ID for item in out.scheduled if item.sample}
        generated += len(sampled)
        scheduler.update(out, sampled)
    scheduler.kv.check_invariants()
    if pool.num_free_blocks != pool.num_blocks:
        raise RuntimeError("blocks leaked after every request finished")
    return AllocatorRun(
        "paged",
        block_size,
        num_blocks,
        stored_token_steps / allocated_slot_steps,
        saturated_stored / max(saturated_steps * num_blocks * block_size, 1),
        running_steps / steps,
        steps,
        generated / steps,
        scheduler.num_preemptions,
    )


class ContiguousSequence:
    __slots__ = ("prompt_len", "output_len", "reserved", "computed", "generated")

    def __init__(self, prompt_len: int, output_len: int, reserved: int) -> None:
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.reserved = reserved
        self.computed = 0
        self.generated = 0

    def advance(self, budget: int) -> int:
        """Compute up to `budget` missing tokens (prefill chunk or one decode token).

        Samples a token once caught up, exactly like Scheduler._emit + update; returns the
        tokens computed.
        """
        chunk = min(self.prompt_len + self.generated - self.computed, budget)
        self.computed += chunk
        if self.computed == self.prompt_len + self.generated:
            self.generated += 1
        return chunk


def run_contiguous(
    trace: Trace, name: str, capacity_slots: int, reservation: Callable[[int, int], int]
) -> AllocatorRun:
    """Simulate a per-request contiguous KV buffer with the scheduler's step rules.

    A reservation never grows, so nothing is ever preempted; admission is FCFS while the
    reservation fits in the remaining slots and the step still has token budget.
    """
    waiting = deque(trace.lengths)
    running: list[ContiguousSequence] = []
    reserved_slots = 0
    stored_token_steps = reserved_slot_steps = running_steps = steps = generated = 0
    saturated_stored = saturated_steps = 0
    while waiting or running:
        budget = MAX_NUM_BATCHED_TOKENS
        generated_before = sum(seq.generated for seq in running)
        for seq in running:
            if budget == 0:
                break
            budget -= seq.advance(budget)
        admitted = []
        while waiting and budget > 0 and len(running) + len(admitted) < MAX_NUM_SEQS:
            prompt_len, output_len = waiting[0]
            reserve = reservation(prompt_len, output_len)
            if reserved_slots + reserve > capacity_slots:
                break
            waiting.popleft()
            seq = ContiguousSequence(prompt_len, output_len, reserve)
            reserved_slots += reserve
            budget -= seq.advance(budget)
            admitted.append(seq)
        running.extend(admitted)
        if not running:
            raise RuntimeError(f"{name}: a request does not fit in {capacity_slots} slots")
        steps += 1
        generated += sum(seq.generated for seq in running) - generated_before
        stored = sum(seq.computed for seq in running)
        stored_token_steps += stored
        if waiting:
            saturated_stored += stored
            saturated_steps += 1
        reserved_slot_steps += reserved_slots
        running_steps += len(running)
        finished = [seq for seq in running if seq.generated == seq.output_len]
        if finished:
            reserved_slots -= sum(seq.reserved for seq in finished)
            running = [seq for seq in running if seq.generated < seq.output_len]
    return AllocatorRun(
        name,
        HEADLINE_BLOCK_SIZE,
        capacity_slots // HEADLINE_BLOCK_SIZE,
        stored_token_steps / reserved_slot_steps,
        saturated_stored / max(saturated_steps * capacity_slots, 1),
        running_steps / steps,
        steps,
        generated / steps,
        0,
    )


def memory_size_sweep(trace: Trace) -> list[AllocatorRun]:
    contiguous = {
        "contiguous-max": lambda prompt_len, output_len: MAX_MODEL_LEN,
        "contiguous-oracle": lambda prompt_len, output_len: prompt_len + output_len,
    }
    runs = []
    for num_blocks in tqdm(MEMORY_SIZES_BLOCKS, desc="memory sizes", unit="size"):
        runs.append(run_paged(trace, HEADLINE_BLOCK_SIZE, num_blocks))
        for name, reservation in contiguous.items():
            runs.append(run_contiguous(trace, name, num_blocks * HEADLINE_BLOCK_SIZE, reservation))
    return runs


def block_size_sweep(trace: Trace, headline: AllocatorRun) -> list[AllocatorRun]:
    """Paged runs at the headline memory (same token slots) with other block sizes."""
    slots = HEADLINE_NUM_BLOCKS * HEADLINE_BLOCK_SIZE
    runs = []
    for block_size in tqdm(BLOCK_SIZES, desc="block sizes", unit="size"):
        if block_size == HEADLINE_BLOCK_SIZE:
            runs.append(headline)
        else:
            runs.append(run_paged(trace, block_size, slots // block_size))
    return runs


def block_steps_of(scheduler: Scheduler) -> tuple[int, int]:
    """Run to completion; (sum over steps of blocks taken from the pool, steps)."""
    pool = scheduler.kv.pool
    block_steps = steps = 0
    while scheduler.has_unfinished():
        step_fake_model(scheduler)
        steps += 1
        block_steps += pool.num_blocks - pool.num_free_blocks
    return block_steps, steps


def parallel_sampling_saving(trace: Trace, n: int) -> dict[str, float]:
    """Blocks held with fork sharing (n samples per request) vs n independent requests."""
    num_seqs = len(trace.lengths) * n
    # Room for every sequence at full length plus a copy-on-write block each: no preemption,
    # and a token budget that prefills every prompt in one step, so both runs step in lockstep.
    num_blocks = sum(n * (-(-(p + o) // HEADLINE_BLOCK_SIZE) + 1) for p, o in trace.lengths)
    budget = sum(p for p, _ in trace.lengths) * n
    results = {}
    for sharing in (True, False):
        scheduler = make_scheduler(
            HEADLINE_BLOCK_SIZE,
            num_blocks,
            max_num_seqs=num_seqs,
            max_num_batched_tokens=budget,
            enable_prefix_caching=sharing,
        )
        for index, (prompt, (_, output_len)) in enumerate(
            zip(trace.prompts, trace.lengths, strict=True)
        ):
            if sharing:
                params = SamplingParams(n=n, max_tokens=output_len, ignore_eos=True)
                scheduler.add_request(
                    Request(f"req-{index}", prompt, params, arrival_time=float(index))
                )
            else:
                params = SamplingParams(max_tokens=output_len, ignore_eos=True)
                for sample in range(n):
                    scheduler.add_request(
                        Request(f"req-{index}-{sample}", prompt, params, arrival_time=float(index))
                    )
        results[sharing] = block_steps_of(scheduler)
        if scheduler.num_preemptions:
            raise RuntimeError("parallel sampling run preempted; the pool is too small")
    (shared_block_steps, shared_steps), (unshared_block_steps, unshared_steps) = (
        results[True],
        results[False],
    )
    return {
        "n": n,
        "mean_blocks_shared": shared_block_steps / shared_steps,
        "mean_blocks_unshared": unshared_block_steps / unshared_steps,
        "saving": 1 - shared_block_steps / unshared_block_steps,
    }


def beam_search_saving(trace: Trace, width: int, rng: np.random.Generator) -> dict[str, float]:
    """Emulated beam search with fork/free on KVCacheManager; blocks held vs. no sharing."""
    block_size = HEADLINE_BLOCK_SIZE
    kv = KVCacheManager(
        block_size,
        num_gpu_blocks=width * MAX_MODEL_LEN // block_size + width,
        enable_prefix_caching=False,
    )
    pool = kv.pool
    shared_block_steps = unshared_block_steps = 0
    for index, (prompt_len, output_len) in enumerate(trace.lengths):
        root = Request(f"beam-{index}", trace.prompts[index])
        kv.allocate_slots(root, prompt_len)
        root.num_computed_tokens = prompt_len
        beams = [root]
        scores = np.zeros(1)
        for step in range(output_len):
            # Each beam proposes its `width` best continuations; the `width` best cumulative
            # scores survive, so a strong beam can have several children and a weak one none.
            logits = rng.normal(0.0, BEAM_LOGIT_STD, (len(beams), BEAM_VOCAB_SIZE))
            logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            top = np.argpartition(-logprobs, width, axis=1)[:, :width]
            candidates = (scores[:, None] + np.take_along_axis(logprobs, top, axis=1)).ravel()
            survivors = np.argsort(-candidates)[:width]
            scores = candidates[survivors]
            children = []
            for rank, candidate in enumerate(survivors.tolist()):
                parent = beams[candidate // width]
                child = Request(
                    f"beam-{index}-{step}-{rank}",
                    parent.prompt_token_ids,
                    num_computed_tokens=parent.num_computed_tokens,
                )
                kv.fork(parent.request_id, child.request_id)
                children.append(child)
            for beam in beams:
                kv.free(beam.request_id)
            for child in children:
                if kv.allocate_slots(child, 1) is None:
                    raise RuntimeError("beam search pool too small")
                child.num_computed_tokens += 1
            beams = children
            shared_block_steps += pool.num_blocks - pool.num_free_blocks
            unshared_block_steps += sum(
                -(-beam.num_computed_tokens // block_size) for beam in beams
            )
        for beam in beams:
            kv.free(beam.request_id)
    kv.check_invariants()
    steps = sum(output_len for _, output_len in trace.lengths)
    return {
        "width": width,
        "mean_blocks_shared": shared_block_steps / steps,
        "mean_blocks_unshared": unshared_block_steps / steps,
        "saving": 1 - shared_block_steps / unshared_block_steps,
    }


def scheduler_step_cost(num_running: int, rng: np.random.Generator) -> dict[str, float]:
    """Wall time of schedule() + update() with `num_running` sequences all decoding."""
    blocks_per_seq = -(-MAX_MODEL_LEN // HEADLINE_BLOCK_SIZE)
    scheduler = make_scheduler(
        HEADLINE_BLOCK_SIZE,
        num_running * blocks_per_seq,
        max_num_seqs=num_running,
        max_num_batched_tokens=max(MAX_NUM_BATCHED_TOKENS, num_running),
    )
    max_tokens = DECODE_WARMUP_STEPS + DECODE_TIMED_STEPS + num_running
    for index in range(num_running):
        prompt = rng.integers(0, VOCAB_SIZE, DECODE_PROMPT_LEN).tolist()
        scheduler.add_request(
            Request(
                f"decode-{index}",
                prompt,
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                arrival_time=float(index),
            )
        )
    # Warm up until every prompt is prefilled, then a few more steps of pure decode.
    while scheduler.waiting or any(r.num_output_tokens == 0 for r in scheduler.running):
        step_fake_model(scheduler)
    for _ in range(DECODE_WARMUP_STEPS):
        step_fake_model(scheduler)
    durations = []
    for _ in range(DECODE_TIMED_STEPS):
        started = time.perf_counter()
        out = scheduler.schedule()
        scheduled = time.perf_counter()
        # Building the fake model's output is the model's work, so it is not timed.
        sampled = {item.request_id: FAKE_TOKEN_ID for item in out.scheduled}
        resumed = time.perf_counter()
        scheduler.update(out, sampled)
        durations.append((scheduled - started) + (time.perf_counter() - resumed))
        if len(out.scheduled) != num_running or scheduler.num_preemptions:
            raise RuntimeError("steady decode state was not held during timing")
    durations_ms = sorted(d * 1e3 for d in durations)
    return {
        "num_running": num_running,
        "median_ms": statistics.median(durations_ms),
        "p90_ms": durations_ms[int(0.9 * len(durations_ms))],
        "us_per_seq": statistics.median(durations_ms) * 1e3 / num_running,
    }


def format_table(title: str, headers: list[str], rows: list[list[object]]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def render(report: dict) -> str:
    workload = report["workload"]
    sections = [
        "Workload: "
        + "; ".join(
            f"{name} n={s['num_requests']} in mean {s['mean_input']:.1f} (median "
            f"{s['median_input']:.0f}) out mean {s['mean_output']:.1f} (median "
            f"{s['median_output']:.0f})"
            for name, s in workload.items()
        ),
        format_table(
            f"KV memory sizes (block {HEADLINE_BLOCK_SIZE}; memory = blocks x "
            f"{HEADLINE_BLOCK_SIZE} token slots)",
            ["blocks", "allocator", "useful", "pool@sat", "running", "steps", "out tok/step",
             "preempt"],
            [
                [
                    r["num_blocks"],
                    r["allocator"],
                    r["useful_fraction"],
                    r["saturated_pool_fraction"],
                    r["mean_running"],
                    r["steps"],
                    r["output_tokens_per_step"],
                    r["preemptions"],
                ]
                for r in report["memory_sizes"]
            ],
        ),
        format_table(
            f"Paged block size at {HEADLINE_NUM_BLOCKS * HEADLINE_BLOCK_SIZE} token slots",
            ["block", "blocks", "useful", "running", "steps", "out tok/step", "preempt"],
            [
                [
                    r["block_size"],
                    r["num_blocks"],
                    r["useful_fraction"],
                    r["mean_running"],
                    r["steps"],
                    r["output_tokens_per_step"],
                    r["preemptions"],
                ]
                for r in report["block_sizes"]
            ],
        ),
        format_table(
            "Parallel sampling (scheduler, n samples share the prompt) vs n independent requests",
            ["trace", "n", "blocks shared", "blocks unshared", "saving %"],
            [
                [
                    r["trace"],
                    r["n"],
                    r["mean_blocks_shared"],
                    r["mean_blocks_unshared"],
                    f"{100 * r['saving']:.1f}",
                ]
                for r in report["parallel_sampling"]
            ],
        ),
        format_table(
            "Beam search emulation (alpaca, KVCacheManager.fork) vs no sharing",
            ["width", "blocks shared", "blocks unshared", "saving %"],
            [
                [
                    r["width"],
                    r["mean_blocks_shared"],
                    r["mean_blocks_unshared"],
                    f"{100 * r['saving']:.1f}",
                ]
                for r in report["beam_search"]
            ],
        ),
        format_table(
            "Scheduler CPU cost per decode step (schedule + update)",
            ["running", "median ms", "p90 ms", "us/seq"],
            [
                [r["num_running"], r["median_ms"], r["p90_ms"], f"{r['us_per_seq']:.2f}"]
                for r in report["scheduler_cost"]
            ],
        ),
        f"useful_fraction_paged={report['useful_fraction_paged']:.4f}  "
        f"useful_fraction_contiguous={report['useful_fraction_contiguous']:.4f}  "
        f"useful_fraction_contiguous_oracle={report['useful_fraction_contiguous_oracle']:.4f}  "
        f"runtime {report['runtime_s']:.1f} s",
    ]
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-requests",
        type=int,
        default=1000,
        help="ShareGPT-like requests in the memory-size and block-size runs",
    )
    parser.add_argument(
        "--num-sampling-requests",
        type=int,
        default=100,
        help="prompts per trace in the parallel sampling and beam runs",
    )
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    sharegpt = Trace.draw(SHAREGPT, args.num_requests, rng)
    sharegpt_sampling = Trace.draw(SHAREGPT, args.num_sampling_requests, rng)
    alpaca_sampling = Trace.draw(ALPACA, args.num_sampling_requests, rng)

    with logging_redirect_tqdm():
        logger.info("memory sizes %s blocks: paged vs contiguous", MEMORY_SIZES_BLOCKS)
        memory_sizes = memory_size_sweep(sharegpt)
        headline = next(
            r
            for r in memory_sizes
            if r.allocator == "paged" and r.num_blocks == HEADLINE_NUM_BLOCKS
        )
        logger.info("paged block sizes %s", BLOCK_SIZES)
        block_sizes = block_size_sweep(sharegpt, headline)
        logger.info("parallel sampling n=%s", PARALLEL_SAMPLING_N)
        parallel = [
            {"trace": trace_name, **parallel_sampling_saving(trace, n)}
            for trace_name, trace in (("sharegpt", sharegpt_sampling), ("alpaca", alpaca_sampling))
            for n in tqdm(PARALLEL_SAMPLING_N, desc=f"parallel sampling {trace_name}")
        ]
        logger.info("beam search widths %s", BEAM_WIDTHS)
        beams = [
            beam_search_saving(alpaca_sampling, width, rng)
            for width in tqdm(BEAM_WIDTHS, desc="beam search")
        ]
        logger.info("scheduler step cost at %s running sequences", DECODE_BATCH_SIZES)
        # A collection triggered by an earlier part's garbage would land in a timed step.
        gc.collect()
        costs = [
            scheduler_step_cost(num_running, rng)
            for num_running in tqdm(DECODE_BATCH_SIZES, desc="scheduler cost")
        ]

    def headline(allocator: str) -> AllocatorRun:
        return next(
            r
            for r in memory_sizes
            if r.allocator == allocator and r.num_blocks == HEADLINE_NUM_BLOCKS
        )

    report = {
        "seed": args.seed,
        "max_model_len": MAX_MODEL_LEN,
        "headline_num_blocks": HEADLINE_NUM_BLOCKS,
        "headline_block_size": HEADLINE_BLOCK_SIZE,
        "length_models": [asdict(SHAREGPT), asdict(ALPACA)],
        "arrivals": "all requests at t=0 (offline batch), FCFS",
        "workload": {
            "sharegpt": sharegpt.summary(),
            "sharegpt_sampling": sharegpt_sampling.summary(),
            "alpaca_sampling": alpaca_sampling.summary(),
        },
        "useful_fraction_paged": headline("paged").useful_fraction,
        "useful_fraction_contiguous": headline("contiguous-max").useful_fraction,
        "useful_fraction_contiguous_oracle": headline("contiguous-oracle").useful_fraction,
        "saturated_pool_fraction_paged": headline("paged").saturated_pool_fraction,
        "saturated_pool_fraction_contiguous": headline("contiguous-max").saturated_pool_fraction,
        "saturated_pool_fraction_contiguous_oracle": headline(
            "contiguous-oracle").saturated_pool_fraction,
        **{f"sched_ms_per_step_{c['num_running']}": c["median_ms"] for c in costs},
        "memory_sizes": [asdict(r) for r in memory_sizes],
        "block_sizes": [asdict(r) for r in block_sizes],
        "parallel_sampling": parallel,
        "beam_search": beams,
        "scheduler_cost": costs,
    }
    report["runtime_s"] = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    print(render(report))


if __name__ == "__main__":
    main()
