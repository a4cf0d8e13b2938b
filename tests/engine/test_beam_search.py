"""`LLM.beam_search` equals a plain reference beam search over transformers' full forwards."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.sampling_params import BeamSearchParams
from tests.engine.engine_utils import (
    MAX_TOKENS,
    StepSpy,
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
)

PROMPTS = make_prompts((4, 11, 19), seed=7)


def reference_beam_search(hf, path, prompt: list[int], width: int, max_tokens: int,
                          length_penalty: float) -> list[tuple[list[int], float, float]]:
    """(tokens, cumulative logprob, score) of the best `width` beams; EOS ignored."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for _ in range(max_tokens):
        candidates = []
        for tokens, logprob in beams:
            next_logprobs = hf.log_softmax(path, prompt + tokens)[-1]
            top = torch.topk(next_logprobs, 2 * width)
            for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                candidates.append((tokens + [token], logprob + value))
        candidates.sort(key=lambda c: c[1], reverse=True)
        beams = candidates[:width]
    scored = [(t, lp, lp / len(t) ** length_penalty) for t, lp in beams]
    return sorted(scored, key=lambda s: s[2], reverse=True)


def check(outputs, hf, path, prompts, width, max_tokens, length_penalty=1.0):
    assert len(outputs) == len(prompts)
    for output, prompt in zip(outputs, prompts, strict=True):
        assert output.prompt_token_ids == prompt
        expected = reference_beam_search(hf, path, prompt, width, max_tokens, length_penalty)
        assert [s.token_ids for s in output.sequences] == [e[0] for e in expected]
        for sequence, (_, logprob, score) in zip(output.sequences, expected, strict=True):
            assert sequence.cumulative_logprob == pytest.approx(logprob, abs=1e-4)
            assert sequence.score == pytest.approx(score, abs=1e-4)
        scores = [s.score for s in output.sequences]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_beam_search_matches_reference(variant, checkpoint, hf):
    path = checkpoint(variant)
    llm = make_llm(path, num_gpu_blocks_override=128)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    with StepSpy(llm) as log:
        outputs = llm.beam_search(PROMPTS, params)
    check(outputs, hf, path, PROMPTS, 3, 6)
    assert log.max_ref_count >= 2 and log.copies > 0  # beams share blocks, copy on write
    assert_no_leaks(llm)


def test_beam_search_length_penalty_and_width_one(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=128)
    outputs = llm.beam_search(PROMPTS[:2], BeamSearchParams(
        beam_width=2, max_tokens=5, ignore_eos=True, length_penalty=0.5))
    check(outputs, hf, path, PROMPTS[:2], 2, 5, 0.5)
    # Width 1 is greedy search.
    (single,) = llm.beam_search(PROMPTS[1], BeamSearchParams(beam_width=1, max_tokens=7,
                                                              ignore_eos=True))
    assert single.sequences[0].token_ids == hf.generate(path, PROMPTS[1], 7)
    assert math.isfinite(single.sequences[0].score)
    assert_no_leaks(llm)


@pytest.mark.parametrize("engine_args", [
    {"num_gpu_blocks_override": 128, "max_num_batched_tokens": 8},
    {"num_gpu_blocks_override": 128, "max_num_seqs": 4},
], ids=["chunked-prefill", "max-num-seqs"])
def test_beam_search_when_beams_are_not_all_scheduled_together(engine_args, checkpoint, hf):
    """Prompts prefilled over several steps (or beams over the sequence limit) make some beams
    deliver their next-token logprobs a step before the others."""
    path = checkpoint("llama")
    llm = make_llm(path, **engine_args)
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=4,
                                                        ignore_eos=True))
    check(outputs, hf, path, PROMPTS, 3, 4)
    assert_no_leaks(llm)


@pytest.mark.parametrize("swap_space_gib", [0, 1e-4], ids=["recompute", "swap"])
@pytest.mark.parametrize("num_blocks", [9, 13, 17, 21])
def test_beam_search_with_a_tight_kv_pool(num_blocks, swap_space_gib, checkpoint, hf):
    """21 blocks just hold every beam of the three prompts; fewer force preemptions, and paused
    beams (holding blocks) can leave a preempted one no room: they are then released and their
    children start as new sequences. The beams still come out right, nothing leaks, and the
    engine still serves afterwards."""
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=num_blocks, swap_space_gib=swap_space_gib)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    check(llm.beam_search(PROMPTS, params), hf, path, PROMPTS, 3, 6)
    assert_no_leaks(llm)
    (output,) = llm.generate(PROMPTS[2], greedy(), use_tqdm=False)
    assert output.outputs[0].token_ids == hf.generate(path, PROMPTS[2], MAX_TOKENS)
    assert_no_leaks(llm)
