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
The oracle is dp_ros.control.contract.ContractChecker (the same checker the fault suite
and `dp-ros soak` use), independent of the executor: validate_plan + stamp/time
arithmetic; fed the executor's exact `now`, so its timing tolerances are zero. Besides
the command stream, the executor must say it is holding (status and reason) whenever
the checker finds that no plan can cover now.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dp_ros.control.contract import ContractChecker
from dp_ros.control.executor import HOLDING, PlanExecutor
from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import Plan, PlanRejected, seconds_to_ns, validate_plan

NAMES = ("j1", "j2")
LOWER, UPPER = np.array([-1.0, -0.5]), np.array([1.0, 2.0])
VMAX = np.array([0.5, 2.0])
CTRL_DT = 0.01
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
    limits = JointLimits.create(2, LOWER, UPPER, VMAX)
    ex = PlanExecutor(NAMES, limits, lead, timeout, crossfade, CTRL_DT)
    checker = ContractChecker(NAMES, limits, lead, timeout, CTRL_DT)
    now = START
    ex.enable(np.array(q0), now)
    checker.set_position(now, q0)

    def tick():
        cmd = ex.command(now)  # the node runs this every control period in both modes
        assert cmd.time == now + lead
        if not checker.may_be_covered(now):
            assert cmd.status == HOLDING and cmd.reason, cmd  # says it holds, and why
        if output_mode == "position_stream":
            checker.stream_command(now, cmd.positions, for_time=cmd.time)
        else:
            t, p, v = ex.remaining_trajectory(now)
            checker.trajectory_command(now, t, p, v)
            if cmd.status == HOLDING:
                assert len(t) == 1  # a hold is one point
        assert checker.total == 0, checker.summary()

    for kind, a, b in evts:
        if kind == "tick":
            for _ in range(a):
                now += b
                tick()
        elif kind == "plan":
            now += a
            plan = data.draw(plans(now))
            try:
                validate_plan(plan, NAMES)
                valid = True
            except PlanRejected:
                valid = False
            result = ex.submit(plan, now)
            if not valid:
                assert result.status == "rejected"
            checker.plan(now, plan)
        else:
            now -= a
            tick()


def test_checker_catches_broken_streams():
    """The oracle itself: each clause is detected when broken (a checker that cannot fail
    would make the property above vacuous)."""
    limits = JointLimits.create(2, LOWER, UPPER, VMAX)
    plan = Plan.at_times(START, NAMES, START + np.arange(5) * 0.1,
                         np.linspace([0.0, 0.0], [0.02, 0.04], 5))

    def fresh(mode_q0=(0.0, 0.0)):
        c = ContractChecker(NAMES, limits, 0.02, 1.0, CTRL_DT)
        c.set_position(START, mode_q0)
        return c

    c = fresh()  # clause 1: a point at or before now
    c.plan(START, plan)
    c.trajectory_command(START + 0.01, [0.0, 0.05], [[0.001, 0.0], [0.01, 0.02]])
    assert c.counts[1] == 1
    c = fresh()  # clause 1: a plan knot scheduled after its time (executed late)
    c.plan(START, plan)
    c.trajectory_command(START + 0.01, [0.1, 0.2], plan.positions[1:3])
    assert c.counts[1] == 1 and c.counts[2] == 0
    c = fresh()  # the same knots at their own times: fine
    c.plan(START, plan)
    c.trajectory_command(START + 0.01, [0.1 - 0.03, 0.2 - 0.03], plan.positions[1:3])
    assert c.total == 0, c.summary()
    c = fresh()  # clause 2: outside the limits, and a jump beyond the velocity limit
    c.plan(START, plan)
    c.stream_command(START + 0.01, [1.5, 0.0])
    c.stream_command(START + 0.02, [0.0, 0.0])
    assert c.counts[2] >= 2
    c = fresh()  # clause 3: moving with no plan
    c.stream_command(START + 0.01, [0.001, 0.0])
    c.trajectory_command(START + 0.02, [0.01, 0.02], [[0.001, 0.0], [0.002, 0.0]])
    assert c.counts[3] == 2 and c.counts[2] == 0
    c = fresh()  # clause 3: the plan went stale; then a clock jump back voids the old plans
    c.plan(START, plan)
    c.stream_command(START + 0.2, [0.004, 0.0])
    c.stream_command(START + 1.5, [0.008, 0.0])
    assert c.counts[3] == 1
    c.stream_command(START + 0.1, [0.012, 0.0])
    assert c.counts[3] == 2 and c.clock_jumps == 1
