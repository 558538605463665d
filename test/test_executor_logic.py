"""Plan, limits and PlanExecutor logic, driven without ROS (the clock is passed in)."""

from __future__ import annotations

import numpy as np
import pytest

from dp_ros.control.executor import (DISABLED, HOLDING, TRACKING, PlanExecutor,
                                     TrajectoryPoints)
from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import (NS_PER_S, Plan, PlanRejected, plan_from_actions,
                                 seconds_to_ns, validate_plan)

NAMES = ("a", "b")
DT = 0.1          # plan point period
CTRL_DT = 0.01    # control period
T0 = 100.0        # a plan stamp, seconds


def ramp_plan(stamp: float, start, slope, n: int = 15, names=NAMES) -> Plan:
    """Points stamp + k*DT at start + slope*k*DT (per joint)."""
    tfs = np.arange(n) * DT
    pos = np.asarray(start, float) + np.outer(tfs, np.asarray(slope, float))
    return Plan(seconds_to_ns(stamp), tuple(names), tfs, pos)


def make_executor(lead=0.0, timeout=1.0, crossfade=0, vmax=1.0, lower=(-2.0, -2.0),
                  upper=(2.0, 2.0)) -> PlanExecutor:
    limits = JointLimits.create(2, lower, upper, vmax)
    return PlanExecutor(NAMES, limits, lead, timeout, crossfade, CTRL_DT)


def run(ex: PlanExecutor, t_from: float, t_to: float):
    """Commands every CTRL_DT in [t_from, t_to)."""
    n = int(round((t_to - t_from) / CTRL_DT))
    return [ex.command(t_from + i * CTRL_DT) for i in range(n)]


# ---------------------------------------------------------------- plans
def test_plan_from_actions_takes_executable_part_with_fd_velocities():
    actions = np.stack([np.arange(16.0) ** 2, -np.arange(16.0)], axis=1)  # (T_p=16, 2)
    plan = plan_from_actions(seconds_to_ns(T0), actions, T_o=2, dt=DT, joint_names=NAMES)
    assert len(plan) == 15
    np.testing.assert_array_equal(plan.positions, actions[1:])
    np.testing.assert_allclose(plan.time_from_start, np.arange(15) * DT)
    np.testing.assert_allclose(plan.times, T0 + np.arange(15) * DT)
    # central differences; the first point uses the action before it (index T_o-2)
    np.testing.assert_allclose(plan.velocities[0], [(4 - 0) / (2 * DT), -1 / DT])
    np.testing.assert_allclose(plan.velocities[-1], [(225 - 196) / DT, -1 / DT])
    with pytest.raises(ValueError):
        plan_from_actions(0, actions, T_o=17, dt=DT, joint_names=NAMES)
    with pytest.raises(ValueError):
        plan_from_actions(0, actions[:, :1], T_o=2, dt=DT, joint_names=NAMES)


def test_plan_stamp_is_exact_in_nanoseconds():
    stamp_ns = 1_700_000_000_123_456_789
    plan = plan_from_actions(stamp_ns, np.zeros((4, 2)), 1, DT, NAMES)
    assert plan.stamp_ns == stamp_ns
    assert plan.stamp == pytest.approx(stamp_ns / NS_PER_S)
    assert [seconds_to_ns(t) for t in plan.time_from_start] == [k * 100_000_000 for k in range(4)]


def test_validate_reorders_same_joint_set():
    plan = Plan(0, ("b", "a"), np.array([0.0, 0.1]), np.array([[1.0, 2.0], [3.0, 4.0]]),
                np.array([[5.0, 6.0], [7.0, 8.0]]))
    out = validate_plan(plan, NAMES)
    assert out.joint_names == NAMES
    np.testing.assert_array_equal(out.positions, [[2.0, 1.0], [4.0, 3.0]])
    np.testing.assert_array_equal(out.velocities, [[6.0, 5.0], [8.0, 7.0]])


@pytest.mark.parametrize("plan, cause", [
    (Plan(0, NAMES, np.zeros(0), np.zeros((0, 2))), "empty"),
    (Plan(0, NAMES, np.array([0.0, 0.1]), np.array([[0.0, np.nan], [0, 0]])), "non_finite"),
    (Plan(0, NAMES, np.array([0.0, 0.1]), np.array([[0.0, np.inf], [0, 0]])), "non_finite"),
    (Plan(0, NAMES, np.array([0.0, np.nan]), np.zeros((2, 2))), "non_finite"),
    (Plan(0, NAMES, np.array([0.0, 0.1]), np.zeros((2, 2)), np.full((2, 2), np.nan)),
     "non_finite"),
    (Plan(0, ("a", "c"), np.array([0.0, 0.1]), np.zeros((2, 2))), "joint_names"),
    (Plan(0, ("a",), np.array([0.0, 0.1]), np.zeros((2, 1))), "joint_names"),
    (Plan(0, ("a", "a"), np.array([0.0, 0.1]), np.zeros((2, 2))), "joint_names"),
    (Plan(0, NAMES, np.array([0.0, 0.1]), np.zeros((2, 3))), "shape"),
    (Plan(0, NAMES, np.array([0.0, 0.1, 0.1]), np.zeros((3, 2))), "times"),
    (Plan(0, NAMES, np.array([0.2, 0.1]), np.zeros((2, 2))), "times"),
    (Plan(0, NAMES, np.array([0.0, 1e9]), np.zeros((2, 2))), "times"),
])
def test_validate_rejects_with_cause(plan, cause):
    with pytest.raises(PlanRejected) as err:
        validate_plan(plan, NAMES)
    assert err.value.cause == cause and err.value.reason


# ---------------------------------------------------------------- limits
def test_limits_create_and_errors():
    lim = JointLimits.create(2, [-1, -2], [1, 2], 0.5)
    np.testing.assert_array_equal(lim.max_velocity, [0.5, 0.5])
    assert JointLimits.create(2).within_position_limits(np.array([1e9, -1e9]))
    for bad in [dict(lower=[1, 0], upper=[0, 1]), dict(max_velocity=0.0),
                dict(max_velocity=[1.0]), dict(lower=[0.0]), dict(max_velocity=np.inf),
                dict(lower=[np.nan, 0])]:
        with pytest.raises(ValueError):
            JointLimits.create(2, **bad)


def test_limit_step_clamps_position_and_velocity():
    lim = JointLimits.create(2, [-1, -1], [1, 1], [1.0, 2.0])
    np.testing.assert_allclose(lim.clamp_position(np.array([5.0, -5.0])), [1, -1])
    np.testing.assert_allclose(lim.limit_step(np.zeros(2), np.array([1.0, 1.0]), 0.1),
                               [0.1, 0.2])
    np.testing.assert_allclose(lim.limit_step(np.array([0.95, 0]), np.array([9.0, 0.01]), 0.1),
                               [1.0, 0.01])


# ---------------------------------------------------------------- executor
def test_starts_disabled_and_sends_nothing():
    ex = make_executor()
    cmd = ex.command(T0)
    assert cmd.status == DISABLED and cmd.positions is None
    res = ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1]), T0)
    assert res.status == "ignored" and res.cause == "disabled"
    assert len(ex.remaining_trajectory(T0).times_from_now) == 0


@pytest.mark.parametrize("q", [[3.0, 0.0], [np.nan, 0.0], [0.0]])
def test_enable_refuses_unusable_positions(q):
    ex = make_executor()
    with pytest.raises(ValueError):
        ex.enable(np.array(q), T0)
    assert not ex.enabled


def test_enable_holds_current_position_until_a_plan_arrives():
    ex = make_executor()
    ex.enable(np.array([0.3, -0.2]), T0)
    for cmd in run(ex, T0, T0 + 0.1):
        assert cmd.status == HOLDING and "until a plan arrives" in cmd.reason
        np.testing.assert_array_equal(cmd.positions, [0.3, -0.2])


def test_tracks_plan_with_interpolation_and_actuation_lead():
    ex = make_executor(lead=0.03)
    ex.enable(np.zeros(2), T0)
    res = ex.submit(ramp_plan(T0, [0, 0], [0.5, -0.25]), T0)
    assert res.accepted and res.late_points == 1  # the point at T0 <= T0 + lead
    cmds = run(ex, T0, T0 + 0.5)
    assert all(cmd.status == TRACKING for cmd in cmds)
    # the bridge from the start position (T0 + lead) ends at the first point left, T0 + 0.1
    for cmd in cmds[8:]:
        assert cmd.time == pytest.approx(cmd.time)
        np.testing.assert_allclose(cmd.positions, [0.5 * (cmd.time - T0), -0.25 * (cmd.time - T0)],
                                   atol=1e-9)


def test_late_points_are_never_targeted():
    ex = make_executor()
    ex.enable(np.zeros(2), T0)
    arrival = T0 + 0.35  # 300+ ms of inference latency
    res = ex.submit(ramp_plan(T0, [0, 0], [0.2, 0.2]), arrival)
    assert res.accepted and res.late_points == 4  # T0 .. T0+0.3
    # the bridge goes from the held position straight to a future point
    assert ex._ref.times[0] == pytest.approx(arrival)
    assert np.all(ex._ref.times[1:] > arrival)


def test_all_points_past_is_ignored():
    ex = make_executor(timeout=5.0)
    ex.enable(np.zeros(2), T0)
    res = ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1], n=3), T0 + 1.0)
    assert res.status == "ignored" and res.cause == "all_late" and res.late_points == 3


def test_older_or_equal_stamp_is_ignored():
    ex = make_executor()
    ex.enable(np.zeros(2), T0)
    assert ex.submit(ramp_plan(T0 + 0.1, [0, 0], [0, 0]), T0 + 0.1).accepted
    for stamp in (T0, T0 + 0.1):
        res = ex.submit(ramp_plan(stamp, [1, 1], [0, 0]), T0 + 0.12)
        assert res.status == "ignored" and res.cause == "not_newer"
    assert ex.active_plan_stamp == pytest.approx(T0 + 0.1)


def test_stale_and_future_stamps():
    ex = make_executor(timeout=0.5)
    ex.enable(np.zeros(2), T0)
    assert ex.submit(ramp_plan(T0, [0, 0], [0, 0]), T0 + 0.6).cause == "stale"
    res = ex.submit(ramp_plan(T0 + 10, [0, 0], [0, 0]), T0)
    assert res.status == "rejected" and res.cause == "future_stamp"


def test_switch_is_continuous_and_velocity_limited():
    vmax = 0.5
    ex = make_executor(vmax=vmax, timeout=2.0)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.2, 0.2]), T0)
    cmds = run(ex, T0, T0 + 0.4)
    # the new plan starts 0.3 away: the switch may not jump there
    res = ex.submit(ramp_plan(T0 + 0.3, [0.36, -0.3], [0.2, 0.2]), T0 + 0.4)
    assert res.accepted and res.skipped_points >= 1  # nearby points unreachable: skipped
    cmds += run(ex, T0 + 0.4, T0 + 1.65)
    pos = np.array([c.positions for c in cmds])
    steps = np.abs(np.diff(pos, axis=0))
    assert steps.max() <= vmax * CTRL_DT + 1e-12
    assert all(c.status == TRACKING for c in cmds[1:])
    # on the new plan from its first point reachable at <= vmax (T0 + 1.5 here)
    t = cmds[-1].time
    np.testing.assert_allclose(pos[-1], [0.36 + 0.2 * (t - T0 - 0.3), -0.3 + 0.2 * (t - T0 - 0.3)],
                               atol=1e-9)


def test_reachable_takeover_hits_the_first_feasible_point_exactly():
    ex = make_executor(vmax=1.0)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0.05, 0.05], [0, 0]), T0)  # 0.05 at T0+0.1 reachable: 0.5/s
    res = ex.submit(ramp_plan(T0 + 0.01, [0.05, 0.05], [0, 0]), T0 + 0.01)
    assert res.accepted
    cmds = run(ex, T0 + 0.01, T0 + 0.2)
    np.testing.assert_allclose(cmds[-1].positions, [0.05, 0.05])


def test_crossfade_blends_old_and_new():
    ex = make_executor(crossfade=10, vmax=10.0)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.5, 0.5]), T0)
    run(ex, T0, T0 + 0.2)
    ex.submit(ramp_plan(T0 + 0.2, [0.1, 0.1], [-0.5, -0.5]), T0 + 0.2)  # turns around
    cmds = run(ex, T0 + 0.2, T0 + 0.4)
    vel = np.array([c.velocities[0] for c in cmds])
    # without a fade the velocity would flip from +0.5 to -0.5 in one step
    assert np.all(np.abs(np.diff(vel)) < 0.5)
    assert vel[0] > 0 and vel[-1] < 0



def test_a_plan_arriving_during_a_crossfade_blends_out_the_running_blend():
    ex = make_executor(crossfade=10, vmax=10.0)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.5, 0.5]), T0)
    cmds = run(ex, T0, T0 + 0.2)
    ex.submit(ramp_plan(T0 + 0.2, [0.1, 0.1], [-0.5, -0.5]), T0 + 0.2)  # turns around
    cmds += run(ex, T0 + 0.2, T0 + 0.25)
    assert ex.plans_held == 2
    # mid-blend, a third plan: the blend it replaces is faded out, not cut off
    third = ex.submit(ramp_plan(T0 + 0.25, [0.1, 0.1], [0.5, 0.5]), T0 + 0.25)
    assert ex.plans_held == 3 and third.velocity_jump < 0.1
    cmds += run(ex, T0 + 0.25, T0 + 0.5)
    vel = np.array([c.velocities[0] for c in cmds[1:]])
    # cutting the running blend (fading from plan B alone) stepped the position back:
    # -3.4 rad/s for one tick, and a reference velocity jump of 0.6 rad/s at the switch
    assert np.abs(vel).max() < 1.5
    assert ex.plans_held == 1  # both blends over: only the newest plan is kept


def test_switch_reports_the_jump_in_reference_velocity():
    ex = make_executor(vmax=10.0, timeout=2.0)
    ex.enable(np.zeros(2), T0)
    first = ex.submit(ramp_plan(T0, [0, 0], [0.5, -0.2]), T0)
    assert first.accepted and first.velocity_jump is None  # nothing was being tracked
    run(ex, T0, T0 + 0.2)
    # the same path, replanned: no jump
    same = ex.submit(ramp_plan(T0 + 0.2, [0.1, -0.04], [0.5, -0.2]), T0 + 0.2)
    assert same.velocity_jump == pytest.approx(0.0, abs=1e-9)
    run(ex, T0 + 0.2, T0 + 0.4)
    # turning joint a around (b keeps going): the bridge runs from the last command (0.195,
    # for T0 + 0.39) to the new plan's first future point (0.15 at T0 + 0.5)
    turn = ex.submit(ramp_plan(T0 + 0.4, [0.2, -0.08], [-0.5, -0.2]), T0 + 0.4)
    assert turn.velocity_jump == pytest.approx(0.5 + 0.045 / 0.11, abs=1e-6)
    run(ex, T0 + 0.4, T0 + 0.5)
    # with a cross-fade the reference velocity changes smoothly: no jump at the switch
    ex.configure(crossfade_steps=10)
    back = ex.submit(ramp_plan(T0 + 0.5, [0.15, -0.1], [0.5, -0.2]), T0 + 0.5)
    assert back.velocity_jump < 0.05

def test_holds_when_plan_runs_out():
    ex = make_executor(timeout=5.0)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1], n=5), T0)  # ends at T0 + 0.4
    cmds = run(ex, T0, T0 + 0.8)
    held = [c for c in cmds if c.status == HOLDING]
    assert held and held[0].time > T0 + 0.4 and "ran out" in held[0].reason
    assert all(np.array_equal(h.positions, held[0].positions) for h in held)
    assert ex.cause == "ran_out"


def test_holds_when_plan_goes_stale():
    ex = make_executor(timeout=0.3)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1]), T0)
    cmds = run(ex, T0, T0 + 0.6)
    assert cmds[25].status == TRACKING and cmds[35].status == HOLDING
    assert "stale" in cmds[35].reason
    np.testing.assert_array_equal(cmds[35].positions, cmds[-1].positions)


def test_backward_clock_jump_clears_and_holds():
    ex = make_executor()
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1]), T0)
    last = run(ex, T0, T0 + 0.3)[-1]
    cmd = ex.command(T0 - 5.0)  # e.g. a bag replay looped
    assert cmd.status == HOLDING and "jumped back" in cmd.reason
    np.testing.assert_array_equal(cmd.positions, last.positions)
    assert ex.clock_jumps == 1
    # the new timeline's (smaller) stamps are accepted again
    assert ex.submit(ramp_plan(T0 - 5.0, [0, 0], [0.1, 0.1]), T0 - 5.0).accepted


def test_clock_jump_while_disabled_starts_a_new_timeline():
    ex = make_executor()
    ex.enable(np.zeros(2), T0)
    assert ex.submit(ramp_plan(T0, [0, 0], [0.1, 0.1]), T0).accepted
    ex.disable()
    ex.command(T0 + 0.5)
    ex.enable(np.zeros(2), T0 - 10.0)  # e.g. the bag restarted meanwhile
    assert ex.submit(ramp_plan(T0 - 10.0, [0, 0], [0.1, 0.1]), T0 - 10.0).accepted


def test_commands_respect_position_limits():
    ex = make_executor(vmax=10.0, lower=(-0.5, -0.5), upper=(0.5, 0.5))
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0, 0], [5.0, -5.0]), T0)
    pos = np.array([c.positions for c in run(ex, T0, T0 + 1.0)])
    assert pos.max() <= 0.5 and pos.min() >= -0.5
    np.testing.assert_allclose(pos[-1], [0.5, -0.5])


def test_remaining_trajectory_is_retimed_feasible_and_bounded():
    lead, vmax, timeout = 0.02, 0.5, 0.8
    ex = make_executor(lead=lead, vmax=vmax, timeout=timeout)
    ex.enable(np.zeros(2), T0)
    ex.submit(ramp_plan(T0, [0.3, 0], [0.2, 0.2]), T0 + 0.05)
    run(ex, T0 + 0.05, T0 + 0.1)
    now = T0 + 0.1
    pts = ex.remaining_trajectory(now)
    assert isinstance(pts, TrajectoryPoints)
    t, p, v = pts
    assert t[0] > 0 and np.all(np.diff(t) > 0)
    # plan time = now + lead + time_from_start; nothing past the stale time
    assert now + lead + t[-1] == pytest.approx(T0 + timeout + lead)
    knots_t = np.concatenate(([0.0], t))
    knots_p = np.vstack((ex.last_command, p))
    assert np.all(np.abs(np.diff(knots_p, axis=0)) <= vmax * np.diff(knots_t)[:, None] + 1e-12)
    assert np.all(np.abs(v) <= vmax + 1e-12) and np.all(v[-1] == 0)


def test_remaining_trajectory_when_holding_is_one_point_at_last_command():
    ex = make_executor()
    ex.enable(np.array([0.1, 0.2]), T0)
    t, p, v = ex.remaining_trajectory(T0 + 0.01)
    assert t.shape == (1,) and t[0] > 0
    np.testing.assert_array_equal(p[0], [0.1, 0.2])
    np.testing.assert_array_equal(v[0], [0, 0])


def test_configure_validates():
    ex = make_executor()
    for bad in [dict(actuation_lead=-1), dict(stale_plan_timeout=0), dict(crossfade_steps=-1),
                dict(crossfade_steps=1.5), dict(max_velocity=0)]:
        with pytest.raises(ValueError):
            ex.configure(**bad)
    ex.configure(max_velocity=[0.1, 0.2], crossfade_steps=3)
    np.testing.assert_array_equal(ex.limits.max_velocity, [0.1, 0.2])
    np.testing.assert_array_equal(ex.limits.upper, [2.0, 2.0])


def test_remaining_trajectory_times_stay_distinct_in_nanoseconds_during_a_blend():
    """Blend samples every control step land on the plan's 0.1 s knots up to rounding
    (seen in the demo: 112.31 + 0.09 next to the knot 112.4); the message must still have
    strictly increasing time_from_start in nanoseconds, or the controller rejects it."""
    ex = make_executor(lead=0.02, crossfade=10, vmax=10.0, timeout=2.0)
    ex.enable(np.zeros(2), 112.0)
    assert ex.submit(ramp_plan(112.0, [0, 0], [0.5, 0.5]), 112.0).accepted
    ex.remaining_trajectory(112.2)
    assert ex.submit(ramp_plan(112.1, [0.06, 0.06], [0.4, 0.4]), 112.29).accepted
    for now in (112.29, 112.3, 112.33):
        pts = ex.remaining_trajectory(now)
        ns = np.round(pts.times_from_now * NS_PER_S).astype(np.int64)
        assert np.all(ns > 0) and np.all(np.diff(ns) > 0), pts.times_from_now
