"""The `robolearn` command: `robolearn <command> --help` documents each command."""

from __future__ import annotations

import argparse
import sys

from robolearn.agents import registry


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

    if args.video:
        _check_writable(args.video, "--video", "file")
    if args.record:
        _check_writable(args.record, "--record", "dir")
    env = make(args.env, render_mode="rgb_array" if args.video else None, **_parse_overrides(args.env_set))
    if args.backward is not None:
        from robolearn.sim.backward import BackwardTask
        env = BackwardTask(env, max_steps=args.backward)
        policy = env.scripted_policy() if args.policy == "scripted" else rollout.random_policy(env)
    else:
        policy = rollout.POLICIES[args.policy](env)
    recorder = None
    if args.record:
        recorder = DatasetWriter(args.record, args.env, env.observation_space, env.action_space,
                                 fps=env.metadata.get("render_fps", 10))
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("success {task.fields[rate]:.0%}"), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        what = f"{args.env} (backward)" if args.backward is not None else args.env
        bar = progress.add_task(f"{args.policy} on {what}", total=args.episodes, rate=0.0)
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


def _check_writable(path, option: str, kind: str | None = None) -> None:
    """Refuse, naming the option, a path that cannot be written: a directory where a file is wanted
    (kind "file") or the reverse (kind "dir"), a path under a file, or a folder we may not write to."""
    import os
    from pathlib import Path

    target = Path(path)
    if kind == "file" and target.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise ValueError(f"{option} {path} is a file; give a directory")
    folder = target if kind == "dir" and target.is_dir() else target.parent  # where files get created
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path} lies under {folder}, which is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")


def _import_modules(names: list[str] | None) -> None:
    """--import-module: import packages that register gymnasium envs (gym_hil, ...)."""
    import importlib

    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--import-module {name}: {err}") from None


def cmd_train(args) -> int:
    from robolearn.cpu import ThreadGovernor, reuse_freed_memory

    _plain_warnings()  # a skipped damaged demo episode: one line naming it
    reuse_freed_memory()  # updates reuse their activations' pages instead of faulting them in again
    import torch

    from robolearn.train import TrainConfig, train

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/{args.agent}_{args.env.split('/')[-1]}"
    _check_writable(out, "--out", "dir")
    _import_modules(args.import_module)
    overrides = _parse_overrides(args.set)
    if args.base is not None:
        import typing
        from pathlib import Path
        if "base" not in typing.get_type_hints(registry.get(args.agent).config_cls):
            raise ValueError(f"--base is for agents that fine-tune a base policy; --agent {args.agent} takes none")
        if not Path(args.base).exists():
            raise FileNotFoundError(f"--base {args.base}: no such checkpoint")
        overrides["base"] = str(args.base)
    cfg = TrainConfig(agent=args.agent, env=args.env, out=out, success_key=args.success_key or None,
                      frames=args.frames, seed=args.seed, demos=args.demos, eval_every=args.eval_every,
                      eval_episodes=args.eval_episodes, target_success=args.target_success,
                      checkpoint_every=args.checkpoint_every, video=not args.no_video,
                      env_kwargs=_parse_overrides(args.env_set), agent_overrides=overrides)
    # Without --threads, torch's threads follow the cores other processes leave free (robolearn/cpu.py).
    result = train(cfg, resume=args.resume, governor=None if args.threads else ThreadGovernor())
    done = f"updates: {result['updates']}" if "updates" in result else f"env steps: {result['env_steps']}"
    print(f"{done}  final eval success: {result['final_success']:.0%}  minutes: {result['minutes']:.1f}")
    print(f"checkpoint:     {result['checkpoint']}")
    print(f"learning curve: {result['curve']}")
    if "video" in result:
        print(f"eval video:     {result['video']}")
    return 0


def cmd_eval(args) -> int:
    from robolearn.rollout import make_env
    from robolearn.train import evaluate, load_agent
    from robolearn.checkpoint import read_config
    from robolearn.video import write_mp4

    if args.video:
        _check_writable(args.video, "--video", "file")
    config = read_config(args.checkpoint)
    _import_modules(args.import_module)
    env_id = args.env or config["env_id"]
    # The env options the run was trained with (--env-set), then this command's own.
    env_kwargs = {**(config.get("train_config") or {}).get("env_kwargs", {}), **_parse_overrides(args.env_set)}
    if args.video or env_id.startswith("robolearn/"):
        env_kwargs["render_mode"] = "rgb_array"
    env = make_env(env_id, **env_kwargs)
    agent, _ = load_agent(args.checkpoint, env)
    success_key = config.get("train_config", {}).get("success_key", "success") if args.success_key is None \
        else args.success_key or None
    rate, ret, frames = evaluate(agent, env, args.episodes, seed=args.seed, record=bool(args.video),
                                 success_key=success_key)
    print(f"{config['agent']} on {config['env_id']}: success {rate:.1%} over {args.episodes} episodes, "
          f"mean return {ret:.2f}")
    if args.video:
        print(f"video of episode 0: {write_mp4(args.video, frames, env.metadata.get('render_fps', 10))}")
    return 0


def _record_policy(name: str | None, env):
    """(policy, name) for intervention mode: scripted, random, or a checkpoint directory."""
    from pathlib import Path

    from robolearn import rollout

    if name is None:
        return None, None
    if name in rollout.POLICIES:
        return rollout.POLICIES[name](env), name
    if not Path(name).exists():
        raise FileNotFoundError(f"--policy {name!r} is neither {' nor '.join(sorted(rollout.POLICIES))} "
                                "nor a checkpoint directory")
    from robolearn.train import load_agent
    agent, _ = load_agent(name, env)
    return rollout.AgentPolicy(agent), str(name)


def cmd_record(args) -> int:
    import contextlib

    from robolearn.demos import teleop
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.demos.recorder import RecordConfig, Recorder
    from robolearn.sim import make

    cls = teleop.device_class(args.teleop)  # an unknown name fails before anything starts
    if args.unpaced and cls.human:
        raise ValueError(f"--unpaced is for the scripted device; {args.teleop} is paced at the control rate")
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    _check_writable(args.out, "--out", "dir")
    env_kwargs = _parse_overrides(args.env_set)
    if args.label and args.env.startswith("robolearn/Panda"):
        env_kwargs.setdefault("terminate_on_success", False)  # labels are wanted past the first success
    with contextlib.ExitStack() as stack:
        env = make(args.env, **env_kwargs)
        stack.callback(env.close)
        env.action_space.seed(args.seed)
        policy, policy_name = _record_policy(args.policy, env)
        device = stack.enter_context(teleop.make_device(args.teleop, _parse_overrides(args.teleop_set)))
        controls = []
        if cls.human and args.teleop != "keyboard" and sys.stdin.isatty():
            controls.append(stack.enter_context(teleop.make_device("keyboard")))  # recorder keys
        writer = stack.enter_context(DatasetWriter(args.out, args.env, env.observation_space, env.action_space,
                                                   fps=env.metadata.get("render_fps", 10)))
        cfg = RecordConfig(episodes=args.episodes, fps=args.fps, pace=not args.unpaced, label=args.label,
                           seed=args.seed)
        summary = Recorder(env, device, writer, cfg, policy=policy, policy_name=policy_name,
                           controls=controls).run()
    return 0 if summary.stopped_by != "device lost" or summary.paths else 1


def _plain_warnings() -> None:
    """Warnings (a skipped damaged episode) as one line on stderr, without a source location."""
    import warnings
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def cmd_demos_info(args) -> int:
    import json

    from robolearn.demos.summary import format_summary, summarize

    _plain_warnings()
    summary = summarize(args.dir, strict=args.strict)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_demos_replay(args) -> int:
    from robolearn.demos.playback import format_replay, replay_episode
    from robolearn.video import write_mp4

    _plain_warnings()
    if args.video:
        _check_writable(args.video, "--video", "file")
    result = replay_episode(args.dir, args.episode, simulate=not args.no_sim, render=args.render,
                            frames=bool(args.video) and not args.render,
                            env_overrides=_parse_overrides(args.env_set))
    print(format_replay(result))
    if args.video:
        view = "simulator" if args.render else "recorded cameras"
        print(f"video ({view}): {write_mp4(args.video, result.frames, result.fps)}")
    return 0


def cmd_demos_export(args) -> int:
    from robolearn.demos.convert import export_dataset

    _plain_warnings()
    _check_writable(args.out, "--out")  # an existing export is export_dataset's to judge (--overwrite)
    out, n = export_dataset(args.dir, args.format, args.out, overwrite=args.overwrite, strict=args.strict)
    print(f"exported {n} episodes of {args.dir} as {args.format}: {out}")
    return 0


def cmd_demos_import(args) -> int:
    from robolearn.demos.convert import import_dataset

    _plain_warnings()
    _check_writable(args.out, "--out", "dir")
    ds, n = import_dataset(args.path, args.format, args.out, env_id=args.env, strict=args.strict)
    print(f"imported {n} episodes from {args.path} ({args.format}) into {ds.path} ({len(ds)} episodes, "
          f"env {ds.env_id})")
    return 0


def cmd_classifier_train(args) -> int:
    """Per-step success labels of a dataset's frames -> a RewardClassifier folder (docs/training.md)."""
    import dataclasses

    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from robolearn.agents.serl import ClassifierConfig, RewardClassifier, save_classifier, space_from_spec
    from robolearn.demos.dataset import Dataset

    _plain_warnings()
    if args.epochs < 1 or args.success_frames < 1:
        raise ValueError(f"--epochs and --success-frames must be at least 1, got {args.epochs} and "
                         f"{args.success_frames}")
    _check_writable(args.out, "--out", "dir")
    known, sets = {f.name for f in dataclasses.fields(ClassifierConfig)}, _parse_overrides(args.set)
    for key in sets:
        if key not in known or key in ("image_keys", "proprio_keys"):
            raise ValueError(f"--set {key}: not a ClassifierConfig field (see docs/training.md); cameras and "
                             "proprio keys have their own options")
    ds = Dataset(args.demos).require_episodes("to train a reward classifier from")
    space = space_from_spec(ds.observation_spec, f"{ds.path}/meta.json")
    cameras = tuple(args.image_keys) if args.image_keys else tuple(k for k in space.spaces if k.startswith("images/"))
    keys = (*cameras, *args.proprio_keys)
    missing = [k for k in keys if k not in space.spaces]
    if missing or not cameras:
        raise ValueError(f"--demos {ds.path}: observation key {(missing or ['images/<camera>'])[0]!r} is not in the "
                         f"dataset (keys: {sorted(space.spaces)})")
    # Each step's success flag labels the observation it led to (obs[t+1]). Label-mode episodes carry the
    # operator's labels; others the env's success. An episode marked successful whose steps never are (a
    # teleop recording on hardware, where no task reports success) counts its last K frames as success.
    frames = {split: {True: [], False: []} for split in ("train", "held")}
    held = {i for i in range(len(ds)) if len(ds) >= 5 and i % 5 == 4}  # every 5th episode checks the fit
    counts = {"label": 0, "env": 0, "fallback": 0}
    for i in range(len(ds)):
        ep, attrs = ds.episode(i), ds.episode_attrs(i)
        labels = ep["success"].astype(bool)
        kind = "label" if attrs.get("mode") == "label" else "env"
        if kind == "env" and attrs["success"] and not labels.any():
            labels[-args.success_frames:], kind = True, "fallback"
        counts[kind] += 1
        split = frames["held" if i in held else "train"]
        for label in (True, False):
            if (labels == label).any():
                split[label].append({k: ep["obs"][k][1:][labels == label] for k in keys})
    def stack(parts):
        return {k: np.concatenate([f[k] for f in parts]) for k in keys} if parts else None
    pos, neg = ([stack(frames[s][label]) for s in ("train", "held")] for label in (True, False))  # [train, held]
    print(f"labels: {counts['label']} episode(s) labelled per step (record --label), {counts['env']} with the env's "
          f"per-step success, {counts['fallback']} marked successful without per-step labels (their last "
          f"{args.success_frames} frames count as success: --success-frames)")
    if pos[0] is None or neg[0] is None:
        raise ValueError(f"--demos {ds.path}: no {'success' if pos[0] is None else 'failure'} frames to train on "
                         "(label frames with `robolearn record --label`)")
    n_pos, n_neg = len(pos[0][keys[0]]), len(neg[0][keys[0]])
    print(f"training on {n_pos} success and {n_neg} failure frames of {len(ds) - len(held)} episode(s); "
          f"{len(held)} held out")
    sets = {k: tuple(v) if isinstance(v, list) else v for k, v in sets.items()}  # JSON lists: the config's tuples
    cfg = ClassifierConfig(**{**sets, "image_keys": cameras, "proprio_keys": tuple(args.proprio_keys),
                              "seed": args.seed})
    clf = RewardClassifier(space, cfg)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("accuracy {task.fields[acc]:.1%}"), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        bar = progress.add_task("classifier epochs", total=args.epochs, acc=0.0)
        for _ in range(args.epochs):  # one epoch per call: the bar shows the training accuracy as it goes
            result = clf.train_classifier(pos[0], neg[0], epochs=1)
            progress.update(bar, advance=1, acc=result["accuracy"])
    metrics = {"train_accuracy": result["accuracy"], "train_success_frames": n_pos, "train_failure_frames": n_neg,
               "epochs": args.epochs, "dataset": str(ds.path), "label_sources": counts}
    line = f"train accuracy: {result['accuracy']:.1%}"
    if held:
        p_pos = clf.predict(pos[1]) if pos[1] is not None else np.zeros(0)
        p_neg = clf.predict(neg[1]) if neg[1] is not None else np.zeros(0)
        hits = int((p_pos > cfg.threshold).sum() + (p_neg <= cfg.threshold).sum())
        n_held = len(p_pos) + len(p_neg)
        metrics.update(held_out_accuracy=hits / max(n_held, 1), held_out_frames=n_held,
                       held_out_false_positives=int((p_neg > cfg.threshold).sum()))
        line += (f"  held-out accuracy: {metrics['held_out_accuracy']:.1%} over {n_held} frames of episodes "
                 f"{sorted(held)} ({metrics['held_out_false_positives']} false positives in {len(p_neg)} failure frames)")
    print(line)
    print(f"classifier: {save_classifier(clf, args.out, space, metrics)}")
    return 0


def cmd_pretrain_encoder(args) -> int:
    """Frames from simulator episodes -> a frozen encoder's weights for SERL (robolearn/agents/pretrain.py)."""
    import dataclasses
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from robolearn.agents.pretrain import PretrainConfig, pretrain_encoder

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    _check_writable(args.out, "--out", "file")
    known, sets = {f.name for f in dataclasses.fields(PretrainConfig)}, _parse_overrides(args.set)
    unknown = sorted((set(sets) - known) | ({"seed"} & set(sets)))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: not a pretraining option (the seed is --seed); "
                         f"valid: {sorted(known - {'seed'})}")
    cfg = PretrainConfig(**{**sets, "seed": args.seed})
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stat]}"),
                  TimeElapsedColumn()) as bar:
        episodes = bar.add_task("collect episodes", total=None, stat="")
        epochs = bar.add_task("fit epochs", total=cfg.epochs, stat="")
        metrics = pretrain_encoder(
            args.env, args.out, _parse_overrides(args.env_set), cfg,
            on_episode=lambda i, n: bar.update(episodes, completed=i, total=n),
            on_epoch=lambda e, n, loss: bar.update(epochs, completed=e, stat=f"loss {loss:.4f}"))
    print(json.dumps(metrics))
    print(f"encoder: {args.out}  (robolearn train --agent serl --set frozen_encoder={args.out} "
          f"--set frozen_arch=drq_state)")
    return 0


def cmd_launch(args) -> int:
    from robolearn.launcher import launch

    return launch([args.file, *args.arguments], print_only=args.print)


def cmd_ament_install(args) -> int:
    from robolearn.launch_xml import ament_install

    written = ament_install(args.prefix)
    print(f"registered robolearn in the ament index under {args.prefix} ({len(written)} files); "
          f"add it to AMENT_PREFIX_PATH for `ros2 launch robolearn FILE` and `ros2 run robolearn NODE`")
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
    p.add_argument("--backward", type=int, metavar="MAX_STEPS", nargs="?", const=40,
                   help="run the task's backward (reset) task instead, episodes of at most MAX_STEPS (default 40, "
                        "as launch/config/backward_reset.yaml): each starts where the forward expert leaves the "
                        "scene after 0-60 steps, rewards are the task's reset_score, scripted is its backward "
                        "expert; with --record, demos for a learned reset's learner (docs/resets.md)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("train", help="train an agent in simulation",
                       description="Train an agent (DrQ-v2, SERL/RLPD, or a diffusion policy by behaviour cloning "
                                   "from --demos) in a task. Writes TensorBoard logs, checkpoints "
                                   "(safetensors + JSON), a learning-curve PNG and an eval video under --out.")
    p.add_argument("--agent", choices=registry.names(), required=True,
                   help="diffusion learns from --demos alone, and --frames counts its updates")
    p.add_argument("--env", required=True, help="env id (see `robolearn envs`), or any gymnasium id registered "
                                                "through --import-module or given as PKG:Id (docs/training.md)")
    p.add_argument("--demos", help="episode dataset directory for the demo buffer (50/50 sampling)")
    p.add_argument("--base", help="a diffusion checkpoint for a fine-tuning agent to start from: a run dir, its "
                                  "checkpoints/ or a step dir")
    p.add_argument("--frames", type=int, default=20_000, help="env frames to train for (default: 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default: runs/<agent>_<env>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-every", type=int, default=2_000, help="agent steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--target-success", type=float, help="stop once evaluation success reaches this (0..1)")
    p.add_argument("--checkpoint-every", type=int, default=5_000, help="agent steps between checkpoints")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="agent config field, e.g. utd_ratio=8; with --resume only the learner's pace and step "
                        "sizes may change (docs/training.md)")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE", help="env option, e.g. image_size=64")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores other processes leave free, re-checked every 2 s)")
    p.add_argument("--no-video", action="store_true", help="skip the final eval video")
    p.add_argument("--import-module", action="append", metavar="PKG",
                   help="import PKG first, to register its gymnasium envs for --env (e.g. gym_hil)")
    p.add_argument("--success-key", default="success",
                   help="the info key the env reports success under (default: success; '' for none)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Run a checkpoint's policy without exploration noise; print success and return.")
    p.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or one step_* dir")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--env", help="env id (default: the checkpoint's)")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE",
                   help="env option over the ones the run was trained with (repeatable)")
    p.add_argument("--seed", type=int, default=1_000_000, help="seed of the first episode")
    p.add_argument("--video", metavar="OUT.mp4", help="write episode 0 to this mp4")
    p.add_argument("--import-module", action="append", metavar="PKG",
                   help="import PKG first, to register its gymnasium envs (e.g. gym_hil)")
    p.add_argument("--success-key", help="the info key success is reported under (default: the run's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("record", help="record demonstrations with a teleop device",
                       description="Record episodes with a teleop device into an episode dataset "
                                   "(docs/teleop.md): a live status line; keys start/stop an episode, mark "
                                   "success or failure, discard and re-record, quit. With --policy, the policy "
                                   "acts and the device takes over while it gives input (intervention).")
    p.add_argument("--env", required=True, help="env id (see `robolearn envs`)")
    p.add_argument("--teleop", default="keyboard", metavar="DEVICE",
                   help="keyboard, gamepad, spacemouse, ros or scripted (default: keyboard)")
    p.add_argument("--out", required=True, help="dataset directory; an existing one is appended to")
    p.add_argument("--episodes", type=int, default=10, help="episodes to save (default: 10)")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE", help="env option, e.g. image_size=64")
    p.add_argument("--teleop-set", action="append", metavar="KEY=VALUE",
                   help="device option or TeleopConfig field, e.g. scale=0.5, deadzone=0.1, lock=z, "
                        "timeout_s=0.5, twist_topic=/spacenav/twist, keys='<enter>www.y'")
    p.add_argument("--fps", type=float, help="control rate to pace at (default: the env's, 10 Hz for Panda)")
    p.add_argument("--unpaced", action="store_true", help="step as fast as possible (scripted device only)")
    p.add_argument("--policy", metavar="scripted|random|CHECKPOINT",
                   help="intervention mode: this policy acts; device input takes over (flagged intervention)")
    p.add_argument("--label", action="store_true",
                   help="label mode: per-step success is set by the success/failure keys (reward classifiers)")
    p.add_argument("--seed", type=int, default=0, help="dataset episode k is reset with seed+k")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("demos", help="inspect, replay, export and import demonstration datasets",
                       description="Work with episode datasets (docs/dataset.md): summarize them, replay an "
                                   "episode, and convert to and from robomimic, LeRobot v3 and MCAP "
                                   "(docs/formats.md).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("info", help="counts, lengths, success rate, interventions, specs and sizes",
                           description="Summarize a dataset: episodes, lengths, success rate, interventions, "
                                       "observation and action specs, and each episode's file size.")
    q.add_argument("dir", help="dataset directory")
    q.add_argument("--strict", action="store_true", help="a damaged episode is an error (default: skipped, warned)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=cmd_demos_info)
    q = actions.add_parser("replay", help="replay an episode in the simulator, or its frames to mp4",
                           description="Replay an episode's actions in the simulator from its stored seed and "
                                       "report how far the observations diverge from the recording; --video "
                                       "writes the recorded camera frames (or, with --render, the simulator's "
                                       "view) to an mp4.")
    q.add_argument("dir", help="dataset directory")
    q.add_argument("--episode", type=int, required=True, metavar="K", help="episode index (episode_K.h5; "
                                                                          "`robolearn demos info` lists them)")
    q.add_argument("--video", metavar="OUT.mp4", help="write the episode to this mp4")
    q.add_argument("--render", action="store_true", help="the video shows the simulator replay, not the recording")
    q.add_argument("--no-sim", action="store_true", help="do not replay in the simulator (frames only)")
    q.add_argument("--env-set", action="append", metavar="KEY=VALUE",
                   help="env option the episodes were recorded with, e.g. reward_type=sparse")
    q.set_defaults(func=cmd_demos_replay)
    q = actions.add_parser("export", help="write a dataset as robomimic, LeRobot v3 or MCAP",
                           description="Export a dataset: robomimic (one HDF5 file), lerobot (a LeRobot v3 "
                                       "dataset directory, images as H.264 video) or mcap (a rosbag2 directory "
                                       "with one .mcap). Layouts in docs/formats.md.")
    q.add_argument("dir", help="dataset directory")
    q.add_argument("--format", required=True, choices=["robomimic", "lerobot", "mcap"])
    q.add_argument("--out", required=True, metavar="PATH", help="file (robomimic) or directory to create")
    q.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    q.add_argument("--strict", action="store_true", help="a damaged episode is an error (default: skipped, warned)")
    q.set_defaults(func=cmd_demos_export)
    q = actions.add_parser("import", help="read robomimic, LeRobot v3 or MCAP into a dataset",
                           description="Import episodes into a dataset directory (created, or appended to when "
                                       "its specs match). The observations are checked against the env.")
    q.add_argument("path", help="robomimic file, LeRobot dataset directory, or rosbag2 directory")
    q.add_argument("--format", required=True, choices=["robomimic", "lerobot", "mcap"])
    q.add_argument("--out", required=True, metavar="DIR", help="dataset directory")
    q.add_argument("--env", help="env id the episodes belong to (default: the one the file names)")
    q.add_argument("--strict", action="store_true", help="an unreadable episode is an error (default: skipped)")
    q.set_defaults(func=cmd_demos_import)

    p = sub.add_parser("classifier", help="train the reward classifier an actor scores hardware episodes with",
                       description="SERL's learned reward (docs/training.md, docs/actor_learner.md).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("train", help="train a success classifier on a dataset's labelled frames",
                           description="Train a binary success classifier on the frames of an episode dataset, "
                                       "labelled by each step's success flag (`robolearn record --label`), print "
                                       "its accuracy and save it as a folder (weights.safetensors + config.json) "
                                       "for agent_node's reward_classifier parameter.")
    q.add_argument("--demos", required=True, metavar="DATASET", help="episode dataset directory")
    q.add_argument("--out", required=True, metavar="DIR", help="classifier folder to write (its files are replaced)")
    q.add_argument("--epochs", type=int, default=20, help="passes over the larger class (default: 20)")
    q.add_argument("--image-keys", nargs="+", metavar="KEY", help="cameras, e.g. images/front (default: every one)")
    q.add_argument("--proprio-keys", nargs="*", default=[], metavar="KEY",
                   help="proprio inputs, e.g. tcp_pose (default: none; SERL's classifiers look at cameras only)")
    q.add_argument("--success-frames", type=int, default=5, metavar="K",
                   help="an episode marked successful without per-step labels: its last K frames are success "
                        "(default: 5)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="ClassifierConfig field, e.g. threshold=0.75 or batch_size=128")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_classifier_train)

    p = sub.add_parser("pretrain-encoder", help="pretrain a camera encoder on simulator frames, for SERL to keep frozen",
                       description="Collect frames from simulator episodes (the scripted expert, the expert with "
                                   "action noise, random actions), train DrQ's conv tower to regress the object state "
                                   "they show, and save it as safetensors for `robolearn train --agent serl --set "
                                   "frozen_encoder=FILE --set frozen_arch=drq_state`, which then caches its "
                                   "features in the replay (docs/training.md).")
    p.add_argument("--env", required=True, help="a Pixels env with a scripted expert, e.g. robolearn/PandaPickCubePixels-v0")
    p.add_argument("--out", required=True, metavar="FILE", help="weights to write (*.safetensors; replaced)")
    p.add_argument("--env-set", action="append", metavar="KEY=VALUE",
                   help="env option, e.g. image_size=64; use the same ones for training")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="PretrainConfig field: expert_episodes, noisy_episodes, random_episodes (20 each), noise "
                        "(0.5), epochs (25), batch_size (128), lr (0.001), aug_pad (4), holdout (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=cmd_pretrain_encoder)

    p = sub.add_parser("launch", help="run a ROS 2 XML launch file without a ROS 2 install",
                       description="Run a ROS 2 XML launch file as `ros2 launch` would (docs/launch.md): "
                                   "FILE, or PKG and a FILE under its share/PKG; Ctrl-C stops every node.")
    p.add_argument("file", metavar="FILE", help="launch file, or a package name followed by a file name")
    p.add_argument("arguments", nargs="*", metavar="name:=value", help="launch arguments")
    p.add_argument("--print", action="store_true", help="print each node's command line instead of running")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("ament-install", help="register robolearn in a ROS 2 ament index",
                       description="Write the ament index entry, package.xml, launch files and "
                                   "lib/robolearn/<node> scripts under PREFIX (docs/launch.md).")
    p.add_argument("prefix", metavar="PREFIX", help="install prefix, e.g. ~/robolearn_ws/install")
    p.set_defaults(func=cmd_ament_install)
    return parser


def main(argv: list[str] | None = None) -> int:
    from robolearn.demos.dataset import DatasetError
    from robolearn.demos.teleop import TeleopError

    args = build_parser().parse_args(argv)
    if getattr(args, "episodes", 1) is not None and getattr(args, "episodes", 1) < 1:
        print("robolearn: --episodes must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, DatasetError, TeleopError) as err:  # OSError: a path not writable
        print(f"robolearn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged run: the message names the step and last checkpoint
        print(f"robolearn {args.command}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
