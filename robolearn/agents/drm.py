"""DrM (Xu et al. 2024, "DrM: Mastering Visual Reinforcement Learning through Dormant Ratio Minimization",
ICLR, arXiv 2310.19668): three mechanisms steered by the actor's dormant ratio beta, for DrQ-v2 and SERL
(`drm=True` in their configs; docs/agent_variants.md, "DrM").

beta is robolearn.agents.dormant's tau-dormant ratio (tau = 0.025) of the actor, read by a DormantProbe on
the actor's forward pass of the update's actor step (the batch's observations, which the update encodes
anyway: no extra pass). It steers the updates after the one that measured it, and acting in between.
Before the first measurement beta is 1, as in the authors' code.

1. Perturbation. At the first update at or after every `drm_perturb_interval`-th agent step (if beta is at
   least `drm_perturb_threshold`; 0, the authors' code: always), the actor, the critic, its target and the
   value network are shrunk towards a fresh initialization phi of themselves (shrink and perturb):
       theta <- alpha theta + (1 - alpha) phi,   alpha = clip(1 - k beta, alpha_min, alpha_max)
   k = `drm_perturb_rate` (2), alpha_min 0.2, alpha_max 0.9 (the authors' DMC setting; 0.6 on Dog, 0.95 on
   MetaWorld). As in their code: linear layers only (not the conv encoder, not LayerNorm gains), and the
   Adam moments of the perturbed networks' optimizers start over (DrQ-v2: the encoder's too, as theirs).
   Here the critic and its target move towards the same phi (the authors draw one per network).
2. Awaken exploration. sigma(beta) = 0.8 / (1 + exp(-(beta - beta_hat) / 0.1)), beta_hat =
   `drm_target_beta` (0.2). DrQ-v2's noise std is sigma(beta) until the actor first "awakens" (beta below
   beta_hat at an update), and max(sigma(beta), its linear schedule restarted at that step) after.
   SAC has no noise schedule: SERL's target entropy becomes max(its own, the entropy of tanh(N(0, sigma(beta)^2))
   per action dimension, DrM's noise in SAC's squashed parametrization), so the temperature rises while the
   actor is dormant.
3. Exploitation. A value network V(s) learns the tau_e-expectile (`drm_expectile`, 0.9) of the critic's
   Q(s, a) over the replay's actions (expectile regression, as IQL):
       L_V = E[ |tau_e - 1(Q - V < 0)| (Q - V)^2 ]
   and the critic's backup blends it in:
       y = r + d (lambda V(s') + (1 - lambda) Q_target(s', a')),
       lambda = lambda_hat / (1 + exp((beta - beta_hat) / 0.02)),   lambda_hat = `drm_target_lambda` (0.6).

The temperatures 0.1 and 0.02 and sigma's maximum 0.8 are the authors' DMC constants, fixed here.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from robolearn.agents.dormant import TAU, DormantProbe

STDDEV_MAX = 0.8  # sigma(beta)'s ceiling (the authors' DMC agent; their MetaWorld agent uses 1.0)
EXPLORE_TEMP = 0.1  # sigma's temperature: sigma = STDDEV_MAX * sigmoid((beta - beta_hat) / EXPLORE_TEMP)
EXPLOIT_TEMP = 0.02  # lambda's temperature


def _fraction(v) -> bool:
    return 0.0 <= v <= 1.0


# The DrM fields of DrQV2Config and SERLConfig beside `drm`: name -> (whether a value is in range, the range).
RANGES = {"drm_perturb_interval": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
          "drm_perturb_rate": (lambda v: v >= 0.0, "zero or more"),
          "drm_min_perturb_factor": (_fraction, "in [0, 1]"), "drm_max_perturb_factor": (_fraction, "in [0, 1]"),
          "drm_perturb_threshold": (_fraction, "in [0, 1]"), "drm_target_beta": (_fraction, "in [0, 1]"),
          "drm_target_lambda": (_fraction, "in [0, 1]"), "drm_expectile": (lambda v: 0.0 < v < 1.0, "in (0, 1)")}


def check_config(cfg) -> None:
    """The DrM fields of an agent config; a one-line ValueError names the first bad one."""
    if not isinstance(cfg.drm, bool):
        raise ValueError(f"drm must be true or false, got {cfg.drm!r}")
    for name, (fits, what) in RANGES.items():
        value = getattr(cfg, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and fits(value)):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    if cfg.drm_min_perturb_factor > cfg.drm_max_perturb_factor:
        raise ValueError(f"drm_min_perturb_factor ({cfg.drm_min_perturb_factor}) must not exceed "
                         f"drm_max_perturb_factor ({cfg.drm_max_perturb_factor})")


# -- the schedules of beta -------------------------------------------------------------------

def perturb_factor(beta: float, rate: float, low: float, high: float) -> float:
    """alpha = clip(1 - rate * beta, low, high): the share of the old weights a perturbation keeps."""
    return min(max(low, 1.0 - rate * beta), high)


def dormant_stddev(beta: float, target_beta: float) -> float:
    """sigma(beta) = STDDEV_MAX / (1 + exp(-(beta - target_beta) / EXPLORE_TEMP)): more noise while dormant."""
    return STDDEV_MAX / (1.0 + math.exp(-(beta - target_beta) / EXPLORE_TEMP))


def exploit_lambda(beta: float, target_lambda: float, target_beta: float) -> float:
    """lambda(beta) = target_lambda / (1 + exp((beta - target_beta) / EXPLOIT_TEMP)): the value net's share of
    the backup, near target_lambda once the actor is active, near 0 while it is dormant."""
    return target_lambda / (1.0 + math.exp(min((beta - target_beta) / EXPLOIT_TEMP, 700.0)))


_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(48)  # E[f(z)], z ~ N(0, 1), as sum(w f(x)) / sqrt(2 pi)


def tanh_gaussian_entropy(std: float, dim: int) -> float:
    """The entropy of tanh(u), u ~ N(0, std^2 I) in `dim` dimensions: the noise level std in SAC's tanh-squashed
    parametrization (SERL's exploration analogue). H(N) + E[log(1 - tanh(u)^2)], the latter by Gauss-Hermite
    quadrature (1e-6 accurate for std <= 1); at most log 2 per dimension, so a SAC policy can reach it."""
    u = std * _NODES
    log_det = 2.0 * (math.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))  # log(1 - tanh(u)^2), stably
    per_dim = 0.5 * math.log(2.0 * math.pi * math.e * std * std) + float(_WEIGHTS @ log_det) / math.sqrt(2 * math.pi)
    return dim * per_dim


# -- exploitation ----------------------------------------------------------------------------

def expectile_loss(v: torch.Tensor, q: torch.Tensor, expectile: float) -> torch.Tensor:
    """E[|expectile - 1(q - v < 0)| (q - v)^2]: its minimizer v is the expectile of q (the mean at 0.5)."""
    u = q - v
    weight = torch.where(u < 0, 1.0 - expectile, expectile)
    return (weight * u.pow(2)).mean()


def exploit_backup(q_next: torch.Tensor, v_next: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * V(s') + (1 - lam) * Q(s', a'): the next-state value the critic's target uses."""
    return lam * v_next + (1.0 - lam) * q_next


# -- perturbation ----------------------------------------------------------------------------

@contextlib.contextmanager
def fresh_init(generator: torch.Generator):
    """Networks built inside are initialized from a seed drawn from `generator` (an agent's update stream, so a
    resumed run draws the same), without touching torch's global CPU RNG state outside."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def linear_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters of `net`'s linear layers: nn.Linear's, and those a module lists in its
    `linear_parameters` attribute (ParameterLists of stacked weights, serl.EnsembleCritic's)."""
    names = []
    for prefix, m in net.named_modules():
        if isinstance(m, nn.Linear):
            own = [n for n, _ in m.named_parameters(recurse=False)]
        else:
            own = [f"{attr}.{i}" for attr in getattr(m, "linear_parameters", ()) for i in range(len(getattr(m, attr)))]
        names += [f"{prefix}.{n}" if prefix else n for n in own]
    return names


@torch.no_grad()
def shrink_perturb_(net: nn.Module, fresh: nn.Module, alpha: float) -> None:
    """theta <- alpha theta + (1 - alpha) phi for each linear-layer parameter theta of `net` and its counterpart
    phi in `fresh` (a newly initialized network of the same shape); other parameters are left alone."""
    ours, theirs = dict(net.named_parameters()), dict(fresh.named_parameters())
    for name in linear_parameter_names(net):
        ours[name].lerp_(theirs[name].to(ours[name].device), 1.0 - alpha)


def perturb_(pairs, alpha: float, optimizers) -> None:
    """shrink_perturb_ for each (network, fresh network) pair, then clear the optimizers' moments (Adam starts
    over from the perturbed weights, as in the authors' code)."""
    for net, fresh in pairs:
        shrink_perturb_(net, fresh, alpha)
    for opt in optimizers:
        opt.state.clear()


# -- the state an agent keeps ----------------------------------------------------------------

class DrM:
    """One agent's DrM state: the actor's last dormant ratio, its awakening step (-1: not yet), the step the next
    perturbation is due at, and the perturbations so far, as 0-d tensors for its state_dict (`tensors()`)."""

    def __init__(self, cfg, actor: nn.Module):
        check_config(cfg)
        self.cfg = cfg
        self.probe = DormantProbe({"actor": actor}, TAU)
        self.beta = torch.ones((), dtype=torch.float64)
        self.awaken_step = torch.full((), -1, dtype=torch.int64)
        self.next_perturb = torch.tensor(cfg.drm_perturb_interval, dtype=torch.int64)
        self.perturbations = torch.zeros((), dtype=torch.int64)

    def tensors(self) -> dict[str, torch.Tensor]:
        # Updated by rebinding, never in place, so that a state dict in hand keeps its values.
        return {"drm/beta": self.beta, "drm/awaken_step": self.awaken_step, "drm/next_perturb": self.next_perturb,
                "drm/perturbations": self.perturbations}

    def observe(self, step: int) -> None:
        """Take beta from the probe that just watched the actor (nothing if the actor did not run)."""
        beta = self.probe.ratios().get("actor")
        if beta is None:
            return
        self.beta = torch.tensor(beta, dtype=torch.float64)
        if int(self.awaken_step) < 0 and beta < self.cfg.drm_target_beta:
            self.awaken_step = torch.tensor(int(step), dtype=torch.int64)

    def perturb_due(self, step: int) -> bool:
        """Whether the update at agent step `step` perturbs (counted when it does); called once per update."""
        if step < int(self.next_perturb):
            return False
        interval = self.cfg.drm_perturb_interval
        self.next_perturb = torch.tensor((int(step) // interval + 1) * interval, dtype=torch.int64)
        if float(self.beta) < self.cfg.drm_perturb_threshold:
            return False
        self.perturbations = self.perturbations + 1
        return True

    def perturb_factor(self) -> float:
        c = self.cfg
        return perturb_factor(float(self.beta), c.drm_perturb_rate, c.drm_min_perturb_factor, c.drm_max_perturb_factor)

    def lam(self) -> float:
        return exploit_lambda(float(self.beta), self.cfg.drm_target_lambda, self.cfg.drm_target_beta)

    def stddev(self, scheduled: float | None) -> float:
        """DrQ-v2's noise std: sigma(beta), or max(sigma(beta), `scheduled`) once awake (`scheduled`: the linear
        schedule at the steps since awakening; None before)."""
        sigma = dormant_stddev(float(self.beta), self.cfg.drm_target_beta)
        return sigma if scheduled is None or int(self.awaken_step) < 0 else max(sigma, scheduled)

    def metrics(self) -> dict[str, float]:
        return {"drm/beta": float(self.beta), "drm/perturb_factor": self.perturb_factor(), "drm/lambda": self.lam(),
                "drm/perturbations": float(self.perturbations)}
