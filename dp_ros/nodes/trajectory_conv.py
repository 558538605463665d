"""Message <-> numpy conversion for plans, arm commands and joint states.

Times stay in integer nanoseconds until the last step (header.stamp + time_from_start),
so k*dt offsets and stamps survive a round trip exactly. Arrays go through the buffer
protocol (rclpy stores float64 sequences as array.array), not Python lists.
"""

from __future__ import annotations

import array
from typing import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from dp_ros.control.executor import TrajectoryPoints
from dp_ros.control.plan import NS_PER_S, Plan, PlanRejected, seconds_to_ns


def time_to_ns(t: Time) -> int:
    return int(t.sec) * NS_PER_S + int(t.nanosec)


def ns_to_time(ns: int) -> Time:
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return Time(sec=sec, nanosec=nanosec)


def duration_to_ns(d: Duration) -> int:
    return int(d.sec) * NS_PER_S + int(d.nanosec)


def ns_to_duration(ns: int) -> Duration:
    sec, nanosec = divmod(int(ns), NS_PER_S)  # floor: negative durations stay valid
    return Duration(sec=sec, nanosec=nanosec)


def _f64(values: Sequence[float]) -> array.array:
    return array.array("d", np.asarray(values, dtype=np.float64).tobytes())


def _stack(rows: list, n_cols: int, what: str) -> np.ndarray:
    """(N, n_cols) float64 from N float64 sequences, checking each row's length."""
    for k, row in enumerate(rows):
        if len(row) != n_cols:
            raise PlanRejected(f"point {k} has {len(row)} {what} for {n_cols} joints", "shape")
    buf = b"".join(r.tobytes() if isinstance(r, array.array) else _f64(r).tobytes() for r in rows)
    return np.frombuffer(buf, dtype=np.float64).reshape(len(rows), n_cols).copy()


def trajectory_to_plan(msg: JointTrajectory) -> Plan:
    """The policy's ~/plan message as a Plan; PlanRejected for a malformed message.

    Content checks (NaN, joint names, increasing times) are validate_plan's job.
    """
    n_j = len(msg.joint_names)
    pts = msg.points
    if not pts:
        raise PlanRejected("plan has no points", "empty")
    pos = _stack([p.positions for p in pts], n_j, "positions")
    n_vel = {len(p.velocities) for p in pts}
    if n_vel == {0}:
        vel = None
    elif n_vel == {n_j}:
        vel = _stack([p.velocities for p in pts], n_j, "velocities")
    else:
        raise PlanRejected("velocities must be given for every point or for none", "shape")
    tfs = np.array([duration_to_ns(p.time_from_start) for p in pts], dtype=np.int64) / NS_PER_S
    return Plan(time_to_ns(msg.header.stamp), tuple(msg.joint_names), tfs, pos, vel)


def plan_to_trajectory(plan: Plan, frame_id: str = "") -> JointTrajectory:
    """A Plan as the policy node's ~/plan message (stamp and offsets exact to the ns)."""
    msg = JointTrajectory()
    msg.header.stamp = ns_to_time(plan.stamp_ns)
    msg.header.frame_id = frame_id
    msg.joint_names = list(plan.joint_names)
    pos = np.asarray(plan.positions, dtype=np.float64)
    vel = None if plan.velocities is None else np.asarray(plan.velocities, dtype=np.float64)
    for k, t in enumerate(np.asarray(plan.time_from_start, dtype=np.float64)):
        pt = JointTrajectoryPoint()
        pt.positions = _f64(pos[k])
        if vel is not None:
            pt.velocities = _f64(vel[k])
        pt.time_from_start = ns_to_duration(seconds_to_ns(float(t)))
        msg.points.append(pt)
    return msg


def command_trajectory(joint_names: Sequence[str], points: TrajectoryPoints) -> JointTrajectory:
    """joint_trajectory mode: header.stamp 0 means "start now" to joint_trajectory_controller;
    times_from_now become time_from_start (all > 0), velocities filled."""
    msg = JointTrajectory()  # header.stamp defaults to zero
    msg.joint_names = list(joint_names)
    for t, p, v in zip(points.times_from_now, points.positions, points.velocities):
        pt = JointTrajectoryPoint()
        pt.positions = _f64(p)
        pt.velocities = _f64(v)
        pt.time_from_start = ns_to_duration(max(seconds_to_ns(float(t)), 1))  # never 0
        msg.points.append(pt)
    return msg


def position_command(positions: np.ndarray) -> Float64MultiArray:
    """position_stream mode: one value per joint, in the controller's joint order."""
    return Float64MultiArray(data=_f64(positions))


class JointStateRejected(ValueError):
    """An unusable joint state; `cause` is a short stable key (missing_joint, non_finite...)."""

    def __init__(self, reason: str, cause: str):
        super().__init__(reason)
        self.cause = cause


class JointStateReader:
    """Picks `joint_names` out of sensor_msgs/JointState (any order, extra joints ignored).

    The index map is cached per name list, so the per-message cost is one fancy index.
    """

    def __init__(self, joint_names: Sequence[str]):
        self.joint_names = tuple(joint_names)
        self._names: tuple[str, ...] | None = None
        self._index: np.ndarray | None = None

    def read(self, msg: JointState) -> np.ndarray:
        """(J,) positions; JointStateRejected on a missing joint or a non-finite value."""
        names = tuple(msg.name)
        if names != self._names:
            missing = [j for j in self.joint_names if j not in names]
            if missing:
                raise JointStateRejected(f"joint state lacks joints {missing}", "missing_joint")
            self._names, self._index = names, np.array([names.index(j) for j in self.joint_names])
        if len(msg.position) != len(names):
            raise JointStateRejected(f"joint state has {len(msg.position)} positions for "
                                     f"{len(names)} names", "size_mismatch")
        raw = msg.position  # array.array('d') when received: no per-element conversion
        pos = np.frombuffer(raw, np.float64) if isinstance(raw, array.array) \
            else np.asarray(raw, np.float64)
        q = pos[self._index]  # fancy indexing copies
        if not np.all(np.isfinite(q)):
            j = self.joint_names[int(np.argmax(~np.isfinite(q)))]
            raise JointStateRejected(f"joint state has a non-finite position for {j!r}",
                                     "non_finite")
        return q
