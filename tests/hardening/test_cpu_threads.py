"""Torch's CPU thread count is chosen deliberately: EngineConfig.cpu_threads, else
OMP_NUM_THREADS, else half the available physical cores (at most 4); a CPU Worker applies it."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.workers import host_resources
from pagedserve.workers.host_resources import (
    cgroup_cpu_limit,
    choose_cpu_threads,
    default_cpu_threads,
    omp_num_threads,
    physical_cores,
)
from pagedserve.workers.worker import Worker


@pytest.mark.parametrize(("cores", "threads"), [
    (1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (16, 4), (128, 4),
])
def test_default_is_half_the_cores_at_most_four(cores, threads):
    assert default_cpu_threads(cores) == threads


def test_the_field_wins_over_omp_num_threads_as_ray_sets_it():
    assert choose_cpu_threads(3, {"OMP_NUM_THREADS": "1"}, cores=8) == (
        3, "EngineConfig.cpu_threads")


def test_omp_num_threads_wins_over_the_default():
    assert choose_cpu_threads(None, {"OMP_NUM_THREADS": "6"}, cores=2) == (6, "OMP_NUM_THREADS")


def test_default_names_the_cores_it_was_derived_from():
    assert choose_cpu_threads(None, {}, cores=16) == (
        4, "default for 16 available physical cores")


def test_default_counts_the_cores_of_this_process(monkeypatch):
    monkeypatch.setattr(host_resources, "available_cores", lambda: 6)
    assert choose_cpu_threads(None, {}) == (3, "default for 6 available physical cores")


@pytest.mark.parametrize(("value", "count"), [("4", 4), ("4,2", 4), (" 2 ", 2), ("", None)])
def test_omp_num_threads_is_parsed_like_openmp(value, count):
    assert omp_num_threads({"OMP_NUM_THREADS": value}) == count


@pytest.mark.parametrize("value", ["0", "-3", "four"])
def test_bad_omp_num_threads_is_ignored_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING, logger="pagedserve.workers.host_resources"):
        assert choose_cpu_threads(None, {"OMP_NUM_THREADS": value}, cores=4) == (
            2, "default for 4 available physical cores")
    assert caplog.messages == [f"ignoring OMP_NUM_THREADS={value!r}: not a positive integer"]


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({}, None),
])
def test_cgroup_cpu_quota_v2_and_v1(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_hyperthreads_of_one_core_count_once(tmp_path):
    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores({0, 1, 2, 3, 4}, tmp_path) == 3
    assert physical_cores({0, 1}, tmp_path) == 1
    assert physical_cores({0, 7}, tmp_path) == 2  # cpu7 has no topology: logical count


def test_available_cores_is_capped_by_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(host_resources, "physical_cores", lambda cpus: 32)
    monkeypatch.setattr(host_resources, "cgroup_cpu_limit", lambda: 2)
    assert host_resources.available_cores() == 2
    monkeypatch.setattr(host_resources, "cgroup_cpu_limit", lambda: None)
    assert host_resources.available_cores() == 32


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize(("cpu_threads", "omp", "threads", "source"), [
    (1, "2", 1, "EngineConfig.cpu_threads"),
    (2, "1", 2, "EngineConfig.cpu_threads"),
    (None, "2", 2, "OMP_NUM_THREADS"),
    (None, "1", 1, "OMP_NUM_THREADS"),
])
def test_cpu_worker_sets_and_logs_its_threads_once(config_only_checkpoint, monkeypatch, caplog,
                                                    cpu_threads, omp, threads, source):
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(3)
    with caplog.at_level(logging.INFO, logger="pagedserve.workers.worker"):
        Worker(EngineConfig(device="cpu", cpu_threads=cpu_threads), str(config_only_checkpoint),
               "cpu")
    assert torch.get_num_threads() == threads
    assert caplog.messages == [f"rank 0: {threads} torch CPU threads ({source})"]


@pytest.mark.usefixtures("restore_torch_threads")
def test_cpu_worker_default_follows_the_rule(config_only_checkpoint, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(host_resources, "available_cores", lambda: 8)
    Worker(EngineConfig(device="cpu"), str(config_only_checkpoint), "cpu")
    assert torch.get_num_threads() == 4


@pytest.mark.usefixtures("restore_torch_threads")
def test_gpu_worker_keeps_torch_threads_unless_asked(config_only_checkpoint, monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    Worker(EngineConfig(device="cuda"), str(config_only_checkpoint), "cuda")
    assert torch.get_num_threads() == 3
    Worker(EngineConfig(device="cuda", cpu_threads=2), str(config_only_checkpoint), "cuda")
    assert torch.get_num_threads() == 2
