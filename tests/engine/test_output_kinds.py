"""`SamplingParams.output_kind`: cumulative, delta (streaming) and final-only step() reports."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams


def _drain(engine) -> dict[str, list]:
    reports: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            reports.setdefault(output.request_id, []).append(output)
    return reports


def _params(kind: str, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.9, seed=3, max_tokens=24, logprobs=2, n=2,
                          output_kind=kind, **kwargs)


@pytest.fixture()
def engine(tiny_text_llm):
    return tiny_text_llm.engine


def _run(engine, kind: str, **kwargs) -> list:
    engine.add_request("q", "The cat sat on", _params(kind, **kwargs))
    return _drain(engine)["q"]


def test_deltas_add_up_to_the_cumulative_output(engine):
    (final,) = [o for o in _run(engine, "cumulative") if o.finished]
    deltas = _run(engine, "delta")
    assert len(deltas) > 2 and deltas[-1].finished and not deltas[0].finished
    for index, expected in enumerate(final.outputs):
        parts = [delta.outputs[index] for delta in deltas]
        assert sum((part.token_ids for part in parts), []) == expected.token_ids
        assert "".join(part.text for part in parts) == expected.text
        assert [entry for part in parts for entry in part.logprobs] == expected.logprobs
        assert parts[-1].cumulative_logprob == pytest.approx(expected.cumulative_logprob)
        assert parts[-1].finish_reason == expected.finish_reason


def test_delta_text_never_carries_the_start_of_a_stop_string(engine):
    (plain,) = [o for o in _run(engine, "cumulative") if o.finished]
    text = plain.outputs[0].text
    assert len(text) > 12
    stop = text[8:12]  # occurs in sequence 0's text, so sequence 0 stops there
    (final,) = [o for o in _run(engine, "cumulative", stop=[stop]) if o.finished]
    assert final.outputs[0].finish_reason == "stop"
    deltas = _run(engine, "delta", stop=[stop])
    for index, expected in enumerate(final.outputs):
        pieces = [delta.outputs[index].text for delta in deltas]
        assert "".join(pieces) == expected.text
        assert stop not in "".join(pieces)


def test_final_only_reports_once_at_the_end(engine):
    (final,) = [o for o in _run(engine, "cumulative") if o.finished]
    reports = _run(engine, "final_only")
    assert len(reports) == 1 and reports[0].finished
    assert [c.token_ids for c in reports[0].outputs] == [c.token_ids for c in final.outputs]


def test_unknown_output_kind_is_refused():
    with pytest.raises(ValueError, match=r"SamplingParams.output_kind must be one of "
                                         r"\('cumulative', 'delta', 'final_only'\), got 'all'"):
        SamplingParams(output_kind="all")
