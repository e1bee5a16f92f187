"""Controllers on the Panda model: step tracking, native vs numpy impedance, OSC, diff-IK, safety layer."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robolearn.controllers.diffik import DiffIKConfig, arm_kinematics, diff_ik
from robolearn.controllers.impedance import (CartesianImpedance, ImpedanceConfig, configure_native,
                                             nullspace_posture_torque)
from robolearn.controllers.kinematics import Arm, orientation_error, quat_to_mat
from robolearn.controllers.osc import OperationalSpace
from robolearn.controllers.safety import (SafetyConfig, UnsafeCommandError, clamp_joint_target, clamp_tool_rotation,
                                          clamp_tool_target, joint_limit_torque, require_finite, require_shape)
from robolearn.sim.model import ASSETS, load_model
from robolearn.sim.mujoco_arm import ARM_JOINTS

POSTURES = {
    "home": None,  # the model's "home" keyframe
    "left": np.array([0.5, -0.2, -0.3, -2.0, 0.2, 1.9, 0.3]),
    "right_high": np.array([-0.6, 0.1, 0.3, -1.7, -0.3, 1.5, 1.2]),
}
STEPS = {"+x": (0.05, 0.0, 0.0), "-y": (0.0, -0.05, 0.0), "+z": (0.0, 0.0, 0.05)}
DURATION, SETTLED_FROM = 1.0, 0.5  # s
MAX_SETTLED_ERROR, MAX_DRIFT_DEG = 0.002, 1.0
HOLD_STEPS = 50  # MujocoArm holds the posture torque for one 10 Hz control step of 2 ms physics steps
SLOW = settings(max_examples=40, deadline=None)


def panda(posture: np.ndarray | None = None):
    """Panda model at a posture with the native impedance configured, stepped as the workcell steps it."""
    model = load_model(ASSETS / "panda.xml")
    model.opt.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST  # as workcell.xml, which MujocoArm runs
    imp = configure_native(model, ImpedanceConfig())
    data = mujoco.MjData(model)
    mujoco.mj_resetDataKeyframe(model, data, model.key("home").id)
    arm = Arm(model, ARM_JOINTS)
    if posture is not None:
        data.qpos[arm.qpos_adr] = posture
    mujoco.mj_forward(model, data)
    return model, data, arm, imp


def drift_deg(target_quat: np.ndarray, quat: np.ndarray) -> float:
    return float(np.degrees(np.linalg.norm(orientation_error(target_quat, quat))))


def step_response(controller: str, posture_name: str, offset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample times, tool position errors (m) and orientation drifts (deg) after a reference step at t=0."""
    model, data, arm, imp = panda(POSTURES[posture_name])
    posture = arm.q(data).copy()
    target_pos, target_quat = arm.tool_pos(data) + np.asarray(offset), arm.tool_quat(data)
    data.mocap_pos[0], data.mocap_quat[0] = target_pos, target_quat
    if controller != "native":  # the numpy controllers drive the joint motors; the imp_* actuators go slack
        model.actuator_gainprm[imp] = 0.0
        model.actuator_biasprm[imp] = 0.0
    law = {"numpy": lambda: CartesianImpedance(arm, posture), "osc": lambda: OperationalSpace(arm, posture)}
    ctl = law[controller]() if controller in law else None
    scratch, hold, dofs = mujoco.MjData(model), np.zeros(arm.n), arm.dof_adr
    n = round(DURATION / model.opt.timestep)
    errors, drifts = np.empty(n), np.empty(n)
    for k in range(n):
        if controller == "diffik":
            # An ideal joint position servo: the commanded joint target is reached within the cycle.
            cmd = diff_ik(arm, scratch, arm.q(data), target_pos, target_quat, model.opt.timestep, posture=posture)
            arm_kinematics(arm, data, cmd.q_target)
        else:
            mujoco.mj_step1(model, data)
            if controller == "native":  # what MujocoArm.simulate does
                if k % HOLD_STEPS == 0:
                    hold[:] = nullspace_posture_torque(arm, data, posture, ImpedanceConfig().nullspace_stiffness)
                data.qfrc_applied[dofs] = data.qfrc_bias[dofs] + hold
            else:
                data.ctrl[arm.actuator_ids] = ctl.torques(data, target_pos, target_quat)
            mujoco.mj_step2(model, data)
            mujoco.mj_kinematics(model, data)  # pose at the new state, for the sample
        errors[k] = np.linalg.norm(arm.tool_pos(data) - target_pos)
        drifts[k] = drift_deg(target_quat, arm.tool_quat(data))
    return (np.arange(n) + 1) * model.opt.timestep, errors, drifts


# -- a. tracking: the acceptance criterion ------------------------------------------------

@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("posture", list(POSTURES))
@pytest.mark.parametrize("controller", ["native", "numpy", "osc", "diffik"])
def test_step_tracking(controller, posture, step):
    """5 cm step in free space: within 2 mm at every sample from 0.5 s to 1 s, tilt under 1 deg throughout."""
    t, errors, drifts = step_response(controller, posture, STEPS[step])
    settled = errors[t >= SETTLED_FROM].max()
    assert settled < MAX_SETTLED_ERROR, f"{controller} {posture} {step}: error {settled * 1e3:.2f} mm after 0.5 s"
    assert drifts.max() < MAX_DRIFT_DEG, f"{controller} {posture} {step}: orientation drift {drifts.max():.2f} deg"
    assert errors[0] > 0.04  # the step really was a step


# -- b. equivalence of the native and numpy impedance laws --------------------------------------------

def random_state(rng, model, data, arm, cfg: ImpedanceConfig):
    """Random arm state and a target offset inside the error clips; returns the target pose."""
    data.qpos[arm.qpos_adr] = rng.uniform(arm.q_low, arm.q_high)
    data.qvel[arm.dof_adr] = rng.normal(0.0, 0.6, arm.n)
    mujoco.mj_kinematics(model, data)
    target_pos = arm.tool_pos(data) + rng.uniform(-0.9, 0.9, 3) * cfg.max_translation_error
    turn = np.empty(4)
    mujoco.mju_axisAngle2Quat(turn, rng.normal(size=3), rng.uniform(0.0, 0.9 * cfg.max_rotation_error))
    target_quat = np.empty(4)
    mujoco.mju_mulQuat(target_quat, turn, arm.tool_quat(data))
    data.mocap_pos[0], data.mocap_quat[0] = target_pos, target_quat
    return target_pos, target_quat


def test_native_impedance_equals_numpy_law():
    """MuJoCo's imp_*/damp_* actuators and CartesianImpedance.wrench agree to 1e-6 at random states."""
    model, data, arm, imp = panda()
    cfg = ImpedanceConfig()
    law = CartesianImpedance(arm, arm.q(data).copy(), cfg)
    frc_range = model.jnt_actfrcrange[model.dof_jntid[arm.dof_adr]]
    rng = np.random.default_rng(20240611)
    clipped = 0
    for _ in range(200):
        target_pos, target_quat = random_state(rng, model, data, arm, cfg)
        data.ctrl[:] = 0.0
        mujoco.mj_forward(model, data)
        wrench = law.wrench(data, target_pos, target_quat)
        # Per actuator: the wrench along the axes of the target (refsite) frame, where MuJoCo clips it.
        rot = quat_to_mat(target_quat)
        local = (wrench.reshape(2, 3) @ rot).ravel()
        # configure_native returns (spring, damper) ids per axis; their forces add along that axis.
        per_axis = data.actuator_force[imp].reshape(6, 2).sum(axis=1)
        np.testing.assert_allclose(per_axis, local, rtol=1e-6, atol=1e-9 * np.abs(local).max())
        clipped += bool(np.any(np.abs(data.actuator_force[imp[0::2]]) >= cfg.stiffness() * cfg.max_error() - 1e-9))
        # Per joint: J^T wrench, bounded by the joints' actuatorfrcrange as MuJoCo bounds qfrc_actuator.
        expected = np.clip(arm.jacobian(data).T @ wrench, frc_range[:, 0], frc_range[:, 1])
        got = data.qfrc_actuator[arm.dof_adr]
        assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected), (got, expected)
    assert clipped > 20  # the force clip in the target frame was exercised


# -- OSC and diff-IK specifics ---------------------------------------------------------------------

def test_osc_posture_term_does_not_accelerate_tool():
    """Dynamically consistent nullspace: at rest on target, the OSC torque less qfrc_bias gives J M^-1 tau = 0."""
    model, data, arm, imp = panda(POSTURES["left"])
    model.actuator_gainprm[imp] = model.actuator_biasprm[imp] = 0.0
    far_posture = arm.q(data) + np.array([0.3, -0.2, 0.3, 0.2, -0.3, 0.2, 0.3])
    osc = OperationalSpace(arm, far_posture)
    tau = osc.torques(data, arm.tool_pos(data), arm.tool_quat(data)) - data.qfrc_bias[arm.dof_adr]
    assert np.abs(tau).max() > 0.05  # the posture term is working
    full = np.zeros((1, model.nv))
    full[0, arm.dof_adr] = tau
    accel = np.zeros((1, model.nv))
    mujoco.mj_solveM(model, data, accel, full)
    jac = np.zeros((6, model.nv))
    mujoco.mj_jacSite(model, data, jac[:3], jac[3:], arm.site_id)
    # Only the finger dofs, which OSC treats as rigid with the hand, let through a trace.
    assert np.abs(jac @ accel[0]).max() < 1e-3 * np.abs(accel[0]).max()


@SLOW
@given(seed=st.integers(0, 2**32 - 1), dt=st.sampled_from([0.002, 0.008, 0.05]))
def test_diff_ik_targets_stay_within_limits(seed, dt):
    """Any measured q and any target: the next joint target is inside limits less margin and velocity-feasible."""
    model, data, arm, _ = panda()
    rng = np.random.default_rng(seed)
    safety = SafetyConfig()
    q = rng.uniform(arm.q_low + safety.joint_margin, arm.q_high - safety.joint_margin)
    target = rng.uniform(-1.0, 1.0, 3)
    quat = rng.normal(size=4)
    cmd = diff_ik(arm, data, q, target, quat / np.linalg.norm(quat), dt, posture=q[::-1].copy(), safety=safety)
    assert np.all(cmd.q_target >= arm.q_low + safety.joint_margin - 1e-12)
    assert np.all(cmd.q_target <= arm.q_high - safety.joint_margin + 1e-12)
    assert np.all(np.abs(cmd.dq) <= np.asarray(safety.joint_velocity_limit) + 1e-9)
    np.testing.assert_allclose(cmd.q_target, q + cmd.dq * dt)


def test_diff_ik_rejects_non_finite_input():
    model, data, arm, _ = panda()
    q = arm.q(data).copy()
    with pytest.raises(UnsafeCommandError, match=r"tool target position.*index \[2\]"):
        diff_ik(arm, data, q, [0.4, 0.0, np.nan], [0, 1, 0, 0], 0.01)
    with pytest.raises(UnsafeCommandError, match=r"measured joint positions.*index \[6\]"):
        diff_ik(arm, data, np.append(q[:6], np.inf), [0.4, 0.0, 0.3], [0, 1, 0, 0], 0.01)


def test_diff_ik_converges_from_far():
    """A 20 cm, 20 degree move converges (kinematically) with the default config."""
    model, data, arm, _ = panda()
    quat = np.empty(4)
    mujoco.mju_axisAngle2Quat(quat, np.array([1.0, 0.0, 0.0]), np.radians(20.0))
    target_quat = np.empty(4)
    mujoco.mju_mulQuat(target_quat, quat, arm.tool_quat(data))
    target_pos = arm.tool_pos(data) + [0.1, 0.15, -0.1]
    posture, cfg = arm.q(data).copy(), DiffIKConfig()
    q = posture
    for _ in range(300):
        q = diff_ik(arm, data, q, target_pos, target_quat, 0.01, posture=posture, cfg=cfg).q_target
    assert np.linalg.norm(arm.tool_pos(data) - target_pos) < 1e-3
    assert drift_deg(target_quat, arm.tool_quat(data)) < 0.1


# -- c. the safety layer -------------------------------------------------------------------------

def test_require_finite_names_thing_and_index():
    with pytest.raises(UnsafeCommandError, match=r"joint target contains NaN/inf at index \[1, 3\]"):
        require_finite([0.0, np.nan, 1.0, -np.inf], "joint target")
    with pytest.raises(ValueError, match=r"camera pose .*index \[\(1, 0\)\]"):
        require_finite([[1.0, 2.0], [np.inf, 0.0]], "camera pose")
    np.testing.assert_array_equal(require_finite([1, 2], "fine"), [1.0, 2.0])


def test_require_shape_names_expected_shape():
    with pytest.raises(UnsafeCommandError, match=r"action must have shape \(4,\), got \(3,\)"):
        require_shape([0.0, 0.0, 0.0], (4,), "action")
    with pytest.raises(UnsafeCommandError, match=r"action must be numeric"):
        require_shape(["a", "b", "c", "d"], (4,), "action")
    with pytest.raises(UnsafeCommandError, match=r"action contains NaN/inf at index \[0\]"):
        require_shape([np.nan, 0.0, 0.0, 0.0], (4,), "action")
    assert require_shape(np.zeros(4, dtype=np.float32), (4,), "action").dtype == np.float64


box_points = st.tuples(st.floats(0.2, 0.6), st.floats(-0.3, 0.3), st.floats(0.0, 0.5)).map(np.array)
anywhere = st.tuples(*[st.floats(-2.0, 2.0)] * 3).map(np.array)


@SLOW
@given(current=box_points, target=anywhere)
def test_clamp_tool_target_respects_step_and_box(current, target):
    cfg = SafetyConfig()
    out = clamp_tool_target(current, target, cfg)
    assert np.all(out >= np.asarray(cfg.workspace_low) - 1e-12) and np.all(out <= np.asarray(cfg.workspace_high) + 1e-12)
    assert np.linalg.norm(out - current) <= cfg.max_translation_step + 1e-9


@SLOW
@given(target=anywhere, overshoot=st.floats(0.001, 0.05), axis=st.integers(0, 2), side=st.sampled_from([0, 1]))
def test_clamp_tool_target_pulls_a_stray_tool_back(target, overshoot, axis, side):
    """A tool outside the box gets a target inside by at least recovery_gain times its overshoot."""
    cfg = SafetyConfig()
    low, high = np.asarray(cfg.workspace_low), np.asarray(cfg.workspace_high)
    current = (low + high) / 2
    current[axis] = low[axis] - overshoot if side == 0 else high[axis] + overshoot
    out = clamp_tool_target(current, target, cfg)
    assert np.all(out >= low) and np.all(out <= high)
    inside = out[axis] - low[axis] if side == 0 else high[axis] - out[axis]
    assert inside >= cfg.workspace_recovery_gain * overshoot - 1e-12


def test_clamp_tool_target_rejects_nan():
    with pytest.raises(UnsafeCommandError, match=r"tool target position.*index \[1\]"):
        clamp_tool_target(np.array([0.4, 0.0, 0.2]), np.array([0.4, np.nan, 0.2]), SafetyConfig())


quaternions = st.tuples(*[st.floats(-1.0, 1.0)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1).map(np.array)


@SLOW
@given(current=quaternions, target=quaternions)
def test_clamp_tool_rotation_limits_the_turn(current, target):
    cfg = SafetyConfig()
    current = current / np.linalg.norm(current)
    out = clamp_tool_rotation(current, target, cfg)
    assert abs(np.linalg.norm(out) - 1.0) < 1e-9
    turn = np.linalg.norm(orientation_error(out, current))
    assert turn <= cfg.max_rotation_step + 1e-9
    wanted = np.linalg.norm(orientation_error(target / np.linalg.norm(target), current))
    if wanted <= cfg.max_rotation_step:  # within reach: unchanged
        assert drift_deg(target / np.linalg.norm(target), out) < 1e-6
    else:  # on the way: the rest of the turn lies along the same axis
        assert abs(turn - cfg.max_rotation_step) < 1e-9
        assert abs(np.linalg.norm(orientation_error(target / np.linalg.norm(target), out))
                   - (wanted - cfg.max_rotation_step)) < 1e-6


def test_clamp_tool_rotation_rejects_bad_quaternions():
    with pytest.raises(UnsafeCommandError, match=r"tool target orientation.*index \[3\]"):
        clamp_tool_rotation(np.array([1.0, 0, 0, 0]), np.array([1.0, 0, 0, np.nan]), SafetyConfig())
    with pytest.raises(UnsafeCommandError, match="not a rotation"):
        clamp_tool_rotation(np.array([1.0, 0, 0, 0]), np.zeros(4), SafetyConfig())


@SLOW
@given(seed=st.integers(0, 2**32 - 1), dt=st.floats(0.001, 0.1))
def test_clamp_joint_target_respects_limits_and_velocity(seed, dt):
    rng = np.random.default_rng(seed)
    cfg = SafetyConfig()
    low, high = np.full(7, -2.0), np.full(7, 2.0)
    q = rng.uniform(low + cfg.joint_margin, high - cfg.joint_margin)
    out = clamp_joint_target(q, rng.uniform(-5.0, 5.0, 7), low, high, dt, cfg)
    assert np.all(out >= low + cfg.joint_margin) and np.all(out <= high - cfg.joint_margin)
    assert np.all(np.abs(out - q) <= np.asarray(cfg.joint_velocity_limit) * dt + 1e-12)


def test_joint_limit_torque_pushes_away_from_limits():
    low, high, margin = np.full(3, -1.0), np.full(3, 1.0), 0.1
    q = np.array([-0.95, 0.0, 0.97])
    tau = joint_limit_torque(q, np.zeros(3), low, high, margin)
    assert tau[0] > 0 and tau[1] == 0 and tau[2] < 0
    # Moving further into the limit is damped harder than resting there; moving away is not damped.
    into = joint_limit_torque(q, np.array([-1.0, 0.0, 1.0]), low, high, margin)
    away = joint_limit_torque(q, np.array([1.0, 0.0, -1.0]), low, high, margin)
    assert into[0] > tau[0] and into[2] < tau[2]
    np.testing.assert_array_equal(away, tau)
    deeper = joint_limit_torque(np.array([-0.99, 0.0, 0.99]), np.zeros(3), low, high, margin)
    assert deeper[0] > tau[0] and deeper[2] < tau[2]
