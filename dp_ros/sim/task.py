"""The task: reach a goal region behind a round obstacle, going round it left or right.

Scene (world frame, metres, for an arm of reach 1; ``TaskSpec.scaled`` adapts it):
the arm's base is at the origin. It starts stretched out towards -y (the start region,
bottom of the camera image). The goal lies at about +0.8 y, and the obstacle sits
between the base and the goal, so the straight line start -> goal is blocked (by the
base and the obstacle) and the arm must swing round one side. The scene is mirror
symmetric about the y axis, so both ways are equally good. Why this layout: a two-link
arm can only pass an obstacle on the side its elbow is on; starting stretched out
(elbow angle near 0) leaves both elbow branches, hence both sides, open.

"left"/"right" are as seen from the start looking at the goal: left = x < 0, i.e. the
left of the camera image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import numpy as np

from dp_ros.sim.arm import ArmGeometry

SIDES = ("left", "right")
Range = tuple[float, float]


@dataclass(frozen=True)
class TaskSpec:
    """Randomisation ranges and regions (world frame, metres, for reach 1)."""

    start_yaw_range: Range = (-0.12, 0.12)       # rad, joint 1 at the start
    start_bend_range: Range = (-0.12, 0.12)      # rad, the other joints at the start
    start_min_radius: float = 0.97               # start region: end effector this far out
    start_half_angle: float = 0.25               # ... within this angle (rad) of -y
    # ranges chosen so both elbow branches reach the goal with >= 4 cm to spare
    goal_x_range: Range = (-0.04, 0.04)
    goal_y_range: Range = (0.76, 0.84)
    goal_radius: float = 0.08
    obstacle_x_range: Range = (-0.03, 0.03)
    obstacle_y_range: Range = (0.38, 0.46)
    obstacle_radius: float = 0.09
    time_limit: float = 15.0                     # s from the episode's first step

    def scaled(self, factor: float) -> "TaskSpec":
        """The same scene for an arm of reach ``factor`` (lengths scale, angles don't)."""
        def s(r: Range) -> Range:
            return (r[0] * factor, r[1] * factor)
        return replace(self, goal_x_range=s(self.goal_x_range), goal_y_range=s(self.goal_y_range),
                       goal_radius=self.goal_radius * factor,
                       obstacle_x_range=s(self.obstacle_x_range),
                       obstacle_y_range=s(self.obstacle_y_range),
                       obstacle_radius=self.obstacle_radius * factor,
                       start_min_radius=self.start_min_radius * factor)

    def in_start_region(self, point: Sequence[float]) -> bool:
        x, y = float(point[0]), float(point[1])
        off_axis = abs(math.atan2(x, -y))  # angle from -y
        return math.hypot(x, y) >= self.start_min_radius and off_axis <= self.start_half_angle


def task_for(geometry: ArmGeometry, spec: Optional[TaskSpec] = None) -> TaskSpec:
    """The default scene sized for ``geometry``'s reach."""
    return (spec or TaskSpec()).scaled(geometry.reach)


@dataclass(frozen=True)
class Episode:
    """One sampled episode: everything needed to reset the sim and judge the result."""

    seed: int
    start_positions: tuple[float, ...]
    goal: tuple[float, float]
    goal_radius: float
    obstacle: tuple[float, float]
    obstacle_radius: float
    time_limit: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Episode":
        return cls(seed=int(d["seed"]), start_positions=tuple(map(float, d["start_positions"])),
                   goal=tuple(map(float, d["goal"])), goal_radius=float(d["goal_radius"]),
                   obstacle=tuple(map(float, d["obstacle"])),
                   obstacle_radius=float(d["obstacle_radius"]),
                   time_limit=float(d["time_limit"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def sample_episode(seed: int, geometry: Optional[ArmGeometry] = None,
                   spec: Optional[TaskSpec] = None) -> Episode:
    """A random episode, reproducible from ``seed``. ``spec`` defaults to the scene for
    ``geometry``'s reach."""
    geometry = geometry or ArmGeometry()
    spec = spec or task_for(geometry)
    rng = np.random.default_rng(seed)
    for _ in range(1000):  # rejection sampling; the default ranges accept at once
        q = np.concatenate([[rng.uniform(*spec.start_yaw_range)],
                            rng.uniform(*spec.start_bend_range, size=geometry.n_joints - 1)])
        if spec.in_start_region(geometry.end_effector(q)):
            break
    else:
        raise ValueError("start ranges never put the end effector in the start region")
    goal = (rng.uniform(*spec.goal_x_range), rng.uniform(*spec.goal_y_range))
    obstacle = (rng.uniform(*spec.obstacle_x_range), rng.uniform(*spec.obstacle_y_range))
    return Episode(seed=int(seed), start_positions=tuple(float(v) for v in q),
                   goal=tuple(float(v) for v in goal), goal_radius=spec.goal_radius,
                   obstacle=tuple(float(v) for v in obstacle),
                   obstacle_radius=spec.obstacle_radius, time_limit=spec.time_limit)


# ---------------------------------------------------------------------------- geometry

def segment_distances(points: np.ndarray, center: Sequence[float]) -> np.ndarray:
    """Distance from ``center`` to each segment of the polyline(s) ``points`` (..., m, 2)
    -> (..., m-1)."""
    a, b = points[..., :-1, :], points[..., 1:, :]
    c = np.asarray(center, dtype=float)
    ab = b - a
    denom = np.maximum(np.sum(ab * ab, axis=-1), 1e-18)
    s = np.clip(np.sum((c - a) * ab, axis=-1) / denom, 0.0, 1.0)
    closest = a + s[..., None] * ab
    return np.linalg.norm(c - closest, axis=-1)


def clearance(geometry: ArmGeometry, q: np.ndarray, episode: Episode) -> np.ndarray:
    """Free distance between the arm (every link, with its width) and the obstacle's
    edge, per configuration: (...,) for q (..., n). Negative = collision. The links
    include the end effector, so a tip inside the obstacle counts too."""
    return _clearance_from_points(geometry.link_points(q), episode, geometry)


def _clearance_from_points(points: np.ndarray, episode: Episode,
                           geometry: ArmGeometry) -> np.ndarray:
    d = segment_distances(points, episode.obstacle)
    return d.min(axis=-1) - episode.obstacle_radius - geometry.link_width / 2


def lateral_offset(point: np.ndarray, episode: Episode,
                   origin: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Signed distance of ``point`` (..., 2) from the line through ``origin`` (default: the
    arm's base) and the goal centre; > 0 on the left."""
    o = np.asarray(origin, dtype=float)
    g = np.asarray(episode.goal, dtype=float) - o
    axis = g / max(np.linalg.norm(g), 1e-12)
    p = np.asarray(point, dtype=float) - o
    return axis[0] * p[..., 1] - axis[1] * p[..., 0]  # p . (left normal of the axis)


# -------------------------------------------------------------------------- evaluation

@dataclass
class EpisodeResult:
    success: bool = False
    collision: bool = False
    reached: bool = False              # entered the goal region (maybe after collision)
    timed_out: bool = False
    side: Optional[str] = None         # "left" / "right" / None (not decided yet)
    time_to_goal: Optional[float] = None
    min_clearance: float = math.inf    # m; < 0 means collision
    elapsed: float = 0.0

    @property
    def done(self) -> bool:
        return self.success or self.collision or self.timed_out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["done"] = self.done
        if not math.isfinite(d["min_clearance"]):
            d["min_clearance"] = None
        return d


class EpisodeMonitor:
    """Judges an episode incrementally from joint configurations over time.

    - collision: any link (with its width) or the end effector touches the obstacle
    - success: the end effector enters the goal region within the time limit, with no
      collision before
    - side: the side of the start -> goal axis the end effector is on when it first
      crosses the line through the obstacle centre perpendicular to that axis (where it
      passes the obstacle); "left" = x < 0 for the default scene
    Time counts from the first update."""

    def __init__(self, episode: Episode, geometry: ArmGeometry):
        self.episode = episode
        self.geometry = geometry
        self.result = EpisodeResult()
        self._t0: Optional[float] = None
        g = np.asarray(episode.goal, dtype=float)
        self._axis = g / max(np.linalg.norm(g), 1e-12)
        self._pass_at = float(np.dot(np.asarray(episode.obstacle), self._axis))
        self._prev_along: Optional[float] = None

    def update(self, t: float, q: np.ndarray) -> EpisodeResult:
        """Judge the arm at configuration ``q`` at time ``t``."""
        points = self.geometry.link_points(q)
        return self.observe(t, points[-1], float(_clearance_from_points(
            points, self.episode, self.geometry)))

    def observe(self, t: float, ee: np.ndarray, clear: float) -> EpisodeResult:
        """Judge one sample given the end effector and the arm's clearance (m)."""
        r = self.result
        if self._t0 is None:
            self._t0 = t
        if r.done:
            return r
        r.elapsed = max(0.0, t - self._t0)
        r.min_clearance = min(r.min_clearance, clear)
        if clear < 0:
            r.collision = True
        if r.side is None:
            along = float(ee[0] * self._axis[0] + ee[1] * self._axis[1])
            if self._prev_along is not None and self._prev_along < self._pass_at <= along:
                r.side = "left" if lateral_offset(ee, self.episode) > 0 else "right"
            self._prev_along = along
        gx, gy = self.episode.goal
        if math.hypot(ee[0] - gx, ee[1] - gy) <= self.episode.goal_radius:
            if not r.reached:
                r.reached, r.time_to_goal = True, r.elapsed
            if not r.collision and r.elapsed <= self.episode.time_limit:
                r.success = True
        if r.elapsed > self.episode.time_limit and not r.success:
            r.timed_out = True
        return r


def evaluate(episode: Episode, times: Sequence[float], joint_positions: np.ndarray,
             geometry: Optional[ArmGeometry] = None) -> EpisodeResult:
    """Judge a recorded episode: joint positions (T, n) at ``times`` (T,), e.g. from
    /joint_states. The same rules as EpisodeMonitor (which it uses), with the geometry
    computed for all samples at once."""
    geometry = geometry or ArmGeometry()
    monitor = EpisodeMonitor(episode, geometry)
    q = np.asarray(joint_positions, dtype=float).reshape(len(times), geometry.n_joints)
    points = geometry.link_points(q)
    clear = _clearance_from_points(points, episode, geometry)
    for t, ee, c in zip(times, points[:, -1], clear):
        if monitor.observe(float(t), ee, float(c)).done:
            break
    return monitor.result
