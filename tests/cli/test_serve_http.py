"""`pagedserve serve --http-port`: the ready line names both fronts (and stays parseable the
old way), `--http-port -1` turns HTTP off, ServeOptions checks the port, and a served process
answers the openai client with the token it was given, then stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest

from pagedserve.cli_serve import READY_PREFIX, ready_addresses, ready_line
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.engine.default_model import ensure_tiny_test_model
from pagedserve.errors import InvalidArgument

TOKEN = "cli-token"


@pytest.mark.parametrize("http", [None, "http://127.0.0.1:8000", "https://[::1]:8443"])
def test_ready_line_names_both_fronts(http):
    line = ready_line("tiny", "127.0.0.1:50051", http)
    assert line.startswith(f"{READY_PREFIX} tiny on 127.0.0.1:50051 (gRPC)")
    assert ready_addresses(line) == ("127.0.0.1:50051", None if http is None else f"{http}/v1")
    assert line.split(" on ")[1].split()[0] == "127.0.0.1:50051"  # how older callers read it


@pytest.mark.parametrize("port", [-1, 65536, 1.5, "8000", True])
def test_serve_options_check_http_port(port):
    with pytest.raises(InvalidArgument, match="ServeOptions.http_port") as raised:
        ServeOptions(http_port=port)
    assert raised.value.field == "ServeOptions.http_port"


def _serve(tmp_path, *flags: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PAGEDSERVE_CACHE": str(tmp_path / "cache"),
           "PAGEDSERVE_API_KEYS": TOKEN}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEDSERVE_CACHE", env["PAGEDSERVE_CACHE"])
        model = ensure_tiny_test_model()
    server = subprocess.Popen([sys.executable, "-m", "pagedserve", "serve", "--port", "0",
                               "--device", "cpu", "--model", model, *flags],
                              stdout=subprocess.PIPE, text=True, env=env)
    line = server.stdout.readline()
    while line and not line.startswith(READY_PREFIX):
        line = server.stdout.readline()
    if not line:
        raise AssertionError(f"serve exited with {server.wait()}")
    return server, line


def _stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(timeout=90)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_served_process_answers_the_openai_client(tmp_path):
    server, line = _serve(tmp_path, "--http-port", "0")
    try:
        _, base_url = ready_addresses(line)
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        health_url = base_url.removesuffix("/v1") + "/health"
        with urllib.request.urlopen(health_url, timeout=30) as health:
            assert health.status == 200
        with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0,
                           timeout=60) as api:
            name = api.models.list().data[0].id
            result = api.completions.create(model=name, prompt="Hi", max_tokens=3,
                                            temperature=0.0)
            assert result.usage.completion_tokens == 3
            chat = api.chat.completions.create(model=name, max_tokens=2,
                                               messages=[{"role": "user", "content": "Hi"}])
            assert chat.choices[0].finish_reason == "length"
        with openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0,
                           timeout=60) as api, pytest.raises(openai.AuthenticationError):
            api.models.list()
    finally:
        assert _stop(server) == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_http_port_minus_one_serves_grpc_only(tmp_path):
    server, line = _serve(tmp_path, "--http-port", "-1")
    try:
        assert ready_addresses(line)[1] is None and "HTTP" not in line
    finally:
        assert _stop(server) == 0
