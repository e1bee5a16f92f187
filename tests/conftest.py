"""Test-wide settings: headless rendering and DDS kept on loopback in a random domain."""

import os

os.environ.setdefault("MUJOCO_GL", "osmesa" if not os.path.exists("/dev/nvidia0") else "egl")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
# Parallel workers (pytest -n, as `make test` runs, with --max-worker-restart 0): each its own share of the domain IDs
# 20-101 that robolearn.launcher.random_domain draws from, for the graphs the worker's tests open in-process and for
# every process they start, so that two workers' nodes never meet. Without workers the whole range.
from robolearn.launcher import DOMAIN_IDS, DOMAIN_IDS_VAR, random_domain  # noqa: E402

_worker = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
if _worker.isdigit():
    _workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(_worker) + 1)
    _share = max(len(DOMAIN_IDS) // _workers, 1)
    _mine = DOMAIN_IDS[int(_worker) * _share:][:_share] or DOMAIN_IDS[-1:]
    os.environ[DOMAIN_IDS_VAR] = f"{_mine[0]}-{_mine[-1]}"
    os.environ["ROS_DOMAIN_ID"] = str(random_domain())
os.environ.setdefault("ROS_DOMAIN_ID", str(random_domain()))


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


# `make test` runs two parallel workers (pytest -n 2 --dist loadfile --no-loadscope-reorder): a test file at a time
# per worker, in collection order. The tests that learn for minutes go first, one after the other on one worker,
# while the other worker runs the rest: side by side, their learners, simulators and DrQ-v2's process would need
# about 4 cores of 2, and the launch test's nodes, which run in real time, then burn CPU for as long as its learner
# is starved (845 s for that test against 350 s alone). Without workers the order changes nothing a test depends on.
LEARNING = ("test_learning.py", "test_actor_learner.py::test_sim_train_launch_learns_to_lift_the_cube")
LONGEST_NEXT = ("test_deploy_diffusion.py", "test_train.py", "test_actor_learner.py", "test_deploy.py",
                "test_pretrain.py")


def _learning(nodeid: str) -> bool:
    """Whether a test id ("tests/test_x.py::test_y[params]") is one of LEARNING's (a whole file, or a file::test)."""
    path, _, test = nodeid.partition("::")
    name = path.rsplit("/", 1)[-1]
    return name in LEARNING or f"{name}::{test.split('[', 1)[0]}" in LEARNING


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_NEXT)}
    items.sort(key=lambda item: -1 if _learning(item.nodeid) else rank.get(item.path.name, len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, but the LEARNING tests are one unit of work (one worker, in order)."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "learning" if _learning(nodeid) else nodeid.split("::", 1)[0]

    return Scheduling(config, log) if config.getoption("dist") == "loadfile" else None
