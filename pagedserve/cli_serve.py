"""`pagedserve serve`: the served system in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from pagedserve.cluster.autoscaler import AutoscalerConfig
from pagedserve.cluster.grpc_common import MAX_MESSAGE_BYTES
from pagedserve.cluster.router import ROUTING_POLICIES, RoutingConfig

READY_PREFIX = "pagedserve: serving"
"""The line `serve` prints once it answers: `pagedserve: serving NAME on HOST:PORT (gRPC)`,
then `and http://HOST:PORT/v1 (OpenAI HTTP)` unless HTTP is off; `ready_addresses` reads it."""
NO_HTTP = -1
"""--http-port value that turns the OpenAI HTTP API off."""
FLEET_READY_PREFIX = "pagedserve: fleet"
"""The line `serve --role fleet` prints once its replicas serve:
`pagedserve: fleet NAME of N replicas in Ray namespace NS; ...`."""
ROLES = ("all", "fleet", "gateway")
"""--role values (launcher.SERVE_ROLES; kept here so parsing the flags needs no Ray)."""


def fleet_ready_line(name: str, replicas: int, namespace: str) -> str:
    return (f"{FLEET_READY_PREFIX} {name} of {replicas} replicas in Ray namespace {namespace}; "
            "Ctrl-C or SIGTERM stops it and them")


def ready_line(name: str, address: str, http_address: str | None) -> str:
    http = f" and {http_address}/v1 (OpenAI HTTP)" if http_address else ""
    return f"{READY_PREFIX} {name} on {address} (gRPC){http}; Ctrl-C or SIGTERM stops it"


def ready_addresses(line: str) -> tuple[str, str | None]:
    """(the gRPC host:port, the OpenAI base URL or None) of a ready line."""
    after = line.split(" on ", 1)[1].split()
    http = after[after.index("and") + 1] if "and" in after else None
    return after[0], http


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (default: the embedded model)")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients pass as `model` (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=50051,
                        help="gRPC port (0: pick a free one)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help=f"OpenAI-compatible HTTP port on --host (0: pick a free one; "
                             f"{NO_HTTP}: no HTTP)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--role", default="all", choices=ROLES,
                        help="all: replicas and gateway in this process; fleet: the replicas "
                             "(named detached coordinators) and the autoscaler, no public "
                             "server; gateway: the public servers over the fleet's replicas "
                             "of this model, found in the cluster of --address")
    parser.add_argument("--discovery-interval-s", type=float, default=2.0,
                        help="gateway role: seconds between looks for added/removed replicas")
    parser.add_argument("--discovery-timeout-s", type=float, default=120.0,
                        help="gateway role: seconds to wait at start for the first replica")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                        help="GPUs per replica")
    parser.add_argument("--replicas", type=int, default=None,
                        help="replicas at start, each a coordinator with its own workers "
                             "(default: --min-replicas, else 1)")
    parser.add_argument("--min-replicas", type=int, default=None,
                        help="fewest replicas the autoscaler keeps (default: --replicas)")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help="most replicas the autoscaler starts; above --min-replicas turns "
                             "autoscaling on (default: --replicas)")
    defaults = AutoscalerConfig()
    parser.add_argument("--target-queue-depth", type=float, default=defaults.target_queue_depth,
                        help="autoscaling: requests in flight per replica to stay under")
    parser.add_argument("--target-kv-usage", type=float, default=defaults.target_kv_usage,
                        help="autoscaling: KV-cache use per replica to stay under (0-1]")
    parser.add_argument("--upscale-delay-s", type=float, default=defaults.upscale_delay_s,
                        help="autoscaling: seconds the load must want more replicas")
    parser.add_argument("--downscale-delay-s", type=float,
                        default=defaults.downscale_delay_s,
                        help="autoscaling: seconds the load must want fewer replicas")
    parser.add_argument("--routing-policy", default=RoutingConfig().policy,
                        choices=sorted(ROUTING_POLICIES),
                        help="how the gateway picks a replica: prefix_affinity (the replica "
                             "caching the prompt's prefix unless much busier), least_loaded, "
                             "round_robin")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV cache")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="KV pool per rank in GiB (default: profiled on GPU, 0.25 on CPU)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="auto (the model dtype) or fp8 (e4m3: twice the KV blocks; scales "
                             "from the checkpoint, else 1.0 or --calculate-kv-scales)")
    parser.add_argument("--calculate-kv-scales", action="store_true",
                        help="fp8 KV: compute missing per-layer scales from the first prefill")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per step")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's, at most 8192)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--load-format", default="auto",
                        help="auto (safetensors) or dummy (random weights, for benchmarks)")
    parser.add_argument("--placement-wait-s", type=float, default=None,
                        help="seconds a replica waits for its GPUs (set it where the Ray "
                             "autoscaler adds nodes, e.g. 900; default: refused at once when "
                             "the cluster has too few)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        help="largest OpenAI HTTP request body in bytes (larger: 413)")
    parser.add_argument("--max-queue-per-replica", type=int, default=1024,
                        help="requests in flight per replica before RESOURCE_EXHAUSTED")
    parser.add_argument("--auth-token-file", default=None,
                        help="bearer tokens, one per line (also: PAGEDSERVE_API_KEYS)")
    parser.add_argument("--tls-cert", default=None, help="PEM server certificate (TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM server private key (TLS)")
    parser.add_argument("--tls-client-ca", default=None,
                        help="PEM CA of client certificates (mutual TLS)")
    parser.add_argument("--log-level", default="info", type=str.lower,
                        choices=["debug", "info", "warning", "error"],
                        help="least severe log level printed; `info` includes one line per "
                             "finished request (logger pagedserve.requests)")


def replica_options(args: argparse.Namespace) -> dict:
    """ServeOptions' `replicas`, `autoscaler` (None without --min/--max-replicas) and `routing`
    from the parsed flags."""
    low, high = args.min_replicas, args.max_replicas
    replicas = args.replicas if args.replicas is not None else low if low is not None else 1
    autoscaler = None
    if low is not None or high is not None:
        autoscaler = AutoscalerConfig(
            min_replicas=low if low is not None else min(replicas, high),
            max_replicas=high if high is not None else max(replicas, low),
            target_queue_depth=args.target_queue_depth, target_kv_usage=args.target_kv_usage,
            upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s)
    return {"replicas": replicas, "autoscaler": autoscaler,
            "routing": RoutingConfig(policy=args.routing_policy)}


def serve(args: argparse.Namespace) -> int:
    from pagedserve.cluster.launcher import ServeOptions
    from pagedserve.config import EngineConfig

    if args.model is not None and not Path(args.model).is_dir() \
            and not args.model.lower().endswith(".gguf"):
        raise FileNotFoundError(f"--model {args.model!r} is not a directory; give a Hugging Face "
                                "checkpoint directory or a .gguf file, or leave --model out "
                                "for the embedded model")
    options = ServeOptions(host=args.host, port=args.port,
                           http_port=None if args.http_port == NO_HTTP else args.http_port,
                           ray_address=args.address,
                           max_queue_per_replica=args.max_queue_per_replica,
                           auth_token_file=args.auth_token_file, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                           served_model_name=args.served_model_name,
                           max_body_bytes=args.max_body_bytes, role=args.role,
                           discovery_interval_s=args.discovery_interval_s,
                           discovery_timeout_s=args.discovery_timeout_s,
                           **replica_options(args))
    model = args.model
    if model is None:
        from pagedserve.engine.default_model import ensure_default_model

        model = str(ensure_default_model())
    config = EngineConfig(model=model, tensor_parallel_size=args.tensor_parallel_size,
                          distributed_executor_backend="ray", block_size=args.block_size,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_gib=args.kv_cache_memory_gib,
                          kv_cache_dtype=args.kv_cache_dtype,
                          calculate_kv_scales=args.calculate_kv_scales,
                          placement_wait_s=args.placement_wait_s,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          device=args.device, dtype=args.dtype, load_format=args.load_format)
    code = asyncio.run(_serve_until_signalled(config, options))
    # Everything is stopped by now (Ray included). Leave without interpreter finalization: once
    # Ray's driver has seen SIGTERM it aborts (SIGABRT) while the interpreter tears down, which
    # would report a clean shutdown as exit status -6.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve_until_signalled(config, options) -> int:
    from pagedserve.cluster.fleet import Fleet
    from pagedserve.cluster.launcher import Server, served_name

    server = Fleet(config, options, served_name(config, options)) if options.role == "fleet" \
        else Server(config, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        if options.role == "fleet":
            await server.start()
            print(fleet_ready_line(server.model_name, len(server.replicas), server.namespace),
                  flush=True)
        else:
            address = await server.start()
            print(ready_line(server.model_name, address, server.http_address), flush=True)
        await stop.wait()
        print("pagedserve: shutting down", file=sys.stderr, flush=True)
    finally:
        await server.stop()
    return 0
