"""The torch-free `EngineCore` on its own: token ids in, `SequenceUpdate`s out.

Imports without torch, greedy parity with `LLM.generate` (and transformers), abort semantics,
per-request limits, beam search interleaved with plain requests in the same steps, the stats
snapshot, the pool-sized context and a failed model step.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

import pytest

from pagedserve.engine.core import (
    CoreStepError,
    EngineCore,
    EngineCoreOutputs,
    EngineCoreRequest,
    SequenceUpdate,
)
from pagedserve.errors import AlreadyExists, InvalidArgument, InvalidType
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from tests.engine.engine_utils import assert_no_leaks, greedy, make_llm, make_prompts

MAX_NUM_SEQS = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def llm(checkpoint):
    # Synchronous steps: these tests read each step's own outputs (tests/engine/test_overlap.py
    # covers the overlapped loop, whose step() reports the step before).
    return make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS,
                    max_num_seqs=MAX_NUM_SEQS, async_scheduling=False)


@pytest.fixture
def core(llm) -> EngineCore:
    """The shared LLM's core; every test must leave it empty (checked, then cleaned up so one
    failure does not cascade into the next tests)."""
    core = llm.engine.core
    assert not core.has_unfinished_requests()
    yield core
    leftover = sorted([*core._tracked, *core._beams, *core.scheduler.requests])
    for request_id in [*core._tracked, *core._beams]:
        core.abort_request(request_id)
    core._pending.clear()
    assert not leftover, f"test left requests in the core: {leftover}"
    # The memo of sequence owners forgets every sequence that ended, whatever ended it.
    assert core._owners == {} and core._with_cancelled == set()
    assert_no_leaks(llm)


def run_to_end(core: EngineCore, max_steps: int = 200) -> list[EngineCoreOutputs]:
    outputs = []
    while core.has_unfinished_requests():
        assert len(outputs) < max_steps, "core did not finish its requests"
        outputs.append(core.step())
    return outputs


def collect(outputs: list[EngineCoreOutputs]) -> tuple[dict, dict]:
    """(request id, index) -> all new token ids, and -> finish reason (checked to come once,
    on the sequence's last update)."""
    tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
    reasons: dict[tuple[str, int], str] = {}
    for output in outputs:
        for update in output.updates:
            key = (update.request_id, update.index)
            assert key not in reasons, f"update for {key} after it finished"
            assert len(update.new_token_ids) <= 1
            tokens[key].extend(update.new_token_ids)
            if update.finished:
                reasons[key] = update.finish_reason
    return dict(tokens), reasons


# ---- 1. no torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["pagedserve.engine.core", "pagedserve.executor.ray",
                                    "pagedserve.cluster.placement"])
def test_module_imports_without_torch(module):
    code = (
        "import sys\n"
        f"import {module}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'tokenizers') or m == 'pagedserve.workers' "
        "or m.startswith('pagedserve.workers.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# ---- 2. greedy parity -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_core_greedy_equals_generate_and_transformers(n, core, llm, checkpoint, hf):
    path = checkpoint("llama")
    prompts = make_prompts((3, 8, 17), seed=100 + n)
    max_tokens = 7
    for index, prompt in enumerate(prompts):
        core.add_request(EngineCoreRequest(f"core-{index}", prompt, greedy(max_tokens, n=n)))
    outputs = run_to_end(core)
    tokens, reasons = collect(outputs)
    expected_keys = {(f"core-{i}", k) for i in range(len(prompts)) for k in range(n)}
    assert set(tokens) == expected_keys and set(reasons) == expected_keys
    assert set(reasons.values()) == {"length"}
    # Each request is reported first-scheduled exactly once (all three fit the first step).
    assert outputs[0].first_scheduled == ["core-0", "core-1", "core-2"]
    assert all(not o.first_scheduled for o in outputs[1:])
    generated = llm.generate(prompts, greedy(max_tokens, n=n), use_tqdm=False)
    for index, (prompt, output) in enumerate(zip(prompts, generated, strict=True)):
        reference = hf.generate(path, prompt, max_tokens)
        assert len(output.outputs) == n
        for k in range(n):
            assert tokens[(f"core-{index}", k)] == output.outputs[k].token_ids == reference


# ---- 3. aborts ------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["waiting", "decoding", "decoding-n3", "in-flight", "beam"])
def test_abort_whole_request_frees_everything_and_reports_nothing_more(what, core):
    kv = core.scheduler.kv
    free_at_start = kv.num_free_blocks
    seed = {"waiting": 200, "decoding": 201, "decoding-n3": 202, "in-flight": 203,
            "beam": 204}[what]
    victim_prompt, other_prompt = make_prompts((6, 5), seed=seed)
    params = (BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True) if what == "beam"
              else greedy(8, n=3 if what == "decoding-n3" else 1))
    core.add_request(EngineCoreRequest("victim", victim_prompt, params))
    core.add_request(EngineCoreRequest("other", other_prompt, greedy(6)))
    seen: list[EngineCoreOutputs] = []
    if what == "in-flight":  # aborted between the two halves of a step
        seen.append(core.step())
        step = core.schedule()
        assert "victim" in [item.request_id for item in step.scheduled]
        result = core.executor.execute(step)
        core.abort_request("victim")
        seen.append(core.complete(step, result))
        assert [u.request_id for u in seen[-1].updates] == ["other"]
    else:
        if what != "waiting":
            seen += [core.step(), core.step()]
            assert "victim" in {_split(i) for i in core.scheduler.requests}
        core.abort_request("victim")
    assert set(core.scheduler.requests) == {"other"}
    assert set(kv.block_tables) == ({"other"} if seen else set())
    after = run_to_end(core)
    assert all(u.request_id == "other" for o in after for u in o.updates)
    assert all(not o.beam_outputs for o in after)
    tokens, reasons = collect(seen + after)
    assert reasons == {("other", 0): "length"}
    assert len(tokens[("other", 0)]) == 6
    assert not core.has_unfinished_requests()
    assert kv.num_free_blocks == free_at_start == kv.pool.num_blocks


def _split(sequence_id: str) -> str:
    return sequence_id.partition("/")[0]


def test_abort_one_sequence_of_n3(core, checkpoint, hf):
    (prompt,) = make_prompts((5,), seed=210)
    free_at_start = core.scheduler.kv.num_free_blocks
    core.add_request(EngineCoreRequest("q", prompt, greedy(4, n=3)))
    # Step 1 prefills the shared prefix (prompt - 1 tokens) and splits q into q/0..q/2; step 2
    # computes the last prompt token in each and samples their first tokens.
    first = core.step()
    assert first.updates == [] and first.first_scheduled == ["q"]
    assert sorted(core.scheduler.requests) == ["q/0", "q/1", "q/2"]
    second = core.step()
    assert [(u.index, len(u.new_token_ids)) for u in second.updates] == [(0, 1), (1, 1), (2, 1)]
    core.abort_request("q/1")
    core.abort_request("q/1")  # twice: the second is a no-op
    core.abort_request("q/7")  # no such sequence: a no-op
    assert sorted(core.scheduler.requests) == ["q/0", "q/2"]
    assert core.has_unfinished_requests()
    third = core.step()
    assert third.updates[0] == SequenceUpdate("q", 1, finish_reason="abort")
    assert [(u.index, len(u.new_token_ids), u.finish_reason) for u in third.updates[1:]] == [
        (0, 1, None), (2, 1, None)]
    tokens, reasons = collect([first, second, third, *run_to_end(core)])
    reference = hf.generate(checkpoint("llama"), prompt, 4)
    assert reasons == {("q", 0): "length", ("q", 1): "abort", ("q", 2): "length"}
    assert tokens == {("q", 0): reference, ("q", 1): reference[:1], ("q", 2): reference}
    assert not core.has_unfinished_requests()
    assert core.scheduler.kv.num_free_blocks == free_at_start


@pytest.mark.parametrize("bad", [None, 5])
def test_abort_with_a_non_string_id_is_a_type_error(bad, core):
    with pytest.raises(InvalidType, match=f"^request_id must be a string, got "
                                          f"{type(bad).__name__}$") as raised:
        core.abort_request(bad)
    assert isinstance(raised.value, TypeError)
    assert not core.has_unfinished_requests()


def test_abort_of_an_unknown_id_is_a_no_op(core):
    (prompt,) = make_prompts((4,), seed=220)
    for request_id in ("nope", "nope/1", "nope/beam0", ""):
        core.abort_request(request_id)
    assert not core.has_unfinished_requests()
    core.add_request(EngineCoreRequest("known", prompt, greedy(3)))
    core.abort_request("known/0")  # n=1: there is no sequence 'known/0'
    core.abort_request("other")
    tokens, reasons = collect(run_to_end(core))
    assert reasons == {("known", 0): "length"} and len(tokens[("known", 0)]) == 3
    assert not core.has_unfinished_requests()


def test_abort_of_the_request_after_one_of_its_sequences_reports_nothing_more(checkpoint):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS)
    core = llm.engine.core
    (prompt,) = make_prompts((5,), seed=230)
    core.add_request(EngineCoreRequest("q", prompt, greedy(4, n=3)))
    core.step()
    core.step()
    core.abort_request("q/1")
    core.abort_request("q")
    assert core.scheduler.kv.num_free_blocks == NUM_BLOCKS
    assert not core.has_unfinished_requests()
    assert core.step().updates == []


def test_abort_one_sequence_before_the_split(checkpoint):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS)
    core = llm.engine.core
    (prompt,) = make_prompts((5,), seed=231)
    core.add_request(EngineCoreRequest("q", prompt, greedy(3, n=3)))
    core.abort_request("q/1")
    tokens, reasons = collect(run_to_end(core))
    assert reasons == {("q", 0): "length", ("q", 1): "abort", ("q", 2): "length"}
    assert tokens.get(("q", 1), []) == []


# ---- 4. limits and ids ----------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    SamplingParams(n=MAX_NUM_SEQS + 1),
    BeamSearchParams(beam_width=MAX_NUM_SEQS + 1, max_tokens=4),
], ids=["n", "beam_width"])
def test_more_sequences_than_max_num_seqs_are_refused(params, core):
    assert core.limits.max_num_seqs == MAX_NUM_SEQS
    field = "SamplingParams.n" if isinstance(params, SamplingParams) else \
        "BeamSearchParams.beam_width"
    message = f"{field} must be in [1, {MAX_NUM_SEQS}] (max_num_seqs), got {MAX_NUM_SEQS + 1}"
    with pytest.raises(InvalidArgument, match=f"^{re.escape(message)}$"):
        core.add_request(EngineCoreRequest("big", [5, 6, 7], params))
    assert core.scheduler.requests == {}
    assert not core._beams and not core._tracked
    assert not core.has_unfinished_requests()


def test_max_num_seqs_sequences_are_accepted(core):
    core.add_request(EngineCoreRequest("wide", [5, 6, 7], greedy(2, n=MAX_NUM_SEQS)))
    core.add_request(EngineCoreRequest("beams", [5, 6, 8], BeamSearchParams(
        beam_width=MAX_NUM_SEQS, max_tokens=2, ignore_eos=True)))
    outputs = run_to_end(core)
    tokens, reasons = collect(outputs)
    assert reasons == {("wide", k): "length" for k in range(MAX_NUM_SEQS)}
    (beam_output,) = [b for o in outputs for b in o.beam_outputs]
    assert beam_output.request_id == "beams" and len(beam_output.sequences) == MAX_NUM_SEQS


def test_duplicate_request_ids_are_refused(core):
    prompts = make_prompts((4, 6), seed=240)
    core.add_request(EngineCoreRequest("dup", prompts[0], greedy(3)))
    core.add_request(EngineCoreRequest("bdup", prompts[1], BeamSearchParams(
        beam_width=2, max_tokens=3, ignore_eos=True)))
    for request_id, params in [("dup", greedy(3)), ("bdup", greedy(3)),
                               ("dup", BeamSearchParams(beam_width=2, max_tokens=3)),
                               ("bdup", BeamSearchParams(beam_width=2, max_tokens=3))]:
        with pytest.raises(AlreadyExists,
                           match=f"^request id '{request_id}' is already in use$"):
            core.add_request(EngineCoreRequest(request_id, prompts[1], params))
    assert sorted(core.scheduler.requests) == ["bdup/beam0", "dup"]
    outputs = run_to_end(core)
    tokens, reasons = collect(outputs)
    assert reasons == {("dup", 0): "length"} and len(tokens[("dup", 0)]) == 3
    assert [b.request_id for o in outputs for b in o.beam_outputs] == ["bdup"]
    # Once finished, an id may be used again.
    core.add_request(EngineCoreRequest("dup", prompts[0], greedy(2)))
    assert collect(run_to_end(core))[0] == {("dup", 0): tokens[("dup", 0)][:2]}


# ---- 5. beam search interleaved with plain requests ----------------------------------------


def test_beam_search_runs_in_the_same_steps_as_plain_requests(core, llm, checkpoint, hf):
    path = checkpoint("llama")
    beam_prompt, plain_a, plain_b = make_prompts((7, 5, 9), seed=250)
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    core.add_request(EngineCoreRequest("bm", beam_prompt, params))
    core.add_request(EngineCoreRequest("pa", plain_a, greedy(6)))
    core.add_request(EngineCoreRequest("pb", plain_b, greedy(6)))
    mixed_steps, outputs = [], []
    while core.has_unfinished_requests():
        assert len(outputs) < 100
        step = core.schedule()
        ids = [item.request_id for item in step.scheduled]
        beams = [i for i in ids if re.fullmatch(r"bm/beam\d+", i)]
        plain = [i for i in ids if i in ("pa", "pb")]
        assert len(beams) + len(plain) == len(ids) <= MAX_NUM_SEQS
        if beams and plain:
            mixed_steps.append(ids)
        outputs.append(core.complete(step, core.executor.execute(step)))
    # All three were admitted together: the first step prefills bm's first beam and both
    # plain prompts; later steps keep mixing them while the plain requests run.
    assert mixed_steps[0] == ["bm/beam0", "pa", "pb"]
    assert len(mixed_steps) >= 2
    tokens, reasons = collect(outputs)
    assert reasons == {("pa", 0): "length", ("pb", 0): "length"}
    assert tokens[("pa", 0)] == hf.generate(path, plain_a, 6)
    assert tokens[("pb", 0)] == hf.generate(path, plain_b, 6)
    (together,) = [b for o in outputs for b in o.beam_outputs]
    (alone,) = llm.beam_search(beam_prompt, params)
    assert together.request_id == "bm" and together.prompt_token_ids == beam_prompt
    assert len(together.sequences) == 3
    assert [s.token_ids for s in together.sequences] == [s.token_ids for s in alone.sequences]
    for mine, theirs in zip(together.sequences, alone.sequences, strict=True):
        assert mine.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-5)
        assert mine.score == pytest.approx(theirs.score, abs=1e-5)


# ---- 6. stats -------------------------------------------------------------------------------


def test_stats_prefix_cache_counts(checkpoint):
    """block_size 4, prompt of 9 tokens, prefix caching on (the default), fresh counters.

    Step 1: 'a' admitted, its 9 prompt tokens looked up (queries 9, hits 0) and computed in 3
    blocks (positions 0-7 fill blocks 0-1, position 8 starts block 2); blocks 0-1 are full and
    indexed after the step. Step 2: 'b' with the same prompt looks up 9 more tokens (18) and
    finds blocks 0-1 (8 tokens; the last prompt token is never a hit: its logits are needed),
    so it takes one new block for position 8 while 'a' writes position 9 into its block 2:
    3 + 1 = 4 blocks in use. When both finish every block is free (cached ones count as free).
    'c' then finds the same 8 tokens (queries 27, hits 16): 'a' computed 11 tokens (9 + the
    first 2 of its 3 outputs), so its block 2 never filled and holds no hash. 'd' with a cache
    salt finds nothing (queries 36, hits 16).
    """
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS,
                   async_scheduling=False)  # prefix hits exactly as in lockstep steps
    core = llm.engine.core
    (prompt,) = make_prompts((9,), seed=260)
    start = core.stats()
    assert (start.num_running, start.num_waiting, start.num_requests, start.kv_blocks_used,
            start.kv_blocks_total, start.prefix_cache_queries, start.prefix_cache_hits,
            start.step_tokens, start.step_seconds) == (0, 0, 0, 0, NUM_BLOCKS, 0, 0, 0, 0.0)
    core.add_request(EngineCoreRequest("a", prompt, greedy(3)))
    stats = core.step().stats
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used, stats.step_tokens,
            stats.prefix_cache_queries, stats.prefix_cache_hits) == (1, 0, 3, 9, 9, 0)
    core.add_request(EngineCoreRequest("b", prompt, greedy(3)))
    second = core.step()
    stats = second.stats
    assert (stats.num_running, stats.num_requests, stats.kv_blocks_used, stats.step_tokens,
            stats.prefix_cache_queries, stats.prefix_cache_hits) == (2, 2, 4, 1 + 1, 18, 8)
    assert stats.kv_cache_usage == 4 / NUM_BLOCKS
    assert {u.request_id: u.num_cached_tokens for u in second.updates} == {"a": 0, "b": 8}
    outputs = run_to_end(core)
    stats = outputs[-1].stats
    assert (stats.num_running, stats.num_requests, stats.kv_blocks_used,
            stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0, 0, 18, 8)
    core.add_request(EngineCoreRequest("c", prompt, greedy(3)))
    stats = run_to_end(core)[0].stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.step_tokens) == (27, 16, 1)
    core.add_request(EngineCoreRequest("d", prompt, greedy(3), cache_salt="salt"))
    stats = run_to_end(core)[0].stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.step_tokens) == (36, 16, 9)
    assert_no_leaks(llm)


def test_stats_through_a_preemption(checkpoint, hf):
    """4 blocks of 4 tokens (max_model_len 16), prefix caching off, prompts A and B of 4 tokens,
    8 greedy outputs each (A arrives first). Step k >= 2 computes position k + 2 of each.

    1: both prompts, 1 block each (2 used, 8 tokens). 2: position 4 opens a block each (4).
    3-5: positions 5-7. 6: A's position 8 needs a 5th block: B (the newest) is preempted by
    recompute (its 2 blocks freed, num_preemptions 1, B waits) and A takes a block (3 used);
    no admission in a step that preempted. 7: B (4 prompt + 5 outputs = 9 tokens, 3 blocks)
    does not fit the one free block. 8: A samples its 8th token and finishes (0 used; B still
    waits: admission ran before A let go). 9: B recomputes its 9 tokens (3 blocks). 10-11: B's
    7th and 8th tokens; B finishes.
    """
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=4, enable_prefix_caching=False,
                   async_scheduling=False)
    core = llm.engine.core
    assert core.max_model_len == 16
    prompts = make_prompts((4, 4), seed=270)
    core.add_request(EngineCoreRequest("A", prompts[0], greedy(8)))
    core.add_request(EngineCoreRequest("B", prompts[1], greedy(8)))
    outputs = run_to_end(core)
    rows = [(s.num_running, s.num_waiting, s.num_requests, s.kv_blocks_used, s.num_preemptions,
             s.step_tokens) for s in (o.stats for o in outputs)]
    assert rows == [
        (2, 0, 2, 2, 0, 8),
        (2, 0, 2, 4, 0, 2),
        (2, 0, 2, 4, 0, 2),
        (2, 0, 2, 4, 0, 2),
        (2, 0, 2, 4, 0, 2),
        (1, 1, 2, 3, 1, 1),
        (1, 1, 2, 3, 1, 1),
        (0, 1, 1, 0, 1, 1),
        (1, 0, 1, 3, 1, 9),
        (1, 0, 1, 3, 1, 1),
        (0, 0, 0, 0, 1, 1),
    ]
    assert all(o.stats.kv_blocks_total == 4 for o in outputs)
    assert all((o.stats.prefix_cache_queries, o.stats.prefix_cache_hits) == (0, 0)
               for o in outputs)
    assert [u.num_preemptions for o in outputs for u in o.updates if u.request_id == "B"] == \
        [0] * 5 + [1] * 3
    tokens, reasons = collect(outputs)
    assert reasons == {("A", 0): "length", ("B", 0): "length"}
    assert tokens == {("A", 0): hf.generate(path, prompts[0], 8),
                      ("B", 0): hf.generate(path, prompts[1], 8)}
    assert_no_leaks(llm)


def test_stats_prefix_cache_hits_never_exceed_queries(checkpoint):
    """4 blocks; A and B have 1-token prompts (queries 2). At step 9 A's position 8 needs a 5th
    block: B (8 tokens computed, blocks 0-1 full and indexed) is preempted, A takes B's last
    block and finishes in that step. Re-admitted, B (prompt 1 + 8 outputs) finds its block 0:
    4 hits against 1 more queried prompt token, so hits 4 > queries 3."""
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=4)
    core = llm.engine.core
    prompts = make_prompts((1, 1), seed=2)
    core.add_request(EngineCoreRequest("A", prompts[0], greedy(9)))
    core.add_request(EngineCoreRequest("B", prompts[1], greedy(12)))
    outputs = run_to_end(core)
    assert outputs[-1].stats.num_preemptions == 1
    for output in outputs:
        assert output.stats.prefix_cache_hits <= output.stats.prefix_cache_queries


# ---- 7. the pool-sized context --------------------------------------------------------------


def test_default_context_shrinks_to_the_pool(checkpoint):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=8)
    core = llm.engine.core
    assert core.max_model_len == 8 * 4 == core.scheduler.config.max_model_len
    assert llm.engine.model_info()["max_model_len"] == 32
    core.limits.check_prompt(list(range(3, 34)))  # 31 tokens: room for one output token
    with pytest.raises(InvalidArgument, match=re.escape(
            "prompt has 32 tokens; it must be shorter than max_model_len (32)")):
        core.add_request(EngineCoreRequest("long", list(range(3, 35)), greedy(1)))
    assert not core.has_unfinished_requests()
    # An explicit max_model_len that fits exactly is kept.
    assert make_llm(checkpoint("llama"), num_gpu_blocks_override=8,
                    max_model_len=32).engine.core.max_model_len == 32


def test_explicit_context_larger_than_the_pool_is_refused(checkpoint):
    message = ("EngineConfig.max_model_len=33 does not fit the KV cache, which holds 32 tokens "
               "(8 blocks); lower max_model_len to at most 32, or give the KV cache more memory")
    with pytest.raises(InvalidArgument, match=f"^{re.escape(message)}$"):
        make_llm(checkpoint("llama"), num_gpu_blocks_override=8, max_model_len=33)


# ---- 8. a failed step -----------------------------------------------------------------------


def _fail_once(monkeypatch, core: EngineCore) -> list[list[str]]:
    """Make the next executor.execute raise RuntimeError('device lost'); returns the ids of the
    step it refused."""
    real = core.executor.execute
    refused: list[list[str]] = []

    def execute(step):
        if not refused:
            refused.append([item.request_id for item in step.scheduled])
            raise RuntimeError("device lost")
        return real(step)

    monkeypatch.setattr(core.executor, "execute", execute)
    return refused


def test_failed_step_aborts_its_requests_and_the_core_keeps_serving(core, monkeypatch,
                                                                     checkpoint, hf):
    path = checkpoint("llama")
    kv = core.scheduler.kv
    a, b, d, e = make_prompts((5, 6, 7, 8), seed=280)
    core.add_request(EngineCoreRequest("a", a, greedy(6)))
    core.add_request(EngineCoreRequest("b", b, greedy(6, n=2)))
    first = core.step()  # a's first token; b's shared prefill, then b/0 and b/1
    assert [u.request_id for u in first.updates] == ["a"]
    core.add_request(EngineCoreRequest("d", d, greedy(6)))
    core.add_request(EngineCoreRequest("e", e, greedy(6)))  # over max_num_seqs: waits
    refused = _fail_once(monkeypatch, core)
    with pytest.raises(CoreStepError, match="^model step failed: device lost$") as raised:
        core.step()
    assert refused == [["a", "b/0", "b/1", "d"]]
    error = raised.value
    assert isinstance(error.__cause__, RuntimeError) and error.grpc_status == "INTERNAL"
    assert sorted((u.request_id, u.index) for u in error.updates) == [
        ("a", 0), ("b", 0), ("b", 1), ("d", 0)]
    assert all(u == SequenceUpdate(u.request_id, u.index, finish_reason="abort")
               for u in error.updates)
    # Their blocks are back; only 'e' (not in the step) is left, still waiting.
    assert list(core.scheduler.requests) == ["e"] and not kv.block_tables
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert core.num_requests == 1
    core.add_request(EngineCoreRequest("f", a, greedy(6)))
    tokens, reasons = collect(run_to_end(core))
    assert reasons == {("e", 0): "length", ("f", 0): "length"}
    assert tokens == {("e", 0): hf.generate(path, e, 6), ("f", 0): hf.generate(path, a, 6)}


def test_failed_step_during_the_shared_prefill_ends_every_sequence(checkpoint, monkeypatch):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=NUM_BLOCKS)
    core = llm.engine.core
    (prompt,) = make_prompts((6,), seed=290)
    core.add_request(EngineCoreRequest("q", prompt, greedy(3, n=3)))
    refused = _fail_once(monkeypatch, core)
    with pytest.raises(CoreStepError) as raised:
        core.step()
    assert refused == [["q"]]
    assert core.scheduler.kv.num_free_blocks == NUM_BLOCKS
    assert sorted((u.request_id, u.index, u.finish_reason) for u in raised.value.updates) == [
        ("q", 0, "abort"), ("q", 1, "abort"), ("q", 2, "abort")]


def test_failed_step_ends_a_beam_search_in_it(core, monkeypatch, checkpoint, hf):
    """A beam search has no SequenceUpdates: a failed step drops it (blocks freed, no beam
    output), and the next requests run normally."""
    beam_prompt, plain = make_prompts((6, 7), seed=295)
    core.add_request(EngineCoreRequest("bm", beam_prompt, BeamSearchParams(
        beam_width=2, max_tokens=4, ignore_eos=True)))
    core.step()
    core.step()
    refused = _fail_once(monkeypatch, core)
    with pytest.raises(CoreStepError) as raised:
        core.step()
    assert refused and all(re.fullmatch(r"bm/beam\d+", i) for i in refused[0])
    assert raised.value.updates == []
    assert not core.has_unfinished_requests() and not core.scheduler.requests
    assert core.scheduler.kv.num_free_blocks == core.scheduler.kv.pool.num_blocks
    core.add_request(EngineCoreRequest("after", plain, greedy(4)))
    outputs = run_to_end(core)
    assert collect(outputs)[0] == {("after", 0): hf.generate(checkpoint("llama"), plain, 4)}
    assert all(not o.beam_outputs for o in outputs)
