"""The learner node: episodes from one or more actors in, agent updates, weights out, over ROS 2.

`python -m robolearn.ros.learner_node --ros-args -p agent:=serl -p out:=runs/x -p demos:=demos/`
Actors are agent_node processes with mode:=train. Payloads are safetensors bytes in
std_msgs/UInt8MultiArray (robolearn.payload); no pickle. Parameters and topics: docs/actor_learner.md.
The learning itself lives in robolearn.learner (no rclpy); this node moves bytes and keeps time.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import String, UInt8MultiArray

from robolearn.ros import common

ARRAY = Parameter.Type.STRING_ARRAY  # declared without a default: an unset one reads as []
PARAMS = {  # name: (default, description); docs/actor_learner.md lists them
    "agent": ("serl", "agent to train (robolearn train --agent); an online agent"),
    "out": ("runs/learner", "run folder: checkpoints/, inbox/ (episodes not yet in a checkpoint), history.json; "
                            "a folder with a checkpoint is resumed"),
    "demos": ("", "episode dataset mixed 50/50 into every batch, as robolearn train --demos (empty: none)"),
    "checkpoint": ("", "start from this checkpoint's weights and agent config (a fresh out only; empty: new networks)"),
    "seed": (0, "seed of the agent's networks and the replay sampling"),
    "frames": (20_000, "env steps to learn from, then save and exit 0 (also sizes the agent's schedules)"),
    "set": (ARRAY, "agent options KEY=VALUE, as robolearn train --set"),
    "seed_steps": (-1, "env steps before the first update (-1: the agent's own; SERL: 0 with demos, 1000 without)"),
    "update_ratio": (1.0, "update calls per env step, relative to the agent's own schedule (robolearn train: 1)"),
    "publish_every_updates": (50, "publish weights every N update calls (SERL: 50) ..."),
    "publish_every_s": (4.0, "... or every N seconds when updates happened, whichever comes first"),
    "checkpoint_every_s": (60.0, "seconds between checkpoints (and at exit); a kill -9 loses at most these updates"),
    "target_success": (0.0, "exit 0 once the actors' last 10 evaluation episodes reach this success rate (0: never)"),
    "torch_threads": (1, "torch threads for the updates (leave a core for the actor and the simulator)"),
    "episodes_topic": (common.EPISODES, "std_msgs/UInt8MultiArray in: the actors' finished episodes"),
    "weights_topic": (common.WEIGHTS, "std_msgs/UInt8MultiArray out (transient local): the newest weights"),
    "acks_topic": (common.ACKS, "std_msgs/String out: JSON {actor, episodes} once an episode is on disk"),
}


class LearnerNode(Node):
    """Receives episodes in its subscription and trains in the caller's thread (`run`)."""

    def __init__(self, **kwargs):
        super().__init__("learner", **kwargs)
        for name, (default, text) in PARAMS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=text))
        self.p = {n: self.get_parameter_or(n, Parameter(n, value=[])).value for n in PARAMS}
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.rejected = 0
        self.create_subscription(UInt8MultiArray, self.p["episodes_topic"], self._on_episode, common.PAYLOAD_QOS)
        self.weights_pub = self.create_publisher(UInt8MultiArray, self.p["weights_topic"], common.WEIGHTS_QOS)
        self.acks_pub = self.create_publisher(String, self.p["acks_topic"], common.RELIABLE_QOS)

    def _on_episode(self, msg: UInt8MultiArray) -> None:
        self.inbox.put(common.payload_bytes(msg))
        self.wake.set()

    def make_learner(self):
        from robolearn.cli import _parse_overrides
        from robolearn.learner import Learner, LearnerConfig

        p = self.p
        if p["torch_threads"] < 1:
            raise ValueError(f"parameter torch_threads: {p['torch_threads']} must be 1 or more")
        cfg = LearnerConfig(agent=p["agent"], out=p["out"], demos=p["demos"] or None,
                            init_checkpoint=p["checkpoint"] or None, seed=p["seed"], frames=p["frames"],
                            seed_steps=None if p["seed_steps"] < 0 else int(p["seed_steps"]),
                            agent_overrides=_parse_overrides(p["set"]), update_ratio=float(p["update_ratio"]),
                            publish_every_updates=p["publish_every_updates"], publish_every_s=float(p["publish_every_s"]),
                            checkpoint_every_s=float(p["checkpoint_every_s"]))
        if not 0.0 <= p["target_success"] <= 1.0:
            raise ValueError(f"parameter target_success: {p['target_success']} is not in [0, 1]")
        return Learner(cfg, log=self.get_logger().info)

    def _drain(self, learner) -> None:
        from robolearn.payload import PayloadError

        acks: dict[tuple, list[int]] = {}
        while True:
            try:
                data = self.inbox.get_nowait()
            except queue.Empty:
                break
            try:
                meta, new = learner.ingest(data)
            except PayloadError as err:  # never stored, never acknowledged: the actor keeps it and says so
                self.rejected += 1
                self.get_logger().error(f"refused {err}", throttle_duration_sec=1.0)
                continue
            acks.setdefault((str(meta["actor"]), meta.get("run", 0)), []).append(int(meta["index"]))  # duplicates too
            if new and len(learner.ingested) % 10 == 0:
                self._report(learner)
        behind = learner.behind()  # with the episodes just stored: the actors' max_learner_lag counts them from here on
        for (actor, run), indices in acks.items():
            self.acks_pub.publish(String(data=json.dumps({"actor": actor, "run": run, "episodes": indices,
                                                          "behind": behind})))

    def _report(self, learner) -> None:
        s = learner.summary()
        fmt = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
        self.get_logger().info(f"{s['env_steps']} env steps, {s['updates']} updates, {s['episodes']} episodes, "
                               f"weights v{s['version']}; success: eval {fmt(s['eval_success'])}, "
                               f"train {fmt(s['train_success'])}")

    def run(self) -> int:
        """Train until `frames` env steps, the target success, or a stop; save and return the exit code."""
        import torch
        learner = self.make_learner()
        torch.set_num_threads(int(self.p["torch_threads"]))
        p, published_at, published_updates, saved_at = self.p, time.monotonic(), -1, time.monotonic()
        while not self.stop.is_set():
            self._drain(learner)
            if learner.agent is None:
                self.wake.wait(0.1)
                self.wake.clear()
                continue
            due = learner.owed()
            for _ in range(min(due, 10)):  # a few at a time: arriving episodes are acknowledged promptly
                learner.update()
            now = time.monotonic()
            fresh = learner.updates - published_updates
            if published_updates < 0 or fresh >= p["publish_every_updates"] or (
                    fresh > 0 and now - published_at >= p["publish_every_s"]):
                self.weights_pub.publish(common.payload_msg(learner.weights()))
                published_at, published_updates = now, learner.updates
            if now - saved_at >= p["checkpoint_every_s"]:
                learner.save()
                saved_at = now
            rate = learner.recent_success()
            if learner.env_steps >= p["frames"] or (p["target_success"] > 0 and rate is not None
                                                    and rate >= p["target_success"]):
                self.get_logger().info(f"done: {learner.env_steps} env steps, eval success {rate}")
                break
            if not due:
                self.wake.wait(0.05)
                self.wake.clear()
        if learner.agent is not None:
            learner.save()
            self.weights_pub.publish(common.payload_msg(learner.weights()))
            self._report(learner)
            print(json.dumps({"learner": learner.summary(), "out": str(learner.out)}), flush=True)
        return 0


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads starve a shared machine
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    node = LearnerNode()
    for sig in (signal.SIGINT, signal.SIGTERM):  # save a checkpoint, then exit 0
        signal.signal(sig, lambda *_: (node.stop.set(), node.wake.set()))
    executor = common.executor()
    executor.add_node(node)
    stop = threading.Event()
    spinner = threading.Thread(target=common.spin, args=(executor, stop, node.get_logger()), daemon=True)
    spinner.start()
    try:
        code = node.run()
    except Exception as err:  # a bad parameter or a resume that cannot work: one line, exit 1
        node.get_logger().error(f"learner stopped: {err}")
        code = 1
    stop.set()
    spinner.join(timeout=5.0)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
