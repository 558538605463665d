"""ReplanScheduler: when the next inference starts so plans overlap despite latency."""

from __future__ import annotations

import math

import pytest

from dp_ros.control.replan import ReplanScheduler, stale_points_on_arrival

DT = 0.1


@pytest.mark.parametrize("latency, expected", [
    (0.0, 0), (0.05, 1), (0.1, 1), (0.3, 3), (0.1 * 3, 3), (0.7, 7), (0.31, 4)])
def test_stale_points_on_arrival_is_ceil_without_float_surprises(latency, expected):
    assert stale_points_on_arrival(latency, DT) == expected


def test_stale_points_rejects_bad_input():
    for args in [(-0.1, DT), (math.nan, DT), (0.1, 0.0)]:
        with pytest.raises(ValueError):
            stale_points_on_arrival(*args)


def test_latency_estimate_is_a_high_quantile_of_recent_samples():
    s = ReplanScheduler(T_o=2, T_a=8, dt=DT, margin=0.05, history=10, initial_latency=0.2)
    assert s.latency == 0.2
    for v in [0.1] * 9 + [0.5]:
        s.observe_latency(v)
    assert 0.1 < s.latency <= 0.5  # one slow inference raises the p90
    for _ in range(10):  # old samples fall out of the window
        s.observe_latency(0.12)
    assert s.latency == pytest.approx(0.12)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            s.observe_latency(bad)


def test_next_start_is_latency_plus_margin_before_the_running_steps_end():
    s = ReplanScheduler(T_o=2, T_a=8, dt=DT, margin=0.05)
    s.observe_latency(0.3)
    assert s.execution_end(10.0) == pytest.approx(10.8)
    assert s.next_start_time(10.0) == pytest.approx(10.8 - 0.35)
    assert s.next_start_time(None) == -math.inf


def test_next_start_never_before_one_dt_after_the_running_plan():
    s = ReplanScheduler(T_o=2, T_a=2, dt=DT, margin=0.05)
    s.observe_latency(1.0)  # slower than the plan lasts: replan on every new window
    assert s.next_start_time(10.0) == pytest.approx(10.1)
    assert not s.should_start(10.0, 10.0)
    assert s.should_start(10.1, 10.0)


def test_should_start_on_the_last_window_that_is_still_in_time():
    s = ReplanScheduler(T_o=2, T_a=8, dt=DT, margin=0.05)
    s.observe_latency(0.3)  # start by 10.45 for a plan stamped 10.0
    due = [round(10.0 + k * DT, 3) for k in range(1, 10) if s.should_start(10.0 + k * DT, 10.0)]
    assert due[0] == 10.4  # its plan arrives at 10.7 <= 10.8 - margin; 10.5 would be late
    assert due == [10.4, 10.5, 10.6, 10.7, 10.8, 10.9]  # late windows still start one
    assert s.should_start(5.0, None)  # nothing running: start at once


def test_should_start_needs_a_newer_window():
    s = ReplanScheduler(T_o=2, T_a=1, dt=DT, margin=0.0)
    assert not s.should_start(10.5, 10.0, window_stamp=10.05)
    assert s.should_start(10.5, 10.0, window_stamp=10.1)


def test_tracked_plan_stamps():
    s = ReplanScheduler(T_o=2, T_a=8, dt=DT, margin=0.05)
    s.observe_latency(0.3)
    assert s.should_start(10.0)
    s.plan_started(10.0)
    assert s.active_plan_stamp == 10.0
    assert not s.should_start(10.1) and s.should_start(10.4)
    s.plan_started(10.4)
    assert not s.should_start(10.5)
    s.plan_failed(10.4)  # nothing came of it: back to the previous schedule, retry at once
    assert s.active_plan_stamp == 10.0 and s.should_start(10.5)


def test_constructor_validates():
    for kwargs in [dict(T_o=0), dict(T_a=0), dict(dt=0.0), dict(margin=-1.0)]:
        args = dict(T_o=2, T_a=8, dt=DT, margin=0.05) | kwargs
        with pytest.raises(ValueError):
            ReplanScheduler(**args)
