"""`pagedserve bench serve`: load a running server and print the latency table."""

from __future__ import annotations

import argparse
import asyncio
import json


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("serve",), help="what to benchmark")
    parser.add_argument("--url", default="127.0.0.1:50051", help="the gateway's host:port")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (random)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens (EOS off)")
    parser.add_argument("--rates", default="8,16,32,inf",
                        help="request rates in req/s, Poisson arrivals; inf: all at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the runs here")


def bench(args: argparse.Namespace) -> int:
    import grpc

    from pagedserve.cluster.load_generator import format_table, random_prompts, run_load
    from pagedserve.protos.v1 import generation_pb2 as pb
    from pagedserve.protos.v1 import generation_pb2_grpc

    with grpc.insecure_channel(args.url) as channel:
        info = generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=30)
    prompts = random_prompts(args.num_requests, args.input_len, info.vocab_size, args.seed)
    lengths = [args.output_len] * args.num_requests
    runs = [asyncio.run(run_load(args.url, prompts, lengths, float(rate), args.seed))
            for rate in args.rates.split(",")]
    print(format_table(runs))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"url": args.url, "runs": runs}, handle, indent=1)
    return 0
