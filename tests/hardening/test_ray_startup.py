"""Ray start-up on a loaded machine: a node that times out registering is started again with
what the failed try left running stopped first, any other error reaches the caller at once, and
the last timeout is not swallowed."""

from __future__ import annotations

import os
import time

import pytest

from pagedserve.cluster import ray_startup

ray = pytest.importorskip("ray")

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


class ScriptedInit:
    """Stands in for ray.init: raises the scripted errors in turn, then connects."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = list(errors)
        self.calls: list[dict] = []
        self.shutdowns = 0

    def init(self, **options) -> None:
        self.calls.append(options)
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def scripted(monkeypatch):
    def install(errors: list[Exception]) -> ScriptedInit:
        script = ScriptedInit(errors)
        monkeypatch.setattr(ray, "init", script.init)
        monkeypatch.setattr(ray, "shutdown", script.shutdown)
        monkeypatch.setattr(ray_startup.time, "sleep", lambda seconds: None)
        return script

    return install


GCS_PORT_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")


def test_a_startup_timeout_is_tried_again_with_the_same_options(scripted):
    script = scripted([TIMEOUT, GCS_PORT_TIMEOUT])
    assert ray_startup.start_ray(address="local", num_cpus=3) is ray
    assert script.calls == [{"address": "local", "num_cpus": 3}] * 3
    assert script.shutdowns == 2


def test_the_last_timeout_reaches_the_caller(scripted):
    script = scripted([TIMEOUT] * ray_startup.RAY_STARTUP_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_startup.start_ray(num_cpus=1)
    assert len(script.calls) == ray_startup.RAY_STARTUP_ATTEMPTS


def test_the_gcs_gets_longer_to_start_unless_the_environment_says(scripted, monkeypatch):
    variable = ray_startup.GCS_PORT_WAIT_ENV
    monkeypatch.delenv(variable, raising=False)
    scripted([])
    ray_startup.start_ray(num_cpus=1)
    assert os.environ[variable] == str(ray_startup.GCS_PORT_WAIT_S)
    monkeypatch.setenv(variable, "7")
    ray_startup.start_ray(num_cpus=1)
    assert os.environ[variable] == "7"


def test_other_errors_are_not_retried(scripted):
    script = scripted([ConnectionError("Could not find any running Ray instance")])
    with pytest.raises(ConnectionError, match="running Ray instance"):
        ray_startup.start_ray(address="auto")
    assert len(script.calls) == 1 and script.shutdowns == 0


class JumpingClock:
    """node.py's `time`, whose monotonic clock jumps past Ray's 30 s registration wait each
    time the raylet is looked up (and is the real one otherwise)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.mark.timeout(180)
def test_a_timed_out_try_leaves_no_ray_process_running(monkeypatch):
    # A real local start whose raylet never registers: Ray's own timeout error, from a node
    # whose GCS and raylet processes really started (and that ray.shutdown() cannot stop).
    from ray._private import node, services

    if ray.is_initialized():
        ray.shutdown()
    clock = JumpingClock()

    def never_registered(*args, **kwargs):
        clock.offset += 31.0
        raise RuntimeError("node info not found")

    monkeypatch.setattr(node, "time", clock)
    monkeypatch.setattr(services, "get_node", never_registered)
    monkeypatch.setattr(ray_startup, "RAY_STARTUP_ATTEMPTS", 2)
    monkeypatch.setattr(ray_startup.time, "sleep", lambda seconds: None)
    left_before = ray_startup.ray_descendants()
    seen_running: list[set[int]] = []
    stop = ray_startup.stop_processes
    monkeypatch.setattr(ray_startup, "stop_processes",
                        lambda pids: (seen_running.append(set(pids)), stop(pids)))
    with pytest.raises(Exception, match="timed out during startup"):
        ray_startup.start_ray(address="local", num_cpus=1, include_dashboard=False,
                              logging_level="ERROR")
    assert len(seen_running) == 2
    assert all(len(pids) >= 2 for pids in seen_running), seen_running  # a GCS and a raylet
    assert ray_startup.ray_descendants() == left_before
    assert not ray.is_initialized()
