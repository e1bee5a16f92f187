"""The episode dataset: a directory of `meta.json` plus one HDF5 file per episode.

Each episode is written into a hidden `.episode_NNNNNN.h5.partial` file and renamed to
`episode_NNNNNN.h5` (after fsync) only when it ends, so a crash, even kill -9, loses at most the
episode being recorded; readers never look at `.partial` files. The format is in docs/dataset.md.
No pickle: HDF5 arrays and JSON only.

Episodes of an env with an arm also hold the measured robot state (joint positions and velocities
by joint name, tool pose, gripper, backend clock) in a `robot` group; envs without one (dm_control)
have none, and neither have datasets written before it existed: the group is optional.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

FORMAT_VERSION = 1
META = "meta.json"
STEP_KEYS = ("action", "reward", "terminated", "truncated", "success", "intervention", "timestamp")
STEP_DTYPES = {"action": np.float32, "reward": np.float32, "terminated": np.bool_, "truncated": np.bool_,
               "success": np.bool_, "intervention": np.bool_, "timestamp": np.float64}
ROBOT_KEYS = ("joint_position", "joint_velocity", "tool_pose", "gripper", "stamp")  # the `robot` group, float64
_EPISODE_RE = re.compile(r"^episode_(\d{6,})\.h5$")
_FLUSH_EVERY = 64  # steps buffered in memory between writes to the partial file
CHECKSUMS = True  # HDF5's Fletcher32 filter on every array of a new episode file (docs/dataset.md, Versions)


class DatasetError(Exception):
    """A dataset that cannot be read or written as asked: corrupt file, spec mismatch, bad meta."""


# -- small file helpers (robolearn.replay uses them too) -------------------------------------

def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path (a directory fsync makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make `tmp` durable, rename it over `final` atomically, and make the rename durable."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    commit_file(tmp, path)


def episode_filename(index: int) -> str:
    return f"episode_{index:06d}.h5"


def robot_state(env):
    """The arm state (robolearn.robot.ArmState) the env's last observation was built from; None without an arm."""
    state = getattr(getattr(env, "unwrapped", env), "state", None)
    return state if hasattr(state, "joint_names") else None  # gymnasium's classic envs have array `state`s


def robot_shapes(meta: Mapping) -> dict[str, tuple[int, ...]] | None:
    """Per-step shape of each `robot/<key>` array, or None when the meta names no joints."""
    if "robot_state" not in meta:
        return None
    n = len(meta["robot_state"]["joint_names"])
    return {"joint_position": (n,), "joint_velocity": (n,), "tool_pose": (7,), "gripper": (), "stamp": ()}


def episode_shapes(meta: Mapping, T: int, robot: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a T-step episode, by its name in the episode file ("obs/state", "action",
    "robot/stamp"); `robot`: with the robot group (the meta must name its joints)."""
    shapes = {f"obs/{k}": (T + 1, *s["shape"]) for k, s in meta["observation"].items()}
    shapes.update({k: (T, *meta["action"]["shape"]) if k == "action" else (T,) for k in STEP_KEYS})
    if robot:
        shapes.update({f"robot/{k}": (T + 1, *s) for k, s in robot_shapes(meta).items()})
    return shapes


def episode_arrays(ep: Mapping) -> dict[str, np.ndarray]:
    """An episode in memory (Dataset.episode's layout) keyed by the names its arrays have in the file."""
    arrays = {f"obs/{k}": v for k, v in ep["obs"].items()}
    arrays.update({k: ep[k] for k in STEP_KEYS if k in ep})
    arrays.update({f"robot/{k}": v for k, v in (ep.get("robot") or {}).items()})
    return arrays


def read_array(array, name: str, where: str | os.PathLike) -> np.ndarray:
    """All of an h5py dataset (numpy arrays pass through); a bad checksum or chunk is a DatasetError naming it."""
    try:
        return array[()]
    except Exception as err:  # h5py: OSError "filter returned failure during read"
        raise DatasetError(f"{where}: {name} is corrupt ({type(err).__name__}: {err})") from None


def validate_episode(arrays: Mapping, meta: Mapping, where: str | os.PathLike, length: int | None = None) -> int:
    """The one check of an episode's arrays, returning its length T: at least one step, every array present
    with the shape meta.json promises, and every float finite (read once, one vectorized isfinite per array;
    uint8 images are not read). `arrays` maps file names ("obs/state", "robot/stamp") to numpy arrays or h5py
    datasets: an open episode file, or episode_arrays(ep). DatasetError "<where>: <field> ..." otherwise."""
    if length is None:
        if "action" not in arrays:
            raise DatasetError(f"{where}: action is missing")
        length = len(arrays["action"])
    if length < 1:
        raise DatasetError(f"{where}: the episode has no steps (length {length})")
    robot = any(str(name).split("/")[0] == "robot" for name in arrays)
    if robot and robot_shapes(meta) is None:
        raise DatasetError(f"{where}: the episode has a robot group but {META} names no robot_state joints")
    for name, shape in episode_shapes(meta, length, robot).items():
        if name not in arrays:
            raise DatasetError(f"{where}: {name} is missing")
        array = arrays[name]
        if tuple(array.shape) != shape:
            raise DatasetError(f"{where}: {name} has shape {tuple(array.shape)}, expected {shape}")
        if array.dtype.kind == "f":
            values = read_array(array, name, where)
            finite = np.isfinite(values)
            if not finite.all():
                at = np.unravel_index(np.argmin(finite), finite.shape)
                raise DatasetError(f"{where}: {name}[{at[0]}] is {values[at]} (not finite)")
    return length


def robot_row(robot) -> dict[str, np.ndarray]:
    """One row of the robot group from an ArmState-like object (float64 copies: backends may reuse arrays)."""
    row = {"joint_position": robot.position, "joint_velocity": robot.velocity,
           "tool_pose": np.concatenate([np.ravel(robot.tool_pos), np.ravel(robot.tool_quat)]),
           "gripper": robot.gripper, "stamp": robot.stamp}
    return {k: np.array(v, dtype=np.float64) for k, v in row.items()}


def stored_robot_state(robot: Mapping[str, np.ndarray], joint_names, t: int) -> SimpleNamespace:
    """Row `t` of an episode's robot arrays as the ArmState-like object the writer takes (for copying)."""
    pose = robot["tool_pose"][t]
    return SimpleNamespace(joint_names=tuple(joint_names), position=robot["joint_position"][t],
                           velocity=robot["joint_velocity"][t], tool_pos=pose[:3], tool_quat=pose[3:],
                           gripper=robot["gripper"][t], stamp=robot["stamp"][t])


# -- specs --------------------------------------------------------------------------------

def _bound(x: float) -> float | str:
    # JSON has no infinity; unbounded action dimensions are written as the strings "inf"/"-inf".
    return float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def observation_spec(observation_space) -> dict[str, dict]:
    """{key: {"shape": [...], "dtype": "float32"}} from a gymnasium Dict space (or a mapping of Boxes)."""
    spaces = getattr(observation_space, "spaces", observation_space)
    if not isinstance(spaces, Mapping):
        raise DatasetError(f"observation space must be a Dict of Boxes, got {observation_space}")
    return {k: {"shape": [int(d) for d in s.shape], "dtype": np.dtype(s.dtype).name} for k, s in spaces.items()}


def action_spec(action_space) -> dict:
    """{"shape", "dtype", "low", "high"} of a Box action space."""
    if not hasattr(action_space, "low"):
        raise DatasetError(f"action space must be a Box, got {action_space}")
    return {"shape": [int(d) for d in action_space.shape], "dtype": np.dtype(action_space.dtype).name,
            "low": [_bound(x) for x in np.ravel(action_space.low)],
            "high": [_bound(x) for x in np.ravel(action_space.high)]}


def _compare(expected: Any, got: Any, field: str, where: str, ours: str, theirs: str) -> None:
    if expected != got:
        raise DatasetError(f"{where}: field {field!r} is {expected!r} in {ours} but {got!r} in {theirs}")


def compare_observation_specs(dataset_spec: Mapping, env_spec: Mapping, where: str,
                              theirs: str = "the environment") -> None:
    """Raise DatasetError naming the first observation key whose presence, shape or dtype differs."""
    for key in sorted(set(dataset_spec) | set(env_spec)):
        if key not in env_spec:
            raise DatasetError(f"{where}: observation key {key!r} is in the dataset but not in {theirs} "
                               f"(keys: {sorted(env_spec)})")
        if key not in dataset_spec:
            raise DatasetError(f"{where}: observation key {key!r} is in {theirs} but not in the dataset "
                               f"(keys: {sorted(dataset_spec)})")
        ours = (tuple(dataset_spec[key]["shape"]), str(dataset_spec[key]["dtype"]))
        other = (tuple(env_spec[key]["shape"]), str(env_spec[key]["dtype"]))
        for attr, a, b in zip(("shape", "dtype"), ours, other):
            if a != b:
                raise DatasetError(f"{where}: observation {key!r} has {attr} {a} in the dataset but {b} in {theirs}")


# -- writing ------------------------------------------------------------------------------

class DatasetWriter:
    """Creates or appends to a dataset directory; one episode at a time, each committed atomically."""

    def __init__(self, path: str | os.PathLike, env_id: str, observation_space, action_space, fps: float,
                 robot: str = "panda", cameras: list[str] | tuple[str, ...] | None = None,
                 compression: str | None = "gzip"):
        self.path = Path(path)
        self.env_id, self.fps = str(env_id), float(fps)
        self.obs_spec, self.act_spec = observation_spec(observation_space), action_spec(action_space)
        if cameras is None:
            cameras = [k.split("/", 1)[1] for k in self.obs_spec if k.startswith("images/")]
        self.compression = compression
        meta = {"format_version": FORMAT_VERSION, "env_id": self.env_id, "fps": self.fps,
                "robot": str(robot), "cameras": list(cameras), "observation": self.obs_spec,
                "action": self.act_spec, "created": _now_iso()}
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / META
        if meta_path.exists():
            self.meta = _read_meta(self.path)
            self._check_meta(self.meta, meta)
        else:
            write_json_atomic(meta_path, meta)
            self.meta = meta
        indices = [i for i, _ in _list_episodes(self.path)]
        self.next_index = max(indices) + 1 if indices else 0
        self._file: h5py.File | None = None

    def _check_meta(self, old: dict, new: dict) -> None:
        where = f"{self.path / META}"
        for field in ("format_version", "env_id", "robot", "cameras", "fps"):
            _compare(old.get(field), new[field], field, where, "the existing meta.json", "this writer")
        for field in ("shape", "dtype", "low", "high"):
            _compare(old["action"].get(field), new["action"][field], f"action.{field}", where,
                     "the existing meta.json", "this writer")
        compare_observation_specs(old["observation"], new["observation"], where, "this writer")

    # -- episode lifecycle ---------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self._file is not None

    def begin_episode(self, first_obs: Mapping[str, np.ndarray], robot=None, **attrs) -> None:
        """Start an episode at its first observation; extra JSON-able `attrs` are stored on the file.

        `robot`: the arm state behind `first_obs` (any object with ArmState's attributes), or None for an
        env without an arm; then every add_step of the episode takes one too, or none."""
        if self._file is not None:
            raise DatasetError(f"{self.path}: an episode is in progress; end_episode() or discard_episode() first")
        first = {k: [self._check_obs(first_obs, k)] for k in self.obs_spec}  # validate before any file exists
        first_robot = None
        if robot is not None:
            meta = self.meta if "robot_state" in self.meta else \
                {**self.meta, "robot_state": {"joint_names": [str(n) for n in robot.joint_names]}}
            first_robot = {k: [v] for k, v in self._check_robot(robot, meta).items()}
            if meta is not self.meta:  # the joint names are known at the first robot state: meta.json takes them
                write_json_atomic(self.path / META, meta)
                self.meta = meta
        self.index = self.next_index
        self._tmp = self.path / f".{episode_filename(self.index)}.partial"
        f = h5py.File(self._tmp, "w")
        try:
            for key, spec in self.obs_spec.items():
                shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
                image = dtype == np.uint8 and len(shape) == 3
                opts = dict(compression=self.compression) if image and self.compression else {}
                if self.compression == "gzip" and image:
                    opts["compression_opts"] = 4
                row_bytes = max(1, dtype.itemsize * int(np.prod(shape)))
                chunks = (1, *shape) if image else (max(1, min(256, 2**20 // row_bytes)), *shape)
                f.create_dataset(f"obs/{key}", shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=chunks, fletcher32=CHECKSUMS, **opts)
            for key in STEP_KEYS:
                shape = tuple(self.act_spec["shape"]) if key == "action" else ()
                f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape), dtype=STEP_DTYPES[key],
                                 chunks=(256, *shape), fletcher32=CHECKSUMS)
            if first_robot is not None:
                for key, shape in robot_shapes(self.meta).items():
                    f.create_dataset(f"robot/{key}", shape=(0, *shape), maxshape=(None, *shape), dtype=np.float64,
                                     chunks=(256, *shape), fletcher32=CHECKSUMS)
            f.attrs["env_id"] = self.env_id
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["attrs"] = json.dumps(attrs)
        except BaseException:
            f.close()
            os.unlink(self._tmp)
            raise
        self._file = f
        self._steps = 0
        self._pending_obs = first
        self._pending = {k: [] for k in STEP_KEYS}
        self._pending_robot = first_robot

    def _check_robot(self, robot, meta: Mapping | None = None) -> dict[str, np.ndarray]:
        """One row of the robot group from an ArmState-like object, checked against the meta's joints."""
        meta = meta or self.meta
        names = meta["robot_state"]["joint_names"]
        if [str(n) for n in robot.joint_names] != names:
            raise DatasetError(f"{self.path}: field 'robot_state.joint_names' is {names} in meta.json but "
                               f"{list(robot.joint_names)} in this robot state")
        row = robot_row(robot)
        for key, shape in robot_shapes(meta).items():
            if row[key].shape != shape:
                raise DatasetError(f"{self.path}: robot/{key} has shape {row[key].shape}, the dataset expects {shape}")
        return row

    def _check_obs(self, obs: Mapping[str, np.ndarray], key: str) -> np.ndarray:
        if key not in obs:
            raise DatasetError(f"{self.path}: observation is missing key {key!r} (has {sorted(obs)})")
        value, spec = np.asarray(obs[key]), self.obs_spec[key]
        if list(value.shape) != spec["shape"]:
            raise DatasetError(f"{self.path}: observation {key!r} has shape {value.shape}, "
                               f"the dataset expects {tuple(spec['shape'])}")
        return value.astype(spec["dtype"], copy=True)

    def add_step(self, action, obs: Mapping[str, np.ndarray], reward: float, terminated: bool, truncated: bool,
                 success: bool, intervention: bool = False, timestamp: float | None = None, robot=None) -> None:
        """Record one step: the action taken and what followed it (obs, and `robot`, the state after it)."""
        if self._file is None:
            raise DatasetError(f"{self.path}: add_step() before begin_episode()")
        a = np.asarray(action, dtype=np.float32)
        if list(a.shape) != self.act_spec["shape"]:
            raise DatasetError(f"{self.path}: action has shape {a.shape}, the dataset expects "
                               f"{tuple(self.act_spec['shape'])}")
        if (robot is None) != (self._pending_robot is None):
            raise DatasetError(f"{self.path}: the episode began {'without' if robot is not None else 'with'} a "
                               "robot state; give one to begin_episode and every add_step, or none")
        frames = {key: self._check_obs(obs, key) for key in self.obs_spec}  # all valid, or none recorded
        row = {} if robot is None else self._check_robot(robot)
        for key, value in frames.items():
            self._pending_obs[key].append(value)
        for key, value in row.items():
            self._pending_robot[key].append(value)
        step = {"action": a, "reward": reward, "terminated": terminated, "truncated": truncated,
                "success": success, "intervention": intervention,
                "timestamp": self._steps / self.fps if timestamp is None else timestamp}
        for key, value in step.items():
            self._pending[key].append(value)
        self._steps += 1
        if len(self._pending["action"]) >= _FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        f = self._file
        robot = self._pending_robot or {}
        for group, pending in (("obs/", self._pending_obs), ("", self._pending), ("robot/", robot)):
            for key, values in pending.items():
                if values:
                    ds = f[group + key]
                    n = ds.shape[0]
                    ds.resize(n + len(values), axis=0)
                    ds[n:] = np.asarray(values, dtype=ds.dtype)
                    values.clear()
        f.flush()

    def end_episode(self, success: bool | None = None) -> Path:
        """Commit the episode; its `success` attribute defaults to the last step's success flag."""
        if self._file is None:
            raise DatasetError(f"{self.path}: end_episode() without an episode in progress")
        if self._steps == 0:
            raise DatasetError(f"{self.path}: the episode has no steps; call discard_episode() instead")
        self._flush()
        f = self._file
        last_success = bool(f["success"][-1])
        f.attrs["length"] = self._steps
        f.attrs["success"] = last_success if success is None else bool(success)
        f.close()
        self._file = None
        final = self.path / episode_filename(self.index)
        if final.exists():
            os.unlink(self._tmp)
            raise DatasetError(f"{final} appeared while this episode was recorded: two writers on one dataset?")
        commit_file(self._tmp, final)
        self.next_index = self.index + 1
        return final

    def discard_episode(self) -> None:
        """Drop the episode in progress (nothing is written); a no-op when none is."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.unlink(self._tmp)

    def close(self) -> None:
        """Discards an episode still in progress: only ended episodes belong to the dataset."""
        self.discard_episode()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- reading ------------------------------------------------------------------------------

def _read_meta(path: Path) -> dict:
    meta_path = path / META
    if not meta_path.exists():
        raise DatasetError(f"{path}: not a robolearn dataset (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{meta_path}: unreadable ({err})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format_version {version!r}; this robolearn reads {FORMAT_VERSION}")
    for field in ("env_id", "fps", "observation", "action"):
        if field not in meta:
            raise DatasetError(f"{meta_path}: missing field {field!r}")
    return meta


def _list_episodes(path: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(path):
        m = _EPISODE_RE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


class Dataset:
    """A read-only view of a dataset directory; episodes sorted by index, damaged ones skipped (validate_episode)."""

    def __init__(self, path: str | os.PathLike, strict: bool = False):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.strict = strict
        self.paths: list[Path] = []
        self.lengths: list[int] = []
        self.skipped: list[str] = []  # why each damaged episode was skipped
        for _, file in _list_episodes(self.path):
            try:
                self.lengths.append(self._validate(file))
                self.paths.append(file)
            except DatasetError as err:
                self._skip(err)

    def _skip(self, err: DatasetError) -> None:
        """A damaged episode: raised when strict, else remembered and warned about."""
        if self.strict:
            raise err
        self.skipped.append(str(err))
        warnings.warn(f"skipping episode file: {err}", stacklevel=3)

    def require_episodes(self, purpose: str) -> "Dataset":
        """DatasetError naming the dataset (and its first damaged episode) when it has no usable episode."""
        if not self.paths:
            why = f"; {len(self.skipped)} damaged, skipped: {self.skipped[0]}" if self.skipped else ""
            raise DatasetError(f"{self.path}: no usable episodes {purpose}{why}")
        return self

    @property
    def env_id(self) -> str:
        return self.meta["env_id"]

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def observation_spec(self) -> dict:
        return self.meta["observation"]

    @property
    def action_spec(self) -> dict:
        return self.meta["action"]

    @property
    def joint_names(self) -> list[str] | None:
        """The arm's joint names (the robot group's column order), or None when no episode has one."""
        return self.meta.get("robot_state", {}).get("joint_names")

    @property
    def num_steps(self) -> int:
        return int(sum(self.lengths))

    def _validate(self, file: Path) -> int:
        """Open an episode file and check it (validate_episode: shapes, and every float array read, finite and
        checksummed; images are not read); returns its length."""
        try:
            with h5py.File(file, "r") as f:
                return validate_episode(f, self.meta, file, int(f.attrs["length"]))
        except DatasetError:
            raise
        except Exception as err:  # h5py raises OSError/KeyError/ValueError for damaged files
            raise DatasetError(f"{file}: corrupt or truncated episode file ({type(err).__name__}: {err})") from None

    def __len__(self) -> int:
        return len(self.paths)

    def episode(self, i: int) -> dict[str, Any]:
        """{"obs": {key: (T+1, ...)}, "action": (T, A), "reward", "terminated", ... : (T,)}, and
        "robot": {field: (T+1, ...)} when the episode holds the robot state."""
        file = self.paths[i]
        try:
            with h5py.File(file, "r") as f:
                ep: dict[str, Any] = {"obs": {}}
                for name in episode_shapes(self.meta, 0, "robot" in f):  # "obs/images/front" -> obs, images/front
                    group, _, key = name.partition("/")
                    value = read_array(f[name], name, file)  # a bad checksum names the array
                    if key:
                        ep.setdefault(group, {})[key] = value
                    else:
                        ep[group] = value
            return ep
        except DatasetError:
            raise
        except Exception as err:
            raise DatasetError(f"{file}: corrupt episode data ({type(err).__name__}: {err})") from None

    def episode_attrs(self, i: int) -> dict[str, Any]:
        """length, success, env_id and any extra attributes given to begin_episode."""
        file = self.paths[i]
        try:
            with h5py.File(file, "r") as f:
                raw = f.attrs.get("attrs", "{}")
                base = {"length": int(f.attrs["length"]), "success": bool(f.attrs["success"]),
                        "env_id": str(f.attrs["env_id"])}
        except Exception as err:  # h5py's own errors for a damaged attribute
            raise DatasetError(f"{file}: corrupt episode attributes ({type(err).__name__}: {err})") from None
        try:
            extra = json.loads(raw)
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{file}: attrs is not valid JSON ({err})") from None
        if not isinstance(extra, dict):
            raise DatasetError(f"{file}: attrs is a JSON {type(extra).__name__}, expected an object")
        return {**extra, **base}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every episode; one found damaged only now (an image chunk) is skipped, or raises when strict."""
        for i in range(len(self)):
            try:
                ep = self.episode(i)
            except DatasetError as err:
                self._skip(err)
                continue
            yield ep

    def check_compatible(self, env) -> None:
        """Raise DatasetError naming the observation key or action shape that differs from `env`'s."""
        where = f"dataset {self.path}"
        compare_observation_specs(self.observation_spec, observation_spec(env.observation_space), where)
        got = [int(d) for d in env.action_space.shape]
        if list(self.action_spec["shape"]) != got:
            raise DatasetError(f"{where}: action shape {tuple(self.action_spec['shape'])} in the dataset but "
                               f"{tuple(got)} in the environment")


# -- scripted demonstrations --------------------------------------------------------------

def _env_id(env) -> str:
    if getattr(env, "spec", None) is not None and env.spec.id:
        return env.spec.id
    return getattr(env.unwrapped, "env_id", type(env.unwrapped).__name__)


def write_expert_episodes(env, policy: Callable[[dict], np.ndarray], path: str | os.PathLike, episodes: int,
                          seed: int = 0, robot: str = "panda", success_key: str | None = "success") -> list[Path]:
    """Run `policy` for `episodes` episodes (reset seeds seed, seed+1, ...) and append them to `path`.

    policy.reset() (if it has one) is called at each episode start; per-step success is
    info[success_key], with a warning naming the env if it never reported that key."""
    from robolearn.rollout import episode_success, reset_policy, warn_unreported

    fps = env.metadata.get("render_fps") or 10
    writer = DatasetWriter(path, _env_id(env), env.observation_space, env.action_space, fps=fps, robot=robot)
    written, reported = [], False
    with writer:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            reset_policy(policy)
            writer.begin_episode(obs, robot=robot_state(env), seed=seed + ep)
            done = False
            while not done:
                action = policy(obs)
                obs, reward, terminated, truncated, info = env.step(action)
                writer.add_step(action, obs, reward, terminated, truncated, episode_success(info, success_key),
                                robot=robot_state(env))
                reported = reported or (success_key is not None and success_key in info)
                done = terminated or truncated
            written.append(writer.end_episode())
    if not reported:
        warn_unreported(env, success_key, episodes)
    return written
