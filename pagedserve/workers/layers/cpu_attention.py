"""CPU decode attention over a contiguous copy of the batch's K/V, kept from step to step.

`paged_attention_cpu` gathers every key and value a sequence can see from the paged cache, in
every layer of every step: at SmolLM2-135M's shape (16 sequences of ~150 tokens, 30 layers)
that gather is about as long as the attention itself. A run of decode steps over the same
sequences re-reads the same keys each time, so each layer keeps the batch's K/V in one padded
buffer, ``[seqs, capacity, kv_heads, head_dim]`` in the compute dtype:

- a step that *continues* the one before it (only decode tokens, the same sequences in the same
  order with the same blocks in use, each exactly one token longer) copies this step's K/V rows
  (one per sequence, read back from the cache so the copy always equals what the cache holds)
  into the buffer and attends it with one masked SDPA;
- any other decode step rebuilds the buffer with one gather by slot from the paged cache (the
  free positions at the end of each row gather that sequence's first key);
- other steps (prefill, chunks, mixed batches), caches whose dtype is not the compute dtype
  (fp8), and buffers past `_MAX_COPY_BYTES` are not handled here (`attend` returns None and
  forgets the copy): the caller uses `paged_attention_cpu`.

The per-step description (`DecodeStep`: lengths, new-token slots, masks, whether it continues
the previous step) is made once per step and shared by the layers. Buffer positions past a
sequence's length are masked and always hold that sequence's own (finite) keys, so a stale NaN
can never leak in through a zero attention weight. A copy is held until a step it does not
serve replaces or forgets it (at most `_MAX_COPY_BYTES` per layer).
"""

from __future__ import annotations

import torch

from pagedserve.kernels.paged_attention import slot_rows

# Per layer, keys and values together: above it (very long or very many sequences) the copy
# would cost more memory than the gather it saves is worth.
_MAX_COPY_BYTES = 16 << 20
# Free positions a rebuilt buffer leaves past the longest sequence: few for a new batch (while
# sequences come and go, every step rebuilds, and gathers the free positions too), more when a
# run of steps over the same batch has filled the buffer (one rebuild per that many steps).
_NEW_BATCH_ROOM = 16
_GROWING_ROOM = 64
# Dtypes SDPA runs in directly; fp16 is computed in fp32, like paged_attention_cpu does.
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The entries of ``slots`` (int64, any shape) as ``dtype``: ``[*slots.shape, kv_heads,
    head_dim]``. The one place this module reads the paged cache (so the one place an fp8
    cache would be dequantized, once `attend` lets such caches in)."""
    rows = slot_rows(cache)
    flat = slots.flatten()
    if rows is not None:
        gathered = rows.index_select(0, flat)
    else:
        block_size = cache.shape[1]
        gathered = cache[flat // block_size, flat % block_size]
    return gathered.view(*slots.shape, *cache.shape[2:]).to(dtype)


class DecodeStep:
    """One all-decode step as `DecodeKV` needs it; built once per step by `for_batch`."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 block_size: int) -> None:
        self.block_tables = block_tables.long()
        self.seq_lens = seq_lens.long()
        self.num_seqs = int(seq_lens.shape[0])
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        positions = self.seq_lens - 1
        self.new_slots = self._slots(positions[:, None]).flatten()
        self._masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}
        self._rows: dict[int, torch.Tensor] = {}
        self._continues: tuple[DecodeStep | None, bool] | None = None

    @classmethod
    def for_batch(cls, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, slot_mapping: torch.Tensor, max_query_len: int,
                  max_seq_len: int, block_size: int) -> DecodeStep | None:
        """The step, or None unless every sequence has exactly one query token (and it has a
        cache slot): the only batches this path serves."""
        num_seqs = seq_lens.shape[0]
        if (max_query_len != 1 or num_seqs == 0 or slot_mapping.shape[0] != num_seqs
                or max_seq_len > block_tables.shape[1] * block_size):
            return None
        if not torch.equal(query_start_loc.long(), torch.arange(num_seqs + 1)):
            return None
        if bool((seq_lens < 1).any()) or bool((slot_mapping < 0).any()):
            return None
        return cls(block_tables, seq_lens, max_seq_len, block_size)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each position ([seqs, n] positions of each row's own sequence)."""
        blocks = self.block_tables.gather(1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    def context_slots(self, num_keys: int) -> torch.Tensor:
        """int64 [seqs, num_keys]: the slot of every position below each length; the others
        name the sequence's first slot (a real key of its own, so finite)."""
        positions = torch.arange(num_keys)[None, :].expand(self.num_seqs, num_keys)
        positions = torch.where(positions < self.seq_lens[:, None], positions, 0)
        return self._slots(positions)

    def buffer_rows(self, capacity: int) -> torch.Tensor:
        """Row of each new token in a ``[seqs * capacity, ...]`` view of a buffer."""
        rows = self._rows.get(capacity)
        if rows is None:
            rows = self._rows[capacity] = (torch.arange(self.num_seqs) * capacity
                                           + self.seq_lens - 1)
        return rows

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[seqs, 1, 1, max_seq_len]`` mask: 0 for the keys the query sees (below its
        length, and within the window), -inf for the others."""
        key = (sliding_window, dtype)
        mask = self._masks.get(key)
        if mask is None:
            positions = torch.arange(self.max_seq_len)[None, :]
            visible = positions < self.seq_lens[:, None]
            if sliding_window is not None:
                visible &= positions >= self.seq_lens[:, None] - sliding_window
            mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
            mask = self._masks[key] = mask[:, None, None, :]
        return mask

    def continues(self, previous: DecodeStep | None) -> bool:
        """Whether this step is `previous` one token later for every sequence, with the blocks
        that held its keys unchanged (so a copy of `previous`'s keys is still right)."""
        if self._continues is not None and self._continues[0] is previous:
            return self._continues[1]
        verdict = previous is not None and self._extends(previous)
        self._continues = (previous, verdict)
        return verdict

    def _extends(self, previous: DecodeStep) -> bool:
        if previous.num_seqs != self.num_seqs or previous.block_size != self.block_size:
            return False
        if not torch.equal(self.seq_lens, previous.seq_lens + 1):
            return False
        used = -(-previous.max_seq_len // self.block_size)  # (<= both tables' widths)
        in_use = torch.arange(used)[None, :] * self.block_size < previous.seq_lens[:, None]
        return torch.equal(self.block_tables[:, :used][in_use],
                           previous.block_tables[:, :used][in_use])


class DecodeKV:
    """One layer's contiguous copy of the decode batch's K/V (see the module docstring)."""

    def __init__(self) -> None:
        self.step: DecodeStep | None = None
        self.keys: torch.Tensor | None = None  # [seqs, capacity, kv_heads, head_dim]
        self.values: torch.Tensor | None = None

    def forget(self) -> None:
        self.step = self.keys = self.values = None

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               step: DecodeStep | None, *, scale: float,
               sliding_window: int | None) -> torch.Tensor | None:
        """``query`` [seqs, q_heads, head_dim] (this step's K/V already in the cache) ->
        attention output of the same shape, or None (and the copy forgotten) when this step is
        not one this path serves."""
        num_kv_heads, head_dim = key_cache.shape[2:]
        dtype = query.dtype if query.dtype in _COMPUTE_DTYPES else torch.float32
        if (step is None or step.block_size != key_cache.shape[1]
                or key_cache.dtype != query.dtype or value_cache.dtype != query.dtype):
            self.forget()
            return None
        if not self._append(step, key_cache, value_cache, dtype):
            growing = self.keys is not None and step.continues(self.step)
            capacity = step.max_seq_len + (_GROWING_ROOM if growing else _NEW_BATCH_ROOM)
            element = torch.empty((), dtype=dtype).element_size()
            if 2 * step.num_seqs * capacity * num_kv_heads * head_dim * element > _MAX_COPY_BYTES:
                self.forget()
                return None
            self._rebuild(step, key_cache, value_cache, dtype, capacity)
        self.step = step
        num_seqs, num_keys = step.num_seqs, step.max_seq_len
        # [seqs, keys, kv_heads, head_dim] -> [seqs, kv_heads, keys, head_dim] (strided view);
        # the query heads sharing a KV head are the rows of its matrix (no K/V repeat for GQA)
        keys = self.keys[:, :num_keys].transpose(1, 2)
        values = self.values[:, :num_keys].transpose(1, 2)
        queries = query.reshape(num_seqs, num_kv_heads, -1, head_dim).to(dtype)
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=step.mask(sliding_window, dtype), scale=scale)
        return attended.reshape(query.shape).to(query.dtype)

    def _append(self, step: DecodeStep, key_cache: torch.Tensor, value_cache: torch.Tensor,
                dtype: torch.dtype) -> bool:
        """Copy this step's K/V into the buffer if it continues the buffer's step and fits."""
        keys = self.keys
        if (keys is None or not step.continues(self.step) or keys.dtype != dtype
                or keys.shape[0] != step.num_seqs or keys.shape[2:] != key_cache.shape[2:]
                or step.max_seq_len > keys.shape[1]):
            return False
        rows = step.buffer_rows(keys.shape[1])
        for buffer, cache in ((keys, key_cache), (self.values, value_cache)):
            buffer.view(-1, *buffer.shape[2:]).index_copy_(
                0, rows, gather_kv(cache, step.new_slots, dtype))
        return True

    def _rebuild(self, step: DecodeStep, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 dtype: torch.dtype, capacity: int) -> None:
        slots = step.context_slots(capacity)
        self.keys = gather_kv(key_cache, slots, dtype)
        self.values = gather_kv(value_cache, slots, dtype)
