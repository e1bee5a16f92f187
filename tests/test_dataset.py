"""The episode dataset: exact round trips from real envs, appending, and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import h5py
import numpy as np
import pytest

import robolearn.sim as sim
from robolearn.demos.dataset import Dataset, DatasetError, DatasetWriter, write_expert_episodes


def record(env, path, episodes: int, seed: int = 0) -> list[dict]:
    """Run the scripted expert, writing with DatasetWriter and keeping what the env returned."""
    policy = env.unwrapped.task.expert(env.unwrapped)
    w = DatasetWriter(path, env.spec.id, env.observation_space, env.action_space, fps=10)
    kept = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        w.begin_episode(obs, seed=seed + ep)
        log = {"obs": {k: [v] for k, v in obs.items()}, "action": [], "reward": [], "terminated": [],
               "truncated": [], "success": []}
        done = False
        while not done:
            a = policy(obs)
            obs, r, term, trunc, info = env.step(a)
            w.add_step(a, obs, r, term, trunc, info["success"])
            for k, v in obs.items():
                log["obs"][k].append(v)
            for k, v in (("action", a), ("reward", r), ("terminated", term), ("truncated", trunc),
                         ("success", info["success"])):
                log[k].append(v)
            done = term or trunc
        w.end_episode()
        kept.append(log)
    return kept


@pytest.mark.parametrize("env_id,kwargs", [("robolearn/PandaPickCube-v0", {}),
                                           ("robolearn/PandaPickCubePixels-v0", {"image_size": 32})])
def test_round_trip_from_real_env(tmp_path, env_id, kwargs):
    env = sim.make(env_id, **kwargs)
    try:
        kept = record(env, tmp_path / "ds", episodes=3)
    finally:
        env.close()
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 3 and ds.env_id == env_id and ds.fps == 10.0
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["robot"] == "panda" and meta["action"]["shape"] == [4]
    assert meta["cameras"] == (["front", "wrist"] if kwargs else [])
    assert meta["observation"]["state"]["dtype"] == "float32"
    for i, (ep, log) in enumerate(zip(ds, kept)):
        T = len(log["action"])
        assert set(ep["obs"]) == set(env.observation_space.spaces)
        for k, frames in log["obs"].items():
            np.testing.assert_array_equal(ep["obs"][k], np.stack(frames))  # T+1 entries, bit for bit
            assert ep["obs"][k].dtype == env.observation_space[k].dtype
        np.testing.assert_array_equal(ep["action"], np.array(log["action"], np.float32))
        np.testing.assert_array_equal(ep["reward"], np.array(log["reward"], np.float32))
        for k in ("terminated", "truncated", "success"):
            np.testing.assert_array_equal(ep[k], log[k])
            assert ep[k].dtype == bool
        assert not ep["intervention"].any()
        np.testing.assert_allclose(ep["timestamp"], np.arange(T) / 10.0)
        attrs = ds.episode_attrs(i)
        assert attrs == {"seed": i, "length": T, "success": True, "env_id": env_id}
    if kwargs:  # images: one frame per chunk, compressed
        with h5py.File(ds.paths[0]) as f:
            img = f["obs/images/front"]
            assert img.chunks == (1, 32, 32, 3) and img.compression == "gzip"
    ds.check_compatible(env)


def test_write_expert_episodes_and_append(tmp_path):
    env = sim.make("robolearn/PandaPickCube-v0")
    paths = write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), tmp_path / "ds", episodes=2)
    assert [p.name for p in paths] == ["episode_000000.h5", "episode_000001.h5"]
    ds = Dataset(tmp_path / "ds")
    assert all(ds.episode_attrs(i)["success"] for i in range(2))
    np.testing.assert_array_equal(ds.episode(1)["obs"]["state"][0], env.reset(seed=1)[0]["state"])
    # Appending resumes after the highest index, even past a gap.
    os.rename(paths[1], tmp_path / "ds" / "episode_000007.h5")
    more = write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), tmp_path / "ds", episodes=1, seed=5)
    assert more[0].name == "episode_000008.h5"
    assert [p.name for p in Dataset(tmp_path / "ds").paths] == ["episode_000000.h5", "episode_000007.h5",
                                                                  "episode_000008.h5"]


def small_spaces(state_dim=3, image=(8, 8, 3), action_dim=2):
    obs = gym.spaces.Dict({"images/front": gym.spaces.Box(0, 255, image, np.uint8),
                           "state": gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)})
    return obs, gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)


def write_small(path, episodes=2, length=5, **space_kwargs):
    obs_space, act_space = small_spaces(**space_kwargs)
    w = DatasetWriter(path, "test/Small-v0", obs_space, act_space, fps=20)
    for _ in range(episodes):
        w.begin_episode(obs_space.sample())
        for t in range(length):
            w.add_step(act_space.sample(), obs_space.sample(), 1.0, False, t == length - 1, False,
                       intervention=t % 2 == 0)
        w.end_episode()
    return w


def test_reopening_with_another_spec_names_the_field(tmp_path):
    write_small(tmp_path / "ds")
    with pytest.raises(DatasetError, match="'state'.*shape"):
        DatasetWriter(tmp_path / "ds", "test/Small-v0", *small_spaces(state_dim=4), fps=20)
    with pytest.raises(DatasetError, match="fps"):
        DatasetWriter(tmp_path / "ds", "test/Small-v0", *small_spaces(), fps=30)
    with pytest.raises(DatasetError, match="env_id"):
        DatasetWriter(tmp_path / "ds", "test/Other-v0", *small_spaces(), fps=20)
    with pytest.raises(DatasetError, match="action.shape"):
        DatasetWriter(tmp_path / "ds", "test/Small-v0", *small_spaces(action_dim=3), fps=20)
    w = DatasetWriter(tmp_path / "ds", "test/Small-v0", *small_spaces(), fps=20)
    assert w.next_index == 2


def test_check_compatible_names_key_and_action(tmp_path):
    write_small(tmp_path / "ds")
    ds = Dataset(tmp_path / "ds")

    class Env:
        def __init__(self, obs, act):
            self.observation_space, self.action_space = obs, act

    obs, act = small_spaces()
    ds.check_compatible(Env(obs, act))
    with pytest.raises(DatasetError, match="images/front.*shape"):
        ds.check_compatible(Env(small_spaces(image=(16, 16, 3))[0], act))
    with pytest.raises(DatasetError, match="images/wrist"):
        ds.check_compatible(Env(gym.spaces.Dict({**obs.spaces, "images/wrist": obs["images/front"]}), act))
    with pytest.raises(DatasetError, match="action shape"):
        ds.check_compatible(Env(obs, small_spaces(action_dim=7)[1]))


def test_partial_files_are_ignored_and_discard_writes_nothing(tmp_path):
    w = write_small(tmp_path / "ds")
    (tmp_path / "ds" / ".episode_000009.h5.partial").write_bytes(b"half an episode")
    w.begin_episode(small_spaces()[0].sample())
    assert any(p.name.endswith(".partial") for p in (tmp_path / "ds").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(Dataset(tmp_path / "ds")) == 2  # in-progress and stale partial files are not episodes
    w.discard_episode()
    with pytest.raises(DatasetError, match="no steps"):
        w.begin_episode(small_spaces()[0].sample())
        w.end_episode()
    w.close()
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == [".episode_000009.h5.partial", "episode_000000.h5", "episode_000001.h5", "meta.json"]
    ep = Dataset(tmp_path / "ds").episode(1)
    np.testing.assert_array_equal(ep["intervention"], [True, False, True, False, True])


def test_corrupt_episode_is_skipped_with_a_warning(tmp_path):
    write_small(tmp_path / "ds", episodes=3)
    bad = tmp_path / "ds" / "episode_000001.h5"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="episode_000001.h5"):
        ds = Dataset(tmp_path / "ds")
    assert [p.name for p in ds.paths] == ["episode_000000.h5", "episode_000002.h5"]
    assert len(list(ds)) == 2
    with pytest.raises(DatasetError, match="episode_000001.h5"):
        Dataset(tmp_path / "ds", strict=True)
    # A writer never reuses the damaged file's index.
    assert DatasetWriter(tmp_path / "ds", "test/Small-v0", *small_spaces(), fps=20).next_index == 3


def test_kill_9_loses_only_the_episode_in_progress(tmp_path):
    path = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import sys, time
        import gymnasium as gym, numpy as np
        from robolearn.demos.dataset import DatasetWriter
        obs_space = gym.spaces.Dict({{"images/front": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
                                      "state": gym.spaces.Box(-1, 1, (3,), np.float32)}})
        act_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        w = DatasetWriter({str(path)!r}, "test/Small-v0", obs_space, act_space, fps=20)
        for ep in range(3):
            w.begin_episode(obs_space.sample())
            for t in range(100):
                w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, t == 99, False)
            if ep < 2:
                w.end_episode()
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert (path / ".episode_000002.h5.partial").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = Dataset(path, strict=True)
    assert len(ds) == 2
    assert [len(ep["action"]) for ep in ds] == [100, 100]
    # Recording resumes where the dead process left off.
    assert write_small(path, episodes=1).next_index == 3


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="meta.json"):
        Dataset(tmp_path)
