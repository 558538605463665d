"""Joint position and velocity limits: the last guard before anything reaches the arm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class JointLimits:
    lower: np.ndarray         # (J,) position lower bounds (may be -inf: unlimited joint)
    upper: np.ndarray         # (J,) position upper bounds
    max_velocity: np.ndarray  # (J,) > 0, units per second

    @classmethod
    def create(cls, n_joints: int, lower: Sequence[float] | None = None,
               upper: Sequence[float] | None = None,
               max_velocity: float | Sequence[float] = 1.0) -> "JointLimits":
        """Build and check limits; None bounds mean unlimited; a scalar velocity applies to all.

        Raises ValueError with a reason a parameter callback can pass on.
        """
        lo = np.full(n_joints, -np.inf) if lower is None else np.asarray(lower, np.float64)
        hi = np.full(n_joints, np.inf) if upper is None else np.asarray(upper, np.float64)
        vmax = np.broadcast_to(np.asarray(max_velocity, np.float64), (n_joints,)) \
            if np.ndim(max_velocity) == 0 else np.asarray(max_velocity, np.float64)
        for name, arr in (("position lower", lo), ("position upper", hi), ("max velocity", vmax)):
            if arr.shape != (n_joints,):
                raise ValueError(f"{name} limits need {n_joints} values, got {arr.size}")
            if np.any(np.isnan(arr)):
                raise ValueError(f"{name} limits contain NaN")
        if np.any(lo > hi):
            j = int(np.argmax(lo > hi))
            raise ValueError(f"joint {j}: lower limit {lo[j]} > upper limit {hi[j]}")
        if not np.all(np.isfinite(vmax) & (vmax > 0)):
            raise ValueError(f"max velocity must be finite and > 0, got {vmax.tolist()}")
        return cls(lo.copy(), hi.copy(), vmax.copy())

    @property
    def n_joints(self) -> int:
        return int(self.lower.shape[0])

    def clamp_position(self, q: np.ndarray) -> np.ndarray:
        return np.clip(q, self.lower, self.upper)

    def within_position_limits(self, q: np.ndarray) -> bool:
        return bool(np.all((q >= self.lower) & (q <= self.upper)))

    def limit_step(self, prev: np.ndarray, target: np.ndarray, dt_cmd: float) -> np.ndarray:
        """Move from `prev` toward the clamped `target` by at most max_velocity*dt_cmd per joint.

        `prev` is assumed within limits (the executor guarantees it), so the result is too;
        the final clip only removes float round-off at a bound.
        """
        budget = self.max_velocity * max(dt_cmd, 0.0)
        step = np.clip(self.clamp_position(target) - prev, -budget, budget)
        return self.clamp_position(prev + step)
