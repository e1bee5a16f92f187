"""Reward sources of the actor: classifier files (round trip, refusals), `robolearn classifier train` on datasets
the recorder wrote, the classifier source on simulator observations, and the operator's success over a real
Trigger service and from a key in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces

from robolearn import cli
from robolearn.agents.serl import ClassifierConfig, RewardClassifier, load_classifier, save_classifier
from robolearn.demos.dataset import Dataset
from robolearn.ros.rewards import TaskReward, make_reward

pytestmark = pytest.mark.usefixtures("one_thread")

ENV, SIZE = "robolearn/PandaReachPixels-v0", 32
# Label mode: Enter starts, y/n switch the label, Enter stops; 10 labelled-success steps per episode.
LABEL_KEYS = "<enter>wwwwwwwwwwy.........n..<enter>"
# Teleop mode (no per-step labels on a robot): y ends an episode as a success, n as a failure.
TELEOP_KEYS = "<enter>wwwwwwwwwwwwy<enter>ssssssssn"


def space(size: int = SIZE, wrist: bool = True) -> spaces.Dict:
    cams = {"images/front": spaces.Box(0, 255, (size, size, 3), np.uint8)}
    if wrist:
        cams["images/wrist"] = spaces.Box(0, 255, (size, size, 3), np.uint8)
    return spaces.Dict({**cams, "tcp_pose": spaces.Box(-np.inf, np.inf, (7,), np.float32)})


def frames(n: int, seed: int, size: int = SIZE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images/front": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "images/wrist": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "tcp_pose": rng.normal(size=(n, 7)).astype(np.float32)}


def record(out: Path, keys: str, episodes: int, label: bool) -> Path:
    argv = ["record", "--env", ENV, "--teleop", "scripted", "--teleop-set", f"keys='{keys * episodes}'", "--out",
            str(out), "--episodes", str(episodes), "--unpaced", "--env-set", f"image_size={SIZE}"]
    assert cli.main(argv + (["--label"] if label else [])) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Five label-mode episodes recorded by `robolearn record`, and a classifier trained on them by the CLI."""
    root = tmp_path_factory.mktemp("classifier")
    ds = record(root / "labelled", LABEL_KEYS, 5, label=True)
    out = root / "clf"
    argv = ["classifier", "train", "--demos", str(ds), "--out", str(out), "--epochs", "2"]
    assert cli.main(argv) == 0
    return ds, out


# -- files -------------------------------------------------------------------------------------

def test_a_saved_classifier_loads_with_the_same_predictions_and_its_own_frozen_encoder(tmp_path):
    from safetensors.torch import save_file

    from robolearn.agents.encoders import FrozenEncoder

    clf = RewardClassifier(space(), ClassifierConfig(proprio_keys=("tcp_pose",), batch_size=16), device="cpu")
    clf.train_classifier(frames(8, 0), frames(8, 1), epochs=1)
    folder = save_classifier(clf, tmp_path / "clf", space(), metrics={"train_accuracy": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["config"]["image_keys"] == ["images/front", "images/wrist"]  # resolved from None
    assert meta["observation"]["images/front"] == {"shape": [SIZE, SIZE, 3], "dtype": "uint8"}
    assert meta["observation"]["tcp_pose"] == {"shape": [7], "dtype": "float32"} and meta["metrics"]
    batch = frames(6, 2)
    loaded = load_classifier(folder, space(), device="cpu")
    np.testing.assert_array_equal(loaded.predict(batch), clf.predict(batch))
    one = {k: v[0] for k, v in batch.items()}
    assert loaded.reward(one) == clf.reward(one) and isinstance(loaded.predict(one), float)
    again = save_classifier(loaded, tmp_path / "again")  # a loaded classifier knows its space
    np.testing.assert_array_equal(load_classifier(again).predict(batch), clf.predict(batch))

    # A frozen encoder travels in the folder: the robot needs neither the original file nor its path.
    enc_file = tmp_path / "drq.safetensors"
    save_file(FrozenEncoder("drq").net.state_dict(), str(enc_file))
    frozen = RewardClassifier(space(wrist=False), ClassifierConfig(frozen_encoder=str(enc_file), frozen_arch="drq"),
                              device="cpu")
    folder = save_classifier(frozen, tmp_path / "frozen", space(wrist=False))
    enc_file.unlink()
    assert json.loads((folder / "config.json").read_text())["config"]["frozen_encoder"] == "frozen_encoder.safetensors"
    np.testing.assert_array_equal(load_classifier(folder, device="cpu").predict(batch), frozen.predict(batch))


def test_damaged_files_unknown_fields_and_other_observations_are_refused_in_one_line(tmp_path):
    clf = RewardClassifier(space(), ClassifierConfig(proprio_keys=("tcp_pose",)), device="cpu")
    good = save_classifier(clf, tmp_path / "good", space())

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def edit_config(fn):
        def change(folder):
            meta = json.loads((folder / "config.json").read_text())
            fn(meta)
            (folder / "config.json").write_text(json.dumps(meta))
        return change

    def flip_byte(folder):
        data = bytearray((folder / "weights.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (folder / "weights.safetensors").write_bytes(bytes(data))

    cases = [
        (tmp_path / "absent", None, r"absent: no such folder"),
        (broken("no_config", lambda f: (f / "config.json").unlink()), None, r"config.json: missing; .* is not a reward"),
        (broken("garbage", lambda f: (f / "config.json").write_text("{nope")), None, r"config.json: damaged"),
        (broken("format", edit_config(lambda m: m.update(format="other/9"))), None, r"field format is 'other/9'"),
        (broken("field", edit_config(lambda m: m["config"].update(colour="red"))), None,
         r"config.json: field config.colour is not a ClassifierConfig field"),
        (broken("spec", edit_config(lambda m: m["observation"]["tcp_pose"].pop("shape"))), None,
         r"config.json: field observation.tcp_pose is malformed"),
        (broken("flipped", flip_byte), None, r"weights.safetensors: fails its checksum \(field sha256"),
        (broken("no_weights", lambda f: (f / "weights.safetensors").unlink()), None,
         r"weights.safetensors: missing or unreadable"),
        (good, space(wrist=False), r"config.json: observation key 'images/wrist' the classifier reads is not in"),
        (good, space(size=48), r"config.json: observation 'images/front' has shape \(32, 32, 3\) in the classifier "
                               r"but \(48, 48, 3\) in the observation space"),
    ]
    for folder, obs_space, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            load_classifier(folder, obs_space, device="cpu")
        assert "\n" not in str(err.value), str(err.value)
    # Extra keys in the env (another camera, state) are fine: the classifier reads its own.
    wide = spaces.Dict({**space().spaces, "state": spaces.Box(-np.inf, np.inf, (7,), np.float32)})
    assert load_classifier(good, wide, device="cpu").image_keys == ("images/front", "images/wrist")


# -- the command -------------------------------------------------------------------------------

def test_the_command_trains_on_the_recorders_labels_and_reports_held_out_accuracy(trained, capsys):
    ds_path, out = trained
    ds = Dataset(ds_path)
    assert [ds.episode_attrs(i)["mode"] for i in range(len(ds))] == ["label"] * 5
    train_pos = sum(int(ds.episode(i)["success"].sum()) for i in range(4))  # episode 4 is held out
    train_neg = sum(ds.lengths[:4]) - train_pos
    assert train_pos == 4 * 10
    meta = json.loads((out / "config.json").read_text())
    m = meta["metrics"]
    assert (m["train_success_frames"], m["train_failure_frames"]) == (train_pos, train_neg)
    assert m["label_sources"] == {"label": 5, "env": 0, "fallback": 0} and m["held_out_frames"] == ds.lengths[4]
    assert 0.0 <= m["train_accuracy"] <= 1.0 and 0.0 <= m["held_out_accuracy"] <= 1.0

    rc = cli.main(["classifier", "train", "--demos", str(ds_path), "--out", str(out.parent / "again"), "--epochs", "1",
                   "--image-keys", "images/front", "--proprio-keys", "tcp_pose", "--set", "threshold=0.75"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "5 episode(s) labelled per step" in text
    assert f"training on {train_pos} success and {train_neg} failure frames of 4 episode(s); 1 held out" in text
    assert re.search(r"train accuracy: [\d.]+%  held-out accuracy: [\d.]+% over \d+ frames of episodes \[4\]", text)
    again = load_classifier(out.parent / "again", device="cpu")
    assert again.image_keys == ("images/front",) and again.cfg.proprio_keys == ("tcp_pose",)
    assert again.cfg.threshold == 0.75


def test_an_episode_marked_successful_without_step_labels_lends_its_last_frames(tmp_path, capsys):
    ds_path = record(tmp_path / "teleop", TELEOP_KEYS, 2, label=False)
    ds = Dataset(ds_path)
    assert [ds.episode_attrs(i)["success"] for i in range(2)] == [True, False]
    assert not any(ds.episode(i)["success"].any() for i in range(2))  # the env never reported success
    capsys.readouterr()
    assert cli.main(["classifier", "train", "--demos", str(ds_path), "--out", str(tmp_path / "clf"),
                     "--epochs", "1", "--success-frames", "3"]) == 0
    text = capsys.readouterr().out
    assert "1 marked successful without per-step labels (their last 3 frames count as success" in text
    assert f"training on 3 success and {sum(ds.lengths) - 3} failure frames of 2 episode(s); 0 held out" in text

    failures = record(tmp_path / "failures", "<enter>wwwn", 1, label=False)
    for argv, msg in [
        (["--demos", str(failures)], r"no success frames to train on \(label frames with `robolearn record --label`\)"),
        (["--demos", str(ds_path), "--set", "colour=1"], r"--set colour: not a ClassifierConfig field"),
        (["--demos", str(ds_path), "--image-keys", "images/side"], r"observation key 'images/side' is not in"),
        (["--demos", str(tmp_path / "nothing")], r"not a robolearn dataset"),
    ]:
        assert cli.main(["classifier", "train", "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert re.search(msg, err) and "\n" not in err, err


# -- sources -----------------------------------------------------------------------------------

def test_the_classifier_source_scores_simulator_observations_and_refuses_another_camera(trained):
    import robolearn.sim as rsim

    _, out = trained
    env = rsim.make(ENV, image_size=SIZE)
    try:
        params = {"reward_source": "classifier", "reward_classifier": str(out)}
        source = make_reward(None, params, env.unwrapped)
        clf = load_classifier(out, device="cpu")
        obs, _ = env.reset(seed=3)
        for _ in range(3):
            reward, success = source.score(obs, env.unwrapped.arm)
            p = clf.predict(obs)
            assert source.probability == pytest.approx(p, abs=1e-6)
            assert (reward, success) == (float(p > clf.cfg.threshold), p > clf.cfg.threshold)
            assert type(reward) is float and type(success) is bool
            obs, *_ = env.step(env.action_space.sample())
        source.close()

        task = TaskReward(env.unwrapped)
        r, s = task.score(obs, env.unwrapped.arm)
        assert (r, s) == tuple(env.unwrapped.task.score(env.unwrapped.arm))
    finally:
        env.close()
    other = rsim.make(ENV, image_size=48)
    try:
        with pytest.raises(ValueError, match=r"^parameter reward_classifier: .*config.json: observation "
                                             r"'images/front' has shape \(32, 32, 3\) in the classifier but "
                                             r"\(48, 48, 3\)"):
            make_reward(None, params, other.unwrapped)
        with pytest.raises(ValueError, match="^parameter reward_classifier is empty"):
            make_reward(None, {**params, "reward_classifier": ""}, other.unwrapped)
    finally:
        other.close()


@pytest.fixture
def ros_nodes():
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    host = rclpy.create_node("agent", context=context)
    client_node = rclpy.create_node("operator", context=context)
    yield host, client_node
    host.destroy_node()
    client_node.destroy_node()
    rclpy.shutdown(context=context)


def test_the_operator_marks_success_through_the_trigger_service_over_dds(ros_nodes):
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    from robolearn.ros import common

    host, client_node = ros_nodes
    params = {"reward_source": "operator", "success_key": "", "success_service": "~/success"}
    source = make_reward(host, params, None)  # before the spin thread: the service exists when it starts
    executor = common.executor(context=host.context)
    executor.add_node(host)
    stop = threading.Event()
    spinner = threading.Thread(target=common.spin, args=(executor, stop, host.get_logger()), daemon=True)
    spinner.start()
    client = client_node.create_client(Trigger, "/agent/success")
    calls = SingleThreadedExecutor(context=client_node.context)
    calls.add_node(client_node)

    def call():
        future = client.call_async(Trigger.Request())
        calls.spin_until_future_complete(future, timeout_sec=10.0)
        assert future.done(), "no answer from /agent/success"
        return future.result()

    try:
        assert client.wait_for_service(timeout_sec=10.0)
        assert source.score({}, None) == (0.0, False)
        answer = call()
        assert answer.success and answer.message == "success marked for the current step"
        assert source.score({}, None) == (1.0, True)
        assert source.score({}, None) == (0.0, False)  # one call marks one step
        call()
        source.reset()  # a call during the reset marks no step of the next episode
        assert source.score({}, None) == (0.0, False)
    finally:
        source.close()
        stop.set()
        spinner.join(timeout=5)
        executor.shutdown()
    assert all(s.srv_name != "/agent/success" for s in host.services)  # close() took the service down

    cases = [({"success_key": "y"}, r"^parameter success_key 'y': this node's stdin is not a terminal: run it in ")]
    if sys.stdin is not None and sys.stdin.isatty():  # pytest -s in a terminal: a key reader would start
        cases = []
    for changes, msg in cases + [
        ({"success_key": "", "success_service": ""}, r"^parameters success_key and success_service are both empty"),
        ({"success_key": "ab"}, r"^parameter success_key: 'ab' is not one character, enter or space$"),
        ({"success_key": "y", "teleop_device": "keyboard"}, r"^parameter success_key: the keyboard teleop device"),
        ({"reward_source": "smell"}, r"^parameter reward_source: 'smell' is not task, rlif, classifier or operator$"),
    ]:
        with pytest.raises(ValueError, match=msg):
            make_reward(host, {**params, **changes}, None)


KEY_SCRIPT = """
import termios, time
from robolearn.ros.rewards import make_reward
source = make_reward(None, {"reward_source": "operator", "success_key": "y", "success_service": ""}, None)
def steps(seconds):
    hits, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        hits += source.score({}, None)[1]
        time.sleep(0.05)
    return hits
print("READY", flush=True)
print("OTHER-KEYS", steps(1.5), flush=True)
while not source.score({}, None)[1]:
    time.sleep(0.05)
print("SUCCESS", source.score({}, None), flush=True)
print("BEFORE-RESET", flush=True)
time.sleep(1.5)
source.reset()
print("AFTER-RESET", steps(0.3), flush=True)
source.close()
print("COOKED", bool(termios.tcgetattr(0)[3] & termios.ICANON), flush=True)
"""


def test_the_operator_marks_success_with_a_key_in_a_real_terminal(tmp_path, tmux):
    script = tmp_path / "key.py"
    script.write_text(KEY_SCRIPT)
    tmux.start(f"{sys.executable} {script}; echo EXIT=$?; sleep 30")
    tmux.wait_for("READY")
    tmux.send("x", "n", "Enter")  # other keys mark nothing
    tmux.wait_for("OTHER-KEYS")
    tmux.send("y")
    tmux.wait_for("BEFORE-RESET")
    tmux.send("Y")  # pressed between episodes: the reset forgets it
    screen = tmux.wait_for("EXIT=")
    assert "OTHER-KEYS 0" in screen, screen
    assert "SUCCESS (0.0, False)" in screen  # one press, one step
    assert "AFTER-RESET 0" in screen and "COOKED True" in screen and "EXIT=0" in screen, screen
