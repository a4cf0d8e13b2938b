"""`pagedserve serve`: the served system in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

READY_PREFIX = "pagedserve: serving"
"""The line `serve` prints once it answers: `pagedserve: serving NAME on HOST:PORT (gRPC)`,
then `and http://HOST:PORT/v1 (OpenAI HTTP)` unless HTTP is off; `ready_addresses` reads it."""
NO_HTTP = -1
"""--http-port value that turns the OpenAI HTTP API off."""


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
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                        help="GPUs per replica")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV cache")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="KV pool per rank in GiB (default: profiled on GPU, 0.25 on CPU)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per step")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's, at most 8192)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--load-format", default="auto",
                        help="auto (safetensors) or dummy (random weights, for benchmarks)")
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
                           served_model_name=args.served_model_name)
    model = args.model
    if model is None:
        from pagedserve.engine.default_model import ensure_default_model

        model = str(ensure_default_model())
    config = EngineConfig(model=model, tensor_parallel_size=args.tensor_parallel_size,
                          distributed_executor_backend="ray", block_size=args.block_size,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_gib=args.kv_cache_memory_gib,
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
    from pagedserve.cluster.launcher import Server

    server = Server(config, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        address = await server.start()
        name = server.gateway.model_name
        print(ready_line(name, address, server.http_address), flush=True)
        await stop.wait()
        print("pagedserve: shutting down", file=sys.stderr, flush=True)
    finally:
        await server.stop()
    return 0
