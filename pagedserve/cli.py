"""Command line: `pagedserve serve` runs the served system (gateway, coordinator, workers);
`pagedserve status` reports on a running one; `pagedserve generate` runs offline generation
(default: the embedded model).

A user error (a bad value, a missing model directory) prints one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pagedserve.cli_bench import add_bench_arguments, bench
from pagedserve.cli_demo import add_demo_arguments, demo
from pagedserve.cli_serve import add_serve_arguments, serve
from pagedserve.cli_status import add_status_arguments, status
from pagedserve.errors import Internal, PagedServeError

USER_ERROR_STATUS = 2  # what argparse exits with for a bad command line

DEFAULT_PROMPTS = [
    "PagedAttention stores the KV cache in fixed-size blocks,",
    "The quick brown fox",
    "Continuous batching means",
    "def fibonacci(n):",
]
# With no --prompt, these go through the model's chat template (the default model is an
# instruct model); DEFAULT_PROMPTS are the fallback for a tokenizer without one.
DEFAULT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Describe a cat in one sentence.",
]


def _generate_remote(args: argparse.Namespace) -> int:
    """Stream each prompt's completion from a running server."""
    from pagedserve.client import Client, StreamDelta

    with Client(args.url, api_key=args.api_key) as client:
        for prompt in args.prompt or DEFAULT_PROMPTS:
            print(f"{prompt!r} -> ", end="", flush=True)
            stream = client.generate_stream(prompt, max_tokens=args.max_tokens,
                                            temperature=args.temperature, top_p=args.top_p,
                                            n=args.n)
            for event in stream:
                if isinstance(event, StreamDelta):
                    print(event.text, end="", flush=True)
            print(f" ({', '.join(map(str, stream.final.finish_reasons))})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.url:
        return _generate_remote(args)
    from pagedserve.sampling_params import SamplingParams

    # Checked before the engine is imported (seconds of torch start-up) or built.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, n=args.n)
    if args.model is not None and not Path(args.model).is_dir() \
            and not args.model.lower().endswith(".gguf"):
        raise FileNotFoundError(f"--model {args.model!r} is not a directory; give a Hugging Face "
                                "checkpoint directory or a .gguf file, or leave --model out "
                                "for the embedded model")
    from pagedserve.llm import LLM

    with LLM(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
             tensor_parallel_size=args.tensor_parallel_size,
             kv_cache_dtype=args.kv_cache_dtype, cpu_threads=args.cpu_threads) as llm:
        tokenizer = llm.get_tokenizer()
        chat = not args.prompt and bool(getattr(tokenizer, "chat_template", None))
        prompts = args.prompt or (DEFAULT_QUESTIONS if chat else DEFAULT_PROMPTS)
        start = time.perf_counter()
        if chat:
            outputs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    generated = sum(o.usage.completion_tokens for o in outputs)
    records = []
    for prompt, output in zip(prompts, outputs, strict=True):
        for completion in output.outputs:
            print(f"{prompt!r} -> {completion.text!r} ({completion.finish_reason})")
            records.append({"prompt": prompt, "text": completion.text,
                            "token_ids": completion.token_ids,
                            "finish_reason": completion.finish_reason})
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s "
          f"({generated / elapsed:.1f} tok/s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"outputs": records, "seconds": elapsed}, handle, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    serve_parser = sub.add_parser("serve", help="serve a model over gRPC and OpenAI-compatible "
                                  "HTTP until interrupted",
                                  formatter_class=formatter)
    add_serve_arguments(serve_parser)
    status_parser = sub.add_parser("status", help="replicas, GPUs, KV usage, queues and "
                                   "throughput of a running server", formatter_class=formatter)
    add_status_arguments(status_parser)
    demo_parser = sub.add_parser("demo", help="start a server, stream through the SDK, stop it",
                                 formatter_class=formatter)
    add_demo_arguments(demo_parser)
    bench_parser = sub.add_parser("bench", help="benchmark a running server",
                                  formatter_class=formatter)
    add_bench_arguments(bench_parser)
    gen = sub.add_parser("generate", help="offline generation for a few prompts",
                         formatter_class=formatter)
    gen.add_argument("--model", default=None, help="HF checkpoint dir (default: embedded model)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("-n", "--n", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="engine seed (reproducible runs)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                     help="auto (the model dtype) or fp8 (e4m3: twice the KV blocks)")
    gen.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                     help="ranks (GPUs) to split the model over; > 1 runs Ray worker actors")
    gen.add_argument("--cpu-threads", type=int, default=None,
                     help="torch threads of a CPU worker (default: OMP_NUM_THREADS, else half "
                          "the cores, at most 4)")
    gen.add_argument("--json", default=None, help="write outputs here")
    gen.add_argument("--url", default=None,
                     help="a running server's host:port: stream from it instead of running "
                          "the model here")
    gen.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                     help="bearer token for --url (default: $PAGEDSERVE_API_KEY)")
    args = parser.parse_args(argv)
    # Only `serve` has --log-level (its request log lines are INFO on `pagedserve.requests`).
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "status":
            return status(args)
        if args.command == "bench":
            return bench(args)
        if args.command == "demo":
            return demo(args)
        return _generate(args)
    except Internal:
        raise  # a bug inside pagedserve: its traceback is what a report needs
    except (PagedServeError, FileNotFoundError, ValueError) as error:
        message = " ".join(str(error).splitlines())
        print(f"pagedserve: error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
