"""TP=4 and TP=8 over Ray worker actors (gloo on CPU) give transformers' greedy tokens: the
split of 70B serving (issue 16) on a tiny checkpoint whose heads, KV heads, FFN and vocabulary
all divide eight ways, under preemption and chunked prefill."""

from __future__ import annotations

import pytest

from pagedserve.executor.ray import RayExecutor
from tests.engine.engine_utils import assert_no_leaks, greedy, make_llm, make_prompts, token_ids
from tests.helpers.local_ray import start_local_ray
from tests.helpers.tiny_models import save_tiny_checkpoint

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module", autouse=True)
def wide_ray_cluster():
    # Logical CPUs: eight rank actors (one CPU bundle each) plus the driver, on any machine.
    start_local_ray(9)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def eight_way_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eight-way"), "llama",
                                num_attention_heads=8, num_key_value_heads=8)


@pytest.mark.parametrize("tensor_parallel_size", [4, 8])
def test_wide_tensor_parallel_matches_transformers(eight_way_checkpoint, hf,
                                                   tensor_parallel_size):
    prompts = make_prompts((1, 5, 13, 30), seed=9)
    expected = hf.generate_all(eight_way_checkpoint, prompts)
    with make_llm(eight_way_checkpoint, tensor_parallel_size=tensor_parallel_size,
                  num_gpu_blocks_override=12, max_num_batched_tokens=8, max_num_seqs=4,
                  cpu_threads=1) as llm:
        assert isinstance(llm.engine.executor, RayExecutor)
        assert len(llm.engine.executor.workers) == tensor_parallel_size
        assert token_ids(llm.generate(prompts, greedy(), use_tqdm=False)) == expected
        assert_no_leaks(llm)
        assert llm.engine.scheduler.num_preemptions > 0
