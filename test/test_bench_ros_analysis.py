"""`dp-ros bench ros` figures from recorded events (dp_ros.bench.ros.analyse), without ROS:
the split of the pipeline overhead and the command jitter on a hand-made timeline."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from dp_ros.bench.ros import analyse, report

MS = 1_000_000  # ns
S = 10_000 * MS  # the tick stamp of the plan


def test_overhead_is_split_into_camera_aggregator_and_policy_node():
    rec = SimpleNamespace(
        lock=threading.Lock(), floor_plans=[], floor_windows={}, floor_commands=[],
        # the plan for tick S: published 55 ms after it (50 ms inference, no wait)
        plans=[(S, S + 55 * MS, S + 56 * MS)],
        windows={S: S + 4 * MS},  # the aggregator published the window 4 ms after the tick
        # the policy node's snapshots (plans_published, inference, plan age, queue wait),
        # each seen twice as the recorder would
        diagnostics=[(1, 0.050, 0.055, 0.0)] * 2,
        # commands every 10 ms, one 1 ms late
        commands=[(S + t * MS, S + t * MS + 100_000) for t in (0, 10, 20, 31, 41)])
    frames = {"cam0": [[S - 33 * MS, S - 32 * MS], [S, S + int(1.5 * MS)]],
              "cam1": [[S, S + 2 * MS], [S + 33 * MS, S + 34 * MS]]}  # the later one: unused
    r = analyse(rec, frames, S - 1_000 * MS, S + 1_000 * MS)
    assert r.plans == 1 and r.commands == 5
    np.testing.assert_allclose(r.overhead_ms, [5.0])        # 55 - 50 inference
    np.testing.assert_allclose(r.camera_to_tick_ms, [0.0])  # frames stamped on the tick
    np.testing.assert_allclose(r.aggregator_ms, [4.0])
    np.testing.assert_allclose(r.camera_publish_ms, [2.0])  # the last frame went out at +2 ms
    np.testing.assert_allclose(r.policy_overhead_ms, [1.0])  # 55 - 4 - 50
    np.testing.assert_allclose(r.jitter_ms, [0.0, 0.0, 1.0, 0.0])
    assert r.missed_periods == 0
    text = report(r)
    assert "of which the camera" in text and "pipeline overhead excl. inference" in text


def test_a_plan_the_diagnostics_do_not_describe_is_left_out():
    rec = SimpleNamespace(lock=threading.Lock(), plans=[(S, S + 55 * MS, S + 56 * MS)],
                          floor_plans=[], floor_windows={}, floor_commands=[],
                          windows={S: S + 4 * MS},
                          diagnostics=[(1, 0.050, 0.120, 0.0)] * 2,  # another plan's age
                          commands=[])
    r = analyse(rec, {"cam0": [[S, S + MS]]}, S - MS, S + 1_000 * MS)
    assert len(r.overhead_ms) == 0
    assert report(r).count("nan") >= 2  # no samples: reported as such, not as zeros


def test_plans_are_matched_to_diagnostics_when_the_recorder_missed_the_first_ones():
    # the policy node published 9 plans before the recorder matched it; each plan's age
    # (stamp -> published) tells which diagnostics entry is its own
    ages = [0.30 + 0.01 * k for k in range(20)]
    diag = [(n, 0.25, ages[n - 1], 0.0) for n in range(1, 21) for _ in range(2)]
    plans = [(S + k * 100 * MS, S + k * 100 * MS + int(ages[k] * 1e9), 0) for k in range(9, 20)]
    frames = {"cam0": [[S + k * 100 * MS, S + k * 100 * MS + MS] for k in range(20)]}
    rec = SimpleNamespace(lock=threading.Lock(), plans=plans, windows={}, diagnostics=diag,
                          commands=[], floor_plans=[], floor_windows={}, floor_commands=[])
    r = analyse(rec, frames, S, S + 10_000 * MS)
    assert len(r.overhead_ms) == 11
    np.testing.assert_allclose(r.overhead_ms, [(a - 0.25) * 1e3 for a in ages[9:]], atol=1e-6)


def test_the_no_work_floor_is_reported_beside_the_pipeline():
    rec = SimpleNamespace(
        lock=threading.Lock(), plans=[], windows={}, diagnostics=[], commands=[],
        floor_plans=[(S, S + 3 * MS), (S + 100 * MS, S + 102 * MS)],  # (tick, echoed)
        floor_windows={S: S + 2 * MS},  # (tick: relayed); the second one was not seen
        floor_commands=[S, S + 10 * MS, S + 22 * MS, S + 30 * MS])
    r = analyse(rec, {"cam0": []}, S - MS, S + 1_000 * MS)
    np.testing.assert_allclose(r.floor_overhead_ms, [3.0, 2.0])
    np.testing.assert_allclose(r.floor_relay_ms, [2.0])
    np.testing.assert_allclose(r.floor_jitter_ms, [0.0, 2.0, 2.0])
    assert "no-work floor: same hops" in report(r)
    assert "no-work floor" not in report(r, floor_ran=False)


def test_the_floor_relay_publishes_each_tick_once_every_stream_is_settled():
    from dp_ros.bench.floor import TickRelay
    relay = TickRelay(streams=2, tick_ns=100 * MS)  # a camera at 10 Hz, a 1 kHz state
    assert relay.push(0, S - 100 * MS) is None
    # states 1 ms apart up to S - 0.3 ms: that one settles the state stream for tick S (the
    # next is due at S + 0.7 ms), but the camera's newest frame is a tick old: not yet
    got = [relay.push(1, S - 100 * MS + k * MS + 700_000) for k in range(0, 100)]
    assert got == [None] * 100 and relay.buffers[1].settled(S * 1e-9)
    assert relay.push(0, S) == S // (100 * MS)  # the frame on the tick: tick S is settled
    assert relay.push(1, S + MS) is None  # nothing new to publish
