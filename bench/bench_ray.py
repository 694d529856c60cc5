"""Ray's overhead for rollouts: evaluation episodes/s with the env workers as Ray actors
(:class:`robot_rl.envs.ray_envs.RayVectorEnv`) against the local ``AsyncVectorEnv`` at the same worker count, measured
in the same run (issue 20).

- ``eval``: :func:`robot_rl.stages.evaluation.evaluate` of the shipped BC base (``tests/fixtures/place_bc_mujoco``) on
  the same held-out seeds both ways, worker start-up included; repeats interleaved, medians reported. The per-episode
  results are checked equal.
- ``step``: raw env steps/s of the two vector envs (random actions, no policy, start-up excluded): the transport's
  share without the policy's; again with a 96x96 front camera rendered per step (a heavier env, as image policies
  and distillation run).
- Ray runs as a local instance on this machine (``ray.init`` with ``num_cpus`` = workers), so the ratio is Ray's
  per-step RPC cost against pipes and shared memory, not a network's.

    python bench/bench_ray.py [--episodes 40] [--n-envs 2] [--repeats 3] [--steps 600] [--image-steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "place_bc_mujoco"


def eval_rate(base, ray: str | None, episodes: int, n_envs: int) -> tuple[float, list]:
    from robot_rl.stages.evaluation import evaluate

    t = time.perf_counter()
    r = evaluate(base, "place", n_episodes=episodes, n_envs=n_envs, env_kwargs={"ray": ray} if ray else {},
                 progress=False)
    return episodes / (time.perf_counter() - t), r["per_episode"]


def step_rate(ray: str | None, n_envs: int, steps: int, cameras: tuple = ()) -> float:
    from robot_rl.envs.vector import make_vector_env

    venv, rng = make_vector_env("place", n_envs, ray=ray, cameras=cameras), np.random.default_rng(0)
    try:
        venv.reset(seed=list(range(n_envs)))
        acts = rng.uniform(-1, 1, (steps, n_envs, 5)).astype(np.float32)
        venv.step(acts[0])
        t = time.perf_counter()
        for a in acts[1:]:
            venv.step(a)
        return (steps - 1) * n_envs / (time.perf_counter() - t)
    finally:
        venv.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--n-envs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=600, help="vector steps of the raw step-rate measurement")
    p.add_argument("--image-steps", type=int, default=60, help="vector steps of the raw step rate with a 96x96 "
                   "front camera rendered every step (0: skip)")
    a = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    import ray
    import torch

    from robot_rl.policies.checkpoint import load_policy

    torch.set_num_threads(1)
    t = time.perf_counter()
    ray.init(num_cpus=a.n_envs, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    base = load_policy(FIXTURE)
    rows = {"eval_local": [], "eval_ray": [], "step_local": [], "step_ray": []}
    same = True
    for k in range(a.repeats):
        for mode in (None, "local") if k % 2 == 0 else ("local", None):
            tag = "ray" if mode else "local"
            rate, per = eval_rate(base, mode, a.episodes, a.n_envs)
            rows[f"eval_{tag}"].append(rate)
            rows.setdefault(f"per_{tag}", per)
            rows[f"step_{tag}"].append(step_rate(mode, a.n_envs, a.steps))
            print(f"repeat {k} {tag:>5}: eval {rate:.2f} episodes/s, env {rows[f'step_{tag}'][-1]:.0f} steps/s",
                  flush=True)
        same &= rows["per_local"] == rows["per_ray"]
        if a.image_steps:
            for mode in (None, "local"):
                tag = "ray" if mode else "local"
                rows.setdefault(f"image_step_{tag}", []).append(step_rate(mode, a.n_envs, a.image_steps, ("front",)))
            print(f"repeat {k} with a camera: env {rows['image_step_local'][-1]:.1f} (local) vs "
                  f"{rows['image_step_ray'][-1]:.1f} (ray) steps/s", flush=True)
    med = {k: float(np.median(v)) for k, v in rows.items() if not k.startswith("per_")}
    out = {"n_envs": a.n_envs, "episodes": a.episodes, "repeats": a.repeats, "ray_init_s": ray_start,
           **{f"{k}_median": v for k, v in med.items()},
           "eval_ratio_ray_over_local": med["eval_ray"] / med["eval_local"],
           "step_ratio_ray_over_local": med["step_ray"] / med["step_local"], "per_episode_identical": same}
    if a.image_steps:
        out["image_step_ratio_ray_over_local"] = med["image_step_ray"] / med["image_step_local"]
    print(json.dumps(out, indent=1))
    print(f"eval: Ray {med['eval_ray']:.2f} vs AsyncVectorEnv {med['eval_local']:.2f} episodes/s -> ratio "
          f"{out['eval_ratio_ray_over_local']:.2f}; raw env steps/s ratio {out['step_ratio_ray_over_local']:.2f}; "
          f"per-episode results identical: {same}; ray.init {ray_start:.1f} s"
          + (f"; with a camera {out['image_step_ratio_ray_over_local']:.2f}" if a.image_steps else ""))
    ray.shutdown()


if __name__ == "__main__":
    main()
