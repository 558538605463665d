"""Checkpoint directory: ``config.json`` (PolicyConfig) + ``model.safetensors`` (EMA weights).

No pickle anywhere: loading a checkpoint parses JSON and reads raw tensors, so it can never
run code from the file. Every failure is a CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from .config import ConfigError, PolicyConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "dp_ros.policy/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def save_checkpoint(directory: str | os.PathLike, cfg: PolicyConfig, model: torch.nn.Module) -> Path:
    """Write config + weights atomically enough that a reader never sees half a checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg.validate()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp_w = d / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    tmp_c = d / (CONFIG_FILE + ".tmp")
    payload = {"format": FORMAT, "dp_ros_version": __version__, "policy": cfg.to_dict()}
    tmp_c.write_text(json.dumps(payload, indent=2))
    os.replace(tmp_w, d / WEIGHTS_FILE)
    os.replace(tmp_c, d / CONFIG_FILE)
    return d


def load_config(directory: str | os.PathLike) -> PolicyConfig:
    """Read and validate only ``config.json`` (cheap: used to check swap compatibility)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dp_ros checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r}, expected {FORMAT!r})")
    try:
        return PolicyConfig.from_dict(payload.get("policy"))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_weights(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` into `model`, strictly: every tensor present with its shape."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json "
            f"(missing {len(missing)} tensors, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})")
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(got.shape)}, "
                                  f"config.json implies {tuple(ref.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: tensor {name} has NaN or Inf values")
    model.load_state_dict(tensors, strict=True)
