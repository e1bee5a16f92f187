"""Worst excursion of the tool outside the workspace box, and of the joints past their limits.

PandaPickCube under random, corner-held, reversing and near-base table-sweep full actions (the
sequences that push an impedance-controlled arm hardest). The near-base kind holds a low corner
next to the base with the fingers on the table, then reverses: it folds the arm onto joint 4's
limit, where the simulator once threw the tool 20 mm out before it braked joints past their
velocity limits. The last stdout line is one JSON object; negative joint
figures mean the joints stayed inside their limits by that much.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import robolearn.sim as rsim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    env = rsim.make("robolearn/PandaPickCube-v0").unwrapped
    low, high = np.array(env.cfg.safety.workspace_low), np.array(env.cfg.safety.workspace_high)
    corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3).astype(float)
    rng = np.random.default_rng(0)
    worst = {"random": -np.inf, "corners": -np.inf, "reversals": -np.inf, "near_base": -np.inf}
    worst_joint = -np.inf
    for ep in range(args.episodes):
        env.reset(seed=ep)
        kind = list(worst)[ep % 4]
        period = int(rng.integers(3, 15))
        side, hold = rng.choice([-1.0, 1.0]), int(rng.integers(10, 30))
        for t in range(args.steps):
            if kind == "random":
                a = rng.uniform(-1, 1, 4)
            elif kind == "corners":
                a = np.append(corners[(ep + t // 10) % 8], rng.choice([-1.0, 1.0]))
            elif kind == "reversals":
                a = np.append(corners[ep % 8] * (1 if (t // period) % 2 else -1), 1.0)
            else:  # along the table by the base, then full reversals, then back toward the base
                sweep = np.array([-1.0, side, -1.0])
                a = np.append(sweep if t < hold else -sweep if (t - hold) % 2 else np.array([-1.0, -side, -1.0]),
                              rng.choice([-1.0, 1.0]))
            env.step(a.astype(np.float32))
            p, q = env.arm.tool_pos(), env.arm.kin.q(env.arm.data)
            worst[kind] = max(worst[kind], np.max(low - p), np.max(p - high))
            worst_joint = max(worst_joint, np.max(env.arm.kin.q_low - q), np.max(q - env.arm.kin.q_high))
        if ep % 50 == 49:
            print(f"{ep + 1} episodes: " + ", ".join(f"{k} {v * 1000:.2f} mm" for k, v in worst.items()), flush=True)
    result = {f"max_box_violation_mm_{k}": round(v * 1000, 3) for k, v in worst.items()}
    result["max_box_violation_mm"] = round(max(worst.values()) * 1000, 3)
    result["max_joint_limit_violation_mrad"] = round(worst_joint * 1000, 3)
    result["episodes"], result["steps_per_episode"] = args.episodes, args.steps
    print(json.dumps(result))


if __name__ == "__main__":
    main()
