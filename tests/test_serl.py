"""SERL/RLPD agent: shapes, the batched ensemble, REDQ targets, temperature, checkpoints, errors,
encoders, the reward classifier, and a small learning check."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robolearn.agents.encoders import FrozenEncoder, random_shift
from robolearn.agents.errors import NonFiniteLossError
from robolearn.agents.serialize import (load_optimizer_state_from_tensors, optimizer_hparams,
                                        optimizer_state_to_tensors)
from robolearn.agents.serl import ClassifierConfig, RewardClassifier, SERLAgent, SERLConfig

STATE_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (10,), np.float32),
                               "tcp_pose": gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)})
ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pixel_space(size=32, cams=("front", "wrist")):
    spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)}
    for cam in cams:
        spaces[f"images/{cam}"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
    return gym.spaces.Dict(spaces)


def random_batch(space, n, action_dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def obs():
        out = {}
        for k, s in space.spaces.items():
            if s.dtype == np.uint8:
                out[k] = torch.randint(0, 256, (n, *s.shape), dtype=torch.uint8, generator=g)
            else:
                out[k] = torch.randn(n, *s.shape, generator=g)
        return out

    return {"obs": obs(), "next_obs": obs(), "action": torch.rand(n, action_dim, generator=g) * 2 - 1,
            "reward": torch.rand(n, generator=g), "discount": torch.full((n,), 0.99)}


def small_cfg(**kw):
    base = dict(hidden_dims=(64, 64), batch_size=32, utd_ratio=2)
    return SERLConfig(**{**base, **kw})


def test_act_and_update_shapes():
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(), device="cpu")
    obs = {k: s.sample() for k, s in STATE_SPACE.spaces.items()}
    for explore in (True, False):
        a = agent.act(obs, explore)
        assert a.shape == (4,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    metrics = agent.update(random_batch(STATE_SPACE, 64), step=0)
    assert {"critic_loss", "q", "target_q", "actor_loss", "entropy", "alpha", "alpha_loss"} <= set(metrics)
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert int(agent.critic_updates) == 2 and int(agent.actor_updates) == 1
    assert agent.target_entropy == -2.0  # -|A|/2
    with pytest.raises(ValueError, match="utd_ratio"):
        agent.update(random_batch(STATE_SPACE, 63), step=1)


def test_ensemble_is_one_batched_module():
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, SERLConfig(), device="cpu")
    critic = agent.critic
    assert not any(isinstance(m, torch.nn.Linear) for m in critic.modules())
    for p in critic.parameters():
        assert p.shape[0] == 10  # every parameter carries the ensemble axis
    assert [tuple(w.shape) for w in critic.weights] == [(10, 14, 256), (10, 256, 256), (10, 256, 1)]
    assert len(critic.ln_weights) == 2  # a LayerNorm per hidden layer, per member
    feat, act = torch.randn(5, 10), torch.rand(5, 4)
    q = critic(feat, act)
    assert q.shape == (10, 5)
    assert torch.unique(q[:, 0]).numel() == 10  # independently initialised members
    # Members are independent: perturbing member 3 changes row 3 only.
    with torch.no_grad():
        critic.weights[1][3].add_(1.0)
    q2 = critic(feat, act)
    changed = (q2 != q).any(dim=1)
    assert changed.tolist() == [i == 3 for i in range(10)]
    # A member subset computes only those rows.
    members = torch.tensor([7, 2])
    assert torch.allclose(critic(feat, act, members), q2[members])


def test_target_is_min_over_a_random_pair_of_distinct_members():
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(utd_ratio=1), device="cpu")
    seen = []
    forward = agent.critic_target.forward

    def spy(feat, action, members=None, detach=False):
        q = forward(feat, action, members, detach)
        seen.append((members.clone(), q.clone()))
        return q

    agent.critic_target.forward = spy
    pairs = set()
    for step in range(20):
        batch = random_batch(STATE_SPACE, 32, seed=step)
        batch["discount"].zero_()  # target = reward + 0 * min Q
        agent.update(batch, step)
        members, q = seen[-1]
        assert members.shape == (2,) and members[0] != members[1]
        assert q.shape == (2, 32)
        pairs.add(tuple(sorted(members.tolist())))
    assert len(pairs) > 5  # resampled every update
    # The backup uses the min of the two.
    agent.critic_target.forward = forward
    feat = torch.randn(8, 10)
    act = torch.rand(8, 4)
    full = agent.critic_target(feat, act)
    m = torch.tensor([1, 4])
    assert torch.equal(agent.critic_target(feat, act, m).min(0).values, torch.minimum(full[1], full[4]))


@pytest.mark.parametrize("target, direction", [(3.0, 1), (-10.0, -1)])
def test_temperature_tunes_toward_target_entropy(target, direction):
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(utd_ratio=1, lr=5e-3, target_entropy=target,
                                                           init_temperature=0.1), device="cpu")
    batch = random_batch(STATE_SPACE, 32)
    batch["reward"].zero_()
    alphas, entropies = [], []
    for step in range(80):
        m = agent.update(batch, step)
        alphas.append(m["alpha"])
        entropies.append(m["entropy"])
    # Entropy below a high target raises the temperature (and then entropy); above a low one lowers it.
    assert direction * (alphas[-1] - 0.1) > 0 and abs(np.log(alphas[-1] / 0.1)) > 0.2
    if direction > 0:
        assert np.mean(entropies[-10:]) > np.mean(entropies[:10])


def test_state_dict_round_trip_is_exact(tmp_path):
    cfg = small_cfg(seed=3)
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    for step in range(3):
        agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
    path = tmp_path / "agent.safetensors"
    save_file(agent.state_dict(), str(path))  # tensors only, safetensors-compatible
    config = json.loads(json.dumps(agent.config_dict()))
    assert SERLConfig.from_dict(config["config"]) == cfg

    clone = SERLAgent(STATE_SPACE, ACTION_SPACE, SERLConfig.from_dict({**config["config"], "seed": 99}), device="cpu")
    clone.load_state_dict(load_file(str(path)))
    obs = {k: s.sample() for k, s in STATE_SPACE.spaces.items()}
    np.testing.assert_array_equal(agent.act(obs, False), clone.act(obs, False))
    np.testing.assert_array_equal(agent.act(obs, True), clone.act(obs, True))
    batch = random_batch(STATE_SPACE, 64, seed=10)
    assert agent.update(batch, 3) == clone.update(batch, 3)
    for k, v in agent.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k
    # Loading in-process copies: training the copy leaves the original untouched.
    twin = SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    twin.load_state_dict(agent.state_dict())
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    twin.update(batch, 4)
    assert all(torch.equal(v, before[k]) for k, v in agent.state_dict().items())
    with pytest.raises(KeyError, match="unexpected"):
        clone.load_state_dict({**agent.state_dict(), "stray": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks"):
        clone.load_state_dict({k: v for k, v in agent.state_dict().items() if k != "log_alpha"})


def test_non_finite_loss_names_loss_step_and_batch():
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(), device="cpu")
    batch = random_batch(STATE_SPACE, 64)
    batch["reward"][5] = float("nan")
    before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    with pytest.raises(NonFiniteLossError) as info:
        agent.update(batch, step=1234)
    err = info.value
    assert err.loss_name == "critic" and err.step == 1234
    assert "1234" in str(err) and "reward" in str(err)
    assert err.stats["reward"]["non_finite"] == 1 and err.stats["action"]["non_finite"] == 0
    assert "obs/state" in err.stats
    for k, v in agent.critic.state_dict().items():  # raised before the optimizer step
        assert torch.equal(v, before[k])


def test_learns_a_contextual_bandit():
    """One-step task: reward -(a - 0.6 s)^2 per action dim; the policy mean must track 0.6 s."""
    space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (2,), np.float32)})
    aspace = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    agent = SERLAgent(space, aspace, SERLConfig(batch_size=64, utd_ratio=2, hidden_dims=(64, 64), lr=1e-3), device="cpu")
    rng = np.random.default_rng(0)
    n = 2000
    states = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    rewards = -((actions - 0.6 * states) ** 2).sum(-1).astype(np.float32)
    test_states = rng.uniform(-1, 1, (50, 2)).astype(np.float32)

    def error():
        acts = np.stack([agent.act({"state": s}, False) for s in test_states])
        return float(((acts - 0.6 * test_states) ** 2).sum(-1).mean())

    before = error()
    for step in range(120):
        i = rng.integers(0, n, 128)
        batch = {"obs": {"state": torch.from_numpy(states[i])}, "next_obs": {"state": torch.from_numpy(states[i])},
                 "action": torch.from_numpy(actions[i]), "reward": torch.from_numpy(rewards[i]),
                 "discount": torch.zeros(128)}
        agent.update(batch, step)
    after = error()
    assert after < 0.02 and after < before / 4, (before, after)


def test_random_shift_equals_pad_and_crop():
    images = torch.randint(0, 256, (6, 12, 10, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_shift(images, 4, g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    shifts = torch.randint(0, 9, (6, 2), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="replicate")
    for b, (dy, dx) in enumerate(shifts.tolist()):
        crop = padded[b, :, dy:dy + 12, dx:dx + 10].permute(1, 2, 0).to(torch.uint8)
        assert torch.equal(out[b], crop)
    assert torch.equal(random_shift(images, 0), images)


def test_pixel_agent_trains_encoder_through_the_critic_only():
    space = pixel_space(32)
    agent = SERLAgent(space, ACTION_SPACE, small_cfg(conv_strides=(2, 2, 1, 1)), device="cpu")
    obs = {k: s.sample() for k, s in space.spaces.items()}
    assert agent.act(obs, True).shape == (4,)
    enc_before = [p.clone() for p in agent.encoder.parameters()]
    agent.update(random_batch(space, 64), 0)
    assert all(not torch.equal(a, b) for a, b in zip(enc_before, agent.encoder.parameters()))
    assert agent.encoder.out_dim == 2 * 50 + 7
    # Within update, the actor loss reaches neither the encoder nor the critic: a leaf's hook fires
    # once per backward that reaches it, so the encoder's and the critic's fire once per critic
    # minibatch (utd_ratio of them) and the actor's once.
    calls, seen = {"encoder": 0, "critic": 0, "actor": 0}, {}
    for tag in calls:
        for name, p in getattr(agent, tag).named_parameters():
            def hook(g, tag=tag, name=name):
                calls[tag] += 1
                seen[(tag, name)] = g.clone()
            p.register_hook(hook)
    sizes = {tag: len(list(getattr(agent, tag).parameters())) for tag in calls}
    agent.update(random_batch(space, 64, seed=1), 1)
    utd = agent.cfg.utd_ratio
    assert calls == {"encoder": utd * sizes["encoder"], "critic": utd * sizes["critic"], "actor": sizes["actor"]}
    # ... and the actor step left the encoder's gradient from the last critic loss as it was.
    for name, p in agent.encoder.named_parameters():
        assert torch.equal(p.grad, seen[("encoder", name)]) and p.grad.abs().sum() > 0


def test_frozen_encoder_loads_safetensors_and_pt(tmp_path):
    weights = FrozenEncoder("resnet10").net.state_dict()
    weights["fc.weight"] = torch.zeros(1000, 512)  # a classifier head is ignored
    save_file(weights, str(tmp_path / "r10.safetensors"))
    torch.save(weights, tmp_path / "r10.pt")
    for name in ("r10.safetensors", "r10.pt"):
        enc = FrozenEncoder("resnet10", tmp_path / name)
        assert torch.equal(enc.net.conv1.weight, weights["conv1.weight"])
        assert not any(p.requires_grad for p in enc.parameters())
        enc.train()
        assert not enc.training  # BatchNorm keeps its pretrained statistics
        feats = enc(torch.randint(0, 256, (2, 32, 32, 6), dtype=torch.uint8))  # a stack of two frames
        assert feats.shape == (2, 1024)
    with pytest.raises(ValueError, match="does not fit"):
        FrozenEncoder("resnet18", tmp_path / "r10.safetensors")
    torch.save({"model": weights}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat dict"):
        FrozenEncoder("resnet10", tmp_path / "nested.pt")


def test_agent_with_frozen_encoder_and_cached_features(tmp_path):
    weights = FrozenEncoder("resnet10").net.state_dict()
    path = tmp_path / "resnet10.safetensors"
    save_file(weights, str(path))
    space = pixel_space(32, cams=("front",))
    agent = SERLAgent(space, ACTION_SPACE, small_cfg(frozen_encoder=str(path), frozen_arch="resnet10"), device="cpu")
    assert torch.equal(agent.frozen.net.conv1.weight, weights["conv1.weight"])
    batch = random_batch(space, 64)
    cached = agent.precompute({k: v.numpy() for k, v in batch["obs"].items()})
    assert cached["features/front"].shape == (64, 512) and cached["features/front"].dtype == np.float32
    one = agent.precompute({"images/front": batch["obs"]["images/front"][0].numpy()})
    np.testing.assert_allclose(one["features/front"], cached["features/front"][0], rtol=1e-4, atol=1e-5)
    frozen_before = [p.clone() for p in agent.frozen.parameters()]
    agent.update(batch, 0)  # features computed from frames, once per batch
    nxt = agent.precompute({k: v.numpy() for k, v in batch["next_obs"].items()})
    batch["obs"]["features/front"] = torch.from_numpy(cached["features/front"])
    batch["next_obs"]["features/front"] = torch.from_numpy(nxt["features/front"])
    agent.update(batch, 1)  # features from the replay's cache
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, agent.frozen.parameters()))
    assert not any(k.startswith("frozen") for k in agent.state_dict())
    obs = {k: s.sample() for k, s in space.spaces.items()}
    assert agent.act(obs, False).shape == (4,)


def test_reward_classifier_learns_success_frames():
    space = pixel_space(32, cams=("front",))
    rng = np.random.default_rng(0)

    def frames(success, n):
        imgs = rng.integers(0, 80, (n, 32, 32, 3), dtype=np.uint8)
        for img in imgs:
            y, x = rng.integers(4, 20, 2)
            if success:  # a lifted red cube: a bright patch in the upper half
                img[y // 2:y // 2 + 8, x:x + 8, 0] = 230
        return [{"images/front": im, "state": np.zeros(7, np.float32)} for im in imgs]

    clf = RewardClassifier(space, ClassifierConfig(seed=0), device="cpu")
    metrics = clf.train_classifier(frames(True, 100), frames(False, 100), epochs=10)
    assert metrics["accuracy"] > 0.95, metrics
    test_pos, test_neg = frames(True, 20), frames(False, 20)
    p = clf.predict({"images/front": np.stack([f["images/front"] for f in test_pos + test_neg])})
    assert p.shape == (40,) and (p[:20] > 0.5).mean() > 0.9 and (p[20:] <= 0.5).mean() > 0.9
    assert isinstance(clf.predict(test_pos[0]), float)
    assert clf.reward(test_pos[0]) in (0.0, 1.0)


def test_optimizer_state_round_trip_through_tensors():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = torch.optim.Adam([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-2}], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        b(a(torch.randn(4, 3))).sum().backward()
        opt.step()
    tensors = optimizer_state_to_tensors(opt, "opt")
    assert set(tensors) == {f"opt.{i}.{n}" for i in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}
    hparams = json.loads(json.dumps(optimizer_hparams(opt)))
    assert hparams[1]["lr"] == 1e-2 and hparams[0]["betas"] == [0.9, 0.999]

    a2, b2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt2 = torch.optim.Adam([{"params": a2.parameters()}, {"params": b2.parameters()}], lr=5.0)
    load_optimizer_state_from_tensors(opt2, tensors, "opt", param_groups=hparams)
    assert opt2.param_groups[1]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for k, v in optimizer_state_to_tensors(opt2, "opt").items():
        assert torch.equal(v, tensors[k])
    with pytest.raises(ValueError, match="shape"):
        load_optimizer_state_from_tensors(opt2, {"opt.0.exp_avg": torch.zeros(5)}, "opt")
    with pytest.raises(KeyError):
        load_optimizer_state_from_tensors(opt2, {"opt.9.exp_avg": torch.zeros(1)}, "opt")


def test_every_utd_minibatch_keeps_the_demo_online_mix():
    # MixedReplay puts the demo half first; each critic step (and the actor step on the last
    # minibatch) must still see half demos, as RLPD's symmetric sampling. Demos carry reward 1.
    from robolearn.agents import serl as serl_mod
    from robolearn.replay import MixedReplay, ReplayBuffer

    space = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
    def buffer(reward):
        buf = ReplayBuffer(200, space, ACTION_SPACE)
        for ep in range(3):
            buf.add_first({"state": np.zeros(3, np.float32)})
            for t in range(20):
                buf.add(np.zeros(4, np.float32), reward, {"state": np.full(3, t, np.float32)}, False, t == 19)
        return buf
    mixed = MixedReplay(buffer(0.0), buffer(1.0), demo_ratio=0.5)
    batch = mixed.sample(32 * 4, np.random.default_rng(0))
    assert batch["reward"][:64].eq(1).all() and batch["reward"][64:].eq(0).all()  # demo half first
    parts = serl_mod.minibatches(batch, 4)
    assert len(parts) == 4
    for part in parts:
        assert part["reward"].shape == (32,) and part["obs"]["state"].shape == (32, 3)
        assert part["reward"].mean().item() == 0.5
    # every row is used exactly once
    assert sorted(torch.cat([p["reward"] for p in parts]).tolist()) == sorted(batch["reward"].tolist())


def test_droq_dropout_critic_trains_is_validated_and_round_trips():
    cfg = small_cfg(num_critics=2, critic_dropout=0.2, seed=1)
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    feat, action = torch.randn(16, agent.encoder.out_dim), torch.rand(16, 4) * 2 - 1
    with torch.no_grad():
        assert not torch.equal(agent.critic(feat, action), agent.critic(feat, action))  # masks differ per pass
        agent.critic.eval()
        assert torch.equal(agent.critic(feat, action), agent.critic(feat, action))  # off outside training
        agent.critic.train()
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.update(random_batch(STATE_SPACE, 64), 0)
    assert all(np.isfinite(v) for v in metrics.values())
    after = agent.state_dict()
    for net in ("actor", "critic"):
        assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith(f"{net}.")), net
    # Masks come from the update stream: a copy loaded from the state dict updates identically.
    clone = SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    clone.load_state_dict(agent.state_dict())
    batch = random_batch(STATE_SPACE, 64, seed=5)
    assert agent.update(batch, 1) == clone.update(batch, 1)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(critic_dropout=bad), device="cpu")
    from robolearn.train import make_agent_config

    with pytest.raises(ValueError, match=r"critic_dropout must be in \[0, 1\), got 1.5"):
        make_agent_config("serl", {"critic_dropout": 1.5}, 0)
    # Resuming a checkpoint from before the option: it had no dropout, so 0 is no change and 0.01 is one.
    from dataclasses import asdict

    saved = {k: v for k, v in asdict(SERLConfig()).items() if k != "critic_dropout"}
    assert make_agent_config("serl", {"critic_dropout": 0.0}, 0, saved=saved).critic_dropout == 0.0
    with pytest.raises(ValueError, match="critic_dropout cannot change on --resume"):
        make_agent_config("serl", {"critic_dropout": 0.01}, 0, saved=saved)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9])
def test_dropout_mask_zeros_each_element_independently_with_probability_p(p):
    from robolearn.agents.serl import dropout_mask

    g = torch.Generator().manual_seed(0)
    mask = torch.cat([dropout_mask((50, 1000), p, g, "cpu").flatten() for _ in range(8)])
    zero = mask == 0
    sd = (p * (1 - p) / zero.numel()) ** 0.5
    assert abs(zero.float().mean().item() - p) < 5 * sd
    # Independence: a zero right after a zero is as likely as any zero.
    after_zero = (zero[1:] & zero[:-1]).sum().item() / zero[:-1].sum().item()
    assert abs(after_zero - p) < 5 * (p * (1 - p) / zero[:-1].sum().item()) ** 0.5
    kept = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()  # inverted dropout: kept elements scaled
    assert set(mask.unique().tolist()) <= {0.0, kept}
    # The same generator state draws the same mask (resume and checkpoint copies rely on it).
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(dropout_mask((3, 64, 64), p, a, "cpu"), dropout_mask((3, 64, 64), p, b, "cpu"))


def test_dropout_mask_rounds_of_gaps_continue_where_the_last_ended_and_p_is_checked():
    from robolearn.agents.serl import dropout_mask

    g = torch.Generator().manual_seed(0)
    # 4 gaps per round: ~100 rounds for 50k elements at p = 0.01, each starting after the previous zero.
    zero = torch.cat([dropout_mask((50_000,), 0.01, g, "cpu", draws=4) == 0 for _ in range(8)])
    sd = (0.01 * 0.99 / zero.numel()) ** 0.5
    assert abs(zero.float().mean().item() - 0.01) < 5 * sd
    assert dropout_mask((4, 5), 0.01, g, "cpu", torch.float64).dtype == torch.float64
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"dropout_mask: p must be in \(0, 1\)"):
            dropout_mask((4,), bad, g, "cpu")


def test_sparse_dropout_matches_the_mask_formula_in_values_and_gradients():
    """On a CPU at DroQ's rate the critic zeroes the dropped elements in place (serl.ZeroAt) and folds the
    kept elements' 1 / (1 - p) into LayerNorm's eps: it must compute what h * mask -> LayerNorm computes."""
    import torch.nn.functional as F

    from robolearn.agents.serl import LAYER_NORM_EPS, EnsembleCritic, dropout_mask, sparse_dropout

    assert sparse_dropout(0.01, "cpu") and not sparse_dropout(0.3, "cpu")
    torch.manual_seed(0)
    critic = EnsembleCritic(12, (64, 64), 2, "tanh", dropout=0.01)
    obs, action = torch.randn(128, 9), torch.rand(128, 3, requires_grad=True)
    critic.generator = torch.Generator().manual_seed(5)
    q = critic(obs, action)
    grads = torch.autograd.grad(q.square().sum(), [action, *critic.parameters()])

    g = torch.Generator().manual_seed(5)  # the same draws, through the full-size mask
    ws, bs = list(critic.weights), list(critic.biases)
    h = torch.cat([obs, action], -1) @ ws[0] + bs[0]
    for i in range(2):
        if i:
            h = torch.baddbmm(bs[i], h, ws[i])
        h = h * dropout_mask(h.shape, 0.01, g, "cpu")
        h = torch.tanh(F.layer_norm(h, h.shape[-1:], eps=LAYER_NORM_EPS) * critic.ln_weights[i] + critic.ln_biases[i])
    expected = torch.baddbmm(bs[-1], h, ws[-1]).squeeze(-1)
    want = torch.autograd.grad(expected.square().sum(), [action, *critic.parameters()])
    assert torch.allclose(q, expected, atol=1e-5)
    with torch.no_grad():  # dropout dropped something: without it the values differ
        assert not torch.allclose(critic.eval()(obs, action), q, atol=1e-3)
    critic.train()
    for got, ref in zip(grads, want):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # in place under no_grad too (the TD target)
        critic.generator = torch.Generator().manual_seed(5)
        assert torch.allclose(critic(obs, action), expected, atol=1e-5)
