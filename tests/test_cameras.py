"""Cameras through their real libraries, no camera attached: librealsense recordings made and played back
by librealsense itself, a video file written and read by OpenCV, and the shared crop/resize geometry."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from robolearn.hardware.cameras import (CameraConfig, camera_config, camera_configs, crop_box, fit_frame,
                                        fit_intrinsics, load_camera_configs, make_camera)
from robolearn.robot.interfaces import StaleStateError

cv2 = pytest.importorskip("cv2")
H, W, N = 48, 64, 12
STEP_MS = 33.3


def colors(n: int = N) -> np.ndarray:
    """n solid frames with distinct colours, so a frame's content names it."""
    return np.stack([np.full((H, W, 3), (10 + 20 * i, 100, 250 - 15 * i), np.uint8) for i in range(n)])


@pytest.fixture
def recording(tmp_path):
    pytest.importorskip("pyrealsense2")
    from robolearn.hardware.realsense import write_recording
    depth = np.stack([np.full((H, W), 500 + i, np.uint16) for i in range(N)])
    depth[:, :, : W // 2] = 0  # the left half has no depth
    return write_recording(tmp_path / "front.db3", colors(), 1000.0 + STEP_MS * np.arange(N), depth, serial="8765")


def wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_hardware_cameras_import_without_rclpy_or_a_camera_library():
    import subprocess
    import sys
    code = ("import sys, robolearn.hardware.cameras, robolearn.hardware.realsense, robolearn.hardware.opencv_camera; "
            "print(sorted(m for m in ('rclpy', 'pyrealsense2', 'torch', 'mujoco') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # vendor libraries load when a camera of theirs is made


# -- crop and resize ----------------------------------------------------------------------------------
def test_center_crop_keeps_the_output_aspect_then_resizes():
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, 20:60] = 200  # the centred 40x40 square
    assert crop_box((40, 80), (20, 20), "center") == (0, 20, 40, 40)
    out = fit_frame(frame, (20, 20), "center")
    assert out.shape == (20, 20, 3) and np.all(out == 200)
    stretched = fit_frame(frame, (20, 20), "none")  # the whole frame, squeezed
    assert stretched.shape == (20, 20, 3) and stretched[:, 0].max() == 0 and stretched[:, 10].min() == 200
    boxed = fit_frame(frame, None, (5, 50, 10, 20))  # an explicit box at native size: columns 50..69
    assert boxed.shape == (10, 20, 3) and np.all(boxed[:, :10] == 200) and np.all(boxed[:, 10:] == 0)
    with pytest.raises(ValueError, match=r"crop \[top 5, left 70, height 10, width 20\] does not fit a 40x80 frame"):
        fit_frame(frame, (8, 8), (5, 70, 10, 20))


def test_intrinsics_follow_the_crop_and_resize():
    k = np.array([[100.0, 0.0, 39.5], [0.0, 100.0, 19.5], [0.0, 0.0, 1.0]])
    out = fit_intrinsics(k, (40, 80), (20, 20), "center")  # crop left 20, then scale 0.5
    assert np.allclose(out, [[50.0, 0.0, 9.5], [0.0, 50.0, 9.5], [0.0, 0.0, 1.0]])
    # A point on the optical axis lands on the same scene pixel before and after: the centre pixel.
    frame = np.zeros((40, 80), np.uint8)
    frame[18:22, 38:42] = 255
    fitted = fit_frame(frame, (20, 20), "center")
    ys, xs = np.nonzero(fitted > 127)
    assert np.isclose(xs.mean(), out[0, 2]) and np.isclose(ys.mean(), out[1, 2])


# -- RealSense, through librealsense's own recorder and playback --------------------------------------
def test_realsense_recording_plays_every_frame_with_hardware_stamps_and_aligned_depth(recording):
    frames = []
    cam = make_camera({"name": "front", "type": "realsense", "file": recording, "serial": "8765", "width": 32,
                       "height": 32, "depth": True, "realtime": False, "reconnect_after": 0}, on_frame=frames.append)
    try:
        assert wait(lambda: len(frames) >= N), f"{len(frames)} of {N} frames"
        assert cam.shape == (32, 32, 3) and cam.serial == "8765"
        assert [f.number for f in frames] == list(range(N))  # every frame, in order
        stamps = np.array([f.stamp for f in frames])
        assert np.allclose(np.diff(stamps), STEP_MS * 1e-3, atol=1e-6)  # the device clock's intervals, kept
        assert abs(stamps[0] - time.time()) < 30  # anchored onto the host's wall clock
        expected = fit_frame(colors()[-1], (32, 32), "center")
        assert np.array_equal(frames[-1].image, expected)  # centre 48x48 of 48x64, halved
        depth = frames[-1].depth  # aligned to color, mm, fitted by nearest neighbour
        assert depth.shape == (32, 32) and depth.dtype == np.uint16
        right = depth[:, 20:][depth[:, 20:] > 0]  # align leaves a few holes (0) where no depth pixel lands
        assert depth[:, :4].max() == 0 and right.size > 0.8 * depth[:, 20:].size and right.min() >= 500 + N - 2
        k, coeffs = cam.intrinsics()  # the recording's fx = 64 at 48x64, cropped to 48x48 then scaled 2/3
        assert np.allclose(k, fit_intrinsics(np.array([[64, 0, 31.5], [0, 64, 23.5], [0, 0, 1]]), (H, W), (32, 32)))
        assert coeffs == [0.0] * 5
    finally:
        cam.close()


def test_realsense_playback_end_is_stale_then_a_restart_reopens_the_recording(recording):
    cfg = CameraConfig(name="front", type="realsense", file=recording, width=0, height=0, max_age=0.15,
                       realtime=True, reconnect_after=0.4)
    cam = make_camera(cfg)
    try:
        assert cam.shape == (H, W, 3)  # native size
        first = cam.wait_frame(0, 5.0)
        assert first is not None
        assert wait(lambda: cam.age() > 0.2)  # the recording ended
        seen = cam.frames
        with pytest.raises(StaleStateError, match=r"camera 'front': newest frame is \d+ ms old \(max age 150 ms"):
            cam.read()
        again = cam.wait_frame(seen, 10.0)  # a frame after the end: the recording was reopened
        assert again is not None and cam.reconnects >= 1
        image, stamp = cam.read()
        assert image.shape == (H, W, 3) and stamp > first.stamp
    finally:
        cam.close()
    assert cam.status == "closed"


def test_realsense_missing_device_and_wrong_serial_are_one_line_errors(recording):
    with pytest.raises(OSError, match=r"camera 'front': .* has serial 8765, expected 1111$"):
        make_camera(CameraConfig(name="front", type="realsense", file=recording, serial="1111"))
    with pytest.raises(OSError, match=r"camera 'wrist': no RealSense with serial 0000 \(connected: "):
        make_camera(CameraConfig(name="wrist", type="realsense", serial="0000"))


@pytest.mark.hardware
@pytest.mark.skipif(not os.environ.get("ROBOLEARN_UNPLUG_TEST"),
                    reason="needs a RealSense and a person to unplug and replug it (set ROBOLEARN_UNPLUG_TEST=1)")
def test_realsense_reconnects_after_an_unplug():
    from robolearn.hardware.realsense import connected_serials
    serials = connected_serials()
    if not serials:
        pytest.skip("no RealSense connected")
    cam = make_camera(CameraConfig(name="front", type="realsense", serial=serials[0], max_age=0.5))
    try:
        print("unplug the camera now, then plug it back in within 30 s")
        assert wait(lambda: cam.age() > 1.0, 30.0), "frames never stopped"
        seen = cam.frames
        assert cam.wait_frame(seen, 60.0) is not None, f"no frame after replugging: {cam.status}"
        assert cam.reconnects >= 1
        cam.read()
    finally:
        cam.close()


# -- OpenCV -------------------------------------------------------------------------------------------
@pytest.fixture
def video(tmp_path):
    path = str(tmp_path / "side.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (W, H))
    assert writer.isOpened()
    for frame in colors():
        writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV writes BGR
    writer.release()
    return path


def test_opencv_file_gives_every_frame_in_rgb_fitted_to_the_policy_size(video):
    frames = []
    cam = make_camera({"name": "side", "type": "opencv", "source": video, "width": 24, "height": 24,
                       "realtime": False, "reconnect_after": 0}, on_frame=frames.append)
    try:
        assert wait(lambda: len(frames) >= N)
        time.sleep(0.1)
        assert [f.number for f in frames] == list(range(N))  # the file ends: no more frames
        for f, src in zip(frames, colors()):
            assert f.image.shape == (24, 24, 3)
            assert np.abs(f.image.astype(int) - src[0, 0]).max() <= 8  # MJPG is lossy; RGB order kept
        assert cam.intrinsics() is None
    finally:
        cam.close()


def test_opencv_file_plays_at_its_own_rate(video):
    cam = make_camera(CameraConfig(name="side", type="opencv", source=video, width=0, height=0, realtime=True,
                                   reconnect_after=0))
    try:
        start = time.monotonic()
        assert cam.wait_frame(N - 1, 10.0) is not None
        assert time.monotonic() - start >= (N - 2) / 20.0  # 20 fps as written, not as fast as it decodes
        assert cam.shape == (H, W, 3)
    finally:
        cam.close()


def test_opencv_sources_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"camera 'side': source 'nope.avi' is not a device index, an existing"):
        make_camera(CameraConfig(name="side", source="nope.avi"))
    with pytest.raises(OSError, match=r"camera 'side': OpenCV cannot open 97"):
        make_camera(CameraConfig(name="side", source="97"))


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping, message", [
    ({"name": "a", "type": "kinect"}, r"cameras\[0\] \(a\)\.type: 'kinect' is not one of \['realsense', 'opencv', 'ros'\]"),
    ({"name": "a", "serail": "1"}, r"cameras\[0\]: unknown field\(s\) \['serail'\]; valid: "),
    ({"width": 64, "height": 0}, r"cameras\[0\]\.width: width 64 and height 0 must both be positive"),
    ({"width": -1, "height": 5}, r"cameras\[0\]\.width: width -1"),
    ({"width": "wide"}, r"cameras\[0\]\.width: 'wide' is not int"),
    ({"fps": 0}, r"cameras\[0\]\.fps: must be positive"),
    ({"max_age": "soon"}, r"cameras\[0\]\.max_age: 'soon' is not float"),
    ({"crop": "middle"}, r"cameras\[0\]\.crop: 'middle' is not one of"),
    ({"crop": [0, 0, 10]}, r"cameras\[0\]\.crop: must be \[top, left, height, width\]"),
    ({"depth": "yes"}, r"cameras\[0\]\.depth: 'yes' is not bool"),
    ({"depth": True}, r"cameras\[0\]\.depth: only a realsense camera streams depth, not opencv"),
    ({"type": "ros", "width": 0, "height": 0}, r"cameras\[0\]\.width: a ros camera needs"),
    ({"type": "realsense", "file": "/nowhere.db3"}, r"cameras\[0\]\.file: no recording at /nowhere.db3"),
    ({"resolution": [640]}, r"cameras\[0\]\.resolution: must be \[width, height\]"),
])
def test_bad_camera_configs_are_one_line_errors_naming_the_field(mapping, message):
    with pytest.raises(ValueError, match=message) as err:
        camera_configs([mapping])
    assert "\n" not in str(err.value)


def test_a_profile_cameras_list_loads_from_yaml(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text("cameras:\n"
                    "  - {name: front, type: realsense, serial: 123456789012, width: 128, height: 128, depth: true}\n"
                    "  - {name: side, type: opencv, source: 0, crop: [0, 80, 480, 480], max_age: 0.5}\n"
                    "  - {name: wrist, type: ros, topic: wrist/image_raw/compressed, width: 84, height: 84}\n")
    front, side, wrist = load_camera_configs(path)
    assert front.serial == "123456789012" and front.depth and front.size == (128, 128)
    assert side.source == "0" and side.crop == (0, 80, 480, 480) and side.max_age == 0.5
    assert wrist.topic.endswith("/compressed")
    with pytest.raises(ValueError, match=r"cameras: camera name\(s\) \['a'\] appear more than once"):
        camera_configs({"cameras": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match=r"camera 'wrist': a ros camera needs an rclpy node"):
        make_camera(wrist)
    assert camera_config(CameraConfig()) == CameraConfig()  # the defaults work


# -- in the robot env ---------------------------------------------------------------------------------
class StillArm:
    """An arm that stays put: the env only needs a state beside the camera here (no arm exists in tests)."""

    joint_names, control_hz = ("j1",), 10.0

    def read(self):
        from robolearn.robot import ArmState
        return ArmState(self.joint_names, np.zeros(1), np.zeros(1), np.array([0.4, 0.0, 0.2]),
                        np.array([0.0, 1.0, 0.0, 0.0]), np.zeros(3), 0.0, time.time())

    def command(self, target):
        pass

    def wait(self):
        pass

    def hold(self):
        pass


class NoTask:
    uses_gripper = False

    def object_state(self, arm):
        return np.zeros(0)

    def score(self, arm):
        return 0.0, False


class NoReset:
    def reset(self, rng):
        return {}


def test_the_robot_env_observes_a_camera_and_refuses_its_stale_frames(recording):
    from robolearn.robot import RobotEnv
    cam = make_camera(CameraConfig(name="front", type="realsense", file=recording, width=32, height=32,
                                   max_age=0.15, reconnect_after=0))
    env = RobotEnv(StillArm(), NoTask(), NoReset(), cameras={"front": cam})
    try:
        assert env.observation_space["images/front"].shape == (32, 32, 3)
        assert cam.wait_frame(0, 5.0) is not None
        obs, _ = env.reset(seed=0)
        assert obs["images/front"].shape == (32, 32, 3) and obs["images/front"].dtype == np.uint8
        assert wait(lambda: cam.age() > 0.2)  # the recording ended and is not reopened
        with pytest.raises(StaleStateError, match=r"camera 'front': newest frame is \d+ ms old"):
            env.step(np.zeros(env.action_space.shape))
    finally:
        env.close()
    assert cam.status == "closed"
