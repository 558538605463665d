"""Demonstration data: the episode store, training windows, generated datasets. No ROS here."""

from .store import EpisodeStore, StoreError
from .synthetic import make_synthetic_store
from .windows import WindowDataset, WindowSampler

__all__ = ["EpisodeStore", "StoreError", "WindowDataset", "WindowSampler", "make_synthetic_store"]
