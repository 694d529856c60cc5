"""Residual TD3 in one process vs the actor-learner split: same base, same seeds, same settings.

For each training seed, trains the residual twice with ``robot-rl train-residual --algo td3`` — once in a single
process (``--actors 0``, the reference) and once with ``--actors N`` (actors acting through the learner's policy
server, :mod:`robot_rl.serve.learner`) — then evaluates both on the same held-out seeds with ``robot-rl eval``.
Prints, per mode, the held-out success per seed with its Wilson interval, the mean and spread over seeds, env
steps/s and wall time, and the ratios split / single; the base is evaluated once on the same seeds. The split
mode is expected to match the single-process curve within seed noise (its actors act on weights up to
``td3.max_backlog`` rows stale) and to run faster where env stepping and updates can overlap.

    python bench/bench_actors.py --base runs/base4/checkpoint --out runs/bench_actors \
        --set task.tolerance=0.004 --set td3.utd_ratio=0.25 --set td3.demo_ratio=0 [--env-steps 40000] \
        [--seeds 0 1 2] [--actors 2] [--episodes 200]

Extra ``--set`` options go to both training runs (and ``task.*`` ones to the evaluations).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cli(*args, log: Path, env: dict | None = None) -> None:
    """Run ``robot-rl ARGS`` with its output in ``log`` (``env``: its environment, default this process's); a plain
    progress line every 30 s while it runs."""
    t0 = next_line = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "robot_rl.cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
        while p.poll() is None:
            time.sleep(1.0)
            if time.time() >= next_line + 30:
                next_line = time.time()
                print(f"  ... {args[0]} running for {time.time() - t0:.0f} s (log {log})", flush=True)
    if p.returncode:
        sys.exit(f"robot-rl {args[0]} failed (exit {p.returncode}); see {log}")


def evaluate(args, out: Path, residual: Path | None) -> dict:
    extra = ["--residual", residual] if residual else []
    tsets = [x for s in args.set if s.startswith("task.") for x in ("--set", s)]
    cli("eval", "--base", args.base, *extra, "--out", out, "--task", args.task, *tsets,
        "--episodes", args.episodes, "--videos", 0, log=out.with_suffix(".log"))
    (res,) = json.loads((out / "report.json").read_text())["results"].values()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="place")
    ap.add_argument("--env-steps", type=int, default=40_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=200, help="held-out evaluation episodes per policy")
    ap.add_argument("--set", action="append", default=[], help="config overrides for both modes (section.field=V)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = [x for s in args.set for x in ("--set", s)]
    print(f"base {args.base}: evaluating on {args.episodes} held-out seeds", flush=True)
    base = evaluate(args, out / "eval_base", None)
    rows = {0: [], args.actors: []}
    for seed in args.seeds:
        for actors in rows:
            name = f"{'split' if actors else 'single'}_s{seed}"
            print(f"seed {seed}: training {name} ({args.env_steps} env steps, --actors {actors})", flush=True)
            run = out / name
            t0 = time.time()
            cli("train-residual", "--algo", "td3", "--base", args.base, "--out", run, "--overwrite", "--task",
                args.task, "--env-steps", args.env_steps, "--actors", actors, "--seed", seed, *sets,
                log=out / f"{name}.log")
            wall = time.time() - t0
            curve = json.loads((run / "learning_curve.json").read_text())
            res = evaluate(args, out / f"eval_{name}", run / "checkpoint")
            rows[actors].append({"seed": seed, "success": res["success_rate"], "ci95": res["ci95"], "wall_s": wall,
                                 "steps_s": curve[-1]["env_steps"] / curve[-1]["wall_s"],
                                 "val": [(r["env_steps"], r["val_success"]) for r in curve if "val_success" in r]})
            r = rows[actors][-1]
            print(f"  {name}: held-out success {r['success']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], "
                  f"{r['steps_s']:.1f} env steps/s, {wall / 60:.1f} min, validation {r['val']}", flush=True)
    print(f"\nbase: {base['success_rate']:.3f} [{base['ci95'][0]:.3f}, {base['ci95'][1]:.3f}] on "
          f"{base['episodes']} held-out seeds {base['seed_range']}")
    summary = {"base": base["success_rate"], "modes": {}}
    for actors, rs in rows.items():
        s = np.array([r["success"] for r in rs], dtype=float)
        label = f"split, {actors} actors" if actors else "single process (reference)"
        summary["modes"][label] = {"runs": rs, "mean": float(s.mean()), "std": float(s.std(ddof=1)) if len(s) > 1
                                   else 0.0, "steps_s": float(np.mean([r["steps_s"] for r in rs])),
                                   "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
        m = summary["modes"][label]
        print(f"{label:28s} success {m['mean']:.3f} ± {m['std']:.3f} (seeds {[round(float(x), 3) for x in s]}), "
              f"{m['steps_s']:.1f} env steps/s, {m['wall_s'] / 60:.1f} min per run")
    ref, new = (summary["modes"][k] for k in summary["modes"])
    print(f"ratio split / single: env steps/s {new['steps_s'] / ref['steps_s']:.2f}x, wall "
          f"{new['wall_s'] / ref['wall_s']:.2f}x, success difference {new['mean'] - ref['mean']:+.3f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
