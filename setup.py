"""ament_python package: `colcon build` on a ROS install, `pip install -e .` without one."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "dp_ros"
NODES = ["obs_aggregator", "policy_node", "trajectory_executor", "sim_arm"]

ROS_WHEELS = [  # ROS 2 Kilted pip wheels, used only where no ROS distribution is sourced
    "ros-rclpy", "ros-rmw-fastrtps-cpp", "ros-sensor-msgs", "ros-trajectory-msgs",
    "ros-std-msgs", "ros-std-srvs", "ros-diagnostic-msgs", "ros-builtin-interfaces",
    "ros-rosgraph-msgs", "ros-geometry-msgs",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10,<3.13",
    install_requires=[
        # a range that 2.13.0 satisfies: CPU build from the dev machine's disk, CUDA elsewhere
        "torch>=2.2,<2.14",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "opencv-python-headless>=4.8",
        "zarr>=2.16",
        "rosbags>=0.10",
    ],
    extras_require={
        "ros": ROS_WHEELS,
        # onnx-ir: onnxruntime's MatMulNBits quantizer (int8 export) imports it
        "onnx": ["onnx>=1.15", "onnxruntime>=1.20", "onnx-ir>=0.1"],
        # onnx + onnxruntime: the ONNX export is checked against torch in CI
        "test": ["pytest>=7", "hypothesis>=6", "diffusers>=0.27",
                 "onnx>=1.15", "onnxruntime>=1.20", "onnx-ir>=0.1"],
    },
    zip_safe=True,
    maintainer="dp_ros maintainers",
    maintainer_email="dp_ros@example.com",
    description="Diffusion Policy visuomotor controllers on ROS 2 robots in real time",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [f"{n} = {PACKAGE}.nodes.{n}:main" for n in NODES[:3]]
        + [f"sim_arm = {PACKAGE}.sim.sim_arm_node:main", f"dp-ros = {PACKAGE}.cli:main"],
    },
)
