"""dp_ros.bringup and `dp-ros up`: the node-set description, parameter files, the
`--ros-args` each node gets, and the process supervision (Ctrl-C / SIGTERM stop every node
cleanly, a dying node is reported, `up` exits non-zero once all are gone, and killing
`up` outright leaves no orphan). The supervision tests run the real CLI in a subprocess
on the test's own ROS domain; the helpers here are reused by test_end_to_end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from dp_ros import bringup

from helpers_ros import REPO, pid_alive, subprocess_env, wait_for, write_yaml  # noqa: F401


# ----------------------------------------------------------------------------- helpers

class UpProcess:
    """`python -m dp_ros.cli up ...` with its stderr collected on a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dp_ros.cli", "up", *args], cwd=str(REPO),
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def child_pids(self) -> dict[str, int]:
        pids = {}
        for line in list(self.lines):
            m = re.search(r"dp-ros up: started (\w+) \(pid (\d+)\)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))
        return pids

    def wait_output(self, pattern: str, timeout: float) -> None:
        wait_for(lambda: re.search(pattern, self.output) is not None or
                 self.proc.poll() is not None, timeout, f"{pattern!r} in up's output")
        assert re.search(pattern, self.output), f"up ended without {pattern!r}:\n{self.output}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Last resort (finally blocks): up and any child it started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.child_pids().values():
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reader.join(5)


AGGREGATOR_ONLY = {"obs_aggregator": {"ros__parameters": {
    "camera_names": ["front"], "camera_topics": ["/front/image_raw"],
    "state_joint_names": ["j1"], "diagnostics_period": 0.2}}}


def diagnostics_listener(ctx):
    """(node, executor, seen): names of the statuses seen on /diagnostics."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    node = rclpy.create_node("listener", context=ctx)
    seen: set[str] = set()
    node.create_subscription(DiagnosticArray, "/diagnostics",
                             lambda m: seen.update(s.name for s in m.status), 50)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    return node, executor, seen


def spin_until(executor, cond: Callable[[], bool], timeout: float, what: str,
               while_alive: Optional["UpProcess"] = None) -> None:
    """Spin `executor` until `cond`; fails early (with up's output) if `while_alive` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if while_alive is not None and while_alive.proc.poll() is not None:
            time.sleep(0.2)
            raise AssertionError(f"up exited ({while_alive.proc.returncode}) before "
                                 f"{what}:\n{while_alive.output}")
        executor.spin_once(timeout_sec=0.05)
    tail = f"\n{while_alive.output}" if while_alive is not None else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


# ----------------------------------------------------------------------------- description

def test_node_set_is_unique_and_points_at_real_modules():
    names = [s.name for s in bringup.NODE_SET]
    assert len(set(names)) == len(names)
    assert {"obs_aggregator", "policy_node", "trajectory_executor"} <= set(names)
    assert [s.name for s in bringup.NODE_SET if s.takes_policy] == ["policy_node"]
    for spec in bringup.NODE_SET:
        assert spec.name == spec.executable  # `ros2 run dp_ros <name>` and the section agree
        assert spec.module.startswith("dp_ros.")
        src = REPO / (spec.module.replace(".", "/") + ".py")
        text = src.read_text()
        assert re.search(rf"^class {spec.node_class}\(", text, re.M), (src, spec.node_class)
        assert re.search(r"^def main\(", text, re.M), src
    with pytest.raises(KeyError, match="node set"):
        bringup.node_spec("nope")


def test_bringup_does_not_need_rclpy_or_launch():
    code = ("import sys, dp_ros.bringup as b; b.plan_up('demo_robot.yaml'); "
            "print(sorted(m for m in ('rclpy', 'launch', 'launch_ros', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_params_file_loading_and_errors(tmp_path):
    sections = bringup.load_params_file(REPO / "config" / "demo_robot.yaml")
    assert {"obs_aggregator", "policy_node", "trajectory_executor", "sim_arm"} <= set(sections)

    bad = {"no_ros_parameters.yaml": "obs_aggregator:\n  rate_hz: 10.0\n",
           "not_a_mapping.yaml": "- a\n- b\n",
           "empty.yaml": "",
           "broken.yaml": "obs_aggregator: {ros__parameters: [\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(bringup.ParamsFileError):
            bringup.load_params_file(tmp_path / name)
    with pytest.raises(bringup.ParamsFileError, match="not found"):
        bringup.resolve_params_file(tmp_path / "missing.yaml")
    # a bare name resolves in config/
    assert bringup.resolve_params_file("demo_robot.yaml") == \
        (REPO / "config" / "demo_robot.yaml").resolve()


def test_wildcard_section_and_node_selection(tmp_path):
    f = write_yaml(tmp_path / "p.yaml", {
        "/**": {"ros__parameters": {"diagnostics_period": 2.0}},
        "/policy_node": {"ros__parameters": {"diagnostics_period": 0.5, "seed": 3}},
        "obs_aggregator": {"ros__parameters": {"rate_hz": 5.0}}})
    sections = bringup.load_params_file(f)
    pn = bringup.parameters_for(bringup.node_spec("policy_node"), sections)
    assert pn == {"diagnostics_period": 0.5, "seed": 3}
    agg = bringup.parameters_for(bringup.node_spec("obs_aggregator"), sections)
    assert agg == {"diagnostics_period": 2.0, "rate_hz": 5.0}

    core = ["obs_aggregator", "policy_node", "trajectory_executor"]
    assert [s.name for s in bringup.select_nodes(sections)] == core  # no sim_arm section
    with_sim = {**sections, "sim_arm": {}}
    assert [s.name for s in bringup.select_nodes(with_sim)] == core + ["sim_arm"]
    assert [s.name for s in bringup.select_nodes(sections, only=["trajectory_executor",
                                                                  "obs_aggregator"])] \
        == ["obs_aggregator", "trajectory_executor"]
    with pytest.raises(KeyError, match="polcy_node"):
        bringup.select_nodes(sections, only=["polcy_node"])


@pytest.mark.parametrize("value", [True, False, 3, 0.25, -1.5e-3, 1e-5, 2e20, "plain", "/a/b c",
                                   "123", "true", "null", "", "x: y", "[a]", "#c",
                                   ["a", "b"], [1.0, 2.5], [True]])
def test_parameter_values_survive_the_command_line(value):
    """rcl parses `-p name:=value` as YAML: every value must come back unchanged."""
    assert yaml.safe_load(bringup._yaml_value(value)) == value


def test_ros_args_and_overrides(tmp_path):
    policy, executor = bringup.node_spec("policy_node"), bringup.node_spec("trajectory_executor")
    assert bringup.parameter_overrides(policy, "/p/ckpt", True) == \
        {"use_sim_time": True, "policy_path": "/p/ckpt"}
    assert bringup.parameter_overrides(executor, "/p/ckpt", False) == {}  # policy only

    params, specs, overrides = bringup.plan_up(
        REPO / "config" / "demo_robot.yaml", policy="rel/ckpt", use_sim_time=True,
        only=["policy_node"])
    assert params.is_absolute() and [s.name for s in specs] == ["policy_node"]
    path = overrides["policy_node"]["policy_path"]
    assert Path(path).is_absolute() and path.endswith("rel/ckpt")  # children may chdir

    cmd = bringup.process_command(policy, params, overrides["policy_node"])
    assert cmd[:3] == [sys.executable, "-m", "dp_ros.nodes.policy_node"]
    assert cmd[3:6] == ["--ros-args", "--params-file", str(params)]
    assert "use_sim_time:=true" in cmd and f"policy_path:={path}" in cmd

    remapped = bringup.NodeSpec("x", "x", "m", "C", remappings=(("/a", "/b"),))
    assert bringup.ros_args(remapped, "f.yaml")[-2:] == ["-r", "/a:=/b"]


def test_child_env_sets_ament_prefix_path(monkeypatch):
    base = {k: v for k, v in os.environ.items() if k not in ("AMENT_PREFIX_PATH", "ROS_DISTRO")}
    env = bringup.child_env(base)
    assert env["AMENT_PREFIX_PATH"] == sys.prefix
    assert bringup.child_env({**base, "AMENT_PREFIX_PATH": "/opt/x"})["AMENT_PREFIX_PATH"] \
        == "/opt/x"


def test_up_rejects_a_bad_config_and_unknown_node(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dp_ros.cli", "up", "--config",
                          str(tmp_path / "nope.yaml")], cwd=str(REPO), env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not found" in out.stderr
    out = subprocess.run([sys.executable, "-m", "dp_ros.cli", "up", "--config",
                          "demo_robot.yaml", "--only", "planner"], cwd=str(REPO),
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "planner" in out.stderr


# ----------------------------------------------------------------------------- supervision

@pytest.mark.ros
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_runs_nodes_and_stops_them_on_signal(ros_context, tmp_path, sig):
    params = write_yaml(tmp_path / "agg.yaml", AGGREGATOR_ONLY)
    node, executor, seen = diagnostics_listener(ros_context)
    up = UpProcess("--config", str(params), "--only", "obs_aggregator")
    try:
        spin_until(executor, lambda: any(n.startswith("obs_aggregator") for n in seen), 60.0,
                   "obs_aggregator diagnostics (the node runs on the test's domain)",
                   while_alive=up)
        pids = up.child_pids()
        assert set(pids) == {"obs_aggregator"}
        assert up.stop(sig) == 0, up.output
        assert not pid_alive(pids["obs_aggregator"])
        assert "Traceback" not in up.output, up.output
        assert f"{signal.Signals(sig).name}: stopping obs_aggregator" in up.output
    finally:
        up.kill()
        executor.shutdown()
        node.destroy_node()


@pytest.mark.ros
def test_up_reports_a_dead_node_and_exits_nonzero_when_all_are_gone(tmp_path):
    up = UpProcess("--config", "demo_robot.yaml", "--only", "policy_node",
                   "--policy", str(tmp_path / "no_such_checkpoint"))
    try:
        assert up.proc.wait(90) == 1, up.output
        up._reader.join(5)
        assert re.search(r"policy_node \(pid \d+\) exited with code 1", up.output), up.output
        assert "all nodes have exited" in up.output
        assert "no_such_checkpoint" in up.output  # the node said why
    finally:
        up.kill()


@pytest.mark.ros
def test_killing_up_outright_leaves_no_orphan(ros_context, tmp_path):
    params = write_yaml(tmp_path / "agg.yaml", AGGREGATOR_ONLY)
    node, executor, seen = diagnostics_listener(ros_context)
    up = UpProcess("--config", str(params), "--only", "obs_aggregator")
    try:
        spin_until(executor, lambda: bool(seen), 60.0, "obs_aggregator diagnostics",
                   while_alive=up)
        pid = up.child_pids()["obs_aggregator"]
        up.proc.kill()  # SIGKILL: up cannot forward anything
        up.proc.wait(10)
        wait_for(lambda: not pid_alive(pid), 20.0, "the orphaned node to exit")
    finally:
        up.kill()
        executor.shutdown()
        node.destroy_node()


@pytest.mark.ros
def test_single_process_mode_runs_and_stops(ros_context, tmp_path):
    data = {**AGGREGATOR_ONLY, "trajectory_executor": {"ros__parameters": {
        "joint_names": ["j1"], "diagnostics_period": 0.2}}}
    params = write_yaml(tmp_path / "two.yaml", data)
    node, executor, seen = diagnostics_listener(ros_context)
    up = UpProcess("--config", str(params), "--single-process",
                   "--only", "obs_aggregator", "trajectory_executor")
    try:
        spin_until(executor, lambda: any(n.startswith("obs_aggregator") for n in seen)
                   and any("trajectory_executor" in n for n in seen), 60.0,
                   "diagnostics of both nodes", while_alive=up)
        assert "in one process" in up.output
        assert up.stop(signal.SIGINT) == 0, up.output
        assert "Traceback" not in up.output, up.output
    finally:
        up.kill()
        executor.shutdown()
        node.destroy_node()
