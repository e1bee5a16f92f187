"""Errors agents raise, and the finite-loss guard every learner step goes through."""

from __future__ import annotations

import torch


class NonFiniteActionError(ValueError):
    """The sampler produced NaN or inf actions; the message says how many and which inputs were bad."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; carries the loss name, the learner step and batch statistics."""

    def __init__(self, loss_name: str, step: int, value: float, stats: dict[str, dict[str, float]]):
        self.loss_name, self.step, self.value, self.stats = loss_name, step, value, stats
        lines = [f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()) for name, s in stats.items()]
        super().__init__(f"non-finite {loss_name} loss ({value}) at learner step {step}; batch stats:\n  "
                         + "\n  ".join(lines))


def batch_stats(batch: dict) -> dict[str, dict[str, float]]:
    """min/max/mean and the non-finite count of reward, discount, action and each float obs entry."""
    fields = {"reward": batch.get("reward"), "discount": batch.get("discount"), "action": batch.get("action")}
    for key, value in batch.get("obs", {}).items():
        if torch.is_tensor(value) and value.is_floating_point():
            fields[f"obs/{key}"] = value
    stats = {}
    for name, t in fields.items():
        if t is None:
            continue
        t = t.detach().float()
        stats[name] = {"min": t.min().item(), "max": t.max().item(), "mean": t.mean().item(),
                       "non_finite": float((~torch.isfinite(t)).sum().item())}
    return stats


def check_finite(loss: torch.Tensor, name: str, step: int, batch: dict) -> None:
    """Raise NonFiniteLossError before a non-finite loss reaches an optimizer step."""
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(name, step, float(loss.detach()), batch_stats(batch))


def check_batch_finite(batch: dict, name: str, step: int) -> None:
    """Raise NonFiniteLossError (as `name`'s loss would be) for a batch with NaN/inf, before any step.

    An update split into several optimizer steps must check up front: a bad row in a later
    minibatch would otherwise surface only after earlier steps had changed the weights.
    """
    stats = batch_stats(batch)
    if any(s["non_finite"] for s in stats.values()):
        raise NonFiniteLossError(name, step, float("nan"), stats)
