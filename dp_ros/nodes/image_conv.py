"""sensor_msgs Image / CompressedImage <-> numpy, without cv_bridge (no pip wheel).

Decoding returns a view on the message buffer where it can (np.frombuffer, no copy) plus
the encoding the pixels are in; preprocessing (dp_ros.control.observation) copies.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

from dp_ros.control.streams import SampleRejected

CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}


class ImageFormatError(SampleRejected):
    """An image message that cannot be decoded; ``cause`` is one of
    unsupported_encoding, bad_size, corrupt_image."""


def image_to_numpy(msg: Image) -> tuple[np.ndarray, str]:
    """Image (rgb8, bgr8, mono8) -> (uint8 (H, W, 3) or (H, W) view, encoding).

    Honours ``step`` (row padding) and checks that ``data`` holds exactly step * height
    bytes."""
    encoding = msg.encoding
    channels = CHANNELS.get(encoding)
    if channels is None:
        raise ImageFormatError("unsupported_encoding",
                               f"unsupported image encoding {encoding!r} "
                               f"(expected one of {', '.join(CHANNELS)})")
    h, w, step = msg.height, msg.width, msg.step
    row = w * channels
    if h < 1 or w < 1:
        raise ImageFormatError("bad_size", f"empty image {h}x{w}")
    if step < row:
        raise ImageFormatError("bad_size", f"step {step} < width {w} * {channels} channel(s)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * h:
        raise ImageFormatError("bad_size", f"{encoding} {h}x{w} step {step}: expected "
                                           f"{step * h} data bytes, got {data.size}")
    rows = data.reshape(h, step)
    if step != row:
        rows = rows[:, :row]  # drop row padding (still a view)
    pixels = rows.reshape(h, w, channels) if channels > 1 else rows
    return pixels, encoding


def compressed_to_numpy(msg: CompressedImage) -> tuple[np.ndarray, str]:
    """CompressedImage (jpeg, png; any format OpenCV decodes) -> (pixels, encoding):
    bgr8 (H, W, 3) for colour images, mono8 (H, W) for grey ones."""
    data = np.frombuffer(msg.data, dtype=np.uint8)
    what = f"compressed image (format {msg.format!r}, {data.size} bytes)"
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


def numpy_to_image(pixels: np.ndarray, encoding: Optional[str] = None,
                   stamp: Optional[Time] = None, frame_id: str = "") -> Image:
    """uint8 (H, W, 3) (rgb8 unless ``encoding`` says bgr8) or (H, W) mono8 -> Image."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {pixels.dtype}")
    if encoding is None:
        encoding = "mono8" if pixels.ndim == 2 else "rgb8"
    channels = CHANNELS.get(encoding)
    if channels is None:
        raise ValueError(f"unsupported image encoding {encoding!r}")
    expected_ndim = 2 if channels == 1 else 3
    if pixels.ndim != expected_ndim or (channels > 1 and pixels.shape[2] != channels):
        raise ValueError(f"{encoding} image has shape {pixels.shape}")
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels
    msg.data = np.ascontiguousarray(pixels).tobytes()  # bytes assign is a memcpy
    return msg
