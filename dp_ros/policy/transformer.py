"""Time-series diffusion transformer (the paper's transformer denoiser).

The noisy action sequence is the decoder input, with causal self-attention; the memory is
one token for the diffusion step followed by one token per observation step. Action step t
may attend to the step token and to observation tokens up to t. Names follow the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TransformerConfig
from .embeddings import SinusoidalStepEmbedding, broadcast_steps


class TransformerForDiffusion(nn.Module):
    def __init__(self, action_dim: int, horizon: int, n_obs_steps: int, cond_dim: int,
                 cfg: TransformerConfig):
        super().__init__()
        n_emb = cfg.n_emb
        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(cfg.p_drop_emb)
        self.time_emb = SinusoidalStepEmbedding(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, n_emb))
        if cfg.n_cond_layers > 0:
            layer = nn.TransformerEncoderLayer(n_emb, cfg.n_head, 4 * n_emb, cfg.p_drop_attn,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.n_cond_layers, enable_nested_tensor=False)
        else:
            self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        layer = nn.TransformerDecoderLayer(n_emb, cfg.n_head, 4 * n_emb, cfg.p_drop_attn,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layer)
        # additive float masks: 0 where attention is allowed, -inf where not
        t = torch.arange(horizon)
        s = torch.arange(1 + n_obs_steps)
        causal = t[None, :] <= t[:, None] if cfg.causal_attn else torch.ones(horizon, horizon, dtype=torch.bool)
        memory = t[:, None] >= (s[None, :] - 1) if cfg.causal_attn else torch.ones(horizon, len(s), dtype=torch.bool)
        self.register_buffer("mask", _additive(causal), persistent=False)
        self.register_buffer("memory_mask", _additive(memory), persistent=False)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                cond: torch.Tensor) -> torch.Tensor:
        """sample (B, T_p, A), cond (B, T_o, cond_dim) -> (B, T_p, A)."""
        steps = broadcast_steps(timestep, sample.shape[0], sample.device)
        tokens = torch.cat([self.time_emb(steps)[:, None, :], self.cond_obs_emb(cond)], dim=1)
        memory = self.encoder(self.drop(tokens + self.cond_pos_emb[:, :tokens.shape[1]]))
        x = self.drop(self.input_emb(sample) + self.pos_emb[:, :sample.shape[1]])
        x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
