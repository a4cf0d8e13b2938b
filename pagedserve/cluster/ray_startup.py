"""Connecting to Ray: the cluster RAY_ADDRESS names, or a new local node, started the one way
pagedserve and its tests start one.

Ray gives a new GCS 30 s to write its port file and a new raylet a fixed 30 s to register with
the GCS. A loaded 2-core machine (the processes of a cluster that just stopped still exiting)
has missed both in CI, so the GCS gets GCS_PORT_WAIT_S (unless RAY_gcs_server_port_wait_time_s
says otherwise) and a local start that times out is tried again. Ray keeps no handle on a node
that failed to start (`ray.shutdown()` stops nothing of it), so before the next try the Ray
processes that start left behind, descendants of this process, are stopped by pid: otherwise
every failed try would leave a GCS, a raylet and their agents running, loading the machine the
next try runs on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RAY_STARTUP_ATTEMPTS = 3
STARTUP_TIMEOUT_MARKS = ("timed out during startup", "Timed out waiting for file")
"""What Ray's errors say when a new raylet did not register in time, or a new GCS did not
write its port file in time."""
GCS_PORT_WAIT_S = 120
GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
STOP_WAIT_S = 5.0


def ensure_ray(num_cpus: int | None = None) -> Any:
    """The `ray` module with a connection: the cluster RAY_ADDRESS names, else a local one."""
    import ray

    if not ray.is_initialized():
        start_ray(logging_level=logging.WARNING, num_cpus=num_cpus)
    return ray


def start_ray(**init_options: Any) -> Any:
    """`ray.init(**init_options)`, tried RAY_STARTUP_ATTEMPTS times in all when a local node
    times out during start-up (what that try left running is stopped first); any other error
    at once."""
    import ray

    os.environ.setdefault(GCS_PORT_WAIT_ENV, str(GCS_PORT_WAIT_S))
    for attempt in range(1, RAY_STARTUP_ATTEMPTS + 1):
        before = ray_descendants()
        try:
            ray.init(**init_options)
            return ray
        except Exception as error:
            if not any(mark in str(error) for mark in STARTUP_TIMEOUT_MARKS):
                raise
            ray.shutdown()
            stop_processes(ray_descendants() - before)
            if attempt == RAY_STARTUP_ATTEMPTS:
                raise
            logger.warning("Ray start-up attempt %d of %d timed out; trying again", attempt,
                           RAY_STARTUP_ATTEMPTS)
            time.sleep(2.0 * attempt)


def ray_descendants() -> set[int]:
    """Pids of the running Ray processes (command line naming ray) descending from this one;
    empty where /proc is not there to read."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        state, parent = _state_and_parent(int(entry.name))
        if state not in (None, "Z"):
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = set(), [os.getpid()]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return {pid for pid in found if b"ray" in _command_line(pid)}


def _state_and_parent(pid: int) -> tuple[str | None, int]:
    """The process's state letter and parent pid from /proc; (None, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None, 0
    return fields[0], int(fields[1])


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop_processes(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL after STOP_WAIT_S for those still running; reaps our children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_WAIT_S
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _running(pid)}
            time.sleep(0.05)
        if not pids:
            return
    logger.warning("Ray processes %s did not stop", sorted(pids))


def _running(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, exited and now reaped
    except ChildProcessError:
        pass  # not our child: its parent reaps it
    return _state_and_parent(pid)[0] not in (None, "Z")
