"""Diffusion policy fine-tuning from imperfect demos, on PandaPickCube and PandaPegInsert from states.

Per task and seed: record 20 deliberately imperfect scripted demos (Gaussian noise on the expert's
motion, and a fumble in a fraction of episodes), behaviour-clone the diffusion policy from them
(`bc_success`), then fine-tune that policy online with DSRL and EXPO (`--base`), and train SERL/RLPD
(robolearn's CPU setting) from the same demos as the baseline to beat, each for --frames env steps,
evaluating every --eval-every steps on 20 fixed episodes and stopping at 90% success. SERL's dense
pick-cube reward and 100-step episodes (no termination on success), as bench/serl_pickcube.py.

Last stdout line, one JSON object: per task (`tasks` -> env id) `demo_success`, `bc_success`,
`dsrl_env_steps_to_90`, `expo_env_steps_to_90`, `rlpd_env_steps_to_90` (one per seed, null if never),
`dsrl_final_success`, `expo_final_success`, `rlpd_final_success`, `minutes` (per stage and seed) and
`reached_90_every_seed` (per fine-tuning method: 90% within --frames on every seed), `beats_rlpd` (per
method: its median steps to 90% below RLPD's, never counting as budget + 1) and `plot` (<out>/<Task>/curves.png:
evaluation success against env steps per method and seed); then `goal_met` (on at least GOAL_SEEDS seeds, both
methods reach 90% on every seed and beat RLPD, on every task). `--plot-only` redraws the plots of finished runs.
`--pixels`: the image-based variant, meant for a GPU: the tasks' Pixels envs (front and wrist cameras,
--image-size, default 128 as the env, plus proprioception), the diffusion policy's conv encoders,
DSRL and EXPO on its features, and SERL's end-to-end conv encoder for RLPD; runs and plots under
<out>/<Task>Pixels. `--quick`: one seed, 2000 env steps, 3000 BC updates. `--resume` continues the runs in --out (each run
checkpoints at every evaluation), so a bench of many hours can be run in parts, a process per task
and seed at a time (two on one seed would share its demos and BC base); without it every run starts afresh.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import robolearn.sim as rsim
from robolearn.rollout import run_episodes, scripted_policy

# The fumble strikes at a step drawn in this fraction of the episode: after the expert has
# grasped and lifted the cube (step ~33 of 100) or inserted the peg (~10), so it undoes progress.
FUMBLE_WINDOW = (0.3, 0.7)
# goal_met needs at least this many seeds per task (the goal: 90% within the budget on 3 seeds).
GOAL_SEEDS = 3


class ImperfectExpert:
    """The task's scripted expert with N(0, noise^2) added to its motion dims at every step and, in a
    `fumble` fraction of episodes, a failure from a random step on: with a gripper (PickCube) the
    gripper opens and stays open, dropping the cube; without one (PegInsert) the arm pulls straight
    up, drawing the peg out of the hole. `reset()` (called by run_episodes) draws the next episode's."""

    def __init__(self, env, rng: np.random.Generator, noise: float, fumble: float):
        self.env, self.rng, self.noise, self.fumble = env.unwrapped, rng, float(noise), float(fumble)
        self.expert = scripted_policy(env)
        self.gripper = bool(self.env.task.uses_gripper)
        self.motion_dims = int(np.prod(env.action_space.shape)) - int(self.gripper)
        self.fumble_at: int | None = None
        self.reset()

    def reset(self) -> None:
        lo, hi = (int(f * self.env.cfg.max_episode_steps) for f in FUMBLE_WINDOW)
        self.fumble_at = int(self.rng.integers(lo, hi)) if self.rng.random() < self.fumble else None

    def __call__(self, obs) -> np.ndarray:
        a = np.asarray(self.expert(obs), np.float32).copy()
        if self.fumble_at is not None and self.env.elapsed_steps >= self.fumble_at:
            if self.gripper:
                a[-1] = -1.0  # open
            else:
                a[:self.motion_dims] = 0.0
                a[2] = 1.0  # straight up
        a[:3] += self.rng.normal(0.0, self.noise, 3)
        return np.clip(a, -1.0, 1.0).astype(np.float32)


def imperfect_expert(env, rng: np.random.Generator, noise: float, fumble: float) -> ImperfectExpert:
    """The scripted expert of `env`'s task made imperfect (see ImperfectExpert): a policy for run_episodes."""
    return ImperfectExpert(env, rng, noise, fumble)


def record_demos(env_id: str, env_kwargs: dict, path: str | Path, episodes: int, seed: int, noise: float,
                 fumble: float) -> float:
    """Record `episodes` imperfect-expert episodes (env seeds 10_000 + 100 * seed, ..., noise and fumbles
    drawn from `seed`) as a new dataset at `path` (robolearn.demos.dataset); returns their success rate."""
    from robolearn.demos.dataset import DatasetWriter

    path = Path(path)
    if path.exists() and any(path.iterdir()):  # DatasetWriter would append to it
        raise FileExistsError(f"{path} is not empty: record_demos writes a new dataset")
    env = rsim.make(env_id, **env_kwargs)
    policy = imperfect_expert(env, np.random.default_rng(seed), noise, fumble)
    with DatasetWriter(Path(path), env_id, env.observation_space, env.action_space, fps=10) as writer:
        result = run_episodes(env, policy, episodes, seed=10_000 + 100 * seed, recorder=writer)
    env.close()
    return result.success_rate

# The bench's settings, from the BC sweep in docs/benchmarks.md: per task the (noise, fumble) under
# which 20 demos succeed 65-85% of the time (PegInsert's clearance is 1 mm: at noise 0.1 BC fell to
# 15-35%, at 0.2 the demos themselves to ~10%),
# then BC at lr 1e-3 with normalized observations, predicting 8 actions and executing 4: BC succeeded more
# often than at Chi's 16/8 (PickCube 0.32-0.48 against 0.15-0.35 over 50 episodes, PegInsert 0.68-0.72
# against 0.60), and DSRL steers a 32-dimensional noise instead of 64 (docs/benchmarks.md).
ENV_KWARGS = {"terminate_on_success": False}  # SERL's pick-cube: the episode runs its 100 steps
DEMO_SETTINGS = {"robolearn/PandaPickCube-v0": (0.3, 0.2), "robolearn/PandaPegInsert-v0": (0.05, 0.3)}
BC_UPDATES = 10_000
BC_OVERRIDES = {"lr": 1e-3, "warmup_steps": 100, "pred_horizon": 8, "action_horizon": 4}


# -- the bench ----------------------------------------------------------------------------------

TASKS = {"pick": "robolearn/PandaPickCube-v0", "peg": "robolearn/PandaPegInsert-v0"}
METHODS = ("dsrl", "expo", "rlpd")


def task_env(task: str, pixels: bool) -> str:
    """The env id of a --tasks name: its state env, or with `pixels` the same task's cameras env."""
    return TASKS[task].replace("-v0", "Pixels-v0") if pixels else TASKS[task]


def to_90(history: dict) -> int | None:
    """Env steps of the first evaluation at 90% success or more; None if none reached it."""
    return next((int(steps) for steps, _ret, success, _s in history["eval"] if success >= 0.9), None)


def run(cfg, resume: bool = False) -> tuple[dict, dict, float]:
    """train(cfg) and the run's history.json and minutes. With `resume`, a run that finished within cfg.frames
    (its target, or all of them) is read, not run again, and one with an intact checkpoint continues from it,
    also to more frames; its minutes add up its processes' evaluation times (approximately: each process's
    last kept evaluation row, found where the row's seconds fall back)."""
    import json
    import shutil
    import warnings

    from robolearn import checkpoint as ckpt_io
    from robolearn.train import train

    out = Path(cfg.out)
    saved = json.loads((out / "result.json").read_text()) if resume and (out / "result.json").exists() else {}
    steps = saved.get("updates", saved.get("env_steps", 0))
    done = bool(saved) and steps <= cfg.frames and (saved["reached_target"] or steps == cfg.frames)
    again = resume and not done and steps <= cfg.frames and (out / "checkpoints" / "latest.json").exists()
    if again:
        try:
            ckpt_io.load_newest_good(out)
        except ckpt_io.CheckpointError as err:
            warnings.warn(f"{out}: no intact checkpoint ({err}); the run starts afresh")
            again = False
    if not (done or again):
        shutil.rmtree(out, ignore_errors=True)  # the bench's own previous run
    result = saved if done else train(cfg, resume=again)
    history = json.loads((out / "history.json").read_text())
    seconds = [row[3] for row in history["eval"]]
    ends = [t for t, after in zip(seconds, seconds[1:] + [0.0]) if after < t]  # a process's last row
    return result, history, round(sum(ends) / 60 if resume else result["minutes"], 2)


def bench_task(task: str, seeds: list[int], args, root: Path) -> dict:
    """BC, then each method, per seed, for one --tasks name: the per-task JSON block."""
    import json
    import shutil

    from robolearn import checkpoint as ckpt_io
    from robolearn.agents.serl import CPU_OVERRIDES
    from robolearn.train import TrainConfig

    env_id = task_env(task, args.pixels)
    env_kwargs = {**ENV_KWARGS, "image_size": args.image_size} if args.pixels else ENV_KWARGS
    name = env_id.split("/")[-1]
    res: dict = {"demo_success": [], "bc_success": [], "minutes": {m: [] for m in ("bc", *args.methods)}}
    for m in args.methods:
        res[f"{m}_env_steps_to_90"], res[f"{m}_final_success"] = [], []
    for seed in seeds:
        runs = root / name / f"seed{seed}"
        demos, recorded = runs / "demos", runs / "demos.json"
        noise, fumble = DEMO_SETTINGS[TASKS[task]]
        noise = noise if args.noise is None else args.noise
        fumble = fumble if args.fumble is None else args.fumble
        # what the seed's runs depend on, but --frames: another value wipes them (--resume extends runs to more frames)
        setting = {"episodes": args.demos, "noise": noise, "fumble": fumble, "bc_updates": args.bc_updates,
                   "bc": BC_OVERRIDES, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
                   **({"env_kwargs": env_kwargs} if args.pixels else {})}  # the state runs' setting as it was
        if not (args.resume and recorded.exists() and json.loads(recorded.read_text())["setting"] == setting):
            shutil.rmtree(runs, ignore_errors=True)  # new demos: every run of this seed starts afresh
            success = record_demos(env_id, env_kwargs, demos, args.demos, seed, noise, fumble)
            ckpt_io.write_json(recorded, {"setting": setting, "success": success})
        res["demo_success"].append(json.loads(recorded.read_text())["success"])
        res["demo_noise"], res["demo_fumble"] = noise, fumble
        common = dict(env=env_id, seed=seed, demos=str(demos), eval_episodes=args.eval_episodes, video=False,
                      env_kwargs=env_kwargs)
        out, _, minutes = run(TrainConfig(agent="diffusion", out=str(runs / "bc"), frames=args.bc_updates,
                                          eval_every=args.bc_updates, checkpoint_every=args.bc_updates,
                                          save_replay=False, agent_overrides=BC_OVERRIDES, **common), args.resume)
        res["bc_success"].append(out["final_success"])
        res["minutes"]["bc"].append(minutes)
        print(f"{name} seed {seed}: demos {res['demo_success'][-1]:.0%}, BC {out['final_success']:.0%}", flush=True)
        for m in args.methods:
            agent, overrides = ("serl", dict(CPU_OVERRIDES)) if m == "rlpd" else (m, {"base": out["checkpoint"]})
            # a checkpoint with its replay at every evaluation, so that --resume continues a cut run exactly
            fine, history, minutes = run(TrainConfig(agent=agent, out=str(runs / m), frames=args.frames,
                                                     target_success=0.9, eval_every=args.eval_every,
                                                     checkpoint_every=args.eval_every, save_replay=True,
                                                     agent_overrides=overrides, **common), args.resume)
            res[f"{m}_env_steps_to_90"].append(to_90(history))
            res[f"{m}_final_success"].append(fine["final_success"])
            res["minutes"][m].append(minutes)
            print(f"{name} seed {seed} {m}: steps to 90% {to_90(history)}, final {fine['final_success']:.0%}, "
                  f"{minutes:.1f} min", flush=True)
    curves = plot_task(root / name, METHODS)  # every run in --out: processes run in parts share the plot
    res["plot"] = None if curves is None else str(curves)
    return res


COLORS = {"dsrl": "tab:blue", "expo": "tab:orange", "rlpd": "tab:green"}


def plot_task(task_dir: Path, methods, seeds=None) -> Path | None:
    """curves.png in `task_dir` (the bench's <out>/<Task>): evaluation success against env steps, one line per
    method and seed (`seeds`, or every seed* directory), read from each run's history.json, with each seed's BC
    base (bc/result.json) as a dashed line. None when no run has finished."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    seed_dirs = sorted(task_dir.glob("seed*")) if seeds is None else [task_dir / f"seed{s}" for s in seeds]
    for seed_dir in seed_dirs:
        for m in methods:
            hist = seed_dir / m / "history.json"
            if not hist.exists():
                continue
            evals = json.loads(hist.read_text())["eval"]
            ax.plot([e[0] for e in evals], [e[2] for e in evals], "o-", ms=3, color=COLORS.get(m), alpha=0.8,
                    label=m if not any(line.get_label() == m for line in ax.lines) else None)
            drawn = True
    bases = [json.loads((d / "bc" / "result.json").read_text())["final_success"] for d in seed_dirs
             if (d / "bc" / "result.json").exists()]
    for i, bc in enumerate(bases):
        ax.axhline(bc, ls="--", color="gray", lw=0.8, label="BC base" if i == 0 else None)
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0.9, ls=":", color="black", lw=0.8)
    ax.set(xlabel="env steps", ylabel="evaluation success", ylim=(-0.05, 1.05),
           title=f"{task_dir.name}: fine-tuning from BC vs RLPD (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = task_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def beats_rlpd(res: dict, method: str, budget: int) -> bool:
    """The median of the method's steps to 90% (never: budget + 1) below RLPD's."""
    import statistics

    def med(key):
        return statistics.median(budget + 1 if s is None else s for s in res[key])
    return med(f"{method}_env_steps_to_90") < med("rlpd_env_steps_to_90")


def main() -> None:
    import argparse
    import json

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=20_000, help="env steps per fine-tuning run (default 20000)")
    parser.add_argument("--bc-updates", type=int, default=BC_UPDATES, help=f"BC updates (default {BC_UPDATES})")
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--noise", type=float, help="demo action noise for every task (default: per task, "
                                                     "PickCube 0.3, PegInsert 0.05)")
    parser.add_argument("--fumble", type=float, help="share of demo episodes with a fumble for every task (default: "
                                                      "per task, PickCube 0.2, PegInsert 0.3)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--pixels", action="store_true", help="the image-based variant (front and wrist cameras plus "
                                                                   "proprioception), meant for a GPU")
    parser.add_argument("--image-size", type=int, default=128, help="--pixels: camera images' side (default 128)")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 2000 env steps per method, 3000 BC updates: a fast check that it all runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the base's sampling at "
                                                                   "batch sizes of thousands gains little from 2 here)")
    parser.add_argument("--out", default="runs/bench_diffusion_finetune", help="run directories, replaced per run")
    parser.add_argument("--resume", action="store_true", help="keep what --out holds: finished runs are read, a "
                        "run cut short continues from its last checkpoint (taken at every evaluation), the rest run")
    parser.add_argument("--plot-only", action="store_true", help="only redraw <out>/<Task>/curves.png from the runs "
                                                                 "already in --out, and print their paths")
    args = parser.parse_args()
    if args.plot_only:
        for task in args.tasks:
            name = task_env(task, args.pixels).split("/")[-1]
            print(plot_task(Path(args.out) / name, args.methods))
        return
    for name in ("frames", "bc_updates", "demos", "eval_every", "eval_episodes", "threads", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if (args.fumble is not None and not 0 <= args.fumble <= 1) or (args.noise is not None and args.noise < 0):
        parser.error("--fumble must be in [0, 1] and --noise at least 0")
    if args.image_size != 128 and not args.pixels:
        parser.error("--image-size is for --pixels")
    if args.quick:
        args.seeds, args.frames, args.bc_updates = args.seeds[:1], 2_000, min(args.bc_updates, 3_000)
    torch.set_num_threads(args.threads)
    import time

    t0 = time.perf_counter()
    result = {"pixels": args.pixels, **({"image_size": args.image_size} if args.pixels else {}),
              "seeds": args.seeds, "frames_budget": args.frames, "bc_updates": args.bc_updates, "demos": args.demos,
              "methods": args.methods, "tasks": {}}
    for task in args.tasks:
        res = bench_task(task, args.seeds, args, Path(args.out))
        tuned = [m for m in args.methods if m != "rlpd"]
        res["reached_90_every_seed"] = {m: None not in res[f"{m}_env_steps_to_90"] for m in tuned}
        if "rlpd" in args.methods:
            res["beats_rlpd"] = {m: beats_rlpd(res, m, args.frames) for m in tuned}
        result["tasks"][task_env(task, args.pixels)] = res
    result["goal_met"] = len(args.seeds) >= GOAL_SEEDS and bool(result["tasks"]) and all(
        res.get("beats_rlpd") and all(res["beats_rlpd"].values()) and all(res["reached_90_every_seed"].values())
        for res in result["tasks"].values())
    result["minutes_total"] = round((time.perf_counter() - t0) / 60, 1)
    result["threads"], result["device"] = args.threads, "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
