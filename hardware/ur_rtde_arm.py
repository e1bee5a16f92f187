"""`UrRtdeArm`: a Universal Robots arm without ROS, through ur_rtde (`pip install 'robolearn[ur]'`).

The policy sends targets at its rate (10 Hz); a thread at the robot's rate (500 Hz e-Series, 125 Hz CB3) calls
servoL toward a reference interpolated from the previous target to the newest over one control period (or
speedL with the velocity that gets there), so the arm never sees a 10 Hz step. The tool pose is
getActualTCPPose's, its axis-angle turned into a quaternion. Profile: hardware/profiles/ur5e_rtde.yaml.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from robolearn.controllers.rotations import orientation_error, quat_mul, quat_to_rotvec, rotvec_to_quat
from robolearn.controllers.safety import SafetyConfig, clamp_tool_rotation, clamp_tool_target
from robolearn.robot.interfaces import ArmState, StaleStateError, ToolTarget

INSTALL = "pip install 'robolearn[ur]' (ur-rtde) to drive a UR arm without ROS"


def pose_to_rtde(pos, quat) -> list[float]:
    """[x, y, z, rx, ry, rz] (rotation vector) as servoL takes it."""
    return [float(v) for v in (*pos, *quat_to_rotvec(quat))]


def rtde_to_pose(pose) -> tuple[np.ndarray, np.ndarray]:
    """Position and (w, x, y, z) quaternion of an RTDE pose [x, y, z, rx, ry, rz]."""
    pose = np.asarray(pose, dtype=float)
    if pose.shape != (6,) or not np.all(np.isfinite(pose)):
        raise StaleStateError(f"getActualTCPPose returned {pose.tolist()}, not 6 finite numbers")
    return pose[:3].copy(), rotvec_to_quat(pose[3:])


def connect(host: str, robot_hz: float, timeout: float = 10.0, where: str = "ur_rtde"):
    """The real RTDEControlInterface and RTDEReceiveInterface for `host` (lazy import: an optional extra), within
    `timeout` s; one-line errors name `where` (the profile) and the host."""
    try:
        import rtde_control
        import rtde_receive
    except ImportError:
        raise RuntimeError(INSTALL) from None
    out: dict = {}

    def run():
        try:
            out["ifaces"] = (rtde_control.RTDEControlInterface(host, robot_hz),
                             rtde_receive.RTDEReceiveInterface(host, robot_hz))
        except Exception as err:  # noqa: BLE001 - reported below with the host
            out["error"] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{where}: no RTDE connection to {host} within {timeout:g} s (timeouts.startup); is the "
                           "robot on, reachable and in remote control?")
    if "error" in out:
        raise RuntimeError(f"{where}: RTDE connection to {host} failed: {out['error']}")
    return out["ifaces"]


class UrRtdeArm:
    """ArmBackend and JointMover over ur_rtde; `control`/`receive` default to a connection to the profile's host."""

    def __init__(self, profile, control_hz: float | None = None, safety: SafetyConfig | None = None,
                 control=None, receive=None):
        if profile.backend != "ur_rtde":
            raise ValueError(f"{profile.path}: UrRtdeArm needs backend ur_rtde, got {profile.backend}")
        self.profile, self.rtde = profile, profile.rtde
        self.control_hz = control_hz or profile.control_hz
        self.safety = safety or profile.safety()
        self.joint_names = profile.joints
        if control is None or receive is None:
            control, receive = connect(self.rtde.host, self.rtde.robot_hz, profile.startup_timeout, str(profile.path))
        self.control, self.receive = control, receive
        self.dt = 1.0 / self.rtde.robot_hz
        self.error = ""  # the last failure of the servo thread (a rejected servoL, a lost connection)
        self._lock = threading.Lock()
        self._segment = None  # ("tool", (p0, q0), (p1, q1), t0, T) or ("joint", q0, q1, t0, T)
        self._next_wait = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{profile.name} rtde", daemon=True)
        self._thread.start()

    # -- state ---------------------------------------------------------------------------------
    def read(self) -> ArmState:
        if not self.receive.isConnected():
            raise StaleStateError(f"ur_rtde: no connection to {self.rtde.host} ({self.error or 'disconnected'})")
        if not self._thread.is_alive() and not self._stop.is_set():
            raise StaleStateError(f"ur_rtde: the servo thread stopped ({self.error or 'no error recorded'})")
        if self.error:  # a refused servo command (a protective stop, no remote control): the policy must not act
            raise StaleStateError(self.error)
        pos, quat = rtde_to_pose(self.receive.getActualTCPPose())
        q = np.asarray(self.receive.getActualQ(), dtype=float)
        dq = np.asarray(self.receive.getActualQd(), dtype=float)
        lin = np.asarray(self.receive.getActualTCPSpeed(), dtype=float)[:3]
        return ArmState(self.joint_names, q, dq, pos, quat, lin, 0.0, time.monotonic())

    # -- commands ------------------------------------------------------------------------------
    def command(self, target: ToolTarget) -> None:
        """Reference-limit the target against the measured pose, then interpolate toward it over one period."""
        state = self.read()
        pos = clamp_tool_target(state.tool_pos, target.pos, self.safety)
        quat = clamp_tool_rotation(state.tool_quat, target.quat, self.safety)
        with self._lock:
            seg = self._segment
            start = self._tool_reference(seg, time.monotonic()) if seg and seg[0] == "tool" else (
                state.tool_pos, state.tool_quat)
            self._segment = ("tool", start, (pos, quat), time.monotonic(), 1.0 / self.control_hz)

    def move_joints(self, q, duration: float) -> None:
        """JointMover: servoJ along joint positions interpolated to `q` over `duration` s; blocks."""
        q0 = self.read().position
        q = self.profile.check_move(q, q0, duration)
        with self._lock:
            self._segment = ("joint", q0, q, time.monotonic(), duration)
        time.sleep(duration)

    def hold(self) -> np.ndarray | None:
        """Servo at the measured pose (servo) or stop (speed); returns the pose, None without a connection."""
        if self.profile.interface == "speed":
            with self._lock:  # only the servo thread talks to the controller: it stops the arm at its next period
                self._segment = ("stop",)
        try:
            state = self.read()
        except StaleStateError:
            return None
        with self._lock:
            if self.profile.interface != "speed":
                here = (state.tool_pos, state.tool_quat)
                self._segment = ("tool", here, here, time.monotonic(), 1.0 / self.control_hz)
        return state.tool_pose

    @staticmethod
    def _tool_reference(seg, now: float):
        _, (p0, q0), (p1, q1), t0, span = seg
        s = min(max((now - t0) / span, 0.0), 1.0)
        return p0 + s * (p1 - p0), quat_mul(rotvec_to_quat(s * orientation_error(q1, q0)), q0)

    def _run(self) -> None:
        """At the robot's rate: servoL to the interpolated reference (servo), the speed that reaches it
        (speed), or servoJ during move_joints. Nothing is sent before the first command."""
        c, r = self.control, self.rtde
        while not self._stop.is_set():
            try:
                t = c.initPeriod()
                self._period(c, r)
                c.waitPeriod(t)
            except Exception as err:  # noqa: BLE001 - the thread must survive to stop the arm
                self.error = f"ur_rtde: {err}"
                time.sleep(self.dt)

    def _period(self, c, r) -> None:
        """One robot period; the lock is held throughout, so a hold() cannot be overtaken by an older command."""
        with self._lock:
            seg, now = self._segment, time.monotonic()
            if seg is None:
                return
            if seg[0] == "stop":
                c.speedStop(2.0)
                self._segment = None
            elif seg[0] == "joint":
                _, q0, q1, t0, span = seg
                s = min(max((now - t0) / span, 0.0), 1.0)
                ok = c.servoJ([float(v) for v in q0 + s * (q1 - q0)], 0.0, 0.0, self.dt, r.lookahead_time, r.gain)
                self.error = "" if ok else "ur_rtde: servoJ refused (is the robot in remote control and running?)"
            elif self.profile.interface == "servo":
                pose = pose_to_rtde(*self._tool_reference(seg, now))
                ok = c.servoL(pose, 0.0, 0.0, self.dt, r.lookahead_time, r.gain)
                self.error = "" if ok else f"ur_rtde: servoL {pose} refused (is the robot in remote control and running?)"
            else:
                self._speed(seg, now)
                self.error = ""

    def _speed(self, seg, now: float) -> None:
        """speedL toward the interpolated reference: its feed-forward rate, zero once the period is over."""
        _, (p0, q0), (p1, q1), t0, span = seg
        if now - t0 > span:
            self.control.speedL([0.0] * 6, self.rtde.acceleration, self.dt)
            return
        xd = np.concatenate([(p1 - p0) / span, orientation_error(q1, q0) / span])
        self.control.speedL([float(v) for v in xd], self.rtde.acceleration, self.dt)

    def wait(self) -> None:
        self._next_wait = max(self._next_wait + 1.0 / self.control_hz, time.monotonic())
        time.sleep(max(0.0, self._next_wait - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:
            self.control.servoStop(2.0) if self.profile.interface == "servo" else self.control.speedStop(2.0)
            self.control.stopScript()
        finally:
            self.control.disconnect()
            self.receive.disconnect()
