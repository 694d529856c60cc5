"""Helpers shared by every robot_rl ROS 2 node: QoS profiles, message <-> numpy conversions, the action message,
parameter helpers and a ``main`` that shuts a node down cleanly on SIGINT / SIGTERM.

Conventions (docs/ARCHITECTURE.md): SI units, quaternions xyzw, images ``rgb8`` (uint8 H x W x 3),
ros2_control topic names (``/joint_states``, ``/<controller>/joint_trajectory``, ``/<controller>/commands``), REP 2003
QoS for cameras (drivers publish reliable, consumers subscribe best effort; per topic ``qos_overrides.*`` parameters:
:func:`qos_publisher`), reliable QoS for commands.

**The action message.** End-effector delta actions travel as ``sensor_msgs/JointState`` with
``name = ACTION_NAMES`` (``ee_dx ee_dy ee_dz ee_dyaw gripper``), ``position`` = the env's 5-D action in [-1, 1]
(units in :mod:`robot_rl.robot.controller`: x/y/z x ``pos_scale`` m, yaw x ``yaw_scale`` rad per control step; gripper -1
open ... +1 closed) and ``header.stamp`` = the time of the OLDEST observation the action was computed from (teleop:
the time of the input). A standard message with a header and named fields: a bridge can check the field order,
and every hop can measure observation -> command latency.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np

try:
    import rclpy
    from builtin_interfaces.msg import Duration, Time
    from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                           qos_profile_sensor_data)
    from sensor_msgs.msg import CameraInfo, Image, JointState
except ImportError as e:  # pragma: no cover - exercised only without the [ros] extra
    from robot_rl.errors import ConfigError

    raise ConfigError("ros", f"ROS 2 Python packages are not installed ({e})",
                      "pip install -e '.[ros]' (rclpy + Fast DDS wheels, no ROS install needed)") from None

from robot_rl.envs.env import ACTION_NAMES, action_by_name
from robot_rl.errors import ConfigError


#: sensor-data subscribers (images, camera_info): best effort, keep last 5 (rclpy's qos_profile_sensor_data;
#: REP 2003's SensorDataQoS for consumers of sensor data)
SENSOR_QOS = qos_profile_sensor_data
#: sensor drivers' publishers (cameras): reliable, volatile (REP 2003: SystemDefaultsQoS), keep last 5. Matches
#: both best-effort (SENSOR_QOS) and reliable subscribers; overridable per topic (:func:`qos_publisher`)
SENSOR_PUBLISHER_QOS = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=5,
                                  durability=DurabilityPolicy.VOLATILE)
#: commands and state: reliable, keep last 10
COMMAND_QOS = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=10)
#: "latched" topics (the last message is delivered to late subscribers): reliable + transient local, depth 1
LATCHED_QOS = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=1,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


# --------------------------------------------------------------------------------------------------- time
def stamp_to_sec(stamp) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> Time:
    sec = int(np.floor(t))
    return Time(sec=sec, nanosec=min(int(round((t - sec) * 1e9)), 999_999_999))


def sec_to_duration(t: float) -> Duration:
    sec = int(np.floor(t))
    return Duration(sec=sec, nanosec=min(int(round((t - sec) * 1e9)), 999_999_999))


def duration_to_sec(d) -> float:
    return float(d.sec) + 1e-9 * float(d.nanosec)


def now_sec(node) -> float:
    """The node's clock (ROS time: /clock when use_sim_time is true, else the system clock) in seconds."""
    return node.get_clock().now().nanoseconds * 1e-9


# --------------------------------------------------------------------------------------------------- messages
def image_to_msg(img: np.ndarray, stamp, frame_id: str) -> Image:
    """uint8 (H, W, 3) RGB -> sensor_msgs/Image ``rgb8``."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    m = Image()
    m.header.stamp, m.header.frame_id = stamp, frame_id
    m.height, m.width = int(img.shape[0]), int(img.shape[1])
    m.encoding, m.is_bigendian, m.step = "rgb8", 0, int(img.shape[1] * 3)
    m.data = img.tobytes()
    return m


def msg_to_image(m: Image) -> np.ndarray:
    """sensor_msgs/Image (rgb8 / bgr8 / rgba8 / bgra8 / mono8) -> uint8 (H, W, 3) RGB. Raises ConfigError."""
    enc = m.encoding.lower()
    ch = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(enc)
    if ch is None:
        raise ConfigError("image.encoding", f"{m.encoding!r} is not supported",
                          "publish rgb8, bgr8, rgba8, bgra8 or mono8")
    buf = np.frombuffer(bytes(m.data), dtype=np.uint8)
    if buf.size < m.height * m.step:
        raise ConfigError("image.data", f"{buf.size} bytes < height*step = {m.height * m.step}", "fix the publisher")
    a = buf[: m.height * m.step].reshape(m.height, m.step)[:, : m.width * ch].reshape(m.height, m.width, ch)
    if enc == "mono8":
        return np.repeat(a, 3, axis=2)
    if enc.startswith("bgr"):
        a = a[:, :, 2::-1]
    return np.ascontiguousarray(a[:, :, :3])


def camera_info_from_fovy(height: int, width: int, fovy_deg: float, stamp, frame_id: str) -> CameraInfo:
    """Pinhole CameraInfo (no distortion) of a camera with vertical field of view ``fovy_deg`` and square pixels."""
    f = 0.5 * height / np.tan(np.deg2rad(fovy_deg) / 2.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    m = CameraInfo()
    m.header.stamp, m.header.frame_id = stamp, frame_id
    m.height, m.width, m.distortion_model = int(height), int(width), "plumb_bob"
    m.d = [0.0] * 5
    m.k = [f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0]
    m.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    m.p = [f, 0.0, cx, 0.0, 0.0, f, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return m


def action_to_msg(action, stamp) -> JointState:
    m = JointState()
    m.header.stamp = stamp
    m.name = list(ACTION_NAMES)
    m.position = [float(v) for v in np.asarray(action, dtype=np.float64).reshape(-1)]
    return m


def msg_to_action(m: JointState) -> np.ndarray:
    """The 5-D action of an action message, in ACTION_NAMES order (reordered by name when names are given).
    Raises ConfigError for missing fields; NaN/inf pass through (the receiver decides to reject them)."""
    if len(m.name):
        return action_by_name(m.name, m.position)
    pos = np.asarray(m.position, dtype=np.float64)
    if pos.shape != (5,):
        raise ConfigError("action.position", f"{pos.size} values, expected 5", f"send {list(ACTION_NAMES)}")
    return pos


def chunk_to_msg(rows, period: float, stamp):
    """The action-chunk preview message: ``trajectory_msgs/JointTrajectory`` with ``joint_names`` =
    :data:`ACTION_NAMES`, point i = action row i (5 values in [-1, 1], env units) for the control step
    ``i`` steps after the stamped one, ``time_from_start = i * period`` [s]; ``header.stamp`` = the observation
    time of row 0 (the same stamp as that step's action message). ``rows``: (n >= 1, 5)."""
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    m = JointTrajectory()
    m.header.stamp = stamp
    m.joint_names = list(ACTION_NAMES)
    for i, row in enumerate(np.asarray(rows, dtype=np.float64).reshape(-1, len(ACTION_NAMES))):
        p = JointTrajectoryPoint()
        p.positions = [float(v) for v in row]
        p.time_from_start = sec_to_duration(i * period)
        m.points.append(p)
    return m


def msg_to_chunk(m) -> np.ndarray:
    """float64 (n, 5) action rows of an action-chunk message (:func:`chunk_to_msg`), each in ACTION_NAMES order.
    Raises ConfigError for wrong names or a point without one value per name; NaN/inf pass through."""
    rows = [action_by_name(m.joint_names, p.positions) for p in m.points]
    return np.stack(rows) if rows else np.zeros((0, len(ACTION_NAMES)))


class JointStateCache:
    """Latest joint positions/velocities by name from ``/joint_states`` (several publishers may each send a
    subset of joints, as ros2_control's joint_state_broadcaster and a gripper driver do).

    ``arm(names)`` -> (q, dq) in the given order; ``width(gripper_joints)`` = sum of the gripper joints' positions
    (Panda: two fingers, each half the opening). ``stamp`` is the oldest stamp among the joints used.
    """

    def __init__(self):
        self.pos: dict[str, float] = {}
        self.vel: dict[str, float] = {}
        self.t: dict[str, float] = {}

    def update(self, m: JointState, t: float | None = None) -> None:
        t = stamp_to_sec(m.header.stamp) if t is None else t
        for i, n in enumerate(m.name):
            if i < len(m.position):
                self.pos[n] = float(m.position[i])
            self.vel[n] = float(m.velocity[i]) if i < len(m.velocity) else 0.0
            self.t[n] = t

    def has(self, names) -> bool:
        return all(n in self.pos for n in names)

    def get(self, arm, gripper) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(q (n,), dq (n,), gripper width, oldest stamp). Raises KeyError when a joint was never received."""
        q = np.array([self.pos[n] for n in arm])
        dq = np.array([self.vel[n] for n in arm])
        width = float(sum(self.pos[n] for n in gripper))
        return q, dq, width, min(self.t[n] for n in (*arm, *gripper))


class PoseCache:
    """Latest object poses from PoseStamped topics, usable where a Backend is expected for ``object_pose``
    (see :func:`robot_rl.envs.assemble_observation`)."""

    def __init__(self):
        self.poses: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.t: dict[str, float] = {}

    def update(self, name: str, m, t: float | None = None) -> None:
        p, o = m.pose.position, m.pose.orientation
        self.poses[name] = (np.array([p.x, p.y, p.z]), np.array([o.x, o.y, o.z, o.w]))
        self.t[name] = stamp_to_sec(m.header.stamp) if t is None else t

    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.poses:
            raise KeyError(name)
        pos, quat = self.poses[name]
        return pos.copy(), quat.copy()


def pose_msg(pos, quat_xyzw, stamp, frame_id: str):
    from geometry_msgs.msg import PoseStamped

    m = PoseStamped()
    m.header.stamp, m.header.frame_id = stamp, frame_id
    m.pose.position.x, m.pose.position.y, m.pose.position.z = (float(v) for v in pos)
    o = m.pose.orientation
    o.x, o.y, o.z, o.w = (float(v) for v in quat_xyzw)
    return m


def diagnostic(name: str, hardware_id: str, level: int, message: str, values: dict, stamp):
    """A diagnostic_msgs/DiagnosticArray with one status (level 0 OK, 1 WARN, 2 ERROR, 3 STALE)."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    arr = DiagnosticArray()
    arr.header.stamp = stamp
    st = DiagnosticStatus(level=bytes([int(level)]), name=name, message=message, hardware_id=hardware_id)
    st.values = [KeyValue(key=str(k), value=(f"{v:.6g}" if isinstance(v, float) else str(v))) for k, v in values.items()]
    arr.status = [st]
    return arr


# --------------------------------------------------------------------------------------------------- parameters
ESTOP_TOPIC = "/robot_rl/estop"  # std_msgs/Bool, LATCHED_QOS: True = e-stop, False = clear (docs/ROS2.md)


def estop_services(node, on_estop, on_clear) -> None:
    """The e-stop of a node that commands motion: services ``~/estop`` / ``~/clear_estop`` (std_srvs/Trigger) and
    the one latched e-stop topic every such node obeys (parameter ``estop_topic``, default :data:`ESTOP_TOPIC`,
    '' = off): ``std_msgs/Bool`` with reliable, transient-local QoS, so a node started after the stop was
    published still receives it while its publisher lives. ``data: true`` calls ``on_estop``, ``false``
    ``on_clear``, each as the services do (with a Trigger request and response). A software stop only: it holds the
    arm through the controllers; it is no substitute for the robot's hardware e-stop (docs/ROS2.md)."""
    from std_msgs.msg import Bool
    from std_srvs.srv import Trigger

    node.create_service(Trigger, "~/estop", on_estop)
    node.create_service(Trigger, "~/clear_estop", on_clear)
    topic = declare(node, "estop_topic", ESTOP_TOPIC, "latched std_msgs/Bool e-stop every node obeys ('' = off)")
    if topic:
        def on_msg(m):
            res = (on_estop if m.data else on_clear)(Trigger.Request(), Trigger.Response())
            node.get_logger().warning(f"{topic}: {res.message}")

        node.create_subscription(Bool, topic, on_msg, LATCHED_QOS)


def declare(node, name: str, default, description: str = "", positive: bool = False):
    """Declare a parameter (with a description) and return its value, converted to the type of ``default``.

    Launch files and ``-p name:=value`` parse values as YAML, so ``source:=0`` arrives as an integer and
    ``control_rate:=20`` as an integer where a string / float is meant; rclpy's static typing would refuse those
    with a traceback. The parameter is declared with dynamic typing and the value converted: int -> float, numbers
    -> str, element-wise for lists. Raises ConfigError (naming the parameter) for anything else, e.g. a string
    where a number is needed, and with ``positive`` for a value that is not > 0 (rates, periods, timeouts).
    """
    from rcl_interfaces.msg import ParameterDescriptor

    value = node.declare_parameter(name, default, ParameterDescriptor(description=description,
                                                                      dynamic_typing=True)).value
    value = coerce_parameter(name, value, default)
    if positive and not value > 0:
        raise ConfigError(name, f"{value!r} <= 0", f"pass a positive value, e.g. {name}:={default!r}")
    return value


def coerce_parameter(name: str, value, default):
    """``value`` converted to the type of ``default`` (see :func:`declare`). Raises ConfigError."""
    def one(v, d):
        if isinstance(d, bool):
            if isinstance(v, bool):
                return v
        elif isinstance(d, int):
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
        elif isinstance(d, float):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        elif isinstance(d, str):
            if isinstance(v, str):
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return str(v)
        raise TypeError

    try:
        if isinstance(default, (list, tuple)):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [one(v, default[0]) for v in value] if default else list(value)
        return one(value, default)
    except TypeError:
        kind = f"a list of {type(default[0]).__name__}" if isinstance(default, (list, tuple)) and default \
            else type(default).__name__
        raise ConfigError(name, f"{value!r} is not {kind}", f"pass e.g. {name}:={default!r}") from None


def declare_safety(node, timeout_what: str = "hold when no command for this long [s]"):
    """Declare the :class:`robot_rl.robot.safety.SafetyConfig` parameters (same names on every node that filters joint
    commands: arm_bridge, sim_robot) and return the config."""
    from robot_rl.robot.safety import SafetyConfig

    sc = SafetyConfig()
    return SafetyConfig(
        joint_margin=float(declare(node, "joint_margin", sc.joint_margin, "kept from URDF limits [rad]")),
        velocity_scale=float(declare(node, "velocity_scale", sc.velocity_scale, "fraction of URDF velocity limits")),
        max_joint_delta=float(declare(node, "max_joint_delta", sc.max_joint_delta, "safety cap per command [rad]")),
        workspace_low=tuple(declare(node, "workspace_low", list(sc.workspace_low), "tool box low [m]")),
        workspace_high=tuple(declare(node, "workspace_high", list(sc.workspace_high), "tool box high [m]")),
        command_timeout=float(declare(node, "command_timeout", sc.command_timeout, timeout_what))).validate()


def declare_task(node, description: str):
    """Declare the task parameters, named like the ``task`` config section's fields (:mod:`robot_rl.config`):
    ``task.name`` (lift | place) and one ``task.<field>`` per field of that task's dataclass, with the task's
    default (``task.tolerance`` [m], ``task.max_steps``, ``task.target_x`` [lo, hi] m, ...; in a parameter file
    ``task: {name: place, tolerance: 0.004}``). A field of another task is refused like any undeclared parameter
    (:func:`reject_undeclared`). Returns (Task, {field: value} of every task field) — the kwargs ``make_task`` /
    ``make_env(task_kwargs=...)`` take. Raises ConfigError for an unknown task or a bad value."""
    import dataclasses

    from robot_rl.envs.tasks import make_task

    name = declare(node, "task.name", "place", description)
    default = make_task(name)
    kwargs = {}
    for f in dataclasses.fields(default):
        if f.name in ("name", "derived_keys"):  # not settings (see make_task)
            continue
        d = getattr(default, f.name)
        v = declare(node, f"task.{f.name}", list(d) if isinstance(d, tuple) else d, f"{name} task field {f.name}")
        kwargs[f.name] = tuple(v) if isinstance(d, tuple) else v
    return make_task(name, **kwargs), kwargs


def parse_joint_map(entries) -> dict:
    """The ``joint_map`` parameter -> {policy joint name: robot joint name}.

    Each entry is ``"policy_name=robot_name"`` (e.g. ``"panda_joint1=fr3_joint1"``) or a prefix rule
    ``"policy_prefix*=robot_prefix*"`` (e.g. ``"panda_*=fr3_*"``: every policy name starting with ``panda_`` gets
    ``fr3_`` instead); exact entries win over prefix rules, the longest matching prefix wins among rules. Empty
    entries are ignored (``['']``, the default, maps nothing). The result is applied with :func:`map_joint_names`.
    Raises ConfigError for a malformed entry or a policy name given twice.
    """
    exact, prefix = {}, {}
    for e in entries:
        e = str(e).strip()
        if not e:
            continue
        src, sep, dst = (s.strip() for s in e.partition("="))
        if not sep or not src or not dst or src.endswith("*") != dst.endswith("*") or "*" in src[:-1] + dst[:-1]:
            raise ConfigError("joint_map", f"entry {e!r} is not 'policy_name=robot_name' or 'prefix*=prefix*'",
                              "pass e.g. joint_map:=\"['panda_*=fr3_*']\" or ['panda_joint1=fr3_joint1', ...]")
        table = prefix if src.endswith("*") else exact
        key, val = (src[:-1], dst[:-1]) if src.endswith("*") else (src, dst)
        if key in table:
            raise ConfigError("joint_map", f"{src!r} is mapped twice", "give one entry per policy joint name")
        table[key] = val
    out = dict(exact)
    out.update({f"{k}*": v for k, v in prefix.items()})
    return out


def map_joint_names(joint_map: dict, names) -> list:
    """Robot joint names for policy joint ``names`` under a :func:`parse_joint_map` result (unmapped: unchanged).
    Raises ConfigError when two policy names land on the same robot name."""
    prefixes = sorted(((k[:-1], v) for k, v in joint_map.items() if k.endswith("*")), key=lambda kv: -len(kv[0]))
    out = []
    for n in names:
        if n in joint_map:
            out.append(joint_map[n])
            continue
        out.append(next((dst + n[len(src):] for src, dst in prefixes if n.startswith(src)), n))
    if len(set(out)) != len(out):
        raise ConfigError("joint_map", f"{list(names)} map to {out}, which repeats a robot joint",
                          "map each policy joint to a different robot joint")
    return out


def wait_robot_description(node, topic: str, timeout: float) -> str:
    """The URDF XML that ``robot_state_publisher`` latches on ``topic`` (``std_msgs/String``, reliable + transient
    local: :data:`LATCHED_QOS`), waited for up to ``timeout`` seconds.

    Read through a short-lived helper node in ``node``'s context and namespace (spun by its own executor in 0.1 s
    slices, so Ctrl-C is not delayed and ``node``'s callbacks do not run early); command-line remaps do not apply
    to it, so the topic is chosen by the ``robot_description_topic`` parameter only.
    Raises ConfigError (field ``robot_description_topic``) on timeout or when the message is not URDF XML.
    """
    import time
    import xml.etree.ElementTree as ET

    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    helper = rclpy.create_node(f"{node.get_name()}_robot_description", namespace=node.get_namespace(),
                               context=node.context, use_global_arguments=False, start_parameter_services=False)
    ex = SingleThreadedExecutor(context=node.context)
    got: list = []
    try:
        helper.create_subscription(String, topic, lambda m: got.append(m.data), LATCHED_QOS)
        ex.add_node(helper)
        end = time.monotonic() + timeout
        while not got and time.monotonic() < end:
            ex.spin_once(timeout_sec=min(0.1, max(0.0, end - time.monotonic())))
    finally:
        ex.shutdown(timeout_sec=0)
        helper.destroy_node()
    if not got:
        raise ConfigError("robot_description_topic", f"no URDF received on {topic} within {timeout:g} s",
                          "start robot_state_publisher (it latches the URDF, transient local), raise "
                          "robot_description_timeout, or set robot_description_topic:='' and urdf:=<file>")
    text = got[-1]
    try:
        if ET.fromstring(text).tag != "robot":
            raise ET.ParseError("root element is not <robot>")
    except ET.ParseError as e:
        raise ConfigError("robot_description_topic", f"the message on {topic} is not URDF XML ({e})",
                          "publish the URDF text (robot_state_publisher's robot_description)") from None
    return text


def robot_model(node):
    """Declare the robot-model parameters and return (robot, KinematicChain). Defaults: the Franka Panda shipped in
    pybullet_data, with Franka's published Panda limits.

    Parameters (all nodes that call this: arm_bridge, policy_node, recorder):
      urdf                       URDF file or XML text ('' = pybullet_data's Panda); used when
                                 robot_description_topic is ''.
      robot_description_topic    '' (off) or a topic, typically /robot_description: wait for the URDF that
                                 robot_state_publisher latches there (std_msgs/String, reliable + transient local)
                                 and build the chain and limits from it. Setting both this and ``urdf`` is refused.
      robot_description_timeout  seconds to wait for it (default 10) before failing with a one-line ConfigError.
      robot_profile              auto (default: the profile whose joint names match, else URDF limits only) | none |
                                 panda | fr3 (:mod:`robot_rl.robot.profiles`). Per joint the tighter of URDF and
                                 profile wins (position, velocity; acceleration from the profile).
      joint_map                  [''] (none) or entries ``policy_name=robot_name`` / ``policy_prefix*=robot_prefix*``
                                 (:func:`parse_joint_map`), e.g. ``['panda_*=fr3_*']``: ``arm_joints`` and
                                 ``gripper_joints`` are then read as the policy's names (its joint order) and sent /
                                 read under the robot's names.
      base_link, tip_link        URDF links bounding the arm chain (robot names).
      arm_joints                 arm joints in the policy's order (= the chain's order); after joint_map they must
                                 be the URDF chain's active joints base_link -> tip_link.
      gripper_joints             gripper joints; gripper width = sum of their positions.
      q_home                     home posture [rad] (IK null-space target), inside the (tightened) limits.

    Returns ``robot``, a namespace with ``urdf`` (path or XML text), ``base_link``, ``tip_link``, ``arm_joints`` and
    ``gripper_joints`` (robot names, policy order), ``policy_arm_joints`` / ``policy_gripper_joints`` (names before
    ``joint_map``), ``q_home``, ``max_width`` [m], ``limits`` (:class:`~robot_rl.robot.safety.JointLimits` of the
    arm joints: URDF tightened by the profile), ``gripper_limits`` (the same for the gripper joints, None when the
    URDF lacks them), ``profile`` (Profile or None), ``joint_map`` (dict) and ``source`` (where the URDF came from);
    and the chain, whose IK clamps (``lower``/``upper``/``velocity_limit``) are set to ``robot.limits``.
    Raises ConfigError naming the parameter for any inconsistency.
    """
    from types import SimpleNamespace

    from robot_rl.robot.kinematics import KinematicChain
    from robot_rl.robot.profiles import select_profile
    from robot_rl.robot.safety import JointLimits
    from robot_rl.robot.scene import RobotSpec

    r = RobotSpec()
    urdf = declare(node, "urdf", "", "robot URDF file or XML (empty: robot_description_topic, else the Franka Panda "
                                     "shipped in pybullet_data)")
    topic = declare(node, "robot_description_topic", "", "topic with the latched URDF, e.g. /robot_description "
                                                         "('' = use urdf)")
    timeout = float(declare(node, "robot_description_timeout", 10.0, "wait for the robot description [s]",
                            positive=True))
    profile_name = declare(node, "robot_profile", "auto", "published limit profile: auto | none | panda | fr3")
    jmap = parse_joint_map(declare(node, "joint_map", [""], "policy_name=robot_name or prefix*=prefix* entries"))
    base = declare(node, "base_link", r.base_link, "URDF link of the robot base frame")
    tip = declare(node, "tip_link", r.tip_link, "URDF link of the tool centre point")
    policy_arm = list(declare(node, "arm_joints", list(r.arm_joints), "arm joint names, in command order"))
    policy_grip = list(declare(node, "gripper_joints", list(r.finger_joints),
                               "gripper joints; gripper width = sum of their positions"))
    q_home = list(declare(node, "q_home", list(r.q_home), "home posture [rad] (IK null-space target)"))
    if topic and urdf:
        raise ConfigError("robot_description_topic", f"both urdf ({urdf[:60]!r}) and robot_description_topic "
                                                     f"({topic!r}) are set", "set only one of them")
    if topic:
        urdf, source = wait_robot_description(node, topic, timeout), f"topic {topic}"
    else:
        urdf = urdf or r.urdf
        source = "urdf parameter (XML)" if urdf.lstrip().startswith("<") else f"urdf {urdf}"
    arm, grip = map_joint_names(jmap, policy_arm), map_joint_names(jmap, policy_grip)
    chain = KinematicChain(urdf, base, tip)
    if chain.joint_names != arm:
        raise ConfigError("arm_joints", f"{arm} differ from the URDF chain {base}->{tip}: {chain.joint_names}",
                          "list the active joints between base_link and tip_link in order (or map the policy's "
                          "names to them with joint_map)")
    if len(q_home) != chain.n:
        raise ConfigError("q_home", f"{len(q_home)} values for {chain.n} joints", "give one value per arm joint")
    profile = select_profile(profile_name, arm)
    limits = JointLimits.from_urdf(urdf, arm).tighten(profile)
    try:
        grip_limits = JointLimits.from_urdf(urdf, grip).tighten(profile) if grip else None
    except ConfigError:  # a URDF without the hand (or without finger limits): the gripper is driven by width only
        grip_limits = None
    out = [f"{n}={v:g}" for n, v, lo, hi in zip(arm, q_home, limits.lower, limits.upper) if not lo <= v <= hi]
    if out:
        raise ConfigError("q_home", f"{out} outside the joint limits", "give a home posture inside the limits")
    chain.lower, chain.upper = limits.lower.copy(), limits.upper.copy()  # the IK clamps the tighter limits too
    chain.velocity_limit = limits.velocity.copy()
    node.get_logger().info(f"robot model from {source}: {base}->{tip}, joints {arm}, limits "
                           f"{'URDF + profile ' + profile.name if profile else 'URDF only'}")
    return SimpleNamespace(urdf=urdf, base_link=base, tip_link=tip, arm_joints=tuple(arm),
                           gripper_joints=tuple(grip), policy_arm_joints=tuple(policy_arm),
                           policy_gripper_joints=tuple(policy_grip), q_home=tuple(q_home), max_width=r.max_width,
                           limits=limits, gripper_limits=grip_limits, profile=profile, joint_map=jmap,
                           source=source), chain


# --------------------------------------------------------------------------------------------------- QoS per topic
#: the policies a ``qos_overrides.<topic>.<publisher|subscription>.<policy>`` parameter may set, with their values
QOS_OVERRIDE_POLICIES = {"reliability": "reliable | best_effort", "durability": "volatile | transient_local",
                         "history": "keep_last | keep_all", "depth": "an integer >= 1 (with keep_last)"}


def qos_publisher(node, msg_type, topic: str, qos: QoSProfile, **kwargs):
    """``node.create_publisher(msg_type, topic, qos)`` whose QoS the user can override per topic with the standard
    ROS 2 parameters (rclpy's ``QoSOverridingOptions``; the same names as rclcpp nodes)::

        qos_overrides.<topic>.publisher.reliability   reliable | best_effort
        qos_overrides.<topic>.publisher.durability    volatile | transient_local
        qos_overrides.<topic>.publisher.history       keep_last | keep_all
        qos_overrides.<topic>.publisher.depth         integer >= 1 (keep_last)

    ``<topic>`` is the fully resolved name (after namespaces and remapping, e.g. ``/cameras/front/image_raw``); in a
    parameter file ``qos_overrides: {/cameras/front/image_raw: {publisher: {reliability: reliable}}}``. The
    parameters are declared (read-only) when the publisher is created, with ``qos`` as their defaults; ``qos``
    itself is not modified. ``kwargs`` go to ``create_publisher``. Raises ConfigError naming the parameter for a
    value that is not one of the policy's values, of the wrong type, or a depth < 1 with keep_last."""
    return _overridable(node, "publisher", topic, qos, lambda q, o: node.create_publisher(
        msg_type, topic, q, qos_overriding_options=o, **kwargs))


def qos_subscription(node, msg_type, topic: str, callback, qos: QoSProfile, **kwargs):
    """``node.create_subscription(msg_type, topic, callback, qos)`` with per-topic overrides
    ``qos_overrides.<topic>.subscription.<reliability|durability|history|depth>`` (see :func:`qos_publisher`).
    A lifecycle node may create it in ``on_configure``: :func:`reject_undeclared` lets well-formed
    ``qos_overrides`` names through on lifecycle nodes. Raises ConfigError as :func:`qos_publisher`."""
    return _overridable(node, "subscription", topic, qos, lambda q, o: node.create_subscription(
        msg_type, topic, callback, q, qos_overriding_options=o, **kwargs))


def _overridable(node, kind: str, topic: str, qos: QoSProfile, create):
    import copy
    import re

    from rcl_interfaces.msg import SetParametersResult
    from rclpy.exceptions import InvalidParameterTypeException
    from rclpy.qos import QoSPolicyKind
    from rclpy.qos_overriding_options import InvalidQosOverridesError, QoSOverridingOptions

    field = f"qos_overrides.{node.resolve_topic_name(topic)}.{kind}"

    def check(q):
        ok = not (q.history == HistoryPolicy.KEEP_LAST and q.depth < 1)
        return SetParametersResult(successful=ok, reason="" if ok else f"depth {q.depth} < 1 with keep_last")

    opts = QoSOverridingOptions([QoSPolicyKind[p.upper()] for p in QOS_OVERRIDE_POLICIES], callback=check)
    try:
        return create(copy.copy(qos), opts)  # rclpy writes the overrides into the profile it is given
    except InvalidParameterTypeException as e:
        m = re.match(r"Trying to set parameter '.*\.(\w+)' to '(.*)' of type '(\w+)', expecting type '(\w+)'", str(e))
        if m is None:
            raise
        raise ConfigError(f"{field}.{m.group(1)}", f"{m.group(2)!r} is {m.group(3).lower()}, not "
                          f"{m.group(4).lower()}", f"use {QOS_OVERRIDE_POLICIES.get(m.group(1), 'a valid value')}") \
            from None
    except InvalidQosOverridesError:
        raise ConfigError(f"{field}.depth", "depth < 1 with history keep_last",
                          f"use {QOS_OVERRIDE_POLICIES['depth']}") from None
    except RuntimeError as e:
        m = re.match(r"Unexpected QoS override for policy `(\w+)`: `(.*)`", str(e))
        if m is None:
            raise
        raise ConfigError(f"{field}.{m.group(1)}", f"{m.group(2)!r} is not a {m.group(1)} policy",
                          f"use {QOS_OVERRIDE_POLICIES[m.group(1)]}") from None


def _deferred_qos_override(node, name: str) -> bool:
    """True for a well-formed ``qos_overrides.<topic>.<publisher|subscription>[_<id>].<policy>`` name given to a
    lifecycle node, which creates some publishers/subscriptions in its transitions (after start-up)."""
    import re

    from rclpy.lifecycle import LifecycleNode

    return isinstance(node, LifecycleNode) and re.fullmatch(
        r"qos_overrides\./\S+\.(publisher|subscription)(_\w+)?\.(" + "|".join(QOS_OVERRIDE_POLICIES) + ")",
        name) is not None


def reject_undeclared(node) -> None:
    """Raise ConfigError when a parameter was given (params file, ``-p``, launch, ``robot-rl bringup --set``) that the
    node never declared: rclpy silently ignores those, so a typo such as ``max_obs_agee`` would leave the default in
    force. Reads rclpy's record of the overrides meant for this node (``Node._parameter_overrides``, present since
    Foxy; skipped if a future rclpy renames it). On a lifecycle node, well-formed ``qos_overrides.*`` names are
    let through: its subscriptions may be created later, in ``on_configure`` (:func:`qos_subscription`)."""
    given = getattr(node, "_parameter_overrides", None)
    if not isinstance(given, dict):
        return
    unknown = sorted(n for n in given if not node.has_parameter(n) and not _deferred_qos_override(node, n))
    if unknown:
        import difflib

        known = sorted(node._parameters) if isinstance(getattr(node, "_parameters", None), dict) else []
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise ConfigError(f"{node.get_name()}.{unknown[0]}", f"{node.get_name()} has no parameter(s) {unknown}",
                          f"did you mean {close[0]!r}?" if close else f"its parameters are {known}")


# --------------------------------------------------------------------------------------------------- main
def run_node(make: Callable, args: list[str] | None = None, executor: str = "single") -> int:
    """``rclpy.init`` -> ``node = make()`` -> spin until SIGINT/SIGTERM -> ``node.close()`` (if any) -> shutdown.

    A ConfigError while building the node, or a parameter given that the node does not declare
    (:func:`reject_undeclared`), prints one line ``<node>: error: field: problem -> fix`` and returns 2.
    Any exception after SIGINT/SIGTERM counts as a clean stop (exit 0); before it, it propagates.
    """
    import signal

    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    args = sys.argv if args is None else args
    # our own handlers: SIGINT/SIGTERM raise KeyboardInterrupt in the spinning thread while the context is still
    # alive, so node.close() can still publish (e.g. a final hold command) before shutdown
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)

    stopping = []

    def _stop(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    node = None
    prog = os.path.basename(args[0]) if args else "node"
    try:
        node = make()
        reject_undeclared(node)
        ex = MultiThreadedExecutor(num_threads=3) if executor == "multi" else SingleThreadedExecutor()
        ex.add_node(node)
        ex.spin()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as e:
        # a KeyboardInterrupt raised by _stop inside a pybind11 call (e.g. rclpy's take_message converting its
        # arguments) surfaces as RuntimeError; after a stop request that is still a clean stop
        if not stopping:
            raise
        print(f"{prog}: stopped ({type(e).__name__} while stopping: {e})", file=sys.stderr, flush=True)
    finally:
        if node is not None:
            try:
                if hasattr(node, "close"):
                    node.close()
                node.destroy_node()
            except Exception:  # noqa: BLE001 - best effort during shutdown
                pass
        rclpy.try_shutdown()
    return 0
