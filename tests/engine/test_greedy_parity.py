"""Greedy decoding through the whole engine equals transformers' `generate`, token for token,
for every architecture and under preemption (recompute and swap), prefix-cache hits, chunked
prefill and several block sizes; every run gives all of its KV blocks back."""

from __future__ import annotations

import pytest
import torch

from pagedserve.workers.kv_pool import bytes_per_block
from pagedserve.workers.models.loader import load_config
from tests.engine.engine_utils import (
    MAX_TOKENS,
    StepSpy,
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)
from tests.helpers.tiny_models import TINY_VARIANTS

PROMPTS = make_prompts()


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_greedy_matches_hf_every_variant(variant, checkpoint, hf):
    path = checkpoint(variant)
    llm = make_llm(path, num_gpu_blocks_override=256)
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    for output, prompt in zip(outputs, PROMPTS, strict=True):
        assert output.finished and output.prompt_token_ids == prompt
        assert output.outputs[0].finish_reason == "length"
        assert output.usage.completion_tokens == MAX_TOKENS
    assert llm.engine.scheduler.num_preemptions == 0
    assert_no_leaks(llm)


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_greedy_under_recompute_preemption(variant, checkpoint, hf):
    path = checkpoint(variant)
    # 40 + 12 tokens need 13 blocks of 4: 28 blocks hold about two of the long sequences.
    llm = make_llm(path, num_gpu_blocks_override=28)
    with StepSpy(llm) as log:
        outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert log.swap_out == 0
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    assert_no_leaks(llm)


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_greedy_under_swap_preemption(variant, checkpoint, hf):
    path = checkpoint(variant)
    llm = make_llm(path, num_gpu_blocks_override=28, swap_space_gib=1e-4)
    assert llm.engine.scheduler.kv.cpu_pool is not None
    with StepSpy(llm) as log:
        outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert log.swap_out > 0 and log.swap_in == log.swap_out
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    assert_no_leaks(llm)


def test_swap_space_too_small_for_victim_falls_back_to_recompute(checkpoint, hf):
    # One CPU block: no victim fits in it, so preemption recomputes instead.
    path = checkpoint("llama")
    block_bytes = bytes_per_block(load_config(str(path)), 4, torch.float32)
    llm = make_llm(path, num_gpu_blocks_override=28, swap_space_gib=1.5 * block_bytes / 2**30)
    assert llm.engine.scheduler.kv.cpu_pool.num_blocks == 1
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    assert_no_leaks(llm)


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_with_prefix_cache_hits(block_size, checkpoint, hf):
    path = checkpoint("llama")
    shared = make_prompts([24], seed=1)[0]
    tails = make_prompts([1, 2, 5, 9], seed=2)
    prompts = [shared + tail for tail in tails] + [shared[:16], list(shared)]
    llm = make_llm(path, block_size=block_size, num_gpu_blocks_override=128,
                   enable_prefix_caching=True)
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)
    assert first[0].metrics.num_cached_tokens == 0
    later = llm.generate(prompts[1:], greedy(), use_tqdm=False)
    for output, prompt in zip(later, prompts[1:], strict=True):
        # Whole blocks of the shared prefix, never the prompt's last token.
        expected = min(24, len(prompt) - 1) // block_size * block_size
        assert output.metrics.num_cached_tokens == expected
    assert all(o.metrics.num_cached_tokens > 0 for o in later[:3])
    assert token_ids(first + later) == hf.generate_all(path, prompts)
    # Running the identical prompt again hits the cache for all but its last block.
    again = llm.generate(prompts[:1], greedy(), use_tqdm=False)
    assert again[0].metrics.num_cached_tokens == (len(prompts[0]) - 1) // block_size * block_size
    assert token_ids(again) == token_ids(first)
    assert_no_leaks(llm)


def test_prefix_caching_off_gives_no_hits(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=128, enable_prefix_caching=False)
    outputs = [llm.generate(PROMPTS[-1:], greedy(), use_tqdm=False)[0] for _ in range(2)]
    assert [o.metrics.num_cached_tokens for o in outputs] == [0, 0]
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS[-1:]) * 2
    assert_no_leaks(llm)


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_greedy_with_chunked_prefill(variant, checkpoint, hf):
    path = checkpoint(variant)
    llm = make_llm(path, num_gpu_blocks_override=256, max_num_batched_tokens=8)
    with StepSpy(llm) as log:
        outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert log.max_tokens_per_step <= 8
    assert 1 < log.max_prefill_chunk <= 8  # 17-, 29- and 40-token prompts were split
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    assert_no_leaks(llm)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_greedy_block_sizes(block_size, checkpoint, hf):
    path = checkpoint("llama3_rope")
    llm = make_llm(path, block_size=block_size, num_gpu_blocks_override=512 // block_size)
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS)
    assert_no_leaks(llm)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_greedy_everything_at_once(block_size, checkpoint, hf):
    """Tiny pool + swap + chunked prefill + prefix caching + max_num_seqs, prompts that share a
    prefix arriving in one batch, several generate calls on one engine."""
    path = checkpoint("qwen2")
    shared = make_prompts([20], seed=3)[0]
    prompts = PROMPTS + [shared + tail for tail in make_prompts([3, 7, 12], seed=4)]
    blocks = -(-(40 + MAX_TOKENS) // block_size) + 2
    llm = make_llm(path, block_size=block_size, num_gpu_blocks_override=blocks,
                   swap_space_gib=1e-4, max_num_batched_tokens=8, max_num_seqs=4)
    expected = hf.generate_all(path, prompts)
    for _ in range(2):
        outputs = llm.generate(prompts, greedy(), use_tqdm=False)
        assert token_ids(outputs) == expected
        assert_no_leaks(llm)
    assert llm.engine.scheduler.num_preemptions > 0


def test_prompts_with_different_max_tokens(checkpoint, hf):
    path = checkpoint("llama_tied")
    llm = make_llm(path, num_gpu_blocks_override=40)
    params = [greedy(max_tokens=m) for m in (1, 2, 5, 12, 20, 7)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, prompt, p in zip(outputs, PROMPTS, params, strict=True):
        assert output.outputs[0].token_ids == hf.generate(path, prompt, p.max_tokens)
    assert_no_leaks(llm)


def test_prompt_as_dict_and_single_prompt(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=64)
    (single,) = llm.generate(PROMPTS[2], greedy(), use_tqdm=False)
    (as_dict,) = llm.generate({"prompt_token_ids": PROMPTS[2]}, greedy(), use_tqdm=False)
    assert single.outputs[0].token_ids == as_dict.outputs[0].token_ids \
        == hf.generate(path, PROMPTS[2], MAX_TOKENS)
    assert_no_leaks(llm)
