"""Swapping the running policy for another checkpoint: cheap validation + background load.

``validate_swap`` is what a ROS set-parameters callback may afford (it reads config.json
only); ``PolicyLoader`` then loads the weights on one worker thread and hands back the
loaded Policy or the reason it failed. The caller installs the new policy between two
plans, so a plan is always computed by exactly one policy.

Security: ``policy_dir`` is an allow-list. A candidate is resolved with realpath first, so
``..`` or a symlink inside the directory that points elsewhere is refused. An empty
``policy_dir`` disables the check: anyone who can set the parameter can then make the node
load any checkpoint on the machine (safetensors cannot run code, but the robot would follow
whatever it plans). Use it on development machines only.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dp_ros.sched import ensure_normal_priority

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_config
from .config import PolicyConfig
from .inference import Policy, load_policy

DT_TOLERANCE = 1e-9  # seconds; dt values are written by json, equal configs compare equal


class SwapError(ValueError):
    """A candidate checkpoint cannot replace the running policy; the message says why."""


def resolve_allowed(candidate_path: str | os.PathLike, policy_dir: str | os.PathLike = "") -> Path:
    """The candidate's real path, if it exists and lies inside `policy_dir` (when given)."""
    raw = os.fspath(candidate_path)
    if not raw.strip():
        raise SwapError("policy_path is empty")
    path = Path(os.path.expanduser(raw))
    if not path.exists():
        raise SwapError(f"{raw}: does not exist")
    real = Path(os.path.realpath(path))
    allow = os.fspath(policy_dir)
    if allow.strip():
        root = Path(os.path.realpath(os.path.expanduser(allow)))
        if not root.is_dir():
            raise SwapError(f"policy_dir {allow}: not a directory")
        # commonpath, not startswith: /data/policies2 is not inside /data/policies
        if os.path.commonpath([root, real]) != os.fspath(root):
            raise SwapError(f"{raw}: resolves to {real}, outside policy_dir {root}")
    if not real.is_dir():
        raise SwapError(f"{raw}: not a checkpoint directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not (real / WEIGHTS_FILE).is_file():
        raise SwapError(f"{raw}: no {WEIGHTS_FILE}")
    return real


def incompatibilities(candidate: PolicyConfig, running: PolicyConfig) -> list[str]:
    """What would break the running graph (windows in, plan out) if `candidate` replaced
    `running`; empty when the swap is safe. T_p, T_a and the architecture may differ."""
    problems = []
    cams_new = {c.name: (c.height, c.width) for c in candidate.cameras}
    cams_old = {c.name: (c.height, c.width) for c in running.cameras}
    if set(cams_new) != set(cams_old):
        problems.append(f"cameras {sorted(cams_new)} != running {sorted(cams_old)}")
    else:
        for name, size in cams_new.items():
            if size != cams_old[name]:
                problems.append(f"camera {name!r} is {size[0]}x{size[1]}, running policy uses "
                                f"{cams_old[name][0]}x{cams_old[name][1]}")
    # order matters: the window's state vector and the plan's joints are positional
    if list(candidate.state_names) != list(running.state_names):
        problems.append(f"state_names {candidate.state_names} != running {running.state_names}")
    if list(candidate.action_names) != list(running.action_names):
        problems.append(f"action_names {candidate.action_names} != running {running.action_names}")
    if candidate.T_o != running.T_o:
        problems.append(f"T_o {candidate.T_o} != running {running.T_o}")
    if not math.isclose(candidate.dt, running.dt, rel_tol=0.0, abs_tol=DT_TOLERANCE):
        problems.append(f"dt {candidate.dt} != running {running.dt}")
    return problems


def validate_swap(candidate_path: str | os.PathLike, policy_dir: str | os.PathLike,
                  running_config: Optional[PolicyConfig],
                  replan_every: Optional[int] = None) -> PolicyConfig:
    """Check that `candidate_path` may replace the running policy; reads config.json only.

    Returns the candidate's config; raises SwapError with the reason. `running_config`
    None checks the path and config only (the first policy of a node). `replan_every`
    (steps), when given, must fit in the candidate's executable horizon T_p - T_o + 1.
    """
    real = resolve_allowed(candidate_path, policy_dir)
    try:
        cfg = load_config(real)
    except CheckpointError as exc:
        raise SwapError(str(exc)) from None
    if running_config is not None:
        problems = incompatibilities(cfg, running_config)
        if problems:
            raise SwapError(f"{os.fspath(candidate_path)}: incompatible with the running policy: "
                            + "; ".join(problems))
    if replan_every is not None and replan_every > cfg.executable_horizon:
        raise SwapError(f"{os.fspath(candidate_path)}: replan_every {replan_every} exceeds its "
                        f"executable horizon T_p - T_o + 1 = {cfg.executable_horizon}")
    return cfg


@dataclass(frozen=True)
class LoadOutcome:
    """A finished load: `policy` on success, else `error` (one line)."""

    path: str
    policy: Optional[Policy]
    error: Optional[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.policy is not None


class PolicyLoader:
    """Loads checkpoints on a single worker thread, newest request wins.

    ``submit`` returns at once; ``take`` returns the finished outcome (once) so that the
    thread that plans can install the new policy between two plans. A request superseded
    by a newer one before it starts is skipped.
    """

    def __init__(self, device: str = "auto", seed: Optional[int] = None,
                 load: Callable[..., Policy] = load_policy):
        self.device = device
        self.seed = seed
        self._load = load
        # loads never run at a real-time priority inherited from the thread that submits
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy_loader",
                                        initializer=ensure_normal_priority)
        self._lock = threading.Lock()
        self._generation = 0
        self._ready: Optional[LoadOutcome] = None
        self._loading: Optional[str] = None

    @property
    def loading(self) -> Optional[str]:
        """The path being loaded (or queued), None when idle."""
        with self._lock:
            return self._loading

    def submit(self, path: str | os.PathLike,
               validate: Optional[Callable[[str], object]] = None) -> Future:
        """Load `path` in the background. `validate(path)` runs first on the worker (e.g.
        validate_swap again, since the file may have changed since the parameter was set)."""
        with self._lock:
            self._generation += 1
            gen = self._generation
            self._loading = os.fspath(path)
        return self._pool.submit(self._run, gen, os.fspath(path), validate)

    def take(self) -> Optional[LoadOutcome]:
        """The newest finished outcome not taken yet (thread-safe), else None."""
        with self._lock:
            outcome, self._ready = self._ready, None
            return outcome

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _run(self, gen: int, path: str, validate: Optional[Callable[[str], object]]) -> Optional[LoadOutcome]:
        with self._lock:
            if gen != self._generation:
                return None  # a newer request is queued behind us
        t0 = time.perf_counter()
        policy, error = None, None
        try:
            if validate is not None:
                validate(path)
            policy = self._load(os.path.realpath(path), device=self.device, seed=self.seed)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the old policy stays
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (SwapError, CheckpointError)) \
                else str(exc)
        outcome = LoadOutcome(path, policy, error, time.perf_counter() - t0)
        with self._lock:
            if gen == self._generation:
                self._ready = outcome
                self._loading = None
        return outcome
