"""The training loop end to end through the CLI: resume after kill -9, mismatches, divergence.

The commands run in this process (tests/inprocess.py) except where a run is killed or patched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import robolearn  # `robolearn ARGS` in this process

TINY = ["--set", "batch_size=16", "--set", "utd_ratio=2", "--set", "hidden_dims=[32,32]", "--set", "num_critics=4",
        "--threads", "1", "--no-video", "--eval-episodes", "2"]


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.exists() else -1


def test_resume_after_kill9_continues_the_run(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--frames", "1200",
            "--checkpoint-every", "100", "--eval-every", "400", "--out", str(run), *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "robolearn.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while latest_step(run) < 200 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert killed_at >= 200
    state = json.loads((run / "checkpoints" / f"step_{killed_at:012d}" / "state.json").read_text())

    robolearn(*args, "--resume")
    result = json.loads((run / "result.json").read_text())
    assert result["env_steps"] == 1200
    history = json.loads((run / "history.json").read_text())
    steps = [row[0] for row in history["train"]]
    assert steps == sorted(steps) and steps[0] <= state["step"] < steps[-1]  # one history, continued
    assert (run / "learning_curve.png").stat().st_size > 10_000


def test_fresh_train_refuses_to_overwrite_and_resume_rejects_other_agent(tmp_path):
    run = tmp_path / "run"
    base = ["--env", "robolearn/PandaReach-v0", "--frames", "150", "--checkpoint-every", "100",
            "--eval-every", "1000", "--out", str(run)]
    robolearn("train", "--agent", "serl", *base, *TINY)
    again = robolearn("train", "--agent", "serl", *base, *TINY, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    other = robolearn("train", "--agent", "drqv2", *base, "--resume", "--no-video", check=False)
    assert other.returncode == 2 and "agent: checkpoint has 'serl', expected 'drqv2'" in other.stderr
    wrong_env = robolearn("eval", "--checkpoint", str(run), "--env", "robolearn/PandaPickCube-v0",
                          "--episodes", "1", check=False)
    assert wrong_env.returncode == 2 and "does not match" in wrong_env.stderr and "action_shape" in wrong_env.stderr
    ok = robolearn("eval", "--checkpoint", str(run), "--episodes", "2")
    assert "success" in ok.stdout


def test_demos_that_do_not_match_the_env_are_refused(tmp_path):
    import robolearn.sim as rsim
    from robolearn.demos.dataset import write_expert_episodes

    env = rsim.make("robolearn/PandaPickCube-v0")
    write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), tmp_path / "demos", 1)
    proc = robolearn("train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--demos",
                     str(tmp_path / "demos"), "--frames", "50", "--out", str(tmp_path / "run"), *TINY, check=False)
    # Reach and PickCube states are both 10-d; the 4-d pick action against reach's 3-d is the mismatch.
    assert proc.returncode == 2 and "action shape (4,)" in proc.stderr and str(tmp_path / "demos") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    from robolearn.checkpoint import load_checkpoint

    run = tmp_path / "run"
    # lr=1e30: one Adam step moves every weight by ~1e30 and the next losses overflow. Updates
    # start after SERL's 1000 random steps (no demos), so the checkpoints before that are good.
    proc = robolearn("train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--frames", "1400",
                     "--checkpoint-every", "100", "--eval-every", "10000", "--out", str(run), "--set", "lr=1e30",
                     *TINY, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "learner step" in proc.stderr and "reward:" in proc.stderr
    assert "last good checkpoint" in proc.stderr
    _, weights, _, state = load_checkpoint(run)
    assert all(np.isfinite(w.float().numpy()).all() for w in weights.values())
    assert 900 <= state["step"] <= 1100  # the last checkpoint before the weights blew up


# A training run in which removing the checkpoint latest.json points at is a SIGKILL: the state a
# kill -9 at that moment would leave behind.
GUARDED = r"""
import json, os, shutil, signal, sys
from pathlib import Path

rmtree = shutil.rmtree

def guarded(path, *args, **kwargs):
    latest = Path(path).parent / "latest.json"
    if latest.is_file() and json.loads(latest.read_text())["path"] == Path(path).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)

shutil.rmtree = guarded
from robolearn.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Episodes of exactly 100 steps, so checkpoints fall on steps 100, 200, ...
EVEN = ["--agent", "serl", "--env", "robolearn/PandaReach-v0", "--env-set", "terminate_on_success=false",
        "--checkpoint-every", "100", "--eval-every", "100000", "--threads", "1", "--no-video",
        "--eval-episodes", "1", "--set", "hidden_dims=[32,32]", "--set", "num_critics=2"]


def test_a_final_save_on_the_last_checkpointed_step_never_removes_latest(tmp_path):
    run = tmp_path / "run"
    # The last periodic save falls on the final step (200); the save after the loop must not
    # remove that checkpoint while latest.json points at it.
    proc = subprocess.run([sys.executable, "-c", GUARDED, "train", *EVEN, "--frames", "200", "--out", str(run)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"killed while removing latest's checkpoint ({proc.returncode}): {proc.stderr[-2000:]}"
    from robolearn.checkpoint import load_checkpoint
    ckpt, _, _, state = load_checkpoint(run)
    assert state["step"] == 200 and ckpt.name == "step_000000000200"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path):
    run = tmp_path / "run"
    robolearn("train", *EVEN, "--frames", "200", "--out", str(run))
    newest = run / "checkpoints" / "step_000000000200"
    _flip_last_byte(newest / "weights.safetensors")
    evaluated = robolearn("eval", "--checkpoint", str(run), "--episodes", "1", check=False)
    assert evaluated.returncode == 2 and "checksum" in evaluated.stderr and "Traceback" not in evaluated.stderr
    resumed = robolearn("train", *EVEN, "--frames", "300", "--out", str(run), "--resume")
    assert "step_000000000200" in resumed.stderr and "checksum" in resumed.stderr
    assert "resuming from" in resumed.stderr and "step_000000000100" in resumed.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["env_steps"] == 300


def test_set_on_resume_is_applied_where_safe_refused_otherwise_and_repairs_a_saved_option(tmp_path):
    run = tmp_path / "run"
    robolearn("train", *EVEN, "--frames", "100", "--out", str(run))
    resume = ["train", *EVEN, "--frames", "200", "--out", str(run), "--resume"]
    refused = robolearn(*resume, "--set", "hidden_dims=[64,64]", check=False)
    assert refused.returncode == 2 and "hidden_dims" in refused.stderr and "--resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # A run saved with an invalid option (as an older version allowed): named, with its repair.
    config_path = run / "checkpoints" / "step_000000000100" / "config.json"
    config = json.loads(config_path.read_text())
    config["agent_config"]["config"]["batch_size"] = 0
    config_path.write_text(json.dumps(config))
    broken = robolearn(*resume, check=False)
    assert broken.returncode == 2 and "batch_size" in broken.stderr and "--set batch_size=" in broken.stderr
    robolearn(*resume, "--set", "batch_size=8")
    saved = json.loads((run / "checkpoints" / "step_000000000200" / "config.json").read_text())
    assert saved["agent_config"]["config"]["batch_size"] == 8
    assert saved["agent_config"]["config"]["hidden_dims"] == [32, 32]


# -- exact resume ---------------------------------------------------------------------------------
# A run killed after learning has begun and resumed must end where the uninterrupted run ends:
# every tensor of the agent (networks, targets, optimizer moments, temperature, its generators and
# counters), torch's RNG, the loop's counters, numpy RNG and history, and the replay contents.
# Run A trains to step N with a checkpoint at step K; run B is what a kill -9 between K and the
# next checkpoint leaves on disk (A's step-K checkpoint alone), resumed to N.
EXACT = {  # agent: (K, N, TrainConfig fields); K and N fall on episode ends
    "serl": (100, 200, dict(env="robolearn/PandaReach-v0", frames=200, seed_steps=40,
                            env_kwargs={"terminate_on_success": False, "max_episode_steps": 50},
                            agent_overrides={"batch_size": 16, "utd_ratio": 2, "hidden_dims": [32, 32],
                                             "num_critics": 2})),
    "drqv2": (50, 100, dict(env="robolearn/dmc-cartpole_swingup-v0", frames=400, seed_steps=15,  # 4 frames a step
                            env_kwargs={"image_size": 32, "action_repeat": 4, "time_limit": 1.0},  # 25-step episodes
                            agent_overrides={"batch_size": 16, "hidden_dim": 32, "feature_dim": 16,
                                             "conv_channels": 8, "conv_strides": [2, 2, 1, 1],
                                             "update_every_steps": 1})),
}


@pytest.fixture()
def deterministic_torch():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def _h5_contents(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            out.update({f"{name}@{k}": v for k, v in obj.attrs.items()})
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        out.update({f"@{k}": v for k, v in f.attrs.items()})
        f.visititems(visit)
    return out


def exact_resume_with(tmp_path: Path, monkeypatch, agent: str, overrides: dict) -> tuple[int, int]:
    """The exact-resume check below with extra agent options (an agent variant's tests reuse it); returns its
    (K, N): run B's checkpoints at those steps are under tmp_path / "b" / "checkpoints"."""
    K, N, fields = EXACT[agent]
    monkeypatch.setitem(EXACT, agent, (K, N, {**fields, "agent_overrides": {**fields["agent_overrides"], **overrides}}))
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        test_resume_after_learning_began_matches_the_uninterrupted_run_exactly(tmp_path, agent, None)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return K, N


@pytest.mark.parametrize("agent", ["serl", "drqv2"])
def test_resume_after_learning_began_matches_the_uninterrupted_run_exactly(tmp_path, agent, deterministic_torch):
    import shutil

    from safetensors.torch import load_file

    from robolearn.train import TrainConfig, Trainer

    K, N, fields = EXACT[agent]

    def config(out: Path) -> TrainConfig:
        return TrainConfig(agent=agent, out=str(out), checkpoint_every=K, eval_every=10**6, eval_episodes=1,
                           video=False, **fields)

    def run(cfg: TrainConfig, resume: bool) -> int:
        trainer = Trainer(cfg, resume=resume)
        env_steps, step = [0], trainer.env.step
        trainer.env.step = lambda action: (env_steps.__setitem__(0, env_steps[0] + 1), step(action))[1]
        try:
            trainer.run()
        finally:
            trainer.close()
        return env_steps[0]

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(config(a), resume=False) == N
    at_k, at_n = (f"step_{s:012d}" for s in (K, N))
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / at_k, b / "checkpoints" / at_k)
    (b / "checkpoints" / "latest.json").write_text(json.dumps({"path": at_k, "step": K}))
    saved = load_file(str(b / "checkpoints" / at_k / "weights.safetensors"))
    updates = saved["counters/critic_updates" if agent == "serl" else "counters/num_updates"]
    assert int(updates) >= 20  # learning had begun when the run was "killed"

    assert run(config(b), resume=True) == N - K  # continued from K, not restarted
    ckpt_a, ckpt_b = a / "checkpoints" / at_n, b / "checkpoints" / at_n
    for name in ("weights.safetensors", "rng.safetensors"):
        ta, tb = load_file(str(ckpt_a / name)), load_file(str(ckpt_b / name))
        assert ta.keys() == tb.keys(), name
        differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        assert not differ, f"{name}: {differ[:10]}"
        if name == "weights.safetensors":
            moved = [k for k in ta if k in saved and not torch.equal(ta[k], saved[k])]
            assert any(k.startswith("optim/") for k in moved) and len(moved) > len(ta) // 2  # it learned after K
    state_a, state_b = (json.loads((c / "state.json").read_text()) for c in (ckpt_a, ckpt_b))
    assert state_a == state_b and state_a["step"] == N
    replay_a, replay_b = _h5_contents(ckpt_a / "replay.h5"), _h5_contents(ckpt_b / "replay.h5")
    assert replay_a.keys() == replay_b.keys() and len(replay_a) > 5
    for key in replay_a:
        assert np.array_equal(np.asarray(replay_a[key]), np.asarray(replay_b[key])), key


def test_an_offline_agent_without_demos_is_refused_before_anything_is_built(tmp_path):
    proc = robolearn("train", "--agent", "diffusion", "--env", "robolearn/PandaReach-v0", "--out", str(tmp_path / "r"),
                     check=False)
    assert proc.returncode != 0 and "--agent diffusion learns from demonstrations: pass --demos PATH" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_base_is_refused_for_an_agent_without_one_and_when_missing(tmp_path):
    proc = robolearn("train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--base", str(tmp_path),
                     "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and "--base is for agents that fine-tune a base policy; --agent serl takes none" \
        in proc.stderr, proc.stderr[-2000:]


def test_a_non_finite_action_ends_its_episode_without_stepping_the_env(tmp_path):
    from robolearn.agents.errors import NonFiniteActionError
    from robolearn.train import TrainConfig, Trainer

    cfg = TrainConfig(agent="serl", env="robolearn/PandaReach-v0", out=str(tmp_path / "r"), frames=40, seed_steps=0,
                      eval_every=1_000, eval_episodes=1, checkpoint_every=1_000, save_replay=False, video=False,
                      agent_overrides={"batch_size": 8, "utd_ratio": 1, "hidden_dims": [16], "num_critics": 2})
    trainer = Trainer(cfg)
    act, calls, stepped = trainer.agent.act, [], []
    step = trainer.env.step

    def bad_at_five(obs, explore):
        calls.append(explore)  # evaluation acts too, without exploring
        if sum(calls) == 5 and explore:
            raise NonFiniteActionError("sampled action is not finite (test)")
        return act(obs, explore)

    trainer.agent.act = bad_at_five
    trainer.env.step = lambda a: (stepped.append(np.asarray(a)), step(a))[1]
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result["rejected_actions"] == 1 and len(stepped) == 40 and sum(calls) == 41
    assert all(np.all(np.isfinite(a)) for a in stepped)
