"""The policy network: observation encoder + denoiser (or regression head) + normaliser.

Inputs and outputs are in the data's units; normalisation happens inside, so a checkpoint
carries everything needed to go from raw observations to raw actions.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import PolicyConfig
from .encoder import ObsEncoder
from .normalizer import Normalizer
from .schedule import NoiseSchedule, Sampler
from .transformer import TransformerForDiffusion
from .unet import ConditionalUnet1D


class RegressionHead(nn.Module):
    """MSE baseline: conditioning -> the whole T_p x A action sequence in one shot."""

    def __init__(self, cond_dim: int, horizon: int, action_dim: int, hidden: int = 512):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden),
                                 nn.Mish(), nn.Linear(hidden, horizon * action_dim))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond.flatten(1)).view(-1, self.horizon, self.action_dim)


class DiffusionPolicyModel(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.obs_encoder = ObsEncoder(cfg) if cfg.cameras else None
        self.normalizer = Normalizer(cfg.normalizer)
        self.noise_schedule = NoiseSchedule(cfg.schedule)
        step_dim = cfg.obs_feature_dim
        if cfg.head == "regression":
            self.denoiser = None
            self.regressor = RegressionHead(cfg.T_o * step_dim, cfg.T_p, cfg.action_dim)
        elif cfg.denoiser == "unet":
            self.denoiser = ConditionalUnet1D(cfg.action_dim, cfg.T_o * step_dim, cfg.unet)
        else:
            self.denoiser = TransformerForDiffusion(cfg.action_dim, cfg.T_p, cfg.T_o, step_dim,
                                                    cfg.transformer)

    # -- observation -> conditioning ---------------------------------------------------
    def encode_frames(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """camera -> uint8 (N, H, W, 3) -> per-frame image features (N, cameras * feature_dim)."""
        return self.obs_encoder(images)

    def condition(self, frame_features: Optional[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
        """Per-step conditioning (B, T_o, obs_feature_dim) from image features (B, T_o, F)
        and raw state (B, T_o, D)."""
        parts = [] if frame_features is None else [frame_features]
        if self.cfg.state_dim:
            nstate = self.normalizer.normalize("state", state)
            parts = [nstate] + parts if self.cfg.encoder.state_first else parts + [nstate]
        return torch.cat(parts, dim=-1)

    def observation_condition(self, images: dict[str, torch.Tensor], state: torch.Tensor) -> torch.Tensor:
        """Raw batch (images camera -> uint8 (B, T_o, H, W, 3), state (B, T_o, D)) -> conditioning."""
        feats = None
        if self.obs_encoder is not None:
            b, t = state.shape[:2]
            flat = {n: images[n].flatten(0, 1) for n in self.cfg.camera_names}
            feats = self.encode_frames(flat).view(b, t, -1)
        return self.condition(feats, state)

    # -- denoising -----------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One network evaluation: noisy normalised actions + step + conditioning."""
        if isinstance(self.denoiser, ConditionalUnet1D):
            return self.denoiser(x, t, cond.flatten(1))
        return self.denoiser(x, t, cond)

    def model_fn(self, cond: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x, t: self.denoise(x, t, cond)

    def plan_fn(self, cond: torch.Tensor,
                timesteps: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn for one plan that visits `timesteps` in order, as Sampler.run calls it.
        The U-Net gets every step's FiLM up front in one pass (ConditionalUnet1D.film:
        its weights read once per plan); the transformer has no FiLM and runs per step."""
        if not isinstance(self.denoiser, ConditionalUnet1D):
            return self.model_fn(cond)
        rows = iter(self.denoiser.film(cond.flatten(1), timesteps))
        return lambda x, _t: self.denoiser.forward_film(x, next(rows))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor, sampler: Optional[Sampler] = None,
               variance_noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Conditioning (B, T_o, F) + initial sample x_K (B, T_p, A) -> actions in raw units."""
        if self.cfg.head == "regression":
            naction = self.regressor(cond)
        else:
            sampler = sampler or self.noise_schedule.sampler().to(noise.device, noise.dtype)
            naction = sampler.run(self.model_fn(cond), noise, variance_noise=variance_noise,
                                  generator=generator)
        return self.normalizer.unnormalize("action", naction)

    # -- training ------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """batch: images camera -> uint8 (B, T_o, H, W, 3), state (B, T_o, D), action (B, T_p, A)."""
        state = batch["state"][:, :self.cfg.T_o]
        images = {n: batch["images"][n][:, :self.cfg.T_o] for n in self.cfg.camera_names}
        cond = self.observation_condition(images, state)
        naction = self.normalizer.normalize("action", batch["action"])
        if self.cfg.head == "regression":
            return F.mse_loss(self.regressor(cond), naction)
        noise = torch.randn_like(naction)
        steps = self.noise_schedule.sample_timesteps(naction.shape[0], device=naction.device)
        noisy = self.noise_schedule.add_noise(naction, noise, steps)
        pred = self.denoise(noisy, steps, cond)
        return F.mse_loss(pred, self.noise_schedule.training_target(naction, noise))


def build_model(cfg: PolicyConfig) -> DiffusionPolicyModel:
    return DiffusionPolicyModel(cfg)
