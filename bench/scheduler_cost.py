"""Host cost of one decode step at a full batch: the scheduler, the engine core, the step's pickle.

No model and no torch: 256 sequences (prompts of about 512 tokens, block size 16, prefix caching
on, a KV cache big enough that nothing is preempted) are prefilled with fake sampled tokens, then
every step is pure decode. Timed per step, after a warm-up:

- `scheduler`: `Scheduler.schedule()` + `Scheduler.update()`;
- `core`: `EngineCore.schedule()` + `EngineCore.complete()` over a fake executor whose own time
  (making the sampled tokens) is left out: the bookkeeping the coordinator does every step.

Each in two modes: `sync` (a step's update before the next is scheduled) and `overlap` (step N+1
scheduled before step N's update: the engine's default, async scheduling). Then a
`SchedulerOutput` pickle + unpickle round trip of that size (the coordinator ships one to the
ranks every step). `--clock cpu` times with this thread's CPU time instead of the wall clock,
for a machine shared with other work (time spent descheduled is then left out).

    python bench/scheduler_cost.py
    python bench/scheduler_cost.py --num-seqs 256 --steps 500 --json out/scheduler_cost.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEFAULT_GC_THRESHOLD = gc.get_threshold()

from pagedserve.cluster.coordinator_process import tune_collector  # noqa: E402
from pagedserve.config import EngineConfig  # noqa: E402
from pagedserve.engine.core import EngineCore, EngineCoreRequest  # noqa: E402
from pagedserve.sampling_params import SamplingParams  # noqa: E402
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig  # noqa: E402
from pagedserve.scheduler.output import SchedulerOutput, StepResult  # noqa: E402
from pagedserve.scheduler.request import Request  # noqa: E402
from pagedserve.scheduler.scheduler import Scheduler  # noqa: E402

VOCAB = 32000
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def make_prompts(num_seqs: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Distinct random prompts of prompt_len +- 1/8: the sequences fill their blocks on
    different steps, as a real batch does, instead of all hashing a block in the same step."""
    rng = random.Random(seed)
    spread = prompt_len // 8
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(prompt_len - spread,
                                                                prompt_len + spread))]
            for _ in range(num_seqs)]


def fake_sampled(step: SchedulerOutput) -> dict[str, int]:
    """A token for every item that samples; which one does not matter to the host code."""
    return {item.request_id: 7 + item.seq_len % 97 for item in step.scheduled if item.sample}


def num_blocks_for(prompts: list[list[int]], extra_tokens: int) -> int:
    return sum(-(-(len(prompt) + extra_tokens) // BLOCK_SIZE) for prompt in prompts) + 64


def summarize(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"median_ms": statistics.median(ordered),
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": statistics.fmean(ordered)}


# ---- the scheduler alone -------------------------------------------------------------------

def build_scheduler(prompts: list[list[int]], max_tokens: int) -> Scheduler:
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=len(prompts),
                        max_model_len=MAX_MODEL_LEN),
        CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks=num_blocks_for(prompts, max_tokens),
                    enable_prefix_caching=True))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        scheduler.add_request(Request(f"r{index}", list(prompt), params, eos_token_id=2))
    return scheduler


def prefill(scheduler: Scheduler) -> None:
    """Step (synchronously) until every sequence decodes one token per step."""
    while True:
        step = scheduler.schedule()
        scheduler.update(step, fake_sampled(step))
        if len(step.scheduled) == len(scheduler.running) and \
                step.num_batched_tokens == len(step.scheduled):
            return


def settle_heap(coordinator_gc: bool) -> None:
    """Collect what set-up left, under Python's default collector settings; with
    `coordinator_gc`, then as a coordinator runs its steps (`tune_collector`: young collections
    spaced out, the start-up heap frozen out of full collections)."""
    gc.set_threshold(*DEFAULT_GC_THRESHOLD)
    gc.unfreeze()
    if coordinator_gc:
        tune_collector()  # collects, then freezes
    else:
        gc.collect()


def time_scheduler(prompts: list[list[int]], overlap: bool, warmup: int, steps: int,
                   clock, coordinator_gc: bool) -> dict:
    scheduler = build_scheduler(prompts, max_tokens=warmup + steps + 64)
    prefill(scheduler)
    schedule_ms, update_ms = [], []
    in_flight = None
    settle_heap(coordinator_gc)
    for index in range(warmup + steps):
        t0 = clock()
        step = scheduler.schedule()
        t1 = clock()
        done = in_flight if overlap else step
        elapsed_update = 0.0
        if done is not None:
            sampled = fake_sampled(done)
            t2 = clock()
            scheduler.update(done, sampled)
            elapsed_update = clock() - t2
        in_flight = step
        if index >= warmup:
            assert len(step.scheduled) == len(prompts), "a sequence left the batch"
            schedule_ms.append((t1 - t0) * 1e3)
            update_ms.append(elapsed_update * 1e3)
    return {"schedule": summarize(schedule_ms), "update": summarize(update_ms),
            "step": summarize([a + b for a, b in zip(schedule_ms, update_ms, strict=True)]),
            "last_step": step}


# ---- the engine core over a fake executor ---------------------------------------------------

class FakeExecutor:
    """The ranks' side of the step protocol, without a model: an overlapped step's result comes
    back with the next call."""

    failure = None

    def __init__(self, num_gpu_blocks: int) -> None:
        self.num_gpu_blocks = num_gpu_blocks
        self.in_flight: SchedulerOutput | None = None

    def collective(self, method: str, *args):
        if method == "describe":
            return [{"vocab_size": VOCAB, "dtype": "float16", "kv_cache_dtype": "float16",
                     "device": "fake",
                     "eos_token_ids": [2], "block_bytes": 1 << 20,
                     "max_position_embeddings": MAX_MODEL_LEN}]
        if method == "num_gpu_blocks":
            return [self.num_gpu_blocks]
        if method == "num_cpu_blocks":
            return [0]
        return [None]

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        results = []
        if self.in_flight is not None:
            results.append(StepResult(fake_sampled(self.in_flight), step_id=self.in_flight.step_id))
            self.in_flight = None
        if step.overlap:
            self.in_flight = step
        elif not step.is_empty:
            results.append(StepResult(fake_sampled(step), step_id=step.step_id))
        return results


def time_core(prompts: list[list[int]], overlap: bool, warmup: int, steps: int, clock,
              coordinator_gc: bool) -> dict:
    max_tokens = warmup + steps + 64
    executor = FakeExecutor(num_blocks_for(prompts, max_tokens))
    core = EngineCore(EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=8192,
                                   max_num_seqs=len(prompts), block_size=BLOCK_SIZE,
                                   enable_prefix_caching=True, async_scheduling=overlap),
                      executor)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        core.add_request(EngineCoreRequest(f"r{index}", list(prompt), params))
    while True:  # prefill
        step = core.schedule()
        core.complete(step, executor.execute(step))
        if step.num_batched_tokens == len(step.scheduled) == len(prompts):
            break
    schedule_ms, complete_ms = [], []
    settle_heap(coordinator_gc)
    for index in range(warmup + steps):
        t0 = clock()
        step = core.schedule()
        t1 = clock()
        results = executor.execute(step)
        t2 = clock()
        outputs = core.complete(step, results)
        t3 = clock()
        if index >= warmup:
            assert len(outputs.updates) == len(prompts), "a sequence got no token"
            schedule_ms.append((t1 - t0) * 1e3)
            complete_ms.append((t3 - t2) * 1e3)
    return {"schedule": summarize(schedule_ms), "complete": summarize(complete_ms),
            "step": summarize([a + b for a, b in zip(schedule_ms, complete_ms, strict=True)])}


# ---- the step on the wire -------------------------------------------------------------------

def time_pickle(step: SchedulerOutput, repeats: int, clock) -> dict:
    dumps_ms, loads_ms = [], []
    for _ in range(repeats):
        t0 = clock()
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        t1 = clock()
        pickle.loads(data)
        t2 = clock()
        dumps_ms.append((t1 - t0) * 1e3)
        loads_ms.append((t2 - t1) * 1e3)
    return {"bytes": len(data), "dumps": summarize(dumps_ms), "loads": summarize(loads_ms),
            "round_trip": summarize([a + b for a, b in zip(dumps_ms, loads_ms, strict=True)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--pickle-repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-core", action="store_true", help="time the scheduler only")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter; cpu: this thread's CPU time")
    parser.add_argument("--coordinator-gc", action="store_true",
                        help="the collector as a coordinator runs it (tune_collector)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out"),
                                                       "scheduler_cost.json"))
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    prompts = make_prompts(args.num_seqs, args.prompt_len, args.seed)

    rows = {}
    last_step = None
    for overlap in (False, True):
        mode = "overlap" if overlap else "sync"
        timing = time_scheduler(prompts, overlap, args.warmup, args.steps, clock,
                                args.coordinator_gc)
        last_step = timing.pop("last_step")
        rows[f"scheduler_{mode}"] = timing
        if not args.skip_core:
            rows[f"core_{mode}"] = time_core(prompts, overlap, args.warmup, args.steps, clock,
                                             args.coordinator_gc)
    wire = time_pickle(last_step, args.pickle_repeats, clock)

    print(f"{args.num_seqs} decoding sequences, prompts ~{args.prompt_len} tokens, block size "
          f"{BLOCK_SIZE}, prefix caching on; {args.steps} timed steps after {args.warmup} "
          f"({args.clock} clock{', collector as in a coordinator' if args.coordinator_gc else ''})")
    print(f"{'loop':<20}{'phase':<10}{'median ms':>11}{'p90 ms':>9}{'mean ms':>9}")
    for name, timing in rows.items():
        for phase, stats in timing.items():
            print(f"{name:<20}{phase:<10}{stats['median_ms']:>11.3f}{stats['p90_ms']:>9.3f}"
                  f"{stats['mean_ms']:>9.3f}")
    for phase in ("dumps", "loads", "round_trip"):
        stats = wire[phase]
        print(f"{'pickle':<20}{phase:<10}{stats['median_ms']:>11.3f}{stats['p90_ms']:>9.3f}"
              f"{stats['mean_ms']:>9.3f}")
    print(f"SchedulerOutput of {len(last_step.scheduled)} sequences: {wire['bytes']} bytes pickled")

    summary = {"num_seqs": args.num_seqs, "prompt_len": args.prompt_len,
               "block_size": BLOCK_SIZE, "warmup": args.warmup, "steps": args.steps,
               "clock": args.clock, "coordinator_gc": args.coordinator_gc,
               "python": sys.version.split()[0], "machine": os.uname().machine,
               "cpu_count": os.cpu_count(), **rows, "pickle": wire}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
