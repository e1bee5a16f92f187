"""Learning checks: the full loops learn on real tasks within a short CPU run.

The benchmarks' targets (bench/serl_pickcube.py, bench/drqv2_update.py) live in bench/; these
only prove that the training loop, replay, demos and agents together improve a policy.

DrQ-v2's run takes about 3.5 minutes on one core (8 on the slower VMs of 2026-12), so it runs as `robolearn
train` in its own process (fixture `drqv2_beside`) while SERL's run (2-5 minutes) and then diffusion BC's (half a minute)
train in this one; the DrQ-v2 test, which waits for that process, comes last. Every run is
single-threaded and seeded, so running them side by side changes their wall time, not their results.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import robolearn.sim as rsim
from robolearn.agents.serl import CPU_OVERRIDES
from robolearn.demos.dataset import DatasetWriter
from robolearn.rollout import run_episodes, scripted_policy
from robolearn.train import TrainConfig, train

PICK = "robolearn/PandaPickCube-v0"
ENV_KWARGS = {"terminate_on_success": False}  # SERL's franka_sim: dense reward, 100-step episodes

# DrQ-v2 through the same loop on a dm_control pixel task: cartpole swingup from 64x64 frames
# (3 stacked) with action repeat 8, as DrQ ran cartpole, and a network small enough for a CPU
# test. Losses, augmentation, learning rate and the noise schedule's form are DrQ-v2's.
DRQ_SMALL = dict(hidden_dim=256, conv_channels=16, conv_strides=(2, 2, 1, 1), batch_size=128,
                 num_seed_frames=4_000, update_every_steps=1, stddev_schedule="linear(1.0,0.1,3000)")
CARTPOLE = "robolearn/dmc-cartpole_swingup-v0"
CARTPOLE_KWARGS = {"image_size": 64, "action_repeat": 8}


@pytest.fixture(scope="module")
def drqv2_beside(tmp_path_factory):
    """Start DrQ-v2's learning run (`robolearn train`, one thread) in its own process; yields it and its run folder."""
    from robolearn.launcher import isolated_env  # the network rule: DDS on loopback for whatever a test starts

    out = tmp_path_factory.mktemp("drqv2") / "run"
    options = [arg for key, value in DRQ_SMALL.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    options += [arg for key, value in CARTPOLE_KWARGS.items() for arg in ("--env-set", f"{key}={value}")]
    cmd = [sys.executable, "-m", "robolearn.cli", "train", "--agent", "drqv2", "--env", CARTPOLE, "--frames", "16000",
           "--seed", "0", "--eval-every", "8000", "--eval-episodes", "5", "--checkpoint-every", "100000", "--no-video",
           "--threads", "1", "--out", str(out), *options]
    log = out.parent / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**isolated_env(), "OMP_NUM_THREADS": "1"})
    yield proc, out, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# SERL's CPU setting with DroQ's dropout critic at half the critic steps (bench/agent_variants.py's droq_utd4, as the
# launch test's learner): the same learning per env step as UTD 8 there, at half the cost.
DROQ_UTD4 = {**CPU_OVERRIDES, "utd_ratio": 4, "critic_dropout": 0.01}


@pytest.mark.timeout(900)
def test_serl_from_states_lifts_the_cube_within_a_few_thousand_steps(tmp_path, one_thread, drqv2_beside):
    # drqv2_beside: DrQ-v2's run trains on the other core meanwhile (the module docstring says why)
    demos = tmp_path / "demos"
    env = rsim.make(PICK, **ENV_KWARGS)
    with DatasetWriter(demos, PICK, env.observation_space, env.action_space, fps=10) as writer:
        assert run_episodes(env, scripted_policy(env), 20, seed=10_000, recorder=writer).success_rate >= 0.8
    env.close()
    cfg = TrainConfig(agent="serl", env=PICK, out=str(tmp_path / "run"), frames=4_000, seed=2, demos=str(demos),
                      eval_every=500, eval_episodes=10, target_success=0.2, checkpoint_every=100_000,
                      save_replay=False, video=False, env_kwargs=ENV_KWARGS, agent_overrides=dict(DROQ_UTD4))
    result = train(cfg)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    successes = [success for _steps, _ret, success, _s in history["eval"]]
    # The greedy policy lifts the cube and still holds it up at the last step in at least 2 of the 10 fixed
    # evaluation episodes, at an in-loop evaluation that stopped the run within its 4k frames. Measured on the
    # AMD EPYC VMs of 2026-12 (the evaluations depend on the CPU's float rounding), every 500 env steps:
    # seed 0 0, 0, 0, 20% (2000 steps, 4 minutes); seed 1 0, 0, 10, 0, 70% (2500, 4.3 minutes); seed 2 0, 0, 20% (1500, 2.5
    # minutes). The test runs seed 2, the cheapest; the 4000-step cap leaves room for the others' 2000-2500 on another CPU.
    # At UTD 8 without dropout the same run took 11 minutes: seed 0 reached 20% at 4000 env steps.
    assert max(successes) >= 0.2, history["eval"]
    assert result["reached_target"] and result["env_steps"] <= 4_000, (result, history["eval"])


REACH = "robolearn/PandaReach-v0"


@pytest.mark.timeout(600)
def test_diffusion_bc_from_scripted_demos_reaches_and_its_checkpoint_round_trips(tmp_path, one_thread):
    """Behaviour cloning through the training loop (windows from the demos, evaluation with reset() at
    each episode) reaches the goal clearly more often than the untrained policy; the final
    checkpoint loads into an agent that samples the same chunks from the same noise."""
    from robolearn.train import Trainer, evaluate, load_agent

    demos = tmp_path / "demos"
    env = rsim.make(REACH)
    with DatasetWriter(demos, REACH, env.observation_space, env.action_space, fps=10) as writer:
        assert run_episodes(env, scripted_policy(env), 20, seed=10_000, recorder=writer).success_rate >= 0.9
    env.close()
    # lr 1e-3: Chi's 1e-4 needs far more than a test's few thousand updates on 20 demos.
    cfg = TrainConfig(agent="diffusion", env=REACH, out=str(tmp_path / "run"), frames=3_000, seed=0,
                      demos=str(demos), eval_every=600, eval_episodes=10, checkpoint_every=100_000, video=False,
                      agent_overrides={"batch_size": 128, "lr": 1e-3})
    trainer = Trainer(cfg)
    try:
        untrained, _, _ = evaluate(trainer.agent, trainer.eval_env, 10)
        result = trainer.run()
        successes = [s for _steps, _ret, s, _t in trainer.history["eval"]]
        # Measured (seed 0): 0.2 0.2 0.2 0.4 0.2 0.3, final 0.7; the untrained policy 0.
        assert untrained == 0.0 and max(successes) >= 0.3 and result["final_success"] > 0, (untrained, successes)
        assert result["updates"] == 3_000 and result["env_steps"] == 0
        loaded, config = load_agent(result["checkpoint"])
        assert config["agent"] == "diffusion" and config["agent_config"]["config"]["lr_schedule_steps"] == 3_000
        window = {"state": torch.randn(4, 2, *trainer.env.observation_space["state"].shape),
                  "tcp_pose": torch.randn(4, 2, *trainer.env.observation_space["tcp_pose"].shape)}
        noise = torch.randn(4, loaded.pred_horizon, trainer.env.action_space.shape[0])
        assert torch.equal(loaded.sample(window, noise), trainer.agent.sample(window, noise))
    finally:
        trainer.close()


@pytest.mark.timeout(900)
def test_drqv2_from_pixels_improves_its_return_within_a_short_run(one_thread, drqv2_beside):
    from robolearn.train import build_agent, evaluate

    proc, out, log = drqv2_beside
    env = rsim.make(CARTPOLE, **CARTPOLE_KWARGS)
    untrained, _ = build_agent("drqv2", env, DRQ_SMALL, seed=0)  # the weights the run starts from
    _, before, _ = evaluate(untrained, env, episodes=5)
    env.close()
    assert proc.wait(timeout=840) == 0, log.read_text()[-3000:]
    history = json.loads((out / "history.json").read_text())
    returns = [ret for _steps, ret, _success, _s in history["eval"]]
    # Untrained, and after the 500 seed steps, the greedy policy scores 60-75 of 1000 (the pole
    # hangs); seeds 0 and 1 reach 186-201 at 16k frames (2000 agent steps).
    assert returns[-1] >= before + 100, (before, history["eval"])
