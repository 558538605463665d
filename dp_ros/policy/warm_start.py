"""Warm start: the next plan starts from the previous plan's unexecuted remainder.

A plan stamped t holds, at action index i, the action for time t + (i - (T_o - 1)) * dt
(ARCHITECTURE.md, "Time"). A plan stamped t' = t + k * dt therefore wants at its index j
the previous plan's index j + k. ``shift_plan`` reads the previous plan there (linear
interpolation when k is not a whole number of steps) and pads past its end with its last
action. The policy then diffuses that guess to the noise level of sampler step
K - warm_start_steps (``Sampler.add_noise_at``) and denoises only the last
``warm_start_steps`` steps. warm_start_steps = 0 is a cold start from pure noise.

A plan is only worth continuing when the robot followed it: ``departure`` compares the
shifted plan's action for the new stamp with the observed state on the joints that are
both state and action (position control). Where they differ by more than
FOLLOW_TOLERANCE of the action range (the executor was disabled, the arm was reset or
pushed, a plan was rejected), the plan starts cold; otherwise a warm-start chain would
carry one episode's mode into the next.

Keeping the executing part (``kept_prefix``, the policy's warm_start_keep_steps N): while
a plan is computed the executor still runs the previous one, and switches to the new plan
a latency after its stamp. A new plan conditioned on the measured state starts where the
arm is, which lags the command, so at the switch it lies off the running plan by that lag.
With N > 0 the new plan's actions up to N - 1 steps after its stamp (and those before it)
are held to the previous plan at every denoising step (inpainting, as in real-time
chunking): the plan continues the running one exactly there and the denoiser fits the
rest to that prefix. N should cover the latency plus the executor's actuation lead.

No ROS here: the caller (PlanRunner) hands the previous plan and the new plan's stamp in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .schedule import Inpaint

FOLLOW_TOLERANCE = 0.1  # of the action range: well above tracking lag (v_max * latency)


@dataclass(frozen=True)
class PreviousPlan:
    """A finished plan: actions (T_p, A) in action units and its stamp (ns, time of the
    newest observation of its window)."""

    actions: np.ndarray
    stamp_ns: int


def shift_plan(previous: PreviousPlan, stamp_ns: int, dt: float, T_p: int) -> Optional[np.ndarray]:
    """The previous plan on the time grid of a plan stamped `stamp_ns`, (T_p, A) float32;
    None when the new stamp is earlier than the previous one or past its last point, or
    the shapes disagree."""
    prev = np.asarray(previous.actions, dtype=np.float64)
    if prev.ndim != 2 or prev.shape[0] != T_p or dt <= 0:
        return None
    k = (int(stamp_ns) - int(previous.stamp_ns)) * 1e-9 / dt  # steps the grid moved
    if not np.isfinite(k) or k < -1e-6 or k > T_p - 1 + 1e-6:
        return None  # clock went back, or the previous plan ended before this one starts
    k = max(k, 0.0)
    src = np.arange(T_p, dtype=np.float64) + k  # previous plan's index for each new index
    if abs(k - round(k)) < 1e-6:  # on the grid: exact copies, no interpolation rounding
        idx = np.minimum(np.arange(T_p) + int(round(k)), T_p - 1)
        return prev[idx].astype(np.float32)
    out = np.empty_like(prev)
    grid = np.arange(T_p, dtype=np.float64)
    for a in range(prev.shape[1]):
        out[:, a] = np.interp(src, grid, prev[:, a])  # clamps: pads with the last action
    return out.astype(np.float32)


def shared_joints(state_names: Sequence[str], action_names: Sequence[str]) -> list[tuple[int, int]]:
    """(action index, state index) of each dimension named in both: where a position
    action can be compared with the observed state."""
    index = {name: i for i, name in enumerate(state_names)}
    return [(a, index[name]) for a, name in enumerate(action_names) if name in index]


def departure(shifted: np.ndarray, state_now: np.ndarray, state_names: Sequence[str],
              action_names: Sequence[str], action_range: np.ndarray, T_o: int,
              tolerance: float = FOLLOW_TOLERANCE) -> Optional[str]:
    """Why the robot is not on the previous plan (None: it is, or nothing to compare).

    `shifted` is ``shift_plan``'s output (index T_o - 1 is the action for the new stamp),
    `state_now` the newest observed state. Only dimensions named in both state and action
    are compared: an end-effector action against joint states cannot be checked here."""
    shared = shared_joints(state_names, action_names)
    if not shared:
        return None
    a_idx, s_idx = (np.array(ix) for ix in zip(*shared))
    off = np.abs(np.asarray(shifted, np.float64)[T_o - 1, a_idx]
                 - np.asarray(state_now, np.float64)[s_idx]) / np.asarray(action_range)[a_idx]
    worst = int(np.argmax(off))
    if off[worst] <= tolerance:
        return None
    return (f"{action_names[a_idx[worst]]} is {off[worst]:.0%} of its range away from the "
            f"previous plan (> {tolerance:.0%})")


def check_warm_start_steps(value: int, num_inference_steps: int) -> int:
    """0 (cold) or 1..K-1 denoising steps from the shifted previous plan."""
    value = int(value)
    if not 0 <= value < num_inference_steps:
        raise ValueError(f"warm_start_steps must be 0 (cold start) or 1..{num_inference_steps - 1} "
                         f"(fewer than the sampler's {num_inference_steps} steps), got {value}")
    return value


def check_keep_steps(value: int, horizon: int) -> int:
    """0 (nothing kept) or 1..`horizon` (the config's executable_horizon) steps from the
    plan's stamp on."""
    value = int(value)
    if not 0 <= value <= horizon:
        raise ValueError(f"warm_start_keep_steps must be 0 (keep nothing) or 1..{horizon} "
                         f"(the plan's steps from its stamp on), got {value}")
    return value


def kept_prefix(x0: torch.Tensor, noise: torch.Tensor, T_o: int, keep_steps: int) -> Optional[Inpaint]:
    """The Inpaint that holds a warm start's first T_o - 1 + keep_steps actions (the past
    ones and `keep_steps` from the stamp on) to the shifted previous plan `x0` (1, T_p, A),
    normalised, diffused with the sample's initial `noise`; None for keep_steps 0."""
    if keep_steps <= 0:
        return None
    mask = torch.zeros((1, x0.shape[1], 1), dtype=torch.bool, device=x0.device)
    mask[:, :T_o - 1 + keep_steps] = True
    return Inpaint(mask, x0, noise)
