"""The embedded default robot: a simulated planar arm (numpy + OpenCV, no rclpy), its
task, an overhead camera and a scripted expert. ``sim_arm_node`` puts it on ROS topics.

- arm:    kinematics and a ros2_control-like controller (trajectory / position commands)
- task:   the scene, episode sampling and evaluation (success, collision, side)
- render: the overhead camera image
- expert: the scripted demonstrator (left or right round the obstacle, 50/50)
"""
