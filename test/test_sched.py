"""Real-time scheduling of the control loop, normal scheduling of inference threads."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
from helpers_policy import StubPolicy

from dp_ros.policy.runner import PlanJob, PlanRunner
from dp_ros.policy.swap import PolicyLoader
from dp_ros.sched import (ensure_normal_priority, freeze_heap, normal_priority_section,
                          raise_thread, raise_threads, realtime_section, request_realtime)

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux only")


def in_thread(fn):
    """fn() on a fresh thread (scheduling changes stay there); its result or exception."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def realtime_or_skip(priority: int = 10) -> None:
    refused = request_realtime(priority)
    if refused:
        pytest.skip(f"SCHED_FIFO not permitted here: {refused}")


@pytest.mark.parametrize("priority", [0, -1, 100])
def test_out_of_range_priority_is_refused_with_a_reason(priority):
    # the thread that asked keeps its normal policy
    reason, policy = in_thread(lambda: (request_realtime(priority), os.sched_getscheduler(0)))
    assert reason and "outside 1..99" in reason
    assert policy == os.SCHED_OTHER


def test_realtime_applies_to_the_calling_thread_only_and_can_be_dropped():
    def body():
        realtime_or_skip(10)
        mine = os.sched_getscheduler(0)
        inherited = in_thread(lambda: os.sched_getscheduler(0))  # a thread started now
        ensure_normal_priority()
        return mine, inherited, os.sched_getscheduler(0)
    mine, inherited, after = in_thread(body)
    assert mine == os.SCHED_FIFO
    assert inherited == os.SCHED_FIFO  # why the inference threads must drop it themselves
    assert after == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this (test) thread never changed


def test_realtime_section_raises_the_block_only_and_runs_it_when_refused(monkeypatch):
    import dp_ros.sched as sched

    def body():
        with realtime_section(0):
            off = os.sched_getscheduler(0)
        if request_realtime(10) is not None:
            return off, None, None
        ensure_normal_priority()
        with realtime_section(10):
            inside = os.sched_getscheduler(0)
        return off, inside, os.sched_getscheduler(0)
    off, inside, after = in_thread(body)
    assert off == os.SCHED_OTHER
    if inside is None:
        pytest.skip("SCHED_FIFO not permitted here")
    assert (inside, after) == (os.SCHED_FIFO, os.SCHED_OTHER)
    # refused: the block still runs, at normal priority
    monkeypatch.setattr(sched, "request_realtime", lambda p: "not permitted: test")
    ran = []

    def refused():
        with realtime_section(10):
            ran.append(os.sched_getscheduler(0))
    in_thread(refused)
    assert ran == [os.SCHED_OTHER]


def test_normal_priority_section_lowers_a_realtime_thread_and_gives_its_priority_back():
    def body():
        with normal_priority_section():  # a normal thread: nothing to do
            plain = os.sched_getscheduler(0)
        realtime_or_skip(12)
        with normal_priority_section():
            inside = os.sched_getscheduler(0)
            started = in_thread(lambda: os.sched_getscheduler(0))  # e.g. a thread pool
        after = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
        ensure_normal_priority()
        return plain, inside, started, after
    plain, inside, started, after = in_thread(body)
    assert plain == inside == started == os.SCHED_OTHER
    assert after == (os.SCHED_FIFO, 12)


def test_raise_threads_puts_the_named_threads_of_this_process_under_fifo():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    ready, done = threading.Barrier(3), threading.Event()
    tids = {}

    def named(name: bytes):
        if name:
            libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
        tids[name] = threading.get_native_id()
        ready.wait()
        done.wait(30)
    threads = [threading.Thread(target=named, args=(n,)) for n in (b"dds.test.1", b"")]
    for t in threads:
        t.start()
    ready.wait()
    try:
        if not in_thread(lambda: request_realtime(5) is None):
            pytest.skip("SCHED_FIFO not permitted here")
        assert raise_threads("dds.test", 5) == ["dds.test.1"]
        assert os.sched_getscheduler(tids[b"dds.test.1"]) == os.SCHED_FIFO
        assert os.sched_getparam(tids[b"dds.test.1"]).sched_priority == 5
        assert os.sched_getscheduler(tids[b""]) == os.SCHED_OTHER  # not named so
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        done.set()
        for t in threads:
            t.join(10)


def test_worker_and_loader_threads_started_from_a_realtime_thread_run_normally():
    stub = StubPolicy()
    outcomes, loads = [], []
    loader_policy = []

    def load(path, device=None, seed=None):
        loader_policy.append(os.sched_getscheduler(0))
        raise FileNotFoundError(path)

    def body():
        realtime_or_skip(10)
        runner = PlanRunner(stub, outcomes.append)
        runner.start()  # started by a SCHED_FIFO thread
        runner.submit(PlanJob({}, 0))
        loader = PolicyLoader(load=load)
        loads.append(loader.submit("/nowhere").result(10))
        loader.shutdown()
        pause = threading.Event()
        for _ in range(200):
            if outcomes:
                break
            pause.wait(0.05)
        runner.stop()
    in_thread(body)
    assert stub.seen == [os.SCHED_OTHER]
    assert outcomes and outcomes[0].ok and outcomes[0].queue_wait >= 0.0
    assert loader_policy == [os.SCHED_OTHER]
    assert loads[0] is not None and loads[0].policy is None


def test_an_idle_worker_is_raised_to_wake_and_plans_at_normal_priority(monkeypatch):
    import dp_ros.policy.runner as runner_module
    in_thread(lambda: realtime_or_skip(5))  # permitted here? (the probe thread ends)
    raised = []
    monkeypatch.setattr(runner_module, "raise_thread",
                        lambda tid, priority: raised.append((tid, priority,
                                                             raise_thread(tid, priority))))
    stub = StubPolicy(seconds=0.3)
    outcomes = []
    runner = PlanRunner(stub, outcomes.append, wake_priority=5)
    runner.start()
    try:
        runner.submit(PlanJob({}, 1))  # idle: raised to wake
        for _ in range(100):
            if runner.busy:
                break
            threading.Event().wait(0.01)
        runner.submit(PlanJob({}, 2))  # planning: never raised
        for _ in range(200):
            if len(outcomes) == 2:
                break
            threading.Event().wait(0.05)
    finally:
        runner.stop()
    assert [o.job.plan_stamp_ns for o in outcomes] == [1, 2]
    assert raised == [(runner._thread.native_id, 5, True)]
    assert stub.seen == [os.SCHED_OTHER, os.SCHED_OTHER]  # planned at normal priority


@pytest.mark.ros
def test_executor_node_parameter_applies_realtime_or_warns(ros_context, monkeypatch):
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter

    import dp_ros.nodes.realtime as realtime
    from dp_ros.nodes.trajectory_executor import TrajectoryExecutorNode

    def make(priority):
        return TrajectoryExecutorNode(context=ros_context, parameter_overrides=[
            Parameter("joint_names", value=["a", "b"]),
            Parameter("realtime_priority", value=priority)])

    def body(priority):
        node = make(priority)
        try:
            return node.realtime_priority, os.sched_getscheduler(0)
        finally:
            node.destroy_node()

    assert in_thread(lambda: body(0)) == (0, os.SCHED_OTHER)
    if not in_thread(lambda: request_realtime(7) is None):
        pytest.skip("SCHED_FIFO not permitted here")
    assert in_thread(lambda: body(7)) == (7, os.SCHED_FIFO)
    # without permission: a warning, normal scheduling, the node runs
    monkeypatch.setattr(realtime, "request_realtime", lambda p: "not permitted: test")
    assert in_thread(lambda: body(7)) == (0, os.SCHED_OTHER)


def test_freeze_heap_collects_garbage_first_then_keeps_objects_out_of_later_passes():
    class Node:
        pass
    cycle = Node()
    cycle.me = cycle  # garbage only a collection frees
    dead = weakref.ref(cycle)
    kept = Node()
    del cycle
    try:
        freeze_heap()
        assert dead() is None  # collected before freezing, not frozen for good
        assert gc.get_freeze_count() > 0
        # a kept object is now outside every generation a collection scans
        assert not any(o is kept for o in gc.get_objects())
    finally:
        gc.unfreeze()
