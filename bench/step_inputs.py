"""Host cost of one decode step's model inputs on a rank: persistent rows vs rebuilding.

`persistent`: what the ranks do, `BlockTableRows.apply` (the step's table deltas; about one
sequence in block_size starts a block) + `build_step_inputs` (one copy of per-sequence
columns; tables gathered and slots computed on the device). `rebuilt`: the per-step rebuild
the ranks did before, as a peer in the same run: every sequence's whole table padded into a
fresh tensor, and per-token positions and slots built on the host (the scheduler made the slot
lists then), five host-to-device copies. Timed per step with this thread's CPU time, alternating
the two for `--rounds`, each the median over `--steps` steps.

    python bench/step_inputs.py --json bench/results/step_inputs_cpu.json
    python bench/step_inputs.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve.scheduler.output import ScheduledRequest, SchedulerOutput  # noqa: E402
from pagedserve.workers.block_table_rows import BlockTableRows  # noqa: E402
from pagedserve.workers.layers.attention import AttentionMetadata  # noqa: E402
from pagedserve.workers.step_inputs import build_step_inputs  # noqa: E402
from pagedserve.workers.transfer import to_device  # noqa: E402


class Workload:
    """`num_seqs` sequences decoding from about `context` tokens, random block ids."""

    def __init__(self, num_seqs: int, context: int, block_size: int, seed: int) -> None:
        rng = random.Random(seed)
        self.block_size = block_size
        self.lengths = {f"seq-{i}": rng.randrange(context - 64, context + 64)
                        for i in range(num_seqs)}
        self.tables = {request_id: [rng.randrange(1 << 20) for _ in range(-(-n // block_size))]
                       for request_id, n in self.lengths.items()}
        self.rng = rng

    def first_step(self) -> SchedulerOutput:
        return SchedulerOutput(scheduled=[ScheduledRequest(r, [1], 0, 0, list(t), True)
                                          for r, t in self.tables.items()])

    def next_step(self) -> SchedulerOutput:
        """One decode token per sequence; a sequence whose token starts a block gets one."""
        items = []
        for request_id, length in self.lengths.items():
            table = self.tables[request_id]
            new_blocks = []
            if length % self.block_size == 0:
                new_blocks = [self.rng.randrange(1 << 20)]
                table.extend(new_blocks)
            items.append(ScheduledRequest(request_id, [7], length, len(table) - len(new_blocks),
                                          new_blocks, True))
            self.lengths[request_id] = length + 1
        return SchedulerOutput(scheduled=items)


def rebuilt_inputs(step: SchedulerOutput, tables: dict[str, list[int]], block_size: int,
                   device: torch.device):
    input_ids, positions, slots, query_start_loc, seq_lens, rows = [], [], [], [0], [], []
    for item in step.scheduled:
        table = tables[item.request_id]
        start = item.start_position
        input_ids += item.token_ids
        positions += range(start, start + len(item.token_ids))
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(start, start + len(item.token_ids))]
        query_start_loc.append(query_start_loc[-1] + len(item.token_ids))
        seq_lens.append(item.seq_len)
        rows.append(table)
    width = max(len(t) for t in rows)
    metadata = AttentionMetadata(
        slot_mapping=to_device(slots, torch.int64, device),
        block_tables=to_device([t + [0] * (width - len(t)) for t in rows], torch.int32, device),
        query_start_loc=to_device(query_start_loc, torch.int32, device),
        seq_lens=to_device(seq_lens, torch.int32, device),
        max_query_len=1, max_seq_len=max(seq_lens))
    return (to_device(input_ids, torch.int64, device), to_device(positions, torch.int64, device),
            metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    medians: dict[str, list[float]] = {"persistent": [], "rebuilt": []}
    for round_index in range(args.rounds):
        for name in medians:
            workload = Workload(args.num_seqs, args.context, args.block_size,
                                args.seed + round_index)
            rows = BlockTableRows(device, -(-(args.context + 64 + args.steps)
                                            // args.block_size))
            rows.apply(workload.first_step())
            times = []
            for _ in range(args.steps):
                step = workload.next_step()
                sync()
                start = time.thread_time()
                if name == "persistent":
                    rows.apply(step)
                    build_step_inputs(step, rows, args.block_size, device)
                else:
                    rebuilt_inputs(step, workload.tables, args.block_size, device)
                times.append(time.thread_time() - start)
                sync()
            medians[name].append(statistics.median(times))

    report = {"bench": "step_inputs", "device": str(device), "num_seqs": args.num_seqs,
              "context": args.context, "block_size": args.block_size, "steps": args.steps,
              "median_ms_per_round": {k: [v * 1e3 for v in vs] for k, vs in medians.items()}}
    ratios = [r / p for p, r in zip(medians["persistent"], medians["rebuilt"], strict=True)]
    report["rebuilt_over_persistent_per_round"] = ratios
    print(f"{args.num_seqs} decoding sequences, ~{args.context} tokens, block size "
          f"{args.block_size}, {args.device}: host CPU ms per step (median of {args.steps} "
          "steps, per round)")
    for name, values in medians.items():
        print(f"{name:<12}" + "".join(f"{v * 1e3:>9.3f}" for v in values))
    print("rebuilt / persistent: " + ", ".join(f"{r:.2f}x" for r in ratios))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
