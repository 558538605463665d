"""launch/dp_ros.launch.py and the config files, checked without launch_ros (no pip
wheel exists): the launch file parses, imports only launch / launch_ros /
ament_index_python / dp_ros.bringup at top level, declares its arguments, and names only
executables and parameter files that exist; bringup's node set matches setup.py's entry
points; every config YAML loads, names only parameters its nodes declare, and the
nodes start with it. Where launch_ros is importable the launch description is built too."""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import re
from pathlib import Path

import pytest

from dp_ros import bringup

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "launch" / "dp_ros.launch.py"
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
TRAIN_CONFIGS = {"train_small.yaml", "train_paper_cnn.yaml"}  # training YAML, not ROS params
ROS_CONFIGS = [p for p in CONFIGS if p.name not in TRAIN_CONFIGS and
               "ros__parameters" in p.read_text()]
ALLOWED_IMPORTS = ("launch", "launch_ros", "ament_index_python", "dp_ros.bringup")


def setup_entry_points() -> dict[str, str]:
    """console script -> 'module:function' from setup.py, evaluated from its AST."""
    tree = ast.parse((REPO / "setup.py").read_text())
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    kw = next(k for k in call.keywords if k.arg == "entry_points")
    scripts_expr = next(v for k, v in zip(kw.value.keys, kw.value.values)
                        if ast.literal_eval(k) == "console_scripts")
    scripts = eval(compile(ast.Expression(scripts_expr), "setup.py", "eval"),  # noqa: S307
                   {"__builtins__": {}, **consts})
    out = {}
    for entry in scripts:
        name, target = (s.strip() for s in entry.split("="))
        out[name] = target
    return out


def test_setup_installs_the_node_set():
    scripts = setup_entry_points()
    for spec in bringup.NODE_SET:
        assert spec.executable in scripts, f"setup.py does not install {spec.executable}"
        assert scripts[spec.executable] == f"{spec.module}:main"
    # every node executable setup.py installs is in the node set (dp-ros is the CLI)
    assert set(scripts) - {"dp-ros"} == {s.executable for s in bringup.NODE_SET}


def test_launch_file_parses_and_imports_only_launch_and_bringup():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    for node in tree.body:  # top level only: functions may import what they like
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module if node.module != "dp_ros" else
                     f"dp_ros.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            assert any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_IMPORTS), \
                f"launch file imports {name} at top level"
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def test_launch_file_declares_its_arguments_and_names_existing_things():
    tree = ast.parse(LAUNCH_FILE.read_text())
    declared = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        name = ast.literal_eval(call.args[0])
        default = next((ast.literal_eval(k.value) for k in call.keywords
                        if k.arg == "default_value"), None)
        declared[name] = default
    assert set(declared) == {"config", "policy_path", "use_sim_time"}
    used = {ast.literal_eval(c.args[0]) for c in _calls(tree, "LaunchConfiguration")}
    assert used == set(declared), "every argument is used, nothing undeclared is read"
    assert declared["use_sim_time"] in ("false", "true")
    # the default parameter file exists in config/ (and setup.py installs config/*.yaml)
    assert (REPO / "config" / declared["config"]).is_file()
    assert bringup.resolve_params_file(declared["config"]).is_file()

    # the Node actions come from bringup's node set; any literal name must exist too
    nodes = _calls(tree, "Node")
    assert nodes, "no launch_ros Node"
    installed = set(setup_entry_points())
    for call in nodes:
        kw = {k.arg: k.value for k in call.keywords}
        assert {"package", "executable", "name", "parameters"} <= set(kw)
        for key in ("executable", "name"):
            if isinstance(kw[key], ast.Constant):
                assert kw[key].value in installed
            else:
                assert ast.unparse(kw[key]).startswith("spec."), ast.unparse(kw[key])
    assert "bringup.select_nodes" in LAUNCH_FILE.read_text()
    # any literal *.yaml path in the file names a file in config/
    for const in ast.walk(tree):
        if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                and const.value.endswith(".yaml"):
            assert (REPO / "config" / Path(const.value).name).is_file(), const.value


def test_launch_description_builds_where_launch_ros_exists(tmp_path):
    if importlib.util.find_spec("launch_ros") is None:
        pytest.skip("launch_ros is not installed (no pip wheel; it comes with a ROS 2 "
                    "distribution): the static checks above cover the launch file")
    from launch import LaunchContext, LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch_ros.actions import Node

    spec = importlib.util.spec_from_file_location("dp_ros_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    args = [e for e in description.entities if isinstance(e, DeclareLaunchArgument)]
    assert {a.name for a in args} == {"config", "policy_path", "use_sim_time"}
    context = LaunchContext()
    context.launch_configurations.update({"config": "demo_robot.yaml",
                                          "policy_path": str(tmp_path),
                                          "use_sim_time": "true"})
    opaque = next(e for e in description.entities if isinstance(e, OpaqueFunction))
    actions = opaque.execute(context)
    assert all(isinstance(a, Node) for a in actions)
    assert len(actions) == len(bringup.select_nodes(bringup.load_params_file(
        bringup.resolve_params_file("demo_robot.yaml"))))


# ----------------------------------------------------------------------------- config files

def test_config_files_are_there():
    names = {p.name for p in ROS_CONFIGS}
    assert {"demo_robot.yaml", "real_arm_template.yaml"} <= names


def declared_parameters(spec: bringup.NodeSpec) -> set[str]:
    """The names a node declares (its module's PARAMETERS table) + rclpy's use_sim_time."""
    module = importlib.import_module(spec.module)
    return set(module.PARAMETERS) | {"use_sim_time"}


@pytest.mark.parametrize("path", ROS_CONFIGS, ids=lambda p: p.name)
def test_config_names_only_declared_parameters(path):
    sections = bringup.load_params_file(path)
    known = {s.name for s in bringup.NODE_SET} | {bringup.WILDCARD}
    assert {k.lstrip("/") if k != bringup.WILDCARD else k for k in sections} <= known
    for spec in bringup.select_nodes(sections):
        params = bringup.parameters_for(spec, sections)
        assert params, f"{path.name}: no parameters for {spec.name}"
        unknown = set(params) - declared_parameters(spec)
        assert not unknown, f"{path.name}: {spec.name} declares no {sorted(unknown)}"


@pytest.mark.parametrize("path", ROS_CONFIGS, ids=lambda p: p.name)
def test_every_parameter_is_commented(path):
    """Each parameter (or a group of consecutive ones) has a comment block right above
    it, or a trailing comment."""
    lines = path.read_text().splitlines()
    param = re.compile(r"^ {4}(\w+):")  # parameters sit under ros__parameters
    continuation = re.compile(r"^ {5,}\S")  # a list continued on the next line
    for i, line in enumerate(lines):
        m = param.match(line)
        if not m or "#" in line:
            continue
        j = i - 1
        while j >= 0 and (param.match(lines[j]) or continuation.match(lines[j])) \
                and not lines[j].strip().startswith("#"):
            j -= 1
        assert j >= 0 and lines[j].strip().startswith("#"), \
            f"{path.name}:{i + 1} {m.group(1)} has no comment"


@pytest.mark.ros
@pytest.mark.parametrize("path", ROS_CONFIGS, ids=lambda p: p.name)
def test_nodes_start_with_the_config(path, ros_context, tmp_path):
    """Each node of the file is constructed with it through the same --ros-args `up` uses
    (types and values are accepted) and declares every parameter the file sets. The
    checkpoint comes from an override, as `--policy` would give it."""
    from helpers_policy import make_checkpoint, small_config

    from dp_ros.policy.config import CameraConfig

    sections = bringup.load_params_file(path)
    specs = bringup.select_nodes(sections)
    pn = bringup.parameters_for(bringup.node_spec("policy_node"), sections)
    agg = bringup.parameters_for(bringup.node_spec("obs_aggregator"), sections)
    cams = [CameraConfig(name=c, height=32, width=32) for c in agg["camera_names"]]
    joints = list(pn["joint_names"])
    cfg = small_config(cameras=cams, state_names=list(agg["state_joint_names"]),
                       action_names=joints)
    ckpt = make_checkpoint(tmp_path / "policies" / "ckpt", cfg)
    overrides = {s.name: bringup.parameter_overrides(s, str(ckpt)) for s in specs}
    overrides["policy_node"]["policy_dir"] = str(tmp_path / "policies")
    # on a thread of its own: a file may set realtime_priority, which applies to the thread
    # that builds the node (the main thread must stay at normal priority)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        nodes = pool.submit(bringup.create_nodes, specs, path, overrides,
                            context=ros_context).result()
    try:
        assert [n.get_name() for n in nodes] == [s.name for s in specs]
        for spec, node in zip(specs, nodes):
            for name, value in bringup.parameters_for(spec, sections).items():
                assert node.has_parameter(name), f"{spec.name} has no parameter {name}"
                if name not in overrides[spec.name]:
                    got = node.get_parameter(name).value
                    got = list(got) if isinstance(value, list) else got
                    assert got == value, (spec.name, name, got, value)
    finally:
        for node in reversed(nodes):
            getattr(node, "stop", lambda: None)()
            node.destroy_node()
