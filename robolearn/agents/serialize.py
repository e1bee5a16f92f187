"""Optimizer state as a flat dict of tensors (for safetensors) and its hyperparameters as JSON.

torch's `Optimizer.state_dict()` nests tensors inside Python containers and mixes in
hyperparameters, so it needs pickle. Here the per-parameter state (Adam: step, exp_avg,
exp_avg_sq[, max_exp_avg_sq]) becomes `{prefix}.{param_index}.{name}` tensors, and the
param_groups' hyperparameters (lr, betas, eps ...) become plain JSON-able dicts.
"""

from __future__ import annotations

import torch


def optimizer_state_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Every per-parameter state entry as `{prefix}.{index}.{name}`; scalars become 0-d tensors."""
    out = {}
    for index, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            out[f"{prefix}.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_state_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str,
                                      param_groups: list[dict] | None = None) -> None:
    """Inverse of optimizer_state_to_tensors; `param_groups` (from optimizer_hparams) also restores lr etc."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    head = prefix + "."
    for key, value in tensors.items():
        if not key.startswith(head):
            continue
        index_str, _, name = key[len(head):].partition(".")
        if not index_str.isdigit() or not name:
            raise KeyError(f"{key!r} is not a {prefix!r} optimizer entry ({prefix}.<param index>.<name>)")
        index = int(index_str)
        if index >= len(params):
            raise KeyError(f"{key!r}: the optimizer has {len(params)} parameters")
        if value.ndim > 0 and value.shape != params[index].shape:
            raise ValueError(f"{key!r}: shape {tuple(value.shape)} does not match parameter shape "
                             f"{tuple(params[index].shape)}")
        state.setdefault(index, {})[name] = value.clone()  # Optimizer.load_state_dict would alias it
    groups = opt.state_dict()["param_groups"]
    if param_groups is not None:
        if len(param_groups) != len(groups):
            raise ValueError(f"{prefix}: {len(param_groups)} saved param groups, optimizer has {len(groups)}")
        groups = [{**g, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()}}
                  for g, saved in zip(groups, param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})


def optimizer_hparams(opt: torch.optim.Optimizer) -> list[dict]:
    """The param_groups' hyperparameters (everything but the params), JSON-able."""
    def plain(v):
        if torch.is_tensor(v):
            return v.item()
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return [{k: plain(v) for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]


def training_state_to_tensors(modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                              generators: dict[str, torch.Generator] | None = None,
                              tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """An agent's whole training state, flat and contiguous (safetensors-ready): `{module}.{name}`,
    `optim/{opt}.{index}.{entry}`, `rng/{generator}` and the named `tensors` (temperature, counters)."""
    out = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    for name, opt in optimizers.items():
        out.update(optimizer_state_to_tensors(opt, f"optim/{name}"))
    out.update({k: v.detach() for k, v in (tensors or {}).items()})
    out = {k: v.contiguous() for k, v in out.items()}
    out.update({f"rng/{name}": g.get_state() for name, g in (generators or {}).items()})
    return out


def load_training_state(state: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer],
                        generators: dict[str, torch.Generator] | None = None,
                        tensors: dict[str, torch.Tensor] | None = None, what: str = "agent") -> None:
    """Inverse of training_state_to_tensors (strict: a missing or unexpected entry raises KeyError)."""
    used = set()
    for name, m in modules.items():
        head = name + "."
        sub = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
        m.load_state_dict(sub, strict=True)
        used |= {head + k for k in sub}
    for name, opt in optimizers.items():
        load_optimizer_state_from_tensors(opt, state, f"optim/{name}")
        used |= {k for k in state if k.startswith(f"optim/{name}.")}
    singles = {**{f"rng/{n}": g for n, g in (generators or {}).items()}, **(tensors or {})}
    missing = sorted(set(singles) - set(state))
    if missing:
        raise KeyError(f"{what} state dict lacks {missing}")
    for key, target in singles.items():
        if isinstance(target, torch.Generator):
            target.set_state(state[key].cpu())
        else:
            with torch.no_grad():
                target.copy_(state[key])
        used.add(key)
    unknown = sorted(set(state) - used)
    if unknown:
        raise KeyError(f"unexpected entries in a {what} state dict: {unknown[:8]}")


def agent_config(agent, optimizers: dict[str, torch.optim.Optimizer], **extra) -> dict:
    """An agent's config_dict(): JSON-able name, config (dataclasses.asdict), the observation spaces its
    networks were built for, action_dim, the agent's `extra` fields and its optimizers' settings."""
    from dataclasses import asdict

    spaces = {k: {"shape": list(s.shape), "dtype": str(s.dtype)} for k, s in agent.observation_space.spaces.items()}
    return {"agent": agent.name, "config": asdict(agent.cfg), "observation_space": spaces,
            "action_dim": agent.action_dim, **extra,
            "optimizers": {name: optimizer_hparams(opt) for name, opt in optimizers.items()}}
