"""Where a new arm, camera, reset routine or task plugs in: four small protocols and two records.

A backend reads `ArmState` and takes `ToolTarget`s; the robot env (robolearn.robot.env) turns
normalized actions into targets and states into observations, once, for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class ArmState:
    """What every backend reports, in the robot's base frame; quaternions are (w, x, y, z)."""

    joint_names: tuple[str, ...]
    position: np.ndarray  # rad, in joint_names order
    velocity: np.ndarray  # rad/s
    tool_pos: np.ndarray  # m
    tool_quat: np.ndarray
    tool_vel: np.ndarray  # m/s, linear
    gripper: float  # finger opening, m (0 without a gripper)
    stamp: float  # seconds on the backend's clock when the state was measured

    @property
    def tool_pose(self) -> np.ndarray:
        return np.concatenate([self.tool_pos, self.tool_quat])


@dataclass
class ToolTarget:
    """A Cartesian impedance target after the safety layer; gripper in [-1 open, +1 closed] or None."""

    pos: np.ndarray
    quat: np.ndarray
    gripper: float | None = None


class ArmBackend(Protocol):
    joint_names: tuple[str, ...]
    control_hz: float

    def read(self) -> ArmState:
        """The newest state; a backend refuses one older than it allows (StaleStateError)."""

    def command(self, target: ToolTarget) -> None:
        """Send a target; returns at once."""

    def wait(self) -> None:
        """Until the end of this control period: the simulator steps physics, hardware sleeps."""

    def hold(self) -> None:
        """Stop: command the measured pose, so the arm stays where it is."""

    def close(self) -> None: ...


class JointMover(Protocol):
    """Optional for an ArmBackend: move the joints directly (a periodic full joint reset, as SERL does)."""

    def move_joints(self, q: np.ndarray, duration: float) -> None:
        """Move to `q` (rad, joint_names order) along interpolated joint targets over `duration` s; blocks."""


class Camera(Protocol):
    name: str
    shape: tuple[int, int, int]  # H, W, C of the frames read() returns

    def read(self) -> tuple[np.ndarray, float]:
        """The newest frame (uint8 HWC) and its timestamp in seconds."""


class ResetHandler(Protocol):
    def reset(self, rng: np.random.Generator) -> dict:
        """Bring the arm (and, in simulation, the objects) to a start drawn from `rng`; return info."""


class Task(Protocol):
    """Scores a state through the backend's public interface; never through an env's fields."""

    uses_gripper: bool

    def object_state(self, arm: ArmBackend) -> np.ndarray:
        """Privileged object state for state-only observations (empty where none is measured)."""

    def score(self, arm: ArmBackend) -> tuple[float, bool]:
        """Dense reward and success for the arm's current state."""


class StaleStateError(RuntimeError):
    """A state or frame older than the backend accepts: the caller holds the arm."""
