"""robomimic's HDF5 layout: one file, `data/demo_N/{obs,next_obs}/<key>, actions, rewards, dones`.

Observation keys become flat robomimic names (`images/front` -> `front_image`); the rest of our
episode (terminated, truncated, success, intervention, timestamp) sits beside `dones` in each
demo, and the dataset meta and key map in `data` attributes, so import is exact. A robomimic
file from elsewhere imports too (images `<camera>_image`, other keys as named). docs/formats.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np

from robolearn.demos.convert import Episode, check_episode, env_kwargs_for, image_keys
from robolearn.demos.dataset import Dataset, DatasetError

GYM_ENV_TYPE = 2  # robomimic's EnvType.GYM_TYPE: env_args name a gymnasium id
EXTRA_KEYS = ("terminated", "truncated", "success", "intervention", "timestamp")


def robomimic_key(key: str) -> str:
    if key.startswith("images/"):
        return key.split("/", 1)[1].replace("/", "_") + "_image"
    return key.replace("/", "_")


def export(ds: Dataset, episodes: Iterable[tuple[int, Episode]], out: Path) -> None:
    meta = ds.meta
    keys = {key: robomimic_key(key) for key in meta["observation"]}
    if len(set(keys.values())) != len(keys):
        raise DatasetError(f"{ds.path}: observation keys {sorted(keys)} collide as robomimic names")
    images = set(image_keys(meta))
    total, names = 0, []
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        for n, (index, ep) in enumerate(episodes):
            T = len(ep["action"])
            g = data.create_group(f"demo_{n}")
            for group, rows in (("obs", slice(0, T)), ("next_obs", slice(1, T + 1))):
                for key, name in keys.items():
                    opts = dict(compression="gzip", compression_opts=4, chunks=(1, *ep["obs"][key].shape[1:])) \
                        if key in images else {}
                    g.create_dataset(f"{group}/{name}", data=ep["obs"][key][rows], **opts)
            g.create_dataset("actions", data=ep["action"])
            g.create_dataset("rewards", data=ep["reward"])
            g.create_dataset("dones", data=(ep["terminated"] | ep["truncated"]).astype(np.int64))
            for key in EXTRA_KEYS:
                g.create_dataset(key, data=ep[key])
            g.attrs["num_samples"] = T
            g.attrs["robolearn_episode"] = json.dumps({"index": index, "attrs": ep["attrs"]})
            total += T
            names.append(f"demo_{n}")
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": meta["env_id"], "type": GYM_ENV_TYPE,
                                             "env_kwargs": env_kwargs_for(meta["env_id"], meta["observation"])})
        data.attrs["robolearn_meta"] = json.dumps({**meta, "robomimic_keys": keys})
        f.create_dataset("mask/train", data=np.array(names, dtype="S"))


def _demo_order(names: Iterable[str]) -> list[str]:
    demos = [n for n in names if re.fullmatch(r"demo_\d+", n)]
    return sorted(demos, key=lambda n: int(n.split("_")[1]))


def read(path: Path) -> tuple[dict, Iterator[Callable[[], Episode]]]:
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({err})") from None
    try:
        data = f["data"]
        demos = _demo_order(data.keys())
        if not demos:
            raise DatasetError(f"{path}: no data/demo_N groups (not a robomimic file?)")
        if "robolearn_meta" in data.attrs:
            meta = json.loads(data.attrs["robolearn_meta"])
            keys = meta.pop("robomimic_keys")
        else:
            meta, keys = _infer_meta(path, data, demos[0])
    except DatasetError:
        f.close()
        raise
    except Exception as err:
        f.close()
        raise DatasetError(f"{path}: not a robomimic file ({type(err).__name__}: {err})") from None

    def episodes() -> Iterator[Callable[[], Episode]]:
        with f:
            for name in demos:
                yield lambda name=name: _read_demo(f, name, meta, keys, f"{path}:data/{name}")
    return meta, episodes()


def _read_demo(f: h5py.File, name: str, meta: dict, keys: dict, where: str) -> Episode:
    try:
        g = f[f"data/{name}"]
        action = g["actions"][()].astype(np.float32)
        T = len(action)
        obs = {}
        for key, rkey in keys.items():
            first = g[f"obs/{rkey}"][()]
            last = g[f"next_obs/{rkey}"][-1:] if f"next_obs/{rkey}" in g else first[-1:]
            obs[key] = np.concatenate([first, last]).astype(meta["observation"][key]["dtype"], copy=False)
        if f"next_obs/{next(iter(keys.values()))}" not in g:  # no final observation: the last action has no result
            action, T = action[:-1], T - 1
            obs = {k: v[:-1] for k, v in obs.items()}
        dones = g["dones"][()][:T].astype(bool) if "dones" in g else np.zeros(T, bool)
        ep = {"obs": obs, "action": action, "reward": g["rewards"][()][:T].astype(np.float32)}
        if all(k in g for k in EXTRA_KEYS):
            for k in EXTRA_KEYS:
                ep[k] = g[k][()]
        else:  # a robomimic file from elsewhere: done marks success; the end is a time limit otherwise
            ep.update(terminated=dones, truncated=np.zeros(T, bool), success=dones.copy(),
                      intervention=np.zeros(T, bool), timestamp=np.arange(T) / float(meta["fps"]))
            if T and not dones[-1]:
                ep["truncated"][-1] = True
        info = json.loads(g.attrs.get("robolearn_episode", "{}"))
        ep["attrs"] = info.get("attrs", {"success": bool(ep["success"][-1]) if T else False})
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"{where}: corrupt or incomplete demo ({type(err).__name__}: {err})") from None
    return check_episode(ep, meta, where)


def _infer_meta(path: Path, data: h5py.Group, first: str) -> tuple[dict, dict]:
    """Meta of a robomimic file not written by robolearn: keys and shapes from its first demo."""
    env_args = json.loads(data.attrs.get("env_args", "{}"))
    g = data[first]
    keys, spec = {}, {}
    for rkey, ds in g["obs"].items():
        image = ds.dtype == np.uint8 and ds.ndim == 4
        key = f"images/{rkey[:-len('_image')]}" if image and rkey.endswith("_image") else rkey
        keys[key] = rkey
        # robomimic's own files keep low-dimensional observations as float64; robolearn stores float32.
        spec[key] = {"shape": list(ds.shape[1:]), "dtype": "float32" if ds.dtype.kind == "f" else ds.dtype.name}
    adim = int(g["actions"].shape[1])
    control_freq = env_args.get("env_kwargs", {}).get("control_freq", 20)  # robosuite's default rate
    meta = {"format_version": 1, "env_id": env_args.get("env_name", ""), "fps": float(control_freq),
            "robot": _robot_name(env_args.get("env_kwargs", {}).get("robots")),
            "cameras": [k.split("/", 1)[1] for k in spec if k.startswith("images/")], "observation": spec,
            "action": {"shape": [adim], "dtype": "float32", "low": ["-inf"] * adim, "high": ["inf"] * adim}}
    return meta, keys


def _robot_name(robots) -> str:
    if isinstance(robots, (list, tuple)):
        return ",".join(str(r) for r in robots) or "unknown"
    return str(robots or "unknown")
