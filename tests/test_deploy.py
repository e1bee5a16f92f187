"""Acceptance: the same policy and seeds give the same observations, actions and success through
launch/deploy.launch.xml (sim_robot_node + agent_node on loopback DDS) as in the direct env.

The policy is a real SERL checkpoint whose actor was fitted by regression to the scripted reach
expert (seconds of CPU), saved as Trainer saves one. The launch run publishes every step on
/agent/steps (publish_steps:=true); an in-process subscriber records them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
# Real DDS and real-time nodes on a 2-core machine that CI shares with itself: a test that met a
# stalled process gets two more tries; one that fails three times is a failure.
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import Float64MultiArray

from robolearn.ros import common
from robolearn.ros.agent_node import STEPS_QOS

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "robolearn/PandaReach-v0"
ENV_KWARGS = {"terminate_on_success": True, "max_episode_steps": 30}
EPISODES, SEED = 20, 100
# Tolerances, measured on 2 shared CPU cores (3 runs) and set with a margin. obs["state"] is tool position
# (3, m), tool velocity (3, m/s), gripper (1), reach target (3). The first observation of an episode is
# the reset state before any command, but sim_robot_node keeps stepping physics in real time while the
# agent waits for fresh state after the reset service and for its next tick, so the arm has settled a
# little (up to ~0.1-0.2 s of physics) by the time agent_node reads it: measured max |diff| 1.3e-3 m in
# position, 1.3e-2 m/s in velocity; gripper 5e-7 and target 0 (exact).
FIRST_OBS_ATOL = {"position": 5e-3, "velocity": 0.05, "gripper and target": 1e-3}
FIRST_OBS_SLICES = {"position": slice(0, 3), "velocity": slice(3, 6), "gripper and target": slice(6, None)}
# Within episode 0 the ROS loop is real time: a state read up to a control period late (and physics in
# 20 ms chunks, publish_rate_hz 50) feeds back through the policy. Measured max over episode 0:
# |obs diff| 0.017-0.032 (tool velocity), |action diff| 0.034-0.063; same episode length (20 steps).
STEP_OBS_ATOL = 0.1
STEP_ACTION_ATOL = 0.3
STEP_LENGTH_DIFF = 5  # episode 0's length through ROS within this many steps of the direct env's
SUCCESS_POINTS = 0.10  # success rates within 10 points over 20 episodes


def _fit_expert_checkpoint(out: Path) -> Path:
    """A SERL agent whose deterministic action regresses the scripted reach expert; saved as Trainer does."""
    import torch
    from robolearn.sim import make

    from robolearn.agents.base import obs_to_torch
    from robolearn.checkpoint import save_checkpoint
    from robolearn.train import TrainConfig, build_agent

    env = make(ENV_ID, **ENV_KWARGS)
    agent, _ = build_agent("serl", env, {}, 0)
    expert = env.unwrapped.task.expert(env.unwrapped)
    rng = np.random.default_rng(0)
    obs_list, actions = [], []
    for ep in range(60):  # expert and noisy-expert rollouts (seeds far from the test's), expert labels
        obs, _ = env.reset(seed=10_000 + ep)
        noise = 0.0 if ep % 3 == 0 else 0.5
        for _ in range(ENV_KWARGS["max_episode_steps"]):
            a = expert(obs)
            obs_list.append({k: np.array(v) for k, v in obs.items()})
            actions.append(a)
            obs, _, term, trunc, _ = env.step(np.clip(a + noise * rng.normal(size=a.shape), -1, 1).astype(np.float32))
            if term or trunc:
                break
    env.close()
    batch = obs_to_torch({k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}, agent.device)
    target = torch.as_tensor(np.clip(np.array(actions), -0.97, 0.97), device=agent.device)
    opt = torch.optim.Adam([*agent.actor.parameters(), *agent.encoder.parameters()], lr=1e-3)
    for _ in range(600):  # what agent.act(obs, explore=False) returns: tanh of the actor's mean
        loss = ((torch.tanh(agent.actor(agent.encoder(batch))[0]) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = TrainConfig(agent="serl", env=ENV_ID, env_kwargs=dict(ENV_KWARGS), out=str(out), video=False)
    config = {"agent": "serl", "env_id": ENV_ID,
              "observation_space": {k: list(v.shape) for k, v in env.observation_space.spaces.items()},
              "action_shape": list(env.action_space.shape),
              "agent_config": agent.config_dict(), "train_config": asdict(cfg)}
    state = {"step": 1, "episode": 60, "rng": np.random.default_rng(0).bit_generator.state, "history": []}
    return save_checkpoint(out / "checkpoints", 1, agent.state_dict(), config, state)


def _direct_rollouts(checkpoint: Path) -> list[dict]:
    """Episodes k = 0..EPISODES-1 in the direct env from seed SEED + k: observations, actions, success."""
    import torch
    from robolearn.sim import make

    from robolearn.train import load_agent

    env = make(ENV_ID, **ENV_KWARGS)
    agent, _ = load_agent(checkpoint, env)
    out = []
    for k in range(EPISODES):
        obs, _ = env.reset(seed=SEED + k)
        states, acts, success = [], [], False
        while True:
            with torch.inference_mode():
                action = agent.act(obs, explore=False)
            states.append(np.array(obs["state"], dtype=float))
            acts.append(np.array(action, dtype=float))
            obs, _, term, trunc, info = env.step(action)
            if term or trunc:
                success = bool(info.get("success", False))
                break
        out.append({"states": np.array(states), "actions": np.array(acts), "success": success})
    env.close()
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):  # one_thread: the fit's small batches on a shared machine
    return _fit_expert_checkpoint(tmp_path_factory.mktemp("reach_expert"))


@pytest.fixture(scope="module")
def direct(checkpoint):
    return _direct_rollouts(checkpoint)


@pytest.fixture(scope="module")
def launched(checkpoint):
    """Run the launch file for EPISODES episodes; (returncode, output, {episode: steps}, {episode: success})."""
    env = common.isolated_env()
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY", "ROS_DOMAIN_ID")}
    os.environ.update({k: env[k] for k in saved})  # this process's subscriber joins the same loopback domain
    context = Context()
    rclpy.init(context=context, domain_id=int(env["ROS_DOMAIN_ID"]))
    steps, ends, lock = {}, {}, threading.Lock()

    def on_step(msg: Float64MultiArray) -> None:
        d = list(msg.data)
        with lock:
            if d[1] < 0:
                ends[int(d[0])] = bool(d[2])
            else:
                steps.setdefault(int(d[0]), []).append(d[1:])

    node = rclpy.create_node("deploy_test", context=context)
    node.create_subscription(Float64MultiArray, "/agent/steps", on_step, STEPS_QOS)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    args = [sys.executable, "-m", "robolearn.cli", "launch", "launch/deploy.launch.xml", f"checkpoint:={checkpoint}",
            f"env_id:={ENV_ID}", "env_overrides:=['terminate_on_success=true', 'max_episode_steps=30']",
            "terminate_on_success:=true", "max_episode_steps:=30", f"episodes:={EPISODES}", f"seed:={SEED}",
            "publish_steps:=true"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
        time.sleep(0.5)  # the last step messages are long delivered (reliable): the agent waited for acks
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        stop.set()
        spinner.join(timeout=5)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with lock:
        return proc.returncode, output, {k: np.array(v) for k, v in steps.items()}, dict(ends)


def test_expert_checkpoint_is_competent_in_the_direct_env(direct):
    assert sum(e["success"] for e in direct) >= 14, [e["success"] for e in direct]


def test_launch_runs_the_episodes_and_exits_cleanly(launched):
    code, output, _, ends = launched
    assert code == 0, output[-4000:]
    m = re.search(rf"deploy: {EPISODES} episodes, success (\d+)/{EPISODES}", output)
    assert m, output[-4000:]
    assert sorted(ends) == list(range(EPISODES)), sorted(ends)
    assert int(m.group(1)) == sum(ends.values())


def test_first_observations_match_the_direct_env(launched, direct):
    _, output, steps, _ = launched
    assert sorted(steps) == list(range(EPISODES)), output[-4000:]
    n = direct[0]["states"].shape[1]
    diffs = np.array([np.abs(steps[k][0, 1:1 + n] - direct[k]["states"][0]) for k in range(EPISODES)])
    for k in range(EPISODES):
        assert steps[k][0, 0] == 0, f"episode {k}: the first step message is step {steps[k][0, 0]}"
    print(f"first-observation max |diff| per state entry over {EPISODES} episodes: {diffs.max(0)}")
    for part, sl in FIRST_OBS_SLICES.items():
        assert diffs[:, sl].max() <= FIRST_OBS_ATOL[part], (part, diffs[:, sl].max(1))


def test_episode_zero_steps_match_the_direct_env(launched, direct):
    _, _, steps, _ = launched
    ros, ref = steps[0], direct[0]
    n = ref["states"].shape[1]
    T = min(len(ros), len(ref["states"]))
    assert T >= 2 and abs(len(ros) - len(ref["states"])) <= STEP_LENGTH_DIFF, (len(ros), len(ref["states"]))
    assert np.array_equal(ros[:T, 0], np.arange(T))
    print("episode 0 max |obs diff| per entry", np.abs(ros[:T, 1:1 + n] - ref["states"][:T]).max(0))
    print("episode 0 |action diff| per step", np.abs(ros[:T, 1 + n:] - ref["actions"][:T]).max(1))
    d_obs = np.abs(ros[:T, 1:1 + n] - ref["states"][:T]).max()
    d_act = np.abs(ros[:T, 1 + n:] - ref["actions"][:T]).max()
    print(f"episode 0: {len(ros)} ROS steps, {len(ref['states'])} direct; max |obs diff| {d_obs:.4f}, "
          f"max |action diff| {d_act:.4f}")
    assert d_obs <= STEP_OBS_ATOL and d_act <= STEP_ACTION_ATOL, (d_obs, d_act)


def test_success_rate_matches_the_direct_env(launched, direct):
    _, _, _, ends = launched
    ros_rate = sum(ends.values()) / EPISODES
    direct_rate = sum(e["success"] for e in direct) / EPISODES
    print(f"success: direct {direct_rate:.2f}, launch {ros_rate:.2f}")
    assert abs(ros_rate - direct_rate) <= SUCCESS_POINTS + 1e-9, (direct_rate, ros_rate)
