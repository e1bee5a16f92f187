"""Env steps/s of the pick-cube task (state and pixels) beside the raw limits on this machine.

bare_physics: the same compiled model stepped n_substeps times per env step with mj_step, no
wrapper or controller. bare_render: that physics plus a bare mujoco.Renderer drawing the same
cameras at the same resolution. Medians over repeats; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import robolearn.sim as rsim  # first: it picks the headless GL backend mujoco reads at import

import mujoco  # noqa: E402
import numpy as np  # noqa: E402


def time_env(env_id: str, steps: int, seed: int = 0) -> float:
    env = rsim.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    elapsed = 0.0
    for a in actions:  # resets are excluded from the timing, as the bare loops have none
        t = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(a)
        elapsed += time.perf_counter() - t
        if terminated or truncated:
            env.reset()
    env.close()
    return steps / elapsed


def time_bare(env_id: str, steps: int, render: bool, seed: int = 0) -> float:
    env = rsim.make(env_id).unwrapped
    env.reset(seed=seed)
    m, d, n = env.arm.model, env.arm.data, env.arm.n_substeps
    cams, size = env.cfg.cameras, env.cfg.image_size
    renderer = mujoco.Renderer(m, size, size) if render else None
    t = time.perf_counter()
    for _ in range(steps):
        for _ in range(n):
            mujoco.mj_step(m, d)
        if renderer is not None:
            for cam in cams:
                renderer.update_scene(d, camera=cam)
                renderer.render()
    elapsed = time.perf_counter() - t
    if renderer is not None:
        renderer.close()
    env.close()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--state-steps", type=int, default=2000)
    parser.add_argument("--pixel-steps", type=int, default=200)
    args = parser.parse_args()
    runs = {k: [] for k in ("state", "bare_physics", "pixel", "bare_render")}
    for r in range(args.repeats):  # interleaved so that machine noise hits all four alike
        runs["state"].append(time_env("robolearn/PandaPickCube-v0", args.state_steps, r))
        runs["bare_physics"].append(time_bare("robolearn/PandaPickCube-v0", args.state_steps, False, r))
        runs["pixel"].append(time_env("robolearn/PandaPickCubePixels-v0", args.pixel_steps, r))
        runs["bare_render"].append(time_bare("robolearn/PandaPickCubePixels-v0", args.pixel_steps, True, r))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    env = rsim.make("robolearn/PandaPickCubePixels-v0").unwrapped
    result = {
        "state_env_steps_per_s": round(med["state"], 1),
        "bare_physics_env_steps_per_s": round(med["bare_physics"], 1),
        "state_overhead_ratio": round(med["bare_physics"] / med["state"], 3),
        "pixel_env_steps_per_s": round(med["pixel"], 2),
        "bare_render_env_steps_per_s": round(med["bare_render"], 2),
        "pixel_overhead_ratio": round(med["bare_render"] / med["pixel"], 3),
        "physics_substeps_per_env_step": env.arm.n_substeps,
        "cameras": list(env.cfg.cameras),
        "image_size": env.cfg.image_size,
        "mujoco_gl": __import__("os").environ.get("MUJOCO_GL"),
        "repeats": args.repeats,
    }
    env.close()
    print(json.dumps(result))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
