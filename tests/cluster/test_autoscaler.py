"""The autoscaling policy over crafted load sequences (exact decisions: targets, up and down
delays, min/max, the drained replica) and the controller's actions with recorded callbacks.
Plain data: no Ray."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.cluster.autoscaler import (
    AutoscaleController,
    AutoscalerConfig,
    LoadSample,
    desired_replicas,
    replica_to_drain,
    wanted_replicas,
)
from pagedserve.errors import InvalidArgument

CONFIG = AutoscalerConfig(min_replicas=1, max_replicas=4, target_queue_depth=4,
                          target_kv_usage=0.5, upscale_delay_s=3, downscale_delay_s=10,
                          interval_s=1)


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """Plain data here: no Ray cluster (overrides the folder's autouse one)."""
    yield


def sample(t, depths, kv=None):
    return LoadSample(float(t), tuple(depths), tuple(kv or [0.0] * len(depths)))


@pytest.mark.parametrize(("depths", "kv", "expected"), [
    ([0], [0.0], 1),              # never below min
    ([4], [0.0], 1),              # at the target: enough
    ([5], [0.0], 2),
    ([9, 8], [0.1, 0.1], 5 - 1),  # 17 / 4 -> 5, capped at max 4
    ([1, 1], [0.4, 0.4], 2),      # KV: 0.8 / 0.5 -> 2
    ([1, 1], [0.9, 0.7], 4),      # KV: 1.6 / 0.5 -> 4
])
def test_wanted_replicas_keeps_both_targets(depths, kv, expected):
    assert wanted_replicas(sample(0, depths, kv), CONFIG) == expected


def test_scale_up_waits_for_the_whole_up_delay():
    samples = [sample(0, [9]), sample(1, [9]), sample(2, [9])]
    assert desired_replicas(samples, 1, CONFIG) == 1       # watched for 2 s < 3 s
    samples.append(sample(3, [6]))
    assert desired_replicas(samples, 1, CONFIG) == 2       # the least wanted in the window


def test_a_dip_inside_the_up_delay_holds_the_count():
    samples = [sample(0, [9]), sample(1, [9]), sample(2, [2]), sample(3, [9])]
    assert desired_replicas(samples, 1, CONFIG) == 1
    samples += [sample(4, [9]), sample(5, [9])]
    assert desired_replicas(samples, 1, CONFIG) == 1       # the dip at t=2 is in [2, 5]
    samples.append(sample(6, [9]))
    assert desired_replicas(samples, 1, CONFIG) == 3       # [3, 6]: 9 / 4 -> 3 each time


def test_scale_down_waits_for_the_longer_down_delay():
    idle = [sample(t, [0, 0, 0]) for t in range(10)]
    assert desired_replicas(idle, 3, CONFIG) == 3           # 9 s < 10 s
    idle.append(sample(10, [0, 0, 0]))
    assert desired_replicas(idle, 3, CONFIG) == 1


def test_scale_down_goes_to_the_most_wanted_in_the_window():
    samples = [sample(t, [3, 2, 0]) for t in range(10)] + [sample(10, [1, 0, 0])]
    assert desired_replicas(samples, 3, CONFIG) == 2        # 5 / 4 -> 2 at worst


def test_load_at_the_current_count_changes_nothing():
    samples = [sample(t, [4, 4]) for t in range(30)]
    assert desired_replicas(samples, 2, CONFIG) == 2
    assert desired_replicas([], 2, CONFIG) == 2


def test_a_count_outside_min_max_is_brought_back_at_once():
    config = AutoscalerConfig(min_replicas=2, max_replicas=3)
    assert desired_replicas([], 1, config) == 2
    assert desired_replicas([sample(0, [0] * 5)], 5, config) == 3


def test_zero_delays_act_on_the_latest_sample():
    config = AutoscalerConfig(min_replicas=1, max_replicas=3, target_queue_depth=2,
                              upscale_delay_s=0, downscale_delay_s=0)
    assert desired_replicas([sample(0, [5])], 1, config) == 3
    assert desired_replicas([sample(0, [1, 0, 0])], 3, config) == 1


@given(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=4), min_size=1,
                max_size=20),
       st.integers(1, 4))
def test_the_decision_stays_within_min_and_max(depth_lists, current):
    samples = [sample(t, depths) for t, depths in enumerate(depth_lists)]
    assert CONFIG.min_replicas <= desired_replicas(samples, current, CONFIG) \
        <= CONFIG.max_replicas


def test_the_replica_drained_is_the_least_busy_latest():
    assert replica_to_drain([3, 0, 2, 0]) == 3
    assert replica_to_drain([1, 5]) == 0


@pytest.mark.parametrize(("field", "value"), [
    ("min_replicas", 0), ("min_replicas", 1.5), ("max_replicas", 0),
    ("target_queue_depth", 0), ("target_kv_usage", 1.5), ("target_kv_usage", 0),
    ("upscale_delay_s", -1), ("downscale_delay_s", float("inf")), ("interval_s", 0),
])
def test_autoscaler_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=f"AutoscalerConfig.{field}"):
        AutoscalerConfig(**{field: value})


def test_the_controller_scales_up_then_drains_the_idlest():
    depths = [[9], [9], [9], [9], [0, 0], [0, 0], [0, 0], [0, 0]]
    config = AutoscalerConfig(min_replicas=1, max_replicas=4, target_queue_depth=4,
                              upscale_delay_s=3, downscale_delay_s=3)
    calls = []
    feed = iter(depths)
    now = iter(range(100))

    async def up():
        calls.append("up")

    async def down(index):
        calls.append(("down", index))

    controller = AutoscaleController(config, lambda: sample(next(now), next(feed)), up, down)

    async def main():
        for _ in depths:
            await controller.step()

    asyncio.run(main())
    # t=3: 9 / 4 wants 3 -> two starts; history restarts; t=7 has watched [4, 7] idle.
    assert calls == ["up", "up", ("down", 1)]
    assert controller.decisions == [(1, 3), (2, 1)]


def test_a_failed_scale_up_is_logged_and_retried_after_its_delay(caplog):
    config = AutoscalerConfig(min_replicas=1, max_replicas=2, target_queue_depth=1,
                              upscale_delay_s=1, downscale_delay_s=100)
    attempts = []
    now = iter(range(100))

    async def up():
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise RuntimeError("no node has room")

    async def down(index):
        raise AssertionError("never scaled down")

    controller = AutoscaleController(config, lambda: sample(next(now), [5]), up, down)

    async def main():
        for _ in range(4):
            await controller.step()

    asyncio.run(main())
    assert attempts == [0, 1]            # t=1 failed; the history restarted; t=3 again
    assert controller.decisions == [(1, 2)]
    assert "no node has room" in caplog.text
