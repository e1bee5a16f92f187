"""The robolearn command as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys

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
