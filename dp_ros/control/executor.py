"""Plan execution: which position to command now, given the plans received so far.

Pure logic, the clock is passed in (`now`, float seconds of the node clock), so tests
drive it without ROS. The safety contract (issue 8) this module enforces:
  1. a plan point whose time is <= now + actuation_lead is never executed (dropped);
  2. every command is clamped to the position limits and moves at most
     max_velocity * control_dt from the previous one (also across plan switches);
  3. when no valid, fresh plan covers now the last command is held, with a reason.

Timing: a command computed at `now` is for plan time tau = now + actuation_lead (the arm
needs that long to act on it). A newer plan takes over through a bridge knot at
(tau_submit, last command) straight to its first point that is reachable within the
velocity limit, so the command stays continuous; an optional cross-fade blends the old
and new references over `crossfade_steps` control steps to smooth the velocity change.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import Plan, PlanRejected, validate_plan

TRACKING, HOLDING, DISABLED = "tracking", "holding", "disabled"
ACCEPTED, REJECTED, IGNORED = "accepted", "rejected", "ignored"
MIN_POINT_GAP = 1e-6  # s between trajectory points sent to a controller


@dataclass(frozen=True, eq=False)
class Command:
    positions: np.ndarray | None   # (J,); None while disabled (send nothing)
    velocities: np.ndarray | None  # (J,) change since the previous command per second
    status: str                    # "tracking" | "holding" | "disabled"
    reason: str                    # why holding/disabled ("" while tracking)
    time: float                    # plan time this command is for: now + actuation_lead


@dataclass(frozen=True)
class SubmitResult:
    status: str            # "accepted" | "rejected" (invalid input) | "ignored" (valid, not used)
    reason: str = ""
    cause: str = ""        # short stable key for counting/logging once per cause
    late_points: int = 0   # points dropped because their time <= now + actuation_lead
    skipped_points: int = 0  # future points skipped because not reachable within the velocity limit
    # plan switch: the largest change (over joints) of the reference velocity at the
    # takeover, rad/s (before the step limiter); None when no plan was being tracked
    velocity_jump: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


class TrajectoryPoints(NamedTuple):
    times_from_now: np.ndarray  # (M,) seconds, > 0: when the controller should reach each point
    positions: np.ndarray       # (M, J)
    velocities: np.ndarray      # (M, J)


@dataclass(frozen=True, eq=False)
class _Reference:
    """Piecewise-linear path in plan time: bridge knot + the plan's remaining points."""
    stamp: float
    times: np.ndarray      # (K,) strictly increasing
    positions: np.ndarray  # (K, J) within position limits

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def at(self, tau: np.ndarray) -> np.ndarray:
        """(M, J) positions at times tau (M,); held constant outside the knots."""
        # always >= 2 knots: the bridge knot plus at least one plan point
        i = np.clip(np.searchsorted(self.times, tau, side="right"), 1, len(self.times) - 1)
        t0, t1 = self.times[i - 1], self.times[i]
        w = np.clip((tau - t0) / (t1 - t0), 0.0, 1.0)[:, None]
        # convex form: never overflows even for huge (unlimited-joint) values
        return (1.0 - w) * self.positions[i - 1] + w * self.positions[i]


@dataclass(frozen=True, eq=False)
class _Crossfade:
    """Blend from what was commanded before a switch (`old`: a plan, or a blend still
    running when the next plan came) to the new plan over [start, end]."""
    old: "_Reference | _Crossfade"
    new: _Reference
    start: float
    end: float

    @property
    def depth(self) -> int:
        """Old plans this blend still holds."""
        return 1 + (self.old.depth if isinstance(self.old, _Crossfade) else 0)

    def at(self, tau: np.ndarray) -> np.ndarray:
        a = np.clip((tau - self.start) / (self.end - self.start), 0.0, 1.0)[:, None]
        a = a * a * (3.0 - 2.0 * a)  # smoothstep: the velocity is continuous at both ends
        return (1.0 - a) * self.old.at(tau) + a * self.new.at(tau)


class PlanExecutor:
    def __init__(self, joint_names: Sequence[str], limits: JointLimits, actuation_lead: float,
                 stale_plan_timeout: float, crossfade_steps: int, control_dt: float):
        self.joint_names = tuple(joint_names)
        if len(set(self.joint_names)) != len(self.joint_names) or not self.joint_names:
            raise ValueError(f"joint_names must be non-empty and unique, got {self.joint_names}")
        if limits.n_joints != len(self.joint_names):
            raise ValueError(f"limits for {limits.n_joints} joints, {len(self.joint_names)} names")
        if not (math.isfinite(control_dt) and control_dt > 0):
            raise ValueError(f"control_dt must be > 0, got {control_dt}")
        self.control_dt = float(control_dt)
        self.limits = limits
        self.configure(actuation_lead=actuation_lead, stale_plan_timeout=stale_plan_timeout,
                       crossfade_steps=crossfade_steps)
        self._enabled = False
        self._last_cmd: np.ndarray | None = None
        self._last_cmd_now = -math.inf
        self._last_now = -math.inf
        self._ref: _Reference | None = None
        self._fade: _Crossfade | None = None
        self._latest_stamp = -math.inf
        self._reason, self._cause = "disabled: waiting for enable", "disabled"
        self.clock_jumps = 0
        self.hold_causes: deque[str] = deque(maxlen=64)
        self._sent: tuple[np.ndarray, np.ndarray] | None = None  # last trajectory sent (times, positions)  # why the plan was last dropped, newest last

    # ---- configuration -------------------------------------------------------------
    def configure(self, *, actuation_lead: float | None = None,
                  stale_plan_timeout: float | None = None, crossfade_steps: int | None = None,
                  max_velocity: float | Sequence[float] | None = None) -> None:
        """Change tunables at run time (each checked; ValueError with a reason)."""
        if actuation_lead is not None:
            if not (math.isfinite(actuation_lead) and actuation_lead >= 0):
                raise ValueError(f"actuation_lead must be >= 0, got {actuation_lead}")
            self.actuation_lead = float(actuation_lead)
        if stale_plan_timeout is not None:
            if not (math.isfinite(stale_plan_timeout) and stale_plan_timeout > 0):
                raise ValueError(f"stale_plan_timeout must be > 0, got {stale_plan_timeout}")
            self.stale_plan_timeout = float(stale_plan_timeout)
        if crossfade_steps is not None:
            if int(crossfade_steps) != crossfade_steps or crossfade_steps < 0:
                raise ValueError(f"crossfade_steps must be an integer >= 0, got {crossfade_steps}")
            self.crossfade_steps = int(crossfade_steps)
        if max_velocity is not None:
            self.limits = JointLimits.create(self.limits.n_joints, self.limits.lower,
                                             self.limits.upper, max_velocity)

    # ---- state ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def status(self) -> str:
        if not self._enabled:
            return DISABLED
        return TRACKING if self._ref is not None else HOLDING

    @property
    def reason(self) -> str:
        """Why the executor is holding or disabled ("" while tracking)."""
        return "" if self.status == TRACKING else self._reason

    @property
    def cause(self) -> str:
        """Short key of the reason: disabled, no_plan, ran_out, stale, clock_jump, ..."""
        return "" if self.status == TRACKING else self._cause

    @property
    def active_plan_stamp(self) -> float | None:
        return None if self._ref is None else self._ref.stamp

    @property
    def plans_held(self) -> int:
        """Plans kept in memory: the active one and, during a cross-fade, the old ones."""
        return int(self._ref is not None) + (self._fade.depth if self._fade is not None else 0)

    @property
    def last_command(self) -> np.ndarray | None:
        return None if self._last_cmd is None else self._last_cmd.copy()

    def enable(self, current_positions: np.ndarray, now: float) -> None:
        """Start commanding from the arm's current position (held until a plan arrives).

        Raises ValueError(reason) if the position is unusable (wrong size, non-finite,
        outside the position limits: starting there would violate the limits at once).
        """
        q = np.asarray(current_positions, dtype=np.float64)
        if q.shape != (len(self.joint_names),):
            raise ValueError(f"need {len(self.joint_names)} joint positions, got shape {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("current joint positions contain NaN/Inf")
        outside = ~((q >= self.limits.lower) & (q <= self.limits.upper))
        if np.any(outside):
            j = int(np.argmax(outside))
            raise ValueError(f"joint {self.joint_names[j]!r} at {q[j]:.4f} is outside its limits "
                             f"[{self.limits.lower[j]}, {self.limits.upper[j]}]")
        self._check_clock(now)  # a jump back while disabled starts a new timeline too
        self._enabled = True
        self._last_cmd = q.copy()
        self._last_cmd_now = self._last_now = float(now)
        self._ref = self._fade = None  # plans received before enable assumed another start
        # joint_trajectory: the controller holds the arm here until the first message, so
        # the first horizon starts from here even if a control tick moved the command first
        self._sent = (np.array([float(now)]), q[None].copy())
        self._reason = "enabled: holding the current position until a plan arrives"
        self._cause = "no_plan"

    def disable(self, reason: str = "disabled") -> None:
        self._enabled = False
        self._ref = self._fade = self._sent = None
        self._reason, self._cause = reason, "disabled"

    # ---- plans ---------------------------------------------------------------------
    def submit(self, plan: Plan, now: float) -> SubmitResult:
        """Offer a plan received at `now`; it replaces the active one if valid and newer."""
        self._check_clock(now)
        try:
            plan = validate_plan(plan, self.joint_names)
        except PlanRejected as e:
            return SubmitResult(REJECTED, e.reason, e.cause)
        stamp = plan.stamp
        if stamp > now + self.stale_plan_timeout:
            return SubmitResult(REJECTED, f"stamped {stamp - now:.3f} s in the future "
                                          "(clocks not synchronised?)", "future_stamp")
        if not self._enabled:
            return SubmitResult(IGNORED, "executor disabled", "disabled")
        if now - stamp > self.stale_plan_timeout:
            return SubmitResult(IGNORED, f"stale on arrival: stamp is {now - stamp:.3f} s old "
                                         f"(> stale_plan_timeout {self.stale_plan_timeout} s)",
                                "stale")
        if stamp <= self._latest_stamp:
            return SubmitResult(IGNORED, "not newer than the plan stamped "
                                         f"{self._latest_stamp:.3f}", "not_newer")

        tau0 = now + self.actuation_lead
        times = plan.times
        first = int(np.searchsorted(times, tau0, side="right"))  # times > tau0 are executable
        if first == len(times):
            return SubmitResult(IGNORED, f"all {len(times)} points already past "
                                         f"(arrived {now - stamp:.3f} s after its stamp)",
                                "all_late", late_points=first)
        self._expire(now)
        T = times[first:]
        P = self.limits.clamp_position(plan.positions[first:])
        p0 = self._last_cmd
        # while tracking, the bridge starts where the last command was, at the plan time it
        # was for (up to a control step back): placed at tau0 instead, every switch would
        # lag a tick and bump the velocity. From a hold it starts at tau0.
        t0 = tau0 if self._ref is None else \
            min(tau0, max(self._last_cmd_now + self.actuation_lead, tau0 - self.control_dt))
        # first point reachable from the last command within the velocity limit
        with np.errstate(over="ignore", invalid="ignore"):
            reach = np.all(np.abs(P - p0) <= self.limits.max_velocity * (T - t0)[:, None]
                           * (1 + 1e-9), axis=1)
        k = int(np.argmax(reach)) if reach.any() else 0  # none: the step limiter catches up
        new = _Reference(stamp, np.concatenate(([t0], T[k:])), np.vstack((p0, P[k:])))
        before = None if self._ref is None else self._reference_velocity(tau0)
        if self.crossfade_steps > 0 and self._ref is not None:
            # from what is commanded now: a blend still running is blended out, not cut
            self._fade = _Crossfade(self._fade or self._ref, new, tau0,
                                    tau0 + self.crossfade_steps * self.control_dt)
        else:
            self._fade = None
        self._ref = new
        self._latest_stamp = stamp
        jump = None if before is None else \
            float(np.max(np.abs(self._reference_velocity(tau0) - before)))
        if reach.any():
            return SubmitResult(ACCEPTED, late_points=first, skipped_points=k, velocity_jump=jump)
        return SubmitResult(ACCEPTED, "no point reachable within the velocity limit: the step "
                                      "limit catches up", "unreachable", late_points=first,
                            velocity_jump=jump)

    # ---- commands ------------------------------------------------------------------
    def command(self, now: float) -> Command:
        """The position to send at `now` (for plan time now + actuation_lead)."""
        tau = now + self.actuation_lead
        self._check_clock(now)
        if not self._enabled:
            return Command(None, None, DISABLED, self._reason, tau)
        self._expire(now)
        dt_cmd = min(max(now - self._last_cmd_now, 0.0), self.control_dt)
        prev = self._last_cmd
        if self._ref is not None:
            target = self._reference_at(np.array([tau]))[0]
            if not np.all(np.isfinite(target)):  # cannot happen for validated plans; fail safe
                self._clear("non-finite reference position", "non_finite")
            else:
                new = self.limits.limit_step(prev, target, dt_cmd)
                vel = (new - prev) / dt_cmd if dt_cmd > 0 else np.zeros_like(new)
                self._last_cmd, self._last_cmd_now = new, now
                return Command(new.copy(), vel, TRACKING, "", tau)
        self._last_cmd_now = now
        return Command(prev.copy(), np.zeros_like(prev), HOLDING, self._reason, tau)

    def remaining_trajectory(self, now: float, lead: float | None = None) -> TrajectoryPoints:
        """The rest of the active plan re-timed to now, for a joint_trajectory_controller.

        A point for plan time t gets time_from_start t - now - lead (> 0: points whose time
        is <= now + lead are never sent). Positions are clamped and velocity-limited
        starting from the last command, velocities are monotone finite differences (0 at
        the end), so the controller's spline between points stays between neighbouring
        points. Points end where the plan would go stale. Holding: one point at the last
        command. Disabled: no points.
        """
        J = len(self.joint_names)
        if not self._enabled:
            return TrajectoryPoints(np.zeros(0), np.zeros((0, J)), np.zeros((0, J)))
        lead = self.actuation_lead if lead is None else float(lead)
        self._check_clock(now)
        self._expire(now)
        self._sync_to_sent(now)
        tau = now + lead
        hold = TrajectoryPoints(np.array([self.control_dt]), self._last_cmd[None].copy(),
                                np.zeros((1, J)))
        if self._ref is None:
            return self._remember_sent(now, hold)
        # nothing beyond the time the plan goes stale: if this node dies, the controller
        # stops where the executor would have stopped holding
        stale_end = self._ref.stamp + self.stale_plan_timeout + lead
        ts = self._ref.times
        if self._fade is not None:  # sample the blend on the control grid while it lasts
            ts = np.union1d(ts, self._fade.start
                            + self.control_dt * np.arange(1, self.crossfade_steps + 1))
        ts = ts[(ts > tau + MIN_POINT_GAP) & (ts < stale_end) & (ts <= self._ref.end)]
        if self._ref.end >= stale_end > tau:
            ts = np.append(ts, stale_end)
        # blend samples land on plan knots up to rounding: two points a few ns apart
        # become equal time_from_start in the message, which a controller rejects
        ts = ts[np.concatenate(([True], np.diff(ts) > MIN_POINT_GAP))] if ts.size else ts
        if ts.size == 0:
            return self._remember_sent(now, hold)
        target = self._reference_at(ts)
        rel = ts - tau
        out = np.empty_like(target)
        prev, prev_t = self._last_cmd, min(self._last_cmd_now - now, 0.0)
        for i in range(len(ts)):  # M is small (one plan's horizon)
            prev = out[i] = self.limits.limit_step(prev, target[i], rel[i] - prev_t)
            prev_t = rel[i]
        knots_t = np.concatenate(([min(self._last_cmd_now - now, 0.0)], rel))
        knots_p = np.vstack((self._last_cmd, out))
        slopes = np.diff(knots_p, axis=0) / np.diff(knots_t)[:, None]  # (M, J), incoming
        outgoing = np.vstack((slopes[1:], np.zeros((1, J))))
        same_sign = slopes * outgoing > 0
        vel = np.where(same_sign, np.sign(slopes) * np.minimum(abs(slopes), abs(outgoing)), 0.0)
        return self._remember_sent(now, TrajectoryPoints(rel, out, vel))

    def _remember_sent(self, now: float, points: TrajectoryPoints) -> TrajectoryPoints:
        """Keep what the controller was told: it follows this until the next message."""
        self._sent = (np.concatenate(([now], now + points.times_from_now)),
                      np.vstack((self._last_cmd, points.positions)))
        return points

    def _sync_to_sent(self, now: float) -> None:
        """Start from where the controller is told to be now (the last sent trajectory at
        `now`), not from the last control tick's command: when ticks run late the two
        differ, and a new horizon starting from the older one would pull the arm back."""
        if self._sent is None:
            return
        times, positions = self._sent
        q = np.array([np.interp(now, times, positions[:, j]) for j in range(positions.shape[1])])
        if np.all(np.isfinite(q)):
            self._last_cmd, self._last_cmd_now = self.limits.clamp_position(q), now

    # ---- internals -----------------------------------------------------------------
    def _reference_at(self, tau: np.ndarray) -> np.ndarray:
        return (self._fade or self._ref).at(tau)

    def _reference_velocity(self, tau: float) -> np.ndarray:
        """(J,) velocity the reference asks for over the control step after plan time tau."""
        p = self._reference_at(np.array([tau, tau + self.control_dt]))
        return (p[1] - p[0]) / self.control_dt

    def _check_clock(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if now < self._last_now:  # e.g. /clock looped in a bag replay
            self.clock_jumps += 1
            self._latest_stamp = -math.inf  # stamps of the new timeline are smaller
            self._clear(f"clock jumped back by {self._last_now - now:.3f} s", "clock_jump")
            self._last_cmd_now = now
            self._sent = None
        self._last_now = now

    def _expire(self, now: float) -> None:
        """Drop the active plan when it is stale or has run out."""
        if self._fade is not None and now + self.actuation_lead >= self._fade.end:
            self._fade = None
        ref = self._ref
        if ref is None:
            return
        if now - ref.stamp > self.stale_plan_timeout:
            self._clear(f"plan stamped {ref.stamp:.3f} is stale "
                        f"(> stale_plan_timeout {self.stale_plan_timeout} s)", "stale")
        elif now + self.actuation_lead > ref.end:
            self._clear(f"plan stamped {ref.stamp:.3f} ran out at {ref.end:.3f}", "ran_out")

    def _clear(self, reason: str, cause: str) -> None:
        self._ref = self._fade = None
        self._reason, self._cause = reason, cause
        self.hold_causes.append(cause)
