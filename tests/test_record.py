"""`robolearn record` as users run it: the keyboard in a real terminal (tmux), kill -9 mid-episode,
scripted demonstrations for the SERL demo buffer, intervention and label modes, and errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from terminal import Tmux

from robolearn.demos.dataset import Dataset

BIN = Path(sys.executable).parent
ROBOLEARN = [sys.executable, "-m", "robolearn.cli"]
SAVED = re.compile(r"saved episode (\d+): (\d+) steps, (success|failure)")


def robolearn(*args, check=True, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*ROBOLEARN, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


RECORD = f"{BIN / 'robolearn'} record --env robolearn/PandaReach-v0 --teleop keyboard --out {{out}} --episodes 3"


@pytest.fixture(scope="module")
def keyboard_dataset(tmp_path_factory):
    """Two episodes recorded with keys in tmux (success, then a discarded try and a failure), then quit."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    root = tmp_path_factory.mktemp("keyboard")
    out = root / "demos"
    t = Tmux()
    try:
        t.start(f"{RECORD.format(out=out)}; echo EXIT=$?; stty -a > {root / 'stty.txt'}; sleep 60")
        t.wait_for("press Enter to start episode 0")
        t.send("Enter")
        t.wait_for("episode 0: recording (seed 0)")
        t.send("w", "w", "w")
        t.send("y")
        t.wait_for("saved episode 0:")
        t.send("Enter")
        t.wait_for("episode 1: recording (seed 1)")
        t.send("d", "x")                     # discard and re-record: the same seed again
        t.wait_for("discarded episode 1 (operator)")
        t.send("Enter")
        t.wait_for("episode 1: recording (seed 1)", count=2)
        t.send("a", "r", "a")
        t.send("n")
        t.wait_for("saved episode 1:")
        t.send("q")
        screen = t.wait_for("EXIT=")
        stty = ""
        for _ in range(100):
            if (root / "stty.txt").exists() and (root / "stty.txt").read_text():
                stty = (root / "stty.txt").read_text()
                break
            time.sleep(0.05)
    finally:
        t.kill()
    return out, screen, stty


def test_keyboard_in_a_real_terminal_records_labelled_episodes(keyboard_dataset):
    out, screen, stty = keyboard_dataset
    assert "EXIT=0" in screen and "Traceback" not in screen
    saved = {int(i): (int(n), label) for i, n, label in SAVED.findall(screen)}
    assert saved.keys() == {0, 1} and saved[0][1] == "success" and saved[1][1] == "failure"
    ds = Dataset(out, strict=True)
    assert len(ds) == 2 and [p.name for p in ds.paths] == ["episode_000000.h5", "episode_000001.h5"]
    assert ds.lengths == [saved[0][0], saved[1][0]]  # what the recorder reported is what is stored
    a0, a1 = ds.episode_attrs(0), ds.episode_attrs(1)
    assert (a0["success"], a1["success"]) == (True, False)
    assert (a0["seed"], a1["seed"], a0["device"], a0["mode"]) == (0, 1, "keyboard", "teleop")
    e0, e1 = ds.episode(0), ds.episode(1)
    assert e0["action"].shape[1] == 3  # PandaReach has no gripper dimension
    assert (e0["action"][:, 0] > 0).sum() >= 3 and np.all(e0["action"][:, 1:] == 0)   # w: +x only
    assert (e1["action"][:, 1] > 0).any() and (e1["action"][:, 2] > 0).any()         # a: +y, r: +z
    assert not (e1["action"][:, 1] < 0).any()  # the discarded try's "d" (-y) is not in the re-recording
    assert not e0["intervention"].any()
    gaps = np.diff(e0["timestamp"])
    # Paced at the env's 10 Hz control rate: steps never come faster (a loaded machine only makes
    # them slower, so there is no upper bound here), and their timestamps are in order.
    assert (gaps > 0).all() and 0.07 < float(np.median(gaps))
    assert not list(out.glob(".*.partial"))
    # the terminal is back in cooked mode after quitting
    assert re.search(r"(?<!-)icanon", stty) and re.search(r"(?<![-\w])echo\b", stty), stty


def test_kill9_during_an_episode_keeps_the_finished_ones(keyboard_dataset, tmux, tmp_path):
    out = tmp_path / "demos"
    shutil.copytree(keyboard_dataset[0], out)
    pidfile = tmp_path / "pid"
    tmux.start(f"sh -c 'echo $$ > {pidfile}; exec {RECORD.format(out=out)}'")
    tmux.wait_for("press Enter to start episode 2")  # appending resumes the numbering
    pid = int(pidfile.read_text())
    tmux.send("Enter")
    tmux.wait_for("episode 2: recording (seed 2)")
    tmux.send("w", "w")
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    assert (out / ".episode_000002.h5.partial").exists()  # the episode in progress, never committed
    ds = Dataset(out, strict=True)
    assert [p.name for p in ds.paths] == ["episode_000000.h5", "episode_000001.h5"]
    assert ds.lengths == Dataset(keyboard_dataset[0]).lengths
    for ep in ds:
        assert len(ep["action"]) == len(ep["obs"]["state"]) - 1
    # the next recording takes index 2 again (over the stale partial file)
    robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced",
              "--episodes", "1", "--out", str(out))
    assert [p.name for p in Dataset(out).paths][-1] == "episode_000002.h5"
    assert not list(out.glob(".*.partial")) and Dataset(out).episode_attrs(2)["seed"] == 2


def test_scripted_device_makes_20_pickcube_demos_for_the_serl_demo_buffer(tmp_path):
    import robolearn.sim as rsim
    from robolearn.replay import MixedReplay, ReplayBuffer

    out = tmp_path / "demos"
    proc = robolearn("record", "--env", "robolearn/PandaPickCube-v0", "--teleop", "scripted", "--unpaced",
                     "--episodes", "20", "--out", str(out))
    assert "recorded 20 episode(s), 20 successful" in proc.stdout
    ds = Dataset(out, strict=True)
    assert len(ds) == 20 and all(ds.episode_attrs(i)["success"] for i in range(20))
    assert [ds.episode_attrs(i)["seed"] for i in range(20)] == list(range(20))
    assert np.allclose(ds.episode(0)["timestamp"][:3], [0.0, 0.1, 0.2])  # unpaced: t / fps
    env = rsim.make("robolearn/PandaPickCube-v0")
    # The recorder stores the arm's state with every observation: episode 0 starts where reset(seed=0) puts it.
    assert ds.joint_names == [f"panda_joint{i}" for i in range(1, 8)]
    env.reset(seed=0)
    robot = ds.episode(0)["robot"]
    assert robot["joint_position"].shape == (ds.lengths[0] + 1, 7)
    np.testing.assert_array_equal(robot["joint_position"][0], env.unwrapped.state.position)
    demo = ReplayBuffer.from_dataset(ds, env.observation_space, env.action_space)
    assert len(demo) == ds.num_steps
    online = ReplayBuffer(1000, env.observation_space, env.action_space)
    obs, _ = env.reset(seed=99)
    online.add_first(obs)
    for _ in range(20):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        online.add(action, reward, obs, terminated, truncated)
    batch = MixedReplay(online, demo, demo_ratio=0.5).sample_arrays(64, np.random.default_rng(0))
    assert batch["action"].shape == (64, 4) and np.isfinite(batch["reward"]).all()


def test_intervention_steps_are_flagged_and_taken_from_the_device(tmp_path):
    out = tmp_path / "hil"
    keys = "<enter>...rr..c" + "." * 150  # the human lifts for 2 steps and closes the gripper once
    robolearn("record", "--env", "robolearn/PandaPickCube-v0", "--teleop", "scripted", "--unpaced",
              "--episodes", "1", "--out", str(out), "--policy", "scripted", "--teleop-set", f"keys={keys}")
    ds = Dataset(out)
    ep, attrs = ds.episode(0), ds.episode_attrs(0)
    assert attrs["mode"] == "intervention" and attrs["policy"] == "scripted"
    assert list(np.flatnonzero(ep["intervention"])) == [4, 5, 8]
    np.testing.assert_allclose(ep["action"][[4, 5]], [[0, 0, 1, -1], [0, 0, 1, -1]])  # +z, gripper held
    np.testing.assert_allclose(ep["action"][8], [0, 0, 0, 1])                     # motion zero, close
    assert attrs["success"]  # the policy finished the task after the takeover


def test_checkpoint_policy_in_intervention_mode(tmp_path, request):
    import torch

    import robolearn.sim as rsim
    from robolearn import checkpoint
    from robolearn.train import build_agent

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    env = rsim.make("robolearn/PandaReach-v0")
    agent, _ = build_agent("serl", env, {}, seed=0)
    config = {"agent": "serl", "env_id": "robolearn/PandaReach-v0",
              "observation_space": {k: list(v.shape) for k, v in env.observation_space.spaces.items()},
              "action_shape": list(env.action_space.shape), "agent_config": agent.config_dict()}
    ckpt = tmp_path / "run" / "checkpoints"
    checkpoint.save_checkpoint(ckpt, 0, agent.state_dict(), config, {"step": 0})
    out = tmp_path / "hil"
    robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced",
              "--episodes", "1", "--out", str(out), "--policy", str(tmp_path / "run"),
              "--env-set", "max_episode_steps=8", "--teleop-set", "keys=<enter>..w.....")
    ds = Dataset(out)
    ep = ds.episode(0)
    assert len(ep["action"]) == 8 and list(np.flatnonzero(ep["intervention"])) == [3]
    np.testing.assert_allclose(ep["action"][3], [1, 0, 0])
    expected = agent.act({k: v[0] for k, v in ep["obs"].items()}, explore=False)
    np.testing.assert_allclose(ep["action"][0], expected, atol=1e-5)  # the checkpoint's deterministic action
    assert ds.episode_attrs(0)["policy"] == str(tmp_path / "run")


def test_label_mode_sets_per_step_success_from_keys(tmp_path):
    out = tmp_path / "labels"
    robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced", "--label",
              "--episodes", "1", "--out", str(out), "--teleop-set", "keys=<enter>..y..n.y<enter>")
    ds = Dataset(out)
    ep, attrs = ds.episode(0), ds.episode_attrs(0)
    assert ep["success"].tolist() == [False, False, False, True, True, True, False, False, True]
    assert attrs["mode"] == "label" and attrs["success"] is True  # some frame was labelled success
    assert not ep["terminated"].any()


def test_record_errors_are_one_line_with_status_2(tmp_path):
    proc = robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "joystick", "--out",
                     str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "unknown teleop device 'joystick'; valid: gamepad, keyboard, ros, scripted, spacemouse" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "keyboard", "--unpaced", "--out",
                     str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "--unpaced is for the scripted device" in proc.stderr
    proc = robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "keyboard", "--out",
                     str(tmp_path / "x"), check=False)  # stdin is not a terminal here
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr and "Traceback" not in proc.stderr


def test_a_device_lost_before_anything_was_saved_exits_1(tmp_path):
    """The script ends without ever starting an episode: the recorder reports the loss, saves nothing and
    exits 1; a device lost after an episode was saved exits 0 (the saved episode is the result)."""
    out = tmp_path / "demos"
    proc = robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced",
                     "--episodes", "2", "--out", str(out), "--teleop-set", "keys=ww", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "recorded 0 episode(s)" in proc.stdout and not list(out.glob("episode_*.h5"))
    proc = robolearn("record", "--env", "robolearn/PandaReach-v0", "--teleop", "scripted", "--unpaced",
                     "--episodes", "2", "--out", str(out), "--env-set", "max_episode_steps=3",
                     "--teleop-set", "keys=<enter>www", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(out.glob("episode_*.h5"))) == 1
