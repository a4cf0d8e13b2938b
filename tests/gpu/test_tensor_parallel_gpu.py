"""TP=2 on two GPUs through Ray worker actors: NCCL all-reduces inside captured decode graphs
give the same greedy tokens as one GPU and as transformers."""

from __future__ import annotations

import pytest
import torch

from tests.engine.engine_utils import HFReference, greedy, make_prompts, token_ids
from tests.helpers.tiny_models import save_tiny_checkpoint

ray = pytest.importorskip("ray")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_tp2_on_two_gpus_matches_one_gpu_and_transformers(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    prompts = make_prompts((1, 3, 8, 17, 29, 40), seed=5)
    expected = HFReference().generate_all(path, prompts)
    options = dict(model=str(path), device="cuda", dtype="float32", block_size=16,
                   num_gpu_blocks_override=256, max_num_seqs=8)
    from pagedserve import LLM

    with LLM(**options) as single:
        assert token_ids(single.generate(prompts, greedy(), use_tqdm=False)) == expected
    with LLM(**options, tensor_parallel_size=2) as llm:
        assert llm.engine.executor.collective("uses_cuda_graphs") == [True, True]
        for _ in range(2):
            assert token_ids(llm.generate(prompts, greedy(), use_tqdm=False)) == expected
