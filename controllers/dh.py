"""Serial-arm kinematics from a Denavit-Hartenberg table, in plain numpy (no MuJoCo, no ROS).

Forward kinematics, the geometric Jacobian and a damped-least-squares IK step with joint limits,
for joint-level arm backends (ros2_control forward/trajectory controllers, the UR driver) that
report joint angles but no tool pose. Both conventions are supported: `standard` (UR's tables)
and `modified`, i.e. Craig's (Franka's tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robolearn.controllers.rotations import orientation_error

CONVENTIONS = ("standard", "modified")


def rpy_matrix(rpy) -> np.ndarray:
    """Rotation matrix of fixed-axis roll, pitch, yaw (URDF's `rpy`: R = Rz(yaw) Ry(pitch) Rx(roll))."""
    r, p, y = (float(v) for v in rpy)
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])


def transform(xyz=(0.0, 0.0, 0.0), rpy=(0.0, 0.0, 0.0)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rpy_matrix(rpy), np.asarray(xyz, dtype=float)
    return out


def mat_to_quat(m: np.ndarray) -> np.ndarray:
    """Unit (w, x, y, z) quaternion of a rotation matrix, w >= 0 (Shepperd's method)."""
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0] * 4
        q[0], q[1 + i] = (m[k, j] - m[j, k]) / s, 0.25 * s
        q[1 + j], q[1 + k] = (m[j, i] + m[i, j]) / s, (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def quat_to_matrix(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=float) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


@dataclass(frozen=True)
class DHChain:
    """A revolute chain: rows (a, alpha, d, theta_offset) per joint, then a fixed tool transform.

    standard: T_i = Rz(theta_i) Tz(d_i) Tx(a_i) Rx(alpha_i), joint i turns about z_{i-1};
    modified (Craig): T_i = Rx(alpha_{i-1}) Tx(a_{i-1}) Rz(theta_i) Tz(d_i), joint i turns about z_i.
    """

    convention: str
    dh: np.ndarray  # n x 4: a, alpha, d, theta_offset (m, rad)
    tool: np.ndarray  # 4 x 4, last joint frame -> tool
    base: np.ndarray  # 4 x 4, robot base frame -> the table's frame 0

    @classmethod
    def from_table(cls, convention: str, dh, tool_xyz=(0, 0, 0), tool_rpy=(0, 0, 0), base_xyz=(0, 0, 0),
                   base_rpy=(0, 0, 0)) -> DHChain:
        if convention not in CONVENTIONS:
            raise ValueError(f"DH convention {convention!r} is not one of {CONVENTIONS}")
        table = np.asarray(dh, dtype=float)
        if table.ndim != 2 or table.shape[1] != 4:
            raise ValueError(f"DH table must have rows [a, alpha, d, theta_offset], got shape {table.shape}")
        return cls(convention, table, transform(tool_xyz, tool_rpy), transform(base_xyz, base_rpy))

    @property
    def n(self) -> int:
        return len(self.dh)

    def _link(self, row, theta: float) -> np.ndarray:
        a, alpha, d, offset = row
        ct, st, ca, sa = np.cos(theta + offset), np.sin(theta + offset), np.cos(alpha), np.sin(alpha)
        if self.convention == "standard":
            return np.array([[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st],
                             [0, sa, ca, d], [0, 0, 0, 1.0]])
        return np.array([[ct, -st, 0, a], [st * ca, ct * ca, -sa, -d * sa],
                         [st * sa, ct * sa, ca, d * ca], [0, 0, 0, 1.0]])

    def frames(self, q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(joint axes n x 3, joint origins n x 3, tool transform 4 x 4), all in the base frame."""
        q = np.asarray(q, dtype=float)
        if q.shape != (self.n,):
            raise ValueError(f"joint vector has shape {q.shape}, the DH chain has {self.n} joints")
        t = self.base.copy()
        axes, origins = np.empty((self.n, 3)), np.empty((self.n, 3))
        for i, row in enumerate(self.dh):
            if self.convention == "standard":  # joint i turns about the frame before its link transform
                axes[i], origins[i] = t[:3, 2], t[:3, 3]
                t = t @ self._link(row, q[i])
            else:
                t = t @ self._link(row, q[i])
                axes[i], origins[i] = t[:3, 2], t[:3, 3]
        return axes, origins, t @ self.tool

    def fk(self, q) -> tuple[np.ndarray, np.ndarray]:
        """Tool position and (w, x, y, z) quaternion in the base frame."""
        t = self.frames(q)[2]
        return t[:3, 3].copy(), mat_to_quat(t[:3, :3])

    def jacobian(self, q) -> np.ndarray:
        """6 x n geometric Jacobian (linear; angular) of the tool point, base-frame axes."""
        axes, origins, t = self.frames(q)
        return np.vstack([np.cross(axes, t[:3, 3] - origins).T, axes.T])


def ik_step(chain: DHChain, q, target_pos, target_quat, q_low, q_high, damping: float = 0.05,
            iterations: int = 8, tol: float = 1e-5, rotation_weight: float = 1.0) -> np.ndarray:
    """Joint angles near `q` that put the tool at the target: damped least squares, clipped to the limits.

    Meant for small steps (a reference-limited target a few cm from the measured pose); a few
    iterations converge there. Damping keeps the step bounded near singularities.
    """
    q = np.asarray(q, dtype=float).copy()
    low, high = np.asarray(q_low, dtype=float), np.asarray(q_high, dtype=float)
    w = np.array([1.0, 1.0, 1.0, rotation_weight, rotation_weight, rotation_weight])
    for _ in range(iterations):
        pos, quat = chain.fk(q)
        err = np.concatenate([np.asarray(target_pos, dtype=float) - pos, orientation_error(target_quat, quat)]) * w
        if np.linalg.norm(err) < tol:
            break
        jac = chain.jacobian(q) * w[:, None]
        dq = jac.T @ np.linalg.solve(jac @ jac.T + damping ** 2 * np.eye(6), err)
        q = np.clip(q + dq, low, high)
    return q
