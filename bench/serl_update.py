"""SERL's learner update on a CPU: critic steps/s against the arithmetic limit, where the time goes, and
what each speed option gives, all measured in one run (docs/agent_variants.md#update-speed).

For SERL's CPU setting (serl.CPU_OVERRIDES: 2 critics, UTD 8, 3-step returns) and for DroQ (the same
plus critic_dropout=0.01, `make demo`'s setting), one learner update (utd_ratio critic steps and one
actor step on a batch of random PickCube-shaped transitions) is timed under each option:

- `eager`: as robolearn trains (fused Adam; on a CPU, DroQ's dropout zeroes the dropped elements in
  place, serl.ZeroAt);
- `mask_dropout` (DroQ only): dropout by a full-size mask multiplied in, the implementation
  ZeroAt replaced (serl.sparse_dropout patched to False: the same dropped elements);
- `compile`: SERLConfig.compile, torch.compile of the critic (compiled before timing);
- `bf16_autocast`: the update under torch.autocast("cpu", torch.bfloat16).

Rounds interleave the options, so a busy machine's drift hits each alike; an option's rate is the
median over rounds of each round's median update. The arithmetic limit is the fp32 matmul rate
measured in the same run divided by one critic step's FLOPs (bench/serl_pickcube.py's count: the
critic's forward and backward and the target's forward; the actor's share is not counted, so the
fraction is a lower bound). For `eager`, the profiler's shares of the update's CPU time: matmuls,
LayerNorm, activations, the optimizers and Polyak step, and the rest (elementwise ops, reductions,
copies, random numbers, framework).

The last stdout line is one JSON object: `settings` -> serl|droq -> `options` -> name ->
`updates_per_s`, `fraction_of_limit`, `speedup` (over eager); `time_share`; `arithmetic_limit_updates_per_s`;
then `matmul_gflops`, `threads`, `rounds`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from serl_pickcube import agent_and_batch, critic_update_gflop, matmul_gflops  # bench/ is the script's dir

from robolearn.agents import serl

ENV_ID, ENV_KWARGS = "robolearn/PandaPickCube-v0", {"terminate_on_success": False}
SETTINGS = {"serl": {}, "droq": {"critic_dropout": 0.01}}
OPTIONS = ("eager", "mask_dropout", "compile", "bf16_autocast")
# Profiler op names by share; anything else is "rest".
SHARES = {
    "matmul": ("aten::bmm", "aten::baddbmm", "aten::addmm", "aten::mm", "aten::addbmm"),
    "layer_norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "activation": ("aten::tanh", "aten::tanh_backward", "aten::relu", "aten::threshold_backward"),
    "optimizer": ("aten::_fused_adam_", "Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad",
                  "aten::lerp_", "aten::_foreach_lerp_"),
}


@contextlib.contextmanager
def option_context(option: str):
    """What `option` changes around an update (the agent's own config covers `compile`)."""
    if option == "bf16_autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    elif option == "mask_dropout":
        sparse, serl.sparse_dropout = serl.sparse_dropout, lambda p, device: False
        try:
            yield
        finally:
            serl.sparse_dropout = sparse
    else:
        yield


def build(setting: str, option: str):
    overrides = {**serl.CPU_OVERRIDES, **SETTINGS[setting], **({"compile": True} if option == "compile" else {})}
    env, cfg, agent, batch = agent_and_batch(ENV_ID, ENV_KWARGS, overrides)
    step = 0
    with option_context(option):
        for _ in range(3):  # warm-up (and compilation)
            agent.update(batch, step)
            step += 1
    return {"cfg": cfg, "agent": agent, "batch": batch, "step": step, "obs_dim": env.observation_space["state"].shape[0],
            "action_dim": env.action_space.shape[0]}


def time_updates(run: dict, option: str, n: int) -> float:
    """Median seconds of one update over n."""
    times = []
    with option_context(option):
        for _ in range(n):
            t = time.perf_counter()
            run["agent"].update(run["batch"], run["step"])
            times.append(time.perf_counter() - t)
            run["step"] += 1
    return statistics.median(times)


def time_shares(run: dict, n: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_updates(run, "eager", n)
    totals = dict.fromkeys([*SHARES, "rest"], 0.0)
    for event in prof.key_averages():
        share = next((k for k, names in SHARES.items() if event.key in names), "rest")
        totals[share] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the options")
    parser.add_argument("--updates", type=int, default=10, help="updates timed per option and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="eager and mask_dropout, 2 rounds of 3 updates")
    args = parser.parse_args()
    for name, value in (("--rounds", args.rounds), ("--updates", args.updates), ("--threads", args.threads)):
        if value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    if args.quick:
        args.options, args.rounds, args.updates = ["eager", "mask_dropout"], 2, 3
    torch.set_num_threads(args.threads)
    out = {"settings": {}, "threads": args.threads, "rounds": args.rounds}
    gflops = []
    for setting in args.settings:
        options = [o for o in args.options if o != "mask_dropout" or SETTINGS[setting].get("critic_dropout")]
        runs = {o: build(setting, o) for o in options}
        per_round = {o: [] for o in options}
        for r in range(args.rounds):
            gflops.append(matmul_gflops())
            for o in options:
                per_round[o].append(time_updates(runs[o], o, args.updates))
            print(f"{setting} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{o} {runs[o]['cfg'].utd_ratio / per_round[o][-1]:.0f}" for o in options) + " critic steps/s",
                flush=True)
        first = runs[options[0]]
        res = {"options": {o: {"seconds_per_update": statistics.median(per_round[o]),
                               "utd_ratio": runs[o]["cfg"].utd_ratio} for o in options},
               "gflop_per_critic_update": critic_update_gflop(first["obs_dim"], first["action_dim"], first["cfg"])}
        if "eager" in options:
            res["time_share"] = time_shares(runs["eager"], args.updates)
        out["settings"][setting] = res
    peak = statistics.median(gflops)  # every round's measurement, so the limit shares the run's conditions
    for res in out["settings"].values():
        limit = peak / res["gflop_per_critic_update"]
        res["arithmetic_limit_updates_per_s"] = round(limit, 1)
        res["gflop_per_critic_update"] = round(res["gflop_per_critic_update"], 3)
        for name, v in res["options"].items():
            rate = v.pop("utd_ratio") / v.pop("seconds_per_update")
            res["options"][name] = {"updates_per_s": round(rate, 1), "fraction_of_limit": round(rate / limit, 3)}
        if "eager" in res["options"]:
            base = res["options"]["eager"]["updates_per_s"]
            for v in res["options"].values():
                v["speedup"] = round(v["updates_per_s"] / base, 3)
    out["matmul_gflops"] = round(peak, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
