"""rosbag2 converter (robot_rl.datasets.formats.rosbag2, through the rosbags library; no ROS nodes, no DDS): the
fixture bag recorded on our topics imports with the recorder's pairing rule; ours -> MCAP -> ours is bit-identical;
sqlite3 bags import the same; bad input gets a one-line error naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from robot_rl.datasets.formats import Episode, export_dataset, import_dataset
from robot_rl.datasets.formats import rosbag2
from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError
from test_format_diffusion_policy import assert_same_store, make_store

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "rosbag2_tiny"
sys.path.insert(0, str(FIXTURES))
import make_rosbag2_tiny as gen  # noqa: E402

TOPICS = {"/joint_states": "joint_pos", "/cameras/front/image_raw": "image_front"}


def expected_rows():
    """The fixture's rows by the recorder's rule, computed straight from the generator's message list."""
    msgs = gen.messages()
    rows = []
    skipped = bad = 0
    for i, t_ms in enumerate(gen.ACTION_MS):
        t = t_ms * gen.MS
        a = gen.action(i)
        if not np.all(np.isfinite(a)):
            bad += 1
            continue
        js = [v for topic, tm, _, v in msgs if topic == "/joint_states" and tm <= t]  # at or before, ties too
        img = [v for topic, tm, _, v in msgs if topic == "/cameras/front/image_raw" and tm <= t]
        if not js or not img:
            skipped += 1
            continue
        flag = [v for topic, tm, _, v in msgs if topic == "/robot_rl/intervention" and abs(tm - t) <= 50 * gen.MS]
        inter = bool(flag[0]) if flag else False
        hum = [v for topic, tm, _, v in msgs if topic == "/robot_rl/human_action" and abs(tm - t) <= 50 * gen.MS]
        human = hum[0] if inter and hum else np.full(5, np.nan)
        rows.append((a, js[-1], img[-1], inter, human))
    return rows, skipped, bad


def test_fixture_recorded_on_our_topics_pairs_like_the_recorder(tmp_path):
    rows, skipped, bad = expected_rows()
    assert (len(rows), skipped, bad) == (10, 1, 1)
    r = import_dataset("rosbag2", FIXTURE, tmp_path / "s.zarr", topics=TOPICS, progress=False)
    assert r["episodes"] == 1 and r["steps"] == len(gen.ACTION_MS) - skipped - bad
    st = ZarrStore.open(tmp_path / "s.zarr")
    d = st.get_episode(0)
    assert sorted(d) == ["action", "human_action", "image_front", "intervention", "joint_pos"]
    assert d["action"].dtype == np.float32 and np.array_equal(d["action"], np.stack([r[0] for r in rows]).astype("f4"))
    assert d["joint_pos"].dtype == np.float32 and d["joint_pos"].shape == (10, 9)
    assert np.array_equal(d["joint_pos"], np.stack([r[1] for r in rows]).astype(np.float32))
    assert d["image_front"].dtype == np.uint8 and np.array_equal(d["image_front"], np.stack([r[2] for r in rows]))
    assert d["intervention"].tolist() == [r[3] for r in rows] and d["intervention"].sum() == 3
    assert np.array_equal(d["human_action"], np.stack([r[4] for r in rows]).astype(np.float32), equal_nan=True)
    # the joint states logged at the actions' own times (written after them) count as "at or before"
    assert d["joint_pos"][0, 0] == np.float32(0.01 * 4)  # action at 200 ms <- joint state at 200 ms (k = 4)
    m = st.episode_meta(0)
    assert (m["seed"], m["task"], m["backend"], m["success"], m["source"]) == (7, "place", "mujoco", True,
                                                                                "intervention")
    assert m["extra"]["skipped_steps"] == 1 and m["extra"]["bad_actions"] == 1
    assert m["extra"]["params"] == gen.EPISODE["params"] and m["extra"]["action_rate"] == pytest.approx(10.0)
    assert m["extra"]["imported_from"] == "rosbag2"
    # without a map: our topics are found by name (same keys here); a single .mcap file reads like the directory
    auto = list(rosbag2.read(next(FIXTURE.glob("*.mcap"))))
    assert len(auto) == 1 and all(np.array_equal(auto[0].data[k], d[k], equal_nan=True) for k in d)
    # max_obs_age: the recorder's staleness rule (the frames are 70 ms old at each action)
    assert len(next(rosbag2.read(FIXTURE, topics=TOPICS, max_obs_age=0.08)).data["action"]) == 10
    with pytest.raises(ConfigError, match="--max-obs-age") as e:
        next(rosbag2.read(FIXTURE, topics=TOPICS, max_obs_age=0.06))
    assert e.value.field == "topics" and "11 skipped" in e.value.problem


def test_conversions_of_other_encodings_and_the_action_names():
    ts = rosbag2.typestore()
    Ty = ts.types
    hdr = Ty["std_msgs/msg/Header"](stamp=Ty["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="")
    rgb = gen.frame(3)
    for enc, arr in (("bgr8", rgb[:, :, ::-1]), ("rgba8", np.concatenate([rgb, rgb[:, :, :1]], axis=2))):
        pad = np.zeros((gen.H, 2), np.uint8)  # step > width * channels: row padding is dropped
        data = np.concatenate([arr.reshape(gen.H, -1), pad], axis=1).reshape(-1)
        m = Ty["sensor_msgs/msg/Image"](header=hdr, height=gen.H, width=gen.W, encoding=enc, is_bigendian=0,
                                        step=gen.W * arr.shape[2] + 2, data=data)
        assert np.array_equal(rosbag2.image_array(m), rgb), enc
    m = Ty["sensor_msgs/msg/Image"](header=hdr, height=2, width=2, encoding="16UC1", is_bigendian=0, step=4,
                                    data=np.zeros(8, np.uint8))
    with pytest.raises(ConfigError, match="image.encoding"):
        rosbag2.image_array(m)
    pose = Ty["geometry_msgs/msg/PoseStamped"](header=hdr, pose=Ty["geometry_msgs/msg/Pose"](
        position=Ty["geometry_msgs/msg/Point"](x=1.0, y=2.0, z=3.0),
        orientation=Ty["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.6, w=0.8)))
    assert rosbag2.message_array(pose, rosbag2.POSE).tolist() == pytest.approx([1, 2, 3, 0, 0, 0.6, 0.8])
    try:  # the action message's names are robot_rl.ros.common's (that module needs the [ros] extra's rclpy)
        from robot_rl.ros.common import ACTION_NAMES
    except Exception:  # noqa: BLE001
        ACTION_NAMES = rosbag2.ACTION_NAMES
    assert rosbag2.ACTION_NAMES == ACTION_NAMES


def test_ours_to_mcap_to_ours_is_bit_identical(tmp_path):
    st = make_store(tmp_path / "a.zarr")  # action, ee_pos, gripper_width, image_front, intervention, human_action
    r = export_dataset("rosbag2", tmp_path / "a.zarr", tmp_path / "bag")
    assert r["episodes"] == 3 and r["steps"] == st.n_steps
    assert [p.suffix for p in sorted((tmp_path / "bag").iterdir())] == [".mcap", ".yaml"]
    # what a ROS user sees: our topics and message types
    from rosbags.rosbag2 import Reader

    with Reader(tmp_path / "bag") as rd:
        types = {t: i.msgtype for t, i in rd.topics.items()}
        counts = {t: i.msgcount for t, i in rd.topics.items()}
        first = next(raw for c, _, raw in rd.messages() if c.topic == "/arm_bridge/action")
    assert types == {"/arm_bridge/action": "sensor_msgs/msg/JointState",
                     "/cameras/front/image_raw": "sensor_msgs/msg/Image",
                     "/robot_rl/obs/ee_pos": "std_msgs/msg/Float32MultiArray",
                     "/robot_rl/obs/gripper_width": "std_msgs/msg/Float32MultiArray",
                     "/robot_rl/intervention": "std_msgs/msg/Bool",
                     "/robot_rl/human_action": "sensor_msgs/msg/JointState",
                     "/robot_rl/episode": "std_msgs/msg/String"}
    assert counts["/robot_rl/episode"] == 3 and counts["/arm_bridge/action"] == st.n_steps
    assert counts["/robot_rl/human_action"] == int(np.isfinite(st["human_action"][:][:, 0]).sum())
    msg = rosbag2.typestore().deserialize_cdr(first, "sensor_msgs/msg/JointState")
    assert list(msg.name) == list(rosbag2.ACTION_NAMES)
    assert np.array_equal(np.asarray(msg.position, np.float32), st["action"][0])
    import_dataset("rosbag2", tmp_path / "bag", tmp_path / "b.zarr", progress=False)
    assert_same_store(st, ZarrStore.open(tmp_path / "b.zarr"))

    # every dtype / per-step shape, a 7-D action (nameless JointState), mono and RGBA frames, no intervention
    rng = np.random.default_rng(1)
    odd = ZarrStore.create(tmp_path / "odd.zarr")
    for e, T in enumerate((5, 4)):
        odd.add_episode({"action": rng.normal(size=(T, 7)).astype(np.float32),
                         "q64": rng.normal(size=(T, 2, 3)), "count": rng.integers(-9, 9, (T,), dtype=np.int32),
                         "flags": rng.random((T, 2)) > 0.5, "half": rng.normal(size=(T, 4)).astype(np.float16),
                         "big": rng.integers(0, 2**63, (T, 1), dtype=np.uint64),
                         "image_depth": rng.integers(0, 256, (T, 5, 7, 1), dtype=np.uint8),
                         "image_wrist": rng.integers(0, 256, (T, 5, 7, 4), dtype=np.uint8)},
                        seed=e, task="lift", source="policy", success=bool(e), backend="pybullet", robot="panda",
                        extra={"note": "odd", "n": e})
    export_dataset("rosbag2", tmp_path / "odd.zarr", tmp_path / "odd_bag", control_rate=30.0,
                   action_topic="/policy/action")
    import_dataset("rosbag2", tmp_path / "odd_bag", tmp_path / "odd2.zarr", progress=False)
    assert_same_store(ZarrStore.open(tmp_path / "odd.zarr"), ZarrStore.open(tmp_path / "odd2.zarr"))


def test_sqlite3_bags_import_too(tmp_path):
    mcap = list(rosbag2.read(FIXTURE, topics=TOPICS))
    lite = gen.write_bag(tmp_path / "tiny_sqlite", storage="sqlite3")
    assert next(lite.glob("*.db3"))
    got = list(rosbag2.read(lite, topics=TOPICS))
    assert len(got) == len(mcap) == 1 and got[0].meta == mcap[0].meta
    for k, v in mcap[0].data.items():
        assert got[0].data[k].dtype == v.dtype and np.array_equal(got[0].data[k], v, equal_nan=True), k
    # our export as sqlite3 reads back identically as well
    st = make_store(tmp_path / "a.zarr", n_episodes=2)
    export_dataset("rosbag2", tmp_path / "a.zarr", tmp_path / "bag_sqlite", storage="sqlite3")
    assert next((tmp_path / "bag_sqlite").glob("*.db3"))
    import_dataset("rosbag2", tmp_path / "bag_sqlite", tmp_path / "b.zarr", progress=False)
    assert_same_store(st, ZarrStore.open(tmp_path / "b.zarr"))


def test_bad_input_names_the_field(tmp_path):
    (tmp_path / "not_a_bag").mkdir()
    (tmp_path / "not_a_bag" / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="rosbag2") as e:
        import_dataset("rosbag2", tmp_path / "not_a_bag", tmp_path / "x.zarr", progress=False)
    assert e.value.field == "src" and "metadata.yaml" in e.value.fix
    with pytest.raises(ConfigError) as e:  # the fixture has no /policy/action
        next(rosbag2.read(FIXTURE, action_topic="/policy/action"))
    assert e.value.field == "action_topic" and "--action-topic" in e.value.fix and "/arm_bridge/action" in str(e.value)
    with pytest.raises(ConfigError, match="finite action") as e:  # joint states are not our action message
        next(rosbag2.read(FIXTURE, action_topic="/joint_states", topics=TOPICS))
    assert e.value.field == "action_topic" and "ee_dx" in e.value.fix
    with pytest.raises(ConfigError, match="/cameras/left/image_raw is not in") as e:
        next(rosbag2.read(FIXTURE, topics={"/cameras/left/image_raw": "image_left"}))
    assert e.value.field == "topics"
    with pytest.raises(ConfigError, match="action") as e:  # the action comes from its own topic
        next(rosbag2.read(FIXTURE, topics=["/joint_states=action"]))
    assert e.value.field == "topics"
    with pytest.raises(ConfigError, match="control_rate"):
        next(rosbag2.read(FIXTURE, control_rate=0.0))
    with pytest.raises(ConfigError) as e:  # an import option the format does not take
        import_dataset("rosbag2", FIXTURE, tmp_path / "y.zarr", vcodec="libx264", progress=False)
    assert e.value.field == "vcodec"
    # export: a key that cannot be a ROS topic name; nothing is left behind
    bad = [Episode({"action": np.zeros((2, 5), np.float32), "ee-pos": np.zeros((2, 3), np.float32)}, {})]
    with pytest.raises(ConfigError, match="--map") as e:
        rosbag2.write(bad, tmp_path / "bad_bag")
    assert e.value.field == "data['ee-pos']" and not (tmp_path / "bad_bag").exists()
    with pytest.raises(ConfigError) as e:
        rosbag2.write(bad, tmp_path / "bad_bag", storage="bag1")
    assert e.value.field == "storage"
