"""Transitions/s loading a pixel demo dataset into the replay buffer, and bytes per episode.

Writes `--episodes` scripted-expert episodes of robolearn/PandaPickCubePixels-v0 (front and
wrist cameras, 128x128, images gzip-compressed as DatasetWriter does by default, or
`--compression lzf|none`) once, then times `ReplayBuffer.from_dataset` on them `--repeats`
times (median). Also times reading the episodes alone (HDF5 + decompression), and the buffer
alone on episodes already in memory, whole episodes at a time (what from_dataset does) against
add_first + add per step (what it did before), so each cost can be told apart. The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import robolearn.sim as rsim  # noqa: E402  (first: it picks the headless GL backend)
from robolearn.demos.dataset import Dataset, DatasetWriter  # noqa: E402
from robolearn.replay import ReplayBuffer  # noqa: E402

ENV_ID = "robolearn/PandaPickCubePixels-v0"


def write_demos(path: Path, episodes: int, image_size: int, compression: str | None) -> None:
    """Scripted-expert episodes with reset seeds 0, 1, ... (as write_expert_episodes, any compression)."""
    env = rsim.make(ENV_ID, image_size=image_size)
    policy = env.unwrapped.task.expert(env.unwrapped)
    with DatasetWriter(path, ENV_ID, env.observation_space, env.action_space, fps=env.metadata["render_fps"],
                       compression=compression) as writer:
        for seed in range(episodes):
            obs, _ = env.reset(seed=seed)
            writer.begin_episode(obs, seed=seed)
            done = False
            while not done:
                action = policy(obs)
                obs, reward, terminated, truncated, info = env.step(action)
                writer.add_step(action, obs, reward, terminated, truncated, info["success"])
                done = terminated or truncated
            writer.end_episode()
    env.close()


def time_add(episodes: list[dict], spaces, capacity: int, whole: bool) -> float:
    """Seconds to put episodes already in memory into a fresh buffer: add_episode, or add_first + add."""
    buf = ReplayBuffer(capacity, *spaces, device="cpu")
    t = time.perf_counter()
    for ep in episodes:
        obs = ep["obs"]
        if whole:
            buf.add_episode(obs, ep["action"], ep["reward"], ep["terminated"], ep["truncated"], ep["intervention"])
            continue
        buf.add_first({k: v[0] for k, v in obs.items()})
        for i in range(len(ep["action"])):
            buf.add(ep["action"][i], float(ep["reward"][i]), {k: v[i + 1] for k, v in obs.items()},
                    bool(ep["terminated"][i]), bool(ep["truncated"][i]), bool(ep["intervention"][i]))
        buf.end_episode()
    return time.perf_counter() - t


def image_compression(ds: Dataset) -> str:
    import h5py
    key = next(k for k in ds.observation_spec if k.startswith("images/"))
    with h5py.File(ds.paths[0], "r") as f:
        return str(f[f"obs/{key}"].compression or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--compression", choices=["gzip", "lzf", "none"], default="gzip")
    parser.add_argument("--dir", help="dataset directory to reuse or create (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or Path(tmp) / "demos")
        if not (path / "meta.json").exists():
            t = time.perf_counter()
            write_demos(path, args.episodes, args.image_size, None if args.compression == "none" else args.compression)
            print(f"wrote {args.episodes} episodes in {time.perf_counter() - t:.1f} s", flush=True)
        ds = Dataset(path)
        env = rsim.make(ENV_ID, image_size=args.image_size)
        spaces = env.observation_space, env.action_space
        env.close()
        episodes = list(ds)
        read, load, add, add_steps = [], [], [], []
        for r in range(args.repeats):  # interleaved so that machine noise hits all alike
            t = time.perf_counter()
            for _ in ds:
                pass
            read.append(ds.num_steps / (time.perf_counter() - t))
            t = time.perf_counter()
            buf = ReplayBuffer.from_dataset(ds, *spaces, device="cpu")
            load.append(ds.num_steps / (time.perf_counter() - t))
            assert len(buf) == ds.num_steps
            add.append(ds.num_steps / time_add(episodes, spaces, ds.num_steps + len(ds), whole=True))
            add_steps.append(ds.num_steps / time_add(episodes, spaces, ds.num_steps + len(ds), whole=False))
            print(f"repeat {r}: read {read[-1]:.0f} steps/s, load into buffer {load[-1]:.0f} transitions/s; "
                  f"buffer alone: whole episodes {add[-1]:.0f}/s, step by step {add_steps[-1]:.0f}/s", flush=True)
        sizes = [p.stat().st_size for p in ds.paths]
        result = {
            "load_transitions_per_s": round(statistics.median(load), 1),
            "read_steps_per_s": round(statistics.median(read), 1),
            "buffer_add_episode_transitions_per_s": round(statistics.median(add), 1),
            "buffer_add_step_by_step_transitions_per_s": round(statistics.median(add_steps), 1),
            "bytes_per_episode": int(statistics.mean(sizes)),
            "bytes_per_step": round(sum(sizes) / ds.num_steps, 1),
            "episodes": len(ds),
            "transitions": ds.num_steps,
            "mean_episode_length": round(ds.num_steps / len(ds), 1),
            "image_size": args.image_size,
            "cameras": list(ds.meta["cameras"]),
            "compression": image_compression(ds),
            "repeats": args.repeats,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
