"""`RosJointArm`: the ArmBackend for joint-level arms, built from an arm profile (robolearn.hardware.profiles).

ros2_control's ForwardCommandController (position or velocity), its joint_trajectory_controller, and the
Universal Robots driver's forward controllers report joint angles, not a tool pose: the tool pose comes from
the profile's DH kinematics, and a Cartesian target becomes joint targets through a damped-least-squares IK
step. Joint states are matched by name; commands go out in the controller's `joints` order.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from builtin_interfaces.msg import Duration
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64, Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from robolearn.controllers.dh import ik_step
from robolearn.controllers.safety import (SafetyConfig, clamp_joint_target, clamp_tool_rotation, clamp_tool_target,
                                          require_finite)
from robolearn.robot.interfaces import ArmState, StaleStateError, ToolTarget
from robolearn.ros import common
from robolearn.ros.ros_backend import RosArmBase, wait_until

MIN_SCALING = 1e-3  # speed scaling at or below this counts as stopped (UR: program paused, slider at 0)
VELOCITY_GAIN = 2.0  # 1/s: velocity streaming also pulls the measured joints toward the interpolated reference


def profile_qos(qos: str):
    """The rclpy QoS for a profile topic's `qos` field."""
    return common.SENSOR_QOS if qos == "best_effort" else common.RELIABLE_QOS


def duration(seconds: float) -> Duration:
    sec = int(seconds)
    return Duration(sec=sec, nanosec=int(round((seconds - sec) * 1e9)))


class RosJointArm(RosArmBase):
    """ArmBackend and JointMover over joint_states and a joint-level controller, as the profile describes."""

    def __init__(self, node, profile, control_hz: float | None = None, safety: SafetyConfig | None = None,
                 max_age: float | None = None, callback_group=None):
        control_hz = control_hz or profile.control_hz
        super().__init__(node, control_hz, max_age if max_age else 2.0 / control_hz, callback_group)
        if profile.backend != "ros_joint" or profile.kinematics is None:
            raise ValueError(f"{profile.path}: RosJointArm needs backend ros_joint with kinematics, "
                             f"got backend {profile.backend}")
        self.profile = profile
        if profile.command_hz > 0 and profile.interface in ("position", "velocity") and profile.command_hz < control_hz:
            raise ValueError(f"{profile.path}: command_hz {profile.command_hz:g} is below the control rate "
                             f"{control_hz:g} Hz: each target would be over before the first streamed command")
        self.safety = safety or profile.safety()
        self.chain = profile.kinematics.chain()
        self.joint_names = profile.joints
        self.finger_names = profile.gripper.joints if profile.gripper else ()
        self.max_opening = profile.gripper.max_opening if profile.gripper else common.GRIPPER_MAX_OPENING
        self.interface = profile.interface
        self.low, self.high = np.array(profile.position_low), np.array(profile.position_high)
        self.vmax = np.array(profile.velocity_limit)
        self.order = np.array([profile.joints.index(n) for n in profile.command_joints])  # joints -> command order
        t = profile.topics
        self.topics = (t["joint_states"].name,)  # what RosReset waits for after a reset
        self.inputs = {"joint_states": t["joint_states"]}  # role -> Topic, checked at configure
        self._sub(JointState, t["joint_states"].name, profile_qos(t["joint_states"].qos), self._parse_joints)
        self.scaling_topic = t["speed_scaling"].name if "speed_scaling" in t else None
        if self.scaling_topic:
            self.inputs["speed_scaling"] = t["speed_scaling"]
            self._sub(Float64, self.scaling_topic, profile_qos(t["speed_scaling"].qos), self._parse_scaling)
        out = t["trajectory"] if self.interface == "trajectory" else t["commands"]
        self.command_topic = out.name
        self.command_pub = node.create_publisher(JointTrajectory if self.interface == "trajectory"
                                                 else Float64MultiArray, out.name, profile_qos(out.qos))
        self.gripper_pub = (node.create_publisher(Float64MultiArray, t["gripper"].name, profile_qos(t["gripper"].qos))
                            if "gripper" in t else None)
        self.command_publishers = (self.command_pub, self.gripper_pub)
        name = profile.services.get("resend_robot_program")
        self.resend_client = node.create_client(Trigger, name, callback_group=callback_group) if name else None
        self.joint_receipt = float("nan")
        self._lock = threading.Lock()
        self._segment = None  # (q0, q1, t0, T): the streamed reference moves from q0 to q1 over T s from t0
        self._last_reference = None  # position streaming: where the previous segment ended (the next starts there)
        self._stop = threading.Event()
        self._streamer = None
        if profile.command_hz > 0 and self.interface in ("position", "velocity"):
            self._streamer = threading.Thread(target=self._stream, name=f"{profile.name} stream", daemon=True)
            self._streamer.start()

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def _parse_scaling(msg: Float64):
        if not np.isfinite(msg.data):
            raise ValueError(f"Float64.data is not finite: {msg.data}")
        return float(msg.data), None

    def _check_scaling(self) -> None:
        if self.scaling_topic:
            scaling = self._fresh(self.scaling_topic)[0]
            if scaling <= MIN_SCALING:
                name = self.node.resolve_topic_name(self.scaling_topic)
                raise StaleStateError(f"{name} is {scaling:g}: the robot program is paused or the speed slider "
                                      "is at 0 (streaming controllers ignore it); holding")

    def read(self) -> ArmState:
        (q, dq, grip), stamp, receipt = self._fresh(self.topics[0])
        self._check_scaling()
        self.joint_receipt = receipt
        pos, quat = self.chain.fk(q)
        lin = (self.chain.jacobian(q) @ dq)[:3]
        return ArmState(self.joint_names, q, dq, pos, quat, lin, grip, stamp)

    # -- commands ------------------------------------------------------------------------------
    def command(self, target: ToolTarget) -> None:
        state = self.read()  # never command against a stale state or a stopped robot
        pos = clamp_tool_target(state.tool_pos, target.pos, self.safety)
        quat = clamp_tool_rotation(state.tool_quat, target.quat, self.safety)
        margin = self.safety.joint_margin
        q = ik_step(self.chain, state.position, pos, quat, self.low + margin, self.high - margin)
        period = 1.0 / self.control_hz
        q = clamp_joint_target(state.position, q, self.low, self.high, period, self.safety)
        self._move(state.position, q, period)
        if target.gripper is not None and self.gripper_pub is not None:
            action = float(require_finite([target.gripper], "gripper action")[0])
            self.gripper_pub.publish(Float64MultiArray(data=[common.gripper_opening(action, self.max_opening)]))

    def move_joints(self, q, duration_s: float) -> None:
        """JointMover: go to `q` (joint_names order) over `duration_s` s along interpolated targets; blocks."""
        state = self.read()
        q = self.profile.check_move(q, state.position, duration_s)
        self._move(state.position, q, duration_s)
        time.sleep(duration_s)
        if self.interface == "velocity":
            self._publish_velocity(np.zeros(len(q)))

    def _move(self, q_now: np.ndarray, q_target: np.ndarray, seconds: float) -> None:
        if self.interface == "trajectory":
            self._publish_trajectory(q_target, seconds)
        elif self._streamer is None:
            if self.interface == "position":
                self._publish_position(q_target)
            else:
                self._publish_velocity(np.clip((q_target - q_now) / seconds, -self.vmax, self.vmax))
        else:
            with self._lock:
                if self.interface == "velocity":
                    start = q_now
                elif self._segment is not None:
                    start = self._reference()
                else:  # from where the streamed reference stopped, not the measured (lagging) position: no step back
                    start = q_now if self._last_reference is None else self._last_reference
                self._segment = (start, q_target, time.monotonic(), seconds)

    def _reference(self, now: float | None = None) -> np.ndarray:
        q0, q1, t0, span = self._segment
        s = min(max(((now or time.monotonic()) - t0) / span, 0.0), 1.0)
        return q0 + s * (q1 - q0)

    def _stream(self) -> None:
        """At command_hz: position -> the interpolated reference; velocity -> its rate plus a pull toward it,
        zeros once the segment is over (a policy that falls silent stops the arm)."""
        period, due = 1.0 / self.profile.command_hz, time.monotonic()
        while not self._stop.is_set():
            # Publish under the lock: a hold() between reading the segment and publishing it would otherwise be
            # followed by this thread's stale velocity, which a ForwardCommandController keeps forever.
            with self._lock:
                seg, now = self._segment, time.monotonic()
                if seg is None:
                    if self.interface == "velocity":  # no motion asked for: keep saying so
                        self._publish_velocity(np.zeros(len(self.joint_names)))
                else:
                    ref, over = self._reference(now), now - seg[2] > seg[3]
                    if self.interface == "position":
                        self._publish_position(ref)
                    elif over:
                        self._publish_velocity(np.zeros(len(ref)))
                    else:
                        q = self._newest.get(self.topics[0])
                        pull = VELOCITY_GAIN * (ref - q[0][0]) if q is not None else 0.0
                        self._publish_velocity(np.clip((seg[1] - seg[0]) / seg[3] + pull, -self.vmax, self.vmax))
                    if over:
                        self._segment, self._last_reference = None, seg[1]
            due = max(due + period, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _publish_position(self, q: np.ndarray) -> None:
        self.command_pub.publish(Float64MultiArray(data=[float(v) for v in np.asarray(q)[self.order]]))

    def _publish_velocity(self, v: np.ndarray) -> None:
        self.command_pub.publish(Float64MultiArray(data=[float(x) for x in np.asarray(v)[self.order]]))

    def _publish_trajectory(self, q: np.ndarray, seconds: float) -> None:
        point = JointTrajectoryPoint(positions=[float(v) for v in q[self.order]], time_from_start=duration(seconds))
        # A zero header stamp: the controller starts the trajectory on receipt.
        self.command_pub.publish(JointTrajectory(joint_names=list(self.profile.command_joints), points=[point]))

    def hold(self) -> np.ndarray | None:
        """Stop where the arm is: the measured positions (position, trajectory) or zero velocity; returns the
        measured joint positions (None before any joint state arrived)."""
        item = self._newest.get(self.topics[0])
        q = None if item is None else item[0][0].copy()
        with self._lock:  # the streamer publishes under this lock too: nothing it read before can follow
            self._segment, self._last_reference = None, q
            if self.interface == "velocity":
                self._publish_velocity(np.zeros(len(self.joint_names)))
            elif q is not None and self.interface == "position":
                self._publish_position(q)
            elif q is not None and self.interface == "trajectory":
                self._publish_trajectory(q, 1.0 / self.control_hz)
        return q

    def recover(self, timeout: float = 10.0) -> str:
        """UR: call resend_robot_program (restarts the external control program after a stop); its message."""
        if self.resend_client is None:
            raise RuntimeError(f"{self.profile.path}: no services.resend_robot_program to recover with")
        name = self.node.resolve_service_name(self.resend_client.srv_name)
        if not self.resend_client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"{name} (services.resend_robot_program) is not available after {timeout:g} s")
        done = threading.Event()
        future = self.resend_client.call_async(Trigger.Request())
        future.add_done_callback(lambda _: done.set())
        if not wait_until(self.node, done.is_set, timeout):
            self.resend_client.remove_pending_request(future)
            raise TimeoutError(f"{name} did not answer within {timeout:g} s")
        if not future.result().success:
            raise RuntimeError(f"{name} failed: {future.result().message}")
        return future.result().message

    def close(self) -> None:
        if self._stop.is_set():  # closed already
            return
        self._stop.set()
        if self._streamer is not None:
            self._streamer.join(timeout=2.0)
        if self.interface == "velocity":  # a ForwardCommandController keeps its last velocity: leave it at zero
            self._publish_velocity(np.zeros(len(self.joint_names)))
        super().close()
        self.node.destroy_publisher(self.command_pub)
        if self.gripper_pub is not None:
            self.node.destroy_publisher(self.gripper_pub)
        if self.resend_client is not None:
            self.node.destroy_client(self.resend_client)
