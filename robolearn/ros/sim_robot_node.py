"""A MuJoCo task behind the topics a ros2_control / franka_ros2 arm offers, so nothing downstream can tell.

`python -m robolearn.ros.sim_robot_node --ros-args -p env_id:=...`; docs/ros.md ("sim_robot_node")
lists its topics, services and parameters.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback

from robolearn.sim import UnknownEnvError, make  # first: it picks the headless GL backend before mujoco loads

import mujoco
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TwistStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, Float64, Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from robolearn.cli import _parse_overrides
from robolearn.controllers.safety import clamp_joint_target, clamp_tool_rotation, clamp_tool_target
from robolearn.robot.interfaces import ToolTarget
from robolearn.ros import common as c
from robolearn.sim.mujoco_arm import FINGER_OPEN, MujocoArm, MujocoCamera

FINGER_JOINTS = ("finger_joint1", "finger_joint2")  # MujocoArm's gripper joints, as franka names them
ARRAY = Parameter.Type.STRING_ARRAY  # declared without a default: an unset one reads as []
PARAMS = {  # name: (default, description)
    "env_id": ("robolearn/PandaPickCube-v0", "robolearn env id of a MuJoCo arm task (robolearn/Panda*-v0)"),
    "env_overrides": (ARRAY, "KEY=VALUE env config fields, values parsed as JSON where they parse (as --env-set)"),
    "seed": (0, "the k-th call of the reset service resets with seed + k (the start-up reset uses seed)"),
    "joint_prefix": ("panda_", "prefix of the published joint names (prefix + joint1..7, finger_joint1/2)"),
    "joints": (ARRAY, "joint order of forward_position_controller/commands; default the prefixed arm joints"),
    "frame_id": ("base", "frame of the tool pose and twist; equilibrium poses in another frame are dropped"),
    "cameras": (ARRAY, "model cameras published as <cam>/image_raw and <cam>/camera_info (default none)"),
    "image_size": (0, "camera image side in pixels; 0 = the env's image_size"),
    "camera_rate_hz": (10.0, "camera publication rate in simulated time"),
    "publish_rate_hz": (50.0, "state publication rate; physics steps in chunks of one such period"),
    "real_time_factor": (1.0, "simulated seconds per wall second; 0 = unpaced (only with use_sim_time)"),
    "joint_states_topic": (c.JOINT_STATES, "sensor_msgs/JointState out, reliable"),
    "tool_pose_topic": (c.TOOL_POSE, "geometry_msgs/PoseStamped out, best effort"),
    "tool_twist_topic": (c.TOOL_TWIST, "geometry_msgs/TwistStamped out, best effort"),
    "equilibrium_pose_topic": (c.EQUILIBRIUM_POSE, "geometry_msgs/PoseStamped in: Cartesian impedance target"),
    "forward_commands_topic": (c.FORWARD_COMMANDS, "std_msgs/Float64MultiArray in: joint position target"),
    "joint_trajectory_topic": (c.JOINT_TRAJECTORY, "trajectory_msgs/JointTrajectory in"),
    "gripper_commands_topic": (c.GRIPPER_COMMANDS, "std_msgs/Float64MultiArray in: [finger opening, m]"),
    "reset_service": (c.RESET_SERVICE, "std_srvs/Trigger: reset the task with the next seed"),
    "reward_topic": (c.REWARD, "std_msgs/Float64 out: the task's reward"),
    "success_topic": (c.SUCCESS, "std_msgs/Bool out: the task's success"),
    "object_state_topic": (c.OBJECT_STATE, "std_msgs/Float64MultiArray out: the task's object state"),
    "reset_reward_topic": (c.RESET_REWARD, "std_msgs/Float64 out: the backward task's reward (tasks with one: PickCube)"),
    "reset_success_topic": (c.RESET_SUCCESS, "std_msgs/Bool out: the backward task's success (a learned reset's goal)"),
}


class ConfigError(ValueError):
    """A parameter the node cannot start with."""


def _values(values, n: int, label: str, hint: str) -> np.ndarray:
    """`values` as n finite floats, or ValueError naming the field (as ForwardCommandController checks)."""
    arr = np.asarray(values, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{label} has {arr.size} values, expected {n} ({hint})")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{label}[{bad[0]}] is {arr[bad[0]]}")
    return arr


class SimRobotNode(Node):
    """Steps the env's MuJoCo arm in its own thread; ROS callbacks only swap targets under the lock."""

    def __init__(self, **kwargs):
        super().__init__("sim_robot", **kwargs)
        self.p = p = self._read_parameters()
        try:
            overrides = _parse_overrides(p["env_overrides"])
        except ValueError as err:
            raise ConfigError(f"env_overrides: {err}") from None
        self.env = make(p["env_id"], **overrides)  # UnknownEnvError / TypeError name the id or the key
        u = self.env.unwrapped
        if not isinstance(getattr(u, "arm", None), MujocoArm):
            raise ConfigError(f"env_id {p['env_id']!r} is not a MuJoCo arm task (robolearn/Panda*-v0)")
        self.arm, self.task, self.cfg = u.arm, u.task, u.cfg
        model, kin = self.arm.model, self.arm.kin
        size = p["image_size"] or getattr(self.cfg, "image_size", 128)
        largest = min(model.vis.global_.offwidth, model.vis.global_.offheight)
        if p["cameras"] and not 0 < size <= largest:
            raise ConfigError(f"image_size {size} must be in 1..{largest} (the model's offscreen buffer)")
        self.cameras = {n: MujocoCamera(self.arm, n, size, f"sim_robot cameras parameter ({p['env_id']})")
                        for n in p["cameras"]}
        prefix = p["joint_prefix"]
        self.arm_names = [prefix + n for n in kin.joints]  # the model's names: joint1..7
        self.names = self.arm_names + [prefix + n for n in FINGER_JOINTS]
        self.joints = list(p["joints"]) or self.arm_names
        if sorted(self.joints) != sorted(self.arm_names):
            raise ConfigError(f"joints parameter {self.joints} must name each of {self.arm_names} once")
        self._order = [self.arm_names.index(j) for j in self.joints]  # controller order -> model order
        fingers = [model.joint(n).id for n in FINGER_JOINTS]
        self._qadr = np.concatenate([kin.qpos_adr, model.jnt_qposadr[fingers]])
        self._vadr = np.concatenate([kin.dof_adr, model.jnt_dofadr[fingers]])
        self.chunk = max(1, round(1.0 / (p["publish_rate_hz"] * model.opt.timestep)))
        self.period = self.chunk * model.opt.timestep
        self._scratch = mujoco.MjData(model)  # forward kinematics of joint targets, off the live state
        self._home_posture = self.arm.posture.copy()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._goal = None  # joint goal as a function of simulated time; None in Cartesian mode
        self._setpoint = None  # rate-limited joint setpoint chasing the goal
        self.sim_time, self._resets, self._dropped, self.failed = 0.0, 0, 0, False
        self._episode_seed = p["seed"]
        self.env.reset(seed=p["seed"])  # uncounted: the scene before the first reset call is episode 0's
        self._next_frame, self._diag = 0.0, (time.monotonic(), 0.0)
        self._make_interfaces(size)
        self._thread = threading.Thread(target=self._run, name="sim_robot physics", daemon=True)

    def _read_parameters(self) -> dict:
        """Declare PARAMS and return their values, checked; raises ConfigError naming a bad one."""
        for name, (default, text) in PARAMS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=text))
        p = {n: self.get_parameter_or(n, Parameter(n, value=[])).value for n in PARAMS}
        p["use_sim_time"] = self.get_parameter("use_sim_time").value
        unknown = sorted(k for k in getattr(self, "_parameter_overrides", {}) if not self.has_parameter(k))
        if unknown:  # a shared `/**` params file may carry other nodes' parameters: warn, don't fail
            self.get_logger().warning(f"ignoring unknown parameter(s) {unknown}; valid: {sorted(PARAMS)}")
        if p["publish_rate_hz"] <= 0 or p["camera_rate_hz"] <= 0:
            raise ConfigError("publish_rate_hz and camera_rate_hz must be positive")
        if p["real_time_factor"] < 0 or (p["real_time_factor"] == 0 and not p["use_sim_time"]):
            raise ConfigError("real_time_factor must be > 0 (or 0 = unpaced with use_sim_time:=true), "
                              f"got {p['real_time_factor']}")
        return p

    def _make_interfaces(self, size: int) -> None:
        p, pub, sub = self.p, self.create_publisher, self.create_subscription
        self.pub = {"js": pub(JointState, p["joint_states_topic"], c.RELIABLE_QOS),
                    "pose": pub(PoseStamped, p["tool_pose_topic"], c.SENSOR_QOS),
                    "twist": pub(TwistStamped, p["tool_twist_topic"], c.SENSOR_QOS),
                    "reward": pub(Float64, p["reward_topic"], c.RELIABLE_QOS),
                    "success": pub(Bool, p["success_topic"], c.RELIABLE_QOS),
                    "object": pub(Float64MultiArray, p["object_state_topic"], c.RELIABLE_QOS),
                    "reset_reward": pub(Float64, p["reset_reward_topic"], c.RELIABLE_QOS),
                    "reset_success": pub(Bool, p["reset_success_topic"], c.RELIABLE_QOS),
                    "diag": pub(DiagnosticArray, c.DIAGNOSTICS, c.RELIABLE_QOS)}
        self.clock_pub = pub(Clock, c.CLOCK, c.RELIABLE_QOS) if p["use_sim_time"] else None
        self.cam_pub = {n: (pub(Image, c.IMAGE_RAW.format(camera=n), c.SENSOR_QOS),
                            pub(CameraInfo, c.CAMERA_INFO.format(camera=n), c.SENSOR_QOS), self._info(n, size))
                        for n in self.cameras}
        for msg_type, key, handler in ((PoseStamped, "equilibrium_pose_topic", self._on_pose),
                                       (Float64MultiArray, "gripper_commands_topic", self._on_gripper),
                                       (Float64MultiArray, "forward_commands_topic", self._on_forward),
                                       (JointTrajectory, "joint_trajectory_topic", self._on_trajectory)):
            sub(msg_type, p[key], self._guarded(p[key], handler), c.RELIABLE_QOS)
        self.create_service(Trigger, p["reset_service"], self._on_reset)

    def _info(self, cam: str, size: int) -> CameraInfo:
        """Pinhole intrinsics of a square MuJoCo camera: f = (size / 2) / tan(fovy / 2)."""
        fovy = np.deg2rad(self.arm.model.cam_fovy[self.arm.model.camera(cam).id])
        f, centre = size / 2.0 / np.tan(fovy / 2.0), (size - 1) / 2.0  # ROS puts pixel centres on integers
        k = np.array([[f, 0.0, centre], [0.0, f, centre], [0.0, 0.0, 1.0]])
        info = CameraInfo(width=size, height=size, distortion_model="plumb_bob", d=[0.0] * 5, k=k.ravel(),
                          r=np.eye(3).ravel(), p=np.hstack([k, np.zeros((3, 1))]).ravel())
        info.header.frame_id = f"{cam}_optical_frame"
        return info

    # -- commands: validate, then swap the target under the lock ----------------------------
    def _guarded(self, topic: str, handler):
        def callback(msg):
            try:
                handler(msg)
            except ValueError as err:  # UnsafeCommandError included
                self._dropped += 1
                self.get_logger().error(f"{topic}: dropped: {err}")
        return callback

    def _command_pose(self, pos, quat) -> None:
        """Send a tool target through the safety layer, against the measured tool pose (lock held)."""
        arm, safety = self.arm, self.cfg.safety
        quat = clamp_tool_rotation(arm.kin.tool_quat(arm.data), quat, safety)
        arm.command(ToolTarget(clamp_tool_target(arm.tool_pos(), pos, safety), quat))

    def _cartesian_mode(self) -> None:
        self._goal = self._setpoint = None
        self.arm.posture[:] = self._home_posture  # the impedance controller's own nullspace target

    def _on_pose(self, msg: PoseStamped) -> None:
        if msg.header.frame_id not in ("", self.p["frame_id"]):
            raise ValueError(f"header.frame_id is {msg.header.frame_id!r}, expected {self.p['frame_id']!r}")
        pos, quat = c.pose_arrays(msg)
        pos = _values(pos, 3, "pose.position", "x, y, z")
        quat = _values(quat, 4, "pose.orientation", "w, x, y, z")
        with self._lock:
            self._cartesian_mode()
            self._command_pose(pos, quat)

    def _on_gripper(self, msg: Float64MultiArray) -> None:
        (opening,) = _values(msg.data, 1, "data", f"the finger opening in m, 0..{2 * FINGER_OPEN}")
        closing = 1.0 - float(np.clip(opening, 0.0, 2 * FINGER_OPEN)) / FINGER_OPEN  # +1 closed, -1 open
        with self._lock:
            d = self.arm.data
            self.arm.command(ToolTarget(d.mocap_pos[0].copy(), d.mocap_quat[0].copy(), closing))

    def _on_forward(self, msg: Float64MultiArray) -> None:
        q = np.empty(len(self.joints))
        q[self._order] = _values(msg.data, len(self.joints), "data", f"joints: {self.joints}")
        with self._lock:
            self._start_goal(lambda t: q)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        names = list(msg.joint_names)
        unknown = [n for n in names if n not in self.arm_names]
        missing = [n for n in self.arm_names if n not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise ValueError(f"joint_names {names}: unknown {unknown}, missing {missing} "
                             f"(joints: {self.arm_names}, each once)")
        if not msg.points:  # an empty trajectory cancels: hold where the arm is
            with self._lock:
                self._cartesian_mode()
                self.arm.posture[:] = self.arm.kin.q(self.arm.data)
                self.arm.hold()
            return
        order = [names.index(n) for n in self.arm_names]
        times = np.array([c.from_time(pt.time_from_start) for pt in msg.points])  # Duration: sec, nanosec too
        path = np.array([_values(pt.positions, len(names), f"points[{i}].positions", f"joint_names: {names}")[order]
                         for i, pt in enumerate(msg.points)])
        if times[0] < 0 or np.any(np.diff(times) <= 0):
            raise ValueError(f"points[].time_from_start must increase strictly from >= 0, got {times.tolist()}")
        with self._lock:
            self._start_goal(None)
            if times[0] > 0:  # start from where the setpoint is now, as the trajectory controller does
                times, path = np.r_[0.0, times], np.vstack([self._setpoint, path])
            t0 = self.sim_time
            self._goal = lambda t: np.array([np.interp(t - t0, times, col) for col in path.T])

    def _start_goal(self, goal) -> None:
        if self._setpoint is None:
            self._setpoint = self.arm.kin.q(self.arm.data).copy()
        self._goal = goal

    def _on_reset(self, request, response):
        with self._lock:  # physics waits; the cleared goal means no stale command outlives the reset
            seed = self._episode_seed = self.p["seed"] + self._resets
            self._resets += 1
            self._cartesian_mode()
            try:
                info = self.env.reset(seed=seed)[1]
            except Exception as err:  # a task's reset failing must not take the node down
                response.success, response.message = False, f"reset with seed {seed} failed: {err!r}"
                return response
            stamp = self._stamp()
        response.success = True
        response.message = json.dumps({"seed": seed, "stamp": stamp, "info": info},
                                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        return response

    # -- physics ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def _stamp(self) -> float:
        return self.sim_time if self.p["use_sim_time"] else time.time()

    def _fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kin, s = self.arm.kin, self._scratch
        s.qpos[:] = self.arm.data.qpos
        s.qpos[kin.qpos_adr] = q
        mujoco.mj_kinematics(self.arm.model, s)
        return s.site_xpos[kin.site_id].copy(), kin.tool_quat(s)

    def _run(self) -> None:
        wall_next = time.monotonic()
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._step()
                    messages = self._messages()
                for publisher, msg in messages:  # outside the lock: callbacks need not wait on DDS
                    publisher.publish(msg)
                wall_next = self._pace(wall_next)
        except Exception:
            if not self._stop.is_set() and self.context.ok():
                self.failed = True
                self.get_logger().fatal(f"physics loop stopped:\n{traceback.format_exc()}")
                self.context.try_shutdown()  # ends spin in main(), which exits 1
        finally:
            with self._lock:
                self.env.close()  # from this thread: it owns the renderer's GL context

    def _step(self) -> None:
        """One chunk of physics; in joint mode the setpoint advances and becomes a tool target first."""
        if self._goal is not None:
            kin = self.arm.kin
            self._setpoint = clamp_joint_target(self._setpoint, self._goal(self.sim_time), kin.q_low,
                                                kin.q_high, self.period, self.cfg.safety)
            self.arm.posture[:] = self._setpoint
            self._command_pose(*self._fk(self._setpoint))
        self.arm.simulate(self.chunk)  # recomputes the posture torque once per chunk
        self.sim_time += self.period

    def _messages(self) -> list:
        """This chunk's (publisher, message) pairs, all from one consistent state (lock held)."""
        arm, d, stamp, frame = self.arm, self.arm.data, self._stamp(), self.p["frame_id"]
        reward, success = self.task.score(arm)
        if self.cfg.reward_type == "sparse":
            reward = float(success)
        objects = np.ravel(self.task.object_state(arm)).astype(float).tolist()
        out = [(self.clock_pub, Clock(clock=c.to_time(stamp)))] if self.clock_pub else []  # clock first
        out += [(self.pub["js"], c.joint_state_msg(self.names, d.qpos[self._qadr], d.qvel[self._vadr], stamp)),
                (self.pub["pose"], c.pose_msg(arm.tool_pos(), arm.kin.tool_quat(d), stamp, frame)),
                (self.pub["twist"], c.twist_msg(arm.tool_vel(), arm.kin.jacobian(d)[3:] @ arm.kin.dq(d), stamp, frame)),
                (self.pub["reward"], Float64(data=float(reward))), (self.pub["success"], Bool(data=bool(success))),
                (self.pub["object"], Float64MultiArray(data=objects))]
        backward = self.task.reset_score(arm) if hasattr(self.task, "reset_score") else None
        if backward is not None:
            out += [(self.pub["reset_reward"], Float64(data=float(backward[0]))),
                    (self.pub["reset_success"], Bool(data=bool(backward[1])))]
        if self.cameras and self.sim_time >= self._next_frame:
            self._next_frame = max(self._next_frame + 1.0 / self.p["camera_rate_hz"], self.sim_time)
            for name, cam in self.cameras.items():
                image_pub, info_pub, info = self.cam_pub[name]
                info.header.stamp = c.to_time(stamp)
                out += [(image_pub, c.image_msg(cam.read()[0], stamp, info.header.frame_id)), (info_pub, info)]
        if time.monotonic() - self._diag[0] >= 1.0:
            out.append((self.pub["diag"], self._diagnostics(stamp)))
        return out

    def _diagnostics(self, stamp: float) -> DiagnosticArray:
        (wall, sim), now, rtf = self._diag, time.monotonic(), self.p["real_time_factor"]
        speed, self._diag = (self.sim_time - sim) / (now - wall), (now, self.sim_time)
        behind = rtf > 0 and speed < 0.8 * rtf
        values = {"env_id": self.p["env_id"], "sim_time": f"{self.sim_time:.3f}", "real_time_factor": f"{speed:.2f}",
                  "episode_seed": self._episode_seed, "resets": self._resets, "dropped_commands": self._dropped}
        status = DiagnosticStatus(level=DiagnosticStatus.WARN if behind else DiagnosticStatus.OK,
                                  name="sim_robot: physics", hardware_id=self.p["env_id"],
                                  message=f"{speed:.2f}x real time" + (" (behind)" if behind else ""),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = c.to_time(stamp)
        return msg

    def _pace(self, wall_next: float) -> float:
        """Sleep until this chunk's wall deadline; unpaced, just yield the GIL to the executor."""
        rtf = self.p["real_time_factor"]
        if rtf <= 0:
            time.sleep(0)
            return time.monotonic()
        wall_next += self.period / rtf
        delay = wall_next - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)
        elif delay < -0.25:  # far behind (a render, a reset): drop the backlog instead of sprinting
            wall_next = time.monotonic()
        return wall_next


def main(argv=None) -> int:
    rclpy.init(args=argv)
    try:
        node = SimRobotNode()
    except (ConfigError, UnknownEnvError, TypeError, ValueError, ParameterException) as err:
        rclpy.logging.get_logger("sim_robot").error(" ".join(str(err).split()))
        rclpy.try_shutdown()
        return 2
    node.start()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        c.spin_until_shutdown(executor)
    finally:
        node.stop()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if node.failed else 0


if __name__ == "__main__":
    sys.exit(main())
