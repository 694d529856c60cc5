"""``operator`` node: a scripted stand-in for the person who supervises learning on the robot (``robot-rl learn``
with the policy node's ``learn:=true``), for simulation and tests.

What it does, episode after episode (a state machine on a 20 Hz timer, all service calls asynchronous):
  1. while the policy node's episode runs (``/<policy_node>/episode_state`` ``running``) and the simulator's task
     predicate (``<privileged_namespace>/success``, std_msgs/Bool) turns true, it calls
     ``/<policy_node>/mark_success`` — the label a person would give on seeing the cube placed;
  2. once the episode is over (``idle``: labelled by it, by the node's time limit as failed, or discarded), or left
     ``unlabelled`` by an e-stop (which it does not keep: a person would inspect it; the scripted one drops it), it
     resets the scene (``/<sim_robot>/reset``, std_srvs/Trigger: the next seed of the simulator's schedule) and
     confirms "reset done" with ``/<policy_node>/start_episode``, after ``reset_wait`` seconds;
  3. it stops after ``episodes`` episodes (0: never) by leaving the last one idle.
It does not intervene (no takeovers): interventions come from the teleop mux, which a person drives.

Parameters: ``policy_node`` / ``sim_robot`` (node names), ``privileged_namespace``, ``episodes``, ``reset_wait``
(s). Publishes ``~/status`` (std_msgs/String JSON {episodes, successes, failures, discarded}) on each label.
"""

from __future__ import annotations

import json
import time

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
                        "reset": self.create_client(Trigger, f"/{sim}/reset"),
                        "start": self.create_client(Trigger, f"/{pn}/start_episode")}
            self.success, self.state, self.busy = False, None, False
            self.counts = {"episodes": 0, "successes": 0, "failures": 0, "discarded": 0}
            self.seen_episode = self.marked = None
            self.phase, self.start_at = None, 0.0  # None | resetting | wait | starting
            self.create_subscription(Bool, f"{ns}/success", lambda m: setattr(self, "success", bool(m.data)),
                                     COMMAND_QOS)
            self.create_subscription(String, f"/{pn}/episode_state", self._on_state, LATCHED_QOS)
            self.pub = self.create_publisher(String, "~/status", LATCHED_QOS)
            self._String, self._Trigger = String, Trigger
            self.create_timer(0.05, self._step)

        def _on_state(self, m):
            self.state = json.loads(m.data)
            st = self.state
            if st["state"] == "idle" and st.get("label") and st["episode"] != self.seen_episode:
                self.seen_episode = st["episode"]
                key = {"success": "successes", "failure": "failures", "discarded": "discarded"}[st["label"]]
                self.counts["episodes"] += 1
                self.counts[key] += 1
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
                if self.success and self.marked != st["episode"]:
                    self.marked = st["episode"]
                    self._call("success", failed=lambda: setattr(self, "marked", None))  # e.g. no step yet
                return
            if self.phase == "wait":  # reset done; the scene settles, as a person would look before confirming
                if time.monotonic() >= self.start_at:
                    self.phase, self.success = "starting", False
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
