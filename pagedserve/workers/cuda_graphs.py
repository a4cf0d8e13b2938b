"""CUDA graphs for decode steps: one captured forward per padded batch size.

A decode step of a large model is hundreds of small kernel launches; replaying a captured graph
removes the launch gaps. Inputs live in static buffers that each step overwrites; batches are
padded up to the next captured size with slot -1 (no KV write) and context length 1.
The attention kernels are sized from host-side bounds only (max query length 1, max sequence
length = max_model_len), so one graph serves every decode batch of its size.
"""

from __future__ import annotations

import logging

import torch

from pagedserve.workers.layers.attention import AttentionMetadata, KVCache

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

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest graph that holds this decode batch (one token per sequence,
        inputs on the device); hidden states [n, H]. Rows past the batch are padding: slot -1
        (no KV write) and context length 1; their stale ids, positions and tables are valid
        values whose results are dropped."""
        count = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= count)
        self.input_ids[:count].copy_(input_ids)
        self.positions[:count].copy_(positions)
        self.slot_mapping[:count].copy_(metadata.slot_mapping)
        self.seq_lens[:count].copy_(metadata.seq_lens)
        if size > count:
            self.slot_mapping[count:size].fill_(-1)
            self.seq_lens[count:size].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:count, :width].copy_(metadata.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:count]
