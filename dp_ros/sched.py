"""Thread scheduling: real-time priority for the control loop, normal priority for inference.

On a loaded machine a 100 Hz control loop at normal priority waits behind whatever else is
runnable (measured on 2 cores: command period jitter p99 of tens of ms). ``SCHED_FIFO``
lets the loop preempt everything at normal priority, as ros2_control runs its controller
thread. It needs permission: root, ``CAP_SYS_NICE``, or an rtprio limit, e.g. in
``/etc/security/limits.conf``: ``@robot - rtprio 90`` (then log in again).

Linux applies the policy to the calling thread, and threads inherit it from the thread
that starts them, so threads doing heavy work (inference, loading) drop back to normal
priority at their start with ``ensure_normal_priority``: a real-time inference thread could
starve the whole machine.

Messages reach a node through its process's DDS threads, which the middleware starts at
normal priority: ``raise_threads`` puts them under SCHED_FIFO too. A normal-priority
worker that must hand a result on at once (the policy node publishing a plan) does so in a
``realtime_section``; one that must start at once when handed a job is raised by the
thread that hands it over (``raise_thread``) and drops back before the heavy work.

The garbage collector pauses every thread of a process, real-time or not: ``freeze_heap``
keeps it from rescanning what start-up built.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Optional

MAX_PRIORITY = 99


def request_realtime(priority: int) -> Optional[str]:
    """Run the calling thread under SCHED_FIFO at `priority` (1-99). None when applied,
    else the reason it was not (the thread keeps its current policy)."""
    if not 1 <= priority <= MAX_PRIORITY:
        return f"priority {priority} outside 1..{MAX_PRIORITY}"
    if not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO is not available on this platform"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        return ("not permitted: run with CAP_SYS_NICE or an rtprio limit (limits.conf: "
                f"'@robot - rtprio {priority}')")
    except OSError as err:
        return f"sched_setscheduler failed: {err}"
    return None


DDS_THREAD_PREFIX = "dds."  # Fast DDS names its threads dds.shm.<port>, dds.udp.<port>, ...


def raise_threads(prefix: str, priority: int) -> list[str]:
    """Put this process's threads named `prefix`... under SCHED_FIFO at `priority`; the names
    of those raised. Linux only (/proc/self/task); threads that refuse are left as they are."""
    raised = []
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks) or not hasattr(os, "sched_setscheduler"):
        return raised
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended
            continue
        if name.startswith(prefix) and raise_thread(int(tid), priority):
            raised.append(name)
    return raised


def raise_thread(tid: int, priority: int) -> bool:
    """Put thread `tid` (a native id) under SCHED_FIFO at `priority`; False when it ended or
    it is not permitted."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
    except OSError:
        return False
    return True


def ensure_normal_priority() -> None:
    """Drop the calling thread to SCHED_OTHER if it inherited a real-time policy."""
    if not hasattr(os, "sched_getscheduler"):
        return
    if os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@contextlib.contextmanager
def realtime_section(priority: int):
    """Run the block under SCHED_FIFO at `priority` (when > 0 and permitted), then back to
    normal: for the few hundred microseconds in which a normal-priority worker hands its
    result on (publishing a plan), so the hand-over does not queue behind the work the
    worker itself set going (inference threads still spinning down) or other processes."""
    raised = priority > 0 and request_realtime(priority) is None
    try:
        yield
    finally:
        if raised:
            ensure_normal_priority()


@contextlib.contextmanager
def normal_priority_section():
    """Run the block at normal priority, then give the calling thread its real-time policy
    back. Thread pools made in the block (torch's, onnxruntime's: made while a policy
    loads) inherit normal priority even when the caller is under SCHED_FIFO, as when
    `dp-ros up --single-process` builds every node on the thread the aggregator raised:
    real-time inference threads could starve the machine."""
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    if policy not in (getattr(os, "SCHED_FIFO", None), getattr(os, "SCHED_RR", None)):
        yield
        return
    param = os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)  # permitted: the thread had it


def freeze_heap() -> None:
    """Collect once, then exclude every object that exists now from later collections.

    Call once a node is built. A full collection otherwise rescans everything the imports
    and the node created (rclpy, numpy, torch: some 37k objects, 30-40 ms a pass on the
    development machine) and stops the control loop for that long whenever the allocation
    churn of 500 Hz joint states triggers one. Objects made later are still collected."""
    gc.collect()
    gc.freeze()
