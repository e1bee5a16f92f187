"""EXPO: the update (critic over chunks, edit policy, the base's BC step), the on-the-fly policy's
max-Q choice, the edit bound, self-contained checkpoints, the errors it raises, and the whole
BC-then-EXPO path through the training loop; DSRL and EXPO on a base with a camera."""

from __future__ import annotations

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dsrl import (A, ACTIONS, SPACE, TO, H, P, bc_base_through_loop, changed, chunk_batch, evaluates_once, observations,
                       params, save_like_trainer, tiny_base)

from robolearn.agents.diffusion import DiffusionAgent, DiffusionConfig
from robolearn.agents.errors import NonFiniteActionError, NonFiniteLossError
from robolearn.agents.expo import AGENT, EXPOAgent, EXPOConfig, loop_params
from robolearn.agents.serl import SERLAgent, SERLConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cfg(base, **kw) -> EXPOConfig:
    fields = dict(base=str(base), hidden_dims=(32, 32), num_critics=4, critic_subsample=2, batch_size=8, utd_ratio=2,
                  num_samples=3, init_temperature=0.1)
    return EXPOConfig(**{**fields, **kw})


def expo_batch(n: int, seed: int = 0, bc: int = 8) -> dict:
    """Chunk transitions plus the BC windows (pred_horizon P actions) the loop samples beside them."""
    g = torch.Generator().manual_seed(seed + 100)
    batch = chunk_batch(n, seed)
    batch["windows"] = {"obs": {"state": torch.randn(bc, TO, 3, generator=g)},
                        "action": torch.rand(bc, P, A, generator=g) * 2 - 1}
    return batch


def test_update_trains_critic_edit_policy_and_the_base(tmp_path):
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path)), device="cpu")
    assert agent.name == "expo" and agent.chunk_dim == H * A
    nets = {"actor": agent.actor, "critic": agent.critic, "critic_target": agent.critic_target,
            "base model": agent.base.model, "base ema": agent.base.ema}
    before = {k: params(m) for k, m in nets.items()}
    alpha_before = float(agent.log_alpha.detach())
    m = agent.update(expo_batch(16), step=0)
    assert {"critic_loss", "q", "target_q", "actor_loss", "entropy", "alpha_loss", "alpha", "edit_abs",
            "bc_loss"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    for k, module in nets.items():
        assert changed(before[k], module), f"{k} did not change"
    assert float(agent.log_alpha.detach()) != alpha_before
    assert int(agent.critic_updates) == 2 and int(agent.actor_updates) == 1 and int(agent.base.updates) == 1
    assert m["edit_abs"] <= agent.cfg.edit_scale


def test_the_base_keeps_learning_at_base_lr_after_its_bc_schedule_ended(tmp_path):
    """A BC base whose cosine schedule ended (lr 0 at 1000 of lr_schedule_steps=1000) learns at base_lr
    under EXPO, with its EMA decay capped at base_ema_decay."""
    from robolearn.agents.diffusion import ema_decay, lr_at

    bc = DiffusionAgent(SPACE, ACTIONS, DiffusionConfig(
        obs_horizon=TO, pred_horizon=P, action_horizon=H, denoiser="mlp", mlp_hidden_dims=(32, 32),
        diffusion_step_embed_dim=8, train_timesteps=20, inference_steps=4, batch_size=8, warmup_steps=10,
        lr_schedule_steps=1000), device="cpu")
    bc.updates.fill_(1000)
    assert lr_at(bc.cfg, 1000) == 0.0 and ema_decay(bc.cfg, 1000) > 0.99
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(save_like_trainer(bc, tmp_path), base_lr=3e-4, base_ema_decay=0.9),
                      device="cpu")
    assert int(agent.base.updates) == 1000
    before = params(agent.base.model)
    agent.update(expo_batch(16), step=0)
    assert agent.base.opt.param_groups[0]["lr"] == pytest.approx(3e-4, rel=1e-6)
    assert changed(before, agent.base.model)
    assert ema_decay(agent.base.cfg, 1001) == 0.9


def test_act_executes_the_highest_q_candidate_and_edits_stay_within_the_scale(tmp_path):
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), edit_scale=0.2), device="cpu")
    obs = observations(2 * H)
    for explore in (False, True):
        agent.reset()
        gen = torch.Generator().set_state(agent.act_gen.get_state())  # the candidates act() is about to draw
        window = {"state": torch.as_tensor(np.stack([obs[0]["state"]] * TO))[None]}
        with torch.no_grad():
            f, chunks = agent.candidates(window, agent._features(window), explore, gen)
            q = agent.critic(f, chunks).mean(dim=0)
        n = agent.cfg.num_samples
        assert chunks.shape == (2 * n, H * A)
        edit = chunks[n:] - chunks[:n]
        assert edit.abs().max() <= 0.2 + 1e-6 and edit.abs().max() > 0
        first = np.stack([agent.act(o, explore=explore) for o in obs[:H]])
        np.testing.assert_allclose(first, chunks[q.argmax()].reshape(H, A).numpy(), rtol=0, atol=1e-6)
        agent.act(obs[H], explore=explore)  # a new chunk: the queue was spent
        assert len(agent._chunks.queue) == H - 1


def test_critic_passes_add_critic_steps_without_sampling_the_base_again(tmp_path, monkeypatch):
    """critic_passes=3 runs utd_ratio * 3 critic steps over the same utd_ratio minibatches (tau 0 and a REDQ
    subsample of every member keep the target still, so each pass sees the same targets), and samples the
    base as often as one pass."""
    import robolearn.agents.expo as expo

    sampled, targets = [], []
    executed, step = expo.executed, expo.critic_step
    monkeypatch.setattr(expo, "executed", lambda *a: sampled.append(a[2].shape[0]) or executed(*a))
    monkeypatch.setattr(expo, "critic_step", lambda ag, q, t, s, b: targets.append(t.clone()) or step(ag, q, t, s, b))
    cfg = tiny_cfg(tiny_base(tmp_path), critic_passes=3, tau=0.0, num_critics=2)
    agent = EXPOAgent(SPACE, ACTIONS, cfg, device="cpu")
    agent.update(expo_batch(16), step=0)
    assert int(agent.critic_updates) == 6 and len(targets) == 6
    assert sampled == [16 * 3, 8]  # the 2N candidates' N base chunks at every s', then the edit step's batch
    for i in range(2, 6):
        torch.testing.assert_close(targets[i], targets[i % 2])
    with pytest.raises(ValueError, match="critic_passes must be positive"):
        tiny_cfg(tiny_base(tmp_path), critic_passes=0)


def test_actor_and_bc_steps_each_take_their_own_rows(tmp_path, monkeypatch):
    """actor_steps edit steps draw their base chunks in one call (batch_size rows each); bc_steps BC steps
    each take a strided share of the windows, which loop_params sizes to batch_size * bc_steps."""
    import robolearn.agents.expo as expo

    sampled, bc_rows = [], []
    executed = expo.executed
    monkeypatch.setattr(expo, "executed", lambda *a: sampled.append(a[2].shape[0]) or executed(*a))
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), actor_steps=3, bc_steps=2), device="cpu")
    update = agent.base.update
    monkeypatch.setattr(agent.base, "update", lambda b, s: bc_rows.append(b["action"][:, 0, 0].clone()) or update(b, s))
    batch = expo_batch(16, bc=16)
    m = agent.update(batch, step=0)
    assert sampled == [16 * 3, 8 * 3]  # the candidates, then the edit steps' chunks in one call
    assert int(agent.actor_updates) == 3 and int(agent.base.updates) == 2 and np.isfinite(m["bc_loss"])
    torch.testing.assert_close(torch.cat(bc_rows).sort().values, batch["windows"]["action"][:, 0, 0].sort().values)
    with pytest.raises(ValueError, match="bc_steps must be positive"):
        tiny_cfg(tiny_base(tmp_path), bc_steps=0)
    critic_before = params(agent.critic)
    with pytest.raises(ValueError, match="holds 1 windows, fewer than bc_steps=2"):
        agent.update(expo_batch(16, bc=1), step=1)  # refused before any weight changes
    assert not changed(critic_before, agent.critic)


def test_the_td_target_takes_each_rows_best_candidate(tmp_path, monkeypatch):
    """With one critic member and a subsample of one, each row's target is r + discount * the max over its
    own 2N candidates at s', in every strided minibatch."""
    import robolearn.agents.expo as expo

    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), num_critics=1, critic_subsample=1, utd_ratio=2),
                      device="cpu")
    batch = expo_batch(8)
    batch["discount"] = torch.linspace(0.1, 0.9, 8)  # rows differ, so a mix-up of rows shows
    gen = torch.Generator().set_state(agent.update_gen.get_state())
    next_obs = batch["next_obs"]
    with torch.no_grad():
        f, chunks = agent.candidates(next_obs, agent._features(next_obs), True, gen)
        best = agent.critic_target(f, chunks).reshape(8, -1).max(dim=1).values
    targets = []
    step = expo.critic_step

    def recording(agent_, q, target, step_, batch_):
        targets.append(target.clone())
        return step(agent_, q, target, step_, batch_)

    monkeypatch.setattr(expo, "critic_step", recording)
    agent.update(batch, step=0)
    expected = batch["reward"] + batch["discount"] * best
    # Minibatch 0 takes rows 0, 2, 4, 6 before any critic step moved the target network.
    torch.testing.assert_close(targets[0], expected[0::2])
    assert targets[1].shape == (4,)


def test_a_non_finite_edit_is_never_executed(tmp_path):
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path)), device="cpu")
    with torch.no_grad():
        agent.actor.net[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteActionError, match="edit policy"):
        agent.act(observations(1)[0], explore=False)


def test_state_dict_round_trips_without_the_base_file(tmp_path):
    base_dir = tiny_base(tmp_path / "base")
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(base_dir), device="cpu")
    agent.update(expo_batch(16), step=0)
    save_file(agent.state_dict(), str(tmp_path / "expo.safetensors"))
    saved_config = json.loads(json.dumps(agent.config_dict()))
    shutil.rmtree(base_dir)

    clone = EXPOAgent(SPACE, ACTIONS, EXPOConfig.from_dict(saved_config["config"]), device="cpu")
    with pytest.raises(RuntimeError, match="load_state_dict"):
        clone.update(expo_batch(16), step=1)
    clone.load_state_dict(load_file(str(tmp_path / "expo.safetensors")))
    state, loaded = agent.state_dict(), clone.state_dict()
    assert state.keys() == loaded.keys() and any(k.startswith("base_model.") for k in state)
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    # Training continues identically: same RNG streams, same Adam moments, same base counter.
    a, b = agent.update(expo_batch(16, seed=1), step=1), clone.update(expo_batch(16, seed=1), step=1)
    assert a == b
    for explore in (False, True):
        agent.reset()
        clone.reset()
        for o in observations(2 * H + 1):
            np.testing.assert_array_equal(agent.act(o, explore=explore), clone.act(o, explore=explore))


def test_bad_bases_configs_and_batches_are_one_line_errors(tmp_path):
    serl = save_like_trainer(SERLAgent(SPACE, ACTIONS, SERLConfig(hidden_dims=(16, 16)), device="cpu"), tmp_path / "s")
    with pytest.raises(ValueError, match=r"EXPOConfig\.base: .*'serl' checkpoint, not a diffusion") as err:
        EXPOAgent(SPACE, ACTIONS, tiny_cfg(serl), device="cpu")
    assert "\n" not in str(err.value)
    base = tiny_base(tmp_path / "b")
    with pytest.raises(ValueError, match=r"EXPOConfig\.base: the base's action_dim is 2"):
        EXPOAgent(SPACE, gym.spaces.Box(-1.0, 1.0, (3,), np.float32), tiny_cfg(base), device="cpu")
    with pytest.raises(ValueError, match=r"EXPOConfig\.base is required"):
        EXPOAgent(SPACE, ACTIONS, EXPOConfig(), device="cpu")

    class ShortEpisodes:  # an env whose episodes are shorter than the base's chunk
        class cfg:
            max_episode_steps = H - 1
    with pytest.raises(ValueError, match=r"action_horizon is 4 steps, longer than this env's episodes"):
        loop_params(tiny_cfg(base), ShortEpisodes())

    for kw, field in [({"edit_scale": 0.0}, "edit_scale"), ({"edit_scale": 3.0}, "edit_scale"),
                      ({"num_samples": 0}, "num_samples"), ({"base_ema_decay": 1.5}, "base_ema_decay"),
                      ({"num_critics": 2, "critic_subsample": 3}, "critic_subsample"),
                      ({"activation": "sigmoid"}, "activation")]:
        with pytest.raises(ValueError, match=field):
            EXPOConfig(**kw)
    with pytest.raises(ValueError, match="no field 'bogus'"):
        EXPOConfig.from_dict({"bogus": 1})

    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(base), device="cpu")
    before, before_actor = params(agent.critic), params(agent.actor)
    with pytest.raises(ValueError, match="windows"):
        agent.update(chunk_batch(16), step=0)
    batch = expo_batch(16)
    batch["reward"][2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="critic"):
        agent.update(batch, step=3)
    batch = expo_batch(16)
    batch["windows"]["action"][1, 2, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="bc"):
        agent.update(batch, step=3)
    batch = expo_batch(16)
    batch["windows"]["action"] = batch["windows"]["action"][:, :H]
    with pytest.raises(ValueError, match=r"A\) = \(B, 8, 2\), got \(8, 4, 2\)"):
        agent.update(batch, step=3)
    batch = expo_batch(16)
    batch["windows"]["obs"] = {"state": torch.zeros(8, TO + 1, 3)}
    with pytest.raises(ValueError, match="obs_horizon=2"):
        agent.update(batch, step=3)
    assert not changed(before, agent.critic) and not changed(before_actor, agent.actor)


def test_loop_params_ask_for_chunks_and_bc_windows(tmp_path):
    cfg = tiny_cfg(tiny_base(tmp_path), batch_size=16, utd_ratio=5, gamma=0.98)
    assert loop_params(cfg, None) == {"batch": 80, "every": H, "nstep": 1, "gamma": 0.98, "frame_stack": 1,
                                      "seed_steps": 0, "obs_horizon": TO, "chunk": H, "bc_batch": 16,
                                      "pred_horizon": P}
    assert loop_params(tiny_cfg(tiny_base(tmp_path), batch_size=16, bc_steps=3), None)["bc_batch"] == 48
    assert AGENT.name == "expo" and AGENT.agent_cls is EXPOAgent and AGENT.config_cls is EXPOConfig


def test_raises_the_reward_above_the_base(tmp_path):
    """Reward is the executed chunk's first action coordinate and every chunk ends the episode: the max-Q
    choice among base samples and their edits must score higher than the base's own samples."""
    agent = EXPOAgent(SPACE, ACTIONS, tiny_cfg(tiny_base(tmp_path), lr=3e-3, batch_size=32, init_temperature=1e-3,
                                               edit_scale=0.3, num_samples=4), device="cpu")
    agent.base.update = lambda batch, step: {"bc_loss": 0.0}  # the base stays as it is: this checks the RL part
    g = torch.Generator().manual_seed(5)
    obs = {"state": torch.randn(64, TO, 3, generator=torch.Generator().manual_seed(9))}

    def score(pick: bool) -> float:
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            f, chunks = agent.candidates(obs, agent._features(obs), False, gen)
            k = 2 * agent.cfg.num_samples
            if pick:
                best = agent.critic(f, chunks).mean(dim=0).reshape(64, k).argmax(dim=1)
                chosen = chunks.reshape(64, k, -1)[torch.arange(64), best]
            else:
                chosen = chunks.reshape(64, k, -1)[:, 0]  # one base sample per state
        return chosen.reshape(64, H, A)[..., 0].mean().item()

    base_score = score(pick=False)
    for step in range(100):
        batch = expo_batch(64, seed=step)
        batch["action"] = torch.rand(64, H, A, generator=g) * 2 - 1
        batch["reward"] = batch["action"][..., 0].mean(dim=1)
        batch["discount"] = torch.zeros(64)
        agent.update(batch, step)
    picked = score(pick=True)
    print("scores", base_score, picked)
    assert picked > base_score + 0.3, (base_score, picked)


def test_expo_trains_through_the_loop_from_a_bc_base_and_its_checkpoint_evaluates(tmp_path):
    """BC a diffusion base from demos, fine-tune it with --agent expo (chunks and BC windows from the mixed
    replay, one update per chunk), and evaluate the self-contained checkpoint."""
    from robolearn.train import TrainConfig, Trainer

    base_ckpt, common = bc_base_through_loop(tmp_path)
    fine = Trainer(TrainConfig(agent="expo", out=str(tmp_path / "expo"), frames=40, save_replay=False, **common,
                               agent_overrides={"base": base_ckpt, "batch_size": 8, "utd_ratio": 1,
                                                "hidden_dims": [16], "num_critics": 2, "num_samples": 2}))
    try:
        assert fine.params["chunk"] == 8 and fine.params["every"] == 8 and fine.params["bc_batch"] == 8
        result = fine.run()
        assert int(fine.agent.base.updates) == 20 + 40 // 8  # the BC run's updates, then one per chunk
    finally:
        fine.close()
    assert result["env_steps"] == 40 and "rejected_actions" not in result
    evaluates_once(result["checkpoint"], "expo")


CAMERA_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
                                "images/front": gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)})


def test_dsrl_and_expo_update_and_act_on_a_camera_base(tmp_path):
    """`bench/diffusion_finetune.py --pixels`'s path: a base with a camera conditions through its conv encoder, and
    DSRL and EXPO, whose critics read the base's features, update (the actor changes) and act within bounds."""
    from test_dsrl import tiny_cfg as dsrl_cfg

    from robolearn.agents.dsrl import DSRLAgent

    base = tiny_base(tmp_path / "base", CAMERA_SPACE)
    g = torch.Generator().manual_seed(0)

    def frames(n):
        return torch.randint(0, 256, (n, TO, 32, 32, 3), dtype=torch.uint8, generator=g)

    obs = {"state": np.zeros(3, np.float32), "images/front": np.full((32, 32, 3), 128, np.uint8)}
    for agent, batch in ((DSRLAgent(CAMERA_SPACE, ACTIONS, dsrl_cfg(base), device="cpu"), chunk_batch(16)),
                         (EXPOAgent(CAMERA_SPACE, ACTIONS, tiny_cfg(base), device="cpu"), expo_batch(16))):
        for window in (batch["obs"], batch["next_obs"], *([batch["windows"]["obs"]] if "windows" in batch else [])):
            window["images/front"] = frames(len(window["state"]))
        before = params(agent.actor)
        metrics = agent.update(batch, step=1)
        assert changed(before, agent.actor) and np.isfinite(metrics["critic_loss"]), agent.name
        acts = []
        for value in (0, 0, 255):  # the same image twice acts the same; another image, otherwise
            for owner in (agent, agent.base):  # the draws acting makes (EXPO's base samples) start alike each time
                owner.act_gen.manual_seed(0)
            agent.reset()
            acts.append(agent.act({**obs, "images/front": np.full((32, 32, 3), value, np.uint8)}, explore=False))
        assert np.allclose(acts[0], acts[1]) and not np.allclose(acts[0], acts[2]), (agent.name, acts)
        agent.reset()
        action = agent.act(obs, explore=True)
        assert action.shape == ACTIONS.shape and np.all(np.abs(action) <= 1.0), (agent.name, action)
