"""The gateway's two fronts, gRPC and OpenAI HTTP, with the gateway as the bottleneck: a stub
coordinator that makes tokens as fast as the gateway takes them (no engine, no Ray;
`--step-ms` paces it like an engine instead) feeds the real `Gateway`, its gRPC server and its
OpenAI HTTP server (uvicorn, as `pagedserve serve` runs them) in a process of their own, and
the load generator streams the same requests through each front in turn: GenerateStream, then
streaming /v1/completions (`ignore_eos`, no tokenizer: token ids only, as bench/serving.py's
random-weight runs).

Per front it reports output tokens/s and the gateway's CPU time per output token: of its main
thread, the event loop that runs every front's Python (what bounds the gateway, and what a busy
machine changes least), and of the whole process (gRPC's C-core threads add theirs, outside the
GIL). The load generator runs in a process of its own: its loop's CPU per token shows whether
the client is the limiter. Also when the requests of the burst reached the coordinator (the
last one: how long admission takes) and TTFT.

    python bench/gateway_fronts.py              # 256 x (512 -> 128) tokens, 3 rounds
    python bench/gateway_fronts.py --num-requests 512 --output-len 64 --json out/fronts.json
    python bench/gateway_fronts.py --step-ms 25   # an engine's pace: both fronts keep up?
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from pagedserve.protos.v1 import coordinator_pb2 as cpb  # noqa: E402
from pagedserve.protos.v1 import coordinator_pb2_grpc  # noqa: E402
from pagedserve.protos.v1 import generation_pb2 as pb  # noqa: E402

READY = "ready "
VOCAB = 32000
MAX_MODEL_LEN = 4096


# ---- the stub coordinator ---------------------------------------------------------------------

class StubCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Every step gives each running sequence one token (id 7) until max_tokens; up to
    `max_num_seqs` sequences run, the rest wait. A step is sent as soon as the previous one
    was written (flow control is the only pace)."""

    def __init__(self, max_num_seqs: int, step_ms: float, arrivals: str | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.arrivals = open(arrivals, "a", buffering=1) if arrivals else None  # noqa: SIM115
        self.step_s = step_ms / 1e3
        self.waiting: list[list] = []   # [request_id, index, remaining] per sequence
        self.running: list[list] = []
        self.wake = asyncio.Event()

    async def AddRequests(self, request, context):
        if self.arrivals is not None:
            self.arrivals.write(f"{time.time()} {len(request.requests)}\n")
        for core in request.requests:
            n = core.sampling.n if core.sampling.HasField("n") else 1
            for index in range(n):
                self.waiting.append([core.request_id, index, core.sampling.max_tokens])
        self.wake.set()
        return cpb.AddRequestsResponse()

    async def Subscribe(self, request, context):
        while True:
            while not (self.running or self.waiting):
                self.wake.clear()
                await self.wake.wait()
            room = self.max_num_seqs - len(self.running)
            if room > 0 and self.waiting:
                self.running += self.waiting[:room]
                del self.waiting[:room]
            batch = cpb.StepBatch(step_time=time.monotonic())
            updates = batch.updates
            still = []
            for sequence in self.running:
                sequence[2] -= 1
                update = updates.add(request_id=sequence[0], index=sequence[1],
                                     new_token_ids=[7])
                if sequence[2] <= 0:
                    update.finish_reason = pb.FINISH_REASON_LENGTH
                else:
                    still.append(sequence)
            self.running = still
            yield batch
            if self.step_s:
                await asyncio.sleep(self.step_s)

    async def AbortRequests(self, request, context):
        gone = set(request.request_ids)
        self.waiting = [s for s in self.waiting if s[0] not in gone]
        self.running = [s for s in self.running if s[0] not in gone]
        return pb.AbortResponse(aborted_request_ids=request.request_ids)

    async def GetLoad(self, request, context):
        return pb.ServerLoad(num_running=len(self.running), num_waiting=len(self.waiting))

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="stub", max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB,
                            eos_token_ids=[2], tensor_parallel_size=1, block_size=16,
                            num_kv_blocks=1 << 16, dtype="bfloat16",
                            max_num_seqs=self.max_num_seqs, num_replicas=1)

    async def GetStats(self, request, context):
        return cpb.EngineSnapshot()

    async def GetGpuTelemetry(self, request, context):
        return cpb.GpuTelemetry()


async def _stub_main(args) -> None:
    server = grpc.aio.server()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
        StubCoordinator(args.max_num_seqs, args.step_ms, args.arrivals), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{READY}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# ---- the gateway (what `pagedserve serve` runs in the launching process) ----------------------

async def _gateway_main(args) -> None:
    from pagedserve.cluster.gateway import Gateway
    from pagedserve.cluster.grpc_common import SERVER_OPTIONS
    from pagedserve.cluster.openai_server import OpenAIHttpServer
    from pagedserve.protos.v1 import generation_pb2_grpc

    gateway = Gateway("stub", None, [args.coordinator], max_queue_per_replica=1 << 20)
    await gateway.start()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    generation_pb2_grpc.add_GenerationServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    http = OpenAIHttpServer(gateway, [], "127.0.0.1", 0)
    base_url = await http.start()
    protocol = http.config.http_protocol_class.__module__.rpartition(".")[2]  # h11_impl...
    print(f"{READY}127.0.0.1:{port} {base_url}/v1 {protocol}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if args.profile:
        import cProfile

        profile = cProfile.Profile(time.thread_time)  # CPU time: a busy machine adds none
        profile.enable()
    await stop.wait()
    if args.profile:
        profile.disable()
        profile.dump_stats(args.profile)
    await http.stop(1.0)
    await server.stop(1.0)
    await gateway.close()


# ---- the load (its own process) ----------------------------------------------------------------

def _load_main(args) -> None:
    from pagedserve.cluster.load_generator import run_load, run_openai_load

    rng = random.Random(0)
    prompts = [[rng.randrange(10, VOCAB - 10) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]
    started = time.time()
    lengths = [args.output_len] * args.num_requests
    cpu_before, loop_before = os.times(), time.thread_time()  # after the imports
    if args.front == "grpc":
        run = asyncio.run(run_load(args.target, prompts, lengths, math.inf, 0))
    else:
        run = asyncio.run(run_openai_load(args.target, "stub", prompts, lengths, math.inf, 0,
                                          lambda max_tokens: {"ignore_eos": True}))
    cpu_after = os.times()
    run["client_loop_cpu_s"] = time.thread_time() - loop_before  # the event loop's thread
    run["client_cpu_s"] = (cpu_after.user + cpu_after.system
                           - cpu_before.user - cpu_before.system)
    run["started"] = started
    print(json.dumps(run), flush=True)


# ---- the driver ------------------------------------------------------------------------------

def _start(role_args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([sys.executable, __file__, *role_args], stdout=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        if line.startswith(READY):
            return process, line[len(READY):].split()
    raise SystemExit(f"{role_args[:2]} exited before it was ready ({process.wait()})")


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process (all its threads), or of one of its threads (Linux)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one(front: str, target: str, gateway_pid: int, args) -> dict:
    loop_before, process_before = _cpu_s(gateway_pid, gateway_pid), _cpu_s(gateway_pid)
    Path(args.arrivals).write_text("")
    result = subprocess.run([sys.executable, __file__, "--role", "load", "--front", front,
                             "--target", target, "--num-requests", str(args.num_requests),
                             "--input-len", str(args.input_len),
                             "--output-len", str(args.output_len)],
                            check=True, capture_output=True, text=True)
    run = json.loads(result.stdout.strip().splitlines()[-1])
    # The gateway's main thread runs its event loop: every front's Python work, what bounds
    # it; the process adds gRPC's own threads (C-core, outside the GIL).
    run["gateway_loop_cpu_s"] = _cpu_s(gateway_pid, gateway_pid) - loop_before
    run["gateway_cpu_s"] = _cpu_s(gateway_pid) - process_before
    started = run.pop("started")
    arrivals = sorted(float(line.split()[0]) - started
                      for line in Path(args.arrivals).read_text().splitlines()
                      for _ in range(int(line.split()[1])))
    # When the requests reached the coordinator, from the load's start (what the engine
    # waits for).
    run["admitted_p50_ms"] = 1e3 * arrivals[len(arrivals) // 2]
    run["admitted_max_ms"] = 1e3 * arrivals[-1]
    for name in ("gateway_loop", "gateway", "client_loop", "client"):
        run[f"{name}_cpu_us_per_token"] = 1e6 * run[f"{name}_cpu_s"] / run["output_tokens"]
    return run


SUMMARY = ("output_throughput", "gateway_loop_cpu_us_per_token", "gateway_cpu_us_per_token",
           "client_loop_cpu_us_per_token", "admitted_max_ms", "median_ttft_ms",
           "median_tpot_ms")


def _line(run: dict) -> str:
    return (f"{run['output_throughput']:>8,.0f} out tok/s; gateway CPU per token: loop "
            f"{run['gateway_loop_cpu_us_per_token']:5.1f} us (process "
            f"{run['gateway_cpu_us_per_token']:5.1f}); client loop "
            f"{run['client_loop_cpu_us_per_token']:5.1f} us; last admitted "
            f"{run['admitted_max_ms']:5.0f} ms; ttft p50 {run['median_ttft_ms']:5.0f} ms; "
            f"tpot p50 {run['median_tpot_ms']:5.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "stub", "gateway", "load"),
                        default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--front", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--arrivals", help=argparse.SUPPRESS)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="the stub's pause between steps (0: as fast as the gateway reads)")
    parser.add_argument("--rounds", type=int, default=3, help="gRPC then HTTP, this many times")
    parser.add_argument("--fronts", default="grpc,openai")
    parser.add_argument("--profile", default=None,
                        help="write the gateway's cProfile stats here (slows it down)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.role == "stub":
        return asyncio.run(_stub_main(args))
    if args.role == "gateway":
        return asyncio.run(_gateway_main(args))
    if args.role == "load":
        return _load_main(args)

    handle, args.arrivals = tempfile.mkstemp(prefix="gateway-fronts-", suffix=".txt")
    os.close(handle)
    stub, (coordinator,) = _start(["--role", "stub", "--max-num-seqs", str(args.max_num_seqs),
                                   "--step-ms", str(args.step_ms), "--arrivals", args.arrivals])
    gateway = None
    try:
        gateway_args = ["--role", "gateway", "--coordinator", coordinator]
        if args.profile:
            gateway_args += ["--profile", args.profile]
        gateway, (grpc_address, base_url, http_impl) = _start(gateway_args)
        print(f"uvicorn HTTP protocol: {http_impl}", flush=True)
        targets = {"grpc": grpc_address, "openai": base_url}
        fronts = args.fronts.split(",")
        _one(fronts[0], targets[fronts[0]], gateway.pid, args)  # warm-up
        runs: dict[str, list[dict]] = {front: [] for front in fronts}
        for round_index in range(args.rounds):
            for front in fronts:
                run = _one(front, targets[front], gateway.pid, args)
                runs[front].append(run)
                print(f"round {round_index} {front:>6}: {_line(run)}, failed {run['failed']}",
                      flush=True)
    finally:
        for process in (gateway, stub):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        os.unlink(args.arrivals)
    report = {"args": vars(args), "uvicorn_http": http_impl, "runs": runs, "median": {
        front: {key: statistics.median(run[key] for run in front_runs) for key in SUMMARY}
        for front, front_runs in runs.items()}}
    for front, median in report["median"].items():
        print(f"median {front:>6}: {_line(median)}")
    if {"grpc", "openai"} <= set(runs):
        grpc_median, http_median = report["median"]["grpc"], report["median"]["openai"]
        report["http_over_grpc_throughput"] = (http_median["output_throughput"]
                                               / grpc_median["output_throughput"])
        report["http_over_grpc_loop_cpu"] = (http_median["gateway_loop_cpu_us_per_token"]
                                             / grpc_median["gateway_loop_cpu_us_per_token"])
        print(f"HTTP / gRPC: throughput {report['http_over_grpc_throughput']:.3f}x, gateway "
              f"loop CPU per token {report['http_over_grpc_loop_cpu']:.3f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
