"""The dormant ratio of an agent's networks (Sokar et al. 2023, "The Dormant Neuron Phenomenon in
Deep Reinforcement Learning"; DrM, Xu et al. 2024, uses it to steer exploration).

A neuron i of hidden layer l is tau-dormant when its mean absolute activation over a batch, divided
by the layer's average of those means, is at most tau:

    s_i = E|h_i| / (1/H sum_k E|h_k|) <= tau

and a network's dormant ratio is its dormant neurons over all its hidden neurons. A rising ratio
means the network is losing capacity (neurons that no longer respond to their input); DrM reports
it early in visual RL, when an agent's actions barely change with what it sees.

`DormantProbe` measures it during an agent's own update, with forward hooks on the activation
modules of the networks the update trains (those with a parameter that requires grad: the actor,
the critic, an encoder; never a target network or a frozen base). Every forward pass during the
probe counts, so the statistics cover the update's batch. The training loop probes the update at
every agent step that is a multiple of robolearn.train.LOG_EVERY (250) and logs `dormant/<network>`
to TensorBoard for every agent.

Neurons: the channel axis (dim 1) of an activation's output, which is the feature axis of (B, H)
and the channel axis of convolutions (B, C, ...). An activation module with `member_dim` (the
critic ensemble's, (E, B, H)) is E networks: each member's layer is normalized on its own.
"""

from __future__ import annotations

import torch
from torch import nn

TAU = 0.025  # DrM's threshold
ACTIVATION_TYPES = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Mish)


def is_activation(module: nn.Module) -> bool:
    """Whether the probe reads `module`'s output: torch's activations, and ours, which say so with
    `dormant_probe = True` (robolearn.agents.diffusion.Mish, robolearn.agents.serl.EnsembleActivation,
    robolearn.agents.simba.HyperReLU)."""
    return isinstance(module, ACTIVATION_TYPES) or bool(getattr(module, "dormant_probe", False))


def trained(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class DormantProbe:
    """`with DormantProbe(networks): agent.update(...)`, then `ratios()`: name -> dormant ratio for each
    named network with an activation module (see the module docstring for what counts)."""

    def __init__(self, networks: dict[str, nn.Module], tau: float = TAU):
        if not tau > 0:
            raise ValueError(f"dormant tau must be positive, got {tau!r}")
        self.tau = float(tau)
        self.layers: dict[str, list[nn.Module]] = {}
        for name, net in networks.items():
            if trained(net):
                layers = [m for m in net.modules() if is_activation(m)]
                if layers:
                    self.layers[name] = layers
        self._sums: dict[nn.Module, torch.Tensor] = {}
        self._counts: dict[nn.Module, int] = {}
        self._handles = []

    def _hook(self, module: nn.Module, _inputs, output) -> None:
        h = output.detach().float().abs()
        member = getattr(module, "member_dim", None)
        if member is not None:  # (E, B, H) with E on member_dim: per member
            h = h.movedim(member, 0)
            total, n = h.sum(dim=1), h.shape[1]
        else:  # channels on dim 1, everything else averaged
            rest = (0, *range(2, h.ndim))
            total, n = h.sum(dim=rest)[None], h.numel() // h.shape[1]
        self._sums[module] = self._sums.get(module, 0) + total
        self._counts[module] = self._counts.get(module, 0) + n

    def __enter__(self) -> "DormantProbe":
        self._sums.clear()
        self._counts.clear()
        self._handles = [m.register_forward_hook(self._hook) for layers in self.layers.values() for m in layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def ratios(self) -> dict[str, float]:
        """name -> dormant neurons / neurons over the layers that ran during the probe (a network none of
        whose layers ran is left out)."""
        out = {}
        for name, layers in self.layers.items():
            dormant = total = 0
            for m in layers:
                if m not in self._sums:
                    continue
                mean = self._sums[m] / self._counts[m]  # (groups, neurons)
                score = mean / mean.mean(dim=-1, keepdim=True).clamp_min(1e-12)
                dormant += int((score <= self.tau).sum())
                total += score.numel()
            if total:
                out[name] = dormant / total
        return out


def probe_agent(agent, tau: float = TAU) -> DormantProbe:
    """A probe over the agent's checkpointed networks (its `_modules()`, which robolearn's agents have) that its
    update trains; an agent without `_modules` gets an empty probe (no dormant/* scalars)."""
    modules = getattr(agent, "_modules", None)
    return DormantProbe(modules() if callable(modules) else {}, tau)
