"""Settings of a coordinator's own process (its actor is the only thing running there): Ray's
logging, and Python's cyclic garbage collector tuned for a step loop.

A decode step at 256 running sequences makes about a thousand tracked objects (each request's
scheduled item and its small lists). At Python's default threshold of 700 allocations the
collector ran a young collection every step and a full one every hundred-odd steps, which
rescanned every object start-up made (the core, the model's config, the modules of Ray and
gRPC). `bench/scheduler_cost.py --coordinator-gc` measures a step with these settings.
"""

from __future__ import annotations

import gc
import logging
import os

GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young collections (Python's default: 700). A young collection costs
what is still alive among the young objects, not the threshold, so spacing them out costs
little memory: the steps' objects are freed by reference counting."""


def quiet_ray_logs() -> None:
    """No warning at the first blocking get (Ray's, for an asyncio actor whose loop it would
    stall; here only start-up and the step thread block, never the loop), and no compiled-graph
    teardown steps at INFO on every rank rebuild."""
    os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
    logging.getLogger("ray.dag").setLevel(logging.WARNING)


def tune_collector() -> None:
    """Young collections every GC_YOUNG_THRESHOLD allocations, and what exists now (after
    start-up, or after new ranks replaced lost ones) frozen out of the full collections: called
    again after a rebuild, it first lets the lost ranks' objects be collected."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.unfreeze()
    gc.collect()
    gc.freeze()
