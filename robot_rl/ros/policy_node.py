"""``policy_node``: a lifecycle node that runs a base (+ residual) policy on a ROS 2 robot at the control rate.

Every control tick it takes the latest joint states, camera images and (optional, privileged) object poses,
assembles THE SAME observation dict as the simulated env (:func:`robot_rl.envs.assemble_observation`), gets the
action for this step, and publishes it to the arm bridge (``action_topic``, the action message of
:mod:`robot_rl.ros.common`, stamped with the oldest input's time). Just before it, the planned continuation goes to
``action_chunk_topic`` (``trajectory_msgs/JointTrajectory`` of action rows, :func:`robot_rl.ros.common.chunk_to_msg`,
same stamp; row 0 = this step's action, rows 1.. = the rest of the base's action chunk with the residual of this
step's observation): the arm bridge turns it into a multi-point joint trajectory with velocities, so a real
controller moves smoothly through the steps and keeps moving when a message is late. The executed action of every
step is still this step's action message; the preview only shapes what follows it (none is sent when nothing
follows this step's action, e.g. while learning, where each step is decided on its own).

When a tick happens (``trigger`` parameter):
  ``timer``  every 1/``control_rate`` s on the node clock (/clock with ``use_sim_time``). Images are sampled
      whenever the timer fires, so an unsynchronised camera adds up to one frame period of observation age.
  ``image``  on the arrival of each new frame of the policy's first camera (at most ``control_rate`` Hz: frames
      closer than 0.9 period to the last tick are skipped), so the observation is as fresh as the camera allows;
      a timer at ``control_rate`` stands in when no frame has come for 1.5 periods (the step then uses the latest
      inputs, or holds if they are older than ``max_obs_age``).
  ``auto`` (default) ``image`` when the policy reads a camera (or ``trigger_camera`` is set), else ``timer``.
  ``trigger_camera`` (default ``""``: the policy's first camera) names the camera whose frames trigger; one the
  policy does not read is subscribed for its timing only, e.g. the camera a perception stack computes the object
  poses from, so a state policy steps when the poses of a frame are fresh (the simulated robot publishes the joint
  states and poses of a tick before that tick's frames).

Action source (``server`` parameter):
  ``""`` (default) in-process: ``checkpoint`` (+ ``residual``) loaded here. ``execution: step`` executes them with
      :class:`robot_rl.stages.evaluation.CombinedPolicy` (receding horizon as in evaluation: one base call every
      ``n_action_steps`` steps, residual per step); ``execution: async`` serves them from a
      :class:`robot_rl.serve.server.EmbeddedServer` (a server thread on a free loopback port with a random token)
      and executes them exactly like ``async`` against a remote server below (background chunks, temporal
      ensembling).
  ``host:port`` a policy server (``robot-rl serve``), executed as the ``execution`` parameter says:
      ``step`` (default) one :meth:`PolicyClient.act` per step with a deadline of ``server_timeout`` seconds and no
      retries; the server answers from the session's chunk queue with the residual evaluated on this step's
      observation (exactly the simulator's per-step execution).
      ``async`` :class:`robot_rl.serve.client.AsyncChunkClient`: the next chunk is requested in the background once
      at most ``chunk_threshold`` queued actions remain, and overlapping chunks are blended by temporal ensembling
      (decay ``ensemble_decay``, ACT) — the loop waits for the network only on an episode's first step; the
      residual of queued rows uses the observation of their request.
      A missed deadline holds THIS step — no stale action is ever applied — and the next tick asks again with the
      next step index (the client reconnects; a restarted server gets its session re-created).

Learning on the robot (``learn:=true``, with ``server:=`` a ``robot-rl learn`` learner and step execution): the
node is an actor of the learner (:class:`LearningSource`, :class:`robot_rl.serve.actor.EpisodeActor`): each step
runs base + residual with the exploration the learner asks for (its replies), and while the teleop mux reports a
human in control (``/robot_rl/intervention``) the step is the human's latest ``/robot_rl/human_action``, sent as an
intervention (the flag is the mux's latest, so a takeover is attributed within one control period). The
episode's rows stay in the node until it is labelled, then go to the learner in one ``transitions`` request:
  ``~/mark_success`` / ``~/mark_failure`` (std_srvs/Trigger) label it (success: reward 1 and terminated on the last
      row; failure: truncated, bootstrapped), ``episode_steps`` (> 0) labels it failed at the time limit;
  ``~/discard_episode`` drops it; an e-stop leaves it unlabelled: a label keeps it, the next episode drops it;
  ``~/start_episode`` (the operator's "reset done") begins the next episode (the node must be active, the e-stop
      clear). After a label or a discard the arm holds until then.
  ``~/episode_state`` (std_msgs/String, latched) JSON {state: running | unlabelled | idle, episode, steps, label:
      success | failure | discarded, rows_sent, offline, residual_version (of the local copy, or null)}, published
      on every change, for the operator.
  The learner dies mid-episode: the step's deadline passes and the arm holds (the episode waits for the learner,
  and continues when a restarted one answers). With ``checkpoint:=`` the learner's base, the node keeps the last
  good weights (a copy of the learner's residual, refreshed at each episode boundary) and an episode started while the
  learner does not answer runs base + that copy here, offline (no exploration, nothing sent).
With ``acting:=local`` (and ``checkpoint:=``) every step runs base + the node's copy of the learner's residual in
this process instead, with the learner's exploration (:class:`robot_rl.serve.actor.LocalActs`): the control loop
never waits on the learner (its updates only compete for the CPU), weights change at episode starts, and a learner
that dies mid-episode does not stop the episode: its label waits until the learner answers again.
A hold mid-episode keeps the session: the row of the step before it spans the hold.

Holds (publishes ``std_msgs/Empty`` on ``hold_topic``: the bridge commands the measured posture) when an input is
missing or older than ``max_obs_age`` (camera stopped, joint states stalled), on a server timeout or error, on an
action with NaN/inf or the wrong shape, on ``~/estop``, and on deactivation. After a hold the next action starts a
fresh chunk from the current observation.

Lifecycle (rclpy.lifecycle, standard ``lifecycle_msgs`` services ``~/change_state`` / ``~/get_state``):
  configure  load the policy / connect to the server and check its observation spec; create subscriptions
  activate   start a new episode (observation history and chunk cleared, new server session) and the control loop
  deactivate stop the loop and hold;  cleanup  release the policy / connection
``autostart:=true`` configures and activates at start-up (for bring-up without a lifecycle manager).
Services ``~/estop`` / ``~/clear_estop`` (std_srvs/Trigger): latched; after a clear the node stays holding until the
next activate. Diagnostics (1 Hz, ``/diagnostics``): loop time p50/p99/max, observation age p50/max, deadline misses
(a tick whose processing exceeded the control period, or that started more than 1.5 periods after the previous
one), holds by cause, steps.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque

import numpy as np

from robot_rl.robot.controller import DiffIKController
from robot_rl.envs.env import assemble_observation
from robot_rl.errors import ConfigError
from robot_rl.ros.common import (COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, action_to_msg, chunk_to_msg, declare, declare_task,
                                 diagnostic, estop_services, JointStateCache, msg_to_action, msg_to_image, now_sec,
                                 PoseCache, qos_subscription, robot_model, run_node, sec_to_stamp, stamp_to_sec)
from robot_rl.robot.safety import EStopLatch


class _NaNObjects:
    """``object_pose`` for objects nobody publishes (an image-only policy on a real robot): NaN poses."""

    def object_pose(self, name):
        return np.full(3, np.nan), np.full(4, np.nan)


class InProcessSource:
    """Base (+ residual) in this process via :class:`robot_rl.stages.evaluation.CombinedPolicy` (one env).

    Every source's ``act(obs, timeout_s)`` returns float (n >= 1, 5) rows: row 0 is this step's action, rows 1.. the
    planned continuation (the rest of the current chunk; the residual of queued rows uses this step's observation)."""

    def __init__(self, checkpoint: str, residual: str = "", seed: int = 0):
        from robot_rl.policies.checkpoint import load_policy
        from robot_rl.rl.residual import load_residual

        if not checkpoint:
            raise ConfigError("checkpoint", "empty", "set checkpoint:=DIR (a base policy) or server:=HOST:PORT")
        self.base = load_policy(checkpoint)
        self.res = load_residual(residual, self.base) if residual else None
        self.seed = seed
        cfg = self.base.config
        self.keys = list(cfg.obs_keys) + list(cfg.image_keys)
        self.image_shape = {k: tuple(cfg.image_shape[:2]) for k in cfg.image_keys}
        self.pol = None
        self.episode = 0

    def start(self):
        from robot_rl.stages.evaluation import CombinedPolicy

        self.pol = CombinedPolicy(self.base, self.res, n_envs=1, seed=self.seed + self.episode)
        self.episode += 1
        self.first = True

    def drop_chunk(self):
        if self.pol is not None:
            self.pol.drop_chunks()

    def act(self, obs: dict, timeout_s: float) -> np.ndarray:
        b = {k: v[None] for k, v in obs.items() if k in self.keys}
        if self.first:
            self.pol.reset(np.array([True]), b)
            self.first = False
        else:
            self.pol.observe(b, None)
        a = np.asarray(self.pol.act(b)[0])
        ahead = self.pol.ex.queued(0)  # the rest of the base chunk, from the next step on
        if not len(ahead):
            return a[None]
        from robot_rl.rl.residual import apply_residual

        tiled = {k: np.repeat(v, len(ahead), axis=0) for k, v in b.items()}
        return np.concatenate([a[None], apply_residual(self.base.normalizer, self.res, tiled, ahead)[1]])

    def close(self):
        pass


def _server_inputs(meta: dict) -> tuple[list[str], dict[str, tuple]]:
    """(observation keys, {image key: (H, W)}) of a policy server, from its metadata."""
    spec = meta["obs_spec"]
    return list(spec), {k: tuple(s["shape"][:2]) for k, s in spec.items() if len(s["shape"]) == 3}


class ServerSource:
    """One :class:`robot_rl.serve.client.PolicyClient` session per episode, one ``act`` per step (``execution:
    step``): the server answers from the session's chunk queue, with the residual evaluated on this step's
    observation (exact per-step ResiP execution, as in simulation)."""

    def __init__(self, address: str, token: str | None, name: str, seed: int = 0, connect_timeout: float = 10.0):
        from robot_rl.serve.client import PolicyClient

        self.client = PolicyClient(address, token=token, timeout_s=connect_timeout, retries=0)
        meta = self.client.wait_ready(connect_timeout)
        self.keys, self.image_shape = _server_inputs(meta)
        self.name, self.seed, self.episode = name, seed, 0
        self.connect_timeout = connect_timeout
        self.session = None

    def _close_session(self):
        if self.session is not None:
            try:
                self.client.close_session(self.session, timeout_s=0.2)
            except Exception:  # noqa: BLE001 - best effort (the server also expires idle sessions)
                pass

    def start(self):
        self._close_session()
        self.session = f"{self.name}-{os.getpid()}-{self.episode}"
        self.episode += 1
        self.step, self.first, self.fresh = 0, True, False

    def drop_chunk(self):
        self.fresh = True

    def act(self, obs: dict, timeout_s: float) -> np.ndarray:
        # a step index is used once, answered or not: the server may have handled a request whose reply missed
        # its deadline, and it refuses a step that does not increase
        step, self.step = self.step, self.step + 1
        r = self.client.act(self.session, step, obs, reset=self.first,
                            seed=self.seed + self.episode if self.first else None, new_chunk=self.fresh,
                            timeout_s=self.connect_timeout if self.first else timeout_s)
        self.first = self.fresh = False
        return np.asarray(r.executed)

    def close(self):
        self._close_session()
        self.client.close()


class LearningSource:
    """``learn: true`` (``server`` is a ``robot-rl learn`` learner, step execution): the robot is an actor of the
    learner (:class:`robot_rl.serve.actor.EpisodeActor`). Each step's action is the served base + residual with the
    exploration the learner asks for; while the teleop mux says a human drives (``/robot_rl/intervention``), the
    step is the human's latest ``/robot_rl/human_action`` and is sent as an intervention. The episode's rows go
    to the learner when it is labelled (``~/mark_success``, ``~/mark_failure``, the time limit) and are dropped
    when it is discarded (``~/discard_episode``, or a new episode over an unlabelled one, e.g. after an e-stop).

    ``checkpoint`` (the learner's base, on this machine; optional): the source keeps the last good weights, a copy
    of the learner's residual fetched at every episode start and after every episode sent (the ``weights`` request;
    a version switch only at episode boundaries). An episode that starts while the learner does not answer within ``probe_s`` runs
    offline: base + that copy in this process (:class:`InProcessSource`, no exploration), nothing sent.

    ``acting``: ``learner`` (default) each step is a round trip to the learner's server (the newest residual, pinned
    per chunk; the arm holds when the learner stops answering); ``local`` (needs ``checkpoint``) each step runs the
    base + that copy in this process (:class:`robot_rl.serve.actor.LocalActs`, the server's arithmetic, with the
    learner's exploration), so the control loop never waits on the learner, whose updates may take the CPU: only
    the episode's start (weights, exploration) and its rows (at the label) go to the learner. A learner that dies
    mid-episode does not stop it; the label then waits for the learner (the episode is kept until it is sent).
    Raises ConfigError for a bad ``acting``, ``local`` without a checkpoint, or a checkpoint that is not the
    learner's base."""

    def __init__(self, address: str, token: str | None, name: str, seed: int = 0, connect_timeout: float = 10.0,
                 checkpoint: str = "", probe_s: float = 1.0, acting: str = "learner"):
        from robot_rl.serve.actor import EpisodeActor
        from robot_rl.serve.client import PolicyClient

        if acting not in ("learner", "local"):
            raise ConfigError("acting", f"{acting!r} is not learner or local",
                              "set acting:=learner (a round trip per step) or acting:=local (with checkpoint:=)")
        if acting == "local" and not checkpoint:
            raise ConfigError("checkpoint", "empty, and acting:=local runs the learner's base in this node",
                              "set checkpoint:= to the base the learner was started with, or acting:=learner")
        self.acting, self.acts = acting, None  # acts: the LocalActs of acting:=local
        self.client = PolicyClient(address, token=token, timeout_s=connect_timeout, retries=0)
        try:
            meta = self.client.wait_ready(connect_timeout)
            if "learner" not in self.client.ping():
                raise ConfigError("learn", f"the policy server at {address} has no learner attached",
                                  "point server:= at `robot-rl learn`, or set learn:=false")
            self.keys, self.image_shape = _server_inputs(meta)
            self.local, self.local_version = None, None  # InProcessSource of the last good weights, their version
            if checkpoint:
                from robot_rl.serve.server import weights_digest

                self.local = InProcessSource(checkpoint, seed=seed)
                if weights_digest(self.local.base) != meta["base"]["version"]:
                    raise ConfigError("checkpoint", f"{checkpoint} is not the learner's base (weights digest "
                                      f"{weights_digest(self.local.base)} != {meta['base']['version']})",
                                      "point checkpoint:= at the base the learner was started with (--base)")
                self._fetch(connect_timeout)
        except BaseException:
            self.client.close()
            raise
        self.actor = EpisodeActor(self.client, name=f"{name}-{os.getpid()}", seed=seed)
        self.seed, self.connect_timeout, self.probe_s = seed, connect_timeout, probe_s
        self.human = None  # the human's action for the next step, or None (the node sets it per tick)
        self.offline = False  # this episode runs the last good weights here (the learner was unreachable)

    def _fetch(self, timeout_s: float):
        """Refresh the copy of the learner's residual (raises ServerTimeout, ServerError)."""
        self.local_version, self.local.res = self.client.fetch_residual(self.local.base, timeout_s)

    def start(self):
        """A new episode: the learner's, with the copy of its weights refreshed; or, with a checkpoint and the
        learner not answering within ``probe_s``, an offline one on the last good weights."""
        from robot_rl.serve.client import ServerError

        self.offline = False
        if self.local is not None:
            try:
                self._fetch(self.probe_s)
            except ServerError:
                pass  # the learner answers (with an error): it runs the episode; the previous copy stays
            except TimeoutError:
                self.offline = True
                self.actor.discard()
                self.local.start()
                return
        if self.acting == "local":
            if self.acts is None:
                from robot_rl.serve.actor import LocalActs

                self.acts = LocalActs(self.local.base, self.local.res, self.local_version)
            else:
                self.acts.load(self.local.res, self.local_version)
        self.actor.start(seed=self.seed + self.actor.episode, acts=self.acts)

    @property
    def has_steps(self) -> bool:
        """The running episode has acted at least once (so it can be labelled)."""
        return (not self.local.first) if self.offline else self.actor.pending is not None

    def drop_chunk(self):
        if self.offline:
            self.local.drop_chunk()
        # learning: a hold keeps the episode's session: the next step continues it (its row spans the hold)

    def act(self, obs: dict, timeout_s: float) -> np.ndarray:
        if self.offline:
            return self.local.act(obs, timeout_s)
        first = self.actor.step == 0
        return self.actor.act(obs, human=self.human, timeout_s=self.connect_timeout if first else timeout_s)[None]

    def end(self, final_obs: dict, success: bool) -> int:
        """Send the labelled episode; returns the rows sent (0 for an offline episode, which is not sent)."""
        from robot_rl.serve.client import ServerError

        if self.offline:
            return 0
        n = self.actor.end(final_obs, success, timeout_s=self.connect_timeout)
        if self.local is not None:
            try:  # the learner just answered: refresh the copy now too, so it is the newest if the learner dies
                self._fetch(self.probe_s)
            except (TimeoutError, ServerError):
                pass  # the previous copy stays
        return n

    def discard(self):
        self.actor.discard()

    def close(self):
        self.actor.discard()
        self.client.close()


class AsyncServerSource:
    """``execution: async``: :class:`robot_rl.serve.client.AsyncChunkClient` — chunks are requested in the
    background once at most ``threshold`` queued actions remain, so the loop never waits for the base policy
    after the first step, and overlapping chunks are blended by temporal ensembling (ACT, Zhao et al. 2023;
    ``ensemble_decay`` m, or switch to the newest chunk when m < 0). The residual of queued rows uses the
    observation of their request (zero-order hold). After a hold the next step starts a fresh chunk from the
    current observation (the server session is reset)."""

    def __init__(self, address: str, token: str | None, name: str, seed: int = 0, connect_timeout: float = 10.0,
                 threshold: int = 2, ensemble_decay: float = 0.01, embedded=None):
        from robot_rl.serve.client import AsyncChunkClient, PolicyClient

        self.embedded = embedded  # an EmbeddedServer this source owns (closed with it)

        with PolicyClient(address, token=token, timeout_s=connect_timeout, retries=0) as probe:
            meta = probe.wait_ready(connect_timeout)
        self.keys, self.image_shape = _server_inputs(meta)
        self.session = f"{name}-{os.getpid()}-async"
        self.client = AsyncChunkClient(address, self.session, token=token, threshold=threshold,
                                       ensemble_decay=None if ensemble_decay < 0 else ensemble_decay,
                                       timeout_s=connect_timeout, retries=0)
        self.seed, self.episode, self.connect_timeout = seed, 0, connect_timeout

    def start(self):
        self.restart = True
        self.episode += 1

    def drop_chunk(self):
        self.restart = True

    def act(self, obs: dict, timeout_s: float) -> np.ndarray:
        if self.restart:
            a = self.client.act(obs, reset=True, seed=self.seed + self.episode, timeout_s=self.connect_timeout)
            self.restart = False
            return np.asarray(a)[None]
        return np.asarray(self.client.act(obs, timeout_s=timeout_s))[None]

    def close(self):
        self.client.close()
        if self.embedded is not None:
            self.embedded.close()


def make_node():
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Empty
    from trajectory_msgs.msg import JointTrajectory

    class PolicyNode(LifecycleNode):
        def __init__(self):
            super().__init__("policy_node")
            self.robot, self.chain = robot_model(self)
            self.controller = DiffIKController(self.chain, np.array(self.robot.q_home))
            self.p = {
                "checkpoint": declare(self, "checkpoint", "", "base policy checkpoint dir (in-process mode; "
                                      "learn: the learner's base, to keep its last good weights here)"),
                "residual": declare(self, "residual", "", "residual checkpoint dir (in-process mode, optional)"),
                "server": declare(self, "server", "", "policy server host:port ('' = in-process)"),
                "server_timeout": float(declare(self, "server_timeout", 0.05, "deadline of one step's request [s]",
                                                positive=True)),
                "execution": declare(self, "execution", "step", "step (exact per-step residual; in-process: "
                                                                "receding horizon) | async (background chunks, "
                                                                "temporal ensembling)"),
                "chunk_threshold": int(declare(self, "chunk_threshold", 2, "async: request the next chunk when "
                                                                           "this many actions are left")),
                "ensemble_decay": float(declare(self, "ensemble_decay", 0.01, "async: temporal-ensembling decay m "
                                                                              "(ACT); < 0 switches to the newest "
                                                                              "chunk")),
                "connect_timeout": float(declare(self, "connect_timeout", 10.0, "server start-up / first-step "
                                                                               "deadline [s]", positive=True)),
                "token_file": declare(self, "token_file", "", "file with the server token ('' = env/none)"),
                "control_rate": float(declare(self, "control_rate", 10.0, "control loop rate [Hz]", positive=True)),
                "max_obs_age": float(declare(self, "max_obs_age", 0.25, "hold when an input is older [s]",
                                             positive=True)),
                "image_topic": declare(self, "image_topic", "/cameras/{camera}/image_raw", "image topic pattern"),
                "privileged_namespace": declare(self, "privileged_namespace", "/sim/privileged",
                                                "where <object>_pose / <marker>_pose topics are"),
                "target_xy": list(declare(self, "target_xy", [0.0], "fixed place target [x, y] (m); [0.0] = "
                                                                      "from <privileged_namespace>/target_pose")),
                "action_topic": declare(self, "action_topic", "/arm_bridge/action", "where actions go"),
                "hold_topic": declare(self, "hold_topic", "/arm_bridge/hold", "std_msgs/Empty: hold now"),
                "action_chunk_topic": declare(self, "action_chunk_topic", "/arm_bridge/action_chunk",
                                              "where each step's planned continuation goes ('' = not sent)"),
                "seed": int(declare(self, "seed", 0, "noise seed (episode k uses seed + k)")),
                "autostart": bool(declare(self, "autostart", False, "configure + activate at start-up")),
                "trigger": declare(self, "trigger", "auto", "when a control step runs: timer | image | auto"),
                "trigger_camera": declare(self, "trigger_camera", "", "image trigger: the camera whose frames "
                                                                      "pace the loop ('' = the policy's first)"),
                "learn": bool(declare(self, "learn", False, "server:= is a `robot-rl learn` learner: explore, "
                                                            "label episodes, send them (step execution)")),
                "episode_steps": int(declare(self, "episode_steps", 0, "learn: time limit in control steps (then "
                                                                       "labelled failed); 0 = none")),
                "acting": declare(self, "acting", "learner", "learn: where each step runs: learner (its server) | "
                                                             "local (the base + a copy of its residual here; "
                                                             "needs checkpoint:=)"),
            }
            if self.p["learn"] and (not self.p["server"] or self.p["execution"] != "step"):
                raise ConfigError("learn", "needs server:=HOST:PORT of `robot-rl learn` and execution:=step",
                                  "set both, or learn:=false")
            if self.p["execution"] not in ("step", "async"):
                raise ConfigError("execution", f"{self.p['execution']!r} is not step or async",
                                  "set execution:=step (exact per-step residual) or execution:=async")
            if self.p["trigger"] not in ("timer", "image", "auto"):
                raise ConfigError("trigger", f"{self.p['trigger']!r} is not timer, image or auto",
                                  "set trigger:=auto (image-triggered when the policy uses a camera)")
            self.period = 1.0 / self.p["control_rate"]
            self.task, _ = declare_task(self, "task whose observation keys are assembled")
            self.source = None
            self.timer = None
            self.trigger_camera: str | None = None
            self.estop = EStopLatch()
            self.estop_hold = False  # set by an e-stop, cleared only by the next activate (not by ~/clear_estop)
            self.js, self.poses = JointStateCache(), PoseCache()
            self.images: dict[str, tuple[np.ndarray, float]] = {}
            self.subs = []
            self.holding, self.hold_reason = True, "inactive"
            self.counts: Counter = Counter()
            self.loop_ms: deque = deque(maxlen=1000)
            self.obs_age: deque = deque(maxlen=1000)
            self.last_tick: float | None = None
            self.steps = 0
            self.pub_action = self.create_publisher(JointState, self.p["action_topic"], COMMAND_QOS)
            self.pub_hold = self.create_publisher(Empty, self.p["hold_topic"], COMMAND_QOS)
            self.pub_chunk = (self.create_publisher(JointTrajectory, self.p["action_chunk_topic"], COMMAND_QOS)
                              if self.p["action_chunk_topic"] else None)
            self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
            estop_services(self, self._on_estop, self._on_clear)
            self.episode = "idle"  # learn: running | unlabelled (stopped by an e-stop) | idle
            self.n_episodes, self.last_label = 0, None
            self.last_obs = None  # learn: the last observation the policy acted on
            if self.p["learn"]:
                from std_msgs.msg import Bool, String
                from std_srvs.srv import Trigger

                self.pub_episode = self.create_publisher(String, "~/episode_state", LATCHED_QOS)
                self._String = String

                self.create_service(Trigger, "~/start_episode", self._on_start_episode)
                self.create_service(Trigger, "~/mark_success", lambda q, r: self._on_label(r, True))
                self.create_service(Trigger, "~/mark_failure", lambda q, r: self._on_label(r, False))
                self.create_service(Trigger, "~/discard_episode", self._on_discard)
                self.intervening, self.human_action = False, None
                self.create_subscription(Bool, "/robot_rl/intervention",
                                         lambda m: setattr(self, "intervening", bool(m.data)), COMMAND_QOS)
                self.create_subscription(JointState, "/robot_rl/human_action", self._on_human, COMMAND_QOS)
            self.create_timer(1.0, self._diag)
            self._Empty, self._PoseStamped, self._Image, self._JointState = Empty, PoseStamped, Image, JointState
            if self.p["autostart"]:
                # once, after the executor starts spinning (a 0 s timer left running would spin a core)
                self._autostart_timer = self.create_timer(0.0, self._autostart)

        def _autostart(self):
            if self._autostart_timer is None:
                return
            self.destroy_timer(self._autostart_timer)
            self._autostart_timer = None
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

        # -- lifecycle -----------------------------------------------------------------------------------------
        def on_configure(self, state):
            p = self.p
            try:
                if p["server"]:
                    token = None
                    if p["token_file"]:
                        token = open(p["token_file"]).read().strip()
                    if p["learn"]:
                        self.source = LearningSource(p["server"], token, self.get_name(), p["seed"],
                                                     p["connect_timeout"], p["checkpoint"], acting=p["acting"])
                    elif p["execution"] == "async":
                        self.source = AsyncServerSource(p["server"], token, self.get_name(), p["seed"],
                                                        p["connect_timeout"], p["chunk_threshold"],
                                                        p["ensemble_decay"])
                    else:
                        self.source = ServerSource(p["server"], token, self.get_name(), p["seed"],
                                                   p["connect_timeout"])
                elif p["execution"] == "async":
                    from robot_rl.serve.server import EmbeddedServer

                    if not p["checkpoint"]:
                        raise ConfigError("checkpoint", "empty", "set checkpoint:=DIR (a base policy) or "
                                          "server:=HOST:PORT")
                    emb = EmbeddedServer(p["checkpoint"], p["residual"] or None, control_rate_hz=p["control_rate"])
                    try:
                        self.source = AsyncServerSource(emb.address, emb.token, self.get_name(), p["seed"],
                                                        p["connect_timeout"], p["chunk_threshold"],
                                                        p["ensemble_decay"], embedded=emb)
                    except BaseException:
                        emb.close()
                        raise
                else:
                    self.source = InProcessSource(p["checkpoint"], p["residual"], p["seed"])
                self._setup_inputs(self.source.keys)
            except Exception as e:  # noqa: BLE001 - a failed configure must say why
                self.get_logger().error(f"configure failed: {e}")
                if self.source is not None:
                    self.source.close()
                    self.source = None
                return TransitionCallbackReturn.FAILURE
            cam = p["trigger_camera"] or (self.cameras[0] if self.cameras else "")
            trig = p["trigger"] if p["trigger"] != "auto" else ("image" if cam else "timer")
            if trig == "image" and not cam:
                self.get_logger().error("configure failed: trigger: image but the policy reads no camera -> "
                                        "set trigger:=timer (or auto), or trigger_camera:=NAME")
                self.source.close()
                self.source = None
                return TransitionCallbackReturn.FAILURE
            self.trigger_camera = cam if trig == "image" else None
            if self.trigger_camera is not None and cam not in self.cameras:  # its frames only pace the loop
                self.subs.append(qos_subscription(
                    self, self._Image, p["image_topic"].format(camera=cam), lambda m, c=cam: self._on_frame(c),
                    SENSOR_QOS))
            self.get_logger().info(f"configured: {'server ' + p['server'] if p['server'] else 'in-process'} "
                                   f"({p['execution']} execution), "
                                   f"keys {self.source.keys}, cameras {self.cameras}, trigger {trig}")
            return TransitionCallbackReturn.SUCCESS

        def _setup_inputs(self, keys):
            p = self.p
            self.keys = list(keys)
            task_keys = set(self.task.obs_dims())
            self.cameras = [k[len("image_"):] for k in keys if k.startswith("image_")]
            self.need_objects = bool(task_keys & set(keys))
            self.fixed_target = (list(map(float, p["target_xy"])) if len(p["target_xy"]) == 2 else None)
            self.need_target = self.need_objects and bool({"target_pos", "cube_to_target"} & set(keys)) \
                and self.fixed_target is None
            self.subs.append(self.create_subscription(
                self._JointState, "/joint_states", lambda m: self.js.update(m), COMMAND_QOS))
            self.objects = [o.name for o in self.task.objects] if self.need_objects else []
            for name in self.objects + (["target"] if self.need_target else []):
                self.subs.append(self.create_subscription(
                    self._PoseStamped, f"{p['privileged_namespace']}/{name}_pose",
                    lambda m, n=name: self.poses.update(n, m), COMMAND_QOS))
            for cam in self.cameras:
                self.subs.append(qos_subscription(
                    self, self._Image, p["image_topic"].format(camera=cam), lambda m, c=cam: self._on_image(c, m),
                    SENSOR_QOS))

        def _on_image(self, cam, m):
            try:
                self.images[cam] = (msg_to_image(m), stamp_to_sec(m.header.stamp))
            except ConfigError as e:
                self.counts["bad_images"] += 1
                self.get_logger().error(f"image from {cam}: {e}", throttle_duration_sec=5.0)
                return
            self._on_frame(cam)

        def _on_frame(self, cam):
            """A new frame of ``cam`` arrived: a step, when it is the trigger camera's and a period has passed."""
            if cam == self.trigger_camera and self.timer is not None:
                if self.last_tick is None or now_sec(self) - self.last_tick >= 0.9 * self.period:
                    self._tick()

        def _on_timer(self):
            if self.trigger_camera is not None and self.last_tick is not None \
                    and now_sec(self) - self.last_tick < 1.5 * self.period:
                return  # frames are driving the loop
            self._tick()

        def on_activate(self, state):
            if self.source is None:
                return TransitionCallbackReturn.FAILURE
            if self.estop.active:
                self.get_logger().error("activate refused: the e-stop is latched -> call ~/clear_estop first")
                return TransitionCallbackReturn.FAILURE
            self._begin_episode()
            self.get_logger().info("activated: new episode")
            return super().on_activate(state)

        def _begin_episode(self):
            """A new episode: the source's (learn: an unlabelled one is dropped), the loop started."""
            if self.p["learn"] and self.episode != "idle":
                self.source.discard()
            self.estop_hold = False
            self.source.start()
            self.steps, self.last_tick = 0, None
            self.holding, self.hold_reason = False, ""
            self.n_episodes += 1
            self._set_episode("running", label="")
            if self.timer is None:
                self.timer = self.create_timer(self.period, self._on_timer)

        def _set_episode(self, state: str, label: str | None = None, rows: int = 0):
            """learn: the episode state, published latched on ``~/episode_state`` as JSON {state, episode, steps,
            label, rows_sent} (what an operator, scripted or human, follows)."""
            self.episode = state
            if label is not None:
                self.last_label = label
            if self.p["learn"]:
                self.pub_episode.publish(self._String(data=json.dumps(
                    {"state": state, "episode": self.n_episodes, "steps": self.steps, "label": self.last_label,
                     "rows_sent": rows, "offline": self.source.offline,
                     "residual_version": self.source.local_version})))

        def _stop_loop(self, reason: str):
            if self.timer is not None:
                self.destroy_timer(self.timer)
                self.timer = None
            self._hold(reason)

        def on_deactivate(self, state):
            self._stop_loop("deactivated")
            if self.p["learn"] and self.episode != "idle":
                self.source.discard()
                self._set_episode("idle", "discarded")
            return super().on_deactivate(state)

        def on_cleanup(self, state):
            for s in self.subs:
                self.destroy_subscription(s)
            self.subs = []
            if self.source is not None:
                self.source.close()
                self.source = None
            return TransitionCallbackReturn.SUCCESS

        def on_shutdown(self, state):
            self._hold("shutdown")
            if self.source is not None:
                self.source.close()
                self.source = None
            return TransitionCallbackReturn.SUCCESS

        # -- control loop --------------------------------------------------------------------------------------
        def _hold(self, reason: str, count: str | None = None):
            if count:
                self.counts[count] += 1
            if not self.holding:
                self.counts["holds"] += 1
                self.get_logger().warning(f"holding: {reason}")
            self.pub_hold.publish(self._Empty())
            if self.source is not None:
                self.source.drop_chunk()
            self.holding, self.hold_reason = True, reason

        def _inputs(self, now):
            """(joint_state, objects, params, images, oldest stamp) or raise _Stale(reason)."""
            arm, grip = self.robot.arm_joints, self.robot.gripper_joints
            if not self.js.has((*arm, *grip)):
                raise _Stale("no joint states yet")
            q, dq, w, t_js = self.js.get(arm, grip)
            stamps = {"joint_states": t_js}
            params = {}
            objects = self.poses if self.need_objects else _NaNObjects()
            for n in self.objects + (["target"] if self.need_target else []):
                if n not in self.poses.t:
                    raise _Stale(f"no {n} pose yet")
                stamps[f"{n}_pose"] = self.poses.t[n]
            if self.need_target:
                params["target_xy"] = [float(v) for v in self.poses.poses["target"][0][:2]]
            elif self.fixed_target is not None:
                params["target_xy"] = self.fixed_target
            else:
                params["target_xy"] = [np.nan, np.nan]
            images = {}
            for c in self.cameras:
                if c not in self.images:
                    raise _Stale(f"no image from {c} yet")
                img, t = self.images[c]
                want = self.source.image_shape.get(f"image_{c}")
                if want and img.shape[:2] != want:
                    import cv2

                    img = cv2.resize(img, (want[1], want[0]), interpolation=cv2.INTER_AREA)
                images[c] = img
                stamps[f"image_{c}"] = t
            ages = {k: now - t for k, t in stamps.items()}
            worst = max(ages, key=ages.get)
            if ages[worst] > self.p["max_obs_age"]:
                raise _Stale(f"{worst} is {ages[worst]:.3f} s old (max_obs_age {self.p['max_obs_age']})")
            return (q, dq, w), objects, params, images, min(stamps.values()), ages[worst]

        def _tick(self):
            t0 = time.perf_counter()
            now = now_sec(self)
            if self.last_tick is not None and now - self.last_tick > 1.5 * self.period:
                self.counts["deadline_misses"] += 1
                self.counts["late_ticks"] += 1
            self.last_tick = now
            if self.estop.active or self.estop_hold:
                return
            try:
                js, objects, params, images, t_obs, age = self._inputs(now)
            except _Stale as e:
                self._hold(f"stale observation: {e}", "stale")
                return
            obs = assemble_observation(self.controller, self.task, js, objects, params, images)
            bad = [k for k in self.keys if k in obs and not np.all(np.isfinite(obs[k]))]
            if bad:
                self._hold(f"non-finite observation {bad}", "bad_obs")
                return
            o = {k: obs[k] for k in self.keys}
            if self.p["learn"]:
                self.last_obs = o
                if 0 < self.p["episode_steps"] <= self.steps:  # the time limit: labelled failed (truncated)
                    self._label(False, "time limit")
                    return
                self.source.human = self.human_action if self.intervening else None
            try:
                rows = self.source.act(o, self.p["server_timeout"])
            except TimeoutError as e:
                self._hold(f"policy server timeout: {e}", "server_timeouts")
                return
            except Exception as e:  # noqa: BLE001 - any policy failure holds the arm
                self._hold(f"policy error: {e}", "policy_errors")
                return
            rows = np.asarray(rows, dtype=np.float64)
            shaped = rows.ndim == 2 and rows.shape[1:] == (5,) and len(rows) > 0
            a = rows[0] if shaped else rows.reshape(-1)
            if a.shape != (5,) or not np.all(np.isfinite(a)):
                self._hold(f"rejected action {a.tolist()} (NaN/inf or shape != (5,))", "rejected_actions")
                return
            # the planned continuation, before the action (the bridge pairs them by stamp); a chunk of this step
            # alone (learning, a NaN past row 0) plans nothing more than the action: not sent, one message less
            if self.pub_chunk is not None and shaped and len(rows) > 1 and np.all(np.isfinite(rows)):
                self.pub_chunk.publish(chunk_to_msg(np.clip(rows, -1.0, 1.0), self.period, sec_to_stamp(t_obs)))
            self.pub_action.publish(action_to_msg(np.clip(a, -1.0, 1.0), sec_to_stamp(t_obs)))
            self.holding, self.hold_reason = False, ""
            self.steps += 1
            ms = (time.perf_counter() - t0) * 1e3
            self.loop_ms.append(ms)
            self.obs_age.append(age)
            if ms > self.period * 1e3:
                self.counts["deadline_misses"] += 1

        # -- learning: episode control -------------------------------------------------------------------------
        def _final_obs(self):
            try:
                js, objects, params, images, _, _ = self._inputs(now_sec(self))
            except _Stale:
                return self.last_obs
            obs = assemble_observation(self.controller, self.task, js, objects, params, images)
            return {k: obs[k] for k in self.keys}

        def _label(self, success: bool, why: str) -> str:
            """End the running (or e-stopped) episode with a label and send it; the arm holds until the next
            ~/start_episode."""
            self._stop_loop(f"episode over ({why})")
            final = self._final_obs()
            if final is None or not self.source.has_steps:
                self.source.discard()
                self._set_episode("idle", "discarded")
                return "no step to send"
            try:
                n = self.source.end(final, success)
            except Exception as e:  # noqa: BLE001 - the learner unreachable: keep the episode, say so, hold
                self._set_episode("unlabelled")
                self.get_logger().error(f"could not send the episode ({e}); label it again once the learner is "
                                        "back, or ~/discard_episode")
                return f"not sent ({e}): label again to retry, or discard"
            label = "success" if success else "failure"
            self._set_episode("idle", label, n)
            if self.source.offline:
                self.counts["offline_episodes"] += 1
                self.get_logger().info(f"offline episode labelled {label} ({why}): not sent")
                return f"{label}: offline episode (the learner was unreachable at its start), nothing sent"
            self.counts["episodes_sent"] += 1
            self.counts["rows_sent"] += n
            self.get_logger().info(f"episode labelled {label} ({why}): {n} rows sent")
            return f"{label}: {n} rows sent to the learner"

        def _on_label(self, res, success: bool):
            if self.episode == "idle":
                res.success, res.message = False, "no episode to label: call ~/start_episode first"
                return res
            if not self.source.has_steps:
                res.success, res.message = False, "no step acted yet in this episode: label it after the first"
                return res
            res.message = self._label(success, "operator")
            res.success = self.episode == "idle"  # False: not sent (the episode is kept, unlabelled)
            return res

        def _on_discard(self, req, res):
            was = self.episode
            self._stop_loop("episode discarded")
            self.source.discard()
            self._set_episode("idle", "discarded" if was != "idle" else None)
            res.success, res.message = True, "discarded" if was != "idle" else "no episode"
            return res

        def _on_start_episode(self, req, res):
            from lifecycle_msgs.msg import State

            if self._state_machine.current_state[0] != State.PRIMARY_STATE_ACTIVE:
                res.success, res.message = False, "the node is not active: configure and activate it first"
            elif self.estop.active:
                res.success, res.message = False, "the e-stop is latched: call ~/clear_estop first"
            else:
                dropped = self.episode != "idle"
                self._begin_episode()
                res.success = True
                res.message = "episode started" + (" (the unlabelled one was discarded)" if dropped else "")
                if self.source.offline:
                    res.message += (f" OFFLINE: the learner does not answer; running base + the last good residual "
                                    f"(version {self.source.local_version}) here, nothing is sent")
            return res

        def _on_human(self, m):
            try:
                self.human_action = msg_to_action(m).astype(np.float32)
            except ConfigError:
                self.human_action = None

        # -- services / diagnostics ----------------------------------------------------------------------------
        def _on_estop(self, req, res):
            self.estop.trigger("e-stop service")
            self.estop_hold = True
            self._hold("e-stop", "estops")
            if self.p["learn"] and self.episode == "running":
                self._set_episode("unlabelled")  # kept only if the operator labels it; dropped by the next episode
            res.success, res.message = True, "e-stop latched: holding; clear with ~/clear_estop, then re-activate"
            return res

        def _on_clear(self, req, res):
            was = self.estop.clear()
            res.success, res.message = True, "e-stop cleared (re-activate to resume)" if was else "not active"
            return res

        def _diag(self):
            lm = np.array(self.loop_ms) if self.loop_ms else np.zeros(1)
            ag = np.array(self.obs_age) if self.obs_age else np.zeros(1)
            level = 2 if self.estop.active or self.estop_hold else (1 if self.holding and self.timer is not None else 0)
            vals = {"steps": self.steps, "holding": self.holding, "hold_reason": self.hold_reason,
                    "loop_ms_p50": float(np.percentile(lm, 50)), "loop_ms_p99": float(np.percentile(lm, 99)),
                    "loop_ms_max": float(lm.max()), "obs_age_ms_p50": float(np.percentile(ag, 50) * 1e3),
                    "obs_age_ms_max": float(ag.max() * 1e3), **dict(self.counts)}
            self.pub_diag.publish(diagnostic("policy_node: control loop", "policy", level,
                                             self.hold_reason or "running", vals, sec_to_stamp(now_sec(self))))

        def close(self):
            if self.timer is not None:
                self._hold("shutdown")
                time.sleep(0.05)
            if self.source is not None:
                self.source.close()
                self.source = None

    return PolicyNode()


class _Stale(Exception):
    pass


def main(args=None) -> int:
    # entry point's thread choice: an in-process policy runs torch on one thread (the control loop and, in
    # simulation, the simulator need the other cores). Set through the environment because torch is imported only
    # in in-process mode, later; an OMP_NUM_THREADS already set by the user is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
