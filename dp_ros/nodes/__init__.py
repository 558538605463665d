"""rclpy nodes: parameters, topics, timers and message <-> numpy conversion. Thin: the
logic they run lives in dp_ros.control and dp_ros.policy."""
