"""The agent node on real DDS (loopback, a random domain) against a fake robot speaking the sim's topics.

In-process tests share one executor (common.executor, as the node's main uses); two subprocess runs check `python -m` start-up,
episode counting and the log of a refused checkpoint. Assertions are on event order and content.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
# Real DDS and real-time nodes on a 2-core machine that CI shares with itself: a test that met a
# stalled process gets two more tries; one that fails three times is a failure.
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, Float64, Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from robolearn.launcher import random_domain  # noqa: E402
from robolearn.ros import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUCCESS = TransitionCallbackReturn.SUCCESS
POSE = (np.array([0.4, 0.0, 0.3]), np.array([0.0, 1.0, 0.0, 0.0]))  # inside the box, tool down
JOINTS = common.PANDA_JOINTS + common.PANDA_FINGER_JOINTS


def wait_for(pred, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class FakeRobot(Node):
    """The sim_robot_node's topics and QoS at 100 Hz with a fixed pose; records what the agent sends."""

    def __init__(self, context):
        super().__init__("fake_robot", context=context)
        self.joints_on, self.success_after = True, None
        self.commands, self.grippers, self.diags, self.resets, self._since_reset = [], [], [], 0, 0
        self.joint_pub = self.create_publisher(JointState, common.JOINT_STATES, common.RELIABLE_QOS)
        self.pose_pub = self.create_publisher(PoseStamped, common.TOOL_POSE, common.SENSOR_QOS)
        self.twist_pub = self.create_publisher(TwistStamped, common.TOOL_TWIST, common.SENSOR_QOS)
        self.object_pub = self.create_publisher(Float64MultiArray, common.OBJECT_STATE, common.RELIABLE_QOS)
        self.reward_pub = self.create_publisher(Float64, common.REWARD, common.RELIABLE_QOS)
        self.success_pub = self.create_publisher(Bool, common.SUCCESS, common.RELIABLE_QOS)
        self.estop_pub = self.create_publisher(Bool, common.ESTOP, common.RELIABLE_QOS)
        self.create_subscription(PoseStamped, common.EQUILIBRIUM_POSE, self._on_command, common.RELIABLE_QOS)
        self.create_subscription(Float64MultiArray, common.GRIPPER_COMMANDS, lambda m: self.grippers.append(m.data[0]),
                                 common.RELIABLE_QOS)
        self.create_subscription(DiagnosticArray, common.DIAGNOSTICS, lambda m: self.diags.extend(m.status), 50)
        self.create_service(Trigger, common.RESET_SERVICE, self._on_reset)
        self.create_timer(0.01, self._publish)

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def joint_state(self, names=JOINTS, position=None, velocity=None) -> JointState:
        position = np.zeros(len(names)) if position is None else position
        return common.joint_state_msg(names, position, np.zeros(len(position)) if velocity is None else velocity,
                                      self.now())

    def _publish(self) -> None:
        t = self.now()
        if self.joints_on:
            self.joint_pub.publish(self.joint_state())
        self.pose_pub.publish(common.pose_msg(*POSE, t, common.BASE_FRAME))
        self.twist_pub.publish(common.twist_msg(np.zeros(3), np.zeros(3), t, common.BASE_FRAME))
        self.object_pub.publish(Float64MultiArray(data=[0.45, 0.0, 0.02]))
        self.reward_pub.publish(Float64(data=0.25))
        done = self.success_after is not None and self._since_reset >= self.success_after
        self.success_pub.publish(Bool(data=done))

    def _on_command(self, msg: PoseStamped) -> None:
        self._since_reset += 1
        self.commands.append(np.concatenate(common.pose_arrays(msg)))

    def _on_reset(self, request, response):
        self.resets, self._since_reset = self.resets + 1, 0
        response.success = True
        return response

    # -- what the tests look at --
    def is_hold(self, command) -> bool:
        return bool(np.allclose(command, np.concatenate(POSE), atol=1e-12))

    def policy_commands(self, start: int = 0) -> int:
        return sum(not self.is_hold(c) for c in self.commands[start:])

    def diag_with(self, text: str, start: int = 0):
        return next((d for d in self.diags[start:] if text in d.message), None)

    def settled(self, seconds: float = 0.3) -> int:
        """Number of commands once none arrived for `seconds`."""
        n = -1
        while n != len(self.commands):
            n = len(self.commands)
            time.sleep(seconds)
        return n


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A PickCube SERL checkpoint (nothing trained), one for Reach (3-dim action) and one with action_scale 0.05."""
    from robolearn.train import TrainConfig, Trainer
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for name, env in (("pick", "robolearn/PandaPickCube-v0"), ("reach", "robolearn/PandaReach-v0")):
        trainer = Trainer(TrainConfig(agent="serl", env=env, frames=1, out=str(root / name), replay_capacity=100,
                                      save_replay=False, video=False))
        out[name] = str(trainer.save())
        trainer.close()
    out["scale"] = str(shutil.copytree(out["pick"], root / "scale"))
    config = json.loads((root / "scale" / "config.json").read_text())
    config["train_config"]["env_kwargs"] = {"action_scale": 0.05}
    (root / "scale" / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def ros():
    domain = random_domain()
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    executor = common.executor(threads=4, context=context)
    fake = FakeRobot(context)
    executor.add_node(fake)
    stop = threading.Event()
    thread = threading.Thread(target=common.spin, args=(executor, stop, fake.get_logger()), daemon=True)
    thread.start()
    yield context, executor, fake, domain
    stop.set()
    thread.join(timeout=5)
    executor.shutdown()
    fake.destroy_node()
    rclpy.shutdown(context=context)


@pytest.fixture
def make_agent(ros):
    from robolearn.ros.agent_node import AgentNode
    context, executor, _, _ = ros
    nodes = []

    def make(checkpoint: str, **params) -> AgentNode:
        params = {"checkpoint": checkpoint, "control_hz": 20.0, "autostart": False, **params}
        node = AgentNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        executor.add_node(node)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node._state_machine.current_state[1] != "finalized":
            node.trigger_shutdown()
        executor.remove_node(node)
        node.destroy_node()


def active_agent(make_agent, fake, checkpoint, **params):
    node = make_agent(checkpoint, **params)
    assert node.trigger_configure() == SUCCESS, node.error
    assert node.trigger_activate() == SUCCESS
    start = len(fake.commands)
    wait_for(lambda: fake.policy_commands(start) >= 3, what="policy commands")
    return node


def test_lifecycle_commands_only_when_active_and_deactivate_holds(ros, checkpoints, make_agent):
    fake = ros[2]
    node = make_agent(checkpoints["pick"])
    assert node.trigger_configure() == SUCCESS, node.error
    assert node._state_machine.current_state[1] == "inactive" and node.env is not None
    assert fake.settled() == len(fake.commands) and node.steps == 0  # configured, not commanding
    resets, start = fake.resets, len(fake.commands)
    assert node.trigger_activate() == SUCCESS
    assert node._state_machine.current_state[1] == "active"
    wait_for(lambda: fake.policy_commands(start) >= 5, what="policy commands")
    assert fake.resets > resets  # the episode began with the reset service (retried if the state was stale)
    assert fake.grippers and all(0.0 <= g <= common.GRIPPER_MAX_OPENING for g in fake.grippers)
    assert node.trigger_deactivate() == SUCCESS
    n = fake.settled()
    assert fake.is_hold(fake.commands[n - 1]), "deactivate must end with the measured pose"
    assert node._state_machine.current_state[1] == "inactive"
    assert node.trigger_cleanup() == SUCCESS
    assert node._state_machine.current_state[1] == "unconfigured" and node.env is None and node.agent is None
    assert len(fake.commands) == n


def test_checkpoint_that_does_not_fit_is_refused_at_configure(ros, checkpoints, make_agent):
    fake = ros[2]
    start = len(fake.diags)
    node = make_agent(checkpoints["reach"], uses_gripper=True)  # a robot with a gripper: the 3-D policy does not fit
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node._state_machine.current_state[1] == "unconfigured"
    assert "action_shape: checkpoint [3], robot [4]" in node.error
    wait_for(lambda: fake.diag_with("action_shape", start), what="diagnostics naming action_shape")
    node = make_agent(checkpoints["scale"])
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "action_scale: checkpoint 0.05, node parameter 0.1" in node.error
    assert node.trigger_shutdown() == SUCCESS


def test_watchdog_holds_when_joint_states_stop(ros, checkpoints, make_agent):
    fake = ros[2]
    node = active_agent(make_agent, fake, checkpoints["pick"])
    start = len(fake.diags)
    fake.joints_on = False
    try:
        wait_for(lambda: fake.diag_with("stale", start), what="stale diagnostics")
        n = fake.settled()
        assert fake.is_hold(fake.commands[n - 1]) and node._held == "stale"
        assert "joint_states" in fake.diag_with("stale", start).message
        assert node.stale >= 1
    finally:
        fake.joints_on = True
    wait_for(lambda: fake.policy_commands(n) >= 2, what="commands after joint_states came back")


def test_estop_latches_until_reset_estop(ros, checkpoints, make_agent):
    context, executor, fake, _ = ros
    node = active_agent(make_agent, fake, checkpoints["pick"])
    fake.estop_pub.publish(Bool(data=True))
    wait_for(lambda: node._estop, what="e-stop latched")
    n = fake.settled()
    assert fake.is_hold(fake.commands[n - 1])
    fake.estop_pub.publish(Bool(data=False))  # does not unlatch
    assert fake.settled(0.5) == n and node._estop
    assert any(d.level == d.ERROR and "e-stop" in d.message for d in fake.diags)
    client = fake.create_client(Trigger, "/agent/reset_estop")
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(Trigger.Request())
    wait_for(future.done, what="reset_estop answer")
    assert future.result().success and not node._estop
    wait_for(lambda: fake.policy_commands(n) >= 2, what="commands after reset_estop")
    fake.destroy_client(client)


def test_bad_joint_states_are_rejected_and_named(ros, checkpoints, make_agent):
    fake = ros[2]
    node = make_agent(checkpoints["pick"])
    assert node.trigger_configure() == SUCCESS, node.error
    arm, start = node.env.arm, len(fake.diags)
    renamed = tuple("elbow" if n == "panda_joint4" else n for n in JOINTS)
    nan = np.zeros(len(JOINTS))
    nan[2] = math.nan
    cases = [(fake.joint_state(renamed), "lacks joints ['panda_joint4']"),
             (fake.joint_state(position=np.zeros(8)), "has 9 names but 8 positions"),
             (fake.joint_state(position=nan), "JointState.position is not finite")]
    for i, (msg, text) in enumerate(cases):
        fake.joint_pub.publish(msg)
        wait_for(lambda i=i: arm.rejected == i + 1, what=text)
        assert text in arm.last_error and "joint_states" in arm.last_error
    node._diagnostics()
    wait_for(lambda: fake.diag_with("rejected 3 messages", start), what="diagnostics with the count")
    assert "not finite" in fake.diag_with("rejected 3 messages", start).message
    assert arm.read().position.shape == (7,)  # the good stream still serves


def test_nan_action_is_rejected_with_its_index(ros, checkpoints, make_agent):
    fake = ros[2]
    node = active_agent(make_agent, fake, checkpoints["pick"])
    start = len(fake.diags)
    node.agent.act = lambda obs, explore: np.array([0.1, math.nan, 0.0, 0.0], dtype=np.float32)
    wait_for(lambda: node._held == "action", what="action rejected")
    n = fake.settled()
    assert fake.is_hold(fake.commands[n - 1]) and node.bad_actions >= 1  # one per tick
    wait_for(lambda: fake.diag_with("index [1]", start), what="diagnostics naming the index")
    assert fake.diag_with("index [1]", start).level == fake.diags[0].ERROR


def test_late_policy_misses_its_deadline_and_holds(ros, checkpoints, make_agent):
    fake = ros[2]
    node = active_agent(make_agent, fake, checkpoints["pick"])

    def slow(obs, explore):
        time.sleep(1.5 * node.period)
        return np.zeros(4, dtype=np.float32)

    start, diags = len(fake.commands), len(fake.diags)
    node.agent.act = slow
    wait_for(lambda: node.missed_deadlines >= 2, what="missed deadlines")
    wait_for(lambda: fake.diag_with("deadline", diags), what="diagnostics naming the deadline")
    n = fake.settled()
    holds = [i for i in range(start, n) if fake.is_hold(fake.commands[i])]
    assert holds and fake.policy_commands(holds[0]) == 0  # no late action was sent after the hold


def test_camera_frames_of_another_size_are_fitted_and_a_crop_that_does_not_fit_is_refused(ros):
    from sensor_msgs.msg import Image
    from robolearn.hardware.cameras import fit_frame
    from robolearn.ros.ros_backend import RosCamera
    context, executor, fake, _ = ros
    node = rclpy.create_node("camera_test", context=context)
    executor.add_node(node)
    try:
        cam = RosCamera(node, "front", (4, 6, 3), max_age=5.0)
        boxed = RosCamera(node, "side", (4, 6, 3), max_age=5.0, topic="front/image_raw", crop=(0, 0, 8, 12))
        pub = node.create_publisher(Image, "front/image_raw", common.SENSOR_QOS)
        frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
        wait_for(lambda: pub.get_subscription_count() > 1, what="camera subscriptions")
        bgr = common.image_msg(frame[..., ::-1], fake.now(), "front")
        bgr.encoding = "bgr8"
        wait_for(lambda: pub.publish(bgr) or cam._newest, what="a frame")
        assert np.array_equal(cam.read()[0], frame)  # bgr8 arrives as RGB, already the policy's size
        wait_for(lambda: boxed.rejected, what="a refused frame")  # a 4x6 frame has no 8x12 box
        assert "does not fit a 4x6 frame (camera 'side')" in boxed.last_error
        assert "front/image_raw" in boxed.last_error
        big = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
        fitted = fit_frame(big, (4, 6))  # the centre 8x12, halved, as every camera does
        wait_for(lambda: pub.publish(common.image_msg(big, fake.now(), "front")) or (
            boxed._newest and np.array_equal(cam.read()[0], fitted)), what="the big frame, fitted")
        assert np.array_equal(boxed.read()[0], fit_frame(big[:8], (4, 6), "none"))
        boxed.close()
    finally:
        executor.remove_node(node)
        node.destroy_node()


def run_node(domain: int, *params: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**common.isolated_env(), "ROS_DOMAIN_ID": str(domain)}
    args = [sys.executable, "-m", "robolearn.ros.agent_node", "--ros-args"]
    for p in params:
        args += ["-p", p]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_python_m_runs_episodes_then_exits(ros, checkpoints):
    fake, domain = ros[2], ros[3]
    resets, fake.success_after = fake.resets, 3
    try:
        proc = run_node(domain, f"checkpoint:={checkpoints['pick']}", "episodes:=2", "control_hz:=20.0",
                        "max_episode_steps:=10")
    finally:
        fake.success_after = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "deploy: 2 episodes, success 2/2 (100%)"
    steps, ret = re.search(r"episode 1: success after (\d+) steps, return ([\d.]+)", proc.stderr).groups()
    assert float(ret) == pytest.approx(0.25 * int(steps))  # task/reward, summed once per step
    assert fake.resets == resets + 2


def test_python_m_refuses_a_checkpoint_that_does_not_fit(ros, checkpoints):
    proc = run_node(ros[3], f"checkpoint:={checkpoints['reach']}", "uses_gripper:=true", "startup_timeout:=20.0")
    assert proc.returncode == 1
    assert "action_shape: checkpoint [3], robot [4]" in proc.stderr


def test_python_m_against_sim_robot_node(checkpoints):
    """The real simulator behind the topics: one short episode end to end."""
    env = common.isolated_env()
    sim = subprocess.Popen([sys.executable, "-m", "robolearn.ros.sim_robot_node"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc = run_node(int(env["ROS_DOMAIN_ID"]), f"checkpoint:={checkpoints['pick']}", "episodes:=1",
                        "max_episode_steps:=5")
    finally:
        sim.send_signal(signal.SIGINT)
        sim.communicate(timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"deploy: 1 episodes, success [01]/1 \((0|100)%\)", proc.stdout.strip().splitlines()[-1])


def test_agent_node_does_not_import_mujoco():
    code = ("import sys, robolearn.ros.agent_node, robolearn.ros.ros_backend, robolearn.train, robolearn.agents.serl; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'mujoco' or m.startswith('robolearn.sim')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=common.isolated_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
