"""DrQ-v2 (Yarats et al. 2021, "Mastering Visual Continuous Control: Improved Data-Augmented
Reinforcement Learning"), the mathematics of facebookresearch/drqv2 with a faster CPU update.

Read top to bottom: config, augmentation, networks, the agent (act, update, save/load).

What matches the reference: a 4-layer 32-filter conv encoder trained by the critic only; actor
and critic trunks Linear -> LayerNorm -> tanh (feature_dim 50) with 2 x 1024 ReLU heads;
clipped double Q with n-step targets (the replay computes batch["reward"] and
batch["discount"] = gamma^n); a deterministic actor explored with scheduled Gaussian noise
(std clipped to +-stddev_clip in the target and actor losses, actions clamped to [-1, 1] with a
straight-through gradient); random shifts of +-4 pixels with replicate padding; Adam at 1e-4;
Polyak target with tau 0.01; orthogonal initialisation.

Where the update differs in implementation only (same losses, same augmentation distribution):
- the random shift is an integer gather on uint8 HWC frames; DrQ-v2's grid_sample samples
  bilinearly at exactly integer offsets, which is the same map;
- obs and next_obs are augmented and encoded in one chunked pass; only the obs chunks are
  recorded by autograd, exactly as the reference's next_obs encoding under no_grad (a single
  tracked call over both halves with a detach would run the conv backward over both);
- convolutions run channels-last in chunks of 32 samples on CPU, which keeps each layer's
  activations in cache (about 1.4x faster than whole-batch calls on a 2-core EPYC), and their
  output is flattened in that memory order (H, W, C), a fixed relabelling of the trunk's inputs;
- the actor loss backpropagates into the action only: the critic's weight gradients the
  reference computes there are discarded by its next zero_grad anyway.

Seeding is the loop's, as robolearn.train does it for every agent: uniform random actions and
no updates for the first `cfg.num_seed_steps` agent steps (num_seed_frames / action_repeat =
2000, drqv2's num_expl_steps and seed frames), then `update` every `cfg.update_every_steps`
agent steps with the agent step as `step`. The noise std follows `cfg.stddev_schedule` at the
agent step, as in drqv2: `update` sets the agent's step counter to `step`, and each exploring
`act` advances it by one, so acting between updates reads the right std.

With `drm=True`, DrM (robolearn.agents.drm): the actor's dormant ratio perturbs the networks, sets the
noise std and blends a value network into the critic's target.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolearn.agents import drm
from robolearn.agents.base import default_device, obs_to_torch
from robolearn.agents.encoders import conv_stack, image_keys_of, to_nchw_float, trunk
from robolearn.agents.errors import check_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serialize import agent_config, load_training_state, training_state_to_tensors

# drqv2's cfgs/task/{easy,medium,hard}.yaml: exploration-noise schedules in agent steps.
STDDEV_SCHEDULES = {
    "easy": "linear(1.0,0.1,100000)",
    "medium": "linear(1.0,0.1,500000)",
    "hard": "linear(1.0,0.1,2000000)",
}
# drqv2's cfgs/task/*.yaml: the difficulty of each DMC task and the per-task overrides.
TASK_DIFFICULTY = {
    "cartpole_balance": "easy", "cartpole_balance_sparse": "easy", "cartpole_swingup": "easy",
    "cup_catch": "easy", "ball_in_cup_catch": "easy", "finger_spin": "easy", "hopper_stand": "easy",
    "pendulum_swingup": "easy", "walker_stand": "easy", "walker_walk": "easy",
    "acrobot_swingup": "medium", "cartpole_swingup_sparse": "medium", "cheetah_run": "medium",
    "finger_turn_easy": "medium", "finger_turn_hard": "medium", "hopper_hop": "medium",
    "quadruped_run": "medium", "quadruped_walk": "medium", "reacher_easy": "medium",
    "reacher_hard": "medium", "walker_run": "medium",
    "humanoid_stand": "hard", "humanoid_walk": "hard", "humanoid_run": "hard",
}
NUM_TRAIN_FRAMES = {"easy": 1_100_000, "medium": 3_100_000, "hard": 30_100_000}
TASK_OVERRIDES = {
    "walker_stand": {"nstep": 1, "batch_size": 512},
    "walker_walk": {"nstep": 1, "batch_size": 512},
    "walker_run": {"nstep": 1, "batch_size": 512},
    "quadruped_run": {"replay_buffer_size": 100_000},
    "humanoid_stand": {"lr": 8e-5, "feature_dim": 100},
    "humanoid_walk": {"lr": 8e-5, "feature_dim": 100},
    "humanoid_run": {"lr": 8e-5, "feature_dim": 100},
}


@dataclass
class DrQV2Config:
    """Defaults are drqv2's cfgs/config.yaml with the medium-difficulty noise schedule."""

    lr: float = 1e-4
    feature_dim: int = 50
    hidden_dim: int = 1024
    conv_channels: int = 32
    conv_strides: tuple[int, ...] = (2, 1, 1, 1)
    critic_target_tau: float = 0.01
    stddev_schedule: str = STDDEV_SCHEDULES["medium"]  # a float, linear(...) or step_linear(...)
    stddev_clip: float = 0.3
    aug_pad: int = 4
    # DrM (Xu et al. 2024; robolearn.agents.drm), off by default: the actor's dormant ratio beta perturbs the
    # networks, sets the noise std (in place of stddev_schedule until the actor awakens, then at least the
    # schedule restarted there) and blends an expectile value network into the critic's target.
    drm: bool = False
    # Agent steps between perturbations. The authors': 100k agent steps (200k frames) in 0.2-3M-frame runs; scaled
    # to robolearn's ~100k-frame runs (10 perturbations). Use 100000 for drqv2's full-length runs.
    drm_perturb_interval: int = 5_000
    drm_perturb_rate: float = 2.0  # k in alpha = clip(1 - k beta, min, max), the weights' share kept
    drm_min_perturb_factor: float = 0.2
    drm_max_perturb_factor: float = 0.9  # the authors' DMC tasks (0.6 on Dog, 1.0 on reacher_hard: never)
    drm_perturb_threshold: float = 0.0  # perturb only at beta at least this; 0 (the authors' code): always
    drm_target_beta: float = 0.2  # beta_hat: the awakening threshold and the schedules' midpoint
    drm_target_lambda: float = 0.6  # lambda_hat, the value net's largest share of the backup
    drm_expectile: float = 0.9  # of Q(s, a) over the replay's actions, which the value net learns
    # Read by the training loop and the replay, not by the agent.
    batch_size: int = 256
    nstep: int = 3
    discount: float = 0.99
    action_repeat: int = 2
    num_seed_frames: int = 4000
    update_every_steps: int = 2
    num_train_frames: int = 3_100_000
    replay_buffer_size: int = 1_000_000
    # Implementation
    image_keys: tuple[str, ...] | None = None  # None: every images/<cam>; one conv tower each
    encoder_chunk_size: int | None = None  # samples per conv call; None: 32 on CPU, all on CUDA
    channels_last: bool = True
    fused_adam: bool = True  # same update as torch's default Adam, one kernel per step
    seed: int = 0

    @property
    def num_seed_steps(self) -> int:
        """Agent steps of uniform random actions and no updates at the start (drqv2: 2000)."""
        return self.num_seed_frames // self.action_repeat

    @classmethod
    def for_task(cls, task: str, **overrides) -> "DrQV2Config":
        """drqv2's settings for a DMC task: its difficulty's schedule and budget, its overrides."""
        if task not in TASK_DIFFICULTY:
            raise ValueError(f"drqv2 has no config for {task!r}; known: {sorted(TASK_DIFFICULTY)}")
        level = TASK_DIFFICULTY[task]
        base = {"stddev_schedule": STDDEV_SCHEDULES[level], "num_train_frames": NUM_TRAIN_FRAMES[level]}
        return cls(**{**base, **TASK_OVERRIDES.get(task, {}), **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "DrQV2Config":
        """Inverse of asdict after a JSON round trip (lists back to tuples)."""
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def stddev(schedule: str | float, step: int) -> float:
    """drqv2's utils.schedule: a constant, linear(init,final,duration) or
    step_linear(init,final1,duration1,final2,duration2), evaluated at agent step `step`."""
    try:
        return float(schedule)
    except ValueError:
        pass
    m = re.fullmatch(r"\s*linear\((.+),(.+),(.+)\)\s*", schedule)
    if m:
        init, final, duration = (float(g) for g in m.groups())
        mix = min(max(step / duration, 0.0), 1.0)
        return (1.0 - mix) * init + mix * final
    m = re.fullmatch(r"\s*step_linear\((.+),(.+),(.+),(.+),(.+)\)\s*", schedule)
    if m:
        init, final1, duration1, final2, duration2 = (float(g) for g in m.groups())
        if step <= duration1:
            mix = min(max(step / duration1, 0.0), 1.0)
            return (1.0 - mix) * init + mix * final1
        mix = min(max((step - duration1) / duration2, 0.0), 1.0)
        return (1.0 - mix) * final1 + mix * final2
    raise ValueError(f"unknown stddev schedule {schedule!r}: a number, linear(a,b,n) or step_linear(a,b,n,c,m)")


# -- augmentation ----------------------------------------------------------------------------

def sample_shifts(n: int, pad: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(n, 2) integer (row, column) offsets uniform in [-pad, pad], drawn as encoders.random_shift does."""
    return torch.randint(0, 2 * pad + 1, (n, 2), device=device, generator=generator) - pad


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """out[b, i, j] = images[b, clamp(i + dy_b), clamp(j + dx_b)] for (B, H, W, C) images.

    That is replicate-padding by max|shift| and cropping at the offset: DrQ's random shift. One
    index_select of whole C-channel pixels, on any dtype (uint8 frames here).
    """
    b, h, w, c = images.shape
    dev = images.device
    rows = (torch.arange(h, device=dev) + shifts[:, :1]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=dev) + shifts[:, 1:]).clamp_(0, w - 1)
    flat = (torch.arange(b, device=dev)[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
    return images.reshape(b * h * w, c).index_select(0, flat.view(-1)).view(b, h, w, c)


# -- networks --------------------------------------------------------------------------------

def weight_init(m: nn.Module) -> None:
    """drqv2's utils.weight_init: orthogonal weights (ReLU gain for convolutions), zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
    elif isinstance(m, nn.Conv2d):
        nn.init.orthogonal_(m.weight.data, nn.init.calculate_gain("relu"))
        if m.bias is not None:
            m.bias.data.fill_(0.0)


class Encoder(nn.Module):
    """One DrQ conv tower per camera; uint8 (B, H, W, C) frames -> flat conv features (B, repr_dim)."""

    def __init__(self, image_shapes: dict[str, tuple[int, int, int]], channels: int = 32,
                 strides: tuple[int, ...] = (2, 1, 1, 1), channels_last: bool = True):
        super().__init__()
        self.keys = tuple(image_shapes)
        self.towers = nn.ModuleList(conv_stack(c, strides, channels) for (_, _, c) in image_shapes.values())
        self.channels_last = channels_last
        self.repr_dim = 0
        for (h, w, _) in image_shapes.values():
            for s in strides:
                h, w = (h - 3) // s + 1, (w - 3) // s + 1
            if h < 1 or w < 1:
                raise ValueError(f"images of {image_shapes} are too small for 3x3 convs with strides {strides}")
            self.repr_dim += channels * h * w
        self.apply(weight_init)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _features(self, images: list[torch.Tensor], shifts: list[torch.Tensor] | None) -> torch.Tensor:
        parts = []
        for i, (tower, x) in enumerate(zip(self.towers, images)):
            if shifts is not None:
                x = shift_images(x, shifts[i])
            # A contiguous NHWC tensor permuted to NCHW is channels-last memory: no copy.
            x = to_nchw_float(x)
            if not self.channels_last:
                x = x.contiguous()
            parts.append(self.flatten(tower(x)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def flatten(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C*H*W) in memory order: HWC when channels-last (a free view), CHW
        (drqv2's view(B, -1)) otherwise. The order only relabels the trunk's input columns."""
        return h.permute(0, 2, 3, 1).flatten(1) if self.channels_last else h.flatten(1)

    def forward(self, images: list[torch.Tensor], shifts: list[torch.Tensor] | None = None,
                chunk_size: int | None = None) -> torch.Tensor:
        """Features of images[k] (one uint8 batch per camera), optionally shifted, in chunks."""
        n = images[0].shape[0]
        chunk = chunk_size or n
        if chunk >= n:
            return self._features(images, shifts)
        outs = []
        for a in range(0, n, chunk):
            sl = slice(a, a + chunk)
            outs.append(self._features([x[sl] for x in images], None if shifts is None else [s[sl] for s in shifts]))
        return torch.cat(outs)


class Actor(nn.Module):
    """Trunk, then a 2-layer ReLU MLP; the action mean is tanh of its output."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.policy = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                    nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                    nn.Linear(hidden_dim, action_dim))
        self.apply(weight_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(h)))


class Critic(nn.Module):
    """Trunk shared by two Q heads (clipped double Q); returns (q1, q2), each (B, 1)."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)

        def head():
            return nn.Sequential(nn.Linear(feature_dim + action_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, 1))

        self.Q1, self.Q2 = head(), head()
        self.apply(weight_init)

    def forward(self, h: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ha = torch.cat([self.trunk(h), action], dim=-1)
        return self.Q1(ha), self.Q2(ha)


class Value(nn.Module):
    """DrM's state value V(h), (B, 1): a trunk and a 2-layer ReLU MLP, as the actor, with one linear output."""

    def __init__(self, repr_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.V = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                               nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 1))
        self.apply(weight_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.V(self.trunk(h))


def truncated_sample(mu: torch.Tensor, std: float, clip: float | None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """drqv2's TruncatedNormal.sample: mu + clip(std * N(0, 1)), clamped into (-1, 1) with the
    gradient of the unclamped value (straight through)."""
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator) * std
    if clip is not None:
        eps = eps.clamp(-clip, clip)
    x = mu + eps
    return x - x.detach() + x.detach().clamp(-1.0 + 1e-6, 1.0 - 1e-6)


# -- the agent -------------------------------------------------------------------------------

class DrQV2Agent:
    """DrQ-v2 behind the robolearn Agent interface; see the module docstring for the schedule."""

    name = "drqv2"

    def __init__(self, observation_space, action_space, cfg: DrQV2Config | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg = cfg or DrQV2Config()
        self.device = torch.device(device) if device is not None else default_device()
        drm.check_config(cfg)
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError(f"DrQV2Agent expects a normalized Box(-1, 1) action space, got {action_space}")
        self.observation_space, self.action_space = observation_space, action_space
        self.action_dim = int(np.prod(action_space.shape))
        self.image_keys = image_keys_of(observation_space, cfg.image_keys)
        if not self.image_keys:
            raise ValueError(f"DrQ-v2 learns from pixels; no images/<cam> key in {list(observation_space.spaces)}")
        shapes = {k: tuple(observation_space.spaces[k].shape) for k in self.image_keys}
        for k, s in shapes.items():
            if len(s) != 3:
                raise ValueError(f"{k}: expected uint8 (H, W, C) frames, got shape {s}")
        self.chunk_size = cfg.encoder_chunk_size or (32 if self.device.type == "cpu" else None)

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(shapes, cfg.conv_channels, cfg.conv_strides, cfg.channels_last).to(self.device)
            d = self.encoder.repr_dim
            self.actor = Actor(d, self.action_dim, cfg.feature_dim, cfg.hidden_dim).to(self.device)
            self.critic = Critic(d, self.action_dim, cfg.feature_dim, cfg.hidden_dim).to(self.device)
            # Built last, so that DrM leaves the other networks' initialization as it is.
            self.value = Value(d, cfg.feature_dim, cfg.hidden_dim).to(self.device) if cfg.drm else None
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.drm = drm.DrM(cfg, self.actor) if cfg.drm else None

        adam = {"lr": cfg.lr, "fused": True} if cfg.fused_adam else {"lr": cfg.lr}
        self.encoder_opt = torch.optim.Adam(self.encoder.parameters(), **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), **adam)
        self.value_opt = None if self.value is None else torch.optim.Adam(self.value.parameters(), **adam)
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())

        # Separate streams, so acting never changes what the learner samples.
        self.update_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.act_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.agent_step = torch.zeros((), dtype=torch.int64)  # sets the exploration std
        self.num_updates = torch.zeros((), dtype=torch.int64)

    # -- acting --------------------------------------------------------------------------------
    def _images(self, obs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [obs[k] for k in self.image_keys]

    def reset(self) -> None:
        """Nothing to forget: the env stacks the frames."""

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """One action in [-1, 1]: tanh(mean) plus noise of the scheduled std when exploring (which
        advances the agent step by one), tanh(mean) otherwise. Seeding is the caller's."""
        o = obs_to_torch({k: obs[k] for k in self.image_keys}, self.device)
        mu = self.actor(self.encoder(self._images(o)))
        if explore:
            std = self._stddev(int(self.agent_step))
            self.agent_step = self.agent_step + 1  # rebound, so a state dict in hand keeps its value
            mu = truncated_sample(mu, std, None, self.act_gen)
        return mu[0].cpu().numpy().astype(np.float32)

    # -- learning ------------------------------------------------------------------------------
    def _stddev(self, step: int) -> float:
        """The exploration noise std at agent step `step`: the schedule's, or DrM's (robolearn.agents.drm)."""
        if self.drm is None:
            return stddev(self.cfg.stddev_schedule, step)
        awake = int(self.drm.awaken_step)
        return self.drm.stddev(None if awake < 0 else stddev(self.cfg.stddev_schedule, step - awake))

    def update(self, batch: dict, step: int) -> dict[str, float]:
        """One critic (and encoder) step, one actor step and one target step on `batch`;
        `step` is the agent step (drqv2's global_step): it sets the noise std here and in act.
        With DrM, first a perturbation when one is due, and a value step after the critic's."""
        cfg = self.cfg
        if self.drm is not None and self.drm.perturb_due(step):
            self._drm_perturb()
        obs_imgs, next_imgs = self._images(batch["obs"]), self._images(batch["next_obs"])
        action = batch["action"]
        reward, discount = batch["reward"].unsqueeze(-1), batch["discount"].unsqueeze(-1)
        n = action.shape[0]
        std = self._stddev(step)

        # Augment obs and next_obs with independent shifts (one draw for both halves); encode
        # both with the current encoder, recording autograd for the obs half only.
        shifts = [sample_shifts(2 * n, cfg.aug_pad, self.update_gen, self.device) for _ in obs_imgs]
        h = self.encoder(obs_imgs, [s[:n] for s in shifts], self.chunk_size)
        with torch.no_grad():
            h_next = self.encoder(next_imgs, [s[n:] for s in shifts], self.chunk_size)

            next_action = truncated_sample(self.actor(h_next), std, cfg.stddev_clip, self.update_gen)
            tq1, tq2 = self.critic_target(h_next, next_action)
            next_v = torch.min(tq1, tq2)
            if self.value is not None:  # DrM's exploitation: lambda V(s') + (1 - lambda) Q
                next_v = drm.exploit_backup(next_v, self.value(h_next), self.drm.lam())
            target_q = reward + discount * next_v

        q1, q2 = self.critic(h, action)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        check_finite(critic_loss, "critic", step, batch)
        self.encoder_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.encoder_opt.step()
        if self.value is not None:  # the expectile of min(Q1, Q2) at the batch's actions, before this step
            value_loss = drm.expectile_loss(self.value(h.detach()), torch.min(q1, q2).detach(), cfg.drm_expectile)
            check_finite(value_loss, "value", step, batch)
            self.value_opt.zero_grad(set_to_none=True)
            value_loss.backward()
            self.value_opt.step()

        # Actor on the same (pre-step) features, detached, against the just-updated critic.
        h = h.detach()
        if self.drm is None:
            mu = self.actor(h)
        else:  # DrM's beta, from this forward pass on the batch
            with self.drm.probe:
                mu = self.actor(h)
            self.drm.observe(step)
        policy_action = truncated_sample(mu, std, cfg.stddev_clip, self.update_gen)
        self.critic.requires_grad_(False)  # gradients reach the action only
        try:
            aq1, aq2 = self.critic(h, policy_action)
        finally:
            self.critic.requires_grad_(True)
        actor_loss = -torch.min(aq1, aq2).mean()
        check_finite(actor_loss, "actor", step, batch)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        with torch.no_grad():
            torch._foreach_lerp_(self._target, self._online, cfg.critic_target_tau)
        self.num_updates = self.num_updates + 1
        self.agent_step = torch.tensor(int(step), dtype=torch.int64)

        with torch.no_grad():  # drqv2's logged metrics, fetched in one transfer
            if std > 0:
                a, log_std = policy_action.detach(), math.log(std)
                log_prob = (-((a - mu) ** 2) / (2 * std**2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            else:
                log_std, log_prob = -math.inf, torch.full_like(mu[:, 0], math.nan)
            metrics = {
                "batch_reward": batch["reward"].mean(),
                "critic_target_q": target_q.mean(), "critic_q1": q1.detach().mean(), "critic_q2": q2.detach().mean(),
                "critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(),
                "actor_logprob": log_prob.mean(),
            }
            if self.value is not None:
                metrics["drm/value_loss"] = value_loss.detach()
            out = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
        out["actor_ent"] = self.action_dim * (0.5 + 0.5 * math.log(2 * math.pi) + log_std)
        out["actor_stddev"] = std
        if self.drm is not None:  # its state after this update (beta from this batch), which the next one uses
            out.update(self.drm.metrics())
            out["drm/stddev"] = self._stddev(step)
            out["drm/awaken_step"] = float(self.drm.awaken_step)
        return out

    def _drm_perturb(self) -> None:
        """DrM's shrink and perturb of actor, critic (its target towards the same fresh critic) and value network,
        with fresh weights drawn from the update stream; every optimizer's moments start over, as the authors'."""
        cfg, d = self.cfg, self.encoder.repr_dim
        with drm.fresh_init(self.update_gen):
            actor = Actor(d, self.action_dim, cfg.feature_dim, cfg.hidden_dim)
            critic = Critic(d, self.action_dim, cfg.feature_dim, cfg.hidden_dim)
            value = Value(d, cfg.feature_dim, cfg.hidden_dim)
        pairs = [(self.actor, actor), (self.critic, critic), (self.critic_target, critic), (self.value, value)]
        drm.perturb_(pairs, self.drm.perturb_factor(), self._optimizers().values())

    # -- checkpoints ---------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        out = {"encoder": self.encoder, "actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}
        return out if self.value is None else {**out, "value": self.value}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"encoder": self.encoder_opt, "actor": self.actor_opt, "critic": self.critic_opt}
        return out if self.value_opt is None else {**out, "value": self.value_opt}

    def _generators(self) -> dict[str, torch.Generator]:
        return {"update": self.update_gen, "act": self.act_gen}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"counters/agent_step": self.agent_step, "counters/num_updates": self.num_updates}
        return out if self.drm is None else {**out, **self.drm.tensors()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (safetensors-ready): networks, target, Adam moments, RNG streams,
        counters. As with nn.Module.state_dict, contiguous weights alias the live ones."""
        return training_state_to_tensors(self._modules(), self._optimizers(), self._generators(), self._tensors())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_training_state(state, self._modules(), self._optimizers(), self._generators(), self._tensors(),
                            what="DrQ-v2")
        # Saved moments are contiguous; the fused Adam kernel silently mixes up elements when a
        # moment's strides differ from its (channels-last) parameter's, so restore the layout.
        for opt in self._optimizers().values():
            for p, st in opt.state.items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                        st[k] = torch.empty_like(p).copy_(v)

    def config_dict(self) -> dict:
        """JSON-able: the config, the spaces the networks were built for, and optimizer settings."""
        return agent_config(self, self._optimizers(), repr_dim=self.encoder.repr_dim)


# -- drqv2's update as its code does it, for tests and bench/drqv2_update.py ---------------------

def grid_sample_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """drqv2's RandomShiftsAug on float NCHW images, with given (row, column) shifts in [-pad, pad]:
    replicate padding, then a bilinear grid_sample whose sample points fall on integer pixels."""
    n, _, h, w = x.shape
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    ys = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, device=x.device, dtype=x.dtype)[:h]
    eps_w = 1.0 / (w + 2 * pad)
    xs = torch.linspace(-1.0 + eps_w, 1.0 - eps_w, w + 2 * pad, device=x.device, dtype=x.dtype)[:w]
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
    off = (shifts.flip(1) + pad).to(x.dtype)  # (column, row) offsets into the padded image
    off = off * torch.tensor([2.0 / (w + 2 * pad), 2.0 / (h + 2 * pad)], device=x.device, dtype=x.dtype)
    return F.grid_sample(x, base.unsqueeze(0) + off[:, None, None, :], padding_mode="zeros", align_corners=False)


def reference_update(agent: DrQV2Agent, batch: dict, step: int) -> dict[str, float]:
    """One update the way drqv2.py writes it: float NCHW frames, grid_sample shifts, two encoder
    passes, the actor loss backpropagated into the critic's weights too, a per-tensor Polyak loop.
    Draws its random numbers in the order DrQV2Agent.update does, so both see the same shifts and
    noise. Used to check that update() computes the same thing, and as the benchmark's baseline."""
    cfg = agent.cfg
    action = batch["action"]
    reward, discount = batch["reward"].unsqueeze(-1), batch["discount"].unsqueeze(-1)
    n = action.shape[0]
    std = stddev(cfg.stddev_schedule, step)
    towers = agent.encoder.towers

    def encode(images, shifts):
        parts = []
        for tower, x, s in zip(towers, images, shifts):
            x = grid_sample_shift(x.permute(0, 3, 1, 2).contiguous().float(), s)
            parts.append(agent.encoder.flatten(tower(x / 255.0 - 0.5)))
        return torch.cat(parts, dim=1)

    obs_imgs, next_imgs = agent._images(batch["obs"]), agent._images(batch["next_obs"])
    shifts = [sample_shifts(2 * n, cfg.aug_pad, agent.update_gen, agent.device) for _ in obs_imgs]
    h = encode(obs_imgs, [s[:n] for s in shifts])
    with torch.no_grad():
        h_next = encode(next_imgs, [s[n:] for s in shifts])
        next_action = truncated_sample(agent.actor(h_next), std, cfg.stddev_clip, agent.update_gen)
        tq1, tq2 = agent.critic_target(h_next, next_action)
        target_q = reward + discount * torch.min(tq1, tq2)
    q1, q2 = agent.critic(h, action)
    critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
    agent.encoder_opt.zero_grad(set_to_none=True)
    agent.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    agent.critic_opt.step()
    agent.encoder_opt.step()

    h = h.detach()
    policy_action = truncated_sample(agent.actor(h), std, cfg.stddev_clip, agent.update_gen)
    aq1, aq2 = agent.critic(h, policy_action)
    actor_loss = -torch.min(aq1, aq2).mean()
    agent.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_opt.step()
    with torch.no_grad():
        for p, t in zip(agent.critic.parameters(), agent.critic_target.parameters()):
            t.data.copy_(cfg.critic_target_tau * p.data + (1 - cfg.critic_target_tau) * t.data)
    return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(),
            "critic_q1": q1.mean().item(), "critic_q2": q2.mean().item(), "critic_target_q": target_q.mean().item()}


__all__ = ["DrQV2Agent", "DrQV2Config", "STDDEV_SCHEDULES", "TASK_DIFFICULTY", "Actor", "Critic", "Encoder", "Value",
           "grid_sample_shift", "reference_update", "sample_shifts", "shift_images", "stddev", "truncated_sample",
           "weight_init"]


def loop_params(cfg: DrQV2Config, env) -> dict:
    """One batch every update_every_steps agent steps, after num_seed_steps random ones; the env stacks frames."""
    return {"batch": cfg.batch_size, "every": cfg.update_every_steps, "nstep": cfg.nstep, "gamma": cfg.discount,
            "frame_stack": getattr(env.unwrapped, "frame_stack", 1), "seed_steps": cfg.num_seed_steps}


def env_defaults(env) -> dict:
    """The env's action repeat: DrQ-v2 counts frames (agent steps times the repeat)."""
    return {"action_repeat": getattr(getattr(env, "unwrapped", None), "action_repeat", 1)}


AGENT = AgentSpec("drqv2", DrQV2Agent, DrQV2Config, loop_params, env_defaults=env_defaults)
