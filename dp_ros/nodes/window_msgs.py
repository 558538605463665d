"""The observation-window convention between the aggregator and the policy node.

Per window (T_o ticks, oldest tick t0, grid period dt):

- ``<prefix>/window/<camera>``: sensor_msgs/Image, encoding rgb8, the T_o preprocessed
  frames stacked top to bottom, oldest first: height = T_o * H, width = W,
  step = 3 * W; header.stamp = t0; header.frame_id = the camera name.
- ``<prefix>/window/state``: trajectory_msgs/JointTrajectory, header.stamp = t0,
  joint_names = the state joint names, one point per tick, oldest first, point i has
  positions = state at tick t0 + i * dt and time_from_start = i * dt.

All messages of one window carry exactly the same stamp (t0 on the integer-nanosecond tick
grid); the receiver joins them by that stamp (WindowJoiner). Both sides use WINDOW_QOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from dp_ros.control.observation import validate_camera_name  # noqa: F401  (re-exported)
from dp_ros.nodes.image_conv import ImageFormatError, image_to_numpy, numpy_to_image

STATE_PART = "state"
# reliable and shallow: a window is small, and only the newest ones matter
WINDOW_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=4,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


class WindowFormatError(ValueError):
    """Window messages that do not follow the convention."""


# ----------------------------------------------------------------------------- names

def _prefix(prefix: str) -> str:
    return prefix.rstrip("/") if prefix not in ("", "/") else ""


def window_image_topic(prefix: str, camera: str) -> str:
    """``prefix`` is the aggregator's namespace as seen by the caller: "~" inside the
    aggregator, e.g. "/obs_aggregator" in the policy node."""
    return f"{_prefix(prefix)}/window/{camera}"


def window_state_topic(prefix: str) -> str:
    return f"{_prefix(prefix)}/window/{STATE_PART}"


# ----------------------------------------------------------------------------- time

def stamp_to_ns(stamp: Time) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def ns_to_stamp(ns: int) -> Time:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def stamp_to_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _duration_ns(d: Duration) -> int:
    return d.sec * 1_000_000_000 + d.nanosec


def _grid_ns(t: float, dt_ns: int, dt: float) -> int:
    k = round(t / dt)
    if abs(t / dt - k) > 1e-3:
        raise WindowFormatError(f"window stamp {t!r} is not on the dt={dt} grid")
    return k * dt_ns


# ----------------------------------------------------------------------------- encode

def encode_window(window: Mapping, camera_names: Sequence[str], state_names: Sequence[str],
                  dt: float) -> tuple[dict[str, Image], JointTrajectory]:
    """A window dict -> (camera -> filmstrip Image, state JointTrajectory)."""
    stamps = np.asarray(window["stamps"], dtype=np.float64)
    state = np.asarray(window["state"])
    T_o = stamps.shape[0]
    if T_o < 1 or state.shape != (T_o, len(state_names)):
        raise WindowFormatError(f"state of shape {state.shape} for {T_o} ticks and "
                                f"{len(state_names)} joints")
    dt_ns = int(round(dt * 1e9))
    t0_ns = _grid_ns(float(stamps[0]), dt_ns, dt)
    for i, t in enumerate(stamps):
        if _grid_ns(float(t), dt_ns, dt) != t0_ns + i * dt_ns:
            raise WindowFormatError(f"window stamps {stamps.tolist()} are not consecutive ticks")
    stamp = ns_to_stamp(t0_ns)

    images = {}
    for cam in camera_names:
        frames = np.asarray(window["images"][cam])
        if frames.ndim != 4 or frames.shape[0] != T_o or frames.shape[3] != 3:
            raise WindowFormatError(f"camera {cam!r}: frames of shape {frames.shape}, "
                                    f"expected ({T_o}, H, W, 3)")
        strip = frames.reshape(T_o * frames.shape[1], frames.shape[2], 3)
        images[cam] = numpy_to_image(strip, "rgb8", stamp=stamp, frame_id=cam)

    traj = JointTrajectory()
    traj.header.stamp = stamp
    traj.joint_names = list(state_names)
    for i in range(T_o):
        sec, nanosec = divmod(i * dt_ns, 1_000_000_000)
        traj.points.append(JointTrajectoryPoint(
            positions=state[i].astype(np.float64),
            time_from_start=Duration(sec=sec, nanosec=nanosec)))
    return images, traj


# ----------------------------------------------------------------------------- decode

def decode_window(images: Mapping[str, Image], state_traj: JointTrajectory, T_o: int,
                  camera_names: Optional[Sequence[str]] = None,
                  state_names: Optional[Sequence[str]] = None,
                  image_size: Optional[tuple[int, int]] = None,
                  dt: Optional[float] = None) -> dict:
    """Window messages -> window dict (the inverse of encode_window), validated.

    Optional expectations (camera names, state joint names in order, (H, W) per frame,
    dt) are checked when given; any mismatch raises WindowFormatError."""
    stamp_ns = stamp_to_ns(state_traj.header.stamp)
    cams = list(camera_names) if camera_names is not None else list(images)
    missing = [c for c in cams if c not in images]
    if missing:
        raise WindowFormatError(f"no window image for camera(s) {missing}")

    # state
    if state_names is not None and list(state_traj.joint_names) != list(state_names):
        raise WindowFormatError(f"state joint names {list(state_traj.joint_names)} != "
                                f"expected {list(state_names)}")
    D = len(state_traj.joint_names)
    if len(state_traj.points) != T_o:
        raise WindowFormatError(f"state has {len(state_traj.points)} points, expected T_o={T_o}")
    state = np.empty((T_o, D), dtype=np.float32)
    offsets = []
    for i, point in enumerate(state_traj.points):
        positions = np.frombuffer(point.positions, dtype=np.float64)
        if positions.shape[0] != D:
            raise WindowFormatError(f"state point {i} has {positions.shape[0]} positions "
                                    f"for {D} joints")
        if not np.all(np.isfinite(positions)):
            raise WindowFormatError(f"state point {i} has non-finite positions")
        state[i] = positions
        offsets.append(_duration_ns(point.time_from_start))
    if dt is not None:
        dt_ns = int(round(dt * 1e9))
        expected = [i * dt_ns for i in range(T_o)]
        if any(abs(a - b) > 1000 for a, b in zip(offsets, expected)):
            raise WindowFormatError(f"state time_from_start {offsets} ns != i * dt ({dt} s)")
    else:
        dt_ns = offsets[1] - offsets[0] if T_o > 1 else 0
        if T_o > 1 and (dt_ns <= 0 or any(o != i * dt_ns for i, o in enumerate(offsets))):
            raise WindowFormatError(f"state time_from_start {offsets} ns not i * dt")
        expected = offsets
    stamps = np.array([(stamp_ns + o) * 1e-9 for o in expected], dtype=np.float64)

    # images
    frames = {}
    for cam in cams:
        msg = images[cam]
        if stamp_to_ns(msg.header.stamp) != stamp_ns:
            raise WindowFormatError(f"camera {cam!r} stamp {stamp_to_ns(msg.header.stamp)} ns "
                                    f"!= state stamp {stamp_ns} ns")
        if msg.encoding != "rgb8":
            raise WindowFormatError(f"camera {cam!r}: window encoding {msg.encoding!r}, "
                                    "expected rgb8")
        try:
            strip, _ = image_to_numpy(msg)
        except ImageFormatError as err:
            raise WindowFormatError(f"camera {cam!r}: {err}") from None
        if strip.shape[0] % T_o:
            raise WindowFormatError(f"camera {cam!r}: height {strip.shape[0]} not a multiple "
                                    f"of T_o={T_o}")
        H, W = strip.shape[0] // T_o, strip.shape[1]
        if image_size is not None and (H, W) != tuple(image_size):
            raise WindowFormatError(f"camera {cam!r}: frames {H}x{W}, expected "
                                    f"{image_size[0]}x{image_size[1]}")
        frames[cam] = np.array(strip.reshape(T_o, H, W, 3))  # own the memory, writable
    return {"images": frames, "state": state, "stamps": stamps}


# ----------------------------------------------------------------------------- join

@dataclass
class JoinedWindow:
    stamp_ns: int
    images: dict[str, Image]
    state: JointTrajectory


@dataclass
class WindowJoiner:
    """Joins the per-camera window images and the state message by exact stamp.

    Parts may arrive in any order. When a stamp completes it is returned and every
    pending stamp older than it is dropped; parts older than the newest completed stamp
    are ignored, unless they are more than ``jump_back_ns`` older (the clock jumped
    backwards, e.g. a bag replay looped), which starts over.
    """

    camera_names: Sequence[str]
    max_pending: int = 8
    jump_back_ns: int = 1_000_000_000
    _pending: dict[int, dict[str, object]] = field(default_factory=dict)
    _last_complete: Optional[int] = None

    def reset(self) -> None:
        self._pending.clear()
        self._last_complete = None

    @property
    def pending(self) -> int:
        """Stamps with parts waiting for the rest (at most max_pending)."""
        return len(self._pending)

    def add(self, part: str, msg) -> Optional[JoinedWindow]:
        """``part``: a camera name or STATE_PART."""
        if part != STATE_PART and part not in self.camera_names:
            raise KeyError(f"unknown window part {part!r}")
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if self._last_complete is not None and stamp_ns <= self._last_complete:
            if stamp_ns >= self._last_complete - self.jump_back_ns:
                return None  # a late or repeated part of a window already handled
            self.reset()
        parts = self._pending.setdefault(stamp_ns, {})
        parts[part] = msg
        if len(parts) == len(self.camera_names) + 1:
            self._last_complete = stamp_ns
            for s in [s for s in self._pending if s <= stamp_ns]:
                del self._pending[s]
            state = parts.pop(STATE_PART)
            return JoinedWindow(stamp_ns, parts, state)  # type: ignore[arg-type]
        while len(self._pending) > self.max_pending:
            del self._pending[min(self._pending)]
        return None
