"""A SchedulerOutput survives the process boundary exactly (it travels as columns)."""

from __future__ import annotations

import pickle

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput


def test_a_step_pickles_to_an_equal_step():
    new = NewRequestData([1, 2, 3], [4], SamplingParams(temperature=0.5, seed=7, stop=["x"]))
    step = SchedulerOutput(
        scheduled=[ScheduledRequest("a", [4], 3, 0, [7], True, new),
                   ScheduledRequest("b/1", [9, 8, 7], 16, 1, [], False),
                   ScheduledRequest("c", [5], 40, 2, [12, 13], True)],
        num_batched_tokens=5, blocks_to_swap_out=[(1, 0)], blocks_to_swap_in=[(2, 3)],
        blocks_to_copy=[(4, 5)], forgotten_request_ids=["gone"], cached_block_ids=[6, 2])
    copy = pickle.loads(pickle.dumps(step))
    assert copy.cached_block_ids == []  # the scheduler's own: never sent to the ranks
    copy.cached_block_ids = [6, 2]
    assert copy == step
    assert copy.scheduled[0].new_request == new and copy.scheduled[1].new_request is None
    assert [item.seq_len for item in copy.scheduled] == [4, 19, 41]


def test_an_empty_step_pickles_to_an_empty_step():
    copy = pickle.loads(pickle.dumps(SchedulerOutput(forgotten_request_ids=["x"])))
    assert copy == SchedulerOutput(forgotten_request_ids=["x"]) and copy.is_empty
