"""``sim_robot`` node: a simulated arm (MuJoCo or PyBullet backend) exposed over ROS 2 like a ros2_control arm.

Runs ``make_env(task, backend)``'s backend, task reset distribution and scene in (scaled) real time and exposes it
with the topics a ros2_control robot has, so the same policy node / arm bridge / recorder drive the simulated and
the real arm.

Publishes
  /joint_states                              sensor_msgs/JointState   arm + gripper joints, every tick
  /cameras/<cam>/image_raw                   sensor_msgs/Image rgb8   sensor QoS, at ``camera_rate``
  /cameras/<cam>/camera_info                 sensor_msgs/CameraInfo   pinhole from the scene camera's fovy
  <privileged_namespace>/<object>_pose       geometry_msgs/PoseStamped  ground-truth object poses (base frame)
  <privileged_namespace>/<marker>_pose       geometry_msgs/PoseStamped  task markers (e.g. the place target)
  <privileged_namespace>/success             std_msgs/Bool            the task's success predicate
  <privileged_namespace>/failure             std_msgs/Bool            its failure predicate (e.g. place: the cube
                                                                       released near the target but off it)
  <privileged_namespace>/episode             std_msgs/String (latched) JSON {seed, task, backend, params, t_start}
  /clock                                     rosgraph_msgs/Clock      when ``publish_clock`` (use_sim_time)
  /diagnostics                               diagnostic_msgs/DiagnosticArray  real-time factor, late ticks
  ``privileged_namespace`` (default ``/sim/privileged``) holds what a real robot cannot observe directly; a policy
  that subscribes to it is a state-based (privileged) policy.
Subscribes
  /<arm_controller>/joint_trajectory         trajectory_msgs/JointTrajectory  (joint_trajectory_controller-like)
  /<arm_controller>/commands                 std_msgs/Float64MultiArray  positions in ``arm_joints`` order
                                                                         (forward_command_controller-like)
  /<gripper_controller>/commands             std_msgs/Float64MultiArray  [finger joint position, m]; the
                                                                         gripper width is ``len(gripper_joints)`` x it
Services
  ~/reset                                    std_srvs/Trigger  new episode with the next seed (``seed``,
                                                               ``seed + 1``, ...); message = the episode JSON
  ~/estop, ~/clear_estop                     std_srvs/Trigger  latched e-stop: hold the measured posture and
                                                               ignore every command until cleared

Trajectories are followed like ros2_control's joint_trajectory_controller
(:class:`robot_rl.robot.trajectory.TrajectoryFollower`): the reference starts at the current desired position and
velocity at the trajectory start (header.stamp, or the receive time when zero) and goes through the points by
``time_from_start``, linearly for position-only points, by cubic Hermite segments for points with velocities; after
the last point the last position is held; a new trajectory replaces the active one; an empty trajectory holds the
measured position.

Safety (:mod:`robot_rl.robot.safety`, the same filter and parameters as ``arm_bridge``, like a robot's own limit layer):
non-finite commands are refused and logged; ``/commands`` targets are kept inside the URDF position limits (minus
``joint_margin``), within ``velocity_scale`` x the URDF velocity limits over ``command_period`` and
``max_joint_delta`` of the measured posture, and with the tool inside the ``workspace_low/high`` box; trajectory
points get the same checks from knot to knot (velocity over their time difference); when ``/commands`` stop for
``command_timeout`` the arm holds where it is (a running trajectory is not cut short); ``~/estop`` latches.

Time: one tick = ``sim_dt`` simulated seconds (physics at the scene's ``physics_dt``), paced at
``real_time_factor`` x real time. With ``publish_clock`` the stamps and /clock are simulated time from 0 (run the
other nodes with ``use_sim_time:=true``); otherwise stamps are the system clock and the factor must be 1.

    python -m robot_rl.hw_drivers.sim_robot --ros-args -p backend:=pybullet -p cameras:="['front']"
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from robot_rl.errors import ConfigError
from robot_rl.ros.common import (COMMAND_QOS, LATCHED_QOS, SENSOR_PUBLISHER_QOS, camera_info_from_fovy, declare,
                                 declare_safety, declare_task, diagnostic, duration_to_sec, estop_services,
                                 image_to_msg, pose_msg, qos_publisher, run_node, sec_to_stamp, stamp_to_sec)
from robot_rl.robot.safety import EStopLatch, JointLimits, SafetyFilter, Watchdog
from robot_rl.robot.trajectory import TrajectoryFollower


def make_node():
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, JointState
    from std_msgs.msg import Bool, Float64MultiArray, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory

    from robot_rl.envs.env import make_env
    from robot_rl.robot.scene import SceneSpec

    class SimRobot(Node):
        def __init__(self):
            super().__init__("sim_robot")
            self.backend_name = declare(self, "backend", "mujoco", "simulator: mujoco or pybullet")
            task, task_kwargs = declare_task(self, "task (lift | place): scene, reset distribution, success")
            self.task_name = task.name
            self.next_seed = int(declare(self, "seed", 0, "seed of the next ~/reset (then incremented)"))
            self.dt = float(declare(self, "sim_dt", 0.01, "simulated seconds per tick (servo/command update)"))
            physics_dt = float(declare(self, "physics_dt", 0.002, "physics step [s]"))
            self.rtf = float(declare(self, "real_time_factor", 1.0, "simulated / wall time"))
            self.publish_clock = bool(declare(self, "publish_clock", False, "publish /clock (sim time from 0)"))
            self.arm_ctrl = declare(self, "arm_controller", "arm_controller", "ros2_control arm controller name")
            self.grip_ctrl = declare(self, "gripper_controller", "gripper_controller", "gripper controller name")
            self.cameras = list(declare(self, "cameras", [""], "cameras to publish (front, wrist); [''] = none"))
            self.cameras = [c for c in self.cameras if c]
            self.image_size = list(declare(self, "image_size", [96, 96], "camera image [height, width]"))
            self.camera_rate = float(declare(self, "camera_rate", 10.0, "camera frames per (simulated) second",
                                             positive=True))
            self.pose_rate = float(declare(self, "pose_rate", 50.0, "privileged pose/success rate (Hz, sim time)",
                                           positive=True))
            self.priv = declare(self, "privileged_namespace", "/sim/privileged", "ground-truth topics namespace")
            self.frame_id = declare(self, "frame_id", "panda_link0", "frame of poses (the robot base)")
            if self.dt <= 0 or not 0 < physics_dt <= self.dt:
                raise ConfigError("sim_dt", f"sim_dt={self.dt}, physics_dt={physics_dt}",
                                  "use 0 < physics_dt <= sim_dt, e.g. 0.002 and 0.01")
            if not self.rtf > 0:
                raise ConfigError("real_time_factor", f"{self.rtf} <= 0", "use e.g. 1.0")
            if not self.publish_clock and self.rtf != 1.0:
                raise ConfigError("real_time_factor", f"{self.rtf} != 1 with system-clock stamps",
                                  "set publish_clock:=true (and use_sim_time:=true on the other nodes)")
            self.env = make_env(self.task_name, self.backend_name, task_kwargs=task_kwargs, control_dt=self.dt,
                                physics_dt=physics_dt)
            self.backend, self.spec = self.env.backend, self.env.scene.robot
            known = {c.name: c for c in SceneSpec().cameras}
            for c in self.cameras:
                if c not in known:
                    raise ConfigError("cameras", f"unknown camera {c!r}", f"use some of {sorted(known)}")
            self.cam_specs = known
            self.arm_joints, self.finger_joints = list(self.spec.arm_joints), list(self.spec.finger_joints)
            self.limits = JointLimits.from_urdf(self.spec.urdf, self.arm_joints)
            # the robot-side limit layer (robot_rl.robot.safety, as in arm_bridge): streamed /commands are filtered
            # against the measured posture (position limits, velocity over command_period, per-command delta cap,
            # tool box) and held at the measured posture by the watchdog when they stop; trajectory points get
            # the same checks knot to knot (velocity over their time difference, no per-command cap); a latched
            # ~/estop holds and ignores commands until ~/clear_estop
            scfg = declare_safety(self, "hold when /commands stop for this long [s] (trajectories run on)")
            self.cmd_period = float(declare(self, "command_period", 0.1, "time each /commands message is given, "
                                                                          "for the velocity cap [s]", positive=True))
            fk = (lambda q: self.env.controller.chain.pose(q)[0])
            self.safety = SafetyFilter(self.limits, fk, scfg)
            self.traj_safety = SafetyFilter(self.limits, fk, dataclasses.replace(scfg, max_joint_delta=np.inf))
            self.watchdog = Watchdog(scfg.command_timeout)
            self.estop = EStopLatch()
            self.counts = {"ignored_estop": 0, "watchdog_holds": 0}
            self.t_sim = 0.0
            self.ticks, self.late = 0, 0
            self.cam_every = max(1, int(round(1.0 / (self.camera_rate * self.dt))))
            self.pose_every = max(1, int(round(1.0 / (self.pose_rate * self.dt))))
            self.episode: dict = {}

            self.pub_js = self.create_publisher(JointState, "/joint_states", COMMAND_QOS)
            self.pub_clock = self.create_publisher(Clock, "/clock", COMMAND_QOS) if self.publish_clock else None
            self.pub_img = {c: qos_publisher(self, Image, f"/cameras/{c}/image_raw", SENSOR_PUBLISHER_QOS)
                            for c in self.cameras}
            self.pub_info = {c: qos_publisher(self, CameraInfo, f"/cameras/{c}/camera_info", SENSOR_PUBLISHER_QOS)
                             for c in self.cameras}
            names = [o.name for o in self.env.scene.objects] + [m.name for m in self.env.scene.markers]
            self.pub_pose = {n: self.create_publisher(PoseStamped, f"{self.priv}/{n}_pose", COMMAND_QOS)
                             for n in names}
            self.pub_success = self.create_publisher(Bool, f"{self.priv}/success", COMMAND_QOS)
            self.pub_failure = self.create_publisher(Bool, f"{self.priv}/failure", COMMAND_QOS)
            self.pub_episode = self.create_publisher(String, f"{self.priv}/episode", LATCHED_QOS)
            from diagnostic_msgs.msg import DiagnosticArray

            self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
            self.create_subscription(JointTrajectory, f"/{self.arm_ctrl}/joint_trajectory", self._on_traj, COMMAND_QOS)
            self.create_subscription(Float64MultiArray, f"/{self.arm_ctrl}/commands", self._on_cmd, COMMAND_QOS)
            self.create_subscription(Float64MultiArray, f"/{self.grip_ctrl}/commands", self._on_grip, COMMAND_QOS)
            self.create_service(Trigger, "~/reset", self._on_reset)
            estop_services(self, self._on_estop, self._on_clear_estop)
            self.add_on_set_parameters_callback(self._on_params)

            self._reset_episode()
            self._wall0, self._sim0 = time.perf_counter(), 0.0
            self._last_wall = self._wall0
            self.timer = self.create_timer(self.dt / self.rtf, self._tick)
            self.create_timer(1.0, self._diag)
            self.get_logger().info(f"sim_robot: {self.backend_name} {self.task_name}, tick {self.dt * 1e3:.0f} ms, "
                                   f"rtf {self.rtf}, cameras {self.cameras}, clock {self.publish_clock}")

        # -- time ----------------------------------------------------------------------------------------------
        def now(self) -> float:
            return self.t_sim if self.publish_clock else time.time()

        # -- commands ------------------------------------------------------------------------------------------
        def _q_cmd(self) -> np.ndarray:
            return self.follower.target(self.now())

        def _measured_q(self) -> np.ndarray:
            return self.backend.joint_state()[0]

        def _hold_here(self):
            self.follower.command(self._measured_q())

        def _on_estop(self, req, res):
            self.estop.trigger("e-stop service")
            self._hold_here()
            res.success, res.message = True, "e-stop latched: holding, commands ignored until ~/clear_estop"
            return res

        def _on_clear_estop(self, req, res):
            was = self.estop.clear()
            self.watchdog.reset()
            res.success, res.message = True, "e-stop cleared" if was else "not active"
            return res

        def _ignored(self) -> bool:
            if self.estop.active:
                self.counts["ignored_estop"] += 1
                self.get_logger().warning("command ignored: e-stop latched", throttle_duration_sec=2.0)
            return self.estop.active

        def _on_traj(self, m):
            if self._ignored():
                return
            if not m.points:
                q, _, _ = self.backend.joint_state()
                self.follower.command(q)
                return
            idx = {n: i for i, n in enumerate(m.joint_names)}
            if sorted(idx) != sorted(self.arm_joints):
                self.get_logger().error(f"trajectory joint_names {list(m.joint_names)} != {self.arm_joints}: ignored")
                return
            order = [idx[n] for n in self.arm_joints]
            t0 = stamp_to_sec(m.header.stamp)
            t0 = self.now() if t0 == 0.0 else t0
            pts, q_prev, t_prev = [], self.follower.target(t0), 0.0
            for p in m.points:
                q = np.asarray(p.positions, dtype=np.float64)
                if q.shape != (len(order),) or not np.all(np.isfinite(q)):
                    self.get_logger().error("trajectory point with missing or non-finite positions: ignored")
                    return
                v = np.asarray(p.velocities, dtype=np.float64) if len(p.velocities) else None
                if v is not None and (v.shape != (len(order),) or not np.all(np.isfinite(v))):
                    self.get_logger().error("trajectory point with wrong or non-finite velocities: ignored")
                    return
                tfs = duration_to_sec(p.time_from_start)
                q_prev, _ = self.traj_safety.filter(q[order], q_prev, max(tfs - t_prev, self.dt))
                t_prev = tfs
                lim = self.traj_safety.limits.velocity
                pts.append((tfs, q_prev, None if v is None else np.clip(v[order], -lim, lim)))
            self.follower.trajectory(t0, self.follower.target(t0), pts)

        def _on_cmd(self, m):
            if self._ignored():
                return
            q = np.asarray(m.data, dtype=np.float64)
            if q.shape != (len(self.arm_joints),) or not np.all(np.isfinite(q)):
                self.get_logger().error(f"/{self.arm_ctrl}/commands needs {len(self.arm_joints)} finite positions")
                return
            q_safe, _ = self.safety.filter(q, self._measured_q(), self.cmd_period)
            self.follower.command(q_safe)
            self.watchdog.kick(self.now())

        def _on_grip(self, m):
            if self._ignored():
                return
            d = np.asarray(m.data, dtype=np.float64)
            if d.size != 1 or not np.isfinite(d[0]):
                self.get_logger().error(f"/{self.grip_ctrl}/commands needs one finite finger position [m]")
                return
            self.width_t = float(np.clip(d[0] * len(self.finger_joints), 0.0, self.spec.max_width))

        # -- episodes ------------------------------------------------------------------------------------------
        def _reset_episode(self):
            seed = self.next_seed
            self.env.reset(seed=seed)
            self.next_seed += 1
            q, _, _ = self.backend.joint_state()
            self.follower = TrajectoryFollower(q)
            self.watchdog.reset()
            self.width_t = float(self.spec.max_width)
            self.episode = {"seed": seed, "task": self.task_name, "backend": self.backend_name,
                            "params": self.env.params, "t_start": self.now()}
            self.pub_episode.publish(String(data=json.dumps(self.episode)))
            self._publish_state(poses=True)
            return self.episode

        def _on_reset(self, req, res):
            try:
                ep = self._reset_episode()
                res.success, res.message = True, json.dumps(ep)
            except Exception as e:  # noqa: BLE001 - reported to the caller
                res.success, res.message = False, f"reset failed: {e}"
            return res

        def _on_params(self, params):
            from rcl_interfaces.msg import SetParametersResult

            from robot_rl.ros.common import coerce_parameter

            for p in params:
                if p.name == "seed":
                    try:
                        self.next_seed = coerce_parameter("seed", p.value, 0)
                    except ConfigError as e:
                        return SetParametersResult(successful=False, reason=str(e))
            return SetParametersResult(successful=True)

        # -- loop ----------------------------------------------------------------------------------------------
        def _tick(self):
            if self.watchdog.last is not None and not self.follower.active and self.watchdog.expired(self.now()):
                self._hold_here()  # the /commands stream stopped: stop where the arm is
                self.watchdog.reset()
                self.counts["watchdog_holds"] += 1
            self.backend.set_targets(self._q_cmd(), self.width_t)
            self.backend.step()
            self.t_sim += self.dt
            self.ticks += 1
            wall = time.perf_counter()
            if wall - self._last_wall > 1.5 * self.dt / self.rtf:  # this tick came late (CPU busy)
                self.late += 1
            self._last_wall = wall
            self._publish_state(poses=self.ticks % self.pose_every == 0, cams=self.ticks % self.cam_every == 0)

        def _publish_state(self, poses=False, cams=False):
            t = self.now()
            stamp = sec_to_stamp(t)
            if self.pub_clock is not None:
                c = Clock()
                c.clock = stamp
                self.pub_clock.publish(c)
            q, dq, w = self.backend.joint_state()
            js = JointState()
            js.header.stamp = stamp
            js.name = self.arm_joints + self.finger_joints
            pos, vel = self._state_in_limits(q, dq, w, t)
            js.position = [float(v) for v in pos]
            js.velocity = [float(v) for v in vel]
            self.pub_js.publish(js)
            if poses:
                for n, pub in self.pub_pose.items():
                    pub.publish(pose_msg(*self._pose_of(n), stamp, self.frame_id))
                obs = self.env.observe()
                ok = bool(self.env.task.is_success(obs, self.env.params))
                self.pub_success.publish(Bool(data=ok))
                self.pub_failure.publish(Bool(data=not ok and bool(self.env.task.is_failure(obs, self.env.params))))
            if cams:
                H, W = int(self.image_size[0]), int(self.image_size[1])
                for c in self.cameras:
                    img = self.backend.render(c, H, W)
                    frame = f"{c}_camera_optical_frame"
                    self.pub_img[c].publish(image_to_msg(img, stamp, frame))
                    self.pub_info[c].publish(camera_info_from_fovy(H, W, self.cam_specs[c].fovy, stamp, frame))

        def _state_in_limits(self, q, dq, w, t):
            """Published (positions, velocities) of arm + finger joints: positions clamped into the URDF limits
            (the simulated joints stray past them by constraint softness and float noise, e.g. the fingers by
            4e-7 m, which a limit-checking consumer would flag; a larger excess is logged), finger velocities by
            finite differences of the published finger positions over the node clock (0 on the first state of an
            episode: a reset moves the fingers at once)."""
            nf = len(self.finger_joints)
            if getattr(self, "_pub_limits", None) is None:
                lim = JointLimits.from_urdf(self.spec.urdf, self.arm_joints + self.finger_joints)
                self._pub_limits = (lim.lower, lim.upper)
            raw = np.concatenate([np.asarray(q, dtype=np.float64), np.full(nf, w / nf)])
            pos = np.clip(raw, *self._pub_limits)
            if np.max(np.abs(pos - raw), initial=0.0) > 1e-3:
                self.get_logger().warning(f"joint state beyond the URDF limits by {np.max(np.abs(pos - raw)):.4f}: "
                                          "published clamped", throttle_duration_sec=5.0)
            fingers = pos[len(pos) - nf:]
            prev = getattr(self, "_finger_prev", None)  # (episode, t, finger positions, finger velocities)
            if prev is None or prev[0] is not self.episode:
                fv = np.zeros(nf)
            elif t > prev[1]:
                fv = (fingers - prev[2]) / (t - prev[1])
            else:  # same stamp again: keep the last velocity
                fv, t, fingers = prev[3], prev[1], prev[2]
            self._finger_prev = (self.episode, t, fingers, fv)
            return pos, np.concatenate([np.asarray(dq, dtype=np.float64), fv])

        def _pose_of(self, name):
            if name in {o.name for o in self.env.scene.objects}:
                return self.backend.object_pose(name)
            xy = self.env.params.get(f"{name}_xy", [0.0, 0.0])  # a task marker, e.g. the place target
            return np.array([xy[0], xy[1], 0.0]), np.array([0.0, 0.0, 0.0, 1.0])  # lying on the table (z = 0)

        def _diag(self):
            wall = time.perf_counter() - self._wall0
            rtf = (self.t_sim - self._sim0) / wall if wall > 0 else 0.0
            level = 2 if self.estop.active else (0 if rtf >= 0.9 * self.rtf else 1)
            self.pub_diag.publish(diagnostic(
                "sim_robot: simulation", self.backend_name, level,
                "e-stop latched" if self.estop.active else (
                    "ok" if level == 0 else "running slower than real_time_factor"),
                {"real_time_factor": rtf, "target_real_time_factor": self.rtf, "late_ticks": self.late,
                 "ticks": self.ticks, "sim_time": self.t_sim, "seed": self.episode.get("seed", -1),
                 "estop": self.estop.active, **self.counts,
                 **{f"safety_{k}": v for k, v in self.safety.stats.items()}},
                sec_to_stamp(self.now())))

        def close(self):
            self.env.close()

    return SimRobot()


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
