"""Launch the dp_ros node set: `ros2 launch dp_ros dp_ros.launch.py [config:=FILE]
[policy_path:=DIR] [use_sim_time:=true]`.

Thin over dp_ros.bringup, which `dp-ros up` uses too: the same nodes (one
launch_ros Node per entry of bringup's node set; optional ones such as sim_arm only when
the parameter file has a section for them), the same parameter file, the same
overrides. `config` is a path or a file name in the package's share/dp_ros/config.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from dp_ros import bringup


def _truthy(text):
    return text.strip().lower() in ("true", "1", "yes", "on")


def _nodes(context, *args, **kwargs):
    params_file = bringup.resolve_params_file(LaunchConfiguration("config").perform(context))
    policy_path = LaunchConfiguration("policy_path").perform(context)
    use_sim_time = _truthy(LaunchConfiguration("use_sim_time").perform(context))
    specs = bringup.select_nodes(bringup.load_params_file(params_file))
    return [
        Node(
            package=bringup.PACKAGE,
            executable=spec.executable,
            name=spec.name,
            parameters=[str(params_file),
                        bringup.parameter_overrides(spec, policy_path or None, use_sim_time)],
            remappings=list(spec.remappings),
            output="screen",
            emulate_tty=True,
        )
        for spec in specs
    ]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            "config", default_value="demo_robot.yaml",
            description="ROS 2 parameter file: a path, or a name in share/dp_ros/config "
                        "(demo_robot.yaml, real_arm_template.yaml)"),
        DeclareLaunchArgument(
            "policy_path", default_value="",
            description="Checkpoint directory for policy_node (empty: the file's policy_path)"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false",
            description="Every node follows /clock (bag replay, simulation)"),
        OpaqueFunction(function=_nodes),
    ])
