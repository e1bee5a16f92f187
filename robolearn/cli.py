"""The `robolearn` command: `robolearn <command> --help` documents each command."""

from __future__ import annotations

import argparse
import sys


def cmd_envs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from robolearn.sim import registry

    table = Table(title="robolearn environments")
    table.add_column("id", no_wrap=True)
    table.add_column("observation")
    table.add_column("scripted expert")
    for env_id in registry.panda_ids():
        table.add_row(env_id, "front+wrist cameras + proprio" if "Pixels" in env_id else "state", "yes")
    if args.all:
        for env_id in registry.all_ids()[len(registry.panda_ids()):]:
            table.add_row(env_id, "84x84 pixels, stack 3", "no")
    else:
        table.add_row(f"robolearn/dmc-<task>-v0 ({len(registry.all_ids()) - len(registry.panda_ids())} tasks)",
                      "84x84 pixels, stack 3", "no (--all lists them)")
    Console().print(table)
    return 0


def cmd_rollout(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from robolearn import rollout
    from robolearn.sim import make
    from robolearn.video import write_mp4

    from robolearn.demos.dataset import DatasetWriter

    env = make(args.env, render_mode="rgb_array" if args.video else None, **_parse_overrides(args.env_set))
    policy = rollout.POLICIES[args.policy](env)
    recorder = None
    if args.record:
        recorder = DatasetWriter(args.record, args.env, env.observation_space, env.action_space,
                                 fps=env.metadata.get("render_fps", 10))
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("success {task.fields[rate]:.0%}"), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task(f"{args.policy} on {args.env}", total=args.episodes, rate=0.0)
        res = rollout.run_episodes(env, policy, args.episodes, seed=args.seed,
                                   video_episode=0 if args.video else None,
                                   on_episode=lambda r: progress.update(bar, advance=1, rate=r.success_rate),
                                   recorder=recorder)
    if recorder is not None:
        recorder.close()
        print(f"recorded {args.episodes} episodes to {args.record}")
    print(f"episodes: {args.episodes}  success rate: {res.success_rate:.1%}  "
          f"mean return: {sum(res.returns) / len(res.returns):.2f}  mean length: {sum(res.lengths) / len(res.lengths):.1f}")
    if args.video:
        fps = env.metadata.get("render_fps", 10)
        print(f"video of episode 0: {write_mp4(args.video, res.frames, fps)}")
    env.close()
    return 0


def _parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE pairs, values parsed as JSON where they parse (numbers, lists, true/false)."""
    import json
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_train(args) -> int:
    import torch

    from robolearn.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(agent=args.agent, env=args.env, out=args.out or f"runs/{args.agent}_{args.env.split('/')[-1]}",
                      frames=args.frames, seed=args.seed, demos=args.demos, eval_every=args.eval_every,
                      eval_episodes=args.eval_episodes, target_success=args.target_success,
                      checkpoint_every=args.checkpoint_every, video=not args.no_video,
                      env_kwargs=_parse_overrides(args.env_set), agent_overrides=_parse_overrides(args.set))
    result = train(cfg, resume=args.resume)
    print(f"env steps: {result['env_steps']}  final eval success: {result['final_success']:.0%}  "
          f"minutes: {result['minutes']:.1f}")
    print(f"checkpoint:     {result['checkpoint']}")
    print(f"learning curve: {result['curve']}")
    if "video" in result:
        print(f"eval video:     {result['video']}")
    return 0


def cmd_eval(args) -> int:
    from robolearn.sim import make
    from robolearn.train import evaluate, load_agent
    from robolearn.checkpoint import read_config
    from robolearn.video import write_mp4

    config = read_config(args.checkpoint)
    env = make(args.env or config["env_id"], render_mode="rgb_array")
    agent, _ = load_agent(args.checkpoint, env)
    rate, ret, frames = evaluate(agent, env, args.episodes, seed=args.seed, record=bool(args.video))
    print(f"{config['agent']} on {config['env_id']}: success {rate:.1%} over {args.episodes} episodes, "
          f"mean return {ret:.2f}")
    if args.video:
        print(f"video of episode 0: {write_mp4(args.video, frames, env.metadata.get('render_fps', 10))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robolearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("envs", help="list the registered tasks", description="List the registered tasks.")
    p.add_argument("--all", action="store_true", help="also list every dm_control task id")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("rollout", help="run a policy for N episodes and report success",
                       description="Run a scripted or random policy in a task; print the success rate and "
                                   "optionally save an mp4 of the first episode.")
    p.add_argument("--env", required=True, help="env id, e.g. robolearn/PandaPickCube-v0 (see `robolearn envs`)")
    p.add_argument("--policy", choices=sorted(("scripted", "random")), default="scripted",
                   help="scripted: the task's expert; random: uniform actions (default: scripted)")
    p.add_argument("--episodes", type=int, default=10, help="number of episodes (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode; episode k uses seed+k")
    p.add_argument("--video", metavar="OUT.mp4", help="write the first episode to this mp4")
    p.add_argument("--record", metavar="DIR", help="append every episode to this episode dataset (docs/dataset.md), "
                                                   "e.g. scripted demonstrations for --demos")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE",
                   help="env option, e.g. reward_type=sparse or image_size=64 (record demos as you will train)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("train", help="train an agent in simulation",
                       description="Train DrQ-v2 or SERL (RLPD) in a task. Writes TensorBoard logs, checkpoints "
                                   "(safetensors + JSON), a learning-curve PNG and an eval video under --out.")
    p.add_argument("--agent", choices=["drqv2", "serl"], required=True)
    p.add_argument("--env", required=True, help="env id (see `robolearn envs`)")
    p.add_argument("--demos", help="episode dataset directory for the demo buffer (50/50 sampling)")
    p.add_argument("--frames", type=int, default=20_000, help="env frames to train for (default: 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default: runs/<agent>_<env>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-every", type=int, default=2_000, help="agent steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--target-success", type=float, help="stop once evaluation success reaches this (0..1)")
    p.add_argument("--checkpoint-every", type=int, default=5_000, help="agent steps between checkpoints")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="agent config field, e.g. utd_ratio=8")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE", help="env option, e.g. image_size=64")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-video", action="store_true", help="skip the final eval video")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Run a checkpoint's policy without exploration noise; print success and return.")
    p.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or one step_* dir")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--env", help="env id (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=1_000_000, help="seed of the first episode")
    p.add_argument("--video", metavar="OUT.mp4", help="write episode 0 to this mp4")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from robolearn.demos.dataset import DatasetError

    args = build_parser().parse_args(argv)
    if getattr(args, "episodes", 1) is not None and getattr(args, "episodes", 1) < 1:
        print("robolearn: --episodes must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, DatasetError) as err:
        print(f"robolearn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged run: the message names the step and last checkpoint
        print(f"robolearn {args.command}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
