"""Recording speed: the scripted device, unpaced, on pick-cube with two 128x128 cameras (front, wrist).

record_fps is steps per second of whole episodes through the recorder (reset, expert, render,
gzip-compressed HDF5 writes, fsync and rename included), median over episodes. env_fps runs the
same expert on the same seeds without recording, so the difference is the recorder's cost.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import robolearn.sim as rsim  # first: it picks the headless GL backend mujoco reads at import

from robolearn.demos.dataset import DatasetWriter  # noqa: E402
from robolearn.demos.recorder import RecordConfig, Recorder  # noqa: E402
from robolearn.demos.teleop import make_device  # noqa: E402

ENV_ID = "robolearn/PandaPickCubePixels-v0"


def env_only_fps(env, episodes: int, seed: int) -> list[float]:
    expert = env.unwrapped.task.expert(env.unwrapped)
    rates = []
    for ep in range(episodes):
        t = time.perf_counter()
        obs, _ = env.reset(seed=seed + ep)
        steps, done = 0, False
        while not done:
            obs, _, terminated, truncated, _ = env.step(expert(obs))
            steps, done = steps + 1, terminated or truncated
        rates.append(steps / (time.perf_counter() - t))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"])
    args = parser.parse_args()
    cameras = ("front", "wrist")
    env = rsim.make(ENV_ID, image_size=args.image_size, cameras=cameras)
    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(os.path.join(tmp, "demos"), ENV_ID, env.observation_space, env.action_space, fps=10,
                               compression=None if args.compression == "none" else args.compression)
        device = make_device("scripted")
        log = io.StringIO()
        with writer:
            summary = Recorder(env, device, writer, RecordConfig(episodes=args.episodes, pace=False), out=log).run()
        sizes = [p.stat().st_size for p in summary.paths]
    for i, (n, r, b) in enumerate(zip(summary.lengths, summary.episode_fps, sizes)):
        print(f"episode {i}: {n} steps, {r:.1f} steps/s, {b / 1e6:.2f} MB", flush=True)
    plain = env_only_fps(env, args.episodes, seed=0)
    record_fps = statistics.median(summary.episode_fps)
    result = {
        "env_id": ENV_ID,
        "cameras": list(cameras),
        "image_size": args.image_size,
        "compression": args.compression,
        "episodes": args.episodes,
        "record_fps": round(record_fps, 1),
        "env_fps": round(statistics.median(plain), 1),
        "recorder_overhead": round(statistics.median(plain) / record_fps, 3),
        "steps_per_episode": statistics.median(summary.lengths),
        "bytes_per_episode": int(statistics.median(sizes)),
        "bytes_per_step": int(sum(sizes) / sum(summary.lengths)),
        "success_rate": sum(summary.successes) / len(summary.successes),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
    }
    env.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
