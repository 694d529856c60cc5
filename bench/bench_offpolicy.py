"""An off-policy residual (TD3, or SAC with ``--algo sac``) against residual PPO on the same frozen base: held-out
success over training seeds, and env steps and wall time to first reach a validation success rate (issue 16's
side-by-side).

Trains ``robot-rl train-residual --algo td3 --train-seeds N`` (or ``--algo sac``) and the same with ``--algo ppo``
(the reference, measured in the same run), each into ``<out>/<algo>``: every seed evaluated with the base on the same held-out seeds
(``eval.*``), Wilson intervals, exact McNemar tests against the base, IQM with a stratified bootstrap interval over
seeds (rliable), for the last and the best-on-validation checkpoints. Then prints, per algorithm and seed, the
held-out success (last, and best on validation) and the env steps and wall-clock minutes
at which validation success (``<algo>.val_episodes`` episodes every ``<algo>.val_every`` env steps, seeds disjoint
from training and held-out) first reached each ``--thresholds`` value ("-" when it never did), and the ratios
off-policy / PPO. Writes ``<out>/bench_offpolicy.json`` and ``<out>/<algo>_vs_ppo.png`` (every seed's learning curve of
both learners against env steps and wall time).

    python bench/bench_offpolicy.py --base runs/base4/checkpoint --out runs/bench_offpolicy --env-steps 100000 \
        --set task.tolerance=0.004 --td3-set td3.utd_ratio=0.25 \
        --ppo-set ppo.n_steps=100 --ppo-set ppo.align_chunks=false [--train-seeds 3] [--ppo-env-steps 600000] \
        [--ppo-train-seeds 1] [--reuse]

PPO needs several times TD3's env steps to reach the same validation success, so ``--ppo-env-steps`` /
``--ppo-train-seeds`` give it its own budget (first-reach points are then still comparable; the held-out figures are
each learner's at the end of its own budget). ``--set`` options go to both learners; ``--offpolicy-set`` (alias
``--td3-set``) / ``--ppo-set`` to one. ``--reuse`` keeps an algorithm's finished ``<out>/<algo>/report.json``
instead of training it again. Wall times are only comparable when nothing else shares the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_actors import cli  # bench/ is on sys.path when run as a script


def first_reach(curve: list[dict], threshold: float) -> tuple[int | None, float | None]:
    """(env steps, wall seconds) of the first learning-curve row whose ``val_success`` >= threshold, else Nones."""
    for row in curve:
        v = row.get("val_success")
        if v is not None and v >= threshold:
            return int(row["env_steps"]), float(row["wall_s"])
    return None, None


def summarise(run: Path, thresholds: list[float]) -> dict:
    """Per seed: held-out success, Wilson CI, McNemar p against the base, training minutes and first-reach
    points; over seeds: the report's IQM / mean with their intervals."""
    rep = json.loads((run / "report.json").read_text())
    seeds = {}
    for name, r in rep["results"].items():
        if not name.startswith("base + residual, training seed "):
            continue
        s = int(name.rsplit(" ", 1)[1])
        curve = json.loads((run / f"seed_{s}" / "learning_curve.json").read_text())
        best = rep["results"].get(f"base + residual (best on validation), training seed {s}")
        seeds[s] = {"success": r["success_rate"], "ci95": r["ci95"], "p_vs_base": r["paired_vs_base"]["p_value"],
                    "best_on_validation": best["success_rate"] if best else None,
                    "train_wall_min": r["train_wall_min"],
                    "reach": {str(t): dict(zip(("env_steps", "wall_s"), first_reach(curve, t))) for t in thresholds}}
    base = next(r for k, r in rep["results"].items() if k.startswith("base ("))
    return {"base": base["success_rate"], "seeds": seeds, "over_seeds": rep["over_seeds"],
            "over_seeds_best_on_validation": rep.get("over_seeds_best_on_validation")}


def fmt_reach(p: dict) -> str:
    return "-" if p["env_steps"] is None else f"{p['env_steps'] / 1000:.0f} k / {p['wall_s'] / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="place")
    ap.add_argument("--env-steps", type=int, default=100_000)
    ap.add_argument("--train-seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first training seed")
    ap.add_argument("--ppo-env-steps", type=int, help="PPO's env steps per seed (default --env-steps)")
    ap.add_argument("--ppo-train-seeds", type=int, help="PPO's training seeds (default --train-seeds)")
    ap.add_argument("--val-every", type=int, default=10_000)
    ap.add_argument("--val-episodes", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=200, help="held-out evaluation episodes")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--set", action="append", default=[], help="SECTION.FIELD=VALUE for both learners")
    ap.add_argument("--algo", choices=["td3", "sac"], default="td3", help="the off-policy learner")
    ap.add_argument("--offpolicy-set", "--td3-set", dest="offpolicy_set", action="append", default=[],
                    help="SECTION.FIELD=VALUE for the off-policy learner only (e.g. sac.utd_ratio=0.5)")
    ap.add_argument("--ppo-set", action="append", default=[])
    ap.add_argument("--reuse", action="store_true", help="keep finished <out>/<algo> runs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": sys.argv, "runs": {}}
    off = a.algo
    print(f"base {a.base}: {off.upper()} {a.train_seeds} seeds x {a.env_steps} env steps, PPO "
          f"{a.ppo_train_seeds or a.train_seeds} seeds x {a.ppo_env_steps or a.env_steps}", flush=True)
    budget = {off: (a.env_steps, a.train_seeds),
              "ppo": (a.ppo_env_steps or a.env_steps, a.ppo_train_seeds or a.train_seeds)}
    for algo, own in ((off, a.offpolicy_set), ("ppo", a.ppo_set)):
        run, (steps, n_seeds) = out / algo, budget[algo]
        if not (a.reuse and (run / "report.json").is_file()):
            sets = [*a.set, f"{algo}.val_every={a.val_every}", f"{algo}.val_episodes={a.val_episodes}",
                    f"eval.episodes={a.episodes}", *own]
            print(f"training {algo} ({n_seeds} seeds, {steps} env steps each) into {run}", flush=True)
            cli("train-residual", "--algo", algo, "--base", a.base, "--out", run, "--task", a.task,
                "--train-seeds", n_seeds, "--seed", a.seed, "--env-steps", steps, "--overwrite",
                *[x for s in sets for x in ("--set", s)], log=out / f"{algo}.log")
        result["runs"][algo] = summarise(run, a.thresholds)
    print(f"\nbase alone: {result['runs'][off]['base']:.3f} (same held-out seeds in both runs)")
    head = " | ".join(f"first val >= {t} (env steps / wall)" for t in a.thresholds)
    print(f"| learner, seed | held-out success [95 % Wilson] | best on validation | McNemar p vs base | train min | "
          f"{head} |")
    print("|---" * (5 + len(a.thresholds)) + "|")
    for algo, s in result["runs"].items():
        for seed, r in s["seeds"].items():
            reach = " | ".join(fmt_reach(r["reach"][str(t)]) for t in a.thresholds)
            b = "-" if r["best_on_validation"] is None else f"{r['best_on_validation']:.3f}"
            print(f"| {algo.upper()} {seed} | {r['success']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {b} | "
                  f"{r['p_vs_base']:.2g} | {r['train_wall_min']:.1f} | {reach} |")
    for algo, s in result["runs"].items():
        for what, o in (("last", s["over_seeds"]), ("best on validation", s["over_seeds_best_on_validation"])):
            if o:
                print(f"{algo.upper()} ({what}): IQM {o['iqm']:.3f} [{o['iqm_ci95'][0]:.3f}, {o['iqm_ci95'][1]:.3f}], "
                      f"mean {o['mean']:.3f} +- {o['std']:.3f} over {o['n_seeds']} seeds")
    ratios = {}
    for t in a.thresholds:
        for k in ("env_steps", "wall_s"):
            vals = {algo: [r["reach"][str(t)][k] for r in s["seeds"].values()] for algo, s in result["runs"].items()}
            if all(v is not None for vs in vals.values() for v in vs):
                ratios[f"{k}_to_{t}"] = float(np.median(vals[off]) / np.median(vals["ppo"]))
                print(f"{off.upper()} / PPO, median {k} to first reach {t}: {ratios[f'{k}_to_{t}']:.2f}")
            else:
                print(f"{off.upper()} / PPO, {k} to {t}: not every seed reached it "
                      f"({', '.join(f'{g}: {sum(v is not None for v in vs)}/{len(vs)}' for g, vs in vals.items())})")
    ot, op = result["runs"][off]["over_seeds"], result["runs"]["ppo"]["over_seeds"]
    ratios["iqm"] = float(ot["iqm"] / op["iqm"]) if op["iqm"] else float("nan")
    print(f"{off.upper()} / PPO held-out IQM: {ratios['iqm']:.2f}")
    result["ratios"] = ratios
    result["plot"] = plot(out, result, off)
    print(f"learning curves of every seed of both learners, against env steps and wall time: {result['plot']}")
    (out / "bench_offpolicy.json").write_text(json.dumps(result, indent=1))


def plot(out: Path, result: dict, off: str) -> str:
    """``<out>/<off>_vs_ppo.png``: every seed's learning curve of both learners on the same axes, against env steps
    and wall time, with the base's held-out success."""
    from robot_rl.stages.evaluation import plot_learning_curve

    curves = {f"{algo.upper()} seed {s}": json.loads((out / algo / f"seed_{s}" / "learning_curve.json").read_text())
              for algo, r in result["runs"].items() for s in r["seeds"]}
    first, *rest = curves
    return plot_learning_curve(curves[first], out / f"{off}_vs_ppo.png", base_rate=result["runs"][off]["base"],
                               label=first, others={k: curves[k] for k in rest})


if __name__ == "__main__":
    main()
