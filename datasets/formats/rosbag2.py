"""rosbag2 bags (what ``ros2 bag record`` writes; MCAP or sqlite3 storage), read and written with the pure-Python
``rosbags`` library (its own CDR (de)serializer and message type store: no ROS install, no rclpy, no DDS).

Format facts used here (rosbag2 design doc ``ros2/rosbag2/docs/design``, rosbags 0.11 ``rosbag2/reader.py`` and
``rosbag2/writer.py``): a bag is a directory with ``metadata.yaml`` and one or more storage files (``*.mcap``, or
``*.db3`` for sqlite3); rosbags' ``Reader`` also opens a single ``.mcap`` / ``.db3`` file. Every message is stored
with its topic's connection (topic, message type, definition) and a timestamp in integer nanoseconds: the time the
recorder RECEIVED it (rosbag2's ``recv_timestamp``, "log time" in MCAP). ``Reader.messages`` yields each storage
file's messages in timestamp order (sqlite3: ``ORDER BY timestamp``; MCAP: merged by log time). Messages are CDR
(``serialization_format: cdr``) and decoded with rosbags' type store (:data:`TYPESTORE`: ROS 2 Kilted, the
distribution of our ``[ros]`` wheels; the standard messages below are the same in every ROS 2 distribution).

**Import** (:func:`read`; bags recorded on our topics, docs/ROS2.md, or on any topics through a topic -> key map):

- Rows are driven by the action messages on ``action_topic``, with the ROS 2 recorder's pairing rule
  (:mod:`robot_rl.ros.recorder`), the bag's log time standing in for the recorder's receive time: every action gives
  one row, paired with the LATEST message of every observation topic logged at or before the action (a message
  logged at the same nanosecond counts as before); ``intervention``: the ``/robot_rl/intervention`` Bool logged
  nearest the action within half a control period (ties: the earlier), else False; ``human_action``: likewise the
  nearest ``/robot_rl/human_action`` while intervening, else NaN. An action logged before every observation topic
  has arrived (or, with ``max_obs_age``, with an older one) gives no row and is counted in
  ``extra.skipped_steps``; one that cannot be decoded or is not finite is counted in ``extra.bad_actions``.
- The action message is our arm bridge's (``robot_rl.ros.common``, docs/ROS2.md): ``sensor_msgs/JointState`` with
  ``name`` = ``ee_dx ee_dy ee_dz ee_dyaw gripper`` and ``position`` = the 5-D action, reordered by name as
  ``robot_rl.ros.common.msg_to_action`` does (that module needs rclpy's message classes and sits in a higher layer,
  so the few lines are repeated in :func:`action_array`). One difference: a JointState WITHOUT names gives its
  positions in message order at any length (our exports of actions that are not 5-D); ``std_msgs/Float32MultiArray``
  / ``Float64MultiArray`` actions give their ``data``. Stored as float32 (T, A).
- Observations: ``topics`` = {topic: store key}; message -> per-step array (:func:`message_array`):
  ``sensor_msgs/JointState`` -> ``position`` float32 (J,) in message order (all joints of the message; no
  per-name merging of several publishers); ``sensor_msgs/Image`` ``rgb8``/``bgr8``/``rgba8``/``bgra8``/``mono8`` ->
  uint8 (H, W, 3) RGB (alpha dropped, mono repeated); ``geometry_msgs/PoseStamped`` -> float32 (7,)
  ``[x, y, z, qx, qy, qz, qw]`` (m, quaternion xyzw, in the message's ``header.frame_id``); ``std_msgs/<T>MultiArray``
  -> ``data`` in its own dtype, shaped by ``layout.dim`` sizes when they multiply to the data length (else flat);
  ``std_msgs/Bool`` -> bool (); ``std_msgs/Float32`` / ``Float64`` -> that float ().
  Without ``topics``: our topics found in the bag: ``/joint_states`` -> ``joint_pos`` (every joint of the message,
  e.g. the Panda's 7 arm + 2 finger joints), ``/cameras/<cam>/image_raw`` -> ``image_<cam>``,
  ``/sim/privileged/<name>_pose`` -> ``<name>_pose``, ``/robot_rl/obs/<key>`` -> ``<key>``.
  The recorder's derived keys (``ee_pos``, ``ee_quat``, ``gripper_width`` by forward kinematics from joint states,
  the task's object keys) are NOT recomputed: this is a generic topic -> key import.
- Episodes: one bag = one episode, unless ``episode_topic`` (default ``/robot_rl/episode``, written by our exports;
  e.g. ``/sim/privileged/episode`` to split a sim recording at each reset) has messages: each one starts an episode
  (rows before the first one form an episode of their own; an episode without rows is dropped). Metadata: ``seed``,
  ``task``, ``backend`` and ``extra.params`` from the latest ``/sim/privileged/episode`` JSON logged before the
  episode ends, ``success`` from the latest ``/sim/privileged/success`` Bool logged before it ends (absent: the
  import default), ``source`` ``intervention`` when a row was taken over; ``extra`` also records
  ``control_rate``, ``action_rate`` (median of the rows' action rate, Hz), ``skipped_steps``, ``bad_actions``,
  ``action_topic`` and ``topics``.

**Export** (:func:`write`): ONE bag for the whole store (a directory with ``metadata.yaml`` and one ``.mcap``; or
``storage="sqlite3"``), the episodes back to back on a simulated clock starting at ROS time 1 s
(:data:`T0_NS`; the output is deterministic). Per episode: a ``std_msgs/String`` on ``/robot_rl/episode`` with our
JSON (``format``, ``version``, ``index``, ``steps``, ``control_rate``, ``action_topic``, ``meta`` = seed, task,
source, success, backend, robot, extra; ``keys`` = {key: topic, dtype, per-step shape}); step i's observations
at ``t_i - eps`` and its action, intervention and human action at ``t_i`` (``t_i`` = episode start +
(i + 1) / ``control_rate``; eps = min(1 ms, a tenth of a period)), so the pairing rule above gives back exactly the
stored rows; one period of silence separates episodes. Topics and messages:

- ``action`` (T, A) -> ``action_topic`` (default ``/arm_bridge/action``), ``sensor_msgs/JointState`` as our arm
  bridge takes it (names ``ee_dx ... gripper`` when A = 5, else none; ``header.stamp`` = its observation's time,
  the action message's convention);
- ``image_<cam>`` uint8 (T, H, W, C) -> ``/cameras/<cam>/image_raw`` ``sensor_msgs/Image`` (``rgb8``, ``rgba8`` for
  C = 4, ``mono8`` for C = 1; lossless), ``header.frame_id`` ``<cam>_optical_frame``;
- ``intervention`` bool (T,) -> ``/robot_rl/intervention`` ``std_msgs/Bool``, every step;
- ``human_action`` (T, A) -> ``/robot_rl/human_action`` (the action message), only the steps that have one
  (not all NaN);
- any other key -> ``/robot_rl/obs/<key>``, ``std_msgs/<T>MultiArray`` of its dtype (``Float32MultiArray`` for
  float32 and float16, ``Float64MultiArray``, ``Int8`` ... ``UInt64MultiArray``, bool as ``UInt8MultiArray``) with
  the per-step shape in ``layout.dim`` (row-major strides). Keys must be ROS name tokens (letters, digits, ``_``).

Our own bags import back through the ``keys`` table of their episode messages (dtype and per-step shape restored,
``control_rate`` and ``action_topic`` taken from there unless given, ``human_action`` without the intervention
condition, ``meta`` as written), so ours -> bag -> ours is bit-identical for every key and metadata field.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from robot_rl.datasets.formats import META_FIELDS, Episode, parse_key_map
from robot_rl.envs.env import ACTION_NAMES, action_by_name
from robot_rl.datasets.store import is_image
from robot_rl.errors import ConfigError

ACTION_TOPIC = "/arm_bridge/action"
INTERVENTION_TOPIC = "/robot_rl/intervention"
HUMAN_ACTION_TOPIC = "/robot_rl/human_action"
EPISODE_TOPIC = "/robot_rl/episode"
SIM_EPISODE_TOPIC = "/sim/privileged/episode"
SIM_SUCCESS_TOPIC = "/sim/privileged/success"
JOINT_STATES_TOPIC = "/joint_states"
IMAGE_TOPIC = "/cameras/{camera}/image_raw"
OBS_TOPIC = "/robot_rl/obs/{key}"
DEFAULT_CONTROL_RATE = 10.0  # Hz, the recorder's default control_rate
FORMAT_TAG, FORMAT_VERSION = "robot_rl.rosbag2", 1
T0_NS = 1_000_000_000  # exports start at ROS time 1 s
STORAGES = ("mcap", "sqlite3")
RESERVED_KEYS = ("action", "intervention", "human_action")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_AUTO = (re.compile(r"/cameras/([A-Za-z][A-Za-z0-9_]*)/image_raw"), "image_{}"), \
        (re.compile(r"/sim/privileged/([A-Za-z][A-Za-z0-9_]*)_pose"), "{}_pose"), \
        (re.compile(r"/robot_rl/obs/([A-Za-z][A-Za-z0-9_]*)"), "{}")

JOINT_STATE, IMAGE, POSE = "sensor_msgs/msg/JointState", "sensor_msgs/msg/Image", "geometry_msgs/msg/PoseStamped"
BOOL, STRING = "std_msgs/msg/Bool", "std_msgs/msg/String"
#: numpy dtype of each std_msgs array message (MultiArray ``data``; Float32/Float64 ``data``)
MULTIARRAY = {f"std_msgs/msg/{n}MultiArray": np.dtype(d) for n, d in (
    ("Float32", "float32"), ("Float64", "float64"), ("Int8", "int8"), ("UInt8", "uint8"), ("Byte", "uint8"),
    ("Int16", "int16"), ("UInt16", "uint16"), ("Int32", "int32"), ("UInt32", "uint32"), ("Int64", "int64"),
    ("UInt64", "uint64"))}
SCALAR = {"std_msgs/msg/Float32": np.dtype("float32"), "std_msgs/msg/Float64": np.dtype("float64")}
OBS_TYPES = (JOINT_STATE, IMAGE, POSE, BOOL, *MULTIARRAY, *SCALAR)
ACTION_TYPES = (JOINT_STATE, "std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray")
#: encoding -> channels (sensor_msgs/image_encodings.hpp); step = bytes per row (>= width * channels)
ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
_FIX_SRC = "pass a rosbag2 bag: its directory (metadata.yaml + .mcap or .db3 files) or a single .mcap / .db3 file"


@lru_cache(maxsize=1)
def typestore():
    """rosbags' type store of ROS 2 Kilted (Jazzy with an older rosbags): the standard message classes + CDR."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(getattr(Stores, "ROS2_KILTED", None) or Stores.ROS2_JAZZY)


# --------------------------------------------------------------------------------------------------- messages
def action_array(msg, msgtype: str) -> np.ndarray:
    """float64 (A,) action of an action message (see the module doc). Raises ConfigError for a JointState whose
    names miss one of ``ACTION_NAMES`` or disagree with its positions, or an empty action; NaN/inf pass through."""
    if msgtype == JOINT_STATE:
        if len(msg.name):
            return action_by_name(msg.name, msg.position)
        pos = np.asarray(msg.position, dtype=np.float64).reshape(-1)
    else:
        pos = np.asarray(msg.data, dtype=np.float64).reshape(-1)
    if pos.size == 0:
        raise ConfigError("action.position", "no values", f"send {list(ACTION_NAMES)}")
    return pos


def image_array(msg, rgb: bool = True) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a sensor_msgs/Image (``rgb``), or (H, W, C) in the encoding's own channel count with
    BGR(A) turned into RGB(A) (``rgb=False``: our exports). Raises ConfigError for another encoding or short data."""
    enc = str(msg.encoding).lower()
    ch = ENCODINGS.get(enc)
    if ch is None:
        raise ConfigError("image.encoding", f"{msg.encoding!r} is not supported", f"record one of {list(ENCODINGS)}")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    buf = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if step < w * ch or buf.size < h * step:
        raise ConfigError("image.data", f"{buf.size} bytes, step {step} for {h}x{w} {enc}",
                          "the publisher wrote a malformed image")
    a = buf[: h * step].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    if enc.startswith("bgr"):
        a = np.concatenate([a[:, :, 2::-1], a[:, :, 3:]], axis=2)
    if rgb:
        a = np.repeat(a, 3, axis=2) if ch == 1 else a[:, :, :3]
    return np.ascontiguousarray(a)


def message_array(msg, msgtype: str, rgb: bool = True) -> np.ndarray:
    """The per-step array of an observation message (module doc). Raises ConfigError for an unsupported type."""
    if msgtype == JOINT_STATE:
        return np.asarray(msg.position, dtype=np.float64).astype(np.float32).reshape(-1)
    if msgtype == IMAGE:
        return image_array(msg, rgb)
    if msgtype == POSE:
        p, o = msg.pose.position, msg.pose.orientation
        return np.array([p.x, p.y, p.z, o.x, o.y, o.z, o.w], dtype=np.float64).astype(np.float32)
    if msgtype == BOOL:
        return np.array(bool(msg.data))
    if msgtype in SCALAR:
        return np.array(msg.data, dtype=SCALAR[msgtype])
    if msgtype in MULTIARRAY:
        data = np.asarray(msg.data, dtype=MULTIARRAY[msgtype]).reshape(-1)[int(msg.layout.data_offset):]
        shape = tuple(int(d.size) for d in msg.layout.dim)
        return data.reshape(shape) if shape and math.prod(shape) == data.size else data.copy()
    raise ConfigError("topics", f"message type {msgtype} is not supported", f"map topics of type {list(OBS_TYPES)}")


# --------------------------------------------------------------------------------------------------- import
@dataclass
class _Segment:
    """One episode being assembled: rows (log time ns, float64 action, {key: array}) and its counters."""

    ours: dict | None  # our episode JSON that started it (our exports)
    rows: list = field(default_factory=list)
    skipped: int = 0
    bad: int = 0
    end_ns: int | None = None  # log time of the next episode message (None: the bag's end)


def read(src: Path, *, topics: dict[str, str] | Sequence[str] | None = None, action_topic: str | None = None,
         control_rate: float | None = None, episode_topic: str = EPISODE_TOPIC,
         max_obs_age: float | None = None) -> Iterator[Episode]:
    """Episodes of the rosbag2 bag at ``src`` (MCAP or sqlite3), rows and keys as in the module doc.

    Args:
        topics: {topic: store key} or ``["TOPIC=KEY", ...]`` (``--topic-map``); None: our topics found in the bag
            (or, for our exports, the keys they list). ``action``, ``intervention`` and ``human_action`` come from
            their own topics and cannot be mapped.
        action_topic: the executed actions (None: the one our export names, else ``/arm_bridge/action``).
        control_rate: Hz; half its period is the intervention / human action pairing window (None: the rate our
            export names, else 10).
        episode_topic: a new episode starts at each message on it ("" or a topic without messages: one episode).
        max_obs_age: seconds; an action whose latest message of some observation topic is older gives no row
            (the recorder's ``max_obs_age``; None: no limit).

    Raises ConfigError naming the field: ``src`` (not a bag), ``action_topic`` (absent, no messages, an unsupported
    type, no finite action, actions that change length), ``topics`` (a bad map, a topic not in the bag or of an
    unsupported type, no topic found, no action with every observation before it, shapes that change),
    ``control_rate`` / ``max_obs_age`` (not > 0), ``<topic>`` (an undecodable observation message)."""
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(Path(src))
        reader.open()
    except Exception as e:  # noqa: BLE001 - rosbags raises FileNotFoundError, ReaderError, yaml / sqlite errors
        raise ConfigError("src", f"{src} is not a readable rosbag2 bag ({type(e).__name__}: {e})", _FIX_SRC) from None
    try:
        yield from _read_open(reader, Path(src), topics, action_topic, control_rate, episode_topic, max_obs_age)
    finally:
        reader.close()


def _read_open(reader, src: Path, topics, action_topic, control_rate, episode_topic, max_obs_age):
    types = _topic_types(reader)
    ours = _our_episode_info(reader, types, episode_topic)
    action_topic = action_topic or (ours or {}).get("action_topic") or ACTION_TOPIC
    rate = control_rate if control_rate is not None else (ours or {}).get("control_rate", DEFAULT_CONTROL_RATE)
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ConfigError("control_rate", f"{rate!r} is not a positive rate", "pass --control-rate HZ, e.g. 10")
    if max_obs_age is not None and not (isinstance(max_obs_age, (int, float)) and max_obs_age > 0):
        raise ConfigError("max_obs_age", f"{max_obs_age!r} <= 0", "pass a positive age in seconds, or none")
    counts = {t: i.msgcount for t, i in reader.topics.items()}
    if not counts.get(action_topic):
        raise ConfigError("action_topic", f"{src} has no messages on {action_topic!r} (topics: {_listing(types)})",
                          "pass --action-topic TOPIC naming the bag's executed actions")
    if types[action_topic] not in ACTION_TYPES:
        raise ConfigError("action_topic", f"{action_topic} carries {types[action_topic]}",
                          f"use a topic of type {list(ACTION_TYPES)} (our action message: sensor_msgs/JointState)")
    schema = (ours or {}).get("keys", {})
    by_topic = {v["topic"]: (k, v) for k, v in schema.items() if k not in RESERVED_KEYS}
    obs = _topic_map(topics, types, by_topic if ours is not None else None, src)
    half_ns = 0.5e9 / float(rate)
    max_age_ns = None if max_obs_age is None else float(max_obs_age) * 1e9
    has_inter, has_human = INTERVENTION_TOPIC in types, HUMAN_ACTION_TOPIC in types
    for t, role in ((INTERVENTION_TOPIC, BOOL), (HUMAN_ACTION_TOPIC, JOINT_STATE)):
        if t in types and types[t] != role:
            raise ConfigError("topics", f"{t} carries {types[t]}, not {role}", f"record {t} as {role}")

    ts = typestore()
    latest: dict[str, tuple[int, bytes]] = {}  # topic -> (log time, raw CDR) of its latest message
    converted: dict[str, np.ndarray] = {}  # topic -> array of that latest message (decoded once, when first used)
    inter: tuple[list, list] = ([], [])  # (log times, values) in log-time order
    human: tuple[list, list] = ([], [])
    sim_info: tuple[list, list] = ([], [])
    success: tuple[list, list] = ([], [])
    action_dim: list[int] = []
    seg = _Segment(ours=None)
    closed: list[_Segment] = []
    produced = [0, 0, 0]  # rows, skipped, bad (for the error when nothing could be paired)

    def finish(s: _Segment):
        produced[0] += len(s.rows)
        produced[1] += s.skipped
        produced[2] += s.bad
        return _episode(s, obs, inter, human, sim_info, success, half_ns, has_inter, has_human, rate, action_topic)

    def on_message(topic: str, t: int, raw) -> None:
        nonlocal seg
        if topic in obs:
            latest[topic] = (t, raw)
            converted.pop(topic, None)
        if topic == INTERVENTION_TOPIC:
            _append(inter, t, bool(ts.deserialize_cdr(raw, BOOL).data))
        if topic == HUMAN_ACTION_TOPIC:
            try:
                _append(human, t, action_array(ts.deserialize_cdr(raw, JOINT_STATE), JOINT_STATE))
            except ConfigError:
                seg.bad += 1
        if topic == SIM_EPISODE_TOPIC and types[topic] == STRING:
            info = _json(ts.deserialize_cdr(raw, STRING).data)
            if isinstance(info, dict):
                _append(sim_info, t, info)
        if topic == SIM_SUCCESS_TOPIC and types[topic] == BOOL:
            _append(success, t, bool(ts.deserialize_cdr(raw, BOOL).data))
        if topic == episode_topic:
            seg.end_ns = t
            closed.append(seg)
            info = _json(ts.deserialize_cdr(raw, STRING).data) if types[topic] == STRING else None
            seg = _Segment(ours=info if _is_ours(info) else None)
        if topic == action_topic:
            on_action(t, raw)

    def on_action(t: int, raw) -> None:
        try:
            a = action_array(ts.deserialize_cdr(raw, types[action_topic]), types[action_topic])
        except ConfigError:
            seg.bad += 1
            return
        if not np.all(np.isfinite(a)):
            seg.bad += 1  # the arm bridge rejects it too: nothing was executed
            return
        if action_dim and len(a) != action_dim[0]:
            raise ConfigError("action_topic", f"an action of {len(a)} values at log time {t} ns after actions of "
                                              f"{action_dim[0]}", "import a bag with one action size")
        action_dim[:1] = [len(a)]
        row = {}
        for topic, key in obs.items():
            if topic not in latest or (max_age_ns is not None and t - latest[topic][0] > max_age_ns):
                seg.skipped += 1
                return
            if topic not in converted:
                converted[topic] = _convert(ts, topic, types[topic], latest[topic], by_topic.get(topic))
            row[key] = converted[topic]
        seg.rows.append((t, a, row))

    wanted = {action_topic, *obs, INTERVENTION_TOPIC, HUMAN_ACTION_TOPIC, SIM_EPISODE_TOPIC, SIM_SUCCESS_TOPIC,
              episode_topic}
    conns = [c for c in reader.connections if c.topic in wanted]
    group: list = []  # messages of one log time: observations first, then actions ("at or before")
    for conn, t, raw in reader.messages(connections=conns):
        if group and t != group[0][1]:
            for c, gt, graw in sorted(group, key=lambda m: m[0].topic == action_topic):
                on_message(c.topic, gt, graw)
            group = []
            while closed and (not closed[0].rows or t > closed[0].rows[-1][0] + half_ns):
                ep = finish(closed.pop(0))  # its intervention / human pairing window has passed
                if ep is not None:
                    yield ep
        group.append((conn, t, raw))
    for c, gt, graw in sorted(group, key=lambda m: m[0].topic == action_topic):
        on_message(c.topic, gt, graw)
    for s in (*closed, seg):
        ep = finish(s)
        if ep is not None:
            yield ep
    if produced[0] == 0 and produced[1] == 0:
        raise ConfigError("action_topic", f"{src}: none of the {counts[action_topic]} messages on {action_topic} is "
                                          "a finite action", f"record our action message (sensor_msgs/JointState, "
                                                             f"name={list(ACTION_NAMES)}) or nameless positions")
    if produced[0] == 0:
        raise ConfigError("topics", f"{src}: no action on {action_topic} had every observation topic before it "
                                    f"({produced[1]} skipped, {produced[2]} undecodable or not finite; observation "
                                    f"topics {sorted(obs)})",
                          "map only topics that are published before the actions (--topic-map TOPIC=KEY)"
                          + ("" if max_obs_age is None else " or raise --max-obs-age"))


def _episode(s: _Segment, obs: dict, inter, human, sim_info, success, half_ns: float, has_inter: bool,
             has_human: bool, rate: float, action_topic: str) -> Episode | None:
    """The Episode of a finished segment (None when it has no rows)."""
    if not s.rows:
        return None
    times = [r[0] for r in s.rows]
    action = np.stack([r[1] for r in s.rows]).astype(np.float32)
    data: dict[str, np.ndarray] = {"action": action}
    for topic, key in obs.items():
        vals = [r[2][key] for r in s.rows]
        shapes = {v.shape for v in vals}
        if len(shapes) > 1 or len({v.dtype for v in vals}) > 1:
            raise ConfigError("topics", f"{topic} ({key}) changes shape/dtype within an episode: {sorted(shapes)}",
                              "map topics whose messages keep one size (e.g. one publisher per JointState topic)")
        data[key] = np.stack(vals)
    flags = np.array([bool(_nearest(inter, t, half_ns, False)) for t in times]) if has_inter else None
    if flags is not None:
        data["intervention"] = flags
    if has_human:
        h = np.full(action.shape, np.nan, np.float32)
        for i, t in enumerate(times):
            if s.ours is not None or (flags is not None and flags[i]):
                v = _nearest(human, t, half_ns, None)
                if v is not None and v.shape == action.shape[1:]:
                    h[i] = v
                elif v is not None:
                    s.bad += 1
        data["human_action"] = h
    if s.ours is not None:
        meta = {k: v for k, v in dict(s.ours.get("meta") or {}).items() if k in META_FIELDS}
        if s.skipped or s.bad:  # the bag was altered after our export: say so
            meta["extra"] = {**dict(meta.get("extra") or {}), "skipped_steps": s.skipped, "bad_actions": s.bad}
        return Episode(data, meta)
    end = s.end_ns if s.end_ns is not None else math.inf
    meta: dict[str, Any] = {}
    info = _latest_before(sim_info, end)
    extra: dict[str, Any] = {}
    if info is not None:
        if isinstance(info.get("seed"), int) and not isinstance(info.get("seed"), bool):
            meta["seed"] = info["seed"]
        for k in ("task", "backend"):
            if isinstance(info.get(k), str) and info[k]:
                meta[k] = info[k]
        if "params" in info:
            extra["params"] = info["params"]
    ok = _latest_before(success, end)
    if ok is not None:
        meta["success"] = bool(ok)
    if flags is not None and flags.any():
        meta["source"] = "intervention"
    dts = np.diff(np.asarray(times, dtype=np.float64)) * 1e-9
    extra.update({"control_rate": float(rate), "action_rate": float(1.0 / np.median(dts)) if len(dts) else None,
                  "skipped_steps": s.skipped, "bad_actions": s.bad, "action_topic": action_topic,
                  "topics": dict(obs)})
    meta["extra"] = extra
    return Episode(data, meta)


def _convert(ts, topic: str, msgtype: str, latest: tuple[int, bytes], ours: tuple[str, dict] | None) -> np.ndarray:
    """Decode the latest message of an observation topic; with our export's key spec, restore dtype and shape."""
    t, raw = latest
    try:
        a = message_array(ts.deserialize_cdr(raw, msgtype), msgtype, rgb=ours is None)
        if ours is not None:
            _, spec = ours
            a = a.astype(np.dtype(spec["dtype"])).reshape(tuple(spec["shape"]))
    except ConfigError as e:
        raise ConfigError(topic, f"message at log time {t} ns: {e.field}: {e.problem}", e.fix) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(topic, f"message at log time {t} ns does not fit its key ({e})",
                          "the bag was altered after our export; import it with --topic-map") from None
    return a


def _topic_types(reader) -> dict[str, str]:
    """{topic: message type} of the bag. Raises ConfigError for a topic recorded with two types."""
    out = {}
    for topic, info in reader.topics.items():
        if info.msgtype is None:
            kinds = sorted({c.msgtype for c in info.connections})
            raise ConfigError("src", f"topic {topic} was recorded with several types {kinds}",
                              "split the bag per type (e.g. ros2 bag convert) before importing")
        out[topic] = info.msgtype
    return out


def _our_episode_info(reader, types: dict, episode_topic: str) -> dict | None:
    """Our export's first episode JSON (format tag checked), or None for other bags."""
    if not episode_topic or types.get(episode_topic) != STRING:
        return None
    conns = [c for c in reader.connections if c.topic == episode_topic]
    for _, _, raw in reader.messages(connections=conns):
        info = _json(typestore().deserialize_cdr(raw, STRING).data)
        return info if _is_ours(info) else None
    return None


def _is_ours(info) -> bool:
    return isinstance(info, dict) and info.get("format") == FORMAT_TAG and isinstance(info.get("keys"), dict)


def _topic_map(topics, types: dict, by_topic: dict | None, src: Path) -> dict[str, str]:
    """{observation topic: store key} from the option (dict or TOPIC=KEY items), our export's keys (``by_topic``,
    None for other bags) or our topics."""
    if topics is None:
        if by_topic is not None:
            out = {t: k for t, (k, _) in by_topic.items() if t in types}
        else:
            out = {}
            if types.get(JOINT_STATES_TOPIC) == JOINT_STATE:
                out[JOINT_STATES_TOPIC] = "joint_pos"
            for t in sorted(types):
                for pattern, name in _AUTO:
                    m = pattern.fullmatch(t)
                    if m and types[t] in OBS_TYPES:
                        out[t] = name.format(m.group(1))
            if not out:
                raise ConfigError("topics", f"{src} has none of our observation topics (topics: {_listing(types)})",
                                  "pass --topic-map TOPIC=KEY per observation, e.g. /joint_states=joint_pos")
    elif isinstance(topics, dict):
        out = dict(topics)
    else:
        out = parse_key_map(topics, "topics", "--topic-map /joint_states=joint_pos")
    if len(set(out.values())) != len(out):
        raise ConfigError("topics", f"two topics map to one key ({out})", "give every topic its own key")
    for t, k in out.items():
        if not isinstance(k, str) or not k or "/" in k or k.startswith((".", "__")) or k in RESERVED_KEYS:
            raise ConfigError("topics", f"{t} -> {k!r} is not a usable store key",
                              "use a name without '/' other than action, intervention and human_action "
                              "(they come from their own topics)")
        if t not in types:
            raise ConfigError("topics", f"{t} is not in {src} (topics: {_listing(types)})",
                              "map topics the bag has (ros2 bag info lists them)")
        if types[t] not in OBS_TYPES:
            raise ConfigError("topics", f"{t} carries {types[t]}", f"map topics of type {list(OBS_TYPES)}")
    return out


def _append(series: tuple[list, list], t: int, value) -> None:
    series[0].append(t)
    series[1].append(value)


def _nearest(series: tuple[list, list], t: int, half_ns: float, default):
    """Value logged nearest to ``t`` within ``half_ns`` (ties: the earlier, as the recorder's queue), else default."""
    times, values = series
    i = bisect.bisect_left(times, t)
    best = None
    for j in (i - 1, i):  # bisect_left: times[i-1] < t <= times[i]; the earliest of equal times is at i
        if 0 <= j < len(times) and (best is None or abs(times[j] - t) < abs(times[best] - t)):
            best = j
    return values[best] if best is not None and abs(times[best] - t) <= half_ns else default


def _latest_before(series: tuple[list, list], end: float):
    i = bisect.bisect_left(series[0], end)
    return series[1][i - 1] if i else None


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _listing(names, most: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "") or "none"


# --------------------------------------------------------------------------------------------------- export
def write(episodes: Iterable[Episode], dst: Path, *, action_topic: str = ACTION_TOPIC,
          control_rate: float = DEFAULT_CONTROL_RATE, storage: str = "mcap") -> dict:
    """Write ``episodes`` as one new rosbag2 bag (a directory) at ``dst``, laid out as in the module doc.

    Args:
        action_topic: topic of the ``action`` key (our arm bridge's action message).
        control_rate: Hz; steps are 1 / control_rate apart on the bag's clock.
        storage: ``mcap`` (rosbag2's default since Iron) or ``sqlite3``.

    Every episode must have the keys, dtypes and per-step shapes of the first (a store's do). Returns {path,
    episodes, steps, keys, topics}. Raises ConfigError (a bad option, a key that is not a ROS name token or does not
    fit its message, episodes that disagree); nothing is left at ``dst`` then."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    if not (isinstance(control_rate, (int, float)) and math.isfinite(control_rate) and 0 < control_rate <= 1e6):
        raise ConfigError("control_rate", f"{control_rate!r} is not a rate in (0, 1e6] Hz",
                          "pass --control-rate HZ, e.g. 10")
    if storage not in STORAGES:
        raise ConfigError("storage", f"{storage!r} is not a rosbag2 storage here", f"use one of {list(STORAGES)}")
    if not (isinstance(action_topic, str) and re.fullmatch(r"(/[A-Za-z][A-Za-z0-9_]*)+", action_topic)):
        raise ConfigError("action_topic", f"{action_topic!r} is not an absolute ROS topic name",
                          "pass e.g. --action-topic /arm_bridge/action")
    dt = max(2, round(1e9 / float(control_rate)))
    eps = max(1, min(1_000_000, dt // 10))
    ts = typestore()
    writer = Writer(Path(dst), version=9,
                    storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    writer.open()
    ok = False
    try:
        conns: dict[str, Any] = {}
        specs: dict[str, dict] = {}
        base, n_ep, n_steps = T0_NS, 0, 0
        for ep in episodes:
            data = {k: np.asarray(v) for k, v in ep.data.items()}
            if not specs:
                specs = _export_specs(data, action_topic)
                conns = {k: writer.add_connection(s["topic"], s["msgtype"], typestore=ts) for k, s in specs.items()}
                conns[EPISODE_TOPIC] = writer.add_connection(EPISODE_TOPIC, STRING, typestore=ts)
            T = _check_episode(data, specs, n_ep)
            info = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "index": n_ep, "steps": T,
                    "control_rate": float(control_rate), "action_topic": action_topic,
                    "meta": {k: ep.meta[k] for k in META_FIELDS if k in ep.meta},
                    "keys": {k: {"topic": s["topic"], "dtype": s["dtype"], "shape": s["shape"]}
                             for k, s in specs.items()}}
            text = json.dumps(info, default=_plain)
            writer.write(conns[EPISODE_TOPIC], base, _cdr(ts, ts.types[STRING](data=text), STRING))
            for i in range(T):
                t = base + (i + 1) * dt
                for k, s in specs.items():
                    if k in RESERVED_KEYS:
                        continue
                    writer.write(conns[k], t - eps, _cdr(ts, _obs_msg(ts, s, data[k][i], t - eps), s["msgtype"]))
                writer.write(conns["action"], t, _cdr(ts, _action_msg(ts, data["action"][i], t - eps), JOINT_STATE))
                if "intervention" in specs:
                    writer.write(conns["intervention"], t, _cdr(ts, ts.types[BOOL](data=bool(data["intervention"][i])),
                                                                BOOL))
                if "human_action" in specs and not np.all(np.isnan(data["human_action"][i])):
                    writer.write(conns["human_action"], t,
                                 _cdr(ts, _action_msg(ts, data["human_action"][i], t - eps), JOINT_STATE))
            base += (T + 2) * dt  # one silent period between the last action and the next episode message
            n_ep += 1
            n_steps += T
        ok = True
    finally:
        if ok:
            writer.close()
        else:
            writer.abort()
            shutil.rmtree(dst, ignore_errors=True)
    return {"path": str(dst), "episodes": n_ep, "steps": n_steps, "keys": list(specs),
            "topics": {k: s["topic"] for k, s in specs.items()}}


def _export_specs(data: dict[str, np.ndarray], action_topic: str) -> dict[str, dict]:
    """{key: topic, msgtype, dtype, per-step shape} from the first episode. Raises ConfigError for a key that cannot
    be a topic or an array no message here holds."""
    if "action" not in data or data["action"].ndim != 2:
        raise ConfigError("action", f"expected (T, A), got {data.get('action', np.zeros(0)).shape}",
                          "export a store with an action key of one vector per step")
    specs = {}
    for k, v in data.items():
        shape = list(v.shape[1:])
        if k == "action":
            topic, msgtype = action_topic, JOINT_STATE
        elif k == "intervention":
            topic, msgtype = INTERVENTION_TOPIC, BOOL
        elif k == "human_action":
            topic, msgtype = HUMAN_ACTION_TOPIC, JOINT_STATE
        elif k.startswith("image_") and is_image(v.dtype, tuple(shape)):
            topic, msgtype = IMAGE_TOPIC.format(camera=_token(k[len("image_"):], k)), IMAGE
        else:
            kind = "float32" if v.dtype == np.float16 else "uint8" if v.dtype == np.bool_ else v.dtype.name
            msgtype = next((m for m, d in MULTIARRAY.items() if d == np.dtype(kind) and "Byte" not in m), None)
            if msgtype is None:
                raise ConfigError(f"data[{k!r}]", f"dtype {v.dtype} has no std_msgs array message",
                                  "export numeric keys (float, int, uint, bool)")
            topic = OBS_TOPIC.format(key=_token(k, k))
        if k in ("intervention",) and (v.dtype != np.bool_ or shape):
            raise ConfigError("data['intervention']", f"expected bool (T,), got {v.dtype} {v.shape}",
                              "export a store (its intervention is a per-step flag)")
        specs[k] = {"topic": topic, "msgtype": msgtype, "dtype": v.dtype.name, "shape": shape}
    return specs


def _token(name: str, key: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ConfigError(f"data[{key!r}]", f"{name!r} cannot be part of a ROS topic name",
                          "rename the key with --map KEY=name (letters, digits and _, starting with a letter)")
    return name


def _check_episode(data: dict[str, np.ndarray], specs: dict[str, dict], index: int) -> int:
    """Number of steps of an episode after checking it against the first episode's keys. Raises ConfigError."""
    if set(data) != set(specs):
        raise ConfigError("data", f"episode {index} has keys {sorted(data)}, the first had {sorted(specs)}",
                          "export episodes with one schema (one store)")
    T = len(data["action"])
    for k, s in specs.items():
        v = data[k]
        if v.dtype.name != s["dtype"] or list(v.shape[1:]) != s["shape"] or len(v) != T:
            raise ConfigError(f"data[{k!r}]", f"episode {index}: {v.dtype} {v.shape}, expected {s['dtype']} "
                                              f"(T={T}, {', '.join(map(str, s['shape']))})",
                              "export episodes with one schema (one store)")
    if T == 0:
        raise ConfigError("data", f"episode {index} has no steps", "export episodes with at least one step")
    return T


def _stamp(ts, t_ns: int):
    return ts.types["builtin_interfaces/msg/Time"](sec=int(t_ns // 1_000_000_000), nanosec=int(t_ns % 1_000_000_000))


def _header(ts, t_ns: int, frame_id: str = ""):
    return ts.types["std_msgs/msg/Header"](stamp=_stamp(ts, t_ns), frame_id=frame_id)


def _action_msg(ts, a: np.ndarray, stamp_ns: int):
    """Our action message: JointState, names ACTION_NAMES for a 5-D action (else none), position float64."""
    pos = np.asarray(a, dtype=np.float64).reshape(-1)
    names = list(ACTION_NAMES) if pos.size == len(ACTION_NAMES) else []
    empty = np.zeros(0, np.float64)
    return ts.types[JOINT_STATE](header=_header(ts, stamp_ns), name=names, position=pos, velocity=empty, effort=empty)


def _obs_msg(ts, spec: dict, v: np.ndarray, t_ns: int):
    if spec["msgtype"] == IMAGE:
        h, w, c = v.shape
        cam = spec["topic"].split("/")[2]
        return ts.types[IMAGE](header=_header(ts, t_ns, f"{cam}_optical_frame"), height=h, width=w,
                               encoding={3: "rgb8", 4: "rgba8", 1: "mono8"}[c], is_bigendian=0, step=w * c,
                               data=np.ascontiguousarray(v, dtype=np.uint8).reshape(-1))
    dims, stride = [], int(np.prod(v.shape, dtype=np.int64))
    dim_t = ts.types["std_msgs/msg/MultiArrayDimension"]
    for i, n in enumerate(v.shape):
        dims.append(dim_t(label=f"dim{i}", size=int(n), stride=stride))
        stride //= max(1, int(n))
    layout = ts.types["std_msgs/msg/MultiArrayLayout"](dim=dims, data_offset=0)
    return ts.types[spec["msgtype"]](layout=layout, data=np.asarray(v).astype(MULTIARRAY[spec["msgtype"]]).reshape(-1))


def _cdr(ts, msg, msgtype: str) -> bytes:
    return bytes(ts.serialize_cdr(msg, msgtype))


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
