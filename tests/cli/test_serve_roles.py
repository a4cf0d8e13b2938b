"""`pagedserve serve --role fleet` and `--role gateway` as processes of their own sharing one
Ray cluster (this test's): two gateways serve through the SDK over one fleet, a killed gateway
takes nothing of the fleet with it (its requests are aborted at the coordinator, the other
gateway serves on), a replica the fleet's autoscaler adds is found by a gateway's discovery,
a gateway with no fleet to find refuses to start, and the fleet stops its replicas on SIGTERM.

Ray binds the loopback here (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so every address, the
coordinators' included, is 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedserve.cli_serve import FLEET_READY_PREFIX, READY_PREFIX, ready_addresses
from pagedserve.client import Client, StreamDelta
from pagedserve.cluster.fleet_discovery import FLEET_NAMESPACE, replica_actor_name
from tests.helpers.local_ray import start_local_ray
from tests.helpers.tiny_models import save_tiny_checkpoint

ray = pytest.importorskip("ray")
from tests.chaos.chaos_utils import coordinator_state, gateway_load, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "tiny"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
START_TIMEOUT_S = 150.0
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.0}
RELEASE_S = 15.0
"""How long a killed gateway's requests may stay at the coordinator (its stream's end is seen
at once on a local connection)."""


class ServeProcess:
    """`python -m pagedserve serve ...` in a child process, stopped by its process id."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self.args = args
        self.process: subprocess.Popen | None = None
        self.line = ""

    def start(self, ready: str) -> ServeProcess:
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pagedserve", "serve", *self.args], stdout=subprocess.PIPE,
                stderr=stderr, text=True, env={**os.environ, **LOOPBACK_ENV})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.line = self.process.stdout.readline()
            if not self.line or self.line.startswith(ready):
                break
        if not self.line.startswith(ready):
            self.stop()
            raise AssertionError(f"serve {self.args[:2]} did not start: exit "
                                 f"{self.process.poll()}\n{self.log.read_text()[-3000:]}")
        return self

    @property
    def address(self) -> str:
        return ready_addresses(self.line)[0]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 90) -> int | None:
        if not self.alive():
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise


@pytest.fixture(scope="module")
def ray_address():
    with pytest.MonkeyPatch.context() as patch:
        from ray._private import ray_constants

        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # loopback node address
        start_local_ray(8)
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:")
        yield address
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("roles") / MODEL, "llama",
                                    max_position_embeddings=2048))


def common(ray_address: str, model: str) -> list[str]:
    return ["--address", ray_address, "--model", model, "--device", "cpu"]


@pytest.fixture(scope="module")
def fleet(ray_address, model, tmp_path_factory):
    process = ServeProcess(
        tmp_path_factory.mktemp("fleet") / "stderr", "--role", "fleet",
        *common(ray_address, model), "--replicas", "1", "--min-replicas", "1",
        "--max-replicas", "2", "--target-queue-depth", "2", "--upscale-delay-s", "0",
        "--downscale-delay-s", "3600").start(FLEET_READY_PREFIX)
    yield process
    process.stop()


@pytest.fixture
def gateways(fleet, ray_address, model, tmp_path):
    started: list[ServeProcess] = []

    def start() -> ServeProcess:
        started.append(ServeProcess(
            tmp_path / f"gateway-{len(started)}", "--role", "gateway",
            *common(ray_address, model), "--port", "0", "--http-port", "-1",
            "--discovery-interval-s", "0.5").start(READY_PREFIX))
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def replica(number: int):
    return ray.get_actor(replica_actor_name(MODEL, number), namespace=FLEET_NAMESPACE)


def idle(handle) -> tuple[int, int, int, int]:
    """coordinator_state once nothing runs or waits there."""
    assert wait_until(lambda: coordinator_state(handle)[1:] == (0, 0, 0), RELEASE_S)
    return coordinator_state(handle)


def test_the_fleet_announces_its_named_replica(fleet):
    assert fleet.line.startswith(f"{FLEET_READY_PREFIX} {MODEL} of 1 replicas in Ray "
                                 f"namespace {FLEET_NAMESPACE};")
    assert ray.get(replica(0).health.remote(), timeout=30)["healthy"] is True


def test_two_gateways_serve_over_one_fleet_and_a_killed_one_takes_nothing_with_it(gateways):
    first, second = gateways(), gateways()
    assert first.address.startswith("127.0.0.1:") and first.address != second.address
    for gateway in (first, second):
        with Client(gateway.address, timeout=60) as client:
            result = client.generate([5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(result.outputs[0].token_ids) == 4
            assert client.model_info().model == MODEL
    handle = replica(0)
    free_when_idle = idle(handle)[0]
    with Client(first.address, timeout=60) as client:
        streams = [client.generate_stream([5 + i, 6, 7], **LONG) for i in range(2)]
        assert all(isinstance(next(stream), StreamDelta) for stream in streams)
        assert coordinator_state(handle)[1] == 2
        first.stop(signal.SIGKILL)
        took = wait_until(lambda: coordinator_state(handle) == (free_when_idle, 0, 0, 0),
                          RELEASE_S)
        assert took is not None, coordinator_state(handle)
    with Client(second.address, timeout=60) as client:
        result = client.generate([8, 9], max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(result.outputs[0].token_ids) == 3
    assert ray.get(handle.health.remote(), timeout=30)["healthy"] is True
    assert coordinator_state(handle) == (free_when_idle, 0, 0, 0)


def test_a_replica_the_fleet_adds_is_found_by_the_gateway(gateways):
    gateway = gateways()
    assert gateway_load(gateway.address).num_replicas_up == 1
    with Client(gateway.address, timeout=60) as client:
        # 4 in flight against a target queue depth of 2: the fleet's autoscaler wants 2.
        streams = [client.generate_stream([5 + i, 6, 7], **LONG) for i in range(4)]
        assert all(isinstance(next(stream), StreamDelta) for stream in streams)
        took = wait_until(lambda: gateway_load(gateway.address).num_replicas_up == 2,
                          START_TIMEOUT_S, interval=0.5)
        assert took is not None, "the gateway did not find a second replica"
        added = replica(1)
        for stream in streams:
            stream.cancel()
        idle(replica(0))
        # Two at once: the second goes where less work is queued, so each replica runs one.
        streams = [client.generate_stream([11 + i, 12, 13], **LONG) for i in range(2)]
        assert all(isinstance(next(stream), StreamDelta) for stream in streams)
        assert [coordinator_state(replica(0))[1], coordinator_state(added)[1]] == [1, 1]
        for stream in streams:
            stream.cancel()
    idle(replica(0))
    idle(added)


def test_a_gateway_without_a_fleet_of_its_model_refuses_to_start(fleet, ray_address, model,
                                                                tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", "--role", "gateway",
         *common(ray_address, model), "--served-model-name", "nobody", "--port", "0",
         "--http-port", "-1", "--discovery-timeout-s", "2"],
        capture_output=True, text=True, env={**os.environ, **LOOPBACK_ENV}, timeout=120)
    assert process.returncode == 2, process.stderr[-2000:]
    assert "no fleet replica of 'nobody' in Ray namespace 'pagedserve' within 2 s" \
        in process.stderr


def test_the_fleet_stops_its_replicas_on_sigterm(fleet):
    assert fleet.stop(signal.SIGTERM) == 0
    left = [entry for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == FLEET_NAMESPACE]
    assert left == []
