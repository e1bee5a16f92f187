"""DSRL-NA (Wagenmaker et al. 2025, "Steering Your Diffusion Policy with Latent Space Reinforcement
Learning"), the noise-aliased variant: off-policy RL over the initial noise of a frozen diffusion policy.

Read top to bottom: config, the base (loading and checking it), the agent (act, update, save/load).

The base diffusion policy (robolearn.agents.diffusion) never changes. Its DDIM sampler is a
deterministic map from an initial noise w (pred_horizon x A) to an action chunk; DSRL learns a
noise actor pi_W(s) -> w and so steers the base without a gradient through it. Three networks:
  - Q_A(s, a): a REDQ critic ensemble over the executed action chunk a (action_horizon x A), trained
    by TD on the replay's chunk transitions, demos included. Its target is "aliased": the next chunk
    is the executed part of base.sample(s', pi_W(s')), so every stored chunk, whatever produced it,
    teaches the critic about the noise actor's behaviour.
  - Q_W(s, w): a small critic over noise, distilled from Q_A: Q_W(s, w) regresses onto
    Q_A(s, executed part of base.sample(s, w)) for w drawn from N(0, I) and from pi_W.
  - pi_W: a tanh-Gaussian actor scaled to [-noise_bound, noise_bound], maximising Q_W with a SAC
    temperature tuned towards target_entropy.

Observations: the critics and the actor read the base's own encoding of the observation window
(its frozen EMA encoder): for states that is the flattened window, for cameras the base's conv
features. Nothing here trains an encoder, and the features of a batch are computed once per update.

One update (as SERLAgent's, RLPD style): a batch of batch_size * utd_ratio chunk transitions; the
aliased next chunks for every row are sampled at once (the actor does not change during the critic
steps), then utd_ratio critic steps on strided minibatches, then noise_critic_steps distillation
steps, then one actor and one temperature step.

Checkpoints are self-contained: the base's EMA weights are part of state_dict(), and the base's
checkpoint config is copied into DSRLConfig.base_config, from which a later load builds the
networks. `base` stays in the config as provenance only; a checkpoint loads after it is deleted.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from robolearn.agents.base import default_device
from robolearn.agents.diffusion import DiffusionAgent, DiffusionConfig
from robolearn.agents.errors import check_batch_finite, check_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serialize import load_training_state, optimizer_hparams, training_state_to_tensors
from robolearn.agents.serl import ACTIVATIONS, EnsembleCritic, TanhGaussianActor, adam, sac_actor_step

# Rows per base.sample call: bounds the memory of a UNet base over a batch of thousands of windows.
SAMPLE_ROWS = 1024


@dataclass
class DSRLConfig:
    """Defaults from the paper's DSRL-NA code (robomimic configs) where it gives them, and sized for a
    2-core CPU where it does not or where its size is a GPU's; each says which."""

    base: str | None = None  # the diffusion checkpoint to steer (a run dir or a checkpoint dir); required
    # Filled by the agent from the base's checkpoint config (spaces, diffusion config, weights sha256): a
    # DSRL checkpoint builds its base from this, never from the file at `base`. Leave it unset.
    base_config: dict | None = None
    noise_bound: float = 1.5  # paper: "action_magnitude" 1.5; the actor's noise is tanh * noise_bound
    # Per env step; the replay turns it into gamma^m per chunk of m steps. Paper: 0.99 per chunk.
    gamma: float = 0.99
    tau: float = 0.005  # paper
    lr: float = 3e-4  # paper; every network and the temperature
    batch_size: int = 256  # paper; per critic step (update() takes batch_size * utd_ratio rows)
    utd_ratio: int = 20  # paper's robomimic UTD
    # Q_A: REDQ as SERL/RLPD (10 members, min over a random 2 in the target); paper: 2 critics, min.
    num_critics: int = 10
    critic_subsample: int = 2
    num_noise_critics: int = 2  # Q_W members (paper: 2); each regresses onto Q_A's ensemble mean
    noise_critic_steps: int = 10  # Q_W steps per update, batch_size rows each (paper: 10)
    # Share of distillation noise drawn from the actor (ours); the rest from N(0, I) (the paper's only source).
    distill_actor_fraction: float = 0.5
    hidden_dims: tuple[int, ...] = (256, 256)  # CPU size; paper: 3 layers of 2048 on a GPU
    activation: str = "tanh"  # paper and SERL: tanh after LayerNorm
    init_temperature: float = 1.0  # paper (SB3's automatic temperature starts at 1)
    target_entropy: float = 0.0  # paper's robomimic configs; of the squashed noise in [-1, 1]^(P*A)
    backup_entropy: bool = True  # paper (SAC's soft target)
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    seed: int = 0

    def __post_init__(self):
        from robolearn.config_check import check_fields

        check_fields(self, "DSRLConfig")
        for name in ("noise_bound", "lr", "batch_size", "utd_ratio", "num_critics", "critic_subsample",
                     "num_noise_critics", "noise_critic_steps", "init_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DSRLConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("gamma", "tau", "distill_actor_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"DSRLConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.critic_subsample > self.num_critics:
            raise ValueError(f"DSRLConfig.critic_subsample ({self.critic_subsample}) must be at most "
                             f"num_critics ({self.num_critics})")
        if not self.hidden_dims or min(self.hidden_dims) <= 0:
            raise ValueError(f"DSRLConfig.hidden_dims must be a non-empty list of positive integers, "
                             f"got {list(self.hidden_dims)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"DSRLConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"DSRLConfig.log_std_min ({self.log_std_min}) must be below log_std_max "
                             f"({self.log_std_max})")

    @classmethod
    def from_dict(cls, d: dict) -> "DSRLConfig":
        """Inverse of asdict after a JSON round trip (lists back to tuples); an unknown field is a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DSRLConfig has no field {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


# -- the base -----------------------------------------------------------------------------------

BASE_REQUIRED = "DSRLConfig.base is required: the path of a diffusion checkpoint (--set base=PATH)"
# What a DSRL config keeps of the base checkpoint's config.json: enough to rebuild it, and its provenance.
_BASE_FIELDS = ("agent", "env_id", "observation_space", "action_shape", "agent_config", "weights_sha256")


def _one_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _base_record(config: dict, where) -> dict:
    """The part of a checkpoint config DSRL keeps, after checking that it is a diffusion checkpoint."""
    agent = config.get("agent")
    if agent != "diffusion":
        raise ValueError(f"DSRLConfig.base: {where} is a {agent!r} checkpoint; DSRL steers a diffusion policy")
    if "action_shape" not in config or "observation_space" not in config.get("agent_config", {}):
        raise ValueError(f"DSRLConfig.base: {where} does not record the spaces its networks were built for")
    return {k: copy.deepcopy(config[k]) for k in _BASE_FIELDS if k in config}


def read_base_config(path: str | None) -> dict:
    """The base's config (as DSRLConfig.base_config keeps it) from the checkpoint at `path`, without its weights."""
    from robolearn.checkpoint import CheckpointError, read_config

    if path is None:
        raise ValueError(BASE_REQUIRED)
    try:
        return _base_record(read_config(path), path)
    except CheckpointError as err:
        raise ValueError(f"DSRLConfig.base: {_one_line(err)}") from None


def base_diffusion_config(cfg: DSRLConfig) -> DiffusionConfig:
    """The base's DiffusionConfig: from the saved base_config, or read from the checkpoint at cfg.base."""
    record = cfg.base_config if cfg.base_config is not None else read_base_config(cfg.base)
    return DiffusionConfig.from_dict(record["agent_config"]["config"])


def build_base(record: dict, observation_space, action_dim: int, device) -> DiffusionAgent:
    """A DiffusionAgent for the base `record` (untrained weights: load them next), refused with a one-line
    ValueError when its action dim or the observations it reads do not fit these spaces."""
    from robolearn.train import _saved_spaces

    record = _base_record(record, "the saved base_config")
    base_dim = int(np.prod(record["action_shape"]))
    if base_dim != action_dim:
        raise ValueError(f"DSRLConfig.base: the base's action_dim is {base_dim}, the action space's {action_dim}")
    spaces = _saved_spaces(record)  # the base's own spaces: its networks were built for them
    base = DiffusionAgent(spaces.observation_space, spaces.action_space,
                          DiffusionConfig.from_dict(record["agent_config"]["config"]), device)
    ours = observation_space.spaces
    for key in base.obs_keys:
        if key not in ours:
            raise ValueError(f"DSRLConfig.base: the base reads observation {key!r}, which the observation "
                             f"space lacks (it has {list(ours)})")
        want = base.observation_space[key]
        if tuple(want.shape) != tuple(ours[key].shape) or want.dtype != ours[key].dtype:
            raise ValueError(f"DSRLConfig.base: observation {key!r} is {tuple(ours[key].shape)} {ours[key].dtype} "
                             f"here but {tuple(want.shape)} {want.dtype} for the base")
    base.ema.requires_grad_(False).eval()
    base.model.requires_grad_(False)
    return base


# -- the agent ----------------------------------------------------------------------------------

class DSRLAgent:
    """DSRL-NA over a frozen diffusion policy; see the module docstring."""

    name = "dsrl"

    def __init__(self, observation_space, action_space, cfg: DSRLConfig | None = None,
                 device: torch.device | str | None = None):
        cfg = cfg or DSRLConfig()
        self.device = torch.device(device) if device is not None else default_device()
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError(f"DSRLAgent expects a normalized Box(-1, 1) action space, got {action_space}")
        self.observation_space, self.action_space = observation_space, action_space
        self.action_dim = A = int(np.prod(action_space.shape))

        if cfg.base_config is None:  # a fresh agent: the base checkpoint's file
            from robolearn.checkpoint import CheckpointError, load_checkpoint

            if cfg.base is None:
                raise ValueError(BASE_REQUIRED)
            try:
                ckpt, weights, config, _ = load_checkpoint(cfg.base)
            except CheckpointError as err:
                raise ValueError(f"DSRLConfig.base: {_one_line(err)}") from None
            record = _base_record(config, ckpt)
            self.base = build_base(record, observation_space, A, self.device)
            try:
                self.base.load_state_dict(weights)
            except (KeyError, RuntimeError, ValueError) as err:
                raise ValueError(f"DSRLConfig.base: {ckpt} does not fit its own config: {_one_line(err)}") from None
            self._base_loaded = True
            cfg = replace(cfg, base_config=record)
        else:  # a saved DSRL agent: its base's weights arrive with load_state_dict
            self.base = build_base(cfg.base_config, observation_space, A, self.device)
            self._base_loaded = False
        self.cfg = cfg
        self.obs_keys = self.base.obs_keys
        self.obs_horizon, self.action_horizon = self.base.obs_horizon, self.base.action_horizon
        self.noise_shape = (self.base.pred_horizon, A)
        self.target_entropy = float(cfg.target_entropy)

        # The feature width: one zero window through the base's encoder.
        feat_dim = self._features({k: torch.as_tensor(np.zeros((1, self.obs_horizon, *observation_space[k].shape),
                                                               observation_space[k].dtype))
                                   for k in self.obs_keys}).shape[-1]
        self.noise_dim = noise_dim = self.base.pred_horizon * A
        chunk_dim = self.action_horizon * A
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.actor = TanhGaussianActor(feat_dim, noise_dim, cfg.hidden_dims, cfg.activation,
                                           cfg.log_std_min, cfg.log_std_max).to(self.device)
            self.critic = EnsembleCritic(feat_dim + chunk_dim, cfg.hidden_dims, cfg.num_critics,
                                         cfg.activation).to(self.device)
            self.noise_critic = EnsembleCritic(feat_dim + noise_dim, cfg.hidden_dims, cfg.num_noise_critics,
                                               cfg.activation).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.critic_opt = adam(self.critic.parameters(), cfg.lr)
        self.noise_critic_opt = adam(self.noise_critic.parameters(), cfg.lr)
        self.actor_opt = adam(self.actor.parameters(), cfg.lr)
        self.alpha_opt = adam([self.log_alpha], cfg.lr)
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())

        # Separate streams, so acting never changes what the learner draws.
        self.update_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.act_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.critic_updates = torch.zeros((), dtype=torch.int64)
        self.actor_updates = torch.zeros((), dtype=torch.int64)
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=self.obs_horizon)
        self._queue: deque[np.ndarray] = deque()

    # -- the base ------------------------------------------------------------------------------
    def _require_base(self, what: str) -> None:
        if not self._base_loaded:
            raise RuntimeError(f"DSRLAgent.{what}: the base's weights are not loaded; a DSRL agent built from a "
                               "saved config gets them from load_state_dict")

    @torch.no_grad()
    def _features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation windows (B, obs_horizon, ...) -> (B, F) through the base's frozen EMA encoder."""
        return self.base.ema.encode({k: obs[k].to(self.device) for k in self.obs_keys}, self.obs_keys).float()

    @torch.no_grad()
    def _executed(self, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """The executed part (B, action_horizon * A) of the base's chunks for windows `obs` and noise (B, P * A)."""
        start, out = self.obs_horizon - 1, []
        for i in range(0, noise.shape[0], SAMPLE_ROWS):
            rows = slice(i, i + SAMPLE_ROWS)
            chunk = self.base.sample({k: obs[k][rows] for k in self.obs_keys},
                                     noise[rows].reshape(-1, *self.noise_shape))
            out.append(chunk[:, start:start + self.action_horizon].reshape(chunk.shape[0], -1))
        return torch.cat(out)

    # -- acting --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the observation history and the planned actions (at every episode start)."""
        self._history.clear()
        self._queue.clear()

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """The next action (A,) of the current chunk; a spent chunk is replaced by the base's chunk from the
        actor's noise: a sample when exploring, tanh(mean) * noise_bound otherwise."""
        self._require_base("act")
        obs = {k: np.asarray(obs[k]) for k in self.obs_keys}
        if not self._history:
            self._history.extend([obs] * self.obs_horizon)  # an episode's first obs, repeated (as the base)
        else:
            self._history.append(obs)
        if not self._queue:
            window = {k: torch.as_tensor(np.stack([o[k] for o in self._history]), device=self.device).unsqueeze(0)
                      for k in self.obs_keys}
            noise = self.actor_noise(self._features(window), explore)
            chunk = self._executed(window, noise)[0].reshape(self.action_horizon, self.action_dim)
            self._queue.extend(chunk.cpu().numpy().astype(np.float32))
        return self._queue.popleft()

    @torch.no_grad()
    def actor_noise(self, feat: torch.Tensor, explore: bool) -> torch.Tensor:
        """The actor's noise (B, P * A) in [-noise_bound, noise_bound] for features `feat` (B, F)."""
        if explore:
            squashed, _ = self.actor.sample(feat, self.act_gen)
        else:
            squashed = torch.tanh(self.actor(feat)[0])
        return squashed * self.cfg.noise_bound

    # -- learning ------------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def _windows(self, obs: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise ValueError(f"batch['{part}'] lacks {missing}, which the base reads")
        bad = {k: tuple(obs[k].shape) for k in self.obs_keys if obs[k].ndim < 2 or obs[k].shape[1] != self.obs_horizon}
        if bad:
            raise ValueError(f"batch['{part}'] must hold windows of obs_horizon={self.obs_horizon} steps, got shapes "
                             f"{bad}: sample chunk transitions (loop_params' obs_horizon and chunk)")
        return {k: obs[k].to(self.device) for k in self.obs_keys}

    def update(self, batch: dict, step: int) -> dict[str, float]:
        """utd_ratio critic steps on strided slices of a chunk-transition batch, noise_critic_steps
        distillation steps, then one actor and temperature step."""
        self._require_base("update")
        cfg, utd = self.cfg, self.cfg.utd_ratio
        n = batch["reward"].shape[0]
        if n % utd:
            raise ValueError(f"batch of {n} does not split into utd_ratio={utd} minibatches "
                             f"(sample batch_size * utd_ratio = {cfg.batch_size * utd})")
        action = batch["action"]
        if action.ndim != 3 or tuple(action.shape[1:]) != (self.action_horizon, self.action_dim):
            raise ValueError(f"batch['action'] must be (B, action_horizon, A) = (B, {self.action_horizon}, "
                             f"{self.action_dim}), got {tuple(action.shape)}: sample chunk transitions with "
                             f"chunk={self.action_horizon} (loop_params)")
        check_batch_finite(batch, "critic", step)
        check_batch_finite({"obs": batch["next_obs"]}, "critic", step)
        obs, next_obs = self._windows(batch["obs"], "obs"), self._windows(batch["next_obs"], "next_obs")
        with torch.no_grad():
            feat, next_feat = self._features(obs), self._features(next_obs)
            # The aliased target's next chunks, for all rows at once: the actor is fixed until the critic steps end.
            next_noise, next_log_prob = self.actor.sample(next_feat, self.update_gen)
            next_action = self._executed(next_obs, next_noise * cfg.noise_bound)
        rows = {"feat": feat, "next_feat": next_feat, "next_action": next_action, "next_log_prob": next_log_prob,
                "action": action.to(self.device, torch.float32).reshape(n, -1),
                "reward": batch["reward"].to(self.device), "discount": batch["discount"].to(self.device)}
        metrics: dict[str, list[torch.Tensor]] = {"critic_loss": [], "q": [], "target_q": []}
        for i in range(utd):  # strided, as serl.minibatches: each keeps the batch's demo/online mix
            part = {k: v[i::utd] for k, v in rows.items()}
            for k, v in self._update_critic(part, step, batch).items():
                metrics[k].append(v)
        out = {k: torch.stack(v).mean() for k, v in metrics.items()}
        out.update(self._update_noise_critic(obs, feat, step, batch))
        out.update(self._update_actor_and_alpha(part["feat"], step, batch))
        result = dict(zip(out, torch.stack(list(out.values())).tolist()))
        result["alpha"] = float(self.log_alpha.detach().exp())
        return result

    def _update_critic(self, b: dict, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """One TD step of Q_A towards r + gamma^m (min of a random subsample of targets - alpha log pi)."""
        cfg = self.cfg
        with torch.no_grad():
            members = torch.randperm(cfg.num_critics, device=self.device,
                                     generator=self.update_gen)[:cfg.critic_subsample]
            next_q = self.critic_target(b["next_feat"], b["next_action"], members).min(dim=0).values
            if cfg.backup_entropy:
                next_q = next_q - self.alpha * b["next_log_prob"]
            target = b["reward"] + b["discount"] * next_q
        q = self.critic(b["feat"], b["action"])  # (E, B)
        loss = (q - target).pow(2).mean()
        check_finite(loss, "critic", step, batch)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._target, self._online, cfg.tau)
        self.critic_updates += 1
        return {"critic_loss": loss.detach(), "q": q.detach().mean(), "target_q": target.mean()}

    def _update_noise_critic(self, obs: dict, feat: torch.Tensor, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """Distil Q_W(s, w) from Q_A(s, executed base chunk of w) on rows drawn from the batch, with w from
        the actor in each step's first distill_actor_fraction of rows and from N(0, I) in the rest."""
        cfg, bs = self.cfg, self.cfg.batch_size
        m = cfg.noise_critic_steps * bs
        with torch.no_grad():
            rows = torch.randint(0, feat.shape[0], (m,), device=self.device, generator=self.update_gen)
            f = feat[rows]
            noise = torch.randn(m, self.noise_dim, device=self.device, generator=self.update_gen)
            from_actor = (torch.arange(m, device=self.device) % bs) < round(bs * cfg.distill_actor_fraction)
            if bool(from_actor.any()):
                noise[from_actor] = self.actor.sample(f[from_actor], self.update_gen)[0] * cfg.noise_bound
            target = self.critic(f, self._executed({k: v[rows] for k, v in obs.items()}, noise)).mean(dim=0)
        losses = []
        for j in range(cfg.noise_critic_steps):
            s = slice(j * bs, (j + 1) * bs)
            loss = (self.noise_critic(f[s], noise[s]) - target[s]).pow(2).mean()
            check_finite(loss, "noise_critic", step, batch)
            self.noise_critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.noise_critic_opt.step()
            losses.append(loss.detach())
        return {"noise_critic_loss": torch.stack(losses).mean(), "distill_target_q": target.mean()}

    def _update_actor_and_alpha(self, feat: torch.Tensor, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """The actor maximises Q_W(s, pi_W(s)) - alpha log pi_W; the temperature tracks target_entropy."""
        bound = self.cfg.noise_bound
        squashed, metrics = sac_actor_step(self, feat, lambda w: self.noise_critic(feat, w * bound, detach=True)
                                           .mean(dim=0), batch, step)
        return {**metrics, "noise_abs": squashed.abs().mean() * bound}

    # -- checkpoints ---------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        return {"base": self.base.ema, "actor": self.actor, "critic": self.critic,
                "critic_target": self.critic_target, "noise_critic": self.noise_critic}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.critic_opt, "noise_critic": self.noise_critic_opt, "actor": self.actor_opt,
                "alpha": self.alpha_opt}

    def _generators(self) -> dict[str, torch.Generator]:
        return {"update": self.update_gen, "act": self.act_gen}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"log_alpha": self.log_alpha, "counters/critic_updates": self.critic_updates,
                "counters/actor_updates": self.actor_updates}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (safetensors-ready): the base's EMA weights (`base.*`), actor, critics, target,
        Adam moments, temperature, counters and both RNG streams."""
        return training_state_to_tensors(self._modules(), self._optimizers(), self._generators(), self._tensors())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_training_state(state, self._modules(), self._optimizers(), self._generators(), self._tensors(),
                            what="DSRL")
        self._base_loaded = True
        self.reset()

    def config_dict(self) -> dict:
        """JSON-able: the config (with the base's in base_config), the spaces, and optimizer settings."""
        spaces = {k: {"shape": list(s.shape), "dtype": str(s.dtype)}
                  for k, s in self.observation_space.spaces.items()}
        return {"agent": self.name, "config": asdict(self.cfg), "observation_space": spaces,
                "action_dim": self.action_dim, "target_entropy": self.target_entropy,
                "optimizers": {name: optimizer_hparams(opt) for name, opt in self._optimizers().items()}}


def loop_params(cfg: DSRLConfig, env) -> dict:
    """All critic steps in one update call per env step, on chunk transitions of the base's horizons."""
    base = base_diffusion_config(cfg)
    return {"batch": cfg.batch_size * cfg.utd_ratio, "every": 1, "nstep": 1, "gamma": cfg.gamma, "frame_stack": 1,
            "seed_steps": 0, "obs_horizon": base.obs_horizon, "chunk": base.action_horizon}


AGENT = AgentSpec("dsrl", DSRLAgent, DSRLConfig, loop_params)
