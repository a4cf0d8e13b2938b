"""Executors: how an engine core reaches the tensor-parallel ranks of its replica.

`local.LocalExecutor` runs one rank in this process; `ray.RayExecutor` runs one Ray actor per
rank in a placement group that the caller made (`pagedserve.cluster.placement`). The Ray one
never imports torch in the caller's process, so a CPU-only coordinator stays torch-free.
"""
