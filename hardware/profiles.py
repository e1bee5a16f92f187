"""Arm profiles: one YAML file per arm naming its joints, limits, home, workspace, interface, topics and rates.

`load_profile(name_or_path)` reads a shipped profile (hardware/profiles/<name>.yaml) or a file of the
user's into a typed, validated `ArmProfile`; bad input raises `ProfileError`, one line naming the file
and the field. Every field is documented in docs/hardware.md. No ROS here: the ROS backends
(robolearn.ros.joint_arm, robolearn.ros.arm_profile) and the ur_rtde backend consume the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from robolearn.controllers.dh import CONVENTIONS, DHChain
from robolearn.controllers.safety import SafetyConfig, require_finite

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
# backend -> the command interfaces it speaks
INTERFACES = {
    "ros_joint": ("position", "velocity", "trajectory"),  # ros2_control ForwardCommandController / JTC, UR driver
    "ros_cartesian": ("cartesian_impedance",),  # franka_ros2's Cartesian impedance controller (RosArm)
    "ur_rtde": ("servo", "speed"),  # ur_rtde servoL / speedL, no ROS
}
QOS = ("reliable", "best_effort")
# topic role -> (default QoS, backends that take it)
TOPIC_ROLES = {
    "joint_states": ("reliable", ("ros_joint", "ros_cartesian")),
    "commands": ("reliable", ("ros_joint",)),  # <controller>/commands, Float64MultiArray in command_joints order
    "trajectory": ("reliable", ("ros_joint",)),  # <controller>/joint_trajectory
    "speed_scaling": ("reliable", ("ros_joint",)),  # UR: speed_scaling_state_broadcaster/speed_scaling
    "current_pose": ("best_effort", ("ros_cartesian",)),
    "current_twist": ("best_effort", ("ros_cartesian",)),
    "equilibrium_pose": ("reliable", ("ros_cartesian",)),
    "gripper": ("reliable", ("ros_joint", "ros_cartesian")),
}
SERVICES = {"resend_robot_program": ("ros_joint",)}  # std_srvs/Trigger (UR driver)
ACTIONS = {"error_recovery": ("ros_cartesian",),  # franka_msgs/action/ErrorRecovery
           "gripper_move": ("ros_cartesian",), "gripper_grasp": ("ros_cartesian",)}  # franka_msgs Move, Grasp
TOP_KEYS = ("name", "description", "backend", "interface", "joints", "command_joints", "limits", "home", "workspace",
            "reference_limit", "frame_id", "kinematics", "topics", "services", "actions", "gripper", "rates",
            "timeouts", "rtde")


class ProfileError(ValueError):
    """A profile that cannot drive an arm; the message names the file and the field."""


@dataclass(frozen=True)
class Topic:
    name: str
    qos: str = "reliable"  # reliable | best_effort


@dataclass(frozen=True)
class Kinematics:
    """A DH table (rows a, alpha, d, theta_offset) and the fixed last-joint -> tool transform."""

    convention: str
    dh: tuple[tuple[float, float, float, float], ...]
    tool_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tool_rpy: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def chain(self) -> DHChain:
        return DHChain.from_table(self.convention, self.dh, self.tool_xyz, self.tool_rpy)


@dataclass(frozen=True)
class Gripper:
    joints: tuple[str, ...] = ()  # their positions in joint_states sum to the opening
    max_opening: float = 0.08  # m, at gripper action -1
    speed: float = 0.1  # m/s of the fingers (gripper_move / gripper_grasp actions)
    force: float = 20.0  # N, gripper_grasp's grasping force


@dataclass(frozen=True)
class Rtde:
    """ur_rtde settings: the robot's control rate and servoL's smoothing."""

    host: str = "192.168.1.102"
    robot_hz: float = 500.0  # e-Series 500, CB3 125
    lookahead_time: float = 0.1  # s, servoL: 0.03-0.2
    gain: float = 300.0  # servoL: 100-2000
    acceleration: float = 0.5  # m/s^2, speedL


@dataclass(frozen=True)
class ArmProfile:
    """Everything robolearn needs to drive one arm; see docs/hardware.md for each field."""

    name: str
    path: str
    backend: str
    interface: str
    joints: tuple[str, ...]
    command_joints: tuple[str, ...]
    position_low: tuple[float, ...]
    position_high: tuple[float, ...]
    velocity_limit: tuple[float, ...]
    home: tuple[float, ...]
    workspace_low: tuple[float, float, float]
    workspace_high: tuple[float, float, float]
    max_translation_step: float  # reference limit: m from the measured tool position
    max_rotation_step: float  # rad from the measured tool orientation
    frame_id: str = "base"
    kinematics: Kinematics | None = None
    topics: dict[str, Topic] = field(default_factory=dict)
    services: dict[str, str] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)
    gripper: Gripper | None = None
    control_hz: float = 10.0
    command_hz: float = 0.0  # streaming rate of interpolated commands (0: one message per control period)
    startup_timeout: float = 5.0  # s for every input topic's first message at configure
    description: str = ""
    rtde: Rtde | None = None

    def safety(self, base: SafetyConfig | None = None) -> SafetyConfig:
        """The backend's own safety layer: this profile's box and reference limits."""
        base = base or SafetyConfig()
        return SafetyConfig(self.workspace_low, self.workspace_high, self.max_translation_step,
                             self.max_rotation_step, base.workspace_recovery_gain, base.joint_margin,
                             self.velocity_limit)


    def check_move(self, q, q_now, duration: float) -> np.ndarray:
        """A JointMover target as an array: one finite position per joint, within the limits, and reachable
        from `q_now` in `duration` s at the velocity limits; ValueError naming the joint otherwise."""
        q = require_finite(q, "move_joints target")
        if q.shape != (len(self.joints),):
            raise ValueError(f"move_joints: {q.size} positions for joints {list(self.joints)}")
        outside = [f"{n} = {v:.3f}" for n, v, lo, hi in zip(self.joints, q, self.position_low, self.position_high)
                   if not lo <= v <= hi]
        if outside:
            raise ValueError(f"move_joints: {', '.join(outside)} outside the limits of {self.path}")
        fastest = float(np.max(np.abs(q - np.asarray(q_now)) / np.asarray(self.velocity_limit)))
        if duration < fastest:
            raise ValueError(f"move_joints: {duration:g} s is too fast for the velocity limits (needs {fastest:.2f} s)")
        return q


def shipped() -> list[str]:
    """Names of the profiles that ship with robolearn."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ProfileError(f"{name_or_path}: arm profile file not found")
        return path
    path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(f"arm profile {name_or_path!r} is neither a file nor a shipped profile {shipped()}")
    return path


def load_profile(name_or_path: str) -> ArmProfile:
    """The validated profile a shipped name or a YAML path gives; ProfileError names file and field."""
    path = resolve(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not YAML: {' '.join(str(err).split())}") from None
    return parse_profile(data, str(path))


def parse_profile(data, where: str) -> ArmProfile:
    r = _Reader(where)
    d = r.mapping(data, "", TOP_KEYS, required=True)
    backend = r.choice(d, "backend", tuple(INTERFACES))
    interface = r.choice(d, "interface", INTERFACES[backend], f"for backend {backend}")
    joints = r.names(d, "joints")
    n = len(joints)
    command_joints = r.names(d, "command_joints") if "command_joints" in d else joints
    if sorted(command_joints) != sorted(joints):
        raise r.error("command_joints", f"{list(command_joints)} are not the same joints as joints {list(joints)}")
    lim = r.mapping(d.get("limits"), "limits", ("position_low", "position_high", "velocity"), required=True)
    low, high = r.floats(lim, "limits.position_low", n), r.floats(lim, "limits.position_high", n)
    for i, (lo, hi) in enumerate(zip(low, high)):
        if lo > hi:
            raise r.error("limits", f"{joints[i]}: position_low {lo} > position_high {hi}")
    vel = r.floats(lim, "limits.velocity", n)
    if min(vel) <= 0:
        raise r.error("limits.velocity", f"{list(vel)} must all be > 0")
    home = r.floats(d, "home", n)
    for i, q in enumerate(home):
        if not low[i] <= q <= high[i]:
            raise r.error("home", f"{joints[i]} = {q} is outside its limits [{low[i]}, {high[i]}]")
    ws = r.mapping(d.get("workspace"), "workspace", ("low", "high"), required=True)
    ws_low, ws_high = r.floats(ws, "workspace.low", 3), r.floats(ws, "workspace.high", 3)
    if any(lo >= hi for lo, hi in zip(ws_low, ws_high)):
        raise r.error("workspace", f"low {list(ws_low)} must be below high {list(ws_high)} on every axis")
    ref = r.mapping(d.get("reference_limit"), "reference_limit", ("translation", "rotation"), required=True)
    trans, rot = r.positive(ref, "reference_limit.translation"), r.positive(ref, "reference_limit.rotation")
    kin = _kinematics(r, d.get("kinematics"), n, required=backend == "ros_joint")
    topics = _topics(r, d.get("topics") or {}, backend, interface)
    services = _named(r, d.get("services") or {}, "services", SERVICES, backend)
    actions = _named(r, d.get("actions") or {}, "actions", ACTIONS, backend)
    grip = None
    if d.get("gripper") is not None:
        g = r.mapping(d["gripper"], "gripper", ("joints", "max_opening", "speed", "force"))
        grip = Gripper(r.names(g, "gripper.joints") if "joints" in g else (),
                       r.positive(g, "gripper.max_opening") if "max_opening" in g else 0.08,
                       r.positive(g, "gripper.speed") if "speed" in g else 0.1,
                       r.positive(g, "gripper.force") if "force" in g else 20.0)
    rates = r.mapping(d.get("rates") or {}, "rates", ("control_hz", "command_hz"))
    control_hz = r.positive(rates, "rates.control_hz") if "control_hz" in rates else 10.0
    command_hz = r.number(rates, "rates.command_hz") if "command_hz" in rates else 0.0
    if command_hz < 0 or (command_hz and command_hz < control_hz):
        raise r.error("rates.command_hz", f"{command_hz} must be 0 or at least control_hz {control_hz}")
    if interface == "velocity" and not command_hz:
        raise r.error("rates.command_hz", "must be > 0 for interface velocity (zeros are streamed once a target "
                                          "is reached, so a silent policy stops the arm)")
    timeouts = r.mapping(d.get("timeouts") or {}, "timeouts", ("startup",))
    startup = r.positive(timeouts, "timeouts.startup") if "startup" in timeouts else 5.0
    rtde = None
    if backend == "ur_rtde":
        t = r.mapping(d.get("rtde") or {}, "rtde", ("host", "robot_hz", "lookahead_time", "gain", "acceleration"))
        kw = {k: (str(t[k]) if k == "host" else r.positive(t, f"rtde.{k}")) for k in t}
        rtde = Rtde(**kw)
        if rtde.robot_hz not in (125.0, 500.0):
            raise r.error("rtde.robot_hz", f"{rtde.robot_hz} is not 125 (CB3) or 500 (e-Series)")
        if not 0.03 <= rtde.lookahead_time <= 0.2 or not 100 <= rtde.gain <= 2000:
            raise r.error("rtde", f"lookahead_time {rtde.lookahead_time} must be in 0.03-0.2 and gain {rtde.gain} "
                                  "in 100-2000 (servoL's ranges)")
    elif "rtde" in d:
        raise r.error("rtde", f"only backend ur_rtde takes it (backend is {backend})")
    name = d.get("name") or Path(where).stem
    return ArmProfile(str(name), where, backend, interface, joints, command_joints, low, high, vel, home, ws_low,
                      ws_high, trans, rot, str(d.get("frame_id", "base")), kin, topics, services, actions, grip,
                      control_hz, command_hz, startup, str(d.get("description", "")), rtde)


def _kinematics(r: _Reader, data, n: int, required: bool) -> Kinematics | None:
    if data is None:
        if required:
            raise r.error("kinematics", "is required: joint-level arms compute the tool pose from the joint angles")
        return None
    k = r.mapping(data, "kinematics", ("convention", "dh", "tool_xyz", "tool_rpy"))
    conv = r.choice(k, "kinematics.convention", CONVENTIONS)
    rows = k.get("dh")
    if not isinstance(rows, list) or len(rows) != n:
        raise r.error("kinematics.dh", f"needs {n} rows [a, alpha, d, theta_offset], one per joint; got "
                                       f"{len(rows) if isinstance(rows, list) else type(rows).__name__}")
    dh = tuple(r.floats({"x": row}, f"kinematics.dh[{i}]", 4, key="x") for i, row in enumerate(rows))
    xyz = r.floats(k, "kinematics.tool_xyz", 3) if "tool_xyz" in k else (0.0, 0.0, 0.0)
    rpy = r.floats(k, "kinematics.tool_rpy", 3) if "tool_rpy" in k else (0.0, 0.0, 0.0)
    return Kinematics(conv, dh, xyz, rpy)


def _topics(r: _Reader, data, backend: str, interface: str) -> dict[str, Topic]:
    allowed = tuple(k for k, (_, b) in TOPIC_ROLES.items() if backend in b)
    t = r.mapping(data, "topics", allowed)
    out = {}
    for role, value in t.items():
        qos = TOPIC_ROLES[role][0]
        if isinstance(value, dict):
            v = r.mapping(value, f"topics.{role}", ("name", "qos"))
            qos = r.choice(v, f"topics.{role}.qos", QOS) if "qos" in v else qos
            value = v.get("name")
        if not isinstance(value, str) or not value:
            raise r.error(f"topics.{role}", f"{value!r} is not a topic name")
        out[role] = Topic(value, qos)
    needed = {"ros_joint": ("joint_states", "trajectory" if interface == "trajectory" else "commands"),
              "ros_cartesian": ("joint_states", "current_pose", "current_twist", "equilibrium_pose"),
              "ur_rtde": ()}[backend]
    for role in needed:
        if role not in out:
            raise r.error(f"topics.{role}", f"is required for backend {backend} with interface {interface}")
    return out


def _named(r: _Reader, data, what: str, table: dict, backend: str) -> dict[str, str]:
    allowed = tuple(k for k, b in table.items() if backend in b)
    m = r.mapping(data, what, allowed)
    for k, v in m.items():
        if not isinstance(v, str) or not v:
            raise r.error(f"{what}.{k}", f"{v!r} is not a name")
    return dict(m)


class _Reader:
    """Typed field access that names the file and the field in every error."""

    def __init__(self, where: str):
        self.where = where

    def error(self, field_name: str, text: str) -> ProfileError:
        return ProfileError(f"{self.where}: {field_name}: {text}")

    def mapping(self, data, name: str, allowed: tuple, required: bool = False) -> dict:
        if data is None and not required:
            return {}
        if not isinstance(data, dict):
            raise self.error(name or "(top level)", f"must be a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            prefix = f"{name}." if name else ""
            raise self.error(f"{prefix}{unknown[0]}", f"unknown field; known: {', '.join(allowed)}")
        return data

    def choice(self, data: dict, name: str, options: tuple, context: str = "") -> str:
        value = data.get(name.rsplit(".", 1)[-1])
        if value not in options:
            raise self.error(name, f"{value!r} is not one of {', '.join(options)}{' ' + context if context else ''}")
        return value

    def names(self, data: dict, name: str) -> tuple[str, ...]:
        value = data.get(name.rsplit(".", 1)[-1])
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"must be a non-empty list of names, got {value!r}")
        if len(set(value)) != len(value):
            raise self.error(name, f"names a joint twice: {value}")
        return tuple(value)

    def floats(self, data: dict, name: str, n: int, key: str | None = None) -> tuple[float, ...]:
        value = data.get(key or name.rsplit(".", 1)[-1])
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise self.error(name, f"must be a list of {n} numbers, got {value!r}")
        if len(value) != n:
            raise self.error(name, f"has {len(value)} values, expected {n}")
        if not all(abs(float(v)) < float("inf") for v in value):
            raise self.error(name, f"is not finite: {value}")
        return tuple(float(v) for v in value)

    def number(self, data: dict, name: str) -> float:
        value = data.get(name.rsplit(".", 1)[-1])
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) < float("inf"):
            raise self.error(name, f"must be a number, got {value!r}")
        return float(value)

    def positive(self, data: dict, name: str) -> float:
        value = self.number(data, name)
        if value <= 0:
            raise self.error(name, f"must be > 0, got {value}")
        return value
