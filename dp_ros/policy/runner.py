"""Plans off the caller's thread: one worker, one waiting window, swaps between plans.

The policy node's subscription callbacks hand each window that is due to ``submit``; the
worker thread plans on it and reports a ``PlanOutcome``. There is no queue: a window
submitted while another still waits replaces it (the waiting one is counted as dropped),
so the worker always plans on the newest observation. A policy loaded by a
``PolicyLoader`` is installed by the worker between two plans, so each plan comes from
exactly one policy. No ROS here: tests drive it directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, TypeVar

import numpy as np

from dp_ros.sched import ensure_normal_priority, raise_thread

from .config import PolicyConfig
from .inference import Policy
from .seeding import seeded_predict
from .swap import LoadOutcome, PolicyLoader
from .warm_start import PreviousPlan

T = TypeVar("T")
IDLE_POLL = 0.05  # s; how often an idle worker looks for a loaded policy to install


class LatestSlot(Generic[T]):
    """Holds at most one item; ``put`` replaces a waiting item and returns it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._closed = False
        self.replaced = 0  # items put over a waiting one

    def put(self, item: T) -> Optional[T]:
        with self._cond:
            replaced, self._item = self._item, item
            self.replaced += replaced is not None
            self._cond.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[T]:
        """The waiting item (removing it), or None after `timeout` or once closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class PlanJob:
    """A window to plan on; the plan will be stamped `plan_stamp_ns` (newest observation).
    `submitted` (perf_counter s) lets the outcome tell waiting for the worker from inference."""

    window: dict
    plan_stamp_ns: int
    submitted: float = field(default_factory=time.perf_counter, compare=False)


@dataclass(frozen=True)
class PlanOutcome:
    """One finished job. `actions` (T_p, A) float32 when it succeeded, else `error` =
    (cause, detail); `latency` is the inference time in seconds (perf_counter), `queue_wait`
    the time the job waited for the worker to finish the previous plan (not the time the
    thread takes to wake up, which is overhead, not inference);
    `cold_reason` why the plan did not warm-start from the previous one (None: it did)."""

    job: PlanJob
    policy_id: str
    config: PolicyConfig
    actions: Optional[np.ndarray]
    error: Optional[tuple[str, str]]
    latency: float
    queue_wait: float = 0.0
    cold_reason: Optional[str] = "warm start off"

    @property
    def ok(self) -> bool:
        return self.actions is not None


class PlanRunner:
    """The planning worker thread.

    ``on_start(job)`` runs on the worker just before inference, ``on_outcome(outcome)``
    after it, ``on_swap(load_outcome)`` whenever a finished load is taken from `loader`
    (installed if it succeeded). They run on the worker; an exception they raise is
    counted (``callback_errors``) and the worker goes on.
    `seed` >= 0 makes each plan's noise a function of (seed, plan stamp), see seeding.py.
    `wake_priority` > 0: a job handed to the idle worker raises it to SCHED_FIFO at that
    priority, so it starts at once instead of queuing for a CPU behind normal-priority work
    (measured: 0.5 ms median, 12-42 ms p99 on 2 busy cores); it drops back to normal
    priority before it plans.
    """

    def __init__(self, policy: Policy, on_outcome: Callable[[PlanOutcome], None],
                 loader: Optional[PolicyLoader] = None, seed: int = -1,
                 on_start: Optional[Callable[[PlanJob], None]] = None,
                 on_swap: Optional[Callable[[LoadOutcome], None]] = None,
                 wake_priority: int = 0):
        self._policy = policy
        self._on_outcome = on_outcome
        self._on_start = on_start
        self._on_swap = on_swap
        self.loader = loader
        self.seed = seed
        self.wake_priority = wake_priority
        self._slot: LatestSlot[PlanJob] = LatestSlot()
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._wake_lock = threading.Lock()  # submit()'s raise vs the worker becoming busy
        self._free_at = 0.0  # perf_counter when the worker last finished a job
        self._thread = threading.Thread(target=self._loop, name="policy_worker", daemon=True)
        self.callback_errors = 0  # exceptions raised by the callbacks (a bug, or shutdown)
        self.last_callback_error = ""
        # the last successful plan (the one being executed): warm-start material for the
        # next plan when the policy's warm_start_steps > 0; forgotten at a swap
        self.previous: Optional[PreviousPlan] = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def dropped(self) -> int:
        """Jobs replaced by a newer one while waiting."""
        return self._slot.replaced

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: PlanJob) -> bool:
        """Hand a job to the worker; True when it replaced (dropped) a waiting one."""
        if self.wake_priority > 0 and self._thread.native_id:
            with self._wake_lock:  # a worker that is planning must never be raised
                if not self._busy.is_set():
                    raise_thread(self._thread.native_id, self.wake_priority)
        return self._slot.put(job) is not None

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the current plan; True when the worker has ended within `timeout`."""
        self._stop.set()
        self._slot.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker

    def _install_loaded(self) -> None:
        if self.loader is None:
            return
        loaded = self.loader.take()
        if loaded is None:
            return
        if loaded.policy is not None:
            self._policy = loaded.policy  # between plans: the only thread using it is this one
            self.previous = None  # another policy's plan is no warm start for this one
        if self._on_swap is not None:
            try:
                self._on_swap(loaded)
            except Exception as exc:  # noqa: BLE001 - see _loop
                self.callback_errors += 1
                self.last_callback_error = f"{type(exc).__name__}: {exc}"

    def _loop(self) -> None:
        ensure_normal_priority()  # never plan at the control loop's real-time priority
        while not self._stop.is_set():
            self._install_loaded()
            job = self._slot.take(IDLE_POLL)
            if job is None:
                continue
            with self._wake_lock:
                self._busy.set()
            # submit() may have raised it to wake at once; busy now, nothing raises it again
            ensure_normal_priority()
            if self._stop.is_set():
                self._busy.clear()
                continue
            try:
                if self._on_start is not None:
                    self._on_start(job)
                self._on_outcome(self._plan(job))
            except Exception as exc:  # noqa: BLE001 - a callback bug must not end planning
                self.callback_errors += 1
                self.last_callback_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._free_at = time.perf_counter()
                self._busy.clear()

    def _plan(self, job: PlanJob) -> PlanOutcome:
        policy = self._policy
        cfg = policy.config
        t0 = time.perf_counter()
        actions, error = None, None
        try:
            previous = self.previous if getattr(policy, "warm_start_steps", 0) else None
            if previous is None:  # cold: the plain call, which stand-in predictors also take
                out = seeded_predict(policy, job.window, self.seed, job.plan_stamp_ns)
            else:
                out = seeded_predict(policy, job.window, self.seed, job.plan_stamp_ns,
                                     previous=previous)
            out = np.asarray(out, dtype=np.float32)
            if out.shape != (cfg.T_p, cfg.action_dim):
                error = ("bad_output_shape", f"policy returned shape {out.shape}, "
                                             f"expected {(cfg.T_p, cfg.action_dim)}")
            elif not np.all(np.isfinite(out)):
                error = ("non_finite_actions", f"policy returned {int(np.sum(~np.isfinite(out)))} "
                                               "NaN/Inf action values")
            else:
                actions = out
                self.previous = PreviousPlan(out, job.plan_stamp_ns)
        except Exception as exc:  # noqa: BLE001 - a failing policy never kills the node
            error = (f"predict_{type(exc).__name__}", str(exc) or repr(exc))
        return PlanOutcome(job, policy.policy_id, cfg, actions, error, time.perf_counter() - t0,
                           queue_wait=max(0.0, min(t0, self._free_at) - job.submitted),
                           cold_reason=getattr(policy, "cold_reason", "warm start off"))


class LatencyStats:
    """Last / median / p99 over the most recent `capacity` samples (seconds). Thread-safe."""

    def __init__(self, capacity: int = 1000):
        self._values: deque[float] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(float(seconds))
            self.count += 1

    def summary(self) -> dict[str, Optional[float]]:
        with self._lock:
            values = np.array(self._values, dtype=np.float64)
        if values.size == 0:
            return {"last": None, "median": None, "p99": None}
        return {"last": float(values[-1]), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99))}
