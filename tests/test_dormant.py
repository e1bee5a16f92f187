"""The dormant ratio (robolearn.agents.dormant): what it counts, per ensemble member, which networks
it reads, and that training logs it to TensorBoard."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from robolearn.agents.dormant import DormantProbe, probe_agent
from robolearn.agents.serl import EnsembleCritic, SERLAgent, SERLConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STATE_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (6,), np.float32)})
ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def test_neurons_that_never_fire_are_dormant_and_the_rest_are_not():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[:3] = -1e3  # always below zero: ReLU outputs 0
        net[0].bias[3:] = 5.0  # always active
    x = torch.randn(256, 4)
    with DormantProbe({"net": net}) as probe:
        net(x[:100])
        net(x[100:])  # statistics accumulate over every forward pass
    assert probe.ratios() == {"net": 3 / 8}
    assert DormantProbe({"net": net}, tau=1e-9).ratios() == {}  # nothing ran: nothing reported
    with pytest.raises(ValueError, match="tau must be positive"):
        DormantProbe({"net": net}, tau=0)


def test_each_ensemble_member_is_normalized_on_its_own():
    torch.manual_seed(0)
    critic = EnsembleCritic(5, (8,), 2, "tanh")
    with torch.no_grad():
        critic.ln_weights[0][0, 0, :2] = 0.0  # member 0: two neurons output tanh(0) = 0
        critic.ln_biases[0][0, 0, :2] = 0.0
        critic.ln_weights[0][1] *= 1e-3  # member 1: every neuron small, but alike
    with DormantProbe({"critic": critic}) as probe:
        critic(torch.randn(64, 3), torch.randn(64, 2))
    # Normalized over both members, member 1's 8 neurons would count too (10 / 16).
    assert probe.ratios() == {"critic": 2 / 16}


def test_every_hidden_layer_of_an_ensemble_counts_on_its_own_even_with_unequal_widths():
    torch.manual_seed(0)
    critic = EnsembleCritic(5, (8, 4), 3, "relu")
    with torch.no_grad():
        critic.ln_biases[1][:, 0, 0] = -1e3  # layer 2, neuron 0 of every member: ReLU(-1000) = 0
    with DormantProbe({"critic": critic}) as probe:
        critic(torch.randn(64, 3), torch.randn(64, 2))
    assert len(probe.layers["critic"]) == 2
    # 3 members x (8 + 4) neurons; LayerNorm then ReLU leaves some others dormant too, but at least those 3.
    ratio = probe.ratios()["critic"]
    assert ratio * 36 == round(ratio * 36) and ratio >= 3 / 36


def test_an_agent_probe_reads_the_trained_networks_only_and_removes_its_hooks():
    agent = SERLAgent(STATE_SPACE, ACTION_SPACE, SERLConfig(hidden_dims=(32, 32), batch_size=16, utd_ratio=2),
                      device="cpu")
    probe = probe_agent(agent)
    assert set(probe.layers) == {"actor", "critic"}  # not critic_target (frozen); the state encoder has none
    g = torch.Generator().manual_seed(0)
    obs = lambda: {"state": torch.randn(32, 6, generator=g)}  # noqa: E731
    batch = {"obs": obs(), "next_obs": obs(), "action": torch.rand(32, 2, generator=g) * 2 - 1,
             "reward": torch.rand(32, generator=g), "discount": torch.full((32,), 0.99)}
    with probe:
        agent.update(batch, 0)
    ratios = probe.ratios()
    assert set(ratios) == {"actor", "critic"} and all(0.0 <= r < 0.5 for r in ratios.values())
    assert not any(m._forward_hooks for layers in probe.layers.values() for m in layers)
    assert probe_agent(object()).layers == {}  # an agent without _modules: nothing to read, no error


def test_each_agent_logs_the_networks_its_update_trains(tmp_path):
    """The table in docs/agent_variants.md, for each registered agent."""
    from test_dsrl import tiny_base

    from robolearn.agents.diffusion import DiffusionAgent, DiffusionConfig
    from robolearn.agents.drqv2 import DrQV2Agent, DrQV2Config
    from robolearn.agents.dsrl import DSRLAgent, DSRLConfig
    from robolearn.agents.expo import EXPOAgent, EXPOConfig

    space = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
    pixels = gym.spaces.Dict({"images/front": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    base = str(tiny_base(tmp_path))
    agents = {
        "drqv2": DrQV2Agent(pixels, ACTION_SPACE, DrQV2Config(hidden_dim=16, feature_dim=8), device="cpu"),
        "diffusion": DiffusionAgent(space, ACTION_SPACE, DiffusionConfig(denoiser="mlp", mlp_hidden_dims=(16,)),
                                    device="cpu"),
        "dsrl": DSRLAgent(space, ACTION_SPACE, DSRLConfig(base=base), device="cpu"),
        "expo": EXPOAgent(space, ACTION_SPACE, EXPOConfig(base=base), device="cpu"),
    }
    expected = {"drqv2": {"encoder", "actor", "critic"}, "diffusion": {"model"},
                "dsrl": {"actor", "critic", "noise_critic"}, "expo": {"base_model", "actor", "critic"}}
    assert {name: set(probe_agent(agent).layers) for name, agent in agents.items()} == expected


def test_training_logs_the_dormant_ratio_of_each_network(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from robolearn.train import TrainConfig, train

    out = tmp_path / "r"  # the first logged update is agent step LOG_EVERY = 250
    train(TrainConfig(agent="serl", env="robolearn/PandaReach-v0", out=str(out), frames=250, seed_steps=0,
                      eval_every=1_000, eval_episodes=1, checkpoint_every=1_000, save_replay=False, video=False,
                      agent_overrides={"batch_size": 8, "utd_ratio": 1, "hidden_dims": [16], "num_critics": 2}))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dormant/actor", "dormant/critic", "train/critic_loss"} <= tags, tags
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("dormant/critic"))
