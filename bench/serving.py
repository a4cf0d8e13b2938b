"""Served throughput and latency over gRPC or the OpenAI HTTP API, with the offline engine and
optionally a peer server on the same workload.

Starts `pagedserve serve` (or uses --url / --base-url), sends greedy requests with EOS ignored
and Poisson arrivals at each --rates value (req/s; 'inf' sends them all at once: saturation)
through GenerateStream (--backend grpc) or streaming /v1/completions (--backend openai), and
reports what `vllm bench serve` reports: request throughput, output tokens/s, TTFT, TPOT and
inter-token latency (mean, p50, p99). --peer-base-url runs the same requests against another
OpenAI-compatible server (`transformers serve`, vLLM) under the same metric names. Then, with
the server stopped, the offline `LLM` runs the last rate's requests in its own process.

    python bench/serving.py --json out/serving.json                       # GPU, 8B shape
    python bench/serving.py --model tiny --device cpu --num-requests 32   # smoke run
    # pagedserve and transformers serve, one real checkpoint, text prompts (the peer takes no
    # token ids, and needs its own `generation_config` to ignore EOS):
    transformers serve DIR --port 8001 --continuous-batching &
    python bench/serving.py --model-dir DIR --backend openai --prompt-format text \
        --peer-base-url http://127.0.0.1:8001/v1 --peer-model DIR \
        --peer-ignore-eos generation-config
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import MODEL_SHAPES, fixed_workload, sharegpt_workload  # noqa: E402

from pagedserve.cli_serve import READY_PREFIX, ready_addresses  # noqa: E402
from pagedserve.cluster.load_generator import format_table, run_load, run_openai_load  # noqa: E402

# How a server is told to ignore EOS (exactly max_tokens tokens): pagedserve, vLLM and SGLang
# take `ignore_eos`; `transformers serve` refuses unknown fields but takes a generation config.
IGNORE_EOS_FIELDS = {
    "field": lambda max_tokens: {"ignore_eos": True},
    "generation-config": lambda max_tokens: {"generation_config": json.dumps(
        {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False})},
    "off": lambda max_tokens: {},
}


def _engine_flags(args) -> list[str]:
    flags = ["--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-model-len", "2048",
             "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.device == "cuda":
        flags += ["--dtype", "bfloat16"]
    return flags


def _model_dir(args) -> str:
    if args.model_dir:
        return args.model_dir
    directory = tempfile.mkdtemp(prefix="bench-serving-")
    if args.model == "tiny":
        from tests.helpers.tiny_models import tiny_config

        tiny_config("llama", max_position_embeddings=4096).save_pretrained(directory)
    else:
        MODEL_SHAPES[args.model]().save_pretrained(directory)
    return directory


def _load_format(args) -> str:
    return "auto" if args.model_dir else "dummy"


def start_server(model_dir: str, args) -> tuple[subprocess.Popen, str, str | None]:
    """The server process, its gRPC address and its OpenAI base URL (--backend openai)."""
    http_port = "0" if args.backend == "openai" else "-1"
    command = [sys.executable, "-m", "pagedserve", "serve", "--model", model_dir, "--port", "0",
               "--http-port", http_port, "--load-format", _load_format(args),
               "--max-queue-per-replica", str(max(args.num_requests, 1)), *_engine_flags(args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith(READY_PREFIX):
            return process, *ready_addresses(line)
    raise SystemExit(f"the server exited before serving (status {process.wait()})")


def _first_model(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def _as_text(model_dir: str, workloads):
    """The token-id prompts decoded (a server that takes text re-tokenizes them: the prompt
    lengths then differ a little from the ids')."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [([tokenizer.decode(p, skip_special_tokens=True) for p in prompts], lengths)
            for prompts, lengths in workloads]


def _runs(load, workloads, warm, seed: int) -> list[dict]:
    """`load(prompts, lengths, rate, seed)` for the warm-up, then per (rate, workload)."""
    asyncio.run(load(*warm, math.inf, seed))
    return [asyncio.run(load(prompts, lengths, rate, seed)) for rate, (prompts, lengths) in
            workloads]


def _workload(args, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    if args.workload == "fixed":
        return fixed_workload(args.num_requests, args.input_len, args.output_len, vocab, seed)
    return sharegpt_workload(args.num_requests, vocab, seed)


def offline(model_dir: str, args) -> dict:
    """The last (saturation) rate's requests through the offline `LLM`, in its own process."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pagedserve import LLM, SamplingParams
prompts, lengths, warm_prompts, warm_lengths = json.load(open({args.workload_file!r}))
llm = LLM(model={model_dir!r}, load_format={_load_format(args)!r}, device={args.device!r},
          dtype={"bfloat16" if args.device == "cuda" else "auto"!r}, max_model_len=2048,
          max_num_seqs={args.max_num_seqs},
          gpu_memory_utilization={args.gpu_memory_utilization})
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
warm = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in warm_lengths]
llm.generate(warm_prompts, warm, use_tqdm=False)
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
    parser.add_argument("--model-dir", default=None,
                        help="a checkpoint served with its weights (default: --model's shape, "
                             "random weights)")
    parser.add_argument("--url", default=None, help="a running server (skips start and offline)")
    parser.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                        help="load pagedserve through GenerateStream or streaming "
                             "/v1/completions")
    parser.add_argument("--base-url", default=None,
                        help="a running OpenAI-compatible server, e.g. http://host:8000/v1, "
                             "loaded instead of starting pagedserve (skips offline)")
    parser.add_argument("--served-model", default=None,
                        help="`model` sent to --base-url (default: the first it lists)")
    parser.add_argument("--peer-base-url", default=None,
                        help="an OpenAI-compatible server that gets the same requests too")
    parser.add_argument("--peer-model", default=None,
                        help="`model` sent to the peer (default: the first it lists)")
    parser.add_argument("--peer-ignore-eos", choices=sorted(IGNORE_EOS_FIELDS), default="field",
                        help="how the peer is told to ignore EOS")
    parser.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                        help="token ids, or the ids decoded with --model-dir's tokenizer "
                             "(OpenAI backends only)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token of the OpenAI-compatible servers")
    parser.add_argument("--workload", choices=("fixed", "sharegpt"), default="fixed")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rates", default="8,16,32,inf", help="request rates (req/s)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="of pagedserve, served and offline (lower it when a peer server "
                             "holds the same GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "serving.json"))
    args = parser.parse_args()
    if args.prompt_format == "text" and not (args.model_dir and (
            args.backend == "openai" or args.base_url)):
        parser.error("--prompt-format text needs --model-dir (its tokenizer) and an OpenAI "
                     "backend (--backend openai or --base-url)")
    if args.url and args.backend == "openai":
        parser.error("--url is a gRPC address; give an OpenAI server as --base-url")
    model_dir = _model_dir(args)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    rates = [float(r) for r in args.rates.split(",")]
    # Every rate gets prompts of its own (and the warm-up others again): the server's prefix
    # cache would otherwise serve each later rate's prompts from the earlier ones' blocks.
    workloads = [_workload(args, vocab, args.seed + 1 + index) for index in range(len(rates))]
    warm_prompts, warm_lengths = _workload(args, vocab, args.seed + len(rates) + 1)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([*workloads[-1], warm_prompts[:8], warm_lengths[:8]], handle)
        args.workload_file = handle.name
    warm = (warm_prompts[:8], warm_lengths[:8])
    if args.prompt_format == "text":
        workloads = _as_text(model_dir, workloads)
        warm = _as_text(model_dir, [warm])[0]
    process = None
    address, base_url = args.url, args.base_url
    if address is None and base_url is None:
        process, address, base_url = start_server(model_dir, args)
    report = {"args": vars(args), "target": base_url or address, "runs": []}
    if process is not None and args.backend == "openai":
        # The server started here runs in this environment: uvicorn's HTTP parser is
        # httptools when installed, else h11 (more of the gateway's CPU per event).
        report["uvicorn_http"] = "httptools" if importlib.util.find_spec("httptools") \
            else "h11"
    try:
        if base_url is None:
            def load(prompts, lengths, rate, seed):
                return run_load(address, prompts, lengths, rate, seed)
        else:
            model = args.served_model or _first_model(base_url)
            report["model"] = model

            def load(prompts, lengths, rate, seed):
                return run_openai_load(base_url, model, prompts, lengths, rate, seed,
                                       IGNORE_EOS_FIELDS["field"], args.api_key)
        report["runs"] = _runs(load, list(zip(rates, workloads, strict=True)), warm, args.seed)
    finally:
        if process is not None:
            process.send_signal(2)
            process.wait(timeout=120)
    if args.peer_base_url:  # after pagedserve stopped: the two never share the device
        peer_model = args.peer_model or _first_model(args.peer_base_url)

        def peer_load(prompts, lengths, rate, seed):
            return run_openai_load(args.peer_base_url, peer_model, prompts, lengths, rate, seed,
                                   IGNORE_EOS_FIELDS[args.peer_ignore_eos], args.api_key)
        report["peer"] = {"target": args.peer_base_url, "model": peer_model,
                          "runs": _runs(peer_load, list(zip(rates, workloads, strict=True)),
                                        warm, args.seed)}
    if process is not None and not args.skip_offline:
        report["offline"] = offline(model_dir, args)
    http = f" (uvicorn HTTP: {report['uvicorn_http']})" if "uvicorn_http" in report else ""
    print(f"\n{report['target']}{http}\n" + format_table(report["runs"]))
    if "peer" in report:
        print(f"\npeer {report['peer']['target']}\n" + format_table(report["peer"]["runs"]))
        peer_rate = report["peer"]["runs"][-1]["output_throughput"]
        report["served_over_peer_at_saturation"] = \
            report["runs"][-1]["output_throughput"] / peer_rate if peer_rate else None
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
