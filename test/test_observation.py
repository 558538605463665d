"""The observation function without ROS: preprocessing, joint selection, stream buffers,
tick alignment and windows, driven by synthetic stamps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_ros.control.observation import (STATE_STREAM, Invalid, JointSelector, Observation,
                                        ObservationSpec, ObservationStreams, build_observation,
                                        preprocess_image, select_joints)
from dp_ros.control.streams import SampleRejected, StampOrderError, StreamBuffer
from dp_ros.control.window import TickGrid, WindowBuilder, tick_index


def rgb_pattern(h: int, w: int) -> np.ndarray:
    """Distinct values per row, column and channel: catches transposes and swaps."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(y * 7) % 256, (x * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- images

def test_rgb8_same_size_is_an_unaliased_copy():
    img = rgb_pattern(48, 64)
    out = preprocess_image(img, "rgb8", 48, 64)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, img)
    img[0, 0] = 255 - img[0, 0]
    assert not np.array_equal(out[0, 0], img[0, 0])


def test_bgr8_becomes_rgb():
    rgb = rgb_pattern(30, 40)
    out = preprocess_image(rgb[:, :, ::-1].copy(), "bgr8", 30, 40)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1)])
def test_mono8_replicated_to_three_channels(shape):
    grey = (np.arange(600).reshape(20, 30) % 256).astype(np.uint8)
    out = preprocess_image(grey.reshape(shape), "mono8", 20, 30)
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_resize_uses_area_averaging_and_height_width_order():
    # 2x2 blocks of one value each: area averaging halves to exactly the block values
    blocks = rgb_pattern(24, 32)
    big = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # (48, 64, 3)
    out = preprocess_image(big, "rgb8", 24, 32)
    np.testing.assert_array_equal(out, blocks)
    # colour order survives resizing for bgr8 and mono8 too
    np.testing.assert_array_equal(preprocess_image(big[:, :, ::-1].copy(), "bgr8", 24, 32),
                                  blocks)
    mono = preprocess_image(np.ascontiguousarray(big[:, :, 0]), "mono8", 24, 32)
    np.testing.assert_array_equal(mono[:, :, 2], blocks[:, :, 0])


def test_resize_matches_cv2_inter_area_on_arbitrary_sizes():
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = cv2.resize(img, (20, 11), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(preprocess_image(img, "rgb8", 11, 20), expected)


def test_padded_view_input_is_accepted():
    padded = np.zeros((10, 16 * 3 + 8), np.uint8)  # rows with padding, like Image.step
    view = padded[:, :48].reshape(10, 16, 3)
    view[...] = rgb_pattern(10, 16)
    np.testing.assert_array_equal(preprocess_image(view, "rgb8", 5, 8),
                                  cv2.resize(rgb_pattern(10, 16), (8, 5),
                                             interpolation=cv2.INTER_AREA))


def test_unknown_encoding_named_in_value_error():
    with pytest.raises(ValueError, match="yuv422"):
        preprocess_image(np.zeros((4, 4, 2), np.uint8), "yuv422", 4, 4)


@pytest.mark.parametrize("pixels,encoding", [
    (np.zeros((4, 4), np.uint8), "rgb8"),
    (np.zeros((4, 4, 3), np.uint8), "mono8"),
    (np.zeros((4, 4, 3), np.uint16), "rgb8"),
    (np.zeros((0, 4, 3), np.uint8), "rgb8"),
])
def test_wrong_shapes_rejected(pixels, encoding):
    with pytest.raises(SampleRejected) as err:
        preprocess_image(pixels, encoding, 4, 4)
    assert err.value.cause == "bad_size"


# ----------------------------------------------------------------------------- joints

def test_select_joints_by_name_any_order_extras_ignored():
    names = ["gripper", "j3", "j1", "j2", "camera_pan"]
    positions = np.array([0.9, 3.0, 1.0, 2.0, -1.0])
    out = select_joints(names, positions, ["j1", "j2", "j3"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])


def test_missing_joint_named():
    with pytest.raises(SampleRejected, match="j4") as err:
        select_joints(["j1", "j2"], np.array([1.0, 2.0]), ["j1", "j4"])
    assert err.value.cause == "missing_joint"


def test_non_finite_wanted_joint_rejected_but_extra_nan_ignored():
    with pytest.raises(SampleRejected, match="j2") as err:
        select_joints(["j1", "j2"], np.array([1.0, np.nan]), ["j1", "j2"])
    assert err.value.cause == "non_finite"
    np.testing.assert_array_equal(
        select_joints(["j1", "x", "j2"], np.array([1.0, np.inf, 2.0]), ["j1", "j2"]), [1, 2])


def test_length_mismatch_rejected():
    with pytest.raises(SampleRejected) as err:
        select_joints(["j1", "j2"], np.array([1.0]), ["j1"])
    assert err.value.cause == "bad_size"


def test_selector_cache_follows_changing_name_order():
    sel = JointSelector(["a", "b"])
    np.testing.assert_array_equal(sel(["a", "b"], np.array([1.0, 2.0])), [1, 2])
    np.testing.assert_array_equal(sel(["b", "a"], np.array([1.0, 2.0])), [2, 1])
    with pytest.raises(SampleRejected):
        sel(["b"], np.array([1.0]))
    np.testing.assert_array_equal(sel(["a", "b"], np.array([5.0, 6.0])), [5, 6])


# ----------------------------------------------------------------------------- buffers

def test_latest_at_or_before_and_staleness():
    buf = StreamBuffer("cam", staleness=0.1)
    for t in (1.00, 1.03, 1.07, 1.10):
        buf.push(t, t)
    assert buf.latest_at_or_before(0.99) is None
    assert buf.latest_at_or_before(1.05).value == 1.03
    assert buf.latest_at_or_before(1.10).value == 1.10  # at the tick counts
    assert buf.latest_at_or_before(5.0).value == 1.10
    s = buf.latest_at_or_before(1.2)
    assert buf.is_fresh(s, 1.2) and not buf.is_fresh(s, 1.2001)


def test_backward_stamp_rejected_and_buffer_unchanged():
    buf = StreamBuffer("cam", staleness=0.1)
    buf.push(2.0, "a")
    with pytest.raises(StampOrderError) as err:
        buf.push(1.5, "b")
    assert err.value.cause == "stamp_backwards" and "cam" in str(err.value)
    assert len(buf) == 1 and buf.latest_at_or_before(3.0).value == "a"
    buf.push(2.0, "c")  # a re-sent stamp replaces
    assert len(buf) == 1 and buf.latest_at_or_before(3.0).value == "c"
    buf.clear()
    buf.push(0.5, "d")  # after a clock reset earlier stamps are fine again
    assert buf.latest_at_or_before(1.0).value == "d"


def test_horizon_and_capacity_bound_memory():
    buf = StreamBuffer("js", staleness=0.05, horizon=0.5, capacity=100)
    for i in range(1000):
        buf.push(i * 0.002, i)
    assert len(buf) <= 100
    buf2 = StreamBuffer("js", staleness=0.05, horizon=0.1)
    for i in range(1000):
        buf2.push(i * 0.002, i)
    assert buf2.latest_at_or_before(1.901).value == 950
    assert buf2.latest_at_or_before(1.88) is None  # older than the horizon: gone


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40),
       st.integers(-10, 1100))
def test_latest_at_or_before_matches_brute_force(stamps_ms, t_ms):
    buf = StreamBuffer("s", staleness=10.0, horizon=100.0)
    for s in sorted(stamps_ms):
        buf.push(s / 1000, s)
    older = [s for s in stamps_ms if s <= t_ms]
    got = buf.latest_at_or_before(t_ms / 1000)
    assert (got is None) if not older else (got.value == max(older))


def test_settled_once_a_sample_at_or_after_the_tick_is_in():
    buf = StreamBuffer("cam", staleness=1.0)
    assert not buf.settled(0.1)  # empty
    for stamp in (0.0, 0.04, 0.05):  # too few samples to know a period
        buf.push(stamp, None)
    assert not buf.settled(0.1)
    buf.push(0.1, None)
    assert buf.settled(0.1) and buf.settled(0.05) and not buf.settled(0.11)


def test_a_regular_stream_is_settled_within_half_a_period_before_the_tick():
    buf = StreamBuffer("js", staleness=1.0)
    for i in range(20):  # 500 Hz, the last sample at 0.038 s
        buf.push(i * 0.002, None)
    assert buf.period() == pytest.approx(0.002)
    assert buf.settled(0.0385)     # the next sample is due at 0.040, after the tick
    assert buf.settled(0.03899)
    assert not buf.settled(0.0392)  # within half a period of the next: it may come first
    buf.push(0.0401, None)  # a late, jittered sample
    assert buf.settled(0.04)


def test_too_few_samples_give_no_period_and_the_stream_waits_for_one_after_the_tick():
    buf = StreamBuffer("cam", staleness=1.0)
    for _ in range(20):  # a re-sent stamp replaces the sample: no intervals at all
        buf.push(1.0, None)
    buf2 = StreamBuffer("cam", staleness=1.0)
    for i in range(5):
        buf2.push(i * 0.01, None)
    assert buf.period() is None and buf2.period() is None  # too few intervals in buf2
    assert not buf2.settled(0.0401)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.001, 0.05), st.floats(0.0, 0.24), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0))
def test_settled_early_picks_the_sample_a_late_build_would_pick(period, jitter, seed, phase):
    """Stamps a period apart, each off by under a quarter period (so every interval is
    within half a period of the period): whenever the stream says it is settled for t, the
    sample at or before t is the one it holds once all have come."""
    rng = np.random.default_rng(seed)
    stamps = np.arange(60) * period + rng.uniform(-jitter, jitter, 60) * period
    stamps = np.maximum.accumulate(stamps)  # stamp order, as one publisher gives
    full = StreamBuffer("s", staleness=10.0, horizon=100.0)
    for s in stamps:
        full.push(s, s)
    live = StreamBuffer("s", staleness=10.0, horizon=100.0)
    for s in stamps[:-1]:
        live.push(s, s)
        t = s + phase * period  # a tick between this sample and about the next
        if live.settled(t):
            assert live.latest_at_or_before(t).value == full.latest_at_or_before(t).value


# ----------------------------------------------------------------------------- ticks

SPEC = ObservationSpec(("front", "wrist"), ("j1", "j2"), 8, 8,
                       camera_staleness=0.1, state_staleness=0.05)


def filled_streams(t_end: float = 1.0) -> ObservationStreams:
    """front at 30 Hz, wrist at 20 Hz, joint state at 100 Hz, values encode the stamp."""
    streams = ObservationStreams(SPEC)
    for i in range(int(t_end * 100) + 1):
        t = round(i * 0.01, 6)
        if i % 10 in (0, 3, 7):  # ~30 Hz, irregular
            streams.push_image("front", t, np.full((16, 16, 3), i % 256, np.uint8), "rgb8")
        if i % 5 == 0:
            streams.push_image("wrist", t, np.full((8, 8), i % 256, np.uint8), "mono8")
        streams.push_state(t, ["j2", "extra", "j1"], np.array([-t, 9.0, t]))
    return streams


def test_alignment_picks_latest_sample_at_or_before_tick():
    streams = filled_streams()
    obs = streams.observe(0.5)
    assert isinstance(obs, Observation)
    assert obs.sample_stamps == {"front": 0.5, "wrist": 0.5, STATE_STREAM: 0.5}
    obs = streams.observe(0.56)  # front had 0.53, wrist 0.55, state 0.56
    assert obs.sample_stamps["front"] == 0.53 and obs.sample_stamps["wrist"] == 0.55
    assert obs.images["front"].shape == (8, 8, 3) and int(obs.images["front"][0, 0, 0]) == 53
    assert int(obs.images["wrist"][0, 0, 1]) == 55
    np.testing.assert_allclose(obs.state, [0.56, -0.56], rtol=1e-6)


def test_future_samples_are_not_used():
    streams = ObservationStreams(SPEC)
    streams.push_image("front", 1.0, np.zeros((8, 8, 3), np.uint8), "rgb8")
    streams.push_image("wrist", 1.0, np.zeros((8, 8, 3), np.uint8), "rgb8")
    streams.push_state(1.01, ["j1", "j2"], np.zeros(2))
    inv = streams.observe(1.0)
    assert isinstance(inv, Invalid) and inv.stream == STATE_STREAM and inv.cause == "no_sample"


def test_stale_stream_invalidates_tick_and_is_named():
    streams = filled_streams(1.0)
    assert isinstance(streams.observe(1.0), Observation)
    inv = streams.observe(1.06)  # state (50 ms limit) is 60 ms old, cameras are fine
    assert isinstance(inv, Invalid)
    assert (inv.stream, inv.cause) == (STATE_STREAM, "stale") and "0.060" in inv.reason
    inv = streams.observe(1.2)  # now the cameras are stale too: the first camera is named
    assert inv.stream == "front" and "front" in str(inv)


def test_missing_stream_is_named():
    streams = ObservationStreams(SPEC)
    streams.push_image("front", 1.0, np.zeros((8, 8, 3), np.uint8), "rgb8")
    streams.push_state(1.0, ["j1", "j2"], np.zeros(2))
    inv = streams.observe(1.0)
    assert inv.stream == "wrist" and inv.cause == "no_sample"


def test_backward_frame_rejected_before_preprocessing():
    streams = ObservationStreams(SPEC)
    streams.push_image("front", 1.0, np.zeros((8, 8, 3), np.uint8), "rgb8")
    with pytest.raises(StampOrderError):  # not the encoding error: checked first
        streams.push_image("front", 0.9, np.zeros((8, 8, 3), np.uint8), "bogus")
    with pytest.raises(SampleRejected, match="bogus"):
        streams.push_image("front", 1.1, np.zeros((8, 8, 3), np.uint8), "bogus")
    assert streams.buffers["front"].newest_stamp == 1.0
    streams.clear()
    assert all(len(b) == 0 for b in streams.buffers.values())


def test_spec_validation():
    with pytest.raises(ValueError, match="state"):
        ObservationSpec(("state",), ("j1",))
    with pytest.raises(ValueError, match="state_names"):
        ObservationSpec(("a",), ())
    with pytest.raises(ValueError, match="duplicate"):
        ObservationSpec(("a", "a"), ("j1",))


def test_tick_grid_is_exact_integer_nanoseconds():
    grid = TickGrid.from_rate(10.0)
    assert grid.dt_ns == 100_000_000 and grid.dt == pytest.approx(0.1)
    assert grid.index_at_or_before(1_700_000_000_250_000_000) == 17_000_000_002
    assert grid.index_at_or_before(-1) == -1
    assert grid.stamp_ns(17_000_000_002) == 1_700_000_000_200_000_000
    assert tick_index(grid.time(17_000_000_002), grid.dt) == 17_000_000_002
    with pytest.raises(ValueError):
        TickGrid.from_rate(0.0)


# ----------------------------------------------------------------------------- windows

def test_window_of_consecutive_ticks_oldest_first():
    streams = filled_streams(1.0)
    builder = WindowBuilder(T_o=3, dt=0.1)
    results = [builder.push(t, streams.observe(t)) for t in (0.3, 0.4, 0.5, 0.6)]
    assert results[0] is None and results[1] is None
    w = results[2]
    assert set(w) == {"images", "state", "stamps"}
    np.testing.assert_allclose(w["stamps"], [0.3, 0.4, 0.5])
    assert w["images"]["front"].shape == (3, 8, 8, 3) and w["images"]["front"].dtype == np.uint8
    assert w["state"].shape == (3, 2) and w["state"].dtype == np.float32
    np.testing.assert_allclose(w["state"][:, 0], [0.3, 0.4, 0.5], rtol=1e-6)
    assert [int(f[0, 0, 0]) for f in w["images"]["front"]] == [30, 40, 50]
    np.testing.assert_allclose(results[3]["stamps"], [0.4, 0.5, 0.6])


def test_gap_or_invalid_tick_resets_window():
    streams = filled_streams(1.0)
    builder = WindowBuilder(T_o=2, dt=0.1)
    assert builder.push(0.1, streams.observe(0.1)) is None
    assert builder.push(0.3, streams.observe(0.3)) is None  # gap: 0.2 missing
    assert builder.push(0.4, streams.observe(0.4)) is not None
    assert builder.push(0.5, Invalid(0.5, "front", "stale", "stale")) is None
    assert len(builder) == 0
    assert builder.push(0.6, streams.observe(0.6)) is None
    assert builder.push(0.6, streams.observe(0.6)) is None  # a repeated tick starts over
    np.testing.assert_allclose(builder.push(0.7, streams.observe(0.7))["stamps"], [0.6, 0.7])


def test_T_o_one_gives_a_window_every_valid_tick():
    streams = filled_streams(1.0)
    builder = WindowBuilder(T_o=1, dt=0.1)
    w = builder.push(0.2, streams.observe(0.2))
    assert w["state"].shape == (1, 2) and w["images"]["wrist"].shape == (1, 8, 8, 3)


def test_builder_validation():
    with pytest.raises(ValueError):
        WindowBuilder(0, 0.1)
    with pytest.raises(ValueError):
        WindowBuilder(2, 0.0)


def test_build_observation_accepts_plain_buffers():
    bufs = {"front": StreamBuffer("front", 0.1), STATE_STREAM: StreamBuffer(STATE_STREAM, 0.05)}
    bufs["front"].push(1.0, np.zeros((2, 2, 3), np.uint8))
    bufs[STATE_STREAM].push(1.0, np.zeros(1, np.float32))
    spec = ObservationSpec(("front",), ("j",), 2, 2)
    assert isinstance(build_observation(bufs, 1.04, spec), Observation)
    assert build_observation(bufs, 1.06, spec).stream == STATE_STREAM
