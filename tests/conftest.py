"""Test-wide settings: headless rendering and DDS kept on loopback in a random domain."""

import os
import random

os.environ.setdefault("MUJOCO_GL", "osmesa" if not os.path.exists("/dev/nvidia0") else "egl")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(20, 220)))
