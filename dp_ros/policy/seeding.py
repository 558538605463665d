"""Reproducible per-plan noise: the convention the policy node uses when its ``seed`` >= 0.

A plan's randomness is a pure function of (seed, plan stamp), so offline evaluation of a
recorded run (the bag holds the windows and the node's ``~/plan`` messages) reproduces the
node's plans exactly, whatever order or subset of windows it plans on:

    rng   = numpy.random.default_rng([seed, plan_stamp_ns])
    noise = rng.standard_normal((T_p, action_dim), dtype=float32)     # x_K, the initial sample
    torch_seed = int(rng.integers(0, 2**63 - 1))                      # then, for DDPM's per-step noise
    policy.generator.manual_seed(torch_seed); policy.predict(window, noise=noise)

``plan_stamp_ns`` is the plan's ``header.stamp`` in integer nanoseconds (the time of the
newest observation in the window). With a DDIM sampler (eta 0) the noise alone determines
the plan; a DDPM sampler also draws from the policy's torch generator, hence the reseed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .inference import Policy
from .warm_start import PreviousPlan


@dataclass(frozen=True)
class PlanNoise:
    noise: np.ndarray  # float32 (T_p, action_dim)
    torch_seed: int


def plan_noise(seed: int, plan_stamp_ns: int, T_p: int, action_dim: int) -> PlanNoise:
    """The initial sample and torch generator seed of the plan stamped `plan_stamp_ns`."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0 for reproducible noise, got {seed}")
    # numpy's SeedSequence takes non-negative ints only; stamps before the epoch are folded
    rng = np.random.default_rng([int(seed), int(plan_stamp_ns) % (1 << 64)])
    noise = rng.standard_normal((T_p, action_dim), dtype=np.float32)
    return PlanNoise(noise, int(rng.integers(0, 2**63 - 1)))


def seeded_predict(policy: Policy, obs: dict, seed: int, plan_stamp_ns: int,
                   previous: Optional[PreviousPlan] = None) -> np.ndarray:
    """``policy.predict`` with the node's noise convention (seed < 0: the policy's own RNG).
    `previous` (the plan being executed) is the warm-start material when the policy's
    warm_start_steps > 0; the same noise then diffuses it (see warm_start.py)."""
    warm = {} if previous is None else {"previous": previous, "plan_stamp_ns": plan_stamp_ns}
    if seed < 0:
        return policy.predict(obs, **warm)
    cfg = policy.config
    pn = plan_noise(seed, plan_stamp_ns, cfg.T_p, cfg.action_dim)
    policy.generator.manual_seed(pn.torch_seed)
    return policy.predict(obs, noise=pn.noise, **warm)
