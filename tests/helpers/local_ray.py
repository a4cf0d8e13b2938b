"""A fresh local Ray cluster for a test module or folder, started the one way every test does:
never the cluster RAY_ADDRESS or `ray start` left running, a connection left behind closed first,
and startup tried again when the new node times out (`start_ray`)."""

from __future__ import annotations

from typing import Any

from pagedserve.cluster.ray_startup import start_ray


def start_local_ray(num_cpus: int) -> Any:
    """The `ray` module, connected to a new local cluster of `num_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return start_ray(address="local", num_cpus=num_cpus, include_dashboard=False,
                     logging_level="ERROR")
