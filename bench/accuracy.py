"""bf16 on the GPU: pagedserve's greedy outputs and logprobs against transformers, same weights.

A Llama checkpoint with seeded random weights is written once (safetensors) and loaded by both.
Random weights give near-flat next-token distributions on which any bf16 rounding flips the
argmax, so the LM head is drawn wider (std 0.1) to give the confident distributions a trained
model has; the rest uses the usual 0.02. Reports:
- the share of prompts whose greedy continuations are identical, and the share of output
  positions before the first divergence;
- teacher-forced logprobs: transformers' log-softmax of pagedserve's chosen tokens versus the
  logprobs pagedserve returned (max and mean absolute difference).

    python bench/accuracy.py --json out/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve import LLM, SamplingParams  # noqa: E402


def write_checkpoint(path: str, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            param.normal_(0.0, 0.1 if name.startswith("lm_head") else 0.02)
    model.save_pretrained(path)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=os.path.join(os.environ.get("OUT", "out"), "accuracy.json")
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(3, 32000) for _ in range(rng.randrange(8, 300))]
        for _ in range(args.num_prompts)
    ]
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, args.seed)
        llm = LLM(
            model=path,
            dtype="bfloat16",
            device="cuda",
            max_model_len=1024,
            gpu_memory_utilization=0.5,
        )
        ours = llm.generate(
            prompts,
            SamplingParams(
                temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0
            ),
            use_tqdm=False,
        )
        del llm
        torch.cuda.empty_cache()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        identical, matched, diffs = 0, 0, []
        for prompt, output in zip(prompts, ours, strict=True):
            ids = torch.tensor([prompt], device="cuda")
            reference = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            tokens = output.outputs[0].token_ids
            prefix = next(
                (i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b),
                len(tokens),
            )
            matched += prefix
            identical += prefix == len(tokens)
            full = torch.tensor([prompt + tokens], device="cuda")
            logits = hf(full).logits[0, len(prompt) - 1 : -1].float()
            reference_logprobs = (
                torch.log_softmax(logits, -1)
                .gather(-1, torch.tensor(tokens, device="cuda").unsqueeze(-1))
                .squeeze(-1)
            )
            ours_logprobs = torch.tensor(
                [lp.logprob for lp in output.outputs[0].logprobs], device="cuda"
            )
            diffs.append((ours_logprobs - reference_logprobs).abs())
    diffs = torch.cat(diffs)
    report = {
        "device": torch.cuda.get_device_name(),
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "identical_prompt_fraction": identical / len(prompts),
        "matched_token_fraction": matched / (len(prompts) * args.max_tokens),
        "teacher_forced_logprob_abs_diff_max": diffs.max().item(),
        "teacher_forced_logprob_abs_diff_mean": diffs.mean().item(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\ndevice: {report['device']}  bf16, {len(prompts)} prompts x {args.max_tokens} tokens")
    for key in (
        "identical_prompt_fraction",
        "matched_token_fraction",
        "teacher_forced_logprob_abs_diff_max",
        "teacher_forced_logprob_abs_diff_mean",
    ):
        print(f"{key:<40}{report[key]:>10.4f}")


if __name__ == "__main__":
    main()
