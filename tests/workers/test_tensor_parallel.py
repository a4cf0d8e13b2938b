"""TP=2 over gloo on CPU gives the same logits as TP=1 (sharded layers + collectives)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.workers.models.loader import load_model
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tensor_parallel import run_tensor_parallel
from tests.helpers.tiny_models import save_tiny_checkpoint


@pytest.mark.timeout(120)
def test_tp2_matches_tp1(tmp_path):
    # An odd vocabulary size exercises the padded vocabulary split.
    checkpoint = save_tiny_checkpoint(tmp_path / "qwen3", "qwen3", vocab_size=255)
    steps = [[("a", [5, 9, 11, 3, 7, 8]), ("b", [200, 254])], [("a", [1]), ("b", [0, 17, 4])]]
    single = PagedRunner(load_model(checkpoint, dtype="float32"))
    expected = [single.step(chunks) for chunks in steps]

    rank0, rank1 = run_tensor_parallel(checkpoint, steps)
    for step, (ours, reference) in enumerate(zip(rank0["logits"], expected, strict=True)):
        for chunk, (a, b) in enumerate(zip(ours, reference, strict=True)):
            assert (a - b).abs().max() < 1e-4, f"step {step} chunk {chunk}"
    assert all(chunk is None for step in rank1["logits"] for chunk in step)
    assert rank0["every_rank"].shape == (2, 255)
    assert torch.equal(rank0["every_rank"], rank1["every_rank"])
