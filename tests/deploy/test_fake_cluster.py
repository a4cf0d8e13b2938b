"""tests/helpers/fake_cluster.py against Ray's real autoscaler (v1, fake multinode provider):
GPU demand adds a fake GPU node, an idle node goes after the idle timeout, and nothing of the
cluster outlives the context."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.fake_cluster import HEAD_TYPE, cluster_config, fake_cluster

pytestmark = pytest.mark.timeout(240)

IDLE_TIMEOUT_S = 6.0
GPU_TYPE = {"gpu_tp1": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200_000_000},
                        "min_workers": 0, "max_workers": 2}}


def _raylets(cluster) -> list[int]:
    return [pid for pid, command in cluster.processes()
            if command and command.split()[0].endswith("/raylet")]


def test_gpu_demand_adds_a_node_and_idle_removes_it():
    from ray.util.placement_group import placement_group, remove_placement_group

    with fake_cluster(worker_types=GPU_TYPE, idle_timeout_s=IDLE_TIMEOUT_S) as cluster:
        temp_dir = cluster.temp_dir
        with cluster.connect() as ray:
            assert cluster.worker_nodes(ray) == []
            assert ray.cluster_resources().get("GPU", 0) == 0
            group = placement_group([{"GPU": 1, "CPU": 1}], strategy="STRICT_PACK")
            start = time.monotonic()
            ray.get(group.ready(), timeout=60)
            scale_up_s = time.monotonic() - start
            workers = cluster.worker_nodes(ray)
            assert len(workers) == 1
            assert workers[0]["Resources"]["GPU"] == 1.0
            assert workers[0]["Resources"]["CPU"] == 1.0
            assert scale_up_s < 30, scale_up_s
            # The fake node's raylet is one of the processes the exit check covers.
            assert len(_raylets(cluster)) == 2

            remove_placement_group(group)
            removed = time.monotonic()
            # Still there well inside the idle timeout: it goes because it is idle, not
            # because anything failed.
            time.sleep(IDLE_TIMEOUT_S / 3)
            assert len(cluster.worker_nodes(ray)) == 1
            cluster.wait_for_workers(ray, 0, timeout_s=IDLE_TIMEOUT_S + 30)
            scale_down_s = time.monotonic() - removed
            assert scale_down_s >= IDLE_TIMEOUT_S
            # The line logged when the node is picked, before it is terminated (the event
            # summary "Removing 1 nodes ... (idle)." comes at a later monitor pass).
            assert re.search(r"StandardAutoscaler: Terminating the node with id \S+ and ip "
                             r"\S+\. \(idle\)", (cluster.log_dir / "monitor.log").read_text())
            assert len(_raylets(cluster)) == 1
    assert not temp_dir.exists()


def test_cluster_config_replaces_worker_types_and_keeps_the_head():
    cfg = cluster_config(worker_types=GPU_TYPE, idle_timeout_s=30, gcs_address="127.0.0.1:1")
    assert sorted(cfg["available_node_types"]) == ["gpu_tp1", HEAD_TYPE]
    assert cfg["available_node_types"]["gpu_tp1"]["node_config"] == {}
    assert cfg["available_node_types"][HEAD_TYPE]["resources"] == {"CPU": 2}
    assert cfg["max_workers"] == 2
    assert cfg["idle_timeout_minutes"] == 0.5
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1"
    assert cfg["provider"]["type"] == "fake_multinode"


@pytest.mark.slow  # about 80 s on a busy 2-core machine
def test_pagedserve_serves_on_the_fake_cluster(tmp_path, monkeypatch):
    """The README's one-machine trial: `pagedserve serve --address` joins the cluster started
    from deploy/ray/fake-multinode.yaml and answers; stopping it leaves the cluster clean."""
    from pagedserve.cli_serve import READY_PREFIX, ready_addresses
    from pagedserve.client import Client
    from pagedserve.engine.default_model import ensure_tiny_test_model

    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))
    model = ensure_tiny_test_model()
    with fake_cluster() as cluster:
        env = {**os.environ, **cluster.driver_env, "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "pagedserve", "serve", "--address", cluster.address,
             "--device", "cpu", "--model", model, "--port", "0", "--http-port", "-1",
             "--replicas", "1", "--log-level", "warning"],
            stdout=subprocess.PIPE, text=True, env=env)
        try:
            line = server.stdout.readline()
            while line and not line.startswith(READY_PREFIX):
                line = server.stdout.readline()
            assert line, f"serve exited with {server.wait()}"
            address, _ = ready_addresses(line)
            with Client(address, timeout=60) as client:
                result = client.generate([1, 2, 3], max_tokens=4, temperature=0,
                                         ignore_eos=True)
            assert len(result.outputs[0].token_ids) == 4
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                assert server.wait(timeout=90) == 0
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
