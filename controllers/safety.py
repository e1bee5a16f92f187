"""The safety layer every command path goes through, in simulation and on hardware.

Workspace box on the tool, a maximum step per command, joint position/velocity limits, and
rejection of non-finite numbers. Functions, not a class: each is called where its check
belongs and holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class UnsafeCommandError(ValueError):
    """A command that must not reach the robot (non-finite, wrong shape)."""


@dataclass
class SafetyConfig:
    """Limits applied to every command; distances in metres, angles in radians."""

    workspace_low: tuple[float, float, float] = (0.2, -0.3, 0.0)
    workspace_high: tuple[float, float, float] = (0.6, 0.3, 0.5)
    max_translation_step: float = 0.1  # per command, from the current tool position
    max_rotation_step: float = 0.5  # per command, from the current tool orientation
    joint_margin: float = 0.05  # keep joint targets this far inside the model's limits
    joint_velocity_limit: tuple[float, ...] = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)


def require_finite(values, what: str) -> np.ndarray:
    """Return values as a float array, or raise naming `what` and the offending entries."""
    arr = np.asarray(values, dtype=float)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.argwhere(bad).ravel().tolist()
        raise UnsafeCommandError(f"{what} contains NaN/inf at index {idx}: {arr.tolist()}")
    return arr


def require_shape(values, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise UnsafeCommandError(f"{what} must have shape {shape}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UnsafeCommandError(f"{what} must be numeric, got dtype {arr.dtype}")
    return require_finite(arr, what)


def clamp_tool_target(current_pos: np.ndarray, target_pos: np.ndarray, cfg: SafetyConfig) -> np.ndarray:
    """Limit the step from the current tool position, then clip into the workspace box."""
    target = require_finite(target_pos, "tool target position")
    step = target - current_pos
    norm = float(np.linalg.norm(step))
    if norm > cfg.max_translation_step:
        target = current_pos + step * (cfg.max_translation_step / norm)
    return np.clip(target, cfg.workspace_low, cfg.workspace_high)


def clamp_joint_target(q: np.ndarray, q_target: np.ndarray, q_low: np.ndarray, q_high: np.ndarray,
                       dt: float, cfg: SafetyConfig) -> np.ndarray:
    """Joint position target within limits (less the margin) and reachable at the velocity limit."""
    q_target = require_finite(q_target, "joint target")
    vmax = np.asarray(cfg.joint_velocity_limit[: len(q)]) * dt
    q_target = np.clip(q_target, q - vmax, q + vmax)
    return np.clip(q_target, q_low + cfg.joint_margin, q_high - cfg.joint_margin)


def joint_limit_torque(q: np.ndarray, dq: np.ndarray, q_low: np.ndarray, q_high: np.ndarray,
                       margin: float, stiffness: float = 200.0, damping: float = 10.0) -> np.ndarray:
    """Repulsive torque that grows as a joint enters the margin before its limit (torque paths)."""
    tau = np.zeros_like(q)
    low_pen = (q_low + margin) - q
    high_pen = q - (q_high - margin)
    lo, hi = low_pen > 0, high_pen > 0
    tau[lo] = stiffness * low_pen[lo] - damping * np.minimum(dq[lo], 0.0)
    tau[hi] = -stiffness * high_pen[hi] - damping * np.maximum(dq[hi], 0.0)
    return tau
