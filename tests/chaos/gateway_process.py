"""A gateway alone in a process of its own, in front of coordinators that outlive it (the
tests' own Ray cluster holds them), so that a test can SIGKILL it as a crash would.

    python tests/chaos/gateway_process.py --port 0 --coordinators 127.0.0.1:P1,127.0.0.1:P2
    python tests/chaos/gateway_process.py --port 0 --ray-address ADDR --namespace NS \
        --coordinator-names NAME1,NAME2

With --ray-address it joins that Ray cluster and finds the coordinators by name, so that a
coordinator Ray restarted on a new port is found again (as `pagedserve serve` does). It prints
`READY host:port` once it serves (the public Generation service, health, reflection), and stops
on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import grpc  # noqa: E402

from pagedserve.cluster.gateway import SERVICE, Gateway  # noqa: E402
from pagedserve.cluster.grpc_common import (  # noqa: E402
    SERVER_OPTIONS,
    add_health_and_reflection,
    add_servicer,
    set_serving,
)
from pagedserve.protos.v1 import generation_pb2_grpc  # noqa: E402

READY = "READY "
MODEL_NAME = "chaos-model"


async def serve(args: argparse.Namespace) -> None:
    resolvers = None
    if args.ray_address:
        import ray

        await asyncio.to_thread(ray.init, address=args.ray_address, namespace=args.namespace,
                                logging_level="ERROR")
        handles = [ray.get_actor(name) for name in args.coordinator_names.split(",")]
        addresses = [await handle.serve_grpc.remote("127.0.0.1") for handle in handles]
        resolvers = [lambda handle=handle: handle.serve_grpc.remote("127.0.0.1")
                     for handle in handles]
    else:
        addresses = args.coordinators.split(",")
    gateway = Gateway(MODEL_NAME, None, addresses, args.max_queue_per_replica,
                      resolvers=resolvers)
    await gateway.start()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_servicer(generation_pb2_grpc.add_GenerationServicer_to_server, gateway, server)
    gateway.health = add_health_and_reflection(server, [SERVICE])
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await set_serving(gateway.health, [SERVICE], True)
    print(f"{READY}127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await gateway.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--coordinators", default="")
    parser.add_argument("--ray-address", default="")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--coordinator-names", default="")
    parser.add_argument("--max-queue-per-replica", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
