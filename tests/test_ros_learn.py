"""Learning on the robot over real DDS, separate processes: ``robot-rl learn`` as the learner, PyBullet
``sim_robot`` as the arm, the arm bridge, and the policy node with ``learn:=true`` acting through the learner's
server. The test is the operator: it labels episodes through the node's services. Labelled episodes reach the
learner and its store whole (the time limit labels failure), an e-stopped episode the operator does not label is
dropped by the next ~/start_episode, and Ctrl-C saves the learner's state."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ros_helpers import ros  # noqa: F401 (pytest fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "place_bc_mujoco"
LIMIT = 20


TINY = ("td3.learning_starts=30", "td3.critic_hidden=[16,16]", "td3.n_critics=2", "td3.batch_size=16",
        "td3.log_every=10", "td3.critic_warmup_updates=0")


def start_learner(out: Path, *args, port: int = 0, base: Path = FIXTURE, tiny: bool = True, nice: int = 0,
                  cpus: str | None = None, idle: bool = False):
    """``robot-rl learn`` in its own process (``tiny``: a tiny learner, else TD3's defaults, curve rows every 100
    steps) on ``base`` at ``nice`` (on the CPU list ``cpus``, e.g. "1", when given; under the SCHED_IDLE policy,
    ``chrt -i 0``, with ``idle``); returns (process, port) once it listens. ``args``: more command-line arguments.

    Default nice 0: here the learner also answers the node's step requests, on the control path, and its updating
    thread already runs 10 nice levels below its serving thread (``robot_rl.serve.learner``); at nice 19 beside a
    busy suite it answered late for seconds and the node held (a 90 s wait for the first episode timed out)."""
    sets = TINY if tiny else ("td3.log_every=100",)
    pin = (["taskset", "-c", cpus] if cpus else []) + (["chrt", "-i", "0"] if idle else [])
    p = subprocess.Popen([*pin, "nice", "-n", str(nice), sys.executable, "-m", "robot_rl.cli", "learn", "--base", str(base),
                          "--out", str(out), "--port", str(port), "--task", "place",
                          *[a for s in sets for a in ("--set", s)], *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    for line in p.stdout:
        m = re.search(r"serving on tcp://[^:]+:(\d+)", line)
        if m:
            return p, int(m.group(1))
        if time.monotonic() - t0 > 90:
            break
    p.kill()
    raise AssertionError("the learner did not start")


def stop_learner(p) -> str:
    """Ctrl-C the learner (it stops at a request boundary and saves; killed after 60 s); returns its output."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=60)[0] or ""
    except subprocess.TimeoutExpired:
        p.kill()
        return p.communicate()[0] or ""


def test_policy_node_learns_through_the_learner_with_labelled_episodes(ros):
    from sensor_msgs.msg import JointState
    from std_srvs.srv import Trigger

    from robot_rl.datasets.store import ZarrStore
    from robot_rl.ros.common import COMMAND_QOS

    drv, start, tmp = ros
    learner, port = start_learner(tmp / "learn")
    store = tmp / "learn" / "episodes.zarr"
    try:
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "seed": 9_000_000})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": LIMIT,
                                           "server_timeout": 0.5, "autostart": True})
        drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
        actions = lambda: drv.log.get("/arm_bridge/action", [])  # noqa: E731
        n_ep = lambda: ZarrStore.open(store).n_episodes if store.exists() else 0  # noqa: E731

        # 1. the time limit ends the first episode: labelled failed, every step sent (checked in the store below:
        # the node starts acting before this driver's subscription is matched)
        drv.wait_for(lambda: n_ep() == 1, 90, "the first episode in the learner's store")
        # 2. reset the arm, start an episode, the operator marks success after a few steps
        assert drv.call(Trigger, "/sim_robot/reset").success
        a1 = len(actions())
        assert drv.call(Trigger, "/policy_node/start_episode").success
        drv.wait_for(lambda: len(actions()) >= a1 + 6, 30, "actions of episode 2")
        r = drv.call(Trigger, "/policy_node/mark_success")
        assert r.success, r.message
        n2 = len(actions()) - a1
        drv.wait_for(lambda: n_ep() == 2, 30, "the second episode in the store")
        # 3. an e-stop mid-episode, then a new episode without a label: the e-stopped steps never reach the learner
        assert drv.call(Trigger, "/sim_robot/reset").success
        a2 = len(actions())
        assert drv.call(Trigger, "/policy_node/start_episode").success
        drv.wait_for(lambda: len(actions()) >= a2 + 4, 30, "actions of episode 3")
        assert drv.call(Trigger, "/policy_node/estop").success
        assert not drv.call(Trigger, "/policy_node/start_episode").success  # refused while latched
        assert drv.call(Trigger, "/policy_node/clear_estop").success
        assert drv.call(Trigger, "/sim_robot/reset").success
        r = drv.call(Trigger, "/policy_node/start_episode")
        assert r.success and "discarded" in r.message, r.message
        n_before = len(actions())
        drv.wait_for(lambda: len(actions()) >= n_before + 5, 30, "actions of episode 4")
        assert drv.call(Trigger, "/policy_node/mark_failure").success
        n4 = len(actions()) - n_before
        drv.wait_for(lambda: n_ep() == 3, 30, "the fourth episode in the store")
        st = ZarrStore.open(store)
        metas = st.episodes_meta()
        assert [bool(m["success"]) for m in metas] == [False, True, False]
        eps = [st.get_episode(i, keys=["reward", "action", "base_action", "residual_version"]) for i in range(3)]
        # the rows of an episode are its executed actions (a label call may race a tick, and this driver may see an
        # action a little late: +-2)
        assert len(eps[0]["reward"]) == LIMIT
        assert abs(len(eps[1]["reward"]) - n2) <= 2 and abs(len(eps[2]["reward"]) - n4) <= 2
        assert eps[1]["reward"][-1] == 1.0 and eps[1]["reward"][:-1].sum() == 0 and eps[2]["reward"].sum() == 0
        assert all(np.isfinite(e["action"]).all() and np.isfinite(e["base_action"]).all() for e in eps)
    finally:
        out = stop_learner(learner)
        print("learner output:\n" + out[-3000:])
        for f in sorted(tmp.glob("*.log")):
            print(f"{f.name}:\n{f.read_text()[-2000:]}")
    assert learner.returncode == 0, out[-2000:]
    assert (tmp / "learn" / "state" / "model.safetensors").is_file() and (tmp / "learn" / "checkpoint").is_dir()


def test_scripted_operator_runs_episodes_back_to_back(ros):
    """The scripted operator resets the simulator and starts each episode, marks success from the simulator's
    predicate, and lets the node's time limit label the rest: every episode it counted is in the learner's store
    with the same label. The scene puts the cube on its target, so the predicate holds as soon as the gripper is
    open: the success path is exercised whatever the untrained policy does. Its takeovers (``intervene:=true``)
    reach the store as intervention steps with the expert's action."""
    import json

    from std_msgs.msg import String

    from robot_rl.datasets.store import ZarrStore
    from robot_rl.ros.common import LATCHED_QOS

    drv, start, tmp = ros
    learner, port = start_learner(tmp / "learn")
    try:
        on_target = {"task.cube_x": [0.5, 0.5], "task.cube_y": [0.05, 0.05], "task.target_x": [0.5, 0.5],
                     "task.target_y": [0.05, 0.05]}
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "seed": 9_100_000, **on_target})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": 15,
                                           "server_timeout": 0.5, "autostart": True})
        # intervene:=true with bounds that always hold: the scripted expert takes over at the first tick of each
        # episode (the rule's own bounds are tested in test_env), exercising the takeover path end to end
        start("robot_rl.ros.operator", {"episodes": 3, "reset_wait": 0.2, "intervene": True, "intervene_near": 1.0,
                                        "intervene_lift": [-1.0, 1.0], "intervene_min_error": 0.0,
                                        "intervene_max_width": 1.0})
        drv.subscribe(String, "/operator/status", LATCHED_QOS)
        status = lambda: json.loads(drv.last["/operator/status"][1].data) if "/operator/status" in drv.last else {}  # noqa: E731
        drv.wait_for(lambda: status().get("episodes", 0) >= 3, 120, "three episodes run by the operator")
        drv.spin(1.0)
        counts = status()
        assert counts["episodes"] == 3 and counts["discarded"] == 0 and counts["successes"] >= 1
        st = ZarrStore.open(tmp / "learn" / "episodes.zarr")
        assert st.n_episodes == 3
        labels = [bool(m["success"]) for m in st.episodes_meta()]
        assert sum(labels) == counts["successes"] and len(labels) - sum(labels) == counts["failures"]
        for i, ok in enumerate(labels):
            r = st.get_episode(i, keys=["reward"])["reward"]
            assert r[-1] == float(ok) and (ok or len(r) == 15)  # failures are the time limit's
        # the takeovers: flagged steps, executed = the expert's action (the human_action stored), counted by both
        assert counts["intervened_episodes"] == 3 and counts["intervention_steps"] > 0
        flagged = 0
        for i in range(3):
            e = st.get_episode(i, keys=["intervention", "human_action", "action"])
            f = np.asarray(e["intervention"], bool)
            assert f[1:].all(), f  # all but (at most) the first tick, before the operator's first message arrived
            np.testing.assert_allclose(e["human_action"][f], e["action"][f], atol=1e-6)
            assert np.isnan(e["human_action"][~f]).all()
            flagged += int(f.sum())
        assert flagged > 0
    finally:
        stop_learner(learner)


def test_operator_labels_success_by_a_success_classifier_on_the_camera(ros):
    """``success_classifier:=`` labels success from the camera instead of the simulator's predicate: a classifier
    whose threshold is 0 fires on the first frame of each running episode, so every episode is marked a success
    before the time limit although the cube is nowhere near its target (the predicate is false)."""
    import json

    from std_msgs.msg import String

    from robot_rl.datasets.store import ZarrStore
    from robot_rl.policies.checkpoint import save_module_safetensors
    from robot_rl.ros.common import LATCHED_QOS
    from robot_rl.stages.success import FORMAT, SuccessClassifier

    drv, start, tmp = ros
    cfg = {"channels": [8], "num_keypoints": 4, "feature_dim": 8, "crop": None, "camera": "front", "threshold": 0.0,
           "image_shape": [48, 48, 3]}  # the camera's 64x64 frames are resized to it
    save_module_safetensors(SuccessClassifier(cfg), tmp / "clf", cfg, format_name=FORMAT)
    learner, port = start_learner(tmp / "learn")
    try:
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "seed": 9_300_000, "cameras": ["front"],
                                                "image_size": [64, 64]})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": 30,
                                           "server_timeout": 0.5, "autostart": True})
        start("robot_rl.ros.operator", {"episodes": 2, "reset_wait": 0.2, "success_classifier": str(tmp / "clf")})
        drv.subscribe(String, "/operator/status", LATCHED_QOS)
        status = lambda: json.loads(drv.last["/operator/status"][1].data) if "/operator/status" in drv.last else {}  # noqa: E731
        drv.wait_for(lambda: status().get("episodes", 0) >= 2, 120, "two episodes labelled by the classifier")
        counts = status()
        assert counts["successes"] == 2 and counts["classifier_successes"] == 2, counts
        store = tmp / "learn" / "episodes.zarr"
        drv.wait_for(lambda: store.exists() and ZarrStore.open(store).n_episodes == 2, 30, "both in the store")
        st = ZarrStore.open(store)
        assert [bool(m["success"]) for m in st.episodes_meta()] == [True, True]
        assert all(len(st.get_episode(i, keys=["reward"])["reward"]) < 30 for i in range(2))  # before the limit
    finally:
        stop_learner(learner)


def test_learner_killed_mid_episode_holds_and_a_resumed_learner_takes_over(ros):
    """SIGKILL the learner while the node runs an episode: the arm holds within one control period (+ the step
    deadline) and gets no further action; a learner restarted with --resume on the same port serves the node
    again (its session re-created), the running episode still reaches it, and the store keeps every episode.
    Killed again between episodes, the node keeps serving its last good weights: the next episode runs base + its
    copy of the learner's residual, offline (nothing sent)."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Empty, String
    from std_srvs.srv import Trigger

    from robot_rl.datasets.store import ZarrStore
    from robot_rl.ros.common import COMMAND_QOS, LATCHED_QOS

    drv, start, tmp = ros
    out = tmp / "learn"
    learner, port = start_learner(out, "--set", "td3.checkpoint_every=5")
    store = out / "episodes.zarr"
    try:
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "seed": 9_200_000})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": 12,
                                           "server_timeout": 0.1, "autostart": True, "checkpoint": str(FIXTURE)})
        drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
        drv.subscribe(Empty, "/arm_bridge/hold", COMMAND_QOS, keep=True)
        drv.subscribe(String, "/policy_node/episode_state", LATCHED_QOS, keep=True)
        state = lambda: json.loads(drv.log["/policy_node/episode_state"][-1][1].data)  # noqa: E731
        actions = lambda: drv.log.get("/arm_bridge/action", [])  # noqa: E731
        n_ep = lambda: ZarrStore.open(store).n_episodes if store.exists() else 0  # noqa: E731
        drv.wait_for(lambda: n_ep() == 1, 90, "the first episode in the store")
        first = ZarrStore.open(store).get_episode(0)
        assert drv.call(Trigger, "/sim_robot/reset").success
        assert drv.call(Trigger, "/policy_node/start_episode").success
        drv.wait_for(lambda: len(actions()) >= 12 + 4, 30, "actions of episode 2")
        t_kill = time.monotonic()
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        drv.wait_for(lambda: any(t > t_kill for t, _ in drv.log.get("/arm_bridge/hold", [])), 5, "hold")
        t_hold = min(t for t, _ in drv.log["/arm_bridge/hold"] if t > t_kill)
        # a period + the step deadline + delivery and scheduling (nodes on a loaded 2-core host: 0.1 s)
        assert t_hold - t_kill <= 0.1 + 0.1 + 0.1, t_hold - t_kill
        drv.spin(0.5)
        assert not [t for t, _ in actions() if t > t_kill + 0.01]
        n_before = len(actions())
        learner, _ = start_learner(out, "--resume", port=port)
        drv.wait_for(lambda: len(actions()) > n_before, 90, "actions from the resumed learner")
        drv.wait_for(lambda: n_ep() == 2, 60, "the interrupted episode, labelled at its time limit")
        again = ZarrStore.open(store).get_episode(0)
        assert all(np.array_equal(first[k], again[k], equal_nan=True) for k in first)
        # killed between episodes: the next episode runs the node's copy of the last weights, offline
        drv.wait_for(lambda: state()["state"] == "idle", 10, "the node idle after the time limit")
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        assert drv.call(Trigger, "/sim_robot/reset").success
        r = drv.call(Trigger, "/policy_node/start_episode")
        assert r.success and "OFFLINE" in r.message, r.message
        n_before = len(actions())
        drv.wait_for(lambda: state()["offline"] and state()["state"] == "idle", 30,
                     "the offline episode at its time limit")
        st = state()
        assert st["offline"] and st["label"] == "failure" and st["rows_sent"] == 0, st
        assert isinstance(st["residual_version"], int), st  # a copy of the resumed learner's residual
        assert len(actions()) - n_before >= 12  # its 12 steps reached the arm
        assert n_ep() == 2
    finally:
        stop_learner(learner)


def test_acting_locally_the_arm_keeps_moving_while_the_learner_is_frozen(ros):
    """acting:=local: the node runs each step on its copy of the learner's weights. SIGSTOP the learner a few steps
    into an episode: actions keep reaching the arm at the control rate (no hold: the loop never waits on the
    learner), the time limit ends the episode while the learner is still frozen, and once it runs again (SIGCONT)
    the episode reaches its store whole: every step, one residual version, the version the node reported.
    trigger_camera:=front paces the state policy by the camera's frames: each action carries the stamp of a frame
    (the joint states and poses of that tick came first), not of a 50 Hz pose sample between frames."""
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Empty, String

    from robot_rl.datasets.store import ZarrStore
    from robot_rl.ros.common import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, stamp_to_sec

    drv, start, tmp = ros
    out = tmp / "learn"
    learner, port = start_learner(out)
    store = out / "episodes.zarr"
    limit = 40
    try:
        start("robot_rl.hw_drivers.sim_robot", {"backend": "pybullet", "seed": 9_300_000, "cameras": ["front"],
                                                "image_size": [32, 32]})
        start("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands", "hardware_interpolates": True})
        frames = set()
        drv.node.create_subscription(Image, "/cameras/front/image_raw",
                                     lambda m: frames.add(round(stamp_to_sec(m.header.stamp), 6)), SENSOR_QOS)
        drv.subscribe(JointState, "/arm_bridge/action", COMMAND_QOS, keep=True)
        drv.subscribe(Empty, "/arm_bridge/hold", COMMAND_QOS, keep=True)
        drv.subscribe(String, "/policy_node/episode_state", LATCHED_QOS, keep=True)
        start("robot_rl.ros.policy_node", {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": limit,
                                           "server_timeout": 0.1, "autostart": True, "checkpoint": str(FIXTURE),
                                           "acting": "local", "trigger_camera": "front"})
        actions = lambda: drv.log.get("/arm_bridge/action", [])  # noqa: E731
        drv.wait_for(lambda: len(actions()) >= 3, 90, "the first actions")
        t_stop = time.monotonic()
        learner.send_signal(signal.SIGSTOP)
        try:
            drv.spin(2.0)
            during = [t for t, _ in actions() if t > t_stop]
            assert len(during) >= 12, len(during)  # ~20 at 10 Hz: the loop did not wait on the learner
            assert not [t for t, _ in drv.log.get("/arm_bridge/hold", []) if t > t_stop]
            drv.wait_for(lambda: json.loads(drv.log["/policy_node/episode_state"][-1][1].data)["steps"] >= limit
                         or len(actions()) >= limit, 10, "the time limit")
        finally:
            learner.send_signal(signal.SIGCONT)
        drv.wait_for(lambda: store.exists() and ZarrStore.open(store).n_episodes == 1, 30,
                     "the episode in the store once the learner runs again")
        st = json.loads(drv.log["/policy_node/episode_state"][-1][1].data)
        e = ZarrStore.open(store).get_episode(0, keys=["reward", "residual_version", "intervention"])
        assert len(e["reward"]) == limit and e["reward"].sum() == 0 and not e["intervention"].any()
        assert set(e["residual_version"].tolist()) == {st["residual_version"]}, (e["residual_version"], st)
        stamps = [round(stamp_to_sec(m.header.stamp), 6) for _, m in actions()]
        assert sum(t in frames for t in stamps) >= 0.9 * len(stamps), (stamps[:10], sorted(frames)[:10])
    finally:
        out_text = stop_learner(learner)
        print("learner output:\n" + out_text[-3000:])
        for f in sorted(tmp.glob("*.log")):
            print(f"{f.name}:\n{f.read_text()[-2000:]}")


def test_keyboard_episode_keys_call_the_learning_nodes_services(ros):
    """teleop with keyboard:=true on a terminal and label_node:=policy_node: 1 / 2 / 0 / Enter call the node's
    ~/mark_success, ~/mark_failure, ~/discard_episode and ~/start_episode (this driver serves them)."""
    import os
    import pty

    from std_srvs.srv import Trigger

    from ros_helpers import ros_env

    drv, start, tmp = ros
    called = []

    def serve(name):
        def cb(req, res):
            called.append(name)
            res.success, res.message = True, f"{name} done"
            return res
        drv.node.create_service(Trigger, f"/policy_node/{name}", cb)

    for name in ("mark_success", "mark_failure", "discard_episode", "start_episode"):
        serve(name)
    master, slave = pty.openpty()  # the node reads keys only from a terminal
    p = subprocess.Popen([sys.executable, "-m", "robot_rl.hw_drivers.teleop", "--ros-args", "-p", "keyboard:=true",
                          "-p", "label_node:=policy_node"], stdin=slave, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ros_env(drv.domain))
    try:
        for key, name in (("1", "mark_success"), ("2", "mark_failure"), ("0", "discard_episode"),
                          ("\r", "start_episode")):
            end = time.monotonic() + 60
            while name not in called:  # until the node's clients have discovered the services
                assert time.monotonic() < end, f"{key!r} never called {name}"
                os.write(master, key.encode())
                drv.spin(0.5)
        # each key called its own service, in order (a key re-sent while the first call was in flight may repeat it)
        assert list(dict.fromkeys(called)) == ["mark_success", "mark_failure", "discard_episode", "start_episode"]
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
        os.close(master)
        os.close(slave)
