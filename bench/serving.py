"""Served throughput and latency over gRPC, with the offline engine on the same workload.

Starts `pagedserve serve` (or uses --url), sends token-id requests with Poisson arrivals at each
--rates value (req/s; 'inf' sends them all at once: saturation) through GenerateStream, and
reports what `vllm bench serve` reports: request throughput, output tokens/s, TTFT, TPOT and
inter-token latency (mean, p50, p99). Then, with the server stopped, the offline `LLM` runs the
same requests in its own process for the ratio.

    python bench/serving.py --json out/serving.json                       # GPU, 8B shape
    python bench/serving.py --model tiny --device cpu --num-requests 32   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import MODEL_SHAPES, fixed_workload, sharegpt_workload  # noqa: E402

from pagedserve.cluster.load_generator import format_table, run_load  # noqa: E402

READY_PREFIX = "pagedserve: serving"


def _engine_flags(args) -> list[str]:
    flags = ["--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-model-len", "2048"]
    if args.device == "cuda":
        flags += ["--dtype", "bfloat16"]
    return flags


def _model_dir(args) -> str:
    directory = tempfile.mkdtemp(prefix="bench-serving-")
    if args.model == "tiny":
        from tests.helpers.tiny_models import tiny_config

        tiny_config("llama", max_position_embeddings=4096).save_pretrained(directory)
    else:
        MODEL_SHAPES[args.model]().save_pretrained(directory)
    return directory


def start_server(model_dir: str, args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pagedserve", "serve", "--model", model_dir, "--port", "0",
               "--load-format", "dummy",
               "--max-queue-per-replica", str(max(args.num_requests, 1)), *_engine_flags(args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith(READY_PREFIX):
            return process, line.split(" on ")[1].split()[0]
    raise SystemExit(f"the server exited before serving (status {process.wait()})")


def offline(model_dir: str, args, prompts, lengths) -> dict:
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pagedserve import LLM, SamplingParams
prompts, lengths = json.load(open({args.workload_file!r}))
llm = LLM(model={model_dir!r}, load_format="dummy", device={args.device!r},
          dtype={"bfloat16" if args.device == "cuda" else "auto"!r}, max_model_len=2048,
          max_num_seqs={args.max_num_seqs})
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
llm.generate(prompts[:8], params[:8], use_tqdm=False)
start = time.perf_counter()
done = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
tokens = sum(len(o.outputs[0].token_ids) for o in done)
print(json.dumps({{"seconds": elapsed, "output_tokens": tokens,
                  "output_throughput": tokens / elapsed}}))
"""
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*sorted(MODEL_SHAPES), "tiny"],
                        default="llama-3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--url", default=None, help="a running server (skips start and offline)")
    parser.add_argument("--workload", choices=("fixed", "sharegpt"), default="fixed")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rates", default="8,16,32,inf", help="request rates (req/s)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "serving.json"))
    args = parser.parse_args()
    model_dir = _model_dir(args)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    if args.workload == "fixed":
        prompts, lengths = fixed_workload(args.num_requests, args.input_len, args.output_len,
                                          vocab, args.seed)
    else:
        prompts, lengths = sharegpt_workload(args.num_requests, vocab, args.seed)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([prompts, lengths], handle)
        args.workload_file = handle.name
    rates = [float(r) for r in args.rates.split(",")]
    process = None
    address = args.url
    if address is None:
        process, address = start_server(model_dir, args)
    report = {"args": vars(args), "runs": []}
    try:
        asyncio.run(run_load(address, prompts[:8], lengths[:8], math.inf, args.seed))  # warm
        for rate in rates:
            report["runs"].append(asyncio.run(run_load(address, prompts, lengths, rate,
                                                       args.seed)))
    finally:
        if process is not None:
            process.send_signal(2)
            process.wait(timeout=120)
    if args.url is None and not args.skip_offline:
        report["offline"] = offline(model_dir, args, prompts, lengths)
    print("\n" + format_table(report["runs"]))
    if "offline" in report:
        saturated = report["runs"][-1]["output_throughput"]
        offline_rate = report["offline"]["output_throughput"]
        report["served_over_offline_at_saturation"] = saturated / offline_rate
        print(f"offline {offline_rate:,.0f} out tok/s; served at the last rate "
              f"{saturated:,.0f} = {saturated / offline_rate:.3f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
