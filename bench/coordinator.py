"""Throughput through the coordinator actor vs the in-process engine, and the control-plane gap.

The same workloads as bench/throughput.py (seeded token-id prompts, random bf16 weights of the
8B shape): 256 x (512 -> 128) and a 1,024-request ShareGPT-like mix. Variants, each in its own
process so that one's GPU memory never shadows another's:

- `inprocess`: `LLM.generate`, the core and its one rank in this process (the peer);
- `coordinator_graph` / `coordinator_actor`: a coordinator actor (its own process, CPU only,
  torch-free) whose rank is a Ray actor, reached by a Ray Compiled Graph or by one actor task
  per step; requests are submitted in one call and streamed back batched per step;
- `..._sync`: the same with async scheduling off (each step waits for its tokens).

The rank records CUDA events at the start and end of each step's GPU work; the time between one
step's end and the next one's start is the GPU gap: the control-plane time (scheduling,
dispatch, result transfer, bookkeeping) that async scheduling hides behind the running step.
The floor (bench/throughput.py's: prefill FLOPs at the measured matmul rate plus decode
bytes at the measured copy bandwidth) comes from a run of the same script.

    python bench/coordinator.py --json out/coordinator.json
    python bench/coordinator.py --device cpu --model tiny   # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import (  # noqa: E402
    MODEL_SHAPES,
    fixed_workload,
    floor_seconds,
    measure_ceilings,
    model_numbers,
    sharegpt_workload,
)

VARIANTS = ("inprocess", "coordinator_graph", "coordinator_actor", "inprocess_sync",
            "coordinator_graph_sync")
DISPATCH = {"coordinator_graph": "compiled_graph", "coordinator_actor": "actor_call"}


def _engine_args(args) -> dict:
    return dict(load_format="dummy", dtype="bfloat16" if args.device == "cuda" else "float32",
                device=args.device, max_model_len=2048, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=False,
                async_scheduling=not args.child.endswith("_sync"))


def _gpu_gaps(steps: list[tuple], batch: int, seconds: float) -> dict:
    """Median and p90 GPU idle time before the steps at full batch (ms), and the GPU's idle
    share of the whole run."""
    if not any(s[-1] for s in steps):  # CPU: no CUDA events
        return {}
    full = sorted(s[-1] for s in steps if s[2] == batch and s[0] > 0) or [0.0]
    return {"gpu_gap_ms_median": statistics.median(full) * 1e3,
            "gpu_gap_ms_p90": full[int(0.9 * (len(full) - 1))] * 1e3,
            "gpu_idle_fraction": sum(s[-1] for s in steps) / seconds}


def _model_dir(args) -> str:
    directory = tempfile.mkdtemp(prefix="bench-coordinator-")
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers.tiny_models import tiny_config

        tiny_config("llama", max_position_embeddings=4096).save_pretrained(directory)
    else:
        MODEL_SHAPES[args.model]().save_pretrained(directory)
    return directory


def _workloads(args, vocab: int) -> dict:
    workloads = {"fixed": fixed_workload(args.num_requests, args.input_len, args.output_len,
                                         vocab, args.seed)}
    if not args.skip_sharegpt:
        workloads["sharegpt"] = sharegpt_workload(args.sharegpt_requests, vocab, args.seed)
    return workloads


def _step_summary(steps: list[tuple[float, float, int]], batch: int) -> dict:
    """Median step wall time, rank time and gap over the steps that ran `batch` sequences
    (the decode steps at full batch), and over all steps."""
    full = [s for s in steps if s[2] == batch and s[0] > 0]
    gaps = [(s[0] - s[1]) * 1e3 for s in full]
    return {
        "full_batch_steps": len(full),
        "step_ms_median": statistics.median([s[0] * 1e3 for s in full]) if full else None,
        "execute_ms_median": statistics.median([s[1] * 1e3 for s in full]) if full else None,
        "gap_ms_median": statistics.median(gaps) if gaps else None,
        "gap_ms_p90": sorted(gaps)[int(0.9 * (len(gaps) - 1))] if gaps else None,
        "gap_s_total_all_steps": sum(s[0] - s[1] for s in steps),
        "steps": len(steps),
        **({"schedule_ms_median": statistics.median([s[3] * 1e3 for s in full]),
            "dispatch_ms_median": statistics.median([s[4] * 1e3 for s in full]),
            "complete_ms_median": statistics.median([s[5] * 1e3 for s in full])}
           if full and len(full[0]) > 4 else {}),
    }


def run_inprocess(args, model_dir: str, workloads: dict) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model=model_dir, **_engine_args(args))
    core = llm.engine.core
    steps: list[tuple[float, float, int]] = []
    core_step = core.step

    def recorded_step():
        outputs = core_step()
        stats = outputs.stats
        steps.append((stats.step_seconds, stats.execute_seconds, stats.num_running,
                      stats.gpu_idle_seconds))
        return outputs

    core.step = recorded_step
    results = {}
    for name, (prompts, lengths) in workloads.items():
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                  for n in lengths]
        llm.generate(prompts[:8], params[:8], use_tqdm=False)  # compile, capture, warm up
        steps.clear()
        start = time.perf_counter()
        done = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in done)
        results[name] = {"seconds": elapsed, "output_tokens": tokens,
                         "output_tok_s": tokens / elapsed,
                         **_step_summary(steps, min(args.max_num_seqs, len(prompts))),
                         **_gpu_gaps(steps, min(args.max_num_seqs, len(prompts)), elapsed)}
    llm.shutdown()
    return results


def run_coordinator(args, model_dir: str, workloads: dict) -> dict:
    import ray

    from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
    from pagedserve.config import EngineConfig
    from pagedserve.engine.core import EngineCoreRequest
    from pagedserve.sampling_params import SamplingParams

    ray.init(logging_level="WARNING")
    handle = start_coordinator(EngineConfig(model=model_dir, distributed_executor_backend="ray",
                                            step_dispatch=DISPATCH[args.child.removesuffix(
                                                "_sync")],
                                            **_engine_args(args)))
    results = {}
    def run(tag: str, prompts, lengths) -> tuple[float, int]:
        requests = [EngineCoreRequest(f"{tag}{i}", prompt, SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True))
            for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True))]
        start = time.perf_counter()
        stream = handle.stream.options(num_returns="streaming").remote(tag)
        ray.get(handle.submit.remote(requests, tag))
        remaining, tokens = len(requests), 0
        for ref in stream:
            for _, updates in ray.get(ref):
                for update in updates:
                    tokens += len(update.new_token_ids)
                    remaining -= update.finished
            if remaining == 0:
                break
        elapsed = time.perf_counter() - start
        del stream  # ends the generator, which releases the subscriber
        return elapsed, tokens

    for name, (prompts, lengths) in workloads.items():
        run(f"warm-{name}-", prompts[:8], lengths[:8])
        before = ray.get(handle.step_log.remote())
        elapsed, tokens = run(f"{name}-", prompts, lengths)
        steps = ray.get(handle.step_log.remote())[len(before):] if len(before) < 4096 \
            else ray.get(handle.step_log.remote())
        results[name] = {"seconds": elapsed, "output_tokens": tokens,
                         "output_tok_s": tokens / elapsed,
                         **_step_summary(steps, min(args.max_num_seqs, len(prompts))),
                         **_gpu_gaps(steps, min(args.max_num_seqs, len(prompts)), elapsed)}
    stop_coordinator(handle)
    ray.shutdown()
    return results


def run_ceilings(args, model_dir: str, workloads: dict) -> dict:
    import torch

    from pagedserve.workers.models.loader import load_config

    bandwidth, rate = measure_ceilings(torch.device("cuda"))
    numbers = model_numbers(load_config(model_dir))
    floors = {}
    for name, (prompts, lengths) in workloads.items():
        seconds = floor_seconds([(len(p), n) for p, n in zip(prompts, lengths, strict=True)],
                                numbers, bandwidth, rate)
        floors[name] = {"floor_seconds": seconds, "floor_tok_s": sum(lengths) / seconds}
    return {"copy_bytes_per_s": bandwidth, "matmul_flop_per_s": rate, "floors": floors}


def child(args) -> None:
    model_dir = _model_dir(args)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    workloads = _workloads(args, vocab)
    runner = run_ceilings if args.child == "ceilings" else \
        run_inprocess if args.child.startswith("inprocess") else run_coordinator
    Path(args.child_json).write_text(json.dumps(runner(args, model_dir, workloads)))


def print_table(report: dict) -> None:
    variants = report["variants"]
    floors = report.get("ceilings", {}).get("floors", {})
    print(f"\n{'workload':<10} {'variant':<22} {'out tok/s':>10} {'vs in-proc':>10} "
          f"{'of floor':>9} {'step ms':>8} {'GPU gap':>8} {'gap p90':>8} {'GPU idle':>8}")
    for workload in report["workloads"]:
        base = variants.get("inprocess", next(iter(variants.values())))[workload]["output_tok_s"]
        for name, result in variants.items():
            r = result[workload]
            floor = floors.get(workload, {}).get("floor_tok_s")
            cells = [r["step_ms_median"], r.get("gpu_gap_ms_median"), r.get("gpu_gap_ms_p90")]
            shown = " ".join(f"{c:>8.2f}" if c is not None else f"{'-':>8}" for c in cells)
            idle = r.get("gpu_idle_fraction")
            shown += f" {idle:>8.1%}" if idle is not None else f" {'-':>8}"
            of_floor = f"{r['output_tok_s'] / floor:>9.1%}" if floor else f"{'-':>9}"
            print(f"{workload:<10} {name:<22} {r['output_tok_s']:>10,.0f} "
                  f"{r['output_tok_s'] / base:>10.3f} {of_floor} {shown}")
    print("step ms: median core step wall time at full batch; GPU gap: median GPU idle time "
          "between steps (CUDA events); GPU idle: the sum of gaps over the run's wall time")
    for workload in report["workloads"]:
        for name, result in variants.items():
            parts = {k: result[workload][k] for k in ("schedule_ms_median", "dispatch_ms_median",
                                                      "complete_ms_median")
                     if k in result[workload]}
            if parts:
                print(f"{workload} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*sorted(MODEL_SHAPES), "tiny"],
                        default="llama-3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--sharegpt-requests", type=int, default=1024)
    parser.add_argument("--skip-sharegpt", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-floor", action="store_true",
                        help="leave out the ceilings run (bandwidth and matmul rate)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "coordinator.json"))
    parser.add_argument("--child", choices=[*VARIANTS, "ceilings"], help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = {"args": vars(args), "variants": {}, "workloads": ["fixed"]
              + ([] if args.skip_sharegpt else ["sharegpt"])}
    names = args.variants.split(",") + (["ceilings"] if args.device == "cuda"
                                        and not args.skip_floor else [])
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            command = [sys.executable, __file__, *sys.argv[1:], "--child", name,
                       "--child-json", part.name]
            subprocess.run(command, check=True)
            result = json.loads(Path(part.name).read_text())
        print(f"{name}: {json.dumps(result)}", flush=True)  # kept if a later variant fails
        if name == "ceilings":
            report["ceilings"] = result
        else:
            report["variants"][name] = result
    if args.device == "cuda":
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print_table(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
