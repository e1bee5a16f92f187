"""ROS 2 nodes; the only place below robolearn/ that imports rclpy."""
