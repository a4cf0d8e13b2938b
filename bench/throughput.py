"""Offline throughput on one GPU: pagedserve vs Hugging Face transformers, with the floor.

Workloads (seeded): N requests of fixed input/output lengths (default 256 x 512 -> 128) and a
ShareGPT-like length mix. Peers, in the same run and on the same random bf16 weights shape:
transformers `generate` with static batches, and transformers `generate_batch` (continuous
batching; every output's `.error` is checked). The floor is prefill FLOPs at the measured bf16
matmul rate plus decode bytes (weights + KV read each step) at the measured copy bandwidth.

    python bench/throughput.py --json out/throughput.json

``--kv-cache-dtype fp8`` stores the KV cache in e4m3 (scales calibrated on the first prefill);
``both`` runs pagedserve twice in the same process, model-dtype KV then fp8 KV, and reports the
fp8/bf16 ratios of output tokens/s and of KV blocks at the same ``gpu_memory_utilization``.
Issue 11's KV-bound acceptance run (8B shape, 1,024 x (2,048 -> 256), enough sequences per
step that the KV pool, not max_num_seqs, bounds the batch):

    python bench/throughput.py --num-requests 1024 --input-len 2048 --output-len 256 \
        --max-num-seqs 1024 --kv-cache-dtype both --skip-hf --skip-sharegpt \
        --json $OUT/throughput_fp8.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.workers.models.loader import llama_8b_config, llama_70b_config  # noqa: E402

logger = logging.getLogger("bench.throughput")


MODEL_SHAPES = {"llama-3-8b": llama_8b_config, "llama-3-70b": llama_70b_config}


def _copy_bandwidth(device: torch.device) -> float:
    from triton.testing import do_bench

    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)


def _matmul_rate(device: torch.device, size: int = 8192) -> float:
    from triton.testing import do_bench

    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * size**3 / (mm_ms * 1e-3)


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    bandwidth, rate = _copy_bandwidth(device), _matmul_rate(device)
    torch.cuda.empty_cache()
    return bandwidth, rate


def model_numbers(config) -> dict[str, float]:
    """Matmul parameters per token, bytes of weights, KV bytes per token (bf16)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    per_layer = (
        hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * config.intermediate_size
    )
    body = layers * per_layer
    lm_head = hidden * config.vocab_size
    # Read by every decode step: the layers, the LM head and the norms. The embedding table is
    # not: a step gathers one row per sequence.
    weights_bytes = 2 * (body + lm_head + layers * 2 * hidden)
    return {
        "body_params": body,
        "lm_head_params": lm_head,
        "weights_bytes": weights_bytes,
        "kv_bytes_per_token": 2 * 2 * layers * kv_dim,
        "layers": layers,
        "hidden": hidden,
    }


def floor_seconds(
    lengths: list[tuple[int, int]], numbers: dict[str, float], bandwidth: float, rate: float
) -> float:
    """Prefill FLOPs / matmul rate + sum over decode steps of the slower of bytes moved / copy
    bandwidth and FLOPs / matmul rate.

    All requests decode together (the most favourable batching): step s reads the weights once
    and the KV of every request still running. Attention FLOPs are counted (causal in prefill).
    Copy bandwidth counts read + write bytes, and a read-only stream can beat it by a few
    percent (the attention kernel reaches 101-104%), so the decode term is a floor only to
    within that.
    """
    prefill_flops = 0.0
    for prompt, _ in lengths:
        prefill_flops += 2 * numbers["body_params"] * prompt + 2 * numbers["lm_head_params"]
        prefill_flops += 2 * numbers["layers"] * numbers["hidden"] * prompt * prompt  # QK^T + PV
    decode_seconds = 0.0
    max_output = max(output for _, output in lengths)
    matmul_params = numbers["body_params"] + numbers["lm_head_params"]
    for step in range(1, max_output):
        live = [(p, o) for p, o in lengths if o > step]
        if not live:
            break
        kv_tokens = sum(p + step for p, _ in live)
        step_bytes = numbers["weights_bytes"] + kv_tokens * numbers["kv_bytes_per_token"]
        step_flops = 2 * matmul_params * len(live) + 4 * numbers["layers"] * numbers[
            "hidden"] * kv_tokens
        decode_seconds += max(step_bytes / bandwidth, step_flops / rate)
    return prefill_flops / rate + decode_seconds


def fixed_workload(
    num: int, prompt_len: int, output_len: int, vocab: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(prompt_len)] for _ in range(num)]
    return prompts, [output_len] * num


def sharegpt_workload(
    num: int, vocab: int, seed: int, max_len: int = 2048
) -> tuple[list[list[int]], list[int]]:
    """Lognormal lengths with ShareGPT's means (about 161 in, 338 out) and a long tail."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num):
        prompt_len = min(max(4, int(rng.lognormvariate(math.log(161) - 0.72, 1.2))), 1024)
        output_len = min(
            max(4, int(rng.lognormvariate(math.log(338) - 0.405, 0.9))), max_len - prompt_len
        )
        prompts.append([rng.randrange(10, vocab - 10) for _ in range(prompt_len)])
        outputs.append(output_len)
    return prompts, outputs


def run_pagedserve(
    model_dir: str,
    prompts,
    outputs,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    tensor_parallel_size: int = 1,
    kv_cache_dtype: str = "auto",
) -> dict:
    # Room for the longest prompt plus its output (the fixed workload's 2048 -> 256 too).
    max_model_len = max(2048, max(map(len, prompts)) + max(outputs))
    llm = LLM(
        model=model_dir,
        tensor_parallel_size=tensor_parallel_size,
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
        enable_prefix_caching=False,
        kv_cache_dtype=kv_cache_dtype,
        calculate_kv_scales=True,
    )
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outputs]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # compile kernels, warm caches
    results = {}
    for name, count in (("full", len(prompts)),):
        torch.cuda.synchronize()
        start = time.perf_counter()
        done = llm.generate(prompts[:count], params[:count], use_tqdm=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in done)
        results[name] = {
            "seconds": elapsed,
            "output_tokens": tokens,
            "output_tok_s": tokens / elapsed,
        }
    model_info = llm.engine.model_info()
    info = {
        "num_gpu_blocks": llm.engine.scheduler.kv.pool.num_blocks,
        "kv_cache_dtype": model_info["kv_cache_dtype"],
        "kv_cache_capacity_tokens": model_info["kv_cache_capacity_tokens"],
        "preemptions": llm.engine.scheduler.num_preemptions,
    }
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {**results["full"], **info}


def hf_model(config, device):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


@torch.inference_mode()
def run_hf_static(model, prompts, outputs, batch_size: int) -> dict:
    """Static batches of similar lengths (sorted), left-padded; each batch runs to its longest."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    warm = torch.tensor([prompts[0][:16]] * 2, device=device)
    model.generate(warm, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    useful = 0
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in batch)
        pad = 0
        ids = torch.tensor(
            [[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=device
        )
        new = max(outputs[i] for i in batch)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        assert out.shape[1] == width + new, "static batch stopped early"
        useful += sum(outputs[i] for i in batch)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "output_tokens": useful,
        "output_tok_s": useful / elapsed,
        "batch_size": batch_size,
    }


@torch.no_grad()  # not inference_mode: generate_batch updates its own buffers in place
def run_hf_generate_batch(model, prompts, outputs) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        # Warm-up outside the timed region, as for the other systems (its manager set-up and
        # any kernel compilation would otherwise be timed).
        model.generate_batch(inputs=[p[:16] for p in prompts[:2]], generation_config=warm)
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=config)
    except Exception as error:  # the peer's failure is a result to report, not a crash
        return {"error": f"{type(error).__name__}: {error}"}
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    errors = [r.error for r in results.values() if r.error]
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return {
        "seconds": elapsed,
        "output_tokens": tokens,
        "output_tok_s": tokens / elapsed,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "num_results": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    # 16384 tokens per step, as vLLM uses offline on 80 GB-class GPUs.
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-workloads", default="fixed,sharegpt",
                        help="comma-separated workloads the transformers peers run")
    parser.add_argument("--skip-sharegpt", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3-8b",
                        help="dummy-weight model shape (transformers peers need --skip-hf for "
                        "llama-3-70b: it does not fit one GPU)")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="GPUs for pagedserve (Ray workers); the floor scales with it, transformers uses one",
    )
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "both"), default="auto",
                        help="pagedserve's KV cache: model dtype, fp8 (e4m3), or both in turn "
                        "(with the fp8/bf16 ratios)")
    parser.add_argument(
        "--json", default=os.path.join(os.environ.get("OUT", "out"), "throughput.json")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda")
    config = MODEL_SHAPES[args.model]()
    if args.model != "llama-3-8b" and not args.skip_hf:
        raise SystemExit(f"--model {args.model}: the transformers peers run on one GPU and the "
                         "model does not fit there; add --skip-hf")
    bandwidth, rate = measure_ceilings(device)
    tp = args.tensor_parallel_size
    numbers = model_numbers(config)
    workloads = {
        "fixed": fixed_workload(
            args.num_requests, args.input_len, args.output_len, config.vocab_size, args.seed
        )
    }
    if not args.skip_sharegpt:
        workloads["sharegpt"] = sharegpt_workload(args.num_requests, config.vocab_size, args.seed)
    report = {
        "device": torch.cuda.get_device_name(device),
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "matmul_tflop_s": rate / 1e12,
        "model": f"{args.model} shape, random bf16",
        "tensor_parallel_size": tp,
        "kv_cache_dtype": args.kv_cache_dtype,
        "workloads": {},
    }
    # (report key, EngineConfig.kv_cache_dtype) of each pagedserve run
    runs = {"auto": [("pagedserve", "auto")], "fp8": [("pagedserve", "fp8")],
            "both": [("pagedserve", "auto"), ("pagedserve_fp8", "fp8")]}[args.kv_cache_dtype]
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        for name, (prompts, outputs) in workloads.items():
            # TP ranks split weights, KV and FLOPs evenly: the floor uses tp devices' worth.
            floor = floor_seconds(
                list(zip(map(len, prompts), outputs, strict=True)),
                numbers,
                tp * bandwidth,
                tp * rate,
            )
            total = sum(outputs)
            entry = {
                "num_requests": len(prompts),
                "prompt_tokens": sum(map(len, prompts)),
                "output_tokens": total,
                "floor": {"seconds": floor, "output_tok_s": total / floor},
            }
            for key, kv_cache_dtype in runs:
                logger.info("%s: pagedserve, kv_cache_dtype %s", name, kv_cache_dtype)
                entry[key] = run_pagedserve(
                    model_dir,
                    prompts,
                    outputs,
                    args.max_num_seqs,
                    args.max_num_batched_tokens,
                    tp,
                    kv_cache_dtype,
                )
            if "pagedserve_fp8" in entry:
                auto, fp8 = entry["pagedserve"], entry["pagedserve_fp8"]
                entry["fp8_over_auto"] = {
                    "output_tok_s": fp8["output_tok_s"] / auto["output_tok_s"],
                    "num_gpu_blocks": fp8["num_gpu_blocks"] / auto["num_gpu_blocks"],
                }
            report["workloads"][name] = entry
    if not args.skip_hf:
        model = hf_model(config, device)
        for name, (prompts, outputs) in workloads.items():
            if name not in args.hf_workloads.split(","):
                continue
            entry = report["workloads"][name]
            logger.info("%s: transformers static", name)
            entry["hf_static"] = run_hf_static(model, prompts, outputs, args.hf_batch)
            logger.info("%s: transformers generate_batch", name)
            entry["hf_generate_batch"] = run_hf_generate_batch(model, prompts, outputs)
        del model
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(
        f"\ndevice: {report['device']}  copy {report['copy_bandwidth_tb_s']:.2f} TB/s  "
        f"bf16 matmul {report['matmul_tflop_s']:.0f} TFLOP/s  ({report['model']}); "
        f"pagedserve on {report['tensor_parallel_size']} GPU(s), floor for as many"
    )
    print(
        f"{'workload':<10}{'system':<22}{'seconds':>9}{'out tok/s':>11}{'vs floor':>10}"
        f"{'pagedserve x':>14}"
    )
    for name, entry in report["workloads"].items():
        floor_rate = entry["floor"]["output_tok_s"]
        ours = entry["pagedserve"]["output_tok_s"]
        for system in ("floor", "pagedserve", "pagedserve_fp8", "hf_static",
                       "hf_generate_batch"):
            result = entry.get(system)
            if result is None:
                continue
            if "error" in result:
                print(f"{name:<10}{system:<22}  error: {result['error'][:60]}")
                continue
            rate = result["output_tok_s"]
            if not rate:
                print(f"{name:<10}{system:<22}  no output: {result.get('first_error')}"[:100])
                continue
            kv = f"  {result['kv_cache_dtype']} KV, {result['num_gpu_blocks']} blocks" \
                if "kv_cache_dtype" in result else ""
            print(
                f"{name:<10}{system:<22}{result['seconds']:>9.2f}{rate:>11.0f}"
                f"{rate / floor_rate:>10.2f}{ours / rate:>14.2f}{kv}"
            )
        ratios = entry.get("fp8_over_auto")
        if ratios:
            print(f"{name:<10}fp8 KV / model-dtype KV: {ratios['output_tok_s']:.2f}x output "
                  f"tok/s, {ratios['num_gpu_blocks']:.2f}x KV blocks (targets >= 1.3x, "
                  ">= 1.95x)")


if __name__ == "__main__":
    main()
