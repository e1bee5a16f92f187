"""A ROS 2 bag (rosbag2 directory: metadata.yaml + one .mcap) of standard messages, CDR-encoded.

Topics, all episodes one after another on one clock (obs t and action t at t/fps, step t's result
at (t+1)/fps, one second between episodes):

  /robolearn/dataset       std_msgs/msg/String              the dataset meta (JSON), once
  /robolearn/episode       std_msgs/msg/String              {"index", "length", "attrs"} at each start
  /robolearn/observation   sensor_msgs/msg/JointState       every non-image observation, flattened;
                                                            name[i] = "<key>/<flat index>"
  /joint_states            sensor_msgs/msg/JointState       the arm's joint positions and velocities,
                                                            by the dataset's joint names
  /tool_pose               geometry_msgs/msg/PoseStamped    the tool pose in frame "base" (ROS x,y,z,w)
  /robolearn/robot         std_msgs/msg/Float64MultiArray   gripper, stamp (the backend's clock)
                           (these three T+1 per episode that has a robot group; none without one)
  /<camera>/image_raw      sensor_msgs/msg/Image            each camera, rgb8 (T+1 per episode)
  /robolearn/action        std_msgs/msg/Float64MultiArray   the action (T per episode)
  /robolearn/step          std_msgs/msg/Float64MultiArray   reward, terminated, truncated, success,
                                                            intervention, timestamp (T per episode)

Serialized with rosbags (pure Python CDR, ros2msg schemas), so `ros2 bag play DIR`, rosbags and
any MCAP reader open it without ROS installed here; /joint_states and /tool_pose feed
robot_state_publisher and RViz. Values round-trip exactly (float32 -> float64 -> float32).
docs/formats.md.
"""

from __future__ import annotations

import bisect
import calendar
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from robolearn.demos.convert import Episode, check_episode, image_keys
from robolearn.demos.dataset import Dataset, DatasetError

DATASET_TOPIC, EPISODE_TOPIC = "/robolearn/dataset", "/robolearn/episode"
OBS_TOPIC, ACTION_TOPIC, STEP_TOPIC = "/robolearn/observation", "/robolearn/action", "/robolearn/step"
JOINTS_TOPIC, TOOL_TOPIC, ROBOT_TOPIC = "/joint_states", "/tool_pose", "/robolearn/robot"
STEP_FIELDS = ("reward", "terminated", "truncated", "success", "intervention", "timestamp")
ROBOT_FIELDS = ("gripper", "stamp")
TOOL_FRAME = "base"
EPISODE_GAP_NS = 1_000_000_000
METADATA_VERSION = 8  # rosbag2's metadata.yaml version 8 (Jazzy); Humble and later read it


def _typestore():
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_JAZZY)


def image_topic(key: str) -> str:
    return "/" + key.split("/", 1)[-1] + "/image_raw" if key.startswith("images/") else f"/{key}/image_raw"


def _encoding(channels: int) -> str:
    return {3: "rgb8", 1: "mono8"}.get(channels, f"8UC{channels}")


def _start_ns(meta: dict) -> int:
    try:
        return calendar.timegm(time.strptime(meta.get("created", ""), "%Y-%m-%dT%H:%M:%SZ")) * 1_000_000_000
    except ValueError:
        return 1_000_000_000


def export(ds: Dataset, episodes: Iterable[tuple[int, Episode]], out: Path) -> None:
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

    ts = _typestore()
    T_ = ts.types
    meta, fps = ds.meta, float(ds.meta["fps"])
    dt = int(round(1e9 / fps))
    images = image_keys(meta)
    proprio = [k for k in meta["observation"] if k not in images]
    names = [f"{k}/{i}" for k in proprio for i in range(int(np.prod(meta["observation"][k]["shape"])))]
    joint_names = ds.joint_names

    def stamp(ns: int):
        return T_["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)

    def header(ns: int, frame: str):
        return T_["std_msgs/msg/Header"](stamp=stamp(ns), frame_id=frame)

    def multiarray(values: np.ndarray, label: str):
        dim = T_["std_msgs/msg/MultiArrayDimension"](label=label, size=len(values), stride=len(values))
        return T_["std_msgs/msg/Float64MultiArray"](
            layout=T_["std_msgs/msg/MultiArrayLayout"](dim=[dim], data_offset=0), data=values.astype(np.float64))

    def pose_stamped(ns: int, pose: np.ndarray):
        x, y, z, qw, qx, qy, qz = (float(v) for v in pose)  # ours (w, x, y, z), ROS's (x, y, z, w)
        return T_["geometry_msgs/msg/PoseStamped"](header=header(ns, TOOL_FRAME), pose=T_["geometry_msgs/msg/Pose"](
            position=T_["geometry_msgs/msg/Point"](x=x, y=y, z=z),
            orientation=T_["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw)))

    String = T_["std_msgs/msg/String"]
    bag = Writer(out, version=METADATA_VERSION, storage_plugin=StoragePlugin.MCAP)
    # zstd-compressed MCAP chunks: what `ros2 bag record --storage-preset-profile zstd_fast` writes.
    bag.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with bag:
        bag.set_custom_data("robolearn.meta", json.dumps(meta))
        conn = {topic: bag.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in (
            (DATASET_TOPIC, "std_msgs/msg/String"), (EPISODE_TOPIC, "std_msgs/msg/String"),
            (OBS_TOPIC, "sensor_msgs/msg/JointState"),
            *(((JOINTS_TOPIC, "sensor_msgs/msg/JointState"), (TOOL_TOPIC, "geometry_msgs/msg/PoseStamped"),
               (ROBOT_TOPIC, "std_msgs/msg/Float64MultiArray")) if joint_names else ()),
            *((image_topic(k), "sensor_msgs/msg/Image") for k in images),
            (ACTION_TOPIC, "std_msgs/msg/Float64MultiArray"), (STEP_TOPIC, "std_msgs/msg/Float64MultiArray"))}

        def write(topic: str, ns: int, msg) -> None:
            bag.write(conn[topic], ns, ts.serialize_cdr(msg, msg.__msgtype__))

        t0 = _start_ns(meta)
        write(DATASET_TOPIC, t0, String(data=json.dumps(meta)))
        for index, ep in episodes:
            T = len(ep["action"])
            write(EPISODE_TOPIC, t0, String(data=json.dumps({"index": index, "length": T, "attrs": ep["attrs"]})))
            flat = np.concatenate([ep["obs"][k].reshape(T + 1, -1).astype(np.float64) for k in proprio], axis=1) \
                if proprio else np.zeros((T + 1, 0))
            step = np.stack([ep[k].astype(np.float64) for k in STEP_FIELDS], axis=1)
            robot = ep.get("robot")
            for t in range(T + 1):
                ns = t0 + t * dt
                if t > 0:
                    write(STEP_TOPIC, ns, multiarray(step[t - 1], ",".join(STEP_FIELDS)))
                write(OBS_TOPIC, ns, T_["sensor_msgs/msg/JointState"](
                    header=header(ns, ""), name=names, position=flat[t], velocity=np.zeros(0), effort=np.zeros(0)))
                if robot is not None:
                    write(JOINTS_TOPIC, ns, T_["sensor_msgs/msg/JointState"](
                        header=header(ns, ""), name=joint_names, position=robot["joint_position"][t],
                        velocity=robot["joint_velocity"][t], effort=np.zeros(0)))
                    write(TOOL_TOPIC, ns, pose_stamped(ns, robot["tool_pose"][t]))
                    write(ROBOT_TOPIC, ns, multiarray(np.array([robot[k][t] for k in ROBOT_FIELDS]),
                                                      ",".join(ROBOT_FIELDS)))
                for k in images:
                    img = ep["obs"][k][t]
                    h, w, c = img.shape
                    write(image_topic(k), ns, T_["sensor_msgs/msg/Image"](
                        header=header(ns, k.split("/", 1)[-1]), height=h, width=w, encoding=_encoding(c),
                        is_bigendian=0, step=w * c, data=np.ascontiguousarray(img).reshape(-1)))
                if t < T:
                    write(ACTION_TOPIC, ns, multiarray(ep["action"][t].reshape(-1), "action"))
            t0 += T * dt + EPISODE_GAP_NS


def read(path: Path) -> tuple[dict, Iterator[Callable[[], Episode]]]:
    from rosbags.rosbag2 import Reader

    if path.is_file() and path.suffix == ".mcap":
        path = path.parent
    if not (path / "metadata.yaml").exists():
        raise DatasetError(f"{path}: not a rosbag2 directory (no metadata.yaml)")
    ts = _typestore()
    try:
        reader = Reader(path)
        reader.open()
    except Exception as err:
        raise DatasetError(f"{path}: unreadable bag ({type(err).__name__}: {err})") from None
    topics = {c.topic: c for c in reader.connections}
    missing = [t for t in (DATASET_TOPIC, EPISODE_TOPIC, ACTION_TOPIC, STEP_TOPIC) if t not in topics]
    if missing:
        reader.close()
        raise DatasetError(f"{path}: not a robolearn bag (no topics {missing}; it has {sorted(topics)})")
    dataset_msgs = list(reader.messages(connections=[topics[DATASET_TOPIC]]))
    meta = json.loads(ts.deserialize_cdr(dataset_msgs[0][2], "std_msgs/msg/String").data)
    images = image_keys(meta)
    proprio = [k for k in meta["observation"] if k not in images]

    markers = [(ns, json.loads(ts.deserialize_cdr(raw, "std_msgs/msg/String").data))
               for _, ns, raw in reader.messages(connections=[topics[EPISODE_TOPIC]])]
    starts = [ns for ns, _ in markers]
    data_conns = [c for c in reader.connections if c.topic not in (DATASET_TOPIC, EPISODE_TOPIC)]
    image_of = {image_topic(k): k for k in images}
    # Bags written before the robot state was exported carry the observations on /joint_states.
    obs_topic = OBS_TOPIC if OBS_TOPIC in topics else JOINTS_TOPIC

    def new(info: dict) -> dict:
        lists = ("proprio", "action", "step", "joints", "velocity", "tool", "robot")
        return {"info": info, "obs": {k: [] for k in images}, **{name: [] for name in lists}}

    def episodes() -> Iterator[Callable[[], Episode]]:
        # A message belongs to the episode whose start marker is the latest at or before its time.
        current, pending = -1, None
        try:
            for conn, ns, raw in reader.messages(connections=data_conns):
                e = bisect.bisect_right(starts, ns) - 1
                if e < 0:
                    continue
                while current < e:
                    if pending is not None:
                        yield lambda p=pending: _finish(p, meta, proprio, images, path)
                    current += 1
                    pending = new(markers[current][1])
                msg = ts.deserialize_cdr(raw, conn.msgtype)
                if conn.topic == obs_topic:
                    pending["proprio"].append(np.asarray(msg.position, np.float64))
                elif conn.topic == JOINTS_TOPIC:
                    pending["joints"].append(np.asarray(msg.position, np.float64))
                    pending["velocity"].append(np.asarray(msg.velocity, np.float64))
                elif conn.topic == TOOL_TOPIC:
                    p, q = msg.pose.position, msg.pose.orientation
                    pending["tool"].append(np.array([p.x, p.y, p.z, q.w, q.x, q.y, q.z]))
                elif conn.topic == ROBOT_TOPIC:
                    pending["robot"].append(np.asarray(msg.data, np.float64))
                elif conn.topic == ACTION_TOPIC:
                    pending["action"].append(np.asarray(msg.data, np.float64))
                elif conn.topic == STEP_TOPIC:
                    pending["step"].append(np.asarray(msg.data, np.float64))
                elif conn.topic in image_of:
                    pending["obs"][image_of[conn.topic]].append(
                        np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width, -1))
            if pending is not None:
                yield lambda p=pending: _finish(p, meta, proprio, images, path)
            for info in (m for _, m in markers[current + 1:]):  # episodes with no messages at all
                yield lambda p=new(info): _finish(p, meta, proprio, images, path)  # noqa: B008 (bound per episode)
        finally:
            reader.close()
    return meta, episodes()


def _finish(p: dict, meta: dict, proprio: list[str], images: list[str], path: Path) -> Episode:
    info = p["info"]
    where = f"{path} episode {info.get('index')}"
    try:
        T = len(p["action"])
        obs = {k: np.stack(p["obs"][k]).astype(meta["observation"][k]["dtype"]) for k in images}
        flat = np.stack(p["proprio"]) if p["proprio"] else np.zeros((0, 0))
        col = 0
        for k in proprio:
            spec = meta["observation"][k]
            width = int(np.prod(spec["shape"]))
            obs[k] = flat[:, col:col + width].astype(spec["dtype"]).reshape(len(flat), *spec["shape"])
            col += width
        step = np.stack(p["step"]) if p["step"] else np.zeros((0, len(STEP_FIELDS)))
        ep = {"obs": obs, "action": np.stack(p["action"]).astype(np.float32).reshape(T, *meta["action"]["shape"]),
              "reward": step[:, 0].astype(np.float32), "attrs": info.get("attrs", {})}
        for i, k in enumerate(STEP_FIELDS[1:], start=1):
            ep[k] = step[:, i] if k == "timestamp" else step[:, i].astype(bool)
        if p["joints"] or p["tool"] or p["robot"]:  # an episode without a robot group has none of them
            extra = np.stack(p["robot"])
            ep["robot"] = {"joint_position": np.stack(p["joints"]), "joint_velocity": np.stack(p["velocity"]),
                           "tool_pose": np.stack(p["tool"]),
                           **{k: extra[:, i] for i, k in enumerate(ROBOT_FIELDS)}}
        if info.get("length") is not None and info["length"] != T:
            raise DatasetError(f"{T} actions, the episode message says {info['length']}")
    except DatasetError as err:
        raise DatasetError(f"{where}: {err}") from None
    except Exception as err:
        raise DatasetError(f"{where}: incomplete episode ({type(err).__name__}: {err})") from None
    return check_episode(ep, meta, where)
