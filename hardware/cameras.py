"""Cameras for the robot env: one typed config, one factory, and the frame handling they all share.

`make_camera(cfg)` builds a RealSense (hardware/realsense.py), an OpenCV `VideoCapture`
(hardware/opencv_camera.py) or a ROS image topic camera (robolearn.ros.ros_backend.RosCamera) from a
`CameraConfig` or a YAML mapping. Every one returns frames cropped and resized to the policy's size by
`fit_frame`, and refuses a frame older than its `max_age` with StaleStateError. docs/cameras.md.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from robolearn.robot.interfaces import StaleStateError

TYPES = ("realsense", "opencv", "ros")
CROPS = ("center", "none")


@dataclass
class CameraConfig:
    """One camera: where its frames come from and the size the policy takes them at."""

    name: str = "camera"
    type: str = "opencv"  # realsense | opencv | ros
    serial: str = ""  # realsense: the device's serial number ("" = the only one connected)
    file: str = ""  # realsense: a recording (.db3, or .bag from librealsense < 2.57) played instead of a device
    source: str = "0"  # opencv: a device index, a video file or a stream URL
    topic: str = ""  # ros: sensor_msgs/Image topic ("" = <name>/image_raw); ending in /compressed: CompressedImage
    width: int = 128  # output size; 0 and 0: the (cropped) native size
    height: int = 128
    fps: float = 30.0  # requested capture rate
    resolution: tuple[int, ...] = ()  # capture [width, height] (RealSense default 640x480; OpenCV the device's)
    crop: str | tuple[int, ...] = "center"  # center | none | [top, left, height, width] of the captured frame
    depth: bool = False  # realsense: also stream depth aligned to color
    max_age: float = 0.2  # s; read() refuses an older frame
    realtime: bool = True  # files and recordings: paced at their own rate (false: as fast as they are read)
    reconnect_after: float = 1.0  # s without a frame before the source is closed and reopened (0: never)

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) of the output, None for the native size."""
        return (self.height, self.width) if self.width else None


_FIELDS = {f.name: f for f in dataclasses.fields(CameraConfig)}


def camera_config(data, where: str = "camera") -> CameraConfig:
    """A checked CameraConfig from a CameraConfig or a YAML mapping; ValueError naming `where` and the field."""
    if isinstance(data, CameraConfig):
        return check_config(data, where)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a camera is a mapping of {sorted(_FIELDS)}, got {data!r}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid: {sorted(_FIELDS)}")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(key, value, f"{where}.{key}")
    name = values.get("name", CameraConfig.name)
    return check_config(CameraConfig(**values), f"{where} ({name})" if "name" in values else where)


def _coerce(key: str, value, where: str):
    default = _FIELDS[key].default if _FIELDS[key].default is not dataclasses.MISSING else ()
    try:
        if key == "crop":
            if isinstance(value, str):
                return value
            return tuple(_int(v) for v in value)
        if key == "resolution":
            return tuple(_int(v) for v in value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            return _int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if key in ("source", "serial") and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads `source: 0` and `serial: 123456` as ints
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        kind = "a list of integers" if key in ("crop", "resolution") else type(default).__name__
        raise ValueError(f"{where}: {value!r} is not {kind}") from None


def _int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError
    return int(v)


def check_config(cfg: CameraConfig, where: str = "camera") -> CameraConfig:
    """Raise ValueError naming `where` and the field when `cfg` cannot work; returns it."""
    def bad(field_name: str, why: str):
        raise ValueError(f"{where}.{field_name}: {why}")
    if not cfg.name:
        bad("name", "is empty")
    if cfg.type not in TYPES:
        bad("type", f"{cfg.type!r} is not one of {list(TYPES)}")
    if cfg.width < 0 or cfg.height < 0 or (cfg.width == 0) != (cfg.height == 0):
        bad("width", f"width {cfg.width} and height {cfg.height} must both be positive (or both 0: native size)")
    if cfg.type == "ros" and not cfg.width:
        bad("width", "a ros camera needs the policy's width and height")
    if not cfg.fps > 0:
        bad("fps", f"must be positive, got {cfg.fps}")
    if not cfg.max_age > 0:
        bad("max_age", f"must be positive (s), got {cfg.max_age}")
    if cfg.reconnect_after < 0:
        bad("reconnect_after", f"must be >= 0 (s), got {cfg.reconnect_after}")
    if cfg.resolution and (len(cfg.resolution) != 2 or min(cfg.resolution) <= 0):
        bad("resolution", f"must be [width, height] in pixels, got {list(cfg.resolution)}")
    if isinstance(cfg.crop, str):
        if cfg.crop not in CROPS:
            bad("crop", f"{cfg.crop!r} is not one of {list(CROPS)} or [top, left, height, width]")
    elif len(cfg.crop) != 4 or min(cfg.crop[:2]) < 0 or min(cfg.crop[2:]) <= 0:
        bad("crop", f"must be [top, left, height, width] with a positive size, got {list(cfg.crop)}")
    if cfg.type == "opencv" and not str(cfg.source):
        bad("source", "an opencv camera needs a device index, a file or a URL")
    if cfg.type == "realsense" and cfg.file and not Path(cfg.file).is_file():
        bad("file", f"no recording at {cfg.file}")
    if cfg.depth and cfg.type != "realsense":
        bad("depth", f"only a realsense camera streams depth, not {cfg.type}")
    return cfg


def camera_configs(data, where: str = "cameras") -> list[CameraConfig]:
    """CameraConfigs from a profile's `cameras:` list (or a mapping holding one); names must differ."""
    if isinstance(data, dict) and "cameras" in data:
        data = data["cameras"]
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of cameras, got {type(data).__name__}")
    cfgs = [camera_config(item, f"{where}[{i}]") for i, item in enumerate(data)]
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: camera name(s) {dup} appear more than once")
    return cfgs


def load_camera_configs(path) -> list[CameraConfig]:
    """The `cameras:` list of a YAML profile file."""
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or "cameras" not in data:
        raise ValueError(f"{path}: no `cameras:` list")
    return camera_configs(data["cameras"], f"{path}: cameras")


def make_camera(cfg, node=None, on_frame: Callable | None = None):
    """The camera `cfg` (a CameraConfig or a YAML mapping) describes; a ros camera needs an rclpy `node`."""
    cfg = camera_config(cfg, f"camera {cfg.name!r}" if isinstance(cfg, CameraConfig) else "camera")
    if cfg.type == "realsense":
        from robolearn.hardware.realsense import RealSenseCamera
        return RealSenseCamera(cfg, on_frame)
    if cfg.type == "opencv":
        from robolearn.hardware.opencv_camera import OpenCVCamera
        return OpenCVCamera(cfg, on_frame)
    if node is None:
        raise ValueError(f"camera {cfg.name!r}: a ros camera needs an rclpy node (make_camera(cfg, node))")
    from robolearn.ros.ros_backend import RosCamera  # only here: hardware/ never imports rclpy by itself
    return RosCamera(node, cfg.name, (cfg.height, cfg.width, 3), cfg.max_age, cfg.topic or None, crop=cfg.crop)


# -- crop and resize: the one geometry every camera (and its camera_info) uses ---------------------------
def crop_box(src_hw: tuple[int, int], size: tuple[int, int] | None, crop) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the region of a src_hw frame that becomes the output."""
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    if isinstance(crop, str):
        if crop == "none" or size is None:
            return 0, 0, src_h, src_w
        if crop != "center":
            raise ValueError(f"crop {crop!r} is not one of {list(CROPS)} or [top, left, height, width]")
        scale = min(src_h / size[0], src_w / size[1])  # the largest centred region with the output's aspect
        h, w = min(src_h, round(size[0] * scale)), min(src_w, round(size[1] * scale))
        return (src_h - h) // 2, (src_w - w) // 2, h, w
    top, left, h, w = (int(v) for v in crop)
    if top + h > src_h or left + w > src_w:
        raise ValueError(f"crop [top {top}, left {left}, height {h}, width {w}] does not fit a {src_h}x{src_w} frame")
    return top, left, h, w


def fit_frame(frame: np.ndarray, size: tuple[int, int] | None, crop="center", nearest: bool = False) -> np.ndarray:
    """`frame` cropped by `crop` and resized to size (height, width); nearest-neighbour for depth and labels."""
    import cv2
    top, left, h, w = crop_box(frame.shape[:2], size, crop)
    region = frame[top:top + h, left:left + w]
    if size is not None and (h, w) != tuple(size):
        if nearest:
            interp = cv2.INTER_NEAREST
        else:  # area averaging when shrinking (no aliasing), bilinear when enlarging
            interp = cv2.INTER_AREA if size[0] <= h and size[1] <= w else cv2.INTER_LINEAR
        region = cv2.resize(region, (int(size[1]), int(size[0])), interpolation=interp)
    return np.ascontiguousarray(region)


def fit_intrinsics(k: np.ndarray, src_hw: tuple[int, int], size: tuple[int, int] | None, crop="center") -> np.ndarray:
    """The 3x3 pinhole matrix `k` of a src_hw frame for the frame fit_frame makes of it (pixel centres at integers)."""
    top, left, h, w = crop_box(src_hw, size, crop)
    sy, sx = (size[0] / h, size[1] / w) if size is not None else (1.0, 1.0)
    k = np.asarray(k, dtype=float)
    out = np.eye(3)
    out[0, 0], out[1, 1], out[0, 1] = k[0, 0] * sx, k[1, 1] * sy, k[0, 1] * sx
    out[0, 2] = (k[0, 2] - left + 0.5) * sx - 0.5
    out[1, 2] = (k[1, 2] - top + 0.5) * sy - 0.5
    return out


# -- a source read by a thread of its own, reopened when its frames stop ----------------------------------
@dataclass
class Frame:
    """One fitted frame: RGB uint8 HWC, the capture time (s, host clock), and where it came from."""

    image: np.ndarray
    stamp: float
    number: int  # the source's frame counter
    receipt: float  # time.monotonic() when it arrived
    latency: float = 0.0  # s from its stamp to its receipt, where the stamp is on the host's clock
    depth: np.ndarray | None = None  # uint16 mm, aligned to image and fitted the same way


class FrameStream:
    """Keeps the newest frame of a source; a thread reads it and reopens it (with backoff) when frames stop.

    Subclasses implement `_open()` (raise OSError with a one-line reason), `_grab(timeout)` -> (rgb,
    stamp, number, depth or None) or None, `_close()`, and set `native_hw`."""

    BACKOFF = (0.25, 5.0)  # s: first and longest wait between attempts to reopen

    def __init__(self, cfg: CameraConfig, on_frame: Callable[[Frame], None] | None = None):
        self.cfg, self.name, self.on_frame = cfg, cfg.name, on_frame
        self.native_hw: tuple[int, int] | None = None
        self.reconnects, self.frames, self.status, self.last_error = 0, 0, "opening", ""
        self._newest: Frame | None = None
        self._cond, self._stop = threading.Condition(), threading.Event()
        self._open()  # synchronously: a camera that is not there is a one-line error at startup, not a stale frame
        self.status = "streaming"
        self._thread = threading.Thread(target=self._run, name=f"camera {self.name}", daemon=True)
        self._thread.start()

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.cfg.size is not None:
            return (*self.cfg.size, 3)
        _, _, h, w = crop_box(self.native_hw, None, self.cfg.crop)
        return h, w, 3

    def read(self) -> tuple[np.ndarray, float]:
        """The newest frame (uint8 HWC RGB, fitted) and its stamp; StaleStateError when none is this fresh."""
        frame = self.latest()
        return frame.image, frame.stamp

    def latest(self) -> Frame:
        frame = self._newest
        if frame is None:
            raise StaleStateError(f"camera {self.name!r}: no frame yet ({self.status})")
        age = self.age()
        if age > self.cfg.max_age:
            raise StaleStateError(f"camera {self.name!r}: newest frame is {age * 1e3:.0f} ms old "
                                  f"(max age {self.cfg.max_age * 1e3:.0f} ms; {self.status})")
        return frame

    def age(self) -> float:
        """s since the newest frame was captured (receipt age plus its measured latency); inf before any."""
        frame = self._newest
        return np.inf if frame is None else time.monotonic() - frame.receipt + frame.latency

    def wait_frame(self, after: int, timeout: float) -> Frame | None:
        """The newest frame once more than `after` frames have arrived in all, or None after `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self.frames > after or self._stop.is_set(), timeout)
            return self._newest if self.frames > after else None

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.status = "closed"

    # -- the reading thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        opened, backoff, last = True, self.BACKOFF[0], time.monotonic()
        try:
            while not self._stop.is_set():
                if not opened:
                    try:
                        self._open()
                    except Exception as err:  # unplugged, busy, gone: try again later, report why meanwhile
                        self.last_error = str(err)
                        self.status = f"reconnecting (attempt {self.reconnects}; next in {backoff:.2f} s): {err}"
                        self._stop.wait(backoff)
                        backoff = min(2 * backoff, self.BACKOFF[1])
                        continue
                    opened, last = True, time.monotonic()
                    self.status = f"streaming (reopened {self.reconnects} time(s))"
                try:
                    got = self._grab(0.1)
                except Exception as err:  # a device that vanished mid-read raises here
                    got, self.last_error = None, str(err)
                now = time.monotonic()
                if got is not None:
                    self._deliver(got, now)
                    last, backoff = now, self.BACKOFF[0]
                elif self.cfg.reconnect_after and now - last > self.cfg.reconnect_after:
                    self.reconnects += 1
                    self.status = f"no frame for {now - last:.1f} s; reopening"
                    self._safe_close()
                    opened = False
        finally:
            self._safe_close()

    def _deliver(self, got, receipt: float) -> None:
        rgb, stamp, number, depth = got
        self.native_hw = rgb.shape[:2]
        image = fit_frame(rgb, self.cfg.size, self.cfg.crop)
        if depth is not None:
            depth = fit_frame(depth, self.cfg.size, self.cfg.crop, nearest=True)
        frame = Frame(image, stamp, number, receipt, max(0.0, time.time() - stamp), depth)
        with self._cond:
            self._newest = frame
            self.frames += 1
            self._cond.notify_all()
        if self.on_frame is not None:
            try:
                self.on_frame(frame)
            except Exception as err:  # a subscriber's bug must not end the reading thread
                self.last_error = f"on_frame: {err!r}"

    def _safe_close(self) -> None:
        try:
            self._close()
        except Exception as err:
            self.last_error = str(err)

    def intrinsics(self) -> tuple[np.ndarray, list[float]] | None:
        """(3x3 K, distortion coefficients) of the fitted frames where the source reports them, else None."""
        native = self._native_intrinsics()
        if native is None or self.native_hw is None:
            return None
        k, coeffs = native
        return fit_intrinsics(k, self.native_hw, self.cfg.size, self.cfg.crop), list(coeffs)

    def _native_intrinsics(self):
        return None

    def _open(self) -> None:
        raise NotImplementedError

    def _grab(self, timeout: float):
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class HostClock:
    """Maps a device clock (ms) onto the host's wall clock (s), anchored at the first frame after each open."""

    def __init__(self):
        self.offset: float | None = None

    def reset(self) -> None:
        self.offset = None

    def __call__(self, device_ms: float) -> float:
        if self.offset is None:
            self.offset = time.time() - device_ms * 1e-3
        return device_ms * 1e-3 + self.offset
