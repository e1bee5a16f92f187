"""Test-wide settings: headless rendering and DDS kept on loopback in a random domain."""

import os
import random

os.environ.setdefault("MUJOCO_GL", "osmesa" if not os.path.exists("/dev/nvidia0") else "egl")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(20, 220)))


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (directly, or through the CLI's --threads in this
    process) does not leave it set for the tests after it. torch is not imported for this."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of small-network tests (`pytestmark = usefixtures("one_thread")`):
    small batches gain little from a second thread, and on a loaded machine OpenMP's spinning barriers
    make many small ops several times slower (DrQ-v2's learning test: 107 s against 19 s)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmux():
    """A real terminal (tests/terminal.py); skips, saying so, where tmux is not installed."""
    import shutil

    from terminal import Tmux
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    t = Tmux()
    yield t
    t.kill()
