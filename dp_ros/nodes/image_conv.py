"""sensor_msgs Image / CompressedImage <-> numpy, without cv_bridge (no pip wheel).

Decoding returns a view on the message buffer where it can (np.frombuffer, no copy) plus
the encoding the pixels are in; preprocessing (dp_ros.control.observation) copies.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

# the decoding itself is rclpy-free, shared with the dataset builder (bags)
from dp_ros.control.image_decode import (CHANNELS, ImageFormatError,  # noqa: F401
                                         compressed_image_to_numpy, raw_image_to_numpy)


def image_to_numpy(msg: Image) -> tuple[np.ndarray, str]:
    """Image (rgb8, bgr8, mono8) -> (uint8 (H, W, 3) or (H, W) view, encoding).

    Honours ``step`` (row padding) and checks that ``data`` holds exactly step * height
    bytes (dp_ros.control.image_decode.raw_image_to_numpy)."""
    return raw_image_to_numpy(msg.encoding, msg.height, msg.width, msg.step, msg.data)


def compressed_to_numpy(msg: CompressedImage) -> tuple[np.ndarray, str]:
    """CompressedImage (jpeg, png; any format OpenCV decodes) -> (pixels, encoding):
    bgr8 (H, W, 3) for colour images, mono8 (H, W) for grey ones
    (dp_ros.control.image_decode.compressed_image_to_numpy)."""
    return compressed_image_to_numpy(msg.format, msg.data)


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
