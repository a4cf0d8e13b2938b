"""A fake Generation service on 127.0.0.1 for the client tests: it records each call and
answers with canned messages, injected failures, or a stream held open until cancelled."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Failure:
    """An error to answer one call with."""

    code: grpc.StatusCode
    details: str = ""
    trailing: tuple[tuple[str, str], ...] = ()


@dataclass
class Recorded:
    method: str
    request: object
    metadata: dict[str, str]


def canned_response(request_id: str = "req-1") -> pb.GenerateResponse:
    """Two completions: one stopped by a stop string with logprobs, one at the length limit."""
    top = [pb.TopLogprob(token_id=7, logprob=-0.1), pb.TopLogprob(token_id=8, logprob=-2.5)]
    return pb.GenerateResponse(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        completions=[
            pb.Completion(index=0, text="Hello", token_ids=[7, 9],
                          finish_reason=pb.FINISH_REASON_STOP, stop_string="\n",
                          logprobs=[pb.TokenLogprob(token_id=7, logprob=-0.1, rank=1, top=top),
                                    pb.TokenLogprob(token_id=9, logprob=-0.7, rank=2)],
                          cumulative_logprob=-0.8),
            pb.Completion(index=1, text="Hi there", token_ids=[5, 6, 4],
                          finish_reason=pb.FINISH_REASON_LENGTH),
        ],
        prompt_logprobs=[pb.TokenLogprob(token_id=2, logprob=-3.0, rank=4),
                         pb.TokenLogprob(token_id=3, logprob=-1.0, rank=1)],
        usage=pb.Usage(prompt_tokens=3, completion_tokens=5, cached_prompt_tokens=2),
        timing=pb.Timing(queue_seconds=0.01, time_to_first_token_seconds=0.05,
                         total_seconds=0.2),
    )


def canned_stream(request_id: str = "req-s") -> list[pb.GenerateStreamResponse]:
    """Three deltas over two completions, then the final message (finish reasons only)."""
    delta = lambda i, ids, text: pb.GenerateStreamResponse(  # noqa: E731
        request_id=request_id, delta=pb.Delta(index=i, token_ids=ids, text=text))
    final = pb.GenerateResponse(
        request_id=request_id, prompt_token_ids=[1, 2],
        completions=[pb.Completion(index=0, finish_reason=pb.FINISH_REASON_STOP,
                                   stop_token_id=2),
                     pb.Completion(index=1, finish_reason=pb.FINISH_REASON_LENGTH)],
        usage=pb.Usage(prompt_tokens=2, completion_tokens=3))
    return [delta(0, [5], "He"), delta(1, [6], "Yo"), delta(0, [7], "llo"),
            pb.GenerateStreamResponse(request_id=request_id, final=final)]


@dataclass
class FakeGeneration(pb_grpc.GenerationServicer):
    calls: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    """Consumed one per call (any method), before it answers."""
    response: pb.GenerateResponse = field(default_factory=canned_response)
    stream: list[pb.GenerateStreamResponse] = field(default_factory=canned_stream)
    stream_error: Failure | None = None
    """Raised after the stream's messages (instead of ending it)."""
    hold_stream: bool = False
    """After the stream's messages, wait (up to 10 s) for the client to cancel."""
    delay_s: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append(Recorded(method, request, dict(context.invocation_metadata())))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            if failure.trailing:
                context.set_trailing_metadata(failure.trailing)
            context.abort(failure.code, failure.details)
        if self.delay_s:
            time.sleep(self.delay_s)

    def methods(self, name: str | None = None) -> list[str]:
        return [c.method for c in self.calls if name is None or c.method == name]

    def Generate(self, request, context):
        self._enter("Generate", request, context)
        return self.response

    def GenerateStream(self, request, context):
        context.add_callback(self.cancelled.set)
        self._enter("GenerateStream", request, context)
        yield from self.stream
        if self.stream_error is not None:
            context.abort(self.stream_error.code, self.stream_error.details)
        if self.hold_stream:
            self.cancelled.wait(10)

    def Abort(self, request, context):
        self._enter("Abort", request, context)
        return pb.AbortResponse(aborted_request_ids=list(request.request_ids)[:1])

    def Tokenize(self, request, context):
        self._enter("Tokenize", request, context)
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def Detokenize(self, request, context):
        self._enter("Detokenize", request, context)
        return pb.DetokenizeResponse(text="".join(chr(i) for i in request.token_ids))

    def GetModelInfo(self, request, context):
        self._enter("GetModelInfo", request, context)
        return pb.ModelInfo(model=request.model or "tiny", max_model_len=2048, vocab_size=256,
                            eos_token_ids=[2], block_size=16, num_kv_blocks=100,
                            dtype="bfloat16", max_num_seqs=8, num_replicas=2,
                            tensor_parallel_size=1)

    def GetServerLoad(self, request, context):
        self._enter("GetServerLoad", request, context)
        return pb.ServerLoad(num_running=3, num_waiting=1, kv_blocks_used=10,
                             kv_blocks_total=100, kv_cache_usage=0.1, num_replicas_up=2)


class FakeServer:
    """A grpc server with one FakeGeneration on 127.0.0.1, on a port the OS picks."""

    def __init__(self, servicer: FakeGeneration | None = None,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = servicer or FakeGeneration()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)
