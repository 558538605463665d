"""Training samples: (observation window, action horizon) pairs cut from episodes.

A sample is a sequence of T_p consecutive ticks starting at row s of an episode: the
observation window is its first T_o ticks (s .. s+T_o-1) and the action horizon all T_p
(s .. s+T_p-1), so action index T_o-1 is the command issued at the newest observation, as
at deployment (ARCHITECTURE.md, "Time").

Like the reference's SequenceSampler, s runs from -(T_o-1) (pad_before) to
L - T_p + (T_a-1) (pad_after), and ticks outside the episode repeat the episode's first or
last row. Padding before lets the policy learn the first plan of an episode from a window
that starts before the robot moved; padding after teaches it to hold still at the end.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import EpisodeStore


class WindowSampler:
    """Index of every padded sequence of `sequence_length` ticks over a set of episodes."""

    def __init__(self, episode_ends: Sequence[int], sequence_length: int, pad_before: int = 0,
                 pad_after: int = 0, episodes: Optional[Iterable[int]] = None):
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if pad_before < 0 or pad_after < 0:
            raise ValueError(f"padding must be >= 0, got pad_before={pad_before}, pad_after={pad_after}")
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        chosen = range(len(ends)) if episodes is None else sorted(set(int(e) for e in episodes))
        self.sequence_length = sequence_length
        rows = []  # (episode start row, episode end row, sequence start row)
        for e in chosen:
            if not 0 <= e < len(ends):
                raise IndexError(f"episode {e} out of range for {len(ends)} episodes")
            lo, hi = int(starts[e]), int(ends[e])
            first, last = lo - pad_before, hi - sequence_length + pad_after
            if last < first:
                continue  # episode too short for even one padded sequence
            seq = np.arange(first, last + 1, dtype=np.int64)
            rows.append(np.stack([np.full_like(seq, lo), np.full_like(seq, hi), seq], axis=1))
        self._index = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def rows(self, i: int, length: Optional[int] = None) -> np.ndarray:
        """Store rows of the first `length` ticks of sequence i, edge rows repeated as padding."""
        length = self.sequence_length if length is None else length
        lo, hi, start = self._index[i]
        return np.clip(np.arange(start, start + length), lo, hi - 1)

    def episode_bounds(self, i: int) -> tuple[int, int]:
        lo, hi, _ = self._index[i]
        return int(lo), int(hi)


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """array[rows] for sorted rows, reading one contiguous slice (cheap on zarr and numpy)."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return np.asarray(array[lo:hi])[rows - lo]


class WindowDataset(Dataset):
    """torch Dataset of training samples in the model's batch layout (raw units).

    item = {"images": {camera: uint8 (T_o, H, W, 3)}, "state": float32 (T_o, D),
            "action": float32 (T_p, A)}
    """

    def __init__(self, store: EpisodeStore, T_o: int, T_p: int, T_a: int,
                 cameras: Optional[Sequence[str]] = None, episodes: Optional[Iterable[int]] = None):
        if not (1 <= T_o <= T_p and 1 <= T_a <= T_p - T_o + 1):
            raise ValueError(f"need 1 <= T_o <= T_p and 1 <= T_a <= T_p - T_o + 1, "
                             f"got T_o={T_o}, T_p={T_p}, T_a={T_a}")
        cameras = list(store.camera_names if cameras is None else cameras)
        for c in cameras:
            if c not in store.camera_names:
                raise KeyError(f"camera {c!r} is not in {store.path} (cameras: {store.camera_names})")
        self.store, self.cameras = store, cameras
        self.T_o, self.T_p, self.T_a = T_o, T_p, T_a
        self.sampler = WindowSampler(store.episode_ends, T_p, pad_before=T_o - 1, pad_after=T_a - 1,
                                     episodes=episodes)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        rows = self.sampler.rows(i)
        obs_rows = rows[: self.T_o]  # only the observed frames are read: images dominate I/O
        return {
            "images": {c: torch.from_numpy(read_rows(self.store.images(c), obs_rows)) for c in self.cameras},
            "state": torch.from_numpy(read_rows(self.store.state, obs_rows).astype(np.float32, copy=False)),
            "action": torch.from_numpy(read_rows(self.store.action, rows).astype(np.float32, copy=False)),
        }
