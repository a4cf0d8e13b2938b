"""Engine edges: context-length limits, priority scheduling, streaming through step(),
prompt logprobs with n > 1, cache salts and request metrics."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import (
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)

PROMPTS = make_prompts((3, 9, 20, 31), seed=10)


def test_max_model_len_ends_generation(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=64, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, prompt in zip(outputs, PROMPTS, strict=True):
        completion = output.outputs[0]
        assert len(prompt) + len(completion.token_ids) == 32
        assert completion.finish_reason == "length"
        assert completion.token_ids == hf.generate(path, prompt, 32 - len(prompt))
    assert_no_leaks(llm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [1, 2])
def test_request_outgrowing_the_whole_cache_finishes_with_length(n, checkpoint, hf):
    """A sequence longer than the whole KV pool is ended by the scheduler at preemption; the
    engine must still report it finished (this used to hang generate() forever)."""
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=8)  # 32 tokens in all
    params = [SamplingParams(n=n, temperature=0, max_tokens=40, ignore_eos=True),
              greedy(max_tokens=3)]
    long, short = llm.generate([PROMPTS[2], PROMPTS[0]], params, use_tqdm=False)
    expected = hf.generate(path, PROMPTS[2], 40)
    assert long.finished and len(long.outputs) == n
    for completion in long.outputs:
        assert completion.finish_reason == "length"
        assert 0 < len(completion.token_ids) < 40
        assert len(PROMPTS[2]) + len(completion.token_ids) <= 33
        assert completion.token_ids == expected[:len(completion.token_ids)]
    assert long.metrics.finished_time is not None
    assert short.outputs[0].token_ids == hf.generate(path, PROMPTS[0], 3)
    assert_no_leaks(llm)


def test_priority_policy_with_preemption(checkpoint, hf):
    path = checkpoint("mistral")
    llm = make_llm(path, num_gpu_blocks_override=20, scheduling_policy="priority")
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False, priority=[3, 2, 1, 0])
    assert token_ids(outputs) == hf.generate_all(path, PROMPTS, 12)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_streaming_through_step(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=64, max_num_batched_tokens=8)
    engine = llm.engine
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, greedy(max_tokens=5 + index))
    seen: dict[str, list[list[int]]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
            history = seen.setdefault(output.request_id, [])
            assert not history or tokens[:-1] == history[-1]  # one new token per update
            assert output.finished == (output.outputs[0].finish_reason is not None)
            history.append(tokens)
    for index, prompt in enumerate(PROMPTS):
        assert seen[f"r{index}"][-1] == hf.generate(path, prompt, 5 + index)
        assert len(seen[f"r{index}"]) == 5 + index
    assert_no_leaks(llm)


def test_prompt_logprobs_with_n_and_one_token_prompt(checkpoint, hf):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=64)
    params = SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True,
                            prompt_logprobs=1)
    long, single = llm.generate([PROMPTS[1], [42]], params, use_tqdm=False)
    full = hf.log_softmax(path, PROMPTS[1])
    assert long.prompt_logprobs[0] is None
    assert len(long.prompt_logprobs) == len(PROMPTS[1])
    for position in range(1, len(PROMPTS[1])):
        entry = long.prompt_logprobs[position]
        assert entry.logprob == pytest.approx(full[position - 1][PROMPTS[1][position]].item(),
                                              abs=1e-4)
    assert single.prompt_logprobs == [None]
    assert [o.token_ids for o in single.outputs] == [hf.generate(path, [42], 3)] * 2
    assert_no_leaks(llm)


def test_cache_salt_isolates_prefix_cache(checkpoint):
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=64)
    engine = llm.engine

    def run(request_id, salt):
        engine.add_request(request_id, PROMPTS[3], greedy(max_tokens=2), cache_salt=salt)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
        return outputs[0]

    assert run("a", "alice").metrics.num_cached_tokens == 0
    assert run("b", "bob").metrics.num_cached_tokens == 0
    assert run("c", "alice").metrics.num_cached_tokens == 28
    assert_no_leaks(llm)


def test_metrics_are_ordered(checkpoint):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=64)
    for output in llm.generate(PROMPTS, greedy(max_tokens=3), use_tqdm=False):
        m = output.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert output.usage.prompt_tokens == len(output.prompt_token_ids)
        assert output.usage.total_tokens == len(output.prompt_token_ids) + 3


def test_eos_ids_of_generation_config_stop_generation(tmp_path, hf):
    """Instruct checkpoints often list their end-of-turn token only in generation_config.json."""
    import json

    from tests.helpers.tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    prompt = make_prompts((9,), seed=2)[0]
    free_run = hf.generate(path, prompt, 12)
    stop_token = free_run[4]
    config = json.loads((path / "generation_config.json").read_text()) \
        if (path / "generation_config.json").exists() else {}
    config["eos_token_id"] = [2, stop_token]
    (path / "generation_config.json").write_text(json.dumps(config))
    llm = make_llm(path, num_gpu_blocks_override=64)
    assert stop_token in llm.engine.eos_token_ids
    (output,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)
    assert output.outputs[0].token_ids == free_run[:free_run.index(stop_token) + 1]
    assert output.outputs[0].finish_reason == "stop"
    assert_no_leaks(llm)
