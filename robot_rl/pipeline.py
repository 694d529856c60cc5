"""The main job end to end: scripted demos -> zarr store -> frozen base (diffusion or BC) -> residual PPO ->
report.

Presets: ``quick`` (a few minutes on 2 CPU cores; proves the plumbing, not the numbers), ``full`` (MLP BC base) and
``full-diffusion`` (Diffusion Policy base) — the README's precision-task figures. A preset is one layer of
:func:`robot_rl.config.resolve` (dataclass defaults <- preset <- ``--config`` YAML <- ``--set section.field=V``), so
every field of every section can be overridden. Every run writes its resolved config to ``<out>/config.yaml``.

Model selection: the residual is validated every ``ppo.val_every`` env steps on seeds from
:data:`~robot_rl.envs.vector.VAL_SEED_START` (disjoint from training and evaluation seeds); the last and the
best-on-validation residual are both evaluated on the held-out evaluation seeds (the last is the headline row).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from robot_rl.config import OFFPOLICY_ALGOS, Config, resolve, write_config
from robot_rl.errors import ConfigError
from robot_rl.stages.train_base import DEFAULT_OBS_KEYS

_PLACE_KEYS = DEFAULT_OBS_KEYS["place"]  # pinned into the presets, so a later default change keeps their figures
# TD3 settings of the off-policy presets, sized for a 2-core CPU: ResFiT's 10 LayerNorm Q heads, n = 3, critic lr
# 1e-4, batch 256 and alpha 0.1 (robot_rl.rl.td3.TD3Config), with fewer updates per env step than ResFiT's GPU runs
TD3_CPU = {"n_envs": 8, "utd_ratio": 0.25, "learning_starts": 5_000, "critic_warmup_updates": 2_000,
           "val_every": 10_000, "val_episodes": 50, "explore_std_final": 0.15}


def _decay_to_end(td3: dict) -> dict:
    """``td3`` with the exploration noise decaying from ``learning_starts`` to the run's last step (README, residual
    TD3: 3 seeds at 100 k steps, IQM 0.945 with the decay against 0.923 without)."""
    return dict(td3, explore_decay_steps=td3["total_env_steps"] - td3["learning_starts"])


PRESETS = {
    # the README's precision-task acceptance run: MLP BC base + residual PPO, place at 4 mm (demos at the default
    # 1 cm: collect.nominal_task)
    "full": {
        "task": {"name": "place", "tolerance": 0.004}, "seed": 0,
        "collect": {"episodes": 100, "noise": 0.3, "bias": 0.0, "nominal_task": True},
        "base": {"kind": "bc", "steps": 4000, "batch_size": 256, "lr": 1e-3, "obs_keys": list(_PLACE_KEYS)},
        "ppo": {"total_env_steps": 600_000, "n_envs": 8, "n_steps": 100, "align_chunks": False},
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    # the same job on the frozen Diffusion Policy base (goal-relative cube_to_target in its observation, bias-style
    # demos, 5 DDIM steps, residual L2 penalty); its figures are in the README
    "full-diffusion": {
        "task": {"name": "place", "tolerance": 0.004}, "seed": 0,
        "collect": {"episodes": 100, "noise": 0.05, "bias": 0.003, "nominal_task": True},
        "base": {"kind": "diffusion", "steps": 6000, "batch_size": 256, "lr": 1e-3,
                 "obs_keys": [*_PLACE_KEYS, "cube_to_target"]},
        "policy": {"down_dims": [32, 64, 128], "num_inference_steps": 5},
        "ppo": {"total_env_steps": 1_100_000, "n_envs": 8, "n_steps": 100, "residual_l2": 0.1},
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    # the off-policy acceptance run: residual TD3 (ResFiT) on the `full` preset's demos and MLP BC base, place at
    # 4 mm; critics and UTD sized for a 2-core CPU (robot_rl.rl.td3.TD3Config). No demo side: of these noise-0.3
    # demos' steps, fewer than 30 of 6 574 are within the residual's reach of the base (docs/MEASUREMENTS.md), too
    # few for RLPD's 50/50 batches.
    "full-offpolicy": {
        "task": {"name": "place", "tolerance": 0.004}, "seed": 0, "algo": "td3",
        "collect": {"episodes": 100, "noise": 0.3, "bias": 0.0, "nominal_task": True},
        "base": {"kind": "bc", "steps": 4000, "batch_size": 256, "lr": 1e-3, "obs_keys": list(_PLACE_KEYS)},
        "td3": _decay_to_end(dict(TD3_CPU, total_env_steps=100_000, demo_ratio=0.0)),
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    # the same on the frozen Diffusion Policy base of full-diffusion, with the demo side (RLPD 50/50): its demos
    # are collected at the training task (4 mm), so their success flags are the demo side's rewards
    # (robot_rl.rl.replay.demo_buffer). Not measured yet.
    "full-diffusion-offpolicy": {
        "task": {"name": "place", "tolerance": 0.004}, "seed": 0, "algo": "td3",
        "collect": {"episodes": 100, "noise": 0.05, "bias": 0.003, "nominal_task": False},
        "base": {"kind": "diffusion", "steps": 6000, "batch_size": 256, "lr": 1e-3,
                 "obs_keys": [*_PLACE_KEYS, "cube_to_target"]},
        "policy": {"down_dims": [32, 64, 128], "num_inference_steps": 5},
        "td3": _decay_to_end(dict(TD3_CPU, total_env_steps=150_000)),
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    # the image run of issue 16: a BC base from front + wrist 96x96 images and proprioception (no object pose) on
    # the `full` preset's kind of demos, and a TD3 residual reading the same cameras (the features of a frozen copy
    # of the base's image encoder, robot_rl.rl.residual), place at 1 cm; the encoder of the distillation student
    "full-image-offpolicy": {
        "task": {"name": "place", "tolerance": 0.01}, "seed": 0, "algo": "td3",
        "env": {"cameras": ["front", "wrist"], "image_size": [96, 96]},
        "collect": {"episodes": 100, "noise": 0.3, "bias": 0.0, "nominal_task": True},
        # one observation frame (n_obs_steps 1, as robomimic's image BC): half the encoder work of two frames;
        # 4000 steps at batch 64 took 47 min on this 2-core host
        "base": {"kind": "bc", "steps": 4000, "batch_size": 64, "lr": 5e-4,
                 "obs_keys": ["ee_pos", "ee_quat", "gripper_width"], "image_keys": ["image_front", "image_wrist"]},
        "policy": {"image_channels": [16, 32, 64], "image_crop": [88, 88], "bc_hidden": [256, 256],
                   "n_obs_steps": 1},
        # validation every 25 k steps: each one renders 50 episodes of both cameras
        "td3": _decay_to_end(dict(TD3_CPU, total_env_steps=100_000, demo_ratio=0.0, val_every=25_000)),
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    "quick": {
        "task": {"name": "place"}, "seed": 0,
        "collect": {"episodes": 20, "noise": 0.3, "bias": 0.0, "nominal_task": True},
        "base": {"kind": "diffusion", "steps": 300, "batch_size": 64},
        "policy": {"down_dims": [32, 64, 128]},
        "ppo": {"total_env_steps": 8_000, "n_envs": 4, "n_steps": 100},
        "eval": {"episodes": 20, "n_envs": 4, "videos": 1},
    },
}


def resolve_config(preset: str = "quick", files=(), overrides=(), flags: dict | None = None) -> Config:
    """The pipeline's config: dataclass defaults <- ``PRESETS[preset]`` <- YAML ``files`` <- ``flags`` <-
    ``overrides`` (``section.field=value``), checked (:func:`validate_config`). Raises ConfigError."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}", f"choose one of {', '.join(PRESETS)}")
    files = [files] if isinstance(files, (str, Path)) else list(files or ())
    cfg = resolve("pipeline", preset=PRESETS[preset], files=files, flags=flags, sets=list(overrides))
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Checks beyond :func:`robot_rl.config.resolve`'s, before any work starts: the base policy's config is built
    from the task's observation dims now, so that an impossible policy setting (e.g. a horizon the U-Net cannot
    halve) fails before demonstrations are collected over an existing run. Raises ConfigError naming the field."""
    from robot_rl.envs.env import ROBOT_OBS_DIMS
    from robot_rl.envs.tasks import make_task
    from robot_rl.policies.base import PolicyConfig

    b = cfg.base_config()
    for k in ("steps", "batch_size"):
        if getattr(b, k) < 1:
            raise ConfigError(f"base.{k}", f"{getattr(b, k)} < 1", "use a positive integer")
    cams = list(cfg.env.cameras or [])
    missing = [k for k in b.image_keys if k.removeprefix("image_") not in cams]
    if missing:
        raise ConfigError("env.cameras", f"{cams} lacks the cameras of base.image_keys {missing}: the demonstrations "
                          "would have no such images", "add them, e.g. --set env.cameras=[front,wrist]")
    task = cfg.task.name
    dims = {**ROBOT_OBS_DIMS, **make_task(task, **cfg.task.kwargs).obs_dims()}
    keys = list(b.obs_keys or DEFAULT_OBS_KEYS.get(task, []))
    for k in keys:
        if k not in dims:
            raise ConfigError(f"base.obs_keys.{k}", f"task {task!r} has no observation {k!r}",
                              f"use keys from {sorted(dims)}")
    size = list(cfg.env.image_size or (96, 96))  # collect's default image size
    PolicyConfig.from_dict({**b.policy, "kind": b.kind, "obs_keys": keys, "obs_dims": {k: dims[k] for k in keys},
                            "action_dim": 5, "image_keys": list(b.image_keys),
                            "image_shape": [*size, 3] if b.image_keys else None})


def collect_args(cfg: Config) -> dict:
    """Keyword arguments of :func:`robot_rl.stages.collect.collect` (all but the store path, ``overwrite`` and
    ``progress``) from the config's seed, task, env, randomization and collect sections."""
    c, env = cfg.collect, cfg.env_kwargs(randomization=False)
    kw = {k: env.pop(k) for k in ("cameras", "image_size") if k in env}
    return dict(task=cfg.task.name, n_episodes=c.episodes, seed=cfg.seed, noise=c.noise, bias=c.bias,
                only_success=c.only_success, max_attempts=c.max_attempts, n_envs=c.n_envs, backend=cfg.env.backend,
                randomization=cfg.randomization.spec(), task_kwargs=None if c.nominal_task else cfg.task.kwargs,
                env_kwargs=env, **kw)


def make_validator(base, cfg: Config, desc: str = "validate"):
    """``validate(residual, n_episodes) -> success rate`` for :func:`robot_rl.rl.ppo.train_residual`: the base +
    ``residual`` evaluated (residual mean action) on ``n_episodes`` seeds from
    :data:`~robot_rl.envs.vector.VAL_SEED_START` — disjoint from demonstration, training and evaluation seeds — with
    ``eval.n_envs`` workers and the config's task, env and randomization."""
    from robot_rl.envs.vector import VAL_SEED_START
    from robot_rl.stages.evaluation import evaluate

    def validate(residual, n_episodes: int) -> float:
        r = evaluate(base, cfg.task.name, residual=residual, n_episodes=n_episodes, n_envs=cfg.eval.n_envs,
                     seed_start=VAL_SEED_START, task_kwargs=cfg.task.kwargs, env_kwargs=cfg.env_kwargs(backend=True),
                     seed=cfg.seed, progress=False, desc=desc)
        return r["success_rate"]

    return validate


def train_residual_for(cfg: Config, base, out_dir: str | Path, *, demos=None, writer=None, progress: bool = True,
                       checkpoint_extra: dict | None = None, resume: bool = False):
    """Train the residual with the config's learner (``algo``: :func:`robot_rl.rl.ppo.train_residual`, or for td3
    and sac :func:`robot_rl.rl.offpolicy.train_residual_offpolicy`, whose demo side reads ``demos``; with
    ``td3.actors`` > 0 TD3's actor-learner split :func:`robot_rl.serve.learner.train_residual_td3_actors`), validated
    on :data:`~robot_rl.envs.vector.VAL_SEED_START` seeds when the learner's ``val_every`` is set. Returns
    (residual, learning curve). ``resume``: off-policy runs only (ConfigError for PPO)."""
    kw = dict(residual=cfg.residual_config(), task_kwargs=cfg.task.kwargs, env_kwargs=cfg.env_kwargs(backend=True),
              writer=writer, progress=progress, checkpoint_extra={**(checkpoint_extra or {}), "algo": cfg.algo})
    if cfg.algo in OFFPOLICY_ALGOS:
        from robot_rl.rl.offpolicy import train_residual_offpolicy
        from robot_rl.serve.learner import train_residual_td3_actors

        opc = cfg.offpolicy_config()
        train = train_residual_td3_actors if getattr(opc, "actors", 0) else train_residual_offpolicy
        return train(base, cfg.task.name, opc, out_dir, demos=demos,
                     validate=make_validator(base, cfg) if opc.val_every else None, resume=resume, **kw)
    from robot_rl.rl.ppo import train_residual

    if resume:
        raise ConfigError("resume", "PPO runs do not resume", "resume a td3 or sac run, or start the PPO run again")
    ppo = cfg.ppo_config()
    return train_residual(base, cfg.task.name, ppo, out_dir, validate=make_validator(base, cfg) if ppo.val_every
                          else None, **kw)


def train_residual_seeds(cfg: Config, base, out_dir: str | Path, n_seeds: int, *, demos=None, progress: bool = True,
                         checkpoint_extra: dict | None = None, resume: bool = False) -> dict:
    """Train the residual with ``n_seeds`` training seeds (``cfg.seed``, +1, ...; each into ``<out>/seed_<s>``, as
    :func:`train_residual_for`), evaluate the base and every base + residual on the same held-out episodes
    (``eval.*``; the base's sampling seeded ``cfg.seed`` in all of them, so only the residual differs), and report:
    each seed's success with its Wilson interval and an exact McNemar test against the base, and over seeds the IQM
    and mean with 95 % stratified bootstrap intervals (:func:`robot_rl.stages.evaluation.over_seeds`, rliable). The
    same for each seed's ``checkpoint_best`` (best on the validation seeds, when validated), as "base + residual
    (best on validation), training seed S" and ``over_seeds_best_on_validation``; the last checkpoint stays the
    headline (``over_seeds``).

    Writes ``<out>/{report.json, report.md, eval_per_episode.json, learning_curves.png}``; returns the report
    dict. Raises ConfigError for ``n_seeds`` < 1 (and whatever the training raises)."""
    import dataclasses

    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.evaluation import evaluate, over_seeds, plot_learning_curve, write_report

    if not (isinstance(n_seeds, int) and n_seeds >= 1):
        raise ConfigError("train_seeds", f"{n_seeds!r} < 1", "train at least one seed, e.g. --train-seeds 3")
    out = Path(out_dir)
    ev, task, tk, env_kw = cfg.eval, cfg.task.name, cfg.task.kwargs, cfg.env_kwargs(backend=True)
    kw = dict(n_episodes=ev.episodes, n_envs=ev.n_envs, seed_start=ev.seed_start, task_kwargs=tk, env_kwargs=env_kw,
              seed=cfg.seed, progress=progress)
    r_base = evaluate(base, task, desc="eval base", **kw)
    if progress:
        print(_line(f"base ({base.config.kind})", r_base), flush=True)
    results, curves, times = {f"base ({base.config.kind})": r_base}, {}, {}
    for s in range(cfg.seed, cfg.seed + n_seeds):
        run = out / f"seed_{s}"
        t = time.time()
        writer = SummaryWriter(str(run / "tb"))
        try:
            res, curve = train_residual_for(dataclasses.replace(cfg, seed=s), base, run, demos=demos, writer=writer,
                                            progress=progress, checkpoint_extra=checkpoint_extra, resume=resume)
        finally:
            writer.close()
        times[s] = time.time() - t
        last = {f"base + residual, training seed {s}": res}
        if (run / "checkpoint_best").is_dir():
            last[f"base + residual (best on validation), training seed {s}"] = load_residual(run / "checkpoint_best",
                                                                                               base)
        results.update(_eval_residuals(base, task, r_base, last, kw, progress))
        results[f"base + residual, training seed {s}"]["train_wall_min"] = round(times[s] / 60, 2)
        curves[f"seed {s}"] = curve
    agg = over_seeds([r["success_rate"] for k, r in results.items() if k.startswith("base + residual, ")],
                     seed=cfg.seed)
    best = [r["success_rate"] for k, r in results.items() if k.startswith("base + residual (best on validation)")]
    first, *rest = curves
    name = f"residual {cfg.algo.upper()}"
    fig = plot_learning_curve(curves[first], out / "learning_curves.png", base_rate=r_base["success_rate"],
                              label=f"{name} {first}", others={f"{name} {k}": curves[k] for k in rest})
    extra = {"task": task, "algo": cfg.algo, "training_seeds": list(curves), "over_seeds": agg,
             "summary": f"{agg['n_seeds']} training seeds, last checkpoint: {_agg_line(agg)}", "figures": [fig]}
    if len(best) == n_seeds:  # every seed validated: the same over the checkpoints best on the validation seeds
        extra["over_seeds_best_on_validation"] = agg_best = over_seeds(best, seed=cfg.seed)
        extra["summary"] += f"; best on validation: {_agg_line(agg_best)}"
    extra["summary"] += f"; base {r_base['success_rate']:.3f}"
    write_report(out, results, extra)
    if progress:
        print(extra["summary"], flush=True)
    return {"results": results, **extra}


def _eval_residuals(base, task: str, r_base: dict, residuals: dict, kw: dict, progress: bool) -> dict:
    """Evaluate each {name: residual} on top of ``base`` on the held-out episodes ``kw`` (evaluate's keywords), with
    an exact McNemar test against the base's episodes ``r_base``; returns {name: result}."""
    from robot_rl.stages.evaluation import evaluate, paired_test

    out = {}
    for name, res in residuals.items():
        r = out[name] = evaluate(base, task, residual=res, desc=f"eval {name}", **kw)
        r["paired_vs_base"] = pt = paired_test(r_base["per_episode"], r["per_episode"])
        if progress:
            print(_line(name, r) + f"; vs base {pt['only_b']} won / {pt['only_a']} lost, McNemar p = "
                  f"{pt['p_value']:.2g}", flush=True)
    return out


def _agg_line(agg: dict) -> str:
    return (f"IQM {agg['iqm']:.3f} [{agg['iqm_ci95'][0]:.3f}, {agg['iqm_ci95'][1]:.3f}], mean {agg['mean']:.3f} ± "
            f"{agg['std']:.3f} (s.d.), 95 % stratified bootstrap intervals (rliable)")


def _line(name: str, r: dict) -> str:
    return (f"{name}: success {r['success_rate']:.3f} 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] over "
            f"{r['episodes']} episodes")


def run_pipeline(cfg: Config, out_dir: str | Path, progress: bool = True, argv=None) -> dict:
    """Run all stages; returns the report dict (also written to ``<out>/report.{json,md}``).

    Threads: demonstrations and base training run on torch's default thread count; from the first evaluation on
    (rollouts in subprocess env workers, which own the other cores) torch uses one thread, as the README's figures
    were measured. ``argv``: the command line, recorded in ``config.yaml``.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.collect import collect
    from robot_rl.stages.evaluation import evaluate, plot_learning_curve, record_videos, write_report
    from robot_rl.stages.train_base import train_base

    validate_config(cfg)
    out = Path(out_dir)
    write_config(cfg, out, argv)
    task, tk, seed, ev = cfg.task.name, cfg.task.kwargs, cfg.seed, cfg.eval
    env_kw = cfg.env_kwargs(backend=True)
    writer = SummaryWriter(str(out / "tb"))
    timings, t0 = {}, time.time()

    t = time.time()
    col = collect(out / "demos.zarr", **collect_args(cfg), overwrite=True, progress=progress)
    timings["collect_s"] = time.time() - t

    t = time.time()
    tb = train_base(out / "demos.zarr", out / "base", cfg.base_config(), writer=writer, progress=progress)
    base = load_policy(tb["checkpoint"])
    timings["train_base_s"] = time.time() - t

    torch.set_num_threads(1)  # the env workers own the other cores; OpenMP oversubscription is catastrophic
    t = time.time()
    kw = dict(n_episodes=ev.episodes, n_envs=ev.n_envs, seed_start=ev.seed_start, task_kwargs=tk, env_kwargs=env_kw,
              seed=seed, progress=progress)
    r_base = evaluate(base, task, desc="eval base", **kw)
    timings["eval_base_s"] = time.time() - t
    # the base's figure is useful before the long residual stage: print it and keep it on disk now
    (out / "base_eval.json").write_text(json.dumps({k: v for k, v in r_base.items() if k != "per_episode"}, indent=1))
    if progress:
        print(_line(f"base ({base.config.kind})", r_base), flush=True)

    t = time.time()
    res, curve = train_residual_for(cfg, base, out / "residual", demos=out / "demos.zarr", writer=writer,
                                    progress=progress, checkpoint_extra={"base_checkpoint": tb["checkpoint"]})
    timings["train_residual_s"] = time.time() - t

    t = time.time()
    residuals = {"base + residual": res}
    if (out / "residual" / "checkpoint_best").is_dir():
        residuals["base + residual (best on validation)"] = load_residual(out / "residual" / "checkpoint_best", base)
    results = {f"base ({base.config.kind})": r_base, **_eval_residuals(base, task, r_base, residuals, kw, progress)}
    r_res = results["base + residual"]
    timings["eval_residual_s"] = time.time() - t
    seeds = [ev.seed_start + i for i in range(ev.videos)]
    videos = record_videos(base, task, out / "videos", seeds=seeds, task_kwargs=tk, prefix="base", env_kwargs=env_kw)
    videos += record_videos(base, task, out / "videos", residual=res, seeds=seeds, task_kwargs=tk, prefix="residual",
                            env_kwargs=env_kw)
    fig = plot_learning_curve(curve, out / "learning_curve.png", base_rate=r_base["success_rate"], final=r_res,
                              label=f"residual {cfg.algo.upper()}")
    timings["total_s"] = time.time() - t0
    writer.close()
    extra = {"task": task, "demos": col["episodes"], "expert_success_rate": col["expert_success_rate"],
             "residual_env_steps": curve[-1]["env_steps"], "wall_time_min": round(timings["total_s"] / 60, 1),
             "timings_s": {k: round(v, 1) for k, v in timings.items()}, "figures": [fig], "videos": videos}
    write_report(out, results, extra)
    return {"results": results, **extra}
