"""A camera student (robot-rl distill's kind: images + proprioception, no object poses) over real DDS, every node its
own process, with the parameters of launch/sim_student.yaml: sim_robot publishes front + wrist at 64x64, the policy
node acts from them and /joint_states, and the ROS graph shows it subscribed to no privileged pose topic."""

import time
from pathlib import Path

import yaml

from ros_helpers import ros  # noqa: F401 (pytest fixture)
from test_ros_faults import image_policy

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def test_student_acts_from_cameras_and_subscribes_to_no_pose(ros):
    from sensor_msgs.msg import JointState

    from robot_rl.ros.common import COMMAND_QOS

    drv, start, tmp = ros
    sim = yaml.safe_load((LAUNCH / "config" / "sim_robot_student.yaml").read_text())["sim_robot"]["ros__parameters"]
    assert sim["cameras"] == ["front", "wrist"]
    # an untrained student of distill's shape: front + wrist images and proprioception, no pose
    ck = image_policy(tmp, {"ee_pos": 3, "ee_quat": 4, "gripper_width": 1}, ("image_front", "image_wrist"),
                      sim["image_size"], "student")
    start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "cameras": sim["cameras"],
                                            "image_size": sim["image_size"]})
    start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
    start("robot_rl.ros.policy_node", {"checkpoint": str(ck), "autostart": True})
    drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
    drv.wait_for(lambda: len(drv.log.get("/arm_bridge/action", [])) >= 10, 90, "10 actions from the student")
    subs = {}
    t = time.monotonic()
    while time.monotonic() - t < 10 and not subs:
        drv.spin(0.2)
        subs = dict(drv.node.get_subscriber_names_and_types_by_node("policy_node", "/"))
    assert {"/joint_states", "/cameras/front/image_raw", "/cameras/wrist/image_raw"} <= set(subs), subs
    assert not [s for s in subs if s.startswith("/sim/privileged")], subs  # no pose, no marker, no success
    # and sim_robot's pose publishers have no subscriber at all
    assert drv.node.count_subscribers("/sim/privileged/cube_pose") == 0
    assert drv.node.count_subscribers("/sim/privileged/target_pose") == 0
