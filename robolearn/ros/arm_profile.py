"""The arm backend an arm profile names, checked at configure: every input topic heard, QoS compatible,
the controller's joint order the profile's (robolearn.hardware.profiles; docs/hardware.md).

`open_arm(node, profile, control_hz)` returns a `RosJointArm` (ros2_control, UR driver) or a `FrankaArm`
(franka_ros2's Cartesian impedance controller through RosArm) once it is ready, or raises one line naming
the profile file, the topic and the cause.
"""

from __future__ import annotations

import threading
import time

from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import GetParameters
from rclpy.qos import QoSCompatibility, qos_check_compatible

from robolearn.controllers.safety import SafetyConfig
from robolearn.hardware.profiles import ArmProfile, load_profile
from robolearn.robot.interfaces import StaleStateError
from robolearn.ros.joint_arm import RosJointArm, profile_qos
from robolearn.ros.ros_backend import RosArm, wait_until

FRANKA_MSGS_MISSING = "install franka_msgs (franka_ros2) on the robot's ROS install to enable error recovery"


class FrankaArm(RosArm):
    """RosArm from a franka_ros2 profile, plus error recovery through franka_msgs' ErrorRecovery action."""

    def __init__(self, node, profile: ArmProfile, control_hz: float, safety: SafetyConfig,
                 max_age: float | None = None, callback_group=None):
        t = profile.topics
        grip = profile.gripper
        super().__init__(node, control_hz, safety, max_age, profile.joints, grip.joints if grip else (),
                         profile.frame_id, grip.max_opening if grip else 0.08, t["joint_states"].name,
                         t["current_pose"].name, t["current_twist"].name, t["equilibrium_pose"].name,
                         t["gripper"].name if "gripper" in t else "gripper_controller/commands",
                         callback_group=callback_group,
                         qos={r: profile_qos(t[r].qos) for r in ("joint_states", "current_pose", "current_twist")})
        self.profile = profile
        self.inputs = {r: t[r] for r in ("joint_states", "current_pose", "current_twist")}
        self.recovery_error, self._recovery, self._grip_clients, self._closed = "", None, None, None
        self._setup_gripper_actions(node, profile, callback_group)
        action = profile.actions.get("error_recovery")
        if action:
            try:
                from franka_msgs.action import ErrorRecovery
            except ImportError:
                self.recovery_error = FRANKA_MSGS_MISSING
                node.get_logger().warning(f"{profile.path}: actions.error_recovery {action}: {FRANKA_MSGS_MISSING}")
            else:
                from rclpy.action import ActionClient
                self._recovery = ActionClient(node, ErrorRecovery, action, callback_group=callback_group)

    def _setup_gripper_actions(self, node, profile: ArmProfile, group) -> None:
        """franka_gripper's move/grasp actions (as SERL drives the Franka hand: open or grasp), where the profile
        names them and franka_msgs is on the robot's ROS install; else the gripper topic stays."""
        names = [profile.actions.get(k) for k in ("gripper_move", "gripper_grasp")]
        if not any(names):
            return
        if not all(names):
            raise ValueError(f"{profile.path}: actions.gripper_move and actions.gripper_grasp go together")
        try:
            from franka_msgs.action import Grasp, Move
        except ImportError:
            node.get_logger().warning(f"{profile.path}: actions.gripper_move/grasp: install franka_msgs (franka_ros2) "
                                      f"on the robot's ROS install to drive the gripper; until then the opening goes "
                                      f"to {self.gripper_pub.topic_name}")
            return
        from rclpy.action import ActionClient
        self._grip_clients = (ActionClient(node, Move, names[0], callback_group=group),
                              ActionClient(node, Grasp, names[1], callback_group=group))

    def _command_gripper(self, action: float) -> None:
        """Binary, as SERL: +side grasps (width 0, the profile's force), -side moves open; a goal only on a change."""
        if self._grip_clients is None:
            return super()._command_gripper(action)
        closed = action > 0.0
        if closed == self._closed:
            return
        self._closed = closed
        grip, (move, grasp) = self.profile.gripper, self._grip_clients
        if closed:
            goal = grasp._action_type.Goal(width=0.0, speed=grip.speed, force=grip.force)
            goal.epsilon.inner = goal.epsilon.outer = grip.max_opening  # any width counts as a grasp
            grasp.send_goal_async(goal)
        else:
            move.send_goal_async(move._action_type.Goal(width=grip.max_opening, speed=grip.speed))

    def recover(self, timeout: float = 10.0) -> str:
        """Clear a reflex or error through the ErrorRecovery action; the controllers then run again."""
        if self._recovery is None:
            raise RuntimeError(self.recovery_error or f"{self.profile.path}: no actions.error_recovery")
        name = self.profile.actions["error_recovery"]
        if not self._recovery.wait_for_server(timeout_sec=timeout):
            raise TimeoutError(f"{name} (actions.error_recovery) is not available after {timeout:g} s")
        goal = self._recovery._action_type.Goal()
        done, result = threading.Event(), {}

        def finished(fut):
            try:
                result["status"] = fut.result().status
            except Exception as err:  # noqa: BLE001 - reported by recover() itself
                result["error"] = repr(err)
            done.set()

        def accepted(fut):
            try:
                handle = fut.result()
            except Exception as err:  # noqa: BLE001
                result["error"] = repr(err)
                return done.set()
            if not handle.accepted:
                result["error"] = "goal rejected"
                return done.set()
            result["handle"] = handle
            handle.get_result_async().add_done_callback(finished)

        self._recovery.send_goal_async(goal).add_done_callback(accepted)
        if not wait_until(self.node, done.is_set, timeout):
            if "handle" in result:  # not left running after we gave up on it
                result["handle"].cancel_goal_async()
            raise TimeoutError(f"{name} did not finish within {timeout:g} s (goal canceled)")
        if "error" in result:
            raise RuntimeError(f"{name}: {result['error']}")
        from action_msgs.msg import GoalStatus
        if result.get("status") != GoalStatus.STATUS_SUCCEEDED:
            raise RuntimeError(f"{name}: recovery ended with goal status {result.get('status')} (not succeeded)")
        return "recovered"

    def close(self) -> None:
        for client in (self._recovery, *(self._grip_clients or ())):
            if client is not None:
                client.destroy()
        super().close()


def make_arm(node, profile: ArmProfile | str, control_hz: float | None = None, base: SafetyConfig | None = None,
             max_age: float | None = None, callback_group=None):
    """The backend for `profile` (a profile or its name/path), unchecked; the safety layer is the profile's."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    control_hz = control_hz or profile.control_hz
    safety = profile.safety(base)
    if profile.backend == "ros_joint":
        return RosJointArm(node, profile, control_hz, safety, max_age, callback_group)
    if profile.backend == "ros_cartesian":
        return FrankaArm(node, profile, control_hz, safety, max_age, callback_group)
    raise ValueError(f"{profile.path}: backend {profile.backend} is not a ROS backend (robolearn.hardware.ur_rtde_arm)")


def open_arm(node, profile: ArmProfile | str, control_hz: float | None = None, base: SafetyConfig | None = None,
             max_age: float | None = None, callback_group=None, timeout: float | None = None):
    """make_arm, then check_arm; closes the arm and raises when a check fails."""
    arm = make_arm(node, profile, control_hz, base, max_age, callback_group)
    try:
        check_arm(node, arm, timeout)
    except BaseException:
        arm.close()
        raise
    return arm


def check_arm(node, arm, timeout: float | None = None) -> None:
    """Within the profile's startup timeout: a message on every input topic (a silent topic is named, a QoS
    mismatch with its publishers too), a state read() accepts, and the controller's joint order."""
    profile = arm.profile
    timeout = profile.startup_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        silent = [(role, topic) for role, topic in arm.inputs.items() if topic.name not in arm._newest]
        for role, topic in silent:
            mismatch = _qos_mismatch(node, topic.name, profile_qos(topic.qos))
            if mismatch:
                raise ValueError(f"{profile.path}: topics.{role}: {mismatch}")
        if not silent:
            break
        if time.monotonic() > deadline:
            role, topic = silent[0]
            name = node.resolve_topic_name(topic.name)
            pubs = len(node.get_publishers_info_by_topic(name))
            why = f"; {arm.last_error}" if arm.last_error else "; is the driver running and the controller active?"
            raise TimeoutError(f"{profile.path}: topics.{role}: no message on {name} within {timeout:g} s "
                               f"({pubs} publishers){why}")
        wait_until(node, lambda: False, 0.02)
    while True:
        try:
            arm.read()
            break
        except StaleStateError as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{profile.path}: no usable state within {timeout:g} s: {err}") from None
            wait_until(node, lambda: False, 0.02)
    if isinstance(arm, RosJointArm):
        # A controller node answers within a discovery round; a stand-in without one (sim_robot_node) costs 1 s.
        _check_controller_joints(node, arm, min(1.0, max(0.5, deadline - time.monotonic())))


def _qos_mismatch(node, topic: str, ours) -> str:
    """Why no publisher on `topic` can reach a subscription with QoS `ours` ('' when one can, or none exists)."""
    name = node.resolve_topic_name(topic)
    pubs = node.get_publishers_info_by_topic(name)
    reasons = []
    for info in pubs:
        compat, reason = qos_check_compatible(info.qos_profile, ours)
        if compat != QoSCompatibility.ERROR:
            return ""
        reasons.append(f"publisher {info.node_namespace.rstrip('/')}/{info.node_name} is "
                       f"{_describe(info.qos_profile)}, this subscription {_describe(ours)}")
    return f"QoS mismatch on {name}: " + "; ".join(reasons) if reasons else ""


def _describe(qos) -> str:
    return f"{qos.reliability.name.lower()}/{qos.durability.name.lower()}"


def _check_controller_joints(node, arm: RosJointArm, timeout: float) -> None:
    """The controller node's `joints` parameter (ros2_control: node = the topic's namespace) must be the
    profile's command_joints, in order for a forward controller: data[i] goes to joints[i]."""
    controller = arm.command_topic.rsplit("/", 1)[0] if "/" in arm.command_topic else ""
    if not controller:
        return
    client = node.create_client(GetParameters, f"{controller}/get_parameters")
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            node.get_logger().warning(f"{arm.profile.path}: cannot check the joint order: {controller}/get_parameters "
                                      f"did not answer within {timeout:.1f} s")
            return
        done = threading.Event()
        future = client.call_async(GetParameters.Request(names=["joints"]))
        future.add_done_callback(lambda _: done.set())
        if not wait_until(node, done.is_set, timeout):
            client.remove_pending_request(future)
        value = future.result().values[0] if done.is_set() and future.result().values else None
        if value is None or value.type != ParameterType.PARAMETER_STRING_ARRAY:
            node.get_logger().warning(f"{arm.profile.path}: cannot check the joint order: {controller} has no "
                                      "string-array `joints` parameter")
            return
        theirs, ours = list(value.string_array_value), list(arm.profile.command_joints)
        same = sorted(theirs) == sorted(ours) if arm.interface == "trajectory" else theirs == ours
        if not same:
            raise ValueError(f"{arm.profile.path}: command_joints {ours} do not match the joints parameter of "
                             f"{node.resolve_topic_name(controller)}: {theirs} (wrong joint order)")
    finally:
        node.destroy_client(client)
