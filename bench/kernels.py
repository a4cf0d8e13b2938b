"""Paged attention on the GPU: decode and prefill against PyTorch SDPA, FlexAttention and the
bandwidth floor.

Checks correctness first (kernel vs the torch reference, and vs SDPA at every timed point),
then times with ``triton.testing.do_bench`` (median), rotating among several input sets when one
set would fit in L2. The decode floor is the K/V bytes read divided by the device copy bandwidth
measured in this run (a large device-to-device copy, read + write bytes counted).

    python bench/kernels.py [--json PATH] [--quick] [--sections tune,decode,prefill,fp8]
                            [--kv-cache-dtype auto|fp8]

``--kv-cache-dtype fp8`` runs every section over e4m3 caches (per-layer scales; SDPA and
FlexAttention get the dequantized K/V in bf16, and the decode floor counts the fp8 bytes). The
``fp8`` section is issue 11's acceptance table: decode at batch 64 x 32K and 256 x 4K (Llama-3-8B
heads, block 16), the bf16 and the fp8 paged kernel on the same shapes, each one's share of the
copy bandwidth counting its own K/V bytes, and the speed-up:

    python bench/kernels.py --sections fp8 --json $OUT/kernels_fp8.json

Prints a table and writes JSON (default ``$OUT/kernels.json`` when ``OUT`` is set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve.kernels.kv_quant import FP8_KV_DTYPE, dequantize_kv, quantize_kv  # noqa: E402
from pagedserve.kernels.paged_attention import (  # noqa: E402
    AttentionConfig,
    paged_attention,
    paged_attention_reference,
    select_config,
)

DTYPE = torch.bfloat16
KV_DTYPES = {"auto": DTYPE, "fp8": FP8_KV_DTYPE}
KV_DTYPE = DTYPE  # the caches' dtype (--kv-cache-dtype)
FP8_ACCEPTANCE_POINTS = ((64, 32768), (256, 4096))  # (batch, context), Llama-3-8B heads
HEAD_SHAPES = {  # name: (q heads, kv heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "llama3-70b-tp2": (32, 4, 128),
}
L2_FLUSH_BYTES = 256 * 2**20  # rotate input sets until this many bytes are touched per round
GRAPH_CALLS = 8  # attention calls per timed CUDA graph (a served decode graph holds 32-80)


def bench_ms(fn, quick=False) -> float:
    return triton.testing.do_bench(
        fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"
    )


def measure_copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**30, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class Rotation:
    """Cycles through input sets so consecutive timed calls do not hit a warm L2."""

    def __init__(self, count: int):
        self.count, self.index = count, 0

    def next(self) -> int:
        self.index = (self.index + 1) % self.count
        return self.index


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


class PagedProblem:
    """``sets`` independent batches of ``batch`` sequences, each ``q_len`` new tokens at the end
    of a ``ctx``-token context, in one shared paged cache with shuffled block tables; plus the
    same K/V laid out contiguously for SDPA ([batch, kv_heads, ctx, head_dim])."""

    def __init__(self, heads, batch, ctx, q_len, block_size, sets, with_dense=True,
                 kv_dtype=None):
        num_q_heads, num_kv_heads, head_dim = heads
        self.kv_dtype = kv_dtype or KV_DTYPE
        self.batch, self.ctx, self.q_len, self.sets = batch, ctx, q_len, sets
        self.heads = heads
        blocks_per_seq = triton.cdiv(ctx, block_size)
        num_blocks = sets * batch * blocks_per_seq
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.scales = {}
        if self.kv_dtype == FP8_KV_DTYPE:
            # Scales as calibration would set them: randn's largest magnitudes (about 5.5 in
            # these sizes) onto 448. Filled one block range at a time to cap the bf16 staging.
            self.scales = dict(k_scale=torch.tensor([5.5 / 448], device="cuda"),
                               v_scale=torch.tensor([5.0 / 448], device="cuda"))
            self.key_cache = torch.empty(shape, device="cuda", dtype=FP8_KV_DTYPE)
            self.value_cache = torch.empty(shape, device="cuda", dtype=FP8_KV_DTYPE)
            step = max(1, 2**28 // (block_size * num_kv_heads * head_dim))
            for cache, scale in ((self.key_cache, self.scales["k_scale"]),
                                 (self.value_cache, self.scales["v_scale"])):
                for first in range(0, num_blocks, step):
                    count = min(step, num_blocks - first)
                    cache[first : first + count] = quantize_kv(
                        torch.randn((count, *shape[1:]), device="cuda", dtype=DTYPE), scale)
        else:
            self.key_cache = torch.randn(shape, device="cuda", dtype=self.kv_dtype)
            self.value_cache = torch.randn(shape, device="cuda", dtype=self.kv_dtype)
        order = torch.randperm(num_blocks, device="cuda", dtype=torch.int64)
        self.block_tables = order.view(sets, batch, blocks_per_seq).int()
        self.queries = torch.randn(sets, batch * q_len, num_q_heads, head_dim, device="cuda")
        self.queries = self.queries.to(DTYPE)
        self.query_start_loc = torch.arange(
            0, (batch + 1) * q_len, q_len, device="cuda", dtype=torch.int32
        )
        self.seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        self.out = torch.empty_like(self.queries[0])
        self.scale = head_dim**-0.5
        self.dense = []
        if with_dense:
            for index in range(sets):
                self.dense.append(tuple(self._dense(cache, name, index) for cache, name in
                                        zip(self.caches, ("k_scale", "v_scale"), strict=True)))

    @property
    def caches(self):
        return (self.key_cache, self.value_cache)

    def _dense(self, cache, scale_name, index):
        blocks = self.block_tables[index].long()  # [batch, blocks_per_seq]
        gathered = cache[blocks].flatten(1, 2)[:, : self.ctx]  # [batch, ctx, kv_heads, dim]
        if scale_name in self.scales:  # SDPA sees the values the fp8 cache holds
            gathered = dequantize_kv(gathered, self.scales[scale_name], DTYPE)
        return gathered.transpose(1, 2).contiguous()

    def _inputs(self, index) -> tuple[tuple, dict]:
        """Arguments of paged_attention and of its reference for input set `index`."""
        args = (
            self.queries[index],
            self.key_cache,
            self.value_cache,
            self.block_tables[index],
            self.query_start_loc,
            self.seq_lens,
        )
        return args, dict(scale=self.scale, max_query_len=self.q_len, max_seq_len=self.ctx,
                          **self.scales)

    def paged(self, index, config=None):
        args, kwargs = self._inputs(index)
        return paged_attention(*args, **kwargs, out=self.out, config=config)

    def reference(self, index):
        args, kwargs = self._inputs(index)
        return paged_attention_reference(*args, **kwargs)

    def sdpa_query(self, index):
        num_q_heads, _, head_dim = self.heads
        query = self.queries[index].view(self.batch, self.q_len, num_q_heads, head_dim)
        return query.transpose(1, 2)  # [batch, q_heads, q_len, dim]

    def sdpa(self, index, backend):
        keys, values = self.dense[index]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                self.sdpa_query(index),
                keys,
                values,
                is_causal=self.q_len > 1,
                scale=self.scale,
                enable_gqa=True,
            )

    def sdpa_as_paged_layout(self, result):
        return result.transpose(1, 2).reshape(self.out.shape)


def time_rotating(fn, sets, quick) -> float:
    """Eager time per call (host launch overhead included when the GPU outruns the host)."""
    rotation = Rotation(sets)
    return bench_ms(lambda: fn(rotation.next()), quick)


def time_graph(fn, sets, quick) -> float:
    """Device time per call, as a decode step sees it: one CUDA graph holding at least
    ``GRAPH_CALLS`` calls that cycle through the input sets, replayed. A served decode step is one
    graph with one attention call per layer, so the graph's own launch cost is shared by dozens
    of calls; timing a graph of one call would charge all of it to that call."""
    calls = sets * math.ceil(GRAPH_CALLS / sets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for index in range(sets):
            fn(index)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in range(calls):
            fn(call % sets)
    return bench_ms(graph.replay, quick) / calls


def pick_sdpa_backend(problem):
    """Flash first, as asked; fall back if it refuses GQA or the shape."""
    errors = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            problem.sdpa(0, backend)
            torch.cuda.synchronize()
            return backend, errors
        except RuntimeError as error:
            errors[backend.name] = str(error).splitlines()[0][:200]
    raise RuntimeError(f"no SDPA backend ran: {errors}")


_flex_compiled = None


def time_flex(problem, quick):
    """FlexAttention on the contiguous K/V (decode: no mask; prefill: causal block mask)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if problem.q_len > 1:
        block_mask = create_block_mask(
            lambda b, h, q, k: q >= k, None, None, problem.q_len, problem.ctx, device="cuda"
        )

    def run(index):
        keys, values = problem.dense[index]
        return _flex_compiled(
            problem.sdpa_query(index),
            keys,
            values,
            block_mask=block_mask,
            scale=problem.scale,
            enable_gqa=True,
        )

    flex_error = relative_error(problem.sdpa_as_paged_layout(run(0)), problem.reference(0))
    if flex_error > 2e-2:
        raise RuntimeError(f"flex result off by {flex_error:.2e}")
    return time_rotating(run, problem.sets, quick)


def decode_kv_bytes(heads, batch: int, ctx: int, kv_dtype=None) -> int:
    """K and V bytes one decode call reads: every context token of every KV head."""
    return 2 * batch * ctx * heads[1] * heads[2] * (kv_dtype or KV_DTYPE).itemsize


def sets_for(kv_bytes: int) -> int:
    """Input sets to rotate through: at least two, so back-to-back calls never read the same K/V,
    and enough that one round touches ``L2_FLUSH_BYTES``."""
    return max(2, min(64, math.ceil(L2_FLUSH_BYTES / max(kv_bytes, 1))))


def check_correctness(results):
    """Kernel vs torch reference on ragged mixed batches before any timing."""
    from tests.kernels._batches import make_batch
    from tests.kernels._fp8 import quantize_batch

    for (name, heads), block_size in itertools.product(HEAD_SHAPES.items(), (16, 32)):
        num_q_heads, num_kv_heads, head_dim = heads
        batch = make_batch(
            [1, 1, 333, 1, 40],
            [1, 4100, 333, 999, 2100],
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=DTYPE,
            device="cuda",
        )
        kwargs = batch.kwargs()
        if KV_DTYPE == FP8_KV_DTYPE:
            fp8 = quantize_batch(batch)
            batch, kwargs = fp8.batch, fp8.kwargs()
        for splits in (None, 5):
            out = torch.full_like(batch.query, float("nan"))
            paged_attention(*batch.args(), **kwargs, out=out, num_kv_splits=splits)
            error = relative_error(out, paged_attention_reference(*batch.args(), **kwargs))
            ok = error < 1e-2 and not out.isnan().any()
            results["correctness"].append(
                dict(shape=name, block_size=block_size, num_kv_splits=splits, rel_error=error)
            )
            print(f"correctness {name} block {block_size} splits {splits}: {error:.2e}")
            if not ok:
                raise SystemExit(f"kernel wrong for {name} block {block_size}: {error}")


def _tune_decode_point(results, name, batch, ctx):
    heads = HEAD_SHAPES[name]
    kv_bytes = decode_kv_bytes(heads, batch, ctx)
    problem = PagedProblem(heads, batch, ctx, 1, 16, sets_for(kv_bytes), with_dense=False)
    floor_ms = kv_bytes / results["copy_bandwidth"] * 1e3
    default = select_config(
        num_seqs=batch,
        num_kv_heads=heads[1],
        group_size=heads[0] // heads[1],
        head_dim=heads[2],
        max_query_len=1,
        max_seq_len=ctx,
        device=torch.device("cuda"),
    )
    rows = []

    def try_config(config):
        try:
            ms = time_graph(lambda i: problem.paged(i, config), problem.sets, True)
        except Exception as error:  # e.g. out of shared memory
            rows.append(dict(config=config.__dict__, error=str(error)[:120]))
            return
        rows.append(dict(config=config.__dict__, ms=ms, floor_pct=100 * floor_ms / ms))

    tiles = ((64, 2, 2), (64, 4, 2), (64, 2, 3), (32, 2, 4), (128, 4, 2))
    for (block_n, warps, stages), splits in itertools.product(
        tiles, sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, default.num_kv_splits})
    ):
        if splits <= max(1, ctx // (4 * block_n)):
            try_config(AttentionConfig(default.block_q, block_n, splits, warps, stages))
    rows.sort(key=lambda row: row.get("ms", 1e9))
    results["tune"].append(
        dict(
            kind="decode",
            shape=name,
            batch=batch,
            ctx=ctx,
            default=default.__dict__,
            best=rows[:8],
            all=rows,
        )
    )
    best = rows[0]
    print(f"tune decode {name} b{batch} ctx{ctx}: default {default} best {best}")


def _tune_prefill(results, name):
    heads = HEAD_SHAPES[name]
    problem = PagedProblem(heads, 4, 2048, 2048, 16, 1, with_dense=False)
    rows = []
    group_pad = triton.next_power_of_2(heads[0] // heads[1])
    for block_m, block_n, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        config = AttentionConfig(block_m // group_pad, block_n, 1, warps, stages)
        try:
            ms = bench_ms(lambda c=config: problem.paged(0, c), True)
        except Exception as error:
            rows.append(dict(config=config.__dict__, error=str(error)[:120]))
            continue
        flops = 4 * 4 * 2048 * 2048 / 2 * heads[0] * heads[2]
        rows.append(dict(config=config.__dict__, ms=ms, tflops=flops / ms / 1e9))
    rows.sort(key=lambda row: row.get("ms", 1e9))
    results["tune"].append(dict(kind="prefill", shape=name, best=rows[:8], all=rows))
    print(f"tune prefill {name}: best {rows[0]}")


def _decode_point(results, name, block_size, batch, ctx, flex_points, quick):
    heads = HEAD_SHAPES[name]
    kv_bytes = decode_kv_bytes(heads, batch, ctx)
    problem = PagedProblem(heads, batch, ctx, 1, block_size, sets_for(kv_bytes))
    row = dict(
        shape=name,
        block_size=block_size,
        batch=batch,
        ctx=ctx,
        kv_bytes=kv_bytes,
        sets=problem.sets,
    )
    backend, backend_errors = pick_sdpa_backend(problem)
    row["sdpa_backend"] = backend.name
    if backend_errors:
        row["sdpa_backend_errors"] = backend_errors
    expected = problem.sdpa_as_paged_layout(problem.sdpa(0, backend))
    row["rel_error_vs_sdpa"] = relative_error(problem.paged(0), expected)
    if row["rel_error_vs_sdpa"] > 2e-2:
        raise SystemExit(f"decode mismatch vs SDPA: {row}")
    row["paged_us"] = 1e3 * time_graph(problem.paged, problem.sets, quick)
    row["sdpa_us"] = 1e3 * time_graph(lambda i, b=backend: problem.sdpa(i, b), problem.sets, quick)
    row["paged_eager_us"] = 1e3 * time_rotating(problem.paged, problem.sets, quick)
    floor_us = kv_bytes / results["copy_bandwidth"] * 1e6
    row["floor_us"] = floor_us
    row["paged_pct_of_copy_bw"] = 100 * floor_us / row["paged_us"]
    row["sdpa_pct_of_copy_bw"] = 100 * floor_us / row["sdpa_us"]
    row["paged_over_sdpa"] = row["paged_us"] / row["sdpa_us"]
    if (name, block_size, batch, ctx) in flex_points:
        try:
            row["flex_us"] = 1e3 * time_flex(problem, quick)
        except Exception as error:
            row["flex_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    results["decode"].append(row)
    print(
        f"decode {name:15s} bs{block_size:3d} b{batch:4d} ctx{ctx:6d}: paged "
        f"{row['paged_us']:9.1f} us ({row['paged_pct_of_copy_bw']:5.1f}% bw) sdpa "
        f"{row['sdpa_us']:9.1f} us ({row['sdpa_pct_of_copy_bw']:5.1f}%) "
        f"flex {row.get('flex_us', row.get('flex_error', '-'))}"
    )


def _prefill_point(results, name, batch, quick):
    heads = HEAD_SHAPES[name]
    prompt = 2048
    problem = PagedProblem(heads, batch, prompt, prompt, 16, 1)
    backend, backend_errors = pick_sdpa_backend(problem)
    row = dict(shape=name, batch=batch, prompt=prompt, block_size=16, sdpa_backend=backend.name)
    if backend_errors:
        row["sdpa_backend_errors"] = backend_errors
    expected = problem.sdpa_as_paged_layout(problem.sdpa(0, backend))
    row["rel_error_vs_sdpa"] = relative_error(problem.paged(0), expected)
    if row["rel_error_vs_sdpa"] > 2e-2:
        raise SystemExit(f"prefill mismatch vs SDPA: {row}")
    tokens = batch * prompt
    flops = 4 * batch * prompt * prompt / 2 * heads[0] * heads[2]  # causal half
    paged_ms = bench_ms(lambda: problem.paged(0), quick)
    sdpa_ms = bench_ms(lambda b=backend: problem.sdpa(0, b), quick)
    row.update(
        paged_us=1e3 * paged_ms,
        sdpa_us=1e3 * sdpa_ms,
        paged_tokens_per_s=tokens / paged_ms * 1e3,
        sdpa_tokens_per_s=tokens / sdpa_ms * 1e3,
        paged_tflops=flops / paged_ms / 1e9,
        sdpa_tflops=flops / sdpa_ms / 1e9,
        paged_over_sdpa_throughput=sdpa_ms / paged_ms,
    )
    if batch == 4 and name == "llama3-8b":
        try:
            row["flex_us"] = 1e3 * time_flex(problem, quick)
        except Exception as error:
            row["flex_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    results["prefill"].append(row)
    print(
        f"prefill {name:15s} b{batch:3d} x {prompt}: paged {row['paged_tflops']:6.1f} "
        f"TFLOP/s, sdpa {row['sdpa_tflops']:6.1f} TFLOP/s, ratio "
        f"{row['paged_over_sdpa_throughput']:.2f}, flex {row.get('flex_us', '-')}"
    )


def tune(results, quick):
    """Sweep launch configurations at representative decode and prefill points."""
    decode_points = [
        ("llama3-8b", 1, 4096),
        ("llama3-8b", 1, 16384),
        ("llama3-8b", 1, 32768),
        ("llama3-70b-tp2", 1, 32768),
        ("llama3-8b", 8, 8192),
        ("llama3-8b", 32, 4096),
        ("llama3-70b-tp2", 8, 16384),
        ("llama3-70b-tp2", 32, 4096),
        ("llama3-70b-tp2", 64, 4096),
    ]
    for name, batch, ctx in decode_points:
        _tune_decode_point(results, name, batch, ctx)
        torch.cuda.empty_cache()

    _tune_prefill(results, "llama3-8b")
    torch.cuda.empty_cache()


def decode_sweep(results, quick):
    batches = (1, 8, 32, 64, 256) if not quick else (1, 32, 64)
    contexts = (512, 4096, 16384, 32768) if not quick else (512, 4096)
    flex_points = {("llama3-8b", 16, 64, 4096)}
    combos = [("llama3-8b", 16), ("llama3-8b", 32), ("llama3-70b-tp2", 16)]
    for (name, block_size), batch, ctx in itertools.product(combos, batches, contexts):
        if batch * ctx <= 2**20:  # up to 4 GiB of K/V for the 8B shape
            _decode_point(results, name, block_size, batch, ctx, flex_points, quick)
            torch.cuda.empty_cache()


def prefill_sweep(results, quick):
    for name, batch in itertools.product(HEAD_SHAPES, (1, 4, 16) if not quick else (4,)):
        _prefill_point(results, name, batch, quick)
        torch.cuda.empty_cache()


def fp8_acceptance(results, quick):
    """bf16 and fp8 caches on the same decode shapes: time, share of the copy bandwidth (each
    counting its own K/V bytes) and the fp8 speed-up (issue 11: >= 85% and >= 1.6x)."""
    heads = HEAD_SHAPES["llama3-8b"]
    for batch, ctx in FP8_ACCEPTANCE_POINTS:
        row = dict(shape="llama3-8b", block_size=16, batch=batch, ctx=ctx)
        for name, kv_dtype in (("bf16", DTYPE), ("fp8", FP8_KV_DTYPE)):
            kv_bytes = decode_kv_bytes(heads, batch, ctx, kv_dtype)
            problem = PagedProblem(heads, batch, ctx, 1, 16, sets_for(kv_bytes),
                                   with_dense=False, kv_dtype=kv_dtype)
            row[f"{name}_rel_error_vs_reference"] = relative_error(problem.paged(0),
                                                                   problem.reference(0))
            if row[f"{name}_rel_error_vs_reference"] > 2e-2:
                raise SystemExit(f"{name} decode mismatch vs the reference: {row}")
            row[f"{name}_us"] = 1e3 * time_graph(problem.paged, problem.sets, quick)
            row[f"{name}_kv_bytes"] = kv_bytes
            floor_us = kv_bytes / results["copy_bandwidth"] * 1e6
            row[f"{name}_pct_of_copy_bw"] = 100 * floor_us / row[f"{name}_us"]
            del problem
            torch.cuda.empty_cache()
        row["fp8_speedup"] = row["bf16_us"] / row["fp8_us"]
        results["fp8"].append(row)
        print(f"fp8 acceptance b{batch} ctx{ctx}: bf16 {row['bf16_us']:.1f} us "
              f"({row['bf16_pct_of_copy_bw']:.1f}% bw), fp8 {row['fp8_us']:.1f} us "
              f"({row['fp8_pct_of_copy_bw']:.1f}% bw), speed-up {row['fp8_speedup']:.2f}x")


def print_tables(results):
    print(
        f"\ndevice: {results['device']}, copy bandwidth {results['copy_bandwidth'] / 1e12:.2f}"
        " TB/s (read + write)"
    )
    kv = "fp8 e4m3 K/V" if KV_DTYPE == FP8_KV_DTYPE else "bf16"
    print(
        f"\nDECODE ({kv}, us per call, median of CUDA-graph replays; %bw = K/V bytes / copy "
        "bandwidth / time; eager = paged without a graph, host launch overhead included)"
    )
    print(
        f"{'shape':15s} {'bs':>3s} {'batch':>5s} {'ctx':>6s} {'paged':>9s} {'%bw':>6s} "
        f"{'sdpa':>9s} {'%bw':>6s} {'paged/sdpa':>10s} {'eager':>9s} {'flex eager':>10s}"
    )
    for row in results["decode"]:
        flex = (
            f"{row['flex_us']:9.1f}"
            if "flex_us" in row
            else ("err" if "flex_error" in row else "-")
        )
        print(
            f"{row['shape']:15s} {row['block_size']:3d} {row['batch']:5d} {row['ctx']:6d} "
            f"{row['paged_us']:9.1f} {row['paged_pct_of_copy_bw']:6.1f} {row['sdpa_us']:9.1f} "
            f"{row['sdpa_pct_of_copy_bw']:6.1f} {row['paged_over_sdpa']:10.3f} "
            f"{row['paged_eager_us']:9.1f} {flex:>10s}"
        )
    print(f"\nPREFILL ({kv}, 2048-token prompts, block 16)")
    print(
        f"{'shape':15s} {'batch':>5s} {'paged TF/s':>10s} {'sdpa TF/s':>10s} "
        f"{'paged/sdpa tok/s':>16s}"
    )
    for row in results["prefill"]:
        print(
            f"{row['shape']:15s} {row['batch']:5d} {row['paged_tflops']:10.1f} "
            f"{row['sdpa_tflops']:10.1f} {row['paged_over_sdpa_throughput']:16.3f}"
        )
    if results["fp8"]:
        print("\nFP8 KV ACCEPTANCE (llama3-8b heads, block 16, us per call in CUDA graphs; %bw "
              "counts each dtype's own K/V bytes; target fp8 >= 85% and >= 1.6x bf16)")
        print(f"{'batch':>5s} {'ctx':>6s} {'bf16 us':>9s} {'%bw':>6s} {'fp8 us':>9s} "
              f"{'%bw':>6s} {'speed-up':>8s}")
        for row in results["fp8"]:
            print(f"{row['batch']:5d} {row['ctx']:6d} {row['bf16_us']:9.1f} "
                  f"{row['bf16_pct_of_copy_bw']:6.1f} {row['fp8_us']:9.1f} "
                  f"{row['fp8_pct_of_copy_bw']:6.1f} {row['fp8_speedup']:8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_json = os.path.join(os.environ["OUT"], "kernels.json") if "OUT" in os.environ else None
    parser.add_argument("--json", default=default_json)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", default="tune,decode,prefill",
                        help="comma-separated: tune, decode, prefill, fp8")
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_DTYPES), default="auto",
                        help="cache dtype of the tune/decode/prefill sections (auto = bf16)")
    args = parser.parse_args()
    global KV_DTYPE
    KV_DTYPE = KV_DTYPES[args.kv_cache_dtype]
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device")
    torch.manual_seed(0)
    sections = args.sections.split(",")
    results = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        correctness=[],
        tune=[],
        decode=[],
        prefill=[],
        fp8=[],
        kv_cache_dtype=str(KV_DTYPE).removeprefix("torch."),
    )
    started = time.time()
    results["copy_bandwidth"] = measure_copy_bandwidth()
    print(f"copy bandwidth {results['copy_bandwidth'] / 1e12:.3f} TB/s")
    check_correctness(results)

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    for section, fn in (("tune", tune), ("decode", decode_sweep), ("prefill", prefill_sweep),
                        ("fp8", fp8_acceptance)):
        if section in sections:
            fn(results, args.quick)
            save()
            print(f"[{section} done at {time.time() - started:.0f} s]")
    print_tables(results)
    save()


if __name__ == "__main__":
    main()
