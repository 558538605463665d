"""Tiny policies for tests: a small config (32x32 camera, 2 joints, T_o 2, T_p 8, T_a 4) and
checkpoints written from it. Builds in well under a second, plans in milliseconds on CPU."""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Optional

import numpy as np
import torch

from dp_ros.policy import PolicyConfig, save_checkpoint
from dp_ros.policy.config import CameraConfig, EncoderConfig, UnetConfig
from dp_ros.policy.model import build_model
from dp_ros.policy.normalizer import fit_stats


def small_config(cameras: Optional[list[CameraConfig]] = None, **overrides) -> PolicyConfig:
    """A valid tiny config; keyword arguments override PolicyConfig fields."""
    overrides.setdefault("T_p", 8)
    overrides.setdefault("T_a", 4)
    cfg = PolicyConfig(
        cameras=cameras if cameras is not None else [CameraConfig(name="image", height=32, width=32)],
        encoder=EncoderConfig(crop_shape=[28, 28], num_keypoints=8, feature_dim=16),
        unet=UnetConfig(down_dims=[16, 32], step_embed_dim=16),
        **overrides,
    )
    rng = np.random.default_rng(0)
    cfg.normalizer = {"state": fit_stats(rng.uniform(-1, 2, (50, cfg.state_dim))),
                      "action": fit_stats(rng.uniform(-3, 1, (50, cfg.action_dim)))}
    cfg.validate()
    return cfg


def make_checkpoint(directory: pathlib.Path, cfg: Optional[PolicyConfig] = None,
                    torch_seed: int = 0, **overrides) -> pathlib.Path:
    """Write a checkpoint with deterministic random weights; returns its directory."""
    cfg = cfg if cfg is not None else small_config(**overrides)
    torch.manual_seed(torch_seed)
    save_checkpoint(directory, cfg, build_model(cfg))
    return pathlib.Path(directory)


def random_obs(cfg: PolicyConfig, seed: int = 0) -> dict:
    """A window of random frames and states in the shapes `cfg` expects."""
    rng = np.random.default_rng(seed)
    return {
        "images": {c.name: rng.integers(0, 256, (cfg.T_o, c.height, c.width, 3), dtype=np.uint8)
                   for c in cfg.cameras},
        "state": rng.uniform(-1, 1, (cfg.T_o, cfg.state_dim)).astype(np.float32),
    }


def random_noise(cfg: PolicyConfig, seed: int = 0) -> np.ndarray:
    """An initial sample x_K (T_p, action_dim) for `cfg`."""
    return np.random.default_rng(seed).standard_normal((cfg.T_p, cfg.action_dim)).astype(np.float32)


def write_config_only(directory: pathlib.Path, cfg: PolicyConfig) -> pathlib.Path:
    """A checkpoint directory whose config.json is real and whose weights file is a
    placeholder: enough for anything that reads only the config (swap validation), and
    much cheaper than building the model."""
    import json

    from dp_ros import __version__
    from dp_ros.policy.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg.validate()
    payload = {"format": FORMAT, "dp_ros_version": __version__, "policy": cfg.to_dict()}
    (d / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    (d / WEIGHTS_FILE).write_bytes(b"placeholder: not loadable")
    return d


class StubPolicy:
    """Stands in for a Policy in PlanRunner tests: each plan takes `seconds` and records the
    scheduling policy of the thread that planned (`seen`)."""

    def __init__(self, seconds: float = 0.0):
        self.config = small_config()
        self.policy_id = "stub"
        self.seconds = seconds
        self.seen = []

    def predict(self, window, noise=None, generator=None):
        self.seen.append(os.sched_getscheduler(0))
        threading.Event().wait(self.seconds)
        return np.zeros((self.config.T_p, self.config.action_dim), np.float32)
