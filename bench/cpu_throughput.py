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

Floor, in the same run: the round's arithmetic (every linear layer of every forwarded token, the
LM head of every sampled token, attention over each token's context) at the best matrix-multiply
rate this machine reaches on the model's own layer shapes at the same thread count and dtype, and
the weight bytes each decode step must read at the measured copy bandwidth; the larger of the
two is a lower bound on any engine's time for the round. Each peer's share of it is reported,
and the fraction of the floor an engine would need to run `--target-speedup` times faster than
transformers (above 100%: not reachable on this machine at this dtype). A second, practical
bound: the round's matrix multiplies alone through torch's faster CPU path (`matmul_seconds`),
which both peers use; each peer's time in them is reported as its "matmuls" share.

Model: `--model DIR`, default the real default model when
`pagedserve.engine.default_model.ensure_default_model()` gives a SmolLM2 directory, else a
random-weights Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49152, tied embeddings) saved with `save_pretrained`.

    python bench/cpu_throughput.py --json bench/results/cpu_throughput_smollm2.json
"""

from __future__ import annotations

import argparse
import functools
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


def workload_flops(config, prompt_lens: list[int], output_len: int) -> dict[str, float]:
    """Floating-point operations of one round: linear layers, LM head and attention (a
    multiply-add counts two). A sequence's last sampled token is never fed back."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_token_linear = layers * sum(out * in_ for out, in_ in layer_shapes(config))
    forwarded = sum(prompt_lens) + len(prompt_lens) * (output_len - 1)
    contexts = sum(sum(range(1, length + output_len)) for length in prompt_lens)
    return {
        "linear": 2.0 * per_token_linear * forwarded,
        "lm_head": 2.0 * config.vocab_size * hidden * len(prompt_lens) * output_len,
        "attention": 2.0 * 2 * layers * heads * head_dim * contexts,
    }


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the weights one decode step reads (layers, final norm, LM head)."""
    hidden = config.hidden_size
    per_layer = sum(out * in_ for out, in_ in layer_shapes(config)) + 2 * hidden  # + 2 norms
    elements = config.num_hidden_layers * per_layer + hidden + config.vocab_size * hidden
    return elements * torch.empty((), dtype=dtype).element_size()


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(config, dtype: torch.dtype, rows: tuple[int, ...]) -> dict[str, float]:
    """Best `F.linear` rate (FLOP/s) over the model's layer shapes at each row count (weights
    reused, so cached), and the best read bandwidth (bytes/s) of a buffer far larger than the
    caches: a summed stream or half a copy, whichever is faster."""
    shapes = [(in_features, out_features) for out_features, in_features in layer_shapes(config)]
    best_rate = 0.0
    for in_features, out_features in shapes:
        weight = torch.randn(out_features, in_features, dtype=dtype)
        for count in rows:
            x = torch.randn(count, in_features, dtype=dtype)
            seconds = best_seconds(functools.partial(torch.nn.functional.linear, x, weight))
            best_rate = max(best_rate, 2.0 * count * in_features * out_features / seconds)
    source = torch.ones(32 * 2**20, dtype=torch.float32)
    target = torch.empty_like(source)
    nbytes = source.numel() * source.element_size()
    read = max(nbytes / best_seconds(source.sum),
               nbytes / best_seconds(lambda: target.copy_(source)))
    return {"matmul_flops_per_s": best_rate, "read_bytes_per_s": read}


def layer_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linear weights (q/k/v fused, o, gate/up fused, down)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return [((heads + 2 * config.num_key_value_heads) * head_dim, hidden),
            (hidden, heads * head_dim), (2 * config.intermediate_size, hidden),
            (hidden, config.intermediate_size)]


def matmul_seconds(config, dtype: torch.dtype, prompt_tokens: int, num_prompts: int,
                   output_len: int) -> dict[str, float]:
    """This thread's CPU time for a round's matrix multiplies alone, on random weights of the
    model's shapes (one set per layer, so they stream from memory as the model's do) through the
    faster of torch's two CPU paths (oneDNN-prepacked, as pagedserve runs them, or `F.linear`):
    the prefill in one pass over every prompt token (the cheapest shape), and the decode steps
    (one measured, times the steps) at one row per prompt. No engine built on torch's CPU
    matmuls finishes a round faster."""
    from pagedserve.workers.layers.linear import cpu_packing_available

    generator = torch.Generator().manual_seed(0)
    layers = [[torch.randn(shape, generator=generator, dtype=dtype)
               for shape in layer_shapes(config)] for _ in range(config.num_hidden_layers)]
    lm_head = torch.randn(config.vocab_size, config.hidden_size, generator=generator,
                          dtype=dtype)
    paths = {"F.linear": (torch.nn.functional.linear, lambda weight: weight)}
    if cpu_packing_available(dtype):
        paths["oneDNN packed"] = (
            lambda x, weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
            lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight, None))

    def one_pass(run, weights, head, rows: int, sampled: int) -> float:
        inputs = {size: torch.randn(rows, size, dtype=dtype) for _, size in layer_shapes(config)}
        start = time.thread_time()
        for layer in weights:
            for weight, (_, size) in zip(layer, layer_shapes(config), strict=True):
                run(inputs[size], weight)
        run(inputs[config.hidden_size][:sampled], head)
        return time.thread_time() - start

    timings = {}
    for name, (run, prepare) in paths.items():
        weights = [[prepare(w) for w in layer] for layer in layers]
        head = prepare(lm_head)
        one_pass(run, weights, head, num_prompts, num_prompts)  # warm-up (packing, caches)
        decode = min(one_pass(run, weights, head, num_prompts, num_prompts) for _ in range(3))
        prefill = one_pass(run, weights, head, prompt_tokens, num_prompts)
        timings[name] = {"prefill_s": prefill, "decode_step_s": decode,
                         "round_s": prefill + (output_len - 1) * decode}
    best = min(timings, key=lambda name: timings[name]["round_s"])
    return {"path": best, **timings[best], "by_path": timings}


def floor_seconds(config, dtype: torch.dtype, prompt_lens: list[int], output_len: int,
                  rates: dict[str, float]) -> dict[str, float]:
    """Lower bounds on one round's time on this machine: its arithmetic at the best matmul
    rate, and its decode steps' weight reads at the best read bandwidth."""
    flops = workload_flops(config, prompt_lens, output_len)
    compute = sum(flops.values()) / rates["matmul_flops_per_s"]
    memory = (output_len - 1) * weight_bytes(config, dtype) / rates["read_bytes_per_s"]
    return {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
            "gflop": sum(flops.values()) / 1e9,
            "gflop_by_part": {part: value / 1e9 for part, value in flops.items()}}


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
    parser.add_argument("--target-speedup", type=float, default=3.0,
                        help="report the share of the floor this speedup over transformers needs")
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

        config = AutoConfig.from_pretrained(model)
        vocab = config.vocab_size
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
        dtype = getattr(torch, args.dtype)
        rates = machine_rates(config, dtype, rows=(args.num_prompts, 4 * args.num_prompts, 512))
        prompt_tokens = [sum(len(p) for p in prompts) for prompts in rounds]
        matmuls = matmul_seconds(config, dtype, prompt_tokens[0], args.num_prompts,
                                 args.output_len)

    num_tokens = args.num_prompts * args.output_len
    floors = [floor_seconds(config, dtype, [len(p) for p in prompts], args.output_len, rates)
              for prompts in rounds]
    floor_median = statistics.median(f["floor_s"] for f in floors)
    # The prefill's matmuls scale with the round's prompt tokens; the decode steps' do not.
    matmul_rounds = [matmuls["prefill_s"] * tokens / prompt_tokens[0]
                     + (args.output_len - 1) * matmuls["decode_step_s"]
                     for tokens in prompt_tokens]
    results = {}
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        cpu_median = statistics.median(cpu_runs[name])
        of_floor = [f["floor_s"] / c for f, c in zip(floors, cpu_runs[name], strict=True)]
        in_matmuls = [m / c for m, c in zip(matmul_rounds, cpu_runs[name], strict=True)]
        results[name] = {"runs_s": seconds, "median_s": median, "tok_per_s": num_tokens / median,
                         "cpu_runs_s": cpu_runs[name], "cpu_median_s": cpu_median,
                         "tok_per_cpu_s": num_tokens / cpu_median,
                         "fraction_of_floor_per_round": of_floor,
                         "fraction_of_floor_median": statistics.median(of_floor),
                         "matmul_share_per_round": in_matmuls,
                         "matmul_share_median": statistics.median(in_matmuls)}
    report = {
        "bench": "cpu_throughput",
        "model": model if args.model else Path(model).name,
        "model_source": model_source,
        "num_prompts": args.num_prompts,
        "prompt_len_range": list(args.prompt_len),
        "prompt_tokens_per_round": prompt_tokens,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "machine_rates": rates,
        "floor_per_round": floors,
        "floor_median_s": floor_median,
        "torch_matmuls": matmuls,
        "torch_matmuls_per_round_s": matmul_rounds,
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
        report["target_speedup"] = args.target_speedup
        for key, bounds in (("floor", [f["floor_s"] for f in floors]),
                            ("torch_matmuls", matmul_rounds)):
            needed = [args.target_speedup * bound / c
                      for bound, c in zip(bounds, cpu_runs["transformers"], strict=True)]
            report[f"target_share_of_{key}_per_round"] = needed
            report[f"target_share_of_{key}_median"] = statistics.median(needed)

    print(f"model: {report['model']} ({model_source}); {args.num_prompts} prompts of "
          f"{args.prompt_len[0]}-{args.prompt_len[1]} tokens (new ones each round) "
          f"x {args.output_len} output tokens, greedy, {args.dtype}, {args.threads} thread(s)")
    print(f"machine: best matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, read "
          f"{rates['read_bytes_per_s'] / 1e9:.1f} GB/s; floor per round (median) "
          f"{floor_median:.2f} s ({floors[0]['gflop']:.0f} GFLOP in round 1: compute "
          f"{floors[0]['compute_s']:.2f} s, weight reads {floors[0]['memory_s']:.2f} s)")
    print(f"torch's matmuls alone ({matmuls['path']}): {matmul_rounds[0]:.2f} s in round 1 "
          f"(prefill {matmuls['prefill_s']:.2f} s, {args.output_len - 1} decode steps x "
          f"{matmuls['decode_step_s'] * 1e3:.1f} ms)")
    print(f"{'peer':<14}{'median s':>10}{'output tok/s':>14}{'CPU s':>8}{'of floor':>10}"
          f"{'matmuls':>9}  runs: wall s (CPU s)")
    for name, result in results.items():
        print(f"{name:<14}{result['median_s']:>10.2f}{result['tok_per_s']:>14.1f}"
              f"{result['cpu_median_s']:>8.2f}{result['fraction_of_floor_median']:>10.0%}"
              f"{result['matmul_share_median']:>9.0%}  "
              + ", ".join(
                  f"{s:.2f} ({c:.2f})" for s, c in zip(result["runs_s"], result["cpu_runs_s"],
                                                       strict=True)))
    for key, label in (("speedup", "wall time"), ("cpu_time_speedup", "CPU time")):
        if f"{key}_median" in report:
            low, high = report[f"{key}_min_max"]
            print(f"pagedserve / transformers per round, {label}: median "
                  f"{report[f'{key}_median']:.2f}x (min {low:.2f}x, max {high:.2f}x)")
    if "identical_outputs" in report:
        print(f"identical greedy outputs: {report['identical_outputs']}")
        print(f"{args.target_speedup:g}x transformers' CPU time needs "
              f"{report['target_share_of_floor_median']:.0%} of the floor and "
              f"{report['target_share_of_torch_matmuls_median']:.0%} of torch's matmuls alone "
              "(medians of rounds; above 100%: faster than this machine computes, or than "
              "torch's matmuls run, at this dtype)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
