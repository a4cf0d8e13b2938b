"""One step's model inputs, built on the device from per-sequence columns.

The host sends, in one host-to-device copy, the token ids and four numbers per sequence (first
position, query start offset, context length, block-table row); the block tables come from the
persistent rows, and each token's position and KV slot are computed on the device:
position = start + (token index - query start), slot = table[position // block size] * block
size + position % block size. A 256-sequence decode step thus ships about 1,300 integers
instead of its tables and per-token slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.workers.block_table_rows import BlockTableRows
from pagedserve.workers.layers.attention import AttentionMetadata
from pagedserve.workers.transfer import to_device


@dataclass
class StepInputs:
    """One step's model inputs on the device, and its query start offsets on the host."""

    input_ids: torch.Tensor
    """int64 [num_tokens]; placeholder tokens still hold PLACEHOLDER_TOKEN_ID."""
    positions: torch.Tensor
    """int64 [num_tokens]."""
    metadata: AttentionMetadata
    query_start_loc: list[int]


def build_step_inputs(step: SchedulerOutput, tables: BlockTableRows, block_size: int,
                      device: torch.device) -> StepInputs:
    """The inputs of `step`, whose table deltas `tables` has applied already."""
    items = step.scheduled
    num_seqs = len(items)
    input_ids: list[int] = []
    starts: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    for item in items:
        input_ids += item.token_ids
        starts.append(item.start_position)
        query_start_loc.append(query_start_loc[-1] + len(item.token_ids))
        seq_lens.append(item.start_position + len(item.token_ids))
    rows = tables.rows([item.request_id for item in items])
    num_tokens = query_start_loc[-1]
    max_seq_len = max(seq_lens)
    columns = to_device(input_ids + starts + query_start_loc + seq_lens + rows, torch.int64,
                        device)
    ids, first_positions, starts_loc, lengths, table_rows = columns.split(
        [num_tokens, num_seqs, num_seqs + 1, num_seqs, num_seqs])
    block_tables = tables.gather(table_rows, -(-max_seq_len // block_size))
    if num_tokens == num_seqs:  # one token per sequence (decode)
        token_seq = torch.arange(num_seqs, device=device)
        positions = first_positions
    else:
        token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device),
                                            starts_loc.diff(), output_size=num_tokens)
        positions = first_positions[token_seq] + torch.arange(num_tokens, device=device) \
            - starts_loc[token_seq]
    slots = block_tables[token_seq, positions // block_size].long() * block_size \
        + positions % block_size
    metadata = AttentionMetadata(
        slot_mapping=slots,
        block_tables=block_tables,
        query_start_loc=starts_loc.int(),
        seq_lens=lengths.int(),
        max_query_len=max(len(item.token_ids) for item in items),
        max_seq_len=max_seq_len,
    )
    return StepInputs(ids, positions, metadata, query_start_loc)
