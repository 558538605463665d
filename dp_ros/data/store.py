"""Episode store: demonstrations on disk as one zarr group, one row per tick of the dt grid.

Layout (the reference implementation's ReplayBuffer layout, so its tools read it too)::

    data/images/<camera>  uint8   (N, H, W, 3)  RGB, one chunk per frame
    data/state            float32 (N, D)
    data/action           float32 (N, A)        action[i] is the command issued at tick i
    data/timestamp        float64 (N,)          seconds, strictly increasing within an episode
    meta/episode_ends     int64   (E,)          exclusive end row of each episode

Episode labels (optional, e.g. "left"/"right") live in ``meta`` attrs as a JSON list, next
to camera and signal names, dt and the format version in the root attrs.

The arrays are written in zarr format 2, which both zarr-python 2 and 3 read. An episode is
appended to the data arrays first and committed by appending to ``episode_ends`` last: a
crash mid-episode leaves rows past the last end, which are ignored and overwritten.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import zarr

FORMAT = "dp_ros.episode_store"
FORMAT_VERSION = 1

_ZARR3 = int(zarr.__version__.split(".")[0]) >= 3
_LOWDIM_CHUNK_ROWS = 4096  # low-dim rows per chunk: a few hundred KB at most
Label = Union[str, int, None]


class StoreError(RuntimeError):
    """An episode store is missing, corrupt, of another format, or given bad data."""


def _open_group(path: Path, mode: str):
    if _ZARR3:
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    return zarr.open_group(str(path), mode=mode)


def _create_array(group, name: str, shape: tuple, chunks: tuple, dtype: str):
    # zarr 3 spells it create_array (its Group.zeros mis-writes v3 metadata into v2 groups)
    if _ZARR3:
        return group.create_array(name=name, shape=shape, chunks=chunks, dtype=dtype)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)


def _camera_hw(name: str, shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[2] == 3:
        shape = shape[:2]
    if len(shape) != 2 or min(shape) <= 0:
        raise StoreError(f"camera {name!r}: shape must be (H, W) or (H, W, 3), got {shape}")
    return shape


class EpisodeStore:
    """Read/append access to an episode store. Create with ``create``, open with ``open``."""

    def __init__(self, path: Path, root, writable: bool):
        # use EpisodeStore.create / EpisodeStore.open
        self.path = path
        self._root = root
        self._writable = writable
        attrs = dict(root.attrs)
        self.camera_names: list[str] = list(attrs["camera_names"])
        self.camera_shapes: dict[str, tuple[int, int]] = {
            n: tuple(attrs["camera_shapes"][n]) for n in self.camera_names}
        self.state_names: list[str] = list(attrs["state_names"])
        self.action_names: list[str] = list(attrs["action_names"])
        self.dt: float = float(attrs["dt"])
        data, meta = root["data"], root["meta"]
        self._images = {n: data["images"][n] for n in self.camera_names}
        self._state, self._action, self._timestamp = data["state"], data["action"], data["timestamp"]
        self._episode_ends_arr = meta["episode_ends"]
        self._meta = meta
        self._episode_ends = np.asarray(self._episode_ends_arr[:], dtype=np.int64)
        labels = list(dict(meta.attrs).get("episode_label", []))
        self._labels: list[Label] = labels[: len(self._episode_ends)]
        self._in_memory = False

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, path: Union[str, os.PathLike], camera_shapes: Mapping[str, Sequence[int]],
               state_names: Sequence[str], action_names: Sequence[str], dt: float,
               overwrite: bool = False) -> "EpisodeStore":
        """A new, empty store. camera_shapes: name -> (H, W) or (H, W, 3); may be empty."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise StoreError(f"{path}: already exists (pass overwrite=True to replace it)")
        shapes = {str(n): _camera_hw(n, s) for n, s in camera_shapes.items()}
        state_names, action_names = [str(s) for s in state_names], [str(a) for a in action_names]
        if not action_names:
            raise StoreError("action_names must name at least one action dimension")
        for what, names in (("state_names", state_names), ("action_names", action_names)):
            if len(set(names)) != len(names):
                raise StoreError(f"{what} has duplicates: {names}")
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise StoreError(f"dt must be a positive number of seconds, got {dt!r}")
        root = _open_group(path, "w")
        data, meta = root.require_group("data"), root.require_group("meta")
        images = data.require_group("images")
        for name, (h, w) in shapes.items():
            _create_array(images, name, (0, h, w, 3), (1, h, w, 3), "uint8")
        _create_array(data, "state", (0, len(state_names)), (_LOWDIM_CHUNK_ROWS, max(1, len(state_names))), "float32")
        _create_array(data, "action", (0, len(action_names)), (_LOWDIM_CHUNK_ROWS, len(action_names)), "float32")
        _create_array(data, "timestamp", (0,), (_LOWDIM_CHUNK_ROWS,), "float64")
        _create_array(meta, "episode_ends", (0,), (_LOWDIM_CHUNK_ROWS,), "int64")
        meta.attrs["episode_label"] = []
        root.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "camera_names": list(shapes), "camera_shapes": {n: list(s) for n, s in shapes.items()},
            "state_names": state_names, "action_names": action_names, "dt": float(dt),
        })
        return cls(path, root, writable=True)

    @classmethod
    def open(cls, path: Union[str, os.PathLike], mode: str = "r", in_memory: bool = False) -> "EpisodeStore":
        """Open an existing store; mode "r" (read-only) or "r+" (append episodes).

        in_memory=True reads every array into RAM once (fast random access for training
        on small stores); such a store is read-only.
        """
        path = Path(path)
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
        if not path.exists():
            raise StoreError(f"{path}: no such episode store")
        try:
            root = _open_group(path, mode)
        except Exception as exc:  # zarr raises assorted types for a non-store directory
            raise StoreError(f"{path}: not a zarr episode store ({exc})") from None
        attrs = dict(root.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: not a dp_ros episode store (format attr "
                             f"{attrs.get('format')!r}, expected {FORMAT!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: episode store format version {attrs.get('format_version')!r} "
                             f"is not supported (this dp_ros reads version {FORMAT_VERSION})")
        try:
            store = cls(path, root, writable=(mode == "r+"))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path}: corrupt episode store (missing or bad entry {exc})") from None
        store._check_consistent()
        if in_memory:
            store.load_into_memory()
        return store

    def _check_consistent(self) -> None:
        ends = self._episode_ends
        n = int(ends[-1]) if len(ends) else 0
        problems = []
        if len(ends) and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
            problems.append("meta/episode_ends is not strictly increasing from > 0")
        rows = {"state": self._state, "action": self._action, "timestamp": self._timestamp}
        rows.update({f"images/{c}": a for c, a in self._images.items()})
        for name, arr in rows.items():
            if arr.shape[0] < n:
                problems.append(f"data/{name} has {arr.shape[0]} rows, episode_ends needs {n}")
        if self._state.shape[1:] != (len(self.state_names),):
            problems.append(f"data/state has shape {self._state.shape}, expected (N, {len(self.state_names)})")
        if self._action.shape[1:] != (len(self.action_names),):
            problems.append(f"data/action has shape {self._action.shape}, expected (N, {len(self.action_names)})")
        for c, a in self._images.items():
            if a.shape[1:] != (*self.camera_shapes[c], 3) or a.dtype != np.uint8:
                problems.append(f"data/images/{c} is {a.dtype} {a.shape}, expected uint8 (N, "
                                f"{self.camera_shapes[c][0]}, {self.camera_shapes[c][1]}, 3)")
        if problems:
            raise StoreError(f"{self.path}: corrupt episode store: " + "; ".join(problems))

    def load_into_memory(self) -> "EpisodeStore":
        """Replace the on-disk arrays by numpy copies of the committed rows (read-only after)."""
        n = self.n_steps
        self._images = {c: np.asarray(a[:n]) for c, a in self._images.items()}
        self._state = np.asarray(self._state[:n])
        self._action = np.asarray(self._action[:n])
        self._timestamp = np.asarray(self._timestamp[:n])
        self._writable = False
        self._in_memory = True
        return self

    # -- writing -------------------------------------------------------------------------
    def add_episode(self, images: Mapping[str, np.ndarray], state: np.ndarray, action: np.ndarray,
                    timestamp: np.ndarray, label: Label = None) -> int:
        """Append one episode of n ticks; returns its index. Arrays are validated first."""
        if not self._writable:
            raise StoreError(f"{self.path}: opened read-only (use mode='r+' to append)")
        state = np.asarray(state, dtype=np.float32)
        action = np.asarray(action, dtype=np.float32)
        timestamp = np.asarray(timestamp, dtype=np.float64)
        n = len(timestamp)
        self._validate_episode(images, state, action, timestamp, n)
        if isinstance(label, bool) or not (label is None or isinstance(label, (str, int))):
            raise StoreError(f"episode label must be a str, an int or None, got {label!r}")
        # drop rows of an episode that was being written when a previous writer died
        committed = self.n_steps
        arrays = [self._state, self._action, self._timestamp, *self._images.values()]
        for arr in arrays:
            if arr.shape[0] != committed:
                arr.resize((committed, *arr.shape[1:]))
        for cam, arr in self._images.items():
            arr.append(np.ascontiguousarray(images[cam], dtype=np.uint8))
        self._state.append(state)
        self._action.append(action)
        self._timestamp.append(timestamp)
        self._labels = self._labels[: self.n_episodes] + [label]
        self._meta.attrs["episode_label"] = self._labels
        self._episode_ends_arr.append(np.array([committed + n], dtype=np.int64))  # commit point
        self._episode_ends = np.append(self._episode_ends, committed + n)
        return self.n_episodes - 1

    def _validate_episode(self, images, state, action, timestamp, n: int) -> None:
        if n < 1:
            raise StoreError("an episode needs at least one tick")
        if timestamp.shape != (n,):
            raise StoreError(f"timestamp must have shape (n,), got {timestamp.shape}")
        if not np.all(np.isfinite(timestamp)) or np.any(np.diff(timestamp) <= 0):
            raise StoreError("timestamp must be finite and strictly increasing")
        if state.shape != (n, len(self.state_names)):
            raise StoreError(f"state must have shape ({n}, {len(self.state_names)}), got {state.shape}")
        if action.shape != (n, len(self.action_names)):
            raise StoreError(f"action must have shape ({n}, {len(self.action_names)}), got {action.shape}")
        if not (np.all(np.isfinite(state)) and np.all(np.isfinite(action))):
            raise StoreError("state and action must be finite (no NaN or inf)")
        if set(images) != set(self.camera_names):
            raise StoreError(f"images must have exactly the cameras {self.camera_names}, got {sorted(images)}")
        for cam in self.camera_names:
            img = images[cam]
            want = (n, *self.camera_shapes[cam], 3)
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != want:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise StoreError(f"images[{cam!r}] must be uint8 {want} (RGB), got {got}")

    # -- reading -------------------------------------------------------------------------
    @property
    def n_episodes(self) -> int:
        return len(self._episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if len(self._episode_ends) else 0

    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends.copy()

    @property
    def episode_labels(self) -> list[Label]:
        return list(self._labels) + [None] * (self.n_episodes - len(self._labels))

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    def episode_slice(self, i: int) -> slice:
        """Rows of episode i (negative i counts from the end)."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range for {self.n_episodes} episodes")
        i %= self.n_episodes
        start = int(self._episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._episode_ends[i]))

    # Array accessors: zarr arrays (or numpy once in memory), sliced like numpy. Rows past
    # n_steps (an interrupted write) may exist on disk: index within [0, n_steps).
    def images(self, camera: str):
        if camera not in self._images:
            raise KeyError(f"no camera {camera!r} in {self.path} (cameras: {self.camera_names})")
        return self._images[camera]

    @property
    def state(self):
        return self._state

    @property
    def action(self):
        return self._action

    @property
    def timestamp(self):
        return self._timestamp

    def episode(self, i: int) -> dict[str, Any]:
        """One episode as numpy arrays: images, state, action, timestamp, label."""
        s = self.episode_slice(i)
        return {"images": {c: np.asarray(a[s]) for c, a in self._images.items()},
                "state": np.asarray(self._state[s]), "action": np.asarray(self._action[s]),
                "timestamp": np.asarray(self._timestamp[s]), "label": self.episode_labels[i]}

    def describe(self) -> dict[str, Any]:
        """Plain summary (for CLI output and logs)."""
        lengths = np.diff(np.concatenate([[0], self._episode_ends])).tolist()
        return {"path": str(self.path), "episodes": self.n_episodes, "steps": self.n_steps,
                "cameras": {n: list(s) for n, s in self.camera_shapes.items()},
                "state_names": self.state_names, "action_names": self.action_names, "dt": self.dt,
                "episode_length_min": min(lengths, default=0), "episode_length_max": max(lengths, default=0)}

    def __repr__(self) -> str:
        return f"EpisodeStore({json.dumps(self.describe())})"
