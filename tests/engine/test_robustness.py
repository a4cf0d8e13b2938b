"""Failure paths: a failed model step, reserved ids, limits, copy ordering, extra EOS ids."""

from __future__ import annotations

import pytest

from pagedserve.engine.llm_engine import EngineStepError
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.workers import model_runner
from pagedserve.workers.model_runner import conflict_free_waves
from tests.engine.engine_utils import assert_no_leaks, greedy, make_llm, make_prompts, token_ids


@pytest.fixture(scope="module")
def llm(checkpoint):
    return make_llm(checkpoint("llama"), num_gpu_blocks_override=64, max_model_len=64)


def test_failed_step_aborts_its_requests_and_the_engine_keeps_serving(llm, monkeypatch):
    engine = llm.engine
    prompts = make_prompts((5, 9), seed=3)
    expected = token_ids(llm.generate(prompts, greedy(), use_tqdm=False))
    engine.add_request("a", prompts[0], greedy())
    engine.add_request("b", prompts[1], greedy(n=2))
    engine.step()

    def broken(step):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.executor, "execute", broken)
    with pytest.raises(EngineStepError, match="device lost") as failure:
        engine.step()
    monkeypatch.undo()
    outputs = {output.request_id: output for output in failure.value.outputs}
    assert sorted(outputs) == ["a", "b"]
    assert all(o.finished and [c.finish_reason for c in o.outputs] == ["abort"] * len(o.outputs)
               for o in outputs.values())
    assert_no_leaks(llm)
    assert token_ids(llm.generate(prompts, greedy(), use_tqdm=False)) == expected
    assert_no_leaks(llm)


def test_request_ids_with_a_slash_are_reserved(llm):
    with pytest.raises(ValueError, match="must not contain '/'"):
        llm.engine.add_request("x/0", [5, 6, 7], greedy())
    assert_no_leaks(llm)


def test_max_model_len_beyond_the_models_positions_is_rejected(checkpoint):
    with pytest.raises(ValueError, match="EngineConfig.max_model_len must be <= the model's "
                                         "max_position_embeddings \\(256\\)"):
        make_llm(checkpoint("llama"), num_gpu_blocks_override=64, max_model_len=257)


def test_beam_search_stops_beams_at_max_model_len(checkpoint):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=64, max_model_len=12)
    (result,) = llm.beam_search([make_prompts((8,), seed=4)[0]],
                                BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True))
    assert [len(s.token_ids) for s in result.sequences] == [4, 4]
    assert_no_leaks(llm)


def test_ignore_eos_ignores_every_eos_id(llm):
    engine = llm.engine
    engine.eos_token_ids = [2, 9]
    try:
        engine.add_request("e", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        assert engine.scheduler.requests["e"].sampling_params.extra_stop_token_ids == []
        engine.abort_request("e")
        engine.add_request("f", [5, 6, 7], SamplingParams(max_tokens=3))
        assert engine.scheduler.requests["f"].sampling_params.extra_stop_token_ids == [9]
        engine.abort_request("f")
    finally:
        engine.eos_token_ids = [2]
    assert_no_leaks(llm)


@pytest.mark.parametrize(("pairs", "waves"), [
    ([], []),
    ([(1, 2), (3, 4)], [[(1, 2), (3, 4)]]),
    ([(1, 4), (3, 1)], [[(1, 4)], [(3, 1)]]),
    ([(1, 2), (2, 3), (5, 6)], [[(1, 2)], [(2, 3), (5, 6)]]),
    ([(1, 2), (3, 2)], [[(1, 2)], [(3, 2)]]),
])
def test_conflict_free_waves(pairs, waves):
    assert conflict_free_waves(pairs) == waves


def test_runner_copies_reused_blocks_in_order(llm, monkeypatch):
    """A copy whose destination an earlier copy of the same step reads runs after it."""
    calls = []
    monkeypatch.setattr(model_runner, "copy_blocks_reference",
                        lambda keys, values, mapping: calls.append(mapping.tolist()))
    step = llm.engine.scheduler.schedule()
    step.blocks_to_copy = [(1, 4), (3, 1)]
    llm.engine.executor.execute(step)
    assert calls == [[[1, 4]], [[3, 1]]]
