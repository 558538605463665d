"""trajectory_executor: message conversion, then the node over real DDS.

A test node stands in for the policy node (publishes plans), the joint-state broadcaster
and the arm driver (records commands), and calls ~/enable. Both output modes; enable
rules; commands follow the plan; hold when plans stop; bad plans rejected (logged once,
counted, executor holds); a plan arriving 300 ms late never yields a point for a time
already past and the switch stays within the velocity limit.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Duration  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from dp_ros.control.executor import TrajectoryPoints  # noqa: E402
from dp_ros.control.plan import PlanRejected, plan_from_actions  # noqa: E402
from dp_ros.nodes.diagnostics import CauseLog  # noqa: E402
from dp_ros.nodes.trajectory_conv import (JointStateReader, JointStateRejected,  # noqa: E402
                                          command_trajectory, ns_to_duration,
                                          plan_to_trajectory, position_command,
                                          trajectory_to_plan)
from dp_ros.nodes.trajectory_executor import TrajectoryExecutorNode  # noqa: E402

JOINTS = ["j1", "j2"]
VMAX = 0.5
LOWER, UPPER = [-1.0, -1.0], [1.0, 1.0]
LEAD = 0.02
CTRL_DT = 0.01
DT = 0.1
EPS = 1e-9
Q0 = np.array([0.1, -0.2])


# ------------------------------------------------------------------ conversion (no DDS)
def test_plan_message_round_trip_is_exact():
    stamp_ns = 1_700_000_000_123_456_789
    actions = np.random.default_rng(0).normal(size=(16, 2))
    plan = plan_from_actions(stamp_ns, actions, 2, DT, JOINTS)
    msg = plan_to_trajectory(plan)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert [(p.time_from_start.sec, p.time_from_start.nanosec) for p in msg.points][:12:11] \
        == [(0, 0), (1, 100_000_000)]
    back = trajectory_to_plan(msg)
    assert back.stamp_ns == stamp_ns and back.joint_names == tuple(JOINTS)
    np.testing.assert_array_equal(back.positions, plan.positions)
    np.testing.assert_array_equal(back.velocities, plan.velocities)
    np.testing.assert_array_equal(back.time_from_start, plan.time_from_start)


def test_malformed_plan_message_is_rejected():
    msg = JointTrajectory(joint_names=JOINTS)
    with pytest.raises(PlanRejected):
        trajectory_to_plan(msg)  # no points
    msg.points = [JointTrajectoryPoint(positions=[0.0, 1.0]), JointTrajectoryPoint(positions=[0.0])]
    with pytest.raises(PlanRejected) as err:
        trajectory_to_plan(msg)
    assert err.value.cause == "shape"


def test_command_messages():
    pts = TrajectoryPoints(np.array([1e-12, 0.5]), np.array([[0.0, 1.0], [2.0, 3.0]]),
                           np.array([[0.1, 0.2], [0.0, 0.0]]))
    msg = command_trajectory(JOINTS, pts)
    assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0  # "now" for the JTC
    assert msg.points[0].time_from_start.nanosec > 0  # never 0
    assert list(msg.points[1].positions) == [2.0, 3.0]
    assert list(msg.points[0].velocities) == [0.1, 0.2]
    assert list(position_command(np.array([0.5, -0.5])).data) == [0.5, -0.5]
    assert ns_to_duration(-1) == Duration(sec=-1, nanosec=999_999_999)


def test_joint_state_reader_picks_by_name():
    reader = JointStateReader(JOINTS)
    msg = JointState(name=["x", "j2", "j1"], position=[9.0, 2.0, 1.0])
    np.testing.assert_array_equal(reader.read(msg), [1.0, 2.0])
    for bad, cause in [(JointState(name=["j1"], position=[1.0]), "missing_joint"),
                       (JointState(name=["j1", "j2"], position=[1.0, float("nan")]),
                        "non_finite"),
                       (JointState(name=["j1", "j2"], position=[1.0]), "size_mismatch")]:
        with pytest.raises(JointStateRejected) as err:
            reader.read(bad)
        assert err.value.cause == cause


# ------------------------------------------------------------------ node over DDS
def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class RecordingLogger:
    def __init__(self):
        self.warnings: list[str] = []

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)


class Rig:
    """Executor node + a test node (plans out, joint states out, commands in) spinning on
    one executor in a background thread."""

    def __init__(self, ctx, mode: str, **params):
        overrides = dict(joint_names=JOINTS, output_mode=mode, position_lower=LOWER,
                         position_upper=UPPER, max_velocity=VMAX, actuation_lead=LEAD,
                         stale_plan_timeout=1.0, control_rate_hz=1.0 / CTRL_DT,
                         joint_trajectory_rate_hz=10.0, diagnostics_period=0.2) | params
        self.node = TrajectoryExecutorNode(
            context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        self.logger = RecordingLogger()
        self.node.problems = CauseLog(self.logger)  # to see what is logged, and how often
        self.test = Node("arm_and_policy", context=ctx)
        self.lock = threading.Lock()
        self.commands: list[tuple[float, object]] = []  # (receive time s, msg)
        self.diagnostics: list = []
        cmd_type = JointTrajectory if mode == "joint_trajectory" else Float64MultiArray
        topic = self.node.cfg.command_topic
        self.test.create_subscription(cmd_type, topic, self._on_command, 100)
        self.test.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.plan_pub = self.test.create_publisher(JointTrajectory, "/policy_node/plan", 10)
        self.js_pub = self.test.create_publisher(JointState, "/joint_states", 10)
        self.publish_joint_states = False
        self.test.create_timer(0.02, self._on_js_timer)
        self.enable_client = self.test.create_client(SetBool, "/trajectory_executor/enable")
        # one thread, as in deployment; stopped between spins so teardown races nothing
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.test)
        self.spinning = True
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        wait_for(lambda: self.plan_pub.get_subscription_count() > 0
                 and self.test.count_publishers(topic) > 0, what="discovery")

    def _spin(self) -> None:
        while self.spinning:
            self.executor.spin_once(timeout_sec=0.05)

    def now(self) -> float:
        return self.test.get_clock().now().nanoseconds * 1e-9

    def _on_command(self, msg) -> None:
        with self.lock:
            self.commands.append((self.now(), msg))

    def _on_diag(self, msg) -> None:
        with self.lock:
            self.diagnostics.extend(s for s in msg.status if "trajectory_executor" in s.name)

    def _on_js_timer(self) -> None:
        if self.publish_joint_states:
            self.js_pub.publish(JointState(name=["gripper", "j2", "j1"],
                                           position=[0.0, float(Q0[1]), float(Q0[0])]))

    def enable(self, on: bool = True) -> SetBool.Response:
        assert self.enable_client.wait_for_service(timeout_sec=10.0)
        fut = self.enable_client.call_async(SetBool.Request(data=on))
        wait_for(fut.done, what="enable service")
        return fut.result()

    def publish_plan(self, stamp: float, start, slope, n: int = 15, joints=JOINTS) -> None:
        """A ramp plan stamped `stamp` (float seconds), as the policy node publishes it."""
        k = np.arange(n + 1)[:, None]
        actions = np.asarray(start) + (k - 1) * DT * np.asarray(slope)  # T_o = 2
        plan = plan_from_actions(int(round(stamp * 1e9)), actions, 2, DT, list(joints))
        self.plan_pub.publish(plan_to_trajectory(plan))

    def diag_statuses(self) -> set[str]:
        with self.lock:
            return {kv.value for s in self.diagnostics for kv in s.values if kv.key == "status"}

    def received(self) -> list[tuple[float, object]]:
        with self.lock:
            return list(self.commands)

    def diag_values(self) -> dict[str, str]:
        with self.lock:
            return {kv.key: kv.value for kv in self.diagnostics[-1].values} \
                if self.diagnostics else {}

    def close(self) -> None:
        self.spinning = False
        self.thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()
        self.test.destroy_node()


@pytest.fixture
def rig_factory(ros_context):
    rigs = []

    def make(mode: str, **params) -> Rig:
        rigs.append(Rig(ros_context, mode, **params))
        return rigs[-1]
    yield make
    for rig in rigs:
        rig.close()


def positions(cmds) -> np.ndarray:
    return np.array([list(m.data) for _, m in cmds])


@pytest.mark.ros
def test_position_stream_enable_follow_hold_and_reject(rig_factory):
    rig = rig_factory("position_stream")
    # disabled: nothing is sent; enable needs a joint state
    resp = rig.enable()
    assert not resp.success and "no joint state" in resp.message
    rig.publish_plan(rig.now(), Q0, [0.2, 0.2])  # ignored while disabled
    time.sleep(0.3)
    assert rig.received() == []
    rig.publish_joint_states = True
    wait_for(lambda: rig.node._joint_state is not None, what="joint state")
    resp = rig.enable()
    assert resp.success, resp.message

    # holding the current position until a plan arrives
    wait_for(lambda: len(rig.received()) >= 10, what="hold commands")
    np.testing.assert_allclose(positions(rig.received()), np.tile(Q0, (len(rig.received()), 1)))

    # follows a plan that starts where the arm is
    t0 = rig.now()
    rig.publish_plan(t0, Q0, [0.2, -0.1])
    wait_for(lambda: rig.now() > t0 + 0.6, what="tracking")
    tracked = [(t, m) for t, m in rig.received() if t0 + 0.25 < t < t0 + 0.6]
    assert len(tracked) > 10
    for t, m in tracked:  # the command for time t + lead, up to DDS delay and the bridge
        want = Q0 + np.array([0.2, -0.1]) * (t + LEAD - t0)
        np.testing.assert_allclose(list(m.data), want, atol=0.02)
    wait_for(lambda: "tracking" in rig.diag_statuses(), what="tracking diagnostics")

    # plans stop: it holds once the plan runs out / goes stale, and says why
    wait_for(lambda: rig.node.plan_executor.status == "holding", timeout=5.0, what="hold")
    n = len(rig.received())
    wait_for(lambda: len(rig.received()) >= n + 20, what="more commands")
    held = positions(rig.received()[n:])
    assert np.all(held == held[0])
    wait_for(lambda: rig.diag_values().get("status") == "holding", what="holding diagnostics")
    assert "stale" in rig.diag_values()["reason"] or "ran out" in rig.diag_values()["reason"]

    # bad plans: rejected with a reason, logged once per cause, counted; still holding
    now = rig.now()
    bad = []
    nan_plan = plan_to_trajectory(plan_from_actions(int(now * 1e9), np.zeros((4, 2)), 2, DT,
                                                    JOINTS))
    nan_plan.points[1].positions[0] = float("nan")
    bad += [nan_plan, nan_plan]
    wrong = plan_to_trajectory(plan_from_actions(int(now * 1e9), np.zeros((4, 2)), 2, DT,
                                                 ["j1", "elbow"]))
    bad.append(wrong)
    nonmono = plan_to_trajectory(plan_from_actions(int(now * 1e9), np.zeros((4, 2)), 2, DT,
                                                   JOINTS))
    nonmono.points[2].time_from_start = nonmono.points[1].time_from_start
    bad.append(nonmono)
    n = len(rig.received())
    for msg in bad:
        rig.plan_pub.publish(msg)
    wait_for(lambda: rig.node.stats["plans_rejected"] >= 4, what="rejections")
    assert rig.node.stats["plans_rejected/non_finite"] == 2
    assert rig.node.stats["plans_rejected/joint_names"] == 1
    assert rig.node.stats["plans_rejected/times"] == 1
    plan_logs = [w for w in rig.logger.warnings if "plan rejected" in w]
    assert len(plan_logs) == 3, plan_logs  # once per cause: NaN logged once, not twice
    wait_for(lambda: rig.diag_values().get("plans_rejected") == "4", what="diagnostics count")
    assert rig.diag_values()["plans_rejected/non_finite"] == "2"
    time.sleep(0.2)
    held = positions(rig.received()[n:])
    assert len(held) > 5 and np.all(held == held[0]) and rig.node.plan_executor.status == "holding"

    # clause 2 over the whole stream: limits and per-step velocity
    allq = positions(rig.received())
    assert np.all(allq >= LOWER) and np.all(allq <= UPPER)
    assert np.all(np.abs(np.diff(allq, axis=0)) <= VMAX * CTRL_DT + EPS)

    # disable: silence
    assert rig.enable(False).success
    time.sleep(0.1)
    n = len(rig.received())
    time.sleep(0.3)
    assert len(rig.received()) == n


def trajectory_at(t_rel: float, msg: JointTrajectory, start: np.ndarray) -> np.ndarray:
    """Linear interpolation of a sent trajectory (from `start` at 0) at t_rel seconds."""
    ts = [0.0] + [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
    ps = np.vstack([start] + [list(p.positions) for p in msg.points])
    return np.array([np.interp(t_rel, ts, ps[:, j]) for j in range(ps.shape[1])])


@pytest.mark.ros
def test_joint_trajectory_late_plan_and_switch(rig_factory):
    rig = rig_factory("joint_trajectory", joint_names=JOINTS)
    rig.publish_joint_states = True
    wait_for(lambda: rig.node._joint_state is not None, what="joint state")
    assert rig.enable().success
    # a hold trajectory at the current position comes first
    wait_for(lambda: len(rig.received()) >= 1, what="hold trajectory")
    first = rig.received()[0][1]
    assert len(first.points) == 1
    np.testing.assert_allclose(list(first.points[0].positions), Q0)

    t0 = rig.now()
    rig.publish_plan(t0, Q0, [0.3, 0.3])  # on time
    wait_for(lambda: rig.now() > t0 + 0.45, what="plan A running")
    n_before_b = len(rig.received())
    # plan B computed from the window at tb, arriving 300 ms late, 0.1 off plan A
    now = rig.now()
    tb = now - 0.3
    rig.publish_plan(tb, Q0 + 0.3 * (tb - t0) + np.array([0.1, -0.1]), [0.3, 0.3])
    wait_for(lambda: rig.node.stats["plans_accepted"] >= 2, what="plan B accepted")
    assert rig.node.stats["late_points"] >= 3  # the points at tb .. tb+0.2 (+ lead)
    # the switch is recorded with its velocity jump: plan B starts 0.1 off plan A, so the
    # bridge to it runs faster than A's 0.3 rad/s; reported on /diagnostics too
    (when, jump), = rig.node.switches_since(t0)
    assert now - 0.05 < when < rig.now() and 0.0 < jump <= 2 * VMAX
    wait_for(lambda: rig.diag_values().get("plan_switches") == "1", what="switch diagnostics")
    assert float(rig.diag_values()["switch_velocity_jump_max"]) == pytest.approx(jump, rel=1e-4)
    wait_for(lambda: rig.now() > now + 0.5, what="plan B running")

    msgs = rig.received()
    assert len(msgs) > n_before_b + 3
    prev_t, prev_msg, prev_start = None, None, None
    for t_recv, msg in msgs:  # start: where the controller is when the message arrives
        assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
        tfs = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
                        for p in msg.points])
        q = np.array([list(p.positions) for p in msg.points])
        v = np.array([list(p.velocities) for p in msg.points])
        # clause 1: every point is for a time after now + lead
        assert np.all(tfs > 0) and np.all(np.diff(tfs) > 0)
        # clause 2: within limits, consecutive points within the velocity limit
        assert np.all(q >= LOWER) and np.all(q <= UPPER)
        assert np.all(np.abs(np.diff(q, axis=0)) <= VMAX * np.diff(tfs)[:, None] + EPS)
        assert np.all(np.abs(v) <= VMAX + EPS)
        start = q[0]
        if prev_msg is not None:
            # continuity across messages (incl. the switch to plan B): from where the
            # previous trajectory has the arm now, the first point is reachable within the
            # velocity limit (slack for send/receive jitter of a few ms)
            start = trajectory_at(t_recv - prev_t, prev_msg, prev_start)
            gap = np.abs(q[0] - start)
            assert np.all(gap <= VMAX * (tfs[0] + 0.01) + 1e-6), (gap, tfs[0])
        prev_t, prev_msg, prev_start = t_recv, msg, start
    # after the switch the horizon sent follows plan B
    t_last, last = msgs[-1]
    qb = np.array(list(last.points[-2].positions))
    tb_pt = t_last + LEAD + last.points[-2].time_from_start.sec \
        + last.points[-2].time_from_start.nanosec * 1e-9
    want = Q0 + 0.3 * (tb - t0) + np.array([0.1, -0.1]) + 0.3 * (tb_pt - tb)
    np.testing.assert_allclose(qb, want, atol=0.02)

    # plans stop: a hold trajectory (one point) replaces the horizon
    wait_for(lambda: len(rig.received()[-1][1].points) == 1, timeout=5.0, what="hold message")


# ------------------------------------------------------------------ parameters, executable
VALID = dict(joint_names=JOINTS, position_lower=LOWER, position_upper=UPPER,
             max_velocity=VMAX, actuation_lead=LEAD)


def overrides(**params) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in (VALID | params).items()]


@pytest.mark.ros
def test_parameters_are_validated_with_reasons(ros_context):
    for change, match in [(dict(joint_names=["j1", "j1"]), "joint_names"),
                          (dict(output_mode="velocity"), "output_mode"),
                          (dict(position_lower=[-1.0]), "position lower"),
                          (dict(position_lower=[1.0, 1.0], position_upper=[0.0, 0.0]),
                           "lower limit"),
                          (dict(max_velocity=-1.0), "max velocity"),
                          (dict(actuation_lead=0.5, stale_plan_timeout=0.2), "actuation_lead")]:
        with pytest.raises(ValueError, match=match):
            TrajectoryExecutorNode(context=ros_context, parameter_overrides=overrides(**change))
    node = TrajectoryExecutorNode(context=ros_context, parameter_overrides=overrides())
    try:
        def try_set(name, value):
            return node.set_parameters([Parameter(name, value=value)])[0]
        res = try_set("stale_plan_timeout", 0.015)  # below the actuation lead
        assert not res.successful and "actuation_lead" in res.reason
        res = try_set("max_velocity", [1.0])
        assert not res.successful and "2 values" in res.reason
        res = try_set("max_velocity", "fast")
        assert not res.successful and "number" in res.reason
        assert not try_set("output_mode", "position_stream").successful  # read-only
        assert not try_set("actuation_lead", 5.0).successful  # outside its range
        assert try_set("max_velocity", [0.3, 0.4]).successful
        np.testing.assert_array_equal(node.plan_executor.limits.max_velocity, [0.3, 0.4])
        assert try_set("crossfade_steps", 3).successful
        assert node.plan_executor.crossfade_steps == 3
    finally:
        node.destroy_node()


@pytest.mark.ros
def test_executable_autostarts_and_holds_on_ctrl_c(ros_context):
    """The entry point as its own process: autostart at the first joint state, then on
    SIGINT a last one-point trajectory stops the controller's running horizon; exit 0."""
    import os
    import signal
    import subprocess
    import sys

    test = Node("arm", context=ros_context)
    got: list[JointTrajectory] = []
    test.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", got.append, 100)
    js = test.create_publisher(JointState, "/joint_states", 10)
    plans = test.create_publisher(JointTrajectory, "/policy_node/plan", 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(test)

    def spin_until(cond, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            js.publish(JointState(name=JOINTS, position=[float(Q0[0]), float(Q0[1])]))
            executor.spin_once(timeout_sec=0.02)
        return cond()

    proc = subprocess.Popen(
        [sys.executable, "-m", "dp_ros.nodes.trajectory_executor", "--ros-args",
         "-p", "joint_names:=[j1,j2]", "-p", "autostart:=true",
         "-p", "position_lower:=[-1.0,-1.0]", "-p", "position_upper:=[1.0,1.0]"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ), text=True)
    try:
        assert spin_until(lambda: len(got) > 0 or proc.poll() is not None) and got, \
            proc.stderr.read() if proc.poll() is not None else "no hold after autostart"
        stamp = test.get_clock().now().nanoseconds
        actions = Q0 + np.arange(-1, 15)[:, None] * DT * np.array([0.2, 0.2])
        plans.publish(plan_to_trajectory(plan_from_actions(stamp, actions, 2, DT, JOINTS)))
        assert spin_until(lambda: len(got[-1].points) > 1), "no trajectory for the plan"
        n = len(got)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20.0)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        spin_until(lambda: len(got) > n and len(got[-1].points) == 1, timeout=3.0)
        assert len(got[-1].points) == 1, "no hold trajectory on shutdown"
        assert np.all(np.abs(np.array(got[-1].points[0].positions) - Q0) < 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        executor.shutdown()
        test.destroy_node()


@pytest.mark.ros
def test_sim_time_and_clock_jump_back(rig_factory):
    """use_sim_time: the control loop runs on /clock; when /clock jumps back (a bag
    replay looping) the plan is dropped and the position held; new-timeline plans work."""
    from rosgraph_msgs.msg import Clock as ClockMsg

    rig = rig_factory("position_stream", use_sim_time=True)
    clock_pub = rig.test.create_publisher(ClockMsg, "/clock", 10)
    sim = {"ns": 1_000 * 10**9, "run": True}

    def run_clock():
        while sim["run"]:
            sim["ns"] += 5_000_000
            msg = ClockMsg()
            msg.clock.sec, msg.clock.nanosec = divmod(sim["ns"], 10**9)
            clock_pub.publish(msg)
            time.sleep(0.005)
    clock_thread = threading.Thread(target=run_clock, daemon=True)
    clock_thread.start()
    try:
        rig.publish_joint_states = True
        wait_for(lambda: rig.node._joint_state is not None and rig.node._joint_state[1] > 0,
                 what="joint state on sim time")
        assert rig.enable().success
        t0 = sim["ns"] * 1e-9
        rig.publish_plan(t0, Q0, [0.2, 0.2])
        wait_for(lambda: rig.node.plan_executor.status == "tracking", what="tracking")
        wait_for(lambda: sim["ns"] * 1e-9 > t0 + 0.3, what="sim time passing")
        sim["ns"] -= 5 * 10**9  # the bag loops
        wait_for(lambda: rig.node.plan_executor.cause == "clock_jump", what="jump detected")
        n = len(rig.received())
        wait_for(lambda: len(rig.received()) > n + 10, what="commands after the jump")
        held = positions(rig.received()[n:])
        assert np.all(held == held[0])
        t1 = sim["ns"] * 1e-9
        rig.publish_plan(t1, held[0], [0.1, 0.1])  # a plan of the new timeline
        wait_for(lambda: rig.node.plan_executor.status == "tracking", what="tracking again")
        allq = positions(rig.received())
        assert np.all(np.abs(np.diff(allq, axis=0)) <= VMAX * CTRL_DT + EPS)
        assert rig.node.plan_executor.clock_jumps >= 1
    finally:
        sim["run"] = False
        clock_thread.join(timeout=2.0)
