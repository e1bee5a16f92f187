"""SimbaV2 networks for SERL (robolearn.agents.simba, `network=simbav2`): the hypersphere, the categorical
backup, the reward scale, training, options, the dormant probe, checkpoints and resume through the loop."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serl import ACTION_SPACE, STATE_SPACE, random_batch, small_cfg

from robolearn.agents import simba
from robolearn.agents.dormant import probe_agent
from robolearn.agents.serl import SERLAgent, SERLConfig
from robolearn.train import make_agent_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIMBA = dict(network="simbav2", simba_hidden_dim=32, num_critics=2)


def simba_agent(**kw) -> SERLAgent:
    return SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(**{**SIMBA, **kw}), device="cpu")


def obs_sample(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s.shape).astype(np.float32) for k, s in STATE_SPACE.spaces.items()}


def column_norms(module) -> torch.Tensor:
    return torch.cat([w.detach().norm(dim=-2).flatten() for w in simba.hyperspherical_weights(module)])


def test_projection_keeps_the_mean_and_the_target_takes_the_lowest_member():
    support = torch.linspace(-5.0, 5.0, 11)
    probs = torch.softmax(torch.randn(6, 11, generator=torch.Generator().manual_seed(0)), -1)
    atoms = support * 0.9 + torch.tensor([0.0, 0.25, -1.3, 0.05, 3.0, -0.7])[:, None]
    inside = (atoms.min(1).values >= -5) & (atoms.max(1).values <= 5)
    out = simba.project(probs, atoms, support)
    assert torch.allclose(out.sum(-1), torch.ones(6)) and (out >= 0).all()
    mean = (probs * atoms).sum(-1)
    assert torch.allclose((out * support).sum(-1)[inside], mean[inside], atol=1e-5)  # two-hot keeps the mean
    assert not inside.all()  # a row past the top end is clipped to it, so its mean moves
    # Two members: per row the lower one's distribution, moved to r + d * atom.
    low, high = torch.zeros(11), torch.zeros(11)
    low[3], high[8] = 1.0, 1.0  # at -2 and 3
    log_probs = torch.stack([torch.stack([low, high]), torch.stack([high, low])]).clamp_min(1e-12).log()
    target = simba.categorical_target(log_probs, support, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]))
    assert torch.allclose((target * support).sum(-1), torch.tensor([1.0 + 0.5 * -2.0, 0.0]), atol=1e-5)


def test_reward_scaler_folds_batches_like_one_and_bounds_the_return():
    a, b = simba.RewardScaler(0.97, 5.0), simba.RewardScaler(0.97, 5.0)
    r = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 2
    for part in r.split(100):
        a.observe(part)
    b.observe(r)
    for k, v in a.tensors().items():
        assert torch.allclose(v, b.tensors()[k]), k
    assert torch.allclose(a.mean, r.double().mean()) and torch.allclose(a.m2 / a.count, r.double().var(unbiased=False))
    # max|G| <= max|r| / (1 - d) reaches v_max after scaling; here that term outweighs the variance's.
    assert torch.isclose(a.scale(), (r.max() / 0.03 / 5.0).float())
    assert simba.RewardScaler(0.97, 5.0).scale() == pytest.approx(1e-4)  # nothing seen: rewards 0 stay 0


def test_simbav2_trains_keeps_weights_on_the_sphere_and_logs_dormant_ratios():
    agent = simba_agent()
    assert isinstance(agent.critic, simba.SimbaV2Critic) and isinstance(agent.actor.net, simba.SimbaV2Net)
    feat = torch.randn(16, agent.encoder.out_dim)
    action = torch.rand(16, 4) * 2 - 1
    assert agent.critic(feat, action).shape == (2, 16)
    assert agent.critic.log_probs(feat, action).shape == (2, 16, 101)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    mean_before = agent.actor(feat)[0].detach()
    probe = probe_agent(agent)
    assert set(probe.layers) == {"actor", "critic"}
    for step in range(4):
        with probe:
            metrics = agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert {"critic_loss", "q", "target_q", "actor_loss", "reward_scale"} <= set(metrics)
    assert metrics["critic_loss"] > 0  # a cross-entropy
    assert set(probe.ratios()) == {"actor", "critic"}
    after = agent.state_dict()
    for net in ("actor.", "critic.", "critic_target."):
        assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith(net)), net
    assert not torch.allclose(agent.actor(feat)[0], mean_before)  # the policy changed
    # Adam moved the weights off the sphere; the hooks put every column back after each step.
    moved = [k for k in after if k.endswith("_w") or "_w." in k]
    assert moved and all(not torch.equal(after[k], before[k]) for k in moved if not k.startswith("critic_target"))
    for net in (agent.critic, agent.actor):
        assert torch.allclose(column_norms(net), torch.ones(()), atol=1e-5)


def test_options_are_validated_with_one_line_errors_and_old_checkpoints_resume():
    bad = [({"network": "simba"}, r"network must be one of \['mlp', 'simbav2'\], got 'simba'"),
           ({"simba_atoms": 1}, "simba_atoms must be at least 2, got 1"),
           ({"simba_blocks": 0}, "simba_blocks must be at least 1"),
           ({"simba_hidden_dim": 0}, "simba_hidden_dim must be at least 1"),
           ({"simba_v_max": 0.0}, "simba_v_max must be positive"),
           ({"simba_c_shift": -1.0}, "simba_c_shift must be positive"),
           ({"critic_dropout": 0.01}, "critic_dropout must be 0 with network=simbav2")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message) as info:
            simba_agent(**options)
        assert "\n" not in str(info.value)
    # --set checks the same before anything is built, naming the option.
    for options, message in [({"network": "resnet"}, "--set network must be one of"),
                             ({"simba_v_max": -5.0}, "--set simba_v_max must be positive"),
                             ({"simba_atoms": 0}, "--set simba_atoms must be positive"),
                             ({"simba_blocks": 1.5}, "--set simba_blocks must be an integer")]:
        with pytest.raises(ValueError, match=message) as info:
            make_agent_config("serl", {"network": "simbav2", **options}, 0)
        assert "\n" not in str(info.value)
    assert make_agent_config("serl", {"network": "simbav2"}, 0).network == "simbav2"
    # A checkpoint from before the options: the mlp it was, which --resume cannot turn into SimbaV2.
    new = {"network", "simba_hidden_dim", "simba_blocks", "simba_atoms", "simba_v_max", "simba_c_shift"}
    saved = {k: v for k, v in asdict(SERLConfig()).items() if k not in new}
    assert make_agent_config("serl", {}, 0, saved=saved).network == "mlp"
    with pytest.raises(ValueError, match="network cannot change on --resume"):
        make_agent_config("serl", {"network": "simbav2"}, 0, saved=saved)


def test_state_dict_round_trip_gives_the_same_actions_and_next_update(tmp_path):
    cfg = small_cfg(**SIMBA, seed=2)
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    for step in range(3):
        agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
    assert float(agent.reward_scaler.count) == 3 * 64
    assert set(agent.reward_scaler.tensors()) == {f"reward_scaler/{k}" for k in ("count", "mean", "m2", "abs_max")}
    save_file(agent.state_dict(), str(tmp_path / "agent.safetensors"))
    config = json.loads(json.dumps(agent.config_dict()))
    assert SERLConfig.from_dict(config["config"]) == cfg
    clone = SERLAgent(STATE_SPACE, ACTION_SPACE, SERLConfig.from_dict({**config["config"], "seed": 99}), device="cpu")
    clone.load_state_dict(load_file(str(tmp_path / "agent.safetensors")))
    for k, v in agent.reward_scaler.tensors().items():  # the scale comes back with the weights
        assert torch.equal(clone.reward_scaler.tensors()[k], v), k
    obs = obs_sample()
    np.testing.assert_array_equal(agent.act(obs, False), clone.act(obs, False))
    np.testing.assert_array_equal(agent.act(obs, True), clone.act(obs, True))
    batch = random_batch(STATE_SPACE, 64, seed=10)
    batch["reward"] *= 0.5  # below the max|r| seen: the scale this update uses is the loaded one
    assert agent.update(batch, 3) == clone.update(batch, 3)
    for k, v in agent.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k
    # An mlp checkpoint does not load into SimbaV2: the tensors differ by name.
    with pytest.raises(RuntimeError, match="Missing key"):
        clone.load_state_dict(SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(), device="cpu").state_dict())


def test_resume_through_the_training_loop_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """tests/test_train.py's exact-resume check (kill between checkpoints, resume, compare every tensor) on
    SimbaV2: its weights, optimizer moments and reward scale must all come back."""
    from test_train import exact_resume_with

    K, N = exact_resume_with(tmp_path, monkeypatch, "serl", {"network": "simbav2", "simba_hidden_dim": 16})
    saved = load_file(str(tmp_path / "b" / "checkpoints" / f"step_{N:012d}" / "weights.safetensors"))
    assert "critic.net.up_w.0" in saved and float(saved["reward_scaler/count"]) > 0
