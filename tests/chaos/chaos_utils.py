"""What the chaos tests share: gateway processes (started, killed by process id), the
coordinators' state as Ray reports it, and resident memory read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import ray

from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.chaos.gateway_process import READY

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its lambdas run in actors

SCRIPT = Path(__file__).resolve().parent / "gateway_process.py"
START_TIMEOUT_S = 60.0


class GatewayProcess:
    """tests/chaos/gateway_process.py in a child process; `address` once it serves."""

    def __init__(self, *args: str, port: int = 0) -> None:
        self.args = list(args)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--port", str(self.port), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line or line.startswith(READY):
                break
        if not line.startswith(READY):
            self.stop()
            raise RuntimeError(f"the gateway process did not start (exit {self.process.poll()})")
        self.address = line[len(READY):].strip()
        self.port = int(self.address.rsplit(":", 1)[1])  # a restart takes the same port
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer ends it: no clean-up runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def gateway_load(address: str) -> pb.ServerLoad:
    """The gateway's GetServerLoad: its requests in flight, its replicas up."""
    with grpc.insecure_channel(address) as channel:
        return generation_pb2_grpc.GenerationStub(channel).GetServerLoad(
            pb.GetServerLoadRequest(), timeout=30)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for process {pid}")


def private_bytes(pid: int) -> int:
    """Resident memory of a process that is its own (RssAnon): VmRSS less the pages of files
    and shared memory it maps, such as the Ray object store's /dev/shm."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no RssAnon for process {pid}")


def actor_pid(handle: Any) -> int:
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def coordinator_state(handle: Any) -> tuple[int, int, int, int]:
    """(free blocks, requests held, running, waiting) of one coordinator."""
    free, health, stats = ray.get([handle.free_blocks.remote(), handle.health.remote(),
                                   handle.stats.remote()], timeout=30)
    return free, health["num_requests"], stats.num_running, stats.num_waiting


def wait_until(condition: Callable[[], bool], timeout: float,
               interval: float = 0.05) -> float | None:
    """Seconds until `condition` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(interval)


def object_store_bytes() -> int:
    """Bytes the objects in the Ray object store of this test's cluster take, compiled-graph
    channel buffers included (Ray's `ray memory --stats-only` figure)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used
