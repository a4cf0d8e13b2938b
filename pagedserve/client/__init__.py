"""pagedserve.client: the Python SDK of a pagedserve gateway (gRPC, pagedserve.v1).

    from pagedserve.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=16).outputs[0].text)

Client is blocking, AsyncClient is for asyncio; both take sampling arguments named like
pagedserve.SamplingParams fields and return results shaped like the offline RequestOutput.
Failures raise pagedserve.errors classes. This package imports only grpc, protobuf, the
generated stubs and pagedserve.errors: it installs alone as `pagedserve-client`.
"""

from pagedserve.client.async_client import AsyncClient, AsyncGenerationStream
from pagedserve.client.events import StreamDelta, StreamEvent, StreamFinal
from pagedserve.client.options import ClientOptions, TLSConfig, client_version
from pagedserve.client.requests import SAMPLING_FIELDS
from pagedserve.client.results import (
    Completion,
    GenerationResult,
    ModelInfo,
    ServerLoad,
    Timing,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from pagedserve.client.retry import RETRY_AFTER_KEY, RetryPolicy
from pagedserve.client.sync_client import Client, GenerationStream

__all__ = [
    "RETRY_AFTER_KEY",
    "SAMPLING_FIELDS",
    "AsyncClient",
    "AsyncGenerationStream",
    "Client",
    "ClientOptions",
    "Completion",
    "GenerationResult",
    "GenerationStream",
    "ModelInfo",
    "RetryPolicy",
    "ServerLoad",
    "StreamDelta",
    "StreamEvent",
    "StreamFinal",
    "TLSConfig",
    "Timing",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "client_version",
]
