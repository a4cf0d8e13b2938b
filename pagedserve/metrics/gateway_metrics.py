"""Everything one gateway exposes at GET /metrics, in a registry of its own (several gateways
in one process, as in tests, never collide): the request metrics it observes and the engine and
GPU metrics of every replica behind it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pagedserve.metrics.engine_collector import EngineCollector, ReplicaView
from pagedserve.metrics.request_metrics import RequestRecorder


class GatewayMetrics:
    """The registry and its recorders; `start` (once the model's limits are known) adds the
    request metrics, whose token buckets end at the context length."""

    def __init__(self, model_name: str, replicas: Callable[[], Sequence[ReplicaView]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(model_name, replicas))
        self.requests: RequestRecorder | None = None
        """The request metrics; None until `start`."""

    def start(self, max_model_len: int, eos_token_ids: Iterable[int]) -> None:
        self.requests = RequestRecorder(self.registry, self.model_name, max_model_len,
                                        eos_token_ids)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition: (body, content type) for a GET /metrics. Reads
        only what the gateway holds: no call to a replica, so it never waits."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
