"""The policy node: a trained agent acting on a robot (or the simulator) through ROS 2 topics.

A lifecycle node: configure loads the checkpoint onto the ROS RobotEnv and checks it fits;
activate starts a fixed-rate control timer; deactivate, cleanup and shutdown hold the arm.
Parameters and topics: docs/ros.md ("agent_node"). Run: python -m robolearn.ros.agent_node --ros-args ...
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import Bool, Float64MultiArray, Header
from std_srvs.srv import Trigger

from robolearn.robot.env import RobotEnv
from robolearn.robot.interfaces import StaleStateError
from robolearn.ros import common
from robolearn.ros import robot_params
from robolearn.ros.rewards import REWARD_PARAMS
from robolearn.ros.robot_params import ENV_FIELDS, SAFETY_FIELDS

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
PARAMS = {  # name: (default, description); docs/ros.md lists them
    "checkpoint": ("", "policy checkpoint: a run dir, its checkpoints/ dir or a step dir (mode train: optional, "
                       "else the learner's weights)"),
    "mode": ("deploy", "deploy: act with the checkpoint; train: also send episodes to learner_node and take its weights"),
    "agent": ("serl", "mode train: the agent the learner trains (its weights of another agent are refused)"),
    "actor_id": ("", "mode train: this actor's name in episodes and acks (empty: the node's full name)"),
    "eval_every": (5, "mode train: every N-th episode acts deterministically and is marked eval (0: none)"),
    "resend_s": (5.0, "mode train: republish episodes the learner has not acknowledged after N s"),
    "max_unacked_mb": (1024.0, "mode train: MB of episodes kept for the learner; beyond, the oldest is dropped with "
                               "an error"),
    "max_learner_lag": (0, "mode train: env steps the actor may run ahead of the learner's updates; beyond, it waits "
                           "before the next episode with the arm held (0: never waits, SERL's asynchronous actor; set it "
                           "in simulation, where waiting costs wall time instead of samples)"),
    "teleop_device": ("", "mode train: intervention device (keyboard, gamepad, spacemouse, ros); empty: none"),
    "intervention_button": (-1, "mode train: the operator has control only while this raw button index of "
                                "teleop_device is held (a dead-man switch; gamepad, spacemouse, ros Joy); -1: whenever "
                                "they command motion or the gripper (HIL-SERL's rule)"),
    "reward_source": ("task", "mode train: task (task/reward, task/success), classifier (a reward classifier run here), "
                              "operator (a key or ~/success marks success) or rlif (-1 where a human takes over)"),
    **REWARD_PARAMS,
    "episodes_topic": (common.EPISODES, "mode train: std_msgs/UInt8MultiArray out, finished episodes"),
    "weights_topic": (common.WEIGHTS, "mode train: std_msgs/UInt8MultiArray in, the learner's weights"),
    "acks_topic": (common.ACKS, "mode train: std_msgs/String in, the learner's acknowledgements"),
    **robot_params.ROBOT_PARAMS,
    "episodes": (0, "run this many episodes, print the success line and exit 0 (0: until stopped)"),
    "seed": (0, "episode k resets with env seed seed + k"),
    "autostart": (True, "configure and activate at startup (no lifecycle manager needed)"),
    "thread_priority": (20, "SCHED_FIFO priority of the control thread, 1-99 (0: normal scheduling); needs an "
                            "rtprio limit or CAP_SYS_NICE, else a warning and normal scheduling"),
    "torch_threads": (0, "torch threads (0: 1 for a state or chunked (diffusion) policy, the idle cores up to 4 "
                         "for a single-step policy with cameras)"),
    "publish_timing": (False, "publish ~/timing per tick: interval, compute, latency, receipt latency, missed"),
    "publish_steps": (False, "publish ~/steps: [episode, step, *state, *action] per step, [episode, -1, success] at the end"),
    "estop_topic": (common.ESTOP, "std_msgs/Bool; True latches the e-stop until ~/reset_estop"),
}
# ~/steps: none may drop, and a subscriber (with this QoS) that is matched only after the first episode began, as
# DDS discovery can take a second on a busy machine, still gets the last 1000 messages the agent sent.
STEPS_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
WARN_HOLDS, ERROR_HOLDS = ("stale", "deadline", "learner"), ("estop", "action", "reset", "error")  # others: transitions


def _same(a, b) -> bool:
    try:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=1e-12))
    except (TypeError, ValueError):
        return a == b


def checkpoint_mismatches(config: dict, env: RobotEnv) -> list[str]:
    """Every field where a checkpoint's config.json disagrees with the robot env: spaces and env settings."""
    ckpt, ours = config.get("observation_space", {}), {k: list(v.shape) for k, v in env.observation_space.spaces.items()}
    out = [f"observation_space[{k!r}]: checkpoint {ckpt.get(k)}, robot {ours.get(k)}"
           for k in sorted(set(ckpt) | set(ours)) if ckpt.get(k) != ours.get(k)]
    if config.get("action_shape") != list(env.action_space.shape):
        out.append(f"action_shape: checkpoint {config.get('action_shape')}, robot {list(env.action_space.shape)}")
    recorded = {}  # env_kwargs as `robolearn train` records them; env_config where a checkpoint has the whole config
    for src in ((config.get("train_config") or {}).get("env_kwargs"), config.get("env_kwargs"), config.get("env_config")):
        for k, v in (src or {}).items():
            recorded.update(v if k == "safety" and isinstance(v, dict) else {k: v})
    node = {**{f: getattr(env.cfg, f) for f in ENV_FIELDS}, **{f: getattr(env.cfg.safety, f) for f in SAFETY_FIELDS}}
    return out + [f"{k}: checkpoint {v!r}, node parameter {node[k]!r}" for k, v in recorded.items()
                  if k in node and not _same(v, node[k])]


class PeriodicThread:
    """Calls `fn` every `period` s of the monotonic clock from a thread of its own.

    No executor stands between the deadline and the call: an rclpy timer under a MultiThreadedExecutor
    busy with 100 Hz state topics woke 4 ms late at the median and 20-35 ms at p99 (bench/control_loop.py).
    """

    def __init__(self, period: float, fn, name: str, priority: int = 0):
        """priority: SCHED_FIFO priority for the thread (1-99; 0: the normal scheduler). `self.started`
        is set once the thread runs; `self.priority_error` then says why a priority was not granted."""
        self.period, self.fn, self._regrid, self.priority = period, fn, False, priority
        self.priority_error, self.started = "", threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def regrid(self) -> None:
        """Start the period grid again from the end of the current call (after a blocking reset)."""
        self._regrid = True

    def _run(self) -> None:
        if self.priority > 0:  # as ros2_control's controller_manager does for its update thread
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))  # 0: this thread
            except (OSError, AttributeError) as err:  # no rtprio permission, or not Linux
                self.priority_error = str(err)
        self.started.set()
        due = time.monotonic()
        while not self._stop.is_set():
            self.fn()
            due = time.monotonic() if self._regrid else due + self.period
            self._regrid = False
            delay = due - time.monotonic()
            if delay < -self.period:  # a whole period late: keep the rate, drop the missed ticks
                due += math.ceil(-delay / self.period) * self.period
                delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def cancel(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class AgentNode(LifecycleNode):
    """Acts with a checkpoint's policy on the ROS robot env at `control_hz`; see the module docstring."""

    def __init__(self, **kwargs):
        super().__init__("agent", **kwargs)
        robot_params.declare(self, PARAMS)
        self._read_parameters()
        self.env = self.agent = self._control_timers = self.link = self._rec = self.device = self.reward = None
        self.policy = None  # mode train: the learner's agent (robolearn.ros.actor.RemotePolicy)
        self.segments = self.total_steps = self.interventions = 0
        self._eval, self._cut = False, False
        self._parts, self._need_reset, self._return = [], True, 0.0
        self.finished = threading.Event()  # set when `episodes` are done or a signal arrives
        self.exit_code, self.summary, self.lifecycle, self.error = 0, "", "unconfigured", ""
        self.episodes = self.successes = self.steps = self.missed_deadlines = self.stale = self.bad_actions = 0
        self._lock = threading.Lock()  # orders policy commands against holds (e-stop, watchdog, transitions)
        self._ticking = threading.Lock()  # held while a tick runs
        self._active = self._estop = False
        self._held, self._held_msg, self._tick_start, self._last_tick, self._reported = None, "", None, None, 0
        self._io = ReentrantCallbackGroup()  # subscriptions, services, the reset client
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)  # the loop keeps wall time, also under sim time
        self.diag_pub = self.create_publisher(DiagnosticArray, common.DIAGNOSTICS, 10)
        self.timing_pub = self.create_publisher(Float64MultiArray, "~/timing", 100)
        self.steps_pub = self.create_publisher(Float64MultiArray, "~/steps", STEPS_QOS)
        self.create_subscription(Bool, self.p["estop_topic"], self._on_estop, common.RELIABLE_QOS, callback_group=self._io)
        self.create_service(Trigger, "~/reset_estop", self._on_reset_estop, callback_group=self._io)
        self.create_timer(1.0, self._diagnostics, MutuallyExclusiveCallbackGroup(), clock=self._steady)

    def _read_parameters(self) -> None:
        """At startup and at each configure, so parameters set while unconfigured take effect."""
        self.p = robot_params.read(self, PARAMS)
        self.period = 1.0 / self.p["control_hz"]

    # -- lifecycle ---------------------------------------------------------------------------
    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as err:  # any cause: stay unconfigured and say why
            self.error = f"configure refused: {err}"
            self.get_logger().error(self.error)
            self._release()
            self._diagnostics()
            return FAILURE
        self.lifecycle, self.error = "inactive", ""
        what = self.p["checkpoint"] or "the learner's weights"
        self.get_logger().info(f"configured ({self.p['mode']}): {what} at {self.p['control_hz']:g} Hz")
        return SUCCESS

    def _configure(self) -> None:
        from robolearn.checkpoint import read_config
        from robolearn.train import load_agent
        self._read_parameters()
        p = self.p
        if not 0 <= p["thread_priority"] <= 99:
            raise ValueError(f"parameter thread_priority: {p['thread_priority']} is not in 0-99")
        if p["mode"] not in ("deploy", "train"):
            raise ValueError(f"parameter mode: {p['mode']!r} is not deploy or train")
        if p["reward_source"] not in ("task", "rlif", "classifier", "operator"):
            raise ValueError(f"parameter reward_source: {p['reward_source']!r} is not task, classifier, operator or rlif")
        train = p["mode"] == "train"
        if not p["checkpoint"] and not train:
            raise ValueError("parameter checkpoint is empty: mode deploy needs a checkpoint")
        config = read_config(p["checkpoint"]) if p["checkpoint"] else {}
        p["uses_gripper"] = self._uses_gripper(config)
        shapes = robot_params.camera_shapes(p, config.get("observation_space", {}), "checkpoint")
        env, self._parts = robot_params.make_robot_env(self, p, shapes, self._io, self.get_fully_qualified_name())
        bad = checkpoint_mismatches(config, env) if config else []
        if bad:
            raise ValueError(f"checkpoint {p['checkpoint']} does not fit this robot: " + "; ".join(bad))
        if config:
            self.agent, _ = load_agent(p["checkpoint"], env)
        if train:
            self._configure_training(env, config)
        # A chunked policy samples one chunk per action_horizon ticks with small convolutions at batch 1,
        # which more threads slow down (bench/diffusion_inference.py: 38 ms on 1 thread, 86-104 ms on 2).
        self._torch_threads(bool(shapes) and not hasattr(self.agent, "action_horizon"))
        self.env = env
        gc.collect()
        gc.freeze()  # the ~190k objects alive now (torch, rclpy, the agent) are never scanned again: a full
        # collection over them took 150-175 ms here, a stalled tick every few seconds

    def _configure_training(self, env, config: dict) -> None:
        from robolearn.payload import env_spec
        from robolearn.ros.actor import LearnerLink, RemotePolicy

        p = self.p
        if config and config.get("agent") != p["agent"]:
            raise ValueError(f"checkpoint {p['checkpoint']} holds a {config.get('agent')!r} agent; parameter agent is "
                             f"{p['agent']!r}")
        for name in ("resend_s", "max_unacked_mb"):
            if not p[name] > 0:
                raise ValueError(f"parameter {name}: {p[name]} must be positive")
        for name in ("eval_every", "max_learner_lag"):
            if p[name] < 0:
                raise ValueError(f"parameter {name}: {p[name]} must be 0 or more")
        if p["intervention_button"] < -1 or (p["intervention_button"] >= 0 and not p["teleop_device"]):
            raise ValueError(f"parameter intervention_button: {p['intervention_button']} needs a teleop_device and "
                             "is a button index (0 or more) or -1")
        if p["teleop_device"]:
            from robolearn.demos.teleop import device_class, make_device
            if p["intervention_button"] >= 0 and not device_class(p["teleop_device"]).has_buttons:
                raise ValueError(f"parameter intervention_button: teleop_device {p['teleop_device']!r} reports no "
                                 "held buttons; use gamepad, spacemouse or ros (sensor_msgs/Joy), or -1")
            self.device = make_device(p["teleop_device"])
            self._parts.append(self.device)
        self.policy = RemotePolicy(env, p["seed"], self.agent, self.agent.config_dict() if self.agent else None)
        self.link = LearnerLink(self, p["actor_id"] or self.get_fully_qualified_name(), env_spec(env, p["agent"]),
                                self._on_weights, p["episodes_topic"], p["weights_topic"], p["acks_topic"],
                                p["resend_s"], p["max_unacked_mb"], self._io)
        self._parts.append(self.link)
        from robolearn.ros.rewards import make_reward
        self.reward = make_reward(self, p, env, self._io)
        self._parts.append(self.reward)

    def _on_weights(self, state: dict, spec: dict, meta: dict) -> None:
        self.policy.on_weights(state, spec, meta)
        self.get_logger().info(f"weights v{meta.get('version')} after {meta.get('updates')} updates",
                               throttle_duration_sec=10.0)

    def _uses_gripper(self, config: dict) -> bool:
        """From the checkpoint's action_shape and action_mode (xyz: 3 or 4, 6dof: 6 or 7), so a checkpoint
        needs no `uses_gripper`; a parameter given explicitly (or a shape that fits neither) keeps its value."""
        if "uses_gripper" in getattr(self, "_parameter_overrides", {}):
            return self.p["uses_gripper"]
        shape, arm = config.get("action_shape"), 6 if self.p["action_mode"] == "6dof" else 3
        if isinstance(shape, list) and len(shape) == 1 and shape[0] in (arm, arm + 1):
            return shape[0] == arm + 1
        return self.p["uses_gripper"]

    def _torch_threads(self, pixels: bool) -> None:
        import torch
        n = self.p["torch_threads"]
        if n <= 0 and pixels:  # a conv encoder can use the cores others leave idle
            from robolearn.cpu import busy_cores
            n = min(4, round((os.cpu_count() or 1) - (busy_cores(0.2) or 0.0)))
        torch.set_num_threads(max(1, n))  # an MLP's matmuls are too small to share: more threads only add wake-ups

    def on_activate(self, state) -> TransitionCallbackReturn:
        with self._lock:
            self._active, self._held, self._need_reset, self._last_tick = True, None, True, None
        self._control_timers = [  # the ticks on a thread of their own; the watchdog apart from the subscriptions
            PeriodicThread(self.period, self._tick, "agent-control", self.p["thread_priority"]),
            self.create_timer(self.period, self._watchdog, MutuallyExclusiveCallbackGroup(), clock=self._steady)]
        control = self._control_timers[0]
        control.started.wait(1.0)
        if control.priority_error:
            self.get_logger().warning(
                f"thread_priority {control.priority} not granted ({control.priority_error}); the control loop runs "
                "at normal priority. Allow it with an rtprio limit (docs/ros.md) or set thread_priority:=0")
        self.lifecycle = "active"
        return SUCCESS

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        return self._stop("deactivated", "inactive")

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        return self._stop("cleanup", "unconfigured", release=True)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        return self._stop("shutdown", "finalized", release=True)

    on_error = on_cleanup

    def _stop(self, why: str, lifecycle: str | None = None, release: bool = False) -> TransitionCallbackReturn:
        """Hold (where the node was acting), stop the timers, and with `release` let the arm's parts go."""
        with self._lock:
            if self.env is not None and self._active:  # an inactive node has held already, or never acted
                self._hold(why, why)
            self._active = False
        for timer in self._control_timers or ():
            timer.cancel() if isinstance(timer, PeriodicThread) else self.destroy_timer(timer)
        self._control_timers = None
        if release and self._ticking.acquire(timeout=self.p["reset_timeout"] + 1.0):
            self._ticking.release()  # no tick runs now, nor will one start: the timers are gone
        if release and self.env is not None and hasattr(self.env.arm, "flush"):  # the hold reaches the robot
            self.env.arm.flush(0.5)  # before its publishers go
        if release:
            self._release()
        self.lifecycle = lifecycle or self.lifecycle
        return SUCCESS

    def _release(self) -> None:
        for part in self._parts:
            part.close()
        self._parts, self.env, self.agent, self.link, self.device, self._rec, self.reward, self.policy = \
            [], None, None, None, None, None, None, None

    # -- control -----------------------------------------------------------------------------
    def _tick(self) -> None:
        start = time.monotonic()
        interval = start - self._last_tick if self._last_tick is not None else math.nan
        self._last_tick = start
        with self._ticking:  # a cleanup waits for a running tick before it releases the parts
            with self._lock:
                if not self._active or self._estop or self.env is None:
                    return
            try:
                if self._need_reset:
                    return self._start_episode()
                self._tick_start = start
                latency = self._step(start)
            except Exception as err:  # whatever broke, the arm stays put and the node stays up
                with self._lock:
                    return self._hold("error", f"tick failed: {err!r}", error=True)
            finally:
                self._tick_start = None
        if self.p["publish_timing"] and latency is not None:
            self.timing_pub.publish(Float64MultiArray(data=[interval, time.monotonic() - start, *latency,
                                                            float(self.missed_deadlines), start]))

    def _start_episode(self) -> None:
        if self._learner_ahead():
            return
        seed = self.p["seed"] + self.episodes
        try:
            _, info = self.env.reset(seed=seed)
        except (StaleStateError, TimeoutError, RuntimeError) as err:
            with self._lock:
                self._hold("reset", f"reset failed (retrying): {err}")
            time.sleep(min(1.0, 10 * self.period))  # a service that fails fast is not hammered
            return
        if self.policy is not None:
            self.policy.reset()
        elif self.agent is not None:
            self.agent.reset()  # an agent with a history or action chunks starts afresh
        if self.reward is not None:
            self.reward.reset()  # a success key pressed during the reset does not count for this episode
        self._need_reset, self.steps, self._return = False, 0, 0.0
        if self.link is not None:
            self._flush(final=True)  # what is left of the last episode; the next observation opens this one's
            n = self.p["eval_every"]
            self._eval = bool(n) and self.episodes % n == n - 1
        self.get_logger().info(f"episode {self.episodes}: reset with seed {seed}{reset_summary(info)}")
        if self._control_timers:  # restart the period grid after the blocking reset
            self._control_timers[0].regrid()
        self._last_tick = None  # an episode's first tick follows a reset, not a period: it reports no interval

    def _learner_ahead(self) -> bool:
        """Mode train with max_learner_lag: hold the arm and wait (the next tick asks again) while the learner owes
        updates for more env steps than that; a learner silent for LEARNER_SILENT_S is not waited for."""
        limit = self.p["max_learner_lag"] if self.link is not None else 0
        lag = self.link.lag() if limit else None
        if lag is None or lag <= limit:
            return False
        with self._lock:
            self._hold("learner", f"waiting for the learner: {lag} env steps not yet trained on, "
                                  f"max_learner_lag {limit}")
        return True

    def _step(self, start: float) -> tuple[float, float] | None:
        """Observe, act, command; returns (observation-to-command latency, receipt-to-command) when commanded."""
        env = self.env
        try:
            obs = env.observe()
        except StaleStateError as err:
            with self._lock:
                return self._stale(err)
        stamp, receipt = env.state.stamp, getattr(env.arm, "joint_receipt", start)  # of the joint_states it used
        if self.steps:  # the score now measures the previous action, as env.step's does
            reward, success = self.reward.score(obs, env.arm) if self.reward is not None else env.task.score(env.arm)
            reward = float(success) if env.cfg.reward_type == "sparse" else float(reward)
            self._return += reward
            terminated = bool(success and env.cfg.terminate_on_success)
            truncated = self.steps >= env.cfg.max_episode_steps
            if self.link is not None:
                self._record(obs, reward, terminated, truncated, success)
            if terminated or truncated:
                return self._end_episode(success)
        elif self.link is not None:
            self._record(obs)
        action, intervened = self._choose(obs)
        if self.p["publish_steps"]:
            self.steps_pub.publish(Float64MultiArray(data=[float(self.episodes), float(self.steps),
                                                           *map(float, obs["state"]), *map(float, action)]))
        with self._lock:
            elapsed = time.monotonic() - start
            if not self._active or self._estop:
                return None
            if elapsed > self.period:  # a late action is for a state that has gone
                self.missed_deadlines += 1
                return self._hold("deadline", f"deadline: the policy took {elapsed * 1e3:.1f} ms of a "
                                              f"{self.period * 1e3:.1f} ms period")
            try:
                env.apply(action)
            except StaleStateError as err:
                return self._stale(err)
            except ValueError as err:  # UnsafeCommandError names the NaN's index
                self.bad_actions += 1
                return self._hold("action", f"rejected action: {err}", error=True)
            sent, now, self._held = time.monotonic(), self.get_clock().now().nanoseconds * 1e-9, None
            if self._rec is not None:
                self._rec.act(action, intervened)
        self.steps += 1
        self.total_steps += 1
        return now - stamp, sent - receipt

    def _choose(self, obs) -> tuple[np.ndarray, bool]:
        """The operator's action while they intervene; else the policy's (random before the learner's
        first weights and during its seed steps); deterministic in deploy mode and in eval episodes."""
        if self.device is not None:
            inp = self.device.read(obs)
            if inp.takes_over(self.p["intervention_button"]):
                self.interventions += 1
                closed = obs["state"][6] < 0.5 * self.p["gripper_max_opening"]  # state: pos, vel, opening, ...
                action = inp.action(1.0 if closed else -1.0)  # motion (3) and gripper
                if self.env.cfg.action_mode == "6dof":  # the operator moves; the tool keeps its orientation
                    action = np.concatenate([action[:3], np.zeros(3, np.float32), action[3:]])
                return action[:self.env.action_dim], True
        if self.policy is not None:
            return self.policy.act(obs, explore=not self._eval), False
        import torch
        with torch.inference_mode():
            return self.agent.act(obs, explore=False), False

    def _record(self, obs, reward=None, terminated=False, truncated=False, success=False) -> None:
        """Add an observation to the recording, opening one where none is. After a hold the recording so far
        goes as a segment of its own (truncated) and a new one starts here: the held step never happened."""
        if self._cut:
            self._cut = False
            self._flush(final=False)
        if self._rec is None:
            from robolearn.ros.actor import EpisodeRecorder
            self._rec = EpisodeRecorder()
            reward = None
        self._rec.observe(obs, reward, terminated, truncated)
        if terminated or truncated:
            self._flush(success, final=True)

    def _flush(self, success: bool = False, final: bool = True) -> None:
        """Send the recording's complete transitions (ended truncated unless terminated) and close it."""
        rec, self._rec = self._rec, None
        episode = rec.finish() if rec is not None else None
        if episode is None or self.link is None:
            return
        if self.p["reward_source"] == "rlif":  # the human taking over is the (only) penalty
            took_over = np.append(episode["intervention"][1:], False) & ~episode["intervention"]
            episode["reward"] = -took_over.astype(np.float32)
        self.link.send(self.segments, episode, {"success": bool(success), "eval": self._eval, "final": final,
                                                "episode": self.episodes, "return": float(self._return),
                                                "version": self.link.version,
                                                "interventions": int(episode["intervention"].sum())})
        self.segments += 1

    def _end_episode(self, success: bool) -> None:
        if self.p["publish_steps"]:
            self.steps_pub.publish(Float64MultiArray(data=[float(self.episodes), -1.0, float(bool(success))]))
        self.episodes, self.successes = self.episodes + 1, self.successes + bool(success)
        self.get_logger().info(f"episode {self.episodes - 1}: {'success' if success else 'failure'} after "
                               f"{self.steps} steps, return {self._return:.2f}; success {self.successes}/{self.episodes}")
        self._diagnostics()
        n = self.p["episodes"]
        if n and self.episodes >= n:
            self.summary = f"{self.p['mode']}: {n} episodes, success {self.successes}/{n} ({100.0 * self.successes / n:.0f}%)"
            self._stop("episodes done")
            self.finished.set()
        else:
            self._need_reset, self._tick_start = True, None  # the watchdog does not time resets
            self._start_episode()

    def _watchdog(self) -> None:
        """Holds while a tick overruns its period: a policy that hangs cannot hold the arm itself."""
        with self._lock:
            t = self._tick_start
            if self._active and not self._estop and t is not None and time.monotonic() - t > self.period:
                self._hold("deadline", f"deadline: tick running for {(time.monotonic() - t) * 1e3:.0f} ms")

    def _stale(self, err: StaleStateError) -> None:
        self.stale += self._held != "stale"  # spells, not ticks
        self._hold("stale", f"stale: {err}")

    def _hold(self, key: str, msg: str, error: bool = False) -> None:
        """Command the measured pose once per cause (the caller holds the lock): the arm stays put."""
        if self._held == key:
            return
        self._held, self._held_msg = key, msg
        if self._rec is not None:  # the control thread ends the recorded segment at its next observation
            self._cut = True
        pose = self.env.arm.hold() if self.env is not None else None
        text = f"holding ({msg})" + ("" if pose is not None else ": no pose received to hold")
        if error:  # rclpy's logger wants one severity per call site
            self.get_logger().error(text)
        else:
            self.get_logger().warning(text)
        self._diagnostics()

    # -- safety inputs and status ------------------------------------------------------------
    def _on_estop(self, msg: Bool) -> None:
        if not msg.data:  # only an operator's ~/reset_estop releases the latch
            return
        with self._lock:
            if not self._estop:
                self._estop = True
                self._hold("estop", "e-stop latched; call ~/reset_estop to resume", error=True)

    def _on_reset_estop(self, request, response):
        with self._lock:
            response.success, response.message = True, "e-stop released" if self._estop else "e-stop was not latched"
            self._estop, self._held = False, None
        self.get_logger().warning(response.message)
        self._diagnostics()
        return response

    def _diagnostics(self) -> None:
        parts = [p for p in self._parts if hasattr(p, "rejected")]
        rejected = sum(p.rejected for p in parts)
        last = max(parts, key=lambda p: p.last_error_at).last_error if parts else ""
        if self._estop or (self._held in ERROR_HOLDS and not self.error):
            level, msg = DiagnosticStatus.ERROR, self._held_msg
        elif self.error:
            level, msg = DiagnosticStatus.ERROR, self.error
        elif self._held in WARN_HOLDS:
            level, msg = DiagnosticStatus.WARN, self._held_msg
        elif rejected > self._reported:
            level, msg = DiagnosticStatus.WARN, f"rejected {rejected} messages; last: {last}"
        else:
            level, msg = DiagnosticStatus.OK, "acting" if self._active else self.lifecycle
        self._reported = rejected
        values = dict(lifecycle=self.lifecycle, estop=self._estop, held=self._held or "", episodes=self.episodes,
                      successes=self.successes, steps=self.steps, missed_deadlines=self.missed_deadlines,
                      stale=self.stale, rejected_messages=rejected, last_rejected=last, rejected_actions=self.bad_actions)
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: control", message=msg,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        self.diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))


def reset_summary(info: dict) -> str:
    """A learned reset's outcome for the episode log line ('' for other resets)."""
    if info.get("reset") != "learned":
        return ""
    how = "succeeded" if info.get("backward_success") else "failed, fallback ran"
    return f" (backward {how} after {info.get('steps')} steps{', then ' + info['then']['reset'] if 'then' in info else ''})"


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads starve a shared machine
    sys.setswitchinterval(0.0005)  # a ready timer thread waits at most this for the GIL (default 5 ms)
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)  # we hold the arm before exiting
    try:
        node = AgentNode()
    except ValueError as err:  # a parameter of the wrong type: one line, nothing started
        print(f"agent_node: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = common.executor(threads=4)
    executor.add_node(node)
    stop = threading.Event()
    spinner = threading.Thread(target=common.spin, args=(executor, stop, node.get_logger()), daemon=True)
    spinner.start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a stop is the normal end of `episodes:=0`: exit 0
        signal.signal(sig, lambda *_: node.finished.set())
    if node.p["autostart"] and not (node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS):
        node.exit_code = 1
        node.finished.set()
    while not node.finished.wait(0.2):
        pass
    if node.lifecycle != "finalized":
        node.trigger_shutdown()
    if node.summary:
        print(node.summary, flush=True)
    stop.set()
    spinner.join(timeout=5.0)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return node.exit_code


if __name__ == "__main__":
    sys.exit(main())
