"""LeRobot dataset v3.0: parquet tables of frames, one H.264 mp4 per camera, JSON/parquet metadata.

An episode of T steps is T+1 frames: frame t holds observation t with action t and what followed
it (next.reward, next.done, next.success); the appended frame T holds the final observation, a
copy of the last action, and `complementary_info.final_frame` = true, so that no observation is
lost. Our flags that LeRobot has no name for are `complementary_info.*` columns, and
meta/robolearn.json keeps the dataset meta and episode attributes, so import is exact for every
array but the images, which are H.264 (yuv420p, CRF 10): mean absolute error <= VIDEO_MAE_BOUND
per camera and episode. LeRobot v3 datasets from elsewhere import too. Layout: docs/formats.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from robolearn.demos.convert import Episode, check_episode, image_keys
from robolearn.demos.dataset import Dataset, DatasetError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE, DATA_FILE_MB, VIDEO_FILE_MB = 1000, 100, 500  # LeRobot's defaults for the file layout
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_CODEC, VIDEO_PIX_FMT, VIDEO_CRF, VIDEO_GOP = "libx264", "yuv420p", 10, 2
# Mean absolute pixel error (0-255 scale) of one camera over one episode after a round trip;
# measured 1.3-2.0 on Panda renders at 32 px, less at 128 px (4:2:0 chroma subsampling dominates).
VIDEO_MAE_BOUND = 3.0
SIDECAR = "meta/robolearn.json"
EXTRA_FLAGS = ("terminated", "truncated", "intervention")


def feature_name(key: str, image: bool) -> str:
    if image:
        return "observation.images." + key.split("/", 1)[-1].replace("/", ".")
    return "observation." + key.replace("/", ".")


def _stats(x: np.ndarray, image: bool) -> dict:
    """LeRobot's per-feature stats: min/max/mean/std/count (images per channel, scaled to [0, 1])."""
    n, x = len(x), x.astype(np.float64)
    if image:  # (N, H, W, C) -> per channel, shaped (C, 1, 1)
        x = x.reshape(-1, x.shape[-1]) / 255.0
        shape = lambda v: v.reshape(-1, 1, 1)
    else:
        x = x.reshape(len(x), -1)
        shape = lambda v: v
    return {"min": shape(x.min(0)), "max": shape(x.max(0)), "mean": shape(x.mean(0)), "std": shape(x.std(0)),
            "count": np.array([n])}


def _combine(parts: list[dict], counts: list[int]) -> dict:
    """Stats of the union of episodes from per-episode stats (pooled mean and variance)."""
    w = np.array(counts, np.float64)
    means = np.stack([p["mean"] for p in parts])
    var = np.stack([p["std"] ** 2 for p in parts])
    mean = np.tensordot(w, means, 1) / w.sum()
    pooled = np.tensordot(w, var + (means - mean) ** 2, 1) / w.sum()
    return {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
            "mean": mean, "std": np.sqrt(pooled), "count": np.array([int(w.sum())])}


def _jsonable(stats: dict) -> dict:
    return {k: v.tolist() for k, v in stats.items()}


def _column(values: np.ndarray) -> pa.Array:
    """A parquet column: scalars plain, vectors as fixed-size lists (HF datasets' Sequence(length=n))."""
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _frames(ep: Episode, fps: float) -> dict[str, np.ndarray]:
    """The non-video columns of one episode's T+1 frames."""
    T = len(ep["action"])
    pad = lambda x, v: np.concatenate([x, np.array([v], x.dtype)])
    return {
        "action": np.concatenate([ep["action"], ep["action"][-1:]]).astype(np.float32),
        "next.reward": pad(ep["reward"].astype(np.float32), 0.0),
        "next.done": pad(ep["terminated"] | ep["truncated"], True),
        "next.success": pad(ep["success"], bool(ep["success"][-1])),
        **{f"complementary_info.{k}": pad(ep[k].astype(bool), False) for k in EXTRA_FLAGS},
        "complementary_info.step_timestamp": pad(ep["timestamp"].astype(np.float64),
                                                 float(ep["timestamp"][-1]) + 1.0 / fps),
        "complementary_info.final_frame": np.arange(T + 1) == T,
    }


class _VideoWriter:
    def __init__(self, path: Path, height: int, width: int, fps: float):
        import imageio_ffmpeg
        path.parent.mkdir(parents=True, exist_ok=True)
        self.gen = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=fps, codec=VIDEO_CODEC, pix_fmt_in="rgb24", pix_fmt_out=VIDEO_PIX_FMT,
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(VIDEO_CRF), "-g", str(VIDEO_GOP)])
        self.gen.send(None)

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.gen.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        self.gen.close()


def export(ds: Dataset, episodes: Iterable[tuple[int, Episode]], out: Path) -> None:
    meta, fps = ds.meta, float(ds.meta["fps"])
    videos = image_keys(meta)
    features: dict[str, dict] = {}
    keymap: dict[str, str] = {}
    for key, spec in meta["observation"].items():
        shape = list(spec["shape"])
        if key in videos:
            h, w, c = shape
            if c != 3 or h % 2 or w % 2:
                raise DatasetError(f"{ds.path}: image {key!r} is {tuple(shape)}; LeRobot video export needs "
                                   "HxWx3 with even H and W")
            name = feature_name(key, True)
            features[name] = {"dtype": "video", "shape": shape, "names": ["height", "width", "channels"],
                              "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                                       "video.pix_fmt": VIDEO_PIX_FMT, "video.is_depth_map": False,
                                       "video.fps": fps, "video.channels": 3, "has_audio": False}}
        else:
            if len(shape) > 1:
                raise DatasetError(f"{ds.path}: observation {key!r} has shape {tuple(shape)}; LeRobot export "
                                   "takes vectors and scalars")
            name = feature_name(key, False)
            features[name] = {"dtype": spec["dtype"], "shape": shape or [1],
                              "names": [f"{key}_{i}" for i in range(shape[0])] if shape else None}
        keymap[name] = key
    adim = int(np.prod(meta["action"]["shape"]))
    features["action"] = {"dtype": "float32", "shape": [adim], "names": [f"action_{i}" for i in range(adim)]}
    for name, dtype in (("next.reward", "float32"), ("next.done", "bool"), ("next.success", "bool"),
                        *((f"complementary_info.{k}", "bool") for k in EXTRA_FLAGS),
                        ("complementary_info.step_timestamp", "float64"), ("complementary_info.final_frame", "bool"),
                        ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}

    out.mkdir(parents=True)
    writers = {key: _VideoWriter(out / VIDEO_PATH.format(video_key=feature_name(key, True), chunk_index=0,
                                                         file_index=0),
                                 *meta["observation"][key]["shape"][:2], fps) for key in videos}
    columns: dict[str, list[np.ndarray]] = {name: [] for name in features if features[name]["dtype"] != "video"}
    ep_rows: list[dict] = []
    ep_stats: list[dict[str, dict]] = []
    sidecar_eps = []
    start = 0
    try:
        for n, (index, ep) in enumerate(episodes):
            length = len(ep["action"]) + 1
            frame = _frames(ep, fps)
            for name, key in keymap.items():
                if key in videos:
                    writers[key].write(ep["obs"][key])
                else:
                    frame[name] = ep["obs"][key].reshape(length, -1) if meta["observation"][key]["shape"] \
                        else ep["obs"][key]
            frame.update(timestamp=(np.arange(length) / fps).astype(np.float32),
                         frame_index=np.arange(length, dtype=np.int64), episode_index=np.full(length, n, np.int64),
                         index=np.arange(start, start + length, dtype=np.int64),
                         task_index=np.zeros(length, np.int64))
            for name in columns:
                columns[name].append(frame[name])
            stats = {name: _stats(frame[name], False) for name in columns}
            stats.update({feature_name(k, True): _stats(ep["obs"][k], True) for k in videos})
            ep_stats.append(stats)
            row = {"episode_index": n, "tasks": [_task(meta)], "length": length,
                   "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": start, "dataset_to_index": start + length}
            for k in videos:
                t0 = start / fps
                row.update({f"videos/{feature_name(k, True)}/chunk_index": 0,
                            f"videos/{feature_name(k, True)}/file_index": 0,
                            f"videos/{feature_name(k, True)}/from_timestamp": t0,
                            f"videos/{feature_name(k, True)}/to_timestamp": t0 + length / fps})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            for name, st in stats.items():
                for stat, value in st.items():
                    row[f"stats/{name}/{stat}"] = value.reshape(-1).tolist()
            ep_rows.append(row)
            sidecar_eps.append({"index": index, "attrs": ep["attrs"]})
            start += length
    finally:
        for w in writers.values():
            w.close()
    if not ep_rows:
        raise DatasetError(f"{ds.path}: no readable episodes to export")

    data = pa.table({name: _column(np.concatenate(parts)) for name, parts in columns.items()})
    _write_parquet(data, out / DATA_PATH.format(chunk_index=0, file_index=0))
    _write_parquet(pa.Table.from_pylist(ep_rows), out / EPISODES_PATH.format(chunk_index=0, file_index=0))
    _write_tasks(out / "meta/tasks.parquet", [_task(meta)])
    counts = [r["length"] for r in ep_rows]
    total = {name: _jsonable(_combine([s[name] for s in ep_stats], counts)) for name in ep_stats[0]}
    (out / "meta/stats.json").write_text(json.dumps(total, indent=2) + "\n")
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": meta.get("robot"),
            "total_episodes": len(ep_rows), "total_frames": start, "total_tasks": 1,
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": int(fps) if fps.is_integer() else fps, "splits": {"train": f"0:{len(ep_rows)}"},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if videos else None, "features": features}
    (out / "meta/info.json").write_text(json.dumps(info, indent=2) + "\n")
    sidecar = {"meta": meta, "features": keymap, "episodes": sidecar_eps,
               "video": {"codec": VIDEO_CODEC, "pix_fmt": VIDEO_PIX_FMT, "crf": VIDEO_CRF, "gop": VIDEO_GOP,
                         "mean_abs_error_bound": VIDEO_MAE_BOUND}}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def _task(meta: dict) -> str:
    return meta.get("task") or meta["env_id"]


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """meta/tasks.parquet as pandas writes a DataFrame indexed by task: pandas reads `task` back as the index."""
    pandas_meta = {"index_columns": ["task"], "column_indexes": [],
                   "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                "numpy_type": "int64", "metadata": None},
                               {"name": "task", "field_name": "task", "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": None}],
                   "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    _write_parquet(table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()}), path)


# -- reading ---------------------------------------------------------------------------------

def _array(table: pa.Table, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else \
            (len(col[0].values) if len(col) else 0)
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    else:
        values = col.to_numpy(zero_copy_only=False)
    return values if rows is None else values[rows]


def _decode_video(path: Path) -> np.ndarray:
    import imageio_ffmpeg
    if not path.exists():
        raise DatasetError(f"{path}: video file missing")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    info = next(reader)
    w, h = info["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def _read_tables(root: Path, pattern: str) -> pa.Table:
    files = sorted(root.glob(pattern))
    if not files:
        raise DatasetError(f"{root}: no {pattern} files")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def read(path: Path) -> tuple[dict, Iterator[Callable[[], Episode]]]:
    info_path = path / "meta/info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a LeRobot dataset ({info_path}: {err})") from None
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise DatasetError(f"{info_path}: codebase_version {version!r}; robolearn reads LeRobot v3.x datasets")
    sidecar = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).exists() else None
    features, fps = info["features"], float(info["fps"])
    if sidecar:
        meta, keymap = sidecar["meta"], sidecar["features"]
    else:
        meta, keymap = _infer_meta(info)
    episodes_table = _read_tables(path, "meta/episodes/*/*.parquet")
    order = np.argsort(_array(episodes_table, "episode_index"))
    ep_attrs = sidecar["episodes"] if sidecar else None
    videos = {name: key for name, key in keymap.items() if features[name]["dtype"] == "video"}

    def episodes() -> Iterator[Callable[[], Episode]]:
        cache: dict = {}

        def load(kind: str, file: Path):
            if cache.get(kind, (None,))[0] != file:  # one open file per kind (data, each camera)
                cache[kind] = (file, pq.read_table(file) if kind == "data" else _decode_video(file))
            return cache[kind][1]

        def load_episode(pos: int, r: int) -> Episode:
            row = {name: episodes_table.column(name)[int(r)].as_py() for name in episodes_table.column_names
                   if not name.startswith("stats/")}
            where = f"{path} episode {row['episode_index']}"
            try:
                data_file = path / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                            file_index=row["data/file_index"])
                table = load("data", data_file)
                rows = np.flatnonzero(_array(table, "episode_index") == row["episode_index"])
                rows = rows[np.argsort(_array(table, "frame_index", rows))]
                obs = {}
                for name, key in keymap.items():
                    if name in videos:
                        vfile = path / info["video_path"].format(
                            video_key=name, chunk_index=row[f"videos/{name}/chunk_index"],
                            file_index=row[f"videos/{name}/file_index"])
                        frames = load(name, vfile)
                        first = int(round(row[f"videos/{name}/from_timestamp"] * fps))
                        obs[key] = frames[first:first + len(rows)]
                    else:
                        dtype, shape = meta["observation"][key]["dtype"], meta["observation"][key]["shape"]
                        obs[key] = _array(table, name, rows).astype(dtype).reshape(len(rows), *shape)
                ep = _episode(table, rows, obs, fps, features)
                if ep_attrs is not None:
                    ep["attrs"] = ep_attrs[pos]["attrs"]
                return check_episode(ep, meta, where)
            except DatasetError as err:
                raise DatasetError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
            except Exception as err:
                raise DatasetError(f"{where}: corrupt or incomplete ({type(err).__name__}: {err})") from None

        for pos, r in enumerate(order):
            yield lambda pos=pos, r=r: load_episode(pos, r)
    return meta, episodes()


def _episode(table: pa.Table, rows: np.ndarray, obs: dict, fps: float, features: dict) -> Episode:
    col = lambda name, default: _array(table, name, rows) if name in features else default
    n = len(rows)
    final = col("complementary_info.final_frame", None)
    # Our exports end with a frame holding only the final observation; elsewhere the last frame's
    # action has no recorded result, so it is dropped.
    T = n - 1
    if final is not None and not (final[-1] and not final[:-1].any()):
        raise DatasetError("complementary_info.final_frame must mark exactly the last frame")
    done = col("next.done", np.zeros(n, bool)).astype(bool)[:T]
    ep = {"obs": obs, "action": _array(table, "action", rows)[:T].astype(np.float32),
          "reward": col("next.reward", np.zeros(n, np.float32)).astype(np.float32)[:T]}
    if final is not None:
        for k in EXTRA_FLAGS:
            ep[k] = col(f"complementary_info.{k}", np.zeros(n, bool)).astype(bool)[:T]
        ep["timestamp"] = col("complementary_info.step_timestamp", np.arange(n) / fps).astype(np.float64)[:T]
    else:
        ep.update(terminated=done, truncated=np.zeros(T, bool), intervention=np.zeros(T, bool),
                  timestamp=col("timestamp", np.arange(n) / fps).astype(np.float64)[:T])
        if T and not done[-1]:
            ep["truncated"][-1] = True
    ep["success"] = col("next.success", done).astype(bool)[:T] if "next.success" in features else done.copy()
    ep["attrs"] = {"success": bool(ep["success"][-1]) if T else False}
    return ep


def _infer_meta(info: dict) -> tuple[dict, dict]:
    """Meta of a LeRobot dataset not written by robolearn: observation.* features become keys."""
    obs, keymap = {}, {}
    for name, ft in info["features"].items():
        if not name.startswith("observation."):
            continue
        if ft["dtype"] == "video":
            key = "images/" + name[len("observation.images."):] if name.startswith("observation.images.") \
                else name[len("observation."):]
            obs[key] = {"shape": list(ft["shape"]), "dtype": "uint8"}
        elif ft["dtype"] in ("image", "string"):
            continue  # PNG-in-parquet images are not read
        else:
            key = name[len("observation."):].replace(".", "/")
            obs[key] = {"shape": list(ft["shape"]), "dtype": ft["dtype"]}
        keymap[name] = key
    adim = int(np.prod(info["features"]["action"]["shape"]))
    meta = {"format_version": 1, "env_id": "", "fps": float(info["fps"]), "robot": info.get("robot_type") or "unknown",
            "cameras": [k.split("/", 1)[1] for k in obs if k.startswith("images/")], "observation": obs,
            "action": {"shape": [adim], "dtype": "float32", "low": ["-inf"] * adim, "high": ["inf"] * adim}}
    return meta, keymap
