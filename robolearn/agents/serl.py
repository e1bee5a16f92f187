"""SERL-style RLPD: SAC with a LayerNorm critic ensemble, REDQ target subsampling and high UTD.

References: Ball et al. 2023, "Efficient Online RL with Offline Data" (RLPD); Luo et al. 2024,
"SERL". Read top to bottom: config, networks, the agent (act, update, save/load), then the
binary reward classifier SERL uses in place of a hand-written reward on real robots.

The update, as RLPD's and SERL's `update_high_utd`: the caller samples ONE batch of
`batch_size * utd_ratio` transitions (RLPD: half online, half demos); the agent splits it into
`utd_ratio` strided minibatches (each keeps the batch's demo/online mix), takes one critic step (and Polyak target step) on each, then one actor
and one temperature step on the last minibatch (RLPD; SERL uses the whole batch, which costs
utd_ratio times more actor compute for no reported gain).

Observations: "state" (and optionally "tcp_pose", via `proprio_keys`) from state; with cameras,
a DrQ conv encoder per camera trained by the critic (the actor sees its output detached, as in
DrQ) with random-shift augmentation on obs and next_obs. With `frozen_encoder` set, a pretrained
encoder maps frames to features once: the replay may call `agent.precompute(obs)` at insert time
and store the returned `features/<cam>` arrays next to the frames, and update() uses them as they
are; otherwise update() encodes the batch's frames once per call (under no_grad, with random
shift) and shares the result across the utd minibatches. Cached features cannot be augmented:
that is the price of never re-running a large encoder per update.

Networks: SERL's LayerNorm MLPs (`network="mlp"`), or SimbaV2's hyperspherical networks with a distributional
critic and reward scaling (`network="simbav2"`, robolearn.agents.simba): the critic's TD step then projects the
backup's distribution onto the critic's support and trains by cross-entropy (`_update_critic`).

With `drm=True`, DrM (robolearn.agents.drm): the actor's dormant ratio perturbs the networks, raises the target
entropy and blends an expectile value network into the critic's target. MENTOR (robolearn.agents.mentor):
`actor_moe_experts` puts a mixture-of-experts in the actor, and `mentor_perturb` (with drm) perturbs towards the
weights of the best episodes so far, whose returns reach the agent through `observe_episode`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolearn.agents import drm, mentor, simba
from robolearn.agents.base import default_device, obs_to_torch
from robolearn.agents.encoders import DictObsEncoder, FrozenEncoder, feature_key, image_keys_of, random_shift
from robolearn.agents.errors import check_batch_finite, check_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serialize import agent_config, load_training_state, training_state_to_tensors


@dataclass
class SERLConfig:
    """Defaults follow SERL's `make_sac_agent` (RLPD's ensemble of 10, subsample 2, LayerNorm)."""

    # The replay computes n-step returns and batch["discount"] = gamma^n (0 at termination) with
    # this gamma; the agent itself only reads batch["discount"].
    gamma: float = 0.99
    # n-step returns (the replay computes them at sample time). RLPD and SERL use 1; 3 propagates
    # a 100-step task's reward back to its start in a third of the critic steps.
    nstep: int = 1
    tau: float = 0.005
    lr: float = 3e-4
    batch_size: int = 256  # per critic step; update() takes batch_size * utd_ratio transitions
    # Critic steps per actor step and per env step. RLPD uses 20 and SERL's PickCube example 8, on
    # a GPU. On a 2-core CPU one critic step here costs ~20-25 ms (2 idle cores; ~40 ms on one), so
    # 4 gives ~10 env steps/s (20k PickCube steps in ~35 min) and keeps most of high UTD's sample
    # efficiency; raise it where updates are cheap.
    utd_ratio: int = 4
    num_critics: int = 10
    critic_subsample: int = 2  # REDQ-style random members whose min forms the target
    # DroQ (Hiraoka et al. 2022): dropout on the critic's hidden layers; DroQ itself pairs 0.01 with 2 critics
    # (num_critics=2, critic_subsample=2) in place of REDQ's 10, at high UTD. 0 turns it off.
    critic_dropout: float = 0.0
    hidden_dims: tuple[int, ...] = (256, 256)
    activation: str = "tanh"  # SERL: tanh after LayerNorm; RLPD: relu (~15% faster on CPU)
    # "mlp": the LayerNorm MLPs above (hidden_dims, activation); "simbav2": SimbaV2 (Lee et al. 2025) for actor and
    # critic alike, with a categorical critic and reward scaling (robolearn.agents.simba). The simba_* fields
    # shape SimbaV2's networks only. The paper's critic is 512 wide with 2 blocks, its actor 128 with 1; one
    # 128-wide block each costs a CPU critic step ~2x the MLP's FLOPs.
    network: str = "mlp"
    simba_hidden_dim: int = 128
    simba_blocks: int = 1  # LERP residual blocks per network
    simba_atoms: int = 101  # the critic's support: simba_atoms returns evenly spaced in [-simba_v_max, simba_v_max]
    # The support's half-width in scaled-reward units: rewards are divided by a running return scale that keeps
    # |returns| within it (the paper's normalized G_max 5; PickCube's returns, below 63, scale to ~3).
    simba_v_max: float = 5.0
    simba_c_shift: float = 3.0  # the constant appended to the input before its l2 normalization (paper)
    init_temperature: float = 0.01  # SERL; RLPD starts at 1.0
    target_entropy: float | None = None  # None: -|A|/2 (RLPD, SERL)
    backup_entropy: bool = False  # SERL default for state and pixels
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    # DrM (Xu et al. 2024; robolearn.agents.drm), off by default, for network="mlp": the actor's dormant ratio
    # beta perturbs the networks, raises the target entropy (SAC's analogue of DrM's noise std) and blends an
    # expectile value network into the critic's target. SERL's LayerNorm + tanh actor reads beta 0 on PickCube
    # (docs/agent_variants.md), which leaves the perturbation at drm_max_perturb_factor and lambda near its top.
    drm: bool = False
    # Agent (env) steps between perturbations. The authors': 100k agent steps, in runs of 0.1-1.5M; scaled to SERL's
    # 20k-step runs (10 perturbations, 16k critic steps apart at UTD 8).
    drm_perturb_interval: int = 2_000
    drm_perturb_rate: float = 2.0  # k in alpha = clip(1 - k beta, min, max), the weights' share kept
    drm_min_perturb_factor: float = 0.2
    drm_max_perturb_factor: float = 0.9  # the authors' DMC tasks
    drm_perturb_threshold: float = 0.0  # perturb only at beta at least this; 0 (the authors' code): always
    drm_target_beta: float = 0.2  # beta_hat: the schedules' midpoint
    drm_target_lambda: float = 0.6  # lambda_hat, the value net's largest share of the backup
    drm_expectile: float = 0.9  # of Q(s, a) over the replay's actions, which the value net learns
    # MENTOR (Huang et al. 2025; robolearn.agents.mentor), off by default, for network="mlp". A mixture-of-experts
    # actor: its first hidden layer feeds a router over actor_moe_experts experts (each SERL's remaining hidden
    # layers), of which the actor_moe_topk with the highest router probabilities are mixed per sample. 0: SERL's MLP.
    # The authors' DMC and Meta-World setting: 16 experts, top 4; their ablation found 8 best, 4-32 alike at top 4.
    actor_moe_experts: int = 0
    actor_moe_topk: int = 4
    actor_moe_router_entropy: float = 1.0  # weight of the router's mean entropy in the actor loss (the authors': 1)
    # Task-oriented perturbation (needs drm): DrM's perturbations move towards a draw from the per-parameter Gaussian
    # of the weights kept after the mentor_set_size best training episodes (the authors' 10), not a fresh init.
    mentor_perturb: bool = False
    mentor_set_size: int = 10
    # Observations
    proprio_keys: tuple[str, ...] = ("state",)
    image_keys: tuple[str, ...] | None = None  # None: every images/<cam> in the space
    frame_stack: int = 1  # frames stacked on the channel axis (replay and act() alike)
    feature_dim: int = 50  # per camera
    conv_strides: tuple[int, ...] = (2, 1, 1, 1)  # DrQ; (2, 2, 2, 1) is ~3.5x cheaper on CPU
    aug_pad: int = 4
    frozen_encoder: str | None = None  # weights file (.safetensors / .pt) of a pretrained encoder
    frozen_arch: str = "resnet10"  # resnet10 | resnet18 | drq | drq_state (see encoders.FrozenEncoder)
    # With a frozen encoder (and frame_stack 1): the replay stores its features, computed once per env step, in
    # place of frames (replay_view); updates then see no random shift. False: frames in the replay, encoded per
    # update with random shift (SERL's ResNet route; slower on a CPU). A checkpoint from before this option
    # resumes with False, the layout its replay was saved in.
    cache_features: bool = True
    # torch.compile the critic ensemble (25-50 s to compile at first). Measured at f6402c7 on the 2-core VM, 1
    # thread, CPU_OVERRIDES: no faster (167-173 against 172-180 critic steps/s), and with critic_dropout 20%
    # slower (119 against 146-149: the masks break the graph); an older tree measured 1.1-1.3x.
    compile: bool = False
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "SERLConfig":
        """Inverse of asdict after a JSON round trip (lists back to tuples)."""
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        if "cache_features" not in d and d.get("frozen_encoder") is not None:
            d = {**d, "cache_features": False}  # saved before caching existed: its replay holds frames
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


# The setting robolearn's CPU benchmarks and `make demo` train SERL with (docs/training.md): 2
# critics make a critic step ~4x cheaper than 10, which buys UTD 8 at ~10 env steps/s on 2 cores,
# and 3-step returns carry a 100-step task's reward back in a third of the backups. With these,
# PandaPickCube from states reaches 90% in ~5-7k env steps; SERL's defaults (10 critics, UTD 4,
# 1-step) learn too, more slowly per second here.
CPU_OVERRIDES = {"num_critics": 2, "utd_ratio": 8, "nstep": 3}

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}
NETWORKS = ("mlp", "simbav2")


def check_networks(cfg: SERLConfig) -> None:
    """The network options' values (robolearn.train checks --set's types and signs first); ValueError names one."""
    if cfg.network not in NETWORKS:
        raise ValueError(f"network must be one of {list(NETWORKS)}, got {cfg.network!r}")
    for name, least in (("simba_hidden_dim", 1), ("simba_blocks", 1), ("simba_atoms", 2)):
        if not getattr(cfg, name) >= least:
            raise ValueError(f"{name} must be at least {least}, got {getattr(cfg, name)!r}")
    for name in ("simba_v_max", "simba_c_shift"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    if cfg.network == "simbav2" and cfg.drm:
        # Shrink and perturb would pull SimbaV2's weights off their unit sphere; its normalization is its own cure.
        raise ValueError("drm must be false with network=simbav2 (DrM perturbs the mlp networks)")
    if cfg.network == "simbav2" and cfg.critic_dropout:
        # DroQ's dropout sits before a LayerNorm, which SimbaV2 replaces by its l2 normalization; untested together.
        raise ValueError(f"critic_dropout must be 0 with network=simbav2 (DroQ's dropout is for the mlp critic), "
                         f"got {cfg.critic_dropout!r}")


# -- networks --------------------------------------------------------------------------------

# Above this rate a Bernoulli draw per element costs less than the gaps between drops (below).
GAP_SAMPLING_MAX_P = 0.05


def sparse_dropout(p: float, device) -> bool:
    """Whether dropout at rate p on `device` draws only the dropped elements' indices (dropped_indices): on a
    CPU at p <= GAP_SAMPLING_MAX_P. Depends on (p, device) only, so a run draws the same masks whenever its
    generator's state is the same."""
    return torch.device(device).type == "cpu" and p <= GAP_SAMPLING_MAX_P


@torch.compiler.disable  # a data-dependent loop and a generator argument: left to eager mode under torch.compile
def dropped_indices(n: int, p: float, generator: torch.Generator | None, device,
                    draws: int | None = None) -> torch.Tensor:
    """The flat indices (ascending, int64) of the elements that dropout at rate p drops among n, each
    independently with probability p, drawn as the gaps between them, which are Geometric(p):
    floor(log U / log(1 - p)) + 1, `draws` per round (default: enough for one round but once in ~1e9).

    That costs in proportion to the drops, not the elements: CPU random numbers cost ~6 ns each, so a
    Bernoulli per element of a (2, 256, 256) activation took 0.8 ms, as long as the rest of that layer's
    critic step, and the gaps 0.15 ms at p = 0.01 (DroQ's rate; a busy 2-core VM)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout: p must be in (0, 1), got {p!r}")
    log_q, last, found = math.log1p(-p), -1.0, []
    while True:
        m = draws or int(n * p + 6.0 * math.sqrt(n * p) + 16)
        u = torch.rand(m, generator=generator, device=device, dtype=torch.float64)
        zeros = last + torch.cumsum(torch.floor(torch.log1p(-u) / log_q) + 1.0, 0)
        inside = zeros[zeros < n]
        found.append(inside.long())
        if inside.numel() < m:
            return found[0] if len(found) == 1 else torch.cat(found)
        last = float(zeros[-1])


def dropout_mask(shape, p: float, generator: torch.Generator | None, device, dtype=torch.float32,
                 draws: int | None = None) -> torch.Tensor:
    """Inverted dropout's mask of `shape`: each element 0 with probability p, independently, else 1 / (1 - p).
    Where sparse_dropout(p, device), the zeros are dropped_indices (the same ones from the same generator
    state); on a GPU, or at a higher p, one Bernoulli kernel is cheaper."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_mask: p must be in (0, 1), got {p!r}")
    keep = 1.0 / (1.0 - p)
    if not sparse_dropout(p, device):
        return (torch.rand(shape, generator=generator, device=device) >= p).to(dtype) * keep
    n = math.prod(shape)
    mask = torch.full((n,), keep, device=device, dtype=dtype)
    mask[dropped_indices(n, p, generator, device, draws)] = 0.0
    return mask.view(shape)


class ZeroAt(torch.autograd.Function):
    """x with the flat `indices` set to zero, in place, and the same elements of the gradient: dropout
    without its full-size mask or the two full-size multiplies (forward, backward) a mask costs. x must be
    contiguous and not needed by the backward of the op that made it (a matmul's output is not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.mark_dirty(x)
        x.view(-1).index_fill_(0, indices, 0.0)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return grad.reshape(-1).index_fill(0, indices, 0.0).view_as(grad), None


LAYER_NORM_EPS = 1e-5  # F.layer_norm's default


class EnsembleActivation(nn.Module):
    """The hidden activation of an EnsembleCritic, as a module so that forward hooks see its output
    (E, B, H): robolearn.agents.dormant reads it per member (`member_dim`)."""

    dormant_probe, member_dim = True, 0

    def __init__(self, name: str):
        super().__init__()
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class EnsembleCritic(nn.Module):
    """E Q-networks as stacked (E, in, out) weights: every layer is one batched matmul for all E.

    Per member: Linear -> [Dropout] -> LayerNorm -> activation for each hidden layer, then Linear -> Q.
    With `dropout` > 0 this is DroQ's critic (Hiraoka et al. 2022): dropout on every hidden layer, in
    the online and the target networks alike and whenever the module is in training mode (its default:
    the agents never switch it), so the TD target and the actor's Q are dropout samples as in DroQ.
    """

    linear_parameters = ("weights", "biases")  # its linear layers, which DrM's perturbation mixes (agents.drm)

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], num: int, activation: str, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"critic dropout must be in [0, 1), got {dropout!r}")
        # One activation module per hidden layer, so forward hooks (robolearn.agents.dormant) see each layer.
        self.num, self.dropout = num, float(dropout)
        self.acts = nn.ModuleList(EnsembleActivation(activation) for _ in hidden_dims)
        # Dropout's masks come from this generator (the owning agent's update stream, set after any deepcopy: a
        # copy carries a clone of it, which no checkpoint saves); None: torch's global generator.
        self.generator: torch.Generator | None = None
        dims = (in_dim, *hidden_dims, 1)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, o in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(i)  # nn.Linear's default, drawn independently per member
            self.weights.append(nn.Parameter(torch.empty(num, i, o).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num, 1, o).uniform_(-bound, bound)))
        self.ln_weights = nn.ParameterList([nn.Parameter(torch.ones(num, 1, h)) for h in hidden_dims])
        self.ln_biases = nn.ParameterList([nn.Parameter(torch.zeros(num, 1, h)) for h in hidden_dims])

    def forward(self, obs_feat: torch.Tensor, action: torch.Tensor, members: torch.Tensor | None = None,
                detach: bool = False) -> torch.Tensor:
        """Q-values (E', B) for the members selected (all by default); `detach` cuts the parameters' grads."""
        params = [list(self.weights), list(self.biases), list(self.ln_weights), list(self.ln_biases)]
        if members is not None:
            params = [[p[members] for p in group] for group in params]
        if detach:
            params = [[p.detach() for p in group] for group in params]
        ws, bs, lws, lbs = params
        # (B, in) @ (E, in, out) broadcasts to (E, B, out): one call covers every member.
        h = torch.matmul(torch.cat([obs_feat, action], dim=-1), ws[0]) + bs[0]
        for i in range(len(lws)):
            if i > 0:
                h = torch.baddbmm(bs[i], h, ws[i])
            eps = LAYER_NORM_EPS
            if self.dropout and self.training:  # masks from self.generator, so a resumed run draws the same
                if sparse_dropout(self.dropout, h.device):
                    # LayerNorm(x / (1 - p), eps) = LayerNorm(x, eps (1 - p)^2): the kept elements' scaling moves
                    # into eps, and dropout only zeroes the dropped ones (no full-size mask, no full-size multiply).
                    h = ZeroAt.apply(h, dropped_indices(h.numel(), self.dropout, self.generator, h.device))
                    eps = LAYER_NORM_EPS * (1.0 - self.dropout) ** 2
                else:
                    h = h * dropout_mask(h.shape, self.dropout, self.generator, h.device, h.dtype)
            h = self.acts[i](torch.addcmul(lbs[i], F.layer_norm(h, h.shape[-1:], eps=eps), lws[i]))
        return torch.baddbmm(bs[-1], h, ws[-1]).squeeze(-1)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, activation: str) -> nn.Sequential:
    """Linear -> LayerNorm -> activation per hidden layer, then a linear head."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.LayerNorm(h), acts[activation]()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def actor_net(cfg: SERLConfig, in_dim: int, action_dim: int) -> nn.Module | None:
    """The network TanhGaussianActor takes in place of its MLP for `cfg` (SimbaV2's, MENTOR's MoE), or None."""
    if cfg.network == "simbav2":
        return simba.SimbaV2Net(in_dim, 2 * action_dim, cfg.simba_hidden_dim, cfg.simba_blocks, cfg.simba_c_shift)
    if cfg.actor_moe_experts:
        return mentor.MoEActorNet(in_dim, 2 * action_dim, cfg.hidden_dims, cfg.activation, cfg.actor_moe_experts,
                                  cfg.actor_moe_topk)
    return None


class TanhGaussianActor(nn.Module):
    """A state-dependent Gaussian squashed by tanh into [-1, 1]."""

    def __init__(self, in_dim: int, action_dim: int, hidden_dims: tuple[int, ...], activation: str,
                 log_std_min: float, log_std_max: float, net: nn.Module | None = None):
        super().__init__()
        # `net`: another (B, in_dim) -> (B, 2 * action_dim) network (SimbaV2's, MENTOR's MoE) in place of the MLP.
        self.net = mlp(in_dim, hidden_dims, 2 * action_dim, activation) if net is None else net
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(feat).chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample(self, feat: torch.Tensor, generator: torch.Generator | None = None):
        """A reparameterised action and its log-probability (with the tanh change of variables)."""
        mean, log_std = self(feat)
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        u = mean + eps * log_std.exp()
        # log N(u; mean, std) - log|d tanh(u)/du|, the latter written stably as 2(log 2 - u - softplus(-2u)).
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where the device has one (CPU and CUDA: ~10% faster updates here)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def minibatches(batch: dict, utd: int) -> list[dict]:
    """Split a batch into `utd` strided minibatches: minibatch i takes rows i, i+utd, i+2*utd, ...

    Strided, not contiguous: MixedReplay puts the demo half first, so contiguous slices would
    give pure-demo and pure-online critic steps (and an actor step on online data only) instead
    of RLPD's symmetric half-and-half in every step.
    """
    def take(x):
        return {k: take(v) for k, v in x.items()} if isinstance(x, dict) else x[i::utd]
    out = []
    for i in range(utd):
        out.append({k: take(batch[k]) for k in ("obs", "next_obs", "action", "reward", "discount")})
    return out


# -- the agent -------------------------------------------------------------------------------

def sac_actor_step(agent, feat: torch.Tensor, q_of, batch: dict, step: int,
                   extra_loss=None) -> tuple[torch.Tensor, dict]:
    """SAC's actor and temperature step for an agent with actor, alpha, actor_opt, alpha_opt,
    target_entropy, update_gen and actor_updates (SERLAgent; DSRLAgent in noise space): the actor
    maximises q_of(its sample) - alpha log pi, the temperature tracks target_entropy. `extra_loss`: a
    callable, called after the actor's forward pass, whose 0-d tensor joins the actor loss (MENTOR's router term).
    Returns the actor's squashed sample (detached) and the metrics."""
    action, log_prob = agent.actor.sample(feat, agent.update_gen)
    actor_loss = (agent.alpha.detach() * log_prob - q_of(action)).mean()
    if extra_loss is not None:
        actor_loss = actor_loss + extra_loss()
    check_finite(actor_loss, "actor", step, batch)
    agent.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_opt.step()

    entropy = -log_prob.detach().mean()
    alpha_loss = agent.alpha * (entropy - agent.target_entropy)
    check_finite(alpha_loss, "temperature", step, batch)
    agent.alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    agent.alpha_opt.step()
    agent.actor_updates += 1
    return action.detach(), {"actor_loss": actor_loss.detach(), "entropy": entropy, "alpha_loss": alpha_loss.detach()}


def mean_metrics(steps) -> dict[str, torch.Tensor]:
    """Per-name means over several steps' metric dicts (name -> 0-d tensor), as one dict of 0-d tensors."""
    steps = list(steps)
    return {k: torch.stack([s[k] for s in steps]).mean() for k in steps[0]}


def redq_members(agent) -> torch.Tensor | None:
    """REDQ's cfg.critic_subsample target members, drawn from agent.update_gen; None for all of them."""
    cfg = agent.cfg
    members = torch.randperm(cfg.num_critics, device=agent.device, generator=agent.update_gen)[:cfg.critic_subsample]
    if cfg.critic_subsample >= cfg.num_critics:  # every member (the CPU setting's 2 of 2): the same min without
        members = None                           # copying the weights out; the draw above keeps the RNG stream
    return members


def redq_min(agent, feat: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """REDQ's target value (B,): the min over cfg.critic_subsample target members drawn from agent.update_gen."""
    return agent.critic_target(feat, action, redq_members(agent)).min(dim=0).values


def critic_step(agent, q: torch.Tensor, target: torch.Tensor, step: int, batch: dict,
                loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One TD step of agent.critic (its Q-values `q`, (E, B), with their graph) towards `target` (B,), then a
    Polyak step of agent.critic_target; for an agent with critic_opt, _online/_target parameter lists,
    cfg.tau and critic_updates (SERLAgent, DSRLAgent, EXPOAgent). `loss`: one already computed from the same
    graph (SimbaV2's cross-entropy) in place of the MSE; `q` and `target` are then the metrics' expected values."""
    if loss is None:
        loss = (q - target).pow(2).mean()  # mean over members and batch, as RLPD
    check_finite(loss, "critic", step, batch)
    agent.critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    agent.critic_opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(agent._target, agent._online, agent.cfg.tau)
    agent.critic_updates += 1
    return {"critic_loss": loss.detach(), "q": q.detach().mean(), "target_q": target.mean()}


class SERLAgent:
    """RLPD/SERL SAC agent; see the module docstring for the update schedule and observations."""

    name = "serl"

    def __init__(self, observation_space, action_space, cfg: SERLConfig | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg = cfg or SERLConfig()
        self.device = torch.device(device) if device is not None else default_device()
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError(f"SERLAgent expects a normalized Box(-1, 1) action space, got {action_space}")
        if cfg.critic_subsample > cfg.num_critics:
            raise ValueError(f"critic_subsample {cfg.critic_subsample} > num_critics {cfg.num_critics}")
        check_networks(cfg)
        drm.check_config(cfg)
        mentor.check_config(cfg)
        self.observation_space, self.action_space = observation_space, action_space
        self.action_dim = int(np.prod(action_space.shape))
        self.target_entropy = (-self.action_dim / 2.0 if cfg.target_entropy is None else float(cfg.target_entropy))
        self.base_target_entropy = self.target_entropy  # DrM raises target_entropy above it while the actor is dormant
        self.image_keys = image_keys_of(observation_space, cfg.image_keys)

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.frozen = None
            if cfg.frozen_encoder is not None and self.image_keys:
                self.frozen = FrozenEncoder(cfg.frozen_arch, cfg.frozen_encoder).to(self.device)
                self.frozen.check_fits(observation_space, self.image_keys)
            self.encoder = DictObsEncoder(
                observation_space, cfg.proprio_keys, self.image_keys, cfg.frame_stack, cfg.feature_dim,
                cfg.conv_strides, None if self.frozen is None else self.frozen.out_dim, cfg.aug_pad).to(self.device)
            d, a = self.encoder.out_dim, self.action_dim
            simba_v2 = cfg.network == "simbav2"
            self.actor = TanhGaussianActor(d, a, cfg.hidden_dims, cfg.activation, cfg.log_std_min, cfg.log_std_max,
                                           actor_net(cfg, d, a)).to(self.device)
            if simba_v2:
                self.critic = simba.SimbaV2Critic(d + a, cfg.num_critics, cfg.simba_hidden_dim, cfg.simba_blocks,
                                                  cfg.simba_atoms, cfg.simba_v_max, cfg.simba_c_shift).to(self.device)
            else:
                self.critic = EnsembleCritic(d + a, cfg.hidden_dims, cfg.num_critics, cfg.activation,
                                             cfg.critic_dropout).to(self.device)
            # DrM's value network, built last so that the other networks' initialization stays as it is.
            self.value = mlp(d, cfg.hidden_dims, 1, cfg.activation).to(self.device) if cfg.drm else None
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.drm = drm.DrM(cfg, self.actor) if cfg.drm else None
        # MENTOR's kept weights: the networks DrM perturbs (the target critic moves with the critic).
        self.mentor = (mentor.TopSet({"actor": self.actor, "critic": self.critic, "value": self.value},
                                     cfg.mentor_set_size) if cfg.mentor_perturb else None)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)

        # The encoder learns from the critic loss only (DrQ), so it shares the critic's optimizer.
        self.critic_opt = adam([*self.critic.parameters(), *self.encoder.parameters()], cfg.lr)
        self.actor_opt = adam(self.actor.parameters(), cfg.lr)
        self.alpha_opt = adam([self.log_alpha], cfg.lr)
        self.value_opt = None if self.value is None else adam(self.value.parameters(), cfg.lr)
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())
        # SimbaV2: weights back onto the unit sphere after every optimizer step (no-ops for the MLPs), and rewards
        # divided by a running return scale whose statistics the state_dict holds.
        simba.project_after_step(self.critic_opt, self.critic)
        simba.project_after_step(self.actor_opt, self.actor)
        self.reward_scaler = (simba.RewardScaler(cfg.gamma ** cfg.nstep, cfg.simba_v_max, self.device)
                              if cfg.network == "simbav2" else None)
        if cfg.compile:  # SimbaV2's critic: its log_probs, which forward() and the TD step both call
            name = "forward" if self.reward_scaler is None else "log_probs"
            for critic in (self.critic, self.critic_target):
                setattr(critic, name, torch.compile(getattr(critic, name), dynamic=False))

        # Separate streams, so acting (possibly elsewhere) never changes what the learner samples.
        self.update_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.act_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.critic.generator = self.critic_target.generator = self.update_gen
        self._encoded: tuple[dict, dict] | None = None  # (frames, their features) from the replay's last obs_fn
        self.critic_updates = torch.zeros((), dtype=torch.int64)
        self.actor_updates = torch.zeros((), dtype=torch.int64)

    # -- observations --------------------------------------------------------------------------
    def _with_features(self, obs: dict[str, torch.Tensor], augment: bool) -> dict[str, torch.Tensor]:
        """Add frozen-encoder `features/<cam>` where the obs carries only frames."""
        if self.frozen is None:
            return obs
        obs = dict(obs)
        for key in self.image_keys:
            if feature_key(key) not in obs:
                images = random_shift(obs[key], self.cfg.aug_pad, self.update_gen) if augment else obs[key]
                obs[feature_key(key)] = self.frozen(images, key.removeprefix("images/"))
        return obs

    @torch.no_grad()
    def precompute(self, obs: dict[str, np.ndarray], chunk: int = 256) -> dict[str, np.ndarray]:
        """Frozen-encoder features for frames (batched or one obs), for the replay to store; {} if none."""
        if self.frozen is None:
            return {}
        out = {}
        for key in self.image_keys:
            frames = np.asarray(obs[key])
            single = frames.ndim == 3
            frames = frames[None] if single else frames
            feats = [self.frozen(torch.as_tensor(frames[i:i + chunk], device=self.device),
                                 key.removeprefix("images/")).cpu()
                     for i in range(0, len(frames), chunk)]
            f = torch.cat(feats).numpy().astype(np.float32)
            out[feature_key(key)] = f[0] if single else f
        return out

    def replay_view(self):
        """With a frozen encoder, frame_stack 1 and cache_features: (space, obs_fn) for a replay that stores the proprio
        keys and the cached `features/<cam>` in place of frames (replay.MappedReplay); otherwise None.
        update() then never runs the encoder, and act() still takes frames."""
        if self.frozen is None or self.cfg.frame_stack != 1 or not self.cfg.cache_features:
            return None
        from gymnasium import spaces

        space = {k: self.observation_space.spaces[k] for k in self.cfg.proprio_keys}
        for key in self.image_keys:
            space[feature_key(key)] = spaces.Box(-np.inf, np.inf, (self.frozen.out_dim,), np.float32)

        def obs_fn(obs):
            features = self.precompute(obs)
            if np.asarray(obs[self.image_keys[0]]).ndim == 3:  # one step: act() on these frames reuses them
                self._encoded = ({k: obs[k] for k in self.image_keys}, features)
            return {**{k: obs[k] for k in self.cfg.proprio_keys}, **features}

        return spaces.Dict(space), obs_fn

    # -- acting --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Nothing to forget: the policy sees one observation."""

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """One action in [-1, 1]: a policy sample when exploring, tanh(mean) otherwise."""
        o = obs_to_torch(obs, self.device)
        frames, features = self._encoded or ({}, {})
        if frames and all(obs.get(k) is v for k, v in frames.items()):  # the replay just encoded these frames
            o.update({k: torch.as_tensor(v, device=self.device)[None] for k, v in features.items()})
        o = self._with_features(o, augment=False)
        feat = self.encoder(o)
        if explore:
            action, _ = self.actor.sample(feat, self.act_gen)
        else:
            action = torch.tanh(self.actor(feat)[0])
        return action[0].cpu().numpy().astype(np.float32)

    def observe_episode(self, return_: float) -> None:
        """A training episode's return (robolearn.train's loop calls this at each training episode's end, after its
        last update): with `mentor_perturb`, the current weights join the kept set if the return ranks among the
        best `mentor_set_size`; otherwise nothing."""
        if self.mentor is not None:
            self.mentor.offer(float(return_), {"actor": self.actor, "critic": self.critic, "value": self.value})

    # -- learning ------------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def update(self, batch: dict, step: int) -> dict[str, float]:
        """utd_ratio critic steps on equal slices of `batch`, then one actor and temperature step."""
        cfg, utd = self.cfg, self.cfg.utd_ratio
        n = batch["reward"].shape[0]
        if n % utd:
            raise ValueError(f"batch of {n} does not split into utd_ratio={utd} minibatches "
                             f"(sample batch_size * utd_ratio = {cfg.batch_size * utd})")
        check_batch_finite(batch, "critic", step)
        if self.drm is not None and self.drm.perturb_due(step):
            self._drm_perturb()
        if self.reward_scaler is not None:  # the whole batch's rewards, before any step uses the scale
            self.reward_scaler.observe(batch["reward"])
        # Frozen features once for the whole batch, shared by the utd minibatches.
        with torch.no_grad():
            obs = self._with_features(batch["obs"], augment=True)
            next_obs = self._with_features(batch["next_obs"], augment=True)
        steps = []
        for part in minibatches({**batch, "obs": obs, "next_obs": next_obs}, utd):
            feat, m = self._update_critic(part, step)
            steps.append(m)
        metrics = mean_metrics(steps)
        metrics.update(self._update_actor_and_alpha(feat.detach(), part, step))
        if self.reward_scaler is not None:  # q and target_q are in rewards / reward_scale
            metrics["reward_scale"] = self.reward_scaler.scale()
        out = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
        out["alpha"] = float(self.log_alpha.detach().exp())
        if self.drm is not None:  # its state after this update (beta from this batch), which the next one uses
            out.update(self.drm.metrics())
            out["drm/target_entropy"] = self.target_entropy
        if self.mentor is not None:
            out["mentor/kept"] = float(self.mentor.count())
            if self.mentor.count():
                out["mentor/lowest_kept_return"] = float(self.mentor.kept_returns().min())
        return out

    def _update_critic(self, b: dict, step: int):
        cfg = self.cfg
        with torch.no_grad():
            next_feat = self.encoder(b["next_obs"], augment=True, generator=self.update_gen)
            next_action, next_log_prob = self.actor.sample(next_feat, self.update_gen)
            if self.reward_scaler is None:
                next_q = redq_min(self, next_feat, next_action)
                if cfg.backup_entropy:
                    next_q = next_q - self.alpha * next_log_prob
                if self.value is not None:  # DrM's exploitation: lambda V(s') + (1 - lambda) Q
                    next_q = drm.exploit_backup(next_q, self.value(next_feat).squeeze(-1), self.drm.lam())
                target = b["reward"] + b["discount"] * next_q
            else:  # SimbaV2: REDQ's drawn members, the distribution of the lowest, shifted and projected
                support = self.critic.support
                target_probs = simba.categorical_target(
                    self.critic_target.log_probs(next_feat, next_action, redq_members(self)), support,
                    b["reward"] / self.reward_scaler.scale(), b["discount"],
                    -self.alpha * next_log_prob if cfg.backup_entropy else None)
                target = (target_probs * support).sum(-1)
        feat = self.encoder(b["obs"], augment=True, generator=self.update_gen)
        if self.reward_scaler is None:
            q = self.critic(feat, b["action"])
            metrics = critic_step(self, q, target, step, b)
            if self.value is not None:
                metrics["drm/value_loss"] = self._update_value(feat.detach(), q.detach(), step, b)
            return feat, metrics
        log_probs = self.critic.log_probs(feat, b["action"])
        return feat, critic_step(self, simba.expected_value(log_probs, support), target, step, b,
                                 loss=simba.categorical_loss(log_probs, target_probs))

    def _update_actor_and_alpha(self, feat: torch.Tensor, b: dict, step: int) -> dict[str, torch.Tensor]:
        def q_of(a):  # the ensemble mean, as RLPD
            return self.critic(feat, a, detach=True).mean(dim=0)

        moe, weight = self.cfg.actor_moe_experts > 0, self.cfg.actor_moe_router_entropy
        extra = (lambda: weight * self.actor.net.router_entropy) if moe and weight > 0 else None  # noqa: E731
        if self.drm is None:
            metrics = sac_actor_step(self, feat, q_of, b, step, extra)[1]
        else:
            # DrM's exploration, SAC's way: at least the entropy of its noise std sigma(beta), squashed; then beta.
            self.target_entropy = max(self.base_target_entropy,
                                      drm.tanh_gaussian_entropy(self._drm_stddev(), self.action_dim))
            with self.drm.probe:
                _, metrics = sac_actor_step(self, feat, q_of, b, step, extra)
            self.drm.observe(step)
        if moe:
            metrics["mentor/router_entropy"] = self.actor.net.router_entropy.detach()
        return metrics

    def _drm_stddev(self) -> float:
        return drm.dormant_stddev(float(self.drm.beta), self.cfg.drm_target_beta)

    def _update_value(self, feat: torch.Tensor, q: torch.Tensor, step: int, b: dict) -> torch.Tensor:
        """DrM's value step: V(s) towards the expectile of the min over REDQ's drawn members of the critic's
        Q(s, a) (`q`, (E, B), before this critic step) at the batch's actions."""
        members = redq_members(self)
        q = (q if members is None else q[members]).min(dim=0).values
        loss = drm.expectile_loss(self.value(feat).squeeze(-1), q, self.cfg.drm_expectile)
        check_finite(loss, "value", step, b)
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.value_opt.step()
        return loss.detach()

    def _drm_perturb(self) -> None:
        """DrM's shrink and perturb of actor, critic (its target towards the same fresh critic) and value network,
        fresh weights drawn from the update stream; the moments of their optimizers (the critic's holds the
        encoder's) start over, as the authors'. The temperature is left alone. With `mentor_perturb` and an
        episode kept, MENTOR's: towards a draw from the kept weights' Gaussian in place of a fresh init."""
        cfg, d, a = self.cfg, self.encoder.out_dim, self.action_dim
        optimizers = (self.actor_opt, self.critic_opt, self.value_opt)
        if self.mentor is not None and self.mentor.count():
            alpha = self.drm.perturb_factor()
            targets = {name: self.mentor.sample(name, self.update_gen) for name in ("actor", "critic", "value")}
            for net, name in ((self.actor, "actor"), (self.critic, "critic"), (self.critic_target, "critic"),
                              (self.value, "value")):
                mentor.mix_(net, targets[name], alpha)
            for opt in optimizers:
                opt.state.clear()
            return
        with drm.fresh_init(self.update_gen):
            actor = TanhGaussianActor(d, a, cfg.hidden_dims, cfg.activation, cfg.log_std_min, cfg.log_std_max,
                                      actor_net(cfg, d, a))
            critic = EnsembleCritic(d + a, cfg.hidden_dims, cfg.num_critics, cfg.activation, cfg.critic_dropout)
            value = mlp(d, cfg.hidden_dims, 1, cfg.activation)
        pairs = [(self.actor, actor), (self.critic, critic), (self.critic_target, critic), (self.value, value)]
        drm.perturb_(pairs, self.drm.perturb_factor(), optimizers)

    # -- checkpoints ---------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        out = {"encoder": self.encoder, "actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}
        return out if self.value is None else {**out, "value": self.value}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"critic": self.critic_opt, "actor": self.actor_opt, "alpha": self.alpha_opt}
        return out if self.value_opt is None else {**out, "value": self.value_opt}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"log_alpha": self.log_alpha, "counters/critic_updates": self.critic_updates,
               "counters/actor_updates": self.actor_updates}
        if self.drm is not None:
            out.update(self.drm.tensors())
        if self.mentor is not None:
            out.update(self.mentor.tensors())
        return out if self.reward_scaler is None else {**out, **self.reward_scaler.tensors()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (safetensors-ready). The frozen encoder's weights are not included:
        the config names their file."""
        return training_state_to_tensors(self._modules(), self._optimizers(),
                                         {"update": self.update_gen, "act": self.act_gen}, self._tensors())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_training_state(state, self._modules(), self._optimizers(),
                            {"update": self.update_gen, "act": self.act_gen}, self._tensors(), what="SERL")

    def config_dict(self) -> dict:
        """JSON-able: the config, the spaces the networks were built for, and optimizer settings."""
        return agent_config(self, self._optimizers(), target_entropy=self.base_target_entropy)



def loop_params(cfg: SERLConfig, env) -> dict:
    """All of utd_ratio's critic steps in one update call per env step, on one batch."""
    return {"batch": cfg.batch_size * cfg.utd_ratio, "every": 1, "nstep": cfg.nstep, "gamma": cfg.gamma,
            "frame_stack": cfg.frame_stack, "seed_steps": 0}


AGENT = AgentSpec("serl", SERLAgent, SERLConfig, loop_params,
                  seed_steps_without_demos=1_000)  # without demos the critic first needs some coverage

# -- reward classifier -----------------------------------------------------------------------

@dataclass
class ClassifierConfig:
    """A success detector on camera frames (and optionally proprio), as SERL trains from ~200 frames."""

    image_keys: tuple[str, ...] | None = None  # None: every images/<cam>
    proprio_keys: tuple[str, ...] = ()
    feature_dim: int = 50
    hidden_dim: int = 256
    conv_strides: tuple[int, ...] = (2, 2, 2, 1)  # cheap: a detector needs little spatial detail
    aug_pad: int = 4
    lr: float = 3e-4
    batch_size: int = 64  # half success, half failure frames per step
    threshold: float = 0.5
    frozen_encoder: str | None = None
    frozen_arch: str = "resnet10"
    seed: int = 0


def _stack_frames(frames) -> dict[str, np.ndarray]:
    """A list of obs dicts, or a dict of stacked arrays, as a dict of (N, ...) arrays."""
    if isinstance(frames, dict):
        return {k: np.asarray(v) for k, v in frames.items()}
    frames = list(frames)
    if not frames:
        raise ValueError("no frames given")
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}


class RewardClassifier(nn.Module):
    """Binary success classifier; `reward(obs)` = 1 when P(success) > threshold (SERL's reward)."""

    def __init__(self, observation_space, cfg: ClassifierConfig | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ClassifierConfig()
        self.device = torch.device(device) if device is not None else default_device()
        self.image_keys = image_keys_of(observation_space, cfg.image_keys)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.frozen = None
            if cfg.frozen_encoder is not None:
                if cfg.frozen_arch == "drq_state":  # its saved copy would lose the heads (save_classifier)
                    raise ValueError("reward classifier: frozen_arch 'drq_state' is for SERL's policy; "
                                     "use resnet10, resnet18 or drq")
                self.frozen = FrozenEncoder(cfg.frozen_arch, cfg.frozen_encoder)
            self.encoder = DictObsEncoder(observation_space, cfg.proprio_keys, self.image_keys, 1, cfg.feature_dim,
                                          cfg.conv_strides, None if self.frozen is None else self.frozen.out_dim,
                                          cfg.aug_pad)
            self.head = mlp(self.encoder.out_dim, (cfg.hidden_dim,), 1, "relu")
        self.to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.opt = torch.optim.Adam([*self.encoder.parameters(), *self.head.parameters()], lr=cfg.lr)

    def logits(self, obs: dict[str, torch.Tensor], augment: bool = False) -> torch.Tensor:
        if self.frozen is not None:
            obs = dict(obs)
            for key in self.image_keys:
                images = random_shift(obs[key], self.cfg.aug_pad, self.gen) if augment else obs[key]
                obs[feature_key(key)] = self.frozen(images, key.removeprefix("images/"))
        return self.head(self.encoder(obs, augment=augment, generator=self.gen)).squeeze(-1)

    def train_classifier(self, frames_success, frames_failure, epochs: int = 20) -> dict[str, float]:
        """BCE on balanced minibatches with random-shift augmentation; returns final loss and accuracy."""
        pos, neg = _stack_frames(frames_success), _stack_frames(frames_failure)
        keys = (*self.image_keys, *self.cfg.proprio_keys)
        pos = {k: torch.as_tensor(pos[k], device=self.device) for k in keys}
        neg = {k: torch.as_tensor(neg[k], device=self.device) for k in keys}
        n_pos, n_neg = len(pos[keys[0]]), len(neg[keys[0]])
        half = self.cfg.batch_size // 2
        steps = epochs * max(1, math.ceil(max(n_pos, n_neg) / half))
        labels = torch.cat([torch.ones(half), torch.zeros(half)]).to(self.device)
        self.train()
        for it in range(steps):
            ip = torch.randint(0, n_pos, (half,), device=self.device, generator=self.gen)
            ineg = torch.randint(0, n_neg, (half,), device=self.device, generator=self.gen)
            batch = {k: torch.cat([pos[k][ip], neg[k][ineg]]) for k in keys}
            loss = F.binary_cross_entropy_with_logits(self.logits(batch, augment=True), labels)
            check_finite(loss, "classifier", it, {"obs": batch})
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.eval()
        p_pos = self._predict_tensors(pos)
        p_neg = self._predict_tensors(neg)
        acc = ((p_pos > self.cfg.threshold).sum() + (p_neg <= self.cfg.threshold).sum()) / (n_pos + n_neg)
        return {"loss": loss.item(), "accuracy": acc.item(), "steps": steps}

    @torch.no_grad()
    def _predict_tensors(self, obs: dict[str, torch.Tensor], chunk: int = 256) -> torch.Tensor:
        n = len(next(iter(obs.values())))
        return torch.cat([torch.sigmoid(self.logits({k: v[i:i + chunk] for k, v in obs.items()}))
                          for i in range(0, n, chunk)])

    def predict(self, obs: dict[str, np.ndarray]) -> float | np.ndarray:
        """P(success) for one obs (a float) or for a batch of obs stacked along axis 0 (an array)."""
        keys = (*self.image_keys, *self.cfg.proprio_keys)
        single = np.asarray(obs[self.image_keys[0] if self.image_keys else keys[0]]).ndim == (
            3 if self.image_keys else 1)
        t = {k: torch.as_tensor(np.asarray(obs[k]), device=self.device) for k in keys}
        if single:
            t = {k: v.unsqueeze(0) for k, v in t.items()}
        p = self._predict_tensors(t).cpu().numpy()
        return float(p[0]) if single else p

    def reward(self, obs: dict[str, np.ndarray]) -> float:
        """SERL's learned sparse reward: 1.0 when the classifier says success."""
        return float(self.predict(obs) > self.cfg.threshold)


# -- reward classifier files -----------------------------------------------------------------
# A folder: weights.safetensors (every tensor but a frozen encoder's), frozen_encoder.safetensors (its
# weights, when the config has one, so the folder is all a robot needs) and config.json (the config, the
# observation keys it reads with their shapes and dtypes, and each weights file's sha256). Each file is
# written through a temporary file and a rename, config.json last: a crash between files leaves a
# checksum mismatch that load_classifier names, never a silently mixed classifier.

CLASSIFIER_FORMAT = "robolearn-reward-classifier/1"
CLASSIFIER_WEIGHTS, CLASSIFIER_FROZEN, CLASSIFIER_CONFIG = "weights.safetensors", "frozen_encoder.safetensors", "config.json"


def classifier_spec(clf: RewardClassifier, observation_space) -> dict[str, dict]:
    """{key: {"shape": [...], "dtype": "uint8"}} of the observation keys `clf` reads, from `observation_space`."""
    spaces = observation_space.spaces
    keys = (*clf.image_keys, *clf.cfg.proprio_keys)
    missing = [k for k in keys if k not in spaces]
    if missing:
        raise ValueError(f"the classifier reads {missing}, which the observation space lacks (keys: {list(spaces)})")
    return {k: {"shape": [int(d) for d in spaces[k].shape], "dtype": np.dtype(spaces[k].dtype).name} for k in keys}


def save_classifier(clf: RewardClassifier, path, observation_space=None, metrics: dict | None = None):
    """Write `clf` to the folder `path` (created; its files replaced); returns the folder's Path.

    `observation_space`: the one `clf` was built for (default: clf.observation_space, which
    load_classifier sets). `metrics` (JSON-able, e.g. accuracy) go into config.json for the record."""
    import hashlib
    from dataclasses import asdict, replace
    from pathlib import Path

    from safetensors.torch import save

    from robolearn.checkpoint import write_bytes, write_json

    space = observation_space if observation_space is not None else getattr(clf, "observation_space", None)
    if space is None:
        raise ValueError("save_classifier: give the observation space the classifier was built for")
    spec = classifier_spec(clf, space)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(clf.cfg, image_keys=tuple(clf.image_keys))  # resolved: the cameras it was trained on
    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items() if not k.startswith("frozen.")}
    blobs = {CLASSIFIER_WEIGHTS: save(tensors)}
    if clf.frozen is not None:
        blobs[CLASSIFIER_FROZEN] = save({k: v.detach().cpu().contiguous() for k, v in clf.frozen.net.state_dict().items()})
        cfg = replace(cfg, frozen_encoder=CLASSIFIER_FROZEN)  # relative to the folder
    for name, data in blobs.items():
        write_bytes(out / name, data)
    write_json(out / CLASSIFIER_CONFIG, {
        "format": CLASSIFIER_FORMAT, "config": asdict(cfg), "observation": spec, "metrics": metrics or {},
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}})
    return out


def space_from_spec(spec, where: str):
    """The Dict space a saved observation spec describes; ValueError naming the field when malformed."""
    from gymnasium import spaces

    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: field observation must be a non-empty object of key -> shape, dtype")
    out = {}
    for key, s in spec.items():
        try:
            shape, dtype = tuple(int(d) for d in s["shape"]), np.dtype(s["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: field observation.{key} is malformed ({type(err).__name__}: {err})") from None
        low, high = (0, 255) if dtype == np.uint8 else (-np.inf, np.inf)
        out[key] = spaces.Box(low, high, shape, dtype)
    return spaces.Dict(out)


def load_classifier(path, observation_space=None, device: torch.device | str | None = None) -> RewardClassifier:
    """The classifier save_classifier wrote to `path`, in eval mode; with `observation_space`, it must hold every
    key the classifier reads with the saved shape and dtype. ValueError naming the file and field otherwise."""
    import hashlib
    import json
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import load

    folder = Path(path)
    cfg_file = folder / CLASSIFIER_CONFIG
    if not folder.is_dir():
        raise ValueError(f"reward classifier {folder}: no such folder (write one with `robolearn classifier train`)")
    try:
        meta = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{cfg_file}: missing; {folder} is not a reward classifier folder") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{cfg_file}: damaged ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{cfg_file}: field format is {got!r}, expected {CLASSIFIER_FORMAT!r}")
    raw, known = meta.get("config"), {f.name for f in fields(ClassifierConfig)}
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: field config must be an object of ClassifierConfig fields")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{cfg_file}: field config.{unknown[0]} is not a ClassifierConfig field "
                         "(written by a newer robolearn?)")
    cfg = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    space = space_from_spec(meta.get("observation"), str(cfg_file))
    if observation_space is not None:
        theirs = observation_space.spaces
        for key, s in space.spaces.items():
            if key not in theirs:
                raise ValueError(f"{cfg_file}: observation key {key!r} the classifier reads is not in the "
                                 f"observation space (keys: {sorted(theirs)})")
            for attr, a, b in (("shape", s.shape, tuple(theirs[key].shape)),
                               ("dtype", s.dtype, np.dtype(theirs[key].dtype))):
                if a != b:
                    raise ValueError(f"{cfg_file}: observation {key!r} has {attr} {a} in the classifier but {b} "
                                     "in the observation space")
    names = [CLASSIFIER_WEIGHTS]
    if cfg.frozen_encoder is not None:
        if cfg.frozen_encoder != CLASSIFIER_FROZEN:
            raise ValueError(f"{cfg_file}: field config.frozen_encoder is {cfg.frozen_encoder!r}, expected "
                             f"{CLASSIFIER_FROZEN!r} (the folder carries its frozen encoder)")
        names.append(CLASSIFIER_FROZEN)
        cfg = replace(cfg, frozen_encoder=str(folder / CLASSIFIER_FROZEN))
    sums = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    tensors = {}
    for name in names:
        f = folder / name
        try:
            data = f.read_bytes()
        except OSError as err:
            raise ValueError(f"{f}: missing or unreadable ({err.strerror})") from None
        if hashlib.sha256(data).hexdigest() != sums.get(name):
            raise ValueError(f"{f}: fails its checksum (field sha256.{name} of {CLASSIFIER_CONFIG}): damaged or "
                             "changed after it was saved")
        if name == CLASSIFIER_WEIGHTS:
            try:
                tensors = load(data)
            except Exception as err:  # safetensors' own error types
                raise ValueError(f"{f}: damaged ({type(err).__name__}: {err})") from None
    try:
        clf = RewardClassifier(space, cfg, device)
    except ValueError as err:
        raise ValueError(f"{cfg_file}: {err}") from None
    expected = {k: v for k, v in clf.state_dict().items() if not k.startswith("frozen.")}
    bad = sorted(set(expected) ^ set(tensors)) or [k for k in expected if tensors[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{folder / CLASSIFIER_WEIGHTS}: tensor {bad[0]!r} does not fit the classifier "
                         f"{CLASSIFIER_CONFIG} describes")
    clf.load_state_dict(tensors, strict=False)
    clf.eval()
    clf.observation_space = space
    return clf
