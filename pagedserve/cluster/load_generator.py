"""Load generation against a served pagedserve: Poisson arrivals over GenerateStream, with the
metrics `vllm bench serve` reports (request throughput, output tokens/s, TTFT, TPOT, ITL)."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _summary(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {f"mean_{name}_ms": statistics.fmean(values) * 1e3,
            f"median_{name}_ms": _percentile(values, 50) * 1e3,
            f"p99_{name}_ms": _percentile(values, 99) * 1e3}


async def run_load(address: str, prompts, lengths, rate: float, seed: int) -> dict:
    import grpc

    from pagedserve.protos.v1 import generation_pb2 as pb
    from pagedserve.protos.v1 import generation_pb2_grpc

    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        ttfts, tpots, itls, tokens = [], [], [], 0
        failures = 0

        async def one(prompt, max_tokens):
            nonlocal tokens, failures
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True))
            start = time.perf_counter()
            last, times, count = start, [], 0
            try:
                async for message in stub.GenerateStream(request):
                    if message.HasField("delta"):
                        now = time.perf_counter()
                        times.append(now - last)
                        last = now
                        count += len(message.delta.token_ids)
            except grpc.aio.AioRpcError:
                failures += 1
                return
            tokens += count
            if times:
                ttfts.append(times[0])
                itls.extend(times[1:])
                if count > 1:
                    tpots.append((last - start - times[0]) / (count - 1))

        started = time.perf_counter()
        tasks = []
        for prompt, max_tokens in zip(prompts, lengths, strict=True):
            tasks.append(asyncio.ensure_future(one(prompt, max_tokens)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {"request_rate": rate if math.isfinite(rate) else "inf", "duration_s": elapsed,
            "completed": len(prompts) - failures,
            "failed": failures, "request_throughput": (len(prompts) - failures) / elapsed,
            "output_throughput": tokens / elapsed, "output_tokens": tokens,
            **_summary("ttft", ttfts), **_summary("tpot", tpots), **_summary("itl", itls)}


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
