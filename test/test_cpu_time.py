"""The CPU-time reading that `dp-ros bench ros` prints beside its p99 figures."""

from dp_ros.bench.cpu_time import CpuTimes, read_cpu_times


def test_busy_and_steal_shares_from_proc_stat_lines(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    before = read_cpu_times(stat)
    stat.write_text("cpu  400 0 150 1000 50 10 10 180 0 0\n")
    after = read_cpu_times(stat)
    assert before == CpuTimes(busy=150, idle=850, steal=0)
    busy, steal = after.share_since(before)
    assert (busy, steal) == (420 / 800, 180 / 800)  # 420 busy + 200 idle + 180 stolen ticks


def test_no_proc_stat_gives_none(tmp_path):
    assert read_cpu_times(tmp_path / "missing") is None
    same = CpuTimes(1, 2, 3)
    assert same.share_since(same) == (0.0, 0.0)
