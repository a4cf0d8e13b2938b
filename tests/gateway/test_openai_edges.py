"""The OpenAI HTTP API's edges: every bad field is a 400 OpenAI error object naming it (and
queues nothing), an unknown model is 404, /v1/models and /health answer, a client that
disconnects (streaming or not) aborts its request at the coordinator, which frees its blocks,
and the load generator's OpenAI mode counts exactly.

One Server on the tiny byte-level model with a 2048-token context, so that a 2,000-token
request runs far longer than any bound here: an abort is told apart from a finish.
"""

from __future__ import annotations

import http.client
import json
import math
from urllib.parse import urlsplit

import pytest

from pagedserve.cluster.launcher import ServeOptions
from pagedserve.cluster.load_generator import run_load, run_openai_load
from pagedserve.config import EngineConfig
from tests.gateway.gateway_utils import (
    assert_back_to_idle,
    coordinator_requests,
    free_blocks,
    started_server,
    wait_until,
)
from tests.gateway.openai_utils import (
    client,
    hang_up,
    http_call,
    open_stream,
    openai,
    read_events,
)

pytestmark = pytest.mark.timeout(90)

LONG_TOKENS = 2000  # thousands of steps: only an abort ends it within the bounds below
PROMPT = [5, 6, 7, 8]
MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def served(aio, ray_cluster, default_model_path):
    config = EngineConfig(model=default_model_path, device="cpu", num_gpu_blocks_override=256,
                          max_model_len=2048, max_num_seqs=MAX_NUM_SEQS, cpu_threads=1)
    with started_server(aio, config, ServeOptions(host="127.0.0.1", port=0,
                                                  http_port=0)) as server:
        yield server


@pytest.fixture(scope="module")
def api(served):
    with client(served) as openai_client:
        yield openai_client


@pytest.fixture
def idle_free(served) -> int:
    assert coordinator_requests(served) == 0
    return free_blocks(served)


def steps(server) -> int:
    import ray

    return sum(ray.get(h.health.remote(), timeout=30)["num_steps"] for h in server.coordinators)


# ---- bad input ----------------------------------------------------------------------------------

COMPLETION_CASES = {
    # case: (the request's fields, the field the error names)
    "temperature": ({"temperature": -1.0}, "temperature"),
    "top_p": ({"top_p": 1.5}, "top_p"),
    "n": ({"n": 0}, "n"),
    "n-over-max-num-seqs": ({"n": MAX_NUM_SEQS + 1}, "n"),
    "max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens-over-context": ({"max_tokens": 2045}, "max_tokens"),
    "logprobs": ({"logprobs": 21}, "logprobs"),
    "seed": ({"seed": -1}, "seed"),
    "stop_token_ids": ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids"),
    "logit_bias-key": ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    "type": ({"extra_body": {"temperature": "hot"}}, "temperature"),
    "unknown-field": ({"extra_body": {"max_tokenz": 3}}, "max_tokenz"),
    "echo": ({"echo": True}, "echo"),
    "prompt-empty": ({"prompt": []}, "prompt"),
    "prompt-out-of-vocab": ({"prompt": [1, 10**6]}, "prompt"),
}
CHAT_CASES = {
    "messages-empty": ({"messages": []}, "messages"),
    "role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    "top_logprobs-alone": ({"top_logprobs": 2}, "top_logprobs"),
    "max_completion_tokens": ({"max_completion_tokens": 0}, "max_completion_tokens"),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
}


@pytest.mark.parametrize("case", [*COMPLETION_CASES, *CHAT_CASES])
def test_bad_field_is_400_naming_it(case, served, api, idle_free):
    chat = case in CHAT_CASES
    fields, param = (CHAT_CASES if chat else COMPLETION_CASES)[case]
    request = {"model": served.gateway.model_name, "max_tokens": 4}
    request.update({"messages": [{"role": "user", "content": "hi"}]} if chat
                   else {"prompt": PROMPT})
    request.update(fields)
    create = api.chat.completions.create if chat else api.completions.create
    with pytest.raises(openai.BadRequestError) as raised:
        create(**request)
    error = raised.value
    assert error.status_code == 400
    assert error.body["param"] == param
    assert param in error.body["message"]
    assert error.body["code"] == 400 and error.body["type"] == "bad_request"
    assert free_blocks(served) == idle_free and coordinator_requests(served) == 0


def test_body_that_is_not_json_is_400(served):
    response = http_call(served, "POST", "/v1/completions", b"{not json",
                         {"Content-Type": "application/json"})
    assert response.status == 400
    assert response.json()["error"]["type"] == "bad_request"


def test_unknown_model_is_404(served, api):
    with pytest.raises(openai.NotFoundError) as raised:
        api.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert raised.value.body["param"] == "model"
    assert "no-such-model" in raised.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")
    assert api.models.retrieve(served.gateway.model_name).id == served.gateway.model_name


def test_models_health_and_unknown_route(served, api):
    models = api.models.list()
    assert [m.id for m in models.data] == [served.gateway.model_name]
    assert models.data[0].max_model_len == 2048
    health = http_call(served, "GET", "/health")
    assert (health.status, health.body) == (200, b"")
    missing = http_call(served, "GET", "/v1/nothing-here")
    assert missing.status == 404 and missing.json()["error"]["code"] == 404


def test_metrics_route(served):
    if not hasattr(served.gateway, "metrics"):
        pytest.skip("Gateway.metrics is not built yet")
    response = http_call(served, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")


# ---- a client that leaves -------------------------------------------------------------------

def _long(stream: bool) -> dict:
    return {"prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnected_stream_frees_its_blocks(path, served, idle_free):
    body = _long(stream=True)
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
        del body["prompt"]
    steps_before = steps(served)
    connection, response = open_stream(served, path, body)
    try:
        assert response.status == 200
        assert response.getheader("content-type").startswith("text/event-stream")
        for event in read_events(response, 3):
            assert json.loads(event)["choices"]
        assert free_blocks(served) < idle_free
    finally:
        hang_up(connection)  # the client goes away mid-stream
    assert_back_to_idle(served, idle_free)
    assert steps(served) - steps_before < LONG_TOKENS, "the request ran on after the client left"


def test_disconnected_unary_request_frees_its_blocks(served, idle_free):
    steps_before = steps(served)
    url = urlsplit(served.http_address)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("POST", "/v1/completions", json.dumps(_long(stream=False)),
                           {"Content-Type": "application/json"})
        assert wait_until(lambda: free_blocks(served) < idle_free), "it never held a block"
    finally:
        hang_up(connection)  # never reads the answer
    assert_back_to_idle(served, idle_free)
    assert steps(served) - steps_before < LONG_TOKENS, "the request ran on after the client left"


def test_client_that_leaves_while_queued_is_aborted_before_its_first_token(served, idle_free):
    """A stream that has sent nothing yet (its request waits behind max_num_seqs running
    ones) notices the disconnect too: the watch is on the connection, not on the next send."""
    running = [open_stream(served, "/v1/completions", _long(stream=True))
               for _ in range(MAX_NUM_SEQS)]
    try:
        for _, response in running:
            read_events(response, 1)
        queued, response = open_stream(served, "/v1/completions", _long(stream=True))
        assert response.status == 200
        assert wait_until(lambda: coordinator_requests(served) == MAX_NUM_SEQS + 1)
        hang_up(queued)
        assert wait_until(lambda: coordinator_requests(served) == MAX_NUM_SEQS)
    finally:
        for connection, _ in running:
            hang_up(connection)
    assert_back_to_idle(served, idle_free)


# ---- the load generator's two modes -------------------------------------------------------------

@pytest.mark.parametrize("rate", [math.inf, 50.0])
def test_load_generator_counts_exactly_over_both_fronts(rate, aio, served, idle_free):
    prompts = [[10 + i, 11 + i, 12 + i] for i in range(6)]
    lengths = [5, 3, 4, 5, 2, 6]

    async def both():
        over_http = await run_openai_load(
            f"{served.http_address}/v1", served.gateway.model_name, prompts, lengths, rate, 0,
            extra_fields=lambda max_tokens: {"ignore_eos": True})
        over_grpc = await run_load(served.address, prompts, lengths, rate, 0)
        return over_http, over_grpc

    for run in aio.run(both(), timeout=80):
        assert (run["completed"], run["failed"], run["output_tokens"]) == (6, 0, sum(lengths))
        assert run["request_rate"] == ("inf" if math.isinf(rate) else rate)
        assert 0 < run["median_ttft_ms"] <= run["p99_ttft_ms"]
        assert run["mean_tpot_ms"] > 0 and run["mean_itl_ms"] > 0
    assert_back_to_idle(served, idle_free)


def test_load_generator_counts_refusals_as_failures(aio, served):
    async def refused():
        return await run_openai_load(f"{served.http_address}/v1", "no-such-model", [PROMPT],
                                     [3], math.inf, 0)

    run = aio.run(refused(), timeout=30)
    assert (run["completed"], run["failed"], run["output_tokens"]) == (0, 1, 0)
