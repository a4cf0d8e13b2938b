"""Metrics, request logs and `pagedserve status` of the served system (real Ray, real gRPC on
127.0.0.1): after a known workload the token counters equal the tokens sent and generated,
every request is counted once in the histograms and logged once, the engine gauges fall back
to zero when the replica is idle, a CPU replica shows no GPU metrics, and `pagedserve status`
reports the replica."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest

from pagedserve.cli import main
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import collect_stream, ids_request, started_server, wait_until
from tests.helpers.prometheus_text import parse_samples, value

pytestmark = pytest.mark.timeout(120)

NUM_BLOCKS = 256
STREAMED = [([3 + i] * (4 + i), 3 + i) for i in range(4)]
"""(prompt, max_tokens) of the streamed requests."""


@pytest.fixture(scope="module")
def served(aio, ray_cluster, tiny_checkpoint):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=NUM_BLOCKS,
                          max_num_seqs=16, cpu_threads=1)
    with started_server(aio, config) as server:
        yield server


def scrape(aio, server) -> dict:
    """The gateway's /metrics, rendered on its own loop (nothing races the collectors)."""
    async def render():
        return server.gateway.metrics.render()

    body, content_type = aio.run(render())
    assert content_type.startswith("text/plain")
    return parse_samples(body)


def labels(server) -> dict[str, str]:
    return {"model_name": server.gateway.model_name, "replica": "0"}


def wait_until_idle(aio, server) -> dict:
    """The samples once the idle snapshot brought every engine gauge back to zero."""
    names = ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
             "kv_cache_usage_perc")
    found = {}

    def idle() -> bool:
        found["samples"] = samples = scrape(aio, server)
        return all(value(samples, f"pagedserve:{name}", **labels(server)) == 0
                   for name in names)

    assert wait_until(idle, timeout=15.0), "the engine gauges did not fall back to zero"
    return found["samples"]


class Delta:
    """Differences between two scrapes, for one label set."""

    def __init__(self, before: dict, after: dict, server) -> None:
        self.before, self.after, self.labels = before, after, labels(server)

    def __call__(self, name: str, **extra: str) -> float:
        def get(samples):
            return value(samples, f"pagedserve:{name}", **self.labels, **extra) or 0.0
        return get(self.after) - get(self.before)


def test_a_known_workload_is_counted_exactly_and_gauges_return_to_zero(aio, served, caplog):
    before = scrape(aio, served)

    async def workload():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            streams = [collect_stream(stub.GenerateStream(pb.GenerateRequest(
                request_id=f"stream-{i}", token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                           temperature=0.0)))) for i, (prompt, max_tokens)
                       in enumerate(STREAMED)]
            two = stub.Generate(pb.GenerateRequest(
                request_id="two", token_ids=pb.TokenIds(ids=[9, 10, 11]),
                sampling=pb.SamplingParams(n=2, max_tokens=4, ignore_eos=True, seed=1)))
            beam = stub.Generate(pb.GenerateRequest(
                request_id="beam", token_ids=pb.TokenIds(ids=[12, 13, 14]),
                beam_search=pb.BeamSearchParams(beam_width=2, max_tokens=3)))
            results = await asyncio.gather(*streams, two, beam)
        return [final for _, final in results[:4]] + list(results[4:])

    with caplog.at_level(logging.INFO, logger="pagedserve.requests"):
        finals = aio.run(workload())
        after = wait_until_idle(aio, served)
    delta = Delta(before, after, served)
    prompt_tokens = sum(f.usage.prompt_tokens for f in finals)
    generated = sum(f.usage.completion_tokens for f in finals)
    assert (prompt_tokens, generated) == (4 + 5 + 6 + 7 + 3 + 3, 3 + 4 + 5 + 6 + 8 + 6)
    assert delta("prompt_tokens_total") == prompt_tokens
    assert delta("generation_tokens_total") == generated
    assert delta("request_success_total", finished_reason="length") == 6
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert delta(f"{name}_count") == 6, name
    assert delta("request_prompt_tokens_sum") == prompt_tokens
    assert delta("request_generation_tokens_sum") == generated
    # Beam search reports no per-step tokens: no queue, prefill or decode time of its own.
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds"):
        assert delta(f"{name}_count") == 5, name
    # One gap per token after a sequence's first: 2 + 3 + 4 + 5 streamed, 3 + 3 for n = 2.
    assert delta("inter_token_latency_seconds_count") == 20
    import ray

    handle = served.coordinators[0]
    steps = ray.get(handle.step_log.remote(), timeout=30)
    stats = ray.get(handle.stats.remote(), timeout=30)
    own = labels(served)
    assert value(after, "pagedserve:iteration_tokens_total_count", **own) == sum(
        1 for step in steps if step[2] > 0)  # every step that ran a sequence, once
    assert value(after, "pagedserve:prefix_cache_queries_total", **own) == \
        stats.prefix_cache_queries
    assert value(after, "pagedserve:num_preemptions_total", **own) == 0
    assert not [name for name, _ in after if name.startswith("pagedserve:gpu_")]
    logged = sorted(r.request["request_id"] for r in caplog.records
                    if r.name == "pagedserve.requests")
    assert logged == ["beam", "stream-0", "stream-1", "stream-2", "stream-3", "two"]


def test_a_cancelled_stream_counts_once_as_abort(aio, served):
    before = scrape(aio, served)

    async def cancel_after_first_token():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.GenerateStream(ids_request([5, 6, 7], max_tokens=500, ignore_eos=True))
            first = await call.read()
            call.cancel()
            return first

    assert aio.run(cancel_after_first_token()).WhichOneof("event") == "delta"
    # The gateway lets go of the request once the cancellation reaches it.
    assert wait_until(lambda: Delta(before, scrape(aio, served), served)(
        "request_success_total", finished_reason="abort") == 1, timeout=15.0)
    delta = Delta(before, wait_until_idle(aio, served), served)
    assert delta("request_success_total", finished_reason="abort") == 1
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("prompt_tokens_total") == 3


def test_pagedserve_status_reports_the_replica(aio, served, capsys):
    async def one_request():
        async with grpc.aio.insecure_channel(served.address) as channel:
            await generation_pb2_grpc.GenerationStub(channel).Generate(
                ids_request([5, 6], max_tokens=2, ignore_eos=True))

    aio.run(one_request())
    wait_until_idle(aio, served)
    coordinator = served.gateway.replicas[0].address
    assert main(["status", "--url", served.address]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == (f"pagedserve at {served.address}: model {served.gateway.model_name}, "
                       "1 of 1 replicas up")
    assert text[1] == "requests: 0 running, 0 waiting, 0 swapped; 0 in flight at the gateway " \
                      "(limit 1024)"
    assert text[2] == f"KV cache: 0.0% (0 of {NUM_BLOCKS} blocks); 0 preemptions"
    assert text[5].split() == ["replica", "up", "address", "running", "waiting", "swapped", "in",
                               "flight", "KV", "cache"]
    assert text[6].split() == ["0", "yes", coordinator, "0", "0", "0", "0", "0.0%"]
    assert text[-1] == "GPUs: none reported (CPU replicas, or no NVIDIA driver)"
    assert main(["status", "--url", served.address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["load"]["num_replicas_up"] == 1
    assert status["load"]["kv_blocks_total"] == NUM_BLOCKS
    [replica] = status["replicas"]
    assert (replica["index"], replica["address"], replica["up"], replica["gpus"]) == (
        0, coordinator, True, [])
    assert status["generation_tokens_per_second"] > 0  # the request above, within the minute
    assert 0 < status["throughput_window_seconds"] <= 60


def test_status_of_no_server_is_one_line_and_status_2(capsys):
    assert main(["status", "--url", "127.0.0.1:1", "--timeout", "2"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("pagedserve: error: ")
