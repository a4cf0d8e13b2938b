"""Every live request's block table as one persistent row of a device tensor.

The scheduler sends each request's table as a delta (`table_start`, `table_blocks`: the table
becomes table[:table_start] + table_blocks), so a decode step changes about one row in
block_size. Keeping the rows on the device and writing only the changed entries replaces
rebuilding and copying every request's whole table each step; a step's tables are then one
device gather by row. Entries past a row's current length are stale, never read: a sequence's
context length bounds every read of its table.
"""

from __future__ import annotations

import torch

from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.workers.transfer import to_device


class BlockTableRows:
    """Request id -> row of `table` (int32 [rows, blocks]), grown on demand."""

    def __init__(self, device: torch.device, max_blocks_per_seq: int,
                 initial_rows: int = 16) -> None:
        self.device = device
        self.table = torch.zeros(max(initial_rows, 1), max(max_blocks_per_seq, 1),
                                 dtype=torch.int32, device=device)
        self.row_of: dict[str, int] = {}
        self._free_rows: list[int] = []
        self._next_row = 0

    def apply(self, step: SchedulerOutput) -> None:
        """Drop the step's forgotten requests, then write its scheduled requests' deltas (one
        host-to-device copy for all of them)."""
        for request_id in step.forgotten_request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self._free_rows.append(row)
        rows: list[int] = []
        columns: list[int] = []
        blocks: list[int] = []
        for item in step.scheduled:
            request_id = item.request_id
            row = self.row_of.get(request_id)
            if row is None:
                row = self.row_of[request_id] = self._take_row()
            if item.table_blocks:
                rows += [row] * len(item.table_blocks)
                columns += range(item.table_start, item.table_start + len(item.table_blocks))
                blocks += item.table_blocks
        if not blocks:
            return
        self._reserve(max(rows) + 1, max(columns) + 1)
        where = to_device([rows, columns, blocks], torch.int64, self.device)
        self.table[where[0], where[1]] = where[2].to(torch.int32)

    def rows(self, request_ids: list[str]) -> list[int]:
        row_of = self.row_of
        return [row_of[request_id] for request_id in request_ids]

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The tables of `rows` (int64 [n], on the device), first `width` entries: a contiguous
        int32 [n, width]."""
        return self.table[:, :width].index_select(0, rows)

    def _take_row(self) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        row, self._next_row = self._next_row, self._next_row + 1
        return row

    def _reserve(self, num_rows: int, num_columns: int) -> None:
        """Grow `table` (doubling) to hold `num_rows` x `num_columns`, keeping its entries."""
        rows, columns = self.table.shape
        if num_rows <= rows and num_columns <= columns:
            return
        new_rows = rows if num_rows <= rows else max(num_rows, 2 * rows)
        grown = torch.zeros(new_rows, max(columns, num_columns), dtype=torch.int32,
                            device=self.device)
        grown[:rows, :columns] = self.table
        self.table = grown
