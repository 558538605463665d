"""Camera message pixels -> numpy, from the raw message fields (no rclpy, no cv_bridge).

The one decoder of sensor_msgs/Image and sensor_msgs/CompressedImage contents. The
aggregator node calls it with rclpy messages (dp_ros.nodes.image_conv), the dataset
builder and offline evaluation with messages deserialized from bags by rosbags: both
pass the same fields, so both see the same pixels.

Decoding returns a view on the message buffer where it can (np.frombuffer, no copy) plus
the encoding the pixels are in; preprocessing (dp_ros.control.observation) copies.
"""

from __future__ import annotations

import cv2
import numpy as np

from dp_ros.control.streams import SampleRejected

CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}


class ImageFormatError(SampleRejected):
    """An image message that cannot be decoded; ``cause`` is one of
    unsupported_encoding, bad_size, corrupt_image."""


def raw_image_to_numpy(encoding: str, height: int, width: int, step: int,
                       data) -> tuple[np.ndarray, str]:
    """sensor_msgs/Image fields (rgb8, bgr8, mono8) -> (uint8 (H, W, 3) or (H, W) view,
    encoding). ``data``: any buffer (bytes, array.array, numpy uint8).

    Honours ``step`` (row padding) and checks that ``data`` holds exactly step * height
    bytes."""
    channels = CHANNELS.get(encoding)
    if channels is None:
        raise ImageFormatError("unsupported_encoding",
                               f"unsupported image encoding {encoding!r} "
                               f"(expected one of {', '.join(CHANNELS)})")
    h, w, step = int(height), int(width), int(step)
    row = w * channels
    if h < 1 or w < 1:
        raise ImageFormatError("bad_size", f"empty image {h}x{w}")
    if step < row:
        raise ImageFormatError("bad_size", f"step {step} < width {w} * {channels} channel(s)")
    pixels = np.frombuffer(data, dtype=np.uint8)
    if pixels.size != step * h:
        raise ImageFormatError("bad_size", f"{encoding} {h}x{w} step {step}: expected "
                                           f"{step * h} data bytes, got {pixels.size}")
    rows = pixels.reshape(h, step)
    if step != row:
        rows = rows[:, :row]  # drop row padding (still a view)
    pixels = rows.reshape(h, w, channels) if channels > 1 else rows
    return pixels, encoding


def compressed_image_to_numpy(fmt: str, data) -> tuple[np.ndarray, str]:
    """sensor_msgs/CompressedImage fields (jpeg, png; any format OpenCV decodes) ->
    (pixels, encoding): bgr8 (H, W, 3) for colour images, mono8 (H, W) for grey ones."""
    data = np.frombuffer(data, dtype=np.uint8)
    what = f"compressed image (format {fmt!r}, {data.size} bytes)"
    if data.size == 0:
        raise ImageFormatError("corrupt_image", f"empty {what}")
    # libjpeg "decodes" a truncated JPEG as grey fill with only a warning: check its end
    # marker (EOI, FF D9) near the end of the data
    if data.size >= 2 and data[0] == 0xFF and data[1] == 0xD8:
        tail = data[-64:].tobytes()
        if b"\xff\xd9" not in tail:
            raise ImageFormatError("corrupt_image", f"truncated JPEG: no end marker in {what}")
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageFormatError("corrupt_image", f"cannot decode {what}")
    if pixels.dtype != np.uint8:
        raise ImageFormatError("unsupported_encoding", f"{what} decodes to {pixels.dtype}, "
                                                       "expected 8 bits per channel")
    if pixels.ndim == 2:
        return pixels, "mono8"
    if pixels.shape[2] == 1:
        return pixels[:, :, 0], "mono8"
    if pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2BGR), "bgr8"
    if pixels.shape[2] == 3:
        return pixels, "bgr8"
    raise ImageFormatError("unsupported_encoding", f"{what} has {pixels.shape[2]} channels")
