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

    env = make(args.env, render_mode="rgb_array" if args.video else None)
    policy = rollout.POLICIES[args.policy](env)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("success {task.fields[rate]:.0%}"), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task(f"{args.policy} on {args.env}", total=args.episodes, rate=0.0)
        res = rollout.run_episodes(env, policy, args.episodes, seed=args.seed,
                                   video_episode=0 if args.video else None,
                                   on_episode=lambda r: progress.update(bar, advance=1, rate=r.success_rate))
    print(f"episodes: {args.episodes}  success rate: {res.success_rate:.1%}  "
          f"mean return: {sum(res.returns) / len(res.returns):.2f}  mean length: {sum(res.lengths) / len(res.lengths):.1f}")
    if args.video:
        fps = env.metadata.get("render_fps", 10)
        print(f"video of episode 0: {write_mp4(args.video, res.frames, fps)}")
    env.close()
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
    p.set_defaults(func=cmd_rollout)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "episodes", 1) is not None and getattr(args, "episodes", 1) < 1:
        print("robolearn: --episodes must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"robolearn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
