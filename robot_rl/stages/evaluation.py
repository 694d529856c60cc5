"""Evaluation: N seeded episodes from a held-out seed range -> success rate with a 95 % Wilson interval, mean
episode length (cycle time), JSON + Markdown report, learning-curve plot and mp4 rollout videos.

Held-out seeds start at :data:`EVAL_SEED_START`, disjoint from demonstration seeds (from 0) and residual-RL
training seeds (from ``robot_rl.envs.vector.TRAIN_SEED_START``). The residual acts deterministically (its mean).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from robot_rl.progress import progress_bar
from robot_rl.provenance import provenance

from robot_rl.datasets.episodes import EpisodeWriter
from robot_rl.errors import ConfigError
from robot_rl.envs.env import make_env
from robot_rl.envs.vector import EVAL_SEED_START, SeedSchedule, env_kwargs_for, make_vector_env, reset_some
from robot_rl.policies.execution import ChunkExecutor
from robot_rl.rl.residual import apply_residual


@dataclasses.dataclass
class EvalConfig:
    """The ``eval`` config section (``robot-rl eval``, the pipeline's evaluations; its ``n_envs`` also runs the
    residual's validation). episodes: evaluated episodes, on the seeds ``seed_start, seed_start + 1, ...``
    (:data:`EVAL_SEED_START`: disjoint from demonstration, training and validation seeds); n_envs: parallel env
    workers; videos: rollouts rendered to mp4 (the first seeds)."""

    episodes: int = 200
    n_envs: int = 4
    seed_start: int = EVAL_SEED_START
    videos: int = 3

    def validate(self, section: str = "eval") -> "EvalConfig":
        """Return self, or raise ConfigError naming ``<section>.<field>`` for a count below its minimum."""
        for k, lo in (("episodes", 1), ("n_envs", 1), ("videos", 0)):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= lo):
                raise ConfigError(f"{section}.{k}", f"{v!r} < {lo}", f"use an integer >= {max(lo, 1)}, e.g. "
                                  f"--set {section}.{k}={getattr(type(self), k)}")
        return self


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927), via SciPy."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


class CombinedPolicy:
    """Frozen base + optional residual executed on N envs: the base through a
    :class:`~robot_rl.policies.execution.ChunkExecutor` (receding horizon, one batched base call for the envs that
    need a new chunk, chunk alignment off: rollouts equal single-env execution), the residual per step with its mean
    (:func:`~robot_rl.rl.residual.apply_residual`). ``reset(mask, obs)``, ``observe(obs, mask)``,
    ``act(obs) -> (N, A)`` raw float32, ``drop_chunks(mask)``; ``ex`` is the executor."""

    def __init__(self, base, residual=None, n_envs: int = 1, seed: int = 0):
        self.base, self.residual = base, residual
        self.ex = ChunkExecutor(base, n_envs, seed=seed)

    def reset(self, mask, obs):
        self.ex.reset(mask, obs)

    def observe(self, obs, mask):
        self.ex.observe(obs, mask)

    def drop_chunks(self, mask=None):
        """The next action of the envs in ``mask`` (default all) starts a new base chunk from the current history."""
        self.ex.drop_chunks(mask)

    def act(self, obs) -> np.ndarray:
        """Executed raw actions (N, A) float32 for batched raw obs {key: (N, ...)}."""
        return apply_residual(self.base.normalizer, self.residual, obs, self.ex.actions())[1]


def evaluate(base, task: str, *, residual=None, n_episodes: int = EvalConfig.episodes,
             seed_start: int = EvalConfig.seed_start, n_envs: int = EvalConfig.n_envs, task_kwargs: dict | None = None, env_kwargs: dict | None = None, seed: int = 0,
             progress: bool = True, desc: str = "eval", policy=None, backend: str = "mujoco", record=None,
             record_extra: dict | None = None, label_policy=None) -> dict:
    """Run ``n_episodes`` seeded episodes; returns {success_rate, ci95, successes, episodes, mean_length, seeds...}
    plus ``backend`` and ``task_config`` (the task's fields, e.g. ``tolerance`` [m]) as the env workers report them,
    and ``worker_restarts`` (Ray env workers restarted, their episodes re-run from the seed; 0 for local workers).

    ``backend``: simulator of the envs (``mujoco`` / ``pybullet``; a ``"backend"`` key in ``env_kwargs`` wins);
    ``env_kwargs``: :class:`~robot_rl.envs.EnvConfig` fields (e.g. ``{"randomization": "default"}``), and ``ray``
    (an address: the env workers are Ray actors, :func:`~robot_rl.envs.vector.make_vector_env`; same episodes).

    ``policy``: an object with CombinedPolicy's reset/observe/act for ``n_envs`` envs used instead of
    ``CombinedPolicy(base, residual)`` (e.g. :class:`robot_rl.serve.client.RemotePolicy`; then ``base`` may be None).

    ``record``: a :class:`~robot_rl.datasets.store.ZarrStore` open for appending: every evaluated episode is committed to it as
    it ends (source ``policy``; the observations the policy saw and the actions sent to the env, (o_t, a_t) as in
    scripted collection; metadata: seed, success, backend, reset parameters, randomization sample, plus
    ``record_extra``), so rollouts feed the next round of base training (the design's rollouts -> store loop).
    Raises ConfigError when the rollouts do not fit the store's schema (checked on the first episode; nothing is
    written then).

    ``label_policy``: with ``record``, a second policy (CombinedPolicy's interface, ``n_envs`` envs) that sees the
    same observations and whose actions are recorded in place of the executed ones: DAgger's relabelling (Ross et
    al. 2011), e.g. a state teacher labelling the states an image student visits (:mod:`robot_rl.stages.distill`).
    """
    if n_episodes < 1:
        raise ConfigError("episodes", f"{n_episodes} < 1", "evaluate at least one episode")
    if not (isinstance(n_envs, int) and n_envs >= 1):
        raise ConfigError("n_envs", f"{n_envs!r} < 1", "use at least one env, e.g. --n-envs 4")
    n_envs = min(n_envs, n_episodes)
    env_kwargs = dict(env_kwargs or {})
    backend = env_kwargs.pop("backend", backend)  # as train_residual's env_kwargs may carry it
    if base is not None:
        env_kwargs = env_kwargs_for(base.config, task, task_kwargs, env_kwargs)
    venv = make_vector_env(task, n_envs, backend, task_kwargs=task_kwargs, **env_kwargs)
    # what the env workers were really built with (the report records these, not the arguments)
    built_backend = venv.get_attr("backend_name")[0]
    task_config = json.loads(json.dumps(dataclasses.asdict(venv.get_attr("task")[0])))
    pol = policy if policy is not None else CombinedPolicy(base, residual, n_envs, seed=seed)
    seeds = SeedSchedule(seed_start, n_episodes)
    cur = [seeds.take() for _ in range(n_envs)]
    active = np.ones(n_envs, dtype=bool)
    obs = reset_some(venv, active, cur, None)
    labels = label_policy if record is not None else None
    driven = [pol] if labels is None else [pol, labels]  # what each reset / observation reaches
    for p in driven:
        p.reset(active, obs)
    results = []
    episodes = [EpisodeWriter() for _ in range(n_envs)]  # the running episode of each env (only when recording)
    bar = progress_bar(total=n_episodes, desc=desc, unit="ep", disable=not progress)
    try:
        while active.any():
            a = pol.act(obs)
            if record is not None:
                rec = a if labels is None else labels.act(obs)
                for i in np.flatnonzero(active):
                    episodes[i].add({k: v[i] for k, v in obs.items()}, rec[i])
            obs, _, term, trunc, info = venv.step(a)
            done = np.logical_or(term, trunc) & active
            if done.any():
                if record is not None:
                    params, rnd = venv.get_attr("params"), venv.get_attr("randomization")
                for i in np.flatnonzero(done):
                    results.append({"seed": cur[i], "success": bool(info["success"][i]), "length": int(info["t"][i])})
                    if record is not None:
                        episodes[i].commit(record, seed=int(cur[i]), task=task, source="policy",
                                           success=bool(info["success"][i]), backend=built_backend,
                                           extra={"params": params[i], "randomization": rnd[i],
                                                  **(record_extra or {})})
                    cur[i] = seeds.take()
                    if cur[i] is None:
                        active[i] = False
                bar.update(int(done.sum()))
                reset_mask = done & active
                if reset_mask.any():
                    obs = reset_some(venv, reset_mask, cur, obs)
                    for p in driven:
                        p.reset(reset_mask, obs)
                for p in driven:
                    p.observe(obs, ~reset_mask)
            else:
                for p in driven:
                    p.observe(obs, None)
    finally:
        bar.close()
        venv.close()
    results.sort(key=lambda r: r["seed"])
    k = sum(r["success"] for r in results)
    lo, hi = wilson_interval(k, len(results))
    lengths = [r["length"] for r in results if r["length"] is not None]
    succ_len = [r["length"] for r in results if r["success"] and r["length"] is not None]
    return {"task": task, "backend": built_backend, "task_config": task_config, "episodes": len(results), "successes": int(k),
            "success_rate": k / len(results),
            "ci95": [lo, hi], "mean_length": float(np.mean(lengths)) if lengths else None,
            "mean_success_length": float(np.mean(succ_len)) if succ_len else None,
            "seed_range": [seed_start, seed_start + n_episodes - 1],
            "residual": residual is not None or getattr(policy, "has_residual", False),
            "worker_restarts": int(getattr(venv, "restarts", 0)), "per_episode": results}


def record_videos(base, task: str, out_dir: str | Path, *, residual=None, seeds=(EVAL_SEED_START,),
                  task_kwargs: dict | None = None, fps: int = 10, prefix: str = "rollout", policy=None,
                  backend: str = "mujoco", env_kwargs: dict | None = None) -> list[str]:
    """Roll out the given seeds in-process, rendering the front camera, and write one mp4 per episode.
    ``policy``: a one-env reset/observe/act object used instead of ``CombinedPolicy(base, residual, 1)``;
    ``backend`` / ``env_kwargs`` as in :func:`evaluate`."""
    import imageio.v2 as imageio

    env_kwargs = dict(env_kwargs or {})
    backend = env_kwargs.pop("backend", backend)
    env_kwargs.pop("ray", None)  # videos render in this process
    if base is not None:
        env_kwargs = env_kwargs_for(base.config, task, task_kwargs, env_kwargs)
    env = make_env(task, backend, task_kwargs=task_kwargs, **env_kwargs)
    pol = policy if policy is not None else CombinedPolicy(base, residual, 1)
    paths = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    one = np.ones(1, dtype=bool)
    for s in seeds:
        o, _ = env.reset(seed=int(s))
        batch = lambda o: {k: v[None] for k, v in o.items()}
        pol.reset(one, batch(o))
        frames = [env.render()]
        while True:
            o, _, term, trunc, info = env.step(pol.act(batch(o))[0])
            frames.append(env.render())
            if term or trunc:
                break
            pol.observe(batch(o), None)
        tag = "success" if info["success"] else "failure"
        p = out / f"{prefix}_seed{s}_{tag}.mp4"
        imageio.mimwrite(p, frames, fps=fps, macro_block_size=8)
        paths.append(str(p))
    env.close()
    return paths


def plot_learning_curve(curve: list[dict], path: str | Path, base_rate: float | None = None,
                        final: dict | None = None, label: str = "residual", others: dict | None = None) -> str:
    """Learning curves as a PNG with two panels, success rate vs env steps and vs wall time (minutes):
    training-episode success (exploring policy) and, where the rows have it, validation success (deterministic).

    Args:
        curve: rows with ``env_steps``, ``wall_s``, ``success_rate`` [, ``val_success``] (PPO or TD3 curves).
        label: the curve's name (e.g. ``"residual TD3"``); ``others``: {label: curve} drawn on the same axes,
            e.g. a PPO run on the same base for comparison.
        base_rate: the frozen base's evaluation success (dashed line); ``final``: an :func:`evaluate` result of
            the trained residual, drawn with its Wilson interval at the last step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    runs = {label: curve, **(others or {})}
    for ax, xkey, xlabel in ((axes[0], "env_steps", "env steps"), (axes[1], "wall_s", "wall time (min)")):
        for c, (name, rows) in enumerate(runs.items()):
            scale = 1 / 60 if xkey == "wall_s" else 1
            x = [r[xkey] * scale for r in rows]
            y = [r["success_rate"] for r in rows]
            ax.plot(x, y, color=f"C{c}", alpha=0.45, label=f"{name}: training episodes (exploring)")
            val = [(r[xkey] * scale, r["val_success"]) for r in rows if r.get("val_success") is not None]
            if val:
                ax.plot(*zip(*val), "o-", color=f"C{c}", ms=3, label=f"{name}: validation (deterministic)")
        if base_rate is not None:
            ax.axhline(base_rate, color="gray", ls="--", label=f"frozen base (eval) {base_rate:.2f}")
        if final is not None and curve:
            xf = curve[-1][xkey] * (1 / 60 if xkey == "wall_s" else 1)
            ax.errorbar([xf], [final["success_rate"]], yerr=[[final["success_rate"] - final["ci95"][0]],
                        [final["ci95"][1] - final["success_rate"]]], fmt="s", color="C3", capsize=4,
                        label=f"base + residual (eval) {final['success_rate']:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate")
    axes[1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def robot_learning_report(store, out_dir: str | Path, control_rate_hz: float = 10.0, window: int = 10) -> dict:
    """The report of learning on a robot (``robot-rl learn``): from the episodes a learner committed to ``store``
    (in commit order: source ``policy``, with ``intervention`` and ``residual_version`` per step), against robot
    time = cumulative control steps / ``control_rate_hz`` (minutes of interaction; resets and labelling excluded).

    Writes ``<out>/robot_learning.png`` (four panels against robot time: success rate over the last ``window``
    episodes, the share of steps a human drove per episode, episode length, residual weight version) and
    ``<out>/robot_learning.md``. Returns {episodes, robot_minutes, successes, intervention_steps, steps,
    last_window_success, per_episode: [{success, length, interventions, version, robot_min}]}. Raises ConfigError
    for a store without episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robot_rl.datasets.store import ZarrStore

    st = store if isinstance(store, ZarrStore) else ZarrStore.open(store)
    if st.n_episodes == 0:
        raise ConfigError("store", f"{st.path} holds no episode", "label at least one episode")
    rows, t = [], 0.0
    for i, m in enumerate(st.episodes_meta()):
        e = st.get_episode(i, keys=["intervention", "residual_version"])
        n = len(e["intervention"])
        t += n / control_rate_hz / 60.0
        rows.append({"success": bool(m["success"]), "length": n, "interventions": int(e["intervention"].sum()),
                     "version": int(e["residual_version"].max()), "robot_min": t})
    succ = np.array([r["success"] for r in rows], float)
    rolling = [float(succ[max(0, k + 1 - window):k + 1].mean()) for k in range(len(rows))]
    x = [r["robot_min"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    panels = ((rolling, f"success (last {window} episodes)"),
              ([r["interventions"] / r["length"] for r in rows], "intervention rate (steps)"),
              ([r["length"] for r in rows], "episode length (steps)"),
              ([r["version"] for r in rows], "residual weight version"))
    for ax, (y, name) in zip(axes, panels):
        ax.plot(x, y, "o-", ms=3)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.02)
    axes[-1].set_xlabel(f"robot time (min of control at {control_rate_hz:g} Hz)")
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "robot_learning.png", dpi=110)
    plt.close(fig)
    summary = {"episodes": len(rows), "robot_minutes": round(t, 2), "successes": int(succ.sum()),
               "steps": int(sum(r["length"] for r in rows)),
               "intervention_steps": int(sum(r["interventions"] for r in rows)),
               "last_window_success": rolling[-1], "per_episode": rows}
    (out / "robot_learning.md").write_text("\n".join([
        "# Learning on the robot", "",
        f"{summary['episodes']} labelled episodes, {summary['steps']} control steps = {summary['robot_minutes']} "
        f"min of robot time at {control_rate_hz:g} Hz; {summary['successes']} successes; "
        f"{summary['intervention_steps']} human-driven steps; success over the last {window} episodes "
        f"{rolling[-1]:.2f}.", "", "![robot learning](robot_learning.png)", ""]))
    return summary


def paired_test(a: list[dict], b: list[dict]) -> dict:
    """Exact McNemar test (two-sided binomial test on the discordant pairs; McNemar 1947) of two policies evaluated
    on the SAME episode seeds: ``a`` and ``b`` are ``per_episode`` lists of :func:`evaluate` ({seed, success, ...}).

    Returns {episodes, both, neither, only_a, only_b, p_value}. Raises ConfigError when the seeds differ."""
    sa, sb = {r["seed"]: bool(r["success"]) for r in a}, {r["seed"]: bool(r["success"]) for r in b}
    if set(sa) != set(sb):
        raise ConfigError("paired_test", "the two evaluations ran on different seeds",
                          "evaluate both policies on the same seed range")
    only_a = sum(sa[s] and not sb[s] for s in sa)
    only_b = sum(sb[s] and not sa[s] for s in sa)
    both = sum(sa[s] and sb[s] for s in sa)
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"episodes": len(sa), "both": both, "neither": len(sa) - both - only_a - only_b, "only_a": only_a,
            "only_b": only_b, "p_value": float(p)}


def over_seeds(rates, reps: int = 2_000, seed: int = 0) -> dict:
    """Success over training seeds as Agarwal et al. 2021 ("Deep Reinforcement Learning at the Edge of the
    Statistical Precipice") recommend, computed with their ``rliable`` library: the interquartile mean (IQM) and the
    mean, each with a 95 % stratified bootstrap confidence interval over runs (percentile method, ``reps``
    resamples, a RandomState seeded ``seed``; with one task the strata are the runs themselves). 2 000 resamples
    is Efron & Tibshirani's count for percentile intervals; with a handful of seeds there are few distinct resamples
    and 20 000 gave the same intervals at 10x the time.

    Args: rates: one held-out success rate per training seed (in [0, 1]).
    Returns {n_seeds, rates, iqm, iqm_ci95, mean, mean_ci95, std (sample s.d., 0 for one seed)}. Raises
    ConfigError for no rates or a rate outside [0, 1].
    """
    from rliable import library as rly
    from rliable import metrics

    r = np.asarray(list(rates), dtype=np.float64)
    if r.size == 0 or not np.all((r >= 0) & (r <= 1)):
        raise ConfigError("rates", f"{r.tolist()} is not a non-empty list of success rates in [0, 1]",
                          "train and evaluate at least one seed")
    with warnings.catch_warnings():  # arch's notice that it will move from RandomState to Generator
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(
            {"run": r[:, None]}, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]),
            reps=reps, random_state=np.random.RandomState(seed))
    (iqm, mean), lo_hi = point["run"], ci["run"]
    return {"n_seeds": int(r.size), "rates": r.tolist(), "iqm": float(iqm),
            "iqm_ci95": [float(lo_hi[0, 0]), float(lo_hi[1, 0])], "mean": float(mean),
            "mean_ci95": [float(lo_hi[0, 1]), float(lo_hi[1, 1])],
            "std": float(r.std(ddof=1)) if r.size > 1 else 0.0}


def write_report(out_dir: str | Path, results: dict[str, dict], extra: dict | None = None) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` (a table of success rates with Wilson intervals), and
    ``eval_per_episode.json`` (``{policy name: [{seed, success, length}, ...]}``) when the results carry
    ``per_episode``. Returns the paths of the first two."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "per_episode"} for k, v in results.items()}
    prov = provenance()
    payload = {"results": slim, **(extra or {}), "provenance": prov}
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=str))
    per_episode = {k: v["per_episode"] for k, v in results.items() if "per_episode" in v}
    if per_episode:
        (out / "eval_per_episode.json").write_text(json.dumps(per_episode))
    lines = ["# robot_rl evaluation report", ""]
    for k, v in (extra or {}).items():
        if isinstance(v, (str, int, float)):
            lines.append(f"- **{k}**: {v}")
    lines += ["", "| policy | task | episodes (seeds) | success | 95 % Wilson CI | mean length (steps) |",
              "|---|---|---|---|---|---|"]
    for name, r in slim.items():
        lines.append(f"| {name} | {r['task']} | {r['episodes']} ({r['seed_range'][0]}–{r['seed_range'][1]}) | "
                     f"{r['success_rate']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{r['mean_length']:.1f} |")
    for name, r in slim.items():
        pt = r.get("paired_vs_base")
        if pt:
            lines += ["", f"Paired test, {name} vs the base on the same {pt['episodes']} seeds (exact McNemar): "
                          f"{pt['only_b']} episodes succeed only with the residual, {pt['only_a']} only without; "
                          f"p = {pt['p_value']:.2g}."]
    configs = {json.dumps(r["task_config"], sort_keys=True) for r in slim.values() if "task_config" in r}
    for c in sorted(configs):
        lines += ["", "Task settings (as the envs were built): " + ", ".join(
            f"`{k}={v}`" for k, v in json.loads(c).items() if k not in ("derived_keys",))]
    backends = sorted({r["backend"] for r in slim.values() if "backend" in r})
    if backends:
        lines += ["", "Simulator: " + ", ".join(backends)]
    g, v, c = prov["git"], prov["versions"], prov["cpu"]
    lines += ["", f"Measured on commit `{(g['commit'] or 'unknown')[:12]}`{' (uncommitted changes)' if g['dirty'] else ''}"
              f", torch {v['torch']}, numpy {v['numpy']}, mujoco {v['mujoco']}, CPU {c['model']} (family "
              f"{c['family']} model {c['model_number']}, OpenBLAS {prov['openblas_core']}); results are bit-for-bit "
              "reproducible only with the same code, libraries and CPU kernels (provenance in report.json)."]
    for p in (extra or {}).get("figures", []):
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    vids = (extra or {}).get("videos", [])
    if vids:
        lines += ["", "Videos: " + ", ".join(f"[{Path(v).name}]({Path(v).relative_to(out) if Path(v).is_relative_to(out) else v})" for v in vids)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return str(out / "report.json"), str(out / "report.md")
