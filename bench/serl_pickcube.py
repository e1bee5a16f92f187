"""SERL (RLPD) on PandaPickCube from states with 20 scripted demos: env steps and minutes to 90%.

Per seed: record 20 scripted demonstrations, train with 50/50 demo/online batches, evaluate
every --eval-every steps on 20 fixed episodes, and stop at 90% success or the budget. Also
measures critic updates/s beside the machine's arithmetic limit for that network size (its
measured matmul GFLOP/s divided by the FLOPs of one critic update).

--pixels trains from the cameras plus proprioception instead: on a GPU PandaPickCubePixels at
50k steps with SERL's end-to-end conv encoder; on a CPU PandaPickCubePixels from the 64x64 front and
wrist cameras with 20 demos (target >= 80% within 30k steps and 60 minutes), through an encoder
pretrained per seed on simulator frames (robolearn.agents.pretrain; its minutes are reported apart)
and kept frozen, with its features cached in the replay, and DroQ's critic (make demo's setting).
--pixels --task reach is the older CPU pixels check: PandaReachPixels from the 64x64 wrist camera
(target >= 90% within 10k steps), sparse reward, episodes that end on success, end-to-end encoder
at UTD 1, batch 128 and the cheaper (2, 2, 2, 1) conv strides.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import robolearn.sim as rsim
from robolearn.agents.pretrain import PretrainConfig, pretrain_encoder
from robolearn.agents.serl import CPU_OVERRIDES, SERLAgent, SERLConfig
from robolearn.rollout import run_episodes, scripted_policy
from robolearn.train import TrainConfig, train


def record_demos(env_id: str, env_kwargs: dict, path: Path, episodes: int, seed: int) -> None:
    from robolearn.demos.dataset import DatasetWriter

    env = rsim.make(env_id, **env_kwargs)
    with DatasetWriter(path, env_id, env.observation_space, env.action_space, fps=10) as writer:
        run_episodes(env, scripted_policy(env), episodes, seed=10_000 + 100 * seed, recorder=writer)
    env.close()


def matmul_gflops(size: int = 1024, reps: int = 20) -> float:
    """The machine's sustained float32 matmul rate: the arithmetic limit for MLP updates."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e9


def critic_update_gflop(obs_dim: int, act_dim: int, cfg: SERLConfig) -> float:
    """FLOPs of one critic step: ensemble forward on (s, a) and target (s', a'), backward ~2x forward."""
    dims = [obs_dim + act_dim, *cfg.hidden_dims, 1]
    mlp = sum(2 * i * o for i, o in zip(dims[:-1], dims[1:]))
    per_sample = cfg.num_critics * mlp * 3 + cfg.critic_subsample * mlp  # train fwd+bwd, target fwd
    return per_sample * cfg.batch_size / 1e9


def agent_and_batch(env_id: str, env_kwargs: dict, overrides: dict):
    """A SERL agent for the env and one learner batch of UTD x batch-size random transitions."""
    env = rsim.make(env_id, **env_kwargs)
    cfg = SERLConfig(**overrides)
    agent = SERLAgent(env.observation_space, env.action_space, cfg)
    b = cfg.batch_size * cfg.utd_ratio
    obs_dim = env.observation_space["state"].shape[0]
    rng = np.random.default_rng(0)
    def obs():
        return {"state": torch.as_tensor(rng.normal(size=(b, obs_dim)), dtype=torch.float32),
                "tcp_pose": torch.zeros(b, 7)}
    batch = {"obs": obs(), "next_obs": obs(), "action": torch.rand(b, env.action_space.shape[0]) * 2 - 1,
             "reward": torch.rand(b), "discount": torch.full((b,), 0.99)}
    return env, cfg, agent, batch


def measure_updates(env_id: str, env_kwargs: dict, overrides: dict, n: int = 20) -> dict:
    env, cfg, agent, batch = agent_and_batch(env_id, env_kwargs, overrides)
    obs_dim = env.observation_space["state"].shape[0]
    agent.update(batch, 0)
    times = []
    for i in range(n):
        t = time.perf_counter()
        agent.update(batch, i + 1)
        times.append(time.perf_counter() - t)
    critic_per_s = cfg.utd_ratio / statistics.median(times)
    flop = critic_update_gflop(obs_dim, env.action_space.shape[0], cfg)
    peak = matmul_gflops()
    return {"updates_per_s": round(critic_per_s, 1), "gflop_per_critic_update": round(flop, 3),
            "matmul_gflops": round(peak, 1), "arithmetic_limit_updates_per_s": round(peak / flop, 1),
            "fraction_of_limit": round(critic_per_s * flop / peak, 3)}


def update_rate(agent, batch, cfg, seconds: float, governor=None) -> float:
    """Critic updates/s over `seconds` of learner steps (the governor re-checked before each, as in train)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if governor is not None:
            governor.check()
        agent.update(batch, n)
        n += 1
    return cfg.utd_ratio * n / (time.perf_counter() - t0)


def measure_busy(env_id: str, env_kwargs: dict, overrides: dict, busy: int, seconds: float) -> dict:
    """Learner updates/s on an idle machine and with `busy` cores taken by competing processes, with
    the adaptive thread count robolearn train uses and with all cores fixed (torch's default)."""
    import os
    import subprocess
    import sys

    from robolearn.cpu import ThreadGovernor

    _env, cfg, agent, batch = agent_and_batch(env_id, env_kwargs, overrides)
    cores = os.cpu_count() or 1
    out = {"busy_cores": busy, "cores": cores, "seconds_per_measurement": seconds}

    def both(tag: str) -> None:
        torch.set_num_threads(cores)
        update_rate(agent, batch, cfg, 1.0)  # warm-up
        out[f"updates_per_s_{tag}_fixed_threads"] = round(update_rate(agent, batch, cfg, seconds), 1)
        governor = ThreadGovernor(every=0.5)
        update_rate(agent, batch, cfg, 1.0, governor)  # lets the governor take its first two samples
        out[f"updates_per_s_{tag}"] = round(update_rate(agent, batch, cfg, seconds, governor), 1)
        out[f"threads_{tag}"] = governor.threads

    both("idle")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(1.0)
        both("busy")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    out["busy_slowdown"] = round(out["updates_per_s_idle"] / out["updates_per_s_busy"], 2)
    out["busy_slowdown_fixed_threads"] = round(out["updates_per_s_idle_fixed_threads"]
                                               / out["updates_per_s_busy_fixed_threads"], 2)
    return out


def to_90(history: dict, target: float = 0.9) -> tuple[int | None, float | None]:
    """Env steps and minutes at the first evaluation with success >= target (None, None if none)."""
    for env_steps, _ret, success, seconds in history["eval"]:
        if success >= target:
            return int(env_steps), round(seconds / 60, 2)
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, help="budget per seed (default 20000; --pixels 10000/50000)")
    parser.add_argument("--demos", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 4000 steps (with --pixels, a 12-episode, 3-epoch encoder): a fast check that it runs")
    parser.add_argument("--pixels", action="store_true")
    parser.add_argument("--task", choices=("pickcube", "reach"), default="pickcube",
                        help="--pixels on a CPU: PandaPickCubePixels through a pretrained frozen encoder "
                             "(default), or the older PandaReachPixels check")
    parser.add_argument("--cameras", nargs="+",
                        help="--pixels on a CPU: the cameras (default: front and wrist for pickcube, wrist for reach)")
    parser.add_argument("--pretrain-epochs", type=int, default=PretrainConfig.epochs,
                        help="--pixels pickcube on a CPU: epochs of the encoder's pretraining")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", type=int, metavar="N",
                        help="instead of the learning runs: learner updates/s idle and with N cores kept busy by "
                             "competing processes, adaptive threads (robolearn train's default) against fixed")
    parser.add_argument("--busy-seconds", type=float, default=20.0, help="length of each --busy measurement")
    parser.add_argument("--out", help="run directories, replaced on each run (default runs/bench_serl_pickcube, "
                                       "--pixels: runs/bench_serl_pixels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # SERL's franka_sim pick-cube: its dense reward, no termination on success (the episode runs
    # its 100 steps, so holding the cube up keeps paying and success is judged at the last step).
    env_kwargs: dict = {"terminate_on_success": False}
    overrides: dict = dict(CPU_OVERRIDES)  # 2 critics, UTD 8, 3-step returns (see its comment)
    target, pretrain = 0.9, False
    if args.pixels and torch.cuda.is_available():
        env_id, budget = "robolearn/PandaPickCubePixels-v0", 50_000
    elif args.pixels and args.task == "reach":
        env_id, budget = "robolearn/PandaReachPixels-v0", 10_000
        env_kwargs = {"terminate_on_success": True, "reward_type": "sparse", "image_size": 64,
                      "cameras": tuple(args.cameras or ["wrist"])}
        overrides = {**overrides, "utd_ratio": 1, "batch_size": 128, "conv_strides": (2, 2, 2, 1)}
    elif args.pixels:
        env_id, budget, target, pretrain = "robolearn/PandaPickCubePixels-v0", 30_000, 0.8, True
        env_kwargs = {**env_kwargs, "image_size": 64, "cameras": tuple(args.cameras or ["front", "wrist"])}
        overrides = {**overrides, "critic_dropout": 0.01, "frozen_arch": "drq_state"}
    else:
        env_id, budget = "robolearn/PandaPickCube-v0", 20_000
    if args.busy is not None:
        print(json.dumps({"env_id": env_id, **measure_busy(env_id, env_kwargs, overrides, args.busy,
                                                            args.busy_seconds)}))
        return
    out_root = Path(args.out or ("runs/bench_serl_pixels" if args.pixels else "runs/bench_serl_pickcube"))
    seeds, frames = (args.seeds[:1], 4_000) if args.quick else (args.seeds, args.frames or budget)
    pct = round(target * 100)
    result = {"env_id": env_id, "seeds": seeds, "frames_budget": frames, "target_success": target,
              f"env_steps_to_{pct}": [], f"minutes_to_{pct}": [], "final_success": [], "minutes_total": []}
    if pretrain:
        result.update(pretrain_minutes=[], pretrain_metrics=[])
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            demos = Path(tmp) / f"demos_{seed}"
            record_demos(env_id, env_kwargs, demos, args.demos, seed)
            shutil.rmtree(out_root / f"seed{seed}", ignore_errors=True)  # the bench's own previous run
            seed_overrides = overrides
            if pretrain:  # the encoder's own frames and seed; its file lives beside the run
                t0 = time.perf_counter()
                enc = out_root / f"encoder_seed{seed}.safetensors"
                recipe = (PretrainConfig(expert_episodes=4, noisy_episodes=4, random_episodes=4, epochs=3, seed=seed)
                          if args.quick else PretrainConfig(epochs=args.pretrain_epochs, seed=seed))
                metrics = pretrain_encoder(env_id, enc, env_kwargs, recipe,
                                           on_epoch=lambda e, n, loss: print(f"pretrain epoch {e}/{n}: loss {loss:.4f}",
                                                                             flush=True))
                result["pretrain_minutes"].append(round((time.perf_counter() - t0) / 60, 2))
                result["pretrain_metrics"].append(metrics)
                seed_overrides = {**overrides, "frozen_encoder": str(enc)}
            cfg = TrainConfig(agent="serl", env=env_id, out=str(out_root / f"seed{seed}"), frames=frames, seed=seed,
                              demos=str(demos), eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                              target_success=target, checkpoint_every=5_000, save_replay=False,
                              video=seed == seeds[0], env_kwargs=env_kwargs, agent_overrides=seed_overrides)
            out = train(cfg)
            history = json.loads((Path(cfg.out) / "history.json").read_text())
            steps, minutes = to_90(history, target)
            result[f"env_steps_to_{pct}"].append(steps)
            result[f"minutes_to_{pct}"].append(minutes)
            result["final_success"].append(out["final_success"])
            result["minutes_total"].append(round(out["minutes"], 2))
            print(f"seed {seed}: env steps to {pct}% {steps}, minutes {minutes}, "
                  f"final success {out['final_success']:.0%}", flush=True)
    if not args.pixels:
        result.update(measure_updates(env_id, env_kwargs, overrides))
    result["agent_overrides"] = overrides
    result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    result["threads"] = args.threads
    print(json.dumps(result))


if __name__ == "__main__":
    main()
