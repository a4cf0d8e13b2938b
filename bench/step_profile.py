"""Where one engine step's time goes (GPU): host phases per step kind, and top CUDA kernels.

Runs the throughput workload (8B shape, random bf16 weights) through `LLMEngine.step` with the
phases timed separately (schedule, runner.execute with a device sync, update; synchronous steps),
groups steps by kind (with prefill tokens / pure decode), measures the GPU idle fraction of pure
decode at full batch with async scheduling on and off, then profiles one prefill-heavy and one
decode step with torch.profiler and prints the top kernels.

    python bench/step_profile.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import fixed_workload  # noqa: E402
from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.engine.core import EngineCoreRequest  # noqa: E402
from pagedserve.workers.models.loader import llama_8b_config  # noqa: E402


def timed_steps(llm: LLM, prompts, outputs) -> dict:
    engine = llm.engine
    core = engine.core  # token ids only: no detokenization in the timed loop
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        core.add_request(EngineCoreRequest(f"p{index}", prompt, SamplingParams(
            temperature=0.0, max_tokens=output, ignore_eos=True)))
    phases = defaultdict(lambda: defaultdict(list))
    core.config.async_scheduling = False  # each phase on its own: no step overlaps another
    start = time.perf_counter()
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        step = core.schedule()
        t1 = time.perf_counter()
        results = core.executor.execute(step)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        core.complete(step, results)
        t3 = time.perf_counter()
        kind = "decode" if all(item.num_tokens == 1 for item in step.scheduled) else "prefill"
        phases[kind]["schedule_ms"].append((t1 - t0) * 1e3)
        phases[kind]["execute_ms"].append((t2 - t1) * 1e3)
        phases[kind]["update_ms"].append((t3 - t2) * 1e3)
        phases[kind]["tokens"].append(step.num_batched_tokens)
    total = time.perf_counter() - start
    core.config.async_scheduling = True
    summary = {"total_s": total}
    for kind, values in phases.items():
        summary[kind] = {"steps": len(values["tokens"]),
                         **{f"{name}_sum": sum(v) for name, v in values.items()},
                         **{f"{name}_median": statistics.median(v) for name, v in values.items()}}
    return summary


def profile_one(llm: LLM, prompts, output_len: int, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{label}{index}", prompt, SamplingParams(
            temperature=0.0, max_tokens=output_len, ignore_eos=True))
    step = engine.scheduler.schedule()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        results = engine.executor.execute(step)
        torch.cuda.synchronize()
    engine.scheduler.update(step, results[-1].sampled)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                      max_name_column_width=60)
    for index in range(len(prompts)):
        engine.abort_request(f"{label}{index}")
    return f"{label}: {step.num_batched_tokens} tokens, {len(step.scheduled)} seqs\n{table}"


def profile_decode(llm: LLM, prompts) -> str:
    """Profile one pure decode step of the whole batch (a CUDA graph replay when enabled)."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    for index, prompt in enumerate(prompts):
        engine.add_request(f"d{index}", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    while True:
        step = engine.scheduler.schedule()
        if all(item.num_tokens == 1 for item in step.scheduled):
            break
        engine.scheduler.update(step, engine.executor.execute(step)[-1].sampled)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.scheduler.update(step, engine.executor.execute(step)[-1].sampled)
        torch.cuda.synchronize()
    for index in range(len(prompts)):
        engine.abort_request(f"d{index}")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=16,
                                      max_name_column_width=60)
    return f"decode: {len(step.scheduled)} seqs\n{table}"


def decode_utilization(llm: LLM, prompts, overlap: bool, steps: int = 20) -> dict:
    """Wall time vs GPU kernel time over `steps` whole engine steps of pure decode (CUDA-only
    profiling, so the host code runs at full speed): the gap is host time the GPU waits for."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    engine.core.config.async_scheduling = overlap
    for index, prompt in enumerate(prompts):
        engine.add_request(f"u{index}", prompt, SamplingParams(max_tokens=steps + 8,
                                                               ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids)
              for r in engine.scheduler.requests.values()):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(event.self_device_time_total for event in prof.key_averages())
    for index in range(len(prompts)):
        engine.abort_request(f"u{index}")
    while engine.has_unfinished_requests():  # the overlapped step still out
        engine.step()
    engine.core.config.async_scheduling = True
    return {"overlap": overlap, "steps": steps, "batch": len(prompts),
            "wall_ms_per_step": wall / steps * 1e3,
            "gpu_kernel_ms_per_step": kernel_us / steps / 1e3,
            "gpu_idle_fraction": 1 - kernel_us / 1e6 / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    config = llama_8b_config()
    prompts, outputs = fixed_workload(args.num_requests, 512, 128, config.vocab_size, 0)
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", device="cuda",
                  max_model_len=2048, max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=False, enforce_eager=args.eager)
        llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
        summary = timed_steps(llm, prompts, outputs)
        summary["decode_utilization"] = [decode_utilization(llm, prompts, overlap)
                                         for overlap in (True, False)]
        print(json.dumps(summary, indent=1))
        print(profile_one(llm, prompts[:16], 2, "prefill"))
        print(profile_decode(llm, prompts))
    out = os.environ.get("OUT")
    if out:
        Path(out, "step_profile.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
