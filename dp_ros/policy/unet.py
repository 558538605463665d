"""ConditionalUnet1D: the temporal U-Net denoiser of Diffusion Policy.

1-D convolutions over the action sequence, GroupNorm + Mish, and FiLM conditioning (a scale
and a bias per channel) from the diffusion step embedding concatenated with the observation
features. Module names follow the reference code so its checkpoints map without renaming.

At inference the FiLM of every step of a plan can be computed up front (``film``) and the
steps then run on it (``forward_film``); the plain ``forward`` (training) is unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import UnetConfig
from .embeddings import SinusoidalStepEmbedding, broadcast_steps


class Conv1dBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Unsqueeze(nn.Module):
    """(B, C) -> (B, C, 1); a module so that parameter indices match the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)


class ConditionalResidualBlock1D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int,
                 cond_predict_scale: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            Conv1dBlock(in_ch, out_ch, kernel_size, n_groups),
            Conv1dBlock(out_ch, out_ch, kernel_size, n_groups),
        ])
        self.out_channels = out_ch
        self.cond_predict_scale = cond_predict_scale
        film_ch = out_ch * 2 if cond_predict_scale else out_ch
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_ch), _Unsqueeze())
        self.residual_conv = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) modulated by film (B, film_ch, 1), the cond_encoder's output."""
        out = self.blocks[0](x)
        if self.cond_predict_scale:
            scale, bias = film[:, :self.out_channels], film[:, self.out_channels:]
            out = scale * out + bias
        else:
            out = out + film
        return self.blocks[1](out) + self.residual_conv(x)


class Downsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalUnet1D(nn.Module):
    """(B, T_p, action_dim) noisy actions + step + (B, global_cond_dim) -> (B, T_p, action_dim)."""

    def __init__(self, action_dim: int, global_cond_dim: int, cfg: UnetConfig):
        super().__init__()
        dsed = cfg.step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalStepEmbedding(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed))
        cond_dim = dsed + global_cond_dim
        dims = [action_dim] + list(cfg.down_dims)
        in_out = list(zip(dims[:-1], dims[1:]))

        def block(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, cond_dim, cfg.kernel_size, cfg.n_groups,
                                              cfg.cond_predict_scale)

        mid = cfg.down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.down_modules = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down_modules.append(nn.ModuleList([
                block(d_in, d_out), block(d_out, d_out), nn.Identity() if last else Downsample1d(d_out)]))
        self.up_modules = nn.ModuleList()
        for d_in, d_out in reversed(in_out[1:]):
            self.up_modules.append(nn.ModuleList([
                block(d_out * 2, d_in), block(d_in, d_in), Upsample1d(d_in)]))
        start = cfg.down_dims[0]
        self.final_conv = nn.Sequential(
            Conv1dBlock(start, start, cfg.kernel_size, cfg.final_n_groups or cfg.n_groups),
            nn.Conv1d(start, action_dim, 1))
        # width of each block's FiLM in film()'s last axis (split at every denoising step)
        self.film_sizes = tuple(b.cond_encoder[1].out_features for b in self.film_blocks())
        self.action_dim = action_dim
        # time steps each block's FiLM is repeated over in film()'s output; None: not repeated
        self.film_repeats: Optional[tuple[int, ...]] = None

    def film_blocks(self) -> list[ConditionalResidualBlock1D]:
        """The residual blocks in execution order: the layout of film()'s last axis."""
        down = [b for res1, res2, _ in self.down_modules for b in (res1, res2)]
        up = [b for res1, res2, _ in self.up_modules for b in (res1, res2)]
        return down + list(self.mid_modules) + up

    def film(self, global_cond: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """FiLM of every block for each of K steps: (B, G), (K,) -> (K, B, F_total).

        The same cond_encoder maths as forward, batched over the K steps of a plan: at
        batch 1 a step is bound by weight reads, and the cond_encoders (a fifth of the
        U-Net with 512-d image features) are then read once per plan, not once per step.
        """
        emb = self.diffusion_step_encoder(timesteps)  # (K, E)
        k, b = emb.shape[0], global_cond.shape[0]
        cond = torch.cat([emb[:, None].expand(k, b, -1), global_cond[None].expand(k, b, -1)], dim=-1)
        cond = F.mish(cond)  # every block's cond_encoder starts with the same Mish
        films = [blk.cond_encoder[1](cond) for blk in self.film_blocks()]
        if self.film_repeats is not None:
            films = [f.unsqueeze(-1).expand(*f.shape, n).flatten(-2) for f, n in zip(films, self.film_repeats)]
        return torch.cat(films, dim=-1)

    def repeat_film(self, horizon: int) -> None:
        """Make film() repeat each block's FiLM over the time steps that block sees at this
        horizon, and forward_film() take it so. The ONNX export's form: onnxruntime
        broadcasts a (C, 1) operand one row at a time, several times slower than a product
        of two tensors of one shape, and film() runs once per plan, a step ten times."""
        steps: list[int] = []
        hooks = [b.register_forward_pre_hook(lambda _m, args: steps.append(int(args[0].shape[-1])))
                 for b in self.film_blocks()]
        try:  # the blocks run in film_blocks() order
            with torch.no_grad():
                self._unet(torch.zeros(1, horizon, self.action_dim),
                           [torch.zeros(1, n, 1) for n in self.film_sizes])
        finally:
            for h in hooks:
                h.remove()
        self.film_repeats = tuple(steps)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                global_cond: torch.Tensor) -> torch.Tensor:
        steps = broadcast_steps(timestep, sample.shape[0], sample.device)
        cond = torch.cat([self.diffusion_step_encoder(steps), global_cond], dim=-1)
        return self._unet(sample, [blk.cond_encoder(cond) for blk in self.film_blocks()])

    def forward_film(self, sample: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """One step given its row of film(): (B, T_p, action_dim), (B, F_total)."""
        if self.film_repeats is None:
            return self._unet(sample, [f.unsqueeze(-1) for f in film.split(self.film_sizes, dim=-1)])
        widths = [c * n for c, n in zip(self.film_sizes, self.film_repeats)]
        return self._unet(sample, [f.reshape(f.shape[0], c, n) for f, c, n in
                                   zip(film.split(widths, dim=-1), self.film_sizes, self.film_repeats)])

    def _unet(self, sample: torch.Tensor, films: list[torch.Tensor]) -> torch.Tensor:
        x = sample.transpose(1, 2)  # (B, C, T)
        films = iter(films)  # film_blocks() order
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, next(films)), next(films))
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res(x, next(films))
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, next(films)), next(films)))
        return self.final_conv(x).transpose(1, 2)
