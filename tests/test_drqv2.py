"""DrQ-v2: the reference's architecture and schedule, the fast augmentation against drqv2's
grid_sample, the update against drqv2's way of writing it, gradients, checkpoints, NaN guard,
and a short learning run on a tiny pixel task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gymnasium import spaces
from safetensors.torch import load_file, save_file
from torch import nn

from robolearn.agents.drqv2 import (DrQV2Agent, DrQV2Config, grid_sample_shift, reference_update, sample_shifts,
                                    shift_images, stddev)
from robolearn.agents.encoders import random_shift
from robolearn.agents.errors import NonFiniteLossError


def pixel_space(size: int = 84, channels: int = 9) -> spaces.Dict:
    return spaces.Dict({"images/pixels": spaces.Box(0, 255, (size, size, channels), np.uint8),
                        "state": spaces.Box(-np.inf, np.inf, (5,), np.float32)})


def action_space(dim: int = 2) -> spaces.Box:
    return spaces.Box(-1.0, 1.0, (dim,), np.float32)


def random_batch(n: int, size: int = 84, channels: int = 9, action_dim: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def frames():
        return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)

    return {"obs": {"images/pixels": frames(), "state": torch.randn(n, 5, generator=g)},
            "next_obs": {"images/pixels": frames(), "state": torch.randn(n, 5, generator=g)},
            "action": torch.rand(n, action_dim, generator=g) * 2 - 1,
            "reward": torch.rand(n, generator=g), "discount": torch.full((n,), 0.99**3)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


SMALL = dict(hidden_dim=64)  # the 1024-wide heads only slow the tests that do not look at them


def test_architecture_matches_reference():
    agent = DrQV2Agent(pixel_space(), action_space(6), DrQV2Config(), device="cpu")
    convs = [m for m in agent.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (9, 32, (3, 3), (2, 2), (0, 0)), (32, 32, (3, 3), (1, 1), (0, 0)),
        (32, 32, (3, 3), (1, 1), (0, 0)), (32, 32, (3, 3), (1, 1), (0, 0))]
    assert sum(isinstance(m, nn.ReLU) for m in agent.encoder.modules()) == 4
    assert agent.encoder.repr_dim == 32 * 35 * 35
    feats = agent.encoder([torch.zeros(2, 84, 84, 9, dtype=torch.uint8)])
    assert feats.shape == (2, 32 * 35 * 35)
    for net in (agent.actor, agent.critic):
        lin, ln, act = net.trunk
        assert (lin.in_features, lin.out_features) == (32 * 35 * 35, 50)
        assert isinstance(ln, nn.LayerNorm) and ln.normalized_shape == (50,) and isinstance(act, nn.Tanh)
    shapes = lambda seq: [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]  # noqa: E731
    assert shapes(agent.actor.policy) == [(50, 1024), (1024, 1024), (1024, 6)]
    assert shapes(agent.critic.Q1) == shapes(agent.critic.Q2) == [(56, 1024), (1024, 1024), (1024, 1)]
    cfg = agent.cfg
    assert (cfg.lr, cfg.batch_size, cfg.critic_target_tau, cfg.stddev_clip, cfg.aug_pad) == (1e-4, 256, 0.01, 0.3, 4)
    assert (cfg.nstep, cfg.update_every_steps, cfg.num_seed_frames, cfg.num_seed_steps) == (3, 2, 4000, 2000)
    # the critic target starts as a copy and takes no gradients
    for p, t in zip(agent.critic.parameters(), agent.critic_target.parameters()):
        assert torch.equal(p, t) and not t.requires_grad


def test_weight_init_is_orthogonal():
    agent = DrQV2Agent(pixel_space(), action_space(), DrQV2Config(**SMALL), device="cpu")
    for m in agent.encoder.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().reshape(m.out_channels, -1)
            torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(m.out_channels), atol=1e-4, rtol=0)  # relu gain^2
            assert not m.bias.any()
    lin = agent.actor.trunk[0]
    torch.testing.assert_close(lin.weight @ lin.weight.T, torch.eye(50), atol=1e-4, rtol=0)
    head = agent.critic.Q1[2]
    torch.testing.assert_close(head.weight @ head.weight.T, torch.eye(64), atol=1e-4, rtol=0)


def test_stddev_schedule_and_task_configs():
    s = "linear(1.0,0.1,500000)"
    assert DrQV2Config().stddev_schedule == s
    assert [stddev(s, t) for t in (0, 250_000, 500_000, 2_000_000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert stddev("0.2", 123) == 0.2
    assert stddev("step_linear(1.0,0.5,100,0.1,100)", 50) == pytest.approx(0.75)
    assert stddev("step_linear(1.0,0.5,100,0.1,100)", 150) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule"):
        stddev("cosine(1,0)", 0)
    easy = DrQV2Config.for_task("cartpole_balance")
    assert easy.stddev_schedule == "linear(1.0,0.1,100000)" and easy.num_train_frames == 1_100_000
    walker = DrQV2Config.for_task("walker_walk")
    assert (walker.nstep, walker.batch_size) == (1, 512)
    assert DrQV2Config.for_task("humanoid_run").stddev_schedule == "linear(1.0,0.1,2000000)"
    with pytest.raises(ValueError, match="no config"):
        DrQV2Config.for_task("nonexistent_task")


def test_shift_equals_replicate_padded_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (81, 20, 24, 3), dtype=torch.uint8, generator=g)
    grid = torch.stack(torch.meshgrid(torch.arange(-4, 5), torch.arange(-4, 5), indexing="ij"), -1).reshape(81, 2)
    padded = np.pad(x.numpy(), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
    expected = np.stack([padded[i, 4 + dy:4 + dy + 20, 4 + dx:4 + dx + 24] for i, (dy, dx) in enumerate(grid.tolist())])
    assert np.array_equal(shift_images(x, grid).numpy(), expected)
    # the same draw as encoders.random_shift (the SERL encoder's), so the two agree given one generator
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(random_shift(x, 4, g1), shift_images(x, sample_shifts(81, 4, g2)))


def test_shift_distribution_is_uniform_over_the_81_offsets():
    # Pixels that carry their own coordinates reveal the shift each sample received.
    h = w = 12
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coord = torch.stack([rows, cols], -1).to(torch.uint8)
    n = 40_500
    out = shift_images(coord.expand(n, h, w, 2).contiguous(),
                       sample_shifts(n, 4, torch.Generator().manual_seed(0)))
    dy = out[:, 6, 6, 0].long() - 6
    dx = out[:, 6, 6, 1].long() - 6
    assert dy.min() == dx.min() == -4 and dy.max() == dx.max() == 4
    counts = torch.bincount((dy + 4) * 9 + (dx + 4), minlength=81).double()
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 150.0, chi2  # 80 degrees of freedom: P(chi2 > 150) < 1e-5 under uniformity
    # the two axes are independent: every (dy, dx) cell is populated
    assert (counts > 0.8 * expected).all()


def test_fast_shift_equals_grid_sample_reference():
    g = torch.Generator().manual_seed(1)
    for shape in ((81, 84, 84, 9), (81, 20, 30, 3)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        grid = torch.stack(torch.meshgrid(torch.arange(-4, 5), torch.arange(-4, 5), indexing="ij"), -1).reshape(81, 2)
        fast = shift_images(x, grid).permute(0, 3, 1, 2).float()
        ref = grid_sample_shift(x.permute(0, 3, 1, 2).float(), grid)
        # bilinear weights at integer points are 1 up to float rounding: equal after rounding
        assert (fast - ref).abs().max() < 0.01
        assert torch.equal(ref.round(), fast)


def test_chunked_encoding_equals_one_call():
    agent = DrQV2Agent(pixel_space(), action_space(), DrQV2Config(**SMALL), device="cpu")
    x = random_batch(10)["obs"]["images/pixels"]
    shifts = [sample_shifts(10, 4, torch.Generator().manual_seed(0))]
    with torch.no_grad():
        whole = agent.encoder([x], shifts, chunk_size=None)
        chunked = agent.encoder([x], shifts, chunk_size=3)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_update_matches_drqv2_reference():
    """Same shifts and noise: the fast update and drqv2's way of writing it agree."""
    cfg = DrQV2Config(**SMALL, encoder_chunk_size=5)
    ours, ref = (DrQV2Agent(pixel_space(), action_space(), cfg, device="cpu") for _ in range(2))
    learners = ("encoder", "critic", "actor", "critic_target")
    init = {name: [p.detach().clone() for p in getattr(ours, name).parameters()] for name in learners}
    grads = {}
    for tag, agent in (("ours", ours), ("ref", ref)):
        for name, p in agent.encoder.named_parameters():
            p.register_hook(lambda g, k=(tag, name): grads.__setitem__(k, g.clone()))
    batch = random_batch(12)
    m_ours, m_ref = ours.update(batch, 3000), reference_update(ref, batch, 3000)
    for k in m_ref:
        assert m_ours[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-5), k
    for name, _ in ours.encoder.named_parameters():
        g_ours, g_ref = grads[("ours", name)], grads[("ref", name)]
        assert (g_ours - g_ref).abs().max() <= 0.02 * g_ref.abs().max(), name
    for (name, p), q in zip(ours.actor.named_parameters(), ref.actor.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-3 * q.grad.abs().max(), name
    # Adam's first step moves each weight by lr * sign(grad) (the target by tau of that): both
    # updates must move the same weights the same way, up to rare sign flips of ~0 gradients. A
    # step that skips a module, flips a gradient's sign or mixes the target wrongly fails here.
    for name in learners:
        scale = cfg.lr * (cfg.critic_target_tau if name == "critic_target" else 1.0)
        for p0, a, b in zip(init[name], getattr(ours, name).parameters(), getattr(ref, name).parameters()):
            d_ours, d_ref = a.detach() - p0, b.detach() - p0
            assert ((d_ours - d_ref).abs() <= 0.1 * scale).float().mean() >= 0.999, name
            assert (d_ref.abs() >= 0.5 * scale).float().mean() >= 0.5, name  # the step moved this tensor


def test_encoder_learns_from_the_critic_only():
    agent = DrQV2Agent(pixel_space(), action_space(), DrQV2Config(**SMALL, encoder_chunk_size=4), device="cpu")
    calls = {"encoder": 0, "critic": 0, "actor": 0}
    seen = {}
    for tag, module in (("encoder", agent.encoder), ("critic", agent.critic), ("actor", agent.actor)):
        for name, p in module.named_parameters():
            def hook(g, tag=tag, name=name):
                calls[tag] += 1
                seen[(tag, name)] = g.clone()
            p.register_hook(hook)
    n_enc = len(list(agent.encoder.parameters()))
    n_critic = len(list(agent.critic.parameters()))
    n_actor = len(list(agent.actor.parameters()))
    agent.update(random_batch(8), 3000)
    # A leaf's hook fires once per backward that reaches it: the encoder and critic weights are
    # reached by one backward (the critic loss), the actor's by one (the actor loss).
    assert calls == {"encoder": n_enc, "critic": n_critic, "actor": n_actor}
    # ... and the actor step left the encoder's critic-loss gradient as it was
    for name, p in agent.encoder.named_parameters():
        assert torch.equal(p.grad, seen[("encoder", name)]) and p.grad.abs().sum() > 0


def test_state_dict_round_trip(tmp_path):
    cfg = DrQV2Config(**SMALL)
    a = DrQV2Agent(pixel_space(64), action_space(), cfg, device="cpu")
    obs = {"images/pixels": np.random.default_rng(0).integers(0, 256, (64, 64, 9), dtype=np.uint8),
           "state": np.zeros(5, np.float32)}
    a.update(random_batch(6, 64, seed=1), 10)
    for _ in range(3):
        a.act(obs, explore=True)

    path = tmp_path / "drqv2.safetensors"
    save_file(a.state_dict(), str(path))
    b = DrQV2Agent(pixel_space(64), action_space(), DrQV2Config(**SMALL, seed=7), device="cpu")
    b.load_state_dict(load_file(str(path)))

    assert int(b.agent_step) == 13 and int(b.num_updates) == 1
    for _ in range(2):
        assert np.array_equal(a.act(obs, explore=True), b.act(obs, explore=True))
    assert np.array_equal(a.act(obs, explore=False), b.act(obs, explore=False))
    batch = random_batch(6, 64, seed=2)
    assert a.update(batch, 11) == b.update(batch, 11)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with pytest.raises(KeyError, match="unexpected"):
        b.load_state_dict({**sa, "bogus": torch.zeros(1)})


def test_two_cameras_get_one_tower_each():
    obs_space = spaces.Dict({"images/front": spaces.Box(0, 255, (32, 32, 9), np.uint8),
                             "images/wrist": spaces.Box(0, 255, (24, 24, 3), np.uint8)})
    agent = DrQV2Agent(obs_space, action_space(), DrQV2Config(**SMALL, encoder_chunk_size=3), device="cpu")
    assert agent.encoder.repr_dim == 32 * 9 * 9 + 32 * 5 * 5  # 32 -> 15, 13, 11, 9; 24 -> 11, 9, 7, 5
    g = torch.Generator().manual_seed(0)

    def obs(n):
        return {"images/front": torch.randint(0, 256, (n, 32, 32, 9), dtype=torch.uint8, generator=g),
                "images/wrist": torch.randint(0, 256, (n, 24, 24, 3), dtype=torch.uint8, generator=g)}

    batch = {"obs": obs(5), "next_obs": obs(5), "action": torch.zeros(5, 2), "reward": torch.ones(5),
             "discount": torch.full((5,), 0.9)}
    metrics = agent.update(batch, 0)
    assert np.isfinite(list(metrics.values())).all()
    one = {k: v[0].numpy() for k, v in obs(1).items()}
    assert agent.act(one, explore=False).shape == (2,)


def test_config_dict_is_json_and_round_trips():
    agent = DrQV2Agent(pixel_space(), action_space(), DrQV2Config(**SMALL, image_keys=("images/pixels",)),
                       device="cpu")
    d = json.loads(json.dumps(agent.config_dict()))
    assert d["agent"] == "drqv2" and d["repr_dim"] == 32 * 35 * 35 and d["action_dim"] == 2
    assert DrQV2Config.from_dict(d["config"]) == agent.cfg


def test_non_finite_batch_raises_before_any_step():
    agent = DrQV2Agent(pixel_space(), action_space(), DrQV2Config(**SMALL), device="cpu")
    before = {k: v.clone() for k, v in agent.state_dict().items() if not k.startswith("rng/")}
    batch = random_batch(4)
    batch["reward"][1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="critic") as info:
        agent.update(batch, 3000)
    assert info.value.stats["reward"]["non_finite"] == 1.0
    after = agent.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_act_noise_follows_the_agent_step():
    cfg = DrQV2Config(**SMALL, stddev_schedule="linear(0.5,0.0,1000)")
    agent = DrQV2Agent(pixel_space(), action_space(3), cfg, device="cpu")
    obs = {"images/pixels": np.full((84, 84, 9), 128, np.uint8), "state": np.zeros(5, np.float32)}
    greedy = agent.act(obs, explore=False)
    assert greedy.shape == (3,) and greedy.dtype == np.float32 and int(agent.agent_step) == 0
    noisy = np.stack([agent.act(obs, explore=True) for _ in range(200)])
    assert int(agent.agent_step) == 200  # each exploring call is one agent step
    assert np.all(np.abs(noisy) < 1.0)
    # around the greedy action (near 0 at init) with std 0.5 -> 0.4 over these 200 steps
    assert np.abs(noisy.mean(0) - greedy).max() < 0.15 and 0.35 < noisy.std(0).min() < 0.55
    # update() sets the agent step from the loop's count: at 1000 the std has reached 0
    agent.update(random_batch(4, action_dim=3), 1000)
    assert int(agent.agent_step) == 1000
    np.testing.assert_allclose(agent.act(obs, explore=True), agent.act(obs, explore=False), atol=1e-6)
    assert int(agent.agent_step) == 1001


# -- learning on a tiny pixel task ----------------------------------------------------------------

class SideTask:
    """A bright square on the left or the right of a 24x24 frame; the reward is 1 - |a - side| / 2
    for the side (-1 left, +1 right). Each step shows a fresh frame (a contextual bandit with a
    discount, so the critic still bootstraps)."""

    size = 24

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def observe(self):
        side = self.rng.choice([-1.0, 1.0])
        img = np.zeros((self.size, self.size, 3), np.uint8)
        x0 = self.rng.integers(0, 4) if side < 0 else self.rng.integers(14, 18)
        y0 = self.rng.integers(0, self.size - 6)
        img[y0:y0 + 6, x0:x0 + 6] = 255
        return {"images/pixels": img}, side

    @staticmethod
    def reward(action: np.ndarray, side: float) -> float:
        return 1.0 - abs(float(action[0]) - side) / 2.0


def evaluate(agent: DrQV2Agent, episodes: int = 200, seed: int = 123) -> float:
    task = SideTask(seed)
    total = 0.0
    for _ in range(episodes):
        obs, side = task.observe()
        total += task.reward(agent.act(obs, explore=False), side)
    return total / episodes


def test_learns_a_tiny_pixel_task():
    # Seeds 0-3 all reach a greedy reward of 1.0 within 200 updates; 300 are run here.
    obs_space = spaces.Dict({"images/pixels": spaces.Box(0, 255, (24, 24, 3), np.uint8)})
    cfg = DrQV2Config(hidden_dim=64, feature_dim=32, conv_channels=16, lr=1e-3, batch_size=64,
                      num_seed_frames=200, stddev_schedule="linear(1.0,0.2,400)", seed=0)
    agent = DrQV2Agent(obs_space, action_space(1), cfg, device="cpu")
    before = evaluate(agent)

    task, steps, gamma = SideTask(0), 400, 0.5
    frames = np.zeros((steps + 1, 24, 24, 3), np.uint8)
    actions = np.zeros((steps, 1), np.float32)
    rewards = np.zeros(steps, np.float32)
    obs, side = task.observe()
    frames[0] = obs["images/pixels"]
    rng = np.random.default_rng(0)
    for t in range(steps):
        # the loop seeds with uniform actions and no updates, as robolearn.train does
        a = rng.uniform(-1, 1, 1).astype(np.float32) if t < cfg.num_seed_steps else agent.act(obs, explore=True)
        actions[t], rewards[t] = a, task.reward(a, side)
        obs, side = task.observe()
        frames[t + 1] = obs["images/pixels"]
        if t >= cfg.num_seed_steps:
            idx = rng.integers(0, t + 1, cfg.batch_size)
            batch = {"obs": {"images/pixels": torch.from_numpy(frames[idx])},
                     "next_obs": {"images/pixels": torch.from_numpy(frames[idx + 1])},
                     "action": torch.from_numpy(actions[idx]), "reward": torch.from_numpy(rewards[idx]),
                     "discount": torch.full((cfg.batch_size,), gamma)}
            agent.update(batch, t)
    after = evaluate(agent)
    assert after > 0.85 and after > before + 0.2, (before, after)
