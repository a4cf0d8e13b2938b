"""The engine over Ray worker actors: TP=2 (gloo on CPU) gives transformers' greedy tokens under
preemption, swap and chunked prefill, and one rank's logprobs and seeded samples; a dead rank
stops the engine without losing requests or blocks; bad sizes are refused before any actor
starts."""

from __future__ import annotations

import pytest

from pagedserve.engine.llm_engine import EngineStepError
from pagedserve.executor.local import LocalExecutor
from pagedserve.executor.ray import RayExecutor
from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import (
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)
from tests.helpers.local_ray import start_local_ray

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = make_prompts((1, 3, 8, 17, 29, 40), seed=5)


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    # Logical CPUs: two ranks fit even on a 2-core machine that also runs the test process.
    start_local_ray(4)
    yield
    ray.shutdown()


def test_tp2_matches_transformers_under_swap_chunking_and_prefix_hits(checkpoint, hf):
    path = checkpoint("qwen2")
    shared = make_prompts([20], seed=3)[0]
    prompts = PROMPTS + [shared + tail for tail in make_prompts([3, 7, 12], seed=4)]
    expected = hf.generate_all(path, prompts)
    with make_llm(path, tensor_parallel_size=2, num_gpu_blocks_override=16,
                  swap_space_gib=1e-4, max_num_batched_tokens=8, max_num_seqs=4) as llm:
        assert isinstance(llm.engine.executor, RayExecutor)
        assert len(llm.engine.executor.workers) == 2
        for _ in range(2):
            assert token_ids(llm.generate(prompts, greedy(), use_tqdm=False)) == expected
            assert_no_leaks(llm)
        assert llm.engine.scheduler.num_preemptions > 0


def test_tp2_logprobs_and_parallel_sampling_match_one_rank(checkpoint):
    path = checkpoint("llama")
    params = SamplingParams(max_tokens=12, logprobs=3, n=2, temperature=0.8, seed=11)
    with make_llm(path, num_gpu_blocks_override=64) as single:
        assert isinstance(single.engine.executor, LocalExecutor)
        expected = single.generate(PROMPTS[:3], params, use_tqdm=False)
    with make_llm(path, tensor_parallel_size=2, num_gpu_blocks_override=64) as llm:
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        again = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        assert_no_leaks(llm)
    # The 8-token prompt's first block (4 tokens) is a prefix hit the second time.
    assert [output.metrics.num_cached_tokens for output in again] == [0, 0, 4]
    assert [token_ids([o]) for o in again] == [token_ids([o]) for o in outputs]
    for ours, reference in zip(outputs, expected, strict=True):
        for a, b in zip(ours.outputs, reference.outputs, strict=True):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
                assert abs(x.logprob - y.logprob) < 1e-4


def test_ray_backend_with_one_rank_matches_local(checkpoint, hf):
    path = checkpoint("llama")
    with make_llm(path, distributed_executor_backend="ray", num_gpu_blocks_override=64) as llm:
        assert len(llm.engine.executor.workers) == 1
        outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        assert token_ids(outputs) == hf.generate_all(path, PROMPTS)


def test_a_dead_rank_stops_the_engine_and_every_request_ends(checkpoint):
    with make_llm(checkpoint("llama"), tensor_parallel_size=2, num_gpu_blocks_override=64,
                  max_num_seqs=2) as llm:
        engine = llm.engine
        for index, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(f"r{index}", prompt, greedy())
        engine.step()
        ray.kill(engine.executor.workers[1])
        # Two were running, two waiting: all four end in the one failed step.
        with pytest.raises(EngineStepError, match="tensor-parallel worker") as failure:
            engine.step()
        outputs = failure.value.outputs
        assert sorted(output.request_id for output in outputs) == ["r0", "r1", "r2", "r3"]
        assert all(output.finished for output in outputs)
        assert {c.finish_reason for o in outputs for c in o.outputs} == {"abort"}
        assert_no_leaks(llm)
        assert not engine.executor.workers  # every rank was stopped
        engine.add_request("late", PROMPTS[0], greedy())
        with pytest.raises(EngineStepError, match="workers are stopped") as late:
            engine.step()
        assert [output.request_id for output in late.value.outputs] == ["late"]
        assert_no_leaks(llm)


def test_a_dropped_engine_gives_its_ray_resources_back(checkpoint):
    import gc
    import time
    import weakref

    llm = make_llm(checkpoint("llama"), tensor_parallel_size=2, num_gpu_blocks_override=64)
    outputs = llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)
    executor = weakref.ref(llm.engine.executor)
    del llm
    gc.collect()
    assert executor() is None
    assert outputs[0].finished
    deadline = time.monotonic() + 30  # Ray frees resources asynchronously
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4


def test_tp_size_that_does_not_split_the_heads_is_refused_before_ray(checkpoint):
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not evenly split.*"
                                         r"valid tensor parallel sizes: \[1, 2\]"):
        make_llm(checkpoint("llama"), tensor_parallel_size=3)


def test_local_backend_refuses_more_than_one_rank(checkpoint):
    with pytest.raises(ValueError, match="distributed_executor_backend='local' runs one rank"):
        make_llm(checkpoint("llama"), tensor_parallel_size=2,
                 distributed_executor_backend="local")


def test_more_ranks_than_the_cluster_has_is_a_clear_error(checkpoint, tmp_path):
    from tests.helpers.tiny_models import save_tiny_checkpoint

    wide = save_tiny_checkpoint(tmp_path / "wide", "llama", num_key_value_heads=8,
                                num_attention_heads=8)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 needs 8 CPUs in the Ray "
                                         r"cluster, which has 4"):
        make_llm(wide, tensor_parallel_size=8)


def test_a_placement_wait_waits_for_the_autoscaler_then_says_so(checkpoint, tmp_path):
    # Where an autoscaler adds nodes the group waits instead of being refused: here none comes.
    import time

    from pagedserve.errors import ResourceExhausted
    from tests.helpers.tiny_models import save_tiny_checkpoint

    wide = save_tiny_checkpoint(tmp_path / "wide", "llama", num_key_value_heads=8,
                                num_attention_heads=8)
    start = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"tensor_parallel_size=8: no single Ray node "
                                                r"has 8 free CPUs \(waited 2 s\)"):
        make_llm(wide, tensor_parallel_size=8, placement_wait_s=2.0)
    assert 2.0 <= time.monotonic() - start < 30.0


@pytest.mark.parametrize("wait", [0.0, -1.0, float("nan"), float("inf"), "60"])
def test_placement_wait_is_validated(wait):
    from pagedserve.config import EngineConfig

    with pytest.raises(ValueError, match=r"EngineConfig.placement_wait_s.*None or a finite "
                                         r"number > 0"):
        EngineConfig(placement_wait_s=wait)
