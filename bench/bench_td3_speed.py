"""Env steps/s of residual TD3's single-process loop with its updates on every core (``all_cores``, the default)
against the same run with the updates on one torch thread (the reference, ``OMP_NUM_THREADS=1``), same base,
seed and settings, measured in the same run of this script.

Each run is ``robot-rl train-residual --algo td3`` for ``--env-steps`` steps with ``--learning-starts`` warm-up
steps; the figure is the env steps/s between the first curve row past warm-up and the last (updates included,
validation off), so warm-up (no updates) and start-up do not count. Prints both rates and their ratio, and writes
``<out>/bench_td3_speed.json``. Run it on an otherwise idle machine.

    python bench/bench_td3_speed.py --base runs/base4/checkpoint --out runs/bench_td3_speed \
        [--env-steps 10000] [--learning-starts 2000] [--set task.tolerance=0.004 --set td3.utd_ratio=0.25]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench_actors import cli  # bench/ is on sys.path when run as a script


def run(args, out: Path, one_thread: bool) -> dict:
    """One training run; returns {steps_per_s, env_steps, wall_s, updates} over the curve rows past warm-up."""
    env = {**os.environ}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    sets = [x for s in args.set for x in ("--set", s)]
    cli("train-residual", "--algo", "td3", "--base", args.base, "--out", out, "--task", args.task, "--train-seeds", 1,
        "--env-steps", args.env_steps, "--set", f"td3.learning_starts={args.learning_starts}",
        "--set", "td3.critic_warmup_updates=100", "--set", "td3.val_every=0", "--set", "td3.log_every=1000",
        "--set", "eval.episodes=1", *sets, log=out.with_suffix(".log"), env=env)
    curve = json.loads((out / "seed_0" / "learning_curve.json").read_text())
    rows = [r for r in curve if r["env_steps"] > args.learning_starts]
    a, b = rows[0], rows[-1]
    return {"steps_per_s": (b["env_steps"] - a["env_steps"]) / (b["wall_s"] - a["wall_s"]),
            "env_steps": b["env_steps"] - a["env_steps"], "wall_s": b["wall_s"] - a["wall_s"],
            "updates": b["updates"] - a["updates"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="place")
    ap.add_argument("--env-steps", type=int, default=10_000)
    ap.add_argument("--learning-starts", type=int, default=2_000)
    ap.add_argument("--set", action="append", default=[], help="extra train-residual --set options")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = run(args, out / "one_thread", one_thread=True)
    new = run(args, out / "all_cores", one_thread=False)
    res = {"one_thread": ref, "all_cores": new, "ratio": new["steps_per_s"] / ref["steps_per_s"],
           "cores": len(os.sched_getaffinity(0))}
    (out / "bench_td3_speed.json").write_text(json.dumps(res, indent=1))
    print(f"TD3 single-process loop past warm-up ({ref['updates']} updates each): one torch thread "
          f"{ref['steps_per_s']:.1f} env steps/s (reference), all {res['cores']} cores {new['steps_per_s']:.1f}: "
          f"ratio {res['ratio']:.2f}")


if __name__ == "__main__":
    main()
