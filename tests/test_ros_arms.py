"""Every ROS arm profile driven over real DDS (loopback, a random domain) against test-side driver nodes.

The fakes speak each driver's conventions: ros2_control controllers are nodes named after the controller with
a `joints` parameter and `~/commands` or `~/joint_trajectory`; joint_state_broadcaster publishes joint_states in
an order of its own; franka_robot_state_broadcaster's pose is best effort; the UR driver adds speed scaling and
resend_robot_program. Each test runs in a namespace of its own, so the fakes of one never answer another.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)  # real DDS on a shared 2-core machine
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64, Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from robolearn.hardware.profiles import load_profile, parse_profile  # noqa: E402
from robolearn.robot.interfaces import StaleStateError, ToolTarget  # noqa: E402
from robolearn.launcher import random_domain  # noqa: E402
from robolearn.ros import common  # noqa: E402
from robolearn.ros.arm_profile import FRANKA_MSGS_MISSING, open_arm  # noqa: E402
from robolearn.ros.joint_arm import RosJointArm  # noqa: E402

_ns = itertools.count()


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def variant(name: str, **changes):
    """A shipped profile's YAML with top-level fields replaced (a user's edited copy)."""
    import yaml
    with open(load_profile(name).path) as f:
        data = yaml.safe_load(f)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_profile(data, f"{name}-variant.yaml")


@pytest.fixture(scope="module")
def ros():
    context, domain = Context(), random_domain()
    rclpy.init(context=context, domain_id=domain)
    executor = common.executor(threads=4, context=context)
    stop = threading.Event()
    host = Node("ros_arms_test", context=context)
    executor.add_node(host)
    thread = threading.Thread(target=common.spin, args=(executor, stop, host.get_logger()), daemon=True)
    thread.start()
    yield context, executor, domain
    stop.set()
    thread.join(timeout=5)
    executor.shutdown()
    host.destroy_node()
    rclpy.shutdown(context=context)


@pytest.fixture
def world(ros):
    """Makes nodes in a fresh namespace on the shared executor; removes them (and closes arms) afterwards."""
    context, executor, _ = ros
    ns = f"/t{os.getpid()}_{next(_ns)}"
    nodes, arms = [], []

    class World:
        namespace = ns

        def node(self, name: str, **kw) -> Node:
            node = Node(name, namespace=ns, context=context, **kw)
            executor.add_node(node)
            nodes.append(node)
            return node

        def arm(self, profile, **kw):
            arm = open_arm(self.node("agent"), profile, **kw)
            arms.append(arm)
            return arm

    yield World()
    for arm in arms:
        arm.close()
    for node in nodes:
        executor.remove_node(node)
        node.destroy_node()


class FakeJointDriver:
    """joint_state_broadcaster (100 Hz, its own joint order) and one ros2_control controller node."""

    def __init__(self, world, state_order, controller: str, controller_joints, interface: str, q0: dict,
                 state_qos=common.RELIABLE_QOS, extra_joints=()):
        self.q = dict(q0)
        self.v = {n: 0.0 for n in q0}
        self.state_order, self.extra, self.lock = list(state_order), list(extra_joints), threading.Lock()
        self.controller_joints, self.received = list(controller_joints), []
        self.broadcaster = world.node("joint_state_broadcaster")
        self.pub = self.broadcaster.create_publisher(JointState, "joint_states", state_qos)
        self.controller = world.node(controller, parameter_overrides=[
            Parameter("joints", value=self.controller_joints), Parameter("interface_name", value=interface)],
            automatically_declare_parameters_from_overrides=True)
        if interface == "trajectory":
            self.controller.create_subscription(JointTrajectory, "~/joint_trajectory", self._on_trajectory, 10)
        else:
            self.controller.create_subscription(Float64MultiArray, "~/commands",
                                                self._on_position if interface == "position" else self._on_velocity, 10)
        self.dt = 0.01
        self.broadcaster.create_timer(self.dt, self._tick)

    def _on_position(self, msg):
        with self.lock:
            self.received.append((time.monotonic(), list(msg.data)))
            self.q.update(zip(self.controller_joints, msg.data))

    def _on_velocity(self, msg):
        with self.lock:
            self.received.append((time.monotonic(), list(msg.data)))
            self.v.update(zip(self.controller_joints, msg.data))

    def _on_trajectory(self, msg):
        with self.lock:
            self.received.append((time.monotonic(), msg))
            if msg.points:  # the test needs the end point, not the controller's interpolation
                self.q.update(zip(msg.joint_names, msg.points[-1].positions))

    def _tick(self):
        with self.lock:
            for n in self.q:
                self.q[n] += self.v[n] * self.dt
            names = self.state_order + self.extra
            pos = [self.q.get(n, 0.02) for n in names]
            vel = [self.v.get(n, 0.0) for n in names]
        self.pub.publish(common.joint_state_msg(names, pos, vel, self.broadcaster.get_clock().now().nanoseconds * 1e-9))

    def positions(self, names) -> np.ndarray:
        with self.lock:
            return np.array([self.q[n] for n in names])


def panda_driver(world, profile, interface=None, controller=None, controller_joints=None, **kw):
    interface = interface or profile.interface
    topic = profile.topics["trajectory" if interface == "trajectory" else "commands"].name
    order = list(reversed(profile.joints))  # joint_state_broadcaster's order is not the controller's
    return FakeJointDriver(world, order, controller or topic.split("/")[0], controller_joints or profile.command_joints,
                           interface, dict(zip(profile.joints, profile.home)), extra_joints=profile.gripper.joints, **kw)


# -- ros2_control ---------------------------------------------------------------------------------
def test_position_controller_streams_interpolated_targets_in_the_controllers_order(world):
    order = ["panda_joint3", "panda_joint1", "panda_joint2", "panda_joint7", "panda_joint5", "panda_joint6",
             "panda_joint4"]
    profile = variant("ros2_control_position", command_joints=order)
    fake = panda_driver(world, profile)
    arm = world.arm(profile)
    assert isinstance(arm, RosJointArm) and fake.controller_joints == order
    state = arm.read()
    np.testing.assert_allclose(state.position, profile.home, atol=1e-9)  # matched by name, not by order
    np.testing.assert_allclose(state.tool_pos, [0.307, 0.0, 0.487], atol=2e-3)  # DH FK of the Panda home
    start = len(fake.received)
    goal = state.tool_pos + [0.006, -0.004, -0.005]
    arm.command(ToolTarget(goal, state.tool_quat, gripper=None))
    wait_for(lambda: np.linalg.norm(arm.read().tool_pos - goal) < 5e-4, what="the tool at the target")
    streamed = [np.array(d) for _, d in fake.received[start:]]
    assert len(streamed) >= 4, "positions are streamed between the 10 Hz targets"
    # Interpolated: every streamed joint vector lies between the start and the final target, in order.
    last = fake.positions(profile.joints)
    progress = [np.dot(np.array([dict(zip(order, s))[n] for n in profile.joints]) - state.position,
                       last - state.position) for s in streamed]
    assert all(b >= a - 1e-12 for a, b in zip(progress, progress[1:]))
    assert abs(np.dot(arm.read().tool_quat, state.tool_quat)) > 1 - 1e-6  # same orientation (q ~ -q)


def test_reference_limit_and_workspace_box_bound_every_target(world):
    profile = load_profile("ros2_control_position")
    fake = panda_driver(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    arm.command(ToolTarget(state.tool_pos + [0.0, 0.0, -0.2], state.tool_quat))  # 20 cm: limited to 1 cm
    time.sleep(0.3)
    moved = arm.read().tool_pos - state.tool_pos
    assert 0.008 < -moved[2] <= profile.max_translation_step + 1e-3 and abs(moved[0]) < 2e-3
    # The box: z above workspace_high is clipped back inside it even when the step limit allows it.
    arm.safety.max_translation_step = 0.05
    here = arm.read().tool_pos
    arm.command(ToolTarget(here + [0.0, 0.0, 0.05], state.tool_quat))
    time.sleep(0.3)
    assert arm.read().tool_pos[2] <= profile.workspace_high[2] + 1e-3
    assert fake.received


def test_velocity_controller_gets_rates_then_zeros_and_hold_stops(world):
    profile = load_profile("ros2_control_velocity")
    fake = panda_driver(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    goal = state.tool_pos + [0.0, 0.008, 0.0]
    arm.command(ToolTarget(goal, state.tool_quat))
    wait_for(lambda: any(np.any(np.abs(d) > 1e-4) for _, d in fake.received), what="a velocity command")
    vmax = np.array(profile.velocity_limit)
    assert all(np.all(np.abs(d) <= vmax + 1e-9) for _, d in fake.received)
    wait_for(lambda: not np.any(fake.received[-1][1]), timeout=2.0, what="zeros after the control period")
    assert np.linalg.norm(arm.read().tool_pos - goal) < 1.5e-3
    arm.command(ToolTarget(goal + [0.008, 0, 0], state.tool_quat))
    time.sleep(0.03)
    n = len(fake.received)
    arm.hold()
    wait_for(lambda: len(fake.received) > n and not np.any(fake.received[-1][1]), what="hold's zero velocity")
    arm.command(ToolTarget(goal, state.tool_quat))
    wait_for(lambda: np.any(fake.received[-1][1]), what="moving again")
    arm.close()  # mid-period: the controller must not keep the last velocity
    wait_for(lambda: not np.any(fake.received[-1][1]), what="close's zero velocity")


def test_trajectory_controller_gets_one_point_per_control_period(world):
    profile = load_profile("ros2_control_trajectory")
    fake = panda_driver(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    arm.command(ToolTarget(state.tool_pos + [0.005, 0.0, 0.0], state.tool_quat))
    wait_for(lambda: fake.received, what="a JointTrajectory")
    msg = fake.received[-1][1]
    assert list(msg.joint_names) == list(profile.command_joints) and len(msg.points) == 1
    t = msg.points[0].time_from_start
    assert t.sec + t.nanosec * 1e-9 == pytest.approx(1.0 / profile.control_hz)
    wait_for(lambda: np.linalg.norm(arm.read().tool_pos - state.tool_pos - [0.005, 0, 0]) < 5e-4, what="arrival")


def test_move_joints_interpolates_to_the_joint_target(world):
    profile = load_profile("ros2_control_position")
    fake = panda_driver(world, profile)
    arm = world.arm(profile)
    target = np.array(profile.home) + [0.1, -0.05, 0.0, 0.1, 0.0, -0.1, 0.2]
    start = len(fake.received)
    arm.move_joints(target, 0.4)
    wait_for(lambda: np.allclose(fake.positions(profile.joints), target, atol=1e-9), timeout=2.0, what="target")
    steps = [d[0] for _, d in fake.received[start:]]  # panda_joint1 rises monotonically by +0.1
    assert len(steps) >= 10 and all(b >= a - 1e-12 for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="panda_joint4 = 0.500 outside the limits"):
        arm.move_joints(np.array([0, 0, 0, 0.5, 0, 1.0, 0]), 5.0)
    with pytest.raises(ValueError, match="too fast"):
        arm.move_joints(target + 1.0, 0.05)


def test_wrong_joint_order_of_the_controller_is_named(world):
    profile = load_profile("ros2_control_position")
    swapped = ["panda_joint2", "panda_joint1", *profile.command_joints[2:]]
    panda_driver(world, profile, controller_joints=swapped)
    with pytest.raises(ValueError, match=r"forward_position_controller: \['panda_joint2', 'panda_joint1'.*wrong joint order"):
        world.arm(profile)


def test_joint_states_missing_a_joint_is_named(world):
    profile = variant("ros2_control_position", timeouts={"startup": 1.0})
    fake = panda_driver(world, profile)
    fake.state_order.remove("panda_joint7")
    with pytest.raises(TimeoutError, match=r"topics.joint_states.*lacks joints \['panda_joint7'\]"):
        world.arm(profile)


def test_silent_topic_fails_at_configure_naming_it(world):
    profile = variant("ros2_control_position", timeouts={"startup": 0.5})
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"topics.joint_states: no message on {world.namespace}/joint_states "
                                           r"within 0.5 s \(0 publishers\)"):
        world.arm(profile)
    assert time.monotonic() - start < 3.0


def test_qos_mismatch_on_joint_states_is_named(world):
    profile = load_profile("ros2_control_position")  # joint_states: reliable, as joint_state_broadcaster
    panda_driver(world, profile, state_qos=common.SENSOR_QOS)  # a best-effort relay in front of the robot
    with pytest.raises(ValueError, match=rf"topics.joint_states: QoS mismatch on {world.namespace}/joint_states: "
                                         r"publisher .*joint_state_broadcaster is best_effort/volatile, "
                                         r"this subscription reliable/volatile"):
        world.arm(profile)


# -- Franka FR3 (franka_ros2) ------------------------------------------------------------------------
class FakeFranka:
    """franka_ros2's topics: joint_states (reliable), the state broadcaster's best-effort pose and twist, the
    Cartesian impedance controller's equilibrium_pose and a gripper command topic."""

    POSE = (np.array([0.4, 0.0, 0.3]), np.array([0.0, 1.0, 0.0, 0.0]))

    def __init__(self, world, profile):
        self.profile, self.targets, self.grippers = profile, [], []
        self.broadcaster = world.node("franka_robot_state_broadcaster")
        self.jsb = world.node("joint_state_broadcaster")
        self.joints = self.jsb.create_publisher(JointState, "joint_states", common.RELIABLE_QOS)
        self.pose = self.broadcaster.create_publisher(PoseStamped, "~/current_pose", common.SENSOR_QOS)
        self.twist = self.broadcaster.create_publisher(TwistStamped, "~/desired_end_effector_twist", common.SENSOR_QOS)
        ctrl = world.node("cartesian_impedance_controller")
        ctrl.create_subscription(PoseStamped, "~/equilibrium_pose",
                                 lambda m: self.targets.append(np.concatenate(common.pose_arrays(m))), 10)
        grip = world.node("gripper_controller")
        grip.create_subscription(Float64MultiArray, "~/commands", lambda m: self.grippers.append(m.data[0]), 10)
        self.jsb.create_timer(0.01, self._tick)

    def _tick(self):
        t = self.jsb.get_clock().now().nanoseconds * 1e-9
        names = list(self.profile.joints) + list(self.profile.gripper.joints)
        self.joints.publish(common.joint_state_msg(names, [*self.profile.home, 0.03, 0.03], [0.0] * 9, t))
        self.pose.publish(common.pose_msg(*self.POSE, t, "base"))
        self.twist.publish(common.twist_msg(np.zeros(3), np.zeros(3), t, "base"))


def test_franka_profile_commands_the_equilibrium_pose_within_the_reference_limit(world):
    profile = load_profile("franka_fr3")
    fake = FakeFranka(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    np.testing.assert_allclose(state.tool_pos, FakeFranka.POSE[0])
    assert state.joint_names[0] == "fr3_joint1" and state.gripper == pytest.approx(0.06)
    arm.command(ToolTarget(state.tool_pos + [0.05, 0.0, 0.0], state.tool_quat, gripper=1.0))
    wait_for(lambda: fake.targets and fake.grippers, what="equilibrium pose and gripper")
    np.testing.assert_allclose(fake.targets[-1][:3], state.tool_pos + [profile.max_translation_step, 0, 0])
    assert fake.grippers[-1] == 0.0  # closed


def test_franka_error_recovery_without_franka_msgs_says_what_to_install(world):
    try:
        import franka_msgs  # noqa: F401
        pytest.skip("franka_msgs is installed here; the message for its absence cannot be shown")
    except ImportError:
        pass
    fake = FakeFranka(world, load_profile("franka_fr3"))
    arm = world.arm("franka_fr3")
    with pytest.raises(RuntimeError, match=re.escape(FRANKA_MSGS_MISSING)):
        arm.recover()
    # The gripper actions need franka_msgs too: until it is there, the opening goes to the gripper topic.
    assert arm._grip_clients is None
    state = arm.read()
    arm.command(ToolTarget(state.tool_pos, state.tool_quat, gripper=1.0))
    wait_for(lambda: fake.grippers, what="the gripper topic")
    assert fake.grippers[-1] == pytest.approx(0.0)  # closed


def test_franka_pose_subscribed_reliable_is_a_named_qos_mismatch(world):
    profile = variant("franka_fr3", topics={"current_pose": {"name": "franka_robot_state_broadcaster/current_pose",
                                                            "qos": "reliable"}})
    FakeFranka(world, profile)
    with pytest.raises(ValueError, match=r"topics.current_pose: QoS mismatch on .*/current_pose: publisher "
                                         r".*franka_robot_state_broadcaster is best_effort"):
        world.arm(profile)


# -- Universal Robots ROS 2 driver -------------------------------------------------------------------------
UR_STATE_ORDER = ["elbow_joint", "shoulder_lift_joint", "shoulder_pan_joint", "wrist_1_joint", "wrist_2_joint",
                  "wrist_3_joint"]  # as the UR driver's joint_state_broadcaster publishes them


class FakeUrDriver(FakeJointDriver):
    def __init__(self, world, profile, interface=None):
        interface = interface or profile.interface
        super().__init__(world, UR_STATE_ORDER, profile.topics["commands"].name.split("/")[0], profile.command_joints,
                         interface, dict(zip(profile.joints, profile.home)))
        self.scaling, self.resends = 1.0, 0
        scaling_node = world.node("speed_scaling_state_broadcaster")
        pub = scaling_node.create_publisher(Float64, "~/speed_scaling", 10)
        scaling_node.create_timer(0.01, lambda: pub.publish(Float64(data=self.scaling)))
        io = world.node("io_and_status_controller")
        io.create_service(Trigger, "~/resend_robot_program", self._on_resend)

    def _on_resend(self, request, response):
        self.resends += 1
        response.success, response.message = True, "program resent"
        return response


def test_ur_driver_profile_stops_at_zero_speed_scaling_and_resends_the_program(world):
    profile = load_profile("ur5e_ros2")
    fake = FakeUrDriver(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    np.testing.assert_allclose(state.position, profile.home, atol=1e-9)
    np.testing.assert_allclose(state.tool_pos, [-0.4919, -0.1333, 0.4879], atol=1e-3)
    goal = state.tool_pos + [0.0, 0.0, -0.008]
    arm.command(ToolTarget(goal, state.tool_quat))
    wait_for(lambda: np.linalg.norm(arm.read().tool_pos - goal) < 5e-4, what="the tool at the target")
    fake.scaling = 0.0  # pendant paused or slider at 0: streaming controllers would not notice
    wait_for(lambda: _stale(arm), what="scaling 0 refused")
    with pytest.raises(StaleStateError, match="speed_scaling is 0"):
        arm.command(ToolTarget(goal, state.tool_quat))
    n = len(fake.received)
    held = arm.hold()
    wait_for(lambda: len(fake.received) > n, what="hold")
    np.testing.assert_allclose(fake.received[-1][1], held[[profile.joints.index(j) for j in profile.command_joints]])
    assert arm.recover() == "program resent" and fake.resends == 1
    fake.scaling = 1.0
    wait_for(lambda: not _stale(arm), what="scaling back to 1")


def test_ur_velocity_interface_through_the_forward_velocity_controller(world):
    profile = variant("ur5e_ros2", interface="velocity", topics={"commands": "forward_velocity_controller/commands"})
    fake = FakeUrDriver(world, profile)
    arm = world.arm(profile)
    state = arm.read()
    goal = state.tool_pos + [0.006, 0.0, 0.0]
    arm.command(ToolTarget(goal, state.tool_quat))
    wait_for(lambda: np.linalg.norm(arm.read().tool_pos - goal) < 1.5e-3, what="the tool near the target")
    wait_for(lambda: not np.any(fake.received[-1][1]), timeout=2.0, what="zeros after the period")


def _stale(arm) -> bool:
    try:
        arm.read()
        return False
    except StaleStateError:
        return True


def test_trajectory_profile_drives_the_mujoco_arm_of_sim_robot_node(ros, world, tmp_path):
    """Physics in the loop: sim_robot_node (MuJoCo, a joint_trajectory_controller stand-in) follows the profile's
    trajectories, and the profile's DH FK of its joint_states agrees with the simulator's own tool pose."""
    import subprocess
    import sys
    pytest.importorskip("mujoco")
    env = common.isolated_env()
    env.update(ROS_DOMAIN_ID=str(ros[2]), PYTHONUNBUFFERED="1")
    log = tmp_path / "sim.log"
    args = [sys.executable, "-m", "robolearn.ros.sim_robot_node", "--ros-args", "-r", f"__ns:={world.namespace}",
            "-p", "env_id:=robolearn/PandaReach-v0", "-p", "publish_rate_hz:=100.0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        poses = []
        world.node("pose_probe").create_subscription(
            PoseStamped, common.TOOL_POSE, lambda m: poses.append(np.concatenate(common.pose_arrays(m))),
            common.SENSOR_QOS)
        wait_for(lambda: poses, timeout=60.0, what=f"sim_robot_node; its log: {log}")
        profile = load_profile("ros2_control_trajectory")
        arm = world.arm(profile)
        time.sleep(0.3)
        state = arm.read()
        np.testing.assert_allclose(state.tool_pos, poses[-1][:3], atol=2e-3)  # FK == MuJoCo's tcp site
        assert abs(np.dot(state.tool_quat, poses[-1][3:])) > 1 - 1e-4
        start = state.tool_pos.copy()
        for _ in range(5):  # 5 policy steps of +2 cm in y: each limited to 1 cm from the measured tool
            s = arm.read()
            arm.command(ToolTarget(s.tool_pos + [0.0, 0.02, 0.0], s.tool_quat))
            time.sleep(1.0 / profile.control_hz)
        time.sleep(0.5)
        moved = arm.read().tool_pos - start
        assert 0.02 < moved[1] <= 5 * profile.max_translation_step + 2e-3 and np.all(np.abs(moved[[0, 2]]) < 5e-3)
        np.testing.assert_allclose(arm.read().tool_pos, poses[-1][:3], atol=3e-3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.hardware
def test_profile_against_a_real_arm():
    """Bring-up on a robot (docs/hardware.md): ROBOLEARN_ARM_PROFILE=<profile> pytest -m hardware."""
    name = os.environ.get("ROBOLEARN_ARM_PROFILE")
    if not name:
        pytest.skip("needs a real arm: set ROBOLEARN_ARM_PROFILE to its profile with the driver running")
    context = Context()
    rclpy.init(context=context)
    node = Node("robolearn_bringup", context=context)
    try:
        arm = open_arm(node, name)
        state = arm.read()
        assert np.all(np.isfinite(state.tool_pos))
        arm.hold()
        arm.close()
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


# -- the robot env's `profile` parameter (agent_node, record_node) ------------------------------------------
def test_robot_env_from_the_profile_parameter_commands_the_trajectory_controller(world):
    from robolearn.ros import agent_node, robot_params
    assert "profile" in agent_node.PARAMS
    profile = load_profile("ros2_control_trajectory")
    fake = panda_driver(world, profile)
    task = world.node("task")
    pub = task.create_publisher(Float64MultiArray, common.OBJECT_STATE, common.RELIABLE_QOS)
    task.create_timer(0.02, lambda: pub.publish(Float64MultiArray(data=[0.45, 0.0, 0.02])))
    p = {name: default for name, (default, _) in robot_params.ROBOT_PARAMS.items()}
    p["profile"] = "ros2_control_trajectory"
    env, parts = robot_params.make_robot_env(world.node("agent"), p, {}, None, "robolearn/PandaPickCube-v0")
    try:
        assert isinstance(env.arm, RosJointArm)
        start = env.observe()["tcp_pose"][:3]
        env.apply(np.array([1.0, 0.0, 0.0, 1.0]))  # 10 cm in the env's safety layer, 1 cm in the profile's
        wait_for(lambda: fake.received, what="a JointTrajectory")
        wait_for(lambda: env.arm.read().tool_pos[0] - start[0] > 0.009, what="the 1 cm step")
        np.testing.assert_allclose(env.arm.read().tool_pos, start + [profile.max_translation_step, 0, 0], atol=2e-4)
    finally:
        for part in parts:
            part.close()


def test_robot_env_with_a_silent_profile_fails_naming_the_topic(world, tmp_path):
    import yaml
    from robolearn.ros import robot_params
    with open(load_profile("ur5e_ros2").path) as f:
        data = yaml.safe_load(f)
    data["timeouts"]["startup"] = 0.5
    path = tmp_path / "my_ur.yaml"
    path.write_text(yaml.safe_dump(data))
    p = {name: default for name, (default, _) in robot_params.ROBOT_PARAMS.items()}
    p["profile"] = str(path)
    with pytest.raises(ValueError, match=r"parameters workspace_low/high \[0.2, -0.3, 0.0\] .. \[0.6, 0.3, 0.5\] reach "
                                         r"outside the profile's workspace \[-0.75, -0.45, 0.05\]"):
        robot_params.make_robot_env(world.node("agent0"), p, {}, None, "robolearn/PandaPickCube-v0")
    p.update(workspace_low=[-0.7, -0.4, 0.1], workspace_high=[-0.3, 0.1, 0.5])  # inside the UR's box
    with pytest.raises(TimeoutError, match=rf"{path}: topics.joint_states: no message on {world.namespace}/joint_states"):
        robot_params.make_robot_env(world.node("agent"), p, {}, None, "robolearn/PandaPickCube-v0")


def test_robot_env_on_a_ur_rtde_profile_resets_and_acts_through_rtde(world, tmp_path, monkeypatch):
    """profile ur5e_rtde through agent_node's robot env: no driver topics, a scripted reset, servoL toward targets
    (the controller is a fake RTDE interface that tracks perfectly: hardware that cannot exist here)."""
    from test_ur_rtde import FakeRtde

    from robolearn.hardware import ur_rtde_arm
    from robolearn.ros import robot_params
    profile = load_profile("ur5e_rtde")
    fake = FakeRtde(profile)
    monkeypatch.setattr(ur_rtde_arm, "connect", lambda *args: (fake, fake))
    task = world.node("task")
    pub = task.create_publisher(Float64MultiArray, common.OBJECT_STATE, common.RELIABLE_QOS)
    task.create_timer(0.02, lambda: pub.publish(Float64MultiArray(data=[-0.5, -0.1, 0.02])))
    p = {name: default for name, (default, _) in robot_params.ROBOT_PARAMS.items()}
    p.update(profile="ur5e_rtde", uses_gripper=False, workspace_low=[-0.75, -0.45, 0.05],
             workspace_high=[-0.25, 0.15, 0.6])
    with pytest.raises(ValueError, match="ur5e_rtde.yaml: a ur_rtde arm has no reset service; set the reset"):
        robot_params.make_robot_env(world.node("agent0"), p, {}, None, "ur")
    (tmp_path / "reset.yaml").write_text("reset:\n  type: scripted\n  home_pos: [-0.49, -0.13, 0.45]\n"
                                         "  xyz_range: [0.02, 0.02, 0.0]\n  duration: 0.8\n  settle: 0.1\n")
    p["reset"] = str(tmp_path / "reset.yaml")
    env, parts = robot_params.make_robot_env(world.node("agent"), p, {}, None, "ur")
    try:
        obs, info = env.reset(seed=0)
        assert info["reset"] == "scripted" and fake.named("servoL")
        np.testing.assert_allclose(obs["tcp_pose"][:3], [-0.49, -0.13, 0.45] + np.r_[info["offset"]], atol=2e-3)
        before = len(fake.named("servoL"))
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0]))
        assert len(fake.named("servoL")) > before
        assert obs["tcp_pose"][0] > -0.49 + info["offset"][0] + 0.005  # moved +x, limited by the reference limit
    finally:
        for part in parts:
            part.close()
