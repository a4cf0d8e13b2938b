"""The coordinator actor over Ray rank actors (CPU, gloo for TP=2): many concurrent streams with
aborts and cancelled streams give the offline engine's and transformers' tokens and leave no
block behind; beam search and n > 1 share steps with plain requests; the batched
submit/stream path; a killed rank ends every stream within seconds and marks the replica
unhealthy; shutdown leaves no process or placement group; bad requests are refused through the
actor with nothing queued; the coordinator process never imports torch."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.cluster.coordinator_process import GC_YOUNG_THRESHOLD
from pagedserve.cluster.wire import RequestFailed
from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.errors import AlreadyExists, InvalidArgument, Unavailable, WorkerFailure
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from tests.engine.engine_utils import greedy, make_llm, make_prompts, token_ids

ray = pytest.importorskip("ray")
from ray.exceptions import RayActorError, RayTaskError  # noqa: E402

# The probes below run inside the actors (`__ray_call__`); by value, so that the actors never
# import this module (which imports torch; the coordinator must stay without it).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
MAX_NUM_SEQS = 64
SHORT = 8  # tokens of the requests that complete
LONG = 200  # tokens of the requests that are aborted or cancelled long before their end
PROMPTS = make_prompts([1 + (5 * i) % 23 for i in range(32)], seed=21)


def coordinator_config(path, tp: int, **kwargs) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4,
                        tensor_parallel_size=tp, distributed_executor_backend="ray",
                        num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=MAX_NUM_SEQS,
                        **kwargs)


def open_stream(handle, request: EngineCoreRequest):
    return handle.generate.options(num_returns="streaming").remote(request)


@dataclass
class Result:
    tokens: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    finish: dict[int, str] = field(default_factory=dict)
    beam: BeamSearchOutput | None = None
    num_items: int = 0

    def add(self, item) -> None:
        self.num_items += 1
        if isinstance(item, BeamSearchOutput):
            self.beam = item
            return
        for update in item:
            assert update.index not in self.finish, f"update after the end: {update}"
            self.tokens[update.index].extend(update.new_token_ids)
            if update.finished:
                self.finish[update.index] = update.finish_reason


async def collect(handle, request: EngineCoreRequest) -> Result:
    result = Result()
    async for ref in open_stream(handle, request):
        result.add(await ref)
    return result


async def call(handle, fn, *args):
    """`fn(coordinator, *args)` inside the coordinator actor."""
    return await handle.__ray_call__.remote(fn, *args)


async def _not(awaitable):
    return not await awaitable


async def num_requests(handle, at_most: int) -> bool:
    """Whether the coordinator and its core hold at most `at_most` requests."""
    health, stats = await asyncio.gather(handle.health.remote(), handle.stats.remote())
    return health["num_requests"] <= at_most and stats.num_requests <= at_most


async def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


def _pid_ref(actor):
    """A ref to the pid of `actor`'s process."""
    return actor.__ray_call__.remote(lambda self: __import__("os").getpid())


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_for_exit(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if process_alive(pid)], f"still running among {pids}"


@dataclass
class Replica:
    handle: object
    tp: int
    free_blocks: int


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def replica(request, checkpoint):
    handle = start_coordinator(coordinator_config(checkpoint("llama"), request.param))
    warm = asyncio.run(collect(handle, EngineCoreRequest("warmup", [5, 6, 7], greedy(2))))
    assert warm.finish == {0: "length"}
    yield Replica(handle, request.param, ray.get(handle.free_blocks.remote()))
    stop_coordinator(handle)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """The offline engine (this process, one rank) over the same checkpoint."""
    with make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS) as llm:
        yield llm


def assert_idle(replica: Replica) -> None:
    handle = replica.handle
    health = ray.get(handle.health.remote())
    assert health["healthy"] and health["failure"] is None
    assert health["num_requests"] == 0
    assert ray.get(handle.free_blocks.remote()) == replica.free_blocks
    stats = ray.get(handle.stats.remote())
    assert stats.num_requests == stats.num_running == stats.num_waiting == 0


# ---- many streams, aborts and cancels ----------------------------------------------------------

ROLES = {1: "abort_self", 3: "abort_other", 5: "victim", 7: "cancel"}
"""By index % 8; every other index (and each 'abort_other' for its own request) completes. An
'abort_other' task aborts the request of the 'victim' two indices on."""


@pytest.mark.timeout(180)
def test_concurrent_streams_with_aborts_and_cancels_match_offline_and_transformers(
        replica, offline, hf, checkpoint):
    handle, tp = replica.handle, replica.tp
    roles = [ROLES.get(i % 8, "complete") for i in range(len(PROMPTS))]
    ids = [f"tp{tp}-{i}" for i in range(len(PROMPTS))]
    started = [asyncio.Event() for _ in PROMPTS]  # bound to asyncio.run's loop on first use
    steps_before = ray.get(handle.health.remote())["num_steps"]

    async def task(i: int) -> Result:
        role = roles[i]
        max_tokens = SHORT if role in ("complete", "abort_other") else LONG
        await asyncio.sleep(0.004 * (i % 6))  # arrive while steps run
        stream = open_stream(handle, EngineCoreRequest(ids[i], PROMPTS[i], greedy(max_tokens)))
        result = Result()
        async for ref in stream:
            result.add(await ref)
            if result.num_items == 1:
                started[i].set()
                if role == "abort_other":
                    await started[i + 2].wait()
                    await handle.abort_request.remote(ids[i + 2])
            if result.num_items == 2 and role == "abort_self":
                await handle.abort_request.remote(ids[i])
            if result.num_items == 2 and role == "cancel":
                ray.cancel(stream)  # a Ray stream closes only this way; its request must go
                break
        return result

    async def main():
        results = await asyncio.gather(*(task(i) for i in range(len(PROMPTS))))
        # Long before they could finish (LONG tokens), the cancelled streams' requests are gone.
        await wait_until(lambda: num_requests(handle, 0), 2.0, "cancelled streams' requests "
                         "aborted")
        return results

    results = asyncio.run(main())

    completed = [i for i, role in enumerate(roles) if role in ("complete", "abort_other")]
    cut = [i for i, role in enumerate(roles) if role not in ("complete", "abort_other")]
    prompts = [PROMPTS[i] for i in completed]
    expected = token_ids(offline.generate(prompts, greedy(SHORT), use_tqdm=False))
    assert expected == hf.generate_all(checkpoint("llama"), prompts, SHORT)
    assert [results[i].tokens[0] for i in completed] == expected
    assert all(results[i].finish == {0: "length"} for i in completed)
    # Aborted or cancelled mid-stream: what came is a prefix of the full greedy continuation.
    full = token_ids(offline.generate([PROMPTS[i] for i in cut], greedy(LONG), use_tqdm=False))
    for i, reference in zip(cut, full, strict=True):
        got = results[i].tokens[0]
        assert 1 <= len(got) < LONG // 2 and got == reference[:len(got)], (roles[i], got)
        if roles[i] == "cancel":
            assert results[i].finish == {}
        else:
            assert results[i].finish == {0: "abort"}, roles[i]
    # No request ran on to its LONG tokens (a cancelled stream's request that was not aborted
    # would, and its steps would show here).
    assert ray.get(handle.health.remote())["num_steps"] - steps_before < LONG // 2
    assert_idle(replica)


# ---- beam search and n > 1 in the same steps -----------------------------------------------------

@pytest.mark.timeout(120)
def test_beam_search_and_parallel_sampling_share_steps_with_plain_requests(replica, offline):
    handle, tp = replica.handle, replica.tp
    plain_prompts, sampled_prompts, beam_prompts = PROMPTS[:6], PROMPTS[6:8], PROMPTS[8:11]
    plain, beams = greedy(16), BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    sampled = [SamplingParams(n=2, temperature=0.8, seed=11 + i, max_tokens=16)
               for i in range(len(sampled_prompts))]
    greedy_pair = greedy(16, n=2)
    requests = [EngineCoreRequest(f"mix{tp}-p{i}", p, plain) for i, p in enumerate(plain_prompts)]
    requests += [EngineCoreRequest(f"mix{tp}-n{i}", p, s)
                 for i, (p, s) in enumerate(zip(sampled_prompts, sampled, strict=True))]
    requests.append(EngineCoreRequest(f"mix{tp}-g", PROMPTS[11], greedy_pair))
    requests += [EngineCoreRequest(f"mix{tp}-b{i}", p, beams) for i, p in enumerate(beam_prompts)]
    steps_before = ray.get(handle.health.remote())["num_steps"]

    async def main():
        done = asyncio.Event()

        async def peak_in_flight() -> int:
            peak = 0
            while not done.is_set():
                peak = max(peak, (await handle.health.remote())["num_requests"])
                await asyncio.sleep(0.002)
            return peak

        poller = asyncio.ensure_future(peak_in_flight())
        results = await asyncio.gather(*(collect(handle, r) for r in requests))
        done.set()
        return results, await poller

    results, peak = asyncio.run(main())
    steps = ray.get(handle.health.remote())["num_steps"] - steps_before
    # Every request was in flight at once, and the 16-token requests and 6-token beam searches
    # overlapped: run one after the other they would need at least 16 + 6 steps.
    assert peak == len(requests)
    assert steps < 16 + 6, steps

    expected = token_ids(offline.generate(plain_prompts, plain, use_tqdm=False))
    assert [r.tokens[0] for r in results[:6]] == expected
    assert all(r.finish == {0: "length"} for r in results[:6])
    reference = offline.generate(sampled_prompts + [PROMPTS[11]], [*sampled, greedy_pair],
                                 use_tqdm=False)
    for result, output in zip(results[6:9], reference, strict=True):
        assert result.finish == {0: "length", 1: "length"}
        assert [result.tokens[0], result.tokens[1]] == [c.token_ids for c in output.outputs]
    assert results[8].tokens[0] == results[8].tokens[1]  # greedy n=2: twice the same
    beam_reference = offline.beam_search(beam_prompts, beams)
    for result, output in zip(results[9:], beam_reference, strict=True):
        assert result.num_items == 1 and result.beam is not None
        assert result.beam.prompt_token_ids == output.prompt_token_ids
        assert [s.token_ids for s in result.beam.sequences] == \
            [s.token_ids for s in output.sequences]
        for ours, theirs in zip(result.beam.sequences, output.sequences, strict=True):
            assert ours.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-4)
            assert ours.score == pytest.approx(theirs.score, abs=1e-4)
    assert_idle(replica)


# ---- the batched path ---------------------------------------------------------------------------

def _has_subscriber(coordinator, name):
    return name in coordinator._subscribers


@pytest.mark.timeout(120)
def test_submit_and_stream_batch_every_request_of_a_step(replica, offline):
    handle, tp = replica.handle, replica.tp
    subscriber = f"gateway-{tp}"
    prompts = PROMPTS[:20]
    requests = [EngineCoreRequest(f"sub{tp}-{i}", p, greedy(SHORT)) for i, p in enumerate(prompts)]
    ids = [r.request_id for r in requests]

    async def main():
        stream = handle.stream.options(num_returns="streaming").remote(subscriber)
        await wait_until(lambda: call(handle, _has_subscriber, subscriber), 5.0,
                         "stream() registered its subscriber")
        with pytest.raises(InvalidArgument, match="is already streaming"):
            second = handle.stream.options(num_returns="streaming").remote(subscriber)
            await (await second.__anext__())
        await handle.submit.remote(requests, subscriber)
        batches, tokens, finish = [], defaultdict(list), {}
        async for ref in stream:
            batch = await ref
            if not batch:  # the replica went idle (after an earlier test): only its stats
                continue
            batches.append([request_id for request_id, _ in batch])
            for request_id, updates in batch:
                for update in updates:
                    assert update.request_id == request_id and update.index == 0
                    tokens[request_id].extend(update.new_token_ids)
                    if update.finished:
                        finish[request_id] = update.finish_reason
            if len(finish) == len(requests):
                break
        ray.cancel(stream)  # the subscriber goes with its stream
        await wait_until(lambda: _not(call(handle, _has_subscriber, subscriber)), 5.0,
                         "a cancelled stream() unregisters its subscriber")
        return batches, tokens, finish

    batches, tokens, finish = asyncio.run(main())
    # One submit call queues all 20 before the next step: every step carries all of them.
    assert len(batches) == SHORT
    assert all(sorted(batch) == sorted(ids) for batch in batches)
    expected = token_ids(offline.generate(prompts, greedy(SHORT), use_tqdm=False))
    assert [tokens[i] for i in ids] == expected
    assert set(finish.values()) == {"length"}
    assert_idle(replica)


# ---- bad input through the actor -----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_bad_requests_are_refused_naming_the_field_with_nothing_queued(replica, offline):
    handle, tp = replica.handle, replica.tp
    vocab = ray.get(handle.model_info.remote())["vocab_size"]
    limit = ray.get(handle.model_info.remote())["max_num_seqs"]
    assert limit == MAX_NUM_SEQS
    bad = [
        (EngineCoreRequest("bad", [5, vocab], greedy()), InvalidArgument,
         rf"prompt_token_ids must be integers in \[0, {vocab}\), got \[{vocab}\]"),
        (EngineCoreRequest("bad", [], greedy()), InvalidArgument, "at least one token"),
        (EngineCoreRequest("bad", [5], greedy(stop_token_ids=[vocab + 44])), InvalidArgument,
         "stop_token_ids"),
        (EngineCoreRequest("bad", [5], greedy(n=limit + 1)), InvalidArgument,
         rf"SamplingParams.n must be in \[1, {limit}\]"),
        (EngineCoreRequest("bad", [5], BeamSearchParams(beam_width=limit + 1)), InvalidArgument,
         rf"beam_width must be in \[1, {limit}\]"),
        (EngineCoreRequest("", [5], greedy()), InvalidArgument, "request_id"),
    ]

    async def first_item(request):
        stream = open_stream(handle, request)
        return await (await stream.__anext__())

    async def main():
        for request, error, message in bad:
            with pytest.raises(error, match=message) as raised:
                await first_item(request)
            assert isinstance(raised.value, RayTaskError)
            assert isinstance(raised.value.cause, error)
            assert await handle.free_blocks.remote() == replica.free_blocks
            assert (await handle.health.remote())["num_requests"] == 0
        # A duplicate of a request in flight is refused; the first one runs on untouched.
        original = EngineCoreRequest(f"dup{tp}", PROMPTS[3], greedy(SHORT))
        stream = open_stream(handle, original)
        result = Result()
        result.add(await (await stream.__anext__()))
        with pytest.raises(AlreadyExists, match=f"request id 'dup{tp}' is already in use"):
            await first_item(EngineCoreRequest(f"dup{tp}", [7, 8], greedy()))
        async for ref in stream:
            result.add(await ref)
        return result

    result = asyncio.run(main())
    assert result.tokens[0] == token_ids(offline.generate([PROMPTS[3]], greedy(SHORT),
                                                          use_tqdm=False))[0]
    assert result.finish == {0: "length"}
    assert_idle(replica)


@pytest.mark.timeout(30)
def test_params_of_the_wrong_type_are_refused_naming_the_field(replica):
    handle = replica.handle

    async def main():
        stream = open_stream(handle, EngineCoreRequest("typed", [5], None))
        with pytest.raises(InvalidArgument, match="params must be SamplingParams or "
                                                  "BeamSearchParams, got NoneType"):
            await (await stream.__anext__())

    asyncio.run(main())
    assert_idle(replica)


@pytest.mark.timeout(60)
def test_a_refused_submit_queues_nothing_and_ends_what_it_had_queued_with_abort(replica):
    """A batch is refused as a whole: blocks are untouched, and a request of it queued before
    the bad one ends on the stream with one 'abort' update and no token (submit's docstring)."""
    handle, tp = replica.handle, replica.tp
    subscriber = f"refused-{tp}"
    early, bad = f"rej{tp}-early", f"rej{tp}-bad"
    rejected = [EngineCoreRequest(early, [5, 6], greedy(SHORT)),
                EngineCoreRequest(bad, [5, 10_000], greedy(SHORT))]
    accepted = EngineCoreRequest(f"acc{tp}", [5, 6], greedy(SHORT))

    async def main():
        stream = handle.stream.options(num_returns="streaming").remote(subscriber)
        await wait_until(lambda: call(handle, _has_subscriber, subscriber), 5.0,
                         "stream() registered its subscriber")
        with pytest.raises(InvalidArgument, match=r"prompt_token_ids must be integers in "
                                                  r"\[0, 256\), got \[10000\]"):
            await handle.submit.remote(rejected, subscriber)
        assert await handle.free_blocks.remote() == replica.free_blocks
        assert (await handle.health.remote())["num_requests"] == 0
        await handle.submit.remote([accepted], subscriber)
        seen = defaultdict(list)
        async for ref in stream:
            for request_id, updates in await ref:
                seen[request_id].extend(updates)
            if any(u.finished for u in seen[accepted.request_id]):
                break
        ray.cancel(stream)
        await wait_until(lambda: _not(call(handle, _has_subscriber, subscriber)), 5.0,
                         "a cancelled stream() unregisters its subscriber")
        return seen

    seen = asyncio.run(main())
    assert sorted(seen) == sorted([early, accepted.request_id])
    (update,) = seen[early]
    assert update.finish_reason == "abort" and update.new_token_ids == []
    assert sum(len(u.new_token_ids) for u in seen[accepted.request_id]) == SHORT
    assert_idle(replica)


@pytest.mark.timeout(30)
def test_the_coordinator_process_never_imports_torch(replica):
    handle = replica.handle
    loaded = ray.get(handle.__ray_call__.remote(
        lambda self: sorted(m for m in __import__("sys").modules
                            if m == "torch" or m.startswith("torch."))))
    assert loaded == []
    assert ray.get(handle.__ray_call__.remote(
        lambda self: "torch" in __import__("sys").modules)) is False
    # While its ranks, in their own processes, run torch.
    workers = ray.get(handle.__ray_call__.remote(lambda self: list(self.core.executor.workers)))
    assert len(workers) == replica.tp
    assert all(ray.get([w.__ray_call__.remote(lambda self: "torch" in __import__("sys").modules)
                        for w in workers]))


@pytest.mark.timeout(30)
def test_the_coordinator_tunes_its_collector(replica):
    # Its core and the modules it loaded sit outside the collector's generations (a full
    # collection would scan them every hundred-odd steps), and young collections are spaced
    # out; in its process only, never the driver's.
    frozen, threshold = ray.get(replica.handle.__ray_call__.remote(
        lambda self: (__import__("gc").get_freeze_count(), __import__("gc").get_threshold())))
    assert frozen > 10_000, frozen
    assert threshold[0] == GC_YOUNG_THRESHOLD
    assert gc.get_threshold()[0] != GC_YOUNG_THRESHOLD and gc.get_freeze_count() == 0


# ---- replicas of their own: a killed rank; cancelling the loop's first stream, then shutdown ---

def _workers(handle) -> list:
    return ray.get(handle.__ray_call__.remote(lambda self: list(self.core.executor.workers)))


@pytest.mark.timeout(180)
def test_a_killed_rank_ends_every_stream_and_the_replica_refuses_new_requests(checkpoint):
    """With no restarts allowed (tests/cluster/test_worker_recovery.py covers restarts)."""
    handle = start_coordinator(coordinator_config(checkpoint("llama"), 2, max_worker_restarts=0))
    try:
        free_blocks = ray.get(handle.free_blocks.remote())
        workers = _workers(handle)
        rank_pids = ray.get([_pid_ref(w) for w in workers])

        async def main():
            started = [asyncio.Event() for _ in range(8)]

            async def one(i):
                stream = open_stream(handle, EngineCoreRequest(f"k{i}", PROMPTS[i], greedy(LONG)))
                result = Result()
                try:
                    async for ref in stream:
                        result.add(await ref)
                        started[i].set()
                except Exception as error:
                    return result, error, time.monotonic()
                return result, None, time.monotonic()

            async def subscriber():
                stream = handle.stream.options(num_returns="streaming").remote("gw")
                await wait_until(lambda: call(handle, _has_subscriber, "gw"), 5.0,
                                 "stream() registered its subscriber")
                await handle.submit.remote(
                    [EngineCoreRequest(f"ks{i}", PROMPTS[10 + i], greedy(LONG))
                     for i in range(2)], "gw")
                finish = {}
                try:
                    async for ref in stream:
                        for request_id, item in await ref:
                            if isinstance(item, RequestFailed):
                                finish[request_id] = type(item.error).__name__
                                continue
                            finish.update((request_id, u.finish_reason)
                                          for u in item if u.finished)
                except Exception as error:
                    return finish, error, time.monotonic()
                return finish, None, time.monotonic()

            tasks = [asyncio.ensure_future(one(i)) for i in range(8)]
            batched = asyncio.ensure_future(subscriber())
            for event in started:
                await asyncio.wait_for(event.wait(), 30)
            killed_at = time.monotonic()
            ray.kill(workers[1])
            results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            batch_result = await asyncio.wait_for(batched, 10)
            return killed_at, results, batch_result

        killed_at, results, (finish, batch_error, batch_end) = asyncio.run(main())
        for result, error, ended in results:
            assert 0 < len(result.tokens[0]) < LONG and result.finish == {}
            assert ended - killed_at < 10
            assert isinstance(error, RayTaskError) and isinstance(error, WorkerFailure), error
            assert isinstance(error.cause, WorkerFailure)
            message = str(error.cause)
            assert "a tensor-parallel worker failed" in message
            assert "ActorDiedError" in message and "workers are stopped" in message
        # The subscriber's requests end failed (a gateway answers UNAVAILABLE, so clients
        # retry elsewhere), then its stream raises the failure.
        assert finish == {"ks0": "WorkerFailure", "ks1": "WorkerFailure"}
        assert isinstance(batch_error, WorkerFailure) and batch_end - killed_at < 10

        health = ray.get(handle.health.remote())
        assert health["healthy"] is False and health["num_requests"] == 0
        assert "a tensor-parallel worker failed" in health["failure"]
        assert "killed by `ray.kill`" in health["failure"]
        with pytest.raises(Unavailable, match="this replica stopped serving after: a "
                                              "tensor-parallel worker failed"):
            ray.get(next(open_stream(handle, EngineCoreRequest("late", [5], greedy()))))
        assert ray.get(handle.free_blocks.remote()) == free_blocks
        assert ray.get(handle.stats.remote()).kv_blocks_total == NUM_BLOCKS
        assert _workers(handle) == []  # the surviving rank was stopped too
        wait_for_exit(rank_pids)
    finally:
        stop_coordinator(handle)


@dataclass
class FreshReplica:
    """A TP=2 replica nothing else ran on, and what the cluster held before it started."""

    handle: object
    groups_before: set[str]
    cpus_before: float
    stopped: bool = False


@pytest.fixture(scope="module")
def fresh_replica(checkpoint):
    from ray.util import placement_group_table

    groups_before = set(placement_group_table())
    cpus_before = ray.available_resources().get("CPU", 0)
    fresh = FreshReplica(start_coordinator(coordinator_config(checkpoint("llama"), 2)),
                         groups_before, cpus_before)
    yield fresh
    if not fresh.stopped:
        stop_coordinator(fresh.handle)


@pytest.mark.timeout(180)
def test_cancelling_the_stream_that_started_the_step_loop_leaves_the_replica_serving(
        fresh_replica, offline):
    # The step loop once ran as an asyncio task made inside the first request's actor task: a
    # (recursive) ray.cancel of that stream cancelled the ranks' step calls with it, and the
    # replica stopped serving. Hence a replica whose first stream this is.
    handle = fresh_replica.handle
    assert ray.get(handle.health.remote())["num_steps"] == 0
    free_blocks = ray.get(handle.free_blocks.remote())

    async def main():
        first = open_stream(handle, EngineCoreRequest("first", PROMPTS[0], greedy(LONG)))
        await (await first.__anext__())
        other = asyncio.ensure_future(
            collect(handle, EngineCoreRequest("other", PROMPTS[1], greedy(SHORT + 40))))
        ray.cancel(first)
        await wait_until(lambda: num_requests(handle, 1), 5.0,
                         "the cancelled stream's request aborted")
        return await asyncio.wait_for(other, 60)

    result = asyncio.run(main())
    assert ray.get(handle.health.remote())["healthy"]
    assert result.finish == {0: "length"}
    assert result.tokens[0] == token_ids(
        offline.generate([PROMPTS[1]], greedy(SHORT + 40), use_tqdm=False))[0]
    assert ray.get(handle.free_blocks.remote()) == free_blocks


def _actor_state(actor_id: str) -> str | None:
    try:
        from ray._private import state  # the GCS view; ray.util.state needs the dashboard
    except ImportError:
        return None
    info = state.actors(actor_id)
    return info.get("State") if info else None


@pytest.mark.timeout(180)
def test_drain_and_shutdown_end_streams_and_leave_no_process_or_placement_group(
        fresh_replica, offline):
    from ray.util import placement_group_table

    handle = fresh_replica.handle
    groups = set(placement_group_table()) - fresh_replica.groups_before
    assert len(groups) == 1
    (group,) = groups
    assert placement_group_table()[group]["state"] == "CREATED"
    actors = [handle, *_workers(handle)]
    pids = ray.get([_pid_ref(a) for a in actors])
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert all(_actor_state(a._actor_id.hex()) in ("ALIVE", None) for a in actors)

    async def main():
        quick = await collect(handle, EngineCoreRequest("quick", PROMPTS[2], greedy(SHORT)))
        stream = open_stream(handle, EngineCoreRequest("long", PROMPTS[4], greedy(LONG)))
        result = Result()
        result.add(await (await stream.__anext__()))
        # Draining refuses new requests and waits (here, not long enough) for the rest.
        assert await handle.drain.remote(0.2) is False
        with pytest.raises(Unavailable, match="draining or shut down"):
            await collect(handle, EngineCoreRequest("refused", [5], greedy()))
        health = await handle.health.remote()
        assert health["healthy"] is False and health["num_requests"] == 1
        # Shutdown ends the stream still in flight with Unavailable (not a dead actor).
        fresh_replica.stopped = True
        await asyncio.get_running_loop().run_in_executor(None, stop_coordinator, handle)
        with pytest.raises(Unavailable, match="the replica shut down"):
            async for ref in stream:
                result.add(await ref)
        return quick, result

    quick, long_result = asyncio.run(main())
    assert quick.tokens[0] == token_ids(
        offline.generate([PROMPTS[2]], greedy(SHORT), use_tqdm=False))[0]
    assert 0 < len(long_result.tokens[0]) < LONG

    wait_for_exit(pids)
    deadline = time.monotonic() + 10
    while placement_group_table()[group]["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert placement_group_table()[group]["state"] == "REMOVED"
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.__ray_call__.remote(lambda self: None), timeout=10)
        assert _actor_state(actor._actor_id.hex()) in ("DEAD", None)
    # Every CPU it took is back (at least: an earlier test's may have come back meanwhile).
    while ray.available_resources().get("CPU", 0) < fresh_replica.cpus_before and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0) >= fresh_replica.cpus_before
