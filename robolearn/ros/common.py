"""Conventions every robolearn node shares: topic names, QoS, and message <-> array conversions.

Topic names are relative, so a launch file's namespace applies to all of them. They follow the
drivers the nodes stand in for (ros2_control, franka_ros2); ../../docs/ros.md lists them.
"""

from __future__ import annotations

import threading

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState

from robolearn.launcher import isolated_env  # noqa: F401  (defined there, without ROS; nodes and tests import it here)

# Defaults of the topic parameters (each node exposes them as ROS parameters).
JOINT_STATES = "joint_states"  # sensor_msgs/JointState, reliable (joint_state_broadcaster)
TOOL_POSE = "current_pose"  # geometry_msgs/PoseStamped, best effort (franka_robot_state_broadcaster)
TOOL_TWIST = "current_twist"  # geometry_msgs/TwistStamped, best effort
EQUILIBRIUM_POSE = "cartesian_impedance_controller/equilibrium_pose"  # PoseStamped (franka_ros2, SERL)
FORWARD_COMMANDS = "forward_position_controller/commands"  # std_msgs/Float64MultiArray
JOINT_TRAJECTORY = "joint_trajectory_controller/joint_trajectory"  # trajectory_msgs/JointTrajectory
GRIPPER_COMMANDS = "gripper_controller/commands"  # Float64MultiArray: [finger opening, m]
RESET_SERVICE = "reset"  # std_srvs/Trigger
REWARD, SUCCESS, OBJECT_STATE = "task/reward", "task/success", "task/object_state"  # Float64, Bool, Float64MultiArray
RESET_REWARD, RESET_SUCCESS = "reset_task/reward", "reset_task/success"  # the backward task of a learned reset
ESTOP = "estop"  # std_msgs/Bool; True latches the e-stop
DIAGNOSTICS = "/diagnostics"  # diagnostic_msgs/DiagnosticArray

SENSOR_QOS = qos_profile_sensor_data  # images, camera_info, tool pose/twist: best effort, keep last 5
RELIABLE_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


def to_time(seconds: float) -> Time:
    sec = int(np.floor(seconds))
    return Time(sec=sec, nanosec=int(round((seconds - sec) * 1e9)) % 1_000_000_000)


def from_time(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def joint_state_msg(names, position, velocity, stamp: float) -> JointState:
    msg = JointState()
    msg.header.stamp = to_time(stamp)
    msg.name = list(names)
    msg.position = [float(x) for x in position]
    msg.velocity = [float(x) for x in velocity]
    return msg


def pose_msg(pos, quat, stamp: float, frame: str) -> PoseStamped:
    """PoseStamped from a position and a (w, x, y, z) quaternion (ROS orders it x, y, z, w)."""
    msg = PoseStamped()
    msg.header.stamp, msg.header.frame_id = to_time(stamp), frame
    p, o = msg.pose.position, msg.pose.orientation
    p.x, p.y, p.z = (float(v) for v in pos)
    o.w, o.x, o.y, o.z = (float(v) for v in quat)
    return msg


def pose_arrays(msg: PoseStamped) -> tuple[np.ndarray, np.ndarray]:
    """(position, (w, x, y, z) quaternion) of a PoseStamped."""
    p, o = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), np.array([o.w, o.x, o.y, o.z])


def twist_msg(linear, angular, stamp: float, frame: str) -> TwistStamped:
    msg = TwistStamped()
    msg.header.stamp, msg.header.frame_id = to_time(stamp), frame
    (l, a) = msg.twist.linear, msg.twist.angular
    l.x, l.y, l.z = (float(v) for v in linear)
    a.x, a.y, a.z = (float(v) for v in angular)
    return msg


def select_joints(msg: JointState, names, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities of `names` from a JointState in any order; an unknown or missing name,
    a length mismatch or a non-finite value raises ValueError naming the field."""
    if len(msg.position) != len(msg.name) or (msg.velocity and len(msg.velocity) != len(msg.name)):
        raise ValueError(f"{where}: JointState has {len(msg.name)} names but {len(msg.position)} positions "
                         f"and {len(msg.velocity)} velocities")
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{where}: JointState lacks joints {missing}; it has {list(msg.name)}")
    idx = [index[n] for n in names]
    pos = np.asarray(msg.position, dtype=float)[idx]
    vel = np.asarray(msg.velocity, dtype=float)[idx] if msg.velocity else np.zeros(len(idx))
    for field, arr in (("position", pos), ("velocity", vel)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: JointState.{field} is not finite: {arr.tolist()}")
    return pos, vel


def executor(threads: int = 2, context=None):
    """The executor for a node whose own thread does the real work while subscriptions keep its newest messages.

    rclpy's EventsExecutor (C++, rclpy >= kilted) where it exists: under a MultiThreadedExecutor the
    agent node spent 0.96 of a core waiting on ~600 state messages/s and its control thread queued
    for the GIL (jitter p99 10-20 ms); under this one, 0.13 of a core (bench/control_loop.py,
    docs/benchmarks.md). An older system rclpy (humble, jazzy) falls back to `threads` worker threads.
    """
    try:
        from rclpy.experimental import EventsExecutor
    except ImportError:
        from rclpy.executors import MultiThreadedExecutor
        return MultiThreadedExecutor(num_threads=threads, context=context)
    return EventsExecutor(context=context)


def spin(executor, stop: threading.Event, logger) -> None:
    """Spin until `stop` is set, for a thread of its own beside the node's work.

    Not executor.spin(): an entity destroyed mid-wait (cleanup) or a callback's exception ends rclpy's
    own spin and leaves the node deaf, the watchdog and e-stop included; and the EventsExecutor's
    spin() deadlocks a thread that creates a subscription meanwhile (record_node hung at full CPU),
    where spin_once does not."""
    while not stop.is_set() and executor.context.ok():
        try:
            executor.spin_once(timeout_sec=0.1)
        except Exception as err:
            logger.error(f"executor: {err!r}", throttle_duration_sec=1.0)


# --- added for sim_robot_node: camera topics, the simulator's clock, image conversion -------------
IMAGE_RAW = "{camera}/image_raw"  # sensor_msgs/Image, SENSOR_QOS
CAMERA_INFO = "{camera}/camera_info"  # sensor_msgs/CameraInfo, SENSOR_QOS
CLOCK = "/clock"  # rosgraph_msgs/Clock from the simulator when use_sim_time is true


def image_msg(frame: np.ndarray, stamp: float, frame_id: str):
    """sensor_msgs/Image (rgb8) from an H x W x 3 uint8 frame."""
    from sensor_msgs.msg import Image
    msg = Image()
    msg.header.stamp, msg.header.frame_id = to_time(stamp), frame_id
    msg.height, msg.width = int(frame.shape[0]), int(frame.shape[1])
    msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, int(frame.shape[1]) * 3
    msg.data = np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    return msg


# --- added for agent_node and the ROS backends (ros_backend.py) ---------------------------------
PANDA_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))  # franka_description names
PANDA_FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")  # gripper opening = their sum
BASE_FRAME = "base"  # frame_id of current_pose and of the equilibrium pose commands
GRIPPER_MAX_OPENING = 0.08  # m, both fingers together
IMAGE_ENCODINGS = ("rgb8", "bgr8")  # what image_array decodes


def gripper_opening(action: float, max_opening: float = GRIPPER_MAX_OPENING) -> float:
    """Finger opening (m) for a gripper action in [-1 open, +1 closed], as the simulator maps it."""
    return max_opening * (1.0 - float(np.clip(action, -1.0, 1.0))) / 2.0


def image_array(msg) -> np.ndarray:
    """H x W x 3 uint8 RGB frame of an rgb8/bgr8 sensor_msgs/Image (row padding dropped); ValueError naming the field."""
    if msg.encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"Image.encoding {msg.encoding!r} is not one of {IMAGE_ENCODINGS}")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < 3 * w or len(msg.data) < step * h:
        raise ValueError(f"Image.data has {len(msg.data)} bytes, too few for {h}x{w} rgb with step {step}")
    rows = np.frombuffer(bytes(msg.data), dtype=np.uint8, count=step * h).reshape(h, step)
    frame = rows[:, :3 * w].reshape(h, w, 3)
    return np.ascontiguousarray(frame[..., ::-1] if msg.encoding == "bgr8" else frame)


# --- added for the actor/learner split (agent_node mode:=train, learner_node) -----------------------
EPISODES = "learner/episodes"  # std_msgs/UInt8MultiArray: a finished episode (robolearn.payload), PAYLOAD_QOS
WEIGHTS = "learner/weights"  # std_msgs/UInt8MultiArray: the newest weights, WEIGHTS_QOS (late joiners get them)
ACKS = "learner/acks"  # std_msgs/String: JSON {"actor": id, "episodes": [index, ...]} once stored on disk
PAYLOAD_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
WEIGHTS_QOS = LATCHED_QOS


def payload_msg(data: bytes):
    """std_msgs/UInt8MultiArray carrying safetensors bytes (robolearn.payload)."""
    from std_msgs.msg import UInt8MultiArray
    msg = UInt8MultiArray()
    msg.data = data
    return msg


def payload_bytes(msg) -> bytes:
    data = msg.data
    return data.tobytes() if hasattr(data, "tobytes") else bytes(data)


def spin_until_shutdown(executor) -> None:
    """Spin a node's executor until SIGINT/SIGTERM shuts the context down (the node's own main thread).

    Not rclpy.spin: rclpy's signal thread wakes the wait before it shuts the context down, and a spin that
    blocks again in between ignored a SIGTERM; a timeout re-checks the context."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    try:
        while rclpy.ok(context=executor.context):
            executor.spin_once(timeout_sec=0.25)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
