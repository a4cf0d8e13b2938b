"""What the host gives a worker process: CPU cores for torch's threads, and memory for KV pools.

Both honour a container's cgroup limits, which the usual views (affinity, /proc/meminfo) miss:
a pod limited to 2 CPUs or 8 GiB on a large node would otherwise oversubscribe or be killed.

Threads: torch's own default (one intra-op thread per physical core of the machine) is
disastrous whenever anything else runs, because OpenMP threads spin at every barrier: with half
the cores busy, a thread per core made CPU decode steps 78x slower than half as many (numbers
in `default_cpu_threads`). `choose_cpu_threads` therefore picks the count deliberately:
`EngineConfig.cpu_threads`, else OMP_NUM_THREADS, else `default_cpu_threads`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_TOPOLOGY_ROOT = Path("/sys/devices/system/cpu")
MEMINFO = Path("/proc/meminfo")
# The default never takes more threads than this (measured: see `default_cpu_threads`).
MAX_DEFAULT_THREADS = 4
# cgroup v1 reports "no memory limit" as a huge page-rounded number rather than "max".
_NO_CGROUP_MEMORY_LIMIT = 1 << 60


# ---- CPU threads ----------------------------------------------------------------------------

def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """Whole CPUs the cgroup's quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), rounded up;
    None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def physical_cores(cpus: set[int], topology_root: Path = CPU_TOPOLOGY_ROOT) -> int:
    """Distinct physical cores among the logical `cpus` (hyperthreads of a core count once); the
    number of logical CPUs where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = topology_root / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or 1


def available_cores() -> int:
    """Physical cores this process may run on: its affinity mask, capped by a cgroup quota."""
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    else:
        cpus = set(range(os.cpu_count() or 1))
    limit = cgroup_cpu_limit()
    cores = physical_cores(cpus)
    return cores if limit is None else min(cores, limit)


def default_cpu_threads(cores: int) -> int:
    """Half the available physical cores, at least 1 and at most MAX_DEFAULT_THREADS.

    Measured, median CPU decode step of a Worker (batch 8, a 60M-parameter Llama): on 16 idle
    cores 1/2/4/8/16 threads took 91/59/50/33/41 ms; with 8 cores busy elsewhere 111/70/49/39/
    3008 ms; with 15 busy 109/111/347/2985 ms for 1/2/4/8. On 2 cores a second thread gained
    1.35-1.6x on that model and nothing on the tiny ones when idle, but lost 2-30x with the
    other core busy. More threads than free cores is a cliff, so the default assumes about half
    the cores are free; the cap of 4 keeps the worst case measured (15 of 16 cores busy) at 3x
    slower than one thread, where 8 threads were 27x slower.
    """
    return max(1, min(MAX_DEFAULT_THREADS, cores // 2))


def omp_num_threads(environ: Mapping[str, str]) -> int | None:
    """The first count of OMP_NUM_THREADS (a nesting list such as '4,2' is allowed), or None
    when it is unset or not a positive integer."""
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        logger.warning("ignoring OMP_NUM_THREADS=%r: not a positive integer", value)
        return None
    return int(value)


def choose_cpu_threads(requested: int | None, environ: Mapping[str, str] | None = None,
                       cores: int | None = None) -> tuple[int, str]:
    """(thread count, where it came from): `requested` (EngineConfig.cpu_threads), else
    OMP_NUM_THREADS of `environ` (default os.environ; Ray sets 1 in its actors), else
    `default_cpu_threads` of `cores` (default: `available_cores()`)."""
    if requested is not None:
        return requested, "EngineConfig.cpu_threads"
    from_env = omp_num_threads(os.environ if environ is None else environ)
    if from_env is not None:
        return from_env, "OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    return default_cpu_threads(cores), f"default for {cores} available physical cores"


# ---- host memory ----------------------------------------------------------------------------

def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo (free memory plus reclaimable caches), else free pages by
    sysconf; None where neither exists."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def cgroup_memory_available(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes the cgroup may still take: limit - usage + its reclaimable inactive file cache
    (v2 `memory.max`, v1 `memory.limit_in_bytes`); None without a limit."""
    layouts = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
               ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                "memory/memory.stat", "total_inactive_file"))
    for limit_file, usage_file, stat_file, inactive_key in layouts:
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int((root / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit >= _NO_CGROUP_MEMORY_LIMIT:
            return None
        inactive = 0
        try:
            for line in (root / stat_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + inactive)
    return None


def available_host_memory() -> int | None:
    """Bytes of host memory this process can still allocate without swapping or being killed
    (the smaller of MemAvailable and its cgroup's room); None where unknown."""
    known = [v for v in (meminfo_available(), cgroup_memory_available()) if v is not None]
    return min(known) if known else None
