"""The dp_ros node set, described once, and `dp-ros up`, which starts it without ros2 launch.

``NODE_SET`` lists the nodes (ROS node name = parameter-file section, console script,
module, class, remappings). ``launch/dp_ros.launch.py`` turns each entry into a
``launch_ros.actions.Node``; ``up()`` starts the same entries with the same standard ROS 2
parameter file (``<node_name>: ros__parameters: {...}``, ``/**`` applies to all nodes):

- by default one process per node, ``python -m <module> --ros-args --params-file FILE
  -p name:=value ...``: the executor's timer never shares a GIL with inference;
- with ``single_process`` all nodes in this process under one SingleThreadedExecutor
  (``make_executor``).

SIGINT / SIGTERM stop everything: the signal is forwarded to every child, stragglers are
terminated, then killed. A child that exits on its own is reported; once every child has
gone without being asked to, ``up`` returns non-zero.

This module imports neither rclpy nor launch at top level: the launch file, the
multi-process runner and static tests use it on machines without either.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from dp_ros.sched import freeze_heap

PACKAGE = "dp_ros"
WILDCARD = "/**"  # a parameter-file section that applies to every node
STOP_GRACE = 10.0  # s a child gets after the forwarded signal (policy_node finishes a plan)
TERM_GRACE = 3.0   # s after SIGTERM before SIGKILL
POLL = 0.1         # s between child-status polls (process supervision, not control)


@dataclass(frozen=True)
class NodeSpec:
    name: str                 # ROS node name = its section in the parameter file
    executable: str           # console script installed by setup.py (`ros2 run dp_ros ...`)
    module: str               # module whose main() runs the node (`python -m module`)
    node_class: str           # rclpy Node subclass in `module` (single-process runs)
    remappings: tuple[tuple[str, str], ...] = ()
    takes_policy: bool = False  # --policy PATH becomes its policy_path parameter
    optional: bool = False    # started only when the parameter file has a section for it
    description: str = ""

    def load_class(self):
        return getattr(importlib.import_module(self.module), self.node_class)


NODE_SET: tuple[NodeSpec, ...] = (
    NodeSpec("obs_aggregator", "obs_aggregator", "dp_ros.nodes.obs_aggregator", "ObsAggregator",
             description="cameras + joint states -> observation windows on the tick grid"),
    NodeSpec("policy_node", "policy_node", "dp_ros.nodes.policy_node", "PolicyNode",
             takes_policy=True, description="windows -> receding-horizon plans (~/plan)"),
    NodeSpec("trajectory_executor", "trajectory_executor", "dp_ros.nodes.trajectory_executor",
             "TrajectoryExecutorNode", description="plans -> latency-compensated arm commands"),
    NodeSpec("sim_arm", "sim_arm", "dp_ros.sim.sim_arm_node", "SimArmNode", optional=True,
             description="the simulated demo arm (when the parameter file configures it)"),
)


def node_spec(name: str) -> NodeSpec:
    for spec in NODE_SET:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown node {name!r}; the node set is {[s.name for s in NODE_SET]}")


# ----------------------------------------------------------------------------- parameter files

class ParamsFileError(ValueError):
    """A parameter file that is missing or not in the ROS 2 format."""


def resolve_params_file(name_or_path: str | os.PathLike) -> Path:
    """An existing file as given, else a file of that name in dp_ros's config directory
    (the checkout's config/ or the installed share/dp_ros/config); absolute."""
    from dp_ros.paths import config_file
    path = config_file(str(name_or_path))
    if not path.is_file():
        raise ParamsFileError(f"parameter file {name_or_path} not found (looked in the "
                              f"working directory and {path.parent})")
    return path.resolve()


def load_params_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Section name -> its ros__parameters mapping; ParamsFileError on a malformed file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ParamsFileError(f"{path}: {err}") from None
    if not isinstance(data, dict) or not data:
        raise ParamsFileError(f"{path}: expected a mapping of node names to "
                              "'ros__parameters:' sections")
    sections = {}
    for name, body in data.items():
        if not isinstance(body, dict) or set(body) != {"ros__parameters"} \
                or not isinstance(body["ros__parameters"], dict):
            raise ParamsFileError(f"{path}: section {name!r} must hold exactly one "
                                  "'ros__parameters:' mapping")
        sections[str(name)] = body["ros__parameters"]
    return sections


def _section_key(name: str) -> str:
    return name.lstrip("/")


def parameters_for(spec: NodeSpec, sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters a node gets from a parameter file: the wildcard section, then its own."""
    values: dict[str, Any] = dict(sections.get(WILDCARD, {}))
    for key, body in sections.items():
        if key != WILDCARD and _section_key(key) == spec.name:
            values.update(body)
    return values


def select_nodes(sections: Mapping[str, Any], only: Optional[Iterable[str]] = None
                 ) -> list[NodeSpec]:
    """The nodes to start: every core node, optional ones the file configures, limited to
    `only` when given (KeyError naming an unknown node)."""
    configured = {_section_key(k) for k in sections}
    specs = [s for s in NODE_SET if not s.optional or s.name in configured]
    if only:
        wanted = list(only)
        for name in wanted:
            node_spec(name)  # KeyError for a name outside the node set
        specs = [s for s in NODE_SET if s.name in wanted]
    return specs


def parameter_overrides(spec: NodeSpec, policy_path: Optional[str] = None,
                        use_sim_time: bool = False) -> dict[str, Any]:
    """Command-line overrides for one node (they win over the parameter file)."""
    overrides: dict[str, Any] = {}
    if use_sim_time:
        overrides["use_sim_time"] = True
    if policy_path and spec.takes_policy:
        overrides["policy_path"] = str(policy_path)
    return overrides


def _yaml_value(value: Any) -> str:
    """A value as rcl parses `-p name:=value` (YAML); strings YAML would retype are quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "e" in text and "." not in text:  # YAML wants a dot: 1e-05 -> 1.0e-05
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    text = str(value)
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain and text else json.dumps(text)


def ros_args(spec: NodeSpec, params_file: str | os.PathLike,
             overrides: Mapping[str, Any] = ()) -> list[str]:
    """`--ros-args` for one node: the parameter file, overrides, remappings."""
    args = ["--ros-args", "--params-file", str(params_file)]
    for name, value in dict(overrides).items():
        args += ["-p", f"{name}:={_yaml_value(value)}"]
    for src, dst in spec.remappings:
        args += ["-r", f"{src}:={dst}"]
    return args


def process_command(spec: NodeSpec, params_file: str | os.PathLike,
                    overrides: Mapping[str, Any] = ()) -> list[str]:
    return [sys.executable, "-m", spec.module] + ros_args(spec, params_file, overrides)


def child_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for node processes: AMENT_PREFIX_PATH set (the pip ROS wheels do not
    set it), Python output unbuffered so logs interleave in order."""
    env = dict(os.environ if base is None else base)
    if not env.get("AMENT_PREFIX_PATH") and not env.get("ROS_DISTRO"):
        env["AMENT_PREFIX_PATH"] = sys.prefix
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ----------------------------------------------------------------------------- one process per node

def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans if `up` is killed hard
    except Exception:
        pass


def _report(message: str) -> None:
    print(f"dp-ros up: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    spec: NodeSpec
    command: list[str]
    process: Any = None  # subprocess.Popen
    returncode: Optional[int] = None


@dataclass
class ProcessGroup:
    """The node processes of one `up`: started in their own session (a terminal's Ctrl-C
    reaches only `up`, which forwards it), stopped signal -> wait -> terminate -> kill."""

    children: list[Child]
    env: Optional[dict[str, str]] = None
    log_dir: Optional[Path] = None  # children's output to <log_dir>/<name>.log, else ours
    failed: list[str] = field(default_factory=list)

    def start(self) -> None:
        import subprocess
        env = child_env(self.env)
        for child in self.children:
            out = None
            if self.log_dir is not None:
                out = open(Path(self.log_dir) / f"{child.spec.name}.log", "wb")
            try:
                child.process = subprocess.Popen(
                    child.command, env=env, start_new_session=True, stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            finally:
                if out is not None:
                    out.close()  # the child has its own descriptor
            _report(f"started {child.spec.name} (pid {child.process.pid})")

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.returncode is None]

    def poll(self) -> list[Child]:
        """Children that exited since the last poll (each reported once)."""
        ended = []
        for child in self.alive():
            code = child.process.poll()
            if code is not None:
                child.returncode = code
                ended.append(child)
        return ended

    def signal_all(self, sig: int) -> None:
        for child in self.alive():
            try:
                child.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = STOP_GRACE, term_grace: float = TERM_GRACE) -> bool:
        """Forward SIGINT, wait, SIGTERM, wait, SIGKILL. True when none had to be forced."""
        clean = True
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, term_grace),
                          (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            if sig != signal.SIGINT:
                clean = False
                _report(f"{', '.join(c.spec.name for c in self.alive())} still running: "
                        f"sending {signal.Signals(sig).name}")
            self.signal_all(sig)
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                self.poll()
                time.sleep(0.02)
        self.poll()
        return clean


class _StopRequest:
    """SIGINT/SIGTERM handler state for the supervising loop."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_processes(specs: Sequence[NodeSpec], params_file: str | os.PathLike,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  env: Optional[dict[str, str]] = None) -> int:
    """Run each node in its own process until a signal or until all have exited."""
    overrides = overrides or {}
    group = ProcessGroup([Child(s, process_command(s, params_file, overrides.get(s.name, {})))
                          for s in specs], env=env)
    with _StopRequest() as stop:
        try:
            group.start()
            while stop.signum is None:
                for child in group.poll():
                    group.failed.append(child.spec.name)
                    _report(f"{child.spec.name} (pid {child.process.pid}) exited with "
                            f"code {child.returncode}; "
                            f"{len(group.alive())} of {len(group.children)} still running")
                if not group.alive():
                    _report("all nodes have exited")
                    return 1
                time.sleep(POLL)
            _report(f"{signal.Signals(stop.signum).name}: stopping "
                    f"{', '.join(c.spec.name for c in group.alive())}")
        finally:
            clean = group.stop()
    for child in group.children:
        if child.returncode not in (0, -signal.SIGINT, -signal.SIGTERM, None) \
                and child.spec.name not in group.failed:
            _report(f"{child.spec.name} exited with code {child.returncode} while stopping")
            clean = False
    return 0 if clean and not group.failed else 1


# ----------------------------------------------------------------------------- one process

def create_nodes(specs: Sequence[NodeSpec], params_file: str | os.PathLike,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 context=None) -> list:
    """Instantiate the nodes in this process, each with its own `--ros-args` (so an
    override such as policy_path reaches only its node). Nodes already created are
    destroyed if a later one fails."""
    overrides = overrides or {}
    nodes = []
    try:
        for spec in specs:
            cls = spec.load_class()
            args = ros_args(spec, params_file, overrides.get(spec.name, {}))
            nodes.append(cls(context=context, cli_args=args))
    except BaseException:
        for node in reversed(nodes):
            node.destroy_node()
        raise
    return nodes


def stop_nodes(nodes: Sequence) -> None:
    """Let nodes that have a ``stop()`` (the executor: hold and go silent) act while the
    context is still valid."""
    for node in nodes:
        stop = getattr(node, "stop", None)
        if callable(stop):
            try:
                stop()
            except Exception as err:  # stopping one node must not keep the others running
                _report(f"{node.get_name()}: stop failed: {err}")


def make_executor(context=None):
    """The executor for several dp_ros nodes in one process: a single-threaded one.

    Every callback is short (inference and policy loading run on threads of their own),
    and more executor threads only compete for the GIL: with a 6-thread
    MultiThreadedExecutor a small policy that plans in 40 ms alone took 0.2-3.9 s per
    plan (each torch op that releases the GIL waits for it again behind busy executor
    threads); with one executor thread, 0.1-0.2 s."""
    from rclpy.executors import SingleThreadedExecutor
    return SingleThreadedExecutor(context=context)


def run_single_process(specs: Sequence[NodeSpec], params_file: str | os.PathLike,
                       overrides: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """All nodes in this process under one executor (make_executor) until SIGINT/SIGTERM."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.signals import SignalHandlerOptions

    # our own signal handling: the nodes get to stop (the executor sends a hold) before
    # the context goes down
    rclpy.init(args=None, signal_handler_options=SignalHandlerOptions.NO)
    nodes = []
    try:
        with _StopRequest() as stop:
            try:
                nodes = create_nodes(specs, params_file, overrides)
            except Exception as err:  # a bad parameter or checkpoint: say which, stop
                _report(f"could not start the nodes: {type(err).__name__}: {err}")
                return 1
            executor = make_executor()
            for node in nodes:
                executor.add_node(node)
            freeze_heap()
            _report(f"running {', '.join(n.get_name() for n in nodes)} in one process "
                    f"(pid {os.getpid()})")
            try:
                while stop.signum is None and rclpy.ok():
                    executor.spin_once(timeout_sec=POLL)
                if stop.signum is not None:
                    _report(f"{signal.Signals(stop.signum).name}: stopping")
                stop_nodes(nodes)
            except ExternalShutdownException:
                pass
            finally:
                executor.shutdown(timeout_sec=STOP_GRACE)
        return 0
    finally:
        for node in reversed(nodes):
            node.destroy_node()
        rclpy.try_shutdown()


# ----------------------------------------------------------------------------- entry point

def plan_up(config: str | os.PathLike, policy: Optional[str] = None,
            use_sim_time: bool = False, only: Optional[Iterable[str]] = None
            ) -> tuple[Path, list[NodeSpec], dict[str, dict[str, Any]]]:
    """(absolute parameter file, nodes to start, per-node overrides) for `up`."""
    params_file = resolve_params_file(config)
    sections = load_params_file(params_file)
    specs = select_nodes(sections, only)
    if policy:
        policy = str(Path(policy).expanduser().resolve())
    overrides = {s.name: parameter_overrides(s, policy, use_sim_time) for s in specs}
    return params_file, specs, overrides


def up(config: str | os.PathLike, policy: Optional[str] = None, use_sim_time: bool = False,
       single_process: bool = False, only: Optional[Iterable[str]] = None) -> int:
    try:
        params_file, specs, overrides = plan_up(config, policy, use_sim_time, only)
    except (ParamsFileError, KeyError) as err:
        _report(str(err).strip('"'))
        return 2
    if not specs:
        _report("no node to start")
        return 2
    _report(f"{params_file}: {', '.join(s.name for s in specs)}"
            f"{' (one process)' if single_process else ''}")
    if single_process:
        return run_single_process(specs, params_file, overrides)
    return run_processes(specs, params_file, overrides)
