"""Learning checks: the full loops learn on real tasks within a short CPU run.

The benchmarks' targets (bench/serl_pickcube.py, bench/drqv2_update.py) live in bench/; these
only prove that the training loop, replay, demos and agents together improve a policy.

SERL's check (PandaPickCube from states with 20 demos lifts the cube within a few thousand env steps) is
tests/test_actor_learner.py::test_sim_train_launch_learns_to_lift_the_cube: the same agent, replay, demo
mixing and update code, through the launch file's actor and learner. The in-process run of the same claim
cost 2.5-6 minutes of a core in every `make test` and was dropped for the suite's time limit; `make demo`
and bench/serl_pickcube.py train SERL through `robolearn train`.

DrQ-v2's run takes about 3.5 minutes on one core (8 on the slower VMs of 2026-12), so it runs as `robolearn
train` in its own process (fixture `drqv2_beside`) while diffusion BC's run (1.5 minutes, fixture `reach_bc`
in tests/conftest.py) trains in this one; the DrQ-v2 test, which waits for that process, comes last. Every run
is single-threaded and seeded, so running them side by side changes their wall time, not their results.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import robolearn.sim as rsim

# DrQ-v2 through the same loop on a dm_control pixel task: cartpole swingup from 64x64 frames
# (3 stacked) with action repeat 8, as DrQ ran cartpole, and a network small enough for a CPU
# test. Losses, augmentation, learning rate and the noise schedule's form are DrQ-v2's.
DRQ_SMALL = dict(hidden_dim=256, conv_channels=16, conv_strides=(2, 2, 1, 1), batch_size=128,
                 num_seed_frames=4_000, update_every_steps=1, stddev_schedule="linear(1.0,0.1,3000)")
CARTPOLE = "robolearn/dmc-cartpole_swingup-v0"
# shadow_size 512: the same 64x64 frames but for 0.01% of the pixels, for half the osmesa rendering time (docs/dmc.md)
CARTPOLE_KWARGS = {"image_size": 64, "action_repeat": 8, "shadow_size": 512}


@pytest.fixture(scope="session")
def drqv2_beside(tmp_path_factory):
    """Start DrQ-v2's learning run (`robolearn train`, one thread) in its own process; yields it and its run folder.
    Session-scoped, as `reach_bc` is, so that a test naming it first starts it first."""
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


@pytest.mark.timeout(600)
def test_diffusion_bc_from_scripted_demos_reaches_and_its_checkpoint_round_trips(drqv2_beside, reach_bc):
    """Behaviour cloning through the training loop (windows from the demos, evaluation with reset() at
    each episode) reaches the goal clearly more often than the untrained policy; the final
    checkpoint loads into an agent that samples the same chunks from the same noise.
    drqv2_beside first: DrQ-v2's run trains on the other core meanwhile (the module docstring says why)."""
    from robolearn.train import load_agent

    bc, result = reach_bc, reach_bc.result
    assert bc.demo_success >= 0.9
    # Measured (seed 0, this VM, 2026-12-07): 0.6, 1.0, 0.8 at 500, 1000 and 1500 updates; the untrained policy 0.
    assert bc.untrained == 0.0 and max(bc.evals) >= 0.3 and result["final_success"] > 0, (bc.untrained, bc.evals)
    assert result["updates"] == 1_500 and result["env_steps"] == 0
    loaded, config = load_agent(result["checkpoint"])
    assert config["agent"] == "diffusion" and config["agent_config"]["config"]["lr_schedule_steps"] == 1_500
    window = {key: torch.randn(4, 2, *bc.observation_space[key].shape) for key in ("state", "tcp_pose")}
    noise = torch.randn(4, loaded.pred_horizon, bc.action_dim)
    assert torch.equal(loaded.sample(window, noise), bc.agent.sample(window, noise))


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
