"""Export an episode dataset to robomimic, LeRobot v3 or MCAP (rosbag2), and import those back.

Each format module has `export(dataset, episodes, out)` writing into a fresh path and
`read(path) -> (meta, loaders)`, each loader a function returning one episode in our in-memory
layout (Dataset.episode's dict plus "attrs"); this module owns what they share: the overwrite rule, skipping corrupt
episodes, and checking imported specs against the env. Layouts: docs/formats.md.
"""

from __future__ import annotations

import importlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from robolearn.demos.dataset import (Dataset, DatasetError, DatasetWriter, compare_observation_specs, episode_arrays,
                                     observation_spec, stored_robot_state, validate_episode)

# format name -> (module, what a path already holding that format contains)
FORMATS = {
    "robomimic": ("robolearn.demos.robomimic_format", None),
    "lerobot": ("robolearn.demos.lerobot_format", "meta/info.json"),
    "mcap": ("robolearn.demos.mcap_format", "metadata.yaml"),
}
Episode = dict[str, Any]  # Dataset.episode(i) plus "attrs": {"success", "length", "seed", ...}


def _module(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {sorted(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[fmt][0])
    except ImportError as err:
        raise DatasetError(f"the {fmt} format needs the `formats` extra ({err.name} is missing): "
                           "pip install 'robolearn[formats]'") from None


def episode_index(path: Path) -> int:
    return int(path.stem.split("_")[1])


def iter_episodes(ds: Dataset, strict: bool = False) -> Iterator[tuple[int, Episode]]:
    """(file index, episode with attrs) for each readable episode; a damaged one warns (or raises if strict)."""
    for i in range(len(ds)):
        try:
            ep, attrs = ds.episode(i), ds.episode_attrs(i)
        except DatasetError as err:
            if strict:
                raise
            warnings.warn(f"skipping episode: {err}", stacklevel=2)
            continue
        attrs.pop("env_id", None)
        ep["attrs"] = attrs
        yield episode_index(ds.paths[i]), ep


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _check_target(out: Path, fmt: str, overwrite: bool, src: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents \
            or out.resolve() in src.resolve().parents:
        raise DatasetError(f"{out}: the export target may not be the dataset {src}, inside it, or hold it")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise DatasetError(f"{out} exists; pass --overwrite to replace it")
    marker = FORMATS[fmt][1]
    if marker is None and out.is_dir():
        raise DatasetError(f"{out} is a directory; a {fmt} export is one file")
    if marker is not None and out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        # --overwrite replaces an earlier export, never an unrelated directory
        raise DatasetError(f"{out} is a directory that is not a {fmt} export (no {marker}); not replacing it")
    if marker is not None and not out.is_dir():
        raise DatasetError(f"{out} is a file; a {fmt} export is a directory")


def export_dataset(src: str | os.PathLike, fmt: str, out: str | os.PathLike, overwrite: bool = False,
                   strict: bool = False) -> tuple[Path, int]:
    """Write dataset `src` as `fmt` at `out`, built beside it and moved into place when complete.

    Returns the path and the number of episodes written (damaged ones are skipped unless strict)."""
    module = _module(fmt)
    ds = Dataset(src, strict=strict).require_episodes("to export")
    out = Path(out)
    _check_target(out, fmt, overwrite, ds.path)
    # Built under a hidden staging folder with its final name (a rosbag2 names its .mcap after its
    # folder), then moved into place, so a failed export leaves nothing at `out`.
    staging = out.with_name(f".{out.name}.partial")
    _remove(staging)
    staging.mkdir(parents=True)
    written = []
    episodes = ((written.append(i), (i, ep))[1] for i, ep in iter_episodes(ds, strict))
    try:
        module.export(ds, episodes, staging / out.name)
        if out.exists() or out.is_symlink():
            _remove(out)
        os.replace(staging / out.name, out)
    finally:
        _remove(staging)
    return out, len(written)


# -- import ---------------------------------------------------------------------------------

def spaces_from_meta(meta: dict):
    """gymnasium (Dict, Box) spaces with a dataset meta's observation and action specs."""
    from gymnasium.spaces import Box, Dict

    obs = {}
    for key, spec in meta["observation"].items():
        dtype = np.dtype(spec["dtype"])
        lo, hi = (0, 255) if dtype == np.uint8 else (-np.inf, np.inf)
        obs[key] = Box(lo, hi, tuple(spec["shape"]), dtype)
    act = meta["action"]
    shape = tuple(act["shape"])
    dtype = np.dtype(act.get("dtype", "float32"))
    bound = lambda v: np.array([float(x) for x in v], dtype).reshape(shape)  # "inf" strings parse
    return Dict(obs), Box(bound(act["low"]), bound(act["high"]), shape, dtype)


def env_kwargs_for(env_id: str, obs_spec: dict) -> dict:
    """make() options that give a registered env these observations (Panda pixel tasks: size, cameras)."""
    if env_id.startswith("robolearn/Panda") and env_id.endswith("Pixels-v0"):
        cams = [k.split("/", 1)[1] for k in obs_spec if k.startswith("images/")]
        if cams:
            return {"image_size": int(obs_spec[f"images/{cams[0]}"]["shape"][0]), "cameras": tuple(cams)}
    return {}


def check_against_env(meta: dict, env_id: str, where: str) -> None:
    """DatasetError naming the first observation key or the action shape that `env_id` does not produce."""
    from robolearn.sim import registry

    if env_id not in registry.all_ids():
        raise DatasetError(f"{where}: unknown env id {env_id!r}; pass --env with a registered id (robolearn envs)")
    env = registry.make(env_id, **env_kwargs_for(env_id, meta["observation"]))
    try:
        compare_observation_specs(meta["observation"], observation_spec(env.observation_space), where,
                                  f"the environment {env_id}")
        got = [int(d) for d in env.action_space.shape]
        if list(meta["action"]["shape"]) != got:
            raise DatasetError(f"{where}: action shape {tuple(meta['action']['shape'])} in the data but "
                               f"{tuple(got)} in the environment {env_id}")
    finally:
        env.close()


def write_episode(writer: DatasetWriter, ep: Episode, joint_names: list[str] | None = None) -> Path:
    """Append one episode (our in-memory layout) to a dataset through its writer; `joint_names` name
    the columns of its robot arrays, if it has any."""
    obs, T, robot = ep["obs"], len(ep["action"]), ep.get("robot")

    def robot_at(t: int):
        return None if robot is None else stored_robot_state(robot, joint_names, t)

    attrs = {k: v for k, v in ep.get("attrs", {}).items() if k not in ("length", "success", "env_id")}
    writer.begin_episode({k: v[0] for k, v in obs.items()}, robot=robot_at(0), **attrs)
    try:
        for t in range(T):
            writer.add_step(ep["action"][t], {k: v[t + 1] for k, v in obs.items()}, float(ep["reward"][t]),
                            bool(ep["terminated"][t]), bool(ep["truncated"][t]), bool(ep["success"][t]),
                            bool(ep["intervention"][t]), float(ep["timestamp"][t]), robot=robot_at(t + 1))
    except BaseException:
        writer.discard_episode()
        raise
    success = ep.get("attrs", {}).get("success")
    return writer.end_episode(None if success is None else bool(success))


def guarded(episodes: Iterable[Callable[[], Episode]], strict: bool, where: str) -> Iterator[Episode]:
    """Episodes from a reader's loaders; one that cannot be decoded (DatasetError) warns and is skipped,
    or raises when strict. Readers yield loaders, not episodes, so that one bad episode does not end
    the generator."""
    for load in episodes:
        try:
            ep = load()
        except DatasetError as err:
            if strict:
                raise
            warnings.warn(f"skipping episode in {where}: {err}", stacklevel=2)
            continue
        yield ep


def import_dataset(path: str | os.PathLike, fmt: str, out: str | os.PathLike, env_id: str | None = None,
                   strict: bool = False, check_env: bool = True) -> tuple[Dataset, int]:
    """Append the episodes of a `fmt` file/directory to the dataset at `out` (created if absent).

    Returns the dataset and the number of episodes imported."""
    module = _module(fmt)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    meta, episodes = module.read(path)
    if env_id:
        meta["env_id"] = env_id
    if not meta.get("env_id"):
        raise DatasetError(f"{path}: the file names no environment; pass --env ID")
    if check_env and _registered(meta["env_id"]):  # a real robot's env cannot be made here
        check_against_env(meta, meta["env_id"], str(path))
    obs_space, act_space = spaces_from_meta(meta)
    out = Path(out)
    # A new dataset is built in a hidden folder and renamed when every episode is in, so a failed
    # import leaves nothing; appending to an existing one adds episodes one by one (each complete).
    target = out if out.exists() else out.with_name(f".{out.name}.partial")
    if target != out:
        _remove(target)
    n = 0
    try:
        with DatasetWriter(target, meta["env_id"], obs_space, act_space, fps=meta["fps"],
                           robot=meta.get("robot", "unknown"), cameras=meta.get("cameras")) as writer:
            joint_names = meta.get("robot_state", {}).get("joint_names")
            for ep in guarded(episodes, strict, str(path)):
                write_episode(writer, ep, joint_names)
                n += 1
        if n == 0:
            raise DatasetError(f"{path}: no episode could be imported")
        if target != out:
            os.replace(target, out)
    finally:
        if target != out:
            _remove(target)
    return Dataset(out), n


def _registered(env_id: str) -> bool:
    from robolearn.sim import registry
    return env_id in registry.all_ids()


# -- helpers the format modules share ----------------------------------------------------------

def check_episode(ep: Episode, meta: dict, where: str) -> Episode:
    """`ep`, after the dataset's own check (validate_episode): steps, shapes the meta promises, finite floats."""
    validate_episode(episode_arrays(ep), meta, where)
    return ep


def image_keys(meta: dict) -> list[str]:
    """Observation keys holding HxWxC uint8 images."""
    return [k for k, s in meta["observation"].items() if s["dtype"] == "uint8" and len(s["shape"]) == 3]
