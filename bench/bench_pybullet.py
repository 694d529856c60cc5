"""PyBullet twin vs MuJoCo, all figures measured in the same run.

(a) throughput: PyBullet env control steps/s (state obs, one process) vs PyBullet's raw physics limit at the same
    control rate (``stepSimulation`` x substeps with fixed motor targets and constant gravity torques, i.e. the
    solver load the env sees, nothing else; also shown without the torques) and vs the MuJoCo env;
(b) scripted-expert success on both backends over N seeds (``place`` at its default 1 cm tolerance, and ``lift``)
    with 95 % Wilson intervals;
(c) parity: tool-trajectory RMS distance for the same free-space joint-target sequence, and the cube's pixel
    centroid difference at 96x96 for the same state (front camera over seeds; wrist camera with the cube in view),
    and the time of one 96x96 render on each backend (PyBullet also with every visual mesh, the reference);
(d) where contact physics differs: gripper opening while holding the cube, cube height when resting, final
    placement error, cube slip in the hand while carrying, episode length.

    python bench/bench_pybullet.py [--seeds 100] [--steps 1000] [--no-lift] [--noise 0.3 --only-expert]
"""

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pybullet as p  # noqa: E402

from robot_rl.sim import make_backend  # noqa: E402
from robot_rl.envs.env import make_env  # noqa: E402
from robot_rl.stages.evaluation import wilson_interval  # noqa: E402
from robot_rl.envs.experts import ScriptedExpert  # noqa: E402
from parity import cube_centroid_difference, free_space_parity, scene_for  # noqa: E402
from robot_rl.envs.tasks import CUBE, make_task  # noqa: E402


def env_rate(env, steps: int) -> float:
    """Control steps/s of ``env.step`` with small random actions (the rare resets are included)."""
    acts = np.random.default_rng(0).uniform(-0.3, 0.3, size=(steps, 5)).astype(np.float32)
    env.reset(seed=0)
    t = time.perf_counter()
    for i in range(steps):
        _, _, term, trunc, _ = env.step(acts[i])
        if term or trunc:
            env.reset(seed=i)
    return steps / (time.perf_counter() - t)


def throughput(steps: int) -> None:
    eb, em = make_env("place", backend="pybullet"), make_env("place", backend="mujoco")
    pb_rate, mj_rate = env_rate(eb, steps), env_rate(em, steps)
    b, n_sub = eb.backend, eb.scene.n_substeps
    eb.reset(seed=0)
    t = time.perf_counter()
    for _ in range(steps):
        for _ in range(n_sub):
            p.stepSimulation(physicsClientId=b.cid)
    raw = steps / (time.perf_counter() - t)
    # the same with the arm's weight taken off the motors by constant torques (the solver load the env sees)
    eb.reset(seed=0)
    g = b._gravity_torques()
    t = time.perf_counter()
    for _ in range(steps):
        for _ in range(n_sub):
            p.setJointMotorControlArray(b.robot, b._movable, p.TORQUE_CONTROL, forces=g, physicsClientId=b.cid)
            p.stepSimulation(physicsClientId=b.cid)
    raw_g = steps / (time.perf_counter() - t)
    eb.reset(seed=0)
    t = time.perf_counter()
    for _ in range(steps):
        b.step()
    backend_rate = steps / (time.perf_counter() - t)
    q = b.joint_state()[0]
    t = time.perf_counter()
    for i in range(300):
        eb.controller.compute(q, np.full(5, 0.1))
    ik_us = (time.perf_counter() - t) / 300 * 1e6
    t = time.perf_counter()
    for _ in range(300):
        eb.observe()
    obs_us = (time.perf_counter() - t) / 300 * 1e6
    print(f"(a) throughput, control {1 / eb.scene.control_dt:.0f} Hz, physics dt {eb.scene.physics_dt * 1e3:.1f} ms "
          f"({n_sub} substeps per control step), {steps} steps each")
    print(f"    raw PyBullet stepSimulation x {n_sub}                    : {raw:8.0f} control steps/s")
    print(f"    raw PyBullet stepSimulation x {n_sub}, constant g torques : {raw_g:8.0f} control steps/s  (reference)")
    print(f"    PyBullet backend.step (g(q) recomputed every substep)  : {backend_rate:8.0f} control steps/s")
    print(f"    robot_rl env, PyBullet (state obs)                     : {pb_rate:8.0f} control steps/s")
    print(f"    robot_rl env, MuJoCo   (state obs)                     : {mj_rate:8.0f} control steps/s")
    print(f"    ratio PyBullet env / raw PyBullet (reference) : {pb_rate / raw_g:6.2f}")
    print(f"    ratio PyBullet env / MuJoCo env               : {pb_rate / mj_rate:6.2f}")
    print(f"    per PyBullet env step: IK {ik_us:.0f} us, observation {obs_us:.0f} us, "
          f"backend.step {1e6 / backend_rate:.0f} us")
    eb.close()
    em.close()


def expert_episodes(task: str, backend: str, seeds, noise: float = 0.0) -> dict:
    """Run the scripted expert (action noise std ``noise``); collect success and contact-physics figures."""
    env = make_env(task, backend=backend)
    wins, lengths, widths, rest_dz, place_err, slip = 0, [], [], [], [], []
    t0 = time.perf_counter()
    for s in seeds:
        obs, _ = env.reset(seed=s)
        ex = ScriptedExpert(task, noise=noise, seed=s)
        carry = []
        while True:
            obs, _, term, trunc, info = env.step(ex.act(obs))
            if ex.phase in ("lift", "transport") and obs["cube_pos"][2] > CUBE.half_size[2] + 0.02:
                widths.append(float(obs["gripper_width"][0]))
                carry.append(obs["cube_pos"] - obs["ee_pos"])
            if term or trunc:
                break
        wins += bool(info["success"])
        lengths.append(info["t"])
        if len(carry) > 1:  # displacement of the cube relative to the tool centre over the carry
            slip.append(float(np.linalg.norm(carry[-1] - carry[0])))
        if task == "place" and info["success"]:
            rest_dz.append(float(obs["cube_pos"][2] - CUBE.half_size[2]))
            place_err.append(float(np.linalg.norm(obs["cube_pos"][:2] - obs["target_pos"][:2])))
    env.close()
    return {"wins": wins, "n": len(seeds), "len": np.mean(lengths), "width": np.mean(widths) if widths else np.nan,
            "rest_dz": np.mean(rest_dz) if rest_dz else np.nan, "place_err": np.array(place_err),
            "slip": np.array(slip), "sec": time.perf_counter() - t0}


def success_and_contacts(n: int, with_lift: bool, noise: float) -> None:
    tasks = ["place", "lift"] if with_lift else ["place"]
    print(f"(b) scripted expert (noise {noise}), seeds 0..{n - 1}, 95 % Wilson intervals")
    res = {}
    for task in tasks:
        for be in ("mujoco", "pybullet"):
            r = expert_episodes(task, be, range(n), noise)
            res[task, be] = r
            lo, hi = wilson_interval(r["wins"], r["n"])
            print(f"    {task:5s} {be:8s}: {r['wins']:4d}/{r['n']} = {r['wins'] / r['n']:.3f} [{lo:.3f}, {hi:.3f}]"
                  f"   mean length {r['len']:.1f} steps, {r['sec']:.0f} s")
    print("(d) contact physics (successful place episodes / carrying phase)")
    for be in ("mujoco", "pybullet"):
        r = res["place", be]
        e = r["place_err"] * 1e3
        print(f"    {be:8s}: gripper width holding the 40 mm cube {r['width'] * 1e3:6.2f} mm | "
              f"resting cube centre - 20 mm {r['rest_dz'] * 1e3:+6.2f} mm | "
              f"final xy error mean {e.mean():.2f} / p95 {np.percentile(e, 95):.2f} / max {e.max():.2f} mm | "
              f"cube slip in hand while carrying mean {r['slip'].mean() * 1e3:.2f} / "
              f"max {r['slip'].max() * 1e3:.2f} mm")


def parity() -> None:
    task = make_task("place")
    sc = scene_for(task)
    a, b = make_backend("mujoco", sc), make_backend("pybullet", sc)
    print("(c) parity, MuJoCo vs PyBullet")
    rms = []
    for seed in range(4):
        r = free_space_parity(a, b, 200, seed)
        rms.append(r["rms_m"])
        print(f"    free-space joint targets, seed {seed}, 200 control steps: tool RMS {r['rms_m'] * 1e3:.2f} mm, "
              f"max {r['max_m'] * 1e3:.2f} mm (goal RMS <= 5 mm)")
    a.close()
    b.close()
    em, eb = make_env("place", backend="mujoco"), make_env("place", backend="pybullet")
    front, wrist = [], []
    for seed in range(10):
        em.reset(seed=seed)
        obs, _ = eb.reset(seed=seed)
        front.append(cube_centroid_difference(em.backend, eb.backend, "front")["diff_px"])
        ee = obs["ee_pos"]
        for e in (em, eb):  # cube in the middle of the wrist view
            e.backend.set_object_pose("cube", np.array([ee[0] + 0.03, ee[1] - 0.01, CUBE.half_size[2]]),
                                      np.array([0.0, 0.0, np.sin(0.1 * seed), np.cos(0.1 * seed)]))
        wrist.append(cube_centroid_difference(em.backend, eb.backend, "wrist")["diff_px"])
    front, wrist = np.array(front), np.array(wrist)
    print(f"    cube pixel centroid difference at 96x96, 10 states: front mean {front.mean():.2f} / max "
          f"{front.max():.2f} px; wrist mean {wrist.mean():.2f} / max {wrist.max():.2f} px (goal <= 3 px)")
    # render cost: TinyRenderer is per triangle, so the arm links are drawn with their collision meshes
    full_sc = replace(sc, robot=replace(sc.robot, proxy_visual_links=()))
    ref = make_backend("pybullet", full_sc)
    ms = {name: render_ms(be) for name, be in (("pb", eb.backend), ("pb_full", ref), ("mj", em.backend))}
    print(f"    front camera 96x96 render: PyBullet {ms['pb']:.1f} ms (arm links 1-6 as collision meshes) vs "
          f"{ms['pb_full']:.1f} ms with every visual mesh (ratio {ms['pb'] / ms['pb_full']:.2f}); "
          f"MuJoCo {ms['mj']:.1f} ms")
    ref.close()
    em.close()
    eb.close()


def render_ms(backend, camera: str = "front", n: int = 30) -> float:
    """Median wall time [ms] of one 96x96 render of ``camera`` (after 3 warm-up renders)."""
    for _ in range(3):
        backend.render(camera, 96, 96)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.render(camera, 96, 96)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100, help="expert episodes per task and backend")
    ap.add_argument("--steps", type=int, default=1000, help="control steps per throughput measurement")
    ap.add_argument("--no-lift", action="store_true", help="only measure the place task in (b)")
    ap.add_argument("--noise", type=float, default=0.0, help="expert action noise std (robot-rl collect uses 0.3)")
    ap.add_argument("--only-expert", action="store_true", help="skip (a) and (c)")
    a = ap.parse_args()
    if not a.only_expert:
        throughput(a.steps)
        parity()
    success_and_contacts(a.seeds, not a.no_lift, a.noise)


if __name__ == "__main__":
    main()
