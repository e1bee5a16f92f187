"""Operational-space control (Khatib 1987) of the tool site, for torque-controlled arms.

tau = J^T Lambda (Kp e - Kd xdot) + (I - J^T Jbar^T) tau_posture + qfrc_bias, with
Lambda = (J M^-1 J^T)^-1 the tool's apparent inertia and Jbar = M^-1 J^T Lambda the dynamically
consistent pseudo-inverse, so the tool behaves as a unit mass-spring-damper of the configured
natural frequency and damping ratio on every axis, whatever the arm's posture, and the posture
term cannot accelerate the tool.

M is the arm's block of MuJoCo's mass matrix: the hand and fingers ride on the last link as a
rigid load, as in the 7 x 7 mass matrix libfranka reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.controllers.kinematics import Arm, pose_error
from robolearn.controllers.safety import SafetyConfig, joint_limit_torque


@dataclass
class OSCConfig:
    """Closed-loop tool dynamics (rad/s, damping ratio), per-axis error clips and the posture servo."""

    translational_frequency: float = 20.0  # rad/s; Kp = w^2, Kd = 2 zeta w on each x, y, z
    translational_damping_ratio: float = 1.0
    rotational_frequency: float = 20.0  # rad/s, on each rotation-vector axis
    rotational_damping_ratio: float = 1.0
    max_translation_error: float = 0.02  # m per world axis: bounds the commanded acceleration to Kp * 0.02
    max_rotation_error: float = 0.3  # rad per world axis
    posture_frequency: float = 5.0  # rad/s of the joint-space posture servo in the nullspace
    posture_damping_ratio: float = 1.0
    # Eigenvalues of J M^-1 J^T (1/kg, 1/(kg m^2)) are floored here before inverting, so Lambda
    # stays bounded near singularities and is exact (nullspace exactly consistent) elsewhere.
    singularity_threshold: float = 1e-3

    def kp(self) -> np.ndarray:
        return np.array([self.translational_frequency ** 2] * 3 + [self.rotational_frequency ** 2] * 3)

    def kd(self) -> np.ndarray:
        return np.array([2.0 * self.translational_damping_ratio * self.translational_frequency] * 3
                        + [2.0 * self.rotational_damping_ratio * self.rotational_frequency] * 3)

    def max_error(self) -> np.ndarray:
        return np.array([self.max_translation_error] * 3 + [self.max_rotation_error] * 3)


class OperationalSpace:
    """Computes arm joint torques that make the tool a critically damped unit mass toward a pose."""

    def __init__(self, arm: Arm, posture: np.ndarray, cfg: OSCConfig | None = None,
                 safety: SafetyConfig | None = None):
        self.arm, self.cfg, self.safety = arm, cfg or OSCConfig(), safety or SafetyConfig()
        self.posture = np.asarray(posture, dtype=float)
        self._mass = np.zeros((arm.model.nv, arm.model.nv))
        self._dofs = np.ix_(arm.dof_adr, arm.dof_adr)

    def mass_matrix(self, data: mujoco.MjData) -> np.ndarray:
        """The arm's n x n joint-space inertia (data.qM must be current, as after mj_step1 or mj_forward)."""
        mujoco.mj_fullM(self.arm.model, data, self._mass)
        return self._mass[self._dofs]

    def torques(self, data: mujoco.MjData, target_pos: np.ndarray, target_quat: np.ndarray) -> np.ndarray:
        """Joint torques for this control cycle; kinematics, qM and qfrc_bias of `data` must be current."""
        arm, c = self.arm, self.cfg
        q, dq, jac = arm.q(data), arm.dq(data), arm.jacobian(data)
        mass = self.mass_matrix(data)
        minv_jt = np.linalg.solve(mass, jac.T)  # M^-1 J^T, n x 6
        vals, vecs = np.linalg.eigh(jac @ minv_jt)
        lam = (vecs / np.maximum(vals, c.singularity_threshold)) @ vecs.T
        err = np.clip(pose_error(arm, data, target_pos, target_quat), -c.max_error(), c.max_error())
        accel = c.kp() * err - c.kd() * (jac @ dq)
        tau = jac.T @ (lam @ accel)
        w, zeta = c.posture_frequency, c.posture_damping_ratio
        tau_posture = mass @ (w * w * (self.posture - q) - 2.0 * zeta * w * dq)
        jbar = minv_jt @ lam  # dynamically consistent pseudo-inverse of J
        tau += tau_posture - jac.T @ (jbar.T @ tau_posture)
        tau += data.qfrc_bias[arm.dof_adr]
        tau += joint_limit_torque(q, dq, arm.q_low, arm.q_high, self.safety.joint_margin)
        return np.clip(tau, -arm.torque_limit, arm.torque_limit)
