"""Sim-to-sim transfer report: one checkpoint on the backend it was trained on and on another backend, each with
and without domain randomization, on the same held-out seeds.

``robot-rl transfer`` is the command line of :func:`transfer_report`. Output under ``out``: ``report.md`` (a table of
success rates with 95 % Wilson intervals and the change against the training condition), ``report.json`` (the same
numbers, per-episode results, the resolved randomization config) and ``videos/*.mp4`` (first seeds of every
condition). The change ``Δ`` is a difference of two proportions with Newcombe's hybrid score interval (method 10,
Newcombe 1998), built from the two Wilson intervals; the conditions share their seeds, so this (independent-samples)
interval is conservative.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from robot_rl.errors import ConfigError
from robot_rl.envs.randomization import as_nested, resolve
from robot_rl.stages.evaluation import EvalConfig, evaluate, record_videos


@dataclass
class TransferConfig(EvalConfig):
    """The ``transfer`` config section (``robot-rl transfer``): :class:`EvalConfig`'s fields per condition (the same
    seeds in every condition) plus the two simulators. The randomized conditions use the ``randomization`` section;
    ``robot-rl transfer`` starts it from the ``default`` preset unless ``randomization.preset`` is given."""

    episodes: int = 100
    n_envs: int = 2
    videos: int = 1
    train_backend: str = "mujoco"
    eval_backend: str = "pybullet"


def newcombe_diff(a: dict, b: dict) -> tuple[float, float, float]:
    """Difference ``p_a - p_b`` of two evaluation results and its 95 % interval (Newcombe's method 10)."""
    pa, pb = a["success_rate"], b["success_rate"]
    (la, ua), (lb, ub) = a["ci95"], b["ci95"]
    d = pa - pb
    return d, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def transfer_report(base, task: str, out_dir: str | Path, *, residual=None,
                    train_backend: str = TransferConfig.train_backend,
                    eval_backend: str = TransferConfig.eval_backend, randomization="default",
                    task_kwargs: dict | None = None, env_kwargs: dict | None = None,
                    n_episodes: int = TransferConfig.episodes, n_envs: int = TransferConfig.n_envs,
                    seed_start: int = TransferConfig.seed_start, videos: int = TransferConfig.videos,
                    progress: bool = True, extra: dict | None = None) -> dict:
    """Evaluate ``base`` (+ ``residual``) in four conditions {train, eval backend} x {nominal, randomized} on the
    seeds ``seed_start .. seed_start + n_episodes - 1`` and write ``report.md`` / ``report.json`` / videos.

    Returns ``{"rows": [...], "randomization": {...}, "report_md": path, "report_json": path, "videos": [...]}``.
    Raises ConfigError for an unknown backend, a bad randomization spec (checked before anything runs) or
    ``randomization`` that turns nothing on.
    """
    flat = resolve(randomization)
    if not flat:
        raise ConfigError("randomization", "the randomized conditions would randomize nothing",
                          "pass a preset such as 'default' or a dict of ranges")
    env_kwargs = dict(env_kwargs or {})
    if "randomization" in env_kwargs or "backend" in env_kwargs:
        raise ConfigError("env_kwargs", "randomization/backend are set by the transfer report itself",
                          "use the randomization / train_backend / eval_backend arguments")
    from robot_rl.envs.env import check_env_options

    for b in (train_backend, eval_backend):  # every condition's options, before anything runs or is written
        check_env_options(task, task_kwargs, backend=b, randomization=randomization, **env_kwargs)
    if not (isinstance(videos, int) and videos >= 0):
        raise ConfigError("videos", f"{videos!r} < 0", "pass 0 (none) or a positive number of videos")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conditions = []
    for role, backend in (("train", train_backend), ("eval", eval_backend)):
        for rnd in (None, randomization):
            conditions.append((role, backend, rnd))
    rows, vids = [], []
    for role, backend, rnd in conditions:
        tag = f"{backend}_{'randomized' if rnd is not None else 'nominal'}"
        kw = {**env_kwargs, "randomization": rnd}
        r = evaluate(base, task, residual=residual, n_episodes=n_episodes, n_envs=n_envs, seed_start=seed_start,
                     task_kwargs=task_kwargs, env_kwargs=kw, backend=backend, progress=progress, desc=tag)
        r.update({"role": role, "randomized": rnd is not None, "condition": tag})
        rows.append(r)
        if videos:
            vids += record_videos(base, task, out / "videos", residual=residual, task_kwargs=task_kwargs,
                                  seeds=range(seed_start, seed_start + videos), prefix=tag, backend=backend,
                                  env_kwargs=kw)
    ref = rows[0]
    for r in rows:
        d, lo, hi = newcombe_diff(r, ref)
        r["delta_vs_train_nominal"] = {"diff": d, "ci95": [lo, hi]}
    payload = {"task": task, "task_kwargs": task_kwargs or {}, "env_kwargs": env_kwargs,
               "train_backend": train_backend, "eval_backend": eval_backend,
               "policy": "base + residual" if residual is not None else "base",
               "randomization": {"spec": randomization, "resolved": as_nested(flat)},
               "seed_range": [seed_start, seed_start + n_episodes - 1], **(extra or {}),
               "results": rows, "videos": vids}
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=str))
    md = _markdown(payload, out)
    (out / "report.md").write_text(md)
    return {"rows": rows, "randomization": payload["randomization"], "report_md": str(out / "report.md"),
            "report_json": str(out / "report.json"), "videos": vids}


def _markdown(p: dict, out: Path) -> str:
    lines = ["# robot_rl transfer report", "",
             f"- **policy**: {p['policy']}" + "".join(f" · {k}: `{p[k]}`" for k in ("base", "residual") if p.get(k)),
             f"- **task**: {p['task']} {json.dumps(p['task_kwargs']) if p['task_kwargs'] else ''}".rstrip(),
             f"- **trained on**: {p['train_backend']} · **transferred to**: {p['eval_backend']}",
             f"- **episodes per condition**: {p['results'][0]['episodes']} (seeds {p['seed_range'][0]}–"
             f"{p['seed_range'][1]}, the same in every row)",
             f"- **randomization**: `{json.dumps(p['randomization']['spec'])}`", "",
             "| backend | role | randomization | success | 95 % Wilson CI | Δ vs train nominal [95 % CI] | "
             "mean length (steps) |", "|---|---|---|---|---|---|---|"]
    for r in p["results"]:
        d = r["delta_vs_train_nominal"]
        delta = "—" if r is p["results"][0] else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        lines.append(f"| {r['backend']} | {r['role']} | {'on' if r['randomized'] else 'off'} | "
                     f"{r['success_rate']:.3f} ({r['successes']}/{r['episodes']}) | "
                     f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {delta} | {r['mean_length']:.1f} |")
    lines += ["", "Randomization (resolved; factors are multiplicative, `[lo, hi]` uniform per episode, a single "
              "number is a half-range or a noise std):", "", "| group | parameter | value |", "|---|---|---|"]
    for group, params in p["randomization"]["resolved"].items():
        for k, v in params.items():
            lines.append(f"| {group} | {k} | `{json.dumps(v)}` |")
    if p["videos"]:
        lines += ["", "Videos: " + ", ".join(f"[{Path(v).name}]({Path(v).relative_to(out)})" for v in p["videos"])]
    return "\n".join(lines) + "\n"
