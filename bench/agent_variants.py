"""SERL and its variants on PandaPickCube from states with 20 scripted demos: env steps, minutes to
90% and critic updates/s, per variant and seed (docs/agent_variants.md).

Each variant is a set of SERL options on top of robolearn's CPU setting (serl.CPU_OVERRIDES: 2
critics, UTD 8, 3-step returns); `serl` is that setting as it is. Per seed, bench/serl_pickcube.py's
protocol: 20 scripted demos, 50/50 demo/online batches, SERL's dense reward with 100-step episodes,
20 evaluation episodes every --eval-every env steps, stop at 90% success or --frames. Every variant
of a seed trains from the same demos.

Last stdout line, one JSON object: `variants` -> name -> `overrides`, `env_steps_to_90` and
`minutes_to_90` (one per seed, null if never), `final_success`, `minutes_total`, `updates_per_s`
(critic steps per second of one learner update on a batch of random transitions, median of 20,
after training), `arithmetic_limit_updates_per_s` and `fraction_of_limit` (the machine's measured matmul
rate divided by a critic step's FLOPs, and that rate against it; both null for SimbaV2, DrM and MENTOR,
whose FLOPs it does not count) and `all_seeds_within`
(every seed at 90% within 10k env steps and 10 minutes: the goal of issue 12); then `best` (the
variant with the lowest median steps to 90%, never counting as --frames + 1), `seeds`,
`frames_budget`, `threads`. A plot of evaluation success
against env steps per variant and seed is saved to <out>/curves.png.
`--quick`: one seed, 3000 env steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from serl_pickcube import measure_updates, record_demos, to_90  # bench/ is on sys.path as the script's dir

from robolearn.agents.serl import CPU_OVERRIDES
from robolearn.train import TrainConfig, train

ENV_ID = "robolearn/PandaPickCube-v0"
ENV_KWARGS = {"terminate_on_success": False}  # SERL's pick-cube, as bench/serl_pickcube.py
# name -> SERL options over CPU_OVERRIDES. DroQ: dropout 0.01 on the 2 critics (Hiraoka et al. keep
# 2 critics; CPU_OVERRIDES already has them), at the same UTD so the comparison is dropout alone.
VARIANTS = {
    "serl": {},
    "droq": {"critic_dropout": 0.01},
    # DroQ with ReLU (DroQ's and RLPD's activation) in place of SERL's tanh, for actor and critic alike.
    "droq_relu": {"critic_dropout": 0.01, "activation": "relu"},
    # DroQ at half the critic steps per env step: cheaper updates, if the steps to 90% allow.
    "droq_utd4": {"critic_dropout": 0.01, "utd_ratio": 4},
    # SimbaV2 (Lee et al. 2025): hyperspherical actor and critic, categorical critic, reward scaling, with SERLConfig's
    # simba_* defaults (128 wide, 1 block each). Not with DroQ: SERLAgent refuses critic_dropout with it.
    "simbav2": {"network": "simbav2"},
    # DrM (Xu et al. 2024; robolearn.agents.drm) with SERLConfig's drm_* defaults (a perturbation every 2000 env
    # steps). SERL's LayerNorm + tanh actor has read a dormant ratio of 0 on PickCube, where DrM reduces to a 10%
    # shrink and perturb each interval and a backup that is 60% the expectile value net: its exploration term
    # (the target entropy) stays at SERL's own. droq_drm: the same on DroQ's critic.
    "drm": {"drm": True},
    "droq_drm": {"critic_dropout": 0.01, "drm": True},
    # MENTOR (Huang et al. 2025; robolearn.agents.mentor): a mixture-of-experts actor (8 experts, the top 4 mixed
    # per sample: the authors' ablation's best, half the CPU cost of their default 16) and, on droq_drm, DrM's
    # perturbations towards the Gaussian of the 10 best episodes' weights. droq_moe: DroQ with the MoE actor alone.
    "mentor": {"critic_dropout": 0.01, "drm": True, "actor_moe_experts": 8, "actor_moe_topk": 4,
               "mentor_perturb": True},
    "droq_moe": {"critic_dropout": 0.01, "actor_moe_experts": 8, "actor_moe_topk": 4},
}
GOAL_STEPS, GOAL_MINUTES = 10_000, 10.0


def median_steps(steps: list, budget: int) -> float:
    return statistics.median(budget + 1 if s is None else s for s in steps)


def plot(root: Path, runs: dict, seeds: list[int]) -> Path | None:
    """Evaluation success against env steps, one colour per variant, one line per seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(runs):
        for j, seed in enumerate(seeds):
            path = root / name / f"seed{seed}" / "history.json"
            if not path.exists():
                continue
            ev = json.loads(path.read_text())["eval"]
            ax.plot([e[0] for e in ev], [e[2] for e in ev], color=colors[i % len(colors)], alpha=0.8,
                    label=name if j == 0 else None)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="env steps", ylabel="evaluation success", ylim=(-0.05, 1.05),
           title=f"{ENV_ID.split('/')[-1]}: SERL variants, seeds {seeds}")
    ax.legend()
    fig.tight_layout()
    out = root / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--frames", type=int, default=20_000, help="env-step budget per run")
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: two runs can share 2 cores)")
    parser.add_argument("--quick", action="store_true", help="one seed, 3000 env steps: a check that it runs")
    parser.add_argument("--out", default="runs/bench_agent_variants", help="run directories, replaced per run")
    args = parser.parse_args()
    for name, value in (("--frames", args.frames), ("--demos", args.demos), ("--eval-every", args.eval_every),
                        ("--eval-episodes", args.eval_episodes), ("--threads", args.threads)):
        if value <= 0:
            parser.error(f"{name} must be positive, got {value}")
    torch.set_num_threads(args.threads)
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would replace its own run folder
    seeds, frames = (seeds[:1], 3_000) if args.quick else (seeds, args.frames)
    root = Path(args.out)
    variants: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            demos = Path(tmp) / f"demos_{seed}"
            record_demos(ENV_ID, ENV_KWARGS, demos, args.demos, seed)
            for name in args.variants:
                overrides = {**CPU_OVERRIDES, **VARIANTS[name]}
                res = variants.setdefault(name, {"overrides": overrides, "env_steps_to_90": [], "minutes_to_90": [],
                                                 "final_success": [], "minutes_total": []})
                out_dir = root / name / f"seed{seed}"
                shutil.rmtree(out_dir, ignore_errors=True)  # the bench's own previous run
                out = train(TrainConfig(agent="serl", env=ENV_ID, out=str(out_dir), frames=frames, seed=seed,
                                        demos=str(demos), eval_every=args.eval_every,
                                        eval_episodes=args.eval_episodes, target_success=0.9,
                                        checkpoint_every=frames, save_replay=False, video=False,
                                        env_kwargs=ENV_KWARGS, agent_overrides=overrides))
                steps, minutes = to_90(json.loads((out_dir / "history.json").read_text()))
                res["env_steps_to_90"].append(steps)
                res["minutes_to_90"].append(minutes)
                res["final_success"].append(out["final_success"])
                res["minutes_total"].append(round(out["minutes"], 2))
                print(f"{name} seed {seed}: env steps to 90% {steps}, minutes {minutes}, "
                      f"final success {out['final_success']:.0%}", flush=True)
    for name, res in variants.items():
        res.update({k: v for k, v in measure_updates(ENV_ID, ENV_KWARGS, res["overrides"]).items()
                    if k in ("updates_per_s", "fraction_of_limit", "arithmetic_limit_updates_per_s")})
        # serl_pickcube counts an MLP critic's FLOPs only (not SimbaV2's, DrM's value network nor MENTOR's experts)
        if (res["overrides"].get("network", "mlp") != "mlp" or res["overrides"].get("drm")
                or res["overrides"].get("actor_moe_experts")):
            res["fraction_of_limit"] = res["arithmetic_limit_updates_per_s"] = None
        res["all_seeds_within"] = all(s is not None and s <= GOAL_STEPS and m <= GOAL_MINUTES
                                      for s, m in zip(res["env_steps_to_90"], res["minutes_to_90"]))
    best = min(variants, key=lambda n: median_steps(variants[n]["env_steps_to_90"], frames))
    curves = plot(root, variants, seeds)
    print(json.dumps({"env_id": ENV_ID, "variants": variants, "best": best, "seeds": seeds, "frames_budget": frames,
                      "threads": args.threads, "plot": None if curves is None else str(curves)}))


if __name__ == "__main__":
    main()
