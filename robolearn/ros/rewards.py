"""Where the actor's reward comes from in mode train: agent_node's `reward_source` parameter.

task: the task's own score (simulation: sim_robot_node's task/reward and task/success topics).
classifier: SERL's learned reward, a RewardClassifier run in the actor on each observation.
operator: success when the operator presses `success_key` in the node's terminal or calls the
`success_service` Trigger. rlif is agent_node's own (the task's score, rewards replaced at the end).
Parameters: REWARD_PARAMS, listed in docs/actor_learner.md ("Reward on hardware").
"""

from __future__ import annotations

import atexit
import threading
from typing import Protocol

import numpy as np

REWARD_PARAMS = {  # name: (default, description), merged into agent_node's PARAMS
    "reward_classifier": ("", "reward_source classifier: the folder `robolearn classifier train` wrote"),
    "success_key": ("y", "reward_source operator: the key in the node's terminal that marks success: one "
                         "character, enter or space ('': no key reader)"),
    "success_service": ("~/success", "reward_source operator: std_srvs/Trigger service that marks success "
                                     "('': none)"),
}
NAMED_KEYS = {"enter": (b"\r", b"\n"), "space": (b" ",)}


class RewardSource(Protocol):
    """score() once per step, on the observation the previous action led to; reset() at each episode start."""

    name: str

    def score(self, obs: dict[str, np.ndarray], arm) -> tuple[float, bool]: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class TaskReward:
    """The task's score through the arm interface (simulation, or a task scored from the robot's state)."""

    name = "task"

    def __init__(self, env):
        self.task = env.task

    def score(self, obs, arm) -> tuple[float, bool]:
        reward, success = self.task.score(arm)
        return float(reward), bool(success)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class ClassifierReward:
    """SERL's reward: 1.0 when the classifier's P(success) of the observation exceeds its threshold."""

    name = "classifier"

    def __init__(self, path: str, observation_space, device=None):
        from robolearn.agents.serl import load_classifier

        if not path:
            raise ValueError("parameter reward_classifier is empty: reward_source classifier needs the folder "
                             "`robolearn classifier train` wrote")
        try:
            self.classifier = load_classifier(path, observation_space, device)
        except (ValueError, OSError) as err:
            raise ValueError(f"parameter reward_classifier: {err}") from None
        self.threshold = float(self.classifier.cfg.threshold)
        self.probability = float("nan")  # of the last scored observation, for logs

    def score(self, obs, arm) -> tuple[float, bool]:
        import torch

        with torch.inference_mode():
            self.probability = float(self.classifier.predict(obs))
        success = self.probability > self.threshold
        return float(success), success

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def key_bytes(key: str) -> tuple[bytes, ...]:
    """What the terminal sends for `success_key`: one character (either case for a letter), enter or space."""
    if key.lower() in NAMED_KEYS:
        return NAMED_KEYS[key.lower()]
    if len(key) != 1 or not key.isprintable():
        raise ValueError(f"parameter success_key: {key!r} is not one character, enter or space")
    return tuple(dict.fromkeys((key.lower().encode(), key.upper().encode())))


class OperatorReward:
    """Success (reward 1.0) at the step in which the operator pressed the key or called the service, else 0.0."""

    name = "operator"

    def __init__(self, node, key: str = "y", service: str = "~/success", callback_group=None, fd: int | None = None):
        from robolearn.hardware.resets import KeyConfirm

        if not key and not service:
            raise ValueError("parameters success_key and success_service are both empty: reward_source operator "
                             "needs one way to mark success")
        self.keys, self.service, self.node = None, None, node
        self._lock = threading.Lock()
        self._called = False
        if key:
            keys = key_bytes(key)
            try:
                self.keys = KeyConfirm(fd, prompt="")
            except (ValueError, OSError):  # pytest's and launch's stdin raise io.UnsupportedOperation
                raise ValueError(f"parameter success_key {key!r}: this node's stdin is not a terminal: run it "
                                 "in a terminal, tmux or `ssh -t`, or set success_key '' and call "
                                 "success_service") from None
            self.keys.KEYS = keys  # this reader's keys only; KeyConfirm's default is Enter, space or y
            atexit.register(self.keys.restore)  # the terminal leaves cbreak mode even if close() is never reached
        if service:
            from std_srvs.srv import Trigger
            self.service = node.create_service(Trigger, service, self._on_call, callback_group=callback_group)
        ways = [f"key {key!r} on {self.keys.name.removeprefix('key on ')}"] if self.keys is not None else []
        if self.service is not None:
            ways.append(f"ros2 service call {self.service.srv_name} std_srvs/srv/Trigger")
        self.how = " or ".join(ways)
        if node is not None:
            node.get_logger().info(f"reward_source operator: mark success with {self.how}")

    def _on_call(self, request, response):
        with self._lock:
            self._called = True
        response.success, response.message = True, "success marked for the current step"
        return response

    def _take(self) -> bool:
        """Whether a press or call arrived since the last take; clears it."""
        with self._lock:
            called, self._called = self._called, False
        pressed = self.keys.poll() if self.keys is not None else False  # read even when called: drains the tty
        return called or pressed

    def score(self, obs, arm) -> tuple[float, bool]:
        success = self._take()
        return float(success), success

    def reset(self) -> None:
        """Forget a press or call made between episodes (during the reset), so it marks no step of the next."""
        self._take()

    def close(self) -> None:
        if self.keys is not None:
            self.keys.restore()
            atexit.unregister(self.keys.restore)
        if self.service is not None:
            self.node.destroy_service(self.service)
            self.service = None


def make_reward(node, p: dict, env, callback_group=None) -> RewardSource:
    """The reward source parameter reward_source names (agent_node validates the name first); configure-time
    checks raise a one-line ValueError naming the parameter."""
    source = p["reward_source"]
    if source in ("task", "rlif"):  # rlif: the task's success ends episodes; agent_node sets the rewards
        return TaskReward(env)
    if source == "classifier":
        return ClassifierReward(p["reward_classifier"], env.observation_space)
    if source == "operator":
        if p["success_key"] and p.get("teleop_device") == "keyboard":
            raise ValueError("parameter success_key: the keyboard teleop device reads this terminal; set "
                             "success_key '' and mark success with success_service")
        return OperatorReward(node, p["success_key"], p["success_service"], callback_group)
    raise ValueError(f"parameter reward_source: {source!r} is not task, rlif, classifier or operator")
