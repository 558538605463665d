"""The paper's first claim, in CI: diffusion policy represents multimodal action
distributions; an MSE-trained policy averages the modes.

Bimodal 1-D task: the observation is always the same, and half of the demonstrations
command -1 for their whole horizon, half +1. A diffusion policy's samples must land in
both modes and almost never between them, each plan committed to one mode; a regressor
trained on the same data predicts the mean, 0, which no demonstration ever did.

Both run the real pipeline: episode store -> train() -> checkpoint -> load_policy -> sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dp_ros.data import EpisodeStore
from dp_ros.policy import load_policy
from dp_ros.policy.train import train

T_O, T_P, T_A = 2, 8, 4
N_SAMPLES = 200



@pytest.fixture(scope="module")
def bimodal_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bimodal") / "bimodal.zarr"
    store = EpisodeStore.create(path, {}, ["s"], ["a"], dt=0.1)
    n = 16
    for e in range(16):
        goal = -1.0 if e % 2 == 0 else 1.0
        store.add_episode({}, np.zeros((n, 1)), np.full((n, 1), goal), np.arange(n) * 0.1, label=str(goal))
    return path


def _train_and_sample(store_path, out_dir, head: str) -> torch.Tensor:
    """Train a policy with the given head; return N_SAMPLES plans (N, T_p) from fresh noise."""
    policy = {"T_o": T_O, "T_p": T_P, "T_a": T_A, "head": head,
              "unet": {"down_dims": [32], "step_embed_dim": 32},  # one level: cheap on a CPU
              "schedule": {"sampler": "ddim", "num_inference_steps": 10}}
    cfg = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "num_steps": 400 if head == "diffusion" else 200,
           "ema_max": 0.99, "checkpoint_every": 0, "log_every": 100, "device": "cpu", "seed": 0}
    checkpoint = train(store_path, {"policy": policy, "train": cfg}, out_dir, resume=False, progress=False)
    model = load_policy(checkpoint, device="cpu").model
    gen = torch.Generator().manual_seed(1)
    cond = model.observation_condition({}, torch.zeros(N_SAMPLES, T_O, 1))
    noise = torch.randn(N_SAMPLES, T_P, 1, generator=gen)
    return model.sample(cond, noise).squeeze(-1)


def test_diffusion_policy_keeps_both_modes_regression_averages_them(bimodal_store, tmp_path):
    plans = _train_and_sample(bimodal_store, tmp_path / "diffusion", "diffusion")
    executed = plans[:, T_O - 1:]  # the part of each plan that would be executed
    value = executed.mean(dim=1)
    high, low = (value > 0.5).float().mean().item(), (value < -0.5).float().mean().item()
    middle = (value.abs() < 0.5).float().mean().item()
    assert high >= 0.25 and low >= 0.25, f"a mode is missing: {high:.0%} near +1, {low:.0%} near -1"
    assert middle < 0.10, f"{middle:.0%} of plans between the modes"
    # each plan commits to one mode for its whole horizon (temporal consistency)
    committed = ((executed > 0).all(dim=1) | (executed < 0).all(dim=1)).float().mean().item()
    assert committed >= 0.9, f"only {committed:.0%} of plans stay on one side"

    mean_plans = _train_and_sample(bimodal_store, tmp_path / "regression", "regression")
    assert mean_plans.abs().max().item() < 0.2, (
        f"the MSE regressor should predict the mean 0, got values up to {mean_plans.abs().max():.2f}")
