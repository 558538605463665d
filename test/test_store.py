"""Episode store, training windows and the generated dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dp_ros.data import EpisodeStore, StoreError, WindowDataset, WindowSampler, make_synthetic_store
from dp_ros.data import synthetic


def _episode(n: int, first_row: int, cams=("front",), h=4, w=5):
    """Episode whose values encode their global row: easy to check after windowing."""
    rows = np.arange(first_row, first_row + n)
    images = {c: np.broadcast_to((rows % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()
              for c in cams}
    state = np.stack([rows, -rows], axis=1).astype(np.float32)
    action = (rows * 10.0).astype(np.float32)[:, None]
    return images, state, action, rows * 0.1


@pytest.fixture
def small_store(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", {"front": (4, 5)}, ["q0", "q1"], ["cmd"], dt=0.1)
    row = 0
    for n, label in ((5, "left"), (3, "right"), (7, None)):
        store.add_episode(*_episode(n, row), label=label)
        row += n
    return store


def test_round_trip(small_store, tmp_path):
    store = EpisodeStore.open(tmp_path / "s.zarr")
    assert (store.n_episodes, store.n_steps) == (3, 15)
    assert store.episode_ends.tolist() == [5, 8, 15]
    assert store.episode_labels == ["left", "right", None]
    assert store.camera_names == ["front"] and store.camera_shapes == {"front": (4, 5)}
    assert store.state_names == ["q0", "q1"] and store.action_names == ["cmd"] and store.dt == 0.1
    assert store.episode_slice(1) == slice(5, 8) and store.episode_slice(-1) == slice(8, 15)
    ep = store.episode(1)
    np.testing.assert_array_equal(ep["state"][:, 0], [5, 6, 7])
    np.testing.assert_array_equal(ep["action"][:, 0], [50, 60, 70])
    np.testing.assert_array_equal(ep["images"]["front"][:, 0, 0, 0], [5, 6, 7])
    assert ep["timestamp"].dtype == np.float64 and ep["label"] == "right"
    assert store.images("front").dtype == np.uint8 and store.state.dtype == np.float32
    mem = EpisodeStore.open(tmp_path / "s.zarr", in_memory=True)
    assert mem.in_memory and isinstance(mem.state, np.ndarray)
    np.testing.assert_array_equal(mem.images("front"), np.asarray(store.images("front")[:15]))
    np.testing.assert_array_equal(mem.action, np.asarray(store.action[:]))
    with pytest.raises(IndexError):
        store.episode_slice(3)


def test_append_after_reopen_and_interrupted_write(small_store, tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="read-only"):
        EpisodeStore.open(path).add_episode(*_episode(2, 15))
    store = EpisodeStore.open(path, mode="r+")
    # a writer that died mid-episode: rows appended to some arrays, never committed
    store.state.append(np.full((4, 2), 99.0, np.float32))
    store.images("front").append(np.zeros((4, 4, 5, 3), np.uint8))
    reopened = EpisodeStore.open(path, mode="r+")
    assert reopened.n_steps == 15  # uncommitted rows are not part of the store
    reopened.add_episode(*_episode(2, 15), label=3)
    final = EpisodeStore.open(path)
    assert final.episode_ends.tolist() == [5, 8, 15, 17] and final.episode_labels[-1] == 3
    np.testing.assert_array_equal(np.asarray(final.state[:])[:, 0], np.arange(17))
    assert final.state.shape[0] == 17 and final.images("front").shape[0] == 17


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(state=e["state"][:-1]), "state must have shape"),
    (lambda e: e.update(action=np.full_like(e["action"], np.nan)), "finite"),
    (lambda e: e.update(timestamp=e["timestamp"][::-1].copy()), "strictly increasing"),
    (lambda e: e.update(images={"front": e["images"]["front"].astype(np.float32)}), "must be uint8"),
    (lambda e: e.update(images={"front": e["images"]["front"][:, :3]}), "must be uint8"),
    (lambda e: e.update(images={}), "exactly the cameras"),
    (lambda e: e.update(label=[1]), "label"),
])
def test_add_episode_rejects_bad_data(small_store, change, message):
    images, state, action, timestamp = _episode(4, 15)
    ep = {"images": images, "state": state, "action": action, "timestamp": timestamp, "label": None}
    change(ep)
    with pytest.raises(StoreError, match=message):
        small_store.add_episode(**ep)
    assert small_store.n_episodes == 3


def test_open_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(StoreError, match="nope.zarr"):
        EpisodeStore.open(missing)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="plain"):
        EpisodeStore.open(plain)
    store = EpisodeStore.create(tmp_path / "v.zarr", {}, ["s"], ["a"], 0.1)
    store._root.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="version 99"):
        EpisodeStore.open(tmp_path / "v.zarr")
    store = EpisodeStore.create(tmp_path / "c.zarr", {}, ["s"], ["a"], 0.1)
    store.add_episode({}, np.zeros((3, 1)), np.zeros((3, 1)), np.arange(3.0))
    store._state.resize((1, 1))  # data shorter than episode_ends claims
    with pytest.raises(StoreError, match="corrupt.*data/state has 1 rows"):
        EpisodeStore.open(tmp_path / "c.zarr")
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(tmp_path / "c.zarr", {}, ["s"], ["a"], 0.1)
    EpisodeStore.create(tmp_path / "c.zarr", {}, ["s"], ["a"], 0.1, overwrite=True)
    assert EpisodeStore.open(tmp_path / "c.zarr").n_episodes == 0
    with pytest.raises(StoreError, match="dt"):
        EpisodeStore.create(tmp_path / "d.zarr", {}, ["s"], ["a"], 0.0)


def test_window_padding_repeats_episode_edges():
    # episodes of 5 and 3 ticks; T_o 2, T_p 4, T_a 2 -> pad_before 1, pad_after 1
    sampler = WindowSampler([5, 8], sequence_length=4, pad_before=1, pad_after=1)
    got = [sampler.rows(i).tolist() for i in range(len(sampler))]
    assert got == [
        [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 4],  # episode 0, starts -1..2
        [5, 5, 6, 7], [5, 6, 7, 7],  # episode 1 (rows 5..7), starts -1..0
    ]
    assert sampler.rows(3, length=2).tolist() == [2, 3]
    assert len(WindowSampler([5, 8], 4, 1, 1, episodes=[1])) == 2


@pytest.mark.parametrize("T_o, T_p, T_a", [(1, 1, 1), (2, 16, 8), (3, 8, 6), (2, 4, 3)])
def test_window_count_and_coverage(T_o, T_p, T_a):
    lengths = [1, 4, 9, 30]
    ends = np.cumsum(lengths)
    sampler = WindowSampler(ends, T_p, pad_before=T_o - 1, pad_after=T_a - 1)
    expected = sum(max(0, n - T_p + T_o + T_a - 1) for n in lengths)
    assert len(sampler) == expected
    starts = np.concatenate([[0], ends[:-1]])
    for i in range(len(sampler)):
        rows = sampler.rows(i)
        lo, hi = sampler.episode_bounds(i)
        assert lo in starts and np.all((rows >= lo) & (rows < hi))
        assert np.all(np.diff(rows) >= 0) and np.all(np.diff(rows) <= 1)
    # newest observations cover the episode except its last T_p - T_o - T_a + 1 ticks, whose
    # full horizon would need more than T_a - 1 ticks of padding (as in the reference)
    newest = {int(sampler.rows(i)[T_o - 1]) for i in range(len(sampler))}
    uncovered = T_p - T_o - T_a + 1
    assert set(range(starts[3], ends[3] - uncovered)) <= newest
    assert not newest & set(range(ends[3] - uncovered, ends[3]))


def test_window_dataset_items(small_store):
    ds = WindowDataset(small_store, T_o=2, T_p=4, T_a=2)
    assert len(ds) == 4 + 2 + 6
    item = ds[0]  # first window of episode 0: rows [0, 0, 1, 2]
    assert item["images"]["front"].dtype == torch.uint8 and item["images"]["front"].shape == (2, 4, 5, 3)
    assert item["images"]["front"][:, 0, 0, 0].tolist() == [0, 0]
    assert item["state"].dtype == torch.float32 and item["state"][:, 0].tolist() == [0, 0]
    assert item["action"].shape == (4, 1) and item["action"][:, 0].tolist() == [0, 0, 10, 20]
    last = ds[len(ds) - 1]  # last window of episode 2 (rows 8..14): [12, 13, 14, 14]
    assert last["state"][:, 0].tolist() == [12, 13]
    assert last["action"][:, 0].tolist() == [120, 130, 140, 140]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["images"]["front"].shape == (5, 2, 4, 5, 3) and batch["action"].shape == (5, 4, 1)
    with pytest.raises(KeyError, match="back"):
        WindowDataset(small_store, 2, 4, 2, cameras=["back"])
    with pytest.raises(ValueError, match="T_a"):
        WindowDataset(small_store, 2, 4, 4)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_state_only_store(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", {}, [], ["a"], 0.05)
    store.add_episode({}, np.zeros((6, 0)), np.arange(6.0)[:, None], np.arange(6) * 0.05)
    item = WindowDataset(EpisodeStore.open(tmp_path / "s.zarr"), 1, 2, 1)[0]
    assert item["images"] == {} and item["state"].shape == (1, 0)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("syn") / "pm.zarr", episodes=20, seed=3)


def test_synthetic_dataset(synthetic_store, tmp_path):
    store = EpisodeStore.open(synthetic_store.path)
    assert store.n_episodes == 20 and store.camera_shapes == {"image": (96, 96)} and store.dt == 0.1
    labels = store.episode_labels
    assert set(labels) == {"left", "right"} and 4 <= labels.count("left") <= 16
    for e in range(store.n_episodes):
        ep = store.episode(e)
        n = len(ep["state"])
        assert 40 <= n <= 60
        assert np.allclose(np.diff(ep["timestamp"]), 0.1)
        dist = np.linalg.norm(ep["state"] - synthetic.OBSTACLE_CENTER, axis=1)
        assert dist.min() > synthetic.OBSTACLE_RADIUS + 0.03  # never through the obstacle
        # passing height: the expert is on its labelled side of the obstacle
        mid = np.argmin(np.abs(ep["state"][:, 1] - 0.5))
        side = ep["state"][mid, 0] - 0.5
        assert (side < -0.1) if ep["label"] == "left" else (side > 0.1)
        # the point follows the commands: state[i+1] lies between state[i] and action[i]
        step = ep["state"][1:] - ep["state"][:-1]
        assert np.allclose(step, synthetic.TRACKING_GAIN * (ep["action"][:-1] - ep["state"][:-1]), atol=1e-5)
        assert np.linalg.norm(ep["state"][-1] - ep["action"][-1]) < 0.02  # ends at rest on the goal
    # the frame shows the point where the state says it is (blue pixels, RGB order)
    img, (x, y) = np.asarray(store.images("image")[0]), store.state[0]
    r, c = int(round((1 - y) * 96)), int(round(x * 96))
    assert tuple(img[r, c]) == synthetic._POINT
    # deterministic in the seed
    again = make_synthetic_store(tmp_path / "again.zarr", episodes=2, seed=3)
    np.testing.assert_array_equal(np.asarray(again.images("image")[:]),
                                  np.asarray(store.images("image")[: again.n_steps]))
    assert json.loads(json.dumps(store.describe()))["episodes"] == 20
