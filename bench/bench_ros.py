"""ROS 2 layer benchmarks (every node its own process, Fast DDS on localhost, a random ROS domain).

``latency``: sim_robot (one 96x96 ``front`` camera at 10 Hz) + arm_bridge + policy_node (in-process image policy,
10 Hz) for ``--seconds``. Reports observation -> command latency (oldest input's stamp -> the bridge publishing the
joint command, from the bridge's ``~/latency`` topic) p50/p99, the policy node's loop time, observation age and
deadline misses; reference in the same run: the in-process cost of one policy step on the same observation
(``CombinedPolicy.act``) and the control period (100 ms).

The camera's own share is reported beside it: the age of each frame when the bench process receives it
(``camera_frame_age_at_receipt``: the simulator's render time after the stamp plus DDS transport); the policy stack's
part is the difference.

``latency --learn``: the same while the residual learns on the robot (docs/ROS2.md, "Learning on the robot"):
``robot-rl learn`` (TD3 with its default ensemble, 10 Q heads of 256x256, UTD ``--utd``) serves the state base
``--checkpoint`` + its residual, the policy node acts through it with ``learn:=true``, and the scripted operator
resets and labels episodes so that transitions flow and the learner updates and pushes weights during the whole
measured window (its updates, weight versions and env steps in that window are reported). Every process runs at
``--nice`` (default 19, as in the tests; the learner's updating thread lowers itself further,
``robot_rl.serve.learner.yield_cpu_to_serving``); learner and nodes share this host's cores, unless
``--learner-cpus`` / ``--node-cpus`` pin them to CPU lists (``taskset -c``), as a robot PC gives its control path
cores of its own; ``--learner-nice`` gives the learner a level of its own. ``--acting local`` (default) has the
node act on its own copy of the learner's weights (``acting:=local``), ``--acting learner`` with a round trip to
the learner per step; ``--trigger-camera front`` paces the node's loop by the camera's frames instead of a timer.

``success``: ``--episodes`` episodes of ``place`` on sim_robot with ``--backend`` (default pybullet) driven by the
policy node with ``--checkpoint`` (trained in MuJoCo), over ROS; reference in the same run: the in-process
``robot_rl.stages.evaluation.evaluate`` on the same backend and seeds. A camera policy (a ``robot-rl distill``
student) gets the cameras and image size it was trained with from sim_robot; the topics the policy node subscribes
to are reported (``pose_topics_subscribed``: none for a student).

    python bench/bench_ros.py latency --seconds 30
    python bench/bench_ros.py latency --learn --seconds 60
    python bench/bench_ros.py latency --learn --seconds 60 --learner-cpus 1 --node-cpus 0
    python bench/bench_ros.py latency --learn --seconds 60 --nice 0 --learner-nice 19 --trigger-camera front
    python bench/bench_ros.py success --checkpoint runs/place3mm_bc/base/checkpoint --episodes 20
    python bench/bench_ros.py success --checkpoint runs/distill/student_round1/checkpoint --interface trajectory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ros_helpers import Driver, NodeProcess, new_domain, ros_env  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "place_bc_mujoco"


def diag_sink(drv):
    from diagnostic_msgs.msg import DiagnosticArray

    from robot_rl.ros.common import COMMAND_QOS

    diags = {}
    drv.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.update(
        {s.name: {kv.key: kv.value for kv in s.values} for s in m.status}), COMMAND_QOS)
    return diags


def bench_latency(a):
    import torch
    from std_msgs.msg import Float64

    from robot_rl.envs.env import make_env
    from robot_rl.stages.evaluation import CombinedPolicy
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.ros.common import COMMAND_QOS
    from test_ros_faults import image_policy

    tmp = Path(tempfile.mkdtemp())
    ck = Path(a.checkpoint) if a.checkpoint else FIXTURE if a.learn else image_policy(tmp)
    # reference: one in-process policy step on a real observation
    torch.set_num_threads(1)
    pol = load_policy(ck)
    env = make_env("place", a.backend, cameras=("front",))
    obs, _ = env.reset(seed=0)
    b = {k: v[None] for k, v in obs.items()}
    cp = CombinedPolicy(pol, None, 1)
    cp.reset(np.array([True]), b)
    ref = []
    for _ in range(50):
        cp.drop_chunks()  # every step a new chunk: the worst case
        t0 = time.perf_counter()
        cp.act(b)
        ref.append((time.perf_counter() - t0) * 1e3)
    env.close()
    d = new_domain()
    envv = ros_env(d)
    learner = None
    if a.learn:  # the policy node acts through a learning `robot-rl learn`, the operator keeps episodes going
        from test_ros_learn import start_learner

        learner, port = start_learner(tmp / "learn", "--set", f"td3.utd_ratio={a.utd}", "--set",
                                      "td3.learning_starts=200", "--set", "td3.critic_warmup_updates=20",
                                      "--set", "td3.push_every=10", base=ck, tiny=False,
                                      nice=a.nice if a.learner_nice is None else a.learner_nice,
                                      cpus=a.learner_cpus, idle=a.learner_idle)
        node = {"server": f"127.0.0.1:{port}", "learn": True, "episode_steps": 100, "server_timeout": 0.05,
                "autostart": True, "acting": a.acting, "checkpoint": str(ck), "trigger_camera": a.trigger_camera}
    else:
        node = {"checkpoint": str(ck), "autostart": True, "trigger_camera": a.trigger_camera}
    procs = [NodeProcess("robot_rl.hw_drivers.sim_robot", {"backend": a.backend, "cameras": ["front"],
                                                            "image_size": [96, 96], "seed": 0}, tmp, envv, nice=a.nice,
                         cpus=a.node_cpus),
             NodeProcess("robot_rl.hw_drivers.arm_bridge", {"command_interface": "commands",
                                                            "hardware_interpolates": True}, tmp, envv, nice=a.nice,
                         cpus=a.node_cpus),
             NodeProcess("robot_rl.ros.policy_node", node, tmp, envv, nice=a.nice, cpus=a.node_cpus)]
    if a.learn:
        procs.append(NodeProcess("robot_rl.ros.operator", {}, tmp, envv, nice=a.nice, cpus=a.node_cpus))
    drv = Driver(d)
    diags = diag_sink(drv)
    drv.subscribe(Float64, "/arm_bridge/latency", COMMAND_QOS, keep=True)
    # the camera's share: how old each frame already is when a third process receives it (render + transport)
    from sensor_msgs.msg import Image

    from robot_rl.ros.common import SENSOR_QOS, stamp_to_sec
    frame_age = []
    drv.node.create_subscription(Image, "/cameras/front/image_raw",
                                 lambda m: frame_age.append(time.time() - stamp_to_sec(m.header.stamp)), SENSOR_QOS)
    try:
        drv.wait_for(lambda: len(drv.log.get("/arm_bridge/latency", [])) > 5, 120, "commands")
        if a.learn:  # past the learner's 200 warm-up steps: it updates from here on
            drv.spin(25.0)
        del frame_age[:]
        n0 = len(drv.log["/arm_bridge/latency"])
        t_start = time.time()
        drv.spin(a.seconds)
        t_end = time.time()
        drv.spin(1.2)
    finally:
        for p in reversed(procs):
            p.stop()
        drv.close()
        if learner is not None:
            from test_ros_learn import stop_learner

            learner_out = stop_learner(learner)
    learning = {}
    if a.learn:
        curve = json.loads((tmp / "learn" / "learning_curve.json").read_text())
        before = [r for r in curve if r["unix_time"] <= t_start] or [{"updates": 0, "weight_version": 0,
                                                                        "env_steps": 0}]
        during = [r for r in curve if t_start < r["unix_time"] <= t_end]
        if not during:
            raise SystemExit(f"no learner curve row inside the measured window: {learner_out[-3000:]}")
        a0, a1 = before[-1], during[-1]
        learning = {"learner_returncode": learner.returncode, "utd_ratio": a.utd,
                    "learner_updates_in_window": a1["updates"] - a0["updates"],
                    "weight_versions_pushed_in_window": a1["weight_version"] - a0["weight_version"],
                    "env_steps_learned_in_window": a1["env_steps"] - a0["env_steps"],
                    "window_s_between_those_rows": a1["unix_time"] - before[-1].get("unix_time", t_start)}
        if learner.returncode:
            print(learner_out[-3000:], file=sys.stderr)
    lat = np.array([m.data for _, m in drv.log["/arm_bridge/latency"][n0:]]) * 1e3
    pn = diags.get("policy_node: control loop", {})
    r = {"commands": int(lat.size), "obs_to_command_ms_p50": float(np.percentile(lat, 50)),
         "obs_to_command_ms_p99": float(np.percentile(lat, 99)), "obs_to_command_ms_max": float(lat.max()),
         "policy_loop_ms_p50": float(pn.get("loop_ms_p50", "nan")), "policy_loop_ms_p99": float(pn.get("loop_ms_p99",
                                                                                                       "nan")),
         "obs_age_ms_p50": float(pn.get("obs_age_ms_p50", "nan")),
         "camera_frame_age_at_receipt_ms_p50": float(np.percentile(np.array(frame_age) * 1e3, 50)),
         "camera_frame_age_at_receipt_ms_p99": float(np.percentile(np.array(frame_age) * 1e3, 99)),
         "deadline_misses": int(pn.get("deadline_misses", 0)), "policy_steps": int(pn.get("steps", 0)),
         "holds": int(pn.get("holds", 0)), "stale_holds": int(pn.get("stale", 0)),
         "sim": diags.get("sim_robot: simulation", {}),
         "reference_in_process_step_ms_p50": float(np.median(ref)), "control_period_ms": 100.0, "nice": a.nice,
         "learner_cpus": a.learner_cpus, "node_cpus": a.node_cpus, "learner_nice": a.learner_nice,
         "learner_idle": a.learner_idle,
         "trigger_camera": a.trigger_camera, **({"acting": a.acting} if a.learn else {}),
         "backend": a.backend, **learning}
    r["ratio_p50_latency_to_in_process_step"] = r["obs_to_command_ms_p50"] / r["reference_in_process_step_ms_p50"]
    r["ratio_p99_latency_to_period"] = r["obs_to_command_ms_p99"] / 100.0
    print(json.dumps(r, indent=1))


def bench_success(a):
    from std_msgs.msg import Bool
    from std_srvs.srv import Trigger

    from robot_rl.stages.evaluation import evaluate
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.ros.common import COMMAND_QOS

    seeds = list(range(a.seed_start, a.seed_start + a.episodes))
    pol = load_policy(a.checkpoint)
    ref = evaluate(pol, "place", n_episodes=a.episodes, seed_start=a.seed_start, n_envs=1,
                   env_kwargs={"backend": a.backend}, progress=False)
    # a camera policy (e.g. robot-rl distill's student): sim_robot publishes the cameras it was trained with
    cams = {"cameras": [k.removeprefix("image_") for k in pol.config.image_keys],
            "image_size": [int(v) for v in pol.config.image_shape[:2]]} if pol.config.image_keys else {}
    tmp = Path(tempfile.mkdtemp())
    d = new_domain()
    env = ros_env(d)
    clock = {"use_sim_time": True} if a.rtf != 1.0 else {}
    procs = [NodeProcess("robot_rl.hw_drivers.sim_robot", {"backend": a.backend, "publish_clock": bool(clock),
                                                            "real_time_factor": a.rtf, **cams}, tmp, env),
             NodeProcess("robot_rl.hw_drivers.arm_bridge", {**clock, "command_interface": a.interface,
                                                            "hardware_interpolates": a.interface == "commands",
                                                            "trajectory_mode": a.trajectory_mode,
                                                            "trajectory_lead": a.lead,
                                                            "acceleration_scale": a.acceleration_scale}, tmp, env),
             NodeProcess("robot_rl.ros.policy_node", {**clock, "checkpoint": a.checkpoint,
                                                             "execution": a.execution}, tmp, env)]
    drv = Driver(d)
    diags = diag_sink(drv)
    drv.subscribe(Bool, "/sim/privileged/success", COMMAND_QOS)
    res = []
    try:
        assert drv.lifecycle("policy_node", "configure", 90)
        drv.spin(1.0)
        subscribed = sorted(dict(drv.node.get_subscriber_names_and_types_by_node("policy_node", "/")))
        print(f"policy_node subscribes to {subscribed}", flush=True)
        for s in seeds:
            drv.set_params("sim_robot", seed=s)
            drv.call(Trigger, "/sim_robot/reset")
            drv.spin(0.2)
            t0 = time.monotonic()
            drv.lifecycle("policy_node", "activate")
            ok = False
            while time.monotonic() - t0 < a.max_seconds / a.rtf:
                drv.spin(0.1)
                m = drv.last.get("/sim/privileged/success")
                if m and m[0] > t0 + 0.3 and m[1].data:
                    ok = True
                    break
            drv.lifecycle("policy_node", "deactivate")
            res.append(ok)
            print(f"seed {s}: {'success' if ok else 'fail'} ({time.monotonic() - t0:.1f} s)", flush=True)
        drv.spin(1.2)
    finally:
        for p in reversed(procs):
            p.stop()
        drv.close()
    from robot_rl.stages.evaluation import wilson_interval

    k = sum(res)
    out = {"backend": a.backend, "interface": a.interface, "trajectory_mode": a.trajectory_mode, "lead": a.lead,
           "acceleration_scale": a.acceleration_scale,
           "execution": a.execution, **cams, "policy_node_subscriptions": subscribed,
           "pose_topics_subscribed": [t for t in subscribed if t.startswith("/sim/privileged")],
           "episodes": len(res), "ros_successes": k,
           "ros_success_rate": k / len(res), "ros_ci95": wilson_interval(k, len(res)),
           "reference_in_process_successes": ref["successes"],
           "reference_in_process_rate": ref["success_rate"],
           "ratio_ros_to_in_process": (k / len(res)) / max(ref["success_rate"], 1e-9),
           "per_seed_ros": [int(x) for x in res], "per_seed_in_process": [int(r["success"]) for r in ref["per_episode"]],
           "bridge": diags.get("arm_bridge: commands", {})}
    print(json.dumps(out, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    lt = sub.add_parser("latency")
    lt.add_argument("--seconds", type=float, default=30.0)
    lt.add_argument("--backend", default="mujoco")
    lt.add_argument("--checkpoint", default="", help="image policy (default: a tiny untrained one); with --learn a "
                    "state base (default: tests/fixtures/place_bc_mujoco)")
    lt.add_argument("--learn", action="store_true", help="the policy node acts through a learning `robot-rl learn`")
    lt.add_argument("--utd", type=float, default=0.5, help="--learn: the learner's UTD ratio")
    lt.add_argument("--learner-cpus", default=None, help="--learn: CPU list the learner runs on (taskset -c), e.g. 1")
    lt.add_argument("--node-cpus", default=None, help="CPU list the nodes run on (taskset -c), e.g. 0")
    lt.add_argument("--nice", type=int, default=19, help="nice level of every process started (the learner's "
                    "updates run UPDATE_THREAD_NICE lower still)")
    lt.add_argument("--learner-nice", type=int, default=None, help="--learn: the learner's nice level (default "
                    "--nice), e.g. 19 with --nice 0: the control path first, as a robot PC would set it")
    lt.add_argument("--learner-idle", action="store_true", help="--learn: the learner under the SCHED_IDLE policy "
                    "(chrt -i 0): it runs only on CPU time no other process wants")
    lt.add_argument("--acting", default="local", choices=["local", "learner"], help="--learn: the policy node's "
                    "acting (local: base + its copy of the residual in the node; learner: a round trip per step)")
    lt.add_argument("--trigger-camera", default="", help="the camera whose frames pace the node's loop (e.g. "
                    "front; '' = the policy's camera, a 10 Hz timer for a state policy)")
    sc = sub.add_parser("success")
    sc.add_argument("--checkpoint", default=str(FIXTURE))
    sc.add_argument("--backend", default="pybullet")
    sc.add_argument("--interface", default="commands", choices=["commands", "trajectory"])
    sc.add_argument("--trajectory-mode", default="chunk", choices=["chunk", "point"],
                    help="trajectory interface: multi-point with velocities from the chunk, or one position point")
    sc.add_argument("--lead", type=float, default=0.03, help="arm_bridge trajectory_lead [s]")
    sc.add_argument("--acceleration-scale", type=float, default=0.5, help="arm_bridge acceleration_scale")
    sc.add_argument("--execution", default="step", choices=["step", "async"],
                    help="policy node execution (async: in-process via an embedded server, temporal ensembling)")
    sc.add_argument("--episodes", type=int, default=20)
    sc.add_argument("--seed-start", type=int, default=1_000_001)
    sc.add_argument("--max-seconds", type=float, default=12.0, help="per episode, simulated")
    sc.add_argument("--rtf", type=float, default=1.0, help="real-time factor (!= 1 uses /clock + use_sim_time)")
    a = p.parse_args()
    bench_latency(a) if a.mode == "latency" else bench_success(a)


if __name__ == "__main__":
    main()
