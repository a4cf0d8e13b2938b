"""`pagedserve status --url HOST:PORT`: what a running server says of itself (GetServerStatus):
its replicas with their queues, KV-cache use and GPUs, and the throughput of the last minute."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

GIB = 1 << 30


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:50051", help="the server's gRPC host:port")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="bearer token (taken from $PAGEDSERVE_API_KEY when not given)")
    parser.add_argument("--tls-ca", default=None,
                        help="PEM CA of the server's certificate: connect with TLS "
                             "(plaintext without it)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def fetch_status(url: str, api_key: str | None = None, tls_ca: str | None = None,
                 timeout: float = 10.0):
    """The server's pb.ServerStatus; raises the pagedserve error of a failed call."""
    import grpc

    from pagedserve.client.retry import raise_from_rpc
    from pagedserve.protos.v1 import generation_pb2 as pb
    from pagedserve.protos.v1 import generation_pb2_grpc

    if tls_ca is None:
        channel = grpc.insecure_channel(url)
    else:
        credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        channel = grpc.secure_channel(url, credentials)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    with channel:
        try:
            return generation_pb2_grpc.GenerationStub(channel).GetServerStatus(
                pb.GetServerStatusRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise_from_rpc(error)


def status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    reply = fetch_status(args.url, args.api_key, args.tls_ca, args.timeout)
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_status(reply, args.url))
    return 0


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in [header, *rows]]


def format_status(reply, url: str) -> str:
    """The human-readable report of a pb.ServerStatus."""
    load = reply.load
    lines = [
        f"pagedserve at {url}: model {reply.model}, {load.num_replicas_up} of "
        f"{len(reply.replicas)} replicas up",
        f"requests: {load.num_running} running, {load.num_waiting} waiting, "
        f"{load.num_swapped} swapped; {load.gateway_in_flight} in flight at the gateway "
        f"(limit {load.gateway_queue_limit})",
        f"KV cache: {_percent(load.kv_cache_usage)} ({load.kv_blocks_used} of "
        f"{load.kv_blocks_total} blocks); {load.num_preemptions_total} preemptions",
        f"throughput over the last {reply.throughput_window_seconds:.0f} s: "
        f"{reply.prompt_tokens_per_second:.1f} prompt tokens/s, "
        f"{reply.generation_tokens_per_second:.1f} generated tokens/s, "
        f"{reply.requests_per_second:.2f} requests/s", ""]
    lines += _table(["replica", "up", "address", "running", "waiting", "swapped", "in flight",
                     "KV cache"],
                    [[str(r.index), "yes" if r.up else "no", r.address, str(r.load.num_running),
                      str(r.load.num_waiting), str(r.load.num_swapped),
                      str(r.load.gateway_in_flight), _percent(r.load.kv_cache_usage)]
                     for r in reply.replicas])
    gpus = [[str(r.index), str(g.rank), str(g.index), g.name,
             f"{g.memory_used_bytes / GIB:.1f} / {g.memory_total_bytes / GIB:.1f} GiB",
             _percent(g.utilization) if g.HasField("utilization") else "-",
             f"{g.power_watts:.0f} W" if g.HasField("power_watts") else "-",
             f"{g.temperature_celsius:.0f} C" if g.HasField("temperature_celsius") else "-"]
            for r in reply.replicas for g in r.gpus]
    lines.append("")
    if gpus:
        lines += _table(["replica", "rank", "gpu", "name", "memory", "util", "power", "temp"],
                        gpus)
    else:
        lines.append("GPUs: none reported (CPU replicas, or no NVIDIA driver)")
    return "\n".join(lines)
