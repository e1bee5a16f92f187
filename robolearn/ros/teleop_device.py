"""Teleop from ROS 2 topics: geometry_msgs/TwistStamped for motion, sensor_msgs/Joy for buttons.

The device runs its own rclpy context and node, spun in a background thread, so it coexists
with any other node in the process. rclpy is imported only when this device is made. Motion is
the twist's linear part times `linear_scale` (the default reads it as already normalized to
[-1, 1]); no twist for `timeout_s` (wall-clock time of arrival) = disconnected, motion zero.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from robolearn.demos.teleop import (TeleopConfig, TeleopDevice, TeleopInput, button_edges, default_buttons, held_buttons,
                                    require, split_buttons)


class RosTopicDevice(TeleopDevice):
    """Subscribes `twist_topic` (TwistStamped) and `joy_topic` (Joy, same button layout as the gamepad)."""

    name = "ros"
    has_buttons = True
    help = "motion: geometry_msgs/TwistStamped on {twist}; buttons: sensor_msgs/Joy on {joy}"
    default_config = TeleopConfig()

    def __init__(self, config: TeleopConfig | None = None, twist_topic: str = "teleop/twist",
                 joy_topic: str = "teleop/joy", linear_scale: float = 1.0, buttons=None,
                 node_name: str = "robolearn_teleop", node=None):
        super().__init__(config)
        rclpy = require("rclpy", "ros-rclpy", extra="ros")
        from rclpy.executors import SingleThreadedExecutor
        geometry_msgs = require("geometry_msgs.msg", "ros-geometry-msgs", extra="ros")
        sensor_msgs = require("sensor_msgs.msg", "ros-sensor-msgs", extra="ros")

        self.twist_topic, self.joy_topic, self.linear_scale = twist_topic, joy_topic, float(linear_scale)
        self.buttons = {**default_buttons(), **{str(k): int(v) for k, v in dict(buttons or {}).items()}}
        self.help = self.help.format(twist=twist_topic, joy=joy_topic)
        self._lock = threading.Lock()
        self._twist, self._twist_at = np.zeros(3), None
        self._joy_prev: list[int] = []
        self._held, self._joy_at = (), None
        self._gripper, self._events = None, []

        self.start_hint = f"press button {self.buttons['start_stop']} on {joy_topic} (sensor_msgs/Joy)"
        if node is not None:  # a node the caller spins (record_node): its namespace and remaps apply
            self._ctx, self._node = None, node
            self._subs = [node.create_subscription(geometry_msgs.TwistStamped, twist_topic, self._on_twist, 10),
                          node.create_subscription(sensor_msgs.Joy, joy_topic, self._on_joy, 10)]
            return
        self._ctx = rclpy.Context()
        rclpy.init(context=self._ctx)
        self._node = rclpy.create_node(node_name, context=self._ctx)
        self._subs = [self._node.create_subscription(geometry_msgs.TwistStamped, twist_topic, self._on_twist, 10),
                      self._node.create_subscription(sensor_msgs.Joy, joy_topic, self._on_joy, 10)]
        self._executor = SingleThreadedExecutor(context=self._ctx)
        self._executor.add_node(self._node)
        self._thread = threading.Thread(target=self._spin, name="robolearn-teleop-ros", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except Exception:  # the context shut down under us in close()
            pass

    def _on_twist(self, msg) -> None:
        v = msg.twist.linear
        with self._lock:
            self._twist = np.array([v.x, v.y, v.z]) * self.linear_scale
            self._twist_at = time.monotonic()

    def _on_joy(self, msg) -> None:
        buttons = list(msg.buttons)
        gripper, events = split_buttons(button_edges(buttons, self._joy_prev, self.buttons))
        self._joy_prev = buttons
        with self._lock:
            self._held, self._joy_at = held_buttons(buttons), time.monotonic()
            if gripper is not None:
                self._gripper = gripper
            self._events.extend(events)

    def poll(self, obs) -> TeleopInput:
        with self._lock:
            twist, at = self._twist.copy(), self._twist_at
            gripper, events, held = self._gripper, tuple(self._events), self._held
            if self._joy_at is None or time.monotonic() - self._joy_at > self.config.timeout_s:
                held = ()  # a joy driver repeats held buttons (autorepeat_rate); silence lets go of them
            self._gripper, self._events = None, []
        if at is None:
            return TeleopInput(events=events, connected=False,
                               reason=f"ros: waiting for the first message on {self.twist_topic}")
        age = time.monotonic() - at
        if age > self.config.timeout_s:
            return TeleopInput(events=events, connected=False,
                               reason=f"ros: no message on {self.twist_topic} for {age:.1f} s "
                                      f"(timeout {self.config.timeout_s:g} s)")
        return TeleopInput(np.clip(twist, -1.0, 1.0).astype(np.float32), gripper, events, held=held)

    def close(self) -> None:
        if self._ctx is None:
            for sub in self._subs:
                self._node.destroy_subscription(sub)
            self._subs = []
            return
        self._executor.shutdown(timeout_sec=1.0)
        self._node.destroy_node()
        self._ctx.try_shutdown()
        self._thread.join(timeout=2.0)
        self._ctx = None
