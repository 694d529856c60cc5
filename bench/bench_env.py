"""Env control steps/s (state observations, one process) vs the raw MuJoCo physics limit at the same control rate.

The reference is ``mujoco.mj_step(model, data, nstep=n_substeps)`` on the very same compiled model, started from
the very same states the env visited, controls included (the block is replayed untimed recording
``mj_getState`` right before each ``mj_step``; each is restored with ``mj_setState`` and only ``mj_step`` is timed): physics only, no IK, no
observation, the same contacts. Env and reference run in alternating blocks and the ratio is the median over the
blocks, so that the speed drift of a shared (virtual) machine hits both sides alike. Goal: ratio >= 0.7.

    python bench/bench_env.py [--task place] [--blocks 8] [--block-steps 250]
"""

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np

from robot_rl.envs.env import make_env


def env_block(env, acts, seed0):
    """Step the env through ``acts`` (resets, untimed, where an episode ends); returns the stepping wall seconds."""
    wall = 0.0
    for i, a in enumerate(acts):
        t = time.perf_counter()
        _, _, term, trunc, _ = env.step(a)
        wall += time.perf_counter() - t
        if term or trunc:
            env.reset(seed=seed0 + i)
    return wall


def physics_states(env, acts, seed0, spec):
    """Replay the block (deterministic) recording the state right before each ``mj_step``, controls included."""
    m, d, backend = env.backend.model, env.backend.data, env.backend
    states = []

    def recording_step():
        s = np.empty(mujoco.mj_stateSize(m, spec))
        mujoco.mj_getState(m, d, s, spec)
        states.append(s)
        type(backend).step(backend)

    backend.step = recording_step
    try:
        env_block(env, acts, seed0)
    finally:
        del backend.step
    return states


def raw_block(env, states, spec):
    """Time ``mj_step(nstep=n_substeps)`` from each recorded state (setState untimed)."""
    m, d, n_sub = env.backend.model, env.backend.data, env.scene.n_substeps
    wall = 0.0
    for s in states:
        mujoco.mj_setState(m, d, s, spec)
        t = time.perf_counter()
        mujoco.mj_step(m, d, nstep=n_sub)
        wall += time.perf_counter() - t
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="place")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-steps", type=int, default=250)
    a = ap.parse_args()
    env = make_env(a.task)
    rng = np.random.default_rng(0)
    spec = mujoco.mjtState.mjSTATE_INTEGRATION  # qpos, qvel, act, ctrl, mocap, ... : everything mj_step reads
    env.reset(seed=0)
    env_block(env, rng.uniform(-0.3, 0.3, size=(50, 5)).astype(np.float32), 10_000)  # warm-up
    env_rates, raw_rates, ratios = [], [], []
    for b in range(a.blocks):
        acts = rng.uniform(-0.3, 0.3, size=(a.block_steps, 5)).astype(np.float32)
        seed0, snapshot = 1000 * (b + 1), env.get_state()
        env_s = env_block(env, acts, seed0)
        env.set_state(snapshot)
        states = physics_states(env, acts, seed0, spec)  # ends where the timed block ended: the next block goes on
        raw_s = raw_block(env, states, spec)
        env.set_state(snapshot)
        env_block(env, acts, seed0)
        env_rates.append(a.block_steps / env_s)
        raw_rates.append(len(states) / raw_s)
        ratios.append(env_rates[-1] / raw_rates[-1])

    # where the Python-side time goes
    q = env.backend.joint_state()[0]
    t = time.perf_counter()
    for i in range(500):
        env.controller.compute(q, acts[i % len(acts)])
    ik_us = (time.perf_counter() - t) / 500 * 1e6
    t = time.perf_counter()
    for _ in range(500):
        env.observe()
    obs_us = (time.perf_counter() - t) / 500 * 1e6

    med = float(np.median(ratios))
    print(f"control rate {1 / env.scene.control_dt:.0f} Hz, physics dt {env.scene.physics_dt * 1e3:.1f} ms "
          f"({env.scene.n_substeps} substeps per control step); {a.blocks} alternating blocks of {a.block_steps} steps")
    print(f"raw MuJoCo physics limit : {np.median(raw_rates):8.0f} control steps/s (median; blocks "
          f"{min(raw_rates):.0f}-{max(raw_rates):.0f})")
    print(f"robot_rl env (state obs) : {np.median(env_rates):8.0f} control steps/s (median; blocks "
          f"{min(env_rates):.0f}-{max(env_rates):.0f})")
    print(f"ratio env / raw          : {med:8.2f}   (median of per-block ratios {min(ratios):.2f}-{max(ratios):.2f}; "
          f"goal >= 0.70)")
    print(f"  per step: IK {ik_us:.0f} us, observation {obs_us:.0f} us, physics {1e6 / np.median(raw_rates):.0f} us")


if __name__ == "__main__":
    main()
