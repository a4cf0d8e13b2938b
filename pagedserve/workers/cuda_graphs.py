"""CUDA graphs for decode steps: one captured forward per padded batch size.

A decode step of a large model is hundreds of small kernel launches; replaying a captured graph
removes the launch gaps. Inputs live in static buffers that each step overwrites; batches are
padded up to the next captured size with slot -1 (no KV write) and context length 1.
The attention kernels are sized from host-side bounds only (max query length 1, max sequence
length = max_model_len), so one graph serves every decode batch of its size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.workers.layers.attention import AttentionMetadata, KVCache
from pagedserve.workers.transfer import to_device

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured sizes: 1, 2, 4, 8, then every multiple of 16 up to max_batch."""
    sizes = [size for size in (1, 2, 4, 8) if size <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode forwards for every size in graph_batch_sizes(max_batch)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], block_size: int,
                 max_model_len: int, max_batch: int) -> None:
        device = kv_caches[0][0].device
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.sizes = graph_batch_sizes(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            args = (self.input_ids[:size], self.positions[:size], self.kv_caches,
                    self._metadata(size))
            self.model(*args)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def run(self, step: SchedulerOutput, tables: list[list[int]],
            fill_placeholders: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Replay the smallest graph that holds this decode batch; hidden states [n, H].
        `fill_placeholders` writes the device-side ids of placeholder tokens into the inputs."""
        count = len(step.scheduled)
        size = next(s for s in self.sizes if s >= count)
        padding = size - count
        items = step.scheduled
        # One host-to-device copy for the four per-token rows (pads: token 0, position 0,
        # slot -1 so nothing is written, context length 1).
        rows = to_device(
            [item.token_ids[0] for item in items] + [0] * padding
            + [item.start_position for item in items] + [0] * padding
            + [item.slot_mapping[0] for item in items] + [-1] * padding
            + [item.seq_len for item in items] + [1] * padding,
            torch.int64, self.input_ids.device).view(4, size)
        self.input_ids[:size].copy_(rows[0])
        self.positions[:size].copy_(rows[1])
        self.slot_mapping[:size].copy_(rows[2])
        self.seq_lens[:size].copy_(rows[3])
        if fill_placeholders is not None:
            fill_placeholders(self.input_ids[:count])
        width = max(len(t) for t in tables)
        table_rows = to_device([t + [0] * (width - len(t)) for t in tables], torch.int32,
                               self.block_tables.device)
        self.block_tables[:count, :width].copy_(table_rows)
        self.graphs[size].replay()
        return self.outputs[size][:count]
