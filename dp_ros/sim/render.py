"""The overhead camera: an RGB image of the scene drawn with OpenCV.

The camera looks straight down at the base; image up = world +y (towards the goal),
image right = world +x, so "left" in the task is the left of the image. It shows the
whole workspace. Flat, saturated colours on a light background so that a small CNN at
96x96 separates arm, obstacle and goal easily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from dp_ros.sim.arm import ArmGeometry
from dp_ros.sim.task import Episode

RGB = tuple[int, int, int]
_SHIFT = 4                      # OpenCV fixed-point bits: sub-pixel positions
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class Palette:
    background: RGB = (240, 240, 235)
    goal: RGB = (40, 190, 70)
    obstacle: RGB = (215, 35, 35)
    link: RGB = (30, 80, 210)
    joint: RGB = (25, 25, 25)
    base: RGB = (110, 110, 110)
    end_effector: RGB = (255, 165, 0)


@dataclass(frozen=True)
class View:
    """Pixel size and the world square shown: [-extent, extent] in x and y (m), fitted
    into the image with square pixels."""

    width: int = 96
    height: int = 96
    extent: float = 1.1

    def __post_init__(self):
        if self.width < 8 or self.height < 8:
            raise ValueError(f"image must be at least 8x8, got {self.width}x{self.height}")
        if not self.extent > 0:
            raise ValueError("extent must be > 0")

    @property
    def scale(self) -> float:
        """Pixels per metre."""
        return min(self.width, self.height) / (2.0 * self.extent)

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """World (..., 2) -> pixel (u, v) floats (..., 2); v grows downwards."""
        p = np.asarray(points, dtype=float)
        u = self.width / 2.0 + p[..., 0] * self.scale
        v = self.height / 2.0 - p[..., 1] * self.scale
        return np.stack([u, v], axis=-1)

    def pixels(self, meters: float, minimum: int = 1) -> int:
        return max(minimum, int(round(meters * self.scale)))


def view_for(geometry: ArmGeometry, width: int = 96, height: int = 96) -> View:
    """A view showing the whole workspace of ``geometry`` with a 10% margin."""
    return View(width=width, height=height, extent=1.1 * geometry.reach)


def _fixed(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _disc(img: np.ndarray, view: View, center: Sequence[float], radius_m: float,
          colour: RGB, min_px: int = 1) -> None:
    c = view.to_pixels(np.asarray(center, dtype=float))
    r = max(float(min_px), radius_m * view.scale)
    cv2.circle(img, _fixed(c), int(round(r * _ONE)), colour, -1, cv2.LINE_AA, _SHIFT)


def draw_path(img: np.ndarray, view: View, points: np.ndarray, colour: RGB,
              thickness: int = 1) -> np.ndarray:
    """Draw a world polyline (M, 2) onto ``img`` (in place, also returned)."""
    px = np.round(view.to_pixels(points) * _ONE).astype(np.int32)
    if len(px) >= 2:
        cv2.polylines(img, [px.reshape(-1, 1, 2)], False, colour, thickness, cv2.LINE_AA,
                      _SHIFT)
    return img


def draw_arm(img: np.ndarray, view: View, geometry: ArmGeometry, q: np.ndarray,
             palette: Palette = Palette()) -> np.ndarray:
    pts = view.to_pixels(geometry.link_points(q))
    thickness = view.pixels(geometry.link_width)
    half = view.pixels(geometry.link_width * 0.9)
    b = pts[0]
    cv2.rectangle(img, _fixed(b - half), _fixed(b + half), palette.base, -1, cv2.LINE_AA,
                  _SHIFT)
    for a, c in zip(pts[:-1], pts[1:]):
        cv2.line(img, _fixed(a), _fixed(c), palette.link, thickness, cv2.LINE_AA, _SHIFT)
    joint_r = max(1.0, 0.6 * geometry.link_width * view.scale)
    for p in pts[1:-1]:
        cv2.circle(img, _fixed(p), int(round(joint_r * _ONE)), palette.joint, -1,
                   cv2.LINE_AA, _SHIFT)
    ee_r = max(1.5, 0.9 * geometry.link_width * view.scale)
    cv2.circle(img, _fixed(pts[-1]), int(round(ee_r * _ONE)), palette.end_effector, -1,
               cv2.LINE_AA, _SHIFT)
    return img


def render_scene(geometry: ArmGeometry, q: np.ndarray, episode: Optional[Episode],
                 view: Optional[View] = None, palette: Palette = Palette()) -> np.ndarray:
    """The camera image: (height, width, 3) uint8, RGB. ``episode`` None draws the arm
    alone."""
    view = view or view_for(geometry)
    img = np.empty((view.height, view.width, 3), dtype=np.uint8)
    img[:] = palette.background
    if episode is not None:
        _disc(img, view, episode.goal, episode.goal_radius, palette.goal, min_px=2)
        _disc(img, view, episode.obstacle, episode.obstacle_radius, palette.obstacle, min_px=2)
    return draw_arm(img, view, geometry, np.asarray(q, dtype=float), palette)
