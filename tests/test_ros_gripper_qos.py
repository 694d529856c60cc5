"""QoS per topic and the swappable gripper output (issue 22, items 4 and 5).

- QoS: the camera node publishes with REP 2003's sensor-driver QoS (reliable, volatile) by default, so an independent
  consumer (a separate process that does not import robot_rl) with default reliable QoS receives images, and one
  with SensorDataQoS (best effort) does too; a camera configured ``qos_overrides.<topic>.publisher.reliability:
  best_effort`` delivers nothing to the reliable consumer, which sees an incompatible-QoS event instead. The
  override helpers validate values (ConfigError naming the parameter), leave the shared default profiles alone,
  and a lifecycle node (the policy node creates its image subscriptions in on_configure) accepts well-formed
  ``qos_overrides`` names at start-up.
- Gripper: ``arm_bridge`` with ``gripper_output: module:Class`` hands every width it computes to that adapter (a
  stand-in written by the test, over DDS); ``GripperCommandAction`` sends goals only on changes above the threshold
  (stand-in control_msgs and action client, in-process); the default topic output keeps ``[width / n_fingers]``.
"""

import json
import os
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest

from ros_helpers import NodeProcess, make_video, new_domain, ros, ros_env  # noqa: F401 (pytest fixture)


# ------------------------------------------------------------------------------------------------ QoS, in-process
def _node(args, lifecycle=False):
    import rclpy
    from rclpy.lifecycle import LifecycleNode
    from rclpy.node import Node

    ctx = rclpy.Context()
    rclpy.init(args=["probe", "--ros-args", *args], context=ctx)
    return (LifecycleNode if lifecycle else Node)("probe", context=ctx), ctx


def _close(node, ctx):
    import rclpy

    node.destroy_node()
    rclpy.shutdown(context=ctx)


def test_qos_overrides_are_standard_parameters_validated_and_leave_defaults_alone():
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from robot_rl.errors import ConfigError
    from robot_rl.ros.common import (SENSOR_PUBLISHER_QOS, SENSOR_QOS, qos_publisher, qos_subscription,
                                     reject_undeclared)

    # defaults: REP 2003 (drivers publish reliable + volatile, consumers subscribe best effort)
    node, ctx = _node([])
    try:
        pub = qos_publisher(node, Image, "/cameras/front/image_raw", SENSOR_PUBLISHER_QOS)
        sub = qos_subscription(node, Image, "/cameras/front/image_raw", lambda m: None, SENSOR_QOS)
        assert pub.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert pub.qos_profile.durability == DurabilityPolicy.VOLATILE and pub.qos_profile.depth == 5
        assert sub.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
        assert node.get_parameter("qos_overrides./cameras/front/image_raw.publisher.reliability").value == "reliable"
        assert node.get_parameter("qos_overrides./cameras/front/image_raw.subscription.depth").value == 5
    finally:
        _close(node, ctx)

    # overrides (resolved topic names: a relative topic gets the node's namespace), the shared profiles unchanged
    node, ctx = _node(["-p", "qos_overrides./cam/image_raw.publisher.reliability:=best_effort",
                       "-p", "qos_overrides./cam/image_raw.publisher.depth:=2",
                       "-p", "qos_overrides./cam/image_raw.subscription.reliability:=reliable",
                       "-p", "qos_overrides./cam/image_raw.subscription.durability:=transient_local"])
    try:
        pub = qos_publisher(node, Image, "cam/image_raw", SENSOR_PUBLISHER_QOS)
        sub = qos_subscription(node, Image, "/cam/image_raw", lambda m: None, SENSOR_QOS)
        assert (pub.qos_profile.reliability, pub.qos_profile.depth) == (ReliabilityPolicy.BEST_EFFORT, 2)
        assert sub.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        assert sub.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert SENSOR_PUBLISHER_QOS.reliability == ReliabilityPolicy.RELIABLE and SENSOR_PUBLISHER_QOS.depth == 5
        assert SENSOR_QOS.reliability == ReliabilityPolicy.BEST_EFFORT
        reject_undeclared(node)  # every override was declared by the helpers
    finally:
        _close(node, ctx)

    for arg, field, problem in [("reliability:=reliabel", "reliability", "'reliabel' is not a reliability policy"),
                                ("depth:=abc", "depth", "'abc' is string, not integer"),
                                ("depth:=0", "depth", "depth < 1 with history keep_last")]:
        node, ctx = _node(["-p", f"qos_overrides./cam/image_raw.publisher.{arg}"])
        try:
            with warnings.catch_warnings(), pytest.raises(ConfigError) as e:
                warnings.simplefilter("ignore")  # rclpy warns about depth 0 before the check refuses it
                qos_publisher(node, Image, "/cam/image_raw", SENSOR_PUBLISHER_QOS)
            assert e.value.field == f"qos_overrides./cam/image_raw.publisher.{field}" and e.value.problem == problem
        finally:
            _close(node, ctx)


def test_lifecycle_node_accepts_wellformed_qos_overrides_before_configure():
    """The policy node creates its image subscriptions in on_configure, after run_node's check of undeclared
    parameters: on a lifecycle node a well-formed qos_overrides name is let through (and a misspelt policy is
    not); on a plain node it must have been declared by then."""
    from robot_rl.errors import ConfigError
    from robot_rl.ros.common import reject_undeclared

    good = "qos_overrides./cameras/front/image_raw.subscription.reliability:=reliable"
    bad = "qos_overrides./cameras/front/image_raw.subscription.reliabilty:=reliable"
    for args, lifecycle, ok in [(good, True, True), (bad, True, False), (good, False, False)]:
        node, ctx = _node(["-p", args], lifecycle)
        try:
            if ok:
                reject_undeclared(node)
            else:
                with pytest.raises(ConfigError, match="has no parameter"):
                    reject_undeclared(node)
        finally:
            _close(node, ctx)


# ------------------------------------------------------------------------------------------------ QoS over DDS
CONSUMER = r"""
import json, sys, time
import rclpy
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

rclpy.init()
node = Node("independent_consumer")
counts, incompatible = {}, {}
reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)  # what a default subscriber uses
for spec in sys.argv[2:]:
    kind, topic = spec.split("=", 1)
    mtype = CameraInfo if topic.endswith("camera_info") else Image
    key = f"{kind}:{topic}"
    counts[key], incompatible[key] = 0, 0
    ev = SubscriptionEventCallbacks(incompatible_qos=lambda e, k=key: incompatible.__setitem__(k, e.total_count))
    node.create_subscription(mtype, topic, lambda m, k=key: counts.__setitem__(k, counts[k] + 1),
                             reliable if kind == "reliable" else qos_profile_sensor_data, event_callbacks=ev)
end = time.monotonic() + float(sys.argv[1])
done = None
while time.monotonic() < end and (done is None or time.monotonic() < done):
    rclpy.spin_once(node, timeout_sec=0.05)
    if done is None and all(v >= 3 for k, v in counts.items() if "front" in k) and \
            all(v >= 1 for k, v in incompatible.items() if "side" in k and k.startswith("reliable")):
        done = time.monotonic() + 1.0  # everything seen: one more second for stragglers on the side camera
print(json.dumps({"counts": counts, "incompatible": incompatible,
                  "robot_rl_imported": any(m.startswith("robot_rl") for m in sys.modules)}))
"""


def test_reliable_consumer_receives_camera_images_unless_configured_best_effort(tmp_path):
    d = new_domain()
    env = ros_env(d)
    video = tmp_path / "clip.avi"
    make_video(video, n=20, width=64, height=64)
    cam = {"source": str(video), "rate": 10.0, "publish_compressed": False}
    side_qos = {t: {"publisher": {"reliability": "best_effort"}}
                for t in ("/cameras/side/image_raw", "/cameras/side/camera_info")}
    procs = [NodeProcess("robot_rl.hw_drivers.camera", {**cam, "camera_name": "front"}, tmp_path, env, "camera_front"),
             NodeProcess("robot_rl.hw_drivers.camera", {**cam, "camera_name": "side", "qos_overrides": side_qos},
                         tmp_path, env, "camera_side")]
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    topics = [f"{kind}=/cameras/{c}/{t}" for c in ("front", "side") for t in ("image_raw", "camera_info")
              for kind in ("reliable", "best_effort")]
    try:
        r = subprocess.run(["nice", "-n", "10", sys.executable, str(script), "60", *topics], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert all(p.alive() for p in procs), "\n".join(p.text()[-2000:] for p in procs)
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0, 0], "\n".join(p.text()[-2000:] for p in procs)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    counts, incompatible = out["counts"], out["incompatible"]
    assert not out["robot_rl_imported"]
    for t in ("image_raw", "camera_info"):
        # default (REP 2003): reliable and best-effort consumers both receive
        assert counts[f"reliable:/cameras/front/{t}"] >= 3 and counts[f"best_effort:/cameras/front/{t}"] >= 3, out
        assert incompatible[f"reliable:/cameras/front/{t}"] == 0, out
        # configured best effort: the reliable consumer gets nothing and an incompatible-QoS event; best effort gets it
        assert counts[f"reliable:/cameras/side/{t}"] == 0 and incompatible[f"reliable:/cameras/side/{t}"] >= 1, out
        assert counts[f"best_effort:/cameras/side/{t}"] >= 1, out


# ------------------------------------------------------------------------------------------------ gripper
STAND_IN = '''
"""A user's gripper adapter (the seam arm_bridge offers): records every width it is given."""
import json

from robot_rl.hw_drivers.gripper import GripperOutput
from robot_rl.ros.common import declare


class RecordingGripper(GripperOutput):
    def __init__(self, node, controller, joints):
        super().__init__(node, controller, joints)
        self.path = declare(node, "record_file", "", "where the stand-in writes the widths")  # its own parameter
        with open(self.path, "w") as f:
            f.write(json.dumps({"controller": controller, "joints": list(joints)}) + "\\n")

    def command(self, width_m):
        with open(self.path, "a") as f:
            f.write(json.dumps(width_m) + "\\n")
'''


def test_arm_bridge_hands_its_widths_to_a_user_adapter(ros, monkeypatch):
    from sensor_msgs.msg import JointState

    from robot_rl.robot.controller import ControllerConfig
    from robot_rl.robot.scene import RobotSpec
    from robot_rl.ros.common import COMMAND_QOS, action_to_msg, sec_to_stamp

    drv, start, tmp = ros
    (tmp / "stand_in_gripper.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]))
    record = tmp / "widths.jsonl"
    bridge = start("robot_rl.hw_drivers.arm_bridge", {"gripper_output": "stand_in_gripper:RecordingGripper",
                                                      "record_file": str(record)})
    spec = RobotSpec()
    js_pub = drv.node.create_publisher(JointState, "/joint_states", COMMAND_QOS)
    act_pub = drv.node.create_publisher(JointState, "/arm_bridge/action", COMMAND_QOS)

    def publish_js():
        m = JointState(name=[*spec.arm_joints, *spec.finger_joints],
                       position=[*map(float, spec.q_home), 0.04, 0.04])
        m.header.stamp = drv.node.get_clock().now().to_msg()
        js_pub.publish(m)

    drv.node.create_timer(0.02, publish_js)
    for pub in (js_pub, act_pub):
        drv.wait_for(lambda: pub.get_subscription_count() > 0 or not bridge.alive(), 60, f"arm_bridge on "
                     f"{pub.topic_name}")
    assert bridge.alive(), bridge.text()[-3000:]
    drv.spin(0.5)  # joint states reach the bridge
    grips = [-1.0, 0.0, 1.0, 0.5, -0.25]
    for g in grips:
        act_pub.publish(action_to_msg([0.0, 0.0, 0.0, 0.0, g], sec_to_stamp(time.time())))
        drv.spin(0.1)

    def widths():
        lines = record.read_text().splitlines() if record.exists() else []
        return [json.loads(s) for s in lines[1:]]

    drv.wait_for(lambda: len(widths()) >= len(grips) or not bridge.alive(), 20, "the adapter's widths")
    assert bridge.alive(), bridge.text()[-3000:]
    head = json.loads(record.read_text().splitlines()[0])
    assert head == {"controller": "gripper_controller", "joints": list(spec.finger_joints)}
    max_w = ControllerConfig().max_width  # action -1 = open (max_width) ... +1 = closed, linear (the controller)
    np.testing.assert_allclose(widths(), [(1.0 - g) * 0.5 * max_w for g in grips], atol=1e-12)


def test_gripper_command_action_sends_goals_only_on_changes(monkeypatch):
    """GripperCommandAction with a stand-in control_msgs module and action client (no control_msgs wheel)."""
    from robot_rl.errors import ConfigError
    from robot_rl.hw_drivers.gripper import GripperCommandAction

    class Goal:
        def __init__(self):
            self.command = types.SimpleNamespace(position=None, max_effort=None)

    class Future:
        def __init__(self, accepted):
            self.accepted = accepted

        def add_done_callback(self, cb):
            cb(self)

        def result(self):
            return types.SimpleNamespace(accepted=self.accepted)

    class Client:
        def __init__(self):
            self.ready, self.accept, self.goals = True, True, []

        def server_is_ready(self):
            return self.ready

        def send_goal_async(self, goal):
            self.goals.append((goal.command.position, goal.command.max_effort))
            return Future(self.accept)

    class Logger:
        def warning(self, *a, **k):
            pass

    node = types.SimpleNamespace(get_logger=lambda: Logger())
    joints = ("panda_finger_joint1", "panda_finger_joint2")
    monkeypatch.setitem(sys.modules, "control_msgs", types.ModuleType("control_msgs"))
    monkeypatch.setitem(sys.modules, "control_msgs.action", types.SimpleNamespace(
        GripperCommand=types.SimpleNamespace(Goal=Goal)))
    cli = Client()
    g = GripperCommandAction(node, "gripper_controller", joints, max_effort=30.0, threshold=0.005, client=cli)
    assert g.action == "/gripper_controller/gripper_cmd"
    for w in [0.08, 0.079, 0.076, 0.07, 0.0, 0.0, 0.003, 0.006]:
        g.command(w)
    # one finger's position (width / 2) per goal, only when the width moved more than 5 mm since the last goal
    assert cli.goals == [(0.04, 30.0), (0.035, 30.0), (0.0, 30.0), (0.003, 30.0)]
    cli.ready = False
    g.command(0.08)
    assert len(cli.goals) == 4 and g.stats["no_server"] == 1  # dropped while the server is away ...
    cli.ready, cli.accept = True, False
    g.command(0.08)
    assert cli.goals[-1] == (0.04, 30.0) and g.stats["rejected"] == 1  # ... sent when it is back; rejected ...
    cli.accept = True
    g.command(0.08)
    assert len(cli.goals) == 6  # ... so the same width is sent again
    w = GripperCommandAction(node, "g", joints, action="/franka_gripper/gripper_action", position="width", client=cli)
    w.command(0.05)
    assert w.action == "/franka_gripper/gripper_action" and cli.goals[-1] == (0.05, 20.0)
    with pytest.raises(ConfigError) as e:
        GripperCommandAction(node, "g", joints, position="fingers", client=cli)
    assert e.value.field == "gripper_command_position"


def test_gripper_output_selection_and_errors(tmp_path, monkeypatch):
    from robot_rl.errors import ConfigError
    from robot_rl.hw_drivers.gripper import TopicGripper, make_gripper_output

    joints = ("panda_finger_joint1", "panda_finger_joint2")
    # default: today's topic, [width / n_fingers] on /<gripper_controller>/commands
    node, ctx = _node([])
    try:
        out = make_gripper_output(node, "gripper_controller", joints)
        assert isinstance(out, TopicGripper) and out.pub.topic_name == "/gripper_controller/commands"
        sent = []
        monkeypatch.setattr(out.pub, "publish", lambda m: sent.append(list(m.data)))
        out.command(0.06)
        assert sent == [[0.03]]
    finally:
        _close(node, ctx)
    node, ctx = _node([])
    try:
        assert make_gripper_output(node, "", joints) is None  # gripper_controller '' = no gripper
    finally:
        _close(node, ctx)

    (tmp_path / "no_command_adapter.py").write_text("class A:\n    def __init__(self, node, c, j):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    have_control_msgs = True
    try:
        import control_msgs.action  # noqa: F401
    except ImportError:
        have_control_msgs = False
    cases = [("nosuch_module_xyz:Grip", "cannot import nosuch_module_xyz"), ("json:NoSuchClass", "json has no"),
             ("topicc", "'topicc'"), ("no_command_adapter:A", "has no command(width_m) method")]
    if not have_control_msgs:
        cases.append(("gripper_command", "gripper_command needs control_msgs"))
    for spec, problem in cases:
        node, ctx = _node(["-p", f"gripper_output:={spec}"])
        try:
            with pytest.raises(ConfigError) as e:
                make_gripper_output(node, "gripper_controller", joints)
            assert e.value.field == "gripper_output" and problem in e.value.problem, str(e.value)
        finally:
            _close(node, ctx)
