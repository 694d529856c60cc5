"""Gripper outputs of ``arm_bridge``: where the commanded gripper width goes.

``arm_bridge`` computes one gripper width per action (metres between the fingers: 0 = closed ... ``max_width`` =
open; action -1 = open, +1 = closed) and hands it to the :class:`GripperOutput` its ``gripper_output`` parameter names:

``topic`` (default): :class:`TopicGripper`
    ``std_msgs/Float64MultiArray [width / len(gripper_joints)]`` (one finger's position [m]) on
    ``/<gripper_controller>/commands``, every action: a forward command controller, or ``sim_robot``.
``gripper_command``: :class:`GripperCommandAction`
    ``control_msgs/action/GripperCommand`` goals on ``gripper_action`` (default ``/<gripper_controller>/gripper_cmd``,
    the action of ros2_controllers' ``gripper_action_controller`` / ``parallel_gripper_action_controller``; Franka's
    ``franka_gripper`` serves the same type on ``/franka_gripper/gripper_action``), a new goal only when the width
    moved more than ``gripper_goal_threshold`` since the last goal (gripper actions take a second, not 10 ms).
``module.path:ClassName``: your adapter
    a :class:`GripperOutput` subclass (any class with ``command(width_m)``) importable from ``module.path``,
    constructed as ``ClassName(node, controller, joints)`` — e.g. one that sends Franka's ``franka_msgs/action/Grasp``
    (width, speed, force, epsilon) when the command closes and ``Move`` when it opens. It may create publishers or
    action clients on ``node`` and declare its own parameters (:func:`robot_rl.ros.common.declare`) in
    ``__init__``; those are accepted like the bridge's own.

``gripper_controller: ''`` disables the gripper output (no adapter is built).
"""

from __future__ import annotations

import importlib

from robot_rl.errors import ConfigError
from robot_rl.ros.common import COMMAND_QOS, declare


class GripperOutput:
    """Interface of a gripper output. ``node``: the arm_bridge rclpy node; ``controller``: its
    ``gripper_controller`` parameter; ``joints``: its ``gripper_joints`` (the gripper width is the sum of their
    positions, so one finger's position is ``width / len(joints)``)."""

    def __init__(self, node, controller: str, joints):
        self.node, self.controller, self.joints = node, str(controller), tuple(joints)

    @property
    def n_fingers(self) -> int:
        return max(1, len(self.joints))

    def command(self, width_m: float) -> None:
        """Command the gripper opening ``width_m`` [m] (already clipped to [0, max_width]); called once per action
        from the node's executor thread. Must not block."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the output created (publishers, action clients). Does not move the gripper."""


class TopicGripper(GripperOutput):
    """``std_msgs/Float64MultiArray [width / n_fingers]`` [m] on ``/<controller>/commands`` (COMMAND_QOS: reliable,
    keep last 10), one message per ``command``."""

    def __init__(self, node, controller: str, joints):
        super().__init__(node, controller, joints)
        from std_msgs.msg import Float64MultiArray

        self._msg = Float64MultiArray
        self.pub = node.create_publisher(Float64MultiArray, f"/{self.controller}/commands", COMMAND_QOS)

    def command(self, width_m: float) -> None:
        self.pub.publish(self._msg(data=[float(width_m) / self.n_fingers]))

    def close(self) -> None:
        self.node.destroy_publisher(self.pub)


class GripperCommandAction(GripperOutput):
    """``control_msgs/action/GripperCommand`` goals through an rclpy ``ActionClient``.

    ``command(width)`` sends a goal only when no goal was sent yet or ``|width - last goal's width| > threshold``
    [m]; ``goal.command.position`` = ``width / n_fingers`` (``position="finger"``: one finger's position, what
    ros2_controllers' gripper action controllers on a finger joint and Franka's ``gripper_action`` expect) or
    ``width`` (``position="width"``), ``goal.command.max_effort`` = ``max_effort`` [N]. A newer goal preempts the
    running one on the server. While the server is not available, commands are dropped (warned, counted in
    ``stats["no_server"]``) and the next one is sent once it is. ``action`` '' = ``/<controller>/gripper_cmd``.
    ``client``: a stand-in for the ActionClient (tests). Raises ConfigError when control_msgs is not installed or
    a value is out of range."""

    def __init__(self, node, controller: str, joints, action: str = "", max_effort: float = 20.0,
                 threshold: float = 0.005, position: str = "finger", client=None):
        super().__init__(node, controller, joints)
        try:
            from control_msgs.action import GripperCommand
        except ImportError as e:
            raise ConfigError("gripper_output", f"gripper_command needs control_msgs ({e})",
                              "install control_msgs (apt: ros-<distro>-control-msgs, then source ROS), or use "
                              "gripper_output:=topic or your own adapter module:Class") from None
        if position not in ("finger", "width"):
            raise ConfigError("gripper_command_position", f"{position!r}", "use finger or width")
        if not threshold >= 0:
            raise ConfigError("gripper_goal_threshold", f"{threshold} < 0", "use e.g. 0.005 [m]")
        if not max_effort >= 0:
            raise ConfigError("gripper_max_effort", f"{max_effort} < 0", "use e.g. 20.0 [N]")
        self.action = action or f"/{self.controller}/gripper_cmd"
        self.max_effort, self.threshold, self.position = float(max_effort), float(threshold), position
        self._Goal = GripperCommand.Goal
        if client is None:
            from rclpy.action import ActionClient

            client = ActionClient(node, GripperCommand, self.action)
        self.client = client
        self.last: float | None = None  # width of the last goal sent [m]
        self.stats = {"goals": 0, "rejected": 0, "no_server": 0}

    def command(self, width_m: float) -> None:
        width_m = float(width_m)
        if self.last is not None and abs(width_m - self.last) <= self.threshold:
            return
        if not self.client.server_is_ready():
            self.stats["no_server"] += 1
            self.node.get_logger().warning(f"gripper action {self.action} not available: command dropped",
                                           throttle_duration_sec=5.0)
            return
        goal = self._Goal()
        goal.command.position = width_m / self.n_fingers if self.position == "finger" else width_m
        goal.command.max_effort = self.max_effort
        self.last = width_m
        self.stats["goals"] += 1
        self.client.send_goal_async(goal).add_done_callback(self._on_goal)

    def _on_goal(self, fut) -> None:
        handle = fut.result()
        if handle is None or not handle.accepted:
            self.stats["rejected"] += 1
            self.last = None  # resend on the next command
            self.node.get_logger().warning(f"gripper action {self.action} rejected a goal",
                                           throttle_duration_sec=5.0)

    def close(self) -> None:
        destroy = getattr(self.client, "destroy", None)
        if destroy is not None:
            destroy()


def load_adapter(spec: str):
    """The class named by ``module.path:ClassName``. Raises ConfigError when it cannot be imported."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError("gripper_output", f"{spec!r}", "use topic, gripper_command or module.path:ClassName")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError("gripper_output", f"cannot import {module} ({e})",
                          "put the adapter's module on PYTHONPATH (or install it)") from None
    cls = getattr(mod, name, None)
    if cls is None:
        raise ConfigError("gripper_output", f"{module} has no {name}", f"name a class defined in {module}")
    return cls


def make_gripper_output(node, controller: str, joints) -> GripperOutput | None:
    """Declare the gripper-output parameters on ``node`` and build the output they select (None when
    ``controller`` is ''). Parameters: ``gripper_output`` (topic | gripper_command | module.path:ClassName) and,
    for gripper_command, ``gripper_action``, ``gripper_max_effort`` [N], ``gripper_goal_threshold`` [m],
    ``gripper_command_position`` (finger | width). Raises ConfigError for a bad selection or value, or an adapter
    without ``command``."""
    kind = declare(node, "gripper_output", "topic", "where gripper widths go: topic (Float64MultiArray on "
                   "/<gripper_controller>/commands) | gripper_command (control_msgs GripperCommand action) | "
                   "module.path:ClassName (your GripperOutput)")
    action = declare(node, "gripper_action", "",
                     "gripper_command: action name ('' = /<gripper_controller>/gripper_cmd)")
    max_effort = float(declare(node, "gripper_max_effort", 20.0, "gripper_command: goal command.max_effort [N]"))
    threshold = float(declare(node, "gripper_goal_threshold", 0.005,
                              "gripper_command: a new goal when the width moved more than this [m]"))
    position = declare(node, "gripper_command_position", "finger",
                       "gripper_command: command.position = finger (width / len(gripper_joints)) | width")
    if not controller:
        return None
    if kind == "topic":
        return TopicGripper(node, controller, joints)
    if kind == "gripper_command":
        return GripperCommandAction(node, controller, joints, action, max_effort, threshold, position)
    out = load_adapter(kind)(node, controller, tuple(joints))
    if not callable(getattr(out, "command", None)):
        raise ConfigError("gripper_output", f"{kind} has no command(width_m) method",
                          "subclass robot_rl.hw_drivers.gripper.GripperOutput and implement command")
    return out
