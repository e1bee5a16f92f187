"""A camera through OpenCV's `VideoCapture`: a device index, a video file or a stream URL.

`OpenCVCamera(cfg)` is a FrameStream (hardware/cameras.py): frames stamped with the host's clock when
they are read, fitted to the policy's size, and the source reopened when frames stop. A file plays at its
own frame rate (`realtime`), as the live camera it stands in for would.
"""

from __future__ import annotations

import os
import time

import numpy as np

from robolearn.hardware.cameras import CameraConfig, FrameStream


def parse_source(source: str, where: str) -> int | str:
    """A device index (digits), an existing file, or a URL; ValueError naming `where` otherwise."""
    text = str(source).strip()
    if text.isdigit():
        return int(text)
    if "://" in text or os.path.isfile(text) or text.startswith("/dev/video"):
        return text
    raise ValueError(f"{where}: source {text!r} is not a device index, an existing file or a URL")


class OpenCVCamera(FrameStream):
    """Frames of a `cv2.VideoCapture`, RGB; a device is asked for `resolution` and `fps`."""

    def __init__(self, cfg: CameraConfig, on_frame=None):
        self.source = parse_source(cfg.source, f"camera {cfg.name!r}")
        self.is_file = isinstance(self.source, str) and os.path.isfile(self.source)
        self._cap, self._count, self._period, self._due = None, 0, 0.0, 0.0
        super().__init__(cfg, on_frame)

    def _open(self) -> None:
        import cv2
        cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            raise OSError(f"camera {self.name!r}: OpenCV cannot open {self.source!r}")
        if not self.is_file:
            if self.cfg.resolution:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.resolution[0])
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.resolution[1])
            cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued seconds ago
        fps = cap.get(cv2.CAP_PROP_FPS) if self.is_file else 0.0
        self._period = 1.0 / (fps if fps > 0 else self.cfg.fps) if self.is_file and self.cfg.realtime else 0.0
        self.native_hw = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
        self._cap, self._count, self._due = cap, 0, time.monotonic()

    def _grab(self, timeout: float):
        if self._period:  # a file stands in for a live camera: one frame per period of its own rate
            wait = self._due - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, timeout))
                if wait > timeout:
                    return None
            self._due = max(self._due + self._period, time.monotonic() - self._period)
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            time.sleep(min(timeout, 0.02))  # end of a file, or a device that stopped: not a busy loop
            return None
        stamp = time.time()
        self._count += 1
        rgb = bgr[..., 2::-1] if bgr.ndim == 3 else np.repeat(bgr[..., None], 3, axis=2)  # BGR(A) or gray
        return np.ascontiguousarray(rgb), stamp, self._count - 1, None

    def _close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
