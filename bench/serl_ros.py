"""SERL on PandaPickCube from states with 20 scripted demos, trained through ROS 2: actor and learner apart.

Per seed: record 20 scripted demonstrations (as bench/serl_pickcube.py), then run
`robolearn launch launch/sim_train.launch.xml` (sim_robot_node, agent_node mode:=train, learner_node:
three processes on loopback DDS) until the actors' last 10 evaluation episodes reach 90% success or
the env-step budget. Evaluation episodes are every `--eval-every`-th actor episode, deterministic.
Reports per seed the env steps and minutes to 90% (null if never), the final evaluation success,
and how far the learner fell behind. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def steps_to(history: dict, target: float, window: int = 10) -> tuple[int | None, float | None]:
    """(env steps, minutes) at which the last `window` evaluation episodes first reach `target` success."""
    rows = history["eval"]
    for i in range(window - 1, len(rows)):
        if sum(r[2] for r in rows[i - window + 1:i + 1]) / window >= target:
            return rows[i][0], rows[i][3]
    return None, None


def run_seed(seed: int, args, root: Path) -> dict:
    from robolearn.ros.common import isolated_env
    from serl_pickcube import record_demos

    demos, out = root / f"demos_{seed}", root / f"run_{seed}"
    shutil.rmtree(demos, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    record_demos("robolearn/PandaPickCube-v0", {"terminate_on_success": False}, demos, args.demos, seed)
    cmd = [sys.executable, "-m", "robolearn.cli", "launch", str(ROOT / "launch/sim_train.launch.xml"),
           f"demos:={demos}", f"out:={out}", f"frames:={args.frames}", f"seed:={seed}", f"rate:={args.rate}",
           f"real_time_factor:={args.rate / 10.0}", f"target_success:={args.target}", f"eval_every:={args.eval_every}"]
    t0 = time.monotonic()
    log = root / f"launch_{seed}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env={**isolated_env(), "OMP_NUM_THREADS": "1"}, stdout=f,
                              stderr=subprocess.STDOUT, timeout=args.timeout)
    minutes = (time.monotonic() - t0) / 60
    history = json.loads((out / "history.json").read_text())
    state = json.loads((out / "checkpoints" / json.loads((out / "checkpoints/latest.json").read_text())["path"]
                        / "state.json").read_text())
    steps, mins = steps_to(history, args.target)
    last = history["eval"][-10:]
    return {"seed": seed, "returncode": proc.returncode, "env_steps_to_90": steps, "minutes_to_90": mins,
            "final_eval_success": sum(r[2] for r in last) / max(1, len(last)), "env_steps": state["env_steps"],
            "updates": state["updates"], "updates_per_env_step": round(state["updates"] / max(1, state["env_steps"]), 3),
            "minutes": round(minutes, 2), "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=20_000, help="env-step budget per seed")
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0,
                        help="actor rate, Hz of wall time; the simulator runs rate/10 times real time, so one action "
                             "is always 0.1 s of simulated time (10: a real robot's pace)")
    parser.add_argument("--eval-every", type=int, default=2, help="every N-th actor episode is an evaluation")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per seed")
    parser.add_argument("--quick", action="store_true", help="one seed, 1500 env steps: a check that it runs")
    parser.add_argument("--out", help="where demos and runs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.frames = args.seeds[:1], 1500
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_serl_ros_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        seeds = [run_seed(s, args, root) for s in args.seeds]
        for s in seeds:
            print(f"seed {s['seed']}: {s['env_steps_to_90']} env steps to {args.target:.0%} "
                  f"({s['minutes_to_90']} min), final eval {s['final_eval_success']:.0%}, "
                  f"{s['updates_per_env_step']} updates per env step", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    reached = [s["env_steps_to_90"] for s in seeds]
    print(json.dumps({"task": "robolearn/PandaPickCube-v0", "transport": "ros2 (sim_train.launch.xml)",
                      "rate_hz": args.rate, "frames": args.frames, "seeds": seeds,
                      "env_steps_to_90": reached, "minutes_to_90": [s["minutes_to_90"] for s in seeds],
                      "goal_met": all(r is not None for r in reached)}))


if __name__ == "__main__":
    main()
