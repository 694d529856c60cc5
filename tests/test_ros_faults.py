"""Fault handling over real DDS (nodes in separate processes):
- the policy server is SIGKILLed mid-episode -> the policy node holds the arm within one control period (+ the
  step deadline) and sends no further action; a restarted server is picked up again;
- the camera (the OpenCV camera node reading a real video file) stops -> the policy node holds once the newest
  image is older than ``max_obs_age``; the camera node's reconnect is reported on /diagnostics."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ros_helpers import make_video, ros  # noqa: F401 (pytest fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "place_bc_mujoco"
PERIOD, DEADLINE = 0.1, 0.05


def start_server(checkpoint, port=0):
    p = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "serve", "--checkpoint",
                          str(checkpoint), "--port", str(port), "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    for line in p.stdout:
        m = re.search(r"listening on tcp://[^:]+:(\d+)", line)
        if m:
            return p, int(m.group(1))
        if time.monotonic() - t0 > 60:
            break
    p.kill()
    raise AssertionError("policy server did not start")


def test_server_killed_mid_episode_holds_within_one_period(ros):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Empty

    from robot_rl.ros.common import COMMAND_QOS

    drv, start, tmp = ros
    server, port = start_server(FIXTURE)
    try:
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet"})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "server_timeout": DEADLINE,
                                           "autostart": True})
        drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
        drv.subscribe(Empty, "/arm_bridge/hold", COMMAND_QOS, keep=True)
        drv.wait_for(lambda: len(drv.log.get("/arm_bridge/action", [])) >= 15, 60, "actions from the server")
        drv.spin(0.03)
        t_kill = time.monotonic()
        server.send_signal(signal.SIGKILL)
        server.wait()
        drv.wait_for(lambda: any(t > t_kill for t, _ in drv.log.get("/arm_bridge/hold", [])), 5, "hold")
        t_hold = min(t for t, _ in drv.log["/arm_bridge/hold"] if t > t_kill)
        drv.spin(1.0)
        late = [t for t, _ in drv.log["/arm_bridge/action"] if t > t_kill + 0.01]
        # the next tick (<= 1 period away) misses its deadline and holds; DDS delivery adds a few ms
        assert t_hold - t_kill <= PERIOD + DEADLINE + 0.05, t_hold - t_kill
        assert late == [], f"{len(late)} actions after the server died"
        # a server restarted on the same port is picked up (session re-created from the last frames)
        server, _ = start_server(FIXTURE, port)
        n = len(drv.log["/arm_bridge/action"])
        drv.wait_for(lambda: len(drv.log["/arm_bridge/action"]) > n + 5, 30, "actions after the restart")
    finally:
        server.kill()
        server.wait()


def image_policy(tmp: Path, obs_dims=None, image_keys=("image_front",), image_size=(96, 96),
                 name: str = "image_policy") -> Path:
    """An untrained (finite, tiny) BC policy that needs ``image_keys`` + ``obs_dims`` (default: image_front +
    ee_pos, 96x96): enough to exercise the camera path."""
    import torch

    from robot_rl.policies import make_policy
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.policies.checkpoint import save_policy

    torch.manual_seed(0)
    obs_dims = obs_dims or {"ee_pos": 3}
    cfg = PolicyConfig(kind="bc", obs_keys=list(obs_dims), obs_dims=obs_dims, image_keys=list(image_keys),
                       image_shape=[*image_size, 3], action_dim=5, image_channels=[8, 8, 8], image_num_keypoints=8,
                       image_feature_dim=8, bc_hidden=[16], n_groups=4)
    pol = make_policy(cfg)
    with torch.no_grad():
        for p in pol.parameters():
            p.mul_(0.01)  # near-zero actions: the arm barely moves
    return save_policy(pol, tmp / name)


def test_camera_stops_policy_holds_after_age_limit(ros):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
    from std_msgs.msg import Empty

    from robot_rl.ros.common import COMMAND_QOS, SENSOR_QOS

    drv, start, tmp = ros
    video = tmp / "front.avi"
    make_video(video, width=192, height=144)  # not square: width/height order matters
    calib = tmp / "calib.yaml"
    calib.write_text("image_width: 192\nimage_height: 144\ncamera_name: front\n"
                     "camera_matrix: {rows: 3, cols: 3, data: [200, 0, 96, 0, 200, 72, 0, 0, 1]}\n"
                     "distortion_model: plumb_bob\ndistortion_coefficients: {rows: 1, cols: 5, data: [0, 0, 0, 0, 0]}\n")
    max_age = 0.3
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet"})
    start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
    cam = start("robot_rl.hw_drivers.camera", {"source": str(video), "camera_name": "front", "rate": 10.0,
                                               "output_width": 96, "output_height": 96,
                                               "calibration_file": str(calib)})
    start("robot_rl.ros.policy_node", {"checkpoint": str(image_policy(tmp)), "max_obs_age": max_age,
                                       "autostart": True})
    drv.subscribe(Image, "/cameras/front/image_raw", SENSOR_QOS, keep=True)
    drv.subscribe(CompressedImage, "/cameras/front/image_raw/compressed", SENSOR_QOS)
    drv.subscribe(CameraInfo, "/cameras/front/camera_info", SENSOR_QOS)
    drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
    drv.subscribe(Empty, "/arm_bridge/hold", COMMAND_QOS, keep=True)
    drv.wait_for(lambda: len(drv.log.get("/arm_bridge/action", [])) >= 10, 60, "actions from the image policy")
    img = drv.last["/cameras/front/image_raw"][1]
    assert (img.height, img.width, img.encoding) == (96, 96, "rgb8")
    info = drv.last["/cameras/front/camera_info"][1]
    assert (info.height, info.width) == (96, 96)
    # intrinsics scaled from the calibrated 192 x 144 to the published 96 x 96
    assert [info.k[i] for i in (0, 2, 4, 5)] == pytest.approx([100.0, 48.0, 200 * 96 / 144, 48.0])
    assert bytes(drv.last["/cameras/front/image_raw/compressed"][1].data[:2]) == b"\xff\xd8"  # JPEG
    cam.kill()  # the stream stops
    t_last_img = drv.last["/cameras/front/image_raw"][0]
    drv.wait_for(lambda: any(t > t_last_img for t, _ in drv.log.get("/arm_bridge/hold", [])), 5, "hold")
    t_hold = min(t for t, _ in drv.log["/arm_bridge/hold"] if t > t_last_img)
    assert t_hold - t_last_img <= max_age + PERIOD + 0.1, t_hold - t_last_img
    drv.spin(0.5)
    assert not [t for t, _ in drv.log["/arm_bridge/action"] if t > t_hold + 0.01]

    # a camera whose source disappears reports it and keeps trying to reconnect
    diags = {}
    drv.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.update(
        {s.name: (s.level, {kv.key: kv.value for kv in s.values}) for s in m.status}), COMMAND_QOS)
    gone = tmp / "gone.avi"
    make_video(gone, n=3)
    start("robot_rl.hw_drivers.camera", {"source": str(gone), "camera_name": "wrist", "rate": 30.0, "loop": False,
                                         "reconnect_period": 0.2}, name="camera_wrist")
    drv.wait_for(lambda: "camera: wrist" in diags and int(diags["camera: wrist"][1]["reconnects"]) >= 2
                 and diags["camera: wrist"][0] in (b"\x02", 2), 20, "camera ERROR + reconnect diagnostics")


def test_estop_latches_until_cleared_and_reactivated(ros):
    """~/estop holds at once; ~/clear_estop alone does not resume (the node stays holding); activate is refused
    while the latch is set; clear + deactivate + activate resumes with a new episode."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Empty
    from std_srvs.srv import Trigger

    from robot_rl.ros.common import COMMAND_QOS

    drv, start, tmp = ros
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet"})
    start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
    start("robot_rl.ros.policy_node", {"checkpoint": str(FIXTURE), "autostart": True})
    drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
    drv.subscribe(Empty, "/arm_bridge/hold", COMMAND_QOS, keep=True)
    actions = lambda: drv.log.get("/arm_bridge/action", [])  # noqa: E731
    drv.wait_for(lambda: len(actions()) >= 5, 60, "actions")
    t_call = time.monotonic()
    assert drv.call(Trigger, "/policy_node/estop").success
    # the node has latched once it replies; the call itself may wait seconds for service discovery on a slow host,
    # during which actions are still due, so "after the stop" counts from the reply (+ 50 ms of delivery)
    t_stop = time.monotonic()
    drv.wait_for(lambda: any(t > t_call for t, _ in drv.log.get("/arm_bridge/hold", [])), 5, "hold on e-stop")
    drv.spin(0.5)
    assert not [t for t, _ in actions() if t > t_stop + 0.05]
    assert drv.lifecycle("policy_node", "deactivate")
    assert not drv.lifecycle("policy_node", "activate")  # refused: latched
    assert drv.call(Trigger, "/policy_node/clear_estop").success
    drv.spin(0.5)
    assert not [t for t, _ in actions() if t > t_stop + 0.05]  # cleared, but not re-activated: still holding
    t_go = time.monotonic()
    assert drv.lifecycle("policy_node", "activate")
    drv.wait_for(lambda: len([t for t, _ in actions() if t > t_go]) >= 5, 20, "actions after re-activation")


def test_one_latched_estop_topic_stops_every_node(ros):
    """One publisher of std_msgs/Bool true on /robot_rl/estop (reliable, transient local) e-stops sim_robot,
    arm_bridge and policy_node -- also the policy node started after the stop was published (the latched value
    reaches it); false clears them (the policy node then waits for re-activation, as after ~/clear_estop)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Bool

    from robot_rl.ros.common import COMMAND_QOS, ESTOP_TOPIC, LATCHED_QOS

    drv, start, tmp = ros
    diags = {}
    drv.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.update(
        {s.name: (s.level, {kv.key: kv.value for kv in s.values}) for s in m.status}), COMMAND_QOS)
    drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet"})
    start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "trajectory"})
    pub = drv.node.create_publisher(Bool, ESTOP_TOPIC, LATCHED_QOS)
    drv.wait_for(lambda: pub.get_subscription_count() >= 2, 30, "sim_robot and arm_bridge on the e-stop topic")
    pub.publish(Bool(data=True))
    start("robot_rl.ros.policy_node", {"checkpoint": str(FIXTURE), "autostart": True})  # joins after the stop
    level = lambda name: diags.get(name, (None, {}))[0]  # noqa: E731
    stopped = lambda: all(level(n) in (b"\x02", 2) for n in  # noqa: E731
                          ("sim_robot: simulation", "arm_bridge: commands", "policy_node: control loop"))
    drv.wait_for(stopped, 60, "every node reporting the e-stop (diagnostics level ERROR)")
    assert diags["sim_robot: simulation"][1]["estop"] == "True" and diags["arm_bridge: commands"][1]["state"] == "estop"
    drv.spin(1.0)
    assert not drv.log.get("/arm_bridge/action")  # the late policy node never acted
    pub.publish(Bool(data=False))
    drv.wait_for(lambda: level("sim_robot: simulation") not in (b"\x02", 2)
                 and level("arm_bridge: commands") not in (b"\x02", 2), 10, "cleared by the topic")
    assert diags["arm_bridge: commands"][1]["state"] == "holding"


def test_sim_robot_safety_layer(ros):
    """sim_robot filters raw /commands like a robot's limit layer: a target far outside the URDF limits moves the
    arm at most max_joint_delta, inside the limits; an e-stop makes it ignore commands until cleared."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from std_srvs.srv import Trigger

    from robot_rl.ros.common import COMMAND_QOS
    from robot_rl.robot.safety import JointLimits
    from robot_rl.robot.scene import RobotSpec

    drv, start, tmp = ros
    r = RobotSpec()
    lim = JointLimits.from_urdf(r.urdf, r.arm_joints)
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "max_joint_delta": 0.1})
    drv.subscribe(JointState, "/joint_states", COMMAND_QOS)
    pub = drv.node.create_publisher(Float64MultiArray, "/arm_controller/commands", COMMAND_QOS)
    q = lambda: np.array(drv.last["/joint_states"][1].position[:7])  # noqa: E731
    drv.wait_for(lambda: "/joint_states" in drv.last and drv.node.count_subscribers("/arm_controller/commands"),
                 30, "sim_robot")
    q0 = q()
    pub.publish(Float64MultiArray(data=[float(v) for v in lim.upper + 1.0]))  # far beyond every limit
    drv.spin(0.6)
    q1 = q()
    assert np.all(np.abs(q1 - q0) <= 0.1 + 0.01), q1 - q0  # capped at max_joint_delta (+ servo overshoot)
    assert np.all(q1 <= lim.upper) and np.abs(q1 - q0).max() > 0.05  # it did move, toward the limit, inside it
    assert drv.call(Trigger, "/sim_robot/estop").success
    drv.spin(0.3)
    q2 = q()
    for _ in range(5):
        pub.publish(Float64MultiArray(data=[float(v) for v in q2 - 0.05]))
        drv.spin(0.1)
    assert np.abs(q() - q2).max() < 0.005  # ignored while latched
    assert drv.call(Trigger, "/sim_robot/clear_estop").success
    pub.publish(Float64MultiArray(data=[float(v) for v in q2 - 0.05]))
    drv.spin(0.6)
    assert np.abs(q() - (q2 - 0.05)).max() < 0.01  # obeyed again
