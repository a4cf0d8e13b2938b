"""GPU telemetry: with a fake pynvml the readings of a rank's GPUs come through the rank
actor's method, the wire and the collector with their labels; without the library or a driver
there are no GPU metrics, one log line, and no error."""

from __future__ import annotations

import logging
import sys
from types import ModuleType, SimpleNamespace

import pytest

from pagedserve.cluster import wire
from pagedserve.executor.ray import RankActor
from pagedserve.metrics import gpu
from pagedserve.metrics.gateway_metrics import GatewayMetrics
from pagedserve.metrics.gpu import GpuReading, NvmlReader
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from tests.helpers.prometheus_text import parse_samples, value

GIB = 1 << 30


class NVMLError(Exception):
    pass


def fake_nvml(init_error: Exception | None = None) -> ModuleType:
    """pynvml with two GPUs; the second reports no power (as some boards do)."""
    devices = [SimpleNamespace(uuid="GPU-aaaa", name="NVIDIA H200", used=12 * GIB,
                               total=141 * GIB, util=87, milliwatts=412_500, temperature=61),
               SimpleNamespace(uuid="GPU-bbbb", name="NVIDIA H200", used=GIB, total=141 * GIB,
                               util=0, milliwatts=None, temperature=35)]
    module = ModuleType("pynvml")

    def init() -> None:
        if init_error is not None:
            raise init_error

    def power(index: int) -> int:
        if devices[index].milliwatts is None:
            raise NVMLError("Not Supported")
        return devices[index].milliwatts

    def by_index(index: int) -> int:
        if index >= len(devices):
            raise NVMLError("Invalid Argument")
        return index

    module.__dict__.update(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlInit=init,
        nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetHandleByUUID=lambda uuid: [d.uuid for d in devices].index(uuid),
        nvmlDeviceGetIndex=lambda h: h,
        nvmlDeviceGetUUID=lambda h: devices[h].uuid,
        nvmlDeviceGetName=lambda h: devices[h].name.encode(),  # old releases give bytes
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=devices[h].used,
                                                          total=devices[h].total),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=devices[h].util),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetTemperature=lambda h, sensor: devices[h].temperature)
    return module


@pytest.fixture
def fresh_reader(monkeypatch):
    """A new per-process NVML reader (the module's own remembers an earlier failure)."""
    monkeypatch.setattr(gpu, "_reader", NvmlReader())


def ray_gave_gpus(monkeypatch, ids: list[str]) -> None:
    import ray

    context = SimpleNamespace(get_accelerator_ids=lambda: {"GPU": ids})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)


def test_readings_by_index_and_uuid_leave_out_what_a_board_does_not_report(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    first, second = NvmlReader().read(["0", "GPU-bbbb"])
    assert first == GpuReading(index=0, uuid="GPU-aaaa", name="NVIDIA H200",
                               memory_used_bytes=12 * GIB, memory_total_bytes=141 * GIB,
                               utilization=0.87, power_watts=412.5, temperature_celsius=61.0)
    assert (second.index, second.power_watts, second.utilization) == (1, None, 0.0)


def test_a_gpu_nvml_cannot_find_is_left_out(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    with caplog.at_level(logging.WARNING, logger="pagedserve.metrics.gpu"):
        readings = NvmlReader().read(["1", "7"])
    assert [r.index for r in readings] == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "GPU 7: NVML reading failed: Invalid Argument"]


def test_the_rank_actor_reports_its_gpus_and_they_reach_metrics_with_their_labels(
        monkeypatch, fresh_reader):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    ray_gave_gpus(monkeypatch, ["1"])
    readings = RankActor.gpu_telemetry(None)  # the method body, as the actor runs it
    assert [(r.index, r.uuid) for r in readings] == [(1, "GPU-bbbb")]
    replica = SimpleNamespace(label="3", up=True, stats=cpb.EngineSnapshot(),
                              gpus=[wire.gpu_to_proto(0, readings[0])])
    samples = parse_samples(GatewayMetrics("tiny", lambda: [replica]).render()[0])
    labels = {"model_name": "tiny", "replica": "3", "index": "1", "uuid": "GPU-bbbb"}
    assert value(samples, "pagedserve:gpu_memory_used_bytes", **labels) == GIB
    assert value(samples, "pagedserve:gpu_memory_total_bytes", **labels) == 141 * GIB
    assert value(samples, "pagedserve:gpu_utilization_perc", **labels) == 0.0
    assert value(samples, "pagedserve:gpu_temperature_celsius", **labels) == 35.0
    assert value(samples, "pagedserve:gpu_power_watts", **labels) is None  # not reported


@pytest.mark.parametrize("nvml", [None, fake_nvml(NVMLError("NVML Shared Library Not Found"))],
                         ids=["no nvidia-ml-py", "no driver"])
def test_without_nvml_there_are_no_gpu_metrics_and_one_log_line(monkeypatch, caplog,
                                                                fresh_reader, nvml):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` fails
    ray_gave_gpus(monkeypatch, ["0"])
    with caplog.at_level(logging.WARNING, logger="pagedserve.metrics.gpu"):
        assert RankActor.gpu_telemetry(None) == []
        assert RankActor.gpu_telemetry(None) == []
    [record] = caplog.records
    assert record.getMessage().startswith("GPU telemetry is off: NVML is unavailable")


def test_a_rank_without_gpus_never_touches_nvml(monkeypatch, caplog, fresh_reader):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    ray_gave_gpus(monkeypatch, [])
    with caplog.at_level(logging.WARNING, logger="pagedserve.metrics.gpu"):
        assert RankActor.gpu_telemetry(None) == []
    assert caplog.records == []
