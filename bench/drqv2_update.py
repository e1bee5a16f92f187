"""Seconds per DrQ-v2 update (critic + encoder, actor, target) at drqv2's settings.

Batch 256 of 84x84x9 uint8 HWC frames, as the replay gives them, 6-D actions. Times our update
beside `reference_update`, the same update written as drqv2.py does it (grid_sample shifts on
float NCHW frames, two encoder passes, contiguous NCHW convolutions, the actor loss
backpropagated into the critic, torch's default Adam), on a twin agent built with
channels_last=False and fused_adam=False. The two alternate update by update, so a load change
on a shared machine hits both alike; figures are medians. FLOPs come from
torch.utils.flop_counter over one update (matmuls and convolutions, forward and backward).
Beside wall seconds it reports the process's CPU seconds per update (all threads), which a busy
machine inflates much less. Both agents run under the same process settings: malloc keeps freed
memory (robolearn.cpu.reuse_freed_memory) and OpenMP's wait policy is chosen by
--omp-wait-policy. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os

from robolearn.cpu import busy_cores, reuse_freed_memory

# OpenMP's wait policy is read once, when torch starts its thread pool, so it is chosen before
# torch is imported. Spinning threads (ACTIVE) start each of an update's parallel regions
# without a futex wake-up: 10-20% faster on an idle machine. On a shared one a spinning barrier
# stalls for a whole time slice whenever a peer thread is descheduled (measured: 2.8x slower
# under a load of 4), so `auto` spins only when the machine is idle before the run starts.
PROCESS_ARGS = argparse.ArgumentParser(add_help=False)
PROCESS_ARGS.add_argument("--omp-wait-policy", choices=("auto", "active", "passive"), default="auto",
                          help="OpenMP threads spin (active) or sleep (passive) between parallel regions; auto: "
                               "active when other processes use under a quarter of a core (an OMP_WAIT_POLICY "
                               "in the environment wins)")
PROCESS_ARGS.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                          help="reuse: malloc keeps freed memory, as `robolearn train` sets it; default: glibc's "
                               "own (large blocks go back to the kernel on free and fault back in)")
_pre_args = PROCESS_ARGS.parse_known_args()[0]
_policy = _pre_args.omp_wait_policy
BUSY_BEFORE = busy_cores(1.0)
if "OMP_WAIT_POLICY" not in os.environ:
    if _policy == "auto":
        _policy = "active" if BUSY_BEFORE is not None and BUSY_BEFORE < 0.25 else "passive"
    os.environ["OMP_WAIT_POLICY"] = _policy.upper()
MALLOC_REUSE = _pre_args.malloc == "reuse" and reuse_freed_memory()

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from robolearn.agents.base import default_device  # noqa: E402
from robolearn.agents.drqv2 import DrQV2Agent, DrQV2Config, reference_update  # noqa: E402


def make_batch(n: int, action_dim: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def frames():
        return torch.randint(0, 256, (n, 84, 84, 9), dtype=torch.uint8, generator=g).to(device)

    return {"obs": {"images/pixels": frames()}, "next_obs": {"images/pixels": frames()},
            "action": (torch.rand(n, action_dim, generator=g) * 2 - 1).to(device),
            "reward": torch.rand(n, generator=g).to(device),
            "discount": torch.full((n,), 0.99**3).to(device)}


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[PROCESS_ARGS])
    parser.add_argument("--updates", type=int, default=10, help="timed updates of ours")
    parser.add_argument("--reference-updates", type=int, default=None,
                        help="timed reference-like updates (default: same as --updates; 0 skips)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--action-dim", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    args = parser.parse_args()
    ref_updates = args.updates if args.reference_updates is None else args.reference_updates

    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    obs_space = spaces.Dict({"images/pixels": spaces.Box(0, 255, (84, 84, 9), np.uint8)})
    act_space = spaces.Box(-1.0, 1.0, (args.action_dim,), np.float32)
    cfg = DrQV2Config(batch_size=args.batch_size)
    ours = DrQV2Agent(obs_space, act_space, cfg, device)
    ref = DrQV2Agent(obs_space, act_space, DrQV2Config(batch_size=args.batch_size, channels_last=False,
                                                       fused_adam=False), device)
    batches = [make_batch(args.batch_size, args.action_dim, device, seed) for seed in range(2)]
    step = cfg.num_seed_steps + 1000
    busy = "unknown" if BUSY_BEFORE is None else f"{BUSY_BEFORE:.2f}"
    print(f"device {device}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"malloc reuse {MALLOC_REUSE}, cores busy before the run {busy}, batch {args.batch_size}, "
          f"chunk {ours.chunk_size}, load {os.getloadavg()[0]:.2f}", flush=True)

    with FlopCounterMode(display=False) as counter:
        ours.update(batches[0], step)
    gflop = counter.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as counter:
        reference_update(ref, batches[0], step)
    ref_gflop = counter.get_total_flops() / 1e9
    print(f"GFLOP per update: ours {gflop:.1f}, reference-like {ref_gflop:.1f}", flush=True)

    for i in range(args.warmup):
        ours.update(batches[i % 2], step)
        if ref_updates:
            reference_update(ref, batches[i % 2], step)
    t_ours, t_ref = [], []
    for i in range(max(args.updates, ref_updates)):
        b = batches[i % 2]
        line = f"update {i + 1}:"
        if i < args.updates:
            t_ours.append(timed(lambda b=b, i=i: ours.update(b, step + i), device))
            line += f" ours {t_ours[-1][0]:.3f} s (cpu {t_ours[-1][1]:.3f} s)"
        if i < ref_updates:
            t_ref.append(timed(lambda b=b, i=i: reference_update(ref, b, step + i), device))
            line += f", reference-like {t_ref[-1][0]:.3f} s (cpu {t_ref[-1][1]:.3f} s)"
        print(line + f", load {os.getloadavg()[0]:.2f}", flush=True)

    sec = statistics.median(t for t, _ in t_ours)
    cpu = statistics.median(c for _, c in t_ours)
    out = {"seconds_per_update": round(sec, 4), "gflop_per_update": round(gflop, 2),
           "gflops": round(gflop / sec, 1), "cpu_seconds_per_update": round(cpu, 4),
           "batch_size": args.batch_size, "updates": args.updates, "device": str(device),
           "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
           "malloc_reuse": MALLOC_REUSE, "busy_cores_before": None if BUSY_BEFORE is None else round(BUSY_BEFORE, 2),
           "load_avg_1min": round(os.getloadavg()[0], 2)}
    if t_ref:
        ref_sec = statistics.median(t for t, _ in t_ref)
        ref_cpu = statistics.median(c for _, c in t_ref)
        out.update({"reference_like_seconds_per_update": round(ref_sec, 4),
                    "reference_like_cpu_seconds_per_update": round(ref_cpu, 4),
                    "reference_like_gflop_per_update": round(ref_gflop, 2),
                    "speedup": round(ref_sec / sec, 2), "cpu_speedup": round(ref_cpu / cpu, 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
