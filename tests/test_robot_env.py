"""The robot env's seam: interfaces without MuJoCo/torch/rclpy, one action mapping for every backend, 6-DoF actions."""

from __future__ import annotations

import subprocess
import sys

import mujoco
import numpy as np
import pytest

import robolearn.sim as rsim
from robolearn.controllers.rotations import orientation_error, quat_mul, rotvec_to_quat
from robolearn.controllers.safety import SafetyConfig, clamp_tool_rotation
from robolearn.robot import ArmState, RobotEnv, RobotEnvConfig, ToolTarget


def test_robot_interfaces_import_no_simulator_no_torch_no_ros():
    code = ("import sys, robolearn.robot, robolearn.controllers.safety; "
            "print(sorted(m for m in ('mujoco', 'torch', 'rclpy', 'dm_control') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_numpy_rotations_match_mujoco():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.normal(size=4), rng.normal(size=4)
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        conj, err, ref = np.empty(4), np.empty(4), np.empty(3)
        mujoco.mju_negQuat(conj, b)
        mujoco.mju_mulQuat(err, a, conj)
        if err[0] < 0:
            err *= -1
        mujoco.mju_quat2Vel(ref, err, 1.0)
        np.testing.assert_allclose(orientation_error(a, b), ref, atol=1e-9)
        clamped = clamp_tool_rotation(b, a, SafetyConfig(max_rotation_step=0.2))
        assert np.linalg.norm(orientation_error(clamped, b)) == pytest.approx(min(0.2, np.linalg.norm(ref)), abs=1e-9)


class PointArm:
    """A kinematic tool that jumps to its target: enough to check the env's mapping on a non-MuJoCo backend."""

    joint_names, control_hz = ("j1",), 10.0

    def __init__(self):
        self.pos, self.quat, self.sent = np.array([0.4, 0.0, 0.2]), np.array([0.0, 1.0, 0.0, 0.0]), []

    def read(self):
        return ArmState(self.joint_names, np.zeros(1), np.zeros(1), self.pos.copy(), self.quat.copy(), np.zeros(3), 0.0, 0.0)

    def command(self, target: ToolTarget):
        self.sent.append(target)
        self.pos, self.quat = target.pos, target.quat

    def wait(self):
        pass

    def hold(self):
        pass


class BoxTask:
    uses_gripper = True

    def object_state(self, arm):
        return np.array([1.0, 2.0])

    def score(self, arm):
        return float(arm.pos[2]), bool(arm.pos[2] >= 0.45)


class NoReset:
    def reset(self, rng):
        return {}


def test_any_backend_gets_the_same_mapping_and_layout():
    cfg = RobotEnvConfig(safety=SafetyConfig(workspace_high=(0.6, 0.3, 0.45), max_translation_step=0.05))
    env = RobotEnv(PointArm(), BoxTask(), NoReset(), cfg)
    obs, _ = env.reset(seed=0)
    assert env.observation_space["state"].shape == (9,) and env.action_space.shape == (4,)
    np.testing.assert_array_equal(obs["state"][-2:], [1.0, 2.0])  # privileged object state without cameras
    heights = []
    for _ in range(8):
        obs, reward, terminated, _, info = env.step(np.array([0.0, 0.0, 1.0, 1.0], np.float32))
        heights.append(env.arm.pos[2])
    # 5 cm per step at most (max_translation_step, not action_scale's 10 cm), never above the box top
    np.testing.assert_allclose(np.diff([0.2, *heights])[:4], 0.05)
    assert max(heights) == pytest.approx(0.45) and terminated and info["success"]
    assert env.arm.sent[-1].gripper == 1.0
    with pytest.raises(ValueError, match="action contains NaN"):
        env.step(np.array([np.nan, 0, 0, 0], np.float32))


def test_six_dof_actions_turn_the_tool():
    env = rsim.make("robolearn/PandaReach-v0", action_mode="6dof", rotation_scale=0.05)
    assert env.action_space.shape == (6,)
    obs, _ = env.reset(seed=0)
    start = obs["tcp_pose"][3:].astype(float)
    for _ in range(10):
        obs, *_ = env.step(np.array([0, 0, 0, 0, 0, 1.0], np.float32))  # yaw about world z
    turn = orientation_error(obs["tcp_pose"][3:].astype(float), start)
    # 10 steps of 0.05 rad from the measured pose: the damped rotational impedance (200 Nm/rad, 40 Nms/rad)
    # turns ~0.02 rad per step, about z only, and never more than was asked
    assert 0.1 < turn[2] <= 0.5 and np.linalg.norm(turn[:2]) < 0.2 * turn[2]
    env.close()


def test_xyz_mode_holds_the_tool_down():
    env = rsim.make("robolearn/PandaReach-v0")
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        obs, *_ = env.step(np.array([0.5, 0.5, 0.0], np.float32))
    down = np.asarray(RobotEnvConfig.tool_quat)
    assert np.linalg.norm(orientation_error(obs["tcp_pose"][3:].astype(float), down)) < 0.05
    env.close()


def test_rotation_target_composes_in_the_world_frame():
    q = np.array([0.0, 1.0, 0.0, 0.0])
    turned = quat_mul(rotvec_to_quat([0, 0, 0.1]), q)
    np.testing.assert_allclose(orientation_error(turned, q), [0, 0, 0.1], atol=1e-12)


def test_bad_action_mode_is_named():
    with pytest.raises(ValueError, match="action_mode must be one of"):
        rsim.make("robolearn/PandaReach-v0", action_mode="joint")
