"""THE observation: image preprocessing, joint selection and tick alignment.

The aggregator node, the dataset builder and offline evaluation all build observations
with these functions, so training and deployment cannot disagree on resize, colour order,
joint order or which sample belongs to a tick. Cropping is not done here: it belongs to
the policy's encoder (random in training, centre at inference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from dp_ros.control.streams import SampleRejected, StreamBuffer

ENCODINGS = ("rgb8", "bgr8", "mono8")
STATE_STREAM = "state"  # stream key of the joint state; cameras may not use this name
_CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def validate_camera_name(name: str) -> None:
    """Camera names become topic name tokens and window keys."""
    if not _CAMERA_NAME.match(name):
        raise ValueError(f"camera name {name!r} must match [A-Za-z][A-Za-z0-9_]*")
    if name == STATE_STREAM:
        raise ValueError(f"camera name {STATE_STREAM!r} is reserved for the state topic")


# ----------------------------------------------------------------------------- images

def preprocess_image(pixels: np.ndarray, encoding: str, height: int, width: int) -> np.ndarray:
    """Raw camera pixels -> uint8 (height, width, 3) RGB, a new contiguous array.

    ``encoding``: rgb8 or bgr8 (H, W, 3), mono8 (H, W) or (H, W, 1). The size is changed
    with cv2.INTER_AREA (area averaging: no aliasing when shrinking). Resizing comes before
    the colour conversion: both are per-pixel linear, so the order does not change the
    result, and converting the smaller image is cheaper.
    """
    if encoding not in ENCODINGS:
        raise SampleRejected(
            "unsupported_encoding",
            f"unsupported image encoding {encoding!r} (expected one of {', '.join(ENCODINGS)})")
    if pixels.dtype != np.uint8:
        raise SampleRejected("bad_size", f"{encoding} image must be uint8, got {pixels.dtype}")
    if encoding == "mono8":
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if pixels.ndim != 2:
            raise SampleRejected("bad_size", f"mono8 image must be (H, W), got {pixels.shape}")
    elif pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SampleRejected("bad_size", f"{encoding} image must be (H, W, 3), got {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise SampleRejected("bad_size", f"empty image {pixels.shape}")

    if pixels.shape[:2] != (height, width):
        # cv2 wants a contiguous row layout; message views may carry row padding
        pixels = cv2.resize(np.ascontiguousarray(pixels), (width, height),
                            interpolation=cv2.INTER_AREA)
    if encoding == "rgb8":
        return np.array(pixels, dtype=np.uint8, order="C", copy=True)  # never alias the input
    code = cv2.COLOR_BGR2RGB if encoding == "bgr8" else cv2.COLOR_GRAY2RGB
    out = cv2.cvtColor(np.ascontiguousarray(pixels), code)
    return out.reshape(height, width, 3)


# ----------------------------------------------------------------------------- joints

def select_joints(names: Sequence[str], positions: np.ndarray,
                  wanted_names: Sequence[str]) -> np.ndarray:
    """Positions of ``wanted_names`` in that order, float32 (len(wanted_names),).

    ``names`` may be in any order and hold extra joints. A missing wanted joint, a length
    mismatch or a non-finite wanted value raises SampleRejected naming the problem.
    """
    return JointSelector(wanted_names)(names, positions)


class JointSelector:
    """select_joints with the name -> index lookup cached per name list, for 500 Hz
    joint states (drivers send the same name list every time)."""

    def __init__(self, wanted_names: Sequence[str]):
        if len(set(wanted_names)) != len(wanted_names):
            raise ValueError(f"duplicate joint names in {list(wanted_names)}")
        self.wanted_names = tuple(wanted_names)
        self._cache_key: Optional[tuple[str, ...]] = None
        self._cache_index: Optional[np.ndarray] = None

    def _index(self, names: Sequence[str]) -> np.ndarray:
        key = tuple(names)
        if key != self._cache_key:
            where = {n: i for i, n in enumerate(key)}
            missing = [n for n in self.wanted_names if n not in where]
            if missing:
                raise SampleRejected("missing_joint", f"joint(s) {missing} not in joint state "
                                                      f"(has {list(key)})")
            self._cache_index = np.array([where[n] for n in self.wanted_names], dtype=np.intp)
            self._cache_key = key
        return self._cache_index

    def __call__(self, names: Sequence[str], positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        if positions.ndim != 1 or positions.shape[0] != len(names):
            raise SampleRejected("bad_size", f"{len(names)} joint names but positions of shape "
                                             f"{positions.shape}")
        with np.errstate(over="ignore"):  # beyond float32: inf, rejected below with a reason
            out = positions[self._index(names)].astype(np.float32)
        if not np.all(np.isfinite(out)):
            bad = [n for n, v in zip(self.wanted_names, out) if not np.isfinite(v)]
            raise SampleRejected("non_finite", f"non-finite position for joint(s) {bad}")
        return out


# ----------------------------------------------------------------------------- ticks

@dataclass(frozen=True)
class ObservationSpec:
    """What an observation holds and how fresh each stream must be."""

    camera_names: tuple[str, ...]
    state_names: tuple[str, ...]
    image_height: int = 96
    image_width: int = 96
    camera_staleness: float = 0.1  # seconds
    state_staleness: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_names", tuple(self.camera_names))
        object.__setattr__(self, "state_names", tuple(self.state_names))
        if len(set(self.camera_names)) != len(self.camera_names):
            raise ValueError(f"duplicate camera names in {list(self.camera_names)}")
        if STATE_STREAM in self.camera_names:
            raise ValueError(f"a camera may not be called {STATE_STREAM!r}")
        if not self.state_names:
            raise ValueError("state_names is empty")
        if self.image_height < 1 or self.image_width < 1:
            raise ValueError(f"image size must be positive, got "
                             f"{self.image_height}x{self.image_width}")
        for what, value in (("camera_staleness", self.camera_staleness),
                            ("state_staleness", self.state_staleness)):
            if not value > 0.0:
                raise ValueError(f"{what} must be > 0, got {value}")

    @property
    def stream_names(self) -> tuple[str, ...]:
        return self.camera_names + (STATE_STREAM,)


@dataclass
class Observation:
    tick: float  # seconds, on the dt grid
    images: dict[str, np.ndarray]  # camera -> uint8 (H, W, 3) RGB
    state: np.ndarray  # float32 (D,)
    sample_stamps: dict[str, float] = field(default_factory=dict)  # stream -> stamp used


@dataclass(frozen=True)
class Invalid:
    """A tick that cannot be observed, naming the stream at fault."""

    tick: float
    stream: str
    cause: str  # "no_sample" or "stale"
    reason: str

    def __str__(self) -> str:
        return f"{self.stream}: {self.cause}: {self.reason}"


def build_observation(streams: Mapping[str, StreamBuffer], tick_time: float,
                      spec: ObservationSpec) -> Union[Observation, Invalid]:
    """For each stream the newest sample at or before ``tick_time``; a missing sample or
    one older than the stream's staleness limit makes the tick Invalid (first such stream
    in spec order: cameras, then state)."""
    chosen = {}
    for name in spec.stream_names:
        buffer = streams[name]
        sample = buffer.latest_at_or_before(tick_time)
        if sample is None:
            return Invalid(tick_time, name, "no_sample", "no sample at or before the tick")
        if not buffer.is_fresh(sample, tick_time):
            age = tick_time - sample.stamp
            return Invalid(tick_time, name, "stale",
                           f"newest sample is {age:.3f} s old (limit {buffer.staleness:.3f} s)")
        chosen[name] = sample
    return Observation(
        tick=tick_time,
        images={c: chosen[c].value for c in spec.camera_names},
        state=chosen[STATE_STREAM].value,
        sample_stamps={n: s.stamp for n, s in chosen.items()},
    )


class ObservationStreams:
    """The buffers of one observation spec plus the conversion of raw samples into them.

    Everything that turns recorded or live data into observations goes through
    ``push_image`` / ``push_state`` / ``observe``. Push methods raise SampleRejected
    (with a ``cause``) for samples that cannot be used; the buffers stay unchanged then.
    """

    def __init__(self, spec: ObservationSpec, horizon: float = 2.0):
        self.spec = spec
        self.selector = JointSelector(spec.state_names)
        self.buffers: dict[str, StreamBuffer] = {
            c: StreamBuffer(c, spec.camera_staleness, max(horizon, spec.camera_staleness))
            for c in spec.camera_names}
        self.buffers[STATE_STREAM] = StreamBuffer(
            STATE_STREAM, spec.state_staleness, max(horizon, spec.state_staleness))

    def push_image(self, camera: str, stamp: float, pixels: np.ndarray, encoding: str) -> None:
        buffer = self.buffers[camera]
        buffer.check_order(stamp)  # before preprocessing: do not pay for a rejected frame
        image = preprocess_image(pixels, encoding, self.spec.image_height, self.spec.image_width)
        buffer.push(stamp, image)

    def push_state(self, stamp: float, names: Sequence[str], positions: np.ndarray) -> None:
        buffer = self.buffers[STATE_STREAM]
        buffer.check_order(stamp)
        buffer.push(stamp, self.selector(names, positions))

    def observe(self, tick_time: float) -> Union[Observation, Invalid]:
        return build_observation(self.buffers, tick_time, self.spec)

    def settled(self, tick_time: float) -> bool:
        """Every stream is settled for the tick (StreamBuffer.settled): nothing stamped at
        or before it can still come, so the observation at the tick is final and may be
        built now."""
        return all(b.settled(tick_time) for b in self.buffers.values())

    def clear(self) -> None:
        for buffer in self.buffers.values():
            buffer.clear()
