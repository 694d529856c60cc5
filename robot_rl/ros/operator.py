"""``operator`` node: a scripted stand-in for the person who supervises learning on the robot (``robot-rl learn``
with the policy node's ``learn:=true``), for simulation and tests.

What it does, episode after episode (a state machine on a 20 Hz timer, all service calls asynchronous):
  1. while the policy node's episode runs (``/<policy_node>/episode_state`` ``running``) and the simulator's task
     predicate (``<privileged_namespace>/success``, std_msgs/Bool) turns true, it calls
     ``/<policy_node>/mark_success`` — the label a person would give on seeing the cube placed; when its failure
     predicate (``<privileged_namespace>/failure``: the cube set down off target) turns true, ``mark_failure``, as
     the simulated env ends such an episode;
  2. once the episode is over (``idle``: labelled by it, by the node's time limit as failed, or discarded), or left
     ``unlabelled`` by an e-stop (which it does not keep: a person would inspect it; the scripted one drops it), it
     resets the scene (``/<sim_robot>/reset``, std_srvs/Trigger: the next seed of the simulator's schedule) and
     confirms "reset done" with ``/<policy_node>/start_episode``, after ``reset_wait`` seconds;
  3. it stops after ``episodes`` episodes (0: never) by leaving the last one idle.
With ``success_classifier:=DIR`` (a ``robot-rl success-classifier`` checkpoint, :mod:`robot_rl.stages.success`) the
success label comes from the classifier instead of the simulator: the first frame of a running episode on the
classifier's camera (``image_topic``, default ``/cameras/{camera}/image_raw``) that it scores at or above its
threshold marks success (SERL's reward classifier); the time limit and the failure predicate stay as they are.
With ``intervene:=true`` it also takes over as a person would, by a fixed rule
(:class:`robot_rl.envs.experts.ScriptedIntervention`: when the policy holds the cube low over the wrong spot, the
scripted expert re-lifts, aligns and places it, to the episode's end), publishing what the teleop mux publishes for a
person: ``/robot_rl/human_action`` (sensor_msgs/JointState, the 5-D action) and ``/robot_rl/intervention``
(std_msgs/Bool, True while it drives, False when the episode ends), at ``control_rate``. The policy node executes
those steps and sends them as interventions (HIL-SERL). It assembles the observation like the policy node
(``/joint_states`` + the simulator's privileged poses; the robot-model and ``task.*`` parameters as there).

Parameters: ``policy_node`` / ``sim_robot`` (node names), ``privileged_namespace``, ``episodes``, ``reset_wait``
(s), ``intervene``, ``control_rate`` (Hz), the rule's bounds ``intervene_near`` / ``intervene_lift`` /
``intervene_min_error`` / ``intervene_max_width`` (m; defaults: the rule's). Publishes ``~/status``
(std_msgs/String JSON {episodes, successes, failures, discarded, intervened_episodes, intervention_steps,
classifier_successes}) on each label.
"""

from __future__ import annotations

import json
import time

import numpy as np

from robot_rl.errors import ConfigError
from robot_rl.ros.common import COMMAND_QOS, LATCHED_QOS, declare, run_node


def make_node():
    from rclpy.node import Node
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger

    class Operator(Node):
        def __init__(self):
            super().__init__("operator")
            pn = declare(self, "policy_node", "policy_node", "the learning policy node's name")
            sim = declare(self, "sim_robot", "sim_robot", "the simulator node's name (its ~/reset)")
            ns = declare(self, "privileged_namespace", "/sim/privileged", "where the success predicate is")
            self.max_episodes = int(declare(self, "episodes", 0, "episodes to run, then stop (0: never)"))
            self.reset_wait = float(declare(self, "reset_wait", 0.5, "seconds between the reset and the start"))
            self.cli = {"success": self.create_client(Trigger, f"/{pn}/mark_success"),
                        "failure": self.create_client(Trigger, f"/{pn}/mark_failure"),
                        "reset": self.create_client(Trigger, f"/{sim}/reset"),
                        "start": self.create_client(Trigger, f"/{pn}/start_episode")}
            self.success, self.state, self.busy = False, None, False
            self.counts = {"episodes": 0, "successes": 0, "failures": 0, "discarded": 0, "intervened_episodes": 0,
                           "intervention_steps": 0}
            self.seen_episode = self.marked = None
            self.rule, self.driving = None, False  # the takeover rule (intervene:=true), and whether it drives now
            self.phase, self.start_at = None, 0.0  # None | resetting | wait | starting
            self.failure = False
            self.counts["classifier_successes"] = 0
            clf = declare(self, "success_classifier", "", "checkpoint of `robot-rl success-classifier`: label "
                                                          "success when it fires on the camera, not by the "
                                                          "simulator's predicate")
            if clf:
                self._setup_classifier(clf)
            else:
                self.create_subscription(Bool, f"{ns}/success", lambda m: setattr(self, "success", bool(m.data)),
                                         COMMAND_QOS)
            self.create_subscription(Bool, f"{ns}/failure", lambda m: setattr(self, "failure", bool(m.data)),
                                     COMMAND_QOS)
            self.create_subscription(String, f"/{pn}/episode_state", self._on_state, LATCHED_QOS)
            self.pub = self.create_publisher(String, "~/status", LATCHED_QOS)
            self._String, self._Trigger, self._Bool = String, Trigger, Bool
            self.create_timer(0.05, self._step)
            if declare(self, "intervene", False, "take over by ScriptedIntervention's rule (module doc)"):
                self._setup_intervention(ns)

        def _setup_classifier(self, path: str):
            from sensor_msgs.msg import Image

            from robot_rl.ros.common import SENSOR_QOS, msg_to_image, qos_subscription
            from robot_rl.stages.success import load_success_classifier

            self.clf = load_success_classifier(path)
            cam = self.clf.config["camera"]
            topic = declare(self, "image_topic", "/cameras/{camera}/image_raw", "camera topic ({camera}: the "
                                                                                "classifier's camera)")
            self._msg_to_image = msg_to_image
            qos_subscription(self, Image, topic.format(camera=cam), self._on_image, SENSOR_QOS)

        def _on_image(self, m):
            """The success classifier on each frame of a running episode (resized to its input size)."""
            st = self.state
            if st is None or st["state"] != "running" or self.success:
                return
            try:
                img = self._msg_to_image(m)
            except ConfigError as e:  # an encoding the classifier cannot read: say so, label by other means
                self.get_logger().error(f"success classifier: {e}", throttle_duration_sec=5.0)
                return
            h, w = self.clf.config["image_shape"][:2]
            if img.shape[:2] != (h, w):
                import cv2

                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            if self.clf.is_success(img):
                self.success = True
                self.counts["classifier_successes"] += 1

        def _setup_intervention(self, ns: str):
            from geometry_msgs.msg import PoseStamped
            from sensor_msgs.msg import JointState

            from robot_rl.envs.experts import ScriptedIntervention
            from robot_rl.robot.controller import DiffIKController
            from robot_rl.ros.common import JointStateCache, PoseCache, declare_task, robot_model

            self.robot, chain = robot_model(self)
            self.controller = DiffIKController(chain, np.array(self.robot.q_home))
            self.task, _ = declare_task(self, "task (observation assembly)")
            rate = float(declare(self, "control_rate", 10.0, "intervention steps per second [Hz]", positive=True))
            d = ScriptedIntervention()
            self.rule = ScriptedIntervention(
                near=float(declare(self, "intervene_near", d.near, "rule: max cube-to-target error [m]")),
                lift=[float(v) for v in declare(self, "intervene_lift", list(d.lift),
                                                "rule: [lo, hi] cube height above rest [m]")],
                min_error=float(declare(self, "intervene_min_error", d.min_error, "rule: min error [m]")),
                max_width=float(declare(self, "intervene_max_width", d.max_width, "rule: max gripper width [m]")))
            self.js, self.poses = JointStateCache(), PoseCache()
            self.create_subscription(JointState, "/joint_states", self.js.update, COMMAND_QOS)
            self.markers = [m.name for m in self.task.markers]
            self.pose_names = [o.name for o in self.task.objects] + self.markers
            for n in self.pose_names:
                self.create_subscription(PoseStamped, f"{ns}/{n}_pose", lambda m, n=n: self.poses.update(n, m),
                                         COMMAND_QOS)
            self.pub_int = self.create_publisher(self._Bool, "/robot_rl/intervention", COMMAND_QOS)
            self.pub_human = self.create_publisher(JointState, "/robot_rl/human_action", COMMAND_QOS)
            self.create_timer(1.0 / rate, self._intervene)

        def _observation(self):
            """The policy node's observation from the latest inputs, or None while one is missing."""
            from robot_rl.envs.env import assemble_observation

            r = self.robot
            if not self.js.has((*r.arm_joints, *r.gripper_joints)) or any(n not in self.poses.poses
                                                                         for n in self.pose_names):
                return None
            q, dq, w, _ = self.js.get(r.arm_joints, r.gripper_joints)
            params = {f"{n}_xy": [float(v) for v in self.poses.poses[n][0][:2]] for n in self.markers}
            return assemble_observation(self.controller, self.task, (q, dq, w), self.poses, params)

        def _hand_back(self):
            self.pub_int.publish(self._Bool(data=False))
            self.driving = False

        def _intervene(self):
            from robot_rl.ros.common import action_to_msg

            st = self.state
            if st is None or st["state"] != "running":
                if self.driving:  # ended without a label (e.g. an e-stop)
                    self._hand_back()
                self.rule.reset()
                return
            obs = self._observation()
            a = None if obs is None else self.rule(obs)
            if a is None:
                return
            self.pub_human.publish(action_to_msg(a, self.get_clock().now().to_msg()))
            self.pub_int.publish(self._Bool(data=True))
            self.driving = True
            self.counts["intervention_steps"] += 1

        def _on_state(self, m):
            self.state = json.loads(m.data)
            st = self.state
            if st["state"] == "idle" and st.get("label") and st["episode"] != self.seen_episode:
                self.seen_episode = st["episode"]
                key = {"success": "successes", "failure": "failures", "discarded": "discarded"}[st["label"]]
                self.counts["episodes"] += 1
                self.counts[key] += 1
                if self.driving:  # the episode ended under the expert: hand back
                    self.counts["intervened_episodes"] += 1
                    self._hand_back()
                self.pub.publish(self._String(data=json.dumps(self.counts)))

        def _call(self, name: str, then=None, failed=None):
            self.busy = True
            fut = self.cli[name].call_async(self._Trigger.Request())

            def done(f):
                self.busy = False
                r = f.result()
                if r is None or not r.success:
                    self.get_logger().warning(f"{name}: {getattr(r, 'message', 'no reply')}",
                                              throttle_duration_sec=5.0)
                    if failed is not None:
                        failed()
                elif then is not None:
                    then()

            fut.add_done_callback(done)

        def _step(self):
            st = self.state
            if self.busy or st is None:
                return
            if st["state"] == "running":
                self.phase = None
                if (self.success or self.failure) and self.marked != st["episode"]:
                    self.marked = st["episode"]
                    self._call("success" if self.success else "failure",
                               failed=lambda: setattr(self, "marked", None))  # e.g. no step yet
                return
            if self.phase == "wait":  # reset done; the scene settles, as a person would look before confirming
                if time.monotonic() >= self.start_at:
                    self.phase, self.success, self.failure = "starting", False, False
                    self._call("start", failed=lambda: setattr(self, "phase", None))
                return
            if self.phase is not None:  # a reset or start in flight, or started and the state not yet running
                return
            if self.max_episodes and self.counts["episodes"] >= self.max_episodes:
                return
            if not all(c.service_is_ready() for c in self.cli.values()):
                return

            def wait():
                self.phase, self.start_at = "wait", time.monotonic() + self.reset_wait

            self.phase = "resetting"
            self._call("reset", then=wait, failed=lambda: setattr(self, "phase", None))

    return Operator()


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
