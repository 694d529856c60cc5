"""Env control steps/s (state observations, one process) vs the raw MuJoCo physics limit at the same control rate.

The reference is `mujoco.mj_step(model, data, nstep=n_substeps)` on the very same compiled model with fixed
controls: physics only, no IK, no observation. Goal: ratio >= 0.7.

    python bench/bench_env.py [--task place] [--steps 2000]
"""

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np

from robot_rl.envs import make_env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="place")
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args()
    env = make_env(a.task)
    rng = np.random.default_rng(0)
    acts = rng.uniform(-0.3, 0.3, size=(a.steps, 5)).astype(np.float32)

    env.reset(seed=0)
    t = time.perf_counter()
    for i in range(a.steps):
        _, _, term, trunc, _ = env.step(acts[i])
        if term or trunc:
            env.reset(seed=i)
    env_rate = a.steps / (time.perf_counter() - t)

    m, d = env.backend.model, env.backend.data
    env.reset(seed=0)
    n_sub = env.scene.n_substeps
    t = time.perf_counter()
    for _ in range(a.steps):
        mujoco.mj_step(m, d, nstep=n_sub)
    raw_rate = a.steps / (time.perf_counter() - t)

    # where the Python-side time goes
    q = env.backend.joint_state()[0]
    t = time.perf_counter()
    for i in range(500):
        env.controller.compute(q, acts[i])
    ik_us = (time.perf_counter() - t) / 500 * 1e6
    t = time.perf_counter()
    for _ in range(500):
        env._obs()
    obs_us = (time.perf_counter() - t) / 500 * 1e6

    print(f"control rate {1 / env.scene.control_dt:.0f} Hz, physics dt {env.scene.physics_dt * 1e3:.1f} ms "
          f"({n_sub} substeps per control step)")
    print(f"raw MuJoCo physics limit : {raw_rate:8.0f} control steps/s")
    print(f"robot_rl env (state obs) : {env_rate:8.0f} control steps/s")
    print(f"ratio env / raw          : {env_rate / raw_rate:8.2f}   (goal >= 0.70)")
    print(f"  per step: IK {ik_us:.0f} us, observation {obs_us:.0f} us, physics {1e6 / raw_rate:.0f} us")


if __name__ == "__main__":
    main()
