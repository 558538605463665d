"""Where dp_ros finds its parameter files and keeps cached artefacts."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The `config/` folder: beside the package in a checkout, else the ament share dir."""
    here = Path(__file__).resolve().parent.parent / "config"
    if here.is_dir():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory("dp_ros")) / "config"
    except Exception:  # no ament index: nothing else to try
        return here


def config_file(name_or_path: str) -> Path:
    """A path as given if it exists, else a file of that name in config_dir()."""
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = config_dir() / name_or_path
    return candidate if candidate.exists() else p


def cache_dir() -> Path:
    """Per-user cache for demo datasets and policies ($DP_ROS_CACHE, else XDG cache)."""
    root = os.environ.get("DP_ROS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dp_ros")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
