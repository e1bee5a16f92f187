"""The robolearn command as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROBOLEARN = [sys.executable, "-m", "robolearn.cli"]


def run(*args, check=True):
    proc = subprocess.run([*ROBOLEARN, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("command", [[], ["envs"], ["rollout"]])
def test_help(command):
    out = run(*command, "--help").stdout
    assert "usage: robolearn" in out


def test_envs_lists_panda_and_dmc():
    out = run("envs", "--all").stdout
    assert "robolearn/PandaPickCube-v0" in out and "robolearn/dmc-cartpole_swingup-v0" in out


def test_rollout_reports_success_and_writes_video(tmp_path):
    import imageio.v3 as iio
    video = tmp_path / "ep.mp4"
    out = run("rollout", "--env", "robolearn/PandaPickCube-v0", "--episodes", "3", "--video", str(video)).stdout
    assert "success rate: 100.0%" in out
    frames = iio.imread(video)
    assert frames.ndim == 4 and frames.shape[0] > 5 and frames.shape[-1] == 3


def test_rollout_random_policy_records_uniform_actions(tmp_path):
    from robolearn.demos.dataset import Dataset

    out = run("rollout", "--env", "robolearn/PandaReach-v0", "--policy", "random", "--episodes", "2",
              "--record", str(tmp_path / "demos")).stdout
    assert "success rate:" in out
    actions = np.concatenate([ep["action"] for ep in Dataset(tmp_path / "demos")])
    # Uniform in [-1, 1] (std 0.577 per dimension), not the expert's smooth, mostly saturated path.
    assert len(actions) >= 100 and np.abs(actions).max() <= 1
    assert np.all(np.abs(actions.mean(axis=0)) < 0.15) and np.all(np.abs(actions.std(axis=0) - 0.577) < 0.07)


@pytest.fixture(scope="module")
def drqv2_run(tmp_path_factory):
    """A tiny DrQ-v2 run through the CLI on 32x32 cartpole (25-step episodes, updates from step 10)."""
    from robolearn.cli import main

    import torch
    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("drqv2") / "run"
    try:
        code = main(["train", "--agent", "drqv2", "--env", "robolearn/dmc-cartpole_swingup-v0", "--out", str(run_dir),
                     "--frames", "200", "--checkpoint-every", "25", "--eval-every", "1000", "--eval-episodes", "1",
                     "--no-video", "--threads", "1", "--env-set", "image_size=32", "--env-set", "time_limit=1.0",
                     "--env-set", "action_repeat=4", "--set", "num_seed_frames=40", "--set", "batch_size=8",
                     "--set", "hidden_dim=32", "--set", "feature_dim=16", "--set", "conv_channels=8",
                     "--set", "conv_strides=[2,2,1,1]"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return run_dir


def test_train_drqv2_through_the_cli(drqv2_run):
    import robolearn.sim as rsim
    from robolearn.checkpoint import load_checkpoint
    from robolearn.train import evaluate, load_agent

    result = json.loads((drqv2_run / "result.json").read_text())
    assert result["env_steps"] == 200 and result["checkpoint"].endswith("step_000000000050")
    _, weights, config, state = load_checkpoint(drqv2_run)
    assert config["agent"] == "drqv2" and state["step"] == 50
    # every 2nd agent step (update_every_steps) from step 10 (40 seed frames / 4) to 50: 10, 12, ..., 50
    assert int(weights["counters/num_updates"]) == 21
    env = rsim.make("robolearn/dmc-cartpole_swingup-v0", image_size=32, time_limit=1.0, action_repeat=4)
    agent, _ = load_agent(drqv2_run, env)
    assert np.isfinite(evaluate(agent, env, 1)[1])


def test_eval_from_a_run_its_checkpoints_dir_and_a_step_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _main("train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--out", str(run_dir),
                 "--frames", "120", "--checkpoint-every", "50", "--eval-every", "1000", "--eval-episodes", "1",
                 "--no-video", "--threads", "1", "--set", "hidden_dims=[16,16]", "--set", "batch_size=8") == 0
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(steps) == 2
    capsys.readouterr()
    for where in (run_dir, run_dir / "checkpoints", *steps):
        assert _main("eval", "--checkpoint", str(where), "--episodes", "1") == 0, where
        out = capsys.readouterr().out
        assert "serl on robolearn/PandaReach-v0: success" in out, (where, out)
    assert _main("eval", "--checkpoint", str(tmp_path), "--episodes", "1") == 2  # no checkpoint there
    _one_line_error(capsys, "no checkpoint")


def test_eval_uses_the_env_options_the_run_was_trained_with(drqv2_run, capsys):
    assert _main("eval", "--checkpoint", str(drqv2_run), "--episodes", "1") == 0


def test_rollout_unknown_env_fails_cleanly():
    proc = run("rollout", "--env", "robolearn/Nope-v0", check=False)
    assert proc.returncode == 2 and "unknown env id" in proc.stderr and "Traceback" not in proc.stderr


def test_rollout_records_a_dataset_the_demo_buffer_loads(tmp_path):
    import robolearn.sim as rsim
    from robolearn.demos.dataset import Dataset
    from robolearn.replay import ReplayBuffer

    run("rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "3", "--record", str(tmp_path / "demos"))
    data = Dataset(tmp_path / "demos")
    assert len(data) == 3 and data.env_id == "robolearn/PandaReach-v0"
    env = rsim.make("robolearn/PandaReach-v0")
    buf = ReplayBuffer.from_dataset(data, env.observation_space, env.action_space)
    assert len(buf) == data.num_steps


# -- every option checked before work starts (in-process: each fails before any env steps) ----

def _main(*args) -> int:
    from robolearn.cli import main
    return main(list(args))


def _one_line_error(capsys, named: str):
    """The captured output, after checking stderr is one line naming `named`."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    return captured


@pytest.mark.parametrize("args, named", [
    (["--frames", "0"], "--frames"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--checkpoint-every", "-5"], "--checkpoint-every"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"),
    (["--target-success", "1.5"], "--target-success"),
    (["--set", "utd_ratio=abc"], "utd_ratio"),
    (["--set", "utd_ratio=-1"], "utd_ratio"),
    (["--set", "batch_size=0"], "batch_size"),
    (["--set", "hidden_dims=abc"], "hidden_dims"),
    (["--set", 'hidden_dims="abc"'], "hidden_dims"),
    (["--set", "hidden_dims=[]"], "hidden_dims"),
    (["--set", "lr=-0.1"], "lr"),
    (["--set", "gamma=2"], "gamma"),
    (["--set", "activation=bogus"], "activation"),
    (["--set", "no_such_option=1"], "no_such_option"),  # an unknown field, named
    (["--env-set", "physics_dt=1"], "physics_dt"),
    (["--env-set", "control_hz=0"], "control_hz"),
])
def test_train_refuses_a_bad_option_before_making_the_run_folder(tmp_path, capsys, args, named):
    out = tmp_path / "run"
    quick = ["--frames", "1", "--eval-episodes", "1", "--no-video", "--threads", "1"]  # the args given win
    assert _main("train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--out", str(out), *quick,
                 *args) == 2
    _one_line_error(capsys, named)
    assert not out.exists()


def test_drqv2_options_are_checked_too(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main("train", "--agent", "drqv2", "--env", "robolearn/PandaReachPixels-v0", "--out", str(out),
                 "--frames", "1", "--eval-episodes", "1", "--no-video", "--threads", "1",
                 "--set", "stddev_schedule=linear(1,x)") == 2
    _one_line_error(capsys, "stddev_schedule")
    assert not out.exists()


@pytest.mark.parametrize("setting, named", [
    ("physics_dt=1", "physics_dt"),          # today: exits 0 with the tool ~1 m outside the box
    ("physics_dt=0.003", "physics_dt"),      # does not divide the 0.1 s control period
    ("physics_dt=0", "physics_dt"),
    ("physics_dt=abc", "physics_dt"),
    ("control_hz=0", "control_hz"),
    ("control_hz=-10", "control_hz"),
    ("control_hz=abc", "control_hz"),
    ("max_episode_steps=0", "max_episode_steps"),
    ("action_scale=-1", "action_scale"),
    ("image_size=abc", "image_size"),
    ("impedance=5", "impedance"),
    ('impedance={"translational_stiffness":10}', "impedance"),
    ("safety=[1,2]", "safety"),
    ("terminate_on_success=maybe", "terminate_on_success"),
    ("tool_quat=[1,0]", "tool_quat"),
])
def test_env_set_is_checked(capsys, setting, named):
    assert _main("rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1", "--env-set", setting) == 2
    _one_line_error(capsys, named)


def test_physics_dt_that_divides_the_control_period_is_accepted():
    import robolearn.sim as rsim
    for dt, hz, substeps in ((0.004, 10, 25), (0.0025, 20, 20), (0.005, 10.0, 20)):
        env = rsim.make("robolearn/PandaReach-v0", physics_dt=dt, control_hz=hz)
        assert env.unwrapped.arm.n_substeps == substeps
        env.close()


@pytest.mark.parametrize("setting, named", [
    ("scale=abc", "scale"), ("axis_scale=5", "axis_scale"), ("axis_scale=[1,\"a\",2]", "axis_scale"),
    ("deadzone=abc", "deadzone"), ("deadzone=null", "deadzone"), ("timeout_s=abc", "timeout_s"),
    ("keys=5", "keys"), ("hold_steps=abc", "hold_steps"),
])
def test_teleop_set_errors_name_the_field(tmp_path, capsys, setting, named):
    out = tmp_path / "demos"
    assert _main("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced",
                 "--episodes", "1", "--out", str(out), "--teleop-set", setting) == 2
    _one_line_error(capsys, named)
    assert not out.exists()


@pytest.mark.parametrize("make_args, named", [
    (lambda f: ["train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--out", str(f)], "--out"),
    (lambda f: ["train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--out", str(f / "run")], "--out"),
    (lambda f: ["rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1", "--video", str(f / "x.mp4")],
     "--video"),
    (lambda f: ["rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1", "--video", str(f.parent)],
     "--video"),
    (lambda f: ["rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1", "--record", str(f)], "--record"),
    (lambda f: ["rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1", "--record", str(f / "d")],
     "--record"),
    (lambda f: ["eval", "--checkpoint", str(f.parent), "--video", str(f / "x.mp4")], "--video"),
    (lambda f: ["demos", "export", str(f.parent), "--format", "mcap", "--out", str(f / "x")], "--out"),
    (lambda f: ["record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--out", str(f)], "--out"),
])
def test_a_path_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys, make_args, named):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert _main(*make_args(a_file)) == 2
    assert "success rate" not in _one_line_error(capsys, named).out  # refused before any episode ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_read_only_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere; answer as the kernel would for a user
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and access(p, mode, **kw))
    assert _main("rollout", "--env", "robolearn/PandaReach-v0", "--episodes", "1",
                 "--video", str(locked / "x.mp4")) == 2
    _one_line_error(capsys, "--video")


# -- train --demos with a damaged or empty dataset -------------------------------------------

def _train_with_demos(demos, out):
    from robolearn.cli import main
    return main(["train", "--agent", "serl", "--env", "robolearn/PandaReach-v0", "--demos", str(demos),
                 "--out", str(out), "--frames", "20", "--eval-episodes", "1", "--no-video"])


def test_train_demos_names_a_damaged_episode_and_refuses_an_empty_dataset(tmp_path, capsys):
    import h5py
    import numpy as np

    import robolearn.sim as rsim
    from robolearn.demos.dataset import DatasetWriter, write_expert_episodes

    env = rsim.make("robolearn/PandaReach-v0")
    write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), tmp_path / "demos", 1)
    DatasetWriter(tmp_path / "empty", env.spec.id, env.observation_space, env.action_space, fps=10).close()
    env.close()
    with h5py.File(tmp_path / "demos" / "episode_000000.h5", "a") as f:
        f["action"][2, 1] = np.nan
    capsys.readouterr()
    with pytest.warns(UserWarning, match="episode_000000.h5: action\\[2\\] is nan"):
        assert _train_with_demos(tmp_path / "demos", tmp_path / "run") == 2  # not a NaN loss (exit 3) later
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "demos") in err and "episode_000000.h5" in err, err
    assert "action[2]" in err and not (tmp_path / "run").exists()
    assert _train_with_demos(tmp_path / "empty", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err and "no usable episodes" in err, err
    assert not (tmp_path / "run").exists()
