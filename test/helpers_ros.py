"""Helpers shared by the tests that run nodes over real DDS: polling, spinning an rclpy
executor on a thread, parameter files, and the environment of node subprocesses."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll `cond` until it holds; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def subprocess_env() -> dict[str, str]:
    """This process's environment (ROS_DOMAIN_ID of the test included) + what the pip ROS
    wheels need in a child."""
    env = dict(os.environ)
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie of a still-running parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Spinner:
    """Spins an executor on a thread until stopped."""

    def __init__(self, executor):
        self.executor = executor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # context shut down under us: stop
                if self._stop.is_set():
                    return
                raise

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.executor.shutdown()


def stop_in_process(nodes: list, spinner: Spinner, *others) -> None:
    """Tear down nodes built by bringup.create_nodes and spun by `spinner`: stop them (the
    executor's final hold goes out while the executor still spins), stop spinning, then
    destroy them and the test's own nodes (`others`)."""
    from dp_ros import bringup
    bringup.stop_nodes(nodes)
    spinner.stop()
    for node in [*reversed(nodes), *others]:
        node.destroy_node()
