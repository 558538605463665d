"""The policy core: model, noise schedules, normaliser, checkpoints, inference. No ROS here."""

from .checkpoint import CheckpointError, load_config, save_checkpoint
from .config import ConfigError, PolicyConfig
from .inference import Policy, load_policy

__all__ = ["CheckpointError", "ConfigError", "Policy", "PolicyConfig", "load_config",
           "load_policy", "save_checkpoint"]
