"""Test isolation for DDS: this pytest process gets its own ROS_DOMAIN_ID and discovery
stays on localhost, so parallel or concurrent test runs cannot hear each other.
Tests that need rclpy take the ``ros_context`` fixture: a fresh rclpy Context on a domain
of its own, shut down afterwards."""

from __future__ import annotations

import itertools
import os

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")

_BASE_DOMAIN = int(os.environ["ROS_DOMAIN_ID"])
_next_domain = itertools.count()


def fresh_domain_id() -> int:
    """A domain id not used before by this process (valid ids on localhost: 0..232)."""
    return 101 + (_BASE_DOMAIN * 7 + next(_next_domain)) % 130


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models run fastest on one thread, and do not collapse when the two cores are
    shared with node subprocesses or other test runs."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def main_thread_stays_normal_priority():
    """A node built with realtime_priority > 0 on the test's own thread would leave every
    later test running under SCHED_FIFO: such tests must build their nodes on a thread of
    their own. Fails the test that did it (and restores normal scheduling)."""
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail("the test left the main thread under a real-time scheduling policy")


@pytest.fixture
def ros_domain(monkeypatch) -> int:
    """A domain id of this test's own, exported so subprocesses join it too."""
    domain = fresh_domain_id()
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    return domain


@pytest.fixture
def ros_context(ros_domain):
    import rclpy
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=ros_domain)
    try:
        yield ctx
    finally:
        if ctx.ok():
            rclpy.shutdown(context=ctx)


@pytest.fixture(scope="module")
def cfg():
    """helpers_policy.small_config(), for the tests that build models from it."""
    from helpers_policy import small_config
    return small_config()


@pytest.fixture(scope="module")
def model(cfg):
    """A model of `cfg` with fixed (seed 0) random weights."""
    import torch

    from dp_ros.policy.model import build_model
    torch.manual_seed(0)
    return build_model(cfg)
