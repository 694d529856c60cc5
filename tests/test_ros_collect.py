"""Teleop collection over real DDS: a scripted Twist publisher -> teleop node (takeover mux in front of a stand-in
policy) -> arm bridge -> sim_robot, while the recorder writes episodes to a zarr store that ``robot-rl train-base``
accepts. Keys are the sim env's keys; interventions and the human's actions are flagged per step."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from ros_helpers import ros  # noqa: F401 (pytest fixture)


def test_twist_teleop_recorder_store_trains(ros):
    from geometry_msgs.msg import Twist
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64, Float64MultiArray
    from std_srvs.srv import Trigger

    from robot_rl.envs.env import make_env
    from robot_rl.ros.common import COMMAND_QOS, action_to_msg
    from robot_rl.datasets.store import ZarrStore

    drv, start, tmp = ros
    store = tmp / "teleop.zarr"
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "cameras": ["front"], "seed": 7})
    start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
    start("robot_rl.hw_drivers.teleop", {"policy_action_topic": "/policy/action"})
    start("robot_rl.ros.recorder", {"store": str(store), "cameras": ["front"], "source": "teleop"})
    twist = drv.node.create_publisher(Twist, "/teleop/twist", COMMAND_QOS)
    grip = drv.node.create_publisher(Float64, "/teleop/gripper", COMMAND_QOS)
    policy = drv.node.create_publisher(JointState, "/policy/action", COMMAND_QOS)
    drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
    for pub in (twist, grip, policy):  # DDS discovery: messages published before a match are lost
        drv.wait_for(lambda: pub.get_subscription_count() > 0, 30, f"a subscriber on {pub.topic_name}")
    drv.wait_for(lambda: drv.node.count_subscribers("/arm_bridge/action") >= 3, 30, "bridge + recorder")

    def drive(seconds, vel=None, policy_action=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if vel is not None:
                t = Twist()
                t.linear.x, t.linear.y, t.linear.z = vel
                twist.publish(t)
            if policy_action is not None:
                policy.publish(action_to_msg(policy_action, drv.node.get_clock().now().to_msg()))
            drv.spin(0.05)

    # DDS matches each publisher/subscriber pair on its own, so the graph can list a subscriber before the teleop's
    # publisher delivers to it: wait until teleop actions really reach the bridge (its commands appear) and the
    # recorder (it has steps to discard), else the first episode loses its first second
    drv.subscribe(Float64MultiArray, "/arm_controller/commands", COMMAND_QOS)
    deadline = time.monotonic() + 30
    while True:
        assert drv.call(Trigger, "/recorder/start").success
        drv.last.pop("/arm_controller/commands", None)
        drive(0.5, policy_action=[0.0, 0.0, 0.0, 0.0, -1.0])
        steps = int(drv.call(Trigger, "/recorder/discard").message.split()[1])
        if steps > 0 and "/arm_controller/commands" in drv.last:
            break
        assert time.monotonic() < deadline, "teleop actions never reached the bridge and the recorder"
    drv.call(Trigger, "/sim_robot/reset")

    lengths, stops, executed = [], [], []
    for ep in range(3):
        assert drv.call(Trigger, "/recorder/start").success
        t_start = time.monotonic()
        drive(1.0, policy_action=[0.0, 0.0, 0.3, 0.0, -1.0])      # the policy drives (up)
        drive(1.0, vel=(0.05, 0.0, -0.05))                       # the human takes over (forward, down)
        grip.publish(Float64(data=1.0))
        drive(0.6, vel=(0.0, 0.0, 0.0))                          # human closes the gripper
        drive(0.8, policy_action=[0.0, 0.0, 0.0, 0.0, 1.0])      # back to the policy after the takeover timeout
        if ep == 1:
            assert drv.call(Trigger, "/recorder/discard").success
            continue
        t_stop = time.monotonic()
        r = drv.call(Trigger, "/recorder/stop")
        assert r.success, r.message
        stops.append(json.loads(r.message))  # index, length, success, source, skipped_steps
        lengths.append(stops[-1]["length"])
        executed.append(sum(t_start <= t <= t_stop for t, _ in drv.log["/arm_bridge/action"]))
        drv.call(Trigger, "/sim_robot/reset")

    st = ZarrStore.open(store)
    assert st.n_episodes == 2 and [m["length"] for m in st.episodes_meta()] == lengths
    # every action the bridge executed while recording is a row, or a step skipped for a stale input and counted
    # (+-2 for messages in flight at start and stop; before the warm-up above the first episode lost its first
    # second). ~34 rows on an idle machine (3.4 s at 10 Hz); a loaded CI host sends fewer actions (7 Hz) and can
    # starve the camera (CI with a training run beside it: 35 and 15 rows, the camera image stale for the rest)
    assert all(abs(s["length"] + s["skipped_steps"] - n) <= 2 for s, n in zip(stops, executed)), (stops, executed)
    assert all(10 <= n <= 40 for n in lengths), stops
    assert [p for p in st.validate() if p.startswith("error")] == []
    env = make_env("place", cameras=("front",))
    assert set(st.keys) == set(env.observation_space.spaces) | {"action", "intervention", "human_action"}
    for k, sp in env.observation_space.spaces.items():
        assert st.schema[k]["shape"] == sp.shape and st.schema[k]["dtype"] == str(sp.dtype), k
    m = st.episode_meta(0)
    assert m["source"] == "intervention" and m["backend"] == "pybullet" and m["seed"] == 8
    assert "target_xy" in m["extra"]["params"]
    ep = st.get_episode(0)
    inter = ep["intervention"]
    assert 5 <= inter.sum() < len(inter)  # the human's stretch, not the policy's
    assert np.all(np.isfinite(ep["human_action"][inter])) and np.all(np.isnan(ep["human_action"][~inter]))
    # the human moved the tool forward and down: positive x, negative z actions while intervening
    assert ep["action"][inter][:, 0].max() > 0.1 and ep["action"][inter][:, 2].min() < -0.1
    # ... and the robot followed: up while the policy drove, then forward and down during the takeover
    i0, i1 = np.flatnonzero(inter)[[0, -1]]
    up, takeover = ep["ee_pos"][i0] - ep["ee_pos"][0], ep["ee_pos"][i1] - ep["ee_pos"][i0]
    # (the distance covered depends on how many 10 Hz steps a loaded machine executes in the 1 s takeover: CI saw
    # 13 mm where an idle machine gives ~30 mm, so the check is the direction — well clear of zero, and along x and
    # -z rather than y — not the distance; the same for the policy's 1 s up: a clean-clone CI run whose test driver
    # was starved held the arm twice on the bridge's watchdog in it and rose 2.8 mm, 1.3e-4 m sideways; an arm that
    # did not follow moves ~1e-4 m)
    assert up[2] > 0.002 and abs(up[:2]).max() < 0.3 * up[2], up
    assert takeover[0] > 0.005 and takeover[2] < -0.005, takeover
    assert abs(takeover[1]) < 0.3 * min(takeover[0], -takeover[2]), takeover
    assert ep["image_front"].shape[1:] == (96, 96, 3) and ep["image_front"].std() > 5

    out = tmp / "base"
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "train-base", "--store", str(store), "--out", str(out),
                        "--kind", "bc", "--steps", "3", "--batch-size", "8"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoint" / "model.safetensors").exists()


def test_recorder_pairs_each_action_with_the_observation_it_acts_on(tmp_path, monkeypatch):
    """The recorder's (obs_t, a_t) pairing, driven message by message on a real recorder node with a controlled
    clock: every decodable, finite action gives one row whose observation is the state received before it —
    irregular arrival (two in one period, none in the next) neither drops, duplicates nor invents a step; bad and
    NaN actions are counted and give no row; intervention flag and human action are the ones sent with the action
    (nearest within half a period), NaN human action outside interventions."""
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import JointState
    from std_srvs.srv import Trigger

    from robot_rl.ros import recorder as rec
    from robot_rl.ros.common import action_to_msg
    from robot_rl.robot.scene import RobotSpec
    from robot_rl.datasets.store import ZarrStore

    rclpy = pytest.importorskip("rclpy")
    clock = [100.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: clock[0])
    store = tmp_path / "aligned.zarr"
    rclpy.init(args=["recorder", "--ros-args", "-p", f"store:={store}", "-p", "record_privileged:=false",
                     "-p", "task.name:=lift", "-p", "source:=teleop"])
    spec = RobotSpec()

    def joints(k):  # joint 1 encodes the state index k
        m = JointState()
        m.name = [*spec.arm_joints, *spec.finger_joints]
        m.position = [spec.q_home[0], spec.q_home[1] + 0.01 * k, *spec.q_home[2:], 0.02, 0.02]
        m.velocity = [0.0] * len(m.name)
        return m

    try:
        node = rec.make_node()
        assert node._on_start(Trigger.Request(), Trigger.Response()).success
        # (time, state k published just before, action x or "bad"/"nan", intervention?)
        events = [(100.00, 0, 0.0, False), (100.10, 1, 1.0, False), (100.19, 2, 2.0, True), (100.21, 3, 3.0, True),
                  (100.40, 4, "bad", False), (100.41, 4, "nan", False), (100.42, 4, 4.0, False)]
        for t, k, x, inter in events:
            clock[0] = t - 0.005
            node.js.update(joints(k), clock[0])
            clock[0] = t
            if inter:  # the teleop mux sends the flag and the human action in the same tick as the action
                node.queued["intervention"].append((t - 0.001, True))
                node._queue("human", action_to_msg([10.0 + x, 0, 0, 0, 1.0], Time()))
            else:
                node.queued["intervention"].append((t - 0.001, False))
            m = action_to_msg([0.0 if x in ("bad", "nan") else x, 0, 0, 0, 1.0], Time())
            if x == "bad":
                m.position = [0.0, 0.0]  # undecodable: 2 values for 5 names
            elif x == "nan":
                m.position = [float("nan")] + list(m.position[1:])
            node._on_action(m)
            clock[0] = t + 0.06
            node._tick()  # completes rows older than half a period
        r = node._on_stop(Trigger.Request(), Trigger.Response())
        assert r.success, r.message
        node.destroy_node()
    finally:
        rclpy.shutdown()
    st = ZarrStore.open(store)
    ep = st.get_episode(0)
    assert ep["action"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert np.allclose(ep["joint_pos"][:, 1] - spec.q_home[1], 0.01 * np.arange(5), atol=1e-6)
    assert ep["intervention"].tolist() == [False, False, True, True, False]
    assert ep["human_action"][2:4, 0].tolist() == [12.0, 13.0] and np.isnan(ep["human_action"][[0, 1, 4]]).all()
    meta = st.episodes_meta()[0]
    assert meta["extra"]["bad_actions"] == 2 and meta["source"] == "intervention"
