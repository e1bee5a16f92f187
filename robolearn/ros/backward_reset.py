"""A learned reset trained alongside the forward task (SERL's forward-backward setup), over ROS 2.

Between two forward episodes, the backward agent acts for up to `max_steps` to undo the task; its episode is
recorded and sent to a second learner_node (in the reset's `namespace`, e.g. backward/learner/...), whose weights
it then acts with, so both policies train from the same robot time. The backward reward comes from the
backward task's topics (`reset_task/reward`, `reset_task/success`: the simulator publishes them for a task with a
`reset_score`) or from a reward classifier. When the backward agent does not succeed, the fallback reset runs.
docs/resets.md ("learned") and docs/actor_learner.md.
"""

from __future__ import annotations

import numpy as np

from robolearn.ros import common
from robolearn.ros.ros_backend import RosTask, wait_until


class BackwardReset:
    """ResetHandler; `attach(env)` once the robot env exists (it acts through the env's observe/apply)."""

    def __init__(self, node, cfg, fallback, p: dict, where: str, group=None, after=None):
        self.node, self.cfg, self.fallback, self.p, self.where, self.group = node, cfg, fallback, p, where, group
        self.after = after  # run after a successful backward episode (`then`): e.g. the arm home
        self.env = self.link = self.policy = self.task = self.classifier = None
        self.index = 0

    def attach(self, env) -> None:
        """Build the backward agent's link and reward source against `env`; one-line errors name the field."""
        from robolearn.payload import env_spec
        from robolearn.ros.actor import LearnerLink, RemotePolicy

        cfg, p = self.cfg, self.p
        agent = None
        if cfg.checkpoint:
            from robolearn.train import load_agent
            agent, config = load_agent(cfg.checkpoint, env)
            if config.get("agent") != cfg.agent:
                raise ValueError(f"{self.where}.checkpoint {cfg.checkpoint} holds a {config.get('agent')!r} agent; "
                                 f"{self.where}.agent is {cfg.agent!r}")
        self.env = env
        self.policy = RemotePolicy(env, p["seed"] + 1, agent, agent.config_dict() if agent else None)
        if cfg.reward == "task":
            age = p["max_obs_age"] or 2.0 / env.cfg.control_hz
            self.task = RosTask(self.node, env.task.uses_gripper, age, p["object_state_topic"], common.RESET_REWARD,
                                common.RESET_SUCCESS, callback_group=self.group)
            if not wait_until(self.node, lambda: common.RESET_SUCCESS in self.task._newest, p["startup_timeout"]):
                topic = self.node.resolve_topic_name(common.RESET_SUCCESS)
                raise TimeoutError(f"{self.where}.reward task: nothing on {topic} within {p['startup_timeout']:g} s "
                                   "(the simulator publishes it for a task with a backward task; on a robot use "
                                   "reward: classifier)")
        else:
            from robolearn.ros.rewards import ClassifierReward
            self.classifier = ClassifierReward(cfg.classifier, env.observation_space)
        ns = cfg.namespace.strip("/")
        self.link = LearnerLink(self.node, (p["actor_id"] or self.node.get_fully_qualified_name()) + "/backward",
                                env_spec(env, cfg.agent), self.policy.on_weights, f"{ns}/{common.EPISODES}",
                                f"{ns}/{common.WEIGHTS}", f"{ns}/{common.ACKS}", p["resend_s"], p["max_unacked_mb"],
                                self.group)

    def _score(self, obs) -> tuple[float, bool]:
        if self.classifier is not None:
            return self.classifier.score(obs, self.env.arm)
        return self.task.score(self.env.arm)

    def reset(self, rng: np.random.Generator) -> dict:
        from robolearn.ros.actor import EpisodeRecorder

        env, cfg = self.env, self.cfg
        self.policy.reset()
        obs, rec, ret, success, steps = env.observe(), EpisodeRecorder(), 0.0, False, 0
        rec.observe(obs)
        while steps < cfg.max_steps and not success:
            action = self.policy.act(obs, explore=cfg.explore)
            env.apply(action)
            env.arm.wait()
            obs = env.observe()
            reward, success = self._score(obs)
            steps += 1
            rec.act(action)
            rec.observe(obs, reward, terminated=success, truncated=steps >= cfg.max_steps and not success)
            ret += reward
        self.link.send(self.index, rec.finish(), {"success": success, "eval": False, "final": True,
                                                  "episode": self.index, "return": ret, "version": self.link.version,
                                                  "interventions": 0})
        self.index += 1
        info = {"reset": "learned", "steps": steps, "backward_success": success, "backward_return": round(ret, 3)}
        if not success:
            info["fallback"] = self.fallback.reset(rng)
        elif self.after is not None:
            info["then"] = self.after.reset(rng)
        return info

    def close(self) -> None:
        for part in (self.link, self.task):
            if part is not None:
                part.close()
