"""SimbaV2 networks for SERL: hyperspherical normalization and a distributional critic with reward scaling.

Lee et al. 2025, "Hyperspherical Normalization for Scalable Deep Reinforcement Learning" (arXiv 2502.15280).
Every feature and every weight vector lives on a unit hypersphere, so neither can grow without bound under
TD learning, and the critic predicts a categorical distribution over a fixed support of returns, with
rewards divided by a running estimate of the return's scale so that the support fits. One network, per
member of an ensemble (E members as stacked (E, in, out) weights, as serl.EnsembleCritic):

    input       x~ = l2([x, c_shift])                        shift: l2 alone would drop |x|
    embedding   h  = l2(s_e * (x~ W_e))                      W_e's columns of norm 1, s_e a learnable scaler
    block       u  = relu(s_u * (h W_u)) + eps               W_u: H -> 4H
                v  = l2(u W_d)                               W_d: 4H -> H
                h  = l2(h + a * (v - h))                     LERP with a learnable rate a, back onto the sphere
    head        y  = s_o * (h W_o) W_p + b                   to atoms (critic) or to the action's mean and log-std

A learnable scaler (s, a) is a parameter p that starts at `scale` and is used as p * init / scale: Adam
moves every parameter by ~lr, so `scale` sets how fast it learns relative to its value `init`. Scalers
start as in the paper: sqrt(2 / H) for s_e and s_u (/ sqrt(4) for the 4H-wide s_u, as init and scale
alike), 1 for s_o, and a starts at 1 / (blocks + 1) with scale 1 / sqrt(H).

Weights are not normalized in the forward pass: `project_after_step` registers a hook that puts every
weight column back on the unit sphere after each step of the optimizer that trains them (the paper's
projection), so the target network tracks projected weights through the Polyak step that follows.

The critic's backup (`categorical_target`) takes, per row, the member with the lowest expected value among
those drawn (REDQ's min, SimbaV2's clipped double Q), moves its atoms to r/scale + discount * atom, projects
them back onto the support (C51's two-hot split) and trains by cross-entropy (`categorical_loss`).
`RewardScaler` keeps the scale; see its docstring for how it departs from the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8
EXPANSION = 4  # a block's inner width over its outer width (paper)


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x scaled to unit L2 norm along `dim` (a zero vector stays zero)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(EPS)


def hyper_weight(num: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """(num, fan_in, fan_out) weights, orthogonal per member, each output unit's weight vector of norm 1."""
    w = torch.empty(num, fan_out, fan_in)
    for member in w:
        nn.init.orthogonal_(member)
    return nn.Parameter(l2_normalize(w.transpose(1, 2).contiguous(), dim=-2))


def scaler(num: int, dim: int, scale: float) -> nn.Parameter:
    """A learnable scaler's parameter, (num, 1, dim), at `scale` (the forward pass multiplies by init / scale)."""
    return nn.Parameter(torch.full((num, 1, dim), float(scale)))


class HyperReLU(nn.Module):
    """A block's activation, relu(x) + eps (no all-zero vector reaches the l2 normalization after it); a module so
    that robolearn.agents.dormant's hooks read its (E, B, 4H) output, per member (`member_dim`)."""

    dormant_probe, member_dim = True, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) + EPS


class HypersphericalEnsemble(nn.Module):
    """E SimbaV2 networks (B, in_dim) -> (E, B, out_dim) as batched matmuls; see the module docstring."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, blocks: int, num: int, c_shift: float):
        super().__init__()
        h, x = hidden_dim, EXPANSION * hidden_dim
        self.num, self.c_shift = num, float(c_shift)
        self.alpha_gain = math.sqrt(h) / (blocks + 1)  # init 1 / (blocks + 1) over scale 1 / sqrt(H)
        self.embed_w, self.embed_s = hyper_weight(num, in_dim + 1, h), scaler(num, h, math.sqrt(2.0 / h))
        self.up_w = nn.ParameterList(hyper_weight(num, h, x) for _ in range(blocks))
        self.up_s = nn.ParameterList(scaler(num, x, math.sqrt(2.0 / h) / math.sqrt(EXPANSION)) for _ in range(blocks))
        self.down_w = nn.ParameterList(hyper_weight(num, x, h) for _ in range(blocks))
        self.alpha = nn.ParameterList(scaler(num, h, 1.0 / math.sqrt(h)) for _ in range(blocks))
        self.acts = nn.ModuleList(HyperReLU() for _ in range(blocks))
        self.head_w, self.head_s = hyper_weight(num, h, h), scaler(num, h, 1.0)
        self.out_w = hyper_weight(num, h, out_dim)
        self.out_b = nn.Parameter(torch.zeros(num, 1, out_dim))

    def hyperspherical_weights(self) -> list[nn.Parameter]:
        """The weights kept on the unit sphere (column-wise) by project_weights_."""
        return [self.embed_w, *self.up_w, *self.down_w, self.head_w, self.out_w]

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None, detach: bool = False) -> torch.Tensor:
        """(E', B, out_dim) for the members selected (all by default); `detach` cuts the parameters' grads."""
        def take(p):
            p = p if members is None else p[members]
            return p.detach() if detach else p

        x = l2_normalize(torch.cat([x, x.new_full((*x.shape[:-1], 1), self.c_shift)], dim=-1))
        # (B, in) @ (E, in, H) broadcasts to (E, B, H): one call covers every member.
        h = l2_normalize(torch.matmul(x, take(self.embed_w)) * take(self.embed_s))
        for up_w, up_s, down_w, alpha, act in zip(self.up_w, self.up_s, self.down_w, self.alpha, self.acts):
            v = l2_normalize(torch.bmm(act(torch.bmm(h, take(up_w)) * take(up_s)), take(down_w)))
            h = l2_normalize(torch.lerp(h, v, take(alpha) * self.alpha_gain))
        return torch.baddbmm(take(self.out_b), torch.bmm(h, take(self.head_w)) * take(self.head_s), take(self.out_w))


class SimbaV2Net(nn.Module):
    """One SimbaV2 network, (B, in_dim) -> (B, out_dim): the actor's (serl.TanhGaussianActor's `net`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, blocks: int, c_shift: float):
        super().__init__()
        self.net = HypersphericalEnsemble(in_dim, out_dim, hidden_dim, blocks, 1, c_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


class SimbaV2Critic(nn.Module):
    """E distributional Q-networks over `atoms` returns evenly spaced in [-v_max, v_max]. forward() gives the
    expected values (E', B), as serl.EnsembleCritic's Q-values; log_probs() the distributions (E', B, atoms)."""

    def __init__(self, in_dim: int, num: int, hidden_dim: int, blocks: int, atoms: int, v_max: float,
                 c_shift: float):
        super().__init__()
        self.num = num
        self.net = HypersphericalEnsemble(in_dim, atoms, hidden_dim, blocks, num, c_shift)
        # Recomputed from the config, not saved: a checkpoint holds parameters only.
        self.register_buffer("support", torch.linspace(-v_max, v_max, atoms), persistent=False)
        self.generator: torch.Generator | None = None  # set by SERLAgent as for EnsembleCritic; nothing draws here

    def log_probs(self, obs_feat: torch.Tensor, action: torch.Tensor, members: torch.Tensor | None = None,
                  detach: bool = False) -> torch.Tensor:
        return F.log_softmax(self.net(torch.cat([obs_feat, action], dim=-1), members, detach), dim=-1)

    def forward(self, obs_feat: torch.Tensor, action: torch.Tensor, members: torch.Tensor | None = None,
                detach: bool = False) -> torch.Tensor:
        return expected_value(self.log_probs(obs_feat, action, members, detach), self.support)


# -- weight projection ---------------------------------------------------------------------------

def hyperspherical_weights(module: nn.Module) -> list[nn.Parameter]:
    """Every hyperspherical weight of the SimbaV2 networks inside `module` (none for other networks)."""
    return [w for m in module.modules() if isinstance(m, HypersphericalEnsemble) for w in m.hyperspherical_weights()]


@torch.no_grad()
def project_weights_(weights: list[torch.Tensor]) -> None:
    """Each (.., fan_in, fan_out) weight's columns back to unit norm, in place."""
    for w in weights:
        w.div_(torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp_min(EPS))


def project_after_step(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """After every step of `optimizer`, project `module`'s hyperspherical weights back onto the unit sphere.
    A hook on the optimizer, so every step is covered whoever calls it (serl.critic_step, serl.sac_actor_step);
    it is re-registered whenever an agent is built, and a checkpoint holds the projected weights."""
    weights = hyperspherical_weights(module)
    if weights:
        optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: project_weights_(weights))


# -- the distributional backup -------------------------------------------------------------------

def expected_value(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The mean of categorical distributions (..., atoms) over `support`."""
    return (log_probs.exp() * support).sum(-1)


def project(probs: torch.Tensor, atoms: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """C51's projection: the mass `probs` (B, A) at `atoms` (B, A) split between the two nearest points of the evenly
    spaced `support` (A,) in proportion to nearness (atoms beyond the ends go to the ends): the mean is kept."""
    n = support.numel()
    pos = (atoms.clamp(support[0], support[-1]) - support[0]) / (support[-1] - support[0]) * (n - 1)
    low = pos.floor().clamp(max=n - 2)
    upper = pos - low  # in [0, 1]; 1 at the top end, whose mass all goes to the last atom
    out = torch.zeros_like(probs)
    out.scatter_add_(-1, low.long(), probs * (1.0 - upper))
    out.scatter_add_(-1, low.long() + 1, probs * upper)
    return out


def categorical_target(log_probs: torch.Tensor, support: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor,
                       shift: torch.Tensor | None = None) -> torch.Tensor:
    """The TD target distributions (B, A): per row the member of `log_probs` (k, B, A) with the lowest expected
    value, its atoms moved to reward + discount * (atom + shift) and projected onto `support`."""
    k, b, a = log_probs.shape
    worst = expected_value(log_probs, support).argmin(dim=0)  # (B,)
    probs = log_probs.exp().gather(0, worst.view(1, b, 1).expand(1, b, a))[0]
    atoms = support + (0.0 if shift is None else shift[:, None])
    return project(probs, reward[:, None] + discount[:, None] * atoms, support)


def categorical_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted log-probabilities (E, B, A) against the target distributions (B, A), averaged
    over members and batch (RLPD's mean over members, as the MSE it replaces)."""
    return -(target * log_probs).sum(-1).mean()


# -- reward scaling ------------------------------------------------------------------------------

class RewardScaler:
    """Divides rewards by a running estimate of the discounted return's scale, so that returns fit in the critic's
    support [-v_max, v_max]: scale = max(sqrt(Var[G] + eps), max|G| / v_max), as the paper's.

    The paper follows G_t = gamma * G_{t-1} + r_t along the env's reward stream. A SERL agent sees only the
    learner's batches (n-step rewards R with bootstrap discount d = gamma^n, rows from anywhere in the replay),
    so the statistics come from those: running count, mean and sum of squared deviations of R (Chan et al.'s
    parallel update, one batch at a time) and max |R|, which bound the return of a stream of such rewards:
    Var[G] ~ Var[R] / (1 - d^2) (uncorrelated rewards) and max|G| <= max|R| / (1 - d) (an endless episode;
    an episode of T steps reaches 1 - gamma^T of it). The max only grows, so the scale never shrinks once
    rewards are seen. All four statistics are tensors that the agent's state_dict holds."""

    def __init__(self, discount: float, v_max: float, device: torch.device | str = "cpu"):
        if not 0.0 <= discount < 1.0:
            raise ValueError(f"reward scaling needs a discount in [0, 1), got {discount!r}")
        self.discount, self.v_max = float(discount), float(v_max)
        # float64: a long run's count and sums stay exact enough.
        self.count, self.mean, self.m2, self.abs_max = (torch.zeros((), dtype=torch.float64, device=device)
                                                        for _ in range(4))

    def tensors(self, prefix: str = "reward_scaler/") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": getattr(self, k) for k in ("count", "mean", "m2", "abs_max")}

    @torch.no_grad()
    def observe(self, reward: torch.Tensor) -> None:
        """Fold a batch of rewards into the statistics (in place, so the tensors() stay the agent's)."""
        r = reward.detach().to(self.mean.dtype).flatten()
        n = r.numel()
        if n == 0:
            return
        batch_mean = r.mean()
        delta, total = batch_mean - self.mean, self.count + n
        self.m2.add_((r - batch_mean).pow(2).sum() + delta.pow(2) * self.count * n / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)
        torch.maximum(self.abs_max, r.abs().max(), out=self.abs_max)

    def scale(self) -> torch.Tensor:
        """The divisor for rewards (0-d, float32); at least sqrt(eps), and 1e-4 before any reward is seen."""
        var_g = self.m2 / self.count.clamp_min(1.0) / (1.0 - self.discount ** 2)
        g_max = self.abs_max / (1.0 - self.discount)
        return torch.maximum((var_g + EPS).sqrt(), g_max / self.v_max).float()
