"""Milliseconds per `ReplayBuffer.sample(256)` of 84x84x9 frame stacks (DrQ-v2's batch).

Fills a 3000-slot buffer (frame_stack 3, nstep 3, 24-d state, 6-d action) past its capacity so
it has wrapped, then times `--repeats` samples after a few warm-up ones. This was a wall-clock
threshold inside tests/test_replay.py (under 60 ms); timings belong here, where a loaded machine
cannot fail the suite. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from robolearn.replay import ReplayBuffer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--target-ms", type=float, default=60.0, help="the threshold the benchmark reports against")
    args = ap.parse_args()
    obs_space = gym.spaces.Dict({"images/pixels": gym.spaces.Box(0, 255, (84, 84, 9), np.uint8),
                                 "state": gym.spaces.Box(-np.inf, np.inf, (24,), np.float32)})
    act_space = gym.spaces.Box(-1, 1, (6,), np.float32)
    buf = ReplayBuffer(3000, obs_space, act_space, frame_stack=3, nstep=3, gamma=0.99, device="cpu")
    rng = np.random.default_rng(0)

    def obs():
        return {"images/pixels": rng.integers(0, 256, (84, 84, 9), dtype=np.uint8),
                "state": rng.normal(size=24).astype(np.float32)}

    buf.add_first(obs())
    for i in range(3200):  # wraps around
        done = i % 250 == 249
        buf.add(rng.uniform(-1, 1, 6), 1.0, obs(), False, done)
        if done:
            buf.add_first(obs())
    for _ in range(3):
        buf.sample(args.batch, rng)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        buf.sample(args.batch, rng)
        times.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times)
    print(f"sample({args.batch}) of 84x84x9 stacks: median {median:.2f} ms, max {max(times):.2f} ms")
    print(json.dumps({"benchmark": "replay_sample", "batch": args.batch, "median_ms": round(median, 3),
                      "max_ms": round(max(times), 3), "target_ms": args.target_ms,
                      "pass": median < args.target_ms}))


if __name__ == "__main__":
    main()
