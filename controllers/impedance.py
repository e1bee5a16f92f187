"""Torque-level Cartesian impedance control, as SERL runs on the Franka.

tau = J^T (K e - D J dq) + nullspace posture term + Coriolis/gravity compensation, with the
pose error e clipped per axis so that contact forces stay bounded (SERL clips the reference
to a few millimetres from the current pose each cycle).

Two realisations of the same law: `CartesianImpedance.torques` computes it in numpy (for
torque-controlled hardware and as the reference), and `configure_native` sets up MuJoCo's own
site-transmission actuators to compute it inside mj_step, which is what the simulator runs
every physics step at no Python cost. A test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.controllers.kinematics import Arm, orientation_error
from robolearn.controllers.safety import SafetyConfig, joint_limit_torque

AXES = ("x", "y", "z", "rx", "ry", "rz")


@dataclass
class ImpedanceConfig:
    """Gains (N/m, Nm/rad and their dampings), per-axis error clips and nullspace posture gain."""

    translational_stiffness: float = 2000.0
    rotational_stiffness: float = 150.0
    translational_damping: float = 300.0  # about critical for the Panda's ~12 kg along x at home
    rotational_damping: float = 12.0
    nullspace_stiffness: float = 10.0
    max_translation_error: float = 0.02  # per axis: bounds the contact force to K * 0.02 = 40 N
    max_rotation_error: float = 0.3

    def stiffness(self) -> np.ndarray:
        return np.array([self.translational_stiffness] * 3 + [self.rotational_stiffness] * 3)

    def damping(self) -> np.ndarray:
        return np.array([self.translational_damping] * 3 + [self.rotational_damping] * 3)

    def max_error(self) -> np.ndarray:
        return np.array([self.max_translation_error] * 3 + [self.max_rotation_error] * 3)


def nullspace_posture_torque(arm: Arm, data: mujoco.MjData, posture: np.ndarray, stiffness: float,
                             damping: float = 0.0) -> np.ndarray:
    """Posture torque projected so it does not disturb the tool: (I - J^T (J J^T)^-1 J) tau."""
    jac = arm.jacobian(data)
    tau = stiffness * (posture - arm.q(data)) - damping * arm.dq(data)
    return tau - jac.T @ np.linalg.solve(jac @ jac.T + 1e-6 * np.eye(6), jac @ tau)


class CartesianImpedance:
    """Computes arm joint torques that pull the tool site toward a reference pose (numpy)."""

    def __init__(self, arm: Arm, posture: np.ndarray, cfg: ImpedanceConfig | None = None,
                 safety: SafetyConfig | None = None):
        self.arm, self.cfg, self.safety = arm, cfg or ImpedanceConfig(), safety or SafetyConfig()
        self.posture = np.asarray(posture, dtype=float)

    def wrench(self, data: mujoco.MjData, target_pos: np.ndarray, target_quat: np.ndarray) -> np.ndarray:
        """K e - D xdot with e clipped per axis, in world axes at the tool site."""
        c, arm = self.cfg, self.arm
        err = np.empty(6)
        err[:3] = target_pos - data.site_xpos[arm.site_id]
        err[3:] = orientation_error(target_quat, arm.tool_quat(data))
        force = c.stiffness() * err - c.damping() * (arm.jacobian(data) @ arm.dq(data))
        limit = c.stiffness() * c.max_error()
        return np.clip(force, -limit, limit)

    def torques(self, data: mujoco.MjData, target_pos: np.ndarray, target_quat: np.ndarray) -> np.ndarray:
        """Joint torques for this control cycle; kinematics and qfrc_bias of `data` must be current."""
        arm, c = self.arm, self.cfg
        tau = arm.jacobian(data).T @ self.wrench(data, target_pos, target_quat)
        tau += nullspace_posture_torque(arm, data, self.posture, c.nullspace_stiffness,
                                        2.0 * np.sqrt(c.nullspace_stiffness))
        tau += data.qfrc_bias[arm.dof_adr]
        tau += joint_limit_torque(arm.q(data), arm.dq(data), arm.q_low, arm.q_high, self.safety.joint_margin)
        return np.clip(tau, -arm.torque_limit, arm.torque_limit)


def configure_native(model: mujoco.MjModel, cfg: ImpedanceConfig, prefix: str = "imp_") -> np.ndarray:
    """Write gains and force clips into the model's six impedance actuators; return their ids.

    Each actuator's length is the tool's displacement from the reference site along one axis of
    the reference frame, so force = -K length - D velocity, clipped to K * max error.
    """
    ids = []
    for axis, k, d, e in zip(AXES, cfg.stiffness(), cfg.damping(), cfg.max_error()):
        try:
            a = model.actuator(prefix + axis).id
        except KeyError:
            raise ValueError(f"model has no impedance actuator {prefix + axis!r}; see sim/assets/panda.xml") from None
        model.actuator_gainprm[a, 0] = k
        model.actuator_biasprm[a, :3] = (0.0, -k, -d)
        model.actuator_forcerange[a] = (-k * e, k * e)
        model.actuator_forcelimited[a] = 1
        ids.append(a)
    return np.array(ids)
