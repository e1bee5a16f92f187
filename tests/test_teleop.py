"""Teleop devices: shaping, device mappings, the terminal keyboard on a real pty, the ROS 2 topic source
over real DDS, and the recorder reporting a device that disconnects mid-episode."""

from __future__ import annotations

import io
import os
import struct
import termios
import threading
import time

import numpy as np
import pytest

from robolearn.demos.teleop import (TeleopConfig, TeleopError, TeleopInput, UnknownDeviceError, device_class, device_names,
                                    make_device, require, shape_motion)
from robolearn.demos.teleop_gamepad import GamepadMapping, map_gamepad
from robolearn.demos.teleop_keyboard import KeyboardDevice, KeyState, parse_keys
from robolearn.demos.teleop_scripted import parse_key_script
from robolearn.demos.teleop_spacemouse import SpaceMouseMapping, SpaceMouseState, map_spacemouse, parse_report


# -- shaping -------------------------------------------------------------------------------

def test_deadzone_scale_and_axis_lock():
    cfg = TeleopConfig(deadzone=0.2, scale=0.5, axis_scale=(1.0, 2.0, 1.0), lock="z")
    out = shape_motion([0.1, -0.6, 0.9], cfg)
    # x inside the deadzone; y rescaled past it ((0.6-0.2)/0.8 = 0.5) then x0.5 x2; z locked (planar)
    np.testing.assert_allclose(out, [0.0, -0.5, 0.0], atol=1e-6)
    assert out.dtype == np.float32
    # output grows continuously from zero at the deadzone edge, and is clipped to [-1, 1]
    assert 0 < shape_motion([0.21, 0, 0], TeleopConfig(deadzone=0.2))[0] < 0.02
    np.testing.assert_allclose(shape_motion([1.0, -1.0, 0.5], TeleopConfig(scale=3.0)), [1.0, -1.0, 1.0])


def test_config_rejects_bad_values_with_the_field_named():
    with pytest.raises(ValueError, match="xyzg"):
        TeleopConfig(lock="w")
    with pytest.raises(ValueError, match="deadzone"):
        TeleopConfig(deadzone=1.0)
    with pytest.raises(ValueError, match="axis_scale"):
        TeleopConfig(axis_scale=(1.0, 1.0))
    assert TeleopConfig(lock=["x", "g"]).lock == "xg"


def test_read_shapes_policy_device_and_locks_the_gripper():
    dev = make_device("scripted", {"policy": lambda obs: np.array([0.5, 0.05, -1.0, 1.0]),
                                   "deadzone": 0.1, "lock": "zg"})
    dev.attach(None)
    inp = dev.read({})
    np.testing.assert_allclose(inp.motion, [(0.5 - 0.1) / 0.9, 0.0, 0.0], atol=1e-6)
    assert inp.gripper is None and inp.connected
    # a reading's action holds the gripper where it was when the reading has no gripper command
    np.testing.assert_allclose(inp.action(1.0), [(0.5 - 0.1) / 0.9, 0, 0, 1.0], atol=1e-6)
    assert inp.action(1.0, dim=3).shape == (3,)


# -- device mappings (pure functions: no hardware) --------------------------------------------

def test_gamepad_mapping_sticks_and_button_presses():
    m = GamepadMapping()
    axes = [-0.5, -1.0, -1.0, 0.0, 0.3, -1.0]  # LX left, LY up, LT, RX, RY down, RT
    pressed = [1, 0, 0, 0, 0, 1, 0, 0]          # A and RB
    inp = map_gamepad(axes, pressed, [0] * 8, m)
    np.testing.assert_allclose(inp.motion, [1.0, 0.5, -0.3])  # up = +x, left = +y, right stick down = -z
    assert inp.gripper == 1.0 and inp.events == ("start_stop",)
    held = map_gamepad(axes, pressed, pressed, m)  # still held: no repeat
    assert held.gripper is None and held.events == ()
    assert map_gamepad(axes, [0, 1, 0, 1, 1, 0, 0, 1], [0] * 8, m).events == ("failure", "success", "quit")
    assert map_gamepad(axes, [0, 0, 0, 0, 1, 0, 0, 0], [0] * 8, m).gripper == -1.0
    np.testing.assert_allclose(map_gamepad([0.2], [], [], m).motion, [0.0, -0.2, 0.0])  # missing axes read 0
    # a drifting stick reads zero through the gamepad's default deadzone
    dev_cfg = device_class("gamepad").default_config
    np.testing.assert_allclose(shape_motion(map_gamepad([0.05, -0.08, 0, 0, 0.02], [], [], m).motion, dev_cfg), 0)


def test_held_buttons_make_a_dead_man_switch():
    """TeleopInput.held: the buttons down now (not only the presses); takes_over(b) is true only while b is held
    on a connected device, and takes_over(-1) is HIL-SERL's rule (any command)."""
    m = GamepadMapping()
    inp = map_gamepad([0.0] * 6, [1, 0, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0], m)  # A and RB still held
    assert inp.held == (0, 5) and inp.takes_over(0) and inp.takes_over(5) and not inp.takes_over(2)
    assert not inp.active and not inp.takes_over(-1)  # held, no motion, no new press: not a command
    moving = map_gamepad([0.0, -0.5] + [0.0] * 4, [0] * 8, [0] * 8, m)
    assert moving.takes_over(-1) and not moving.takes_over(0)  # moving without the dead-man button
    assert map_spacemouse([0, 0, 0], [0, 1], [0, 1], SpaceMouseMapping()).held == (1,)
    lost = TeleopInput(held=(0,), connected=False)
    assert not lost.takes_over(0)
    assert device_class("gamepad").has_buttons and device_class("spacemouse").has_buttons
    assert device_class("ros").has_buttons and not device_class("keyboard").has_buttons


def test_spacemouse_reports_and_mapping():
    state = SpaceMouseState()
    parse_report([1, *struct.pack("<hhh", 100, -350, 175)], state)
    np.testing.assert_allclose(state.translation, [100, -350, 175])
    parse_report([1, *struct.pack("<hhhhhh", 0, 0, -700, 5, 6, 7)], state)  # one-report models carry rotation
    np.testing.assert_allclose(state.rotation, [5, 6, 7])
    parse_report([2, *struct.pack("<hhh", -1, -2, -3)], state)
    np.testing.assert_allclose(state.rotation, [-1, -2, -3])
    parse_report([3, 0b01, 0], state)
    assert state.buttons[:2] == [1, 0]

    m = SpaceMouseMapping()
    inp = map_spacemouse([100, -350, 175], [1, 0], [0, 0], m)
    # pushed away (raw -y) = +x, right (raw +x) = -y, pressed down (raw +z) = -z
    np.testing.assert_allclose(inp.motion, [1.0, -100 / 350, -0.5], atol=1e-6)
    assert inp.gripper == 1.0
    assert map_spacemouse([0, 0, -700], [0, 1], [0, 0], m).motion[2] == 1.0  # clipped
    assert map_spacemouse([0, 0, 0], [0, 1], [0, 0], m).gripper == -1.0


def test_key_parsing_and_hold():
    assert parse_keys(b"w\x1b[A\x1bOD\x1b[15~qY\r\x7f\x03") == ["w", "up", "left", "q", "y", "enter", "backspace",
                                                                 "ctrl-c"]
    assert parse_key_script("<enter>w.<up>Y") == ["enter", "w", None, "up", "y"]
    keys = KeyState(hold=0.3, speed=1.0)
    gripper, events = keys.press(["w", "r", "c", "enter", "y"], now=0.0)
    assert gripper == 1.0 and events == ["start_stop", "success"]
    np.testing.assert_allclose(keys.motion(0.0), 0)  # a recorder key stops held motion
    keys.press(["w", "r"], now=0.0)
    np.testing.assert_allclose(keys.motion(0.1), [1, 0, 1])
    keys.press(["s"], now=0.2)  # the opposite key cancels +x at once
    np.testing.assert_allclose(keys.motion(0.25), [-1, 0, 1])
    np.testing.assert_allclose(keys.motion(0.6), [0, 0, 0])  # released: held for 0.3 s after the last press
    keys.press(["-"], now=1.0)
    keys.press(["a"], now=1.0)
    np.testing.assert_allclose(keys.motion(1.1), [0, 1 / 1.5, 0], atol=1e-6)


# -- errors ----------------------------------------------------------------------------------

def test_unknown_device_and_option_errors_list_the_valid_ones():
    with pytest.raises(UnknownDeviceError) as err:
        make_device("joystick")
    for name in ("keyboard", "gamepad", "spacemouse", "ros", "scripted"):
        assert name in str(err.value)
    assert device_names() == ["gamepad", "keyboard", "ros", "scripted", "spacemouse"]
    with pytest.raises(ValueError, match="unknown option.*'keys'"):
        make_device("scripted", {"colour": "red"})


def test_optional_devices_fail_with_the_package_and_extra_named():
    with pytest.raises(TeleopError, match=r"'no-such-pkg'.*pip install 'robolearn\[teleop\]'"):
        require("robolearn_no_such_module", "no-such-pkg")
    # Without the library: the package and extra are named; with it but no hardware: no device found.
    for name, package, missing_hw in (("gamepad", "pygame", "no joystick"), ("spacemouse", "hidapi", "no 3Dconnexion")):
        with pytest.raises(TeleopError) as err:
            make_device(name)
        msg = str(err.value)
        assert (package in msg and "robolearn[teleop]" in msg) or missing_hw in msg, msg


# -- the keyboard on a real pseudo-terminal ---------------------------------------------------------

def test_keyboard_raw_mode_keys_restore_and_eof():
    r, w = os.pipe()
    with pytest.raises(TeleopError, match="terminal"):
        KeyboardDevice(fd=r)
    os.close(r), os.close(w)

    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    with make_device("keyboard", {"fd": slave, "hold_s": 5.0, "speed": 1.0}) as dev:
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw input
        assert raw[1] & termios.OPOST  # output still turns "\n" into a new line for the status messages
        os.write(master, b"\rw\x1b[Dc")
        time.sleep(0.05)
        inp = dev.read()
        np.testing.assert_allclose(inp.motion, [1, 1, 0])
        assert inp.gripper == 1.0 and inp.events == ("start_stop",) and inp.connected
        os.write(master, b"y")
        time.sleep(0.05)
        inp = dev.read()
        assert inp.events == ("success",) and inp.gripper is None
    assert termios.tcgetattr(slave) == before  # restored on exit
    with pytest.raises(RuntimeError):
        with make_device("keyboard", {"fd": slave}):
            raise RuntimeError("an exception in the record loop")
    assert termios.tcgetattr(slave) == before  # restored on an exception too

    dev = make_device("keyboard", {"fd": slave})
    try:
        os.close(master)  # the terminal hangs up (an SSH session dropping): motion stops, device gone
        inp = dev.read()
        assert not inp.connected and "stdin closed" in inp.reason
        np.testing.assert_allclose(inp.motion, 0)
        assert dev.gone
    finally:
        dev.close()
        os.close(slave)


def test_keyboard_restores_the_terminal_on_sigterm():
    import subprocess
    import sys

    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    code = ("import time; from robolearn.demos.teleop import make_device; dev = make_device('keyboard'); "
            "print('ready', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw while it runs
        proc.send_signal(15)
        assert proc.wait(timeout=10) == 128 + 15
        assert termios.tcgetattr(slave) == before
    finally:
        proc.kill()
        proc.wait()
        os.close(master), os.close(slave)


# -- ROS 2 topic source over real DDS ------------------------------------------------------------

@pytest.fixture
def ros_publisher():
    rclpy = pytest.importorskip("rclpy")
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(f"teleop_test_pub_{os.getpid()}", context=ctx)
    yield node
    node.destroy_node()
    ctx.try_shutdown()


def _wait(pred, timeout=10.0, every=0.02, tick=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if tick:
            tick()
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _twist(x, y, z):
    from geometry_msgs.msg import TwistStamped
    msg = TwistStamped()
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = float(x), float(y), float(z)
    return msg


def _joy(*pressed):
    from sensor_msgs.msg import Joy
    msg = Joy()
    msg.buttons = [1 if i in pressed else 0 for i in range(8)]
    return msg


def test_ros_topic_source_real_messages_and_disconnect(ros_publisher):
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Joy

    ns = f"/teleop_test_{os.getpid()}"
    twist = ros_publisher.create_publisher(TwistStamped, f"{ns}/twist", 10)
    joy = ros_publisher.create_publisher(Joy, f"{ns}/joy", 10)
    dev = make_device("ros", {"twist_topic": f"{ns}/twist", "joy_topic": f"{ns}/joy", "timeout_s": 0.3})
    try:
        first = dev.read()
        assert not first.connected and "waiting" in first.reason
        inp = _wait(lambda: (lambda i: i if i.connected else None)(dev.read()),
                    tick=lambda: twist.publish(_twist(0.5, -0.25, 2.0)))
        np.testing.assert_allclose(inp.motion, [0.5, -0.25, 1.0])  # normalized twist, clipped to [-1, 1]
        _wait(lambda: joy.get_subscription_count() > 0)
        joy.publish(_joy())
        joy.publish(_joy(3, 5))  # Y (success) and RB (close) pressed
        seen = _wait(lambda: (lambda i: i if i.events else None)(dev.read()),
                     tick=lambda: twist.publish(_twist(0.5, 0, 0)))
        assert seen.events == ("success",) and seen.gripper == 1.0 and seen.held == (3, 5)
        t_end = time.monotonic() + 0.45  # the joy stream goes silent while the twist goes on: the buttons let go
        while time.monotonic() < t_end:
            twist.publish(_twist(0.5, 0, 0))
            time.sleep(0.05)
        quiet = dev.read()
        assert quiet.connected and quiet.held == ()
        time.sleep(0.5)  # the publisher stops: past the timeout the device reads disconnected, motion zero
        lost = dev.read()
        assert not lost.connected and f"{ns}/twist" in lost.reason and "timeout 0.3 s" in lost.reason
        np.testing.assert_allclose(lost.motion, 0)
        assert lost.gripper is None and not lost.active
        back = _wait(lambda: (lambda i: i if i.connected else None)(dev.read()),
                     tick=lambda: twist.publish(_twist(0, 0.1, 0)))
        np.testing.assert_allclose(back.motion, [0, 0.1, 0], atol=1e-6)
    finally:
        dev.close()


def test_recorder_reports_a_disconnect_mid_episode_and_stops_motion(ros_publisher, tmp_path):
    import robolearn.sim as rsim
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Joy

    from robolearn.demos.dataset import Dataset, DatasetWriter
    from robolearn.demos.recorder import RecordConfig, Recorder

    ns = f"/teleop_rec_{os.getpid()}"
    twist = ros_publisher.create_publisher(TwistStamped, f"{ns}/twist", 10)
    joy = ros_publisher.create_publisher(Joy, f"{ns}/joy", 10)
    env = rsim.make("robolearn/PandaPickCube-v0")
    dev = make_device("ros", {"twist_topic": f"{ns}/twist", "joy_topic": f"{ns}/joy", "timeout_s": 0.3})
    out = io.StringIO()
    writer = DatasetWriter(tmp_path / "d", "robolearn/PandaPickCube-v0", env.observation_space, env.action_space,
                           fps=10)
    rec = Recorder(env, dev, writer, RecordConfig(episodes=1, fps=20), out=out)
    done = threading.Thread(target=rec.run, daemon=True)
    done.start()
    try:
        _wait(lambda: twist.get_subscription_count() > 0 and joy.get_subscription_count() > 0)
        _wait(lambda: "teleop ros: connected" in out.getvalue(), tick=lambda: twist.publish(_twist(0.5, 0, 0)))
        joy.publish(_joy(0, 5))  # A: start, RB: close the gripper
        _wait(lambda: rec.recording and rec.t >= 6, tick=lambda: twist.publish(_twist(0.5, 0, 0)))
        _wait(lambda: not rec._connected, timeout=3.0)  # silence on the twist topic
        steps_at_loss = rec.t
        _wait(lambda: rec.t >= steps_at_loss + 6, timeout=3.0)
        joy.publish(_joy())
        joy.publish(_joy(1))  # B: failure ends the episode
        done.join(timeout=10)
        assert not done.is_alive()
    finally:
        dev.close()
    text = out.getvalue()
    assert f"disconnected (ros: no message on {ns}/twist" in text and "motion stopped" in text
    ep = Dataset(tmp_path / "d").episode(0)
    moving = ep["action"][:, 0] == np.float32(0.5)
    assert moving.sum() >= 5
    stopped = ep["action"][steps_at_loss + 1:]
    assert len(stopped) >= 5 and np.all(stopped[:, :3] == 0)  # zero motion while disconnected
    assert np.all(stopped[:, 3] == 1.0)  # the gripper holds its last command (a grasp is not dropped)
    assert Dataset(tmp_path / "d").episode_attrs(0)["success"] is False
