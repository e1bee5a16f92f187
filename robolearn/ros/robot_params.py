"""The ROS robot env from node parameters: the robot profile both agent_node and record_node take.

One table of parameters (robot-env settings, safety box, joint names, topics), one coercion, and
`make_robot_env`, which composes RosArm, RosTask, RosCamera and RosReset into the RobotEnv the
simulator uses too. Parameter list: docs/ros.md ("Robot profile").
"""

from __future__ import annotations

import numpy as np
from rcl_interfaces.msg import ParameterDescriptor

from robolearn.controllers.safety import SafetyConfig
from robolearn.robot.env import RobotEnv, RobotEnvConfig
from robolearn.robot.interfaces import StaleStateError
from robolearn.ros import common
from robolearn.ros.ros_backend import RosArm, RosCamera, RosReset, RosTask, wait_until

ENV_FIELDS = ("control_hz", "max_episode_steps", "action_mode", "action_scale", "rotation_scale", "tool_quat",
              "reward_type", "terminate_on_success")
SAFETY_FIELDS = ("workspace_low", "workspace_high", "max_translation_step", "max_rotation_step",
                 "workspace_recovery_gain")
_FIELDS = {**{f: getattr(RobotEnvConfig(), f) for f in ENV_FIELDS}, **{f: getattr(SafetyConfig(), f) for f in SAFETY_FIELDS}}
ROBOT_PARAMS = {  # name: (default, description)
    **{f: (list(v) if isinstance(v, tuple) else v, f"{'SafetyConfig' if f in SAFETY_FIELDS else 'RobotEnvConfig'}"
           f".{f}; must match the checkpoint") for f, v in _FIELDS.items()},
    "max_obs_age": (0.0, "s; an older state or object state holds the arm (0: two control periods)"),
    "max_image_age": (0.0, "s; an older camera frame holds the arm (0: max_obs_age)"),
    "cameras": ([], "camera names; frames come from <name>/image_raw"),
    "image_shape": ([], "[H, W] of the camera frames (empty: the checkpoint's or the dataset's)"),
    "uses_gripper": (True, "the task has a gripper action (the last action entry)"),
    "startup_timeout": (30.0, "s to wait at startup for the first robot state"),
    "reset_timeout": (30.0, "s to wait for the reset service and the state after it"),
    "reset": ("", "episode reset: empty = call reset_service (the simulator's, or your robot's); else a YAML file "
                  "with a `reset:` mapping: scripted, operator, service, or learned (agent_node mode train; "
                  "docs/resets.md)"),
    "profile": ("", "arm profile: a shipped name (franka_fr3, ur5e_ros2, ros2_control_position, ...) or a YAML "
                    "path (docs/hardware.md); it then names the joints, topics, QoS and the backend's own box and "
                    "reference limits, and the parameters from frame_id to gripper_topic are unused"),
    "frame_id": (common.BASE_FRAME, "frame of current_pose and of the commands"),
    "joint_names": (list(common.PANDA_JOINTS), "arm joints read from joint_states"),
    "finger_joints": (list(common.PANDA_FINGER_JOINTS), "gripper joints; their positions sum to the opening"),
    "gripper_max_opening": (common.GRIPPER_MAX_OPENING, "m; gripper action -1 opens this far, +1 closes"),
    "joint_states_topic": (common.JOINT_STATES, "sensor_msgs/JointState in (reliable)"),
    "pose_topic": (common.TOOL_POSE, "geometry_msgs/PoseStamped in (best effort)"),
    "twist_topic": (common.TOOL_TWIST, "geometry_msgs/TwistStamped in (best effort)"),
    "equilibrium_pose_topic": (common.EQUILIBRIUM_POSE, "geometry_msgs/PoseStamped out"),
    "gripper_topic": (common.GRIPPER_COMMANDS, "std_msgs/Float64MultiArray out: [opening m]"),
    "object_state_topic": (common.OBJECT_STATE, "std_msgs/Float64MultiArray in (policies without cameras)"),
    "reward_topic": (common.REWARD, "std_msgs/Float64 in"),
    "success_topic": (common.SUCCESS, "std_msgs/Bool in"),
    "reset_service": (common.RESET_SERVICE, "std_srvs/Trigger called at each episode start"),
}
STRINGS = ("cameras", "joint_names", "finger_joints")


def coerce(name: str, value, default):
    """A parameter value as its default's type (dynamic typing lets `action_scale:=1` through)."""
    if value is None and isinstance(default, list):  # `-p name:=[]` arrives unset: an empty list
        return []
    try:
        if isinstance(default, (bool, str)):
            if type(value) is not type(default):
                raise TypeError
            return value
        if isinstance(default, (int, float)):
            return type(default)(value)
        return [str(v) if name in STRINGS else float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name}: {value!r} is not a {type(default).__name__}") from None


def declare(node, table: dict) -> None:
    for name, (default, text) in table.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=text, dynamic_typing=True))


def read(node, table: dict) -> dict:
    return {name: coerce(name, node.get_parameter(name).value, d) for name, (d, _) in table.items()}


def env_config(p: dict) -> RobotEnvConfig:
    tup = lambda f: tuple(p[f]) if isinstance(p[f], list) else p[f]  # noqa: E731
    return RobotEnvConfig(**{f: tup(f) for f in ENV_FIELDS}, safety=SafetyConfig(**{f: tup(f) for f in SAFETY_FIELDS}))


def fresh(read_fn) -> bool:
    return not _unready(read_fn)


def _unready(read_fn) -> str:
    try:
        read_fn()
        return ""
    except StaleStateError as err:
        return str(err)


def make_robot_env(node, p: dict, camera_shapes: dict[str, list[int]], group, env_id: str) -> tuple[RobotEnv, list]:
    """The RobotEnv on the ROS robot `p` describes, once every part has a fresh message; returns (env, parts)."""
    cfg = env_config(p)
    age = p["max_obs_age"] or 2.0 / cfg.control_hz
    if p.get("profile"):  # every input topic heard, QoS and joint order checked, within the profile's timeout
        from robolearn.hardware.profiles import load_profile
        from robolearn.ros.arm_profile import open_arm
        profile = load_profile(p["profile"])
        low, high = (np.asarray(v, float) for v in (cfg.safety.workspace_low, cfg.safety.workspace_high))
        if np.any(low < np.asarray(profile.workspace_low) - 1e-9) or np.any(high > np.asarray(profile.workspace_high) + 1e-9):
            raise ValueError(f"parameters workspace_low/high {low.tolist()} .. {high.tolist()} reach outside the "
                             f"profile's workspace {list(profile.workspace_low)} .. {list(profile.workspace_high)} "
                             f"({profile.path}); the policy would aim where the arm may not go")
        if profile.backend == "ur_rtde":  # no driver topics: ur_rtde talks to the controller itself
            if not p.get("reset"):
                raise ValueError(f"{profile.path}: a ur_rtde arm has no reset service; set the reset parameter to a "
                                 "YAML file with a scripted or operator reset (docs/resets.md)")
            from robolearn.hardware.ur_rtde_arm import UrRtdeArm
            arm = UrRtdeArm(profile, cfg.control_hz, profile.safety(cfg.safety))
        else:
            arm = open_arm(node, profile, cfg.control_hz, cfg.safety, age, group)
    else:
        arm = RosArm(node, cfg.control_hz, cfg.safety, age, p["joint_names"], p["finger_joints"], p["frame_id"],
                     p["gripper_max_opening"], p["joint_states_topic"], p["pose_topic"], p["twist_topic"],
                     p["equilibrium_pose_topic"], p["gripper_topic"], callback_group=group)
    task = RosTask(node, p["uses_gripper"], age, p["object_state_topic"], p["reward_topic"], p["success_topic"],
                   callback_group=group)
    cameras = {cam: RosCamera(node, cam, shape, p["max_image_age"] or age, callback_group=group)
               for cam, shape in camera_shapes.items()}
    parts = [arm, task, *cameras.values()]
    try:
        resetter, more = make_resetter(node, p, arm, None if cameras else task, cfg, group)
    except Exception:
        for part in parts:
            part.close()
        raise
    parts += more
    reads = [arm.read, *(c.read for c in cameras.values())] + ([] if cameras else [lambda: task.object_state(arm)])
    if not wait_until(node, lambda: not any(map(_unready, reads)), p["startup_timeout"]):
        for part in parts:
            part.close()
        raise TimeoutError(f"no robot state within startup_timeout {p['startup_timeout']:g} s: "
                           + "; ".join(filter(None, map(_unready, reads))))
    env = RobotEnv(arm, task, resetter, cfg, cameras, env_id=env_id)
    for part in parts:
        if hasattr(part, "attach"):  # a learned reset acts through the env
            try:
                part.attach(env)
            except Exception:
                for other in parts:
                    other.close()
                raise
    return env, parts


def make_resetter(node, p: dict, arm, task, cfg, group) -> tuple:
    """(reset handler, its parts to close): the reset service, or the handler the `reset` YAML names."""
    if not p.get("reset"):
        resetter = RosReset(node, arm, task, p["reset_service"], p["reset_timeout"], group)
        return resetter, [resetter]
    from robolearn.hardware.resets import load_reset_spec, parse_config

    spec, where = load_reset_spec(p["reset"])
    parts: list = []
    try:
        return build_reset(node, p, arm, task, cfg, group, parse_config(spec, where), where, parts), parts
    except Exception:
        for part in parts:
            part.close()
        raise


def build_reset(node, p: dict, arm, task, cfg, group, typed, where: str, parts: list):
    """One reset config as a handler on this ROS robot; what must be closed later goes into `parts`."""
    from robolearn.hardware import resets

    if isinstance(typed, resets.ServiceResetConfig):
        handler = RosReset(node, arm, task, typed.service, typed.timeout, group)
        parts.append(handler)
        return handler
    if isinstance(typed, resets.LearnedResetConfig):
        if p.get("mode") != "train":
            raise ValueError(f"{where}: a learned reset trains alongside the forward agent: agent_node mode:=train")
        from robolearn.ros.backward_reset import BackwardReset
        fallback = build_reset(node, p, arm, task, cfg, group, resets.parse_config(typed.fallback, f"{where}.fallback"),
                               f"{where}.fallback", parts)
        after = None
        if typed.then:
            after = build_reset(node, p, arm, task, cfg, group, resets.parse_config(typed.then, f"{where}.then"),
                                f"{where}.then", parts)
        handler = BackwardReset(node, typed, fallback, p, where, group, after)
        parts.append(handler)
        return handler
    if isinstance(typed, resets.OperatorResetConfig):
        inner = None
        if typed.inner:
            inner = build_reset(node, p, arm, task, cfg, group, resets.parse_config(typed.inner, f"{where}.inner"),
                                f"{where}.inner", parts)
        if typed.confirm == "trigger":
            from robolearn.ros.operator_reset import TriggerConfirm
            confirm = TriggerConfirm(node, typed.service, group)
            parts.append(confirm)
        else:
            confirm = resets.KeyConfirm()
        return resets.OperatorReset(confirm, inner, typed.timeout, arm)
    if isinstance(typed, resets.ScriptedResetConfig):  # the arm's own box and step limit (a profile's), as it moves
        return resets.make_reset(typed, arm, where=where, safety=getattr(arm, "safety", cfg.safety))
    raise ValueError(f"{where}: type demo_state is for simulation: set the simulator's env option reset_from_demos "
                     "(sim_robot_node env_overrides)")


def camera_shapes(p: dict, spec: dict, what: str) -> dict[str, list[int]]:
    """{camera: [H, W, 3]} from the `cameras`/`image_shape` parameters, else from an observation spec."""
    out = {}
    for cam in p["cameras"]:
        shape = [*map(int, p["image_shape"]), 3] if p["image_shape"] else spec.get(f"images/{cam}")
        if not shape:
            raise ValueError(f"camera {cam!r} is not in the {what}'s observation space; set image_shape")
        out[cam] = list(shape)
    return out
