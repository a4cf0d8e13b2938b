"""Turns one SchedulerOutput into tensors, runs the model over the paged KV pool, samples.

The worker keeps each request's token history, and its block table as a persistent device row
(`BlockTableRows`), both updated from the deltas the scheduler sends, so a decode step ships one
token and at most one block id per request. Positions and KV slots are derived on the device
from the rows and each sequence's start and length, never shipped per token. Block moves (swap
out, swap in, copy-on-write) run before the forward, in that order. An overlapped step returns
before its sampled ids reach the host: they stay on the device to fill the next
step's placeholder tokens, and their host copies are read (and returned) during that next step,
once its forward is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.kernels.block_ops import (
    copy_blocks,
    copy_blocks_reference,
    swap_blocks,
    swap_blocks_reference,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.output import (
    PLACEHOLDER_TOKEN_ID,
    SchedulerOutput,
    StepResult,
    TokenLogprobs,
)
from pagedserve.workers.block_table_rows import BlockTableRows
from pagedserve.workers.cuda_graphs import DecodeGraphs
from pagedserve.workers.layers.attention import KVCache
from pagedserve.workers.sampler import LogprobsTensors, compute_prompt_logprobs, sample
from pagedserve.workers.sampling_batch import SamplingBatch, SamplingRequest
from pagedserve.workers.step_inputs import build_step_inputs
from pagedserve.workers.transfer import to_device


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams


def conflict_free_waves(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split (src, dst) copies, in order, into batches whose pairs may run in parallel.

    A block freed during scheduling can be a copy's destination after an earlier copy in the
    same step read it; running both at once would race, so a pair touching a block that the
    current batch writes (or reads, for its destination) starts a new batch.
    """
    waves: list[list[tuple[int, int]]] = []
    sources: set[int] = set()
    targets: set[int] = set()
    for src, dst in pairs:
        if not waves or src in targets or dst in sources or dst in targets:
            waves.append([])
            sources, targets = set(), set()
        waves[-1].append((src, dst))
        sources.add(src)
        targets.add(dst)
    return waves


def _to_token_logprobs(tensors: LogprobsTensors, rows: range | list[int],
                       num_top: int | list[int]) -> list[TokenLogprobs]:
    """Host-side entries for `rows`, with `num_top` alternatives each (one number for all rows
    or one per row). One device-to-host copy per tensor, whatever the number of rows."""
    tops = [num_top] * len(rows) if isinstance(num_top, int) else num_top
    token_ids = tensors.token_ids.tolist()
    values = tensors.token_logprobs.tolist()
    ranks = tensors.token_ranks.tolist()
    top_ids = tensors.top_token_ids[:, :max(tops, default=0)].tolist()
    top_values = tensors.top_logprobs[:, :max(tops, default=0)].tolist()
    return [TokenLogprobs(token_ids[r], values[r], ranks[r],
                          list(zip(top_ids[r][:top], top_values[r][:top], strict=True)))
            for r, top in zip(rows, tops, strict=True)]


class ModelRunner:
    """One rank's model, KV pool and per-request state; `execute` runs one scheduler step."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], block_size: int,
                 max_model_len: int, cpu_kv_caches: list[KVCache] | None = None,
                 eos_token_ids: tuple[int, ...] = (), seed: int = 0,
                 cuda_graph_max_batch: int = 0) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.cpu_kv_caches = cpu_kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = model.config.vocab_size
        self.device = kv_caches[0][0].device
        self.is_driver = model.tp.is_first_rank
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.states: dict[str, _RequestState] = {}
        self.block_tables = BlockTableRows(self.device, -(-max_model_len // block_size))
        self._in_flight: _PendingResult | None = None
        """The overlapped step whose result goes back with the next call."""
        self._sampled_ids: torch.Tensor | None = None
        """The last overlapped step's sampled ids, on the device, for placeholder tokens."""
        self._sampled_rows: dict[str, int] = {}
        """Request id -> its row in _sampled_ids."""
        self._last_step_end: torch.cuda.Event | None = None
        """Recorded after the last finished step's GPU work: the start of the idle gap."""
        self.graphs = None
        if cuda_graph_max_batch and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_caches, block_size, max_model_len,
                                       cuda_graph_max_batch)

    # ---- state and block moves ----------------------------------------------------------

    def _apply_updates(self, step: SchedulerOutput) -> None:
        for request_id in step.forgotten_request_ids:
            self.states.pop(request_id, None)
        for item in step.scheduled:
            if item.new_request is not None:
                data = item.new_request
                self.states[item.request_id] = _RequestState(
                    list(data.prompt_token_ids), list(data.output_token_ids),
                    data.sampling_params)
        self.block_tables.apply(step)

    def _move_blocks(self, step: SchedulerOutput) -> None:
        on_gpu = self.device.type == "cuda"
        swap = swap_blocks if on_gpu else swap_blocks_reference
        for pairs, sources, targets in (
            (step.blocks_to_swap_out, self.kv_caches, self.cpu_kv_caches),
            (step.blocks_to_swap_in, self.cpu_kv_caches, self.kv_caches),
        ):
            if not pairs:
                continue
            swap(
                [cache for layer in sources for cache in layer],
                [cache for layer in targets for cache in layer],
                torch.tensor(pairs, dtype=torch.int64),
            )
        copy = copy_blocks if on_gpu else copy_blocks_reference
        for wave in conflict_free_waves(step.blocks_to_copy):
            mapping = to_device(wave, torch.int64, self.device)
            copy([k for k, _ in self.kv_caches], [v for _, v in self.kv_caches], mapping)

    # ---- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        """Apply block moves, run the forward, sample on the driver rank. Returns the results
        of the steps that finished: the previous one if it overlapped, then this one unless it
        overlaps (its sampled ids stay on the device for the next step's placeholders)."""
        self._apply_updates(step)
        pending = _PendingResult(StepResult(step_id=step.step_id))
        if self.device.type == "cuda" and step.scheduled:
            pending.started = torch.cuda.Event(enable_timing=True)
            pending.started.record()
        self._move_blocks(step)
        previous, self._in_flight = self._in_flight, None
        finished = []
        logits = None
        sample_rows: list[int] = []
        if step.scheduled:
            logits, sample_rows = self._forward(step, pending)
        # Placeholders name only the step just before theirs; an overlapped step sets new ones.
        self._sampled_ids, self._sampled_rows = None, {}
        if previous is not None:
            # After this step's forward is queued: the device runs it while the host waits.
            finished.append(self._resolve(previous))
        if sample_rows:
            self._sample(step, sample_rows, logits, pending, overlap=step.overlap)
        if self.device.type == "cuda":
            pending.ready = torch.cuda.Event(enable_timing=pending.started is not None)
            pending.ready.record()
        if step.overlap:
            self._in_flight = pending
        else:
            finished.append(self._resolve(pending))
        return finished

    def _resolve(self, pending: _PendingResult) -> StepResult:
        result = pending.resolve(self.states)
        if pending.started is not None:  # both events have passed: ready waited for them
            if self._last_step_end is not None:
                result.gpu_idle_seconds = \
                    self._last_step_end.elapsed_time(pending.started) / 1e3
            self._last_step_end = pending.ready
        return result

    def _forward(self, step: SchedulerOutput, pending: _PendingResult):
        """Queue the forward (and prompt logprobs); returns logits of the rows that sample."""
        inputs = build_step_inputs(step, self.block_tables, self.block_size, self.device)
        fill = self._placeholder_filler(step)
        if fill is not None:
            fill(inputs.input_ids)
        query_start_loc = inputs.query_start_loc
        is_decode = inputs.metadata.max_query_len == 1
        if self.graphs is not None and is_decode and self.graphs.fits(len(step.scheduled)):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.metadata)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches,
                                inputs.metadata)
        sample_rows = [i for i, item in enumerate(step.scheduled) if item.sample]
        prompt_rows = [i for i, item in enumerate(step.scheduled)
                       if self.states[item.request_id].params.prompt_logprobs is not None
                       and item.start_position < len(self.states[item.request_id]
                                                     .prompt_token_ids) - 1]
        last_token_index = [query_start_loc[i + 1] - 1 for i in sample_rows]
        logits = self.model.compute_logits(
            hidden[to_device(last_token_index, torch.int64, hidden.device)]) if sample_rows \
            else None
        if prompt_rows:
            self._prompt_logprobs(step, prompt_rows, hidden, query_start_loc, pending)
        return logits, sample_rows

    def _placeholder_filler(self, step: SchedulerOutput):
        """None when no token of `step` is a placeholder; else a function that writes the
        previous step's sampled ids (still on the device) into an input-id tensor in place."""
        positions: list[int] = []
        rows: list[int] = []
        index = -1
        for item in step.scheduled:
            index += item.num_tokens
            if item.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                row = self._sampled_rows.get(item.request_id)
                if row is None:
                    raise RuntimeError(f"request {item.request_id!r} has a placeholder token but "
                                       "the previous step sampled nothing for it")
                positions.append(index)
                rows.append(row)
        if not positions:
            return None
        sampled = self._sampled_ids
        where = to_device([positions, rows], torch.int64, self.device)

        def fill(input_ids: torch.Tensor) -> None:
            input_ids[where[0]] = sampled[where[1]]
        return fill

    def _sample(self, step: SchedulerOutput, rows: list[int], logits: torch.Tensor | None,
                pending: _PendingResult, overlap: bool) -> None:
        items = [step.scheduled[i] for i in rows]
        pending.sample_ids = [item.request_id for item in items]
        token_ids = None
        if self.is_driver:
            states = [self.states[item.request_id] for item in items]
            batch = SamplingBatch.from_requests(
                [SamplingRequest(s.params, s.prompt_token_ids, s.output_token_ids)
                 for s in states], self.vocab_size, self.device, self.eos_token_ids)
            output = sample(logits, batch, self.generator)
            token_ids = output.token_ids
            if output.logprobs is not None:
                pending.logprob_rows = [index for index, state in enumerate(states)
                                        if state.params.logprobs is not None]
                pending.logprob_tops = [states[index].params.logprobs
                                        for index in pending.logprob_rows]
                pending.logprobs = output.logprobs.to_host()
            pending.token_ids = token_ids.to("cpu", non_blocking=True)
        if overlap:
            if token_ids is None:  # the other ranks get rank 0's ids for the next step
                token_ids = torch.empty(len(items), dtype=torch.int64, device=self.device)
            self._sampled_ids = self.model.tp.broadcast_from_first(token_ids)
            self._sampled_rows = {request_id: row
                                  for row, request_id in enumerate(pending.sample_ids)}

    def _prompt_logprobs(self, step: SchedulerOutput, rows: list[int], hidden: torch.Tensor,
                         query_start_loc: list[int], pending: _PendingResult) -> None:
        for row in rows:
            item = step.scheduled[row]
            state = self.states[item.request_id]
            num_prompt = len(state.prompt_token_ids)
            start = item.start_position
            end = min(item.seq_len, num_prompt - 1)
            first = query_start_loc[row]
            logits = self.model.compute_logits(hidden[first:first + end - start])
            if logits is None:
                continue
            next_ids = to_device(state.prompt_token_ids[start + 1:end + 1], torch.int64,
                                 logits.device)
            num_top = state.params.prompt_logprobs
            tensors = compute_prompt_logprobs(logits, next_ids, max(num_top, 1))
            pending.prompt_logprobs.append((item.request_id, start + 1, end - start, num_top,
                                            tensors.to_host()))


@dataclass
class _PendingResult:
    """A step's result whose host copies may still be under way (read after `ready`)."""

    result: StepResult
    sample_ids: list[str] = field(default_factory=list)
    """Request id of each sampled row."""
    token_ids: torch.Tensor | None = None
    """Host copy of the sampled ids (rank 0 only)."""
    logprobs: LogprobsTensors | None = None
    logprob_rows: list[int] = field(default_factory=list)
    logprob_tops: list[int] = field(default_factory=list)
    prompt_logprobs: list[tuple[str, int, int, int, LogprobsTensors]] = field(
        default_factory=list)
    """(request id, first prompt position covered, positions, top alternatives, host copies)."""
    ready: torch.cuda.Event | None = None
    """Recorded after the copies were queued; None on CPU (copies are done)."""
    started: torch.cuda.Event | None = None
    """Recorded before the step's first kernel (CUDA steps with work only)."""

    def resolve(self, states: dict[str, _RequestState]) -> StepResult:
        """Wait for the copies, then fill the result and extend the requests' histories."""
        if self.ready is not None:
            self.ready.synchronize()
        result = self.result
        for request_id, start, count, num_top, tensors in self.prompt_logprobs:
            result.prompt_logprobs[request_id] = (start, _to_token_logprobs(tensors,
                                                                            range(count), num_top))
        if self.token_ids is None:
            return result
        for request_id, token_id in zip(self.sample_ids, self.token_ids.tolist(), strict=True):
            result.sampled[request_id] = token_id
            state = states.get(request_id)
            if state is not None:  # forgotten by now: finished, aborted or preempted
                state.output_token_ids.append(token_id)
        if self.logprobs is not None:
            entries = _to_token_logprobs(self.logprobs, self.logprob_rows, self.logprob_tops)
            for row, entry in zip(self.logprob_rows, entries, strict=True):
                result.logprobs[self.sample_ids[row]] = entry
        return result
