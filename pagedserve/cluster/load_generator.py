"""Load generation against a served model: Poisson arrivals over pagedserve's GenerateStream
(`run_load`) or any OpenAI-compatible streaming /v1/completions (`run_openai_load`: pagedserve's
HTTP API, vLLM, `transformers serve`), with the metrics `vllm bench serve` reports (request
throughput, output tokens/s, TTFT, TPOT, ITL), named alike for both."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _summary(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {f"mean_{name}_ms": statistics.fmean(values) * 1e3,
            f"median_{name}_ms": _percentile(values, 50) * 1e3,
            f"p99_{name}_ms": _percentile(values, 99) * 1e3}


@dataclass
class _Latencies:
    """What the requests of one run measured."""

    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: int = 0

    def record(self, start: float, arrivals: list[float], tokens: int) -> None:
        """One request: when it was sent, when each message with tokens arrived, and how
        many tokens it got."""
        self.tokens += tokens
        if not arrivals:
            return
        self.ttfts.append(arrivals[0] - start)
        self.itls.extend(later - earlier for earlier, later in pairwise(arrivals))
        if tokens > 1:
            self.tpots.append((arrivals[-1] - arrivals[0]) / (tokens - 1))


async def _drive(prompts, lengths, rate: float, seed: int,
                 one: Callable[[Any, int, _Latencies], Awaitable[None]]) -> dict:
    """Send every (prompt, max_tokens) through `one` with Poisson arrivals at `rate`."""
    rng = random.Random(seed)
    latencies = _Latencies()
    started = time.perf_counter()
    tasks = []
    for prompt, max_tokens in zip(prompts, lengths, strict=True):
        tasks.append(asyncio.ensure_future(one(prompt, max_tokens, latencies)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    completed = len(prompts) - latencies.failures
    return {"request_rate": rate if math.isfinite(rate) else "inf", "duration_s": elapsed,
            "completed": completed, "failed": latencies.failures,
            "request_throughput": completed / elapsed,
            "output_throughput": latencies.tokens / elapsed, "output_tokens": latencies.tokens,
            **_summary("ttft", latencies.ttfts), **_summary("tpot", latencies.tpots),
            **_summary("itl", latencies.itls)}


async def run_load(address: str, prompts, lengths, rate: float, seed: int) -> dict:
    """Greedy token-id requests with EOS ignored over GenerateStream at `address`."""
    import grpc

    from pagedserve.protos.v1 import generation_pb2 as pb
    from pagedserve.protos.v1 import generation_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def one(prompt, max_tokens: int, latencies: _Latencies) -> None:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True))
            start = time.perf_counter()
            arrivals, count = [], 0
            try:
                async for message in stub.GenerateStream(request):
                    if message.HasField("delta"):
                        arrivals.append(time.perf_counter())
                        count += len(message.delta.token_ids)
            except grpc.aio.AioRpcError:
                latencies.failures += 1
                return
            latencies.record(start, arrivals, count)

        return await _drive(prompts, lengths, rate, seed, one)


async def run_openai_load(base_url: str, model: str, prompts, lengths, rate: float, seed: int,
                          extra_fields: Callable[[int], dict] = lambda max_tokens: {},
                          api_key: str | None = None) -> dict:
    """Greedy streaming completions at `base_url` (as the openai client takes it: .../v1);
    `extra_fields(max_tokens)` adds the server's own fields (e.g. `ignore_eos`). A chunk with
    text or an unfinished choice is a token arrival, the usage chunk gives the token count
    (else: the arrivals)."""
    from pagedserve.cluster.sse_client import stream_events

    async def one(prompt, max_tokens: int, latencies: _Latencies) -> None:
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True}, **extra_fields(max_tokens)}
        start = time.perf_counter()
        arrivals, usage_tokens = [], None
        try:
            async for chunk in stream_events(base_url, "/completions", payload, api_key):
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                # A chunk that only ends a choice (no text; `transformers serve` sends one)
                # brings no token.
                if any(choice.get("text") or choice.get("finish_reason") is None
                       for choice in chunk.get("choices") or ()):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
        except Exception:  # refused, cut off or malformed: a failed request, as vLLM counts
            latencies.failures += 1
            return
        latencies.record(start, arrivals, len(arrivals) if usage_tokens is None
                         else usage_tokens)

    return await _drive(prompts, lengths, rate, seed, one)


def random_prompts(count: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, away from the low ids where special tokens usually sit."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(prompt_len)]
            for _ in range(count)]


def format_table(runs: list[dict]) -> str:
    """The runs as the table `pagedserve bench serve` and bench/serving.py print (ms)."""
    lines = [f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'ttft p50':>9} {'ttft p99':>9} "
             f"{'tpot p50':>9} {'tpot p99':>9} {'itl p50':>9} {'itl p99':>9}  (ms)"]
    for run in runs:
        lines.append(f"{run['request_rate']:>6} {run['request_throughput']:>7.2f} "
                     f"{run['output_throughput']:>10,.0f} "
                     + " ".join(f"{run.get(k, float('nan')):>9.1f}" for k in (
                         "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                         "median_itl_ms", "p99_itl_ms")))
    return "\n".join(lines)
