"""Does starting episodes from demo states (SnapshotRL) speed up SERL on PandaPickCube from states?

Per seed: record 20 scripted demonstrations (bench/serl_pickcube.py's setting), then train SERL twice,
with the env's own random resets and with `reset_from_demos` (probability --prob of a start drawn
uniformly along a demo), and report env steps and minutes to 90% evaluation success for each.
Evaluation always starts from the env's own resets: only the training env gets demo starts.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import robolearn.sim as rsim
from robolearn.agents.serl import CPU_OVERRIDES
from robolearn.train import TrainConfig, train

from serl_pickcube import record_demos, to_90  # noqa: E402  (bench/ is the script's directory)

ENV_ID = "robolearn/PandaPickCube-v0"
ENV_KWARGS = {"terminate_on_success": False}  # SERL's franka_sim pick-cube, as bench/serl_pickcube.py


def train_env_factory(demos: Path | None, prob: float):
    """Train env with demo-state resets (when `demos`), eval env without: Trainer calls it twice, in that order."""
    calls = []

    def factory():
        calls.append(1)
        extra = {"reset_from_demos": str(demos), "demo_state_prob": prob} if demos and len(calls) == 1 else {}
        return rsim.make(ENV_ID, **ENV_KWARGS, **extra)
    return factory


def run(seed: int, demos: Path, variant: str, args, out_root: Path) -> dict:
    out = out_root / f"{variant}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # the bench's own previous run
    cfg = TrainConfig(agent="serl", env=ENV_ID, out=str(out), frames=args.frames, seed=seed, demos=str(demos),
                      eval_every=args.eval_every, eval_episodes=args.eval_episodes, target_success=0.9,
                      checkpoint_every=args.frames, save_replay=False, video=False, env_kwargs=ENV_KWARGS,
                      agent_overrides=dict(CPU_OVERRIDES))
    t = time.perf_counter()
    result = train(cfg, env_factory=train_env_factory(demos if variant == "demo_state" else None, args.prob))
    history = json.loads((out / "history.json").read_text())
    steps, minutes = to_90(history)
    print(f"seed {seed} {variant}: env steps to 90% {steps}, minutes {minutes}, final success "
          f"{result['final_success']:.0%}, {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    return {"env_steps_to_90": steps, "minutes_to_90": minutes, "final_success": result["final_success"],
            "evals": [[int(s), round(r, 2), round(ret, 2)] for s, ret, r, _ in history["eval"]]}  # steps, success, return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=20_000, help="env-step budget per run")
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--prob", type=float, default=0.5, help="demo_state_prob of the demo-state runs")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: seed 0, 2000 steps, 10 eval episodes per 1000 steps")
    parser.add_argument("--out", default="runs/bench_demo_state_reset")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.frames, args.eval_episodes = args.seeds[:1], 2000, 10
    torch.set_num_threads(args.threads)
    variants = ("random", "demo_state")
    result = {"env_id": ENV_ID, "seeds": args.seeds, "frames_budget": args.frames, "demos": args.demos,
              "demo_state_prob": args.prob, "quick": args.quick, "threads": args.threads,
              **{f"{v}_{k}": [] for v in variants for k in ("env_steps_to_90", "minutes_to_90", "final_success")}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            demos = Path(tmp) / f"demos_{seed}"
            record_demos(ENV_ID, ENV_KWARGS, demos, args.demos, seed)
            for variant in variants:
                r = run(seed, demos, variant, args, Path(args.out))
                for k in ("env_steps_to_90", "minutes_to_90", "final_success"):
                    result[f"{variant}_{k}"].append(r[k])
                result.setdefault(f"{variant}_evals", []).append(r["evals"])
    result["agent_overrides"] = dict(CPU_OVERRIDES)
    result["device"] = "cpu"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
