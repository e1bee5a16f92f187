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


def write_small(path, episodes=2, length=5, robot=False, compression="gzip", **space_kwargs):
    obs_space, act_space = small_spaces(**space_kwargs)
    w = DatasetWriter(path, "test/Small-v0", obs_space, act_space, fps=20, compression=compression)
    for _ in range(episodes):
        w.begin_episode(obs_space.sample(), robot=arm_state() if robot else None)
        for t in range(length):
            w.add_step(act_space.sample(), obs_space.sample(), 1.0, False, t == length - 1, False,
                       intervention=t % 2 == 0, robot=arm_state(stamp=t) if robot else None)
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


# -- the robot state ------------------------------------------------------------------------

PANDA_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]


def direct_rollout(env, seed: int) -> tuple[list, list]:
    """The scripted expert's actions and the env's ArmState after reset and after every step."""
    policy = env.unwrapped.task.expert(env.unwrapped)
    obs, _ = env.reset(seed=seed)
    states, actions, done = [env.unwrapped.state], [], False
    while not done:
        actions.append(policy(obs))
        obs, _, term, trunc, _ = env.step(actions[-1])
        states.append(env.unwrapped.state)
        done = term or trunc
    return actions, states


def test_recorded_robot_state_equals_the_envs_state(tmp_path):
    from robolearn.rollout import run_episodes, scripted_policy

    env = sim.make("robolearn/PandaPickCube-v0")
    write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), tmp_path / "expert", episodes=1, seed=3)
    with DatasetWriter(tmp_path / "rollout", env.spec.id, env.observation_space, env.action_space, fps=10) as w:
        run_episodes(env, scripted_policy(env), 1, seed=3, recorder=w)
    actions, states = direct_rollout(env, seed=3)
    env.close()
    assert len(states) > 10 and not np.allclose(states[0].position, states[-1].position)  # the arm moved
    for name in ("expert", "rollout"):
        ds = Dataset(tmp_path / name, strict=True)
        assert ds.joint_names == PANDA_JOINTS
        assert json.loads((tmp_path / name / "meta.json").read_text())["robot_state"] == {"joint_names": PANDA_JOINTS}
        ep = ds.episode(0)
        np.testing.assert_array_equal(ep["action"], np.array(actions, np.float32))
        robot = ep["robot"]
        assert {k: (v.shape, v.dtype) for k, v in robot.items()} == {
            "joint_position": ((len(states), 7), np.float64), "joint_velocity": ((len(states), 7), np.float64),
            "tool_pose": ((len(states), 7), np.float64), "gripper": ((len(states),), np.float64),
            "stamp": ((len(states),), np.float64)}
        np.testing.assert_array_equal(robot["joint_position"], [s.position for s in states])
        np.testing.assert_array_equal(robot["joint_velocity"], [s.velocity for s in states])
        np.testing.assert_array_equal(robot["tool_pose"], [s.tool_pose for s in states])
        np.testing.assert_array_equal(robot["gripper"], [s.gripper for s in states])
        np.testing.assert_array_equal(robot["stamp"], [s.stamp for s in states])


def test_envs_without_an_arm_record_no_robot_state(tmp_path):
    from robolearn.demos.dataset import robot_state

    env = gym.make("CartPole-v1")  # its unwrapped `state` is a numpy array, not an arm state
    env.reset(seed=0)
    assert robot_state(env) is None and robot_state(object()) is None
    env.close()
    write_small(tmp_path / "ds")
    assert "robot_state" not in json.loads((tmp_path / "ds" / "meta.json").read_text())
    with h5py.File(tmp_path / "ds" / "episode_000000.h5") as f:
        assert "robot" not in f


def arm_state(n=7, names=None, **overrides):
    from robolearn.robot.interfaces import ArmState

    fields = dict(joint_names=tuple(names or PANDA_JOINTS[:n]), position=np.arange(n, dtype=float),
                  velocity=np.ones(n), tool_pos=np.array([0.1, 0.2, 0.3]), tool_quat=np.array([0.0, 1.0, 0.0, 0.0]),
                  tool_vel=np.zeros(3), gripper=0.04, stamp=1.5)
    return ArmState(**{**fields, **overrides})


def test_a_version_1_dataset_without_robot_state_reads_and_takes_robot_episodes(tmp_path):
    write_small(tmp_path / "ds", episodes=1, length=4)  # what robolearn wrote before the robot group
    old = Dataset(tmp_path / "ds", strict=True)
    assert old.joint_names is None and "robot" not in old.episode(0)
    obs_space, act_space = small_spaces()
    with DatasetWriter(tmp_path / "ds", "test/Small-v0", obs_space, act_space, fps=20) as w:
        w.begin_episode(obs_space.sample(), robot=arm_state())
        for t in range(3):
            w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, t == 2, False,
                       robot=arm_state(stamp=2.0 + t))
        w.end_episode()
    ds = Dataset(tmp_path / "ds", strict=True)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["robot_state"]["joint_names"] == PANDA_JOINTS
    assert "robot" not in ds.episode(0)
    robot = ds.episode(1)["robot"]
    np.testing.assert_array_equal(robot["stamp"], [1.5, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(robot["tool_pose"][0], [0.1, 0.2, 0.3, 0.0, 1.0, 0.0, 0.0])  # pos, (w, x, y, z)
    np.testing.assert_array_equal(robot["joint_position"][-1], np.arange(7))


def test_robot_state_mismatches_name_the_field(tmp_path):
    obs_space, act_space = small_spaces()
    w = DatasetWriter(tmp_path / "ds", "test/Small-v0", obs_space, act_space, fps=20)
    w.begin_episode(obs_space.sample(), robot=arm_state())
    with pytest.raises(DatasetError, match="robot/joint_position has shape \\(6,\\)"):
        w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, False, False,
                   robot=arm_state(position=np.zeros(6)))
    with pytest.raises(DatasetError, match="robot_state.joint_names"):
        w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, False, False,
                   robot=arm_state(names=[f"j{i}" for i in range(7)]))
    with pytest.raises(DatasetError, match="began with a robot state"):
        w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, False, False)
    for t in range(2):
        w.add_step(act_space.sample(), obs_space.sample(), 0.0, False, t == 1, False, robot=arm_state())
    path = w.end_episode()
    w.close()
    # A robot array of the wrong width (a file edited by hand, or from another writer) is named.
    with h5py.File(path, "a") as f:
        del f["robot/joint_velocity"]
        f["robot/joint_velocity"] = np.zeros((3, 6))
    with pytest.raises(DatasetError, match="episode_000000.h5: robot/joint_velocity has shape \\(3, 6\\), "
                                           "expected \\(3, 7\\)"):
        Dataset(tmp_path / "ds", strict=True)
    with pytest.warns(UserWarning, match="episode_000000.h5.*robot/joint_velocity"):
        assert len(Dataset(tmp_path / "ds")) == 0


# -- damaged datasets: one check per episode when a dataset is opened --------------------------

def _set(name, row, value):
    def damage(f):
        f[name][row] = value
    return damage


def _reshape_action(f):
    del f["action"]
    f["action"] = np.zeros((5, 3), np.float32)


def _empty(f):
    for key in ("action", "reward", "terminated", "truncated", "success", "intervention", "timestamp"):
        f[key].resize(0, axis=0)
    for group in ("obs/images/front", "obs/state", *(f"robot/{k}" for k in f["robot"])):
        f[group].resize(1, axis=0)
    f.attrs["length"] = 0


@pytest.mark.parametrize("damage, message", [
    (_set("action", 2, [np.nan, 0.0]), r"action\[2\] is nan"),
    (_set("reward", 4, np.inf), r"reward\[4\] is inf"),
    (_set("obs/state", 5, [0.0, -np.inf, 0.0]), r"obs/state\[5\] is -inf"),
    (_set("robot/joint_position", 0, np.full(7, np.nan)), r"robot/joint_position\[0\] is nan"),
    (_set("robot/tool_pose", 3, [0, 0, np.inf, 1, 0, 0, 0]), r"robot/tool_pose\[3\] is inf"),
    (_reshape_action, r"action has shape \(5, 3\), expected \(5, 2\)"),
    (_empty, "the episode has no steps"),
], ids=["nan-action", "inf-reward", "inf-obs", "nan-robot", "inf-tool-pose", "action-shape", "length-0"])
def test_damaged_arrays_are_refused_naming_the_file_and_field(tmp_path, capsys, damage, message):
    from robolearn.cli import main

    write_small(tmp_path / "ds", episodes=3, robot=True)
    with h5py.File(tmp_path / "ds" / "episode_000001.h5", "a") as f:
        damage(f)
    with pytest.raises(DatasetError, match="episode_000001.h5: " + message):
        Dataset(tmp_path / "ds", strict=True)
    with pytest.warns(UserWarning, match="episode_000001.h5: " + message):
        ds = Dataset(tmp_path / "ds")
    assert [p.name for p in ds.paths] == ["episode_000000.h5", "episode_000002.h5"]
    assert len(ds.skipped) == 1 and "episode_000001.h5" in ds.skipped[0]
    capsys.readouterr()
    assert main(["demos", "info", str(tmp_path / "ds"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "episode_000001.h5" in err and "Traceback" not in err, err


def _flip_a_byte(file, name, chunk=0):
    """Flip the lowest bit of the first byte of a chunk: for a float that is the mantissa's last bit,
    so the damaged value is still finite and plausible."""
    with h5py.File(file, "r") as f:
        offset = f[name].id.get_chunk_info(chunk).byte_offset
    with open(file, "r+b") as raw:
        raw.seek(offset)
        byte = raw.read(1)[0]
        raw.seek(offset)
        raw.write(bytes([byte ^ 1]))


@pytest.mark.parametrize("name", ["action", "reward", "obs/state", "robot/joint_velocity", "robot/stamp"])
def test_flipped_bytes_are_found_by_the_checksum(tmp_path, name):
    write_small(tmp_path / "ds", episodes=3, robot=True)
    _flip_a_byte(tmp_path / "ds" / "episode_000002.h5", name)
    with pytest.raises(DatasetError, match=f"episode_000002.h5: {name}.*corrupt"):
        Dataset(tmp_path / "ds", strict=True)
    with pytest.warns(UserWarning, match=f"episode_000002.h5: {name}"):
        assert len(Dataset(tmp_path / "ds")) == 2


def test_flipped_bytes_in_uncompressed_images_are_found_when_read(tmp_path, capsys):
    from robolearn.cli import main

    write_small(tmp_path / "ds", episodes=2, compression=None)
    _flip_a_byte(tmp_path / "ds" / "episode_000000.h5", "obs/images/front", chunk=3)
    ds = Dataset(tmp_path / "ds", strict=True)  # opening reads no image (that would be slow)
    with pytest.raises(DatasetError, match="episode_000000.h5: obs/images/front.*corrupt"):
        ds.episode(0)
    with pytest.warns(UserWarning, match="episode_000000.h5: obs/images/front"):
        assert len(list(Dataset(tmp_path / "ds"))) == 1
    with pytest.raises(DatasetError, match="episode_000000.h5: obs/images/front"):
        list(ds)
    assert main(["demos", "info", str(tmp_path / "ds"), "--strict"]) == 2  # --strict reads every frame
    assert "episode_000000.h5: obs/images/front" in capsys.readouterr().err


def test_every_array_carries_a_checksum_and_files_without_one_still_read(tmp_path, monkeypatch):
    import robolearn.demos.dataset as dataset

    write_small(tmp_path / "new", episodes=1, robot=True)
    with h5py.File(tmp_path / "new" / "episode_000000.h5") as f:
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj) if isinstance(obj, h5py.Dataset) else None)
        assert len(arrays) == 14 and all(a.fletcher32 for a in arrays)
    monkeypatch.setattr(dataset, "CHECKSUMS", False)  # as robolearn wrote episodes before checksums
    write_small(tmp_path / "old", episodes=2, robot=True)
    with h5py.File(tmp_path / "old" / "episode_000000.h5") as f:
        assert not f["action"].fletcher32 and not f["robot/stamp"].fletcher32
    monkeypatch.undo()
    old = Dataset(tmp_path / "old", strict=True)
    assert len(old) == 2 and len(list(old)) == 2 and old.episode(1)["robot"]["stamp"][-1] == 4.0
    write_small(tmp_path / "old", episodes=1, robot=True)  # appending: new episodes get checksums
    with h5py.File(tmp_path / "old" / "episode_000002.h5") as f:
        assert f["action"].fletcher32
    assert len(Dataset(tmp_path / "old", strict=True)) == 3


@pytest.mark.parametrize("attrs", ["{not json", "[1, 2]"])
def test_malformed_attrs_json_names_the_file(tmp_path, attrs):
    write_small(tmp_path / "ds", episodes=1)
    with h5py.File(tmp_path / "ds" / "episode_000000.h5", "a") as f:
        f.attrs["attrs"] = attrs
    with pytest.raises(DatasetError, match="episode_000000.h5: attrs"):
        Dataset(tmp_path / "ds").episode_attrs(0)
