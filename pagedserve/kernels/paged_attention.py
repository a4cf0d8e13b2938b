"""Paged attention: causal attention of a batch of query tokens over K/V held in the paged cache.

KV cache layout (see ``cache_ops``): ``key_cache``/``value_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; the innermost dimension must be contiguous,
the other strides are free (so per-layer views of one big allocation work).

Batch description (one launch covers prefill, chunked prefill, prefix-cache hits and decode):
- ``query`` ``[num_tokens, num_q_heads, head_dim]``: the query tokens of all sequences,
  concatenated; sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i + 1]``.
- ``seq_lens[i]``: context length of sequence ``i`` *including* this step's query tokens, whose
  K/V are already in the cache. Query token ``j`` of a sequence with ``q_len`` query tokens sits
  at position ``seq_lens[i] - q_len + j`` and attends to every key at a position ``<=`` its own
  (and, with ``sliding_window=W``, to keys at positions ``> pos - W``).
- ``block_tables[i, b]``: physical block holding positions ``b*block_size .. (b+1)*block_size-1``.
Query rows that belong to no sequence (padding past ``query_start_loc[-1]``) are not written.

FP8 caches (``torch.float8_e4m3fn``, see ``kv_quant``) hold ``x / scale`` per layer; every entry
point then takes ``k_scale``/``v_scale`` (float32 one-element tensors; other caches ignore them).
The kernel converts each fp8 tile to the query dtype in registers (exact: e4m3 fits in fp16 and
bf16) and folds the scales in where they cost one multiply: ``k_scale`` into the softmax scale,
``v_scale`` into the final normalisation. So decode reads one byte per K/V element.

Kernel design. One program handles one (sequence, tile of BLOCK_Q query tokens, KV head[,
KV split]). The ``group = num_q_heads // num_kv_heads`` query heads that share a KV head are
packed into the rows of the same tile (row = token * GROUP_PAD + head), so each K/V tile is
read once for all of them and the matrix units see M = BLOCK_Q * GROUP_PAD rows even for
decode. Keys are walked in tiles of BLOCK_N positions, independent of the cache block size:
each key row finds its physical block through the block table. Online softmax in fp32 (base 2).
When the batch has too few (sequence, KV head) pairs to fill the GPU (small-batch decode), the
key range is cut into ``num_kv_splits`` pieces (flash-decoding). Each split writes its partial
result (unnormalised accumulator, running max, running sum) and takes a ticket from a per-tile
counter; the split that takes the last ticket merges all partials and resets the counter, so
there is no second launch (it cost 3-5 us of a 60-90 us decode call). The counters live in one
zeroed buffer per device, which is why split launches on one device must not run concurrently
on two streams. All index math on positions and block ids is int64. Grid sizes come from host
integers only, so decode launches can be captured in a CUDA graph.

CPU. ``paged_attention_reference`` is the oracle the kernels are tested against: one masked SDPA
per sequence, obviously correct and slow. ``paged_attention_cpu`` is what the model runs on CPU
for prefill and mixed steps (pure decode steps that continue the previous one use the layer's
contiguous copy, ``workers/layers/cpu_attention.py``):
a host-side plan made once per step (``plan_cpu_attention``, shared by the layers) groups the
sequences of similar sizes; per layer and group, one ``index_select`` gathers the keys (and one
the values) by slot into padded ``[seqs, kv_heads, keys, head_dim]`` tensors, and one masked
SDPA attends them. Measured at one thread, SmolLM2-135M's shape, 16 decode sequences of ~130
tokens: 71 -> 16 ms of attention per step (30 layers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagedserve.kernels.checks import HAS_TRITON, check_same_device, require_triton
from pagedserve.kernels.kv_quant import check_kv_scales, dequantize_kv, is_fp8_cache

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = [
    "CpuAttentionPlan",
    "paged_attention",
    "paged_attention_cpu",
    "paged_attention_reference",
    "plan_cpu_attention",
    "slot_rows",
]

_MAX_HEAD_DIM = 256
_DECODE_PROGRAMS_PER_SM = 2
_MAX_KV_SPLITS = 32
_LOG2_E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Argument checking (metadata only: never reads device memory)
# --------------------------------------------------------------------------------------------


def _validate_args(
    query,
    key_cache,
    value_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    max_query_len,
    max_seq_len,
    out,
    sliding_window,
    k_scale=None,
    v_scale=None,
) -> None:
    if query.dim() != 3:
        raise ValueError(
            f"query must be [num_tokens, num_q_heads, head_dim], got shape {tuple(query.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim], got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"unsupported head_dim {head_dim}: must be in 1..{_MAX_HEAD_DIM}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads})"
        )
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query dtype must be float16, bfloat16 or float32, got {query.dtype}")
    if value_cache.dtype != key_cache.dtype or not (
        key_cache.dtype == query.dtype or is_fp8_cache(key_cache)
    ):
        raise TypeError(
            f"cache dtypes ({key_cache.dtype}, {value_cache.dtype}) must both match query "
            f"{query.dtype} or both be float8_e4m3fn"
        )
    check_kv_scales(key_cache, k_scale, v_scale)
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "block_tables must be int32 (or int64) [num_seqs, max_blocks_per_seq], got "
            f"{block_tables.dtype} {tuple(block_tables.shape)}"
        )
    num_seqs = block_tables.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(
            f"query_start_loc must be int32 (or int64) [num_seqs + 1 = {num_seqs + 1}], got "
            f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"seq_lens must be int32 (or int64) [num_seqs = {num_seqs}], got {seq_lens.dtype} "
            f"{tuple(seq_lens.shape)}"
        )
    if max_query_len < 0 or max_seq_len < 0:
        raise ValueError(
            f"max_query_len ({max_query_len}) and max_seq_len ({max_seq_len}) must be >= 0"
        )
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds block_tables capacity "
            f"{block_tables.shape[1]} blocks x {block_size}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(
            f"out must be {query.dtype} {tuple(query.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    tensors = [query, key_cache, value_cache, block_tables, query_start_loc, seq_lens]
    if out is not None:
        tensors.append(out)
    check_same_device(tensors)


# --------------------------------------------------------------------------------------------
# Torch reference (the test oracle; the CPU path is paged_attention_cpu below)
# --------------------------------------------------------------------------------------------


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch paged attention, same contract as :func:`paged_attention`.

    Loops over sequences (it reads the lengths on the host), gathers each sequence's blocks and
    runs fp32 SDPA with an explicit causal (and sliding-window) mask; fp8 blocks are
    dequantized to fp32 first.
    """
    _validate_args(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        max_query_len,
        max_seq_len,
        out,
        sliding_window,
        k_scale,
        v_scale,
    )
    if out is None:
        out = torch.empty_like(query)
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    fp8 = is_fp8_cache(key_cache)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for seq, seq_len in enumerate(lengths):
        q_begin, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_begin
        if q_len == 0:
            continue
        if seq_len < q_len:
            raise ValueError(f"seq_lens[{seq}] = {seq_len} is shorter than its {q_len} queries")
        blocks = block_tables[seq, : -(-seq_len // block_size)].long()
        # [seq_len, kv_heads, head_dim] -> [kv_heads, seq_len, head_dim]
        keys = key_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        values = value_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        if fp8:
            keys = dequantize_kv(keys, k_scale, torch.float32)
            values = dequantize_kv(values, v_scale, torch.float32)
        keys, values = keys.float(), values.float()
        queries = query[q_begin:q_end].transpose(0, 1).float()  # [q_heads, q_len, head_dim]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        visible = key_pos <= query_pos
        if sliding_window is not None:
            visible &= key_pos > query_pos - sliding_window
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )
        out[q_begin:q_end] = attended.transpose(0, 1).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Fast CPU path (what the model runs on CPU; checked against the reference above)
# --------------------------------------------------------------------------------------------

# A group of sequences runs as one padded SDPA call while its padded work (query rows + 1, times
# keys, per sequence) stays within this factor of the unpadded work plus this slack; past that
# it is cheaper to start another group than to compute (and gather keys for) padding.
_GROUP_WASTE_FACTOR = 1.25
_GROUP_WASTE_SLACK = 8192
# Input dtypes SDPA runs in directly (bf16 at half the gather bytes: 2x faster, measured);
# others are upcast to fp32.
_CPU_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class _CpuGroup:
    """Sequences attended together: ``num_seqs`` x ``q_rows`` padded query rows over
    ``num_keys`` padded keys each."""

    num_seqs: int
    q_rows: int
    num_keys: int
    first_token: int  # the rows are query[first_token : first_token + num_seqs * q_rows] ...
    token_index: torch.Tensor | None  # ... unless this int64 [num_seqs * q_rows] lists them
    slots: torch.Tensor  # int64 [num_seqs * num_keys]: cache slot of every padded key
    # fp32 [num_seqs, 1, q_rows, num_keys], 0 where visible, else -inf; None for one sequence's
    # whole prompt (no context, no window that cuts it), which runs as plain causal SDPA
    mask: torch.Tensor | None
    valid_rows: torch.Tensor | None  # padded rows that are real query tokens (None: all) ...
    dest: torch.Tensor | None  # ... and the output rows they go to (None: the same rows)


@dataclass(frozen=True)
class CpuAttentionPlan:
    """How :func:`paged_attention_cpu` batches one step's sequences, built on the host from the
    batch description alone, so every layer of a step (same block tables, same lengths, same
    block size and window) can share one plan."""

    block_size: int
    sliding_window: int | None
    groups: tuple[_CpuGroup, ...]


def plan_cpu_attention(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    sliding_window: int | None = None,
) -> CpuAttentionPlan:
    """Group the sequences that have query tokens and precompute, per group, the cache slots of
    every key each sequence can see (one gather per layer), the additive causal / window mask
    and where the query rows come from and go to.

    Keys are gathered by slot, never by whole block: padding keys and padding query rows point
    at a real position of their own sequence, so stale cache slots (even NaN) are never read.
    With a sliding window only the keys inside some query's window are gathered.
    """
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    # (q_len, num_keys, seq, q_begin, seq_len, first_key) of every sequence with queries
    entries = []
    for seq, seq_len in enumerate(lengths):
        q_begin = starts[seq]
        q_len = starts[seq + 1] - q_begin
        if q_len <= 0:
            continue
        if seq_len < q_len:
            raise ValueError(f"seq_lens[{seq}] = {seq_len} is shorter than its {q_len} queries")
        first_key = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1)
        entries.append((q_len, seq_len - first_key, seq, q_begin, seq_len, first_key))
    # Longest queries first, then most keys: decode sequences end up together, sorted by length.
    entries.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
    members: list[list[tuple]] = []
    work = padded_rows = padded_keys = 0
    for entry in entries:
        q_len, num_keys = entry[:2]
        if members:
            rows, keys = max(padded_rows, q_len), max(padded_keys, num_keys)
            padded = (len(members[-1]) + 1) * (rows + 1) * keys
            if padded <= _GROUP_WASTE_FACTOR * (work + (q_len + 1) * num_keys) + _GROUP_WASTE_SLACK:
                members[-1].append(entry)
                work += (q_len + 1) * num_keys
                padded_rows, padded_keys = rows, keys
                continue
        members.append([entry])
        work, padded_rows, padded_keys = (q_len + 1) * num_keys, q_len, num_keys
    device = block_tables.device
    groups = tuple(
        _plan_group(sorted(group, key=lambda entry: entry[2]), block_tables, block_size,
                    sliding_window, device)
        for group in members
    )
    return CpuAttentionPlan(block_size=block_size, sliding_window=sliding_window, groups=groups)


def _plan_group(members, block_tables, block_size, sliding_window, device) -> _CpuGroup:
    def column(index):
        return torch.tensor([entry[index] for entry in members], dtype=torch.int64,
                            device=device)[:, None]

    q_len, num_keys, seq, q_begin, seq_len, first_key = (column(i) for i in range(6))
    num_seqs = len(members)
    q_rows = max(entry[0] for entry in members)
    max_keys = max(entry[1] for entry in members)
    # Query rows past a sequence's last query repeat that query (so no row sees zero keys).
    row = torch.arange(q_rows, device=device)[None, :]
    row_valid = row < q_len
    row = torch.minimum(row, q_len - 1)
    tokens = (q_begin + row).flatten()
    query_pos = seq_len - q_len + row  # [num_seqs, q_rows]
    key_pos = first_key + torch.arange(max_keys, device=device)[None, :]
    key_valid = key_pos < seq_len
    key_pos = torch.where(key_valid, key_pos, first_key)  # padding keys read a real slot
    tables = block_tables.index_select(0, seq.flatten()).long()
    slots = tables.gather(1, key_pos // block_size) * block_size + key_pos % block_size
    mask = None
    whole_prompt = members[0][0] == members[0][4]  # q_len == seq_len: no context before it
    if num_seqs > 1 or not whole_prompt or (sliding_window or max_keys) < max_keys:
        visible = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
        if sliding_window is not None:
            visible &= key_pos[:, None, :] > query_pos[:, :, None] - sliding_window
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=device)
        mask.masked_fill_(~visible, float("-inf"))
        mask = mask[:, None]
    first_token = int(tokens[0])
    in_order = bool(
        (tokens == torch.arange(first_token, first_token + tokens.numel(), device=device)).all()
    )
    valid_rows = dest = None
    if not bool(row_valid.all()):  # (then `tokens` repeats some rows: never in order)
        valid_rows = row_valid.flatten().nonzero().flatten()
        dest = tokens[valid_rows]
    elif not in_order:
        dest = tokens
    return _CpuGroup(
        num_seqs=num_seqs,
        q_rows=q_rows,
        num_keys=max_keys,
        first_token=first_token,
        token_index=None if in_order else tokens,
        slots=slots.flatten(),
        mask=mask,
        valid_rows=valid_rows,
        dest=dest,
    )


def slot_rows(cache: torch.Tensor) -> torch.Tensor | None:
    """``cache`` as a ``[num_blocks * block_size, num_kv_heads * head_dim]`` view (one row per
    slot), or None when its strides do not allow one."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    s_block, s_offset, s_head, s_dim = cache.stride()
    if s_dim != 1 or (num_kv_heads > 1 and s_head != head_dim):
        return None
    if num_blocks > 1 and block_size > 1 and s_block != block_size * s_offset:
        return None
    return cache.as_strided(
        (num_blocks * block_size, num_kv_heads * head_dim),
        (s_offset if block_size > 1 else s_block, 1),
    )


def _gather_keys(cache: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """The cache entries of ``slots``: ``[len(slots), num_kv_heads, head_dim]``."""
    if rows is not None:
        return rows.index_select(0, slots).view(slots.numel(), *cache.shape[2:])
    return cache[slots // block_size, slots % block_size]


def paged_attention_cpu(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    plan: CpuAttentionPlan | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched torch paged attention for CPU tensors, same contract as :func:`paged_attention`.

    Each group of the plan (all decode sequences of a step are usually one group) is one
    ``index_select`` of its keys and one of its values, by slot, into padded
    ``[seqs, kv_heads, keys, head_dim]`` tensors, and one masked SDPA call. Decode groups pack
    the query heads that share a KV head as rows of one matrix (``[seqs, kv_heads, group,
    head_dim]``), so GQA needs no K/V repeat. fp32 and bf16 run in their own dtype (SDPA
    accumulates in fp32; bf16 then differs from the fp32 reference by bf16 rounding, as the
    Triton kernel does); fp16 is upcast to fp32. ``plan`` (from :func:`plan_cpu_attention` with
    the same batch, block size and window) lets the layers of one step share the host-side
    preparation. fp8 caches are gathered as fp8 and dequantized (``dequantize_kv``) to the
    compute dtype after the gather.
    """
    _validate_args(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        max_query_len,
        max_seq_len,
        out,
        sliding_window,
        k_scale,
        v_scale,
    )
    if out is None:
        out = torch.empty_like(query)
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    fp8 = is_fp8_cache(key_cache)
    if plan is None:
        plan = plan_cpu_attention(block_tables, query_start_loc, seq_lens,
                                  block_size=block_size, sliding_window=sliding_window)
    elif plan.block_size != block_size or plan.sliding_window != sliding_window:
        raise ValueError(
            f"plan was made for block_size {plan.block_size} and sliding_window "
            f"{plan.sliding_window}, not {block_size} and {sliding_window}"
        )
    num_q_heads = query.shape[1]
    group_size = num_q_heads // num_kv_heads
    key_rows, value_rows = slot_rows(key_cache), slot_rows(value_cache)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    compute_dtype = query.dtype if query.dtype in _CPU_COMPUTE_DTYPES else torch.float32
    for group in plan.groups:
        num_seqs, q_rows, num_keys = group.num_seqs, group.q_rows, group.num_keys
        if group.token_index is None:
            queries = query[group.first_token : group.first_token + num_seqs * q_rows]
        else:
            queries = query.index_select(0, group.token_index)
        keys = _gather_keys(key_cache, key_rows, group.slots, block_size)
        values = _gather_keys(value_cache, value_rows, group.slots, block_size)
        if fp8:
            keys = dequantize_kv(keys, k_scale, compute_dtype)
            values = dequantize_kv(values, v_scale, compute_dtype)
        queries, keys, values = (x.to(compute_dtype) for x in (queries, keys, values))
        # [seqs, keys, kv_heads, head_dim] -> [seqs, kv_heads, keys, head_dim] (strided view)
        keys = keys.view(num_seqs, num_keys, num_kv_heads, head_dim).transpose(1, 2)
        values = values.view(num_seqs, num_keys, num_kv_heads, head_dim).transpose(1, 2)
        if q_rows == 1:  # rows of one KV head's matrix: its group of query heads
            queries = queries.reshape(num_seqs, num_kv_heads, group_size, head_dim)
            attended = sdpa(queries, keys, values, attn_mask=group.mask, scale=scale)
            attended = attended.reshape(num_seqs, num_q_heads, head_dim)
        else:
            queries = queries.reshape(num_seqs, q_rows, num_q_heads, head_dim).transpose(1, 2)
            attended = sdpa(queries, keys, values, attn_mask=group.mask, scale=scale,
                            is_causal=group.mask is None, enable_gqa=group_size > 1)
            attended = attended.transpose(1, 2).reshape(num_seqs * q_rows, num_q_heads, head_dim)
        if group.valid_rows is not None:
            attended = attended.index_select(0, group.valid_rows)
        if group.dest is None:
            out[group.first_token : group.first_token + attended.shape[0]] = attended
        else:
            out.index_copy_(0, group.dest, attended.to(out.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


if HAS_TRITON:
    _MERGE_UNROLL: tl.constexpr = tl.constexpr(4)

    @triton.jit
    def _attend_key_tile(
        acc,
        running_max,
        running_sum,
        query,
        tile_start,
        kv_end,
        row_pos,
        sliding_window,
        scale_log2,
        block_table,
        key_head,
        value_head,
        stride_key_block,
        stride_key_offset,
        stride_value_block,
        stride_value_offset,
        dims,
        dim_valid,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        MASKED: tl.constexpr,
        USE_SLIDING_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):
        """One online-softmax step over the keys ``tile_start .. tile_start + BLOCK_N - 1``.

        With ``MASKED`` false the caller guarantees the whole tile is valid and visible to every
        row.
        """
        key_pos = tile_start + tl.arange(0, BLOCK_N)
        if MASKED:
            key_valid = key_pos < kv_end
            block_id = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
            # Masked rows read as 0, so stale cache slots (even NaN) never reach the accumulator.
            keys_t_mask = dim_valid[:, None] & key_valid[None, :]
            values_mask = key_valid[:, None] & dim_valid[None, :]
            fill = 0.0
        else:
            block_id = tl.load(block_table + key_pos // BLOCK_SIZE)
            if HEAD_DIM_PAD != HEAD_DIM:
                keys_t_mask = dim_valid[:, None]
                values_mask = dim_valid[None, :]
                fill = 0.0
            else:
                keys_t_mask = None
                values_mask = None
                fill = None
        block_id = block_id.to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        keys_t = tl.load(  # K^T tile [HEAD_DIM_PAD, BLOCK_N]
            key_head
            + (block_id * stride_key_block + in_block * stride_key_offset)[None, :]
            + dims[:, None],
            mask=keys_t_mask,
            other=fill,
        )
        if KV_FP8:
            # Dequantized in registers, exactly: e4m3 -> fp16 is Hopper's packed convert, then
            # the query dtype (k_scale is folded into scale_log2). The fp16 step also keeps the
            # interpreter right: its direct e4m3 -> bf16 cast is not.
            keys_t = keys_t.to(tl.float16).to(query.dtype)
        scores = tl.dot(query, keys_t, input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = key_valid[None, :] & (key_pos[None, :] <= row_pos[:, None])
            if USE_SLIDING_WINDOW:
                visible &= key_pos[None, :] > row_pos[:, None] - sliding_window
            scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, 1)
        values = tl.load(  # V tile [BLOCK_N, HEAD_DIM_PAD]
            value_head
            + (block_id * stride_value_block + in_block * stride_value_offset)[:, None]
            + dims[None, :],
            mask=values_mask,
            other=fill,
        )
        if KV_FP8:  # as the keys; v_scale is applied to the final result
            values = values.to(tl.float16).to(query.dtype)
        acc = acc * correction[:, None] + tl.dot(
            probs.to(values.dtype), values, input_precision=DOT_PRECISION
        )
        return acc, new_max, running_sum


    @triton.jit
    def _paged_attention_kernel(
        query_ptr,
        key_cache_ptr,
        value_cache_ptr,
        block_tables_ptr,
        query_start_loc_ptr,
        seq_lens_ptr,
        out_ptr,
        split_acc_ptr,  # fp32 [tokens, q_heads, splits, HEAD_DIM_PAD] (split path only)
        split_max_ptr,  # fp32 [tokens, q_heads, splits] (split path only)
        split_sum_ptr,  # fp32 [tokens, q_heads, splits] (split path only)
        split_counter_ptr,  # int32, one zeroed counter per (seq, kv head, q tile) (split path only)
        k_scale_ptr,  # float32 [1]: fp8 caches only
        v_scale_ptr,
        scale_log2,  # softmax scale * log2(e): the softmax runs in base 2
        sliding_window,
        num_q_heads,
        num_kv_heads,
        num_kv_splits,
        keys_per_split,  # multiple of BLOCK_N
        stride_query_token,
        stride_query_head,
        stride_key_block,
        stride_key_offset,
        stride_key_head,
        stride_value_block,
        stride_value_offset,
        stride_value_head,
        stride_block_tables_seq,
        stride_out_token,
        stride_out_head,
        GROUP_SIZE: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        USE_SLIDING_WINDOW: tl.constexpr,
        SPLIT_KV: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        # Axis 0 walks the query tiles of one (sequence, head) back to front: the last tiles see the
        # most keys, so starting them first balances causal prefill, and neighbouring programs share
        # K/V in L2.
        q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
        kv_head = tl.program_id(1) // num_kv_splits
        split = tl.program_id(1) % num_kv_splits
        seq = tl.program_id(2)

        q_begin = tl.load(query_start_loc_ptr + seq).to(tl.int64)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_begin
        tile_first = q_tile * BLOCK_Q
        if tile_first >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        context_len = seq_len - q_len  # keys that precede this step's first query token

        rows = tl.arange(0, BLOCK_M)
        row_token = tile_first + rows // GROUP_PAD
        row_head = rows % GROUP_PAD
        row_valid = (row_token < q_len) & (row_head < GROUP_SIZE)
        row_pos = context_len + row_token
        row_q_head = kv_head * GROUP_SIZE + row_head
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_valid = dims < HEAD_DIM
        row_dim_mask = row_valid[:, None] & dim_valid[None, :]

        query = tl.load(
            query_ptr
            + (q_begin + row_token)[:, None] * stride_query_token
            + row_q_head[:, None] * stride_query_head
            + dims[None, :],
            mask=row_dim_mask,
            other=0.0,
        )

        # Keys this tile can see: up to the last query's position, from the first query's window.
        kv_end = tl.minimum(seq_len, context_len + tile_first + BLOCK_Q)
        kv_begin = context_len * 0
        if USE_SLIDING_WINDOW:
            kv_begin = tl.maximum(context_len + tile_first - sliding_window + 1, 0)
            kv_begin = (kv_begin // BLOCK_N) * BLOCK_N
        if SPLIT_KV:
            kv_begin = tl.maximum(kv_begin, split * keys_per_split)
            kv_end = tl.minimum(kv_end, (split + 1) * keys_per_split)

        if KV_FP8:  # scores of dequantized keys: q . (k8 * k_scale) = (q . k8) * k_scale
            if query.dtype == tl.bfloat16:
                # fp16 tensor-core math instead: e4m3 -> fp16 is one packed convert, e4m3 -> bf16
                # goes through fp32 per element, which made the kernel compute-bound. The query
                # is pre-multiplied by the softmax scale so fp16's range (65504) cannot overflow;
                # fp16 keeps more of its mantissa than bf16 did.
                query = (query.to(tl.float32) * (scale_log2 * 0.6931471805599453)).to(tl.float16)
                scale_log2 = 1.4426950408889634 * tl.load(k_scale_ptr)
            else:
                scale_log2 = scale_log2 * tl.load(k_scale_ptr)
        # A finite start for the running max keeps exp2(old - new) from becoming NaN on rows that
        # have seen only masked keys so far.
        running_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_tables_seq
        key_head = key_cache_ptr + kv_head.to(tl.int64) * stride_key_head
        value_head = value_cache_ptr + kv_head.to(tl.int64) * stride_value_head

        # Key tiles that lie entirely at or before the tile's first query position are visible to
        # every row: they run without any mask (no per-element compares, unpredicated loads). Only
        # the tiles on the causal diagonal (and, with a sliding window, all tiles) pay for masks.
        masked_begin = kv_begin
        if not USE_SLIDING_WINDOW:
            full_end = ((context_len + tile_first + 1) // BLOCK_N) * BLOCK_N
            masked_begin = tl.maximum(kv_begin, tl.minimum(kv_end, full_end))
            for tile_start in range(kv_begin, masked_begin, BLOCK_N):
                acc, running_max, running_sum = _attend_key_tile(
                    acc,
                    running_max,
                    running_sum,
                    query,
                    tile_start,
                    kv_end,
                    row_pos,
                    sliding_window,
                    scale_log2,
                    block_table,
                    key_head,
                    value_head,
                    stride_key_block,
                    stride_key_offset,
                    stride_value_block,
                    stride_value_offset,
                    dims,
                    dim_valid,
                    BLOCK_N,
                    HEAD_DIM,
                    HEAD_DIM_PAD,
                    BLOCK_SIZE,
                    False,
                    False,
                    DOT_PRECISION,
                    KV_FP8,
                )
        for tile_start in range(masked_begin, kv_end, BLOCK_N):
            acc, running_max, running_sum = _attend_key_tile(
                acc,
                running_max,
                running_sum,
                query,
                tile_start,
                kv_end,
                row_pos,
                sliding_window,
                scale_log2,
                block_table,
                key_head,
                value_head,
                stride_key_block,
                stride_key_offset,
                stride_value_block,
                stride_value_offset,
                dims,
                dim_valid,
                BLOCK_N,
                HEAD_DIM,
                HEAD_DIM_PAD,
                BLOCK_SIZE,
                True,
                USE_SLIDING_WINDOW,
                DOT_PRECISION,
                KV_FP8,
            )

        out_row = (q_begin + row_token).to(tl.int64) * num_q_heads + row_q_head
        if SPLIT_KV:
            split_rows = out_row * num_kv_splits
            tl.store(split_max_ptr + split_rows + split, running_max, mask=row_valid)
            tl.store(split_sum_ptr + split_rows + split, running_sum, mask=row_valid)
            tl.store(
                split_acc_ptr + (split_rows + split)[:, None] * HEAD_DIM_PAD + dims[None, :],
                acc,
                mask=row_valid[:, None],
            )
            # Every thread's partial stores happen before the release of the ticket; the last
            # split's acquire makes all splits' partials visible to it.
            tl.debug_barrier()
            counter = (
                split_counter_ptr + (seq * num_kv_heads + kv_head) * tl.num_programs(0) + q_tile
            )
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket != num_kv_splits - 1:
                return
            tl.store(counter, 0)
            acc, running_max, running_sum = _merge_splits(
                split_acc_ptr,
                split_max_ptr,
                split_sum_ptr,
                split_rows,
                num_kv_splits,
                row_valid,
                dims,
                BLOCK_M,
                HEAD_DIM_PAD,
                SPLITS_PAD,
            )
        # Every valid row saw at least its own key, so running_sum > 0; padding rows divide by 1.
        normaliser = tl.where(row_valid, running_sum, 1.0)
        if KV_FP8:  # sum_j p_j (v8_j * v_scale) = v_scale * sum_j p_j v8_j
            normaliser = normaliser / tl.load(v_scale_ptr)
        result = acc / normaliser[:, None]
        tl.store(
            out_ptr
            + (q_begin + row_token)[:, None] * stride_out_token
            + row_q_head[:, None] * stride_out_head
            + dims[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=row_dim_mask,
        )


    @triton.jit
    def _merge_splits(
        split_acc_ptr,
        split_max_ptr,
        split_sum_ptr,
        split_rows,
        num_kv_splits,
        row_valid,
        dims,
        BLOCK_M: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        """Softmax-weighted merge of every split's partial result for the tile's rows.

        The statistics of all splits come in one load, so the weights are known up front and the
        accumulator loads do not wait on each other: they are issued ``_MERGE_UNROLL`` at a time
        (one L2 round trip per group instead of one per split). Loads bypass L1 (``.cg``): the
        partials were written by other SMs.
        """
        splits = tl.arange(0, SPLITS_PAD)
        stats_offsets = split_rows[:, None] + splits[None, :]
        stats_mask = row_valid[:, None] & (splits < num_kv_splits)[None, :]
        split_max = tl.load(
            split_max_ptr + stats_offsets, mask=stats_mask, other=-1.0e30, cache_modifier=".cg"
        )
        split_sum = tl.load(
            split_sum_ptr + stats_offsets, mask=stats_mask, other=0.0, cache_modifier=".cg"
        )
        merged_max = tl.max(split_max, 1)
        # Splits that saw no key carry max -1e30 and sum 0: their weight underflows to 0.
        weights = tl.exp2(split_max - merged_max[:, None])
        merged_sum = tl.sum(split_sum * weights, 1)
        merged_acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        for first_split in range(0, num_kv_splits, _MERGE_UNROLL):
            for offset in tl.static_range(_MERGE_UNROLL):
                split = first_split + offset
                weight = tl.sum(tl.where(splits[None, :] == split, weights, 0.0), 1)
                # A per-row block, not a scalar: the mask must be a boolean tensor of the tile's
                # rows (newer interpreters reject an integer mask from `tile & scalar`).
                split_exists = (split_rows * 0 + split) < num_kv_splits
                split_acc = tl.load(
                    split_acc_ptr + (split_rows + split)[:, None] * HEAD_DIM_PAD + dims[None, :],
                    mask=(row_valid & split_exists)[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                merged_acc += split_acc * weight[:, None]
        return merged_acc, merged_max, merged_sum


# --------------------------------------------------------------------------------------------
# Launch configuration and host wrapper
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch parameters; ``num_kv_splits`` 1 means no split-KV pass."""

    block_q: int
    block_n: int
    num_kv_splits: int
    num_warps: int
    num_stages: int


_MIN_SPLIT_COUNTERS = 1 << 16
_split_counter_buffers: dict[torch.device, torch.Tensor] = {}
# Outgrown counter buffers stay allocated: graphs captured earlier still point at them.
_outgrown_counter_buffers: list[torch.Tensor] = []


def _split_counters(device: torch.device, count: int) -> torch.Tensor:
    """The device's zeroed split-KV ticket counters (the kernel leaves them zeroed again).

    Allocated on first use, outside any CUDA-graph capture: a buffer born inside a capture would
    live in the graph's private memory pool.
    """
    buffer = _split_counter_buffers.get(device)
    if buffer is None or buffer.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"split-KV attention needs {count} counters on {device} but none were allocated "
                "before this CUDA-graph capture: run the same launch once eagerly first (warm-up)"
            )
        if buffer is not None:
            _outgrown_counter_buffers.append(buffer)
        buffer = torch.zeros(max(count, _MIN_SPLIT_COUNTERS), dtype=torch.int32, device=device)
        _split_counter_buffers[device] = buffer
    return buffer


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Every layer of a step asks with the same sizes: computed once per step shape, not per layer
# (about 30 us each on a slow host, a millisecond a step at 32 layers).
@functools.lru_cache(maxsize=64)
def select_config(
    *,
    num_seqs: int,
    num_kv_heads: int,
    group_size: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int,
    device: torch.device,
    num_kv_splits: int | None = None,
) -> AttentionConfig:
    """Pick tiles from host-side sizes only (never reads device memory).

    Defaults come from the sweeps in ``bench/kernels.py`` (numbers in bench/KERNELS_NOTES.md).
    """
    group_pad = triton.next_power_of_2(group_size)
    head_dim_pad = triton.next_power_of_2(head_dim)
    # Rows per tile: at least 16 (the smallest matrix-unit M), 128 for prefill.
    min_block_q = max(1, 16 // group_pad)
    max_block_q = max(min_block_q, (64 if head_dim_pad > 128 else 128) // group_pad)
    block_q = min(max(triton.next_power_of_2(max(max_query_len, 1)), min_block_q), max_block_q)
    is_decode = block_q * group_pad <= 16
    block_n = 32 if head_dim_pad > 128 else 128
    if num_kv_splits is None:
        num_kv_splits = 1
        num_q_tiles = triton.cdiv(max(max_query_len, 1), block_q)
        programs = num_seqs * num_kv_heads * num_q_tiles
        # Decode streams at full bandwidth once about two programs per SM are in flight (the
        # H100 sweep's best point from 4 to 256 programs). Fewer (small batches) split the keys
        # up to that count, keeping >= 4 key tiles per split and at most 32 splits: past that
        # the per-split fixed costs and the merge outweigh the extra parallelism.
        if device.type == "cuda" and num_q_tiles == 1:
            wanted = round(_DECODE_PROGRAMS_PER_SM * _num_sms(device) / programs)
            affordable = max_seq_len // (4 * block_n)
            num_kv_splits = max(1, min(wanted, affordable, _MAX_KV_SPLITS))
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    if is_decode:
        # Decode is bound by K/V bytes. On the H100, 4 warps over 128-key tiles with 2 stages
        # beat every other tile shape swept (64/32-key tiles, 2 warps, 3-4 stages) at every
        # batch and context (bench/KERNELS_NOTES.md, v4).
        num_warps, num_stages = (4, 2) if head_dim_pad <= 128 else (2, 2)
    else:
        num_warps, num_stages = (8 if block_q * group_pad >= 128 else 4), 2
    return AttentionConfig(
        block_q=block_q,
        block_n=block_n,
        num_kv_splits=num_kv_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    num_kv_splits: int | None = None,
    config: AttentionConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` over the paged K/V cache (see the module docstring).

    ``max_query_len``/``max_seq_len`` are host-side upper bounds used only to size the grid.
    ``num_kv_splits`` forces the number of key-range splits (None: chosen from the sizes);
    ``config`` overrides the whole launch configuration (benchmarks and tests).
    ``k_scale``/``v_scale``: the layer's scales, required for fp8 caches (ignored otherwise).
    Returns ``out`` (allocated when None), in the query dtype.
    """
    require_triton("paged_attention")
    _validate_args(
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        max_query_len,
        max_seq_len,
        out,
        sliding_window,
        k_scale,
        v_scale,
    )
    kv_fp8 = is_fp8_cache(key_cache)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1)")
    if query.stride(-1) != 1:
        raise ValueError("query must be contiguous in head_dim (stride(-1) == 1)")
    if out is None:
        out = torch.empty_like(query)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim (stride(-1) == 1)")
    num_tokens, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1:3]
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    group_size = num_q_heads // num_kv_heads
    if config is None:
        config = select_config(
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            group_size=group_size,
            head_dim=head_dim,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            device=query.device,
            num_kv_splits=num_kv_splits,
        )
    head_dim_pad = triton.next_power_of_2(head_dim)
    splits = config.num_kv_splits
    split_kv = splits > 1
    keys_per_split = triton.cdiv(max(max_seq_len, 1), splits * config.block_n) * config.block_n
    grid = (triton.cdiv(max_query_len, config.block_q), num_kv_heads * splits, num_seqs)
    if split_kv:
        split_acc = torch.empty(
            (num_tokens, num_q_heads, splits, head_dim_pad),
            dtype=torch.float32,
            device=query.device,
        )
        split_max = torch.empty(
            (num_tokens, num_q_heads, splits), dtype=torch.float32, device=query.device
        )
        split_sum = torch.empty_like(split_max)
        split_counters = _split_counters(query.device, grid[0] * num_kv_heads * num_seqs)
    else:  # unused by the kernel on this path
        split_acc = split_max = split_sum = out
        split_counters = seq_lens

    _paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        split_acc,
        split_max,
        split_sum,
        split_counters,
        k_scale if kv_fp8 else seq_lens,
        v_scale if kv_fp8 else seq_lens,
        scale * _LOG2_E,
        sliding_window or 0,
        num_q_heads,
        num_kv_heads,
        splits,
        keys_per_split,
        *query.stride()[:2],
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        block_tables.stride(0),
        *out.stride()[:2],
        GROUP_SIZE=group_size,
        GROUP_PAD=triton.next_power_of_2(group_size),
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        USE_SLIDING_WINDOW=sliding_window is not None,
        SPLIT_KV=split_kv,
        SPLITS_PAD=triton.next_power_of_2(splits),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=kv_fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
