"""What a dataset holds: episode counts and lengths, success, interventions, specs, sizes."""

from __future__ import annotations

import os
import warnings

import h5py
import numpy as np

from robolearn.demos.dataset import Dataset, DatasetError, _list_episodes, read_array


def summarize(path: str | os.PathLike, strict: bool = False) -> dict:
    """A JSON-able summary; damaged episodes are skipped with a warning (DatasetError when strict)."""
    ds = Dataset(path, strict=strict)  # opening checks every episode but its images (validate_episode)
    episodes = []
    for i, file in enumerate(ds.paths):
        try:
            attrs = ds.episode_attrs(i)
            if strict:  # --strict reads every array, images too, so damage anywhere is an error
                interventions = int(np.count_nonzero(ds.episode(i)["intervention"]))
            else:
                with h5py.File(file, "r") as f:
                    interventions = int(np.count_nonzero(read_array(f["intervention"], "intervention", file)))
        except Exception as err:
            err = err if isinstance(err, DatasetError) else DatasetError(
                f"{file}: corrupt episode attributes ({type(err).__name__}: {err})")
            if strict:
                raise err from None
            warnings.warn(f"skipping episode file: {err}", stacklevel=2)
            continue
        episodes.append({"index": int(file.stem.split("_")[1]), "file": file.name, "steps": attrs["length"],
                         "success": attrs["success"], "interventions": interventions,
                         "seed": attrs.get("seed"), "bytes": file.stat().st_size})
    lengths = np.array([e["steps"] for e in episodes]) if episodes else np.zeros(0, int)
    successes = sum(e["success"] for e in episodes)
    meta = ds.meta
    return {
        "path": str(ds.path), "env_id": meta["env_id"], "robot": meta.get("robot"), "fps": meta["fps"],
        "cameras": meta.get("cameras", []), "created": meta.get("created"),
        "episodes": len(episodes), "skipped": len(_list_episodes(ds.path)) - len(episodes),
        "steps": int(lengths.sum()),
        "length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}
        if len(lengths) else None,
        "successes": int(successes), "success_rate": successes / len(episodes) if episodes else None,
        "intervention_steps": int(sum(e["interventions"] for e in episodes)),
        "episodes_with_interventions": sum(1 for e in episodes if e["interventions"]),
        "observation": meta["observation"], "action": meta["action"], "joint_names": ds.joint_names,
        "bytes": int(sum(e["bytes"] for e in episodes)),
        "per_episode": episodes,
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(s: dict) -> str:
    """The summary as the text `robolearn demos info` prints."""
    lines = [f"dataset:       {s['path']}",
             f"env:           {s['env_id']}   robot: {s['robot']}   fps: {s['fps']:g}   "
             f"cameras: {', '.join(s['cameras']) or '-'}",
             f"episodes:      {s['episodes']}" + (f"   ({s['skipped']} skipped: damaged)" if s["skipped"] else ""),
             f"steps:         {s['steps']}"]
    if s["length"]:
        lines.append(f"length:        min {s['length']['min']}   mean {s['length']['mean']:g}   "
                     f"max {s['length']['max']}")
        lines.append(f"success rate:  {s['success_rate']:.1%} ({s['successes']}/{s['episodes']})")
    lines.append(f"interventions: {s['intervention_steps']} steps in {s['episodes_with_interventions']} episodes")
    lines.append(f"size:          {_size(s['bytes'])}"
                 + (f" ({_size(s['bytes'] / s['episodes'])} per episode)" if s["episodes"] else ""))
    lines.append("observation:")
    width = max((len(k) for k in s["observation"]), default=0)
    for key, spec in s["observation"].items():
        lines.append(f"  {key:<{width}}  {tuple(spec['shape'])}  {spec['dtype']}")
    a = s["action"]
    lines.append(f"action:        {tuple(a['shape'])}  {a['dtype']}  low {a['low']}  high {a['high']}")
    if s["joint_names"]:
        lines.append(f"robot state:   joints {', '.join(s['joint_names'])}")
    lines.append("episodes:")
    lines.append(f"  {'index':>6}  {'steps':>5}  {'success':>7}  {'interv.':>7}  {'seed':>6}  {'size':>9}  file")
    for e in s["per_episode"]:
        seed = "-" if e["seed"] is None else str(e["seed"])
        lines.append(f"  {e['index']:>6}  {e['steps']:>5}  {'yes' if e['success'] else 'no':>7}  "
                     f"{e['interventions']:>7}  {seed:>6}  {_size(e['bytes']):>9}  {e['file']}")
    return "\n".join(lines)
