"""The main job end to end: scripted demos -> zarr store -> frozen base (diffusion or BC) -> residual PPO ->
report.

Presets: ``quick`` (a few minutes on 2 CPU cores; proves the plumbing, not the numbers), ``full`` (MLP BC base) and
``full-diffusion`` (Diffusion Policy base) — the README's precision-task figures. Any field can be overridden from a YAML file or ``--set key=value``.
Every run writes its resolved config to ``<out>/config.yaml``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import yaml

from robot_rl.errors import ConfigError
from robot_rl.stages.train_base import DEFAULT_OBS_KEYS

_PLACE_KEYS = DEFAULT_OBS_KEYS["place"]  # pinned into the presets, so a later default change keeps their figures
PRESETS = {
    # the README's precision-task acceptance run: MLP BC base + residual PPO, place at 4 mm
    "full": {
        "task": "place", "task_kwargs": {"tolerance": 0.004}, "seed": 0,
        "collect": {"episodes": 100, "noise": 0.3, "bias": 0.0},
        "base": {"kind": "bc", "steps": 4000, "batch_size": 256, "lr": 1e-3, "obs_keys": list(_PLACE_KEYS)},
        "residual": {"total_env_steps": 600_000, "n_envs": 8, "n_steps": 100, "align_chunks": False},
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    # the same job on the frozen Diffusion Policy base (goal-relative cube_to_target in its observation, bias-style
    # demos, 5 DDIM steps, residual L2 penalty); README figures: 0.305 -> 0.920 at 4 mm in 54.7 min
    "full-diffusion": {
        "task": "place", "task_kwargs": {"tolerance": 0.004}, "seed": 0,
        "collect": {"episodes": 100, "noise": 0.05, "bias": 0.003},
        "base": {"kind": "diffusion", "steps": 6000, "batch_size": 256, "lr": 1e-3,
                 "obs_keys": [*_PLACE_KEYS, "cube_to_target"],
                 "policy": {"down_dims": [32, 64, 128], "num_inference_steps": 5}},
        "residual": {"total_env_steps": 1_100_000, "n_envs": 8, "n_steps": 100, "residual_l2": 0.1},
        "eval": {"episodes": 200, "n_envs": 4, "videos": 3},
    },
    "quick": {
        "task": "place", "task_kwargs": {}, "seed": 0,
        "collect": {"episodes": 20, "noise": 0.3, "bias": 0.0},
        "base": {"kind": "diffusion", "steps": 300, "batch_size": 64, "policy": {"down_dims": [32, 64, 128]}},
        "residual": {"total_env_steps": 8_000, "n_envs": 4, "n_steps": 100},
        "eval": {"episodes": 20, "n_envs": 4, "videos": 1},
    },
}


OPEN_SECTIONS = ("base", "residual", "policy", "task_kwargs")  # free keys, checked by their dataclasses


def _merge(a: dict, b: dict, path: str = "") -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if k not in out and path.rstrip(".").split(".")[-1] not in OPEN_SECTIONS:
            raise ConfigError(f"{path}{k}", "unknown pipeline config key", f"use one of {sorted(out)}")
        if k not in out:
            out[k] = v
            continue
        out[k] = _merge(out[k], v, f"{path}{k}.") if isinstance(out[k], dict) and isinstance(v, dict) and out[k] else v
    return out


def resolve_config(preset: str = "quick", yaml_path: str | None = None, overrides: list[str] = ()) -> dict:
    """Preset <- YAML file <- ``key.sub=value`` overrides (values parsed as YAML scalars)."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}", f"choose one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError("config", f"{p} not found", "pass an existing YAML file")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{p} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax")
        if not isinstance(doc, dict):
            raise ConfigError("config", f"{p} holds a {type(doc).__name__}, not a mapping of sections",
                              "write e.g. 'residual: {total_env_steps: 600000}'")
        cfg = _merge(cfg, doc)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError("--set", f"{ov!r} is not key=value", "write e.g. --set residual.n_envs=8")
        key, val = ov.split("=", 1)
        node = {}
        cur = node
        parts = key.split(".")
        for part in parts[:-1]:
            cur[part] = {}
            cur = cur[part]
        try:
            cur[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError:
            raise ConfigError("--set", f"{ov!r}: the value is not YAML", "write e.g. --set residual.n_envs=8 or "
                              "--set base.policy.down_dims=[32,64,128]") from None
        cfg = _merge(cfg, node)
    for k, v in PRESETS[preset].items():  # a section replaced by a scalar would fail deep inside a stage
        if isinstance(v, dict) and not isinstance(cfg.get(k), dict):
            raise ConfigError(k, f"is {cfg.get(k)!r}, not a mapping of fields", f"set its fields, e.g. --set "
                              f"{k}.{next(iter(v), 'field')}=...")
    return cfg


def validate_config(cfg: dict) -> None:
    """Check every section before any work starts (ConfigError naming the field)."""
    from robot_rl.rl.ppo import PPOConfig
    from robot_rl.envs.tasks import make_task
    from robot_rl.stages.train_base import BaseTrainConfig

    make_task(cfg["task"], **cfg["task_kwargs"])
    for name, cls in (("base", BaseTrainConfig), ("residual", PPOConfig)):
        fields = cls.__dataclass_fields__
        bad = [k for k in cfg[name] if k not in fields]
        if bad:
            raise ConfigError(f"{name}.{bad[0]}", "unknown field", f"use one of {', '.join(fields)}")
    PPOConfig(**cfg["residual"]).validate()
    _check_base_config(cfg)
    for sec, key in (("collect", "episodes"), ("eval", "episodes"), ("eval", "n_envs"), ("base", "steps")):
        v = cfg[sec].get(key, 1)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{sec}.{key}", f"{v!r} is not a positive integer", "use e.g. 20")


def _check_base_config(cfg: dict) -> None:
    """Build the base policy's config from the task's observation dims now, so that an impossible policy setting
    (e.g. a horizon the U-Net cannot halve) fails before demonstrations are collected over an existing run."""
    from robot_rl.envs.env import ROBOT_OBS_DIMS
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.envs.tasks import make_task
    from robot_rl.stages.train_base import DEFAULT_OBS_KEYS, BaseTrainConfig

    b = BaseTrainConfig(**cfg["base"])
    if b.image_keys:
        raise ConfigError("base.image_keys", "the pipeline collects state-only demonstrations",
                          "for an image policy run robot-rl collect --cameras ..., then train-base --image-keys ...")
    dims = {**ROBOT_OBS_DIMS, **make_task(cfg["task"], **cfg["task_kwargs"]).obs_dims()}
    keys = list(b.obs_keys or DEFAULT_OBS_KEYS.get(cfg["task"], []))
    for k in keys:
        if k not in dims:
            raise ConfigError(f"base.obs_keys.{k}", f"task {cfg['task']!r} has no observation {k!r}",
                              f"use keys from {sorted(dims)}")
    PolicyConfig.from_dict({"kind": b.kind, "obs_keys": keys, "obs_dims": {k: dims[k] for k in keys},
                            "action_dim": 5, **b.policy})


def run_pipeline(cfg: dict, out_dir: str | Path, progress: bool = True) -> dict:
    """Run all stages; returns the report dict (also written to ``<out>/report.{json,md}``)."""
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.stages.collect import collect
    from robot_rl.stages.evaluation import evaluate, plot_learning_curve, record_videos, write_report, EVAL_SEED_START
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import save_residual
    from robot_rl.rl.ppo import PPOConfig, train_residual
    from robot_rl.stages.train_base import BaseTrainConfig, train_base

    validate_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    task, tk, seed = cfg["task"], cfg["task_kwargs"], cfg["seed"]
    writer = SummaryWriter(str(out / "tb"))
    timings, t0 = {}, time.time()

    t = time.time()
    col = collect(out / "demos.zarr", task, cfg["collect"]["episodes"], seed=seed, noise=cfg["collect"]["noise"],
                  bias=cfg["collect"]["bias"], overwrite=True, progress=progress)
    timings["collect_s"] = time.time() - t

    t = time.time()
    bcfg = BaseTrainConfig(seed=seed, **cfg["base"])
    tb = train_base(out / "demos.zarr", out / "base", bcfg, writer=writer, progress=progress)
    base = load_policy(tb["checkpoint"])
    timings["train_base_s"] = time.time() - t

    ev = cfg["eval"]
    t = time.time()
    r_base = evaluate(base, task, n_episodes=ev["episodes"], n_envs=ev["n_envs"], task_kwargs=tk, seed=seed,
                      progress=progress, desc="eval base")
    timings["eval_base_s"] = time.time() - t
    # the base's figure is useful before the long residual stage: print it and keep it on disk now
    (out / "base_eval.json").write_text(json.dumps({k: v for k, v in r_base.items() if k != "per_episode"}, indent=1))
    if progress:
        print(f"base ({base.config.kind}): success {r_base['success_rate']:.3f} 95% CI [{r_base['ci95'][0]:.3f}, "
              f"{r_base['ci95'][1]:.3f}] over {r_base['episodes']} episodes", flush=True)

    t = time.time()
    pcfg = PPOConfig(seed=seed, **cfg["residual"])
    res, curve = train_residual(base, task, pcfg, out / "residual", task_kwargs=tk, writer=writer, progress=progress)
    save_residual(res, out / "residual" / "checkpoint", extra={"base_checkpoint": tb["checkpoint"]})
    timings["train_residual_s"] = time.time() - t

    t = time.time()
    r_res = evaluate(base, task, residual=res, n_episodes=ev["episodes"], n_envs=ev["n_envs"], task_kwargs=tk,
                     seed=seed, progress=progress, desc="eval base+residual")
    timings["eval_residual_s"] = time.time() - t
    seeds = [EVAL_SEED_START + i for i in range(ev["videos"])]
    videos = record_videos(base, task, out / "videos", seeds=seeds, task_kwargs=tk, prefix="base")
    videos += record_videos(base, task, out / "videos", residual=res, seeds=seeds, task_kwargs=tk, prefix="residual")
    fig = plot_learning_curve(curve, out / "learning_curve.png", base_rate=r_base["success_rate"], final=r_res)
    timings["total_s"] = time.time() - t0
    writer.close()
    extra = {"task": task, "demos": col["episodes"], "expert_success_rate": col["expert_success_rate"],
             "residual_env_steps": curve[-1]["env_steps"], "wall_time_min": round(timings["total_s"] / 60, 1),
             "timings_s": {k: round(v, 1) for k, v in timings.items()}, "figures": [fig], "videos": videos}
    results = {f"base ({base.config.kind})": r_base, "base + residual": r_res}
    write_report(out, results, extra)
    return {"results": results, **extra}
