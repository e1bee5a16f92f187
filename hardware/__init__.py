"""Hardware: arms over ros2_control topics, cameras, and reset handlers (see docs/)."""
