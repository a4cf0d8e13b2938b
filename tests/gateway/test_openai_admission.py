"""The OpenAI HTTP API's admission: bearer tokens (the gRPC server's) guard /v1/* and leave
/health and /metrics open; a full replica is 429 with Retry-After, and it admits again once a
slot frees; a replica lost mid-stream ends the stream with an error event (503), and then no
replica up is 503 (and /health says so).

The HTTP API speaks TLS, or mutual TLS, with the gRPC server's certificates.

The tiny random Llama without a tokenizer (token-id prompts; logprob tokens as 'token_id:N').
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import urllib.error
import urllib.request

import pytest

from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from tests.gateway.gateway_utils import coordinator_requests, started_server, wait_until
from tests.gateway.openai_utils import (
    client,
    hang_up,
    http_call,
    open_stream,
    openai,
    read_events,
)

# The gRPC tests' certificates (a CA, a server certificate for 127.0.0.1, a client one).
from tests.gateway.test_gateway_security import pki  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(90)

TOKEN = "s3cret"
PROMPT = [5, 6, 7, 8]
LONG_TOKENS = 1500


def tiny_config(path: str) -> EngineConfig:
    return EngineConfig(model=path, device="cpu", num_gpu_blocks_override=128, cpu_threads=1,
                        max_model_len=2048)


def _long() -> dict:
    return {"prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}


@pytest.fixture(scope="class")
def served(aio, ray_cluster, tiny_checkpoint):
    """Class-scoped: the Server of the last test (a lost replica) runs alone."""
    options = ServeOptions(host="127.0.0.1", port=0, http_port=0, auth_tokens=[TOKEN],
                           max_queue_per_replica=1)
    with started_server(aio, tiny_config(tiny_checkpoint), options) as server:
        yield server


class TestWithTokensAndAQueueOfOne:
    @pytest.mark.parametrize("header", [None, "Bearer wrong", TOKEN, f"Bearer {TOKEN}x"],
                             ids=["none", "wrong", "no-scheme", "longer"])
    def test_missing_or_wrong_token_is_401(self, header, served):
        headers = {} if header is None else {"Authorization": header}
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/models")):
            # A bad body too: the token is checked first.
            response = http_call(served, method, path, b"{", headers)
            assert response.status == 401, (path, response.body)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["code"] == 401 and "API key" in error["message"]

    def test_openai_client_with_a_wrong_key_is_refused(self, served):
        with client(served, api_key="wrong") as api, \
                pytest.raises(openai.AuthenticationError) as raised:
            api.models.list()
        assert raised.value.status_code == 401

    @pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
    def test_right_token_works(self, scheme, served):
        response = http_call(served, "POST", "/v1/completions",
                             {"prompt": PROMPT, "max_tokens": 3, "logprobs": 0,
                              "temperature": 0.0, "return_token_ids": True},
                             {"Authorization": f"{scheme} {TOKEN}"})
        assert response.status == 200, response.body
        choice = response.json()["choices"][0]
        assert len(choice["token_ids"]) == 3
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
        assert choice["text"] == ""  # no tokenizer: ids only

    def test_health_and_metrics_need_no_token(self, served):
        assert http_call(served, "GET", "/health").status == 200
        if not hasattr(served.gateway, "metrics"):
            pytest.skip("Gateway.metrics is not built yet")
        assert http_call(served, "GET", "/metrics").status == 200

    def test_full_replica_is_429_until_a_slot_frees(self, served):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        connection, response = open_stream(served, "/v1/completions", _long(), auth)
        try:
            assert response.status == 200
            read_events(response, 2)
            with client(served, api_key=TOKEN) as api, \
                    pytest.raises(openai.RateLimitError) as raised:
                api.completions.create(model=served.gateway.model_name, prompt=PROMPT,
                                       max_tokens=2)
            refusal = raised.value
            assert refusal.status_code == 429
            assert refusal.response.headers["retry-after"] == "1"
            assert refusal.response.headers["retry-after-ms"] == "100"
            assert "in flight" in refusal.body["message"]
        finally:
            hang_up(connection)
        assert wait_until(lambda: coordinator_requests(served) == 0)
        with client(served, api_key=TOKEN) as api:
            done = api.completions.create(model=served.gateway.model_name, prompt=PROMPT,
                                          max_tokens=2, temperature=0.0)
        assert done.usage.completion_tokens == 2


def _workers(handle) -> list:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: list(self.core.executor.workers)))


def test_lost_replica_ends_the_stream_then_503(aio, ray_cluster, tiny_checkpoint):
    import ray

    options = ServeOptions(host="127.0.0.1", port=0, http_port=0)
    # No restarts: the replica is lost at once (with restarts its requests would recover).
    config = dataclasses.replace(tiny_config(tiny_checkpoint), max_worker_restarts=0)
    with started_server(aio, config, options) as served:
        connection, response = open_stream(served, "/v1/completions", _long())
        try:
            read_events(response, 2)
            ray.kill(_workers(served.coordinators[0])[0])
            events = []
            while (line := response.readline()):
                if line.startswith(b"data: "):
                    events.append(line[len(b"data: "):].strip().decode())
        finally:
            connection.close()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]  # after the tokens streamed before the loss
        assert error["code"] == 503 and "worker failed" in error["message"], error
        assert all("choices" in json.loads(event) for event in events[:-2])
        assert wait_until(lambda: not any(r.up for r in served.gateway.replicas))
        with client(served) as api, pytest.raises(openai.InternalServerError) as raised:
            api.completions.create(model=served.gateway.model_name, prompt=PROMPT,
                                   max_tokens=2)
        assert raised.value.status_code == 503
        assert raised.value.body["type"] == "service_unavailable"
        health = http_call(served, "GET", "/health")
        assert health.status == 503 and health.json()["error"]["code"] == 503


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_https_with_the_grpc_servers_certificates(mutual, aio, ray_cluster, tiny_checkpoint,
                                                  pki):  # noqa: F811 (the fixture)
    options = ServeOptions(host="127.0.0.1", port=0, http_port=0,
                           tls_cert=str(pki["server_pem"]), tls_key=str(pki["server_key"]),
                           tls_client_ca=str(pki["ca_pem"]) if mutual else None)
    with started_server(aio, tiny_config(tiny_checkpoint), options) as served:
        assert served.http_address.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(pki["ca_pem"]))
        if mutual:
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                urllib.request.urlopen(f"{served.http_address}/health", timeout=30,
                                       context=trusting).read()
            trusting.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
        with urllib.request.urlopen(f"{served.http_address}/health", timeout=30,
                                    context=trusting) as health:
            assert health.status == 200
        with openai.OpenAI(base_url=f"{served.http_address}/v1", api_key="unused",
                           max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(verify=trusting)) as api:
            result = api.completions.create(model=served.gateway.model_name, prompt=PROMPT,
                                            max_tokens=2, temperature=0.0)
        assert result.usage.completion_tokens == 2
