"""Control-loop timing of agent_node against sim_robot_node over DDS, at 10 Hz and at 50 Hz.

Per rate: a SERL state-policy checkpoint for PandaPickCube (built, untrained, and saved by
robolearn.train's Trainer.save as training saves one, with the rate in env_kwargs so the node's
fit check sees it); sim_robot_node and agent_node as separate processes in their own loopback DDS
domain; this process listens to the node's debug topic `/agent/timing` (publish_timing:=true).

For every tick that sends a command the node reports: the interval since the previous tick (jitter
= |interval - period|), the tick's compute time, the latency from the header stamp of the
joint_states its observation used to the publish of the command (on the node's clock: wall time,
as the simulator stamps without use_sim_time), and the same measured from that message's receipt.
`missed_deadlines` is the node's own count over the window. `reference_sleeper` is a bare Python
process sleeping to the same period grid at normal priority in the same window: the machine's own
wake-up noise (a VM's stolen time included). The last stdout line is one JSON object.

--learner runs agent_node in train mode beside a learner_node process that trains SERL (CPU setting)
on 20 scripted demos and the episodes the node sends, publishing weights every 50 updates:
the same figures while a learner competes for the CPU and weights arrive mid-episode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from robolearn.cpu import busy_cores

ENV_ID = "robolearn/PandaPickCube-v0"
AGENT = "/agent: control"  # the agent node's diagnostics status
GOAL = {"jitter_p99_ms": 2.0, "missed_deadlines_10hz": 0, "latency_p99_ms": 15.0}


def make_checkpoint(root: Path, hz: float) -> str:
    """An untrained SERL agent for PickCube at `hz`, saved exactly as `robolearn train` saves one."""
    from robolearn.train import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(agent="serl", env=ENV_ID, frames=1, out=str(root / f"{hz:g}hz"), replay_capacity=100,
                                  save_replay=False, video=False, env_kwargs={"control_hz": hz}))
    try:
        return str(trainer.save())
    finally:
        trainer.close()


def start(module: str, env: dict, log: Path, *params: str) -> subprocess.Popen:
    args = [sys.executable, "-m", module, "--ros-args"] + [a for p in params for a in ("-p", p)]
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


SLEEPER = """
import json, sys, time
period, seconds = float(sys.argv[1]), float(sys.argv[2])
late, due = [], time.monotonic()
end = due + seconds
while due < end:
    due += period
    time.sleep(max(0.0, due - time.monotonic()))
    late.append((time.monotonic() - due) * 1e3)
late.sort()
print(json.dumps({"jitter_p50_ms": round(late[len(late) // 2], 3), "jitter_p99_ms": round(late[int(len(late) * 0.99)], 3),
                  "jitter_max_ms": round(late[-1], 3)}))
"""


def start_reference(period: float, seconds: float) -> subprocess.Popen:
    """A bare Python process sleeping to the same period grid at normal priority, over the same window:
    the wake-up noise of the machine itself (a VM's stolen time included), to read the node's figures against."""
    return subprocess.Popen([sys.executable, "-c", SLEEPER, str(period), str(seconds)], stdout=subprocess.PIPE, text=True)


def listen(domain: int, seconds: float, warmup: float, procs, period: float) -> tuple[np.ndarray, float, dict, dict,
                                                                                   list, dict]:
    """Timing rows of `seconds` after `warmup` s of ticks, the node's missed-deadline count before them,
    the diagnostics at the start and the end of the window, each process's CPU share in it, and the
    reference sleeper's figures over the same window (start_reference)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Float64MultiArray

    context = Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node("control_loop_bench", context=context)
    rows, diag = [], {}
    node.create_subscription(Float64MultiArray, "/agent/timing", lambda m: rows.append(list(m.data)),
                             QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diag.update(
        {s.name: {kv.key: kv.value for kv in s.values} for s in m.status}), 50)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not rows:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("agent_node sent no command; see the logs")
            time.sleep(0.1)
        time.sleep(warmup)
        first, missed_before, diag_start = len(rows), rows[-1][4], dict(diag)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        sleeper = start_reference(period, seconds)
        time.sleep(seconds)
        cpu = [round((cpu_seconds(p.pid) - c) / seconds, 3) for p, c in zip(procs, cpu0)]
        reference = json.loads(sleeper.communicate(timeout=30)[0].strip().splitlines()[-1])
        return np.array(rows[first:]), missed_before, diag_start, dict(diag), cpu, reference
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def start_learner(env: dict, logs: Path, hz: float, update_ratio: float) -> tuple[subprocess.Popen, Path]:
    """learner_node training SERL from 20 scripted demos (recorded here) and the actor's episodes."""
    from robolearn.agents.serl import CPU_OVERRIDES
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.rollout import run_episodes, scripted_policy
    import robolearn.sim as rsim

    demos, out = logs / f"demos_{hz:g}hz", logs / f"learner_{hz:g}hz"
    if not demos.exists():
        sim_env = rsim.make(ENV_ID, control_hz=hz)
        with DatasetWriter(demos, ENV_ID, sim_env.observation_space, sim_env.action_space, fps=hz) as writer:
            run_episodes(sim_env, scripted_policy(sim_env), 20, seed=10_000, recorder=writer)
        sim_env.close()
    overrides = "[" + ", ".join(f"'{k}={v}'" for k, v in CPU_OVERRIDES.items()) + "]"
    proc = start("robolearn.ros.learner_node", env, logs / f"learner_{hz:g}hz.log", f"out:={out}",
                 f"demos:={demos}", f"set:={overrides}", f"update_ratio:={update_ratio}", "frames:=1000000",
                 "checkpoint_every_s:=1000000.0")
    return proc, out


def run_rate(hz: float, seconds: float, state_hz: float, checkpoint: str, logs: Path, save_rows: bool,
             priority: int = 20, learner_ratio: float = 0.0) -> dict:
    from robolearn.ros.common import isolated_env
    env = {**isolated_env(), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}  # a shared machine
    os.environ.update({k: v for k, v in env.items() if k.startswith("ROS_")})  # this process listens on loopback too
    sim = start("robolearn.ros.sim_robot_node", env, logs / f"sim_{hz:g}hz.log", f"env_id:={ENV_ID}",
                f"publish_rate_hz:={state_hz}")
    learner = start_learner(env, logs, hz, learner_ratio)[0] if learner_ratio else None
    train = ["mode:=train", "resend_s:=2.0"] if learner else []
    agent = start("robolearn.ros.agent_node", env, logs / f"agent_{hz:g}hz.log", f"checkpoint:={checkpoint}",
                  f"control_hz:={hz}", "publish_timing:=true", f"thread_priority:={priority}", *train)
    procs = (sim, agent, learner) if learner else (sim, agent)
    try:
        # With a learner, the window starts once it has trained and its weights reach the actor (10 s in).
        rows, missed_before, d0, d1, cpu, reference = listen(int(env["ROS_DOMAIN_ID"]), seconds,
                                                             15.0 if learner else 2.0, procs, 1.0 / hz)
    finally:
        codes = stop(agent), stop(sim), stop(learner) if learner else None
    period = 1.0 / hz
    if save_rows:  # columns: interval, compute, latency, receipt latency (s), missed deadlines, tick start
        np.save(logs / f"timing_{hz:g}hz.npy", rows)
    interval, compute, latency, receipt = (rows[:, i] for i in range(4))
    jitter = np.abs(interval[np.isfinite(interval)] - period) * 1e3
    pct = lambda x, q: round(float(np.percentile(x, q)), 3)  # noqa: E731
    delta = lambda key: int(d1.get(AGENT, {}).get(key, 0)) - int(d0.get(AGENT, {}).get(key, 0))  # noqa: E731
    return {"period_ms": period * 1e3, "jitter_p50_ms": pct(jitter, 50), "jitter_p99_ms": pct(jitter, 99),
            "jitter_max_ms": round(float(jitter.max()), 3), "missed_deadlines": int(rows[-1, 4] - missed_before),
            "latency_p50_ms": pct(latency * 1e3, 50), "latency_p99_ms": pct(latency * 1e3, 99),
            "receipt_to_command_p50_ms": pct(receipt * 1e3, 50), "receipt_to_command_p99_ms": pct(receipt * 1e3, 99),
            "compute_p50_ms": pct(compute * 1e3, 50), "compute_p99_ms": pct(compute * 1e3, 99),
            "commanded_ticks": len(rows), "expected_ticks": int(seconds * hz), "stale_holds": delta("stale"),
            "episodes": delta("episodes"), "cpu_cores": dict(zip(("sim", "agent", "learner"), cpu)),
            "reference_sleeper": reference,
            "sim_real_time_factor": float(d1.get("sim_robot: physics", {}).get("real_time_factor", "nan")),
            "exit_codes": {"agent": codes[0], "sim": codes[1], **({"learner": codes[2]} if learner else {})},
            **({"learner_weights_received": _weights_received(logs / f"agent_{hz:g}hz.log")} if learner else {})}


def _weights_received(log: Path) -> int:
    """The newest weights version agent_node logged (it logs at most every 10 s)."""
    import re
    versions = [int(v) for v in re.findall(r"weights v(\d+)", log.read_text())]
    return max(versions, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 50.0], help="control rates, Hz")
    parser.add_argument("--state-hz", type=float, default=100.0, help="sim_robot_node publish_rate_hz")
    parser.add_argument("--thread-priority", type=int, default=20, help="agent_node thread_priority (SCHED_FIFO "
                        "priority of its control thread; 0: normal scheduling)")
    parser.add_argument("--learner", nargs="?", type=float, const=4.0, default=0.0, metavar="UPDATE_RATIO",
                        help="run agent_node in train mode beside a learner_node training SERL at UPDATE_RATIO "
                             "times SERL's updates per env step (default 4: it keeps a core busy)")
    parser.add_argument("--logs", type=Path, default=None, help="keep the nodes' logs and the timing rows "
                        "(timing_<rate>hz.npy) here")
    args = parser.parse_args()
    busy = busy_cores(1.0)
    with tempfile.TemporaryDirectory(prefix="control_loop_") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        result = {"robot": "sim_robot_node", "env_id": ENV_ID, "state_hz": args.state_hz, "seconds": args.seconds,
                  "busy_cores_before": None if busy is None else round(busy, 2),
                  "load_avg_1min": round(os.getloadavg()[0], 2), "thread_priority": args.thread_priority, "goal": GOAL,
                  "learner_update_ratio": args.learner or None}
        for hz in args.rates:
            checkpoint = make_checkpoint(Path(tmp), hz)
            print(f"{hz:g} Hz: measuring {args.seconds:g} s (logs in {logs})", flush=True)
            result[f"{hz:g}hz"] = r = run_rate(hz, args.seconds, args.state_hz, checkpoint, logs, args.logs is not None,
                                                args.thread_priority, args.learner)
            print(f"{hz:g} Hz: jitter p99 {r['jitter_p99_ms']} ms, max {r['jitter_max_ms']} ms, missed "
                  f"{r['missed_deadlines']}, latency p99 {r['latency_p99_ms']} ms", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
