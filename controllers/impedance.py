"""Torque-level Cartesian impedance control, as SERL runs on the Franka.

tau = J^T F + nullspace posture term + Coriolis/gravity compensation, with
F = clip(K e, -K e_max, K e_max) - D xdot per axis of the target frame. As in SERL only the
spring is clipped (SERL clips the reference to e_max from the tool each cycle): contact forces
stay bounded by K e_max, and the unclipped damper caps the free-space speed at K e_max / D, so
even a saturated command cannot throw the tool far past the workspace box.

Two realisations of the same law: `CartesianImpedance.torques` computes it in numpy (for
torque-controlled hardware and as the reference), and `configure_native` sets up MuJoCo's own
site-transmission actuators to compute it inside mj_step, which is what the simulator runs
every physics step at no Python cost. A test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.controllers.kinematics import Arm, pose_error, quat_to_mat
from robolearn.controllers.safety import SafetyConfig, joint_limit_torque

AXES = ("x", "y", "z", "rx", "ry", "rz")


@dataclass
class ImpedanceConfig:
    """Gains (N/m, Nm/rad and their dampings), per-axis error clips and nullspace posture gain."""

    # 3000 N/m with 390 Ns/m is about critical for the Panda's ~12.5 kg along x at home, and caps
    # the free-space speed at 3000 * 0.02 / 390 = 0.15 m/s: a 5 cm step settles in under 0.5 s.
    translational_stiffness: float = 3000.0
    rotational_stiffness: float = 200.0
    translational_damping: float = 390.0
    # Heavily damped on purpose: a 40 N translational step tilts the tool through the arm's
    # inertial coupling (this law does not decouple it), and the tilt is mostly a velocity
    # effect; 150/12 tilted 1.5 deg on a 5 cm step, 200/40 stays under 0.75 deg.
    rotational_damping: float = 40.0
    nullspace_stiffness: float = 10.0
    max_translation_error: float = 0.02  # per axis: bounds the spring force to K * 0.02 = 60 N
    max_rotation_error: float = 0.3  # rad per axis of the target frame

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
        """clip(K e) - D xdot at the tool site in world axes; the spring clipped per axis of the target frame."""
        c, arm = self.cfg, self.arm
        # MuJoCo's site actuators measure and clip along the axes of the reference (target) frame;
        # doing the same here keeps the two realisations identical at any target orientation.
        rot = quat_to_mat(target_quat)
        err = pose_error(arm, data, target_pos, target_quat).reshape(2, 3) @ rot
        vel = (arm.jacobian(data) @ arm.dq(data)).reshape(2, 3) @ rot
        limit = c.stiffness() * c.max_error()
        local = np.clip(c.stiffness() * err.ravel(), -limit, limit) - c.damping() * vel.ravel()
        return (local.reshape(2, 3) @ rot.T).ravel()

    def torques(self, data: mujoco.MjData, target_pos: np.ndarray, target_quat: np.ndarray) -> np.ndarray:
        """Joint torques for this control cycle; kinematics and qfrc_bias of `data` must be current."""
        arm, c = self.arm, self.cfg
        tau = arm.jacobian(data).T @ self.wrench(data, target_pos, target_quat)
        tau += nullspace_posture_torque(arm, data, self.posture, c.nullspace_stiffness,
                                        2.0 * np.sqrt(c.nullspace_stiffness))
        tau += data.qfrc_bias[arm.dof_adr]
        tau += joint_limit_torque(arm.q(data), arm.dq(data), arm.q_low, arm.q_high, self.safety.joint_margin)
        return np.clip(tau, -arm.torque_limit, arm.torque_limit)


def configure_native(model: mujoco.MjModel, cfg: ImpedanceConfig) -> np.ndarray:
    """Write gains and clips into the model's imp_* (spring) and damp_* (damper) actuators.

    Each actuator's length is the tool's displacement from the reference site along one axis of
    the reference frame: imp_* gives -K length clipped to K * max error, damp_* gives -D velocity.
    Returns the ids of the twelve actuators.
    """
    ids = []
    for axis, k, d, e in zip(AXES, cfg.stiffness(), cfg.damping(), cfg.max_error()):
        try:
            spring, damper = model.actuator("imp_" + axis).id, model.actuator("damp_" + axis).id
        except KeyError as err:
            raise ValueError(f"model has no impedance actuator {err}; see sim/assets/panda.xml") from None
        model.actuator_gainprm[spring, 0] = k
        model.actuator_biasprm[spring, :3] = (0.0, -k, 0.0)
        model.actuator_forcerange[spring] = (-k * e, k * e)
        model.actuator_forcelimited[spring] = 1
        model.actuator_gainprm[damper, 0] = 0.0
        model.actuator_biasprm[damper, :3] = (0.0, 0.0, -d)
        model.actuator_forcelimited[damper] = 0
        ids += [spring, damper]
    return np.array(ids)
