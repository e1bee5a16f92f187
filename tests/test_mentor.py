"""MENTOR (robolearn.agents.mentor, SERL's actor_moe_* and mentor_* options): top-k routing, the kept set of best
episodes and the Gaussian its weights define, the perturbation towards a draw from it, training with both, the
options, checkpoints and resume through the training loop (which tells the agent its episode returns)."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serl import ACTION_SPACE, STATE_SPACE, random_batch, small_cfg
from torch import nn

from robolearn.agents import drm, mentor
from robolearn.agents.dormant import DormantProbe, probe_agent
from robolearn.agents.serl import SERLAgent, SERLConfig, TanhGaussianActor
from robolearn.train import make_agent_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MENTOR = dict(num_critics=2, drm=True, actor_moe_experts=4, actor_moe_topk=2, mentor_perturb=True, mentor_set_size=3)


def mentor_agent(**kw) -> SERLAgent:
    return SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(**{**MENTOR, **kw}), device="cpu")


def obs_sample(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s.shape).astype(np.float32) for k, s in STATE_SPACE.spaces.items()}


def test_top_k_routing_mixes_only_the_k_chosen_experts():
    torch.manual_seed(0)
    layer = mentor.MoELayer(6, (5,), experts=5, topk=2, activation="tanh")
    x = torch.randn(32, 6)
    gates, probs = mentor.top_k_gates(layer.router(x), 2)
    assert torch.allclose(gates.sum(-1), torch.ones(32)) and ((gates > 0).sum(-1) == 2).all()
    top = probs.topk(2, dim=-1)
    assert torch.allclose(gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    out = layer(x)
    assert out.shape == (32, 5)
    # By hand: each sample's gated sum over its own two experts, Linear -> LayerNorm -> tanh each.
    want = torch.zeros(32, 5)
    for e in range(5):
        h = x @ layer.weights[0][e] + layer.biases[0][e]
        h = torch.tanh(nn.functional.layer_norm(h, (5,)) * layer.ln_weights[0][e] + layer.ln_biases[0][e])
        want += gates[:, e:e + 1] * h
    assert torch.allclose(out, want, atol=1e-6)
    # An expert outside a sample's top k does not reach its output; a chosen one does.
    for e in range(5):
        kick = torch.randn(6, 5, generator=torch.Generator().manual_seed(e))
        with torch.no_grad():
            layer.weights[0][e] += kick
        moved = (layer(x) - out).abs().amax(-1) > 1e-6
        assert torch.equal(moved, gates[:, e] > 0), e
        with torch.no_grad():
            layer.weights[0][e] -= kick
    # As the actor's net: (B, 2|A|) out, the router trained by the loss, the experts' activations probed.
    net = mentor.MoEActorNet(10, 8, (16, 12), "relu", experts=4, topk=2)
    actor = TanhGaussianActor(10, 4, (16, 12), "relu", -20.0, 2.0, net)
    action, log_prob = actor.sample(torch.randn(7, 10))
    assert action.shape == (7, 4) and log_prob.shape == (7,) and net.moe.weights[0].shape == (4, 16, 12)
    (log_prob.sum() + net.router_entropy).backward()
    assert net.moe.router.weight.grad.abs().sum() > 0
    probe = DormantProbe({"actor": actor})
    assert net.moe.acts[0] in probe.layers["actor"] and net.trunk[2] in probe.layers["actor"]
    assert drm.linear_parameter_names(net) == ["trunk.0.weight", "trunk.0.bias", "moe.weights.0", "moe.biases.0",
                                               "moe.router.weight", "moe.router.bias", "head.weight", "head.bias"]


def test_kept_set_ranks_by_return_and_fits_a_gaussian_to_the_kept_weights():
    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2), nn.Linear(2, 1))
    kept = mentor.TopSet({"net": net}, size=3)
    assert kept.count() == 0 and set(kept.tensors()) == {"mentor/filled", "mentor/returns", "mentor/net"}
    with pytest.raises(ValueError, match="no episode kept"):
        kept.fit("net")
    flats = {}
    for ret in (1.0, 5.0, 3.0, 0.5, 7.0, 2.0, 6.0, float("nan")):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape))
        flats[ret] = mentor.flat_linear(net)
        assert kept.offer(ret, {"net": net}) == (ret in (1.0, 5.0, 3.0, 7.0, 6.0))
    assert sorted(kept.returns.tolist()) == [5.0, 6.0, 7.0] and kept.count() == 3
    for slot, ret in enumerate(kept.returns.tolist()):  # each row holds the weights its return came with
        assert torch.equal(kept.weights["net"][slot], flats[ret])
    assert flats[7.0].numel() == 3 * 2 + 2 + 2 + 1  # the linear layers only, not the LayerNorm
    rows = torch.stack([flats[r] for r in (5.0, 6.0, 7.0)])
    mean, std = kept.fit("net")
    assert torch.allclose(mean, rows.mean(0)) and torch.allclose(std, rows.std(0).clamp_min(1e-7))
    g = torch.Generator().manual_seed(3)
    draw = kept.sample("net", g)
    assert torch.allclose(draw, mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3)))
    # One kept episode: the Gaussian's std is the floor, so a draw is that episode's weights.
    one = mentor.TopSet({"net": net}, size=2)
    one.offer(1.0, {"net": net})
    assert torch.allclose(one.sample("net", g), mentor.flat_linear(net), atol=1e-5)
    assert torch.equal(one.fit("net")[1], torch.full_like(mean, 1e-7))


def test_perturbation_moves_towards_a_draw_from_the_kept_weights_by_drms_alpha():
    agent = mentor_agent()
    for step in range(3):
        agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        agent.observe_episode(float(step))
    agent.update(random_batch(STATE_SPACE, 64, seed=5), 3)  # weights differ from every kept row
    assert agent.mentor.count() == 3
    agent.drm.beta = torch.tensor(0.2, dtype=torch.float64)  # alpha = 1 - 2 * 0.2
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    gen = torch.Generator().set_state(agent.update_gen.get_state())
    targets = {name: agent.mentor.sample(name, gen) for name in ("actor", "critic", "value")}
    agent._drm_perturb()
    assert torch.equal(agent.update_gen.get_state(), gen.get_state())
    for net, name in (("actor", "actor"), ("critic", "critic"), ("critic_target", "critic"), ("value", "value")):
        module, offset = getattr(agent, net), 0
        params = dict(module.named_parameters())
        linear = drm.linear_parameter_names(module)
        for pname in linear:
            p, key = params[pname], f"{net}.{pname}"
            phi = targets[name][offset:offset + p.numel()].view_as(p)
            assert torch.allclose(p, 0.6 * before[key] + 0.4 * phi, atol=1e-6), key
            offset += p.numel()
        for pname in set(params) - set(linear):  # LayerNorm gains stay
            assert torch.equal(params[pname], before[f"{net}.{pname}"]), pname
    assert not agent.actor_opt.state and not agent.critic_opt.state and not agent.value_opt.state
    # With nothing kept yet it is DrM's perturbation towards a fresh init, as without mentor_perturb.
    a, b = mentor_agent(), mentor_agent(mentor_perturb=False)
    a._drm_perturb()
    b._drm_perturb()
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k


def test_serl_with_mentor_trains_and_logs_the_actors_dormant_ratio():
    agent = mentor_agent(drm_perturb_interval=2)
    obs = obs_sample()
    mean_before = agent.act(obs, explore=False)
    for step in range(5):
        if step == 4:
            with probe_agent(agent) as probe:
                metrics = agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        else:
            metrics = agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        agent.observe_episode(10.0 - step)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert not np.allclose(agent.act(obs, explore=False), mean_before)  # the policy changed
    assert metrics["drm/perturbations"] == 2 and metrics["mentor/kept"] == 3  # at steps 2 and 4
    assert metrics["mentor/lowest_kept_return"] == 8.0
    assert 0 < metrics["mentor/router_entropy"] <= math.log(4)
    ratios = probe.ratios()
    assert "actor" in ratios and 0 <= ratios["actor"] <= 1
    assert agent.actor.net.moe.acts[0] in agent.drm.probe.layers["actor"]  # DrM's beta reads the experts too
    # The MoE actor alone on DroQ's critic (the droq_moe variant), without DrM: observe_episode keeps nothing.
    droq = SERLAgent(STATE_SPACE, ACTION_SPACE, small_cfg(num_critics=2, critic_dropout=0.01, actor_moe_experts=4,
                                                          actor_moe_topk=2), device="cpu")
    droq.observe_episode(1.0)
    assert droq.mentor is None and "mentor/actor" not in droq.state_dict()
    assert all(np.isfinite(v) for v in droq.update(random_batch(STATE_SPACE, 64), 1).values())
    # The router's entropy joins the actor loss with its weight.
    losses = []
    for weight in (0.0, 100.0):
        a = mentor_agent(actor_moe_router_entropy=weight, utd_ratio=1)
        losses.append(a.update(random_batch(STATE_SPACE, 32, seed=0), 0))
    assert losses[1]["actor_loss"] - losses[0]["actor_loss"] == pytest.approx(
        100.0 * losses[1]["mentor/router_entropy"], rel=1e-4)


def test_options_are_validated_with_one_line_errors_and_old_checkpoints_resume():
    bad = [({"actor_moe_experts": 1}, "actor_moe_experts must be 0 .off. or an integer of at least 2, got 1"),
           ({"actor_moe_experts": -2}, "actor_moe_experts must be 0"),
           ({"actor_moe_topk": 0}, "actor_moe_topk must be a positive integer, got 0"),
           ({"actor_moe_topk": 5}, r"actor_moe_topk \(5\) must not exceed actor_moe_experts \(4\)"),
           ({"actor_moe_router_entropy": -1.0}, "actor_moe_router_entropy must be zero or more"),
           ({"mentor_perturb": 1}, "mentor_perturb must be true or false"),
           ({"mentor_set_size": 0}, "mentor_set_size must be a positive integer, got 0"),
           ({"drm": False}, "mentor_perturb requires drm=true")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message) as info:
            mentor_agent(**options)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="actor_moe_experts must be 0 with network=simbav2") as info:
        mentor_agent(network="simbav2", drm=False, mentor_perturb=False, simba_hidden_dim=16)
    assert "\n" not in str(info.value)
    # --set checks the same before anything is built, naming the option.
    on = {"drm": True, "actor_moe_experts": 4, "actor_moe_topk": 2, "mentor_perturb": True}
    for options, message in [({"actor_moe_experts": -1}, "--set actor_moe_experts must be zero or more"),
                             ({"actor_moe_experts": 1}, "--set actor_moe_experts must be 0 .off."),
                             ({"actor_moe_topk": 6}, r"--set actor_moe_topk \(6\) must not exceed"),
                             ({"actor_moe_topk": 1.5}, "--set actor_moe_topk must be an integer"),
                             ({"mentor_set_size": 0}, "--set mentor_set_size must be positive"),
                             ({"mentor_perturb": "yes"}, "--set mentor_perturb must be true or false"),
                             ({"drm": False}, "--set mentor_perturb requires drm=true"),
                             ({"network": "simbav2", "drm": False, "mentor_perturb": False},
                              "--set actor_moe_experts must be 0 with network=simbav2")]:
        with pytest.raises(ValueError, match=message) as info:
            make_agent_config("serl", {**on, **options}, 0)
        assert "\n" not in str(info.value)
    cfg = make_agent_config("serl", on, 0)
    assert cfg.mentor_perturb and cfg.actor_moe_experts == 4 and cfg.mentor_set_size == 10
    # A checkpoint from before the options resumes without them, which --resume cannot turn on; the router's
    # loss weight may change.
    new = {"actor_moe_experts", "actor_moe_topk", "actor_moe_router_entropy", "mentor_perturb", "mentor_set_size"}
    saved = {k: v for k, v in asdict(SERLConfig(drm=True)).items() if k not in new}
    resumed = make_agent_config("serl", {}, 0, saved=saved)
    assert resumed.actor_moe_experts == 0 and resumed.mentor_perturb is False and resumed.drm
    for option in ({"mentor_perturb": True}, {"actor_moe_experts": 4}, {"mentor_set_size": 3}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} cannot change on --resume"):
            make_agent_config("serl", option, 0, saved=saved)
    assert make_agent_config("serl", {"actor_moe_router_entropy": 0.5}, 0, saved=saved).actor_moe_router_entropy == 0.5


def test_state_dict_round_trip_gives_the_same_actions_and_next_update(tmp_path):
    agent = mentor_agent(drm_perturb_interval=2, seed=2)
    for step in range(3):
        agent.update(random_batch(STATE_SPACE, 64, seed=step), step)
        agent.observe_episode([3.0, 1.0, 2.0][step])
    assert int(agent.drm.perturbations) == 1 and agent.mentor.count() == 3
    save_file(agent.state_dict(), str(tmp_path / "agent.safetensors"))
    config = json.loads(json.dumps(agent.config_dict()))
    assert SERLConfig.from_dict(config["config"]) == agent.cfg
    clone = SERLAgent(STATE_SPACE, ACTION_SPACE, SERLConfig.from_dict({**config["config"], "seed": 99}), device="cpu")
    clone.load_state_dict(load_file(str(tmp_path / "agent.safetensors")))
    for k, v in agent.mentor.tensors().items():  # the kept set comes back with the weights
        assert torch.equal(clone.mentor.tensors()[k], v), k
    obs = obs_sample()
    np.testing.assert_array_equal(agent.act(obs, False), clone.act(obs, False))
    np.testing.assert_array_equal(agent.act(obs, True), clone.act(obs, True))
    # The next update perturbs (step 4) towards a draw from the restored set, with the restored update stream.
    assert agent.update(random_batch(STATE_SPACE, 64, seed=10), 4) == clone.update(random_batch(STATE_SPACE, 64,
                                                                                                seed=10), 4)
    assert int(clone.drm.perturbations) == 2
    for ret in (0.5, 4.0):  # and the set goes on ranking alike
        agent.observe_episode(ret)
        clone.observe_episode(ret)
    for k, v in agent.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k
    assert sorted(clone.mentor.returns.tolist()) == [2.0, 3.0, 4.0]


def test_resume_through_the_training_loop_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """tests/test_train.py's exact-resume check (kill between checkpoints, resume, compare every tensor) with MENTOR
    on: the loop hands the agent its episode returns, and the kept set that the perturbations after the resumed
    checkpoint draw from comes back with it."""
    from test_train import exact_resume_with

    K, N = exact_resume_with(tmp_path, monkeypatch, "serl", {"drm": True, "drm_perturb_interval": 30,
                                                             "actor_moe_experts": 3, "actor_moe_topk": 2,
                                                             "mentor_perturb": True, "mentor_set_size": 2})
    ckpt = tmp_path / "b" / "checkpoints"
    at_k, at_n = (load_file(str(ckpt / f"step_{s:012d}" / "weights.safetensors")) for s in (K, N))
    # 50-step episodes, 40 seed steps: those starting at 50, 100 and 150 are offered (not the partly random first).
    assert int(at_k["mentor/filled"]) == 1 and int(at_n["mentor/filled"]) == 2
    assert "actor.net.moe.weights.0" in at_n and at_n["mentor/actor"].shape[0] == 2
    assert int(at_n["drm/perturbations"]) > int(at_k["drm/perturbations"])  # after K: towards the kept set
