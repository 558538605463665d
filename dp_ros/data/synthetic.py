"""A generated demonstration set: a 2-D point mass reaching a goal around an obstacle.

The workspace is the unit square (x right, y up). Each episode starts near the bottom with
a goal near the top and a round obstacle in between; the scripted expert passes the obstacle
on the left or the right with equal probability. Both ways are equally good, so the data is
multimodal by construction: an MSE policy averages them and drives into the obstacle, a
diffusion policy commits to one side (the paper's first claim, on images).

Per tick: a rendered RGB frame (goal green, obstacle grey, point blue), state = point
position (x, y), action = the next commanded position. The point follows its command with
a first-order lag, as a position-controlled joint does.
"""

from __future__ import annotations

import os
from typing import Union

import cv2
import numpy as np

from .store import EpisodeStore

DT = 0.1
CAMERA = "image"
NAMES = ["x", "y"]
OBSTACLE_CENTER = np.array([0.5, 0.5])
OBSTACLE_RADIUS = 0.12
CLEARANCE = 0.1  # expert path keeps this much free space around the obstacle
TRACKING_GAIN = 0.6  # fraction of the command error the point closes per tick

_BACKGROUND = (235, 235, 235)
_OBSTACLE = (110, 110, 110)
_GOAL = (40, 170, 60)
_POINT = (30, 60, 220)
_SUBPIXEL_BITS = 4  # cv2 draws at 1/16 pixel precision


def render(position: np.ndarray, goal: np.ndarray, size: int = 96) -> np.ndarray:
    """uint8 (size, size, 3) RGB frame of the scene."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = _BACKGROUND

    def circle(center, radius, color):
        scale = size * (1 << _SUBPIXEL_BITS)
        px = (int(round(center[0] * scale)), int(round((1.0 - center[1]) * scale)))
        cv2.circle(img, px, int(round(radius * scale)), color, -1, cv2.LINE_AA, _SUBPIXEL_BITS)

    circle(OBSTACLE_CENTER, OBSTACLE_RADIUS, _OBSTACLE)
    circle(goal, 0.05, _GOAL)
    circle(position, 0.035, _POINT)
    return img


def expert_path(start: np.ndarray, goal: np.ndarray, side: str, n_points: int = 400) -> np.ndarray:
    """Dense smooth path start -> goal passing the obstacle on `side` ("left"/"right")."""
    sign = -1.0 if side == "left" else 1.0
    # quadratic Bezier whose midpoint (t = 0.5) sits beside the obstacle
    mid = OBSTACLE_CENTER + np.array([sign * (OBSTACLE_RADIUS + CLEARANCE), 0.0])
    ctrl = 2.0 * mid - 0.5 * (start + goal)
    t = np.linspace(0.0, 1.0, n_points)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t ** 2 * goal


def expert_episode(rng: np.random.Generator, image_size: int = 96) -> dict:
    """One demonstration: images, state, action, timestamp (from 0) and label."""
    start = np.array([rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.18)])
    goal = np.array([rng.uniform(0.35, 0.65), rng.uniform(0.82, 0.92)])
    side = "left" if rng.random() < 0.5 else "right"
    path = expert_path(start, goal, side)
    # resample at constant speed: the expert takes 34..49 ticks to travel, then holds
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    n_move = int(rng.integers(34, 50))
    s = np.linspace(0.0, arc[-1], n_move + 1)[1:]
    waypoints = np.stack([np.interp(s, arc, path[:, k]) for k in range(2)], axis=1)
    n_hold = int(rng.integers(6, 11))
    commands = np.concatenate([waypoints, np.repeat(goal[None], n_hold, axis=0)])
    commands += rng.normal(0.0, 0.002, commands.shape)  # a steady hand, not a perfect one
    n = len(commands)
    state = np.empty((n, 2))
    state[0] = start
    for i in range(n - 1):
        state[i + 1] = state[i] + TRACKING_GAIN * (commands[i] - state[i])
    images = np.stack([render(p, goal, image_size) for p in state])
    return {"images": {CAMERA: images}, "state": state.astype(np.float32),
            "action": commands.astype(np.float32), "timestamp": np.arange(n) * DT, "label": side}


def make_synthetic_store(path: Union[str, os.PathLike], episodes: int = 20, seed: int = 0,
                         image_size: int = 96, overwrite: bool = False) -> EpisodeStore:
    """Generate `episodes` expert demonstrations into a new episode store at `path`."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path, {CAMERA: (image_size, image_size)}, NAMES, NAMES, DT,
                                overwrite=overwrite)
    for e in range(episodes):
        ep = expert_episode(rng, image_size)
        # episodes recorded a minute apart, as consecutive takes would be
        store.add_episode(ep["images"], ep["state"], ep["action"], ep["timestamp"] + 60.0 * e,
                          label=ep["label"])
    return store
