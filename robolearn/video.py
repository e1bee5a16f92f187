"""Writing rollouts to mp4 (H.264 through imageio's bundled ffmpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: float) -> Path:
    """Write uint8 HxWx3 frames; the file appears only once complete (temp file, then rename)."""
    import imageio.v2 as imageio

    path = Path(path)
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=8) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    tmp.replace(path)
    return path
