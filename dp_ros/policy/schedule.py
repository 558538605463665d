"""Noise schedules (DDPM training) and the fused runtime samplers (DDIM, DDPM).

The maths follows diffusers' ``DDPMScheduler``/``DDIMScheduler`` (v0.42) operation by
operation, so checkpoints trained with the reference code or LeRobot sample identically.
diffusers itself is only a test dependency: at runtime a ``Sampler`` is a handful of
per-step coefficient tensors computed once, and the loop is plain tensor arithmetic
(no per-step scheduler objects, no Python-side index searches).

Conventions kept identical to diffusers on purpose, because imported checkpoints rely on them:
- betas and their cumulative product are float32, however the sample is typed later;
- DDIM's previous timestep is always ``t - T // K`` (even for "trailing"/"linspace"
  spacing), and with eta = 0 its epsilon is the model's (not re-derived from the
  clipped x0; diffusers' ``use_clipped_model_output`` defaults to False);
- DDPM's previous timestep is the next one in the visited list, and it adds variance
  noise whenever the current timestep is > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .config import ScheduleConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_MAX_BETA = 0.999  # cap of the cosine schedule (Nichol & Dhariwal 2021)


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """Float32 betas (num_train_timesteps,) for the configured beta schedule."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "squaredcos_cap_v2":
        # computed in Python doubles, then rounded once to float32, as diffusers does
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), _MAX_BETA) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported")


def inference_timesteps(cfg: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps a sampler visits, in order (descending), as diffusers' set_timesteps."""
    n, k = cfg.num_train_timesteps, num_inference_steps
    if not 1 <= k <= n:
        raise ValueError(f"num_inference_steps must be in [1, {n}], got {k}")
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, k).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, k) * (n // k)).round()[::-1].astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / k)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported")
    if ts.min() < 0 or ts.max() >= n:
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {n - 1}] "
                         f"(steps_offset {cfg.steps_offset} too large?)")
    return np.ascontiguousarray(ts)


class NoiseSchedule:
    """The forward (noising) process used in training, and the factory of samplers."""

    def __init__(self, cfg: ScheduleConfig):
        if cfg.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported")
        self.cfg = cfg
        self.betas = make_betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # float32, like diffusers

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, timesteps (B,)."""
        ac = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.to(x0.device)]
        shape = (-1,) + (1,) * (x0.dim() - 1)  # broadcast over every non-batch dim
        return (ac**0.5).reshape(shape) * x0 + ((1 - ac) ** 0.5).reshape(shape) * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output for this prediction type."""
        return noise if self.cfg.prediction_type == "epsilon" else x0

    def sample_timesteps(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """Uniform training timesteps (B,) in [0, num_train_timesteps)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)

    def sampler(self, num_inference_steps: Optional[int] = None, kind: Optional[str] = None) -> "Sampler":
        """A fused sampler; defaults from cfg.num_inference_steps and cfg.sampler."""
        k = self.cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        kind = self.cfg.sampler if kind is None else kind
        if kind == "ddim":
            return _ddim(self, k)
        if kind == "ddpm":
            return _ddpm(self, k)
        raise ValueError(f"sampler kind must be 'ddim' or 'ddpm', got {kind!r}")


@dataclass(frozen=True)
class Inpaint:
    """Entries of the sample held to known values while denoising (a warm start keeping
    the part of the running plan that executes while the new one is computed): after
    every step they are the known x0 diffused to that step's level with the noise that
    started the sample, and x0 itself at the end. `mask` is bool, broadcastable to the
    sample; `x0` and `noise` have its shape, normalised."""

    mask: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor

    def apply(self, sampler: "Sampler", level: int, x: torch.Tensor) -> torch.Tensor:
        known = self.x0 if level >= len(sampler) else sampler.add_noise_at(level, self.x0, self.noise)
        return torch.where(self.mask, known, x)


class Sampler:
    """Reverse process with every per-step coefficient precomputed as a (K,) tensor.

    One update (both kinds) is
        x0  = (x - sqrt_one_minus_abar * eps) / sqrt_abar      (epsilon prediction)
        eps = (x - sqrt_abar * x0) / sqrt_one_minus_abar        (sample prediction, DDIM only)
        x0  = clamp(x0)                                         (clip_sample)
        DDIM: x' = coef_x0 * x0 + coef_eps * eps
        DDPM: x' = coef_x0 * x0 + coef_x * x + sigma * z        (z only where noisy[k])
    """

    _COEFS = ("sqrt_abar", "sqrt_one_minus_abar", "coef_x0", "coef_x", "coef_eps", "sigma")

    def __init__(self, kind: str, timesteps: torch.Tensor, coefs: dict[str, torch.Tensor],
                 prediction_type: str, clip_sample: bool, clip_sample_range: float):
        self.kind = kind
        self.timesteps = timesteps
        for name in self._COEFS:
            setattr(self, name, coefs[name])
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = float(clip_sample_range)
        # Python bools, fixed at construction: which steps draw variance noise
        self.noisy: list[bool] = [kind == "ddpm" and int(t) > 0 for t in timesteps.tolist()]

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_steps(self) -> int:
        return len(self)

    def to(self, device=None, dtype: torch.dtype = torch.float32) -> "Sampler":
        """A copy whose coefficient tensors live on ``device`` in ``dtype``."""
        coefs = {n: getattr(self, n).to(device=device, dtype=dtype) for n in self._COEFS}
        return Sampler(self.kind, self.timesteps.to(device), coefs, self.prediction_type,
                       self.clip_sample, self.clip_sample_range)

    def add_noise_at(self, start_index: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x0 to the noise level of step ``start_index`` (warm start)."""
        return self.sqrt_abar[start_index] * x0 + self.sqrt_one_minus_abar[start_index] * noise

    def step(self, k: int, x: torch.Tensor, model_out: torch.Tensor,
             noise: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Update x at step index k given the model output there.

        For DDPM, a noisy step uses ``noise`` (shape of x) or draws it from ``generator``.
        """
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x - self.sqrt_one_minus_abar[k] * eps) / self.sqrt_abar[k]
        else:
            x0 = model_out
            eps = (x - self.sqrt_abar[k] * x0) / self.sqrt_one_minus_abar[k] if self.kind == "ddim" else None
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.kind == "ddim":
            return self.coef_x0[k] * x0 + self.coef_eps[k] * eps
        out = self.coef_x0[k] * x0 + self.coef_x[k] * x
        if self.noisy[k]:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            out = out + self.sigma[k] * noise
        return out

    def run(self, model_fn: ModelFn, x: torch.Tensor, *, start_index: int = 0,
            variance_noise: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None,
            inpaint: Optional[Inpaint] = None) -> torch.Tensor:
        """Denoise x (at the noise level of step ``start_index``) down to x_0.

        ``variance_noise`` (K, *x.shape) is indexed by absolute step index; without it a
        DDPM step draws from ``generator`` (one draw per noisy step, in visiting order,
        which reproduces diffusers' draws for the same generator state). ``inpaint`` holds
        the entries it masks to its known values after every step.
        """
        n = len(self)
        if not 0 <= start_index < n:
            raise ValueError(f"start_index must be in [0, {n - 1}], got {start_index}")
        if variance_noise is not None and tuple(variance_noise.shape) != (n, *x.shape):
            raise ValueError(f"variance_noise must have shape {(n, *x.shape)}, "
                             f"got {tuple(variance_noise.shape)}")
        for k in range(start_index, n):
            out = model_fn(x, self.timesteps[k])
            noise = variance_noise[k] if variance_noise is not None and self.noisy[k] else None
            x = self.step(k, x, out, noise=noise, generator=generator)
            if inpaint is not None:
                x = inpaint.apply(self, k + 1, x)
        return x


def _ddim(schedule: NoiseSchedule, k: int) -> Sampler:
    cfg = schedule.cfg
    ac = schedule.alphas_cumprod
    ts = torch.from_numpy(inference_timesteps(cfg, k))
    prev = ts - cfg.num_train_timesteps // k  # diffusers' rule for every spacing
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    abar = ac[ts]
    abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    # eta = 0: no variance term, direction coefficient sqrt(1 - abar_prev)
    coefs = {
        "sqrt_abar": abar**0.5,
        "sqrt_one_minus_abar": (1 - abar) ** 0.5,
        "coef_x0": abar_prev**0.5,
        "coef_eps": (1 - abar_prev) ** 0.5,
        "coef_x": torch.zeros_like(abar),
        "sigma": torch.zeros_like(abar),
    }
    return Sampler("ddim", ts, coefs, cfg.prediction_type, cfg.clip_sample, cfg.clip_sample_range)


def _ddpm(schedule: NoiseSchedule, k: int) -> Sampler:
    cfg = schedule.cfg
    ac = schedule.alphas_cumprod
    ts = torch.from_numpy(inference_timesteps(cfg, k))
    prev = torch.cat([ts[1:], torch.tensor([-1])])  # next visited timestep; -1 after the last
    abar = ac[ts]
    abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(1.0))
    beta_prod, beta_prod_prev = 1 - abar, 1 - abar_prev
    alpha_t = abar / abar_prev  # effective one-step alpha when skipping timesteps
    beta_t = 1 - alpha_t
    # posterior q(x_{t'} | x_t, x0) mean coefficients and "fixed_small" variance
    variance = torch.clamp(beta_prod_prev / beta_prod * beta_t, min=1e-20)
    coefs = {
        "sqrt_abar": abar**0.5,
        "sqrt_one_minus_abar": beta_prod**0.5,
        "coef_x0": abar_prev**0.5 * beta_t / beta_prod,
        "coef_x": alpha_t**0.5 * beta_prod_prev / beta_prod,
        "coef_eps": torch.zeros_like(abar),
        "sigma": variance**0.5,
    }
    return Sampler("ddpm", ts, coefs, cfg.prediction_type, cfg.clip_sample, cfg.clip_sample_range)
