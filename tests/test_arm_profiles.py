"""Arm profiles (hardware/profiles/*.yaml) and the DH kinematics they carry; no ROS here.

The Panda DH table is checked against robolearn's MuJoCo Panda (built independently from the same datasheet
into bodies and sites), the UR5e table against the closed-form pose Universal Robots' published parameters
give; every loader error is one line naming the file and the field.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from robolearn.controllers.dh import DHChain, ik_step, mat_to_quat, quat_to_matrix
from robolearn.controllers.rotations import orientation_error, quat_mul, rotvec_to_quat
from robolearn.hardware.profiles import PROFILE_DIR, ProfileError, load_profile, parse_profile, shipped

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["franka_fr3", "ros2_control_position", "ros2_control_trajectory", "ros2_control_velocity", "ur5e_ros2",
           "ur5e_rtde"]


def raw(name: str) -> dict:
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


def same_rotation(q1, q2, atol=1e-9) -> bool:
    return abs(abs(float(np.dot(q1, q2))) - 1.0) < atol


def test_every_shipped_profile_loads_and_is_consistent():
    assert shipped() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and len(p.home) == len(p.joints) == len(p.velocity_limit)
        assert all(lo <= q <= hi for lo, q, hi in zip(p.position_low, p.home, p.position_high))
        if p.kinematics is not None:  # the home posture puts the tool inside the workspace box
            pos, _ = p.kinematics.chain().fk(np.array(p.home))
            assert np.all(pos >= p.workspace_low) and np.all(pos <= p.workspace_high), (name, pos)
        safety = p.safety()
        assert (safety.max_translation_step, safety.max_rotation_step) == (0.01, 0.05)  # SERL's precise mode
        assert safety.workspace_low == p.workspace_low and safety.joint_velocity_limit == p.velocity_limit
    assert load_profile(str(PROFILE_DIR / "ur5e_ros2.yaml")).services == {
        "resend_robot_program": "io_and_status_controller/resend_robot_program"}


def test_profiles_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "profiles/*.yaml" in data["robolearn.hardware"]


def test_panda_dh_matches_the_mujoco_panda():
    """Same joint angles -> same flange and tool-centre-point pose (tool offset: flange 0.107 m, then the
    hand turned -45 deg about z with its TCP 0.1034 m further: tool_xyz [0, 0, 0.2104], tool_rpy [0, 0, -pi/4])."""
    mujoco = pytest.importorskip("mujoco")
    model = mujoco.MjModel.from_xml_path(str(ROOT / "sim" / "assets" / "panda.xml"))
    data = mujoco.MjData(model)
    chain = load_profile("ros2_control_position").kinematics.chain()
    flange = DHChain.from_table(chain.convention, chain.dh, tool_xyz=(0.0, 0.0, 0.107))  # franka's flange row
    rng = np.random.default_rng(0)
    tcp, fl = model.site("tcp").id, model.site("flange").id
    jac_p, jac_r = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    for _ in range(20):
        q = rng.uniform(model.jnt_range[:7, 0], model.jnt_range[:7, 1])
        data.qpos[:7] = q
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        pos, quat = chain.fk(q)
        np.testing.assert_allclose(pos, data.site_xpos[tcp], atol=1e-12)
        assert same_rotation(quat, mat_to_quat(data.site_xmat[tcp].reshape(3, 3)))
        np.testing.assert_allclose(flange.fk(q)[0], data.site_xpos[fl], atol=1e-12)
        mujoco.mj_jacSite(model, data, jac_p, jac_r, tcp)
        np.testing.assert_allclose(chain.jacobian(q), np.vstack([jac_p, jac_r])[:, :7], atol=1e-12)


def test_ur5e_dh_matches_the_published_parameters():
    """Universal Robots' UR5e table (d1 0.1625, a2 -0.425, a3 -0.3922, d4 0.1333, d5 0.0997, d6 0.0996): at zero
    the flange sits at (a2 + a3, -(d4 + d6), d1 - d5) with its z axis along -y of the base."""
    p = load_profile("ur5e_ros2")
    chain = p.kinematics.chain()
    pos, quat = chain.fk(np.zeros(6))
    np.testing.assert_allclose(pos, [-0.8172, -0.2329, 0.0628], atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(quat)[:, 2], [0.0, -1.0, 0.0], atol=1e-12)
    pos, quat = chain.fk(np.array(p.home))  # the usual home: tool down, below the shoulder line
    np.testing.assert_allclose(pos, [-0.4919, -0.1333, 0.4879], atol=1e-4)
    np.testing.assert_allclose(quat_to_matrix(quat)[:, 2], [0.0, 0.0, -1.0], atol=1e-4)
    assert load_profile("ur5e_rtde").kinematics == p.kinematics
    # The Jacobian is the derivative of the pose (central differences).
    q, eps = np.array(p.home) + 0.1, 1e-6
    num = np.empty((6, 6))
    for i in range(6):
        dq = np.zeros(6)
        dq[i] = eps
        (p1, q1), (p0, q0) = chain.fk(q + dq), chain.fk(q - dq)
        num[:3, i] = (p1 - p0) / (2 * eps)
        num[3:, i] = orientation_error(q1, q0) / (2 * eps)
    np.testing.assert_allclose(chain.jacobian(q), num, atol=1e-6)


@pytest.mark.parametrize("name", ["ros2_control_position", "ur5e_ros2"])
def test_ik_step_reaches_a_reference_limited_target_and_respects_limits(name):
    p = load_profile(name)
    chain, low, high = p.kinematics.chain(), np.array(p.position_low), np.array(p.position_high)
    rng = np.random.default_rng(1)
    for _ in range(10):
        q = np.array(p.home) + rng.uniform(-0.3, 0.3, len(p.home))
        pos, quat = chain.fk(q)
        target_pos = pos + rng.uniform(-1, 1, 3) * 0.01
        target_quat = quat_mul(rotvec_to_quat(rng.uniform(-1, 1, 3) * 0.03), quat)
        q_new = ik_step(chain, q, target_pos, target_quat, low, high)
        got_pos, got_quat = chain.fk(q_new)
        assert np.linalg.norm(got_pos - target_pos) < 1e-5
        assert np.linalg.norm(orientation_error(target_quat, got_quat)) < 1e-5
    # A target that needs a joint past its limit: the answer stays inside the limits.
    q = np.array(p.home)
    tight_high = q + 0.001
    q_new = ik_step(chain, q, chain.fk(q)[0] + [0.0, 0.0, -0.05], chain.fk(q)[1], low, tight_high)
    assert np.all(q_new <= tight_high) and np.all(q_new >= low)


# -- one-line errors naming the file and the field -------------------------------------------------------
def broken(name: str, edit) -> str:
    data = copy.deepcopy(raw(name))
    edit(data)
    with pytest.raises(ProfileError) as err:
        parse_profile(data, f"hardware/profiles/{name}.yaml")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"hardware/profiles/{name}.yaml: ")
    return text


def test_unknown_fields_are_named():
    assert "speed: unknown field" in broken("ur5e_ros2", lambda d: d.update(speed=1))
    assert "limits.effort: unknown field; known: position_low, position_high, velocity" in broken(
        "ur5e_ros2", lambda d: d["limits"].update(effort=[1] * 6))
    assert "topics.current_pose: unknown field" in broken(
        "ur5e_ros2", lambda d: d["topics"].update(current_pose="current_pose"))  # not a joint-level arm's topic
    assert "topics.joint_states.depth: unknown field" in broken(
        "franka_fr3", lambda d: d["topics"].update(joint_states={"name": "joint_states", "depth": 5}))


def test_wrong_lengths_and_ranges_are_named():
    assert "limits.velocity: has 5 values, expected 6" in broken(
        "ur5e_ros2", lambda d: d["limits"].update(velocity=[1.0] * 5))
    assert "limits: elbow_joint: position_low 1.0 > position_high -1.0" in broken(
        "ur5e_ros2", lambda d: (d["limits"]["position_low"].__setitem__(2, 1.0),
                                d["limits"]["position_high"].__setitem__(2, -1.0)))
    assert "home: elbow_joint = 4.0 is outside its limits" in broken("ur5e_ros2", lambda d: d["home"].__setitem__(2, 4.0))
    assert "kinematics.dh: needs 7 rows" in broken("franka_fr3", lambda d: d["kinematics"]["dh"].pop())
    assert "workspace: low" in broken("franka_fr3", lambda d: d["workspace"].update(low=[0.7, -0.3, 0.0]))
    assert "reference_limit.translation: must be > 0" in broken(
        "franka_fr3", lambda d: d["reference_limit"].update(translation=0))
    assert "command_joints:" in broken("ur5e_ros2", lambda d: d["command_joints"].__setitem__(0, "base_joint"))
    assert "topics.current_pose.qos: 'sometimes' is not one of reliable, best_effort" in broken("franka_fr3", lambda d: d["topics"].update(
        current_pose={"name": "x", "qos": "sometimes"}))


def test_unknown_interface_and_backend_are_named():
    assert "interface: 'effort' is not one of position, velocity, trajectory for backend ros_joint" in broken(
        "ros2_control_position", lambda d: d.update(interface="effort"))
    assert "backend: 'ros1' is not one of" in broken("ros2_control_position", lambda d: d.update(backend="ros1"))
    assert "rates.command_hz: must be > 0 for interface velocity" in broken(
        "ros2_control_velocity", lambda d: d["rates"].update(command_hz=0.0))
    assert "topics.trajectory: is required" in broken("ros2_control_trajectory", lambda d: d["topics"].pop("trajectory"))
    assert "rtde.robot_hz: 250.0 is not 125 (CB3) or 500 (e-Series)" in broken(
        "ur5e_rtde", lambda d: d["rtde"].update(robot_hz=250.0))


def test_missing_profile_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match=r"arm profile 'kuka' is neither a file nor a shipped profile \['franka_fr3'"):
        load_profile("kuka")
    bad = tmp_path / "bad.yaml"
    bad.write_text("joints: [a, b\n")
    with pytest.raises(ProfileError, match=f"{bad}: not YAML"):
        load_profile(str(bad))
