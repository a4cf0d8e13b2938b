"""Persistent block-table rows and the step inputs derived from them on the device: exact
rows, reuse and growth; positions, slots and tables equal the host rule for every step of
random workloads (deltas, copy-on-write rewrites, forgotten requests, placeholders)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.output import (
    PLACEHOLDER_TOKEN_ID,
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedserve.workers.block_table_rows import BlockTableRows
from pagedserve.workers.step_inputs import build_step_inputs

CPU = torch.device("cpu")


def item(request_id: str, tokens: list[int], start: int, table_start: int, blocks: list[int],
         new: bool = False) -> ScheduledRequest:
    data = NewRequestData(tokens, [], SamplingParams()) if new else None
    return ScheduledRequest(request_id, tokens, start, table_start, blocks, True, data)


def test_rows_take_deltas_reuse_freed_rows_and_grow_keeping_entries():
    rows = BlockTableRows(CPU, max_blocks_per_seq=3, initial_rows=2)
    rows.table.fill_(-7)  # poison: every entry read below must have been written
    rows.apply(SchedulerOutput(scheduled=[item("a", [1] * 5, 0, 0, [4, 9], new=True),
                                          item("b", [2], 0, 0, [3], new=True)]))
    assert rows.row_of == {"a": 0, "b": 1}
    assert rows.table[:2, :2].tolist() == [[4, 9], [3, -7]]
    # "a" rewrites its second block (copy-on-write) and adds a third; "b" adds none.
    rows.apply(SchedulerOutput(scheduled=[item("a", [1], 5, 1, [6, 8]), item("b", [2], 1, 1, [])]))
    assert rows.table[0].tolist() == [4, 6, 8] and rows.table[1, 0] == 3
    rows.apply(SchedulerOutput(forgotten_request_ids=["a", "never-seen"],
                               scheduled=[item("c", [3] * 2, 0, 0, [5], new=True),
                                          item("d", [4] * 9, 0, 0, [1, 2, 7, 0], new=True)]))
    assert rows.row_of == {"b": 1, "c": 0, "d": 2}  # c took a's row; d a new one: the table grew
    assert rows.table.shape == (4, 4)  # rows doubled; d's fourth block widened it
    assert rows.table[:3].tolist() == [[5, 6, 8, 0], [3, -7, -7, 0], [1, 2, 7, 0]]
    assert rows.gather(torch.tensor([2, 1]), 2).tolist() == [[1, 2], [3, -7]]
    assert rows.gather(torch.tensor([2, 1]), 2).is_contiguous()


def test_inputs_of_a_mixed_step_are_exact():
    rows = BlockTableRows(CPU, max_blocks_per_seq=8)
    step = SchedulerOutput(scheduled=[
        item("p", [11, 12, 13, 14, 15], 3, 0, [7, 2], new=True),  # a chunk after a prefix hit
        item("d", [PLACEHOLDER_TOKEN_ID], 9, 0, [5, 0, 6], new=True),  # a decode
        item("q", [31, 32], 0, 0, [4], new=True),
    ])
    rows.apply(step)
    inputs = build_step_inputs(step, rows, 4, CPU)
    assert inputs.input_ids.tolist() == [11, 12, 13, 14, 15, PLACEHOLDER_TOKEN_ID, 31, 32]
    assert inputs.positions.tolist() == [3, 4, 5, 6, 7, 9, 0, 1]
    assert inputs.metadata.slot_mapping.tolist() == [
        7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 6 * 4 + 1, 4 * 4 + 0, 4 * 4 + 1]
    assert inputs.metadata.block_tables.tolist() == [[7, 2, 0], [5, 0, 6], [4, 0, 0]]
    assert inputs.metadata.block_tables.dtype == torch.int32
    assert inputs.metadata.query_start_loc.tolist() == [0, 5, 6, 8] == inputs.query_start_loc
    assert inputs.metadata.seq_lens.tolist() == [8, 10, 2]
    assert (inputs.metadata.max_query_len, inputs.metadata.max_seq_len) == (5, 10)


def test_inputs_of_a_decode_step_are_exact():
    rows = BlockTableRows(CPU, max_blocks_per_seq=4)
    rows.apply(SchedulerOutput(scheduled=[item("a", [1] * 6, 0, 0, [3, 1], new=True),
                                          item("b", [2] * 3, 0, 0, [0], new=True)]))
    step = SchedulerOutput(scheduled=[item("b", [9], 3, 1, []), item("a", [8], 6, 2, [])])
    rows.apply(step)
    inputs = build_step_inputs(step, rows, 4, CPU)
    assert inputs.positions.tolist() == [3, 6]
    assert inputs.metadata.slot_mapping.tolist() == [0 * 4 + 3, 1 * 4 + 2]
    assert inputs.metadata.block_tables.tolist() == [[0, 0], [3, 1]]


@st.composite
def workloads(draw):
    """Steps that forget some requests (a forgotten one may come back at once as new, as a
    preempted request does) and schedule others with a delta that keeps a prefix of the table
    and appends blocks covering the new context."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    steps, live, counter = [], {}, 0
    for _ in range(draw(st.integers(1, 8))):
        forgotten = [r for r in live if draw(st.booleans()) and draw(st.booleans())]
        for request_id in forgotten:
            del live[request_id]
        scheduled = []
        for _ in range(draw(st.integers(1, 4))):
            fresh = not live or draw(st.booleans())
            if fresh:
                returning = [r for r in forgotten if r not in live]
                if returning and draw(st.booleans()):
                    request_id = draw(st.sampled_from(returning))
                else:
                    request_id = f"r{counter}"
                    counter += 1
                start, table = 0, []
            else:
                request_id = draw(st.sampled_from(sorted(live)))
                if any(s.request_id == request_id for s in scheduled):
                    continue
                start, table = live[request_id]
            num_tokens = draw(st.integers(1, 9))
            seq_len = start + num_tokens
            keep = draw(st.integers(0, len(table)))  # a rewrite from `keep` on (copy-on-write)
            needed = -(-seq_len // block_size)
            new_blocks = draw(st.lists(st.integers(0, 63), min_size=max(needed - keep, 0),
                                       max_size=max(needed - keep, 0) + 2))
            table = table[:keep] + new_blocks
            live[request_id] = (seq_len, table)
            tokens = draw(st.lists(st.integers(0, 99), min_size=num_tokens, max_size=num_tokens))
            scheduled.append(item(request_id, tokens, start, keep, new_blocks, new=fresh))
        steps.append((SchedulerOutput(scheduled=scheduled, forgotten_request_ids=forgotten),
                      {s.request_id: live[s.request_id][1] for s in scheduled}))
    return block_size, steps


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_device_inputs_follow_the_host_rule(workload):
    block_size, steps = workload
    rows = BlockTableRows(CPU, max_blocks_per_seq=2, initial_rows=1)
    for step, tables in steps:
        rows.apply(step)
        inputs = build_step_inputs(step, rows, block_size, CPU)
        positions, slots, seq_lens = [], [], []
        for scheduled in step.scheduled:
            table = tables[scheduled.request_id]
            for position in range(scheduled.start_position, scheduled.seq_len):
                positions.append(position)
                slots.append(table[position // block_size] * block_size + position % block_size)
            seq_lens.append(scheduled.seq_len)
        width = -(-max(seq_lens) // block_size)
        assert inputs.positions.tolist() == positions
        assert inputs.metadata.slot_mapping.tolist() == slots
        assert inputs.metadata.seq_lens.tolist() == seq_lens
        assert inputs.input_ids.tolist() == [t for s in step.scheduled for t in s.token_ids]
        for row, scheduled in enumerate(step.scheduled):
            needed = -(-scheduled.seq_len // block_size)
            assert inputs.metadata.block_tables[row, :needed].tolist() == \
                tables[scheduled.request_id][:needed]
        assert inputs.metadata.block_tables.shape[1] == width
