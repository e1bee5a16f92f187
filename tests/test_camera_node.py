"""camera_node over real DDS on loopback (a subprocess publishing an OpenCV video file and a librealsense
recording), and RosCamera fitting Image and CompressedImage frames to the policy's size."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ros_processes import stop_node

rclpy = pytest.importorskip("rclpy")
cv2 = pytest.importorskip("cv2")
pytestmark = pytest.mark.flaky(reruns=2, reruns_delay=1)  # real DDS and subprocesses on a shared 2-core machine

from rclpy.context import Context  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402

from robolearn.hardware.cameras import fit_frame, fit_intrinsics, make_camera  # noqa: E402
from robolearn.launcher import random_domain  # noqa: E402
from robolearn.ros import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H, W, N = 48, 64, 10


def colors() -> np.ndarray:
    return np.stack([np.full((H, W, 3), (10 + 20 * i, 100, 250 - 15 * i), np.uint8) for i in range(N)])


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return None


class Listener:
    """An in-process node on its own context, keeping every message per topic."""

    def __init__(self):
        self.domain = random_domain()
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=self.domain)
        self.node = rclpy.create_node("camera_test", context=self.ctx)
        self.executor = common.executor(context=self.ctx)
        self.executor.add_node(self.node)
        self.msgs, self.lock, self.subs = {}, threading.Lock(), []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=common.spin, args=(self.executor, self.stop, self.node.get_logger()),
                                       daemon=True)
        self.thread.start()

    def listen(self, msg_type, topic: str) -> None:
        def keep(msg):
            with self.lock:
                self.msgs.setdefault(topic, []).append((msg, time.time()))
        self.subs.append(self.node.create_subscription(msg_type, topic, keep, common.SENSOR_QOS))

    def got(self, topic: str) -> list:
        with self.lock:
            return list(self.msgs.get(topic, []))

    def clear(self) -> None:
        with self.lock:
            self.msgs.clear()
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        self.subs.clear()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.fixture(scope="module")
def listener():
    lst = Listener()
    yield lst
    lst.close()


def start_node(domain: int, log: Path, **params) -> subprocess.Popen:
    args = [sys.executable, "-m", "robolearn.ros.camera_node", "--ros-args"]
    for key, value in params.items():
        args += ["-p", f"{key}:={value}"]
    env = {**common.isolated_env(), "ROS_DOMAIN_ID": str(domain), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)




def check_stream(listener, camera: str, shape: tuple[int, int], frames: int, log: Path) -> tuple[list, list]:
    """The first `frames` images and camera_infos on <camera>/...: rgb8 of `shape`, stamps increasing and
    near the wall clock, each camera_info stamped as an image."""
    images = wait_for(lambda: len(listener.got(f"{camera}/image_raw")) >= frames and listener.got(f"{camera}/image_raw"),
                      30.0)
    assert images, f"no images on {camera}/image_raw; node log:\n{log.read_text()[-2000:]}"
    infos = wait_for(lambda: listener.got(f"{camera}/camera_info"), 5.0)
    assert infos
    stamps = [common.from_time(m.header.stamp) for m, _ in images]
    for msg, received in images:
        assert (msg.height, msg.width, msg.encoding, msg.step) == (*shape, "rgb8", shape[1] * 3)
        assert msg.header.frame_id == f"{camera}_color_optical_frame"
        assert abs(received - common.from_time(msg.header.stamp)) < 5.0  # the host clock, not the device's
    runs = np.diff(stamps)
    assert (runs > 0).mean() > 0.6, f"stamps do not increase: {stamps}"  # a reopened recording starts again
    image_stamps = set(stamps)
    info = infos[0][0]
    assert (info.height, info.width, info.distortion_model, len(info.d)) == (*shape, "plumb_bob", 5)
    assert common.from_time(info.header.stamp) in image_stamps or len(image_stamps) < frames
    return images, infos


def test_camera_node_publishes_an_opencv_video_file(listener, tmp_path):
    path = str(tmp_path / "side.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (W, H))
    for frame in colors():
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    listener.clear()
    listener.listen(Image, "side/image_raw")
    listener.listen(CameraInfo, "side/camera_info")
    log = tmp_path / "node.log"
    proc = start_node(listener.domain, log, camera="side", type="opencv", source=path, width=24, height=32,
                      crop="none", reconnect_after=0.2, fx=50.0)
    try:
        images, infos = check_stream(listener, "side", (32, 24), 12, log)
        first = common.image_array(images[0][0])
        assert np.abs(first.astype(int) - first[0, 0]).max() <= 8  # a solid colour frame of the file, RGB
        assert any(np.abs(first[0, 0].astype(int) - c[0, 0]).max() <= 8 for c in colors())
        expected = fit_intrinsics(np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]]), (H, W), (32, 24), "none")
        assert np.allclose(np.reshape(infos[0][0].k, (3, 3)), expected)  # parameters, fitted as the frames
    finally:
        code = stop_node(proc)
    assert code == 0, log.read_text()[-2000:]


def test_camera_node_publishes_a_realsense_recording_with_depth(listener, tmp_path):
    pytest.importorskip("pyrealsense2")
    from robolearn.hardware.realsense import write_recording
    depth = np.stack([np.full((H, W), 700 + i, np.uint16) for i in range(N)])
    path = write_recording(tmp_path / "front.db3", colors(), 5000.0 + 33.3 * np.arange(N), depth, serial="4242")
    listener.clear()
    for t, topic in ((Image, "front/image_raw"), (CameraInfo, "front/camera_info"),
                     (Image, "front/aligned_depth_to_color/image_raw")):
        listener.listen(t, topic)
    log = tmp_path / "node.log"
    proc = start_node(listener.domain, log, camera="front", type="realsense", file=path, serial="4242", width=32,
                      height=32, depth=True, reconnect_after=0.2)
    try:
        images, infos = check_stream(listener, "front", (32, 32), 12, log)
        frame = common.image_array(images[-1][0])
        assert any(np.array_equal(frame, fit_frame(c, (32, 32))) for c in colors())  # lossless, fitted
        k = np.reshape(infos[0][0].k, (3, 3))  # the recording's own intrinsics (fx = 64), fitted
        assert np.allclose(k, fit_intrinsics(np.array([[64.0, 0, 31.5], [0, 64.0, 23.5], [0, 0, 1]]), (H, W), (32, 32)))
        depths = wait_for(lambda: listener.got("front/aligned_depth_to_color/image_raw"), 10.0)
        assert depths, log.read_text()[-2000:]
        d = depths[-1][0]
        assert (d.height, d.width, d.encoding) == (32, 32, "16UC1")
        values = np.frombuffer(bytes(d.data), "<u2")
        hit = values[values > 0]  # align projects depth pixel by pixel into color: a few holes stay 0
        assert hit.size > 0.8 * values.size and hit.min() >= 700 and hit.max() < 700 + N  # mm, as recorded
    finally:
        code = stop_node(proc)
    assert code == 0, log.read_text()[-2000:]


def test_camera_node_refuses_bad_parameters_in_one_line(listener, tmp_path):
    log = tmp_path / "node.log"
    proc = start_node(listener.domain, log, camera="front", type="realsense", file=str(tmp_path / "none.db3"))
    assert proc.wait(timeout=60) == 2
    errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "camera_node (front).file: no recording at" in errors[0], log.read_text()


def test_ros_camera_fits_images_and_decodes_compressed_ones(listener):
    node = listener.node
    src = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    raw = make_camera({"name": "wrist", "type": "ros", "width": 24, "height": 24, "max_age": 5.0}, node)
    packed = make_camera({"name": "top", "type": "ros", "topic": "top/image_raw/compressed", "width": 32,
                          "height": 24, "crop": "none", "max_age": 5.0}, node)
    pub_raw = node.create_publisher(Image, "wrist/image_raw", common.SENSOR_QOS)
    pub_packed = node.create_publisher(CompressedImage, "top/image_raw/compressed", common.SENSOR_QOS)
    try:
        assert wait_for(lambda: pub_raw.get_subscription_count() and pub_packed.get_subscription_count())
        now = time.time()
        msg = CompressedImage(format="png", data=cv2.imencode(".png", src[..., ::-1])[1].tobytes())  # PNG: lossless
        msg.header.stamp = common.to_time(now)
        assert wait_for(lambda: pub_raw.publish(common.image_msg(src, now, "wrist")) or raw._newest)
        assert wait_for(lambda: pub_packed.publish(msg) or packed._newest)
        frame, stamp = raw.read()
        assert np.array_equal(frame, fit_frame(src, (24, 24), "center")) and abs(stamp - now) < 1e-6
        silent = make_camera({"name": "silent", "type": "ros", "max_age": 5.0}, node)
        assert 0 <= raw.age() < 5.0 and silent.age() == np.inf
        silent.close()
        assert np.array_equal(packed.read()[0], fit_frame(src, (24, 32), "none"))
        pub_packed.publish(CompressedImage(format="jpeg", data=b"not a jpeg"))
        assert wait_for(lambda: packed.rejected >= 1)
        assert "top/image_raw/compressed" in packed.last_error and "does not decode" in packed.last_error
    finally:
        for part in (raw, packed):
            part.close()
        node.destroy_publisher(pub_raw)
        node.destroy_publisher(pub_packed)
