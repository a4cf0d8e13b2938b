"""An autoscaling Ray cluster on this machine, for tests: Ray's fake multinode provider.

    from tests.helpers.fake_cluster import fake_cluster

    with fake_cluster(worker_types={"gpu": {"resources": {"CPU": 1, "GPU": 1},
                                            "min_workers": 0, "max_workers": 2}},
                      idle_timeout_s=6) as cluster:
        with cluster.connect() as ray:                 # ray.init(address=cluster.address)
            ...                                         # demand GPUs: the autoscaler adds nodes
            cluster.wait_for_workers(ray, 1, timeout_s=60)

`fake_cluster(config=FAKE_CLUSTER_YAML, worker_types=None, idle_timeout_s=None,
start_timeout_s=60)` starts `RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 ray start --head
--block --autoscaling-config=...` in a session of its own (setsid), on free ports and a temp
dir of its own, from `deploy/ray/fake-multinode.yaml` (what the README's local trial starts)
with its worker node types replaced by `worker_types` (each one's `node_config` defaults to
{}) and its idle timeout by `idle_timeout_s`. The head has the yaml's head resources (CPU
only). It returns once `ray start` reports the head up (the autoscaler acts on demand within
a few seconds of that), and yields a `FakeCluster`:

- `address`: host:port of the head's GCS, for `ray.init(address=...)` or `--address`;
- `driver_env`: the environment a driver process needs besides the address (Ray 2.60 turns
  token authentication on: drivers must say so): add it to a subprocess's environment;
  `driver_environment()` applies it to this process while it lasts (around a `Server` that
  calls `ray.init(address=cluster.address)` itself);
- `connect()`: a context manager around `ray.init(address)` / `ray.shutdown()`;
- `worker_nodes(ray)`: the live worker nodes (`ray.nodes()` entries, head left out);
  `wait_for_workers(ray, count, timeout_s)`: seconds until exactly `count` are alive;
- `config`: the cluster config it runs; `log_dir`: the session's logs (monitor.* are the
  autoscaler's); `processes()`: (pid, command line) of each of its live processes.

On exit it stops the whole session (SIGTERM, SIGKILL after a grace period) and raises
AssertionError naming any process of it still alive: the head's Ray processes and every fake
node's raylet and workers (the autoscaler starts them inside the same session). It never runs
`ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE_CLUSTER_YAML = REPO / "deploy" / "ray" / "fake-multinode.yaml"
HEAD_TYPE = "ray.head.default"
"""The head's node type name: fixed by Ray's fake provider."""
READY_LINE = "Ray runtime started."
STOP_GRACE_S = 5.0
"""SIGTERM to SIGKILL: `ray start --block`, its GCS and monitor take longer than this to
act on SIGTERM (over 15 s on 2 cores), and nothing of a test cluster needs a clean exit."""
DRIVER_ENV = {"RAY_AUTH_MODE": "token"}
"""Token auth, the head's and every driver's: a driver joining a `ray start` cluster by address
must turn it on itself. The token is ~/.ray/auth_token (made here when missing)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_processes(sid: int, temp_dir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live, non-zombie process of session `sid` or naming
    `temp_dir` (each Ray process of the cluster, wherever started, has its session dir there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its ')' do not.
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if state not in ("Z", "X") and (session == sid or str(temp_dir) in cmdline):
            found.append((int(entry.name), cmdline or stat.split("(", 1)[1].split(")")[0]))
    return found


@dataclass
class FakeCluster:
    address: str
    driver_env: Mapping[str, str]
    config: dict
    temp_dir: Path
    session_id: int

    @property
    def log_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process of the cluster (what exit checks)."""
        return _cluster_processes(self.session_id, self.temp_dir)

    @contextlib.contextmanager
    def driver_environment(self) -> Iterator[None]:
        """This process's environment with `driver_env` applied, for code that calls
        `ray.init(address=...)` itself (Ray caches its auth mode: refreshed both ways)."""
        from ray._raylet import Config

        saved = {name: os.environ.get(name) for name in self.driver_env}
        os.environ.update(self.driver_env)
        Config.initialize("")
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            Config.initialize("")

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        import ray

        with self.driver_environment():
            ray.init(address=self.address, logging_level="warning", log_to_driver=False)
            try:
                yield ray
            finally:
                ray.shutdown()

    def worker_nodes(self, ray: Any) -> list[dict]:
        return [node for node in ray.nodes()
                if node["Alive"] and "node:__internal_head__" not in node["Resources"]]

    def wait_for_workers(self, ray: Any, count: int, timeout_s: float) -> float:
        """Seconds until exactly `count` worker nodes are alive; TimeoutError after
        `timeout_s`, naming how many there were."""
        start = time.monotonic()
        while True:
            alive = len(self.worker_nodes(ray))
            if alive == count:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{alive} worker nodes alive after {timeout_s:.0f} s, "
                                   f"expected {count}; autoscaler log: {self.log_dir}")
            time.sleep(0.25)


def cluster_config(config: Path | Mapping = FAKE_CLUSTER_YAML,
                   worker_types: Mapping[str, Mapping] | None = None,
                   idle_timeout_s: float | None = None,
                   gcs_address: str | None = None) -> dict:
    """The autoscaling config `fake_cluster` runs (see the module docstring)."""
    cfg = yaml.safe_load(Path(config).read_text()) if isinstance(config, Path) \
        else copy.deepcopy(dict(config))
    if worker_types is not None:
        head = cfg["available_node_types"][HEAD_TYPE]
        cfg["available_node_types"] = {HEAD_TYPE: head}
        for name, node_type in worker_types.items():
            cfg["available_node_types"][name] = {"node_config": {}, **copy.deepcopy(node_type)}
        cfg["max_workers"] = sum(t.get("max_workers", 0) for t in worker_types.values())
    if idle_timeout_s is not None:
        cfg["idle_timeout_minutes"] = idle_timeout_s / 60
    if gcs_address is not None:
        cfg["provider"]["gcs_address"] = gcs_address
    return cfg


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _ensure_token() -> None:
    """~/.ray/auth_token, made as `ray start` would not: a head with RAY_AUTH_MODE=token and no
    token refuses to start (a fresh machine has none until some `ray.init()` made one)."""
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([_ray_executable(), "get-auth-token", "--generate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def _wait_until_started(process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if READY_LINE in text:
            return
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"ray start not up after {timeout_s:.0f} s:\n"
                       f"{log.read_text(errors='replace')[-4000:]}")


def _stop_cluster(process: subprocess.Popen, sid: int, temp_dir: Path) -> None:
    """SIGTERM the session's process group, SIGKILL what outlives the grace period; raises
    AssertionError listing any process of the session still alive after that."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _cluster_processes(sid, temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Fake nodes' raylets are started by the autoscaler inside this session but may sit in
    # process groups of their own: signal every process found, not only the group.
    for pid, _ in _cluster_processes(sid, temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _cluster_processes(sid, temp_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = _cluster_processes(sid, temp_dir)
    assert not survivors, f"processes of the fake cluster still alive: {survivors}"


@contextlib.contextmanager
def fake_cluster(config: Path | Mapping = FAKE_CLUSTER_YAML, *,
                 worker_types: Mapping[str, Mapping] | None = None,
                 idle_timeout_s: float | None = None,
                 start_timeout_s: float = 60.0) -> Iterator[FakeCluster]:
    """Start a fake multinode autoscaling cluster; see the module docstring."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    cfg = cluster_config(config, worker_types, idle_timeout_s, address)
    head = cfg["available_node_types"][HEAD_TYPE]["resources"]
    # Short: Ray's unix socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="psfc-", dir="/tmp"))
    config_path = temp_dir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log = temp_dir / "ray_start.log"
    _ensure_token()
    env = {**os.environ, **DRIVER_ENV, "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [_ray_executable(), "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={int(head.get('CPU', 0))}",
               "--num-gpus=0", f"--temp-dir={temp_dir}",
               f"--autoscaling-config={config_path}", "--include-dashboard=false",
               f"--dashboard-port={_free_port()}",
               f"--ray-client-server-port={_free_port()}",
               f"--metrics-export-port={_free_port()}",
               "--object-store-memory=200000000"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_started(process, log, start_timeout_s)
        yield FakeCluster(address=address, driver_env=dict(DRIVER_ENV), config=cfg,
                          temp_dir=temp_dir, session_id=process.pid)
    finally:
        _stop_cluster(process, process.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
