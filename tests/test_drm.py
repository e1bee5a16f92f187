"""DrM (robolearn.agents.drm, `drm=True` for DrQ-v2 and SERL): the schedules of the dormant ratio against the
paper's formulas, shrink and perturb, the expectile value loss, both agents training with it, its options,
checkpoints and resume through the training loop."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_drqv2 import action_space, pixel_space
from test_drqv2 import random_batch as pixel_batch
from test_serl import ACTION_SPACE, STATE_SPACE, random_batch, small_cfg
from torch import nn

from robolearn.agents import drm
from robolearn.agents.drqv2 import Actor, Critic, DrQV2Agent, DrQV2Config, Value, stddev
from robolearn.agents.serl import EnsembleCritic, SERLAgent, SERLConfig
from robolearn.train import make_agent_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DRQ = dict(hidden_dim=32, feature_dim=16, conv_channels=8, conv_strides=(2, 2, 1, 1))


def drq_agent(**kw) -> DrQV2Agent:
    return DrQV2Agent(pixel_space(32, 3), action_space(), DrQV2Config(**{**DRQ, "drm": True, **kw}), device="cpu")


def drq_batch(seed: int) -> dict:
    return pixel_batch(16, 32, 3, seed=seed)


def serl_agent(**kw) -> SERLAgent:
    return SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(**{"num_critics": 2, "drm": True, **kw}), device="cpu")


def test_schedules_follow_the_papers_formulas():
    # alpha = clip(1 - 2 beta, 0.2, 0.9)
    for beta, alpha in [(0.0, 0.9), (0.05, 0.9), (0.1, 0.8), (0.2, 0.6), (0.35, 0.3), (0.5, 0.2), (1.0, 0.2)]:
        assert drm.perturb_factor(beta, 2.0, 0.2, 0.9) == pytest.approx(alpha), beta
    # sigma = 0.8 / (1 + exp(-(beta - 0.2) / 0.1)): half of 0.8 at beta_hat, 0.8 / (1 + e^2) when no neuron is dormant
    for beta, sigma in [(0.2, 0.4), (0.0, 0.8 / (1 + math.e**2)), (0.5, 0.8 / (1 + math.e**-3)), (1.0, 0.79973)]:
        assert drm.dormant_stddev(beta, 0.2) == pytest.approx(sigma, abs=1e-5), beta
    # lambda = 0.6 / (1 + exp((beta - 0.2) / 0.02)): half of 0.6 at beta_hat, ~0.6 below it, ~0 above it
    for beta, lam in [(0.2, 0.3), (0.0, 0.6 / (1 + math.e**-10)), (0.22, 0.6 / (1 + math.e)), (0.5, 1.8e-7),
                      (1.0, 0.0)]:
        assert drm.exploit_lambda(beta, 0.6, 0.2) == pytest.approx(lam, abs=1e-8), beta
    # SERL's analogue: the entropy of tanh(N(0, sigma^2)) per action dimension, against a sampled estimate of
    # E[-log p(a)] (SERL's actor computes log p the same way) and never above log 2 (uniform on [-1, 1]).
    for sigma in (0.05, 0.3, 0.8):
        u = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
        log_p = (-0.5 * (u / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
                 - 2.0 * (math.log(2.0) - u - torch.nn.functional.softplus(-2.0 * u)))
        assert drm.tanh_gaussian_entropy(sigma, 1) == pytest.approx(-log_p.mean().item(), abs=5e-3), sigma
        assert drm.tanh_gaussian_entropy(sigma, 3) == pytest.approx(3 * drm.tanh_gaussian_entropy(sigma, 1))
        assert drm.tanh_gaussian_entropy(sigma, 1) < math.log(2)
    assert drm.tanh_gaussian_entropy(0.05, 1) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * 0.05**2),
                                                               abs=3e-3)  # tanh is nearly the identity there
    assert drm.exploit_backup(torch.tensor([1.0]), torch.tensor([11.0]), 0.3).item() == pytest.approx(4.0)


def test_expectile_loss_weights_and_its_minimizer_is_the_expectile():
    v = torch.zeros(3)
    q = torch.tensor([2.0, -1.0, 0.0])
    assert drm.expectile_loss(v, q, 0.9).item() == pytest.approx((0.9 * 4 + 0.1 * 1) / 3)
    assert drm.expectile_loss(v, q, 0.5).item() == pytest.approx(0.5 * (q**2).mean().item())
    # The minimizer over a constant v: tau E[(q - v)+] = (1 - tau) E[(v - q)+], above the mean for tau = 0.9.
    q = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = drm.expectile_loss(v.expand_as(q), q, 0.9)
        loss.backward()
        return loss

    opt.step(closure)
    v = v.detach()
    above, below = float((q - v).clamp_min(0).mean()), float((v - q).clamp_min(0).mean())
    assert 0.9 * above == pytest.approx(0.1 * below, rel=1e-6)
    assert v > q.mean() + 0.5


def test_shrink_and_perturb_mixes_linear_weights_only_and_clears_adam():
    torch.manual_seed(0)
    net, fresh = (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1)) for _ in range(2))
    with torch.no_grad():
        net[1].weight.fill_(2.0)  # a trained LayerNorm gain: left alone
    phi = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    old = {k: v.clone() for k, v in net.state_dict().items()}
    assert opt.state
    drm.perturb_([(net, fresh)], 0.7, [opt])
    assert not opt.state  # Adam starts over
    for k, v in net.state_dict().items():
        if k.startswith("1."):
            assert torch.equal(v, old[k]), k
        else:
            assert torch.allclose(v, 0.7 * old[k] + 0.3 * phi[k]), k
    # The ensemble's stacked linear layers mix; its LayerNorms do not.
    critic, other = EnsembleCritic(5, (8,), 2, "tanh"), EnsembleCritic(5, (8,), 2, "tanh")
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    drm.shrink_perturb_(critic, other, 0.25)
    assert drm.linear_parameter_names(critic) == ["weights.0", "weights.1", "biases.0", "biases.1"]
    for k, v in critic.state_dict().items():
        want = before[k] if k.startswith("ln_") else 0.25 * before[k] + 0.75 * other.state_dict()[k]
        assert torch.allclose(v, want), k
    # Fresh weights come from the generator (reproducibly), never from torch's global RNG.
    g, state = torch.Generator().manual_seed(1), torch.get_rng_state()
    with drm.fresh_init(g):
        a = nn.Linear(4, 4)
    with drm.fresh_init(torch.Generator().manual_seed(1)):
        b = nn.Linear(4, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(torch.get_rng_state(), state)


def test_beta_awakening_and_perturbations_fall_due_every_interval_above_the_threshold():
    cfg = SERLConfig(drm=True, drm_perturb_interval=5, drm_perturb_threshold=0.3)
    actor = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    state = drm.DrM(cfg, actor)
    assert float(state.beta) == 1.0 and int(state.awaken_step) == -1  # fully dormant until measured
    with torch.no_grad():
        actor[0].bias.copy_(torch.tensor([-1e3] * 3 + [5.0] * 5))  # 3 of 8 never fire
    with state.probe:
        actor(torch.randn(32, 4))
    state.observe(3)
    assert float(state.beta) == 3 / 8 and int(state.awaken_step) == -1  # above beta_hat 0.2: still asleep
    state.observe(4)  # the actor did not run since: nothing new
    with torch.no_grad():
        actor[0].bias.fill_(5.0)
    with state.probe:
        actor(torch.randn(32, 4))
    state.observe(6)
    assert float(state.beta) == 0.0 and int(state.awaken_step) == 6  # awake from here on
    state.beta, state.awaken_step = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-1)
    due = [s for s in range(0, 21, 2) if state.perturb_due(s)]  # an update every 2 steps
    assert due == [6, 10, 16, 20] and int(state.perturbations) == 4
    state.beta = torch.tensor(0.1, dtype=torch.float64)  # below the threshold: the boundary passes unperturbed
    assert not state.perturb_due(25) and int(state.next_perturb) == 30 and int(state.perturbations) == 4
    # The noise std: sigma(beta) alone until the actor awakens, then at least the restarted schedule.
    assert state.stddev(0.9) == pytest.approx(drm.dormant_stddev(0.1, 0.2))
    state.awaken_step = torch.tensor(7)
    assert state.stddev(0.9) == 0.9 and state.stddev(0.01) == pytest.approx(drm.dormant_stddev(0.1, 0.2))


def test_drqv2_with_drm_trains_perturbs_and_follows_beta():
    agent = drq_agent(drm_perturb_interval=3)
    assert agent.value is not None and set(agent._modules()) >= {"value"}
    obs = {k: v[0].numpy() for k, v in drq_batch(9)["obs"].items()}
    mean_before = agent.act(obs, explore=False)
    for step in range(5):
        metrics = agent.update(drq_batch(step), step)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert not np.allclose(agent.act(obs, explore=False), mean_before)  # the policy changed
    assert {"drm/beta", "drm/perturb_factor", "drm/lambda", "drm/stddev", "drm/perturbations", "drm/value_loss",
            "drm/awaken_step"} <= set(metrics)
    assert metrics["drm/perturbations"] == 1 and int(agent.drm.next_perturb) == 6  # at step 3
    beta = metrics["drm/beta"]
    assert 0 <= beta <= 1 and metrics["drm/lambda"] == pytest.approx(drm.exploit_lambda(beta, 0.6, 0.2))
    # The std follows beta: sigma(beta) before awakening, at least the schedule restarted at it after.
    agent.drm.beta, agent.drm.awaken_step = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-1)
    assert agent._stddev(10) == pytest.approx(drm.dormant_stddev(0.5, 0.2))
    agent.drm.beta, agent.drm.awaken_step = torch.tensor(0.0, dtype=torch.float64), torch.tensor(4)
    assert agent._stddev(10) == pytest.approx(stddev(agent.cfg.stddev_schedule, 6))
    # A perturbation: linear weights alpha theta + (1 - alpha) phi, phi from the update stream.
    agent.drm.beta = torch.tensor(0.2, dtype=torch.float64)  # alpha = 1 - 2 * 0.2
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    gen = torch.Generator().set_state(agent.update_gen.get_state())
    with drm.fresh_init(gen):
        d = agent.encoder.repr_dim
        fresh = {"actor": Actor(d, 2, 16, 32), "critic": Critic(d, 2, 16, 32), "value": Value(d, 16, 32)}
    fresh["critic_target"] = fresh["critic"]
    agent._drm_perturb()
    for net, phi in fresh.items():
        for name, p in getattr(agent, net).named_parameters():
            key = f"{net}.{name}"
            layer_norm = name.startswith("trunk.1.")  # trunk: Linear, LayerNorm, Tanh
            want = before[key] if layer_norm else 0.6 * before[key] + 0.4 * phi.state_dict()[name]
            assert torch.allclose(p, want, atol=1e-6), key
    assert torch.equal(agent.encoder.towers[0][0].weight, before["encoder.towers.0.0.weight"])  # the convs stay
    assert not agent.actor_opt.state and not agent.value_opt.state


def test_drqv2_backup_blends_the_value_net_by_lambda():
    """Two agents alike but for lambda_hat (0.6 and 0): with V(s') = 1000 their targets differ by
    d * lambda * (1000 - Q)."""
    targets = []
    for target_lambda in (0.6, 0.0):
        agent = drq_agent(drm_target_lambda=target_lambda)
        with torch.no_grad():
            agent.value.V[-1].weight.zero_()
            agent.value.V[-1].bias.fill_(1000.0)
        agent.drm.beta = torch.tensor(0.0, dtype=torch.float64)
        targets.append(agent.update(drq_batch(0), 0)["critic_target_q"])
    lam = drm.exploit_lambda(0.0, 0.6, 0.2)
    assert targets[0] - targets[1] == pytest.approx(0.99**3 * lam * 1000.0, rel=2e-3)


def test_serl_with_drm_trains_raises_the_target_entropy_and_blends_the_backup():
    agent = serl_agent(drm_perturb_interval=2)
    feat = torch.randn(16, agent.encoder.out_dim)
    mean_before = agent.actor(feat)[0].detach()
    agent.drm.beta = torch.tensor(1.0, dtype=torch.float64)  # dormant: the target entropy rises
    metrics = agent.update(random_batch(STATE_SPACE, 64, seed=0), 0)
    high = drm.tanh_gaussian_entropy(drm.dormant_stddev(1.0, 0.2), 4)
    assert high > -2.0 and metrics["drm/target_entropy"] == pytest.approx(high)
    for step in range(1, 4):
        metrics = agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert not torch.allclose(agent.actor(feat)[0], mean_before)
    assert {"drm/beta", "drm/perturb_factor", "drm/lambda", "drm/target_entropy", "drm/perturbations",
            "drm/value_loss"} <= set(metrics)
    assert metrics["drm/perturbations"] == 1  # at step 2
    # SERL's LayerNorm + tanh actor reads beta 0, so the target entropy is back at SERL's -|A|/2.
    assert metrics["drm/beta"] == 0.0
    assert agent.update(random_batch(STATE_SPACE, 64, seed=9), 4)["drm/target_entropy"] == -2.0
    assert agent.config_dict()["target_entropy"] == -2.0
    # The backup: V(s') = 1000 against lambda_hat 0 moves the TD target by d * lambda * (1000 - Q).
    targets = []
    for target_lambda in (0.6, 0.0):
        agent = serl_agent(drm_target_lambda=target_lambda, utd_ratio=1)
        with torch.no_grad():
            agent.value[-1].weight.zero_()
            agent.value[-1].bias.fill_(1000.0)
        agent.drm.beta = torch.tensor(0.0, dtype=torch.float64)
        targets.append(agent.update(random_batch(STATE_SPACE, 32, seed=0), 0)["target_q"])
    lam = drm.exploit_lambda(0.0, 0.6, 0.2)
    assert targets[0] - targets[1] == pytest.approx(0.99 * lam * 1000.0, rel=2e-3)
    # DroQ composes with it.
    droq = serl_agent(critic_dropout=0.01, drm_perturb_interval=1)
    assert all(np.isfinite(v) for v in droq.update(random_batch(STATE_SPACE, 64), 1).values())


def test_options_are_validated_with_one_line_errors_and_old_checkpoints_resume():
    bad = [({"drm": 1}, "drm must be true or false"),
           ({"drm_perturb_interval": 0}, "drm_perturb_interval must be a positive integer, got 0"),
           ({"drm_perturb_interval": 2.5}, "drm_perturb_interval must be a positive integer"),
           ({"drm_perturb_rate": -1.0}, "drm_perturb_rate must be zero or more"),
           ({"drm_max_perturb_factor": 1.5}, r"drm_max_perturb_factor must be in \[0, 1\]"),
           ({"drm_min_perturb_factor": 0.95}, r"drm_min_perturb_factor \(0.95\) must not exceed"),
           ({"drm_target_beta": -0.1}, r"drm_target_beta must be in \[0, 1\]"),
           ({"drm_target_lambda": 2.0}, r"drm_target_lambda must be in \[0, 1\]"),
           ({"drm_expectile": 1.0}, r"drm_expectile must be in \(0, 1\), got 1.0")]
    for options, message in bad:
        for make in (lambda o: serl_agent(**o), lambda o: drq_agent(**o)):
            with pytest.raises(ValueError, match=message) as info:
                make(options)
            assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="drm must be false with network=simbav2"):
        serl_agent(network="simbav2")
    # --set checks the same before anything is built, naming the option.
    for agent in ("serl", "drqv2"):
        for options, message in [({"drm": "yes"}, "--set drm must be true or false"),
                                 ({"drm_perturb_interval": 0}, "--set drm_perturb_interval must be positive"),
                                 ({"drm_expectile": 0.0}, r"--set drm_expectile must be in \(0, 1\)"),
                                 ({"drm_target_beta": 1.2}, r"--set drm_target_beta must be in \[0, 1\]"),
                                 ({"drm_min_perturb_factor": 0.5, "drm_max_perturb_factor": 0.4},
                                  "--set drm_min_perturb_factor .* must not exceed")]:
            with pytest.raises(ValueError, match=message) as info:
                make_agent_config(agent, {"drm": True, **options}, 0)
            assert "\n" not in str(info.value)
        assert make_agent_config(agent, {"drm": True}, 0).drm is True
    # A checkpoint from before the options resumes without DrM, which --resume cannot turn on; its pace may change.
    for name, cls in (("serl", SERLConfig), ("drqv2", DrQV2Config)):
        saved = {k: v for k, v in asdict(cls()).items() if not k.startswith("drm")}
        assert make_agent_config(name, {}, 0, saved=saved).drm is False
        with pytest.raises(ValueError, match="drm cannot change on --resume"):
            make_agent_config(name, {"drm": True}, 0, saved=saved)
        assert make_agent_config(name, {"drm_perturb_interval": 7}, 0, saved=saved).drm_perturb_interval == 7


@pytest.mark.parametrize("agent_name", ["serl", "drqv2"])
def test_state_dict_round_trip_gives_the_same_actions_and_next_update(tmp_path, agent_name):
    if agent_name == "serl":
        make, batch, obs_space = serl_agent, lambda s: random_batch(STATE_SPACE, 64, seed=s), STATE_SPACE
        cls, rebuild = SERLConfig, lambda cfg: SERLAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    else:
        make, batch, obs_space = drq_agent, drq_batch, pixel_space(32, 3)
        cls, rebuild = DrQV2Config, lambda cfg: DrQV2Agent(obs_space, action_space(), cfg, device="cpu")
    agent = make(drm_perturb_interval=2, seed=2)
    for step in range(3):
        agent.update(batch(step), step)
    assert int(agent.drm.perturbations) == 1
    save_file(agent.state_dict(), str(tmp_path / "agent.safetensors"))
    config = json.loads(json.dumps(agent.config_dict()))
    assert cls.from_dict(config["config"]) == agent.cfg
    clone = rebuild(cls.from_dict({**config["config"], "seed": 99}))
    clone.load_state_dict(load_file(str(tmp_path / "agent.safetensors")))
    for k, v in agent.drm.tensors().items():
        assert torch.equal(clone.drm.tensors()[k], v), k
    rng = np.random.default_rng(0)
    obs = {k: (rng.integers(0, 256, s.shape) if s.dtype == np.uint8 else rng.normal(size=s.shape)).astype(s.dtype)
           for k, s in obs_space.spaces.items()}
    np.testing.assert_array_equal(agent.act(obs, False), clone.act(obs, False))
    np.testing.assert_array_equal(agent.act(obs, True), clone.act(obs, True))
    # The next update perturbs (step 4): the fresh weights come from the restored update stream.
    assert agent.update(batch(10), 4) == clone.update(batch(10), 4)
    assert int(clone.drm.perturbations) == 2
    for k, v in agent.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k


@pytest.mark.parametrize("agent", ["serl", "drqv2"])
def test_resume_through_the_training_loop_matches_the_uninterrupted_run(tmp_path, monkeypatch, agent):
    """tests/test_train.py's exact-resume check (kill between checkpoints, resume, compare every tensor) with DrM on,
    perturbing before and after the checkpoint resumed from: value net, beta, counters and streams come back."""
    from test_train import exact_resume_with

    K, N = exact_resume_with(tmp_path, monkeypatch, agent, {"drm": True, "drm_perturb_interval": 30})
    ckpt = tmp_path / "b" / "checkpoints"
    at_k, at_n = (load_file(str(ckpt / f"step_{s:012d}" / "weights.safetensors")) for s in (K, N))
    assert "value.0.weight" in at_n or "value.trunk.0.weight" in at_n
    assert 1 <= int(at_k["drm/perturbations"]) < int(at_n["drm/perturbations"])
