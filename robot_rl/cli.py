"""``robot-rl`` command line: collect, train-base, train-residual, eval, pipeline, store.

Bad input ends with one line ``robot-rl: error: <field>: <problem> -> <fix>`` and exit code 2.
Every command that produces outputs writes its resolved arguments to ``<out>/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from robot_rl.errors import ConfigError


def _write_cfg(out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    d = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def cmd_collect(a):
    from robot_rl.collect import collect

    r = collect(a.store, a.task, a.episodes, seed=a.seed, noise=a.noise, bias=a.bias, backend=a.backend,
                cameras=a.cameras, image_size=(a.image_size, a.image_size), overwrite=a.overwrite,
                only_success=not a.keep_failures)
    print(json.dumps(r, indent=1))


def cmd_train_base(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.train_base import BaseTrainConfig, train_base

    out = Path(a.out)
    _write_cfg(out, a)
    cfg = BaseTrainConfig(kind=a.kind, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                          obs_keys=a.obs_keys or [], image_keys=a.image_keys or [],
                          policy=yaml.safe_load(a.policy) if a.policy else {})
    w = SummaryWriter(str(out / "tb"))
    r = train_base(a.store, out, cfg, writer=w)
    w.close()
    print(json.dumps({k: v for k, v in r.items() if k != "history"}, indent=1))


def cmd_train_residual(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.evaluation import plot_learning_curve
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.policies.residual import save_residual
    from robot_rl.rl.ppo import PPOConfig, train_residual

    out = Path(a.out)
    base = load_policy(a.base)
    _write_cfg(out, a)
    w = SummaryWriter(str(out / "tb"))
    cfg = PPOConfig(total_env_steps=a.env_steps, n_envs=a.n_envs, n_steps=a.n_steps, alpha=a.alpha, seed=a.seed)
    res, curve = train_residual(base, a.task, cfg, out, writer=w)
    w.close()
    ck = save_residual(res, out / "checkpoint", extra={"base_checkpoint": str(a.base)})
    plot_learning_curve(curve, out / "learning_curve.png")
    print(json.dumps({"checkpoint": str(ck), "last": curve[-1]}, indent=1))


def cmd_eval(a):
    from robot_rl.evaluation import evaluate, record_videos, write_report
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.policies.residual import load_residual

    base = load_policy(a.base)
    res = load_residual(a.residual, base) if a.residual else None
    out = Path(a.out)
    _write_cfg(out, a)
    r = evaluate(base, a.task, residual=res, n_episodes=a.episodes, n_envs=a.n_envs, seed_start=a.seed_start)
    vids = record_videos(base, a.task, out / "videos", residual=res,
                         seeds=range(a.seed_start, a.seed_start + a.videos)) if a.videos else []
    name = "base + residual" if res is not None else "base"
    write_report(out, {name: r}, {"videos": vids})
    print(f"{name}: success {r['success_rate']:.3f} 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
          f"over {r['episodes']} episodes; report in {out / 'report.md'}")


def cmd_pipeline(a):
    from robot_rl.pipeline import resolve_config, run_pipeline

    cfg = resolve_config(a.preset, a.config, a.set or [])
    r = run_pipeline(cfg, a.out)
    for name, v in r["results"].items():
        print(f"{name}: success {v['success_rate']:.3f} 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] "
              f"over {v['episodes']} held-out episodes")
    print(f"wall time {r['wall_time_min']} min; report: {Path(a.out) / 'report.md'}")


def cmd_store(a):
    from robot_rl.store import ZarrStore, format_info

    st = ZarrStore.open(a.path, mode="r")
    if a.action == "info":
        print(format_info(st.info()))
        return 0
    problems = st.validate()
    for p in problems:
        print(p)
    fatal = [p for p in problems if "torn" not in p]
    print("OK" if not fatal else f"{len(fatal)} problem(s)")
    return 1 if fatal else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robot-rl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("collect", help="scripted demonstrations -> zarr store")
    c.add_argument("--task", default="place")
    c.add_argument("--store", required=True)
    c.add_argument("--episodes", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--noise", type=float, default=0.3)
    c.add_argument("--bias", type=float, default=0.0)
    c.add_argument("--backend", default="mujoco")
    c.add_argument("--cameras", nargs="*", default=[])
    c.add_argument("--image-size", type=int, default=96)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--keep-failures", action="store_true")
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train-base", help="train a diffusion / BC base policy on a store")
    t.add_argument("--store", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--kind", default="diffusion", choices=["diffusion", "bc"])
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--obs-keys", nargs="*")
    t.add_argument("--image-keys", nargs="*")
    t.add_argument("--policy", help="YAML/JSON dict of PolicyConfig overrides, e.g. '{horizon: 16}'")
    t.set_defaults(func=cmd_train_base)

    r = sub.add_parser("train-residual", help="residual PPO on top of a frozen base")
    r.add_argument("--base", required=True)
    r.add_argument("--task", default="place")
    r.add_argument("--out", required=True)
    r.add_argument("--env-steps", type=int, default=300_000)
    r.add_argument("--n-envs", type=int, default=8)
    r.add_argument("--n-steps", type=int, default=100)
    r.add_argument("--alpha", type=float, default=0.1)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_train_residual)

    e = sub.add_parser("eval", help="held-out seeded evaluation with Wilson intervals, report and videos")
    e.add_argument("--base", required=True)
    e.add_argument("--residual")
    e.add_argument("--task", default="place")
    e.add_argument("--out", required=True)
    e.add_argument("--episodes", type=int, default=200)
    e.add_argument("--n-envs", type=int, default=4)
    e.add_argument("--seed-start", type=int, default=1_000_000)
    e.add_argument("--videos", type=int, default=3)
    e.set_defaults(func=cmd_eval)

    pp = sub.add_parser("pipeline", help="collect -> train base -> residual RL -> evaluate, end to end")
    pp.add_argument("--preset", default="quick", help="quick | full")
    pp.add_argument("--config", help="YAML file overriding the preset")
    pp.add_argument("--set", action="append", help="override one field, e.g. --set residual.n_envs=8")
    pp.add_argument("--out", default="runs/pipeline")
    pp.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("store", help="inspect or validate a zarr store")
    s.add_argument("action", choices=["info", "validate"])
    s.add_argument("path")
    s.set_defaults(func=cmd_store)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"robot-rl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robot-rl: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
