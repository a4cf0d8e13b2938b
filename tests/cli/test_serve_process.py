"""`pagedserve serve` as a user runs it: a process that serves until a signal and then leaves
no process of its own behind (Ray's included), checked by process id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedserve.cli_serve import READY_PREFIX
from pagedserve.engine.default_model import ensure_tiny_test_model


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_a_signal_and_leaves_no_process(signum, tmp_path):
    env = {**os.environ, "PAGEDSERVE_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEDSERVE_CACHE", env["PAGEDSERVE_CACHE"])
        model = ensure_tiny_test_model()
    server = subprocess.Popen([sys.executable, "-m", "pagedserve", "serve", "--port", "0",
                               "--http-port", "-1", "--device", "cpu", "--model", model],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        while line and not line.startswith(READY_PREFIX):
            line = server.stdout.readline()
        assert line.startswith(READY_PREFIX), f"serve exited with {server.wait()}"
        address = line.split(" on ")[1].split()[0]
        assert address.startswith("127.0.0.1:")
        from pagedserve.client import Client

        with Client(address, timeout=60) as client:
            result = client.generate([5, 6, 7], max_tokens=3, temperature=0)
        assert len(result.outputs[0].token_ids) == 3
        ours = descendants(server.pid)
        assert ours, "a local Ray cluster runs below the server"
        server.send_signal(signum)
        assert server.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in ours if alive(pid)] == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
