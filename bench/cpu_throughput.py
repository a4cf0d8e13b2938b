"""CPU offline throughput: pagedserve `LLM.generate` vs transformers `generate`, same run.

Workload (seeded): N prompts of random token ids (lengths uniform in a range) x a fixed number
of output tokens, greedy, EOS ignored. Peer, in the same process and on the same weights and
dtype: transformers `generate` on the whole batch at once, left-padded, `min_new_tokens` =
`max_new_tokens` (its way of running to the length). Both at the same torch thread count (one
by default). The peers alternate for `--repeats` rounds after a warm-up each. Every round draws
new prompts (the same for both peers), so pagedserve's prefix cache never serves a prompt it saw
in an earlier round (it would: with one fixed prompt set, rounds after the first skipped most
of the prefill). Wall time covers everything `generate` does (prefill and decode) for each peer;
reported: each peer's median, and the per-round speedup (same prompts, adjacent in time, so
both saw about the same machine load) with its median, minimum and maximum. Both peers compute
on the calling thread (one torch thread), so each run's thread CPU time is reported too: on a
shared machine it leaves out the time the process waited for a core, which wall time does not.

Model: `--model DIR`, default the real default model when
`pagedserve.engine.default_model.ensure_default_model()` gives a SmolLM2 directory, else a
random-weights Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49152, tied embeddings) saved with `save_pretrained`.

    python bench/cpu_throughput.py --json bench/results/cpu_throughput_smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve import LLM, SamplingParams  # noqa: E402

logger = logging.getLogger("bench.cpu_throughput")


def smollm2_shape_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"],
    )


def default_model(scratch: Path) -> tuple[str, str]:
    """(model directory, how it was chosen)."""
    try:
        from pagedserve.engine.default_model import ensure_default_model

        path = ensure_default_model()
        if "smollm2" in Path(path).name.lower():
            return path, "the default model (SmolLM2)"
        reason = f"the default model {Path(path).name} is not SmolLM2"
    except Exception as error:  # noqa: BLE001 - any failure means: use the stand-in
        reason = f"no default model ({type(error).__name__}: {error})"
    from transformers import LlamaForCausalLM

    logger.warning("%s: using a random-weights Llama of SmolLM2-135M's shape", reason)
    torch.manual_seed(0)
    target = scratch / "smollm2-shape-random"
    LlamaForCausalLM(smollm2_shape_config()).save_pretrained(target)
    return str(target), f"random weights, SmolLM2-135M's shape ({reason})"


def make_prompts(num: int, min_len: int, max_len: int, vocab: int, seed: str) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num)]


class PagedServePeer:
    name = "pagedserve"

    def __init__(self, model: str, dtype: str, threads: int) -> None:
        self.llm = LLM(model=model, device="cpu", dtype=dtype, cpu_threads=threads)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def close(self) -> None:
        self.llm.shutdown()


class TransformersPeer:
    name = "transformers"

    def __init__(self, model: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        config = self.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad_token_id = pad if isinstance(pad, int) else 0

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=output_len, min_new_tokens=output_len,
                                      pad_token_id=self.pad_token_id)
        return out[:, width:].tolist()

    def close(self) -> None:
        del self.model


def timed(peer, prompts, output_len) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, this thread's CPU seconds, output token ids) of one `generate`."""
    gc.collect()
    start, start_cpu = time.perf_counter(), time.thread_time()
    tokens = peer.generate(prompts, output_len)
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - start_cpu
    if [len(t) for t in tokens] != [output_len] * len(prompts):
        raise RuntimeError(f"{peer.name} returned {[len(t) for t in tokens]} tokens per prompt")
    return seconds, cpu_seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (default: see above)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 96),
                        metavar=("MIN", "MAX"), help="prompt lengths, uniform in [MIN, MAX]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both peers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each peer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            model, model_source = args.model, "--model"
        else:
            model, model_source = default_model(Path(scratch))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model).vocab_size
        rounds = [make_prompts(args.num_prompts, *args.prompt_len, vocab, f"{args.seed}/{r}")
                  for r in range(args.repeats)]
        warmup = make_prompts(2, 16, 16, vocab, f"{args.seed}/warm-up")
        peers = [PagedServePeer(model, args.dtype, args.threads)]
        if not args.skip_transformers:
            peers.append(TransformersPeer(model, getattr(torch, args.dtype)))
        torch.set_num_threads(args.threads)  # the worker set it too; the same count for both
        for peer in peers:
            peer.generate(warmup, 4)
        runs: dict[str, list[float]] = {peer.name: [] for peer in peers}
        cpu_runs: dict[str, list[float]] = {peer.name: [] for peer in peers}
        outputs: dict[str, list[list[int]]] = {peer.name: [] for peer in peers}
        for prompts in rounds:
            for peer in peers:  # alternate, so both see the same machine load over time
                seconds, cpu_seconds, tokens = timed(peer, prompts, args.output_len)
                runs[peer.name].append(seconds)
                cpu_runs[peer.name].append(cpu_seconds)
                outputs[peer.name] += tokens
        for peer in peers:
            peer.close()

    num_tokens = args.num_prompts * args.output_len
    results = {}
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        cpu_median = statistics.median(cpu_runs[name])
        results[name] = {"runs_s": seconds, "median_s": median, "tok_per_s": num_tokens / median,
                         "cpu_runs_s": cpu_runs[name], "cpu_median_s": cpu_median,
                         "tok_per_cpu_s": num_tokens / cpu_median}
    report = {
        "bench": "cpu_throughput",
        "model": model if args.model else Path(model).name,
        "model_source": model_source,
        "num_prompts": args.num_prompts,
        "prompt_len_range": list(args.prompt_len),
        "prompt_tokens_per_round": [sum(len(p) for p in prompts) for prompts in rounds],
        "output_len": args.output_len,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    if "transformers" in results:
        for key, timings in (("speedup", runs), ("cpu_time_speedup", cpu_runs)):
            ratios = [t / p for p, t in zip(timings["pagedserve"], timings["transformers"],
                                            strict=True)]
            report[f"{key}_per_round"] = ratios
            report[f"{key}_median"] = statistics.median(ratios)
            report[f"{key}_min_max"] = [min(ratios), max(ratios)]
        # Greedy on the same weights: identical outputs unless fp32 rounding flips a near-tie.
        same = sum(a == b for a, b in zip(outputs["pagedserve"], outputs["transformers"],
                                          strict=True))
        report["identical_outputs"] = f"{same}/{len(outputs['pagedserve'])}"

    print(f"model: {report['model']} ({model_source}); {args.num_prompts} prompts of "
          f"{args.prompt_len[0]}-{args.prompt_len[1]} tokens (new ones each round) "
          f"x {args.output_len} output tokens, greedy, {args.dtype}, {args.threads} thread(s)")
    print(f"{'peer':<14}{'median s':>10}{'output tok/s':>14}{'CPU s':>8}  runs: wall s (CPU s)")
    for name, result in results.items():
        print(f"{name:<14}{result['median_s']:>10.2f}{result['tok_per_s']:>14.1f}"
              f"{result['cpu_median_s']:>8.2f}  " + ", ".join(
                  f"{s:.2f} ({c:.2f})" for s, c in zip(result["runs_s"], result["cpu_runs_s"],
                                                       strict=True)))
    for key, label in (("speedup", "wall time"), ("cpu_time_speedup", "CPU time")):
        if f"{key}_median" in report:
            low, high = report[f"{key}_min_max"]
            print(f"pagedserve / transformers per round, {label}: median "
                  f"{report[f'{key}_median']:.2f}x (min {low:.2f}x, max {high:.2f}x)")
    if "identical_outputs" in report:
        print(f"identical greedy outputs: {report['identical_outputs']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
