"""agent_node's `reset` YAML against the real simulator over DDS: a scripted reset moves the tool to home plus a
random offset before each episode; an operator reset waits for the std_srvs/Trigger confirmation."""

import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="the ROS 2 wheels (extra `ros`) are not installed")
from std_srvs.srv import Trigger  # noqa: E402

from robolearn.ros import common  # noqa: E402
from test_actor_learner import Probe, start, stop, wait_for  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.flaky(reruns=1)]
SCRIPTED = """reset:
  type: scripted
  home_pos: [0.4, 0.0, 0.25]
  xyz_range: [0.05, 0.05, 0.0]
  duration: 0.5
  settle: 0.4
"""


def first_states(probe: Probe) -> dict[int, np.ndarray]:
    """{episode: tool position of its first step} from agent/steps ([episode, step, *state, *action])."""
    with probe.lock:
        return {int(d[0]): np.array(d[2:5]) for _, d in probe.steps if d[1] == 0}


@pytest.fixture
def sim(tmp_path):
    env = common.isolated_env()
    log = tmp_path / "nodes.log"
    proc = start("sim_robot_node", env, log=log)
    probe = Probe(int(env["ROS_DOMAIN_ID"]))
    yield env, log, proc, probe
    probe.close()
    stop(proc)


def test_scripted_reset_starts_each_episode_at_home_plus_an_offset(sim, tmp_path):
    env, log, proc, probe = sim
    (tmp_path / "reset.yaml").write_text(SCRIPTED)
    actor = start("agent_node", env, "mode:=train", f"reset:={tmp_path / 'reset.yaml'}", "publish_steps:=true",
                  "max_episode_steps:=5", "thread_priority:=0", log=log)
    try:
        wait_for(lambda: len(first_states(probe)) >= 3, 90, "three episodes", (proc, actor))
    finally:
        stop(actor)
    starts = first_states(probe)
    for episode, pos in starts.items():
        offset = pos - np.array([0.4, 0.0, 0.25])
        assert np.all(np.abs(offset[:2]) <= 0.05 + 0.006) and abs(offset[2]) < 0.01, (episode, pos)
    xy = np.array([p[:2] for p in starts.values()])
    assert np.ptp(xy, axis=0).max() > 0.005, f"every episode started at the same place: {xy}"


def test_operator_reset_waits_for_the_trigger(sim, tmp_path):
    env, log, proc, probe = sim
    (tmp_path / "reset.yaml").write_text("reset:\n  type: operator\n  confirm: trigger\n  timeout: 60\n")
    actor = start("agent_node", env, "mode:=train", f"reset:={tmp_path / 'reset.yaml'}", "publish_steps:=true",
                  "max_episode_steps:=5", "thread_priority:=0", log=log)
    client = probe.node.create_client(Trigger, "reset/confirm")
    try:
        wait_for(lambda: "waiting up to 60 s for the operator" in log.read_text(), 60, "the operator prompt",
                 (proc, actor))
        time.sleep(1.0)
        assert not probe.steps, "the episode started before the operator confirmed"
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        wait_for(lambda: future.done(), 10, "the confirmation's answer")
        assert future.result().success
        wait_for(lambda: probe.steps, 30, "the first step after the confirmation", (proc, actor))
    finally:
        probe.node.destroy_client(client)
        stop(actor)
