"""Residual PPO throughput (env control steps/s, everything included) with aligned vs free-running action chunks.

Runs ``train_residual`` (collector + rollout buffer + PPO update, checkpoints into a temporary directory, no
validation) twice on the same frozen base checkpoint, same seed and env count: once with
``align_chunks=True`` (the default: every env asks for its next chunk on the same step, one batched base call per
Ta steps) and once with ``align_chunks=False`` (the reference: each env re-plans on its own clock, so base calls are
spread over the steps with small batches). Prints steps/s, base calls per 1000 env steps, the mean base batch size
and the speed ratio. Episodes must end at different times for the difference to show, so use a trained base:

    python bench/bench_ppo.py --checkpoint runs/full_diffusion/base/checkpoint [--steps 16000] [--n-envs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from robot_rl.policies.checkpoint import load_policy
from robot_rl.rl.ppo import PPOConfig, train_residual
from robot_rl.rl.residual import ResidualConfig


def run(base, args, align: bool) -> dict:
    cfg = PPOConfig(total_env_steps=args.steps, n_envs=args.n_envs, n_steps=100, align_chunks=align)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, curve = train_residual(base, args.task, cfg, tmp, residual=ResidualConfig(alpha=args.alpha),
                                  task_kwargs={"tolerance": args.tolerance}, progress=False)
        wall = time.perf_counter() - t0
    steps, calls, chunks = (curve[-1][k] for k in ("env_steps", "base_calls", "base_chunks"))
    return {"steps_s": steps / wall, "calls_per_1k": 1000 * calls / steps,
            "batch": chunks / calls, "episodes": sum(r["episodes"] for r in curve)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a trained base checkpoint, e.g. <pipeline out>/base/checkpoint")
    ap.add_argument("--task", default="place")
    ap.add_argument("--tolerance", type=float, default=0.004)
    ap.add_argument("--steps", type=int, default=16_000)
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=ResidualConfig.alpha)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the env workers own the other cores; OpenMP oversubscription is catastrophic
    base = load_policy(args.checkpoint)
    c = base.config
    print(f"base {c.kind}, Ta {c.n_action_steps}, DDIM {getattr(c, 'num_inference_steps', '-')}, "
          f"{args.n_envs} envs, {args.steps} env steps per run")
    ref = run(base, args, align=False)
    new = run(base, args, align=True)
    for name, r in (("free-running chunks (reference)", ref), ("aligned chunks", new)):
        print(f"{name:32s} {r['steps_s']:7.1f} steps/s  {r['calls_per_1k']:6.1f} base calls / 1k steps  "
              f"mean batch {r['batch']:.2f}  {r['episodes']} episodes")
    print(f"ratio aligned / reference: {new['steps_s'] / ref['steps_s']:.2f}x")


if __name__ == "__main__":
    main()
