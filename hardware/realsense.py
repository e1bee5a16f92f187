"""Intel RealSense color (and aligned depth) through pyrealsense2, by serial number or from a recording.

`RealSenseCamera(cfg)` is a FrameStream (hardware/cameras.py): hardware timestamps mapped onto the host
clock, frames fitted to the policy's size, the pipeline restarted with backoff when frames stop (an
unplugged camera). `write_recording` makes a recording without a camera (rs.software_device + rs.recorder).
"""

from __future__ import annotations

import numpy as np

from robolearn.hardware.cameras import CameraConfig, FrameStream, HostClock

DEFAULT_RESOLUTION = (640, 480)


def _rs():
    try:
        import pyrealsense2 as rs
    except ImportError:
        raise ImportError("RealSense cameras need pyrealsense2: pip install 'robolearn[realsense]'") from None
    return rs


def connected_serials() -> list[str]:
    """Serial numbers of the RealSense devices librealsense sees now."""
    rs = _rs()
    return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]


class RealSenseCamera(FrameStream):
    """A RealSense's color stream (rgb8), optionally with depth aligned to it (uint16 mm)."""

    def __init__(self, cfg: CameraConfig, on_frame=None):
        self._rs, self._pipe, self._align, self._clock = _rs(), None, None, HostClock()
        self._k, self._coeffs, self._depth_scale, self._last_number = None, [], 0.001, None
        self.serial = cfg.serial
        super().__init__(cfg, on_frame)

    def _open(self) -> None:
        rs, cfg = self._rs, self.cfg
        config, pipe = rs.config(), rs.pipeline()
        where = f"camera {self.name!r}"
        if cfg.file:
            config.enable_device_from_file(cfg.file, repeat_playback=False)
            config.enable_stream(rs.stream.color)  # a recording holds one color format and size
            if cfg.depth:
                config.enable_stream(rs.stream.depth)
        else:
            if cfg.serial:
                serials = connected_serials()
                if cfg.serial not in serials:
                    raise OSError(f"{where}: no RealSense with serial {cfg.serial} (connected: {serials or 'none'})")
                config.enable_device(cfg.serial)
            w, h = cfg.resolution or DEFAULT_RESOLUTION
            config.enable_stream(rs.stream.color, int(w), int(h), rs.format.rgb8, int(round(cfg.fps)))
            if cfg.depth:
                config.enable_stream(rs.stream.depth, int(w), int(h), rs.format.z16, int(round(cfg.fps)))
        try:
            # Resolve first: a recording's playback speed must be set before its frames start flowing.
            device = config.resolve(rs.pipeline_wrapper(pipe)).get_device()
            if cfg.file:
                device.as_playback().set_real_time(cfg.realtime)
            profile = pipe.start(config)
        except RuntimeError as err:
            raise OSError(f"{where}: cannot start {cfg.file or cfg.serial or 'a RealSense'}: {err}") from None
        try:  # the pipeline stops again on any failure below: a started one keeps the device busy for a reconnect
            device = profile.get_device()
            serial = (device.get_info(rs.camera_info.serial_number)
                      if device.supports(rs.camera_info.serial_number) else "")
            if cfg.serial and serial and serial != cfg.serial:  # a recording made with another camera
                raise OSError(f"{where}: {cfg.file or 'device'} has serial {serial}, expected {cfg.serial}")
            self.serial = serial
            video = profile.get_stream(rs.stream.color).as_video_stream_profile()
            intr = video.get_intrinsics()
            self._k = np.array([[intr.fx, 0.0, intr.ppx], [0.0, intr.fy, intr.ppy], [0.0, 0.0, 1.0]])
            self._coeffs = [float(c) for c in intr.coeffs]
            self.native_hw = (intr.height, intr.width)
            if cfg.depth:
                self._depth_scale = device.first_depth_sensor().get_depth_scale()
                self._align = rs.align(rs.stream.color)
        except OSError:
            pipe.stop()
            raise
        except RuntimeError as err:
            pipe.stop()
            raise OSError(f"{where}: {cfg.file or cfg.serial or 'RealSense'}: {err}") from None
        self._pipe, self._last_number = pipe, None
        self._clock.reset()

    def _grab(self, timeout: float):
        rs = self._rs
        ok, frames = self._pipe.try_wait_for_frames(max(1, int(timeout * 1e3)))
        if not ok:
            return None
        if self._align is not None:
            frames = self._align.process(frames)
        color = frames.get_color_frame()
        number = color.get_frame_number()
        if number == self._last_number:  # the syncer repeats a color frame beside the next depth frame
            return None
        self._last_number = number
        rgb = np.asanyarray(color.get_data())
        fmt = color.get_profile().format()
        if fmt == rs.format.bgr8:
            rgb = rgb[..., ::-1]
        elif fmt in (rs.format.rgba8, rs.format.bgra8):
            rgb = rgb[..., [0, 1, 2] if fmt == rs.format.rgba8 else [2, 1, 0]]
        elif fmt == rs.format.yuyv:
            import cv2
            rgb = cv2.cvtColor(rgb.reshape(rgb.shape[0], -1, 2), cv2.COLOR_YUV2RGB_YUYV)
        elif fmt != rs.format.rgb8:
            raise OSError(f"camera {self.name!r}: color format {fmt} is not rgb8, bgr8, rgba8, bgra8 or yuyv")
        domain = color.get_frame_timestamp_domain()
        ms = color.get_timestamp()
        # Global and system time are the host's clock already; the device's own clock is anchored onto it.
        host = domain in (rs.timestamp_domain.global_time, rs.timestamp_domain.system_time)
        stamp = ms * 1e-3 if host else self._clock(ms)
        depth = None
        if self._align is not None:
            d = frames.get_depth_frame()
            if d:
                raw = np.asanyarray(d.get_data())
                depth = np.clip(np.rint(raw * (self._depth_scale * 1e3)), 0, 65535).astype(np.uint16)
        return np.array(rgb, copy=True), stamp, int(number), depth

    def _close(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.stop()

    def _native_intrinsics(self):
        return None if self._k is None else (self._k, self._coeffs)


def write_recording(path, frames: np.ndarray, stamps_ms, depth: np.ndarray | None = None, serial: str = "",
                    fx: float = 0.0, fy: float = 0.0, fps: int = 30, depth_units: float = 0.001) -> str:
    """Record (N, H, W, 3) uint8 RGB frames (and (N, H, W) uint16 depth) as a RealSense would, without one.

    Uses librealsense's own recorder on a software device, so playback runs the library's real path.
    librealsense >= 2.57 writes ROS 2 bags and wants a `.db3` path. Takes as long as `stamps_ms` span:
    the recorder files each frame at the time it arrives, and real-time playback replays those times."""
    import time
    rs = _rs()
    frames = np.asarray(frames, dtype=np.uint8)
    n, h, w = frames.shape[:3]
    intr = rs.intrinsics()
    intr.width, intr.height, intr.ppx, intr.ppy = w, h, (w - 1) / 2, (h - 1) / 2
    intr.fx, intr.fy = fx or float(w), fy or float(w)
    intr.model, intr.coeffs = rs.distortion.brown_conrady, [0.0] * 5
    device = rs.software_device()
    if serial:
        device.register_info(rs.camera_info.serial_number, serial)
    sensors = []

    def add(kind, name, fmt, bpp, uid):
        sensor = device.add_sensor(name)
        stream = rs.video_stream()
        stream.type, stream.index, stream.uid, stream.width, stream.height = kind, 0, uid, w, h
        stream.fps, stream.bpp, stream.fmt, stream.intrinsics = fps, bpp, fmt, intr
        sensors.append((sensor, sensor.add_video_stream(stream)))
        return sensor

    add(rs.stream.color, "Color", rs.format.rgb8, 3, 0)
    if depth is not None:
        add(rs.stream.depth, "Stereo Module", rs.format.z16, 2, 1).add_read_only_option(rs.option.depth_units,
                                                                                          depth_units)
    recorder = rs.recorder(str(path), device)
    for sensor, profile in sensors:
        sensor.open(profile)
        sensor.start(lambda frame: None)
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + (stamps_ms[i] - stamps_ms[0]) * 1e-3 - time.monotonic()))
        planes = [(frames[i], 3)] + ([(np.asarray(depth[i], dtype=np.uint16), 2)] if depth is not None else [])
        for (sensor, profile), (pixels, bpp) in zip(sensors, planes):
            f = rs.software_video_frame()
            f.pixels, f.stride, f.bpp = np.ascontiguousarray(pixels), w * bpp, bpp
            f.timestamp, f.domain, f.frame_number = float(stamps_ms[i]), rs.timestamp_domain.hardware_clock, i
            f.profile = profile.as_video_stream_profile()
            if bpp == 2:
                f.depth_units = depth_units
            sensor.on_video_frame(f)
    for sensor, _ in sensors:
        sensor.stop()
        sensor.close()
    recorder.pause()
    del recorder  # the recorder writes the file out when it is destroyed
    return str(path)
