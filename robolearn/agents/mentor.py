"""MENTOR (Huang et al. 2025, "MENTOR: Mixture-of-Experts Network with Task-Oriented Perturbation for Visual
Reinforcement Learning", arXiv 2410.14972) for SERL, on top of DrM (robolearn.agents.drm); docs/agent_variants.md,
"MENTOR". Two parts, each a SERLConfig option:

1. A mixture-of-experts actor (`actor_moe_experts` K > 0, `actor_moe_topk` k). The actor's first hidden layer
   (Linear -> LayerNorm -> activation, SERL's) feeds a router, a linear layer to K logits, and K experts, each an
   MLP of SERL's remaining hidden layers (`hidden_dims[1:]`; one layer of `hidden_dims[0]` when there is only
   one). Per sample the router's softmax p is kept at its k largest entries and renormalized to sum to 1 (the
   gates g); the output is sum_e g_e expert_e(h), then SERL's linear head. As the authors' code, every expert runs
   on every sample (stacked weights, one batched matmul per layer) and the gates zero the others' share. Their
   auxiliary loss is the variance of the experts' top-k counts (no gradient: counts of indices) plus the router's
   mean per-sample entropy; the entropy, the term that trains, is added to the actor loss with weight
   `actor_moe_router_entropy` (theirs: 1).
2. Task-oriented perturbation (`mentor_perturb`, with `drm`). The agent keeps the linear-layer weights of its
   actor, critic and value network after each of the `mentor_set_size` (10, the authors') best training episodes
   so far, ranked by episode return (`observe_episode`, which robolearn.train's loop calls at each training
   episode's end). At a DrM perturbation the fresh initialization phi is replaced by a draw from the kept weights'
   per-parameter Gaussian: phi ~ N(mean, max(std, 1e-7)) over the kept set (std with Bessel's correction, as
   theirs), and theta <- alpha theta + (1 - alpha) phi with DrM's alpha = clip(1 - k beta, min, max). The critic
   and its target move towards the same phi (as DrM here). Before any episode is kept, DrM's fresh init is used.

The kept set is fixed-size tensors (the slots filled, their returns and one (size, P) weight matrix per network;
finite, as robolearn.train's checkpoints require), in the agent's state_dict, so checkpoints round-trip and --resume continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robolearn.agents.drm import linear_parameter_names

STD_MIN = 1e-7  # the authors' floor on the kept weights' std


def check_config(cfg) -> None:
    """The MENTOR fields of a SERLConfig; a one-line ValueError names the first bad one."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    k, topk = cfg.actor_moe_experts, cfg.actor_moe_topk
    if not (integer(k) and (k == 0 or k >= 2)):
        raise ValueError(f"actor_moe_experts must be 0 (off) or an integer of at least 2, got {k!r}")
    if not (integer(topk) and topk >= 1):
        raise ValueError(f"actor_moe_topk must be a positive integer, got {topk!r}")
    if k and topk > k:
        raise ValueError(f"actor_moe_topk ({topk}) must not exceed actor_moe_experts ({k})")
    w = cfg.actor_moe_router_entropy
    if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
        raise ValueError(f"actor_moe_router_entropy must be zero or more, got {w!r}")
    if not isinstance(cfg.mentor_perturb, bool):
        raise ValueError(f"mentor_perturb must be true or false, got {cfg.mentor_perturb!r}")
    if not (integer(cfg.mentor_set_size) and cfg.mentor_set_size >= 1):
        raise ValueError(f"mentor_set_size must be a positive integer, got {cfg.mentor_set_size!r}")
    if cfg.mentor_perturb and not cfg.drm:
        raise ValueError("mentor_perturb requires drm=true (it changes the target of DrM's perturbation)")
    if k and cfg.network != "mlp":
        raise ValueError(f"actor_moe_experts must be 0 with network={cfg.network} (the MoE replaces the mlp actor)")


# -- the mixture-of-experts actor ------------------------------------------------------------

class Activation(nn.Module):
    """An activation as a module, so robolearn.agents.dormant's probe reads it; `member_dim` 0 for the experts'
    stacked (K, B, H) outputs (each expert's layer normalized on its own), None for a (B, H) layer."""

    dormant_probe = True

    def __init__(self, name: str, member_dim: int | None = None):
        super().__init__()
        self.name, self.fn, self.member_dim = name, getattr(F, name), member_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, probs): probs = softmax(logits) (B, K); gates keep each row's k largest probs, renormalized to sum
    to 1, and are 0 elsewhere."""
    probs = logits.softmax(dim=-1)
    top, index = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True)), probs


class MoELayer(nn.Module):
    """A router (Linear in -> K) and K experts (Linear -> LayerNorm -> activation per layer of `dims`) stored as
    stacked (K, in, out) weights; forward returns the top-k gated sum of the experts' outputs (B, dims[-1]) and
    keeps the router's mean per-sample entropy (with its graph) in `router_entropy`."""

    linear_parameters = ("weights", "biases")  # the experts' linear layers, which DrM's perturbation mixes

    def __init__(self, in_dim: int, dims: tuple[int, ...], experts: int, topk: int, activation: str):
        super().__init__()
        self.experts, self.topk = experts, topk
        self.router = nn.Linear(in_dim, experts)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, o in zip((in_dim, *dims[:-1]), dims):
            bound = 1.0 / math.sqrt(i)  # nn.Linear's default, drawn independently per expert
            self.weights.append(nn.Parameter(torch.empty(experts, i, o).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(experts, 1, o).uniform_(-bound, bound)))
        self.ln_weights = nn.ParameterList([nn.Parameter(torch.ones(experts, 1, h)) for h in dims])
        self.ln_biases = nn.ParameterList([nn.Parameter(torch.zeros(experts, 1, h)) for h in dims])
        self.acts = nn.ModuleList(Activation(activation, member_dim=0) for _ in dims)
        self.router_entropy = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        gates, probs = top_k_gates(logits, self.topk)
        self.router_entropy = -(probs * logits.log_softmax(dim=-1)).sum(-1).mean()
        h = torch.matmul(x, self.weights[0]) + self.biases[0]  # (B, in) @ (K, in, out) -> (K, B, out)
        for i in range(len(self.acts)):
            if i > 0:
                h = torch.baddbmm(self.biases[i], h, self.weights[i])
            h = self.acts[i](torch.addcmul(self.ln_biases[i], F.layer_norm(h, h.shape[-1:]), self.ln_weights[i]))
        return torch.einsum("bk,kbh->bh", gates, h)


class MoEActorNet(nn.Module):
    """SERL's actor MLP with its hidden layers after the first replaced by a MoELayer: (B, in) -> (B, out), for
    serl.TanhGaussianActor's `net`."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: tuple[int, ...], activation: str, experts: int,
                 topk: int):
        super().__init__()
        h0 = hidden_dims[0]
        dims = tuple(hidden_dims[1:]) or (h0,)
        self.trunk = nn.Sequential(nn.Linear(in_dim, h0), nn.LayerNorm(h0), Activation(activation))
        self.moe = MoELayer(h0, dims, experts, topk, activation)
        self.head = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.moe(self.trunk(x)))

    @property
    def router_entropy(self) -> torch.Tensor:
        """The router's mean per-sample entropy at the last forward pass (with its graph)."""
        return self.moe.router_entropy


# -- task-oriented perturbation --------------------------------------------------------------

def flat_linear(net: nn.Module) -> torch.Tensor:
    """`net`'s linear-layer parameters (drm.linear_parameter_names' order), detached, as one vector."""
    params = dict(net.named_parameters())
    return torch.cat([params[n].detach().flatten() for n in linear_parameter_names(net)])


@torch.no_grad()
def mix_(net: nn.Module, target: torch.Tensor, alpha: float) -> None:
    """theta <- alpha theta + (1 - alpha) phi for each linear-layer parameter theta of `net`, phi its slice of the
    flat `target` (flat_linear's layout); other parameters are left alone."""
    params, offset = dict(net.named_parameters()), 0
    for name in linear_parameter_names(net):
        p = params[name]
        p.lerp_(target[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype), 1.0 - alpha)
        offset += p.numel()
    if offset != target.numel():
        raise ValueError(f"perturbation target of {target.numel()} values for a network of {offset} linear weights")


class TopSet:
    """The linear-layer weights of named networks after the `size` best episodes so far, ranked by return.

    `filled` (0-d int64): slots 0..filled-1 hold entries; `returns` (size,) float64 (0 in an empty slot);
    `weights[name]` (size, P_name). offer() fills the next free slot, or replaces the lowest kept return when the
    new one is higher (a full set; ties keep the older entry)."""

    def __init__(self, nets: dict[str, nn.Module], size: int):
        self.size = size
        self.filled = torch.zeros((), dtype=torch.int64)
        self.returns = torch.zeros(size, dtype=torch.float64)
        self.weights = {}
        for name, net in nets.items():
            flat = flat_linear(net)
            self.weights[name] = torch.zeros(size, flat.numel(), device=flat.device, dtype=flat.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        # Updated by rebinding, never in place, so that a state dict in hand keeps its values.
        return {"mentor/filled": self.filled, "mentor/returns": self.returns,
                **{f"mentor/{k}": v for k, v in self.weights.items()}}

    def count(self) -> int:
        return int(self.filled)

    def kept_returns(self) -> torch.Tensor:
        return self.returns[:self.count()]

    def offer(self, return_: float, nets: dict[str, nn.Module]) -> bool:
        """Keep `nets`' weights with `return_` if it ranks among the best `size`; whether it was kept."""
        if not math.isfinite(return_):
            return False
        n = self.count()
        if n < self.size:
            slot, self.filled = n, torch.tensor(n + 1, dtype=torch.int64)
        else:
            slot = int(self.returns.argmin())  # the first of the lowest
            if not return_ > float(self.returns[slot]):
                return False
        self.returns = self.returns.clone()
        self.returns[slot] = return_
        for name, net in nets.items():
            weights = self.weights[name].clone()
            weights[slot] = flat_linear(net).to(weights.device)
            self.weights[name] = weights
        return True

    def fit(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-parameter mean and std (Bessel-corrected; 0 for a single kept entry), floored at STD_MIN, over the
        kept weights of `name`."""
        kept = self.weights[name][:self.count()]
        if not len(kept):
            raise ValueError("TopSet.fit: no episode kept yet")
        std = kept.std(dim=0) if len(kept) > 1 else torch.zeros_like(kept[0])
        return kept.mean(dim=0), std.clamp_min(STD_MIN)

    def sample(self, name: str, generator: torch.Generator) -> torch.Tensor:
        """A perturbation target for `name`: one draw of N(mean, std) per parameter, from `generator`."""
        mean, std = self.fit(name)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return mean + std * noise.to(mean.device)
