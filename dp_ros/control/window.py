"""The tick grid and observation windows (the last T_o observations on consecutive ticks).

Ticks lie at integer multiples of dt. The grid is kept in integer nanoseconds so that tick
stamps are exact and identical in every message and process; seconds (float) are derived
from it. A window is ``{"images": {camera: uint8 (T_o, H, W, 3)}, "state": float32
(T_o, D), "stamps": float64 (T_o,)}``, oldest first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from dp_ros.control.observation import Invalid, Observation

Window = dict  # {"images": {camera: ndarray}, "state": ndarray, "stamps": ndarray}


@dataclass(frozen=True)
class TickGrid:
    """Ticks at k * dt_ns nanoseconds."""

    dt_ns: int

    def __post_init__(self) -> None:
        if self.dt_ns <= 0:
            raise ValueError(f"tick period must be positive, got {self.dt_ns} ns")

    @classmethod
    def from_rate(cls, rate_hz: float) -> "TickGrid":
        if not rate_hz > 0.0:
            raise ValueError(f"rate must be > 0 Hz, got {rate_hz}")
        return cls(int(round(1e9 / rate_hz)))

    @property
    def dt(self) -> float:
        return self.dt_ns * 1e-9

    def index_at_or_before(self, t_ns: int) -> int:
        return t_ns // self.dt_ns  # floor, also for negative times

    def stamp_ns(self, k: int) -> int:
        return k * self.dt_ns

    def time(self, k: int) -> float:
        return k * self.dt_ns * 1e-9


def tick_index(tick_time: float, dt: float) -> int:
    """The grid index of a tick time in seconds (rounded: tick times carry float error)."""
    return int(round(tick_time / dt))


class WindowBuilder:
    """Keeps the last T_o observations of consecutive valid ticks.

    ``push`` returns a window when the last T_o ticks are all valid and consecutive;
    an invalid tick, a skipped tick or a tick that does not move forward starts over.
    """

    def __init__(self, T_o: int, dt: float):
        if T_o < 1:
            raise ValueError(f"T_o must be >= 1, got {T_o}")
        if not dt > 0.0:
            raise ValueError(f"dt must be > 0, got {dt}")
        self.T_o = int(T_o)
        self.dt = float(dt)
        self._obs: deque[tuple[int, Observation]] = deque(maxlen=self.T_o)

    def __len__(self) -> int:
        return len(self._obs)

    def reset(self) -> None:
        self._obs.clear()

    def push(self, tick_time: float, obs: Union[Observation, Invalid]) -> Optional[Window]:
        if isinstance(obs, Invalid):
            self._obs.clear()
            return None
        k = tick_index(tick_time, self.dt)
        if self._obs and k != self._obs[-1][0] + 1:
            self._obs.clear()  # a gap (or a repeated / earlier tick): history is broken
        self._obs.append((k, obs))
        if len(self._obs) < self.T_o:
            return None
        return self._window()

    def _window(self) -> Window:
        observations = [o for _, o in self._obs]
        return {
            "images": {cam: np.stack([o.images[cam] for o in observations])
                       for cam in observations[0].images},
            "state": np.stack([o.state for o in observations]).astype(np.float32, copy=False),
            "stamps": np.array([o.tick for o in observations], dtype=np.float64),
        }
