"""agent_node's train mode: record episodes, send them to the learner, take its weights; wait for it only
between episodes, and only where `max_learner_lag` asks (in simulation, so a slow CPU costs time, not samples).

`EpisodeRecorder` turns the node's ticks into episodes (obs T+1, action/reward/flags T); `LearnerLink`
owns the three topics (robolearn.ros.common: EPISODES, WEIGHTS, ACKS): a sender thread packs and
publishes each finished episode and republishes what the learner has not acknowledged every `resend_s`
(while a learner listens), so episodes recorded while the learner is down arrive once it is back; weights
are decoded in the subscription and handed to the node. docs/actor_learner.md has the picture.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

import numpy as np
from std_msgs.msg import String, UInt8MultiArray

from robolearn import payload
from robolearn.ros import common

LEARNER_SILENT_S = 30.0  # a learner whose weights and acks stopped this long ago is not waited for (killed, or done)


class EpisodeRecorder:
    """Steps of the episode (or segment) in progress; `finish` returns it as payload arrays."""

    def __init__(self):
        self.obs: list[dict] = []
        self.action, self.reward, self.terminated, self.truncated, self.intervention = [], [], [], [], []

    def __len__(self) -> int:
        return len(self.action)

    def observe(self, obs: dict, reward: float | None = None, terminated: bool = False, truncated: bool = False) -> None:
        """The first observation, or the one after the last action with that action's reward and flags."""
        if self.obs:
            self.reward.append(float(reward))
            self.terminated.append(bool(terminated))
            self.truncated.append(bool(truncated))
        self.obs.append({k: np.array(v) for k, v in obs.items()})

    def act(self, action, intervened: bool = False) -> None:
        self.action.append(np.asarray(action, np.float32))
        self.intervention.append(bool(intervened))

    def finish(self) -> dict | None:
        """The complete transitions so far (an action without its next observation is dropped); the last one
        is marked truncated unless it terminated. None when there is no complete transition."""
        n = len(self.obs) - 1
        if n < 1:
            return None
        truncated = self.truncated[:n]
        truncated[-1] = truncated[-1] or not self.terminated[n - 1]
        return {"obs": {k: np.stack([o[k] for o in self.obs[:n + 1]]) for k in self.obs[0]},
                "action": np.stack(self.action[:n]), "reward": np.asarray(self.reward[:n], np.float32),
                "terminated": np.asarray(self.terminated[:n]), "truncated": np.asarray(truncated),
                "intervention": np.asarray(self.intervention[:n])}


class LearnerLink:
    """The actor's side of the topics; `on_weights(state, meta)` is called for each valid weights message."""

    def __init__(self, node, actor: str, spec: dict, on_weights, episodes_topic: str, weights_topic: str,
                 acks_topic: str, resend_s: float, max_unacked_mb: float, group=None):
        self.node, self.actor, self.spec, self.on_weights = node, actor, spec, on_weights
        self.run = time.time_ns()  # this process's episodes: a restarted actor's index 0 is a new episode
        self.resend_s, self.max_bytes = resend_s, int(max_unacked_mb * 2**20)
        self.pub = node.create_publisher(UInt8MultiArray, episodes_topic, common.PAYLOAD_QOS)
        self.subs = [node.create_subscription(UInt8MultiArray, weights_topic, self._on_weights, common.WEIGHTS_QOS,
                                              callback_group=group),
                     node.create_subscription(String, acks_topic, self._on_acks, common.RELIABLE_QOS,
                                              callback_group=group)]
        # index -> [bytes, last sent, env steps, packed at] (monotonic seconds)
        self.unacked: OrderedDict[int, list] = OrderedDict()
        self._packing: list[tuple[int, dict, dict]] = []  # finished episodes the sender has not packed yet
        self.unacked_bytes = 0
        self.sent = self.acked = self.dropped = self.rejected_weights = 0
        self.version = 0
        self.behind, self.heard_at = 0, -np.inf  # the learner's owed env steps (weights or ack), and when it said so
        self._lock, self._packer, self._wake, self._stop = (threading.Lock(), threading.Lock(), threading.Event(),
                                                            threading.Event())
        self._thread = threading.Thread(target=self._run, name="actor-sender", daemon=True)
        self._thread.start()

    def send(self, index: int, episode: dict, meta: dict) -> None:
        """Queue a finished episode; returns at once (the sender thread packs and publishes it)."""
        with self._lock:
            self._packing.append((int(index), episode, meta))
        self._wake.set()

    def _pack(self) -> None:
        """Pack the queued episodes in order; each leaves the queue only once it is in `unacked`, so that
        pending() and lag() count it throughout."""
        with self._packer:  # the sender thread, or close() after it
            while True:
                with self._lock:
                    if not self._packing:
                        return
                    index, episode, meta = self._packing[0]
                data = payload.pack_episode(episode, self.spec, {"actor": self.actor, "run": self.run, "index": index,
                                                                 **meta})
                self._store(index, episode, data)

    def _store(self, index: int, episode: dict, data: bytes) -> None:
        """Move the queue's packed head into `unacked`; beyond `max_unacked_mb` the oldest goes, with an error."""
        with self._lock:
            del self._packing[0]
            self.unacked[index] = [data, -np.inf, len(episode["action"]), time.monotonic()]
            self.unacked_bytes += len(data)
            while self.unacked_bytes > self.max_bytes and len(self.unacked) > 1:  # bounded memory, loudly
                old, (dropped, *_) = self.unacked.popitem(last=False)
                self.unacked_bytes -= len(dropped)
                self.dropped += 1
                self.node.get_logger().error(
                    f"dropped episode {old}: more than {self.max_bytes / 2**20:.0f} MB unacknowledged "
                    "(is the learner running?)", throttle_duration_sec=5.0)

    def _publish_due(self, every: float, cap: int = 50) -> None:
        """Publish the new episodes and those unacknowledged for `every` s (at most `cap`), while a learner listens."""
        if self.pub.get_subscription_count() == 0:
            return
        now = time.monotonic()
        with self._lock:
            due = [(i, item) for i, item in self.unacked.items() if now - item[1] >= every][:cap]
        for i, item in due:
            self.pub.publish(common.payload_msg(item[0]))
            item[1] = time.monotonic()
            self.sent += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pack()
            self._publish_due(self.resend_s)
            self._wake.wait(min(1.0, self.resend_s))
            self._wake.clear()

    def _on_acks(self, msg: String) -> None:
        try:
            ack = json.loads(msg.data)
            if ack.get("actor") != self.actor or ack.get("run", self.run) != self.run:
                return
            indices = [int(i) for i in ack["episodes"]]
            if "behind" in ack:  # counted after the learner stored these episodes: fresher than its last weights
                self.behind, self.heard_at = int(ack["behind"]), time.monotonic()
        except (ValueError, KeyError, TypeError, AttributeError):
            self.node.get_logger().error(f"malformed ack on {self.subs[1].topic_name}: {msg.data[:80]!r}",
                                         throttle_duration_sec=5.0)
            return
        with self._lock:
            for i in indices:
                item = self.unacked.pop(i, None)
                if item is not None:
                    self.acked += 1
                    self.unacked_bytes -= len(item[0])

    def _on_weights(self, msg: UInt8MultiArray) -> None:
        spec = {k: v for k, v in self.spec.items() if k != "agent"}
        try:
            state, theirs, meta = payload.unpack_weights(common.payload_bytes(msg), None, "weights")
            if theirs.get("agent") != self.spec.get("agent"):
                raise payload.PayloadError(f"weights are for agent {theirs.get('agent')!r}, this actor runs "
                                           f"{self.spec.get('agent')!r}")
            payload.check_spec(spec, {k: v for k, v in theirs.items() if k != "agent"}, "weights payload")
            self.on_weights(state, theirs, meta)
        except (payload.PayloadError, ValueError, KeyError, RuntimeError) as err:
            self.rejected_weights += 1
            self.node.get_logger().error(f"refused {err}", throttle_duration_sec=5.0)
            return
        self.version = int(meta.get("version", 0))
        self.behind, self.heard_at = int(meta.get("behind", 0)), time.monotonic()

    def pending(self) -> int:
        """Episodes not yet acknowledged (packed or not)."""
        with self._lock:
            return len(self.unacked) + len(self._packing)

    def lag(self) -> int | None:
        """Env steps sent that the learner has not trained on: those it owes updates for, as its last weights or ack
        said, plus those of episodes on their way (packed within `resend_s` and not acknowledged: one the learner
        refuses stops counting then). None when no learner has been heard for LEARNER_SILENT_S."""
        now = time.monotonic()
        if now - self.heard_at > LEARNER_SILENT_S:
            return None
        with self._lock:
            return self.behind + sum(item[2] for item in self.unacked.values() if now - item[3] <= self.resend_s) + sum(
                len(episode["action"]) for _i, episode, _m in self._packing)

    def close(self, flush_s: float = 3.0) -> None:
        """Stop the sender; first give the learner `flush_s` s to acknowledge what is pending, and say what is lost."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2.0)
        self._pack()
        deadline = time.monotonic() + flush_s
        self._publish_due(0.0, cap=len(self.unacked))
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pending():
            self.node.get_logger().warning(f"{self.pending()} episodes were never acknowledged by a learner; they are "
                                           "lost with this actor")
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        self.node.destroy_publisher(self.pub)


class RemotePolicy:
    """The agent a learner trains, as an actor holds it: built from the learner's weights (or a checkpoint's
    agent), uniform random actions before them and until the run has had the learner's `seed_steps`."""

    def __init__(self, env, seed: int, agent=None, config: dict | None = None):
        self.env, self.agent, self.config = env, agent, config
        self.lock = threading.Lock()  # act() against weights arriving in the subscription thread
        self.rng = np.random.default_rng(seed)
        self.seed_steps = self.learner_steps = self.steps = self.steps_at_weights = 0

    def on_weights(self, state: dict, spec: dict, meta: dict) -> None:
        """The first weights, or weights with a config unlike the agent's, build a new agent outside the lock and
        swap it in; later ones are copied into the agent while act() waits (a few ms for an MLP)."""
        from robolearn.train import build_agent
        agent, fresh = self.agent, self.agent is None or meta["config"] != self.config
        if fresh:
            agent, _ = build_agent(spec["agent"], self.env, {}, 0, meta["config"])
            agent.load_state_dict({**agent.state_dict(), **state})
        with self.lock:
            if not fresh:
                agent.load_state_dict({**agent.state_dict(), **state})  # its own optimizer and random streams stay
            self.agent, self.config, self.seed_steps = agent, meta["config"], int(meta.get("seed_steps", 0))
            self.learner_steps, self.steps_at_weights = int(meta.get("env_steps", 0)), self.steps

    def reset(self) -> None:
        with self.lock:
            if self.agent is not None:
                self.agent.reset()  # an agent with a history or action chunks starts afresh

    def act(self, obs: dict, explore: bool) -> np.ndarray:
        import torch
        self.steps += 1
        with self.lock:
            if self.agent is None or self.learner_steps + self.steps - self.steps_at_weights <= self.seed_steps:
                return self.rng.uniform(-1, 1, self.env.action_space.shape).astype(np.float32)
            with torch.inference_mode():
                return self.agent.act(obs, explore=explore)
