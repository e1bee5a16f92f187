"""A real terminal for tests: one tmux server on its own socket, one session, driven with send-keys."""

import os
import subprocess
import time
import uuid
from pathlib import Path

PASS_ENV = ("MUJOCO_GL", "ROS_DOMAIN_ID", "ROS_LOCALHOST_ONLY", "ROS_AUTOMATIC_DISCOVERY_RANGE")


class Tmux:
    """One tmux server on its own socket, one session, driven with send-keys."""

    def __init__(self):
        self.socket = f"robolearn-test-{uuid.uuid4().hex[:10]}"

    def tmux(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                              text=True, check=check, timeout=20)

    def start(self, command: str) -> None:
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env["OMP_NUM_THREADS"] = "1"
        flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
        self.tmux("new-session", "-d", "-s", "rec", "-x", "220", "-y", "60", *flags, command)

    def send(self, *keys: str, pause: float = 0.15) -> None:
        for key in keys:
            self.tmux("send-keys", "-t", "rec", key)
            time.sleep(pause)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "rec", "-S", "-200").stdout

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{text!r} did not appear; screen:\n{self.screen()}")

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        sockets = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (sockets / self.socket).unlink(missing_ok=True)  # tmux leaves the socket file behind
