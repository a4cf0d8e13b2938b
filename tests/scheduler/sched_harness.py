"""Shared helpers for the scheduler tests: a fake model that reads its KV back through the
block tables, an independent reference generator, and a step-loop driver.

The fake "model" derives each next token from the whole token history *as read back from a fake
KV store*. The store is only ever written through what the scheduler output says (slot mapping,
table deltas, swap and copy lists), so a wrong block table, slot, copy-on-write copy or swap
changes the history the model sees and therefore the generated stream.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.output import PLACEHOLDER_TOKEN_ID, SchedulerOutput
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler, child_request_id

VOCAB = 61
POISON = -7


def next_token(seed: int | None, history: list[int]) -> int:
    """Deterministic 'model': a hash of the seed and the whole history, mod the vocabulary."""
    data = array("q", [-1 if seed is None else seed, *history]).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % VOCAB


def reference_stream(prompt: list[int], params: SamplingParams, eos: int | None,
                     max_model_len: int, seed: int | None) -> tuple[list[int], FinishReason]:
    """What a request must produce, computed without any scheduler or KV cache."""
    stop_ids = set(params.stop_token_ids or ())
    if eos is not None and not params.ignore_eos:
        stop_ids.add(eos)
    out: list[int] = []
    while True:
        token = next_token(seed, prompt + out)
        out.append(token)
        if len(out) >= params.min_tokens and token in stop_ids:
            return out, FinishReason.STOP
        if (params.max_tokens is not None and len(out) >= params.max_tokens) or (
                len(prompt) + len(out) >= max_model_len):
            return out, FinishReason.LENGTH


class FakeWorker:
    """Keeps a token-id 'KV cache' per slot and per-request block tables, as a worker would."""

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        self.block_size = block_size
        self.gpu = [POISON] * (block_size * num_gpu_blocks)
        self.cpu = [POISON] * (block_size * max(num_cpu_blocks, 0))
        self.tables: dict[str, list[int]] = {}
        self.seeds: dict[str, int | None] = {}
        self.last_sampled: dict[str, int] = {}
        """What the previous step sampled: the ids behind this step's placeholder tokens."""

    def _move(self, src_store, src, dst_store, dst) -> None:
        size = self.block_size
        dst_store[dst * size:(dst + 1) * size] = src_store[src * size:(src + 1) * size]

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        size = self.block_size
        for request_id in out.forgotten_request_ids:
            assert request_id in self.tables, f"forgot unknown request {request_id}"
            del self.tables[request_id]
        for gpu_block, cpu_block in out.blocks_to_swap_out:
            self._move(self.gpu, gpu_block, self.cpu, cpu_block)
        for cpu_block, gpu_block in out.blocks_to_swap_in:
            self._move(self.cpu, cpu_block, self.gpu, gpu_block)
        for src, dst in out.blocks_to_copy:
            self._move(self.gpu, src, self.gpu, dst)
        for item in out.scheduled:
            if item.new_request is not None:
                assert item.request_id not in self.tables, f"{item.request_id} sent twice"
                assert item.table_start == 0
                self.tables[item.request_id] = []
                self.seeds[item.request_id] = item.new_request.sampling_params.seed
            table = self.tables[item.request_id]
            assert 0 <= item.table_start <= len(table)
            table[item.table_start:] = item.table_blocks
        assert out.num_batched_tokens == sum(item.num_tokens for item in out.scheduled)
        for item in out.scheduled:
            table = self.tables[item.request_id]
            for offset, token in enumerate(item.token_ids):
                position = item.start_position + offset
                assert position // size < len(table), f"{item.request_id} has no block there"
                slot = table[position // size] * size + position % size  # the ranks' rule
                if token == PLACEHOLDER_TOKEN_ID:
                    assert offset == len(item.token_ids) - 1, "placeholder before the last token"
                    token = self.last_sampled[item.request_id]
                self.gpu[slot] = token
        sampled = {}
        for item in out.scheduled:
            if not item.sample:
                continue
            table = self.tables[item.request_id]
            history = [self.gpu[table[p // size] * size + p % size] for p in range(item.seq_len)]
            assert POISON not in history, f"{item.request_id} read a freed slot: {history}"
            sampled[item.request_id] = next_token(self.seeds[item.request_id], history)
        self.last_sampled = sampled
        return sampled

    def poison_free_blocks(self, scheduler: Scheduler) -> None:
        """Overwrite blocks that hold nothing anyone may read again (plain free blocks)."""
        size = self.block_size
        pool = scheduler.kv.pool
        for block_id in pool.free_block_ids():
            if pool.block_hash[block_id] is None:
                self.gpu[block_id * size:(block_id + 1) * size] = [POISON] * size
        if scheduler.kv.cpu_pool is not None:
            for block_id in scheduler.kv.cpu_pool.free_block_ids():
                self.cpu[block_id * size:(block_id + 1) * size] = [POISON] * size


@dataclass
class Spec:
    """One request of a scripted workload."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_step: int = 0
    eos: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    abort_step: int | None = None
    """Abort the request (all its sequences) just before this step's schedule()."""


@dataclass
class RunResult:
    outputs: dict[str, tuple[list[int], FinishReason]] = field(default_factory=dict)
    num_steps: int = 0
    num_preemptions: int = 0
    max_batched_tokens: int = 0
    saw_swap: bool = False
    saw_copy: bool = False


def check_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """Invariants that must hold after every schedule() and update()."""
    kv = scheduler.kv
    kv.check_invariants()
    used = {b for table in kv.block_tables.values() for b in table}
    free = kv.pool.free_block_ids()
    assert not used & set(free), f"blocks both free and used: {sorted(used & set(free))}"
    assert len(free) + len(used) == kv.pool.num_blocks
    assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    assert len(out.scheduled) <= scheduler.config.max_num_seqs
    ids = [item.request_id for item in out.scheduled]
    assert len(ids) == len(set(ids))


def run_workload(specs: list[Spec], scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 max_steps: int = 5000, scheduler_factory=Scheduler,
                 overlap: bool = False) -> RunResult:
    """Drive the scheduler and the fake worker until every request ended. With `overlap`, each
    step is scheduled (and run) before the previous step's tokens reach the scheduler, as the
    engine core's async scheduling does."""
    scheduler = scheduler_factory(scheduler_config, cache_config)
    worker = FakeWorker(cache_config.block_size, cache_config.num_gpu_blocks,
                        cache_config.num_cpu_blocks)
    result = RunResult()
    seen: dict[str, Request] = {}
    aborted: set[str] = set()
    pending = sorted(specs, key=lambda s: s.arrival_step)
    step = 0
    in_flight: tuple[SchedulerOutput, dict[str, int]] | None = None
    while pending or scheduler.has_unfinished() or in_flight is not None:
        assert step < max_steps, f"no progress after {max_steps} steps: {scheduler.requests}"
        while pending and pending[0].arrival_step <= step:
            spec = pending.pop(0)
            scheduler.add_request(Request(spec.request_id, list(spec.prompt), spec.params,
                                          eos_token_id=spec.eos, arrival_time=float(step),
                                          priority=spec.priority, cache_salt=spec.cache_salt))
        for spec in specs:
            if spec.abort_step == step and spec.request_id not in aborted:
                aborted.add(spec.request_id)
                scheduler.abort_request(spec.request_id)
        seen.update(scheduler.requests)
        out = scheduler.schedule()
        check_step(scheduler, out)
        result.saw_swap |= bool(out.blocks_to_swap_out)
        result.saw_copy |= bool(out.blocks_to_copy)
        result.max_batched_tokens = max(result.max_batched_tokens, out.num_batched_tokens)
        seen.update(scheduler.requests)
        sampled = worker.execute(out)
        if overlap and not out.is_empty:
            if in_flight is not None:
                scheduler.update(*in_flight)
            in_flight = (out, sampled)
        else:
            if in_flight is not None:
                scheduler.update(*in_flight)
                in_flight = None
            scheduler.update(out, sampled)
        check_step(scheduler, out)
        worker.poison_free_blocks(scheduler)
        seen.update(scheduler.requests)
        step += 1
    result.num_steps = step
    result.num_preemptions = scheduler.num_preemptions
    parents = {spec.request_id for spec in specs if spec.params.n > 1}
    for request_id, request in seen.items():
        if request_id in parents and request.finish_reason is None:
            continue  # a parent with n > 1 handed its work to its children at the fork
        assert request.status is RequestStatus.FINISHED, request_id
        if request.finish_reason is not FinishReason.ABORT:
            result.outputs[request_id] = (list(request.output_token_ids), request.finish_reason)
    assert scheduler.children == {} and not scheduler._fork_pending
    kv = scheduler.kv
    assert kv.num_free_blocks == cache_config.num_gpu_blocks, "GPU blocks leaked"
    assert kv.block_tables == {} and kv.cpu_block_tables == {}
    if kv.cpu_pool is not None:
        assert kv.cpu_pool.num_free_blocks == cache_config.num_cpu_blocks, "CPU blocks leaked"
    kv.check_invariants()
    return result


def expected_outputs(specs: list[Spec], max_model_len: int
                     ) -> dict[str, tuple[list[int], FinishReason]]:
    """Reference streams of every sequence of every spec (n > 1 expands to children)."""
    expected = {}
    for spec in specs:
        params = spec.params
        if params.n == 1:
            expected[spec.request_id] = reference_stream(spec.prompt, params, spec.eos,
                                                         max_model_len, params.seed)
        else:
            for index in range(params.n):
                seed = None if params.seed is None else params.seed + index
                expected[child_request_id(spec.request_id, index)] = reference_stream(
                    spec.prompt, params, spec.eos, max_model_len, seed)
    return expected
