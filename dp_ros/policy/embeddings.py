"""Sinusoidal embedding of the diffusion step, shared by both denoisers."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalStepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        """steps: (B,) -> (B, dim) as [sin, cos]."""
        arg = steps.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


def broadcast_steps(timestep: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) diffusion step as a (B,) tensor on `device`."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=device)
    elif timestep.dim() == 0:
        timestep = timestep[None].to(device)
    return timestep.expand(batch)
