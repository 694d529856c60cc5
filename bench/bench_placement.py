"""Where a policy puts the cube: the final placement error of ``place`` per simulator, on the same held-out seeds.

For each backend, one env runs the checkpoint (base only, as ``robot-rl eval`` executes it) for N seeds and records
the episode's last (cube - target) in the table plane [mm, world x forward from the robot, y to its left]. Prints
per backend: success, the mean error (a bias: e.g. a renderer that draws the scene differently shifts it) and its
standard deviation (the spread), plus the cube's offset from the end effector while carried (cube z > 5 cm), which
tells a grasp that differs between the simulators from a policy that places differently.

    python bench/bench_placement.py --checkpoint runs/distill_light/student_round0/checkpoint [--episodes 60]
"""

import argparse
import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from robot_rl.envs.env import make_env  # noqa: E402
from robot_rl.envs.vector import EVAL_SEED_START, env_kwargs_for  # noqa: E402
from robot_rl.policies.checkpoint import load_policy  # noqa: E402
from robot_rl.stages.evaluation import CombinedPolicy  # noqa: E402


def run(base, backend: str, seeds) -> dict:
    env = make_env("place", backend, **env_kwargs_for(base.config, "place", None, {}))
    err, carry, success = [], [], []
    pol = CombinedPolicy(base, None, 1)
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            batch = {k: v[None] for k, v in obs.items()}
            pol.reset(np.ones(1, bool), batch)
            held = []
            while True:
                obs, _, term, trunc, info = env.step(pol.act(batch)[0])
                if obs["cube_pos"][2] > 0.05:
                    held.append(obs["cube_pos"][:2] - obs["ee_pos"][:2])
                batch = {k: v[None] for k, v in obs.items()}
                if term or trunc:
                    break
                pol.observe(batch, None)
            err.append(obs["cube_pos"][:2] - obs["target_pos"][:2])
            success.append(bool(info["success"]))
            if held:
                carry.append(np.mean(held, axis=0))
    finally:
        env.close()
    e, c = np.asarray(err) * 1e3, np.asarray(carry) * 1e3
    mm = lambda v: [round(float(x), 1) for x in v]  # noqa: E731
    return {"backend": backend, "episodes": len(seeds), "success": round(float(np.mean(success)), 3),
            "error_mean_mm": mm(e.mean(0)), "error_std_mm": mm(e.std(0)),
            "carry_offset_mean_mm": mm(c.mean(0)) if len(c) else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--backends", nargs="+", default=["mujoco", "pybullet"])
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--seed-start", type=int, default=EVAL_SEED_START)
    a = ap.parse_args()
    base = load_policy(a.checkpoint)
    seeds = range(a.seed_start, a.seed_start + a.episodes)
    for b in a.backends:
        r = run(base, b, seeds)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
