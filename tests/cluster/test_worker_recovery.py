"""A rank killed mid-run: the coordinator starts new ranks and recomputes every request in
flight, so each stream goes on to the same tokens a run without the fault gives (nothing
missing, nothing repeated); health says NOT_SERVING meanwhile; once the restarts are spent,
requests end UNAVAILABLE. CPU, local Ray, TP=1 and TP=2 over gloo."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.errors import Unavailable
from pagedserve.sampling_params import BeamSearchParams
from tests.cluster.test_coordinator import (
    PROMPTS,
    Result,
    _pid_ref,
    _workers,
    coordinator_config,
    open_stream,
    wait_for_exit,
)
from tests.engine.engine_utils import greedy, make_llm, token_ids

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow

MAX_TOKENS = 40
NUM_REQUESTS = 6


async def _stream_all(handle, requests, started: list[asyncio.Event]):
    async def one(index, request):
        result = Result()
        first_after: list[float] = []
        async for ref in open_stream(handle, request):
            item = await ref
            result.add(item)
            if isinstance(item, list) and any(u.new_token_ids for u in item):
                first_after.append(time.monotonic())
            started[index].set()
        return result, first_after

    return [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [1, 2])
def test_a_killed_rank_is_replaced_and_every_request_completes_as_without_the_fault(
        checkpoint, tp):
    path = checkpoint("llama")
    prompts = PROMPTS[:NUM_REQUESTS]
    expected = token_ids(make_llm(path, num_gpu_blocks_override=512).generate(
        prompts, greedy(MAX_TOKENS), use_tqdm=False))
    beam_params = BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True)
    expected_beams = make_llm(path, num_gpu_blocks_override=512).beam_search(
        [PROMPTS[20]], beam_params)[0]
    handle = start_coordinator(coordinator_config(path, tp, max_worker_restarts=2))
    try:
        free_blocks = ray.get(handle.free_blocks.remote())
        old_pids = ray.get([_pid_ref(w) for w in _workers(handle)])

        async def main():
            started = [asyncio.Event() for _ in range(NUM_REQUESTS + 1)]
            requests = [EngineCoreRequest(f"r{i}", p, greedy(MAX_TOKENS))
                        for i, p in enumerate(prompts)]
            requests.append(EngineCoreRequest("beam", PROMPTS[20], beam_params))
            tasks = await _stream_all(handle, requests, started)
            for event in started[:NUM_REQUESTS]:
                await asyncio.wait_for(event.wait(), 60)
            killed_at = time.monotonic()
            ray.kill(_workers(handle)[-1])
            health = []
            while not tasks[0].done() and len(health) < 2000:
                health.append((time.monotonic(),
                               ray.get(handle.health.remote())["restarting_workers"]))
                await asyncio.sleep(0.01)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return killed_at, results, health

        killed_at, results, health = asyncio.run(main())
        restarting = [at for at, flag in health if flag]
        for index, (result, _) in enumerate(results[:NUM_REQUESTS]):
            assert result.tokens[0] == expected[index], f"r{index}"
            assert result.finish == {0: "length"}
        beam = results[-1][0].beam
        assert isinstance(beam, BeamSearchOutput)
        assert [s.token_ids for s in beam.sequences] == \
            [s.token_ids for s in expected_beams.sequences]
        assert restarting  # NOT_SERVING while the new ranks started
        # Tokens that arrive after the restart was seen came from the new ranks.
        first_new = min(t for _, times in results[:NUM_REQUESTS] for t in times
                        if t > restarting[0])
        print(f"recovery (fault to first new token), TP={tp}: {first_new - killed_at:.2f} s")
        status = ray.get(handle.health.remote())
        assert status["healthy"] and status["worker_restarts"] == 1
        assert not status["restarting_workers"]
        assert ray.get(handle.free_blocks.remote()) == free_blocks
        wait_for_exit(old_pids)
        new_pids = ray.get([_pid_ref(w) for w in _workers(handle)])
        assert len(new_pids) == tp and not set(new_pids) & set(old_pids)
    finally:
        stop_coordinator(handle)


@pytest.mark.timeout(240)
def test_requests_end_unavailable_once_the_restarts_are_spent(checkpoint):
    handle = start_coordinator(coordinator_config(checkpoint("llama"), 1, max_worker_restarts=1))
    try:
        async def main():
            started = [asyncio.Event() for _ in range(8)]
            tasks = await _stream_all(
                handle, [EngineCoreRequest(f"doomed{i}", PROMPTS[i], greedy(MAX_TOKENS * 4))
                         for i in range(8)], started)
            await asyncio.wait_for(started[0].wait(), 60)
            ray.kill(_workers(handle)[0])
            # The first kill is survived; kill the new rank as soon as it serves.
            deadline = time.monotonic() + 60
            while ray.get(handle.health.remote())["worker_restarts"] < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            ray.kill(_workers(handle)[0])
            for task in tasks:
                with pytest.raises(Unavailable, match="max_worker_restarts"):
                    await asyncio.wait_for(task, 60)

        asyncio.run(main())
        status = ray.get(handle.health.remote())
        assert not status["healthy"] and "1 restarts did not bring them back" in status["failure"]
        with pytest.raises(Unavailable, match="this replica stopped serving"):
            ray.get(next(open_stream(handle, EngineCoreRequest("late", [5], greedy()))))
    finally:
        stop_coordinator(handle)
