"""The accuracy gate for reduced precision: compare with fp32 on a fixed set of windows.

A reduced-precision policy is accepted when, over ``GATE_WINDOWS`` fixed random windows
with fixed initial noise, its largest action difference from the fp32 torch policy is at
most ``GATE_LIMIT`` (1 %) of the action range (max - min of the training statistics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..config import PolicyConfig
from ..normalizer import action_range

GATE_LIMIT = 0.01
GATE_WINDOWS = 8
GATE_SEED = 1234


def fixed_windows(cfg: PolicyConfig, count: int = GATE_WINDOWS, seed: int = GATE_SEED):
    """[(obs, noise)]: random frames, states inside the state statistics, and x_K."""
    rng = np.random.default_rng(seed)
    st = cfg.normalizer.get("state")
    lo = np.asarray(st.min if st is not None and st.min is not None else [-1.0] * cfg.state_dim)
    hi = np.asarray(st.max if st is not None and st.max is not None else [1.0] * cfg.state_dim)
    out = []
    for _ in range(count):
        obs = {"images": {c.name: rng.integers(0, 256, (cfg.T_o, c.height, c.width, 3), dtype=np.uint8)
                          for c in cfg.cameras},
               "state": rng.uniform(lo, hi, (cfg.T_o, cfg.state_dim)).astype(np.float32)}
        out.append((obs, rng.standard_normal((cfg.T_p, cfg.action_dim)).astype(np.float32)))
    return out


@dataclass
class GateResult:
    precision: str
    max_abs: float  # largest action difference, action units
    max_rel: float  # ... as a fraction of that dimension's range
    limit: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{self.precision:>5}: max |action - fp32| = {self.max_abs:.3g} "
                f"({self.max_rel:.3%} of the action range, limit {self.limit:.0%}) {verdict}")


def action_differences(reference, candidate, windows, seed: int = GATE_SEED):
    """|candidate - reference| actions (float64) of two Policy objects, window by window,
    each pair planned from the same initial noise and DDPM per-step noise."""
    for i, (obs, noise) in enumerate(windows):
        reference.generator.manual_seed(seed + i)
        ref = reference.predict(obs, noise=noise)
        candidate.generator.manual_seed(seed + i)
        got = candidate.predict(obs, noise=noise)
        yield np.abs(got.astype(np.float64) - ref.astype(np.float64))


def accuracy_gate(reference, candidate, precision: str, windows=None,
                  limit: float = GATE_LIMIT) -> GateResult:
    """Compare two Policy objects (fp32 reference, reduced candidate) on fixed windows."""
    cfg = reference.config
    windows = windows if windows is not None else fixed_windows(cfg)
    rng = action_range(cfg)
    max_abs, max_rel = 0.0, 0.0
    for diff in action_differences(reference, candidate, windows):
        if not np.all(np.isfinite(diff)):
            return GateResult(precision, float("inf"), float("inf"), limit, False)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / rng).max()))
    return GateResult(precision, max_abs, max_rel, limit, max_rel <= limit)
