"""``arm_bridge`` node: end-effector delta actions -> joint targets for a ros2_control arm, through the safety filter.

The SAME :class:`~robot_rl.robot.controller.DiffIKController` as the simulated envs (robot model read from the URDF by
:class:`~robot_rl.robot.kinematics.KinematicChain`) turns each 5-D action (env units: x/y/z x ``pos_scale`` m, yaw x
``yaw_scale`` rad per control step, gripper -1 open ... +1 closed) into joint-position targets from the measured
joint positions; :class:`~robot_rl.robot.safety.SafetyFilter` then enforces URDF position/velocity limits, a per-step
delta cap and the tool workspace box, and the result goes to the configured controller.

The robot model (URDF or the latched ``robot_description_topic``, the ``robot_profile`` limits, ``joint_map``) comes
from :func:`robot_rl.ros.common.robot_model`; the tighter of URDF and profile limits is used throughout.

Subscribes
  /joint_states            sensor_msgs/JointState (measured arm + gripper joints)
  ~/action                 sensor_msgs/JointState  the action message of :mod:`robot_rl.ros.common`
                           (name = ee_dx ee_dy ee_dz ee_dyaw gripper, position in [-1, 1], stamp = observation time)
  ~/action_chunk           trajectory_msgs/JointTrajectory  the planned continuation of the action with the same stamp
                           (:func:`robot_rl.ros.common.chunk_to_msg`; optional)
  ~/hold                   std_msgs/Empty  hold the measured posture now (until the next action)
  /robot_rl/estop          std_msgs/Bool (latched) the one e-stop topic (``estop_topic``): true = e-stop, false = clear
Publishes
  /<arm_controller>/joint_trajectory   trajectory_msgs/JointTrajectory  (command_interface = trajectory, header.stamp
                                       0 = start on receipt). trajectory_mode = chunk (default): this step's target,
                                       then the IK of the chunk's next actions (the last repeated up to
                                       ``trajectory_horizon`` s), knots one control period apart with positions AND
                                       velocities, within ``acceleration_scale`` x the acceleration limits, from the
                                       desired state of the previous trajectory
                                       (:func:`robot_rl.robot.trajectory.plan_knots`); trajectory_mode = point: one
                                       position-only point ``trajectory_duration`` ahead (0 = control_period)
  /<arm_controller>/commands           std_msgs/Float64MultiArray (command_interface = commands; refused unless
                                       ``hardware_interpolates: true``: a position step per control period)
  gripper                              the ``gripper_output`` (:mod:`robot_rl.hw_drivers.gripper`; default
                                       std_msgs/Float64MultiArray [width / len(gripper_joints)] on
                                       /<gripper_controller>/commands)
  ~/latency                            std_msgs/Float64  observation -> command latency per command [s]
  /diagnostics                         diagnostic_msgs/DiagnosticArray  state, safety counters, latency p50/p99
Services
  ~/estop, ~/clear_estop   std_srvs/Trigger  latched emergency stop (hold; actions refused until cleared)

Hold = command the measured joint positions (once, at the transition; in chunk mode a braking trajectory from the
desired state to rest), on: ``~/hold``, e-stop, a rejected action (NaN/inf, wrong names), missing or stale joint
states (older than ``joint_state_timeout``), and the command watchdog (no action for ``command_timeout`` seconds
while commands were flowing).

    python -m robot_rl.hw_drivers.arm_bridge --ros-args -p command_interface:=trajectory
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from robot_rl.robot.controller import ControllerConfig, DiffIKController
from robot_rl.errors import ConfigError
from robot_rl.ros.common import (COMMAND_QOS, declare, declare_safety, diagnostic, estop_services, JointStateCache,
                                 msg_to_action, msg_to_chunk, now_sec, robot_model, run_node, sec_to_duration,
                                 sec_to_stamp, stamp_to_sec)
from robot_rl.robot.safety import EStopLatch, JointLimits, SafetyFilter, Watchdog
from robot_rl.robot.trajectory import TrajectoryFollower, plan_knots

REPLAN_AFTER = 0.003  # s: a trajectory planned longer ago than this at publishing is planned again (_publish_plan)
MAX_REPLANS = 2
REFERENCE_TOLERANCE = 0.15  # rad: farther than this from the sent trajectory, the arm is not following it


def make_node():
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Empty, Float64, Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    class ArmBridge(Node):
        def __init__(self):
            super().__init__("arm_bridge")
            self.robot, self.chain = robot_model(self)
            cc = ControllerConfig()
            ccfg = ControllerConfig(
                pos_scale=float(declare(self, "pos_scale", cc.pos_scale, "m per unit action per control step")),
                yaw_scale=float(declare(self, "yaw_scale", cc.yaw_scale, "rad per unit action per control step")),
                max_width=float(declare(self, "max_width", cc.max_width, "gripper opening at action -1 [m]")),
                workspace_low=tuple(declare(self, "controller_workspace_low", list(cc.workspace_low),
                                            "controller clip of the target tool position [m]")),
                workspace_high=tuple(declare(self, "controller_workspace_high", list(cc.workspace_high),
                                             "controller clip of the target tool position [m]")),
                ik_iters=int(declare(self, "ik_iters", cc.ik_iters, "DLS iterations per command")),
                damping=float(declare(self, "ik_damping", cc.damping, "DLS damping")),
                max_joint_delta=float(declare(self, "controller_max_joint_delta", cc.max_joint_delta,
                                              "controller's own per-step joint delta cap [rad]")))
            self.controller = DiffIKController(self.chain, np.array(self.robot.q_home), ccfg)
            scfg = declare_safety(self, "hold when no action for this long [s]")
            self.limits = JointLimits.from_urdf(self.robot.urdf, self.robot.arm_joints).tighten(self.robot.profile)
            self.safety = SafetyFilter(self.limits, lambda q: self.chain.pose(q)[0], scfg)
            self.plan_safety = SafetyFilter(self.limits, lambda q: self.chain.pose(q)[0], scfg)  # predicted knots
            self.velocity_scale = scfg.velocity_scale
            self.watchdog = Watchdog(scfg.command_timeout)
            self.estop = EStopLatch()
            self.period = float(declare(self, "control_period", 0.1, "seconds each action is given [s]", positive=True))
            self.traj_duration = float(declare(self, "trajectory_duration", 0.0,
                                               "time_from_start of each trajectory point [s] (0 = control_period)"))
            self.traj_duration = self.traj_duration if self.traj_duration > 0 else self.period
            self.js_timeout = float(declare(self, "joint_state_timeout", 0.2, "hold when joint states are older [s]",
                                            positive=True))
            self.interface = declare(self, "command_interface", "trajectory", "trajectory | commands")
            if self.interface not in ("trajectory", "commands"):
                raise ConfigError("command_interface", f"{self.interface!r}", "use trajectory or commands")
            interpolates = bool(declare(self, "hardware_interpolates", False, "the position interface behind "
                                        "`commands` interpolates between targets (sim_robot does) [bool]"))
            if self.interface == "commands" and not interpolates:
                raise ConfigError("command_interface", "`commands` sends each control step's target as a position "
                                  "step, which a real arm's 1 kHz position interface executes as an acceleration "
                                  "spike", "use command_interface: trajectory (joint_trajectory_controller), or set "
                                  "hardware_interpolates: true for a simulator or hardware that interpolates")
            self.traj_mode = declare(self, "trajectory_mode", "chunk", "chunk (multi-point, positions + "
                                     "velocities through this step and the planned chunk) | point (one "
                                     "position-only point per step)")
            if self.traj_mode not in ("chunk", "point"):
                raise ConfigError("trajectory_mode", f"{self.traj_mode!r}", "use chunk or point")
            self.traj_horizon = float(declare(self, "trajectory_horizon", 0.4, "chunk mode: the knots span at "
                                              "least this long, the last action repeated past the chunk [s]",
                                              positive=True))
            self.traj_lead = float(declare(self, "trajectory_lead", 0.03, "chunk mode: knots this much earlier "
                                           "than their control step [s] (the arm lags its reference; "
                                           "< control_period)"))
            acc = float(declare(self, "acceleration_limit", 0.0, "chunk mode: joint acceleration limit "
                                "[rad/s^2] (0 = the robot profile's, else 7.5)"))
            self.acc_scale = float(declare(self, "acceleration_scale", 0.5, "chunk mode: plan at this fraction of "
                                           "the acceleration limit; the rest absorbs transport latency (a "
                                           "trajectory starts on receipt, from a slightly later state)",
                                           positive=True))
            arm_ctrl = declare(self, "arm_controller", "arm_controller", "ros2_control arm controller name")
            grip_ctrl = declare(self, "gripper_controller", "gripper_controller", "gripper controller name ('' none)")
            if not self.period > 0:
                raise ConfigError("control_period", f"{self.period} <= 0", "use e.g. 0.1")
            if not 0.0 <= self.traj_lead < self.period:
                raise ConfigError("trajectory_lead", f"{self.traj_lead} s", f"use 0 <= lead < {self.period}")
            prof = self.limits.acceleration  # inf where the robot profile gives none
            self.acc_max = self.acc_scale * (
                np.full(len(self.robot.arm_joints), acc) if acc > 0 else
                prof if np.all(np.isfinite(prof)) else np.full(len(self.robot.arm_joints), 7.5))
            self.reference: TrajectoryFollower | None = None  # the trajectory sent last (chunk mode)
            self.preview: tuple[float, np.ndarray] | None = None  # (stamp, rows 1..) of the last action chunk

            self.js = JointStateCache()
            self.js_rx: float | None = None  # receive time (node clock) of the last joint state
            self.state = "idle"  # idle | active | holding | estop
            self.hold_reason = ""
            self.counts = {"actions": 0, "commands": 0, "rejected": 0, "holds": 0, "watchdog": 0, "replans": 0}
            self.plan_delay = 0.0  # s: running mean of planning + publishing time (chunk mode, _publish_plan)
            self.latencies: deque = deque(maxlen=2000)
            if self.interface == "trajectory":
                self.pub_arm = self.create_publisher(JointTrajectory, f"/{arm_ctrl}/joint_trajectory", COMMAND_QOS)
            else:
                self.pub_arm = self.create_publisher(Float64MultiArray, f"/{arm_ctrl}/commands", COMMAND_QOS)
            from robot_rl.hw_drivers.gripper import make_gripper_output

            # a GripperOutput (hw_drivers/gripper.py) chosen by `gripper_output`; None when grip_ctrl is ''
            self.pub_grip = make_gripper_output(self, grip_ctrl, self.robot.gripper_joints)
            self.pub_lat = self.create_publisher(Float64, "~/latency", COMMAND_QOS)
            self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
            self.create_subscription(JointState, "/joint_states", self._on_js, COMMAND_QOS)
            self.create_subscription(JointState, "~/action", self._on_action, COMMAND_QOS)
            self.create_subscription(JointTrajectory, "~/action_chunk", self._on_chunk, COMMAND_QOS)
            self.create_subscription(Empty, "~/hold", lambda m: self.hold("hold requested"), COMMAND_QOS)
            estop_services(self, self._on_estop, self._on_clear)
            self.create_timer(min(0.02, scfg.command_timeout / 4), self._check_watchdog)
            self.create_timer(1.0, self._diag)
            self._JT, self._JTP, self._F64A, self._F64 = JointTrajectory, JointTrajectoryPoint, Float64MultiArray, Float64
            from rclpy.serialization import serialize_message

            self._serialize = serialize_message
            self.get_logger().info(f"arm_bridge: {self.interface} -> /{arm_ctrl}, gripper -> /{grip_ctrl}, "
                                   f"period {self.period} s, watchdog {scfg.command_timeout} s")

        # -- inputs --------------------------------------------------------------------------------------------
        def _on_js(self, m):
            self.js.update(m, now_sec(self))
            self.js_rx = now_sec(self)

        def _measured(self):
            now = now_sec(self)
            if self.js_rx is None or not self.js.has(self.robot.arm_joints):
                return None, "no joint states received"
            if now - self.js_rx > self.js_timeout:
                return None, f"joint states {now - self.js_rx:.3f} s old"
            q, dq, w, _ = self.js.get(self.robot.arm_joints, [j for j in self.robot.gripper_joints if j in self.js.pos])
            return (q, w), ""

        def _on_chunk(self, m):
            try:
                rows = msg_to_chunk(m)
            except ConfigError as e:
                self.get_logger().error(f"action chunk ignored: {e}", throttle_duration_sec=2.0)
                return
            if len(rows) and np.all(np.isfinite(rows)):
                self.preview = (stamp_to_sec(m.header.stamp), rows[1:])

        def _upcoming(self, m) -> np.ndarray:
            """Action rows after this one, from the chunk message of the same observation (none otherwise)."""
            t = stamp_to_sec(m.header.stamp)
            if self.preview is None or t <= 0 or self.preview[0] != t:
                return np.zeros((0, 5))
            return self.preview[1]

        def _on_action(self, m):
            now = now_sec(self)
            self.counts["actions"] += 1
            if self.estop.active:
                return
            try:
                a = msg_to_action(m)
            except ConfigError as e:
                self.counts["rejected"] += 1
                self.get_logger().error(f"action rejected: {e}")
                self.hold("malformed action")
                return
            if not np.all(np.isfinite(a)):
                self.counts["rejected"] += 1
                self.get_logger().error("action rejected: NaN/inf")
                self.hold("non-finite action")
                return
            meas, why = self._measured()
            if meas is None:
                self.hold(why)
                return
            q, _ = meas
            q_t, width = self.controller.compute(q, np.clip(a, -1.0, 1.0))
            q_safe, rep = self.safety.filter(q_t, q, self.period)
            width = float(np.clip(width, 0.0, self.controller.cfg.max_width))
            self.watchdog.kick(now)
            if self.interface == "trajectory" and self.traj_mode == "chunk":
                self._send_plan(q, q_safe, a, self._upcoming(m), width, now)
            else:
                self._send(q_safe, width)
            self.state = "active"
            obs_t = stamp_to_sec(m.header.stamp)
            if obs_t > 0:
                lat = now - obs_t
                self.latencies.append(lat)
                self.pub_lat.publish(self._F64(data=float(lat)))

        def _send_plan(self, q_meas, q_first, a, ahead, width, now):
            """A multi-point trajectory (positions + velocities): this step's target ``q_first`` (of action ``a``
            at the measured posture, as in training), then the IK of the planned actions ``ahead``, the last one
            (or ``a`` when no chunk came with it, e.g. teleop) repeated up to ``trajectory_horizon``; knots by
            :func:`robot_rl.robot.trajectory.plan_knots` from the desired state now."""
            n = max(1, int(np.ceil(self.traj_horizon / self.period - 1e-9)))
            rows = list(np.clip(ahead, -1.0, 1.0))
            rows += [rows[-1] if rows else np.clip(a, -1.0, 1.0)] * max(0, n - 1 - len(rows))
            q_steps, q_prev = [q_first], q_first
            for r in rows:
                q_t, _ = self.controller.compute(q_prev, r)
                q_prev, _ = self.plan_safety.filter(q_t, q_prev, self.period)
                q_steps.append(q_prev)
            self._publish_plan(q_meas, np.stack(q_steps), self.traj_lead)
            self._send_gripper(width)

        def _publish_plan(self, q_meas, q_steps, lead=0.0):
            """Knots from the desired state (q0, v0) now through ``q_steps`` (plan_knots; None: brake to rest),
            sent as one JointTrajectory with positions and velocities, and remembered as the desired state.

            A controller starts the trajectory on receipt (``header.stamp`` 0) from its desired state then, so a
            plan made from the state at an earlier time starts from a velocity off by (acceleration change) x (time
            between), an extra acceleration of 4 dv / h on the first segment (h = period - lead; 2 rad/s^2 per ms at
            0.07 s and 3.75 rad/s^2 of change). Hence the plan starts at the expected publishing time (``now`` + the
            running mean of the planning time, ``plan_delay_ms`` in the diagnostics); the message is serialized
            before the time is checked, so that it is written (its DDS source timestamp) right after the check; a
            plan published ``REPLAN_AFTER`` later than expected (a preempted process on a loaded host) is made again
            (at most ``MAX_REPLANS`` times, counted in ``replans``), and if still late its ``time_from_start`` values
            count from the actual publishing time (the knots keep their place in time; those already due are
            dropped)."""
            for attempt in range(MAX_REPLANS + 1):
                now = now_sec(self)
                start = now + self.plan_delay
                q0, v0 = self._desired(q_meas, start)
                steps = (q0 + 0.5 * v0 * self.period)[None] if q_steps is None else q_steps
                times, qs, vs = plan_knots(q0, v0, steps, self.period, vel_max=self.limits.velocity *
                                           self.velocity_scale, acc_max=self.acc_max, lead=lead)
                qs = np.clip(qs, self.safety.lo, self.safety.hi)
                data = self._trajectory_bytes(times, qs, vs)
                t_pub = now_sec(self)
                late = t_pub - start
                if late <= REPLAN_AFTER or attempt == MAX_REPLANS:
                    break
                self.counts["replans"] += 1
            if late > REPLAN_AFTER:  # still late: the knots already due (a planner stalled) are dropped, as a JTC
                keep = [(t - late, qk, vk) for t, qk, vk in zip(times, qs, vs) if t - late > 1e-3]  # would
                data = self._trajectory_bytes(*zip(*keep)) if keep else self._trajectory_bytes([1e-3], qs[-1:], vs[-1:])
            self.pub_arm.publish(data)
            self.plan_delay += 0.1 * (min(t_pub - now, 0.25 * self.period) - self.plan_delay)
            self.reference = TrajectoryFollower(q0)
            self.reference.trajectory(start, q0, list(zip(times, qs, vs)), v_start=v0)
            self.counts["commands"] += 1

        def _trajectory_bytes(self, times, qs, vs) -> bytes:
            """The serialized JointTrajectory of knots (time_from_start [s], positions, velocities) (published
            as bytes, so that the message's source timestamp follows the time check in _publish_plan at once)."""
            jt = self._JT()
            jt.joint_names = list(self.robot.arm_joints)
            for t, qk, vk in zip(times, qs, vs):
                pt = self._JTP()
                pt.positions, pt.velocities = [float(v) for v in qk], [float(v) for v in vk]
                pt.time_from_start = sec_to_duration(float(t))
                jt.points.append(pt)
            return self._serialize(jt)

        def _desired(self, q_meas, now):
            """The controller's desired (position, velocity) now: the trajectory this node sent, or the measured
            posture at rest when none is running or the arm is far from it (another commander, a restart)."""
            if self.reference is not None:
                q0, v0 = self.reference.state(now)
                if np.max(np.abs(q0 - q_meas)) < REFERENCE_TOLERANCE:
                    return q0, v0
            return np.array(q_meas, dtype=np.float64), np.zeros_like(q_meas)

        def _stop(self, q_meas):
            """Chunk mode hold: brake from the desired state to rest within the acceleration limit."""
            self._publish_plan(q_meas, None)

        def _send(self, q, width=None, duration=None):
            if self.interface == "trajectory":
                jt = self._JT()
                jt.joint_names = list(self.robot.arm_joints)
                pt = self._JTP()
                pt.positions = [float(v) for v in q]
                pt.time_from_start = sec_to_duration(self.traj_duration if duration is None else duration)
                jt.points = [pt]
                self.pub_arm.publish(jt)
            else:
                self.pub_arm.publish(self._F64A(data=[float(v) for v in q]))
            self.reference = None
            self.counts["commands"] += 1
            self._send_gripper(width)

        def _send_gripper(self, width):
            if width is not None and self.pub_grip is not None:
                self.pub_grip.command(float(width))  # TopicGripper: [width / len(gripper_joints)] as before

        # -- holding -------------------------------------------------------------------------------------------
        def hold(self, reason: str):
            """Command the measured posture (once per transition into holding)."""
            if self.state in ("holding", "estop") and reason != "e-stop":
                return
            self.state = "estop" if self.estop.active else "holding"
            self.hold_reason = reason
            self.counts["holds"] += 1
            self.watchdog.reset()
            if self.js.has(self.robot.arm_joints):
                q, _, _, _ = self.js.get(self.robot.arm_joints, [])
                if self.interface == "trajectory" and self.traj_mode == "chunk":
                    self._stop(q)
                else:
                    self._send(q, None, duration=0.5 * self.period)
            self.get_logger().warning(f"holding: {reason}")

        def _check_watchdog(self):
            if self.state == "active" and self.watchdog.expired(now_sec(self)):
                self.counts["watchdog"] += 1
                self.hold(f"no action for {self.watchdog.timeout} s (watchdog)")

        def _on_estop(self, req, res):
            self.estop.trigger("e-stop service")
            self.hold("e-stop")
            res.success, res.message = True, "e-stop latched: holding; call ~/clear_estop to release"
            return res

        def _on_clear(self, req, res):
            was = self.estop.clear()
            if self.state == "estop":
                self.state = "holding"
            res.success, res.message = True, "e-stop cleared" if was else "e-stop was not active"
            return res

        def _diag(self):
            lat = np.array(self.latencies) if self.latencies else np.zeros(1)
            level = 2 if self.estop.active else (1 if self.state == "holding" else 0)
            vals = {"state": self.state, "hold_reason": self.hold_reason, **self.counts,
                    **{f"safety_{k}": v for k, v in self.safety.stats.items()},
                    "latency_p50_ms": float(np.percentile(lat, 50) * 1e3), "plan_delay_ms": self.plan_delay * 1e3,
                    "latency_p99_ms": float(np.percentile(lat, 99) * 1e3)}
            self.pub_diag.publish(diagnostic("arm_bridge: commands", "arm", level, self.state, vals,
                                             sec_to_stamp(now_sec(self))))

        def close(self):
            if self.state == "active":  # leave the arm holding, not mid-motion
                self.hold("shutdown")
                time.sleep(0.05)
            if self.pub_grip is not None:  # the gripper output's publishers / action clients (the gripper stays)
                self.pub_grip.close()

    return ArmBridge()


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
