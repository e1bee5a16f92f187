"""Record teleoperated episodes from the live ROS 2 topics into a robolearn dataset.

The arm, task and cameras come from the driver's topics through the same RobotEnv the simulator
uses (robolearn.ros.robot_params); motion and the start/stop, success, failure, discard and quit
buttons from the ROS teleop device (TwistStamped on teleop/twist, Joy on teleop/joy). Episodes go
through the same Recorder and DatasetWriter as `robolearn record`: the same keys, labels and
crash safety. Parameters: docs/ros.md ("record_node").
"""

from __future__ import annotations

import sys
import threading
import time

import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from robolearn.ros import common, robot_params

PARAMS = {  # name: (default, description); docs/ros.md lists them
    "out": ("", "dataset folder: created, or appended to when it holds the same env id"),
    "env_id": ("robolearn/PandaPickCube-v0", "the env id the dataset names (`demos replay` rebuilds it)"),
    "episodes": (10, "episodes to save; then the node exits 0"),
    "seed": (0, "episode k of the dataset starts from env seed seed + k (the simulator's reset)"),
    **robot_params.ROBOT_PARAMS,
    "teleop_twist_topic": ("teleop/twist", "geometry_msgs/TwistStamped in: motion, linear part in [-1, 1]"),
    "teleop_joy_topic": ("teleop/joy", "sensor_msgs/Joy in: buttons (0 start/stop, 1 failure, 2 discard, 3 success, "
                                       "4 open, 5 close, 7 quit)"),
    "teleop_timeout": (1.0, "s without a twist before the device counts as disconnected (motion stops)"),
    "linear_scale": (1.0, "twist linear part times this is the normalized motion"),
}


class HoldWhenStale:
    """RobotEnv.step that rides out stalls of the robot's topics: hold, wait for fresh state and step
    again, for up to `timeout` s in all (a loaded machine stalled the simulator's topics twice in a row)."""

    def __init__(self, env, node, timeout: float):
        self.env, self.node, self.timeout = env, node, timeout

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        return self._riding_out(lambda: self.env.step(action))

    def reset(self, **kwargs):
        return self._riding_out(lambda: self.env.reset(**kwargs))

    def _riding_out(self, call):
        from robolearn.robot.interfaces import StaleStateError
        from robolearn.ros.ros_backend import wait_until
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return call()
            except StaleStateError as err:
                self.env.arm.hold()
                left = deadline - time.monotonic()
                self.node.get_logger().warning(f"holding: {err}; waiting up to {max(left, 0):.0f} s for fresh state")
                if left <= 0 or not wait_until(self.node, lambda: robot_params.fresh(self.env.arm.read), left):
                    raise


class RecordNode(Node):
    def __init__(self, **kwargs):
        super().__init__("recorder", **kwargs)
        robot_params.declare(self, PARAMS)
        self.p = robot_params.read(self, PARAMS)
        if not self.p["out"]:
            raise ValueError("parameter out: the dataset folder is required (-p out:=DIR)")
        if self.p["episodes"] < 1:
            raise ValueError(f"parameter episodes: must be at least 1, got {self.p['episodes']}")
        self.io = ReentrantCallbackGroup()


def record(node: RecordNode) -> int:
    """Build the ROS env and the device, then run the Recorder until the episodes are saved."""
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.demos.recorder import RecordConfig, Recorder
    from robolearn.demos.teleop import TeleopConfig
    from robolearn.ros.teleop_device import RosTopicDevice

    p = node.p
    env, parts = robot_params.make_robot_env(node, p, robot_params.camera_shapes(p, {}, "robot"), node.io, p["env_id"])
    env = HoldWhenStale(env, node, p["reset_timeout"])
    device = RosTopicDevice(TeleopConfig(timeout_s=p["teleop_timeout"]), p["teleop_twist_topic"], p["teleop_joy_topic"],
                            p["linear_scale"], node=node)
    try:
        with DatasetWriter(p["out"], p["env_id"], env.observation_space, env.action_space,
                           fps=env.cfg.control_hz) as writer:
            summary = Recorder(env, device, writer, RecordConfig(episodes=p["episodes"], seed=p["seed"], status=False),
                               out=sys.stdout).run()
    finally:
        device.close()
        if rclpy.ok():
            env.arm.hold()
        for part in parts:
            part.close()
    return 0 if summary.stopped_by != "device lost" or summary.paths else 1


def main(argv=None) -> int:
    rclpy.init(args=argv)
    try:
        node = RecordNode()
    except ValueError as err:
        print(f"record_node: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = common.executor(threads=2)
    executor.add_node(node)
    stop = threading.Event()
    spinner = threading.Thread(target=common.spin, args=(executor, stop, node.get_logger()), daemon=True)
    spinner.start()
    try:
        code = record(node)
    except KeyboardInterrupt:
        code = 0  # the recorder has discarded the unfinished episode; saved ones are on disk
    except (ValueError, TimeoutError, OSError) as err:
        node.get_logger().error(str(err))
        code = 2
    stop.set()
    spinner.join(timeout=5.0)
    executor.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
