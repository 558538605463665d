"""Ranges for parameter descriptors: `ros2 param describe` shows them and rclpy enforces
them when a parameter is set."""

from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange


def float_range(lo: float, hi: float) -> list[FloatingPointRange]:
    return [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]


def int_range(lo: int, hi: int) -> list[IntegerRange]:
    return [IntegerRange(from_value=lo, to_value=hi, step=1)]
