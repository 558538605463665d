"""dp_ros: Diffusion Policy visuomotor controllers on ROS 2 robots in real time."""

__version__ = "0.1.0"
