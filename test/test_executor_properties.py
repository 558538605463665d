"""Safety contract of the executor (issue 8, clauses 1-3) as hypothesis properties.

For any sequence of plans (arbitrary values incl. NaN/Inf/huge, lengths, stamps, joint
names, arrival times) interleaved with control ticks and backward clock jumps:
  1. no point for a time already past: every joint_trajectory point's plan time is after
     now + actuation_lead (time_from_start > 0), every position_stream command is for
     now + lead;
  2. every command is within the position limits and moves at most
     max_velocity * control_dt from the previous one (the re-timed horizon is feasible
     from the last command at max_velocity);
  3. whenever no valid, fresh plan covers now, the last command is held exactly.
The oracle for 3 is independent of the executor: validate_plan + stamp/time arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dp_ros.control.executor import HOLDING, PlanExecutor
from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import Plan, PlanRejected, seconds_to_ns, validate_plan

NAMES = ("j1", "j2")
LOWER, UPPER = np.array([-1.0, -0.5]), np.array([1.0, 2.0])
VMAX = np.array([0.5, 2.0])
CTRL_DT = 0.01
EPS = 1e-9
START = 50.0

wild_float = st.floats(allow_nan=True, allow_infinity=True)
sane_float = st.floats(-3.0, 3.0)


@st.composite
def plans(draw, now: float) -> Plan:
    """Mostly usable plans (so the executor tracks a lot), often broken in some way."""
    n = draw(st.sampled_from(list(range(2, 17)) * 3 + [0, 1]))
    stamp = now + draw(st.floats(-0.35, 0.02) | st.floats(-1.5, 0.7))
    times_mode = draw(st.sampled_from(["grid"] * 3 + ["steps", "wild"]))
    if times_mode == "grid":  # as the policy makes them: k * dt
        tfs = np.arange(n) * draw(st.sampled_from([0.05, 0.1]))
    elif times_mode == "steps":  # increasing or not, irregular
        steps = draw(st.lists(st.floats(-0.05, 0.3), min_size=n, max_size=n))
        tfs = draw(st.floats(-0.5, 0.3)) + np.cumsum(steps) if n else np.zeros(0)
    else:
        tfs = np.array(draw(st.lists(wild_float, min_size=n, max_size=n)), dtype=float)
    if draw(st.booleans()):  # a smooth path, like a policy's, from anywhere near the arm
        start = np.array(draw(st.tuples(sane_float, sane_float)))
        steps = draw(st.lists(st.tuples(st.floats(-0.2, 0.2), st.floats(-0.2, 0.2)),
                              min_size=n, max_size=n))
        pos = start + np.cumsum(np.array(steps, dtype=float).reshape(n, 2), axis=0)
    else:
        pos = np.array(draw(st.lists(st.tuples(sane_float, sane_float), min_size=n,
                                     max_size=n)), dtype=float).reshape(n, 2)
    if n and draw(st.integers(0, 3)) == 0:  # corrupt entries: NaN, Inf, huge, anything
        for _ in range(draw(st.integers(1, 3))):
            pos[draw(st.integers(0, n - 1)), draw(st.integers(0, 1))] = draw(wild_float)
    names = draw(st.sampled_from([NAMES] * 6 + [NAMES[::-1]] * 2
                                 + [("j1", "x"), ("j1",), ("j1", "j1")]))
    if len(names) != 2:
        pos = pos[:, :len(names)]
    return Plan(seconds_to_ns(stamp), names, tfs, pos)


@dataclass
class Submitted:
    plan: Plan | None  # validated (reordered) plan, None when invalid
    arrival: float
    epoch: int         # clock epoch: a backward jump starts a new one


def covers(s: Submitted, now: float, lead: float, timeout: float, epoch: int) -> bool:
    """A valid, fresh plan that covers now (independent of the executor's bookkeeping)."""
    p = s.plan
    if p is None or s.epoch != epoch:
        return False
    fresh = now - p.stamp <= timeout and p.stamp <= s.arrival + timeout
    return fresh and not (now + lead > p.times[-1])


tick_event = st.tuples(st.just("tick"), st.integers(1, 40),
                       st.sampled_from([CTRL_DT] * 4 + [0.004, 0.03]))
events = st.lists(st.one_of(
    tick_event, tick_event,
    st.tuples(st.just("plan"), st.floats(0.0, 0.05), st.none()),
    st.tuples(st.just("jump"), st.floats(0.01, 3.0), st.none()),
), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), evts=events, lead=st.sampled_from([0.0, 0.03]),
       timeout=st.sampled_from([0.3, 1.0]), crossfade=st.sampled_from([0, 4]),
       q0=st.tuples(st.floats(-1.0, 1.0), st.floats(-0.5, 2.0)))
@pytest.mark.parametrize("output_mode", ["position_stream", "joint_trajectory"])
def test_command_stream_satisfies_safety_contract(output_mode, data, evts, lead, timeout,
                                                  crossfade, q0):
    ex = PlanExecutor(NAMES, JointLimits.create(2, LOWER, UPPER, VMAX), lead, timeout,
                      crossfade, CTRL_DT)
    now, epoch = START, 0
    ex.enable(np.array(q0), now)
    prev = np.array(q0)
    submitted: list[Submitted] = []
    sent = None  # joint_trajectory: (absolute knot times, positions) the controller follows

    def tick():
        nonlocal prev, sent
        cmd = ex.command(now)
        q = cmd.positions
        assert cmd.time == now + lead
        assert np.all(np.isfinite(q)) and np.all(q >= LOWER) and np.all(q <= UPPER)
        assert np.all(np.abs(q - prev) <= VMAX * CTRL_DT + EPS)
        if not any(covers(s, now, lead, timeout, epoch) for s in submitted):
            assert cmd.status == HOLDING, cmd
        if cmd.status == HOLDING:
            assert np.array_equal(q, prev)
        prev = q
        if output_mode == "joint_trajectory":
            # the controller is where the last sent horizon says at `now`: the new one must
            # continue from there within the velocity limit
            start = q if sent is None else np.array(
                [np.interp(now, sent[0], sent[1][:, j]) for j in range(2)])
            sent = check_horizon(ex, now, start, cmd.status)
            prev = ex.last_command

    for kind, a, b in evts:
        if kind == "tick":
            for _ in range(a):
                now += b
                tick()
        elif kind == "plan":
            now += a
            plan = data.draw(plans(now))
            try:
                valid = validate_plan(plan, NAMES)
            except PlanRejected:
                valid = None
            result = ex.submit(plan, now)
            if valid is None:
                assert result.status == "rejected"
            submitted.append(Submitted(valid, now, epoch))
        else:
            now -= a
            epoch += 1
            sent = None  # a new timeline: the old horizon's times mean nothing
            tick()


def check_horizon(ex: PlanExecutor, now: float, last: np.ndarray, status: str):
    """joint_trajectory output: future points only, feasible from where the controller is
    (`last`); returns the horizon as absolute knots."""
    t, p, v = ex.remaining_trajectory(now)
    assert len(t) >= 1 and np.all(np.isfinite(p)) and np.all(np.isfinite(v))
    assert np.all(t > 0.0)  # plan time now + lead + t is after now + lead
    assert np.all(np.diff(t) > 0.0)
    assert np.all(p >= LOWER) and np.all(p <= UPPER)
    knots_t = np.concatenate(([0.0], t))
    knots_p = np.vstack((last, p))
    assert np.all(np.abs(np.diff(knots_p, axis=0)) <= VMAX * np.diff(knots_t)[:, None] + EPS)
    assert np.all(np.abs(v) <= VMAX + EPS)
    if status == HOLDING:
        assert len(t) == 1 and np.allclose(p[0], last, atol=EPS)
    return np.concatenate(([now], now + t)), knots_p
