"""Recovery time after a rank dies: fault to first new token through the coordinator actor.

Starts a coordinator (8B shape, random bf16 weights, TP=1 on the GPU; `--model tiny --device cpu`
for a smoke run), streams `--num-requests` greedy requests, kills rank 0's actor once every
request has tokens, and reports how long the coordinator took to serve the next token (new
ranks: placement group, weights, KV pool, CUDA graphs; every request recomputed), and that every
request still ended with all its tokens. Writes JSON.

    python bench/recovery.py --json out/recovery.json
    python bench/recovery.py --model tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import MODEL_SHAPES, fixed_workload  # noqa: E402


def _model_dir(model: str) -> str:
    directory = tempfile.mkdtemp(prefix="bench-recovery-")
    if model == "tiny":
        from tests.helpers.tiny_models import tiny_config

        tiny_config("llama", max_position_embeddings=4096).save_pretrained(directory)
    else:
        MODEL_SHAPES[model]().save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*sorted(MODEL_SHAPES), "tiny"], default="llama-3-8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "recovery.json"))
    args = parser.parse_args()
    import ray

    from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
    from pagedserve.config import EngineConfig
    from pagedserve.engine.core import EngineCoreRequest
    from pagedserve.sampling_params import SamplingParams

    model_dir = _model_dir(args.model)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts, lengths = fixed_workload(args.num_requests, args.input_len, args.output_len,
                                      vocab, 0)
    ray.init(logging_level="WARNING")
    started = time.perf_counter()
    handle = start_coordinator(EngineConfig(
        model=model_dir, load_format="dummy", device=args.device, max_model_len=2048,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        distributed_executor_backend="ray", max_worker_restarts=1))
    startup = time.perf_counter() - started
    requests = [EngineCoreRequest(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n,
                                                             ignore_eos=True))
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    stream = handle.stream.options(num_returns="streaming").remote("bench")
    ray.get(handle.submit.remote(requests, "bench"))
    tokens = dict.fromkeys(range(len(requests)), 0)
    finished, killed_at, first_after = set(), None, None
    for ref in stream:
        now = time.perf_counter()
        for request_id, updates in ray.get(ref):
            index = int(request_id[1:])
            gained = sum(len(u.new_token_ids) for u in updates)
            tokens[index] += gained
            if gained and killed_at is not None and first_after is None and \
                    ray.get(handle.health.remote())["worker_restarts"] == 1:
                first_after = now
            if any(u.finished for u in updates):
                finished.add(index)
        if killed_at is None and all(tokens.values()):
            workers = ray.get(handle.__ray_call__.remote(
                lambda self: list(self.core.executor.workers)))
            ray.kill(workers[0])
            killed_at = time.perf_counter()
        if len(finished) == len(requests):
            break
    del stream
    report = {"args": vars(args), "startup_seconds": startup,
              "recovery_seconds": None if first_after is None else first_after - killed_at,
              "requests": len(requests), "finished": len(finished),
              "all_tokens": all(tokens[i] == lengths[i] for i in tokens),
              "health": ray.get(handle.health.remote())}
    if args.device == "cuda":
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    stop_coordinator(handle)
    ray.shutdown()
    print(f"start-up {startup:.1f} s; recovery (fault to first new token) "
          f"{report['recovery_seconds']:.2f} s; {report['finished']}/{report['requests']} "
          f"requests finished, every token there: {report['all_tokens']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
