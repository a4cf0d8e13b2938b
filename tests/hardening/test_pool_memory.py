"""A KV or swap pool larger than the memory left is refused with ResourceExhausted naming the
field that sized it, before anything is allocated (it used to fail in the allocator)."""

from __future__ import annotations

import re

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.errors import ResourceExhausted
from pagedserve.workers import host_resources, worker
from pagedserve.workers.host_resources import cgroup_memory_available, meminfo_available
from pagedserve.workers.worker import Worker

GIB = 1 << 30
EOS = (2,)


def make_worker(checkpoint, device: str = "cpu", **config) -> Worker:
    return Worker(EngineConfig(device=device, cpu_threads=1, **config), str(checkpoint), device)


@pytest.fixture(autouse=True)
def _threads(restore_torch_threads):
    """CPU workers set torch's thread count; put it back."""


@pytest.fixture
def host_memory(monkeypatch):
    """Pretend this much host memory is available (bytes)."""
    def set_available(available: int) -> None:
        monkeypatch.setattr(worker, "available_host_memory", lambda: available)
    return set_available


def test_a_kv_pool_beyond_host_memory_is_refused_before_allocating(config_only_checkpoint):
    """The real host memory: 1e6 GiB is more than any test machine has."""
    rank = make_worker(config_only_checkpoint, kv_cache_memory_gib=1e6)
    blocks = rank.num_gpu_blocks(64)
    pattern = (r"EngineConfig\.kv_cache_memory_gib=1000000\.0 asks for 1000000\.00 GiB for the "
               r"KV pool of rank 0, but only \d+\.\d\d GiB of available host memory is left; "
               r"lower kv_cache_memory_gib, or free host memory")
    with pytest.raises(ResourceExhausted, match=pattern):
        rank.init_cache(blocks, 0, 64, EOS)
    assert rank.runner is None


def test_the_default_cpu_pool_is_named_when_it_does_not_fit(config_only_checkpoint,
                                                             host_memory):
    host_memory(GIB // 10)
    rank = make_worker(config_only_checkpoint)
    message = ("EngineConfig.kv_cache_memory_gib=None (0.25 GiB on CPU) asks for 0.25 GiB for "
               "the KV pool of rank 0, but only 0.10 GiB of available host memory is left; "
               "lower kv_cache_memory_gib, or free host memory")
    with pytest.raises(ResourceExhausted, match=re.escape(message)):
        rank.check_pools_fit(rank.num_gpu_blocks(64), 0)


def test_num_gpu_blocks_override_is_named(config_only_checkpoint, host_memory):
    host_memory(GIB)
    rank = make_worker(config_only_checkpoint, num_gpu_blocks_override=2 * GIB // 8192)
    assert rank.block_bytes == 8192  # 2 layers x K,V x 16 tokens x 2 heads x 16 dims x fp32
    message = ("EngineConfig.num_gpu_blocks_override=262144 asks for 2.00 GiB for the KV pool "
               "of rank 0, but only 1.00 GiB of available host memory is left; lower "
               "num_gpu_blocks_override, or free host memory")
    with pytest.raises(ResourceExhausted, match=re.escape(message)):
        rank.check_pools_fit(rank.num_gpu_blocks(64), 0)


def test_on_cpu_the_swap_pool_gets_what_the_kv_pool_leaves(config_only_checkpoint, host_memory):
    host_memory(GIB)
    rank = make_worker(config_only_checkpoint, kv_cache_memory_gib=0.5, swap_space_gib=0.75)
    kv_blocks, swap_blocks = rank.num_gpu_blocks(64), rank.num_cpu_blocks()
    message = ("EngineConfig.swap_space_gib=0.75 asks for 0.75 GiB for the swap pool of rank 0, "
               "but only 0.50 GiB of available host memory is left; lower swap_space_gib, or set "
               "it to 0 to preempt by recomputation")
    with pytest.raises(ResourceExhausted, match=re.escape(message)):
        rank.check_pools_fit(kv_blocks, swap_blocks)
    rank.check_pools_fit(kv_blocks, GIB // 2 // rank.block_bytes)  # exactly what is left


def test_pools_that_fit_pass(config_only_checkpoint, host_memory):
    host_memory(GIB)
    rank = make_worker(config_only_checkpoint, kv_cache_memory_gib=0.5, swap_space_gib=0.5)
    rank.check_pools_fit(rank.num_gpu_blocks(64), rank.num_cpu_blocks())


def test_unknown_host_memory_skips_the_check(config_only_checkpoint, host_memory):
    host_memory(None)
    rank = make_worker(config_only_checkpoint, kv_cache_memory_gib=1e6, swap_space_gib=1e6)
    rank.check_pools_fit(rank.num_gpu_blocks(64), rank.num_cpu_blocks())


def _gpu_worker(checkpoint, monkeypatch, free: int, **config) -> Worker:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    return make_worker(checkpoint, device="cuda", **config)


def test_a_gpu_kv_pool_beyond_free_device_memory_is_refused(config_only_checkpoint,
                                                             monkeypatch, host_memory):
    host_memory(64 * GIB)
    rank = _gpu_worker(config_only_checkpoint, monkeypatch, free=GIB, kv_cache_memory_gib=2.0)
    message = ("EngineConfig.kv_cache_memory_gib=2.0 asks for 2.00 GiB for the KV pool of rank "
               "0, but only 1.00 GiB of free GPU memory is left; lower kv_cache_memory_gib, or "
               "leave kv_cache_memory_gib and num_gpu_blocks_override None to size the pool "
               "from gpu_memory_utilization")
    with pytest.raises(ResourceExhausted, match=re.escape(message)):
        rank.check_pools_fit(rank.num_gpu_blocks(64), 0)


def test_a_gpu_swap_pool_is_checked_against_host_memory(config_only_checkpoint, monkeypatch,
                                                         host_memory):
    """The KV pool on the GPU leaves host memory to the (pinned) swap pool."""
    host_memory(GIB)
    rank = _gpu_worker(config_only_checkpoint, monkeypatch, free=8 * GIB,
                       kv_cache_memory_gib=4.0, swap_space_gib=2.0)
    message = ("EngineConfig.swap_space_gib=2.0 asks for 2.00 GiB for the swap pool of rank 0, "
               "but only 1.00 GiB of available host memory is left; lower swap_space_gib, or "
               "set it to 0 to preempt by recomputation")
    with pytest.raises(ResourceExhausted, match=re.escape(message)):
        rank.check_pools_fit(rank.num_gpu_blocks(64), rank.num_cpu_blocks())


def test_a_profiled_gpu_pool_is_not_checked_again(config_only_checkpoint, monkeypatch,
                                                  host_memory):
    """Profiling sized it from the free memory already; there is no field to name."""
    host_memory(GIB)
    rank = _gpu_worker(config_only_checkpoint, monkeypatch, free=0)
    rank.check_pools_fit(10**6, 0)


def test_meminfo_available_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683584 kB\nMemFree:  1000 kB\n"
                       "MemAvailable:   23199840 kB\n")
    assert meminfo_available(meminfo) == 23199840 * 1024


def test_meminfo_available_falls_back_to_free_pages(tmp_path, monkeypatch):
    sizes = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(host_resources.os, "sysconf", sizes.__getitem__)
    assert meminfo_available(tmp_path / "missing") == 4096 * 1000


@pytest.mark.parametrize(("files", "available"), [
    ({"memory.max": "max\n", "memory.current": "5\n"}, None),
    ({"memory.max": f"{8 * GIB}\n", "memory.current": f"{6 * GIB}\n",
      "memory.stat": f"anon 1\ninactive_file {GIB}\nactive_file 7\n"}, 3 * GIB),
    ({"memory.max": f"{GIB}\n", "memory.current": f"{2 * GIB}\n"}, 0),
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n",
      "memory/memory.usage_in_bytes": "100\n"}, None),
    ({"memory/memory.limit_in_bytes": f"{4 * GIB}\n", "memory/memory.usage_in_bytes": f"{GIB}\n",
      "memory/memory.stat": f"total_inactive_file {GIB}\n"}, 4 * GIB),
    ({}, None),
])
def test_cgroup_memory_room_v2_and_v1(tmp_path, files, available):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_memory_available(tmp_path) == available


def test_host_memory_is_the_smaller_of_meminfo_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(host_resources, "meminfo_available", lambda: 10 * GIB)
    monkeypatch.setattr(host_resources, "cgroup_memory_available", lambda: 3 * GIB)
    assert host_resources.available_host_memory() == 3 * GIB
    monkeypatch.setattr(host_resources, "cgroup_memory_available", lambda: None)
    assert host_resources.available_host_memory() == 10 * GIB
