"""When the policy node should start the next inference (receding horizon with latency).

A plan stamped t is executed from t to t + T_a*dt. With inference latency L the first
ceil(L/dt) points of a fresh plan are already past on arrival, so the next inference must
start about L + margin before the running plan's T_a steps end: plans then overlap and the
executor switches without a gap. L is estimated robustly (a high quantile of recent
measurements), so one fast inference does not make the schedule optimistic.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

_EPS = 1e-9  # float slack when comparing grid times
_TRACKED = object()  # should_start(): use the stamp tracked by plan_started()


def stale_points_on_arrival(latency: float, dt: float) -> int:
    """Points of a fresh plan already past when it arrives: ceil(L/dt)."""
    if not (math.isfinite(latency) and latency >= 0):
        raise ValueError(f"latency must be >= 0, got {latency}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be > 0, got {dt}")
    return max(0, math.ceil(latency / dt - _EPS))  # 0.3/0.1 is 2.9999999999999996


class ReplanScheduler:
    def __init__(self, T_o: int, T_a: int, dt: float, margin: float, *, history: int = 20,
                 quantile: float = 0.9, initial_latency: float = 0.0):
        if T_o < 1 or T_a < 1:
            raise ValueError(f"need T_o >= 1 and T_a >= 1, got T_o={T_o}, T_a={T_a}")
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be > 0, got {dt}")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be >= 0, got {margin}")
        if history < 1 or not 0.0 <= quantile <= 1.0:
            raise ValueError("need history >= 1 and 0 <= quantile <= 1")
        if not (math.isfinite(initial_latency) and initial_latency >= 0):
            raise ValueError(f"initial_latency must be >= 0, got {initial_latency}")
        self.T_o, self.T_a, self.dt, self.margin = int(T_o), int(T_a), float(dt), float(margin)
        self.quantile = float(quantile)
        self.initial_latency = float(initial_latency)
        self._latencies: deque[float] = deque(maxlen=int(history))
        self._started: deque[float] = deque(maxlen=8)  # recent started plan stamps, increasing

    def observe_latency(self, seconds: float) -> None:
        """Record one measured inference latency (window stamp -> plan published)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {seconds}")
        self._latencies.append(float(seconds))

    @property
    def latency(self) -> float:
        """Robust latency estimate: the `quantile` of recent measurements (p90 by default)."""
        if not self._latencies:
            return self.initial_latency
        return float(np.quantile(np.fromiter(self._latencies, float), self.quantile))

    def execution_end(self, active_plan_stamp: float) -> float:
        """When the running plan's T_a steps are done."""
        return active_plan_stamp + self.T_a * self.dt

    def next_start_time(self, active_plan_stamp: float | None) -> float:
        """Latest time an inference may start so its plan arrives `margin` before the running
        plan's T_a steps end; never before one dt after that plan's stamp (a new window)."""
        if active_plan_stamp is None:
            return -math.inf
        deadline = self.execution_end(active_plan_stamp) - (self.latency + self.margin)
        return max(deadline, active_plan_stamp + self.dt)

    # The running plan's stamp can be passed in, or tracked here: the policy node calls
    # plan_started() when an inference begins and plan_failed() when it produced nothing.
    @property
    def active_plan_stamp(self) -> float | None:
        """Stamp of the newest plan started (tracked by plan_started/plan_failed)."""
        return self._started[-1] if self._started else None

    def plan_started(self, stamp: float) -> None:
        """An inference for the plan stamped `stamp` began: schedule the next from it."""
        if not self._started or stamp > self._started[-1]:
            self._started.append(float(stamp))

    def plan_failed(self, stamp: float) -> None:
        """That inference produced no plan: fall back to the previous plan's schedule."""
        if stamp in self._started:
            self._started.remove(float(stamp))

    def should_start(self, now: float, active_plan_stamp: float | None | object = _TRACKED,
                     window_stamp: float | None = None) -> bool:
        """Start inference on the window available at `now`?

        Windows come every dt, so start on the last one before next_start_time (waiting for
        the next window would make the plan late: now + dt > next_start_time) or any later
        one. Never on a window that is not at least one dt newer than the running plan
        (`window_stamp`, or `now` when not given). No running plan: start at once.
        `active_plan_stamp` defaults to the tracked one (see plan_started).
        """
        if active_plan_stamp is _TRACKED:
            active_plan_stamp = self.active_plan_stamp
        if active_plan_stamp is None:
            return True
        newest = now if window_stamp is None else window_stamp
        if newest < active_plan_stamp + self.dt - _EPS:
            return False
        return now + self.dt > self.next_start_time(active_plan_stamp) + _EPS
