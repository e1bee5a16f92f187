"""robolearn: ROS 2-native robot learning: agents, training, the CLI and ROS 2 nodes."""
