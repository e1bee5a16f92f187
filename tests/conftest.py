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


@pytest.fixture(scope="session")
def reach_bc(tmp_path_factory):
    """Diffusion BC on 20 scripted PandaReach demos through `Trainer` (1500 updates at batch 128, lr 1e-3, one thread,
    an evaluation of 10 episodes every 500), as `robolearn train --agent diffusion` trains one: trained once for the
    learning test (tests/test_learning.py) and the deploy test (tests/test_deploy_diffusion.py), which LEARNING keeps on
    one worker. Returns the untrained policy's success, the run's result and evaluations, and the trained agent.
    Chi's lr 1e-4 needs far more than a test's few thousand updates on 20 demos."""
    from types import SimpleNamespace

    import torch

    import robolearn.sim as rsim
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.rollout import run_episodes, scripted_policy
    from robolearn.train import TrainConfig, Trainer, evaluate

    root, threads, reach = tmp_path_factory.mktemp("reach_bc"), torch.get_num_threads(), "robolearn/PandaReach-v0"
    torch.set_num_threads(1)
    env = rsim.make(reach)
    with DatasetWriter(root / "demos", reach, env.observation_space, env.action_space, fps=10) as writer:
        demo_success = run_episodes(env, scripted_policy(env), 20, seed=10_000, recorder=writer).success_rate
    env.close()
    cfg = TrainConfig(agent="diffusion", env=reach, out=str(root / "run"), frames=1_500, seed=0, demos=str(root / "demos"),
                      eval_every=500, eval_episodes=10, checkpoint_every=100_000, video=False,
                      agent_overrides={"batch_size": 128, "lr": 1e-3})
    trainer = Trainer(cfg)
    try:
        untrained, _, _ = evaluate(trainer.agent, trainer.eval_env, 10)
        result = trainer.run()
    finally:
        trainer.close()  # its envs; the agent stays usable
        torch.set_num_threads(threads)  # before the tests: the fixture leaves the thread count as it found it
    return SimpleNamespace(demo_success=demo_success, untrained=untrained, result=result, agent=trainer.agent,
                           evals=[s for _steps, _ret, s, _t in trainer.history["eval"]],
                           observation_space=trainer.env.observation_space, action_dim=trainer.env.action_space.shape[0])


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
# per worker, in collection order. The tests that learn for minutes go first, one after the other on one worker and in
# LEARNING's order, while the other worker runs the rest: side by side, their learners, simulators and DrQ-v2's process
# would need about 4 cores of 2, and the launch test's nodes, which run in real time, then burn CPU for as long as its
# learner is starved (845 s for that test against 350 s alone). Diffusion BC trains (fixture `reach_bc`) while DrQ-v2's
# run trains beside it in its own process, and the deploy test reuses that policy before the DrQ-v2 test waits for
# its run. Without workers the order changes nothing a test depends on.
LEARNING = ("test_actor_learner.py::test_sim_train_launch_learns_to_lift_the_cube",
            "test_learning.py::test_diffusion_bc_from_scripted_demos_reaches_and_its_checkpoint_round_trips",
            "test_deploy_diffusion.py", "test_learning.py")
LONGEST_NEXT = ("test_train.py", "test_actor_learner.py", "test_deploy.py", "test_pretrain.py")


def _learning_rank(nodeid: str) -> int | None:
    """The place of a test id ("tests/test_x.py::test_y[params]") in LEARNING (a whole file, or a file::test), or None."""
    path, _, test = nodeid.partition("::")
    name = path.rsplit("/", 1)[-1]
    for i, entry in enumerate(LEARNING):
        if entry in (name, f"{name}::{test.split('[', 1)[0]}"):
            return i
    return None


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_NEXT)}

    def key(item):
        learning = _learning_rank(item.nodeid)
        return (0, learning) if learning is not None else (1, rank.get(item.path.name, len(rank)))
    items.sort(key=key)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, but the LEARNING tests are one unit of work (one worker, in order)."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "learning" if _learning_rank(nodeid) is not None else nodeid.split("::", 1)[0]

    return Scheduling(config, log) if config.getoption("dist") == "loadfile" else None
