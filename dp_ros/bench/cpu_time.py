"""CPU time of the whole machine over an interval, from /proc/stat: how busy it was and how
much a hypervisor took away (steal). No torch here: the bench's sensor process imports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class CpuTimes:
    """The machine's cumulative CPU time in clock ticks (/proc/stat): busy, idle, and steal
    (time a hypervisor ran something else while this guest's vCPU wanted to run)."""

    busy: int
    idle: int
    steal: int

    def share_since(self, before: "CpuTimes") -> tuple[float, float]:
        """(busy, steal) as fractions of all CPU time between `before` and this reading."""
        busy, idle, steal = (self.busy - before.busy, self.idle - before.idle,
                             self.steal - before.steal)
        total = busy + idle + steal
        return (busy / total, steal / total) if total > 0 else (0.0, 0.0)


def read_cpu_times(stat: Path = Path("/proc/stat")) -> Optional[CpuTimes]:
    """None where there is no Linux /proc/stat."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return CpuTimes(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)
