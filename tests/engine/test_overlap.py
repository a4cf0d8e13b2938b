"""Async scheduling (overlap): step N+1 is scheduled and sent before step N's tokens are known.

Every test runs the same requests with `async_scheduling` on and off on the tiny checkpoint and
asks for identical results (token ids, logprobs, finish and stop reasons), under the situations
overlap changes: penalties that read the history, stop conditions reached while the next step
is already out, preemption, prefix hits, aborts between the halves of a step, beam search
(which falls back to synchronous steps) and seeded sampling.
"""

from __future__ import annotations

import pytest

from pagedserve.engine.core import EngineCoreRequest
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.output import PLACEHOLDER_TOKEN_ID
from tests.engine.engine_utils import assert_no_leaks, greedy, make_llm, make_prompts, token_ids


@pytest.fixture(scope="module")
def pair(checkpoint):
    """(overlapped, synchronous) LLMs of the same checkpoint and pool."""
    path = checkpoint("llama")
    return (make_llm(path, num_gpu_blocks_override=64, max_num_seqs=4),
            make_llm(path, num_gpu_blocks_override=64, max_num_seqs=4, async_scheduling=False))


def _generate_both(pair, prompts, params):
    results = []
    for llm in pair:
        results.append(llm.generate(prompts, params, use_tqdm=False))
        assert_no_leaks(llm)
    return results


def _describe(outputs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
            for o in outputs]


def test_overlapped_steps_carry_placeholders_for_the_token_in_flight(pair):
    """From the second decode step on, a request's input token is the placeholder of the
    token its previous (still running) step samples; every such step is overlapped."""
    llm = pair[0]
    core = llm.engine.core
    core.add_request(EngineCoreRequest("p", make_prompts((5,), seed=1)[0], greedy(4)))
    inputs, overlaps = [], []
    while core.has_unfinished_requests():
        step = core.schedule()
        inputs.append([item.token_ids for item in step.scheduled])
        overlaps.append(step.overlap)
        core.complete(step, core.executor.execute(step))
    # Prefill (5 tokens), then 3 decodes fed by placeholders, then an empty step that collects
    # the last result: max_tokens is reached by tokens already pending, so nothing more runs.
    assert [len(i[0]) if i else 0 for i in inputs] == [5, 1, 1, 1, 0]
    assert [i[0][0] for i in inputs[1:4]] == [PLACEHOLDER_TOKEN_ID] * 3
    assert overlaps == [True, True, True, True, False]
    assert_no_leaks(llm)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.7, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.5,
                   frequency_penalty=0.9, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=12, logit_bias={7: 5.0, 9: 3.0},
                   ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11, max_tokens=12, n=3,
                   ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=10, logprobs=3, prompt_logprobs=2,
                   ignore_eos=True),
], ids=["repetition", "presence-frequency", "logit-bias", "seeded-n3", "logprobs"])
def test_sampling_sees_the_true_history_with_overlap(pair, params):
    prompts = make_prompts((6, 9, 4), seed=2)
    overlapped, synchronous = _generate_both(pair, prompts, params)
    assert _describe(overlapped) == _describe(synchronous)
    assert [o.prompt_logprobs for o in overlapped] == [o.prompt_logprobs for o in synchronous]


def test_stop_conditions_end_with_no_extra_token(pair):
    """EOS, a stop token id, min_tokens and max_tokens reached while the next step is out."""
    prompts = make_prompts((5, 7, 6, 8), seed=3)
    reference = token_ids(pair[1].generate(prompts, greedy(16), use_tqdm=False))
    stop_token = reference[1][3]
    params = [
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[reference[2][0]],
                       min_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]
    overlapped, synchronous = _generate_both(pair, prompts, params)
    assert _describe(overlapped) == _describe(synchronous)
    assert overlapped[1].outputs[0].token_ids == reference[1][:reference[1].index(stop_token) + 1]
    assert overlapped[1].outputs[0].stop_reason == stop_token
    assert [len(o.outputs[0].token_ids) for o in overlapped][0::3] == [3, 1]


def test_eos_of_the_model_ends_the_request_as_without_overlap(checkpoint):
    """The first generated token made EOS: the request finishes on it in both modes."""
    path = checkpoint("llama")
    (prompt,) = make_prompts((6,), seed=4)
    runs = []
    for overlap in (True, False):
        llm = make_llm(path, num_gpu_blocks_override=32, async_scheduling=overlap)
        first = llm.generate([prompt], greedy(1), use_tqdm=False)[0].outputs[0].token_ids[0]
        llm.engine.eos_token_ids = [first]
        runs.append(_describe(llm.generate([prompt], SamplingParams(temperature=0.0,
                                                                    max_tokens=8),
                                           use_tqdm=False)))
        assert_no_leaks(llm)
    assert runs[0] == runs[1]
    assert runs[0][0][0][1:] == ("stop", None, None) and len(runs[0][0][0][0]) == 1


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
def test_greedy_under_preemption_equals_synchronous(checkpoint, swap):
    path = checkpoint("llama")
    prompts = make_prompts((9, 6, 11, 7, 5), seed=5)
    kwargs = dict(num_gpu_blocks_override=12, max_num_seqs=5, enable_prefix_caching=False,
                  swap_space_gib=0.01 if swap else 0.0)
    results = []
    for overlap in (True, False):
        llm = make_llm(path, async_scheduling=overlap, **kwargs)
        results.append(token_ids(llm.generate(prompts, greedy(14), use_tqdm=False)))
        assert llm.engine.scheduler.num_preemptions > 0
        assert_no_leaks(llm)
    assert results[0] == results[1]


def test_prefix_hits_with_overlap_equal_synchronous(pair):
    shared = make_prompts((12,), seed=6)[0]
    prompts = [shared + tail for tail in make_prompts((3, 5, 2), seed=7)]
    first = _generate_both(pair, prompts[:1], greedy(6))
    later = _generate_both(pair, prompts, greedy(6))
    assert _describe(first[0]) == _describe(first[1])
    assert _describe(later[0]) == _describe(later[1])
    assert all(o.metrics.num_cached_tokens >= 8 for o in later[0])


def test_abort_while_its_step_is_in_flight_reports_nothing_more(pair, hf, checkpoint):
    llm = pair[0]
    core = llm.engine.core
    victim, other = make_prompts((6, 5), seed=8)
    core.add_request(EngineCoreRequest("victim", victim, greedy(8)))
    core.add_request(EngineCoreRequest("other", other, greedy(6)))
    seen = [core.step(), core.step()]
    step = core.schedule()
    assert step.overlap and "victim" in [item.request_id for item in step.scheduled]
    results = core.executor.execute(step)
    core.abort_request("victim")
    seen.append(core.complete(step, results))
    while core.has_unfinished_requests():
        seen.append(core.step())
    updates = [u for output in seen for u in output.updates]
    assert [u.finish_reason for u in updates if u.request_id == "other"][-1] == "length"
    assert all(u.finish_reason is None for u in updates if u.request_id == "victim")
    assert [t for u in updates if u.request_id == "other" for t in u.new_token_ids] == \
        hf.generate(checkpoint("llama"), other, 6)
    assert_no_leaks(llm)


def test_beam_search_falls_back_to_synchronous_steps(pair):
    llm = pair[0]
    core = llm.engine.core
    prompt, plain = make_prompts((5, 6), seed=9)
    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    core.add_request(EngineCoreRequest("plain", plain, greedy(10)))
    core.step()
    core.add_request(EngineCoreRequest("beams", prompt, params))
    overlaps = []
    while core.has_unfinished_requests():
        step = core.schedule()
        overlaps.append((bool(core._beams), step.overlap))
        core.complete(step, core.executor.execute(step))
    assert all(not overlap for with_beams, overlap in overlaps if with_beams)
    assert any(overlap for with_beams, overlap in overlaps if not with_beams)
    assert_no_leaks(llm)
    beams = [llm.beam_search([prompt], params)[0] for llm in pair]
    assert [s.token_ids for s in beams[0].sequences] == [s.token_ids for s in beams[1].sequences]


def test_requests_arriving_together_share_their_prefix_in_the_same_step():
    """Blocks become cache entries when scheduled: B, admitted right after A in one step,
    finds A's 12 full prefix blocks (48 tokens) and computes only its own 3 tokens."""
    from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
    from pagedserve.scheduler.request import Request
    from pagedserve.scheduler.scheduler import Scheduler

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_model_len=128),
                          CacheConfig(block_size=4, num_gpu_blocks=64))
    prefix = list(range(10, 58))
    scheduler.add_request(Request("A", prefix + [70, 71], greedy(2)))
    scheduler.add_request(Request("B", prefix + [80, 81, 82], greedy(2)))
    step = scheduler.schedule()
    a, b = step.scheduled
    assert (a.start_position, a.num_tokens, b.start_position, b.num_tokens) == (0, 50, 48, 3)
    tables = scheduler.kv.block_tables
    assert tables["B"][:12] == tables["A"][:12] and tables["B"][12] not in tables["A"]
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (50 + 51, 48)


def test_a_failed_step_leaves_no_cache_entries_for_blocks_it_never_wrote(checkpoint,
                                                                        monkeypatch):
    from pagedserve.engine.core import CoreStepError

    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=32)
    core = llm.engine.core
    (prompt,) = make_prompts((12,), seed=10)
    core.add_request(EngineCoreRequest("lost", prompt, greedy(4)))

    def broken(step):
        raise RuntimeError("device lost")

    monkeypatch.setattr(core.executor, "execute", broken)
    with pytest.raises(CoreStepError, match="device lost"):
        core.step()
    monkeypatch.undo()
    assert not any(core.scheduler.kv.pool.block_hash)
    core.add_request(EngineCoreRequest("again", prompt, greedy(4)))
    while core.has_unfinished_requests():
        core.step()
    assert core.scheduler.prefix_cache_hits == 0
    assert_no_leaks(llm)
