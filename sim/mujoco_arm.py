"""The MuJoCo backend of the robot interfaces: the Panda under native impedance control, and its cameras.

`MujocoArm` implements `robolearn.robot.ArmBackend` (read, command, wait = one control period of
physics, hold) and gives tasks and resets public access to the physics (`model`, `data`, `kin`).
`MujocoCamera` implements `robolearn.robot.Camera` by rendering a model camera offscreen.
"""

from __future__ import annotations

import mujoco
import numpy as np

from robolearn.controllers.impedance import ImpedanceConfig, configure_native, nullspace_posture_torque
from robolearn.controllers.kinematics import Arm
from robolearn.controllers.safety import SafetyConfig, harden_joint_limits
from robolearn.robot.interfaces import ArmState, ToolTarget
from robolearn.sim.gl import check_headless_context

ARM_JOINTS = tuple(f"joint{i}" for i in range(1, 8))
JOINT_PREFIX = "panda_"  # ArmState names the joints as franka_description does: panda_joint1 ...
FINGER_OPEN = 0.04
# Nms/rad of braking per rad/s a joint exceeds its velocity limit (SafetyConfig.joint_velocity_limit).
# A real Panda never exceeds them (it stops with a reflex); without this, the folded arm pressing the
# table next to the base whipped joint 6 to 8 rad/s and threw the tool 20 mm out of the box
# (docs/controllers.md, "Known limits"). Explicit in the physics step, so it must stay well below
# the stability bound (about 2 x the wrist's 0.1 kg m^2 inertia / 2 ms = 100).
VELOCITY_LIMIT_DAMPING = 20.0


class MujocoArm:
    """The Panda in a compiled workcell model, impedance-controlled through the mocap target."""

    def __init__(self, model: mujoco.MjModel, control_hz: float, physics_dt: float, impedance: ImpedanceConfig,
                 safety: SafetyConfig, joints: tuple[str, ...] = ARM_JOINTS):
        self.model, self.control_hz, self.impedance = model, control_hz, impedance
        model.opt.timestep = physics_dt
        self.data = mujoco.MjData(model)
        self.kin = Arm(model, joints)
        self.joint_names = tuple(JOINT_PREFIX + j for j in joints)
        configure_native(model, impedance)
        harden_joint_limits(model, model.dof_jntid[self.kin.dof_adr], safety)
        self.n_substeps = max(1, round(1.0 / (control_hz * physics_dt)))
        self.home_key = model.key("home").id
        self.gripper_actuator = model.actuator("gripper").id
        self.finger_adr = model.jnt_qposadr[[model.joint("finger_joint1").id, model.joint("finger_joint2").id]]
        self.posture = model.key_qpos[self.home_key][self.kin.qpos_adr].copy()
        dofs = slice(int(self.kin.dof_adr[0]), int(self.kin.dof_adr[-1]) + 1)
        self._bias, self._applied = self.data.qfrc_bias[dofs], self.data.qfrc_applied[dofs]
        self._qvel, self._excess = self.data.qvel[dofs], np.zeros(self.kin.n)
        self._vmax = np.asarray(safety.joint_velocity_limit[: self.kin.n], dtype=float)
        self._hold = np.zeros(self.kin.n)
        self._renderer: mujoco.Renderer | None = None

    # -- physics access for tasks, resets and experts --------------------------------------
    def tool_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.kin.site_id].copy()

    def tool_vel(self) -> np.ndarray:
        return self.kin.jacobian(self.data)[:3] @ self.kin.dq(self.data)

    def gripper_width(self) -> float:
        return float(self.data.qpos[self.finger_adr].sum())

    def set_tool_target(self, pos: np.ndarray, quat: np.ndarray | None = None) -> None:
        self.data.mocap_pos[0] = pos
        if quat is not None:
            self.data.mocap_quat[0] = quat

    def simulate(self, n: int) -> None:
        """Advance n physics steps; between step1 and step2: Coriolis/gravity compensation, the held
        posture torque, and braking of any joint past its velocity limit (VELOCITY_LIMIT_DAMPING)."""
        m, d = self.model, self.data
        # The posture term changes slowly, so it is computed once per control step and held.
        self._hold[:] = nullspace_posture_torque(self.kin, d, self.posture, self.impedance.nullspace_stiffness)
        qvel, excess, vmax = self._qvel, self._excess, self._vmax
        for _ in range(n):
            mujoco.mj_step1(m, d)
            np.add(self._bias, self._hold, out=self._applied)
            np.abs(qvel, out=excess)
            if (excess > vmax).any():
                np.subtract(qvel, np.clip(qvel, -vmax, vmax), out=excess)
                self._applied -= VELOCITY_LIMIT_DAMPING * excess
            mujoco.mj_step2(m, d)

    def render(self, camera: str, size: int) -> np.ndarray:
        if self._renderer is None or self._renderer.height != size:
            if self._renderer is not None:
                self._renderer.close()
            check_headless_context()
            self._renderer = mujoco.Renderer(self.model, size, size)
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render()

    # -- ArmBackend ---------------------------------------------------------------------------
    def read(self) -> ArmState:
        d = self.data
        return ArmState(self.joint_names, self.kin.q(d).copy(), self.kin.dq(d).copy(), self.tool_pos(),
                        self.kin.tool_quat(d).copy(), self.tool_vel(), self.gripper_width(), float(d.time))

    def command(self, target: ToolTarget) -> None:
        self.set_tool_target(target.pos, target.quat)
        if target.gripper is not None:
            self.data.ctrl[self.gripper_actuator] = FINGER_OPEN * (1.0 - target.gripper) / 2.0

    def wait(self) -> None:
        self.simulate(self.n_substeps)

    def hold(self) -> None:
        self.set_tool_target(self.tool_pos(), self.kin.tool_quat(self.data).copy())

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


class MujocoCamera:
    """A model camera rendered offscreen at size x size; frames are stamped with simulation time."""

    def __init__(self, arm: MujocoArm, name: str, size: int, where: str = "scene"):
        model = arm.model
        if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
            raise ValueError(f"{where}: unknown camera {name!r}; model cameras: "
                             f"{[model.camera(i).name for i in range(model.ncam)]}")
        self.arm, self.name, self.size = arm, name, size
        self.shape = (size, size, 3)

    def read(self) -> tuple[np.ndarray, float]:
        return self.arm.render(self.name, self.size), float(self.arm.data.time)
