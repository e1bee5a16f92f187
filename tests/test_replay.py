"""Replay: frames stored once, n-step returns against a brute-force reference, wraparound, demo mixing."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from robolearn.demos.dataset import Dataset, DatasetError, DatasetWriter
from robolearn.replay import MixedReplay, ReplayBuffer, ReplayConfig, ReplayFileError, load_dataset

H = 4  # tiny frames for the logic tests


def spaces(k: int, size: int = H, state_dim: int = 2, action_dim: int = 2, cam: str = "images/cam"):
    obs = gym.spaces.Dict({cam: gym.spaces.Box(0, 255, (size, size, 3 * k), np.uint8),
                           "state": gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)})
    return obs, gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)


def frame(ep: int, t: int) -> np.ndarray:
    """A frame whose pixels say which (episode, step) it shows."""
    f = np.empty((H, H, 3), np.uint8)
    f[..., 0], f[..., 1], f[..., 2] = ep % 256, t % 256, 255 - ep % 256
    return f


class FakeEpisodes:
    """Feeds random episodes to a buffer the way an env loop would, logging everything for a reference."""

    def __init__(self, buf: ReplayBuffer, k: int, rng: np.random.Generator):
        self.buf, self.k, self.rng = buf, k, rng
        self.written: list[tuple[int, int]] = []  # (episode, step) of every observation, in write order
        self.rewards: dict[int, list[float]] = {}
        self.actions: dict[int, list[np.ndarray]] = {}
        self.end: dict[int, str] = {}  # "terminated", "truncated", "abandoned" or "open"
        self.ep = -1

    def _obs(self, ep: int, t: int) -> dict:
        self.stack.append(frame(ep, t))
        return {"images/cam": np.concatenate(self.stack, axis=-1), "state": np.array([ep, t], np.float32)}

    def episode(self, length: int, end: str) -> None:
        if self.ep >= 0 and self.end[self.ep] == "open":
            self.end[self.ep] = "abandoned"  # add_first ends it without a terminal flag
        self.ep += 1
        ep = self.ep
        self.stack = deque([frame(ep, 0)] * self.k, maxlen=self.k)  # as DMCEnv.reset
        self.buf.add_first(self._obs(ep, 0))
        self.written.append((ep, 0))
        self.rewards[ep], self.actions[ep], self.end[ep] = [], [], end
        for t in range(length):
            a = self.rng.uniform(-1, 1, 2).astype(np.float32)
            r = float(self.rng.normal())
            last = t == length - 1
            self.buf.add(a, r, self._obs(ep, t + 1), last and end == "terminated", last and end == "truncated")
            self.written.append((ep, t + 1))
            self.rewards[ep].append(r)
            self.actions[ep].append(a)

    def reference(self, n: int, gamma: float) -> dict[tuple[int, int], tuple[float, float, int]]:
        """Every sampleable (episode, step) -> (n-step return, discount, steps used), by brute force."""
        alive = set(self.written[-self.buf.capacity:])
        ref = {}
        for ep, rewards in self.rewards.items():
            T = len(rewards)
            for t in range(T):
                if self.end[ep] == "open":
                    if t + n > T:
                        continue  # the n-step window is not complete yet
                    m = n
                else:
                    m = min(n, T - t)
                needed = [(ep, s) for s in range(max(0, t - (self.k - 1)), t + m + 1)]
                if not all(x in alive for x in needed):
                    continue
                ret = sum(gamma ** i * rewards[t + i] for i in range(m))
                terminal = self.end[ep] == "terminated" and t + m == T
                ref[(ep, t)] = (ret, 0.0 if terminal else gamma ** m, m)
        return ref


def decode_stack(images: np.ndarray, k: int) -> np.ndarray:
    """(B, H, W, 3k) -> (B, k, 2): the (episode % 256, step) of every frame in each stack."""
    frames = images.reshape(len(images), H, H, k, 3)
    assert (frames == frames[:, :1, :1]).all(), "a frame is not uniform: pixels from two time steps"
    assert (frames[..., 2] == 255 - frames[..., 0]).all()
    return frames[:, 0, 0, :, :2].astype(np.int64)


def check_stack(images: np.ndarray, ep: np.ndarray, t: np.ndarray, k: int) -> None:
    got = decode_stack(images, k)
    for s in range(k):
        np.testing.assert_array_equal(got[:, s, 0], ep % 256)
        np.testing.assert_array_equal(got[:, s, 1], np.maximum(t - (k - 1 - s), 0) % 256)  # first frame repeated


@pytest.mark.parametrize("k,n,capacity,seed", [(1, 1, 7, 0), (3, 1, 13, 1), (3, 3, 23, 2), (3, 3, 11, 3),
                                               (1, 3, 50, 4), (2, 5, 31, 5), (3, 3, 400, 6)])
def test_nstep_and_stacking_against_brute_force(k, n, capacity, seed):
    rng = np.random.default_rng(seed)
    gamma = 0.9
    buf = ReplayBuffer(capacity, *spaces(k), frame_stack=k, nstep=n, gamma=gamma, device="cpu")
    feed = FakeEpisodes(buf, k, rng)
    for i in range(40):
        end = rng.choice(["terminated", "truncated", "abandoned"])
        length = int(rng.integers(1, 12)) if i != 20 else capacity + 5  # one episode longer than the ring
        feed.episode(length, "open" if end == "abandoned" else end)
        if i % 10 == 9:
            check_buffer(buf, feed, k, n, gamma, rng)
    feed.episode(int(rng.integers(1, 8)), "open")  # the last episode is still running
    check_buffer(buf, feed, k, n, gamma, rng)


def check_buffer(buf, feed, k, n, gamma, rng, samples=3000):
    ref = feed.reference(n, gamma)
    assert len(buf) == len(ref)
    batch = buf.sample_arrays(samples, rng)
    state, next_state = batch["obs"]["state"].astype(np.int64), batch["next_obs"]["state"].astype(np.int64)
    ep, t = state[:, 0], state[:, 1]
    keys = list(zip(ep.tolist(), t.tolist()))
    invalid = {key for key in keys if key not in ref}
    assert not invalid, f"sampled transitions that are not valid: {sorted(invalid)[:5]}"
    expected = np.array([ref[key] for key in keys])
    np.testing.assert_allclose(batch["reward"], expected[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["discount"], expected[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(next_state[:, 0], ep)  # never across an episode boundary
    np.testing.assert_array_equal(next_state[:, 1], t + expected[:, 2])
    np.testing.assert_array_equal(batch["action"], [feed.actions[e][s] for e, s in keys])
    assert set(keys) == set(ref)  # uniform enough to reach every valid transition
    check_stack(batch["obs"]["images/cam"], ep, t, k)
    check_stack(batch["next_obs"]["images/cam"], next_state[:, 0], next_state[:, 1], k)


def test_bytes_per_transition_is_one_frame():
    obs_space, act_space = spaces(3, size=84, state_dim=24, action_dim=6, cam="images/pixels")
    buf = ReplayBuffer(10_000, obs_space, act_space, frame_stack=3, nstep=3, device="cpu")
    per = buf.nbytes() / buf.capacity
    frame_bytes = 84 * 84 * 3
    print(f"\nbytes per stored transition: {per:.0f} (one frame: {frame_bytes}, a stack: {3 * frame_bytes})")
    assert frame_bytes <= per < 25_000


def test_sample_batch_layout():
    obs_space, act_space = spaces(3, size=84, state_dim=24, action_dim=6, cam="images/pixels")
    buf = ReplayBuffer(3000, obs_space, act_space, frame_stack=3, nstep=3, gamma=0.99, device="cpu")
    rng = np.random.default_rng(0)
    obs = lambda: {"images/pixels": rng.integers(0, 256, (84, 84, 9), dtype=np.uint8),  # noqa: E731
                   "state": rng.normal(size=24).astype(np.float32)}
    buf.add_first(obs())
    for i in range(3200):  # wraps around
        done = i % 250 == 249
        buf.add(rng.uniform(-1, 1, 6), 1.0, obs(), False, done)
        if done:
            buf.add_first(obs())
    batch = buf.sample(256, rng)
    assert set(batch) == {"obs", "next_obs", "action", "reward", "discount"}
    for part in ("obs", "next_obs"):
        img, state = batch[part]["images/pixels"], batch[part]["state"]
        assert img.shape == (256, 84, 84, 9) and img.dtype == torch.uint8
        assert img.permute(0, 3, 1, 2).is_contiguous()  # channel-first memory: the encoder's permute is free
        assert state.shape == (256, 24) and state.dtype == torch.float32
    assert batch["action"].shape == (256, 6) and batch["action"].dtype == torch.float32
    assert batch["reward"].shape == (256,) and batch["discount"].dtype == torch.float32
    # Its speed (a few ms on one core) is bench/replay_sample.py's: no wall-clock threshold here.


def test_a_held_batch_is_never_overwritten():
    buf = filled(k=3, capacity=60)
    rng = np.random.default_rng(0)
    held = buf.sample(32, rng)
    copy = {k: v.clone() for k, v in held["obs"].items()}
    reward = held["reward"].clone()
    buf.sample(32, rng)
    assert torch.equal(held["reward"], reward)
    assert all(torch.equal(held["obs"][k], copy[k]) for k in copy)
    # A batch nobody holds any more is recycled: no fresh allocation per update.
    # (pointers taken outside `assert`: pytest's assertion rewriting keeps intermediate values alive)
    first, second = (buf.sample(32, rng)["reward"].data_ptr() for _ in range(2))
    assert first == second != held["reward"].data_ptr()


def test_stacks_equal_what_dmc_env_returns():
    from robolearn.sim.dmc import DMCEnv
    env = DMCEnv("cartpole_swingup", image_size=16, frame_stack=3, time_limit=0.16)
    try:
        buf = ReplayBuffer(64, env.observation_space, env.action_space, frame_stack=3, nstep=2, device="cpu")
        seen = {}
        for ep in range(3):
            obs, _ = env.reset(seed=ep)
            buf.add_first(obs)
            seen[obs["state"].tobytes()] = obs["images/pixels"]
            done = False
            while not done:
                obs, r, term, trunc, _ = env.step(env.action_space.sample())
                buf.add(np.zeros(1), r, obs, term, trunc)
                seen[obs["state"].tobytes()] = obs["images/pixels"]
                done = term or trunc
        batch = buf.sample_arrays(200, np.random.default_rng(0))
        for part in ("obs", "next_obs"):
            for state, img in zip(batch[part]["state"], batch[part]["images/pixels"]):
                np.testing.assert_array_equal(img, seen[state.tobytes()])
    finally:
        env.close()


def test_api_errors_name_the_problem():
    buf = ReplayBuffer(20, *spaces(1), device="cpu")
    obs = {"images/cam": np.zeros((H, H, 3), np.uint8), "state": np.zeros(2, np.float32)}
    with pytest.raises(RuntimeError, match="add_first"):
        buf.add(np.zeros(2), 0.0, obs, False, False)
    with pytest.raises(KeyError, match="images/cam"):
        buf.add_first({"state": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="state"):
        buf.add_first({**obs, "state": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no sampleable"):
        buf.sample(4)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3, *spaces(3), frame_stack=3, nstep=3)
    cfg = ReplayConfig(capacity=50, frame_stack=3, nstep=3)
    assert ReplayBuffer.from_config(cfg, *spaces(3), device="cpu").nstep == 3


def filled(k=1, n=1, capacity=30, episodes=8, marker=0.0, seed=0, intervention=False):
    buf = ReplayBuffer(capacity, *spaces(k), frame_stack=k, nstep=n, gamma=0.9, device="cpu")
    feed = FakeEpisodes(buf, k, np.random.default_rng(seed))
    for _ in range(episodes):
        feed.episode(5, "truncated")
    if marker:
        buf._obs["state"][:, 0] = marker  # tags every row for the mixing test
    return buf


@pytest.mark.parametrize("batch,ratio", [(256, 0.5), (10, 0.33), (7, 0.5), (64, 0.0), (64, 1.0)])
def test_mixed_ratio_is_exact(batch, ratio):
    online, demo = filled(marker=-1.0), filled(marker=-2.0, seed=1)
    mixed = MixedReplay(online, demo, demo_ratio=ratio)
    out = mixed.sample(batch, np.random.default_rng(0))
    tags = out["obs"]["state"][:, 0].numpy()
    n_demo = round(batch * ratio)
    assert (tags[:n_demo] == -2.0).all() and (tags[n_demo:] == -1.0).all()
    assert out["obs"]["images/cam"].shape == (batch, H, H, 3)


def test_interventions_go_to_both_buffers():
    obs_space, act_space = spaces(1)
    online = ReplayBuffer(50, obs_space, act_space, device="cpu")
    demo = ReplayBuffer(50, obs_space, act_space, device="cpu")
    mixed = MixedReplay(online, demo)
    o = lambda t: {"images/cam": frame(0, t), "state": np.array([0, t], np.float32)}  # noqa: E731
    mixed.add_first(o(0))
    flags = [False, True, True, False, True, False]
    for t, flag in enumerate(flags):
        mixed.add(np.full(2, t, np.float32), float(t), o(t + 1), False, t == len(flags) - 1, intervention=flag)
    assert len(online) == 6 and len(demo) == 3
    batch = demo.sample_arrays(200, np.random.default_rng(0))
    pairs = {(int(s[1]), int(n[1])) for s, n in zip(batch["obs"]["state"], batch["next_obs"]["state"])}
    assert pairs == {(1, 2), (2, 3), (4, 5)}  # the intervention steps, each from its true observation
    assert set(batch["reward"].tolist()) == {1.0, 2.0, 4.0}


def write_dataset(path, obs_space, act_space, episodes=3, length=6, k=1):
    rng = np.random.default_rng(0)
    cam = next(key for key in obs_space.spaces if key.startswith("images/"))
    with DatasetWriter(path, "test/Fake-v0", obs_space, act_space, fps=10) as w:
        for ep in range(episodes):
            stack = deque([frame(ep, 0)] * k, maxlen=k)
            w.begin_episode({cam: np.concatenate(stack, -1), "state": np.array([ep, 0], np.float32)})
            for t in range(length):
                stack.append(frame(ep, t + 1))
                obs = {cam: np.concatenate(stack, -1), "state": np.array([ep, t + 1], np.float32)}
                w.add_step(rng.uniform(-1, 1, 2), obs, float(t), False, t == length - 1, False)
            w.end_episode()
    return Dataset(path)


def test_from_dataset_holds_every_transition(tmp_path):
    ds = write_dataset(tmp_path / "ds", *spaces(3), k=3)
    buf = ReplayBuffer.from_dataset(ds, *spaces(3), frame_stack=3, nstep=3, gamma=0.5, device="cpu")
    assert len(buf) == ds.num_steps == 18
    batch = buf.sample_arrays(500, np.random.default_rng(0))
    ep, t = batch["obs"]["state"][:, 0].astype(int), batch["obs"]["state"][:, 1].astype(int)
    check_stack(batch["obs"]["images/cam"], ep, t, 3)
    m = np.minimum(3, 6 - t)
    expected = sum(np.where(i < m, 0.5 ** i * (t + i), 0.0) for i in range(3))
    np.testing.assert_allclose(batch["reward"], expected)
    np.testing.assert_allclose(batch["discount"], 0.5 ** m)  # truncated at the end: bootstraps
    actions = [e["action"] for e in ds]
    np.testing.assert_array_equal(batch["action"], [actions[e][s] for e, s in zip(ep, t)])
    again = ReplayBuffer(100, *spaces(3), frame_stack=3, device="cpu")
    load_dataset(again, tmp_path / "ds")
    assert len(again) == 18


def test_from_dataset_mismatch_names_the_key(tmp_path):
    ds = write_dataset(tmp_path / "ds", *spaces(1))
    with pytest.raises(DatasetError, match="images/wrist"):
        ReplayBuffer.from_dataset(ds, *spaces(1, cam="images/wrist"), device="cpu")
    with pytest.raises(DatasetError, match="'state'.*shape"):
        ReplayBuffer.from_dataset(ds, *spaces(1, state_dim=5), device="cpu")
    with pytest.raises(DatasetError, match="action shape"):
        ReplayBuffer.from_dataset(ds, *spaces(1, action_dim=3), device="cpu")


def assert_same_buffer(a: ReplayBuffer, b: ReplayBuffer):
    for key in a._obs:
        np.testing.assert_array_equal(a._obs[key], b._obs[key])
    for name in ("action", "reward", "terminated", "has_action", "sampleable", "intervention", "episode", "step"):
        np.testing.assert_array_equal(getattr(a, "_" + name), getattr(b, "_" + name))
    assert (a._ptr, a._size, len(a), a._next_episode, a._open, a._cur) == \
        (b._ptr, b._size, len(b), b._next_episode, b._open, b._cur)


@pytest.mark.parametrize("capacity", [23, 500])  # wrapped around, and partly filled
def test_save_load_round_trip(tmp_path, capacity):
    src = ReplayBuffer(capacity, *spaces(3), frame_stack=3, nstep=3, gamma=0.9, device="cpu")
    feed = FakeEpisodes(src, 3, np.random.default_rng(0))
    for i in range(12):
        feed.episode(4 + i % 5, ["terminated", "truncated"][i % 2])
    feed.episode(3, "open")
    src.save(tmp_path / "replay.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["replay.h5"]  # the temp file was renamed
    dst = ReplayBuffer(capacity, *spaces(3), frame_stack=3, nstep=3, gamma=0.9, device="cpu")
    dst.load(tmp_path / "replay.h5")
    assert_same_buffer(src, dst)
    a, b = src.sample(64, np.random.default_rng(1)), dst.sample(64, np.random.default_rng(1))
    for key in ("action", "reward", "discount"):
        assert torch.equal(a[key], b[key])
    assert torch.equal(a["next_obs"]["images/cam"], b["next_obs"]["images/cam"])
    # Both continue the open episode identically.
    obs = {"images/cam": np.zeros((H, H, 9), np.uint8), "state": np.zeros(2, np.float32)}
    for buf in (src, dst):
        buf.add(np.zeros(2), 1.0, obs, True, False)
    assert_same_buffer(src, dst)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity - 1, *spaces(3), frame_stack=3, nstep=3, device="cpu").load(tmp_path / "replay.h5")
    if capacity == 23:  # wrapped: its slot order is not time order, so it cannot grow either
        with pytest.raises(ValueError, match="capacity"):
            ReplayBuffer(capacity + 1, *spaces(3), frame_stack=3, nstep=3, device="cpu").load(tmp_path / "replay.h5")


def test_mixed_save_load(tmp_path):
    mixed = MixedReplay(filled(capacity=40), filled(capacity=40, seed=3), demo_ratio=0.25)
    mixed.save(tmp_path / "mixed.h5")
    other = MixedReplay(filled(capacity=40, episodes=0), filled(capacity=40, episodes=0), demo_ratio=0.25)
    other.load(tmp_path / "mixed.h5")
    assert_same_buffer(mixed.online, other.online)
    assert_same_buffer(mixed.demo, other.demo)


@pytest.mark.parametrize("k,n,capacity", [(1, 1, 200), (3, 3, 200), (3, 2, 23)])
def test_add_episode_equals_step_by_step(k, n, capacity):
    """The whole-episode path (used to load demos) leaves the buffer exactly as add_first + add does,
    including episodes that wrap the ring (capacity 23), an open episode before it, and flags."""
    rng = np.random.default_rng(k * 10 + n)
    whole, steps = (ReplayBuffer(capacity, *spaces(k), frame_stack=k, nstep=n, device="cpu") for _ in range(2))
    for e in range(6):
        T = int(rng.integers(1, 9))
        obs = {"images/cam": np.stack([np.concatenate([frame(e, t)] * k, -1) for t in range(T + 1)]),
               "state": rng.normal(size=(T + 1, 2)).astype(np.float32)}
        action, reward = rng.uniform(-1, 1, (T, 2)).astype(np.float32), rng.normal(size=T).astype(np.float32)
        terminated, truncated = np.zeros(T, bool), np.zeros(T, bool)
        (terminated if e % 3 == 0 else truncated)[-1] = e % 3 != 2  # terminal, time limit, or neither
        intervention = rng.random(T) < 0.5
        if e == 4:  # an episode left open in both buffers: add_episode must end it first
            for buf in (whole, steps):
                buf.add_first({key: v[0] for key, v in obs.items()})
        whole.add_episode(obs, action, reward, terminated, truncated, intervention)
        steps.add_first({key: v[0] for key, v in obs.items()})
        for t in range(T):
            steps.add(action[t], float(reward[t]), {key: v[t + 1] for key, v in obs.items()}, bool(terminated[t]),
                      bool(truncated[t]), bool(intervention[t]))
        steps.end_episode()
        assert len(whole) == len(steps) and whole.size == steps.size
        assert_same_buffer(whole, steps)
    for name in ("_ptr", "_cur", "_next_episode", "_open", "_count"):
        assert getattr(whole, name) == getattr(steps, name)


def _flip_first_byte(file, name):
    with h5py.File(file, "r") as f:
        offset = f[name].id.get_chunk_info(0).byte_offset
    with open(file, "r+b") as raw:
        raw.seek(offset)
        byte = raw.read(1)[0]
        raw.seek(offset)
        raw.write(bytes([byte ^ 1]))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing array", "bad state"])
def test_a_damaged_replay_file_is_a_one_line_error_naming_it(tmp_path, damage):
    src = filled(k=3, n=3, capacity=40)
    src.save(tmp_path / "replay.h5")
    mixed = MixedReplay(filled(capacity=40), filled(capacity=40, seed=3))
    mixed.save(tmp_path / "mixed.h5")
    for file in (tmp_path / "replay.h5", tmp_path / "mixed.h5"):
        prefix = "demo/" if file.name == "mixed.h5" else ""
        if damage == "truncated":
            file.write_bytes(file.read_bytes()[:3000])
        elif damage == "flipped":  # inside uncompressed float data: only a checksum can tell
            _flip_first_byte(file, prefix + "reward")
        elif damage == "missing array":
            with h5py.File(file, "a") as f:
                del f[prefix + "obs/state"]
        else:
            with h5py.File(file, "a") as f:
                f[prefix or "/"].attrs["state"] = "{"
    for file, fresh in ((tmp_path / "replay.h5", filled(k=3, n=3, capacity=40, episodes=0)),
                        (tmp_path / "mixed.h5", MixedReplay(filled(capacity=40, episodes=0),
                                                            filled(capacity=40, episodes=0)))):
        with pytest.raises(ValueError, match=f"{file.name}.*damaged") as info:
            fresh.load(file)
        assert len(str(info.value).splitlines()) == 1


def test_windows_pad_with_the_first_observation_and_the_last_action_and_stop_at_episodes():
    """Diffusion Policy's windows: obs t-1..t, actions t-1..t+3, padded inside each episode only, also
    across the ring's wrap (capacity 7 holds the second episode at slots 5, 6, 0, 1)."""
    obs_space, act_space = spaces(1, state_dim=1, action_dim=1)
    buf = ReplayBuffer(7, obs_space, act_space, device="cpu")
    for ep, T in ((0, 4), (1, 3)):
        buf.add_first({"images/cam": frame(ep, 0), "state": np.array([100.0 * ep], np.float32)})
        for t in range(T):
            buf.add(np.array([10.0 * ep + t], np.float32), 1.0 + t,
                    {"images/cam": frame(ep, t + 1), "state": np.array([100.0 * ep + t + 1], np.float32)},
                    terminated=ep == 1 and t == T - 1, truncated=False)
        buf.end_episode()
    slots = {int(buf._step[i]): i for i in range(7) if buf._episode[i] == 1}
    assert slots == {0: 5, 1: 6, 2: 0, 3: 1}  # wrapped
    w = buf.window_arrays(np.array([slots[0], slots[1], slots[2]]), obs_horizon=2, action_horizon=5)
    assert w["obs"]["state"][..., 0].tolist() == [[100, 100], [100, 101], [101, 102]]
    assert w["obs"]["images/cam"].shape == (3, 2, H, H, 3)
    assert w["obs"]["images/cam"][:, :, 0, 0, 1].tolist() == [[0, 0], [0, 1], [1, 2]]  # the frames' step
    assert w["action"][..., 0].tolist() == [[10, 10, 11, 12, 12], [10, 11, 12, 12, 12], [11, 12, 12, 12, 12]]
    assert w["reward"].tolist() == [[0, 1, 2, 3, 0], [1, 2, 3, 0, 0], [2, 3, 0, 0, 0]]  # 0 where padded
    assert w["terminated"].tolist() == [[False, False, False, True, False], [False, False, True, False, False],
                                        [False, True, False, False, False]]
    t = buf.sample_windows(16, 2, 5, np.random.default_rng(0))
    assert t["action"].shape == (16, 5, 1) and t["obs"]["state"].shape == (16, 2, 1)
    # The first episode keeps steps 2 and 3 (slots 2, 3): their windows start at the oldest kept step.
    a = t["action"][..., 0].numpy()
    assert set(a[:, 0].tolist()) <= {2.0, 3.0, 10.0, 11.0, 12.0}
    assert np.all((a < 10).all(axis=1) | (a >= 10).all(axis=1))  # never across episodes
    stacked = ReplayBuffer(20, *spaces(3), frame_stack=3, device="cpu")
    with pytest.raises(ValueError, match="frame_stack=1"):
        stacked.sample_windows(4, 2, 4)


def test_mixed_windows_take_the_demo_share_first():
    obs_space, act_space = spaces(1, state_dim=1, action_dim=1)
    bufs = [ReplayBuffer(50, obs_space, act_space, device="cpu") for _ in range(2)]
    for base, buf in zip((0.0, 100.0), bufs):
        buf.add_first({"images/cam": frame(0, 0), "state": np.array([base], np.float32)})
        for t in range(6):
            buf.add(np.array([base + t], np.float32), 0.0, {"images/cam": frame(0, t + 1),
                    "state": np.array([base + t + 1], np.float32)}, False, t == 5)
    mixed = MixedReplay(bufs[0], bufs[1], demo_ratio=0.25)
    w = mixed.sample_windows(8, 2, 4, np.random.default_rng(1))
    a = w["action"][..., 0].numpy()
    assert a.shape == (8, 4) and w["obs"]["images/cam"].shape == (8, 2, H, H, 3)
    assert (a[:2] >= 100).all() and (a[2:] < 100).all()  # 2 demo windows, then 6 online ones


def test_chunk_transitions_are_nstep_transitions_over_action_chunks():
    """Chunks of 3 from a 4-step episode ending in termination and a 3-step truncated one."""
    obs_space, act_space = spaces(1, state_dim=1, action_dim=1)
    buf = ReplayBuffer(30, obs_space, act_space, gamma=0.5, device="cpu")
    for ep, T, term in ((0, 4, True), (1, 3, False)):
        buf.add_first({"images/cam": frame(ep, 0), "state": np.array([100.0 * ep], np.float32)})
        for t in range(T):
            buf.add(np.array([10.0 * ep + t], np.float32), 1.0 + t,
                    {"images/cam": frame(ep, t + 1), "state": np.array([100.0 * ep + t + 1], np.float32)},
                    terminated=term and t == T - 1, truncated=not term and t == T - 1)
    # slots: episode 0 at 0..4 (steps 0..4), episode 1 at 5..8
    c = buf.chunk_arrays(np.array([0, 2, 5, 7]), obs_horizon=2, chunk=3)
    assert c["action"][..., 0].tolist() == [[0, 1, 2], [2, 3, 3], [10, 11, 12], [12, 12, 12]]
    assert c["reward"].tolist() == [1 + 0.5 * 2 + 0.25 * 3, 3 + 0.5 * 4, 1 + 0.5 * 2 + 0.25 * 3, 3]
    assert c["discount"].tolist() == [0.125, 0.0, 0.125, 0.5]  # terminated within: 0; truncated: bootstraps
    assert c["obs"]["state"][..., 0].tolist() == [[0, 0], [1, 2], [100, 100], [101, 102]]
    assert c["next_obs"]["state"][..., 0].tolist() == [[2, 3], [3, 4], [102, 103], [102, 103]]
    assert c["next_obs"]["images/cam"].shape == (4, 2, H, H, 3)
    mixed = MixedReplay(buf, buf, demo_ratio=0.5).sample_chunks(6, 2, 3, np.random.default_rng(0))
    assert mixed["action"].shape == (6, 3, 1) and mixed["discount"].shape == (6,)


def test_a_saved_full_unwrapped_buffer_loads_into_a_bigger_one(tmp_path):
    """A demo buffer saved with no room beyond its dataset resumes into one with room for interventions."""
    small = ReplayBuffer(12, *spaces(1), device="cpu")
    feed = FakeEpisodes(small, 1, np.random.default_rng(0))
    feed.episode(5, "truncated")
    feed.episode(5, "truncated")  # 2 x 6 slots: exactly full, the pointer back at 0, never overwritten
    assert small.size == 12
    small.save(tmp_path / "b.h5")
    big = ReplayBuffer(40, *spaces(1), device="cpu")
    big.load(tmp_path / "b.h5")
    assert len(big) == len(small) == 10
    FakeEpisodes(big, 1, np.random.default_rng(1)).episode(5, "truncated")
    assert len(big) == 15 and big.size == 18  # appended after the saved slots, none overwritten
    wrapped = ReplayBuffer(12, *spaces(1), device="cpu")
    feed = FakeEpisodes(wrapped, 1, np.random.default_rng(2))
    for _ in range(3):
        feed.episode(5, "truncated")  # the third episode overwrote the first
    wrapped.save(tmp_path / "w.h5")
    with pytest.raises(ReplayFileError, match="capacity=12, this buffer 40"):
        ReplayBuffer(40, *spaces(1), device="cpu").load(tmp_path / "w.h5")
