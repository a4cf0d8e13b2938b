"""Routing policies on a shared-prefix workload: prefix affinity vs round-robin vs least-loaded.

Many users over a few long system prompts (each request: one of --num-system-prompts prompts of
--system-len tokens, then --suffix-len tokens of its own), and a no-sharing control (every
prompt its own, of the same length), sent at --rate (req/s; 'inf': all at once) to
--replicas replicas behind one gateway. One server serves every policy (`Gateway.use_routing`)
in --rounds rounds, the policies in a rotated order each round and every run with prompts of
its own (no run finds another's blocks), so a machine whose speed drifts (a shared CI box)
slows every policy alike. Reports per policy and workload, over the rounds: the prefix-cache
hit tokens (the coordinators' `prefix_cache_hits`, what pagedserve:prefix_cache_hits_total
exports), output throughput (tokens over time summed) and TTFT p50/p99 (the mean of the
rounds'), and the ratios of affinity over round-robin. Each replica's KV pool is kept small
(--num-kv-blocks), so one replica cannot hold every system prompt: where requests for a prompt
land decides whether its blocks are reused.

    python bench/routing.py --json out/routing.json                       # CPU, 4 replicas
    # GPU, the 8B shape: two replicas sharing one GPU, each a 9 GiB KV pool (72k tokens at
    # 128 KiB a token): room for its half of the 64 x 2048-token system prompts, not for all
    python bench/routing.py --model llama-3-8b --device cuda --replicas 2 --share-gpu \\
        --kv-cache-memory-gib 9 --num-system-prompts 64 --system-len 2048 --users 8 \\
        --output-len 64 --max-num-seqs 64 --json out/routing_8b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import MODEL_SHAPES  # noqa: E402

from pagedserve.cluster.load_generator import run_load  # noqa: E402
from pagedserve.cluster.router import ROUTING_POLICIES  # noqa: E402

SMALL_SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
               "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024}
"""--model small: big enough on CPU that a prompt's prefill costs more than its decode."""


def model_dir(name: str) -> str:
    directory = tempfile.mkdtemp(prefix="bench-routing-")
    if name in MODEL_SHAPES:
        MODEL_SHAPES[name]().save_pretrained(directory)
    else:
        from tests.helpers.tiny_models import tiny_config

        shape = SMALL_SHAPE if name == "small" else {}
        tiny_config("llama", max_position_embeddings=8192, **shape).save_pretrained(directory)
    return directory


def workloads(args, vocab: int, seed: int) -> dict[str, list[list[int]]]:
    """'shared': users over a few system prompts, in a shuffled order; 'control': the same
    lengths, nothing shared."""
    rng = random.Random(seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(10, vocab - 10) for _ in range(count)]

    systems = [tokens(args.system_len) for _ in range(args.num_system_prompts)]
    shared = [system + tokens(args.suffix_len) for system in systems
              for _ in range(args.users)]
    rng.shuffle(shared)
    control = [tokens(args.system_len + args.suffix_len) for _ in shared]
    return {"shared": shared, "control": control}


def engine_config(args, directory: str):
    from pagedserve.config import EngineConfig

    cuda = args.device == "cuda"
    return EngineConfig(model=directory, device=args.device, load_format="dummy",
                        dtype="bfloat16" if cuda else "auto", distributed_executor_backend="ray",
                        max_num_seqs=args.max_num_seqs,
                        max_model_len=args.system_len + args.suffix_len + args.output_len + 16,
                        num_gpu_blocks_override=None if cuda else args.num_kv_blocks,
                        kv_cache_memory_gib=args.kv_cache_memory_gib,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        cpu_threads=None if cuda else 1,
                        # A compiled graph checks CUDA_VISIBLE_DEVICES against the GPU ids Ray
                        # assigned, which two replicas on one real GPU (--share-gpu) cannot match.
                        step_dispatch="actor_call" if args.share_gpu else "compiled_graph")


def prefix_counters(server) -> tuple[list[int], list[int]]:
    """Per replica, (prefix-cache queries, hits) in tokens, from their latest snapshots."""
    stats = [replica.stats for replica in server.gateway.replicas]
    return [s.prefix_cache_queries for s in stats], [s.prefix_cache_hits for s in stats]


async def until_idle(server, timeout_s: float = 60.0) -> None:
    """Until every replica's latest snapshot shows no request (its counters are final)."""
    deadline = time.monotonic() + timeout_s
    while any(r.stats.num_requests for r in server.gateway.replicas):
        if time.monotonic() > deadline:
            raise TimeoutError("the replicas did not go idle")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


async def one_run(server, args, prompts: list[list[int]]) -> dict:
    await until_idle(server)
    queries, hits = prefix_counters(server)
    run = await run_load(server.address, prompts, [args.output_len] * len(prompts), args.rate,
                         args.seed)
    await until_idle(server)
    after_queries, after_hits = prefix_counters(server)
    # Prompt tokens each replica looked up: where the policy sent the work.
    run["replica_prompt_tokens"] = [a - b for a, b in zip(after_queries, queries, strict=True)]
    run["prefix_cache_queries"] = sum(after_queries) - sum(queries)
    run["prefix_cache_hit_tokens"] = sum(after_hits) - sum(hits)
    return run


async def all_runs(args, directory: str, policies: list[str], vocab: int) -> dict:
    """policy -> workload -> the runs of every round."""
    from pagedserve.cluster.launcher import ServeOptions, Server
    from pagedserve.cluster.router import RoutingConfig

    requests = args.num_system_prompts * args.users
    options = ServeOptions(host="127.0.0.1", port=0, replicas=args.replicas,
                           max_queue_per_replica=requests)
    server = Server(engine_config(args, directory), options)
    runs: dict = {policy: {"shared": [], "control": []} for policy in policies}
    try:
        await server.start()
        rng = random.Random(args.seed + 99)
        warm = [[rng.randrange(10, vocab - 10) for _ in range(16)] for _ in range(args.replicas)]
        await run_load(server.address, warm, [4] * len(warm), float("inf"), args.seed)
        for round_index in range(args.rounds):
            order = policies[round_index % len(policies):] + policies[:round_index
                                                                       % len(policies)]
            for policy in order:
                server.gateway.use_routing(RoutingConfig(policy=policy))
                seed = args.seed + 1000 * round_index + policies.index(policy)
                for name, prompts in workloads(args, vocab, seed).items():
                    runs[policy][name].append(await one_run(server, args, prompts))
                print(f"round {round_index}: {policy} done", file=sys.stderr, flush=True)
    finally:
        await server.stop(grace_s=1.0)
    return runs


def summarize(runs: list[dict]) -> dict:
    """One workload's rounds together."""
    seconds = sum(r["duration_s"] for r in runs)
    return {"rounds": len(runs),
            "prefix_cache_hit_tokens": sum(r["prefix_cache_hit_tokens"] for r in runs),
            "prefix_cache_queries": sum(r["prefix_cache_queries"] for r in runs),
            "output_throughput": sum(r["output_tokens"] for r in runs) / seconds,
            "request_throughput": sum(r["completed"] for r in runs) / seconds,
            "failed": sum(r["failed"] for r in runs),
            "median_ttft_ms": sum(r["median_ttft_ms"] for r in runs) / len(runs),
            "p99_ttft_ms": sum(r["p99_ttft_ms"] for r in runs) / len(runs)}


def table(results: dict) -> str:
    lines = [f"{'policy':<16} {'workload':<8} {'hit tokens':>11} {'hit rate':>8} "
             f"{'out tok/s':>10} {'req/s':>7} {'ttft p50':>9} {'ttft p99':>9}  (ms)"]
    for policy, runs in results.items():
        for name, run in runs.items():
            rate = run["prefix_cache_hit_tokens"] / max(run["prefix_cache_queries"], 1)
            lines.append(f"{policy:<16} {name:<8} {run['prefix_cache_hit_tokens']:>11,} "
                         f"{rate:>8.1%} {run['output_throughput']:>10,.1f} "
                         f"{run['request_throughput']:>7.2f} {run['median_ttft_ms']:>9.0f} "
                         f"{run['p99_ttft_ms']:>9.0f}")
    return "\n".join(lines)


def ratios(results: dict) -> dict:
    """Affinity over round-robin: hit tokens and throughput on 'shared', throughput on
    'control'."""
    if "prefix_affinity" not in results or "round_robin" not in results:
        return {}
    affinity, robin = results["prefix_affinity"], results["round_robin"]
    return {
        "shared_hit_tokens": affinity["shared"]["prefix_cache_hit_tokens"]
        / max(robin["shared"]["prefix_cache_hit_tokens"], 1),
        "shared_throughput": affinity["shared"]["output_throughput"]
        / robin["shared"]["output_throughput"],
        "control_throughput": affinity["control"]["output_throughput"]
        / robin["control"]["output_throughput"],
    }


def per_round_ratios(runs: dict) -> dict:
    """Affinity over round-robin throughput of each round on its own (the two ran minutes
    apart at most, so a machine whose speed drifts moves both), and their median: on the
    control every policy sends the same work to each replica, so its ratios spread around 1
    by the machine's noise alone."""
    if "prefix_affinity" not in runs or "round_robin" not in runs:
        return {}

    ratios_by_workload = {}
    for name in ("shared", "control"):
        pairs = zip(runs["prefix_affinity"][name], runs["round_robin"][name], strict=True)
        each = [affinity["output_throughput"] / robin["output_throughput"]
                for affinity, robin in pairs]
        ratios_by_workload[name] = {"rounds": each, "median": statistics.median(each)}
    return ratios_by_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "tiny", *sorted(MODEL_SHAPES)],
                        default="small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--policies", default="prefix_affinity,round_robin,least_loaded")
    parser.add_argument("--num-system-prompts", type=int, default=8)
    parser.add_argument("--users", type=int, default=8, help="requests per system prompt")
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--rate", type=float, default=float("inf"), help="req/s (inf: burst)")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-kv-blocks", type=int, default=256,
                        help="KV blocks per replica on CPU (16 tokens each)")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="KV pool per replica on GPU (default: profiled)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--share-gpu", action="store_true",
                        help="cuda: every replica on the one GPU (Ray is told of --replicas "
                             "GPUs and leaves CUDA_VISIBLE_DEVICES alone); give "
                             "--kv-cache-memory-gib so each takes its share")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every policy, in a rotated order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "routing.json"))
    args = parser.parse_args()
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(ROUTING_POLICIES))
    if unknown:
        parser.error(f"--policies: unknown {unknown}; choose from {sorted(ROUTING_POLICIES)}")
    if args.share_gpu and (args.device != "cuda" or args.kv_cache_memory_gib is None):
        parser.error("--share-gpu needs --device cuda and --kv-cache-memory-gib")
    logging.basicConfig(level=logging.WARNING)
    import ray

    if args.share_gpu:
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    ray.init(num_cpus=2 * args.replicas + 2,
             num_gpus=args.replicas if args.share_gpu else None,
             include_dashboard=False, logging_level="ERROR")
    directory = model_dir(args.model)
    vocab = json.loads((Path(directory) / "config.json").read_text())["vocab_size"]
    try:
        runs = asyncio.run(all_runs(args, directory, policies, vocab))
    finally:
        ray.shutdown()
    results = {policy: {name: summarize(rounds) for name, rounds in by_name.items()}
               for policy, by_name in runs.items()}
    report = {"args": vars(args), "results": results, "runs": runs,
              "affinity_over_round_robin": ratios(results),
              "affinity_over_round_robin_per_round": per_round_ratios(runs)}
    print(table(results))
    for key, value in report["affinity_over_round_robin"].items():
        print(f"affinity / round-robin {key}: {value:.2f}x")
    for name, paired in report["affinity_over_round_robin_per_round"].items():
        print(f"affinity / round-robin {name} throughput per round: "
              f"{', '.join(f'{r:.2f}' for r in paired['rounds'])} (median {paired['median']:.2f}x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
