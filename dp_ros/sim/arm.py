"""The simulated planar arm: kinematics and a ros2_control-like controller.

Pure numpy (no rclpy): the ROS node converts messages to the arrays used here.

- ArmGeometry: link lengths, joint limits, velocity limit, forward/inverse kinematics.
- parse_trajectory / parse_position_command: validate command arrays the way
  joint_trajectory_controller / forward_command_controller do; bad input raises
  CommandRejected listing every cause, and the arm keeps what it was doing.
- SimulatedArm: the joint state, driven by ``step(now)`` from an external clock. Two
  command inputs, the latest wins: a trajectory (replaces the running one; start time
  0 means "now"; linear or cubic interpolation from the current desired state; hold
  after the last point) or a position target (held until the next).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

INTERPOLATIONS = ("linear", "cubic")


@dataclass(frozen=True)
class ArmGeometry:
    """A planar serial arm with revolute joints, base at the world origin.

    ``base_yaw`` is the world direction of the first link at q = 0: by default the arm
    points towards -y (the task's start region), so q1 = 0 is "at the start" and the
    two ways round the obstacle are q1 > 0 (right) and q1 < 0 (left)."""

    link_lengths: tuple[float, ...] = (0.5, 0.5)
    base_yaw: float = -math.pi / 2
    lower: Optional[tuple[float, ...]] = None   # rad; default -pi for joint 1, -2.8 else
    upper: Optional[tuple[float, ...]] = None
    max_velocity: float = 2.0                    # rad/s, every joint
    link_width: float = 0.04                     # m; drawn width, and collision margin

    def __post_init__(self):
        n = len(self.link_lengths)
        if n not in (2, 3):
            raise ValueError(f"the arm has 2 or 3 links, got {n}")
        if any(not (l > 0) for l in self.link_lengths):
            raise ValueError(f"link lengths must be > 0, got {self.link_lengths}")
        if not self.max_velocity > 0:
            raise ValueError("max_velocity must be > 0")
        default_lo = (-math.pi,) + (-2.8,) * (n - 1)
        lo = tuple(self.lower) if self.lower is not None else default_lo
        hi = tuple(self.upper) if self.upper is not None else tuple(-v for v in default_lo)
        if len(lo) != n or len(hi) != n or any(a >= b for a, b in zip(lo, hi)):
            raise ValueError(f"joint limits must be {n} pairs lower < upper")
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(self, "link_lengths", tuple(float(l) for l in self.link_lengths))
        # numpy copies for the hot path (np.clip is slow on tiny arrays)
        object.__setattr__(self, "_lo", np.asarray(lo, dtype=float))
        object.__setattr__(self, "_hi", np.asarray(hi, dtype=float))
        object.__setattr__(self, "_lengths", np.asarray(self.link_lengths)[:, None])

    @property
    def n_joints(self) -> int:
        return len(self.link_lengths)

    @property
    def joint_names(self) -> list[str]:
        return [f"joint_{i + 1}" for i in range(self.n_joints)]

    @property
    def reach(self) -> float:
        return float(sum(self.link_lengths))

    def clip(self, q: np.ndarray) -> np.ndarray:
        return np.minimum(np.maximum(q, self._lo), self._hi)

    def link_points(self, q: np.ndarray) -> np.ndarray:
        """Base, joints and end effector: (..., n+1, 2) for q of shape (..., n)."""
        q = np.asarray(q, dtype=float)
        angles = self.base_yaw + np.cumsum(q, axis=-1)
        steps = self._lengths * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
        tips = np.cumsum(steps, axis=-2)
        base = np.zeros(tips.shape[:-2] + (1, 2))
        return np.concatenate([base, tips], axis=-2)

    def end_effector(self, q: np.ndarray) -> np.ndarray:
        return self.link_points(q)[..., -1, :]


def two_link_ik(target: np.ndarray, l1: float, l2: float, elbow: int,
                base_yaw: float = 0.0) -> tuple[float, float]:
    """(q1, q2) putting the tip of a two-link arm on ``target``; ``elbow`` = +1 gives
    q2 >= 0, -1 gives q2 <= 0. Out-of-reach targets give the closest (stretched or
    folded) configuration. q1 is wrapped to [-pi, pi)."""
    x, y = float(target[0]), float(target[1])
    c2 = (x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2)
    q2 = math.copysign(math.acos(min(1.0, max(-1.0, c2))), elbow)
    q1 = math.atan2(y, x) - math.atan2(l2 * math.sin(q2), l1 + l2 * math.cos(q2)) - base_yaw
    return (q1 + math.pi) % (2 * math.pi) - math.pi, q2


# ---------------------------------------------------------------------------- commands

class CommandRejected(ValueError):
    """A command the controller refuses; ``causes`` holds one line per problem."""

    def __init__(self, causes: Sequence[str]):
        self.causes = list(causes)
        super().__init__("; ".join(self.causes))


@dataclass(frozen=True)
class Trajectory:
    """A validated trajectory in the arm's joint order. ``start`` is the absolute time
    (s) of time_from_start 0, or None for "when received"."""

    start: Optional[float]
    times: np.ndarray                 # (K,) time_from_start, strictly increasing, >= 0
    positions: np.ndarray             # (K, n)
    velocities: Optional[np.ndarray]  # (K, n) or None when the message had none


def parse_trajectory(joint_names: Sequence[str], names: Sequence[str],
                     start: Optional[float], times: Sequence[float],
                     positions: Sequence[Sequence[float]],
                     velocities: Sequence[Sequence[float]]) -> Trajectory:
    """Validate a JointTrajectory's content (as arrays) and reorder it to ``joint_names``.

    ``velocities[k]`` may be empty (positions only); it must then be empty for every
    point. An empty ``times`` is valid: it means "stop and hold". Raises CommandRejected
    listing every problem found."""
    causes: list[str] = []
    n = len(joint_names)
    unknown = [nm for nm in names if nm not in joint_names]
    if unknown:
        causes.append(f"unknown joint names {unknown} (expected {list(joint_names)})")
    if len(set(names)) != len(names):
        causes.append(f"duplicate joint names in {list(names)}")
    missing = [nm for nm in joint_names if nm not in names]
    if missing and not unknown:
        causes.append(f"missing joints {missing}")
    k = len(times)
    if len(positions) != k or len(velocities) != k:
        causes.append("inconsistent point arrays")  # cannot come from a message
    width = len(names)
    bad_len = [i for i, p in enumerate(positions) if len(p) != width]
    if bad_len:
        causes.append(f"point(s) {bad_len[:5]} do not have {width} positions")
    has_vel = [len(v) > 0 for v in velocities]
    if any(has_vel) and (not all(has_vel) or any(len(v) != width for v in velocities)):
        causes.append(f"velocities must be empty or have {width} values in every point")
    t = np.asarray(times, dtype=float)
    if k and not np.all(np.isfinite(t)):
        causes.append("non-finite time_from_start")
    elif k and (t[0] < 0 or np.any(np.diff(t) <= 0)):
        causes.append("time_from_start must be >= 0 and strictly increasing")
    if not bad_len and k and not np.all(np.isfinite(np.asarray(positions, dtype=float))):
        causes.append("non-finite (NaN/inf) positions")
    if any(has_vel) and not causes and not np.all(np.isfinite(np.asarray(velocities, float))):
        causes.append("non-finite (NaN/inf) velocities")
    if start is not None and not math.isfinite(start):
        causes.append("non-finite start time")
    if causes:
        raise CommandRejected(causes)
    order = [list(names).index(nm) for nm in joint_names]
    pos = np.asarray(positions, dtype=float).reshape(k, n)[:, order]
    vel = np.asarray(velocities, dtype=float).reshape(k, n)[:, order] if any(has_vel) else None
    return Trajectory(start=start, times=t, positions=pos, velocities=vel)


def parse_position_command(values: Sequence[float], n_joints: int) -> np.ndarray:
    """A forward position command (joint order): n finite values."""
    q = np.asarray(values, dtype=float).ravel()
    causes = []
    if q.size != n_joints:
        causes.append(f"command has {q.size} values for {n_joints} joints")
    elif not np.all(np.isfinite(q)):
        causes.append("non-finite (NaN/inf) command values")
    if causes:
        raise CommandRejected(causes)
    return q


# -------------------------------------------------------------------------- reference

@dataclass(frozen=True)
class _Knots:
    """A piecewise (linear or cubic Hermite) reference; held before the first and after
    the last knot."""

    times: np.ndarray       # (K,) absolute, strictly increasing
    positions: np.ndarray   # (K, n)
    velocities: np.ndarray  # (K, n), used by cubic only
    cubic: bool

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        ts, ps = self.times, self.positions
        if t <= ts[0]:
            return ps[0].copy(), np.zeros_like(ps[0])
        if t >= ts[-1]:
            return ps[-1].copy(), np.zeros_like(ps[-1])
        i = int(np.searchsorted(ts, t, side="right")) - 1
        h = ts[i + 1] - ts[i]
        s = (t - ts[i]) / h
        p0, p1 = ps[i], ps[i + 1]
        if not self.cubic:
            return p0 + s * (p1 - p0), (p1 - p0) / h
        m0, m1 = self.velocities[i] * h, self.velocities[i + 1] * h
        s2, s3 = s * s, s * s * s
        pos = ((2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * m0
               + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * m1)
        vel = ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * m0
               + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * m1) / h
        return pos, vel


def _knot_velocities(times: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Velocities for cubic interpolation when the message gave none: central
    differences inside, zero at the last point (the arm holds there)."""
    vel = np.zeros_like(positions)
    if len(times) > 2:
        vel[1:-1] = (positions[2:] - positions[:-2]) / (times[2:] - times[:-2])[:, None]
    return vel


@dataclass
class ArmState:
    time: float
    positions: np.ndarray
    velocities: np.ndarray


@dataclass
class SimulatedArm:
    """Joint state + controller. Call ``step(now)`` with the clock; it integrates in
    substeps of at most ``max_substep`` so a coarse clock still follows trajectories.

    The controller holds a reference (position over time); the joints track it at most
    ``max_velocity`` rad/s and stay inside the position limits (the reference is
    clipped as well). A new trajectory starts at its anchor: the desired state (as
    joint_trajectory_controller with ``interpolate_from_desired_state``) or, with that
    flag off, the measured state, at max(start, now); a point exactly at the anchor
    time makes the reference jump there. Cubic interpolation is Hermite with the
    message's velocities, or central-difference velocities when it has none."""

    geometry: ArmGeometry
    initial_positions: Optional[Sequence[float]] = None
    interpolation: str = "linear"
    interpolate_from_desired_state: bool = True
    max_substep: float = 0.005
    time: Optional[float] = field(default=None, init=False)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        n = self.geometry.n_joints
        q0 = np.zeros(n) if self.initial_positions is None else np.asarray(
            self.initial_positions, dtype=float)
        self.reset(q0)

    # -- state
    def reset(self, positions: Sequence[float], now: Optional[float] = None) -> None:
        """Teleport to ``positions`` (clipped to the limits), at rest, holding."""
        q = self.geometry.clip(np.asarray(positions, dtype=float).reshape(self.geometry.n_joints))
        self.positions = q
        self.velocities = np.zeros_like(q)
        self.time = now
        self._hold(q)

    @property
    def state(self) -> ArmState:
        return ArmState(self.time if self.time is not None else 0.0,
                        self.positions.copy(), self.velocities.copy())

    def end_effector(self) -> np.ndarray:
        return self.geometry.end_effector(self.positions)

    def _hold(self, q: np.ndarray) -> None:
        q = q.copy()
        self._reference = _Knots(np.array([0.0]), q[None], np.zeros((1, q.size)), False)

    def desired(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The controller's reference (position, velocity) at time t, within limits."""
        pos, vel = self._reference.sample(t)
        return self.geometry.clip(pos), vel

    # -- commands
    def command_positions(self, target: Sequence[float], now: float) -> None:
        """Forward position command: go to ``target`` (as fast as allowed) and hold."""
        self.step(now)
        self._hold(np.asarray(target, dtype=float))

    def command_trajectory(self, traj: Trajectory, now: float) -> None:
        """Replace whatever runs with ``traj``. Points already in the past are dropped;
        a trajectory that ends in the past raises CommandRejected; no points = hold."""
        self.step(now)
        if len(traj.times) == 0:
            self._hold(self.positions)
            return
        start = now if traj.start is None else traj.start
        abs_times = start + traj.times
        anchor_t = max(start, now)
        keep = abs_times >= anchor_t
        if not np.any(keep):
            raise CommandRejected([f"trajectory ends in the past (last point at "
                                   f"{abs_times[-1]:.3f} s, now {now:.3f} s)"])
        if self.interpolate_from_desired_state:
            p0, v0 = self.desired(now)
        else:
            p0, v0 = self.positions.copy(), self.velocities.copy()
        cubic = self.interpolation == "cubic"
        if not cubic or start > now:
            v0 = np.zeros_like(p0)  # linear, or held until the start: the anchor is at rest
        times, pos = abs_times[keep], traj.positions[keep]
        vel = None if traj.velocities is None else traj.velocities[keep]
        anchored = times[0] > anchor_t
        if anchored:  # interpolate from the anchor to the first point
            times = np.concatenate([[anchor_t], times])
            pos = np.vstack([p0[None], pos])
            vel = None if vel is None else np.vstack([v0[None], vel])
        # else a point at the anchor time: the reference jumps there
        if vel is None:
            vel = _knot_velocities(times, pos)
            if anchored:
                vel[0] = v0  # cubic: continue the running motion smoothly
        self._reference = _Knots(times=times, positions=pos, velocities=vel, cubic=cubic)

    # -- simulation
    def step(self, now: float) -> ArmState:
        """Advance the joints to time ``now``. A clock that jumps back (a restarted
        simulation, a looped bag) restarts integration there without moving."""
        if self.time is None or now <= self.time:
            if self.time is None or now < self.time:
                self.time = now
                self.velocities = np.zeros_like(self.positions)
            return self.state
        t0, q = self.time, self.positions
        total = now - t0
        n_sub = max(1, int(math.ceil(total / self.max_substep - 1e-9)))
        h = total / n_sub
        vmax = self.geometry.max_velocity
        for i in range(1, n_sub + 1):
            prev = q
            target, _ = self.desired(t0 + i * h)
            dq = np.minimum(np.maximum(target - q, -vmax * h), vmax * h)
            q = self.geometry.clip(q + dq)
        self.velocities = (q - prev) / h  # over the last substep: the current velocity
        self.positions = q
        self.time = now
        return self.state
