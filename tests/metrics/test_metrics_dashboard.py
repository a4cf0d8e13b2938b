"""The monitoring files use the metrics that exist: every PromQL query of the Grafana dashboard
(panels and template variables) names only metrics the gateway's registry exposes, and the
Prometheus scrape config and the ServiceMonitor scrape the gateway's /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import yaml

from pagedserve.cluster import wire
from pagedserve.engine.core import EngineStats, SequenceUpdate
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.metrics.coordinator_metrics import StepRecorder
from pagedserve.metrics.gateway_metrics import GatewayMetrics
from pagedserve.metrics.gpu import GpuReading
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from tests.helpers.prometheus_text import names_of, parse_samples

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\bpagedserve:[A-Za-z0-9_:]+")


def exposed_names() -> set[str]:
    """Every sample name a scrape shows once a replica with a GPU served a request."""
    reading = GpuReading(0, "GPU-a", "NVIDIA H200", 1, 2, 0.5, 300.0, 50.0)
    recorder = StepRecorder(EngineStats(kv_blocks_total=4))
    recorder.observe_step(EngineStats(step_tokens=3))
    replica = SimpleNamespace(label="0", up=True, stats=wire.snapshot_to_proto(
        recorder.snapshot()), gpus=[wire.gpu_to_proto(0, reading)])
    metrics = GatewayMetrics("tiny", lambda: [replica])
    metrics.start(max_model_len=64, eos_token_ids=[2])
    requests = metrics.requests
    requests.admitted("r", "0", 3, arrival=0.0)
    requests.on_batch(cpb.StepBatch(step_time=1.0, starts=[cpb.RequestStart(request_id="r")]),
                      [SequenceUpdate("r", 0, [5])], [], [], [])
    requests.on_batch(cpb.StepBatch(step_time=2.0), [SequenceUpdate("r", 0, [6], "length")],
                      [RequestOutput("r", None, [], [CompletionOutput(0, finish_reason="length")],
                                     finished=True)], [], [])
    requests.finished("r")
    return names_of(parse_samples(metrics.render()[0]))


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels):
        for panel in panels:
            if panel["type"] == "row":
                walk(panel.get("panels", []))
                continue
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            queries.extend(target["expr"] for target in panel["targets"])

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_every_dashboard_query_names_metrics_the_registry_exposes():
    exposed = exposed_names()
    queries = dashboard_queries()
    assert len(queries) == 38  # 36 targets of 18 panels, 2 template variables
    for query in queries:
        used = set(METRIC_NAME.findall(query))
        assert used, f"no pagedserve metric in {query!r}"
        assert used <= exposed, f"{sorted(used - exposed)} of {query!r} are not exposed"


def test_prometheus_and_the_service_monitor_scrape_the_gateway_metrics_path():
    config = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert (job["job_name"], job["metrics_path"]) == ("pagedserve", "/metrics")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    monitor = yaml.safe_load((ROOT / "k8s" / "monitoring" / "servicemonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1",
                                                        "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics",
                                             "interval": "15s", "scrapeTimeout": "10s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == monitor["metadata"]["labels"]
