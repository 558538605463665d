"""Real-time logic without ROS: time alignment and observation windows (observation,
streams, window), plan scheduling, latency compensation and limits. numpy (+ OpenCV for
image preprocessing) only; never imports rclpy, so tests and offline tools drive it
directly."""
