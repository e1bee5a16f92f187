"""DSRL-NA: loading and checking the frozen base, the update (aliased targets, distillation, actor),
acting through the base, the noise bound, self-contained checkpoints, and the errors it raises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robolearn.agents.diffusion import DiffusionAgent, DiffusionConfig
from robolearn.agents.diffusion_base import executed
from robolearn.agents.dsrl import AGENT, DSRLAgent, DSRLConfig, loop_params
from robolearn.agents.errors import NonFiniteLossError
from robolearn.agents.serl import SERLAgent, SERLConfig
from robolearn.checkpoint import save_checkpoint

SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
ACTIONS = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
TO, P, H, A = 2, 8, 4, 2  # the tiny base's obs_horizon, pred_horizon, action_horizon; the action dim


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_like_trainer(agent, out: Path, space=SPACE, actions=ACTIONS) -> Path:
    """A checkpoint with the config layout Trainer.save writes (its _spec, agent_config, train_config)."""
    config = {"agent": agent.name, "env_id": "test/Tiny-v0",
              "observation_space": {k: list(v.shape) for k, v in space.spaces.items()},
              "action_shape": list(actions.shape), "agent_config": agent.config_dict(), "train_config": {}}
    save_checkpoint(out / "checkpoints", 1, agent.state_dict(), config, {"step": 1, "episode": 0, "history": {}})
    return out


def tiny_base(out: Path, space=SPACE, actions=ACTIONS, seed: int = 0) -> Path:
    cfg = DiffusionConfig(obs_horizon=TO, pred_horizon=P, action_horizon=H, denoiser="mlp", mlp_hidden_dims=(32, 32),
                          diffusion_step_embed_dim=8, train_timesteps=20, inference_steps=4, batch_size=8,
                          warmup_steps=0, seed=seed)
    return save_like_trainer(DiffusionAgent(space, actions, cfg, device="cpu"), out, space, actions)


def tiny_cfg(base: Path, **kw) -> DSRLConfig:
    fields = dict(base=str(base), hidden_dims=(32, 32), num_critics=4, critic_subsample=2, batch_size=8, utd_ratio=2,
                  noise_critic_steps=2, actor_steps=3, init_temperature=0.1)
    return DSRLConfig(**{**fields, **kw})


def chunk_batch(n: int, seed: int = 0) -> dict:
    """Chunk transitions as ReplayBuffer.sample_chunks gives them (obs_horizon TO, chunk H)."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": {"state": torch.randn(n, TO, 3, generator=g)}, "next_obs": {"state": torch.randn(n, TO, 3, generator=g)},
            "action": torch.rand(n, H, A, generator=g) * 2 - 1, "reward": torch.rand(n, generator=g),
            "discount": torch.full((n,), 0.99 ** H)}


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def record_samples(agent) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (state window, noise) of every base.sample call the agent makes."""
    calls, sample = [], agent.base.sample

    def recorded(obs_window, noise=None, ema=True):
        calls.append((obs_window["state"].clone(), noise.clone()))
        return sample(obs_window, noise, ema)

    agent.base.sample = recorded
    return calls


def observations(n: int, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"state": rng.normal(size=3).astype(np.float32)} for _ in range(n)]


def test_update_trains_actor_and_both_critics_but_never_the_base(tmp_path):
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path)), device="cpu")
    assert agent.name == "dsrl" and agent.noise_dim == P * A
    assert not any(p.requires_grad for p in agent.base.ema.parameters())
    nets = {"actor": agent.actor, "critic": agent.critic, "noise_critic": agent.noise_critic,
            "critic_target": agent.critic_target}
    before = {k: params(m) for k, m in nets.items()}
    base_before = {k: v.clone() for k, v in agent.base.ema.state_dict().items()}
    alpha_before = float(agent.log_alpha.detach())
    batch = chunk_batch(16)
    calls = record_samples(agent)
    actor_rows, step_actor = [], agent._update_actor_and_alpha
    agent._update_actor_and_alpha = lambda feat, *a: actor_rows.append(feat.clone()) or step_actor(feat, *a)

    m = agent.update(batch, step=0)
    # actor_steps=3 over utd_ratio=2 strided minibatches of the batch's features: rows 0::2, 1::2, 0::2.
    feat = agent._features(batch["obs"])
    assert [f.shape[0] for f in actor_rows] == [8, 8, 8]
    for i, f in enumerate(actor_rows):
        torch.testing.assert_close(f, feat[i % 2::2])
    assert {"critic_loss", "q", "target_q", "noise_critic_loss", "distill_target_q", "actor_loss", "entropy",
            "alpha_loss", "alpha", "noise_abs"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    for k, module in nets.items():
        assert changed(before[k], module), f"{k} did not change"
    assert float(agent.log_alpha.detach()) != alpha_before
    assert all(torch.equal(v, agent.base.ema.state_dict()[k]) for k, v in base_before.items())
    assert int(agent.critic_updates) == 2 and int(agent.actor_updates) == 3  # actor_steps, cycling the minibatches
    # The aliased target: the base steered by the actor's noise at every next_obs window, then distillation
    # from the batch's obs windows (batch_size rows per distillation step).
    assert torch.equal(calls[0][0], batch["next_obs"]["state"])
    assert calls[0][1].shape == (16, P, A) and calls[0][1].abs().max() <= agent.cfg.noise_bound
    distilled = calls[1][0]
    assert distilled.shape == (2 * 8, TO, 3)
    assert all(any(torch.equal(w, o) for o in batch["obs"]["state"]) for w in distilled)


def test_deterministic_act_replans_every_action_horizon_and_reset_clears(tmp_path):
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path)), device="cpu")
    calls = record_samples(agent)
    obs = observations(2 * H + 1)
    agent.reset()
    first = [agent.act(o, explore=False) for o in obs]
    assert len(calls) == 3  # at steps 0, H and 2H
    assert all(a.shape == (A,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1) for a in first)
    # Step 0: the first obs repeated as the window, the actor's tanh(mean) * noise_bound as the noise.
    window = torch.as_tensor(np.stack([obs[0]["state"]] * TO))[None]
    assert torch.equal(calls[0][0], window)
    with torch.no_grad():
        noise = torch.tanh(agent.actor(agent._features({"state": window}))[0]) * agent.cfg.noise_bound
        chunk = agent.base.sample({"state": window}, noise.reshape(1, P, A))[0].numpy()
    calls.pop()  # this test's own call
    assert torch.equal(calls[0][1], noise.reshape(1, P, A))
    np.testing.assert_array_equal(np.stack(first[:H]), chunk[TO - 1:TO - 1 + H])
    # Step H: the window holds the last TO observations.
    assert torch.equal(calls[1][0], torch.as_tensor(np.stack([o["state"] for o in obs[H - TO + 1:H + 1]]))[None])

    agent.act(obs[0], explore=False)  # mid-chunk: from the queue, no new sample
    assert len(calls) == 3 and agent._chunks.queue
    agent.reset()
    assert not agent._chunks.queue and not agent._chunks.history
    again = [agent.act(o, explore=False) for o in obs]
    assert len(calls) == 6
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    agent.reset()
    explored = [agent.act(o, explore=True) for o in obs]
    assert not np.array_equal(np.stack(first), np.stack(explored))


def test_noise_stays_within_noise_bound(tmp_path):
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), noise_bound=0.7), device="cpu")
    with torch.no_grad():  # push the actor's means far out, half of them negative, so tanh saturates
        head = agent.actor.net[-1]
        head.weight.mul_(100.0)
        head.bias[:agent.noise_dim] = torch.linspace(-50, 50, agent.noise_dim)
    calls = record_samples(agent)
    for explore in (False, True):
        agent.reset()
        for o in observations(H + 1):
            agent.act(o, explore=explore)
    noise = torch.cat([n for _, n in calls])
    assert noise.abs().max() <= 0.7 and noise.abs().max() > 0.69
    feat = torch.randn(64, agent._features({"state": torch.zeros(1, TO, 3)}).shape[-1])
    for explore in (False, True):
        assert agent.actor_noise(feat, explore).abs().max() <= 0.7
    assert agent.update(chunk_batch(16), step=0)["noise_abs"] <= 0.7


def test_state_dict_round_trips_without_the_base_file(tmp_path, monkeypatch):
    base_dir = tiny_base(tmp_path / "base")
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(base_dir), device="cpu")
    agent.update(chunk_batch(16), step=0)
    save_file(agent.state_dict(), str(tmp_path / "dsrl.safetensors"))
    saved_config = json.loads(json.dumps(agent.config_dict()))
    save_like_trainer(agent, tmp_path / "run")
    assert saved_config["config"]["base_config"]["agent"] == "diffusion"
    shutil.rmtree(base_dir)

    clone = DSRLAgent(SPACE, ACTIONS, DSRLConfig.from_dict(saved_config["config"]), device="cpu")
    with pytest.raises(RuntimeError, match="load_state_dict"):
        clone.act(observations(1)[0], explore=False)  # no base weights until they are loaded
    clone.load_state_dict(load_file(str(tmp_path / "dsrl.safetensors")))
    state, loaded = agent.state_dict(), clone.state_dict()
    assert state.keys() == loaded.keys() and any(k.startswith("base.") for k in state)
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    for explore in (False, True):
        agent.reset()
        clone.reset()
        for o in observations(2 * H + 1):
            np.testing.assert_array_equal(agent.act(o, explore=explore), clone.act(o, explore=explore))
    assert loop_params(clone.cfg, None)["obs_horizon"] == TO  # horizons from base_config, not the file

    # And through the checkpoint loader every command uses, the base file still gone.
    from robolearn.agents import registry
    from robolearn.train import load_agent

    monkeypatch.setitem(registry.MODULES, "dsrl", "robolearn.agents.dsrl")
    loaded_agent, config = load_agent(tmp_path / "run")
    assert config["agent"] == "dsrl" and isinstance(loaded_agent, DSRLAgent)
    agent.reset()
    loaded_agent.reset()
    for o in observations(H + 1):
        np.testing.assert_array_equal(agent.act(o, explore=False), loaded_agent.act(o, explore=False))


def test_refuses_a_base_that_is_not_a_diffusion_checkpoint(tmp_path):
    serl = SERLAgent(SPACE, ACTIONS, SERLConfig(hidden_dims=(16, 16)), device="cpu")
    path = save_like_trainer(serl, tmp_path)
    with pytest.raises(ValueError, match=r"DSRLConfig\.base: .*'serl' checkpoint") as err:
        DSRLAgent(SPACE, ACTIONS, tiny_cfg(path), device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"DSRLConfig\.base: .*'serl' checkpoint"):
        loop_params(tiny_cfg(path), None)


def test_refuses_a_base_that_does_not_fit_the_spaces(tmp_path):
    path = tiny_base(tmp_path)
    cases = [
        (SPACE, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), r"DSRLConfig\.base: the base's action_dim is 2, .* 3"),
        (gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)}), ACTIONS,
         r"DSRLConfig\.base: observation 'state' is \(4,\)"),
        (gym.spaces.Dict({"joints": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)}), ACTIONS,
         r"DSRLConfig\.base: the base reads observation 'state'"),
    ]
    for space, actions, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            DSRLAgent(space, actions, tiny_cfg(path), device="cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"DSRLConfig\.base is required"):
        DSRLAgent(SPACE, ACTIONS, DSRLConfig(), device="cpu")
    with pytest.raises(ValueError, match=r"DSRLConfig\.base: no checkpoint at") as err:
        DSRLAgent(SPACE, ACTIONS, tiny_cfg(tmp_path / "missing"), device="cpu")
    assert "\n" not in str(err.value)


def test_config_errors_name_the_field():
    for kw, field in [({"noise_bound": 0.0}, "noise_bound"), ({"utd_ratio": 0}, "utd_ratio"),
                      ({"distill_actor_fraction": 1.5}, "distill_actor_fraction"),
                      ({"num_critics": 2, "critic_subsample": 3}, "critic_subsample"),
                      ({"activation": "sigmoid"}, "activation"), ({"hidden_dims": ()}, "hidden_dims")]:
        with pytest.raises(ValueError, match=field):
            DSRLConfig(**kw)
    with pytest.raises(ValueError, match="no field 'bogus'"):
        DSRLConfig.from_dict({"bogus": 1})
    cfg = DSRLConfig(base="x", hidden_dims=(8, 8))
    assert DSRLConfig.from_dict(json.loads(json.dumps(cfg.__dict__))) == cfg


def test_loop_params_sample_chunks_of_the_base_horizons(tmp_path):
    cfg = tiny_cfg(tiny_base(tmp_path), batch_size=16, utd_ratio=5, gamma=0.98)
    assert loop_params(cfg, None) == {"batch": 80, "every": H, "nstep": 1, "gamma": 0.98, "frame_stack": 1,
                                      "seed_steps": 0, "obs_horizon": TO, "chunk": H}
    assert AGENT.name == "dsrl" and AGENT.agent_cls is DSRLAgent and AGENT.config_cls is DSRLConfig


def test_bad_batches_raise_before_any_weight_changes(tmp_path):
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path)), device="cpu")
    before = params(agent.critic)
    batch = chunk_batch(16)
    batch["reward"][5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="critic"):
        agent.update(batch, step=7)
    batch = chunk_batch(16)
    batch["next_obs"]["state"][3, 1, 0] = float("inf")
    with pytest.raises(NonFiniteLossError):
        agent.update(batch, step=7)
    with pytest.raises(ValueError, match="chunk=4"):
        agent.update({**chunk_batch(16), "action": torch.zeros(16, H + 1, A)}, step=0)
    with pytest.raises(ValueError, match="obs_horizon=2"):
        agent.update({**chunk_batch(16), "obs": {"state": torch.zeros(16, 3, 3)}}, step=0)
    with pytest.raises(ValueError, match="utd_ratio=2"):
        agent.update(chunk_batch(15), step=0)
    assert not changed(before, agent.critic)


def test_steers_the_base_towards_reward(tmp_path):
    """Reward is the executed chunk's first action coordinate and every chunk ends the episode: the actor
    must learn noise under which the frozen base's chunks score higher than under its usual N(0, I) noise."""
    agent = DSRLAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), lr=3e-3, batch_size=32, init_temperature=1e-3,
                                               noise_critic_steps=4), device="cpu")
    g = torch.Generator().manual_seed(5)

    def score(noise_fn) -> float:
        obs = {"state": torch.randn(256, TO, 3, generator=torch.Generator().manual_seed(9))}
        return executed(agent.base, obs, noise_fn(obs)).reshape(256, H, A)[..., 0].mean().item()

    gaussian = score(lambda obs: torch.randn(256, P * A, generator=torch.Generator().manual_seed(11)))
    for step in range(150):
        batch = chunk_batch(64, seed=step)
        batch["action"] = torch.rand(64, H, A, generator=g) * 2 - 1
        batch["reward"] = batch["action"][..., 0].mean(dim=1)
        batch["discount"] = torch.zeros(64)
        agent.update(batch, step)
    steered = score(lambda obs: agent.actor_noise(agent._features(obs), explore=False))
    assert steered > gaussian + 0.5, (gaussian, steered)


def bc_base_through_loop(tmp_path) -> tuple[str, dict]:
    """A tiny diffusion base behaviour-cloned through the training loop from 4 scripted PandaReach demos:
    (its checkpoint, the TrainConfig fields a fine-tuning run shares with it)."""
    import robolearn.sim as rsim
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.rollout import run_episodes, scripted_policy
    from robolearn.train import TrainConfig, Trainer

    reach = "robolearn/PandaReach-v0"
    env = rsim.make(reach)
    with DatasetWriter(tmp_path / "demos", reach, env.observation_space, env.action_space, fps=10) as writer:
        run_episodes(env, scripted_policy(env), 4, seed=10_000, recorder=writer)
    env.close()
    tiny = {"batch_size": 16, "mlp_hidden_dims": [32], "diffusion_step_embed_dim": 8, "inference_steps": 2}
    common = dict(env=reach, demos=str(tmp_path / "demos"), eval_every=10_000, eval_episodes=1,
                  checkpoint_every=10_000, video=False)
    base = Trainer(TrainConfig(agent="diffusion", out=str(tmp_path / "bc"), frames=20, agent_overrides=tiny, **common))
    try:
        return base.run()["checkpoint"], common
    finally:
        base.close()


def evaluates_once(checkpoint: str, agent_name: str) -> None:
    """The checkpoint loads through load_agent as `agent_name` and runs one evaluation episode on PandaReach."""
    import robolearn.sim as rsim
    from robolearn.train import evaluate, load_agent

    agent, config = load_agent(checkpoint)
    assert config["agent"] == agent_name
    env = rsim.make("robolearn/PandaReach-v0")
    rate, ret, _ = evaluate(agent, env, 1)
    env.close()
    assert 0.0 <= rate <= 1.0 and np.isfinite(ret)


def test_dsrl_trains_through_the_loop_from_a_bc_base_and_its_checkpoint_evaluates(tmp_path):
    """The whole path a user takes: BC a diffusion base from demos, fine-tune it with --agent dsrl
    (chunk batches from the mixed replay), and evaluate the self-contained checkpoint."""
    from robolearn.train import TrainConfig, Trainer

    base_ckpt, common = bc_base_through_loop(tmp_path)
    fine = Trainer(TrainConfig(agent="dsrl", out=str(tmp_path / "dsrl"), frames=30, save_replay=False, **common,
                               agent_overrides={"base": base_ckpt, "batch_size": 8, "utd_ratio": 1,
                                                "hidden_dims": [16], "num_critics": 2, "noise_critic_steps": 1}))
    try:
        assert fine.params["chunk"] == 8 and fine.params["obs_horizon"] == 2
        result = fine.run()
    finally:
        fine.close()
    assert result["env_steps"] == 30 and "rejected_actions" not in result
    evaluates_once(result["checkpoint"], "dsrl")
