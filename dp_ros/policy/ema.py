"""Exponential moving average of model weights, with the reference's warm-up decay.

decay(step) = 1 - (1 + step / inv_gamma) ** -power, clamped to [min_decay, max_decay] and 0
until update_after_step. With power 0.75 the average forgets quickly early in training (when
weights move fast) and approaches max_decay later. The EMA weights are the ones deployed:
they sample visibly smoother, more reliable plans than the raw weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EmaConfig:
    power: float = 0.75
    max_decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    inv_gamma: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_decay <= self.max_decay <= 1.0):
            raise ValueError(f"need 0 <= ema min ({self.min_decay}) <= ema max ({self.max_decay}) <= 1")
        if self.power <= 0 or self.inv_gamma <= 0:
            raise ValueError(f"ema power ({self.power}) and inv_gamma ({self.inv_gamma}) must be > 0")
        if self.update_after_step < 0:
            raise ValueError(f"ema update_after must be >= 0, got {self.update_after_step}")

    def decay(self, optimization_step: int) -> float:
        """Decay used for the update after `optimization_step` previous updates."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0  # the average starts as a copy of the weights
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return max(self.min_decay, min(value, self.max_decay))


class EMA:
    """Holds `averaged`, a frozen copy of the model updated by ``update(model)``."""

    def __init__(self, model: nn.Module, config: EmaConfig | None = None):
        self.config = config or EmaConfig()
        self.averaged = copy.deepcopy(model).eval()
        self.averaged.requires_grad_(False)
        self.optimization_step = 0
        self.last_decay = 0.0

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(averaged, copied) parameter pairs of `model` and the average, in lockstep."""
        avg_src, avg_dst, copy_src, copy_dst = [], [], [], []
        for module, ema_module in zip(model.modules(), self.averaged.modules()):
            # BatchNorm affine weights follow batch statistics that the average would not
            # match; like the reference, copy them (and frozen parameters) instead
            copy_only = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for p, ema_p in zip(module.parameters(recurse=False), ema_module.parameters(recurse=False)):
                if copy_only or not p.requires_grad:
                    copy_src.append(p)
                    copy_dst.append(ema_p)
                else:
                    avg_src.append(p)
                    avg_dst.append(ema_p)
        # buffers (e.g. BatchNorm running statistics) are state, not weights: copied
        copy_src += list(model.buffers())
        copy_dst += list(self.averaged.buffers())
        return avg_src, avg_dst, copy_src, copy_dst

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.config.decay(self.optimization_step)
        # the pairing is cached per model: walking modules every step costs more than the maths
        if getattr(self, "_cached_for", None) is not model:
            self._cache = self._pairs(model)
            self._cached_for = model
        avg_src, avg_dst, copy_src, copy_dst = self._cache
        if avg_dst:
            torch._foreach_lerp_(avg_dst, [p.detach() for p in avg_src], 1.0 - decay)
        for src, dst in zip(copy_src, copy_dst):
            dst.copy_(src.detach())
        self.optimization_step += 1
        self.last_decay = decay
