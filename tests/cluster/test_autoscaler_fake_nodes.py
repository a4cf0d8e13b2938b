"""pagedserve's autoscaler with Ray's, on Ray's fake multinode provider: sustained load asks for a
second replica, whose coordinator no node has room for, so the Ray autoscaler adds a node and
the replica starts there; idle drains it and the node goes after its idle timeout; no request
fails, and every node and Ray process is gone after shutdown (`fake_cluster` checks)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pagedserve.cluster.autoscaler import AutoscalerConfig
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.engine.engine_utils import make_prompts
from tests.gateway.gateway_utils import LoopThread, started_server
from tests.gateway.test_replicas_autoscale import stream_to_end, until
from tests.helpers.fake_cluster import fake_cluster
from tests.helpers.tiny_models import save_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The head (CPU: 2, deploy/ray/fake-multinode.yaml) holds one replica: its coordinator (1 CPU)
# and its rank (1 CPU). A second replica needs a node of this type.
CPU_NODE = {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1}
SCALING = AutoscalerConfig(min_replicas=1, max_replicas=2, target_queue_depth=3,
                           target_kv_usage=1.0, upscale_delay_s=1.0, downscale_delay_s=3.0,
                           interval_s=0.2)


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """This module connects to a fake multinode cluster instead (overrides the folder's local
    one); a connection another module left is closed first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


def test_load_adds_a_node_and_idle_gives_it_back(tmp_path):
    import ray

    model = save_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=2048)
    config = EngineConfig(model=str(model), device="cpu",
                          num_gpu_blocks_override=512, max_num_seqs=4, cpu_threads=1,
                          distributed_executor_backend="ray", placement_wait_s=150)
    prompts = make_prompts([5 + i % 7 for i in range(8)], seed=52)
    aio = LoopThread()
    try:
        with fake_cluster(worker_types={"cpu": CPU_NODE}, idle_timeout_s=6) as cluster, \
                cluster.driver_environment():
            options = ServeOptions(host="127.0.0.1", port=0, ray_address=cluster.address,
                                   replicas=1, autoscaler=SCALING)
            with started_server(aio, config, options) as server:
                assert cluster.worker_nodes(ray) == []
                gateway = server.gateway

                async def main():
                    async with grpc.aio.insecure_channel(server.address) as channel:
                        stub = generation_pb2_grpc.GenerationStub(channel)
                        streams = [asyncio.ensure_future(stream_to_end(stub, p, 600))
                                   for p in prompts]
                        await until(lambda: len(gateway.replicas) == 2, 150, "scale-up")
                        nodes_when_scaled = len(cluster.worker_nodes(ray))
                        results = await asyncio.gather(*streams)
                        await until(lambda: len(server.autoscaler.decisions) == 2, 90,
                                    "scale-down")
                        return nodes_when_scaled, results

                nodes_when_scaled, results = aio.run(main(), timeout=280)
                assert nodes_when_scaled == 1
                assert results == [(pb.FINISH_REASON_LENGTH, 600)] * len(prompts)
                assert server.autoscaler.decisions == [(1, 2), (2, 1)]
                assert len(gateway.replicas) == len(server.coordinators) == 1
            # The drained replica's node is idle now: the Ray autoscaler lets it go.
            cluster.wait_for_workers(ray, 0, timeout_s=90)
            ray.shutdown()
    finally:
        aio.close()
