"""Fused elementwise kernels on the GPU (RMSNorm with and without the residual add, rotary,
SiLU-and-mul) against the torch code they replace, at Llama-3-8B shapes in bf16.

For each op and token count (8192 = a prefill step, 256 = a decode-sized batch) it checks the
kernel against the torch reference, then times both with ``triton.testing.do_bench`` (median;
do_bench clears the L2 before every call, so each call starts cold). The torch side is the
current layer code (``pagedserve.workers``: RMSNorm, RotaryEmbedding, SiluAndMul), which for
rotary returns new tensors where the kernel works in place. "% copy bw" is the kernel's minimum
HBM traffic (every input read once, every output written once) over its time, divided by the
device-to-device copy bandwidth measured in the same run (read + write bytes counted).

    python bench/elementwise.py [--json PATH] [--tokens 8192,256] [--quick]

Prints a table and writes JSON (default ``$OUT/elementwise.json`` when ``OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve.kernels.activation import silu_and_mul  # noqa: E402
from pagedserve.kernels.rms_norm import rms_norm  # noqa: E402
from pagedserve.kernels.rotary import apply_rotary  # noqa: E402
from pagedserve.workers.layers.activation import SiluAndMul  # noqa: E402
from pagedserve.workers.layers.norm import RMSNorm  # noqa: E402
from pagedserve.workers.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPE = torch.bfloat16
HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336  # Llama-3-8B
MAX_POSITION = 131072
EPS = 1e-5


def bench_ms(fn, quick=False) -> float:
    return triton.testing.do_bench(
        fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"
    )


def measure_copy_bandwidth(quick=False) -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**30, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), quick)
    return 2 * 2**30 * DTYPE.itemsize / (ms * 1e-3)


def max_relative_error(actual, expected) -> float:
    a, e = actual.float(), expected.float()
    return ((a - e).abs() / e.abs().clamp_min(1e-3)).max().item()


def rms_norm_case(tokens, with_residual):
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
    residual = torch.randn_like(x)
    module = RMSNorm(HIDDEN, eps=EPS).to("cuda", DTYPE)
    module.weight.data.normal_(1.0, 0.1)
    out = torch.empty_like(x)
    element = DTYPE.itemsize
    if with_residual:
        spare = residual.clone()  # the kernel overwrites its residual: time on a scratch copy

        def fused():
            return rms_norm(x, module.weight, EPS, spare, out=out)

        def torch_ref():
            return module(x, residual)

        def check():
            spare.copy_(residual)
            got_out, got_residual = fused()
            want_out, want_residual = torch_ref()
            assert torch.equal(got_residual, want_residual)
            return max_relative_error(got_out, want_out)

        traffic = 4 * tokens * HIDDEN * element  # read x, residual; write out, residual
    else:

        def fused():
            return rms_norm(x, module.weight, EPS, out=out)

        def torch_ref():
            return module(x)

        def check():
            return max_relative_error(fused(), torch_ref())

        traffic = 2 * tokens * HIDDEN * element
    return fused, torch_ref, check, traffic + HIDDEN * element


def rotary_case(tokens):
    rope = RotaryEmbedding(
        HEAD_DIM,
        MAX_POSITION,
        theta=500000.0,
        scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).cuda()
    q_size, kv_size = NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device="cuda", dtype=DTYPE)
    q = qkv[:, :q_size].view(tokens, NUM_Q_HEADS, HEAD_DIM)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_POSITION, (tokens,), device="cuda")
    cache = rope.cos_sin_cache

    def fused():  # rotates in place again on every call: fine for timing
        return apply_rotary(positions, q, k, cache)

    def torch_ref():
        return rope(positions, q, k)

    def check():
        initial = qkv.clone()
        want_q, want_k = torch_ref()
        fused()
        error = max(max_relative_error(q, want_q), max_relative_error(k, want_k))
        qkv.copy_(initial)
        return error

    traffic = 2 * tokens * (q_size + kv_size) * DTYPE.itemsize + tokens * HEAD_DIM * 4 + tokens * 8
    return fused, torch_ref, check, traffic


def silu_case(tokens):
    x = 3 * torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
    out = torch.empty(tokens, INTERMEDIATE, device="cuda", dtype=DTYPE)
    module = SiluAndMul()

    def fused():
        return silu_and_mul(x, out=out)

    def torch_ref():
        return module(x)

    def check():
        return max_relative_error(fused(), torch_ref())

    return fused, torch_ref, check, 3 * tokens * INTERMEDIATE * DTYPE.itemsize


CASES = {
    "rms_norm": lambda tokens: rms_norm_case(tokens, with_residual=False),
    "rms_norm+residual": lambda tokens: rms_norm_case(tokens, with_residual=True),
    "rotary": rotary_case,
    "silu_and_mul": silu_case,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_json = (
        os.path.join(os.environ["OUT"], "elementwise.json") if "OUT" in os.environ else None
    )
    parser.add_argument("--json", default=default_json)
    parser.add_argument("--tokens", default="8192,256")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/elementwise.py needs a CUDA device")
    torch.manual_seed(0)
    copy_bw = measure_copy_bandwidth(args.quick)
    torch.cuda.empty_cache()  # give the copy's 4 GiB back
    results = {
        "device": torch.cuda.get_device_name(),
        "dtype": str(DTYPE),
        "shape": {
            "hidden": HIDDEN,
            "num_q_heads": NUM_Q_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "intermediate": INTERMEDIATE,
        },
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "rows": [],
    }
    header = (
        f"{'op':<19}{'tokens':>7}{'torch ms':>10}{'fused ms':>10}{'speedup':>9}"
        f"{'fused GB/s':>12}{'% copy bw':>11}{'max rel err':>13}"
    )
    print(f"{results['device']}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(header)
    print("-" * len(header))
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, make in CASES.items():
            fused, torch_ref, check, traffic = make(tokens)
            error = check()
            torch_ms = bench_ms(torch_ref, args.quick)
            fused_ms = bench_ms(fused, args.quick)
            bandwidth = traffic / (fused_ms * 1e-3)
            row = {
                "op": name,
                "tokens": tokens,
                "torch_ms": torch_ms,
                "fused_ms": fused_ms,
                "speedup": torch_ms / fused_ms,
                "bytes": traffic,
                "fused_gbs": bandwidth / 1e9,
                "pct_copy_bw": 100 * bandwidth / copy_bw,
                "max_rel_err": error,
            }
            results["rows"].append(row)
            print(
                f"{name:<19}{tokens:>7}{torch_ms:>10.4f}{fused_ms:>10.4f}"
                f"{row['speedup']:>8.2f}x{row['fused_gbs']:>12.0f}{row['pct_copy_bw']:>10.1f}%"
                f"{error:>13.2e}"
            )
            del fused, torch_ref, check
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
