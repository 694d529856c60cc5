"""The robot's own description over real DDS (issue 22, item 2) and the sim robot's joint states (item 7):

- a stand-in ``robot_state_publisher`` (a separate rclpy process that does NOT import robot_rl) latches an FR3-style
  URDF (pybullet_data's Panda renamed ``panda_`` -> ``fr3_``, some limits made looser than the FR3's published
  ones) on /robot_description; ``arm_bridge`` with ``robot_description_topic`` builds its chain from it, reads
  ``fr3_*`` joint states and commands inside the FR3 profile: a joint driven towards its limit stops at the
  tighter (profile) limit, not at the URDF's;
- no publisher -> the node exits 2 with one line naming ``robot_description_topic``;
- ``sim_robot`` publishes finger positions inside the URDF limits and finger velocities that match the positions;
- ``joint_map`` parsing (policy names -> robot names)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ros_helpers import new_domain, ros, ros_env  # noqa: F401 (pytest fixture)

ARM = [f"fr3_joint{i}" for i in range(1, 8)]
FINGERS = ["fr3_finger_joint1", "fr3_finger_joint2"]
MARGIN = 0.01  # arm_bridge's default joint_margin

# a stand-in robot_state_publisher: latches argv[1]'s text on /robot_description (reliable, transient local,
# depth 1, as robot_state_publisher does) and spins until SIGINT/SIGTERM; deliberately no robot_rl import
_RSP_SCRIPT = """
import sys
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

rclpy.init()
node = rclpy.create_node("robot_state_publisher")
qos = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                 history=HistoryPolicy.KEEP_LAST, depth=1)
pub = node.create_publisher(String, "/robot_description", qos)
pub.publish(String(data=open(sys.argv[1]).read()))
print("latched", flush=True)
try:
    rclpy.spin(node)  # rclpy's own SIGINT/SIGTERM handlers shut the context down
except (KeyboardInterrupt, ExternalShutdownException):
    pass
finally:
    node.destroy_node()
    rclpy.try_shutdown()
"""


def fr3_style_urdf() -> str:
    """pybullet_data's panda.urdf with panda_ -> fr3_, joint 2's range widened to +-2.5 rad and joint 1's velocity
    raised to 10 rad/s: both looser than the FR3 profile (+-1.7837 rad, 2.62 rad/s)."""
    from robot_rl.robot.scene import panda_urdf_path

    text = open(panda_urdf_path()).read().replace("panda_", "fr3_")
    j2 = 'lower="-1.8326" upper="1.8326" velocity="2.1750"'
    j1 = '<limit effort="87" lower="-2.9671" upper="2.9671" velocity="2.1750"/>'
    assert text.count(j2) == 1 and text.count(j1) == 2  # joints 1 and 3 share the line: edit the first (joint 1)
    text = text.replace(j2, 'lower="-2.5" upper="2.5" velocity="2.1750"')
    return text.replace(j1, j1.replace('velocity="2.1750"', 'velocity="10.0"'), 1)


def test_arm_bridge_reads_robot_description_and_uses_the_tighter_fr3_limits(ros, tmp_path):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from robot_rl.robot.profiles import FR3
    from robot_rl.robot.safety import JointLimits
    from robot_rl.ros.common import COMMAND_QOS, action_to_msg

    drv, start, tmp = ros
    urdf = fr3_style_urdf()
    urdf_limits = JointLimits.from_urdf(urdf, ARM)
    assert urdf_limits.upper[0] > FR3.get("fr3_joint1").upper + 0.2  # the URDF alone would allow joint 1 further
    (tmp / "fr3.urdf").write_text(urdf)
    (tmp / "rsp.py").write_text(_RSP_SCRIPT)
    env = ros_env(int(os.environ["ROS_DOMAIN_ID"]))  # the fixture's domain (its Driver set it)
    rsp = subprocess.Popen([sys.executable, str(tmp / "rsp.py"), str(tmp / "fr3.urdf")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert rsp.stdout.readline().strip() == "latched"
        # joint 1 at 2.73 rad: 0.0137 rad inside the FR3 limit (2.7437), 0.24 rad inside the URDF's (2.9671)
        q0 = np.array([2.73, 0.15, 0.0, -2.2, 0.0, 2.35, 0.785398])
        big = {"workspace_low": [-2.0, -2.0, -2.0], "workspace_high": [2.0, 2.0, 2.0],
               "controller_workspace_low": [-2.0, -2.0, -2.0], "controller_workspace_high": [2.0, 2.0, 2.0]}
        bridge = start("robot_rl.hw_drivers.arm_bridge", {
            "robot_description_topic": "/robot_description", "robot_description_timeout": 30.0,
            "base_link": "fr3_link0", "tip_link": "fr3_grasptarget", "arm_joints": ARM, "gripper_joints": FINGERS,
            "q_home": q0.tolist(), "command_interface": "commands", "hardware_interpolates": True,
            "joint_state_timeout": 1.0,
            "command_timeout": 5.0, **big})
        drv.subscribe(Float64MultiArray, "/arm_controller/commands", COMMAND_QOS, keep=True)
        pub_js = drv.node.create_publisher(JointState, "/joint_states", COMMAND_QOS)
        pub_act = drv.node.create_publisher(JointState, "/arm_bridge/action", COMMAND_QOS)

        def joint_states():
            m = JointState(name=ARM + FINGERS, position=[*map(float, q0), 0.02, 0.02])
            m.header.stamp = drv.node.get_clock().now().to_msg()
            pub_js.publish(m)

        drv.node.create_timer(0.05, joint_states)
        # the tool sits at angle q1 about the base z axis: moving it along (-sin q1, cos q1) turns joint 1 up
        action = [-np.sin(q0[0]), np.cos(q0[0]), 0.0, 0.0, 0.0]

        def commanded():
            if not bridge.alive():
                raise AssertionError(bridge.text()[-3000:])
            pub_act.publish(action_to_msg(action, drv.node.get_clock().now().to_msg()))
            return len(drv.log.get("/arm_controller/commands", [])) >= 3

        drv.wait_for(commanded, 60, "arm commands from arm_bridge")
        cmds = np.array([m.data for _, m in drv.log["/arm_controller/commands"]])
        lo = np.array([FR3.get(n).lower for n in ARM])
        hi = np.array([FR3.get(n).upper for n in ARM])
        assert cmds.shape[1] == 7 and np.all(np.isfinite(cmds))
        assert np.all(cmds >= np.maximum(lo, urdf_limits.lower) + MARGIN - 1e-9), cmds
        assert np.all(cmds <= np.minimum(hi, urdf_limits.upper) - MARGIN + 1e-9), cmds
        # joint 1 was driven up to the FR3 limit (minus the margin), where the URDF alone would let it go on
        np.testing.assert_allclose(cmds[-1, 0], FR3.get("fr3_joint1").upper - MARGIN, atol=1e-9)
        log = bridge.text()
        assert "topic /robot_description" in log and "profile fr3" in log, log[-2000:]
    finally:
        rsp.terminate()
        rsp.wait(10)


def test_robot_description_timeout_is_one_line_naming_the_parameter(tmp_path):
    r = subprocess.run([sys.executable, "-m", "robot_rl.hw_drivers.arm_bridge", "--ros-args", "-p",
                        "robot_description_topic:=/robot_description", "-p", "robot_description_timeout:=1.0"],
                       env=ros_env(new_domain()), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "robot_description_topic: no URDF received on /robot_description within 1 s" in errors[0], errors[0]
    assert "robot_state_publisher" in errors[0]


def test_sim_robot_finger_states_stay_in_limits_with_real_velocities(ros):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from robot_rl.robot.safety import JointLimits
    from robot_rl.robot.scene import RobotSpec
    from robot_rl.ros.common import COMMAND_QOS, stamp_to_sec

    drv, start, tmp = ros
    spec = RobotSpec()
    names = [*spec.arm_joints, *spec.finger_joints]
    lim = JointLimits.from_urdf(spec.urdf, names)
    start("robot_rl.hw_drivers.sim_robot", {"backend": "mujoco", "publish_clock": True})  # stamps: sim time
    drv.subscribe(JointState, "/joint_states", COMMAND_QOS, keep=True)
    drv.wait_for(lambda: len(drv.log.get("/joint_states", [])) >= 20, 60, "joint states")
    pub = drv.node.create_publisher(Float64MultiArray, "/gripper_controller/commands", COMMAND_QOS)
    for target in (0.0, 0.04, 0.0):  # close, open fully (to the URDF limit), close: the fingers move both ways
        pub.publish(Float64MultiArray(data=[target]))
        drv.spin(1.5)
    msgs = [m for _, m in drv.log["/joint_states"]]
    assert all(list(m.name) == names for m in msgs)
    pos = np.array([m.position for m in msgs])
    vel = np.array([m.velocity for m in msgs])
    t = np.array([stamp_to_sec(m.header.stamp) for m in msgs])
    assert np.all(pos >= lim.lower) and np.all(pos <= lim.upper), (pos.min(0) - lim.lower, lim.upper - pos.max(0))
    f = pos[:, 7]
    assert f.max() - f.min() > 0.02  # the fingers did move
    assert np.abs(vel[:, 7:]).max() > 0.01  # and their velocity is reported (it was always 0)
    # the velocity is the finite difference of the published positions over the stamps (pairs one tick apart:
    # a message the test's subscription dropped would make the pair span two ticks)
    ok = np.abs(np.diff(t) - 0.01) < 1e-6
    assert ok.sum() > 100
    fd = np.diff(f)[ok] / np.diff(t)[ok]
    np.testing.assert_allclose(vel[1:, 7][ok], fd, atol=1e-6)


def test_joint_map_parsing():
    from robot_rl.errors import ConfigError
    from robot_rl.ros.common import map_joint_names, parse_joint_map

    panda = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
    m = parse_joint_map(["panda_*=fr3_*", ""])
    assert map_joint_names(m, panda) == ARM + FINGERS
    m = parse_joint_map(["panda_joint7=wrist", "panda_*=fr3_*", "panda_finger_*=hand_*"])
    assert map_joint_names(m, panda) == ARM[:6] + ["wrist", "hand_joint1", "hand_joint2"]
    assert map_joint_names(parse_joint_map([""]), panda) == panda
    for bad in (["panda_joint1"], ["=fr3_joint1"], ["panda_*=fr3_joint1"], ["a=b", "a=c"], ["pa*nda=x"]):
        with pytest.raises(ConfigError) as e:
            parse_joint_map(bad)
        assert e.value.field == "joint_map"
    with pytest.raises(ConfigError):  # two policy joints onto one robot joint
        map_joint_names(parse_joint_map(["panda_joint1=j", "panda_joint2=j"]), panda)


def test_robot_bringup_picks_up_an_fr3_description_by_configuration_only(ros, tmp_path):
    """`robot-rl bringup launch/robot_bringup.yaml` on an "FR3", configured only by --set: a stand-in
    robot_state_publisher latches the FR3-style URDF; arm_bridge and policy_node read it from /robot_description and
    map the Panda-trained policy's joint names onto fr3_* (joint_map); the camera reads a video file. The bridge's
    multi-point trajectories name fr3_* joints and stay inside the FR3 profile; both nodes log the topic and the
    fr3 profile; Ctrl-C stops all three cleanly."""
    import signal
    from pathlib import Path

    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory

    from robot_rl.robot.profiles import FR3
    from robot_rl.ros.common import COMMAND_QOS, action_to_msg
    from ros_helpers import make_video

    drv, start, tmp = ros
    root = Path(__file__).resolve().parents[1]
    (tmp / "fr3.urdf").write_text(fr3_style_urdf())
    (tmp / "rsp.py").write_text(_RSP_SCRIPT)
    make_video(tmp / "front.avi")
    env = ros_env(int(os.environ["ROS_DOMAIN_ID"]))
    rsp = subprocess.Popen([sys.executable, str(tmp / "rsp.py"), str(tmp / "fr3.urdf")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    robot = {"robot_description_topic": "/robot_description", "robot_description_timeout": 30.0,
             "joint_map": "['panda_*=fr3_*']", "base_link": "fr3_link0", "tip_link": "fr3_grasptarget"}
    sets = [f"{node}.{k}={v}" for node in ("arm_bridge", "policy_node") for k, v in robot.items()]
    sets += [f"camera.source={tmp / 'front.avi'}", f"policy_node.checkpoint={root / 'tests/fixtures/place_bc_mujoco'}",
             "policy_node.autostart=false", "arm_bridge.joint_state_timeout=1.0", "arm_bridge.command_timeout=5.0"]
    log = open(tmp / "bringup.log", "w+")
    bringup = None
    try:
        assert rsp.stdout.readline().strip() == "latched"
        bringup = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", "bringup",
                                    str(root / "launch" / "robot_bringup.yaml"), *[a for s in sets for a in ("--set", s)]],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        drv.subscribe(JointTrajectory, "/joint_trajectory_controller/joint_trajectory", COMMAND_QOS, keep=True)
        pub_js = drv.node.create_publisher(JointState, "/joint_states", COMMAND_QOS)
        pub_act = drv.node.create_publisher(JointState, "/arm_bridge/action", COMMAND_QOS)
        q = [0.0, -0.4, 0.0, -2.2, 0.0, 1.9, 0.785]

        def joint_states():
            m = JointState(name=ARM + FINGERS, position=[*q, 0.02, 0.02])
            m.header.stamp = drv.node.get_clock().now().to_msg()
            pub_js.publish(m)

        drv.node.create_timer(0.05, joint_states)

        def commanded():
            assert bringup.poll() is None, (tmp / "bringup.log").read_text()[-3000:]
            pub_act.publish(action_to_msg([0.5, 0.0, -0.5, 0.0, 0.0], drv.node.get_clock().now().to_msg()))
            return len(drv.log.get("/joint_trajectory_controller/joint_trajectory", [])) >= 3

        drv.wait_for(commanded, 90, "fr3 trajectories from the bring-up's arm_bridge")
        msgs = [m for _, m in drv.log["/joint_trajectory_controller/joint_trajectory"]]
        assert all(list(m.joint_names) == ARM for m in msgs)
        knots = np.array([p.positions for m in msgs for p in m.points])
        lo, hi = np.array([FR3.get(n).lower for n in ARM]), np.array([FR3.get(n).upper for n in ARM])
        assert len(msgs[-1].points) >= 4 and np.all(knots >= lo) and np.all(knots <= hi)
        model_line = lambda node: next((ln for ln in (tmp / "bringup.log").read_text().splitlines()  # noqa: E731
                                        if ln.startswith(f"[{node}]") and "robot model from" in ln), "")
        drv.wait_for(lambda: model_line("policy_node"), 90, "the policy node's robot model (it loads torch first)")
        bringup.send_signal(signal.SIGINT)
        assert bringup.wait(30) == 0
    finally:
        if bringup is not None and bringup.poll() is None:
            bringup.kill()
        rsp.terminate()
        rsp.wait(10)
    for node in ("arm_bridge", "policy_node"):
        line = model_line(node)
        assert "topic /robot_description" in line and "profile fr3" in line and "fr3_joint7" in line, line
