"""Ray start-up on a loaded machine: a node that times out registering is started again, any
other error reaches the caller at once, and the last timeout is not swallowed."""

from __future__ import annotations

import pytest

from pagedserve.cluster import placement

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
        monkeypatch.setattr(placement.time, "sleep", lambda seconds: None)
        return script

    return install


def test_a_startup_timeout_is_tried_again_with_the_same_options(scripted):
    script = scripted([TIMEOUT, TIMEOUT])
    assert placement.start_ray(address="local", num_cpus=3) is ray
    assert script.calls == [{"address": "local", "num_cpus": 3}] * 3
    assert script.shutdowns == 2  # the half-started node is stopped before each new try


def test_the_last_timeout_reaches_the_caller(scripted):
    script = scripted([TIMEOUT] * placement.RAY_STARTUP_ATTEMPTS)
    with pytest.raises(Exception, match="timed out during startup"):
        placement.start_ray(num_cpus=1)
    assert len(script.calls) == placement.RAY_STARTUP_ATTEMPTS


def test_other_errors_are_not_retried(scripted):
    script = scripted([ConnectionError("Could not find any running Ray instance")])
    with pytest.raises(ConnectionError, match="running Ray instance"):
        placement.start_ray(address="auto")
    assert len(script.calls) == 1 and script.shutdowns == 0
