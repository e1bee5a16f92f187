"""The robot interfaces and the one gymnasium env composed of them, for simulation and hardware alike.

Imports numpy, gymnasium and robolearn.controllers' pure-numpy safety functions only: no MuJoCo,
no rclpy, no torch. `robolearn.sim` and `robolearn.ros` plug their backends in here.
"""

from robolearn.robot.env import RobotEnv, RobotEnvConfig
from robolearn.robot.interfaces import ArmBackend, ArmState, Camera, ResetHandler, Task, ToolTarget

__all__ = ["ArmBackend", "ArmState", "Camera", "ResetHandler", "RobotEnv", "RobotEnvConfig", "Task", "ToolTarget"]
