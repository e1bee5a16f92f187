"""Diffusion policy: the DDIM sampler, learning on a fixed dataset, checkpoints through safetensors,
the receding-horizon act loop, the image path, and the errors it raises."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robolearn.agents.diffusion import (DiffusionAgent, DiffusionConfig, NonFiniteActionError, ema_decay,
                                        loop_params, lr_at)
from robolearn.agents.errors import NonFiniteLossError

STATE_SPACE = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (6,), np.float32),
                               "tcp_pose": gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)})
ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pixel_space(size: int = 40, cams=("front", "wrist")) -> gym.spaces.Dict:
    spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)}
    for cam in cams:
        spaces[f"images/{cam}"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
    return gym.spaces.Dict(spaces)


def tiny_cfg(**kw) -> DiffusionConfig:
    base = dict(obs_horizon=2, pred_horizon=8, action_horizon=4, down_dims=(16, 32), n_groups=4, kernel_size=3,
                diffusion_step_embed_dim=16, mlp_hidden_dims=(64, 64), feature_dim=8, batch_size=32,
                warmup_steps=0, lr_schedule_steps=10_000)
    return DiffusionConfig(**{**base, **kw})


def window_batch(space, n: int, cfg: DiffusionConfig, action_dim: int = 3, seed: int = 0) -> dict:
    """A windowed batch as the replay gives it: obs (B, obs_horizon, ...), actions (B, pred_horizon, A)."""
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for k, s in space.spaces.items():
        if s.dtype == np.uint8:
            obs[k] = torch.randint(0, 256, (n, cfg.obs_horizon, *s.shape), dtype=torch.uint8, generator=g)
        else:
            obs[k] = torch.randn(n, cfg.obs_horizon, *s.shape, generator=g)
    return {"obs": obs, "action": torch.rand(n, cfg.pred_horizon, action_dim, generator=g) * 2 - 1}


def window(space, cfg: DiffusionConfig, b: int = 2, seed: int = 1) -> dict:
    return window_batch(space, b, cfg, seed=seed)["obs"]


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_ddim_eta0_is_deterministic_given_noise(denoiser):
    cfg = tiny_cfg(denoiser=denoiser)
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    assert agent.denoiser_kind == denoiser
    obs = window(STATE_SPACE, cfg, b=3)
    noise = torch.randn(3, cfg.pred_horizon, 3, generator=torch.Generator().manual_seed(7))
    a, b = agent.sample(obs, noise), agent.sample(obs, noise.clone())
    assert a.shape == (3, cfg.pred_horizon, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0
    assert not torch.equal(a, agent.sample(obs, noise + 1.0))  # the noise matters
    fresh1, fresh2 = agent.sample(obs), agent.sample(obs)  # fresh noise from the act stream
    assert not torch.equal(fresh1, fresh2)
    with pytest.raises(ValueError, match="noise must have shape"):
        agent.sample(obs, torch.zeros(3, cfg.pred_horizon + 1, 3))


def test_schedules():
    cfg = tiny_cfg(lr=1e-3, warmup_steps=10, lr_schedule_steps=110)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(5e-4) and lr_at(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(cfg, 500) == pytest.approx(0.0, abs=1e-12)
    decays = [ema_decay(DiffusionConfig(), k) for k in (0, 1, 2, 10, 10**9)]
    assert decays[:2] == [0.0, 0.0] and decays[2] == pytest.approx(1 - 2**-0.75)
    assert decays[2] < decays[3] < decays[4] == 0.9999


def test_update_changes_weights_and_overfits_a_linear_policy():
    cfg = tiny_cfg(lr=3e-3, batch_size=64, ema_max_decay=0.9)
    space = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)})
    agent = DiffusionAgent(space, ACTION_SPACE, cfg, device="cpu")
    g = torch.Generator().manual_seed(3)
    state = torch.rand(64, cfg.obs_horizon, 4, generator=g) * 2 - 1
    # Every action of a chunk is a linear function of the latest state.
    target = (0.6 * state[:, -1, :3] - 0.3 * state[:, -1, 3:4]).unsqueeze(1).expand(-1, cfg.pred_horizon, -1)
    batch = {"obs": {"state": state}, "action": target.contiguous()}

    before, ema_before = params(agent.model), params(agent.ema)
    m = agent.update(batch, step=0)
    assert set(m) == {"bc_loss", "lr"} and np.isfinite(m["bc_loss"]) and m["lr"] == pytest.approx(3e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, agent.ema.parameters()))
    assert int(agent.updates) == 1

    losses = [agent.update(batch, step=i)["bc_loss"] for i in range(1, 301)]
    assert np.mean(losses[-30:]) < 0.3 * np.mean(losses[:10])
    chunk = agent.sample({"state": state[:16]}, torch.randn(16, cfg.pred_horizon, 3, generator=g))
    assert (chunk - target[:16]).abs().mean() < 0.15


def test_state_dict_round_trips_through_safetensors(tmp_path):
    cfg = tiny_cfg(denoiser="unet")
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    batch = window_batch(STATE_SPACE, 16, cfg)
    for i in range(3):
        agent.update(batch, step=i)
    save_file(agent.state_dict(), str(tmp_path / "agent.safetensors"))
    config = json.loads(json.dumps(agent.config_dict()))
    assert config["agent"] == "diffusion" and config["action_dim"] == 3 and config["denoiser"] == "unet"
    assert set(config) >= {"agent", "config", "observation_space", "action_dim", "optimizers"}

    other = DiffusionAgent(STATE_SPACE, ACTION_SPACE, DiffusionConfig.from_dict({**config["config"], "seed": 5}),
                           device="cpu")
    obs, noise = window(STATE_SPACE, cfg), torch.randn(2, cfg.pred_horizon, 3)
    assert not torch.equal(other.sample(obs, noise), agent.sample(obs, noise))
    other.load_state_dict(load_file(str(tmp_path / "agent.safetensors")))
    assert torch.equal(other.sample(obs, noise), agent.sample(obs, noise))
    assert torch.equal(other.sample(obs, noise, ema=False), agent.sample(obs, noise, ema=False))
    assert int(other.updates) == 3
    # Optimizer moments, schedule step and RNG streams came along: the next update is the same.
    assert other.update(batch, 3) == agent.update(batch, 3)
    assert all(torch.equal(a, b) for a, b in zip(agent.model.parameters(), other.model.parameters()))
    with pytest.raises(KeyError, match="unexpected"):
        other.load_state_dict({**agent.state_dict(), "stray": torch.zeros(1)})


def test_act_replans_every_action_horizon_and_reset_clears_history():
    cfg = tiny_cfg(action_horizon=3)
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    calls = []
    sample = agent.sample

    def counting(obs_window, noise=None):
        chunk = sample(obs_window, noise)
        calls.append(({k: v.clone() for k, v in obs_window.items()}, chunk.clone()))
        return chunk

    agent.sample = counting

    def obs(i):
        return {"state": np.full(6, i, np.float32), "tcp_pose": np.full(7, -i, np.float32)}

    actions = [agent.act(obs(i), explore=False) for i in range(7)]
    assert len(calls) == 3  # at steps 0, 3 and 6
    assert all(a.shape == (3,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1) for a in actions)
    first_window, first_chunk = calls[0]
    assert first_window["state"].shape == (1, 2, 6)
    assert torch.all(first_window["state"] == 0)  # the first observation, repeated
    assert torch.equal(calls[1][0]["state"][0, :, 0], torch.tensor([2.0, 3.0]))  # the last two observations
    start = cfg.obs_horizon - 1
    np.testing.assert_array_equal(np.stack(actions[:3]), first_chunk[0, start:start + 3].numpy())

    agent.reset()  # mid-chunk: the queue and history go, so the next act samples again
    agent.act(obs(9), explore=True)
    assert len(calls) == 4
    assert torch.all(calls[3][0]["state"] == 9)
    agent.act(obs(10), explore=True)
    assert len(calls) == 4


def test_image_path_with_two_cameras():
    space = pixel_space()
    cfg = tiny_cfg(batch_size=8)
    agent = DiffusionAgent(space, ACTION_SPACE, cfg, device="cpu")
    assert agent.denoiser_kind == "unet" and agent.image_keys == ("images/front", "images/wrist")
    batch = window_batch(space, 8, cfg)
    before = params(agent.model.encoder)
    m = agent.update(batch, step=0)
    assert np.isfinite(m["bc_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.model.encoder.parameters()))
    obs = {k: s.sample() for k, s in space.spaces.items()}
    a = agent.act(obs, explore=False)
    assert a.shape == (3,) and np.all(np.abs(a) <= 1)
    chunk = agent.sample(window(space, cfg, b=2), torch.zeros(2, cfg.pred_horizon, 3))
    assert chunk.shape == (2, cfg.pred_horizon, 3)
    with pytest.raises(ValueError, match="conv_strides"):
        DiffusionAgent(pixel_space(size=16), ACTION_SPACE, cfg, device="cpu")
    # Without cameras, "auto" picks the MLP.
    assert DiffusionAgent(STATE_SPACE, ACTION_SPACE, tiny_cfg(), device="cpu").denoiser_kind == "mlp"


def test_non_finite_sample_and_loss_raise():
    cfg = tiny_cfg()
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    obs = window(STATE_SPACE, cfg)
    obs["state"][0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteActionError, match="observation 'state'") as err:
        agent.sample(obs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(NonFiniteActionError, match="weights"):
        with torch.no_grad():
            next(agent.ema.denoiser.parameters()).fill_(float("inf"))
        agent.sample(window(STATE_SPACE, cfg))
    batch = window_batch(STATE_SPACE, 8, cfg)
    batch["action"][0, 0, 0] = float("nan")
    before = params(agent.model)
    with pytest.raises(NonFiniteLossError, match="bc"):
        agent.update(batch, step=4)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.model.parameters()))  # no step taken


@pytest.mark.parametrize("override, field", [
    ({"action_horizon": 8}, "action_horizon"),  # pred 8 - obs 2 + 1 = 7
    ({"denoiser": "transformer"}, "denoiser"),
    ({"pred_horizon": 6, "action_horizon": 2, "denoiser": "unet", "down_dims": (8, 16, 32)}, "pred_horizon"),
    ({"inference_steps": 200}, "inference_steps"),
    ({"obs_horizon": 0}, "obs_horizon"),
    ({"down_dims": (10, 32)}, "down_dims"),
    ({"eta": 1.5}, "eta"),
    ({"batch_size": "many"}, "batch_size"),
])
def test_bad_config_raises_one_line_value_error(override, field):
    with pytest.raises(ValueError, match=field) as err:
        tiny_cfg(**override)
    assert "\n" not in str(err.value)


def test_loop_params_and_windowed_batch_check():
    cfg = tiny_cfg(batch_size=48)
    assert loop_params(cfg, None) == {"batch": 48, "every": 1, "nstep": 1, "gamma": 0.99, "frame_stack": 1,
                                      "seed_steps": 0, "obs_horizon": 2, "pred_horizon": 8,
                                      "action_horizon": 4}
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    batch = window_batch(STATE_SPACE, 4, cfg)
    batch["action"] = batch["action"][:, 0]  # an unwindowed (B, A) batch
    with pytest.raises(ValueError, match="pred_horizon"):
        agent.update(batch, step=0)
    assert agent.obs_horizon == 2 and agent.pred_horizon == 8 and agent.action_horizon == 4


@pytest.mark.parametrize("cin, cout, kernel, stride", [(6, 8, 5, 1), (8, 8, 3, 2), (8, 3, 1, 1)])
def test_small_batch_conv_matches_torch(cin, cout, kernel, stride):
    from robolearn.agents.diffusion import Conv1d

    conv = Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 1)
    x = torch.randn(3, cin, 16)
    native = torch.nn.functional.conv1d(x, conv.weight, conv.bias, stride, conv.padding)
    torch.testing.assert_close(conv(x), native, rtol=1e-5, atol=1e-5)
    big = torch.randn(Conv1d.SMALL_BATCH + 1, cin, 16)  # the native path
    torch.testing.assert_close(conv(big), torch.nn.functional.conv1d(big, conv.weight, conv.bias, stride,
                                                                     conv.padding))


def test_observation_statistics_are_taken_once_saved_and_restored(tmp_path):
    cfg = tiny_cfg(obs_std_min=0.01)
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    batch = window_batch(STATE_SPACE, 32, cfg, seed=4)
    # Positions spread over a few centimetres around 0.4 m, one dim constant (a quaternion's).
    batch["obs"]["state"] = 0.4 + 0.03 * batch["obs"]["state"]
    batch["obs"]["state"][..., 5] = 1.0
    obs = {k: v[:4] for k, v in batch["obs"].items()}
    raw = agent.ema.encode(obs, agent.obs_keys)
    assert not bool(agent.model.normalizer.fitted)
    torch.testing.assert_close(raw, obs["state"].reshape(4, -1))  # unset: proprio as it is

    agent.update(batch, step=0)
    frames = batch["obs"]["state"].reshape(-1, 6)
    mean, std = frames.mean(0), frames.std(0, correction=0)
    for net in (agent.model, agent.ema):
        stats = net.normalizer.stats["state"]
        assert bool(net.normalizer.fitted)
        torch.testing.assert_close(stats.mean, mean)
        torch.testing.assert_close(stats.std[:5], std[:5])
        assert float(stats.std[5]) == pytest.approx(0.01)  # floored, not 0
    # The conditioning is the standardized window: zero mean, unit std over the fitting batch.
    cond = agent.ema.encode(batch["obs"], agent.obs_keys).reshape(-1, 6)
    assert cond[:, :5].mean(0).abs().max() < 1e-4 and (cond[:, :5].std(0, correction=0) - 1).abs().max() < 1e-3
    assert cond[:, 5].abs().max() < 1e-4
    noise = torch.randn(4, cfg.pred_horizon, 3, generator=torch.Generator().manual_seed(2))
    stale = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    stale.load_state_dict(agent.state_dict())
    for net in (stale.model, stale.ema):
        net.normalizer.fitted.fill_(False)
        net.normalizer.stats["state"].mean.zero_()
        net.normalizer.stats["state"].std.fill_(1.0)
    assert not torch.allclose(stale.sample(obs, noise), agent.sample(obs, noise))  # the statistics matter

    # A second batch with other statistics changes nothing: they were taken once.
    other = window_batch(STATE_SPACE, 32, cfg, seed=5)
    agent.update(other, step=1)
    torch.testing.assert_close(agent.ema.normalizer.stats["state"].mean, mean)
    torch.testing.assert_close(agent.model.normalizer.stats["state"].mean, mean)

    # Saved and restored with the weights; a loaded agent keeps them through its own updates.
    state = agent.state_dict()
    assert {"model.normalizer.fitted", "ema.normalizer.stats.state.mean", "ema.normalizer.stats.state.std"} <= set(state)
    save_file(state, str(tmp_path / "agent.safetensors"))
    config = json.loads(json.dumps(agent.config_dict()))
    assert config["config"]["normalize_obs"] is True
    loaded = DiffusionAgent(STATE_SPACE, ACTION_SPACE, DiffusionConfig.from_dict(config["config"]), device="cpu")
    loaded.load_state_dict(load_file(str(tmp_path / "agent.safetensors")))
    assert bool(loaded.ema.normalizer.fitted)
    assert torch.equal(loaded.sample(obs, noise), agent.sample(obs, noise))
    loaded.update(window_batch(STATE_SPACE, 32, cfg, seed=6), step=2)
    torch.testing.assert_close(loaded.ema.normalizer.stats["state"].mean, mean)


def test_normalize_obs_off_and_configs_saved_before_it():
    cfg = tiny_cfg(normalize_obs=False)
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    batch = window_batch(STATE_SPACE, 16, cfg)
    agent.update(batch, step=0)
    assert agent.model.normalizer is None and not any("normalizer" in k for k in agent.state_dict())
    obs = window(STATE_SPACE, cfg)
    torch.testing.assert_close(agent.ema.encode(obs, agent.obs_keys), obs["state"].reshape(2, -1))
    # A checkpoint's config from before the field existed: its networks saw raw observations.
    old = {k: v for k, v in json.loads(json.dumps(DiffusionConfig().__dict__)).items() if k != "normalize_obs"}
    assert DiffusionConfig.from_dict(old).normalize_obs is False
    with pytest.raises(ValueError, match="obs_std_min"):
        tiny_cfg(obs_std_min=0.0)


@pytest.mark.parametrize("denoiser", ["mlp", "unet"])
def test_sampling_step_matches_forward(denoiser):
    """sample() runs step_eps on condition(cond): the cond and the step embedded once per call and step,
    not once per row; it must compute what forward computes, and Mish without autograd F.mish's values."""
    from robolearn.agents.diffusion import mish

    cfg = tiny_cfg(denoiser=denoiser)
    agent = DiffusionAgent(STATE_SPACE, ACTION_SPACE, cfg, device="cpu")
    den = agent.model.denoiser
    x = torch.randn(5, cfg.pred_horizon, 3)
    cond = agent.model.encode(window(STATE_SPACE, cfg, b=5), agent.obs_keys)
    with torch.no_grad():
        for t in (0, 37, 99):
            torch.testing.assert_close(den.step_eps(x, t, den.condition(cond)),
                                       den(x, torch.full((5,), t, dtype=torch.long), cond), rtol=1e-5, atol=1e-6)
        wide = torch.linspace(-30.0, 30.0, 2001)
        torch.testing.assert_close(mish(wide), torch.nn.functional.mish(wide), rtol=1e-6, atol=1e-6)
    leaf = torch.randn(7, requires_grad=True)
    assert type(mish(leaf).grad_fn).__name__ == "MishBackward0"  # with autograd it is F.mish, one backward kernel
    with torch.no_grad():
        assert mish(leaf).grad_fn is None
