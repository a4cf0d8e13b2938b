"""`pagedserve demo`: start `pagedserve serve`, stream a few completions through the SDK with
their time to first token and per-token latency, then stop the server (README's main job)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from pagedserve.cli_serve import READY_PREFIX

# Questions for an instruct model: each goes through the model's chat template here (the
# tokenizer is read from the checkpoint directory) and is sent as token ids.
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]
# Sent as text when the model's tokenizer has no chat template.
DEMO_PROMPTS = [
    "PagedAttention stores the KV cache in fixed-size blocks,",
    "The quick brown fox",
    "Continuous batching means",
]
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint dir (default: embedded)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, help="write the streamed results here")


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pagedserve", "serve", "--port", "0", "--http-port", "0",
               "--log-level", "warning",
               "--device", args.device]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in server.stdout:
        if line.startswith(READY_PREFIX):
            print(line.rstrip(), flush=True)
            return server, line.split(" on ")[1].split()[0]
        if time.monotonic() > deadline:
            break
    server.kill()
    raise RuntimeError(f"pagedserve serve did not come up (status {server.wait()})")


def _demo_prompts(model: str | None) -> list[tuple[str, str | list[int]]]:
    """(what to print, what to send): the questions as chat-template token ids when the
    model's tokenizer has a chat template, else DEMO_PROMPTS as text."""
    from transformers import AutoTokenizer

    from pagedserve.engine.default_model import ensure_default_model

    # The default model is converted here (once) rather than in the server, so a missing
    # package fails with its install command before a server starts.
    model = model or ensure_default_model()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return [(prompt, prompt) for prompt in DEMO_PROMPTS]
    prompts = []
    for question in DEMO_QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        prompts.append((question, [int(i) for i in ids]))
    return prompts


def _stream(address: str, prompts: list[tuple[str, str | list[int]]],
            max_tokens: int) -> list[dict]:
    from pagedserve.client import Client, StreamDelta

    records = []
    with Client(address, timeout=120) as client:
        for prompt, sent in prompts:
            start = time.perf_counter()
            arrivals, text, tokens = [], [], 0
            # Greedy: a 135M model's answers stay on topic only at low temperature.
            stream = client.generate_stream(sent, max_tokens=max_tokens, temperature=0.0,
                                            seed=len(records))
            print(f"{prompt!r} -> ", end="", flush=True)
            for event in stream:
                if isinstance(event, StreamDelta):
                    arrivals.append(time.perf_counter())
                    tokens += len(event.token_ids)
                    text.append(event.text)
                    print(event.text, end="", flush=True)
            ttft = arrivals[0] - start if arrivals else float("nan")
            per_token = (arrivals[-1] - arrivals[0]) / max(tokens - 1, 1) if arrivals else 0.0
            reason = stream.final.finish_reasons[0] if stream.final else None
            print(f"\n    {tokens} tokens, time to first token {ttft * 1e3:.1f} ms, "
                  f"{per_token * 1e3:.1f} ms per token after it ({reason})", flush=True)
            records.append({"prompt": prompt, "text": "".join(text), "tokens": tokens,
                            "ttft_s": ttft, "per_token_s": per_token, "finish_reason": reason})
    return records


def demo(args: argparse.Namespace) -> int:
    prompts = _demo_prompts(args.model)
    server, address = _start_server(args)
    try:
        records = _stream(address, prompts, args.max_tokens)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise RuntimeError("pagedserve serve did not stop within "
                               f"{STOP_TIMEOUT_S:.0f} s of SIGINT; killed it") from None
    print(f"server (pid {server.pid}) stopped with status {server.returncode}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"address": address, "completions": records,
                       "server_status": server.returncode}, handle, indent=2)
    return 0 if server.returncode == 0 else 1
