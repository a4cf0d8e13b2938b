"""A minimal stand-in for the engine: runs a model step by step through a paged KV cache.

Blocks are handed out from a shuffled free list, so every sequence's blocks are scattered and
out of order in the pool, which is what makes a wrong block-table lookup visible.
"""

from __future__ import annotations

import random

import torch

from pagedserve.workers.kv_pool import allocate_kv_cache_for_config
from pagedserve.workers.layers.attention import AttentionMetadata


class PagedRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4,
                 seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        weight = next(model.parameters())
        self.device = weight.device
        self.kv_caches = allocate_kv_cache_for_config(model.config, num_blocks, block_size,
                                                      weight.dtype, self.device,
                                                      tp_size=model.tp.size)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def _slot(self, seq_id: str, position: int) -> int:
        table = self.block_tables[seq_id]
        while len(table) <= position // self.block_size:
            table.append(self.free_blocks.pop())
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def metadata(self, chunks: list[tuple[str, list[int]]]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids, positions and metadata for one step; chunks = (sequence id, new tokens)."""
        input_ids, positions, slots, query_start_loc, seq_lens = [], [], [], [0], []
        for seq_id, tokens in chunks:
            self.block_tables.setdefault(seq_id, [])
            start = self.lengths.get(seq_id, 0)
            for offset, token in enumerate(tokens):
                input_ids.append(token)
                positions.append(start + offset)
                slots.append(self._slot(seq_id, start + offset))
            self.lengths[seq_id] = start + len(tokens)
            query_start_loc.append(query_start_loc[-1] + len(tokens))
            seq_lens.append(self.lengths[seq_id])
        tables = [self.block_tables[seq_id] for seq_id, _ in chunks]
        width = max(len(table) for table in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=block_tables,
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            max_query_len=max(len(tokens) for _, tokens in chunks),
            max_seq_len=max(seq_lens),
        )
        return (torch.tensor(input_ids, device=self.device),
                torch.tensor(positions, device=self.device), metadata.to(self.device))

    @torch.no_grad()
    def step(self, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor | None]:
        """Run one step; returns each chunk's logits [len(tokens), vocab] (None off rank 0)."""
        input_ids, positions, metadata = self.metadata(chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        logits = self.model.compute_logits(hidden)
        if logits is None:
            return [None] * len(chunks)
        return list(logits.split([len(tokens) for _, tokens in chunks]))
