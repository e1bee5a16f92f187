"""The ROS 2 backends of the robot interfaces: `RosArm`, `RosCamera`, `RosTask`, `RosReset`.

Given an rclpy node spun by an executor (common.executor), `RobotEnv(RosArm, RosTask, RosReset, cfg,
cameras)` is the env the simulator uses too. Each part keeps the newest valid message; a message
that fails validation is counted and logged, never used. No MuJoCo here (controllers.safety is numpy).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64, Float64MultiArray
from std_srvs.srv import Trigger

from robolearn.controllers.safety import SafetyConfig, clamp_tool_rotation, clamp_tool_target, require_finite
from robolearn.robot.interfaces import ArmState, StaleStateError, ToolTarget
from robolearn.ros import common


def wait_until(node, ready, timeout: float) -> bool:
    """Poll `ready()` until true or `timeout` s; spins the node itself only when no executor does."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        if node.executor is None:
            rclpy.spin_once(node, timeout_sec=0.005)
        else:
            time.sleep(0.002)
    return True


class _Topics:
    """Newest-message bookkeeping shared by the backends: ages, rejections, the last error."""

    def __init__(self, node, max_age: float, group):
        self.node, self.max_age, self.group = node, max_age, group
        self.rejected, self.last_error, self.last_error_at = 0, "", 0.0
        self._newest: dict[str, tuple] = {}  # topic -> (value, stamp on node clock or None, receipt monotonic)
        self._subs = []

    def _sub(self, msg_type, topic: str, qos, parse):
        def callback(msg):
            try:
                value, stamp = parse(msg)
            except Exception as err:  # a malformed message is refused, never allowed to take the node down
                text = str(err) if str(err).startswith(topic) else f"{topic}: {err}"
                self.rejected += 1
                self.last_error, self.last_error_at = f"rejected {text}", time.monotonic()
                self.node.get_logger().error(self.last_error, throttle_duration_sec=1.0)
                return
            self._newest[topic] = (value, stamp, time.monotonic())
        self._subs.append(self.node.create_subscription(msg_type, topic, callback, qos, callback_group=self.group))

    def _fresh(self, topic: str) -> tuple:
        """(value, stamp, receipt) of the newest message on `topic`; StaleStateError when missing or older
        than max_age by its stamp or its receipt."""
        item = self._newest.get(topic)
        if item is None:
            raise StaleStateError(f"nothing received on {self.node.resolve_topic_name(topic)} yet")
        value, stamp, receipt = item
        # Receipt age as well: under use_sim_time a dead simulator also stops the clock.
        age = time.monotonic() - receipt
        if stamp is not None:
            age = max(age, self.node.get_clock().now().nanoseconds * 1e-9 - stamp)
        if age > self.max_age:
            raise StaleStateError(f"{self.node.resolve_topic_name(topic)} is {age * 1e3:.0f} ms old "
                                  f"(max age {self.max_age * 1e3:.0f} ms)")
        return item

    def received_after(self, t: float, *topics: str) -> bool:
        return all(self._newest.get(k, (None, None, -np.inf))[2] > t for k in topics or self._newest)

    def stamped_after(self, stamp: float | None, t: float, *topics: str) -> bool:
        """Every topic's newest message stamped at or after `stamp` (a message in flight when the
        simulator reset carries an older stamp); by receipt after `t` where a stamp is missing."""
        def after(item) -> bool:
            if item is None:
                return False
            return item[1] >= stamp if stamp is not None and item[1] is not None else item[2] > t
        return all(after(self._newest.get(k)) for k in topics)

    def close(self) -> None:
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        self._subs.clear()


class RosArmBase(_Topics):
    """What every ROS arm backend shares: the control period's sleep, and waiting for its commands to arrive."""

    command_publishers: tuple = ()  # set by the subclass: its command (and gripper) publishers

    def __init__(self, node, control_hz: float, max_age: float, group):
        super().__init__(node, max_age, group)
        self.control_hz = control_hz
        self._next_wait = time.monotonic()

    def wait(self) -> None:
        self._next_wait = max(self._next_wait + 1.0 / self.control_hz, time.monotonic())
        time.sleep(max(0.0, self._next_wait - time.monotonic()))

    def _parse_joints(self, msg: JointState):
        """(arm positions, velocities, gripper opening = the finger joints' sum), stamp; joints matched by name."""
        pos, vel = common.select_joints(msg, self.joint_names + self.finger_names, self.topics[0])
        n = len(self.joint_names)
        return (pos[:n], vel[:n], float(pos[n:].sum())), common.from_time(msg.header.stamp)

    def flush(self, timeout: float = 0.5) -> None:
        """Wait up to `timeout` s for subscribers to acknowledge every command sent (a hold before shutdown)."""
        from rclpy.duration import Duration
        for pub in self.command_publishers:
            if pub is not None:
                pub.wait_for_all_acked(Duration(seconds=timeout))


class RosArm(RosArmBase):
    """ArmBackend over joint_states, current_pose and current_twist; commands the impedance equilibrium pose."""

    def __init__(self, node, control_hz: float, safety: SafetyConfig | None = None, max_age: float | None = None,
                 joint_names=common.PANDA_JOINTS, finger_names=common.PANDA_FINGER_JOINTS,
                 frame: str = common.BASE_FRAME, max_opening: float = common.GRIPPER_MAX_OPENING,
                 joint_states: str = common.JOINT_STATES, pose: str = common.TOOL_POSE, twist: str = common.TOOL_TWIST,
                 equilibrium_pose: str = common.EQUILIBRIUM_POSE, gripper: str = common.GRIPPER_COMMANDS,
                 callback_group=None, qos: dict | None = None):
        """qos: {"joint_states"|"current_pose"|"current_twist": QoSProfile} overrides (an arm profile's)."""
        super().__init__(node, control_hz, max_age if max_age else 2.0 / control_hz, callback_group)
        self.safety = safety or SafetyConfig()
        self.joint_names, self.finger_names = tuple(joint_names), tuple(finger_names)
        self.frame, self.max_opening = frame, max_opening
        self.topics = (joint_states, pose, twist)
        qos = {"joint_states": common.RELIABLE_QOS, "current_pose": common.SENSOR_QOS,
               "current_twist": common.SENSOR_QOS, **(qos or {})}
        self._sub(JointState, joint_states, qos["joint_states"], self._parse_joints)
        self._sub(PoseStamped, pose, qos["current_pose"], self._parse_pose)
        self._sub(TwistStamped, twist, qos["current_twist"], self._parse_twist)
        self.pose_pub = node.create_publisher(PoseStamped, equilibrium_pose, common.RELIABLE_QOS)
        self.gripper_pub = node.create_publisher(Float64MultiArray, gripper, common.RELIABLE_QOS)
        self.command_publishers = (self.pose_pub, self.gripper_pub)
        self.joint_receipt = float("nan")  # receipt time (monotonic) of the joint_states the last read() used

    def _parse_pose(self, msg: PoseStamped):
        if msg.header.frame_id and msg.header.frame_id != self.frame:
            raise ValueError(f"PoseStamped.header.frame_id is {msg.header.frame_id!r}, expected {self.frame!r}")
        pos, quat = common.pose_arrays(msg)
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(quat))):
            raise ValueError(f"PoseStamped.pose is not finite: {pos.tolist()} {quat.tolist()}")
        if abs(np.linalg.norm(quat) - 1.0) > 1e-3:
            raise ValueError(f"PoseStamped.pose.orientation is not a unit quaternion: {quat.tolist()}")
        return (pos, quat), common.from_time(msg.header.stamp)

    def _parse_twist(self, msg: TwistStamped):
        v = msg.twist.linear
        lin = np.array([v.x, v.y, v.z])
        if not np.all(np.isfinite(lin)):
            raise ValueError(f"TwistStamped.twist.linear is not finite: {lin.tolist()}")
        return lin, common.from_time(msg.header.stamp)

    def read(self) -> ArmState:
        ((q, dq, grip), stamp, receipt), ((pos, quat), _, _), (lin, _, _) = (self._fresh(t) for t in self.topics)
        self.joint_receipt = receipt
        return ArmState(self.joint_names, q, dq, pos, quat, lin, grip, stamp)

    def command(self, target: ToolTarget) -> None:
        state = self.read()  # never command against a stale pose
        pos = clamp_tool_target(state.tool_pos, target.pos, self.safety)
        quat = clamp_tool_rotation(state.tool_quat, target.quat, self.safety)
        gripper = None if target.gripper is None else float(require_finite([target.gripper], "gripper action")[0])
        self._publish(pos, quat)
        if gripper is not None:
            self._command_gripper(gripper)

    def _command_gripper(self, action: float) -> None:
        """The gripper action (-1 open, +1 closed) as the finger opening on the gripper topic."""
        self.gripper_pub.publish(Float64MultiArray(data=[common.gripper_opening(action, self.max_opening)]))

    def hold(self) -> np.ndarray | None:
        """Command the newest measured pose whatever its age; returns it (None before any pose arrived)."""
        item = self._newest.get(self.topics[1])
        if item is None:
            return None
        pos, quat = item[0]
        self._publish(pos, quat)
        return np.concatenate([pos, quat])

    def _publish(self, pos, quat) -> None:
        now = self.node.get_clock().now().nanoseconds * 1e-9
        self.pose_pub.publish(common.pose_msg(pos, quat, now, self.frame))

    def close(self) -> None:
        super().close()
        self.node.destroy_publisher(self.pose_pub)
        self.node.destroy_publisher(self.gripper_pub)


class RosCamera(_Topics):
    """The newest frame of `<name>/image_raw` (sensor_msgs/Image) or of a topic ending in `/compressed`
    (sensor_msgs/CompressedImage), cropped and resized to `shape` as every camera is (hardware.cameras.fit_frame)."""

    def __init__(self, node, name: str, shape: tuple[int, int, int], max_age: float, topic: str | None = None,
                 callback_group=None, crop="center"):
        from robolearn.hardware.cameras import fit_frame
        super().__init__(node, max_age, callback_group)
        self.name, self.shape, self.crop = name, tuple(int(s) for s in shape), crop
        self.topic = topic or common.IMAGE_RAW.format(camera=name)
        self._fit = fit_frame
        if self.topic.rstrip("/").endswith("/compressed"):
            from sensor_msgs.msg import CompressedImage
            try:  # here, not per frame: without OpenCV every frame would be refused and only a timeout said so
                import cv2
            except ImportError:
                raise ValueError(f"camera {name!r}: {self.topic} is compressed and decoding it needs OpenCV: pip install "
                                 "opencv-python-headless") from None
            self._cv2 = cv2
            self._sub(CompressedImage, self.topic, common.SENSOR_QOS, self._parse_compressed)
        else:
            self._sub(Image, self.topic, common.SENSOR_QOS, self._parse)

    def _parse(self, msg):
        return self._fitted(common.image_array(msg)), common.from_time(msg.header.stamp)

    def _parse_compressed(self, msg):
        cv2 = self._cv2
        data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise ValueError(f"CompressedImage.data ({data.size} bytes, format {msg.format!r}) does not decode")
        return self._fitted(np.ascontiguousarray(bgr[..., ::-1])), common.from_time(msg.header.stamp)

    def _fitted(self, frame: np.ndarray) -> np.ndarray:
        try:
            return self._fit(frame, self.shape[:2], self.crop)
        except ValueError as err:  # a crop box set for another camera's size
            raise ValueError(f"{err} (camera {self.name!r})") from None

    def read(self) -> tuple[np.ndarray, float]:
        frame, stamp, _ = self._fresh(self.topic)
        return frame, stamp

    def age(self) -> float:
        """s since the newest frame, by receipt and by stamp on the node's clock, as read() judges it; inf before any."""
        item = self._newest.get(self.topic)
        if item is None:
            return float("inf")
        now = self.node.get_clock().now().nanoseconds * 1e-9
        return max(time.monotonic() - item[2], now - item[1] if item[1] is not None else 0.0)


class RosTask(_Topics):
    """Task over task/object_state, task/reward and task/success (from the simulator, or a perception
    or reward-classifier node on a real robot)."""

    def __init__(self, node, uses_gripper: bool, max_age: float, object_state: str = common.OBJECT_STATE,
                 reward: str = common.REWARD, success: str = common.SUCCESS, callback_group=None):
        super().__init__(node, max_age, callback_group)
        self.uses_gripper, self.topics = uses_gripper, (object_state, reward, success)
        self._sub(Float64MultiArray, object_state, common.RELIABLE_QOS, self._parse_object)
        self._sub(Float64, reward, common.RELIABLE_QOS, lambda m: (self._finite(m.data, "Float64.data"), None))
        self._sub(Bool, success, common.RELIABLE_QOS, lambda m: (bool(m.data), None))

    @staticmethod
    def _finite(x: float, field: str) -> float:
        if not np.isfinite(x):
            raise ValueError(f"{field} is not finite: {x}")
        return float(x)

    def _parse_object(self, msg: Float64MultiArray):
        arr = np.asarray(msg.data, dtype=float)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"Float64MultiArray.data is not finite: {arr.tolist()}")
        return arr, None

    def object_state(self, arm) -> np.ndarray:
        return self._fresh(self.topics[0])[0]

    def score(self, arm) -> tuple[float, bool]:
        """Newest reward and success; (0.0, False) before the first message."""
        reward = self._newest.get(self.topics[1], (0.0,))[0]
        return float(reward), bool(self._newest.get(self.topics[2], (False,))[0])


class RosReset:
    """ResetHandler calling a std_srvs/Trigger service; returns once fresh state arrived after the reset."""

    def __init__(self, node, arm: RosArm, task: RosTask | None = None, service: str = common.RESET_SERVICE,
                 timeout: float = 30.0, callback_group=None):
        self.node, self.arm, self.task, self.timeout = node, arm, task, timeout
        self.client = node.create_client(Trigger, service, callback_group=callback_group)

    def reset(self, rng: np.random.Generator) -> dict:
        """The simulator seeds its k-th reset itself (its `seed` parameter + k); `rng` is not sent."""
        name = self.node.resolve_service_name(self.client.srv_name)
        if not self.client.wait_for_service(timeout_sec=self.timeout):
            raise TimeoutError(f"reset service {name} is not available after {self.timeout:.0f} s")
        done = threading.Event()
        future = self.client.call_async(Trigger.Request())
        future.add_done_callback(lambda _: done.set())
        if not wait_until(self.node, done.is_set, self.timeout):
            self.client.remove_pending_request(future)
            raise TimeoutError(f"reset service {name} did not answer within {self.timeout:.0f} s")
        response = future.result()
        if not response.success:
            raise RuntimeError(f"reset service {name} failed: {response.message}")
        t = time.monotonic()
        try:  # sim_robot_node answers {"seed", "stamp", "info"}: the state to wait for is stamped after it
            stamp = float(json.loads(response.message)["stamp"])
        except (ValueError, TypeError, KeyError):
            stamp = None
        fresh = lambda: self.arm.stamped_after(stamp, t, *self.arm.topics) and (  # noqa: E731
            self.task is None or self.task.received_after(t, self.task.topics[0]))
        if not wait_until(self.node, fresh, self.timeout):
            raise TimeoutError(f"no robot state arrived within {self.timeout:.0f} s after the reset")
        return {"reset_message": response.message}

    def close(self) -> None:
        self.node.destroy_client(self.client)
