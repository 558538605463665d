"""A plan: the executable part of one policy prediction, on absolute node-clock times.

Time model (ARCHITECTURE.md): a plan computed from the window ending at t is stamped t;
point k belongs to t + k*dt. The stamp is kept in integer nanoseconds and point times as
offsets from it, so a round trip through ROS messages is exact (float seconds at epoch
scale only resolve ~240 ns) and `times` can still be used as plain float seconds.
numpy only: no rclpy here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

NS_PER_S = 1_000_000_000
MAX_TIME_FROM_START = 3600.0  # s; a plan spans seconds, so beyond this is garbage (and
                              # would overflow a Duration's int32 seconds downstream)


class PlanRejected(ValueError):
    """A plan that must not be executed. `reason` says why in detail; `cause` is a short
    stable key (e.g. "non_finite") so nodes can log once per cause and count by cause."""

    def __init__(self, reason: str, cause: str = "invalid"):
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


def seconds_to_ns(seconds: float) -> int:
    return int(round(seconds * NS_PER_S))


@dataclass(frozen=True, eq=False)
class Plan:
    stamp_ns: int                      # time of the newest observation the plan was computed from
    joint_names: tuple[str, ...]
    time_from_start: np.ndarray        # (N,) seconds after the stamp
    positions: np.ndarray              # (N, J) float64, columns in joint_names order
    velocities: np.ndarray | None = None  # (N, J) or None

    @property
    def stamp(self) -> float:
        """The stamp in float seconds (node clock)."""
        return self.stamp_ns / NS_PER_S

    @cached_property
    def times(self) -> np.ndarray:
        """(N,) absolute float seconds of each point (derived once, the plan is immutable)."""
        return self.stamp + np.asarray(self.time_from_start, dtype=np.float64)

    def __len__(self) -> int:
        return int(np.size(self.time_from_start))

    @classmethod
    def at_times(cls, stamp: float, joint_names: Sequence[str], times, positions,
                 velocities=None) -> "Plan":
        """Build from float-second stamp and absolute times (tests, offline tools)."""
        stamp_ns = seconds_to_ns(stamp)
        tfs = np.asarray(times, dtype=np.float64) - stamp_ns / NS_PER_S
        return cls(stamp_ns, tuple(joint_names), tfs, np.asarray(positions, dtype=np.float64),
                   None if velocities is None else np.asarray(velocities, dtype=np.float64))


def validate_plan(plan: Plan, expected_joint_names: Sequence[str]) -> Plan:
    """Check a plan and return it with columns in `expected_joint_names` order.

    Raises PlanRejected(reason) for: empty plan, shape mismatch, NaN/Inf anywhere,
    duplicate/missing/unknown joint names, non-increasing times, |time_from_start| > 1 h.
    """
    expected = tuple(expected_joint_names)
    names = tuple(plan.joint_names)
    tfs = np.asarray(plan.time_from_start, dtype=np.float64)
    pos = np.asarray(plan.positions, dtype=np.float64)
    vel = None if plan.velocities is None else np.asarray(plan.velocities, dtype=np.float64)

    if not isinstance(plan.stamp_ns, (int, np.integer)):
        raise PlanRejected(f"stamp must be integer nanoseconds, got {type(plan.stamp_ns).__name__}",
                           "stamp")
    if tfs.ndim != 1 or tfs.shape[0] == 0:
        raise PlanRejected("plan has no points", "empty")
    n = tfs.shape[0]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise PlanRejected(f"duplicate joint names {dup}", "joint_names")
    if set(names) != set(expected):
        missing = [x for x in expected if x not in names]
        unknown = [x for x in names if x not in expected]
        raise PlanRejected(f"wrong joint names: missing {missing}, unknown {unknown}",
                           "joint_names")
    if pos.shape != (n, len(names)):
        raise PlanRejected(f"positions have shape {pos.shape}, expected ({n}, {len(names)})",
                           "shape")
    if vel is not None and vel.shape != pos.shape:
        raise PlanRejected(f"velocities have shape {vel.shape}, expected {pos.shape}", "shape")
    if not np.all(np.isfinite(tfs)):
        raise PlanRejected("non-finite time_from_start", "non_finite")
    if np.any(np.abs(tfs) > MAX_TIME_FROM_START):
        raise PlanRejected(f"time_from_start beyond {MAX_TIME_FROM_START:g} s", "times")
    if not np.all(np.isfinite(pos)):
        bad = np.argwhere(~np.isfinite(pos))[0]
        raise PlanRejected(f"non-finite position at point {bad[0]} joint {names[bad[1]]!r}",
                           "non_finite")
    if vel is not None and not np.all(np.isfinite(vel)):
        raise PlanRejected("non-finite velocity", "non_finite")
    if n > 1 and not np.all(np.diff(tfs) > 0.0):
        k = int(np.argmin(np.diff(tfs) > 0.0))
        raise PlanRejected(f"times not strictly increasing at point {k + 1}", "times")

    if names != expected:  # same set, other order: reorder columns
        order = [names.index(x) for x in expected]
        pos = pos[:, order]
        vel = None if vel is None else vel[:, order]
    return Plan(int(plan.stamp_ns), expected, tfs, pos, vel)


def finite_difference_velocities(positions: np.ndarray, dt: float) -> np.ndarray:
    """Central differences inside, one-sided at the ends; zeros for a single point."""
    if positions.shape[0] < 2:
        return np.zeros_like(positions)
    return np.gradient(positions, dt, axis=0)


def plan_from_actions(stamp_ns: int, actions: np.ndarray, T_o: int, dt: float,
                      joint_names: Sequence[str]) -> Plan:
    """The executable plan of one prediction: action indices T_o-1 .. T_p-1.

    `actions` is (T_p, A) in joint_names order; point k (index T_o-1+k) is at stamp + k*dt.
    Velocities are finite differences over the whole prediction, so the first point's
    uses the action before it (index T_o-2) when there is one.
    """
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != len(joint_names):
        raise ValueError(f"actions must be (T_p, {len(joint_names)}), got {actions.shape}")
    T_p = actions.shape[0]
    if not 1 <= T_o <= T_p:
        raise ValueError(f"need 1 <= T_o <= T_p, got T_o={T_o}, T_p={T_p}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be > 0, got {dt}")
    vel = finite_difference_velocities(actions, dt)[T_o - 1:]
    pos = actions[T_o - 1:].copy()
    # k*dt on whole nanoseconds, the resolution of a message's time_from_start
    tfs = np.round(np.arange(pos.shape[0], dtype=np.float64) * dt * NS_PER_S) / NS_PER_S
    return Plan(int(stamp_ns), tuple(joint_names), tfs, pos, vel)
