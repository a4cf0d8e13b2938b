"""Running a tiny model with tensor parallelism over gloo in spawned CPU processes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedserve.workers.layers.parallel import init_tensor_parallel
from pagedserve.workers.models.loader import load_model
from tests.helpers.paged_runner import PagedRunner

Steps = list[list[tuple[str, list[int]]]]


def _run_rank(rank: int, world_size: int, init_file: str, checkpoint: str, steps: Steps,
              result_dir: str) -> None:
    tp = init_tensor_parallel(rank, world_size, init_method=f"file://{init_file}",
                              backend="gloo")
    try:
        model = load_model(checkpoint, dtype="float32", tp_rank=tp.rank, tp_size=tp.size)
        runner = PagedRunner(model)
        logits = [runner.step(chunks) for chunks in steps]
        # The all-ranks gather variant of the LM head, on the last step's final hidden states.
        model.lm_head.gather_to_all_ranks = True
        every_rank = model.compute_logits(torch.ones(2, model.config.hidden_size))
        torch.save({"logits": logits, "every_rank": every_rank},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(checkpoint: Path, steps: Steps, world_size: int = 2) -> list[dict]:
    """Each rank's results: per step, per chunk logits (None off rank 0), plus `every_rank`."""
    with tempfile.TemporaryDirectory() as result_dir:
        init_file = os.path.join(result_dir, "rendezvous")
        mp.spawn(_run_rank, args=(world_size, init_file, str(checkpoint), steps, result_dir),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(result_dir, f"rank{rank}.pt"))
                for rank in range(world_size)]
