"""Reset handlers: scripted (on the MuJoCo arm), operator (Trigger over real DDS, a key in a real terminal),
learned with its scripted fallback, the YAML factory's errors, and demo-state starts in simulation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import robolearn.sim as rsim
from robolearn.controllers.rotations import orientation_error
from robolearn.controllers.safety import SafetyConfig
from robolearn.hardware.resets import (LearnedReset, OperatorReset, ScriptedReset, ScriptedResetConfig,
                                       load_reset_spec, make_reset, parse_config)
from robolearn.robot.interfaces import ArmState

PICK = "robolearn/PandaPickCube-v0"


class PointArm:
    """A minimal ArmBackend whose tool reaches each commanded target at the end of the control period."""

    joint_names = tuple(f"panda_joint{i}" for i in range(1, 8))
    control_hz = 10.0

    def __init__(self, pos=(0.3, 0.0, 0.45)):
        self.pos, self.quat = np.array(pos, dtype=float), np.array([0.0, 1.0, 0.0, 0.0])
        self.commands, self.holds = [], 0
        self._target = None

    def read(self) -> ArmState:
        return ArmState(self.joint_names, np.zeros(7), np.zeros(7), self.pos.copy(), self.quat.copy(), np.zeros(3),
                        0.0, 0.0)

    def command(self, target) -> None:
        self.commands.append(target)
        self._target = target

    def wait(self) -> None:
        if self._target is not None:
            self.pos, self.quat = np.array(self._target.pos), np.array(self._target.quat)

    def hold(self) -> None:
        self.holds += 1

    def close(self) -> None:
        pass


class JointArm(PointArm):
    """PointArm with the optional JointMover method."""

    def __init__(self):
        super().__init__()
        self.joint_moves = []

    def move_joints(self, q, duration: float) -> None:
        self.joint_moves.append((np.array(q), duration))


# -- scripted ------------------------------------------------------------------------------

def test_scripted_reset_brings_the_mujoco_tool_to_home_plus_a_bounded_offset():
    env = rsim.make("robolearn/PandaReach-v0")
    robot = env.unwrapped
    env.reset(seed=0)
    cfg = ScriptedResetConfig(home_pos=(0.45, 0.05, 0.25), xyz_range=(0.05, 0.05, 0.03), settle=1.0)
    handler = ScriptedReset(robot.arm, cfg, robot.cfg.safety)
    rng, offsets = np.random.default_rng(3), []
    for _ in range(3):
        info = handler.reset(rng)
        offset = np.array(info["offset"])
        offsets.append(offset)
        assert info["reset"] == "scripted" and info["joint_reset"] is False
        assert np.all(np.abs(offset) <= np.array(cfg.xyz_range) + 1e-12)
        state = robot.arm.read()
        assert np.linalg.norm(state.tool_pos - (np.array(cfg.home_pos) + offset)) < 0.005, (state.tool_pos, offset)
        assert np.linalg.norm(orientation_error(cfg.home_quat, state.tool_quat)) < 0.05
    assert len({tuple(o) for o in offsets}) == 3  # a new draw each episode
    env.close()


def test_offsets_stay_in_their_ranges_and_inside_the_workspace_box():
    safety = SafetyConfig()
    cfg = ScriptedResetConfig(home_pos=(0.58, 0.0, 0.05), xyz_range=(0.05, 0.05, 0.05), yaw_range=0.3)
    handler = ScriptedReset(PointArm(), cfg, safety)
    rng = np.random.default_rng(0)
    draws = [handler.draw(rng) for _ in range(500)]
    goals = np.array([np.add(cfg.home_pos, o) for o, _ in draws])
    low, high = np.add(safety.workspace_low, cfg.box_inset), np.subtract(safety.workspace_high, cfg.box_inset)
    assert np.all(goals >= low - 1e-12) and np.all(goals <= high + 1e-12)
    assert goals[:, 0].max() == pytest.approx(high[0]) and goals[:, 0].min() < 0.55  # clipped at the wall only
    assert all(abs(yaw) <= 0.3 for _, yaw in draws) and np.std([y for _, y in draws]) > 0.1


def test_every_command_respects_the_step_limit_and_the_path_ends_on_the_goal():
    arm = PointArm(pos=(0.25, -0.25, 0.45))
    safety = SafetyConfig(max_translation_step=0.02)
    info = ScriptedReset(arm, ScriptedResetConfig(duration=0.3, settle=0.0), safety).reset(np.random.default_rng(1))
    path = np.array([(0.25, -0.25, 0.45)] + [c.pos for c in arm.commands])
    assert np.max(np.linalg.norm(np.diff(path, axis=0), axis=1)) <= 0.02 + 1e-9
    assert np.allclose(arm.pos, np.add((0.4, 0.0, 0.3), info["offset"]))


def test_full_joint_reset_every_n_episodes():
    arm = JointArm()
    cfg = ScriptedResetConfig(joint_reset_every=3, duration=0.1, settle=0.0, joint_reset_duration=2.5)
    handler = ScriptedReset(arm, cfg)
    flags = [handler.reset(np.random.default_rng(i))["joint_reset"] for i in range(7)]
    assert flags == [False, False, True, False, False, True, False]
    assert len(arm.joint_moves) == 2
    assert np.allclose(arm.joint_moves[0][0], cfg.home_joints) and arm.joint_moves[0][1] == 2.5


def test_joint_reset_on_an_arm_without_move_joints_is_refused_at_construction():
    with pytest.raises(ValueError) as err:
        make_reset({"type": "scripted", "joint_reset_every": 200}, PointArm())
    msg = str(err.value)
    assert "\n" not in msg and "PointArm" in msg and "reset.joint_reset_every" in msg and "move_joints" in msg
    make_reset({"type": "scripted", "joint_reset_every": 0}, PointArm())  # 0: never, any arm


# -- config errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ({"type": "scriptd"}, ["reset.type", "scripted", "'scriptd'"]),
    ({"type": ["scripted"]}, ["reset.type must be one of"]),
    ({"type": "scripted", "xyz_rnage": [0, 0, 0]}, ["unknown field", "xyz_rnage", "xyz_range"]),
    ({"type": "scripted", "xyz_range": [0.1, -0.1, 0.0]}, ["reset.xyz_range", "non-negative"]),
    ({"type": "scripted", "xyz_range": [0.1, 0.1]}, ["reset.xyz_range", "list of 3"]),
    ({"type": "scripted", "duration": "fast"}, ["reset.duration", "number"]),
    ({"type": "scripted", "home_pos": [0.9, 0.0, 0.3]}, ["reset.home_pos", "outside the workspace box"]),
    ({"type": "operator", "confirm": "voice"}, ["reset.confirm", "'key' or 'trigger'"]),
    ({"type": "operator", "timeout": 0}, ["reset.timeout", "positive"]),
    ({"type": "operator", "inner": {"type": "scripted", "settle": -1}}, ["reset.inner.settle"]),
    ({"type": "operator", "confirm": "trigger"}, ["reset.confirm", "TriggerConfirm"]),
    ({"type": "learned", "max_steps": 0}, ["reset.max_steps", "positive"]),
    ({"type": "learned"}, ["learned reset needs", "policy="]),
    ({"type": "demo_state", "demos": "d", "prob": 1.5}, ["reset.prob", "[0, 1]"]),
    ({"type": "demo_state", "demos": "d"}, ["demo_state", "simulation"]),
    ("scripted", ["reset must be a mapping"]),
])
def test_bad_reset_config_is_one_line_naming_the_field(spec, words):
    with pytest.raises(ValueError) as err:
        make_reset(spec, PointArm(), safety=SafetyConfig())
    msg = str(err.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg


def test_yaml_reset_errors_name_the_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("reset:\n  type: scripted\n  joint_reset_every: -2\n")
    spec, where = load_reset_spec(path)
    with pytest.raises(ValueError, match=rf"^{path}: reset\.joint_reset_every must be zero"):
        make_reset(spec, PointArm(), where=where)
    path.write_text("task: pick\n")
    with pytest.raises(ValueError, match=rf"^{path}: no 'reset' mapping"):
        load_reset_spec(path)
    path.write_text("reset:\n  type: operator\n  inner: {type: scripted, xyz_range: [0.02, 0.02, 0]}\n  timeout: 5\n")
    cfg = parse_config(*load_reset_spec(path))
    assert cfg.timeout == 5.0 and cfg.inner["xyz_range"] == [0.02, 0.02, 0]


# -- operator ------------------------------------------------------------------------------

def test_operator_reset_runs_the_inner_reset_then_times_out_naming_the_source():
    def never(timeout):
        return False
    never.name = "the test's pedal"
    arm = PointArm()
    inner = ScriptedReset(arm, ScriptedResetConfig(duration=0.1, settle=0.0))
    with pytest.raises(TimeoutError, match=r"^operator reset: no confirmation from the test's pedal within 0.2 s$"):
        OperatorReset(never, inner, timeout=0.2, arm=arm).reset(np.random.default_rng(0))
    assert arm.commands and arm.holds == 1  # the inner reset moved the arm first, then it held
    info = OperatorReset(lambda t: True, inner).reset(np.random.default_rng(0))
    assert info["reset"] == "operator" and info["inner"] == "scripted" and len(info["offset"]) == 3


@pytest.fixture
def ros_node():
    import rclpy
    from rclpy.context import Context

    from robolearn.ros import common

    context = Context()
    rclpy.init(context=context, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    host = rclpy.create_node("reset_host", context=context)
    client_node = rclpy.create_node("operator", context=context)
    executor = common.executor(context=context)
    executor.add_node(host)
    stop = threading.Event()
    thread = threading.Thread(target=common.spin, args=(executor, stop, host.get_logger()), daemon=True)
    thread.start()
    yield host, client_node
    stop.set()
    thread.join(timeout=5)
    executor.shutdown()
    host.destroy_node()
    client_node.destroy_node()
    rclpy.shutdown(context=context)


def _call(client_node, client, timeout=10.0):
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    executor = SingleThreadedExecutor(context=client_node.context)
    executor.add_node(client_node)
    try:
        future = client.call_async(Trigger.Request())
        executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), "no answer from reset/confirm"
        return future.result()
    finally:
        executor.remove_node(client_node)


def test_trigger_service_confirms_an_operator_reset_over_dds(ros_node):
    from std_srvs.srv import Trigger

    from robolearn.ros.operator_reset import TriggerConfirm

    host, client_node = ros_node
    confirm = TriggerConfirm(host)
    client = client_node.create_client(Trigger, "reset/confirm")
    assert client.wait_for_service(timeout_sec=10.0)
    early = _call(client_node, client)  # nobody waits: refused, and it does not confirm the next reset
    assert not early.success and "no reset is waiting" in early.message

    handler = make_reset({"type": "operator", "confirm": "trigger", "timeout": 20.0}, confirm=confirm)
    result = {}
    worker = threading.Thread(target=lambda: result.update(info=handler.reset(np.random.default_rng(0))))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()  # still waiting for the operator
    answer = _call(client_node, client)
    worker.join(timeout=10.0)
    assert answer.success and not worker.is_alive() and result["info"]["reset"] == "operator"

    with pytest.raises(TimeoutError, match=r"no confirmation from service /reset/confirm \(std_srvs/Trigger\) "
                                           r"within 0.3 s"):
        OperatorReset(confirm, timeout=0.3).reset(np.random.default_rng(0))
    confirm.close()


KEY_SCRIPT = """
import numpy as np
from robolearn.hardware.resets import KeyConfirm, OperatorReset
try:
    OperatorReset(KeyConfirm(prompt="PROMPT1"), timeout=0.5).reset(np.random.default_rng(0))
except TimeoutError as err:
    print("TIMEOUT", err)
info = OperatorReset(KeyConfirm(prompt="PROMPT2"), timeout=20).reset(np.random.default_rng(0))
print("CONFIRMED", info["reset"])
"""


def test_a_key_in_a_real_terminal_confirms_and_silence_times_out(tmp_path, tmux):
    script = tmp_path / "key.py"
    script.write_text(KEY_SCRIPT)
    tmux.start(f"{sys.executable} {script}; echo EXIT=$?; sleep 30")
    screen = tmux.wait_for("TIMEOUT")
    assert "no confirmation from key on /dev/pts/" in screen and "within 0.5 s" in screen
    tmux.wait_for("PROMPT2")
    tmux.send("Enter")
    screen = tmux.wait_for("EXIT=")
    assert "CONFIRMED operator" in screen and "EXIT=0" in screen, screen


def test_key_confirmation_without_a_terminal_is_one_line():
    r, w = os.pipe()
    try:
        from robolearn.hardware.resets import KeyConfirm
        with pytest.raises(ValueError, match="stdin is not a terminal"):
            KeyConfirm(fd=r)
    finally:
        os.close(r)
        os.close(w)


# -- learned ---------------------------------------------------------------------------------

def test_learned_reset_runs_the_backward_policy_and_falls_back_when_it_fails():
    env = rsim.make("robolearn/PandaReach-v0")
    robot = env.unwrapped
    env.reset(seed=1)
    goal = np.array([0.45, -0.1, 0.2])

    def backward(obs):  # stands in for the backward agent: heads for the start region
        return np.clip((goal - obs["state"][:3]) / robot.cfg.action_scale, -1, 1).astype(np.float32)

    def home(obs):
        return bool(np.linalg.norm(obs["state"][:3] - goal) < 0.01)

    spec = {"type": "learned", "max_steps": 40, "fallback": {"type": "scripted", "xyz_range": [0.02, 0.02, 0.0]}}
    handler = make_reset(spec, env=robot, policy=backward, success=home, safety=robot.cfg.safety)
    info = handler.reset(np.random.default_rng(0))
    assert info["backward_success"] and 0 < info["steps"] < 40 and "fallback" not in info
    assert isinstance(handler, LearnedReset)

    env.reset(seed=2)  # away from the goal again
    handler.policy = lambda obs: np.zeros(3, np.float32)  # a backward policy that does nothing
    info = handler.reset(np.random.default_rng(0))
    assert not info["backward_success"] and info["steps"] == 40 and info["fallback"]["reset"] == "scripted"
    target = np.add((0.4, 0.0, 0.3), info["fallback"]["offset"])
    assert np.linalg.norm(robot.arm.read().tool_pos - target) < 0.01
    env.close()


# -- demo-state (simulation) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pick_demos(tmp_path_factory):
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.rollout import run_episodes, scripted_policy

    path = tmp_path_factory.mktemp("resets") / "demos"
    env = rsim.make(PICK, terminate_on_success=False, max_episode_steps=50)
    with DatasetWriter(path, PICK, env.observation_space, env.action_space, fps=10) as writer:
        run_episodes(env, scripted_policy(env), 3, seed=7, recorder=writer)
    env.close()
    return path


def test_the_simulator_replays_a_demo_bit_for_bit(pick_demos):
    from robolearn.demos.dataset import Dataset

    ds = Dataset(pick_demos)
    ep, seed = ds.episode(1), ds.episode_attrs(1)["seed"]
    env = rsim.make(PICK, terminate_on_success=False, max_episode_steps=50)
    for _ in range(2):  # twice, after other work in between: the same seed and actions, the same physics
        obs, _ = env.reset(seed=seed)
        states = [obs["state"]]
        for action in ep["action"]:
            states.append(env.step(action)[0]["state"])
        assert np.array_equal(np.array(states), ep["obs"]["state"])
        env.reset(seed=seed + 100)
    env.close()


def test_an_episode_started_from_demo_step_k_has_the_demo_state_at_k(pick_demos):
    from robolearn.demos.dataset import Dataset

    ds = Dataset(pick_demos)
    env = rsim.make(PICK, terminate_on_success=False, max_episode_steps=50, reset_from_demos=str(pick_demos),
                    demo_state_prob=1.0)
    handler = env.unwrapped.resetter
    seen = set()
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        i, k = info["demo_episode"], info["demo_step"]
        seen.add((i, k))
        ep = ds.episode(i)
        assert info["reset"] == "demo_state" and 0 <= k < len(ep["action"])
        # Joint positions exactly; the observation to 1 mm: a step's observation is computed before its last
        # 2 ms physics substep, the restored one at the restored positions.
        assert np.array_equal(env.unwrapped.state.position, ep["robot"]["joint_position"][k])
        assert np.allclose(obs["state"], ep["obs"]["state"][k], atol=2e-3)
        assert np.allclose(obs["state"][7:], ep["obs"]["state"][k][7:], atol=1e-3)  # the cube where the demo had it
        env.step(env.action_space.sample())  # and it steps on from there
    assert len(seen) >= 10 and {i for i, _ in seen} == {0, 1, 2}
    lifted = max(range(len(handler.states[0]) - 1),
                 key=lambda k: ds.episode(0)["obs"]["state"][k][9])  # a state with the cube in the gripper
    handler.restore(0, lifted)
    env.unwrapped.elapsed_steps = 0
    obs, reward, *_ , info = env.step(np.array([0, 0, 0, 1], np.float32))
    assert info["success"]  # the demo's lifted cube is still held
    env.close()


def test_demo_state_prob_mixes_demo_starts_with_random_ones(pick_demos):
    env = rsim.make(PICK, reset_from_demos=str(pick_demos), demo_state_prob=0.5, terminate_on_success=False,
                    max_episode_steps=50)
    kinds = [env.reset(seed=s)[1].get("reset") for s in range(40)]
    assert 8 <= kinds.count("demo_state") <= 32 and kinds.count(None) == 40 - kinds.count("demo_state")
    spec = {"type": "demo_state", "demos": str(pick_demos), "prob": 0.0}
    make_reset(spec, env=env)
    assert all(env.reset(seed=s)[1].get("reset") is None for s in range(5))
    env.close()


def test_demo_state_errors_are_one_line(pick_demos, tmp_path):
    cases = [({"demo_state_prob": 1.5}, "demo_state_prob"),
             ({"reset_from_demos": str(tmp_path / "nope")}, "is not a dataset directory"),
             ({"reset_from_demos": str(tmp_path)}, "not a robolearn dataset")]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            rsim.make(PICK, **{"reset_from_demos": str(pick_demos), **kwargs})
        assert "\n" not in str(err.value) and words in str(err.value), err.value
    with pytest.raises(ValueError, match=r"holds robolearn/PandaPickCube-v0 demonstrations, not robolearn/PandaReach"):
        rsim.make("robolearn/PandaReach-v0", reset_from_demos=str(pick_demos))
    # Recorded with another physics step: no replay matches, each skipped with a warning naming it.
    with pytest.warns(UserWarning, match=r"skipping .*episode_00000[0-2].h5: its replay drifts"):
        with pytest.raises(ValueError, match="none of the 3 episodes"):
            rsim.make(PICK, terminate_on_success=False, max_episode_steps=50, physics_dt=0.001,
                      reset_from_demos=str(pick_demos))


def test_reset_modules_keep_their_imports():
    """hardware/resets.py: numpy only (no rclpy, no MuJoCo, no torch), so a robot PC runs it bare."""
    code = ("import sys, robolearn.hardware.resets; "
            "print(sorted(m for m in ('rclpy', 'mujoco', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert Path(__file__).parent.parent.joinpath("hardware", "resets.py").exists()


def test_a_pixel_env_starts_from_the_states_of_state_demos(pick_demos):
    from robolearn.demos.dataset import Dataset

    env = rsim.make("robolearn/PandaPickCubePixels-v0", terminate_on_success=False, max_episode_steps=50,
                    reset_from_demos=str(pick_demos), demo_state_prob=1.0, image_size=32, cameras=["front"])
    obs, info = env.reset(seed=4)
    ep = Dataset(pick_demos).episode(info["demo_episode"])
    assert np.array_equal(env.unwrapped.state.position, ep["robot"]["joint_position"][info["demo_step"]])
    assert obs["images/front"].shape == (32, 32, 3) and obs["state"].shape == (7,)
    env.close()


def test_robolearn_train_evaluates_from_the_envs_own_resets(tmp_path, pick_demos):
    """--env-set reset_from_demos shapes the training env only: the eval env starts as a user's robot would."""
    from robolearn.train import TRAIN_ONLY_ENV_OPTIONS, TrainConfig, Trainer

    demos = pick_demos
    cfg = TrainConfig(agent="serl", env=PICK, out=str(tmp_path / "run"), frames=10, video=False, save_replay=False,
                      env_kwargs={"reset_from_demos": str(demos), "demo_state_prob": 1.0})
    trainer = Trainer(cfg)
    try:
        assert set(TRAIN_ONLY_ENV_OPTIONS) == {"reset_from_demos", "demo_state_prob"}
        assert trainer.env.unwrapped.cfg.reset_from_demos == str(demos)
        assert trainer.eval_env.unwrapped.cfg.reset_from_demos is None
    finally:
        trainer.close()
