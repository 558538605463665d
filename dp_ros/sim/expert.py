"""The scripted expert: swing round the obstacle on a chosen side, by inverse kinematics.

The side is drawn at random per episode (left and right equally likely) and fixes the
elbow branch for the whole motion: going right (joint 1 turning counter-clockwise) the
elbow trails on the right, q2 > 0; going left, q2 < 0. That is the only branch whose
links clear the obstacle at the goal (see dp_ros.sim.task).

The plan: (A) in joint space, from the start bend the elbow onto the chosen branch while
pulling the end effector in to the arc radius; (B) in end-effector space, a polar arc
round the base to the goal, converted to joints by IK. The path is then timed with a
trapezoidal speed profile under joint and end-effector speed caps and sampled on a dt
grid: the commanded joint positions. A 3-joint arm keeps its last joint straight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dp_ros.sim.arm import ArmGeometry, SimulatedArm, two_link_ik
from dp_ros.sim.task import SIDES, Episode, EpisodeResult, evaluate

ELBOW = {"right": 1, "left": -1}


@dataclass(frozen=True)
class ExpertConfig:
    dt: float = 0.1                     # s between commanded positions
    max_joint_speed: float = 1.0        # rad/s (the arm allows more: it keeps up)
    max_ee_speed: float = 0.6           # m/s
    ramp_time: float = 0.6              # s to reach cruise speed and to stop
    arc_radius_range: tuple[float, float] = (0.8, 0.9)  # x reach; drawn per episode
    pull_in_turn: float = 0.25          # rad joint 1 turns while the elbow bends (phase A)
    hold_time: float = 0.5              # s of holding at the goal at the end


@dataclass(frozen=True)
class ExpertPlan:
    side: str
    dt: float
    positions: np.ndarray   # (K, n) commanded joint positions at k * dt
    ee: np.ndarray          # (K, 2) the end effector those positions put where

    @property
    def times(self) -> np.ndarray:
        return np.arange(len(self.positions)) * self.dt

    @property
    def duration(self) -> float:
        return (len(self.positions) - 1) * self.dt

    def at(self, t: float) -> np.ndarray:
        """The command in force at time t from the plan's start (held after the end)."""
        k = int(np.clip(math.floor(t / self.dt + 1e-9), 0, len(self.positions) - 1))
        return self.positions[k]


def choose_side(rng: np.random.Generator) -> str:
    return SIDES[int(rng.integers(2))]


def _ik(geometry: ArmGeometry, target: np.ndarray, elbow: int) -> np.ndarray:
    l1 = geometry.link_lengths[0]
    l2 = sum(geometry.link_lengths[1:])  # a 3-joint arm keeps its last joint at 0
    q1, q2 = two_link_ik(target, l1, l2, elbow, geometry.base_yaw)
    return np.array([q1, q2] + [0.0] * (geometry.n_joints - 2))


def _polar(p: np.ndarray) -> tuple[float, float]:
    return math.hypot(p[0], p[1]), math.atan2(p[1], p[0])


def plan_path(episode: Episode, geometry: ArmGeometry, side: str, arc_radius: float,
              pull_in_turn: float, start: Optional[Sequence[float]] = None,
              samples: int = 240) -> np.ndarray:
    """Dense joint path (M, n) from the start configuration to the goal on ``side``."""
    if side not in ELBOW:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    elbow = ELBOW[side]
    q0 = np.asarray(episode.start_positions if start is None else start, dtype=float)
    turn = float(elbow)  # right: the end effector turns counter-clockwise round the base
    _, th0 = _polar(geometry.end_effector(q0))
    r_goal, th_goal = _polar(np.asarray(episode.goal, dtype=float))
    th_a = th0 + turn * pull_in_turn
    # unwrap the goal angle in the direction of travel
    th_g = th_a + turn * ((turn * (th_goal - th_a)) % (2 * math.pi))
    # (A) joint space: bend onto the branch while pulling in
    q_a = _ik(geometry, arc_radius * np.array([math.cos(th_a), math.sin(th_a)]), elbow)
    n_a = samples // 6
    phase_a = q0 + np.linspace(0.0, 1.0, n_a)[:, None] * (q_a - q0)
    # (B) end-effector space: polar arc to the goal, radius eased from the arc to the goal
    u = np.linspace(0.0, 1.0, samples - n_a + 1)[1:]
    ease = u * u * (3 - 2 * u)
    th = th_a + u * (th_g - th_a)
    r = arc_radius + ease * (r_goal - arc_radius)
    phase_b = np.array([_ik(geometry, np.array([ri * math.cos(t), ri * math.sin(t)]), elbow)
                        for ri, t in zip(r, th)])
    path = np.vstack([phase_a, phase_b])
    path[:, 0] = np.unwrap(np.concatenate([[q0[0]], path[1:, 0]]))  # continuous joint 1
    return path


def time_path(path: np.ndarray, geometry: ArmGeometry, config: ExpertConfig) -> np.ndarray:
    """Sample a dense joint path on the dt grid with a trapezoidal speed profile."""
    ee = geometry.end_effector(path)
    seg = np.maximum(np.abs(np.diff(path, axis=0)).max(axis=1) / config.max_joint_speed,
                     np.linalg.norm(np.diff(ee, axis=0), axis=1) / config.max_ee_speed)
    cruise = np.concatenate([[0.0], np.cumsum(seg)])  # time along the path at full speed
    total_c, tau = cruise[-1], config.ramp_time
    if total_c < tau:  # too short to reach cruise speed: triangular profile
        tau = total_c
    duration = total_c + tau
    t = np.arange(0.0, duration + config.dt, config.dt)
    t = np.minimum(t, duration)
    s = np.where(t < tau, t * t / (2 * max(tau, 1e-9)),
                 np.where(t <= duration - tau, t - tau / 2,
                          total_c - (duration - t) ** 2 / (2 * max(tau, 1e-9))))
    s = np.clip(s, 0.0, total_c)
    timed = np.stack([np.interp(s, cruise, path[:, j]) for j in range(path.shape[1])], axis=1)
    hold = int(round(config.hold_time / config.dt))
    return np.vstack([timed] + [timed[-1:]] * hold)


class ScriptedExpert:
    """Draws a side (50/50) and an arc radius per episode and plans the motion."""

    def __init__(self, geometry: Optional[ArmGeometry] = None,
                 config: Optional[ExpertConfig] = None, seed: Optional[int] = None):
        self.geometry = geometry or ArmGeometry()
        self.config = config or ExpertConfig()
        self.rng = np.random.default_rng(seed)

    def plan(self, episode: Episode, start: Optional[Sequence[float]] = None,
             side: Optional[str] = None) -> ExpertPlan:
        """A plan from ``start`` (default: the episode's start configuration). ``side``
        forces a side; otherwise it is drawn at random."""
        side = side or choose_side(self.rng)
        lo, hi = self.config.arc_radius_range
        arc_radius = self.rng.uniform(lo, hi) * self.geometry.reach
        path = plan_path(episode, self.geometry, side, arc_radius,
                         self.config.pull_in_turn, start)
        positions = self.geometry.clip(time_path(path, self.geometry, self.config))
        return ExpertPlan(side=side, dt=self.config.dt, positions=positions,
                          ee=self.geometry.end_effector(positions))


def rollout(episode: Episode, plan: ExpertPlan, geometry: Optional[ArmGeometry] = None,
            sim_dt: float = 0.01, extra_time: float = 1.0
            ) -> tuple[EpisodeResult, np.ndarray, np.ndarray]:
    """Run ``plan`` on the simulated arm (forward position commands every plan.dt, no
    ROS) and judge it. Returns (result, times (T,), joint positions (T, n))."""
    geometry = geometry or ArmGeometry()
    arm = SimulatedArm(geometry, episode.start_positions, max_substep=sim_dt)
    arm.reset(episode.start_positions, now=0.0)
    steps = int(round((plan.duration + extra_time) / sim_dt))
    per_cmd = max(1, int(round(plan.dt / sim_dt)))
    times = np.arange(steps + 1) * sim_dt
    qs = np.empty((steps + 1, geometry.n_joints))
    for i, t in enumerate(times):
        if i % per_cmd == 0:
            arm.command_positions(plan.at(t), t)
        qs[i] = arm.step(t).positions
    return evaluate(episode, times, qs, geometry), times, qs
