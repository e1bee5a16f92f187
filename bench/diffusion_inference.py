"""Milliseconds per action chunk of the diffusion policy on this CPU: one `agent.sample` call
(batch 1, DDIM at the default inference_steps, the EMA model, under torch.inference_mode).

Two agents at the default DiffusionConfig: from PandaPickCube's states (the MLP denoiser) and
from two 128x128 cameras plus state (the UNet denoiser). Their calls alternate, so a load change
on a shared machine hits both alike; figures are medians (and 90th percentiles) after warm-up.
Threads: the cores other processes leave free (robolearn.cpu.busy_cores), capped at --max-threads
(default 1, see its help); the other candidate (all free cores, or one) is timed as well, under
keys ending `_<n>thread`.
Goals: <= 25 ms (states) and <= 80 ms (cameras). `--reference` also times one denoising step of
Chi's default low-dim UNet (down dims 256/512/1024, step embedding 256) at batch 1, beside one
step of ours. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os

from robolearn.cpu import busy_cores

PROCESS_ARGS = argparse.ArgumentParser(add_help=False)
PROCESS_ARGS.add_argument("--threads", type=int, default=None,
                          help="torch threads (default: the cores other processes leave free, at least 1 and at "
                               "most --max-threads)")
PROCESS_ARGS.add_argument("--max-threads", type=int, default=1,
                          help="cap on the default thread count: batch-1 sampling is a chain of small ops, and on "
                               "the 2-core VM a second thread made image chunks 2.5x slower with a third of a core "
                               "taken by another process")
_pre = PROCESS_ARGS.parse_known_args()[0]
CORES = os.cpu_count() or 1
BUSY_BEFORE = busy_cores(1.0)
# OpenMP reads its wait policy once, when torch starts its pool: spinning workers win on an idle
# machine and stall on a shared one (see bench/drqv2_update.py).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE" if BUSY_BEFORE is not None and BUSY_BEFORE < 0.25 else "PASSIVE"

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402

from robolearn.agents.diffusion import DiffusionAgent, DiffusionConfig, UNetDenoiser  # noqa: E402


def observation_spaces() -> tuple[spaces.Dict, spaces.Dict, str]:
    """PandaPickCube's state space and its two-camera pixel space, from the simulator when it is installed."""
    try:
        import robolearn.sim as rsim

        env = rsim.make("robolearn/PandaPickCube-v0")
        state_space = env.observation_space
        env.close()
        source = "robolearn.sim"
    except ImportError:
        state_space = spaces.Dict({"state": spaces.Box(-np.inf, np.inf, (10,), np.float32),
                                   "tcp_pose": spaces.Box(-np.inf, np.inf, (7,), np.float32)})
        source = "built (robolearn.sim not installed)"
    cams = {f"images/{c}": spaces.Box(0, 255, (128, 128, 3), np.uint8) for c in ("front", "wrist")}
    return state_space, spaces.Dict({**cams, **state_space.spaces}), source


def random_window(space: spaces.Dict, horizon: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in space.spaces.items():
        if s.dtype == np.uint8:
            out[k] = torch.as_tensor(rng.integers(0, 256, (1, horizon, *s.shape), dtype=np.uint8))
        else:
            out[k] = torch.as_tensor(rng.standard_normal((1, horizon, *s.shape), dtype=np.float32))
    return out


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def summary(times: list[float]) -> tuple[float, float]:
    return round(statistics.median(times), 2), round(float(np.percentile(times, 90)), 2)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[PROCESS_ARGS])
    parser.add_argument("--calls", type=int, default=50, help="timed sample calls per agent")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reference", action="store_true",
                        help="also time one denoising step of Chi's default low-dim UNet (256/512/1024)")
    parser.add_argument("--reference-calls", type=int, default=20)
    args = parser.parse_args()

    free = max(1, CORES if BUSY_BEFORE is None else round(CORES - BUSY_BEFORE))
    threads = args.threads or min(max(1, args.max_threads), free)
    torch.set_num_threads(threads)
    state_space, image_space, source = observation_spaces()
    action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
    cfg = DiffusionConfig()
    agents = {"state": DiffusionAgent(state_space, action_space, cfg, device="cpu"),
              "image": DiffusionAgent(image_space, action_space, cfg, device="cpu")}
    windows = {k: random_window(s, cfg.obs_horizon, i) for i, (k, s) in enumerate(
        [("state", state_space), ("image", image_space)])}
    busy = "unknown" if BUSY_BEFORE is None else f"{BUSY_BEFORE:.2f}"
    print(f"threads {threads}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, cores busy before {busy}, "
          f"spaces from {source}, denoisers: state {agents['state'].denoiser_kind}, "
          f"image {agents['image'].denoiser_kind}", flush=True)

    # The other candidate is timed too, in alternating blocks of calls: all the free cores when the
    # cap left some unused, else one thread.
    other = free if free > threads else (1 if threads > 1 else None)
    counts = [threads] + ([other] if other else [])
    times = {(n, key): [] for n in counts for key in agents}
    block = 10
    with torch.inference_mode():
        for _ in range(args.warmup):
            for key, agent in agents.items():
                agent.sample(windows[key])
        for _ in range(-(-args.calls // block)):
            for n in counts:
                torch.set_num_threads(n)
                for i in range(block + 1):  # the first call after a thread change is not timed
                    for key, agent in agents.items():
                        t = ms(lambda a=agent, w=windows[key]: a.sample(w))
                        if i > 0:
                            times[n, key].append(t)
        torch.set_num_threads(threads)
        # The image agent's parts: its encoder runs once per chunk, its UNet once per DDIM step.
        img = agents["image"]
        cond = img.ema.encode(windows["image"], img.obs_keys)
        enc_ms = summary([ms(lambda: img.ema.encode(windows["image"], img.obs_keys)) for _ in range(args.calls)])
        x, t = torch.randn(1, cfg.pred_horizon, 4), torch.tensor([50])
        step_ms = summary([ms(lambda: img.ema.denoiser(x, t, cond)) for _ in range(args.calls)])

    out = {}
    for n in counts:
        tag = "" if n == threads else f"_{n}thread"
        for key in agents:
            med, p90 = summary(times[n, key])
            out[f"chunk_ms_{key}{tag}"], out[f"chunk_ms_{key}{tag}_p90"] = med, p90
    out.update({"goal_ms_state": 25, "goal_ms_image": 80,
                "params_state": n_params(agents["state"].ema), "params_image": n_params(agents["image"].ema),
                "encoder_ms_image": enc_ms[0], "unet_step_ms": step_ms[0],
                "inference_steps": cfg.inference_steps, "pred_horizon": cfg.pred_horizon,
                "calls": len(times[threads, "state"]), "threads": threads,
                "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                "busy_cores_before": None if BUSY_BEFORE is None else round(BUSY_BEFORE, 2),
                "load_avg_1min": round(os.getloadavg()[0], 2)})

    if args.reference:
        state_dim = int(state_space["state"].shape[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ref = UNetDenoiser(4, state_dim * cfg.obs_horizon, (256, 512, 1024), 5, 8, 256).eval()
        x, t, cond = torch.randn(1, cfg.pred_horizon, 4), torch.tensor([50]), torch.randn(1, state_dim * cfg.obs_horizon)
        with torch.inference_mode():
            for _ in range(3):
                ref(x, t, cond)
            ref_ms = summary([ms(lambda: ref(x, t, cond)) for _ in range(args.reference_calls)])
        out.update({"reference_unet_step_ms": ref_ms[0], "reference_unet_step_ms_p90": ref_ms[1],
                    "reference_unet_params": n_params(ref),
                    "reference_chunk_ms_estimate": round(ref_ms[0] * cfg.inference_steps, 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
