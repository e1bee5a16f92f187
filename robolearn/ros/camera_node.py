"""Publish a RealSense or OpenCV camera as `<camera>/image_raw` and `<camera>/camera_info`.

`python -m robolearn.ros.camera_node --ros-args -p camera:=front -p type:=realsense -p serial:=...`;
every frame goes out as it arrives, stamped with its capture time. docs/cameras.md lists the parameters.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.exceptions import ParameterException
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from robolearn.hardware.cameras import CameraConfig, camera_config, fit_intrinsics, make_camera
from robolearn.ros import common, robot_params

DEPTH_TOPIC = "{camera}/aligned_depth_to_color/image_raw"  # realsense2_camera's name for it
_D = CameraConfig()
PARAMS = {  # name: (default, description); docs/cameras.md lists them
    "camera": ("camera", "name: the topics are <camera>/image_raw and <camera>/camera_info"),
    "type": ("opencv", "realsense or opencv"),
    "serial": ("", "realsense: the device's serial number ('' = the only one connected)"),
    "file": ("", "realsense: a recording played instead of a device"),
    "source": (_D.source, "opencv: a device index, a video file or a stream URL"),
    "width": (0, "published width; 0 with height 0 = the (cropped) native size"),
    "height": (0, "published height"),
    "fps": (_D.fps, "requested capture rate"),
    "resolution": ("", "capture 'WxH' (e.g. 1280x720); '' = RealSense 640x480, OpenCV the device's"),
    "crop": ("center", "center | none | 'top,left,height,width' of the captured frame"),
    "depth": (False, "realsense: also publish depth aligned to color (16UC1, mm) on "
                     "<camera>/aligned_depth_to_color/image_raw"),
    "max_age": (0.5, "s; an older newest frame turns the diagnostics to WARN"),
    "realtime": (True, "files and recordings play at their own rate (false: as fast as they are read)"),
    "reconnect_after": (_D.reconnect_after, "s without a frame before the camera is reopened (0: never)"),
    "frame_id": ("", "header.frame_id ('' = <camera>_color_optical_frame)"),
    "fx": (0.0, "focal length (px) of the captured frame; 0 = the RealSense's, else the frame's width"),
    "fy": (0.0, "focal length (px); 0 = fx"),
    "cx": (-1.0, "principal point (px) of the captured frame; -1 = the RealSense's, else the centre"),
    "cy": (-1.0, "principal point (px); -1 = the RealSense's, else the centre"),
}


def _list(value, where: str) -> list[int]:
    """'1280x720', '10,20,100,100' or an integer array parameter as a list of ints."""
    if isinstance(value, str):
        parts = [v for v in value.replace("x", ",").split(",") if v.strip()]
        try:
            return [int(v) for v in parts]
        except ValueError:
            raise ValueError(f"parameter {where}: {value!r} is not a list of integers") from None
    return [int(v) for v in value]


class CameraNode(Node):
    """Publishes each frame of its camera from the camera's reading thread; diagnostics once a second."""

    def __init__(self, **kwargs):
        super().__init__("camera", **kwargs)
        robot_params.declare(self, PARAMS)
        p = self.p = {name: self.get_parameter(name).value for name in PARAMS}
        if p["type"] not in ("realsense", "opencv"):
            raise ValueError(f"parameter type: {p['type']!r} is not realsense or opencv (a ros camera is "
                             f"already on a topic)")
        crop = p["crop"] if p["crop"] in ("center", "none") else _list(p["crop"], "crop")
        self.cfg = camera_config(
            {"name": p["camera"], "type": p["type"], "serial": str(p["serial"]), "file": p["file"],
             "source": str(p["source"]), "width": p["width"], "height": p["height"], "fps": p["fps"],
             "resolution": _list(p["resolution"], "resolution"), "crop": crop, "depth": p["depth"],
             "max_age": p["max_age"], "realtime": p["realtime"], "reconnect_after": p["reconnect_after"]},
            "camera_node")
        self.frame_id = p["frame_id"] or f"{p['camera']}_color_optical_frame"
        name = p["camera"]
        self.image_pub = self.create_publisher(Image, common.IMAGE_RAW.format(camera=name), common.SENSOR_QOS)
        self.info_pub = self.create_publisher(CameraInfo, common.CAMERA_INFO.format(camera=name), common.SENSOR_QOS)
        self.depth_pub = (self.create_publisher(Image, DEPTH_TOPIC.format(camera=name), common.SENSOR_QOS)
                          if self.cfg.depth else None)
        self.diag_pub = self.create_publisher(DiagnosticArray, common.DIAGNOSTICS, common.RELIABLE_QOS)
        self._info, self.published, self.camera = None, 0, None
        self.camera = make_camera(self.cfg, on_frame=self._publish)  # OSError: not there / cannot open
        self.create_timer(1.0, self._diagnose)

    def _publish(self, frame) -> None:
        if self.camera is None:  # a frame that arrived while make_camera was still returning
            return
        image = common.image_msg(frame.image, frame.stamp, self.frame_id)
        info = self._camera_info()
        info.header = image.header
        self.image_pub.publish(image)
        self.info_pub.publish(info)
        if self.depth_pub is not None and frame.depth is not None:
            self.depth_pub.publish(depth_msg(frame.depth, image.header))
        self.published += 1

    def _camera_info(self) -> CameraInfo:
        """Pinhole intrinsics of the published frames: the RealSense's or the parameters', fitted as the frames are."""
        native_hw = self.camera.native_hw
        if self._info is not None and self._info[0] == native_hw:
            return self._info[1]
        p, measured = self.p, self.camera.intrinsics()
        h, w, _ = self.camera.shape
        if measured is not None and not p["fx"]:
            k, coeffs = measured
        else:
            src_h, src_w = native_hw
            fx = p["fx"] or float(src_w)
            k0 = np.array([[fx, 0.0, p["cx"] if p["cx"] >= 0 else (src_w - 1) / 2],
                           [0.0, p["fy"] or fx, p["cy"] if p["cy"] >= 0 else (src_h - 1) / 2], [0.0, 0.0, 1.0]])
            k, coeffs = fit_intrinsics(k0, native_hw, self.cfg.size, self.cfg.crop), [0.0] * 5
        info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=list(coeffs[:5]) + [0.0] * (5 - len(coeffs)),
                          k=k.ravel(), r=np.eye(3).ravel(), p=np.hstack([k, np.zeros((3, 1))]).ravel())
        self._info = (native_hw, info)
        return info

    def _diagnose(self) -> None:
        cam = self.camera
        age = cam.age()
        level = DiagnosticStatus.OK if age <= self.cfg.max_age else DiagnosticStatus.WARN
        message = cam.status if level == DiagnosticStatus.OK else f"newest frame {age:.2f} s old; {cam.status}"
        if level != DiagnosticStatus.OK:
            self.get_logger().warning(f"{self.cfg.name}: {message}", throttle_duration_sec=5.0)
        values = {"age_ms": f"{age * 1e3:.0f}", "frames": cam.frames, "published": self.published,
                  "reconnects": cam.reconnects, "last_error": cam.last_error,
                  "serial": getattr(cam, "serial", ""), "shape": "x".join(map(str, cam.shape))}
        status = DiagnosticStatus(level=level, name=f"camera: {self.cfg.name}", message=message,
                                  hardware_id=str(getattr(cam, "serial", "") or self.cfg.file or self.cfg.source),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = common.to_time(time.time())
        self.diag_pub.publish(msg)

    def close(self) -> None:
        self.camera.close()


def depth_msg(depth: np.ndarray, header) -> Image:
    """sensor_msgs/Image 16UC1 (mm) from an H x W uint16 array."""
    msg = Image(header=header, height=int(depth.shape[0]), width=int(depth.shape[1]), encoding="16UC1",
                is_bigendian=0, step=int(depth.shape[1]) * 2)
    msg.data = np.ascontiguousarray(depth, dtype="<u2").tobytes()
    return msg


def main(argv=None) -> int:
    rclpy.init(args=argv)
    try:
        node = CameraNode()
    except (ValueError, OSError, ImportError, ParameterException) as err:
        rclpy.logging.get_logger("camera").error(" ".join(str(err).split()))
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        common.spin_until_shutdown(executor)
    finally:
        node.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
