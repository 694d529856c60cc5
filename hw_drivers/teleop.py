"""``teleop`` node: keyboard, geometry_msgs/Twist(Stamped) or sensor_msgs/Joy -> end-effector delta actions, with an
optional takeover mux in front of a policy.

Inputs (all optional, any mix)
  ~/twist (geometry_msgs/Twist), ~/twist_stamped (TwistStamped): linear x/y/z [m/s] and angular z [rad/s] of the
      tool in the robot base frame (e.g. a SpaceMouse driver, teleop_twist_keyboard, a script).
  /joy (sensor_msgs/Joy): axes ``axis_x axis_y axis_z axis_yaw`` (index, -1 unused; ``sign_*`` -1 inverts) scaled
      to ``max_linear_speed`` / ``max_yaw_rate``; buttons ``button_open`` / ``button_close``; ``deadman_button``
      (-1 = none) must be held for Joy motion to count.
  ~/gripper (std_msgs/Float64): gripper command in [-1 open, +1 closed] (kept until changed).
  keyboard (``keyboard:=true`` and a terminal on stdin): w/s x, a/d y, r/f z, q/e yaw, space toggles the gripper;
      with ``label_node`` set (a policy node with ``learn:=true``, e.g. policy_node), the episode keys call its
      services: 1 ``~/mark_success``, 2 ``~/mark_failure``, 0 ``~/discard_episode``, Enter ``~/start_episode``
      (reset done); each reply is logged.
Velocities become env actions: ``a_xyz = v * dt / pos_scale``, ``a_yaw = w_z * dt / yaw_scale`` with
``dt = 1 / control_rate`` (clipped to [-1, 1]), i.e. the action the sim env and arm bridge interpret as the same motion.

Outputs, every control period
  ``action_topic`` (default /arm_bridge/action): the action message of :mod:`robot_rl.ros.common`.
  /robot_rl/intervention (std_msgs/Bool): True while the human drives (mux mode only).
  /robot_rl/human_action (action message): the human's action whenever the human input is fresh.
Plain teleop (``policy_action_topic`` empty): the human action every period (zero motion, last gripper command when
the input is idle or older than ``input_timeout``). Mux (``policy_action_topic`` set, e.g. /policy/action): the
policy's actions pass through until a human input with motion (or a gripper change) arrives; the human then has
control (intervention = True) until ``takeover_timeout`` seconds without human motion; stale policy actions (older
than ``input_timeout``) are never forwarded.
"""

from __future__ import annotations

import select
import sys
import threading
import time

import numpy as np

from robot_rl.robot.controller import ControllerConfig
from robot_rl.ros.common import (COMMAND_QOS, action_to_msg, declare, msg_to_action, run_node)


def twist_to_action(lin, wz, gripper: float, dt: float, pos_scale: float, yaw_scale: float) -> np.ndarray:
    """Tool velocity (m/s, rad/s) held for ``dt`` -> env action in [-1, 1] (see module docstring)."""
    a = np.zeros(5)
    a[:3] = np.asarray(lin, float) * dt / pos_scale
    a[3] = float(wz) * dt / yaw_scale
    a = np.clip(a, -1.0, 1.0)
    a[4] = float(np.clip(gripper, -1.0, 1.0))
    return a


KEYS = {"w": (0, 1), "s": (0, -1), "a": (1, 1), "d": (1, -1), "r": (2, 1), "f": (2, -1), "q": (3, 1), "e": (3, -1)}
LABEL_KEYS = {"1": "mark_success", "2": "mark_failure", "0": "discard_episode", "\n": "start_episode"}


def make_node():
    from geometry_msgs.msg import Twist, TwistStamped
    from rclpy.node import Node
    from sensor_msgs.msg import JointState, Joy
    from std_msgs.msg import Bool, Float64

    class Teleop(Node):
        def __init__(self):
            super().__init__("teleop")
            cc = ControllerConfig()
            self.dt = 1.0 / float(declare(self, "control_rate", 10.0, "actions per second [Hz]", positive=True))
            self.pos_scale = float(declare(self, "pos_scale", cc.pos_scale, "m per unit action (as the bridge)"))
            self.yaw_scale = float(declare(self, "yaw_scale", cc.yaw_scale, "rad per unit action (as the bridge)"))
            self.max_lin = float(declare(self, "max_linear_speed", cc.pos_scale * 10.0, "Joy/keyboard full scale [m/s]"))
            self.max_yaw = float(declare(self, "max_yaw_rate", cc.yaw_scale * 10.0, "Joy/keyboard full scale [rad/s]"))
            self.input_timeout = float(declare(self, "input_timeout", 0.3, "human/policy inputs older are ignored [s]",
                                               positive=True))
            self.takeover_timeout = float(declare(self, "takeover_timeout", 0.5, "human keeps control this long [s]",
                                                  positive=True))
            self.axes = [int(declare(self, f"axis_{k}", v, f"Joy axis index for {k} (-1 unused)")) for k, v in
                         (("x", 1), ("y", 0), ("z", 4), ("yaw", 3))]
            self.signs = [float(declare(self, f"sign_{k}", 1.0, f"Joy axis sign for {k} (-1 inverts)"))
                          for k in ("x", "y", "z", "yaw")]
            self.b_open = int(declare(self, "button_open", 0, "Joy button: open gripper"))
            self.b_close = int(declare(self, "button_close", 1, "Joy button: close gripper"))
            self.deadman = int(declare(self, "deadman_button", -1, "Joy button to hold for motion (-1 none)"))
            policy_topic = declare(self, "policy_action_topic", "", "policy actions to mux ('' = plain teleop)")
            action_topic = declare(self, "action_topic", "/arm_bridge/action", "where actions go")
            keyboard = bool(declare(self, "keyboard", False, "read keys from the terminal"))
            label_node = declare(self, "label_node", "", "learning policy node the episode keys label ('' = off)")
            self.label_clients = {}
            if label_node:
                from std_srvs.srv import Trigger

                self._Trigger = Trigger
                self.label_clients = {k: self.create_client(Trigger, f"/{label_node}/{srv}")
                                      for k, srv in LABEL_KEYS.items()}
            self.gripper = -1.0
            self.human = None  # (t, lin (3,), wz)
            self.human_motion_t = -np.inf
            self.policy = None  # (t, msg)
            self.mux = bool(policy_topic)
            self.pub = self.create_publisher(JointState, action_topic, COMMAND_QOS)
            self.pub_int = self.create_publisher(Bool, "/robot_rl/intervention", COMMAND_QOS)
            self.pub_human = self.create_publisher(JointState, "/robot_rl/human_action", COMMAND_QOS)
            self.create_subscription(Twist, "~/twist", lambda m: self._motion(m.linear, m.angular.z), COMMAND_QOS)
            self.create_subscription(TwistStamped, "~/twist_stamped",
                                     lambda m: self._motion(m.twist.linear, m.twist.angular.z), COMMAND_QOS)
            self.create_subscription(Joy, "/joy", self._on_joy, COMMAND_QOS)
            self.create_subscription(Float64, "~/gripper", self._on_gripper, COMMAND_QOS)
            if self.mux:
                self.create_subscription(JointState, policy_topic,
                                         lambda m: setattr(self, "policy", (time.monotonic(), m)), COMMAND_QOS)
            self.create_timer(self.dt, self._tick)
            self._Bool = Bool
            self._stop = threading.Event()
            if keyboard and sys.stdin.isatty():
                threading.Thread(target=self._keyboard, daemon=True).start()
            elif keyboard:
                self.get_logger().warning("keyboard:=true but stdin is not a terminal: keyboard disabled")

        # -- inputs --------------------------------------------------------------------------------------------
        def _motion(self, lin, wz, t=None):
            t = time.monotonic() if t is None else t
            v = np.array([lin.x, lin.y, lin.z]) if hasattr(lin, "x") else np.asarray(lin, float)
            self.human = (t, v, float(wz))
            if np.any(np.abs(v) > 1e-6) or abs(wz) > 1e-6:
                self.human_motion_t = t

        def _on_gripper(self, m):
            g = float(np.clip(m.data, -1.0, 1.0))
            if g != self.gripper:
                self.human_motion_t = time.monotonic()
            self.gripper = g

        def _on_joy(self, m):
            ax = list(m.axes)

            def axis(j):
                i = self.axes[j]
                return self.signs[j] * ax[i] if 0 <= i < len(ax) else 0.0

            if self.deadman >= 0 and not (self.deadman < len(m.buttons) and m.buttons[self.deadman]):
                self._motion(np.zeros(3), 0.0)
                return
            v = np.array([axis(j) for j in range(3)]) * self.max_lin
            self._motion(v, axis(3) * self.max_yaw)
            b = list(m.buttons)
            if self.b_open < len(b) and b[self.b_open]:
                self._on_gripper(Float64(data=-1.0))
            if self.b_close < len(b) and b[self.b_close]:
                self._on_gripper(Float64(data=1.0))

        def _keyboard(self):
            import termios
            import tty

            fd = sys.stdin.fileno()
            old = termios.tcgetattr(fd)
            try:
                tty.setcbreak(fd)
                while not self._stop.is_set():
                    if not select.select([sys.stdin], [], [], 0.1)[0]:
                        continue
                    k = sys.stdin.read(1).lower()
                    if k in self.label_clients:
                        self._label(k)
                    elif k == " ":
                        self._on_gripper(Float64(data=-self.gripper))
                    elif k in KEYS:
                        axis, sign = KEYS[k]
                        v, wz = np.zeros(3), 0.0
                        if axis < 3:
                            v[axis] = sign * self.max_lin
                        else:
                            wz = sign * self.max_yaw
                        self._motion(v, wz)
            finally:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)

        def _label(self, key: str):
            """An episode key: call the learning policy node's service, log its reply."""
            cli, name = self.label_clients[key], LABEL_KEYS[key]
            if not cli.service_is_ready():
                self.get_logger().warning(f"{name}: {cli.srv_name} is not available")
                return

            def done(f):
                r = f.result()
                log = self.get_logger().info if r is not None and r.success else self.get_logger().warning
                log(f"{name}: {getattr(r, 'message', 'no reply')}")

            cli.call_async(self._Trigger.Request()).add_done_callback(done)

        # -- output --------------------------------------------------------------------------------------------
        def _tick(self):
            now = time.monotonic()
            stamp = self.get_clock().now().to_msg()
            fresh = self.human is not None and now - self.human[0] <= self.input_timeout
            lin, wz = (self.human[1], self.human[2]) if fresh else (np.zeros(3), 0.0)
            a_h = twist_to_action(lin, wz, self.gripper, self.dt, self.pos_scale, self.yaw_scale)
            if fresh or now - self.human_motion_t <= self.takeover_timeout:
                self.pub_human.publish(action_to_msg(a_h, stamp))
            if not self.mux:
                self.pub.publish(action_to_msg(a_h, stamp))
                return
            human_in_control = now - self.human_motion_t <= self.takeover_timeout
            self.pub_int.publish(self._Bool(data=bool(human_in_control)))
            if human_in_control:
                self.pub.publish(action_to_msg(a_h, stamp))
            elif self.policy is not None and now - self.policy[0] <= self.input_timeout:
                m = self.policy[1]
                try:
                    a = msg_to_action(m)
                except Exception:  # noqa: BLE001 - malformed policy action: not forwarded
                    return
                self.gripper = float(np.clip(a[4], -1, 1))  # a takeover starts from the policy's gripper state
                self.pub.publish(m)

        def close(self):
            self._stop.set()

    return Teleop()


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
