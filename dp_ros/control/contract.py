"""The executor's safety contract (clauses 1-3 of README "Safety contract") as a checker.

An independent observer of what the trajectory executor sends: it is told the plans the
executor received (with their arrival times) and every command that went out, and counts
the commands that break the contract. It does not reuse the executor's bookkeeping: plan
validity comes from ``validate_plan`` and coverage from stamp/time arithmetic, so a bug in
``PlanExecutor`` shows up here as a violation. Used by the property tests (exact times),
the fault-injection suite and ``dp-ros soak`` (times measured over DDS).

Clauses checked per command:
  1. no command for a time already past: joint_trajectory points have time_from_start > 0
     and increasing, and a point that is a plan knot is never scheduled later than the
     knot's own time (now + lead + time_from_start <= knot time + time_tol); a
     position_stream command is for now + lead (when that time is known);
  2. positions finite and within the position limits; a position_stream command moves at
     most max_velocity * control_dt from the previous one; a joint_trajectory message is
     feasible at max_velocity from where the controller is at `now` (the previous message's
     path, or the position given to ``set_position``) and between its points, velocities
     within the limit;
  3. when no valid, fresh plan can cover now (none arrived, all stale, run out or from
     before a backward clock jump), the command holds: a position_stream command equals
     the previous one, a joint_trajectory message has every point at the controller's
     current position with zero velocity.

Timing tolerances: ``time_tol`` is how far the `now` given with a command may be from the
executor's own clock reading (0 when the checker is fed the executor's `now`; over DDS the
publisher's source timestamp, taken a little after the executor read its clock).
``slack`` widens the coverage test (plans counted as possibly covering a little before
arrival and a little after expiry), so clause 3 is only checked where it must hold
whatever the delivery delays were. ``jump_threshold`` (default time_tol): how far `now`
must go back to count as a backward clock jump. numpy only: no rclpy here.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import Plan, PlanRejected, validate_plan

MAX_KEPT = 50  # violations kept with details (all are counted)
TIME_EPS = 1e-6  # s per segment: float seconds at epoch scale resolve ~0.24 us and message
                 # durations are whole nanoseconds, so re-timed points carry ~1e-7 s errors


@dataclass(frozen=True)
class Violation:
    clause: int
    time: float
    detail: str


@dataclass(frozen=True)
class _Received:
    arrival: float
    epoch: int
    stamp: float
    end: float          # time of the last point
    knots_t: np.ndarray  # (N,) absolute times
    knots_p: np.ndarray  # (N, J)


class ContractChecker:
    def __init__(self, joint_names: Sequence[str], limits: JointLimits, actuation_lead: float,
                 stale_plan_timeout: float, control_dt: float, time_tol: float = 0.0,
                 slack: float = 0.0, pos_tol: float = 1e-9,
                 jump_threshold: Optional[float] = None):
        self.joint_names = tuple(joint_names)
        self.limits = limits
        self.lead = float(actuation_lead)
        self.timeout = float(stale_plan_timeout)
        self.control_dt = float(control_dt)
        self.time_tol = float(time_tol)
        self.slack = float(slack)
        self.pos_tol = float(pos_tol)
        # how far back `now` must go to count as a clock jump (over DDS, events from
        # different publishers reach the observer a little out of order)
        self.jump_threshold = self.time_tol if jump_threshold is None else float(jump_threshold)
        self.counts: Counter[int] = Counter()
        self.violations: list[Violation] = []
        self.commands = 0
        self.holds_checked = 0  # commands that had to hold (clause 3 applied)
        self.plans_valid = 0
        self.plans_invalid = 0
        self.clock_jumps = 0
        self._plans: list[_Received] = []
        self._blind_since: Optional[float] = None
        self._epoch = 0
        self._last_now = -math.inf
        self._prev_stream: Optional[np.ndarray] = None
        # joint_trajectory: the path the controller follows (absolute times, positions)
        self._path: Optional[tuple[np.ndarray, np.ndarray]] = None

    # ---- inputs ----------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def set_position(self, now: float, q) -> None:
        """Where the arm is at `now` (the executor enables from there)."""
        q = np.asarray(q, dtype=np.float64)
        self._path = (np.array([now]), q[None].copy())
        self._prev_stream = q.copy()

    def plan(self, arrival: float, plan: Plan) -> bool:
        """A plan message the executor received at `arrival`; True when it is valid."""
        self._clock(arrival)
        try:
            p = validate_plan(plan, self.joint_names)
        except PlanRejected:
            self.plans_invalid += 1
            return False
        if p.stamp > arrival + self.timeout:  # the executor refuses future stamps
            self.plans_invalid += 1
            return False
        self.plans_valid += 1
        self._blind_since = None
        times = p.times
        self._plans.append(_Received(arrival, self._epoch, p.stamp, float(times[-1]),
                                     np.asarray(times, dtype=np.float64),
                                     self.limits.clamp_position(p.positions)))
        # plans that can no longer cover anything are forgotten (bounded memory in soaks)
        horizon = arrival - self.timeout - self.slack - 1.0
        if len(self._plans) > 64:
            self._plans = [r for r in self._plans
                           if r.epoch == self._epoch and r.stamp >= horizon][-64:]
        return True

    def blind(self, since: float) -> None:
        """The observer may miss plans from `since` until the next plan it receives (it is
        re-discovering a restarted plan publisher, which the executor may match first):
        clause 3 is not judged in between."""
        self._blind_since = since

    def may_be_covered(self, now: float) -> bool:
        """Could a valid, fresh plan cover plan time now + lead? `now` may be up to
        time_tol after the executor's clock reading, arrivals `slack` off."""
        s = self.slack + self.time_tol
        if self._blind_since is not None and now >= self._blind_since - s:
            return True
        for r in reversed(self._plans):
            if r.epoch != self._epoch or r.arrival > now + s:
                continue
            if now - s - r.stamp <= self.timeout and now - s + self.lead <= r.end:
                return True
        return False

    # ---- commands --------------------------------------------------------------------
    def stream_command(self, now: float, positions, for_time: Optional[float] = None) -> None:
        """A position_stream command sent at `now` (for plan time `for_time` if known)."""
        self._clock(now)
        self.commands += 1
        q = np.asarray(positions, dtype=np.float64)
        if for_time is not None and for_time < now - self.time_tol:
            self._violate(1, now, f"command for time {for_time:.6f} sent at {now:.6f}")
        self._check_limits(now, q[None])
        prev = self._prev_stream
        if prev is not None and prev.shape == q.shape:
            step = np.abs(q - prev)
            budget = self.limits.max_velocity * self.control_dt
            if not np.all(step <= budget * (1 + 1e-9) + self.pos_tol):
                self._violate(2, now, f"step {step.tolist()} > max_velocity*control_dt "
                                      f"{budget.tolist()}")
            if not self.may_be_covered(now):
                self.holds_checked += 1
                if not np.all(np.abs(q - prev) <= self.pos_tol):
                    self._violate(3, now, f"moved {step.tolist()} while no plan covers now ("
                                  + self._newest_plan(now) + ")")
        self._prev_stream = q.copy()

    def trajectory_command(self, now: float, times_from_now, positions,
                           velocities=None) -> None:
        """A joint_trajectory message sent at `now` (header.stamp 0: times from now)."""
        self._clock(now)
        self.commands += 1
        t = np.asarray(times_from_now, dtype=np.float64).reshape(-1)
        p = np.asarray(positions, dtype=np.float64).reshape(len(t), -1)
        v = None if velocities is None else np.asarray(velocities, dtype=np.float64)
        if len(t) == 0:
            self._violate(1, now, "trajectory without points")
            return
        # clause 1
        if not np.all(t > 0.0):
            self._violate(1, now, f"time_from_start {t.min():.6f} <= 0: a point for a time "
                                  "already passed")
        # judged in whole nanoseconds, as a Duration carries it: points a few ns apart
        # arrive with equal times and the controller rejects the message
        if len(t) > 1 and not np.all(np.diff(np.round(t * 1e9)) > 0.0):
            self._violate(1, now, "time_from_start not strictly increasing (in ns)")
        moving = len(t) > 1 and np.ptp(p, axis=0).max() > self.pos_tol
        start = self._controller_at(now)
        if moving:
            self._check_knot_times(now, t, p, start)
        # clause 2
        self._check_limits(now, p)
        if v is not None and (v.shape != p.shape or not np.all(np.isfinite(v))
                              or not np.all(np.abs(v) <= self.limits.max_velocity
                                            * (1 + 1e-5) + 1e-9)):
            self._violate(2, now, "velocities non-finite or above max_velocity")
        if start is not None and start.shape == p.shape[1:]:
            kt = np.concatenate(([0.0], t))
            kp = np.vstack((start, p))
            dt = np.diff(kt) + TIME_EPS
            dt[0] += self.time_tol  # the controller's position is known at `now` +- time_tol
            step = np.abs(np.diff(kp, axis=0))
            budget = self.limits.max_velocity * dt[:, None] * (1 + 1e-9) + self.pos_tol
            if not np.all(step <= budget):
                i = int(np.argmax(np.any(step > budget, axis=1)))
                self._violate(2, now, f"segment {i} moves {step[i].tolist()} in {dt[i]:.4f} s "
                                      f"(max_velocity {self.limits.max_velocity.tolist()})")
        # clause 3, judged at the executor's own clock reading when the message shows it
        # (a plan knot at time t_k sent with time_from_start t: read at t_k - lead - t)
        if not self.may_be_covered(now) and not self.may_be_covered(
                self._implied_now(now, t, p)):
            self.holds_checked += 1
            tol = self.limits.max_velocity * self.time_tol + self.pos_tol
            held = (not moving and (v is None or np.all(np.abs(v) <= 1e-9))
                    and (start is None or start.shape != p.shape[1:]
                         or np.all(np.abs(p - start) <= tol)))
            if not held:
                self._violate(3, now, "trajectory moves while no plan covers now ("
                              + self._newest_plan(now) + ")")
        self._path = (np.concatenate(([now], now + t)),
                      np.vstack((p[0] if start is None else start, p)))

    # ---- internals -------------------------------------------------------------------
    def _check_knot_times(self, now: float, t: np.ndarray, p: np.ndarray,
                          start: Optional[np.ndarray]) -> None:
        """A point equal to a plan knot (clamped to the limits, as the executor uses it)
        must not be scheduled after the knot's own time. Skipped: points on a position
        bound and points reached at full speed (clamping and velocity limiting can make an
        unrelated point equal to a knot there)."""
        plans = [r for r in self._plans if r.epoch == self._epoch][-8:]
        if not plans:
            return
        on_bound = np.any((np.abs(p - self.limits.lower) <= self.pos_tol)
                          | (np.abs(p - self.limits.upper) <= self.pos_tol), axis=1)
        prev_p = np.vstack((p[:1] if start is None or start.shape != p.shape[1:] else start,
                            p[:-1]))
        prev_t = np.concatenate(([0.0], t[:-1]))
        budget = self.limits.max_velocity * (t - prev_t)[:, None]
        saturated = np.any(np.abs(p - prev_p) >= budget * (1 - 1e-6) - self.pos_tol, axis=1)
        if start is None:
            saturated[0] = True  # unknown where it came from
        for m in range(len(t)):
            if on_bound[m] or saturated[m]:
                continue
            matched = []
            for r in plans:
                d = np.max(np.abs(r.knots_p - p[m]), axis=1)
                matched.extend(r.knots_t[d <= self.pos_tol].tolist())
            scheduled = now + self.lead + t[m]
            if matched and max(matched) < scheduled - self.time_tol - 1e-9:
                self._violate(1, now, f"plan knot for {max(matched):.6f} scheduled late "
                                      f"at {scheduled:.6f}")
                return

    def _implied_now(self, now: float, t: np.ndarray, p: np.ndarray) -> float:
        """The executor's clock reading implied by points that equal plan knots (the
        earliest candidate within 2 s before `now`), else `now`."""
        best = now
        for r in self._plans[-8:]:
            if r.epoch != self._epoch:
                continue
            for m in range(len(t)):
                d = np.max(np.abs(r.knots_p - p[m]), axis=1)
                for tk in r.knots_t[d <= self.pos_tol]:
                    implied = float(tk) - self.lead - float(t[m])
                    if now - 2.0 <= implied < best:
                        best = implied
        return best

    def _newest_plan(self, now: float) -> str:
        if not self._plans:
            return "no plan received"
        r = self._plans[-1]
        return (f"newest plan: stamp now{r.stamp - now:+.3f} s, arrived now"
                f"{r.arrival - now:+.3f} s, ends now{r.end - now:+.3f} s"
                + ("" if r.epoch == self._epoch else ", before a clock jump"))

    def _check_limits(self, now: float, p: np.ndarray) -> None:
        lo, hi = self.limits.lower, self.limits.upper
        if p.shape[1:] != lo.shape or not np.all(np.isfinite(p)):
            self._violate(2, now, f"non-finite or mis-shaped positions {p.tolist()}")
        elif not np.all((p >= lo - self.pos_tol) & (p <= hi + self.pos_tol)):
            self._violate(2, now, f"positions outside the limits: {p.tolist()}")

    def _controller_at(self, now: float) -> Optional[np.ndarray]:
        if self._path is None:
            return None
        times, pos = self._path
        return np.array([np.interp(now, times, pos[:, j]) for j in range(pos.shape[1])])

    def _clock(self, now: float) -> None:
        if now < self._last_now - self.jump_threshold - 1e-9:  # a backward clock jump
            self._epoch += 1
            self.clock_jumps += 1
            # where a joint_trajectory controller is after its clock went back is not
            # defined: the next message is checked on its own
            self._path = None
            self._last_now = now
        else:
            self._last_now = max(now, self._last_now)

    def _violate(self, clause: int, now: float, detail: str) -> None:
        self.counts[clause] += 1
        if len(self.violations) < MAX_KEPT:
            self.violations.append(Violation(clause, now, detail))

    def summary(self) -> str:
        by = ", ".join(f"clause {c}: {self.counts.get(c, 0)}" for c in (1, 2, 3))
        head = f"{self.total} contract violations in {self.commands} commands ({by})"
        return "\n".join([head] + [f"  clause {v.clause} at {v.time:.3f}: {v.detail}"
                                   for v in self.violations[:10]])


class TimeOrdered:
    """Feeds a ContractChecker in time order, for observers on live topics.

    Plans and commands reach an observer on different topics with no order between them:
    the executor answers a new plan with a command at once, and that command may arrive
    first, which would look like motion with no plan. Events are held until events `lag`
    seconds newer have been seen (event time, so simulated time works too), then fed in
    time order; a jump back in time by more than `jump` releases everything held first.
    Any other attribute (``total``, ``summary()``, ``blind()``, ...) first feeds all held
    events, then goes to the checker. Thread-safe."""

    def __init__(self, checker: ContractChecker, lag: float, jump: float):
        self.checker = checker
        self.lag = float(lag)
        self.jump = float(jump)
        self._held: list = []  # heap of (time, seq, feed)
        self._seq = 0
        self._newest: Optional[float] = None
        self._lock = threading.RLock()

    def plan(self, arrival: float, plan: Plan) -> None:
        self._push(arrival, lambda: self.checker.plan(arrival, plan))

    def trajectory_command(self, now: float, *args, **kwargs) -> None:
        self._push(now, lambda: self.checker.trajectory_command(now, *args, **kwargs))

    def stream_command(self, now: float, *args, **kwargs) -> None:
        self._push(now, lambda: self.checker.stream_command(now, *args, **kwargs))

    def flush(self) -> None:
        with self._lock:
            while self._held:
                heapq.heappop(self._held)[2]()

    def __getattr__(self, name: str):
        self.flush()
        return getattr(self.checker, name)

    def _push(self, t: float, feed) -> None:
        with self._lock:
            if self._newest is not None and t < self._newest - self.jump:
                self.flush()  # the clock went back: everything held came before
                self._newest = None
            heapq.heappush(self._held, (t, self._seq, feed))
            self._seq += 1
            self._newest = t if self._newest is None else max(self._newest, t)
            while self._held and self._held[0][0] <= self._newest - self.lag:
                heapq.heappop(self._held)[2]()
