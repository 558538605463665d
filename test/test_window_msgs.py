"""Message conversion without DDS: image_conv (Image / CompressedImage <-> numpy) and the
window convention (encode / decode / join), plus the shared diagnostics helpers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from dp_ros.control.observation import preprocess_image  # noqa: E402
from dp_ros.nodes.diagnostics import CauseLog, make_array, make_status, worst  # noqa: E402
from dp_ros.nodes.image_conv import (ImageFormatError, compressed_to_numpy,  # noqa: E402
                                     image_to_numpy, numpy_to_image)
from dp_ros.nodes.window_msgs import (STATE_PART, WindowFormatError,  # noqa: E402
                                      WindowJoiner, decode_window, encode_window, ns_to_stamp,
                                      stamp_to_ns, validate_camera_name, window_image_topic,
                                      window_state_topic)


def pattern(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(y * 7) % 256, (x * 5) % 256, (x + y) % 256], -1).astype(np.uint8)


def raw_image(pixels: np.ndarray, encoding: str, pad: int = 0) -> Image:
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1)
    data = np.concatenate([row, np.full((h, pad), 77, np.uint8)], axis=1) if pad else row
    return Image(height=h, width=w, encoding=encoding, step=row.shape[1] + pad,
                 data=data.tobytes())


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8"])
@pytest.mark.parametrize("pad", [0, 5])
def test_image_roundtrip_honours_step(encoding, pad):
    pixels = pattern(6, 9) if encoding != "mono8" else pattern(6, 9)[:, :, 0].copy()
    out, enc = image_to_numpy(raw_image(pixels, encoding, pad))
    assert enc == encoding
    np.testing.assert_array_equal(out, pixels)


def test_image_errors_have_causes():
    with pytest.raises(ImageFormatError, match="yuv422") as err:
        image_to_numpy(Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8)))
    assert err.value.cause == "unsupported_encoding"
    with pytest.raises(ImageFormatError, match="expected 12") as err:
        image_to_numpy(Image(height=2, width=2, encoding="rgb8", step=6, data=bytes(11)))
    assert err.value.cause == "bad_size"
    with pytest.raises(ImageFormatError) as err:
        image_to_numpy(Image(height=2, width=2, encoding="rgb8", step=5, data=bytes(10)))
    assert err.value.cause == "bad_size"


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed_colour_decodes_to_bgr(ext):
    rgb = pattern(16, 24)
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1].copy())
    pixels, enc = compressed_to_numpy(CompressedImage(format=ext[1:], data=buf.tobytes()))
    assert enc == "bgr8" and pixels.shape == (16, 24, 3)
    out = preprocess_image(pixels, enc, 16, 24)
    tol = 0 if ext == ".png" else 40  # jpeg is lossy
    assert np.abs(out.astype(int) - rgb).max() <= tol


def test_compressed_grey_png_is_mono8():
    grey = pattern(8, 8)[:, :, 0].copy()
    _, buf = cv2.imencode(".png", grey)
    pixels, enc = compressed_to_numpy(CompressedImage(format="png", data=buf.tobytes()))
    assert enc == "mono8"
    np.testing.assert_array_equal(pixels, grey)


def test_corrupt_and_truncated_compressed_rejected():
    _, buf = cv2.imencode(".jpg", pattern(32, 32))
    data = buf.tobytes()
    for bad in (b"", b"\x00garbage" * 20, data[:len(data) // 2], b"\xff\xd8" + bytes(100)):
        with pytest.raises(ImageFormatError) as err:
            compressed_to_numpy(CompressedImage(format="jpeg", data=bad))
        assert err.value.cause == "corrupt_image"


def test_numpy_to_image():
    msg = numpy_to_image(pattern(4, 5), stamp=Time(sec=3, nanosec=7), frame_id="f")
    assert (msg.height, msg.width, msg.step, msg.encoding) == (4, 5, 15, "rgb8")
    assert msg.header.stamp.sec == 3 and msg.header.frame_id == "f"
    np.testing.assert_array_equal(image_to_numpy(msg)[0], pattern(4, 5))
    assert numpy_to_image(np.zeros((2, 2), np.uint8)).encoding == "mono8"
    with pytest.raises(ValueError):
        numpy_to_image(np.zeros((2, 2, 3), np.float32))


# ----------------------------------------------------------------------------- window

def make_window(T_o=2, t0=1_700_000_000.3, dt=0.1):
    rng = np.random.default_rng(1)
    return {"images": {"front": rng.integers(0, 256, (T_o, 6, 8, 3), dtype=np.uint8),
                       "wrist": rng.integers(0, 256, (T_o, 6, 8, 3), dtype=np.uint8)},
            "state": rng.normal(size=(T_o, 3)).astype(np.float32),
            "stamps": np.array([t0 + i * dt for i in range(T_o)])}


def test_window_roundtrip_and_convention():
    window = make_window(T_o=3)
    images, traj = encode_window(window, ["front", "wrist"], ["a", "b", "c"], 0.1)
    strip = images["front"]
    assert (strip.height, strip.width, strip.encoding) == (18, 8, "rgb8")
    assert stamp_to_ns(strip.header.stamp) == 17_000_000_003 * 100_000_000  # oldest tick
    assert stamp_to_ns(traj.header.stamp) == stamp_to_ns(strip.header.stamp)
    assert [p.time_from_start.nanosec for p in traj.points] == [0, 100_000_000, 200_000_000]
    assert list(traj.joint_names) == ["a", "b", "c"]
    # top of the filmstrip is the oldest frame
    np.testing.assert_array_equal(image_to_numpy(strip)[0][:6], window["images"]["front"][0])

    out = decode_window(images, traj, 3, ["front", "wrist"], ["a", "b", "c"], (6, 8), 0.1)
    for cam in ("front", "wrist"):
        np.testing.assert_array_equal(out["images"][cam], window["images"][cam])
    np.testing.assert_array_equal(out["state"], window["state"])
    assert out["state"].dtype == np.float32
    np.testing.assert_allclose(out["stamps"], window["stamps"], atol=1e-6)
    out2 = decode_window(images, traj, 3)  # dt from time_from_start
    np.testing.assert_array_equal(out2["stamps"], out["stamps"])


def test_decode_validation():
    window = make_window()
    images, traj = encode_window(window, ["front", "wrist"], ["a", "b", "c"], 0.1)
    with pytest.raises(WindowFormatError, match="points"):
        decode_window(images, traj, 3)
    with pytest.raises(WindowFormatError, match="joint names"):
        decode_window(images, traj, 2, state_names=["c", "b", "a"])
    with pytest.raises(WindowFormatError, match="wrist"):
        decode_window({"front": images["front"]}, traj, 2, ["front", "wrist"])
    with pytest.raises(WindowFormatError, match="expected 5x8"):
        decode_window(images, traj, 2, image_size=(5, 8))
    with pytest.raises(WindowFormatError, match="dt"):
        decode_window(images, traj, 2, dt=0.05)
    images["wrist"].header.stamp = ns_to_stamp(stamp_to_ns(traj.header.stamp) + 1)
    with pytest.raises(WindowFormatError, match="stamp"):
        decode_window(images, traj, 2)
    images["wrist"].header.stamp = traj.header.stamp
    traj.points[1].positions[0] = float("nan")
    with pytest.raises(WindowFormatError, match="non-finite"):
        decode_window(images, traj, 2)


def test_encode_rejects_off_grid_or_gappy_stamps():
    window = make_window()
    window["stamps"] = np.array([0.1, 0.3])
    with pytest.raises(WindowFormatError, match="consecutive"):
        encode_window(window, ["front", "wrist"], ["a", "b", "c"], 0.1)
    window["stamps"] = np.array([0.15, 0.25])
    with pytest.raises(WindowFormatError, match="grid"):
        encode_window(window, ["front", "wrist"], ["a", "b", "c"], 0.1)


def test_topic_names_and_camera_names():
    assert window_image_topic("~", "front") == "~/window/front"
    assert window_image_topic("/obs_aggregator/", "front") == "/obs_aggregator/window/front"
    assert window_state_topic("/ns/agg") == "/ns/agg/window/state"
    assert window_state_topic("") == "/window/state"
    for bad in ("state", "1cam", "a/b", ""):
        with pytest.raises(ValueError):
            validate_camera_name(bad)


def _parts(t0_ns):
    window = make_window(t0=t0_ns * 1e-9)
    images, traj = encode_window(window, ["front", "wrist"], ["a", "b", "c"], 0.1)
    return images, traj


def test_joiner_joins_by_exact_stamp_in_any_order():
    joiner = WindowJoiner(["front", "wrist"])
    a_img, a_st = _parts(1_000_000_000)
    b_img, b_st = _parts(1_100_000_000)
    assert joiner.add("front", a_img["front"]) is None
    assert joiner.add(STATE_PART, b_st) is None
    assert joiner.add("wrist", b_img["wrist"]) is None
    assert joiner.add(STATE_PART, a_st) is None
    joined = joiner.add("front", b_img["front"])
    assert joined.stamp_ns == 1_100_000_000 and set(joined.images) == {"front", "wrist"}
    assert joined.state is b_st
    assert joiner.add("wrist", a_img["wrist"]) is None  # older than the newest complete
    with pytest.raises(KeyError):
        joiner.add("side", a_img["front"])


def test_joiner_bounded_and_survives_clock_jump_back():
    joiner = WindowJoiner(["front", "wrist"], max_pending=3)
    for k in range(10):
        img, _ = _parts(10_000_000_000 + k * 100_000_000)
        joiner.add("front", img["front"])
    assert len(joiner._pending) <= 3
    img, st = _parts(20_000_000_000)
    joiner.add("front", img["front"]), joiner.add("wrist", img["wrist"])
    assert joiner.add(STATE_PART, st) is not None
    img, st = _parts(5_000_000_000)  # a bag replay looped: 15 s back
    joiner.add("front", img["front"]), joiner.add("wrist", img["wrist"])
    assert joiner.add(STATE_PART, st).stamp_ns == 5_000_000_000


# ----------------------------------------------------------------------------- diagnostics

class _Logger:
    def __init__(self):
        self.lines = []

    def warning(self, msg):
        self.lines.append(msg)


def test_cause_log_logs_once_per_cause_and_counts():
    logger = _Logger()
    log = CauseLog(logger)
    for _ in range(100):
        log.report("front", "bad_size", "expected 12 bytes")
    log.report("front", "corrupt_image", "x")
    log.report("state", "non_finite", "nan")
    assert len(logger.lines) == 3
    assert log.counts("front") == {"bad_size": 100, "corrupt_image": 1}
    assert log.counts()["state/non_finite"] == 1 and log.total() == 102
    assert log.last("front") == "corrupt_image: x"


def test_status_helpers():
    status = make_status("n: x", DiagnosticStatus.WARN, "m", {"a": 1, "b": 0.5})
    assert status.level == DiagnosticStatus.WARN and status.values[1].value == "0.5"
    assert make_status("n", 2, "m").level == DiagnosticStatus.ERROR
    assert worst([DiagnosticStatus.OK, DiagnosticStatus.WARN]) == DiagnosticStatus.WARN
    arr = make_array(Time(sec=1), [status])
    assert arr.header.stamp.sec == 1 and arr.status[0].name == "n: x"
