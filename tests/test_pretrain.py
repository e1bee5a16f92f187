"""The pretrained frozen encoder route for pixels (robolearn/agents/pretrain.py) and the replay that caches
its features (replay.MappedReplay, SERLAgent.replay_view), through the real PickCube pixels env."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import robolearn.sim as rsim
from robolearn.agents.encoders import FrozenEncoder
from robolearn.agents.pretrain import PretrainConfig, collect, labels_of, pretrain_encoder
from robolearn.replay import MappedReplay
from robolearn.rollout import run_episodes, scripted_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: small networks, a shared machine

ENV = "robolearn/PandaPickCubePixels-v0"
ENV_KW = {"image_size": 32, "terminate_on_success": False, "max_episode_steps": 40}
TINY = dict(expert_episodes=2, noisy_episodes=1, random_episodes=1, epochs=2, batch_size=32, holdout=0.25)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "enc.safetensors"
    epochs = []
    metrics = pretrain_encoder(ENV, path, ENV_KW, PretrainConfig(**TINY),
                               on_epoch=lambda e, n, loss: epochs.append((e, n, loss)))
    return path, metrics, epochs


def test_labels_are_the_cube_and_its_offset_from_the_tool():
    env = rsim.make(ENV, **ENV_KW)
    env.reset(seed=3)
    u = env.unwrapped
    label = labels_of(env)
    cube = np.asarray(u.task.object_state(u.arm))
    np.testing.assert_allclose(label[:3], cube[:3], atol=1e-6)
    np.testing.assert_allclose(label[3:6], cube[:3] - u.arm.read().tool_pos, atol=1e-6)
    env.close()


def test_collect_covers_every_episode_kind_with_frames_per_camera():
    env = rsim.make(ENV, **ENV_KW)
    frames, labels, episode = collect(env, PretrainConfig(**TINY))
    env.close()
    assert set(frames) == {"images/front", "images/wrist"}
    n = len(labels)
    assert n == 4 * 41 and frames["images/front"].shape == (n, 32, 32, 3) and frames["images/front"].dtype == np.uint8
    assert sorted(set(episode.tolist())) == [0, 1, 2, 3]
    assert np.isfinite(labels).all() and labels[:, :3].std(0).max() > 0.005  # the cube moved or was reset elsewhere


def test_pretrained_tower_loads_as_the_frozen_drq_encoder_and_records_its_recipe(encoder):
    path, metrics, epochs = encoder
    assert [e for e, _, _ in epochs] == [1, 2] and all(np.isfinite(loss) for _, _, loss in epochs)
    state = load_file(str(path))
    assert {k.split(".")[0] for k in state} == {"convs", "heads"}
    assert {k.split(".")[1] for k in state if k.startswith("heads.")} == {"front", "wrist"}
    enc = FrozenEncoder("drq", path)  # the tower alone: pooled conv features
    assert torch.equal(enc.net[0].weight, state["convs.0.weight"])
    assert not torch.equal(enc.net[0].weight, FrozenEncoder("drq").net[0].weight)
    frames = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert enc(frames).shape == (3, 512)
    head = FrozenEncoder("drq_state", path)  # the tower and the heads: the predicted object state
    assert head.out_dim == 6 and torch.equal(head.heads["wrist"][2].weight, state["heads.wrist.2.weight"])
    assert head(frames, "front").shape == (3, 6) and not torch.equal(head(frames, "front"), head(frames, "wrist"))
    with pytest.raises(ValueError, match="heads for cameras"):
        head(frames, "side")
    with pytest.raises(ValueError, match="needs weights"):
        FrozenEncoder("drq_state")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "drq" and meta["env"] == ENV
    assert json.loads(meta["recipe"])["epochs"] == 2
    assert set(json.loads(meta["metrics"])) >= {"front_rmse_m", "wrist_rmse_m", "train_loss", "frames"}
    assert len(metrics["front_rmse_m"]) == 6 and metrics["held_out_frames"] == 41


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive integer"),
    ("random_episodes", -1, "random_episodes must be a non-negative integer"),
    ("noise", float("nan"), "noise must be a number, got nan"),
    ("holdout", 1.0, r"holdout must be in \[0, 1\)"),
    ("epochs", 25.0, "epochs must be a positive integer"),  # refused before minutes of collection, not after
    ("batch_size", True, "batch_size must be a positive integer"),
    ("lr", "fast", "lr must be a number"),
])
def test_bad_pretraining_options_are_one_line_errors(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        pretrain_encoder(ENV, tmp_path / "e.safetensors", ENV_KW, PretrainConfig(**{**TINY, field: value}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "e.safetensors").exists()


def test_a_holdout_never_takes_every_episode():
    from robolearn.agents.pretrain import fit

    rng = np.random.default_rng(0)
    frames = {"images/front": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)}
    labels = rng.normal(size=(20, 3)).astype(np.float32)
    state, metrics = fit(frames, labels, np.repeat([0, 1], 10), PretrainConfig(**{**TINY, "holdout": 0.75,
                                                                                    "epochs": 1, "batch_size": 4}))
    assert metrics["held_out_frames"] == 10 and np.isfinite(metrics["train_loss"])
    assert all(torch.isfinite(v).all() for v in state.values())


def test_a_drq_state_file_must_fit_the_cameras_and_image_size(encoder):
    from gymnasium import spaces

    from robolearn.agents.serl import SERLAgent, SERLConfig

    def space(size, cams=("front", "wrist")):
        return spaces.Dict({"state": spaces.Box(-1, 1, (7,), np.float32),
                            **{f"images/{c}": spaces.Box(0, 255, (size, size, 3), np.uint8) for c in cams}})

    act = spaces.Box(-1, 1, (4,), np.float32)
    cfg = SERLConfig(frozen_encoder=str(encoder[0]), frozen_arch="drq_state", num_critics=2, hidden_dims=(32, 32))
    assert SERLAgent(space(32), act, cfg, device="cpu").replay_view() is not None
    with pytest.raises(ValueError, match="pretrained on 32x32 frames; images/front is 64x64"):
        SERLAgent(space(64), act, cfg, device="cpu")
    with pytest.raises(ValueError, match="heads for cameras \\['front', 'wrist'\\], not 'side'"):
        SERLAgent(space(32, ("front", "side")), act, cfg, device="cpu")
    uncached = SERLConfig(**{**cfg.__dict__, "cache_features": False})
    assert SERLAgent(space(32), act, uncached, device="cpu").replay_view() is None  # frames stay in the replay
    saved = {k: v for k, v in cfg.__dict__.items() if k != "cache_features"}  # a checkpoint from before caching
    assert SERLConfig.from_dict(saved).cache_features is False
    assert SERLConfig.from_dict({**saved, "frozen_encoder": None}).cache_features is True


def test_an_env_without_cameras_or_a_non_safetensors_out_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        pretrain_encoder(ENV, tmp_path / "e.pt", ENV_KW, PretrainConfig(**TINY))
    with pytest.raises(ValueError, match="no cameras to pretrain on"):
        pretrain_encoder("robolearn/PandaPickCube-v0", tmp_path / "e.safetensors", {}, PretrainConfig(**TINY))


@pytest.mark.parametrize("arch, dim", [("drq", 512), ("drq_state", 6)])
def test_serl_trains_on_cached_features_and_resumes_with_them(encoder, tmp_path, arch, dim):
    import h5py

    from robolearn.demos.dataset import DatasetWriter
    from robolearn.train import TrainConfig, Trainer

    env = rsim.make(ENV, **ENV_KW)
    with DatasetWriter(tmp_path / "demos", ENV, env.observation_space, env.action_space, fps=10) as writer:
        run_episodes(env, scripted_policy(env), 2, seed=50, recorder=writer)
    env.close()
    cfg = TrainConfig(agent="serl", env=ENV, out=str(tmp_path / "run"), frames=80, seed=0, seed_steps=20,
                      demos=str(tmp_path / "demos"), eval_every=10**6, eval_episodes=1, checkpoint_every=40,
                      video=False, env_kwargs=ENV_KW,
                      agent_overrides={"frozen_encoder": str(encoder[0]), "frozen_arch": arch, "batch_size": 16,
                                       "utd_ratio": 2, "hidden_dims": [32, 32], "num_critics": 2})
    trainer = Trainer(cfg)
    try:
        assert isinstance(trainer.replay, MappedReplay)
        stored = set(trainer.replay.online._obs)
        assert stored == {"state", "features/front", "features/wrist"}  # no frames in the replay
        assert trainer.replay.online._obs["features/front"].shape[1:] == (dim,)
        assert set(trainer.replay.demo._obs) == stored and len(trainer.replay.demo) == 2 * 40  # transitions
        before = [p.clone() for p in trainer.agent.actor.parameters()]
        trainer.run()
        assert int(trainer.agent.critic_updates) > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.agent.actor.parameters()))
        # The demos' cached features are the frozen encoder's of their frames.
        demo_feats = trainer.replay.demo._obs["features/front"][:41]
        from robolearn.demos.dataset import Dataset
        first = next(iter(Dataset(tmp_path / "demos")))["obs"]
        np.testing.assert_allclose(demo_feats, trainer.agent.precompute(first)["features/front"], rtol=1e-4, atol=1e-5)
        online = len(trainer.replay.online)
    finally:
        trainer.close()
    ckpt = tmp_path / "run" / "checkpoints" / json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["path"]
    with h5py.File(ckpt / "replay.h5", "r") as f:
        names = []
        f.visit(names.append)
    assert any("features/front" in n for n in names) and not any("images/" in n for n in names)
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "frames": 120}), resume=True)
    try:
        assert len(resumed.replay.online) == online
        resumed.run()
        assert resumed.step == 120
    finally:
        resumed.close()


def test_the_pretrain_encoder_command_writes_the_file_and_refuses_bad_options(tmp_path):
    import subprocess
    import sys

    from inprocess import robolearn

    common = ["pretrain-encoder", "--env", ENV, "--env-set", "image_size=32", "--env-set", "max_episode_steps=20",
              "--threads", "1"]
    out = tmp_path / "enc.safetensors"
    ok = subprocess.run([sys.executable, "-m", "robolearn.cli", *common, "--out", str(out), "--set", "expert_episodes=1",
                         "--set", "noisy_episodes=1", "--set", "random_episodes=1", "--set", "epochs=1",
                         "--set", "holdout=0.34"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads([line for line in ok.stdout.splitlines() if line.startswith("{")][-1])
    assert metrics["frames"] == 3 * 21 and metrics["cameras"] == ["front", "wrist"]
    assert FrozenEncoder("drq_state", out).out_dim == 6
    for args, message in ((("--set", "epoch=3"), "--set epoch: not a pretraining option"),
                          (("--set", "seed=3"), "--set seed: not a pretraining option (the seed is --seed)"),
                          (("--set", "epochs=0"), "epochs must be a positive integer")):
        bad = robolearn(*common, "--out", str(tmp_path / "bad.safetensors"), *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
        assert len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad.safetensors").exists()


def test_act_reuses_the_features_the_replay_just_computed_for_the_same_frames(encoder):
    from robolearn.agents.serl import SERLAgent, SERLConfig

    env = rsim.make(ENV, **ENV_KW)
    obs, _ = env.reset(seed=1)
    cfg = SERLConfig(frozen_encoder=str(encoder[0]), frozen_arch="drq_state", num_critics=2, hidden_dims=(32, 32))
    agent = SERLAgent(env.observation_space, env.action_space, cfg, device="cpu")
    fresh = agent.act(obs, explore=False)
    calls, forward = [], agent.frozen.forward
    agent.frozen.forward = lambda *a, **k: (calls.append(a[1]), forward(*a, **k))[1]
    stored = agent.replay_view()[1](obs)  # the replay encodes the step's frames: one pass per camera
    assert calls == ["front", "wrist"] and stored["features/front"].shape == (6,)
    np.testing.assert_array_equal(agent.act(obs, explore=False), fresh)
    assert calls == ["front", "wrist"]  # act() took them from the replay's pass
    other = {**obs, "images/front": obs["images/front"].copy()}  # other frames (equal pixels, another array)
    agent.act(other, explore=False)
    assert calls == ["front", "wrist", "front", "wrist"]
    env.close()
