"""Export/import of robomimic, LeRobot v3 and MCAP (rosbag2) with real files read by real readers,
and the `robolearn demos` commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

import robolearn.sim as rsim
from robolearn.cli import main as cli_main
from robolearn.demos.convert import export_dataset, import_dataset
from robolearn.demos.dataset import Dataset, DatasetError, DatasetWriter, robot_state, write_expert_episodes
from robolearn.demos.lerobot_format import VIDEO_MAE_BOUND

ENV_ID = "robolearn/PandaPickCubePixels-v0"
SIZE = 32
STEP_KEYS = ("action", "reward", "terminated", "truncated", "success", "intervention", "timestamp")
FORMATS = ("robomimic", "lerobot", "mcap")
PANDA_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Dataset:
    """Two scripted episodes plus a random one with interventions, a time limit, its own clock and attrs."""
    path = tmp_path_factory.mktemp("formats") / "src"
    env = rsim.make(ENV_ID, image_size=SIZE)
    write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), path, 2)
    env.close()
    env = rsim.make(ENV_ID, image_size=SIZE, max_episode_steps=7)
    rng = np.random.default_rng(0)
    with DatasetWriter(path, ENV_ID, env.observation_space, env.action_space, fps=10) as w:
        obs, _ = env.reset(seed=5)
        w.begin_episode(obs, robot=robot_state(env), seed=5, operator="test")
        for t in range(7):
            obs, r, term, trunc, info = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
            w.add_step(rng.uniform(-1, 1, 4), obs, r, term, trunc, info["success"], intervention=t % 3 == 1,
                       timestamp=0.1 * t + rng.uniform(0, 0.01), robot=robot_state(env))
        w.end_episode()
    env.close()
    ds = Dataset(path)
    assert len(ds) == 3 and ds.episode(2)["truncated"][-1] and ds.episode(2)["intervention"].any()
    assert ds.joint_names == PANDA_JOINTS and all("robot" in ep for ep in ds)
    return ds


def export_path(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("demos.hdf5" if fmt == "robomimic" else f"demos_{fmt}")


def image_mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_preserves_every_array(src, tmp_path, fmt):
    out, n = export_dataset(src.path, fmt, export_path(tmp_path, fmt))
    assert n == 3 and out.exists()
    back, m = import_dataset(out, fmt, tmp_path / "back")
    assert m == 3 and len(back) == 3
    # Only MCAP carries the robot state (/joint_states, /tool_pose); robomimic and LeRobot drop it.
    dropped = {"created"} if fmt == "mcap" else {"created", "robot_state"}
    strip = lambda meta: {k: v for k, v in meta.items() if k not in dropped}
    assert strip(back.meta) == strip(src.meta)
    for i in range(3):
        a, b = src.episode(i), back.episode(i)
        if fmt == "mcap":
            assert set(b["robot"]) == set(a["robot"])
            for key, value in a["robot"].items():
                assert b["robot"][key].dtype == value.dtype, key
                np.testing.assert_array_equal(b["robot"][key], value, err_msg=key)
        else:
            assert "robot" not in b
        assert back.episode_attrs(i) == src.episode_attrs(i)  # seed, operator, success, length
        for key, value in a["obs"].items():
            assert b["obs"][key].dtype == value.dtype and b["obs"][key].shape == value.shape, key
            if fmt == "lerobot" and key.startswith("images/"):  # H.264: within the stated bound
                assert image_mae(b["obs"][key], value) <= VIDEO_MAE_BOUND, key
            else:
                np.testing.assert_array_equal(b["obs"][key], value, err_msg=key)
        for key in STEP_KEYS:
            assert b[key].dtype == a[key].dtype, key
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.filterwarnings("ignore:module 'sre_:DeprecationWarning")  # lark, under mcap_ros2's parser
def test_mcap_read_by_independent_readers(src, tmp_path):
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory
    from rosbags.rosbag2 import Reader

    out, _ = export_dataset(src.path, "mcap", tmp_path / "bag")
    assert sorted(p.name for p in out.iterdir()) == ["bag.mcap", "metadata.yaml"]
    eps = [src.episode(i) for i in range(3)]
    T = [len(e["action"]) for e in eps]
    expected_types = {"/robolearn/observation": "sensor_msgs/msg/JointState",
                      "/joint_states": "sensor_msgs/msg/JointState", "/tool_pose": "geometry_msgs/msg/PoseStamped",
                      "/robolearn/robot": "std_msgs/msg/Float64MultiArray",
                      "/front/image_raw": "sensor_msgs/msg/Image", "/wrist/image_raw": "sensor_msgs/msg/Image",
                      "/robolearn/action": "std_msgs/msg/Float64MultiArray",
                      "/robolearn/step": "std_msgs/msg/Float64MultiArray",
                      "/robolearn/episode": "std_msgs/msg/String", "/robolearn/dataset": "std_msgs/msg/String"}
    per_frame = ("/robolearn/observation", "/joint_states", "/tool_pose", "/robolearn/robot", "/front/image_raw",
                 "/wrist/image_raw")
    expected_counts = {**{t: sum(T) + 3 for t in per_frame},  # T+1 per episode
                       "/robolearn/action": sum(T), "/robolearn/step": sum(T), "/robolearn/episode": 3,
                       "/robolearn/dataset": 1}

    # 1. The mcap library with its ROS 2 decoder (its own CDR parser and ros2msg schema parser).
    with open(out / "bag.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        channels = {c.topic: c for c in summary.channels.values()}
        assert {t: summary.schemas[c.schema_id].name for t, c in channels.items()} \
            == expected_types
        assert all(c.message_encoding == "cdr" and summary.schemas[c.schema_id].encoding == "ros2msg"
                   for c in channels.values())
        got = {t: [] for t in expected_types}
        for _, channel, message, msg in reader.iter_decoded_messages(log_time_order=True):
            got[channel.topic].append((message.log_time, msg))
    assert {t: len(v) for t, v in got.items()} == expected_counts
    names = [f"state/{i}" for i in range(7)] + [f"tcp_pose/{i}" for i in range(7)]
    first = got["/robolearn/observation"][0][1]
    assert list(first.name) == names and first.header.stamp.sec > 0
    flat = np.array([m.position for _, m in got["/robolearn/observation"]])
    recorded = np.concatenate([np.concatenate([e["obs"]["state"], e["obs"]["tcp_pose"]], 1) for e in eps])
    np.testing.assert_array_equal(flat, recorded.astype(np.float64))

    # The robot state, as robot_state_publisher and RViz take it.
    robot = {k: np.concatenate([e["robot"][k] for e in eps]) for k in eps[0]["robot"]}
    joint_states = [m for _, m in got["/joint_states"]]
    assert all(list(m.name) == PANDA_JOINTS for m in joint_states)
    np.testing.assert_array_equal([m.position for m in joint_states], robot["joint_position"])
    np.testing.assert_array_equal([m.velocity for m in joint_states], robot["joint_velocity"])
    stamp_ns = lambda m: m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
    assert [stamp_ns(m) for _, m in got["/joint_states"]] == [t for t, _ in got["/joint_states"]] \
        == [t for t, _ in got["/front/image_raw"]]  # header stamp = log time = the observation's time
    poses = [m for _, m in got["/tool_pose"]]
    assert {m.header.frame_id for m in poses} == {"base"}
    np.testing.assert_array_equal([[m.pose.position.x, m.pose.position.y, m.pose.position.z] for m in poses],
                                  robot["tool_pose"][:, :3])
    quat = np.array([[m.pose.orientation.x, m.pose.orientation.y, m.pose.orientation.z, m.pose.orientation.w]
                     for m in poses])
    np.testing.assert_array_equal(quat, robot["tool_pose"][:, [4, 5, 6, 3]])  # ours (w, x, y, z) -> ROS (x, y, z, w)
    # the known value: the Panda tasks hold the tool pointing down, (w, x, y, z) = (0, 1, 0, 0), i.e. ROS x = 1
    assert np.abs(quat[0] - [1.0, 0.0, 0.0, 0.0]).max() < 0.05
    extra = got["/robolearn/robot"]
    assert extra[0][1].layout.dim[0].label == "gripper,stamp"
    np.testing.assert_array_equal([m.data for _, m in extra], np.stack([robot["gripper"], robot["stamp"]], 1))
    for cam in ("front", "wrist"):
        imgs = got[f"/{cam}/image_raw"]
        assert {(m.encoding, m.height, m.width, m.step) for _, m in imgs} == {("rgb8", SIZE, SIZE, 3 * SIZE)}
        frames = np.stack([np.frombuffer(bytes(m.data), np.uint8).reshape(SIZE, SIZE, 3) for _, m in imgs])
        np.testing.assert_array_equal(frames, np.concatenate([e["obs"][f"images/{cam}"] for e in eps]))
    actions = np.array([m.data for _, m in got["/robolearn/action"]])
    np.testing.assert_array_equal(actions.astype(np.float32), np.concatenate([e["action"] for e in eps]))
    step = np.array([m.data for _, m in got["/robolearn/step"]])
    assert got["/robolearn/step"][0][1].layout.dim[0].label.split(",") == ["reward", "terminated", "truncated",
                                                                           "success", "intervention", "timestamp"]
    for col, key in enumerate(["reward", "terminated", "truncated", "success", "intervention", "timestamp"]):
        np.testing.assert_array_equal(step[:, col], np.concatenate([e[key] for e in eps]).astype(np.float64))
    markers = [json.loads(m.data) for _, m in got["/robolearn/episode"]]
    assert [m["length"] for m in markers] == T and markers[2]["attrs"]["operator"] == "test"
    # an image's log time is the observation's time: t / fps after its episode's start
    starts = [t for t, _ in got["/robolearn/episode"]]
    assert (got["/front/image_raw"][T[0]][0] - starts[0]) == T[0] * 100_000_000

    # 2. rosbags reading the rosbag2 directory through metadata.yaml, as `ros2 bag` does.
    with Reader(out) as bag:
        assert bag.message_count == sum(expected_counts.values())
        assert {c.topic: c.msgtype for c in bag.connections} == expected_types
        assert Counter(c.topic for c, _, _ in bag.messages()) == expected_counts

    # 3. ROS 2's own C type support (rclpy), when the `ros` extra is installed.
    try:
        from geometry_msgs.msg import PoseStamped
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Float64MultiArray
    except ImportError:
        return
    types = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/JointState": JointState,
             "std_msgs/msg/Float64MultiArray": Float64MultiArray, "geometry_msgs/msg/PoseStamped": PoseStamped}
    with Reader(out) as bag:
        seen = {}
        for conn, _, raw in bag.messages():
            if conn.msgtype in types and conn.topic not in seen:
                seen[conn.topic] = deserialize_message(bytes(raw), types[conn.msgtype])
    np.testing.assert_array_equal(np.frombuffer(bytes(seen["/front/image_raw"].data), np.uint8),
                                  eps[0]["obs"]["images/front"][0].reshape(-1))
    np.testing.assert_array_equal(seen["/robolearn/observation"].position, recorded[0])
    assert list(seen["/joint_states"].name) == PANDA_JOINTS
    np.testing.assert_array_equal(seen["/joint_states"].position, eps[0]["robot"]["joint_position"][0])
    q = seen["/tool_pose"].pose.orientation
    np.testing.assert_array_equal([q.x, q.y, q.z, q.w], eps[0]["robot"]["tool_pose"][0, [4, 5, 6, 3]])
    np.testing.assert_array_equal(np.array(seen["/robolearn/action"].data, np.float32), eps[0]["action"][0])


def test_lerobot_layout_read_with_pyarrow_and_opencv(src, tmp_path):
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, _ = export_dataset(src.path, "lerobot", tmp_path / "lerobot")
    eps = [src.episode(i) for i in range(3)]
    frames = [len(e["action"]) + 1 for e in eps]  # T+1 frames: the last holds the final observation
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "panda"
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(frames) and info["total_tasks"] == 1
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["chunks_size"] == 1000 and info["splits"] == {"train": "0:3"}
    feats = info["features"]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [7], "names": [f"state_{i}" for i in range(7)]}
    assert feats["action"]["dtype"] == "float32" and feats["action"]["shape"] == [4]
    cam = feats["observation.images.front"]
    assert cam["dtype"] == "video" and cam["shape"] == [SIZE, SIZE, 3]
    assert cam["names"] == ["height", "width", "channels"] and cam["info"]["video.codec"] == "h264"
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index", "next.reward", "next.done"):
        assert feats[name]["shape"] == [1], name

    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert set(data.column_names) == {k for k, f in feats.items() if f["dtype"] != "video"}
    state_type = data.schema.field("observation.state").type  # HF datasets' Sequence(float32, length=7)
    assert pa.types.is_fixed_size_list(state_type) and state_type.list_size == 7
    assert state_type.value_type == pa.float32()
    col = lambda name: data.column(name).to_numpy() if data.column(name).type.num_fields == 0 else \
        np.array(data.column(name).to_pylist())
    np.testing.assert_array_equal(col("index"), np.arange(sum(frames)))
    np.testing.assert_array_equal(col("episode_index"), np.repeat(np.arange(3), frames))
    np.testing.assert_array_equal(col("frame_index"), np.concatenate([np.arange(n) for n in frames]))
    np.testing.assert_allclose(col("timestamp"), np.concatenate([np.arange(n) / 10 for n in frames]), atol=1e-6)
    np.testing.assert_array_equal(col("observation.state").astype(np.float32),
                                  np.concatenate([e["obs"]["state"] for e in eps]))
    acts = col("action").astype(np.float32)
    np.testing.assert_array_equal(acts, np.concatenate([np.concatenate([e["action"], e["action"][-1:]]) for e in eps]))
    final = col("complementary_info.final_frame")
    assert final.sum() == 3 and np.flatnonzero(final).tolist() == list(np.cumsum(frames) - 1)
    done = col("next.done")
    assert done[final].all() and done[np.flatnonzero(final) - 1].tolist() == [True, True, True]
    np.testing.assert_array_equal(col("next.reward")[~final], np.concatenate([e["reward"] for e in eps]))

    episodes = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == frames and [e["tasks"] for e in episodes] == [[ENV_ID]] * 3
    assert [e["dataset_from_index"] for e in episodes] == [0, frames[0], frames[0] + frames[1]]
    assert [e["dataset_to_index"] for e in episodes] == list(np.cumsum(frames))
    assert episodes[1]["videos/observation.images.wrist/from_timestamp"] == pytest.approx(frames[0] / 10)
    tasks = pq.read_table(out / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == [ENV_ID] and tasks.column("task_index").to_pylist() == [0]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((out / "meta/stats.json").read_text())
    assert stats["observation.state"]["count"] == [sum(frames)]
    assert np.allclose(stats["observation.state"]["mean"], np.concatenate([e["obs"]["state"] for e in eps]).mean(0),
                       atol=1e-5)
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)

    for cam in ("front", "wrist"):  # OpenCV's own FFmpeg decodes the H.264 files
        cap = cv2.VideoCapture(str(out / f"videos/observation.images.{cam}/chunk-000/file-000.mp4"))
        decoded = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        cap.release()
        assert len(decoded) == sum(frames)
        decoded = np.stack(decoded)
        start = 0
        for e, n in zip(eps, frames):
            assert image_mae(decoded[start:start + n], e["obs"][f"images/{cam}"]) <= VIDEO_MAE_BOUND
            start += n


def test_robomimic_layout(src, tmp_path):
    out, _ = export_dataset(src.path, "robomimic", tmp_path / "demos.hdf5")
    eps = [src.episode(i) for i in range(3)]
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert sorted(data) == ["demo_0", "demo_1", "demo_2"]
        assert data.attrs["total"] == sum(len(e["action"]) for e in eps)
        env_args = json.loads(data.attrs["env_args"])
        assert env_args == {"env_name": ENV_ID, "type": 2,
                            "env_kwargs": {"image_size": SIZE, "cameras": ["front", "wrist"]}}
        assert [x.decode() for x in f["mask/train"][()]] == ["demo_0", "demo_1", "demo_2"]
        for i, e in enumerate(eps):
            g, T = data[f"demo_{i}"], len(e["action"])
            assert g.attrs["num_samples"] == T
            assert sorted(g["obs"]) == sorted(g["next_obs"]) == ["front_image", "state", "tcp_pose", "wrist_image"]
            np.testing.assert_array_equal(g["obs/front_image"][()], e["obs"]["images/front"][:-1])
            np.testing.assert_array_equal(g["next_obs/front_image"][()], e["obs"]["images/front"][1:])
            np.testing.assert_array_equal(g["actions"][()], e["action"])
            np.testing.assert_array_equal(g["rewards"][()], e["reward"])
            np.testing.assert_array_equal(g["dones"][()], (e["terminated"] | e["truncated"]).astype(int))


def test_existing_target_refused_unless_overwrite(src, tmp_path):
    for fmt in FORMATS:
        out = export_path(tmp_path, fmt)
        export_dataset(src.path, fmt, out)
        stamp = out.stat().st_mtime_ns
        with pytest.raises(DatasetError, match="exists; pass --overwrite"):
            export_dataset(src.path, fmt, out)
        assert out.stat().st_mtime_ns == stamp
        export_dataset(src.path, fmt, out, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a lerobot export"):
        export_dataset(src.path, "lerobot", other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    argv = ["demos", "export", str(src.path), "--format", "mcap", "--out", str(export_path(tmp_path, "mcap"))]
    assert cli_main(argv) == 2
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture
def damaged(src, tmp_path) -> Path:
    """A copy of the dataset whose episode 1 is cut short (as a crash of a copy would leave it)."""
    path = tmp_path / "damaged"
    shutil.copytree(src.path, path)
    victim = path / "episode_000001.h5"
    victim.write_bytes(victim.read_bytes()[:4000])
    return path


def test_corrupt_episode_skipped_with_warning_or_error_when_strict(damaged, tmp_path):
    with pytest.warns(UserWarning, match="episode_000001.h5"):
        out, n = export_dataset(damaged, "robomimic", tmp_path / "d.hdf5")
    assert n == 2
    with h5py.File(out) as f:
        assert sorted(f["data"]) == ["demo_0", "demo_1"]
    with pytest.raises(DatasetError, match="episode_000001.h5"):
        export_dataset(damaged, "robomimic", tmp_path / "strict.hdf5", strict=True)
    assert not (tmp_path / "strict.hdf5").exists()


def test_damaged_episode_in_an_import_source_is_skipped(src, tmp_path):
    out, _ = export_dataset(src.path, "robomimic", tmp_path / "d.hdf5")
    with h5py.File(out, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.warns(UserWarning, match="demo_1"):
        back, n = import_dataset(out, "robomimic", tmp_path / "back")
    assert n == 2 and len(back) == 2
    np.testing.assert_array_equal(back.episode(1)["action"], src.episode(2)["action"])
    with pytest.raises(DatasetError, match="demo_1"):
        import_dataset(out, "robomimic", tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))  # nothing half-imported


def test_import_checks_specs_against_the_env(src, tmp_path):
    out, _ = export_dataset(src.path, "mcap", tmp_path / "bag")
    with pytest.raises(DatasetError, match="'images/front' is in the dataset but not in the environment"):
        import_dataset(out, "mcap", tmp_path / "a", env_id="robolearn/PandaPickCube-v0")
    assert not (tmp_path / "a").exists()
    env = rsim.make(ENV_ID, image_size=64)  # an existing dataset with other image sizes
    DatasetWriter(tmp_path / "b", ENV_ID, env.observation_space, env.action_space, fps=10).close()
    env.close()
    with pytest.raises(DatasetError, match="'images/front' has shape"):
        import_dataset(out, "mcap", tmp_path / "b")
    assert cli_main(["demos", "import", str(out), "--format", "mcap", "--out", str(tmp_path / "c"),
                     "--env", "robolearn/PandaReach-v0"]) == 2


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "robolearn.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    return proc


def test_demos_info_reports_counts_success_and_sizes(src, damaged):
    proc = run_cli("demos", "info", str(src.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lengths = [len(src.episode(i)["action"]) for i in range(3)]
    assert "episodes:      3" in out and f"steps:         {sum(lengths)}" in out
    assert "success rate:  66.7% (2/3)" in out
    assert f"min {min(lengths)}" in out and f"max {max(lengths)}" in out
    assert "interventions: 2 steps in 1 episodes" in out
    assert "images/front  (32, 32, 3)  uint8" in out and "episode_000002.h5" in out
    summary = json.loads(run_cli("demos", "info", str(damaged), "--json").stdout)
    assert summary["episodes"] == 2 and summary["skipped"] == 1
    strict = run_cli("demos", "info", str(damaged), "--strict")
    assert strict.returncode == 2 and "episode_000001.h5" in strict.stderr and "Traceback" not in strict.stderr


def test_demos_replay_reproduces_and_writes_mp4(src, tmp_path):
    import imageio.v3 as iio

    video = tmp_path / "ep0.mp4"
    proc = run_cli("demos", "replay", str(src.path), "--episode", "0", "--video", str(video))
    assert proc.returncode == 0, proc.stderr
    assert "replayed in simulation: reproduced" in proc.stdout and "state: 0" in proc.stdout
    frames = iio.imread(video)
    assert frames.shape == (len(src.episode(0)["action"]) + 1, SIZE, 2 * SIZE, 3)  # cameras side by side
    proc = run_cli("demos", "replay", str(src.path), "--episode", "9")
    assert proc.returncode == 2 and "no episode 9" in proc.stderr


def test_mcap_without_robot_state_and_bags_of_the_old_layout_import(tmp_path, monkeypatch):
    import gymnasium as gym

    import robolearn.demos.mcap_format as mcap_format

    obs_space = gym.spaces.Dict({"images/front": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
                                 "state": gym.spaces.Box(-1, 1, (3,), np.float32)})
    act_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    with DatasetWriter(tmp_path / "ds", "test/Small-v0", obs_space, act_space, fps=20) as w:  # no arm
        w.begin_episode(obs_space.sample())
        for t in range(4):
            w.add_step(act_space.sample(), obs_space.sample(), 1.0, False, t == 3, False)
        w.end_episode()
    src = Dataset(tmp_path / "ds")
    out, _ = export_dataset(src.path, "mcap", tmp_path / "bag")
    from rosbags.rosbag2 import Reader
    with Reader(out) as bag:
        assert not {"/joint_states", "/tool_pose", "/robolearn/robot"} & {c.topic for c in bag.connections}
    # Bags exported before the robot state carried the observations on /joint_states.
    monkeypatch.setattr(mcap_format, "OBS_TOPIC", "/joint_states")
    old, _ = export_dataset(src.path, "mcap", tmp_path / "old_bag")
    monkeypatch.undo()
    with Reader(old) as bag:
        assert "/robolearn/observation" not in {c.topic for c in bag.connections}
    for bag in (out, old):
        back, _ = import_dataset(bag, "mcap", tmp_path / f"back_{bag.name}")
        assert back.joint_names is None and "robot" not in back.episode(0)
        np.testing.assert_array_equal(back.episode(0)["obs"]["state"], src.episode(0)["obs"]["state"])


def test_mcap_import_names_a_robot_array_of_the_wrong_width(src, tmp_path):
    import robolearn.demos.mcap_format as mcap_format

    out, _ = export_dataset(src.path, "mcap", tmp_path / "bag")
    meta, loaders = mcap_format.read(out)
    meta["robot_state"]["joint_names"] = PANDA_JOINTS[:6]  # as if the bag's meta named six joints
    with pytest.raises(DatasetError, match="episode 0: robot/joint_position has shape \\(\\d+, 7\\), "
                                           "expected \\(\\d+, 6\\)"):
        next(loaders)()


# -- damaged episodes and replays that do not reproduce ---------------------------------------

def small_dataset(path, episodes=2, length=4):
    import gymnasium as gym

    obs_space = gym.spaces.Dict({"images/front": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
                                 "state": gym.spaces.Box(-1, 1, (3,), np.float32)})
    act_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    with DatasetWriter(path, "test/Small-v0", obs_space, act_space, fps=20) as w:
        for _ in range(episodes):
            w.begin_episode(obs_space.sample())
            for t in range(length):
                w.add_step(act_space.sample(), obs_space.sample(), 1.0, False, t == length - 1, False)
            w.end_episode()
    return path


def make_empty(file):
    """Cut an episode file to 0 steps (a file from another tool; our writer refuses to write one)."""
    with h5py.File(file, "a") as f:
        for key in STEP_KEYS:
            f[key].resize(0, axis=0)
        for key in ("obs/images/front", "obs/state"):
            f[key].resize(1, axis=0)
        f.attrs["length"] = 0


def test_lerobot_export_of_a_length_0_episode_is_a_named_error(tmp_path):
    path = small_dataset(tmp_path / "ds")
    make_empty(path / "episode_000001.h5")
    with pytest.raises(DatasetError, match="episode_000001.h5: the episode has no steps"):
        export_dataset(path, "lerobot", tmp_path / "strict", strict=True)
    with pytest.warns(UserWarning, match="episode_000001.h5: the episode has no steps"):
        out, n = export_dataset(path, "lerobot", tmp_path / "lerobot")
    assert n == 1 and json.loads((out / "meta/info.json").read_text())["total_episodes"] == 1
    make_empty(path / "episode_000000.h5")
    with pytest.raises(DatasetError, match="no usable episodes.*episode_000000.h5: the episode has no steps"), \
            pytest.warns(UserWarning):
        export_dataset(path, "lerobot", tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def reach(tmp_path_factory) -> Path:
    """One scripted PandaReach episode (seed 0) with its robot state: quick to replay."""
    path = tmp_path_factory.mktemp("reach") / "ds"
    env = rsim.make("robolearn/PandaReach-v0")
    write_expert_episodes(env, env.unwrapped.task.expert(env.unwrapped), path, 1)
    env.close()
    return path


@pytest.mark.parametrize("name", [None, "reward", "robot/joint_position", "robot/tool_pose"])
def test_replay_reports_a_reward_or_state_difference_as_diverged(reach, tmp_path, name):
    from robolearn.demos.playback import format_replay, replay_episode

    path = tmp_path / "ds"
    shutil.copytree(reach, path)
    if name:
        with h5py.File(path / "episode_000000.h5", "a") as f:
            f[name][3] = f[name][3] + 0.01  # far beyond the tolerance; the observations are untouched
    result = replay_episode(path, 0)
    text = format_replay(result)
    if name is None:
        assert result.reproduced and "reproduced" in text
        return
    assert not result.reproduced and "reproduced" not in text and "diverged" in text
    assert result.first_divergent_step == (3 if name == "robot/joint_position" or name == "robot/tool_pose" else 4)
    assert name in text


@pytest.mark.parametrize("attrs, named", [
    ({"seed": -1}, "seed"), ({"seed": 2.5}, "seed"), ({"seed": "7"}, "seed"), ({"seed": True}, "seed"),
    ("{not json", "attrs"), ("[0]", "attrs"),
])
def test_replay_names_a_bad_seed_or_attrs(reach, tmp_path, capsys, attrs, named):
    path = tmp_path / "ds"
    shutil.copytree(reach, path)
    with h5py.File(path / "episode_000000.h5", "a") as f:
        f.attrs["attrs"] = attrs if isinstance(attrs, str) else json.dumps(attrs)
    assert cli_main(["demos", "replay", str(path), "--episode", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "episode_000000.h5" in err and named in err, err


def test_mcap_bag_written_by_rosbags_itself_imports(tmp_path):
    """A bag written message by message with rosbags' own rosbag2 Writer (MCAP storage, no
    compression, metadata version 9, Humble's message definitions), following the documented
    topics (docs/formats.md): JointState and Image written by another hand than our export."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    T_ = ts.types
    rng = np.random.default_rng(3)
    H, W, T, fps = 6, 5, 4, 20
    joints = [f"j{i}" for i in range(3)]
    meta = {"format_version": 1, "env_id": "test/Small-v0", "fps": float(fps), "robot": "panda", "cameras": ["front"],
            "observation": {"images/front": {"shape": [H, W, 3], "dtype": "uint8"},
                            "state": {"shape": [2, 2], "dtype": "float32"}},
            "action": {"shape": [2], "dtype": "float32", "low": [-1.0, -1.0], "high": [1.0, 1.0]},
            "created": "2025-01-01T00:00:00Z", "robot_state": {"joint_names": joints}}
    image = rng.integers(0, 256, (T + 1, H, W, 3), dtype=np.uint8)
    state = rng.uniform(-1, 1, (T + 1, 2, 2)).astype(np.float32)
    position, velocity = rng.normal(size=(T + 1, 3)), rng.normal(size=(T + 1, 3))
    tool = np.concatenate([rng.normal(size=(T + 1, 3)), np.tile([[1.0, 0.0, 0.0, 0.0]], (T + 1, 1))], axis=1)
    action = rng.uniform(-1, 1, (T, 2)).astype(np.float32)
    reward = rng.normal(size=T).astype(np.float32)

    def stamp(ns):
        return T_["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)

    def header(ns, frame=""):
        return T_["std_msgs/msg/Header"](stamp=stamp(ns), frame_id=frame)

    def floats(values, label):
        dim = T_["std_msgs/msg/MultiArrayDimension"](label=label, size=len(values), stride=len(values))
        return T_["std_msgs/msg/Float64MultiArray"](layout=T_["std_msgs/msg/MultiArrayLayout"](dim=[dim], data_offset=0),
                                                    data=np.asarray(values, np.float64))

    types = {"/robolearn/dataset": "std_msgs/msg/String", "/robolearn/episode": "std_msgs/msg/String",
             "/robolearn/observation": "sensor_msgs/msg/JointState", "/joint_states": "sensor_msgs/msg/JointState",
             "/tool_pose": "geometry_msgs/msg/PoseStamped", "/robolearn/robot": "std_msgs/msg/Float64MultiArray",
             "/front/image_raw": "sensor_msgs/msg/Image", "/robolearn/action": "std_msgs/msg/Float64MultiArray",
             "/robolearn/step": "std_msgs/msg/Float64MultiArray"}
    t0, dt = 1_735_689_600 * 10**9, 10**9 // fps
    with Writer(tmp_path / "bag", version=9, storage_plugin=StoragePlugin.MCAP) as bag:
        conns = {topic: bag.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in types.items()}

        def write(topic, ns, msg):
            bag.write(conns[topic], ns, ts.serialize_cdr(msg, types[topic]))

        write("/robolearn/dataset", t0, T_["std_msgs/msg/String"](data=json.dumps(meta)))
        write("/robolearn/episode", t0, T_["std_msgs/msg/String"](
            data=json.dumps({"index": 0, "length": T, "attrs": {"seed": 7}})))
        for t in range(T + 1):
            ns = t0 + t * dt
            if t > 0:
                write("/robolearn/step", ns, floats([reward[t - 1], False, t == T, False, t == 2, 0.05 * t],
                                                    "reward,terminated,truncated,success,intervention,timestamp"))
            write("/robolearn/observation", ns, T_["sensor_msgs/msg/JointState"](
                header=header(ns), name=[f"state/{i}" for i in range(4)], position=state[t].reshape(-1).astype(np.float64),
                velocity=np.zeros(0), effort=np.zeros(0)))
            write("/joint_states", ns, T_["sensor_msgs/msg/JointState"](
                header=header(ns), name=joints, position=position[t], velocity=velocity[t], effort=np.zeros(0)))
            x, y, z, qw, qx, qy, qz = tool[t]
            write("/tool_pose", ns, T_["geometry_msgs/msg/PoseStamped"](header=header(ns, "base"),
                  pose=T_["geometry_msgs/msg/Pose"](position=T_["geometry_msgs/msg/Point"](x=x, y=y, z=z),
                                                    orientation=T_["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))))
            write("/robolearn/robot", ns, floats([0.04, 0.05 * t], "gripper,stamp"))
            write("/front/image_raw", ns, T_["sensor_msgs/msg/Image"](
                header=header(ns, "front"), height=H, width=W, encoding="rgb8", is_bigendian=0, step=W * 3,
                data=image[t].reshape(-1)))
            if t < T:
                write("/robolearn/action", ns, floats(action[t], "action"))

    back, _ = import_dataset(tmp_path / "bag", "mcap", tmp_path / "back")
    assert len(back) == 1 and back.joint_names == joints
    ep = back.episode(0)
    np.testing.assert_array_equal(ep["obs"]["images/front"], image)
    np.testing.assert_array_equal(ep["obs"]["state"], state)
    np.testing.assert_array_equal(ep["action"], action)
    np.testing.assert_array_equal(ep["reward"], reward)
    assert ep["truncated"].tolist() == [False, False, False, True] and ep["intervention"].tolist() == [0, 1, 0, 0]
    np.testing.assert_array_equal(ep["robot"]["joint_position"], position)
    np.testing.assert_array_equal(ep["robot"]["joint_velocity"], velocity)
    np.testing.assert_array_equal(ep["robot"]["tool_pose"], tool)
    assert back.episode_attrs(0)["seed"] == 7


REACH_ID = "robolearn/PandaReach-v0"  # state-only: observations `state` (10,) and `tcp_pose` (7,), action (3,)


def _reach_episodes(seed: int, lengths: tuple[int, ...]) -> list[dict]:
    """Float32 values (exact in float64 too), distinct per episode so a swap or shift shows."""
    rng = np.random.default_rng(seed)
    return [{"state": rng.normal(size=(T + 1, 10)).astype(np.float32),
             "tcp_pose": rng.normal(size=(T + 1, 7)).astype(np.float32),
             "action": rng.uniform(-1, 1, (T, 3)).astype(np.float32),
             "reward": rng.normal(size=T).astype(np.float32)} for T in lengths]


def test_robomimic_file_written_independently_imports(tmp_path):
    """A robomimic file written with h5py by hand after robomimic's documented dataset structure
    (robomimic.github.io/docs/datasets/overview.html, "Dataset Structure"), not by our exporter:
    `data` attrs `total` and `env_args` (JSON: env_name, type, env_kwargs); `data/demo_N` with attr
    `num_samples`, `actions` (N, A), `rewards` (N,), `dones` (N,) as int64 0/1, `states`,
    `obs/<key>` and `next_obs/<key>` (N, ...); `mask/<filter>` lists of demo names. Nothing
    robolearn-specific (no `robolearn_meta`, no `robolearn_episode`, no per-step flags): the env
    comes from `env_args["env_name"]`, as robomimic itself reads it, and `--env` is also passed
    as the CLI would. Observations, rewards and actions are float64, as robomimic's datasets hold them
    (the values are float32-exact; robolearn stores float32)."""
    eps = _reach_episodes(11, (5, 3))
    dones = [np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0])]  # demo_0 ends in success, demo_1 at a time limit
    path = tmp_path / "low_dim.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for n, (ep, done) in enumerate(zip(eps, dones)):
            T = len(ep["action"])
            g = data.create_group(f"demo_{n}")
            g.attrs["num_samples"] = T
            g.create_dataset("actions", data=ep["action"].astype(np.float64))
            g.create_dataset("rewards", data=ep["reward"].astype(np.float64))
            g.create_dataset("dones", data=done.astype(np.int64))
            g.create_dataset("states", data=np.zeros((T, 4)))  # MuJoCo states: not ours to read
            for key in ("state", "tcp_pose"):  # low-dimensional observations as float64, as robomimic keeps them
                g.create_dataset(f"obs/{key}", data=ep[key][:T].astype(np.float64))
                g.create_dataset(f"next_obs/{key}", data=ep[key][1:].astype(np.float64))
        data.attrs["total"] = sum(len(ep["action"]) for ep in eps)
        data.attrs["env_args"] = json.dumps({"env_name": REACH_ID, "type": 2, "env_kwargs": {}})
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_1"]))
        f.create_dataset("mask/valid", data=np.array([], dtype="S6"))

    assert cli_main(["demos", "import", str(path), "--format", "robomimic", "--out", str(tmp_path / "back"),
                     "--env", REACH_ID]) == 0
    back = Dataset(tmp_path / "back")
    assert len(back) == 2 and back.meta["env_id"] == REACH_ID
    for i, (ep, done) in enumerate(zip(eps, dones)):
        got = back.episode(i)
        assert sorted(got["obs"]) == ["state", "tcp_pose"]
        for key in ("state", "tcp_pose"):
            np.testing.assert_array_equal(got["obs"][key], ep[key], err_msg=f"demo_{i} {key}")
        np.testing.assert_array_equal(got["action"], ep["action"])
        np.testing.assert_array_equal(got["reward"], ep["reward"])
        np.testing.assert_array_equal(got["terminated"], done.astype(bool))
        assert got["truncated"].tolist() == [False] * (len(done) - 1) + [not done[-1]]
        np.testing.assert_array_equal(got["success"], done.astype(bool))


def test_lerobot_dataset_written_independently_imports(tmp_path):
    """A LeRobot v3.0 dataset written with pyarrow and json by hand after LeRobot v3's documented
    layout (LeRobotDataset v3.0: meta/info.json with codebase_version, fps, features, data_path
    and video_path templates; meta/episodes/chunk-000/file-000.parquet with episode_index,
    length, data/chunk_index, data/file_index, dataset_from_index, dataset_to_index;
    meta/tasks.parquet; data/chunk-000/file-000.parquet holding every frame), not by our
    exporter: no meta/robolearn.json, no complementary_info.* columns, no final frame of our own.
    So every frame's action has its result (next.reward, next.done) and the last frame of each
    episode is only its final observation to us (its action is dropped). State-only, so no video."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fps = 10
    eps = _reach_episodes(12, (4, 6))
    done = [np.array([0, 0, 0, 1], bool), np.array([0] * 6, bool)]
    cols: dict[str, list] = {k: [] for k in ("observation.state", "observation.tcp_pose", "action", "next.reward",
                                             "next.done", "timestamp", "frame_index", "episode_index", "index",
                                             "task_index")}
    ep_rows, start = [], 0
    for n, (ep, d) in enumerate(zip(eps, done)):
        L = len(ep["action"]) + 1  # frames: the last holds the final observation and a repeated action
        cols["observation.state"].append(ep["state"])
        cols["observation.tcp_pose"].append(ep["tcp_pose"])
        cols["action"].append(np.concatenate([ep["action"], ep["action"][-1:]]))
        cols["next.reward"].append(np.concatenate([ep["reward"], [0.0]]).astype(np.float32))
        cols["next.done"].append(np.concatenate([d, [True]]))
        cols["timestamp"].append((np.arange(L) / fps).astype(np.float32))
        cols["frame_index"].append(np.arange(L))
        cols["episode_index"].append(np.full(L, n))
        cols["index"].append(np.arange(start, start + L))
        cols["task_index"].append(np.zeros(L, np.int64))
        ep_rows.append({"episode_index": n, "tasks": ["reach"], "length": L, "data/chunk_index": 0,
                        "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + L,
                        "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        start += L

    def column(parts):
        x = np.concatenate(parts)
        return pa.array(x) if x.ndim == 1 else pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

    root = tmp_path / "ds"
    (root / "data/chunk-000").mkdir(parents=True)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    # Rows shuffled in the file: the importer must order frames by frame_index, episodes by episode_index.
    table = pa.table({k: column(v) for k, v in cols.items()})
    table = table.take(pa.array(np.random.default_rng(0).permutation(start)))
    pq.write_table(table, root / "data/chunk-000/file-000.parquet")
    pq.write_table(pa.Table.from_pylist(ep_rows[::-1]), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": ["reach"]}), root / "meta/tasks.parquet")
    vec = lambda name, n, dtype="float32": {"dtype": dtype, "shape": [n], "names": [f"{name}_{i}" for i in range(n)]}
    scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
    info = {"codebase_version": "v3.0", "robot_type": "panda", "total_episodes": 2, "total_frames": start,
            "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
            "fps": fps, "splits": {"train": "0:2"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {"observation.state": vec("state", 10), "observation.tcp_pose": vec("tcp_pose", 7),
                         "action": vec("action", 3), "next.reward": scalar("float32"), "next.done": scalar("bool"),
                         "timestamp": scalar("float32"), "frame_index": scalar("int64"),
                         "episode_index": scalar("int64"), "index": scalar("int64"), "task_index": scalar("int64")}}
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))

    assert cli_main(["demos", "import", str(root), "--format", "lerobot", "--out", str(tmp_path / "back"),
                     "--env", REACH_ID]) == 0
    back = Dataset(tmp_path / "back")
    assert len(back) == 2 and back.meta["env_id"] == REACH_ID and back.meta["fps"] == fps
    for i, (ep, d) in enumerate(zip(eps, done)):
        got = back.episode(i)
        assert sorted(got["obs"]) == ["state", "tcp_pose"]
        for key in ("state", "tcp_pose"):
            np.testing.assert_array_equal(got["obs"][key], ep[key], err_msg=f"episode {i} {key}")
        np.testing.assert_array_equal(got["action"], ep["action"])
        np.testing.assert_array_equal(got["reward"], ep["reward"])
        np.testing.assert_array_equal(got["terminated"], d)
        assert got["truncated"].tolist() == [False] * (len(d) - 1) + [not d[-1]]
        np.testing.assert_array_equal(got["timestamp"], (np.arange(len(d)) / fps).astype(np.float32))
