"""Per-dimension affine normalisation of actions and low-dim state.

The statistics (``config.NormStats``) are the source of truth and travel in the
checkpoint's config.json; the module only turns them into ``y = scale * x + offset``
buffers so the maths follows ``.to(device)`` and can be folded into an ONNX export.

Constant dimensions (range or std below ``RANGE_EPS``) get scale 1, as in the reference
implementation (real-stanford/diffusion_policy ``range_eps``): a min_max constant maps to
the middle of [-1, 1], i.e. 0, and round-trips exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import NormStats, PolicyConfig

RANGE_EPS = 1e-4  # below this a dimension is treated as constant (no division by ~0)
_OUT_MIN, _OUT_MAX = -1.0, 1.0


def fit_stats(x: np.ndarray, mode: str = "min_max") -> NormStats:
    """Statistics of samples x (N, D); every field is filled, ``mode`` picks the mapping.

    std is the population standard deviation (ddof = 0).
    """
    if mode not in ("min_max", "mean_std"):
        raise ValueError(f"normalisation mode must be 'min_max' or 'mean_std', got {mode!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_stats needs samples of shape (N, D) with N > 0, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit_stats: the data contains NaN or inf")
    return NormStats(mode=mode,
                     min=x.min(axis=0).tolist(), max=x.max(axis=0).tolist(),
                     mean=x.mean(axis=0).tolist(), std=x.std(axis=0).tolist())


def scale_offset(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float64 arrays with normalize(x) = scale * x + offset."""
    if stats.mode == "min_max":
        lo, hi = _field(stats, "min"), _field(stats, "max")
        rng = hi - lo
        const = rng < RANGE_EPS
        scale = (_OUT_MAX - _OUT_MIN) / np.where(const, _OUT_MAX - _OUT_MIN, rng)
        offset = np.where(const, (_OUT_MAX + _OUT_MIN) / 2 - lo, _OUT_MIN - scale * lo)
    elif stats.mode == "mean_std":
        mean, std = _field(stats, "mean"), _field(stats, "std")
        scale = 1.0 / np.where(std < RANGE_EPS, 1.0, std)
        offset = -mean * scale
    else:
        raise ValueError(f"normalisation mode {stats.mode!r} is not supported")
    return scale, offset


def _field(stats: NormStats, name: str) -> np.ndarray:
    v = getattr(stats, name)
    if v is None:
        raise ValueError(f"{stats.mode} normalisation needs '{name}' statistics")
    return np.asarray(v, dtype=np.float64)


class Normalizer(nn.Module):
    """normalize/unnormalize per key ("state", "action", ...); unknown keys are identity."""

    def __init__(self, stats: dict[str, NormStats]):
        super().__init__()
        self.stats = dict(stats)
        self._keys: set[str] = set()
        for key, st in self.stats.items():
            if not key.isidentifier():
                raise ValueError(f"normaliser key {key!r} must be a plain identifier")
            scale, offset = scale_offset(st)
            # float64 so float64 callers lose nothing; cast to the input's dtype on use.
            # Non-persistent: the statistics in config.json are what a checkpoint stores.
            self.register_buffer(f"{key}_scale", torch.from_numpy(scale), persistent=False)
            self.register_buffer(f"{key}_offset", torch.from_numpy(offset), persistent=False)
            self._keys.add(key)

    def has(self, key: str) -> bool:
        return key in self._keys

    def _affine(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = getattr(self, f"{key}_scale").to(device=x.device, dtype=x.dtype)
        offset = getattr(self, f"{key}_offset").to(device=x.device, dtype=x.dtype)
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(f"normaliser '{key}' has {scale.shape[0]} dimensions, "
                             f"input has {x.shape[-1]} (shape {tuple(x.shape)})")
        return scale, offset

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) in data units -> normalised units."""
        if key not in self._keys:
            return x
        scale, offset = self._affine(key, x)
        return x * scale + offset

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        """y (..., D) in normalised units -> data units."""
        if key not in self._keys:
            return y
        scale, offset = self._affine(key, y)
        return (y - offset) / scale


def action_range(cfg: PolicyConfig) -> np.ndarray:
    """Per-dimension range of the actions (max - min of the statistics; 4 std without them)."""
    st = cfg.normalizer.get("action")
    if st is None:
        return np.full(cfg.action_dim, 2.0)
    if st.min is not None and st.max is not None:
        rng = np.asarray(st.max, np.float64) - np.asarray(st.min, np.float64)
    else:
        rng = 4.0 * np.asarray(st.std, np.float64)
    return np.maximum(rng, 1e-6)
