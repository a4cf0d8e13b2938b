"""Replica autoscaling: a policy over load samples, and the controller that acts on it.

Every `interval_s` the controller samples the serving replicas (up, not draining): each one's
queue depth (requests running or waiting) and KV-cache use. Where the sample comes from is the
controller's `sample` parameter, its load source: in one process serving everything, the
gateway's own counts of requests in flight (current at once); in the fleet role, where many
gateways share the replicas, the coordinators' reports (GetLoad; `fleet.load_sample_from`). From
one sample the wanted count is what keeps both under their targets,
max(ceil(sum of queue depths / target_queue_depth), ceil(sum of KV uses / target_kv_usage)),
within [min_replicas, max_replicas]. Hysteresis: the count goes up only once every sample of
the last `upscale_delay_s` wanted more (to the least of them), down only once every sample of
the last `downscale_delay_s` wanted fewer (to the most of them); after each change the history
starts again. A new replica is a new coordinator with its own placement group (with the Ray
autoscaler, a group no node can take makes it add one). Scale-down drains: the gateway routes
nothing more to the replica, its requests in flight finish, then its coordinator stops.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pagedserve.validation import check_field, is_finite_number, is_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoscalerConfig:
    """When `pagedserve serve` adds or removes replicas (on when max_replicas > min_replicas)."""

    min_replicas: int = 1
    """Fewest replicas kept serving."""
    max_replicas: int = 1
    """Most replicas started."""
    target_queue_depth: float = 8.0
    """Requests in flight (running or waiting) per replica above which replicas are added."""
    target_kv_usage: float = 0.8
    """KV-cache use per replica (0 to 1] above which replicas are added."""
    upscale_delay_s: float = 10.0
    """How long the load must want more replicas before one is added."""
    downscale_delay_s: float = 60.0
    """How long the load must want fewer replicas before one is drained and removed."""
    interval_s: float = 1.0
    """Seconds between load samples."""

    def __post_init__(self) -> None:
        owner = "AutoscalerConfig"
        check_field(owner, "min_replicas", is_int(self.min_replicas) and self.min_replicas >= 1,
                    "an integer >= 1", self.min_replicas)
        check_field(owner, "max_replicas", is_int(self.max_replicas)
                    and self.max_replicas >= self.min_replicas,
                    f"an integer >= min_replicas ({self.min_replicas})", self.max_replicas)
        check_field(owner, "target_queue_depth", is_finite_number(self.target_queue_depth)
                    and self.target_queue_depth > 0, "a finite number > 0",
                    self.target_queue_depth)
        check_field(owner, "target_kv_usage", is_finite_number(self.target_kv_usage)
                    and 0 < self.target_kv_usage <= 1, "a number in (0, 1]",
                    self.target_kv_usage)
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            check_field(owner, name, is_finite_number(value) and value >= 0,
                        "a finite number >= 0", value)
        check_field(owner, "interval_s", is_finite_number(self.interval_s)
                    and self.interval_s > 0, "a finite number > 0", self.interval_s)

    @property
    def enabled(self) -> bool:
        return self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class LoadSample:
    """The serving replicas at one time."""

    time: float
    queue_depths: tuple[int, ...]
    """Per replica: requests in flight (running or waiting there)."""
    kv_usages: tuple[float, ...]
    """Per replica: fraction of KV blocks in use."""


def wanted_replicas(sample: LoadSample, config: AutoscalerConfig) -> int:
    """Replicas that would keep this sample's load under both targets, within min/max."""
    by_queue = math.ceil(sum(sample.queue_depths) / config.target_queue_depth)
    by_kv = math.ceil(sum(sample.kv_usages) / config.target_kv_usage)
    return min(max(by_queue, by_kv, config.min_replicas), config.max_replicas)


def desired_replicas(samples: Sequence[LoadSample], current: int,
                     config: AutoscalerConfig) -> int:
    """The replica count to run now, given the samples since the last change (oldest first)."""
    if current < config.min_replicas or current > config.max_replicas:
        return min(max(current, config.min_replicas), config.max_replicas)
    if not samples:
        return current
    now = samples[-1].time
    for delay, more in ((config.upscale_delay_s, True), (config.downscale_delay_s, False)):
        if samples[0].time > now - delay:  # not watched for the whole delay yet
            continue
        window = [wanted_replicas(s, config) for s in samples if s.time >= now - delay]
        if more and all(w > current for w in window):
            return min(window)
        if not more and all(w < current for w in window):
            return max(window)
    return current


def replica_to_drain(queue_depths: Sequence[int]) -> int:
    """Which serving replica to remove: the one with the fewest requests in flight (the
    quickest to drain), the latest added of those."""
    fewest = min(queue_depths)
    return max(i for i, depth in enumerate(queue_depths) if depth == fewest)


LoadSource = Callable[[], LoadSample | Awaitable[LoadSample]]
"""The serving replicas' load now, as a plain or an async function."""


class AutoscaleController:
    """Samples the load every interval and scales: `sample()` (a LoadSource) gives the serving
    replicas' load, `scale_up()` starts one more replica, `scale_down(i)` drains and removes
    serving replica i. One change at a time; a failed one is logged and tried again after its
    delay."""

    def __init__(self, config: AutoscalerConfig, sample: LoadSource,
                 scale_up: Callable[[], Awaitable[None]],
                 scale_down: Callable[[int], Awaitable[None]]) -> None:
        self.config = config
        self._sample = sample
        self._scale_up = scale_up
        self._scale_down = scale_down
        keep = max(config.upscale_delay_s, config.downscale_delay_s) / config.interval_s + 2
        self.samples: deque[LoadSample] = deque(maxlen=math.ceil(keep))
        self.decisions: list[tuple[int, int]] = []
        """(from, to) of every change made, in order."""

    async def step(self) -> None:
        """Take one sample and make the change it calls for, if any."""
        sample = self._sample()
        if inspect.isawaitable(sample):
            sample = await sample
        self.samples.append(sample)
        current = len(sample.queue_depths)
        desired = desired_replicas(self.samples, current, self.config)
        if desired == current:
            return
        logger.info("autoscaler: %d -> %d replicas (queue depths %s, KV use %s)", current,
                    desired, list(sample.queue_depths),
                    [round(u, 3) for u in sample.kv_usages])
        self.samples.clear()
        try:
            if desired > current:
                for _ in range(desired - current):
                    await self._scale_up()
            else:
                depths = list(sample.queue_depths)
                for _ in range(current - desired):
                    index = replica_to_drain(depths)
                    depths.pop(index)
                    await self._scale_down(index)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("autoscaler: scaling %d -> %d failed", current, desired)
            return
        self.decisions.append((current, desired))

    async def run(self) -> None:
        """Step every interval until cancelled."""
        while True:
            await self.step()
            await asyncio.sleep(self.config.interval_s)
