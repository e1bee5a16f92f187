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
(its frozen EMA encoder): for states that is the standardized window, for cameras the base's conv
features. Nothing here trains an encoder, and the features of a batch are computed once per update.

One update (as SERLAgent's, RLPD style): a batch of batch_size * utd_ratio chunk transitions; the
aliased next chunks for every row are sampled at once (the actor does not change during the critic
steps), then utd_ratio critic steps on strided minibatches, then noise_critic_steps distillation
steps, then actor_steps actor and temperature steps on those minibatches in turn.

Checkpoints are self-contained: the base's EMA weights are part of state_dict(), and the base's
checkpoint config is copied into DSRLConfig.base_config, from which a later load builds the
networks. `base` stays in the config as provenance only; a checkpoint loads after it is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robolearn.agents.diffusion_base import (FineTuner, base_diffusion_config, check_horizons, check_sac_fields,
                                             config_from_dict, executed)
from robolearn.agents.errors import check_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serl import (EnsembleCritic, TanhGaussianActor, adam, critic_step, mean_metrics, redq_min,
                                   sac_actor_step)


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
    # Actor and temperature steps per update, on the critic steps' minibatches in turn. The paper (SB3's SAC)
    # steps them with every critic step, utd_ratio per decision; they read only Q_W, so they are cheap. One
    # per update left the temperature near its initial 1 through a 2k-step run (0.95 after 250 updates), and the
    # entropy bonus (~40 per chunk in 64 noise dims) outweighed the task's reward (at most 8 per chunk).
    actor_steps: int = 20
    # Share of distillation noise drawn from the actor (ours); the rest from N(0, I) (the paper's only source).
    distill_actor_fraction: float = 0.5
    hidden_dims: tuple[int, ...] = (256, 256)  # CPU size; paper: 3 layers of 2048 on a GPU
    activation: str = "tanh"  # paper and SERL: tanh after LayerNorm
    # SERL's. The paper's 1.0 (SB3's automatic temperature) made the entropy bonus the critic's main signal for
    # thousands of updates here: PickCube evaluations 0-10% over 2k env steps, against 95% by 1.5k at 0.01.
    init_temperature: float = 0.01
    target_entropy: float = 0.0  # paper's robomimic configs; of the squashed noise in [-1, 1]^(P*A)
    backup_entropy: bool = True  # paper (SAC's soft target)
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    seed: int = 0

    def __post_init__(self):
        check_sac_fields(self, ("noise_bound", "lr", "batch_size", "utd_ratio", "num_critics", "critic_subsample",
                                "num_noise_critics", "noise_critic_steps", "actor_steps", "init_temperature"),
                         ("gamma", "tau", "distill_actor_fraction"))

    @classmethod
    def from_dict(cls, d: dict) -> "DSRLConfig":
        """Inverse of asdict after a JSON round trip; an unknown field is a ValueError."""
        return config_from_dict(cls, d)


# -- the agent ----------------------------------------------------------------------------------

class DSRLAgent(FineTuner):
    """DSRL-NA over a frozen diffusion policy; see the module docstring."""

    name = "dsrl"

    def __init__(self, observation_space, action_space, cfg: DSRLConfig | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg = self._setup(observation_space, action_space, cfg or DSRLConfig(), device)
        self.base.ema.requires_grad_(False).eval()  # frozen: DSRL only ever samples it
        self.base.model.requires_grad_(False)
        self.noise_shape = (self.base.pred_horizon, self.action_dim)
        self.target_entropy = float(cfg.target_entropy)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.actor = TanhGaussianActor(self.feat_dim, self.noise_dim, cfg.hidden_dims, cfg.activation,
                                           cfg.log_std_min, cfg.log_std_max).to(self.device)
            self.critic = EnsembleCritic(self.feat_dim + self.chunk_dim, cfg.hidden_dims, cfg.num_critics,
                                         cfg.activation).to(self.device)
            self.noise_critic = EnsembleCritic(self.feat_dim + self.noise_dim, cfg.hidden_dims,
                                               cfg.num_noise_critics, cfg.activation).to(self.device)
        self._optimize()
        self.noise_critic_opt = adam(self.noise_critic.parameters(), cfg.lr)

    # -- acting --------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """The next action (A,) of the current chunk; a spent chunk is replaced by the base's chunk from the
        actor's noise: a sample when exploring, tanh(mean) * noise_bound otherwise."""
        self._require_base("act")
        window = self._chunks.push(obs, self.device)
        if window is None:
            return self._chunks.next_action()
        noise = self.actor_noise(self._features(window), explore)
        return self._chunks.next_action(executed(self.base, window, noise)[0].reshape(self.action_horizon,
                                                                                      self.action_dim))

    @torch.no_grad()
    def actor_noise(self, feat: torch.Tensor, explore: bool) -> torch.Tensor:
        """The actor's noise (B, P * A) in [-noise_bound, noise_bound] for features `feat` (B, F)."""
        if explore:
            squashed, _ = self.actor.sample(feat, self.act_gen)
        else:
            squashed = torch.tanh(self.actor(feat)[0])
        return squashed * self.cfg.noise_bound

    # -- learning ------------------------------------------------------------------------------
    def update(self, batch: dict, step: int) -> dict[str, float]:
        """utd_ratio critic steps on strided slices of a chunk-transition batch, noise_critic_steps
        distillation steps, then actor_steps actor and temperature steps."""
        cfg, utd = self.cfg, self.cfg.utd_ratio
        n, action, obs, next_obs = self._chunk_batch(batch, step)
        with torch.no_grad():
            feat, next_feat = self._features(obs), self._features(next_obs)
            # The aliased target's next chunks, for all rows at once: the actor is fixed until the critic steps end.
            next_noise, next_log_prob = self.actor.sample(next_feat, self.update_gen)
            next_action = executed(self.base, next_obs, next_noise * cfg.noise_bound)
        rows = {"feat": feat, "next_feat": next_feat, "next_action": next_action, "next_log_prob": next_log_prob,
                "action": action.to(self.device, torch.float32).reshape(n, -1),
                "reward": batch["reward"].to(self.device), "discount": batch["discount"].to(self.device)}
        # Critic steps on strided minibatches, as serl.minibatches: each keeps the batch's demo/online mix.
        out = mean_metrics(self._update_critic({k: v[i::utd] for k, v in rows.items()}, step, batch)
                           for i in range(utd))
        out.update(self._update_noise_critic(obs, feat, step, batch))
        out.update(mean_metrics(self._update_actor_and_alpha(feat[i % utd::utd], step, batch)
                                for i in range(cfg.actor_steps)))
        result = dict(zip(out, torch.stack(list(out.values())).tolist()))
        result["alpha"] = float(self.log_alpha.detach().exp())
        return result

    def _update_critic(self, b: dict, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """One TD step of Q_A towards r + gamma^m (min of a random subsample of targets - alpha log pi)."""
        with torch.no_grad():
            next_q = redq_min(self, b["next_feat"], b["next_action"])
            if self.cfg.backup_entropy:
                next_q = next_q - self.alpha * b["next_log_prob"]
            target = b["reward"] + b["discount"] * next_q
        return critic_step(self, self.critic(b["feat"], b["action"]), target, step, batch)

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
            target = self.critic(f, executed(self.base, {k: v[rows] for k, v in obs.items()}, noise)).mean(dim=0)
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


def loop_params(cfg: DSRLConfig, env) -> dict:
    """One update per executed chunk (every action_horizon env steps: the paper's UTD is per noise-space
    decision), on chunk transitions of the base's horizons."""
    base = base_diffusion_config(cfg, "DSRLConfig")
    check_horizons(base, env, "DSRLConfig")
    return {"batch": cfg.batch_size * cfg.utd_ratio, "every": base.action_horizon, "nstep": 1, "gamma": cfg.gamma, "frame_stack": 1,
            "seed_steps": 0, "obs_horizon": base.obs_horizon, "chunk": base.action_horizon}


AGENT = AgentSpec("dsrl", DSRLAgent, DSRLConfig, loop_params)
