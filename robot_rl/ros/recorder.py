"""``recorder`` node: ROS 2 topics -> episodes in the zarr store, one row per executed action, with the SAME keys as
the simulated env's collection (:mod:`robot_rl.stages.collect`), so ``robot-rl train-base`` trains on them unchanged
(both build their episodes with :class:`robot_rl.datasets.episodes.EpisodeWriter`).

Rows are driven by the executed actions, as LeRobot's record loop reads the observation right before it sends an
action: when a message arrives on ``action_topic`` (what the arm bridge executes) while recording, the recorder
assembles the observation with :func:`robot_rl.envs.assemble_observation` from the latest ``/joint_states``, camera
images (``cameras``, resized to ``image_size``) and, with ``record_privileged``, object poses from
``<privileged_namespace>`` (sim only; a real robot records robot state + images) — the state the action is about to
act on — and stores the pair (obs_t, a_t), as the simulator's collection does. Every action gives exactly one row,
so two timers drifting against each other can neither drop nor duplicate an action nor invent a pause; the rate
of the rows is the sender's (teleop and policy_node publish at their ``control_rate``; the measured rate is
stored as ``action_rate`` and a warning names a rate 20 % off ``control_rate``). A row is completed half a
control period later (or at ``~/stop``) with
  intervention  the /robot_rl/intervention flag (std_msgs/Bool, the teleop mux) received nearest the action within
                half a period (the mux publishes flag and action in the same tick), else False
  human_action  likewise the nearest /robot_rl/human_action while intervening, else NaN (only stored when
                ``record_human_action``)
Action messages that cannot be decoded are counted (``bad_actions`` in the committed metadata) and ignored.
Actions that arrive while the observation is incomplete (a topic never received, or older than ``max_obs_age``)
give no row and are counted (``skipped_steps``). Episode metadata: seed/params/backend from the sim's latched ``<privileged_namespace>/episode`` JSON when
present (else seed -1, ``backend`` parameter), ``source`` parameter (teleop | policy | intervention | scripted;
``intervention`` automatically when any step was flagged), success = the latest ``<privileged_namespace>/success``
(False without it).

Services (std_srvs/Trigger): ``~/start`` begin an episode (an unfinished one is discarded), ``~/stop`` commit it
atomically (message: JSON with index, length, success), ``~/discard`` drop it.
"""

from __future__ import annotations

import json
import time
from collections import deque

import numpy as np

from robot_rl.robot.controller import DiffIKController
from robot_rl.envs.env import assemble_observation
from robot_rl.errors import ConfigError
from robot_rl.ros.common import (COMMAND_QOS, SENSOR_QOS, declare, declare_task, JointStateCache, msg_to_action,
                                 msg_to_image, PoseCache, qos_subscription, robot_model, run_node)
from robot_rl.datasets.episodes import EpisodeWriter
from robot_rl.datasets.store import SOURCES, ZarrStore


def make_node():
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger

    from robot_rl.ros.common import LATCHED_QOS

    class Recorder(Node):
        def __init__(self):
            super().__init__("recorder")
            self.robot, self.chain = robot_model(self)
            self.controller = DiffIKController(self.chain, np.array(self.robot.q_home))
            self.store_path = declare(self, "store", "", "zarr store directory (created if missing)")
            if not self.store_path:
                raise ConfigError("store", "empty", "set store:=/path/demos.zarr")
            self.task, _ = declare_task(self, "task name (observation keys, metadata)")
            self.task_name = self.task.name
            self.source = declare(self, "source", "teleop", f"episode source: {', '.join(SOURCES)}")
            if self.source not in SOURCES:
                raise ConfigError("source", f"{self.source!r}", f"use one of {list(SOURCES)}")
            self.backend_label = declare(self, "backend", "real", "backend name when the sim does not say")
            self.robot_label = declare(self, "robot", "panda", "robot name in the metadata")
            self.dt = 1.0 / float(declare(self, "control_rate", 10.0, "expected action rate [Hz] (pairing window, rate warning)", positive=True))
            self.cameras = [c for c in declare(self, "cameras", [""], "cameras to record ([''] = none)") if c]
            self.image_size = [int(v) for v in declare(self, "image_size", [96, 96], "[H, W] of stored images")]
            self.image_topic = declare(self, "image_topic", "/cameras/{camera}/image_raw", "image topic pattern")
            self.privileged = bool(declare(self, "record_privileged", True, "record object poses (sim)"))
            ns = declare(self, "privileged_namespace", "/sim/privileged", "object pose / success / episode topics")
            self.max_obs_age = float(declare(self, "max_obs_age", 0.5, "skip steps with older inputs [s]",
                                             positive=True))
            self.record_human = bool(declare(self, "record_human_action", True, "store human_action"))
            action_topic = declare(self, "action_topic", "/arm_bridge/action", "executed actions")
            self.js, self.poses = JointStateCache(), PoseCache()
            self.images: dict = {}
            self.episode_info: dict = {}
            self.success = False
            self.buf: EpisodeWriter | None = None  # the episode being recorded (None: not recording)
            self.skipped = 0
            self.t_actions: list[float] = []
            self.create_subscription(JointState, "/joint_states", lambda m: self.js.update(m, time.monotonic()),
                                     COMMAND_QOS)
            self.queued = {"intervention": deque(maxlen=64), "human": deque(maxlen=64)}  # (receive time, value)
            self.pending: deque = deque()  # rows (obs, action, time received) waiting for their flags
            self.bad_actions = 0
            self.create_subscription(JointState, action_topic, self._on_action, COMMAND_QOS)
            self.create_subscription(JointState, "/robot_rl/human_action", lambda m: self._queue("human", m),
                                     COMMAND_QOS)
            self.create_subscription(Bool, "/robot_rl/intervention",
                                     lambda m: self.queued["intervention"].append((time.monotonic(), bool(m.data))),
                                     COMMAND_QOS)
            self.objects = [o.name for o in self.task.objects] if self.privileged else []
            self.markers = [m.name for m in self.task.markers] if self.privileged else []
            for n in self.objects + self.markers:
                self.create_subscription(PoseStamped, f"{ns}/{n}_pose",
                                         lambda m, n=n: self.poses.update(n, m, time.monotonic()), COMMAND_QOS)
            if self.privileged:
                self.create_subscription(Bool, f"{ns}/success", lambda m: setattr(self, "success", bool(m.data)),
                                         COMMAND_QOS)
                self.create_subscription(String, f"{ns}/episode", self._on_episode, LATCHED_QOS)
            for c in self.cameras:
                qos_subscription(self, Image, self.image_topic.format(camera=c),
                                 lambda m, c=c: self.images.__setitem__(c, (m, time.monotonic())), SENSOR_QOS)
            self.create_service(Trigger, "~/start", self._on_start)
            self.create_service(Trigger, "~/stop", self._on_stop)
            self.create_service(Trigger, "~/discard", self._on_discard)
            self.create_timer(self.dt, self._tick)
            self.get_logger().info(f"recorder -> {self.store_path} ({self.task_name}, source {self.source}, "
                                   f"cameras {self.cameras}, privileged {self.privileged})")

        def _decode(self, kind, m):
            """The action of message ``m``, or None (counted in ``bad_actions``) when it cannot be decoded."""
            try:
                return msg_to_action(m)
            except ConfigError as e:
                self.bad_actions += 1
                self.get_logger().error(f"{kind} message ignored: {e}", throttle_duration_sec=2.0)
                return None

        def _queue(self, kind, m):
            a = self._decode(kind, m)
            if a is not None:
                self.queued[kind].append((time.monotonic(), a))

        def _nearest(self, kind, t, default):
            """Value of ``kind`` received nearest to time ``t`` within half a control period, else ``default``."""
            best = min(self.queued[kind], key=lambda tv: abs(tv[0] - t), default=None)
            return best[1] if best is not None and abs(best[0] - t) <= 0.5 * self.dt else default

        def _on_episode(self, m):
            try:
                self.episode_info = json.loads(m.data)
            except ValueError:
                self.get_logger().error("episode JSON unreadable: metadata falls back to parameters")

        # -- recording -----------------------------------------------------------------------------------------
        def _observation(self):
            now = time.monotonic()
            arm, grip = self.robot.arm_joints, self.robot.gripper_joints
            if not self.js.has((*arm, *grip)):
                return None, "no joint states"
            q, dq, w, t = self.js.get(arm, grip)
            if now - t > self.max_obs_age:
                return None, "joint states stale"
            params = {}
            if self.privileged:
                for n in self.objects + self.markers:
                    if n not in self.poses.t or now - self.poses.t[n] > self.max_obs_age:
                        return None, f"{n} pose missing/stale"
                for n in self.markers:
                    params[f"{n}_xy"] = [float(v) for v in self.poses.poses[n][0][:2]]
            images = {}
            for c in self.cameras:
                if c not in self.images or now - self.images[c][1] > self.max_obs_age:
                    return None, f"image {c} missing/stale"
                img = msg_to_image(self.images[c][0])
                H, W = self.image_size
                if img.shape[:2] != (H, W):
                    import cv2

                    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
                images[c] = img
            if self.privileged:
                obs = assemble_observation(self.controller, self.task, (q, dq, w), self.poses, params, images)
            else:  # robot state + images only (no object poses on a real robot)
                obs = assemble_observation(self.controller, _NoTask(), (q, dq, w), None, {}, images)
            return obs, ""

        def _on_action(self, m):
            """An executed action: pair it with the observation it acts on (see the module docstring)."""
            if self.buf is None:
                return
            a = self._decode("action", m)
            if a is None:
                return
            if not np.all(np.isfinite(a)):
                self.bad_actions += 1  # the bridge rejects it too: nothing was executed
                return
            obs, why = self._observation()
            if obs is None:
                self.skipped += 1
                self.get_logger().warning(f"step skipped: {why}", throttle_duration_sec=2.0)
                return
            self.pending.append((obs, a, time.monotonic()))

        def _tick(self):
            if self.buf is not None:
                self._complete(time.monotonic() - 0.5 * self.dt)

        def _complete(self, until):
            """Append the pending rows whose action came at or before ``until``, with their intervention flags."""
            while self.pending and self.pending[0][2] <= until:
                obs, a, t = self.pending.popleft()
                inter = bool(self._nearest("intervention", t, False))
                human = self._nearest("human", t, None) if inter else None
                self.buf.add(obs, a, intervention=inter, human_action=human if self.record_human else None)
                self.t_actions.append(t)

        def _on_start(self, req, res):
            dropped = self.buf is not None and len(self.buf) + len(self.pending)
            self.buf = EpisodeWriter(human_action=self.record_human)
            self.skipped, self.bad_actions, self.t_actions = 0, 0, []
            self.pending.clear()
            res.success = True
            res.message = "recording" + (f" (dropped an unfinished episode of {dropped} steps)" if dropped else "")
            return res

        def _on_discard(self, req, res):
            n = len(self.buf) + len(self.pending) if self.buf is not None else 0
            self.buf = None
            self.pending.clear()
            res.success, res.message = True, f"discarded {n} steps"
            return res

        def _on_stop(self, req, res):
            if self.buf is not None:
                self._complete(np.inf)
            if self.buf is None or not len(self.buf):
                res.success, res.message = False, "nothing recorded (call ~/start first, and check the inputs)"
                self.buf = None
                return res
            info = self.episode_info
            dts = np.diff(self.t_actions)
            rate = float(1.0 / np.median(dts)) if len(dts) else float("nan")
            if len(dts) and abs(rate * self.dt - 1.0) > 0.2:
                self.get_logger().warning(f"actions came at {rate:.1f} Hz, not control_rate {1.0 / self.dt:.1f} "
                                          "Hz: the stored steps follow the sender's rate")
            source = "intervention" if self.buf.intervened and self.source != "scripted" else self.source
            n = len(self.buf)
            try:
                store = ZarrStore.open_or_create(self.store_path)
                idx = self.buf.commit(
                    store, seed=int(info.get("seed", -1)), task=self.task_name, source=source,
                    success=bool(self.success), backend=str(info.get("backend", self.backend_label)),
                    robot=self.robot_label, extra={"params": info.get("params", {}), "recorder": "ros2",
                                                   "control_rate": 1.0 / self.dt, "action_rate": rate,
                                                   "skipped_steps": self.skipped,
                                                   "bad_actions": self.bad_actions})
            except (ConfigError, OSError) as e:  # bad episode, another writer too long, lock file / disk refused
                res.success, res.message = False, f"not committed: {e}"
                return res
            finally:
                self.buf = None
            res.success = True
            res.message = json.dumps({"index": idx, "length": n, "success": bool(self.success), "source": source,
                                      "skipped_steps": self.skipped})
            self.get_logger().info(f"episode {idx} committed: {n} steps, success {self.success}")
            return res

    return Recorder()


class _NoTask:
    """Task stand-in without object keys (real-robot recording without privileged poses)."""

    def observe(self, objects, params):
        return {}


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
