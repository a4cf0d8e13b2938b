"""Regressions found in review: prompt logprobs across a recompute preemption, bad cache_salt
and priority, sequences dropped in a failed step, prompt logprobs in deltas, stop token text,
SamplingParams types."""

from __future__ import annotations

import pytest

from pagedserve.engine.llm_engine import EngineStepError
from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import assert_no_leaks, greedy, make_llm, make_prompts


def test_prompt_logprobs_survive_a_recompute_preemption_mid_prefill(checkpoint):
    path = checkpoint("llama")
    short, long = make_prompts((10, 40), seed=5)
    params = [greedy(60), greedy(4, prompt_logprobs=1)]
    roomy = make_llm(path, max_num_batched_tokens=16, num_gpu_blocks_override=64)
    expected = roomy.generate([short, long], params, use_tqdm=False)[1].prompt_logprobs
    tight = make_llm(path, max_num_batched_tokens=16, num_gpu_blocks_override=13)
    outputs = tight.generate([short, long], params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    got = outputs[1].prompt_logprobs
    assert len(got) == len(long) == len(expected)
    assert got[0] is None
    for ours, reference in zip(got[1:], expected[1:], strict=True):
        assert ours.token_id == reference.token_id
        assert ours.logprob == pytest.approx(reference.logprob, abs=1e-5)
    assert_no_leaks(tight)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cache_salt", 123, "cache_salt must be a string or None, got 123"),
    ("priority", None, "priority must be an integer, got None"),
])
def test_bad_salt_or_priority_is_refused_and_nothing_is_half_added(checkpoint, field, value,
                                                                   message):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=64,
                   scheduling_policy="priority")
    engine = llm.engine
    engine.add_request("good", [5, 6, 7, 8, 9, 10], greedy(3))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", [5, 6, 7, 8, 9, 10], greedy(3), **{field: value})
    assert "bad" not in engine.scheduler.requests
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(llm)


def test_a_context_cut_and_a_failed_step_still_report_every_request(checkpoint, monkeypatch):
    # A 6-block cache holds 24 tokens, so the context shrinks to 24 (a request longer than the
    # whole pool could never finish); "A" ends there with 'length', "B" in a failed step.
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=6)
    engine = llm.engine
    assert engine.max_model_len == 6 * engine.core.block_size
    engine.add_request("A", make_prompts((10,))[0], greedy(40))
    engine.add_request("B", [5, 6], greedy(40))
    execute = engine.executor.execute
    steps = []

    def flaky(step):
        steps.append(step)
        if len(steps) == 20:
            raise RuntimeError("transient device error")
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute", flaky)
    finished = {}
    for _ in range(200):  # a lost request would keep the engine busy forever
        if not engine.has_unfinished_requests():
            break
        try:
            outputs = engine.step()
        except EngineStepError as error:
            outputs = error.outputs
        finished.update({o.request_id: o.outputs[0].finish_reason for o in outputs if o.finished})
    assert not engine.has_unfinished_requests()
    assert finished == {"A": "length", "B": "abort"}
    assert not engine.scheduler.take_dropped()
    assert_no_leaks(llm)


def test_prompt_logprobs_come_once_in_delta_mode(tiny_text_llm):
    engine = tiny_text_llm.engine
    engine.add_request("d", "The cat sat", SamplingParams(max_tokens=5, prompt_logprobs=1,
                                                          output_kind="delta"))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    assert len(deltas) == 5
    assert deltas[0].prompt_logprobs is not None and len(deltas[0].prompt_logprobs) > 1
    assert all(delta.prompt_logprobs is None for delta in deltas[1:])


@pytest.mark.parametrize("include", [False, True])
def test_the_text_of_a_stop_token_is_left_out_unless_asked_for(tiny_text_llm, include):
    tokenizer = tiny_text_llm.get_tokenizer()
    (full,) = tiny_text_llm.generate("Hi", SamplingParams(temperature=0, max_tokens=8),
                                     use_tqdm=False)
    stop_token = full.outputs[0].token_ids[3]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_token],
                            include_stop_str_in_output=include)
    (stopped,) = tiny_text_llm.generate("Hi", params, use_tqdm=False)
    completion = stopped.outputs[0]
    assert completion.token_ids == full.outputs[0].token_ids[:4]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_token
    kept = tokenizer.decode(full.outputs[0].token_ids[:4 if include else 3])
    assert completion.text == kept


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": "1"}, "temperature must be a number, got '1'"),
    ({"top_p": None}, "top_p must be a number, got None"),
    ({"presence_penalty": "0"}, "presence_penalty must be a number"),
    ({"logit_bias": {1: "a"}}, r"logit_bias must be valued in \[-100, 100\], got 'a'"),
    ({"logit_bias": [(1, 2.0)]}, "logit_bias must be None or a dict"),
    ({"stop": 5}, "stop must be None, a string or a list of strings, got 5"),
    ({"stop_token_ids": 5}, "stop_token_ids must be None or a list of token ids, got 5"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output must be True or False"),
    ({"ignore_eos": None}, "ignore_eos must be True or False, got None"),
    ({"n": True}, "n must be an integer >= 1, got True"),
])
def test_sampling_params_of_the_wrong_type_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**kwargs)
