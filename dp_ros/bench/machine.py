"""What this machine can do: measured matmul throughput and memory read bandwidth.

The plan-latency bound of a policy is the larger of its FLOPs over the matmul rate and its
weight bytes over the read bandwidth (at batch 1 the U-Net streams every weight once per
denoising step, so bandwidth usually wins on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class MachineRates:
    matmul_flops: float  # FLOP/s, fp32
    read_bytes: float  # bytes/s

    def bound_seconds(self, flops: float, bytes_read: float) -> float:
        return max(flops / self.matmul_flops, bytes_read / self.read_bytes)

    def best(self, other: "MachineRates") -> "MachineRates":
        """The faster of two measurements of each rate. A bound must not be loosened by a
        measurement a neighbour slowed (on this VM one read 13 GB/s against 22 the next)."""
        return MachineRates(max(self.matmul_flops, other.matmul_flops),
                            max(self.read_bytes, other.read_bytes))

    def line(self) -> str:
        return f"matmul {self.matmul_flops / 1e9:.0f} GFLOP/s fp32, memory read {self.read_bytes / 1e9:.1f} GB/s"


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(n: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def run():
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return 2.0 * n**3 / _best_time(run, repeats)


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 10, device: str = "cpu") -> float:
    """Bytes/s for a streaming read of a buffer far larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)

    def run():
        x.sum()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return x.numel() * 4 / _best_time(run, repeats)


def measure_machine(device: str = "cpu") -> MachineRates:
    return MachineRates(measure_matmul_flops(device=device), measure_read_bandwidth(device=device))
