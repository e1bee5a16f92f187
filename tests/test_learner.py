"""The learner without ROS: payloads, ingest, updates, weights, checkpoints, and what a kill -9 may cost."""

import json

import numpy as np
import pytest
import torch

from robolearn import payload
from robolearn.learner import Learner, LearnerConfig
from robolearn.rollout import make_env

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = "robolearn/PandaReach-v0"
SMALL = {"hidden_dims": [32, 32], "num_critics": 2, "batch_size": 16, "utd_ratio": 1}


@pytest.fixture(scope="module")
def episodes():
    return reach_episodes()


def reach_episodes():
    """(spec, episodes): three real 12-step PandaReach episodes (random actions) as the actor would send them."""
    env = make_env(ENV, max_episode_steps=12)
    spec = payload.env_spec(env, "serl")
    rng, out = np.random.default_rng(0), []
    for i in range(3):
        obs, _ = env.reset(seed=i)
        ep = {"obs": [obs], "action": [], "reward": [], "terminated": [], "truncated": []}
        done = False
        while not done:
            a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            obs, r, term, trunc, _ = env.step(a)
            for k, v in (("action", a), ("reward", r), ("terminated", term), ("truncated", trunc)):
                ep[k].append(v)
            ep["obs"].append(obs)
            done = term or trunc
        ep["obs"] = {k: np.stack([o[k] for o in ep["obs"]]) for k in ep["obs"][0]}
        out.append(ep)
    env.close()
    return spec, out


def packed(spec, episodes, i, actor="/agent", **meta):
    return payload.pack_episode(episodes[i], spec, {"actor": actor, "index": i, "success": False, **meta})


def make(tmp_path, **kw):
    cfg = LearnerConfig(agent="serl", out=str(tmp_path / "run"), frames=1000, agent_overrides=dict(SMALL),
                        seed_steps=0, **kw)
    return Learner(cfg, log=lambda *_: None)


def test_episode_payload_round_trips_and_names_what_is_wrong(episodes):
    spec, eps = episodes
    data = packed(spec, eps, 0)
    ep, theirs, meta = payload.unpack_episode(data, spec)
    assert theirs == spec and meta["index"] == 0
    for k, v in eps[0]["obs"].items():
        np.testing.assert_array_equal(ep["obs"][k], v)
    np.testing.assert_array_equal(ep["action"], np.asarray(eps[0]["action"], np.float32))
    other = json.loads(json.dumps(spec))
    other["observation_space"]["state"]["shape"] = [99]
    with pytest.raises(payload.PayloadError, match=r"observation_space\['state'\]"):
        payload.unpack_episode(data, other)
    with pytest.raises(payload.PayloadError, match="weights.*episode|'episode' payload where a 'weights'"):
        payload.unpack_weights(data)
    with pytest.raises(payload.PayloadError, match="not a safetensors payload"):
        payload.unpack_episode(b"\x05" * 40)
    bad = dict(eps[0], action=np.full_like(np.asarray(eps[0]["action"]), np.nan))
    with pytest.raises(payload.PayloadError, match="action is not finite"):
        payload.unpack_episode(payload.pack_episode(bad, spec, {"actor": "a", "index": 0}), spec)
    short = dict(eps[0], reward=np.zeros(3))
    with pytest.raises(payload.PayloadError, match=r"reward has shape \[3\]"):
        payload.unpack_episode(payload.pack_episode(short, spec, {"actor": "a", "index": 0}), spec)


def test_learner_trains_publishes_and_refuses_another_robot(tmp_path, episodes):
    spec, eps = episodes
    learner = make(tmp_path)
    assert learner.agent is None and learner.owed() == 0 and learner.behind() == 0
    meta, new = learner.ingest(packed(spec, eps, 0))
    assert new and meta["index"] == 0 and learner.env_steps == 12
    assert learner.ingest(packed(spec, eps, 0)) == (meta, False)  # a resent episode is stored once
    assert learner.env_steps == 12
    before = {k: v.clone() for k, v in learner.agent.state_dict().items()}
    n = learner.owed()
    assert n == 12 and learner.behind() == 12  # SERL: one update call per env step
    for _ in range(n - 5):
        metrics = learner.update()
    assert learner.behind() == 5 and payload.unpack_weights(learner.weights(), spec)[2]["behind"] == 5
    for _ in range(5):
        metrics = learner.update()
    assert all(np.isfinite(v) for v in metrics.values())
    changed = [k for k, v in learner.agent.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("actor") for k in changed) and any(k.startswith("critic") for k in changed)
    state, theirs, wmeta = payload.unpack_weights(learner.weights(), spec)
    assert wmeta["version"] == 2 and wmeta["behind"] == 0 and wmeta["config"] == json.loads(json.dumps(learner.agent.config_dict()))
    full = learner.agent.state_dict()
    assert sorted(state) == sorted(k for k in full if not k.startswith(("optim/", "rng/")))
    assert all(torch.equal(state[k], full[k]) for k in state)
    other = json.loads(json.dumps(spec))
    other["action_shape"] = [7]
    ep = dict(eps[1], action=np.zeros((12, 7), np.float32))
    with pytest.raises(payload.PayloadError, match=r"action_shape: ours \[3\], theirs \[7\]"):
        learner.ingest(payload.pack_episode(ep, other, {"actor": "/agent", "index": 1}))
    wrong_agent = dict(spec, agent="drqv2")
    fresh = make(tmp_path / "other")
    with pytest.raises(payload.PayloadError, match="agent 'drqv2'; this learner trains 'serl'"):
        fresh.ingest(payload.pack_episode(eps[1], wrong_agent, {"actor": "/agent", "index": 1}))


def test_several_actors_feed_one_learner_each_episode_once(tmp_path, episodes):
    """Two arms (actors /left and /right) number their episodes from 0: both are stored, each resend is not, and a
    restarted actor (a new run) counts again; after a restart the learner still tells them apart."""
    spec, eps = episodes
    learner = make(tmp_path)
    assert learner.ingest(packed(spec, eps, 0, actor="/left"))[1] and learner.ingest(packed(spec, eps, 0, actor="/right"))[1]
    assert not learner.ingest(packed(spec, eps, 0, actor="/left"))[1] and not learner.ingest(packed(spec, eps, 0, actor="/right"))[1]
    assert learner.ingest(packed(spec, eps, 0, actor="/left", run=1))[1]  # /left restarted: its index 0 again
    assert learner.env_steps == 36 and learner.replay.num_episodes == 3
    assert learner.ingested == {"/left/0/0", "/right/0/0", "/left/1/0"}
    learner.save()
    del learner
    again = make(tmp_path)
    assert again.ingested == {"/left/0/0", "/right/0/0", "/left/1/0"} and again.env_steps == 36
    assert not again.ingest(packed(spec, eps, 0, actor="/right"))[1] and again.ingest(packed(spec, eps, 1, actor="/right"))[1]


def test_restart_resumes_from_checkpoint_and_reads_the_inbox(tmp_path, episodes):
    """An episode acknowledged after the last checkpoint is not lost to a kill: its inbox file is read again."""
    spec, eps = episodes
    learner = make(tmp_path)
    learner.ingest(packed(spec, eps, 0))
    for _ in range(learner.owed()):
        learner.update()
    learner.save()
    assert len(list(learner.inbox.glob("*.safetensors"))) == 1  # kept until the older of two checkpoints has it
    learner.save()
    assert not list(learner.inbox.glob("*.safetensors"))  # both kept checkpoints hold it now
    weights = {k: v.clone() for k, v in learner.agent.state_dict().items()}
    learner.ingest(packed(spec, eps, 1, eval=True, success=True))  # then a "kill -9": no save
    assert len(list(learner.inbox.glob("*.safetensors"))) == 1
    del learner
    again = make(tmp_path)
    assert again.resumed_from is not None and again.updates == 12
    assert again.env_steps == 24 and again.ingested == {"/agent/0/0", "/agent/0/1"}
    assert again.replay.size == 24 + 2 and again.replay.num_episodes == 2  # both episodes, observations included
    assert again.history["eval"][-1][2] is True
    assert all(torch.equal(again.agent.state_dict()[k], v) for k, v in weights.items())
    assert again.owed() == 12
    assert again.ingest(packed(spec, eps, 1))[1] is False  # the actor's resend after the restart


def test_intervened_steps_also_go_to_the_demo_buffer(tmp_path, episodes):
    """HIL-SERL: a human's corrections are demonstrations too (with demos given, the replay is mixed)."""
    from robolearn.demos.dataset import DatasetWriter
    from robolearn.rollout import run_episodes, scripted_policy

    spec, eps = episodes
    env = make_env(ENV, max_episode_steps=12)
    with DatasetWriter(tmp_path / "demos", ENV, env.observation_space, env.action_space, fps=10) as writer:
        run_episodes(env, scripted_policy(env), 2, seed=10_000, recorder=writer)
    env.close()
    learner = make(tmp_path, demos=str(tmp_path / "demos"))
    learner.ingest(packed(spec, eps, 0))  # no intervention: online only
    demo_before = len(learner.replay.demo)
    assert demo_before > 0 and len(learner.replay.online) == 12
    ep = dict(eps[2], intervention=np.arange(12) >= 8)  # the operator took the last 4 steps
    learner.ingest(payload.pack_episode(ep, spec, {"actor": "/agent", "index": 2}))
    assert len(learner.replay.online) == 24
    assert len(learner.replay.demo) == demo_before + 4
    assert learner.update()  # batches mix both


def test_a_learner_killed_before_its_first_checkpoint_reads_its_inbox(tmp_path, episodes):
    spec, eps = episodes
    learner = make(tmp_path)
    learner.ingest(packed(spec, eps, 0))
    learner.ingest(packed(spec, eps, 1, run=7))  # a restarted actor's index 1 ...
    learner.ingest(packed(spec, eps, 1))  # ... and the first run's: three episodes
    del learner  # no save: a kill before checkpoint_every_s
    (tmp_path / "run" / "inbox" / "poison.safetensors").write_bytes(b"\x00" * 64)
    again = make(tmp_path)
    assert again.resumed_from is None and again.env_steps == 36 and len(again.ingested) == 3
    assert again.ingested == {"/agent/0/0", "/agent/7/1", "/agent/0/1"}
    assert (tmp_path / "run" / "inbox" / "poison.bad").exists()  # set aside, named in the log, not a crash loop


def test_episodes_ended_early_or_with_bad_metadata_are_refused_before_storing(tmp_path, episodes):
    spec, eps = episodes
    learner = make(tmp_path)
    early = dict(eps[0], truncated=np.arange(12) == 3)
    with pytest.raises(payload.PayloadError, match="truncated at step 3 of 12; only the last step"):
        learner.ingest(payload.pack_episode(early, spec, {"actor": "/agent", "index": 0}))
    with pytest.raises(payload.PayloadError, match="metadata needs actor and an integer index"):
        learner.ingest(payload.pack_episode(eps[0], spec, {"actor": "/agent", "index": "x"}))
    broken = {k: v for k, v in spec.items() if k != "action_shape"}
    with pytest.raises(payload.PayloadError, match="damaged metadata"):
        learner.ingest(payload.pack_episode(eps[0], broken, {"actor": "/agent", "index": 0}))
    assert learner.agent is None and not list(learner.inbox.iterdir())  # nothing stored, nothing built


def test_a_learner_starts_from_a_checkpoint(tmp_path, episodes):
    """learner_node checkpoint:= : the actor's starting weights are the learner's too, not overwritten at v1."""
    spec, eps = episodes
    first = make(tmp_path / "a")
    first.ingest(packed(spec, eps, 0))
    for _ in range(first.owed()):
        first.update()
    ckpt = first.save()
    cfg = LearnerConfig(agent="serl", out=str(tmp_path / "b"), frames=1000, seed_steps=0, init_checkpoint=str(ckpt))
    second = Learner(cfg, log=lambda *_: None)
    second.ingest(packed(spec, eps, 0))
    a, b = first.agent.state_dict(), second.agent.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("actor", "critic")))
    with pytest.raises(ValueError, match="holds a 'serl' agent; this learner trains 'drqv2'"):
        LearnerConfig(agent="drqv2", out=str(tmp_path / "c"), init_checkpoint=str(ckpt)).check()
