"""``robot-rl`` command line: collect, train-base, train-residual, eval, transfer, distill, pipeline, store, serve,
learn, bringup.

Settings come from one resolver (:mod:`robot_rl.config`): dataclass defaults <- preset (pipeline) <- ``--config
FILE`` (repeatable) <- flags <- ``--set section.field=value`` (repeatable, values parsed as YAML). The flags
(``--task``, ``--episodes``, ``--n-envs``, ...) are shorthands for config fields (their help names the field) and
default to "not given". ``--print-config`` prints the resolved config and exits.

Bad input ends with one line ``robot-rl: error: <field>: <problem> -> <fix>`` and exit code 2; so does a file-system
error (``OSError``: permissions, a full disk, a file where a directory belongs), translated once in :func:`main` as
``robot-rl: error: <path>: <problem> -> <fix>``. ``train-base --out`` onto a directory that holds a run is refused
unless ``--overwrite`` (a plain CLI flag, not a config field: a config.yaml that reproduces a run must not replace one).
Every command that produces outputs writes its resolved config to ``<out>/config.yaml`` once its input has been
validated (a rejected run leaves an existing ``<out>`` as it was); ``--config`` of that file reproduces the run.
Threads: train-residual, eval, transfer and the pipeline's rollout stages run torch on one thread (the env workers
own the other cores); ``serve --threads N`` sets the server's.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path

from robot_rl.errors import ConfigError


class _Printed(Exception):
    """--print-config: the resolved config was printed; nothing runs."""


def _one_thread() -> None:
    """Entry-point choice for commands that roll out in subprocess env workers: torch on one thread (the workers
    own the other cores; OpenMP oversubscription is catastrophic)."""
    import torch

    torch.set_num_threads(1)


_ARGV: list[str] = []  # the command line of this run (main), recorded in config.yaml


def _argv() -> list[str]:
    return list(_ARGV)


def _shown(a, cfg):
    if getattr(a, "print_config", False):
        print(cfg.to_yaml(), end="")
        raise _Printed
    return cfg


def _resolve(a, preset: dict | None = None, **extra_flags):
    """The command's config from its ``preset`` (a mapping of sections), flags (``a._flags``: dest -> field),
    ``--config`` files and ``--set``."""
    from robot_rl.config import resolve

    flags = {f: getattr(a, dest) for dest, fields in a._flags.items() for f in fields.split("|")}
    flags.update(extra_flags)
    return _shown(a, resolve(a.cmd, preset=preset, files=a.config or [], flags=flags, sets=a.set or []))


def cmd_collect(a):
    from robot_rl.pipeline import collect_args
    from robot_rl.stages.collect import collect

    cfg = _resolve(a)
    r = collect(a.store, **collect_args(cfg), overwrite=a.overwrite)
    print(json.dumps(r, indent=1))


def cmd_train_base(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.config import write_config
    from robot_rl.stages.train_base import check_run_dir, distributed_rank, train_base

    cfg = _resolve(a)
    out = Path(a.out)
    writers = []
    check_run_dir(out, overwrite=True)  # a file at --out: refused at once
    _apart(out, a.store, "--store")

    def on_start():  # input validated: refuse to replace an existing run, write the config and open TensorBoard
        check_run_dir(out, overwrite=a.overwrite, replace=True)
        write_config(cfg, out, _argv())
        writers.append(SummaryWriter(str(out / "tb")))
        return writers[0]

    try:
        r = train_base(a.store, out, cfg.base_config(), on_start=on_start)
    finally:
        for w in writers:
            w.close()
    if distributed_rank()[0] == 0:  # torchrun: rank 0 reports
        print(json.dumps({k: v for k, v in r.items() if k != "history"}, indent=1))


def cmd_train_residual(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.config import OFFPOLICY_ALGOS, write_config
    from robot_rl.pipeline import train_residual_for
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.stages.evaluation import plot_learning_curve
    from robot_rl.stages.train_base import check_run_dir

    _one_thread()
    cfg = _resolve(a)  # checked before anything is loaded or written
    others = _compared_curves(a.compare or [])
    out = Path(a.out)
    if a.resume:
        if cfg.algo not in OFFPOLICY_ALGOS:
            raise ConfigError("resume", f"--resume continues an off-policy run, not {cfg.algo}",
                              "use --algo td3 or --algo sac")
    else:
        check_run_dir(out, overwrite=a.overwrite)
    base = load_policy(a.base)
    if not a.resume:
        check_run_dir(out, overwrite=a.overwrite, replace=True)  # the base loaded: now the old run may go
    write_config(cfg, out, _argv())
    if a.train_seeds is not None:
        from robot_rl.pipeline import train_residual_seeds

        rep = train_residual_seeds(cfg, base, out, a.train_seeds, demos=a.demos, resume=a.resume,
                                   checkpoint_extra={"base_checkpoint": str(a.base)})
        print(f"{rep['summary']}; report in {out / 'report.md'}")
        return
    w = SummaryWriter(str(out / "tb"))
    try:
        _, curve = train_residual_for(cfg, base, out, demos=a.demos, writer=w, resume=a.resume,
                                      checkpoint_extra={"base_checkpoint": str(a.base)})
    finally:
        w.close()
    plot_learning_curve(curve, out / "learning_curve.png", label=f"residual {cfg.algo.upper()}", others=others)
    best = out / "checkpoint_best"
    print(json.dumps({"checkpoint": str(out / "checkpoint"), "checkpoint_best": str(best) if best.is_dir() else None,
                      "last": curve[-1]}, indent=1))


def _compared_curves(runs: list) -> dict:
    """``--compare RUN ...``: {label: learning-curve rows} of earlier train-residual runs (their
    ``learning_curve.json``; the label names the run's algo from its ``config.yaml``). Raises ConfigError naming a run
    without a curve."""
    import yaml

    out = {}
    for run in runs:
        f = Path(run) / "learning_curve.json"
        if not f.is_file():
            raise ConfigError("compare", f"{run} has no learning_curve.json", "pass a train-residual output directory")
        algo = "residual"
        for cfg_file in (Path(run) / "config.yaml", Path(run).parent / "config.yaml"):  # a run, or a --train-seeds seed
            if cfg_file.is_file():
                algo = f"residual {str((yaml.safe_load(cfg_file.read_text()) or {}).get('algo', '')).upper()}".strip()
                break
        out[f"{algo} ({Path(run).name})"] = json.loads(f.read_text())
    return out


def _apart(out: Path, store, flag: str) -> None:
    """Refuse an output directory that is, or lies inside, the store ``store`` (its files would be foreign files
    in the store; a run directory may hold a store, as the pipeline's does). A remote store (a URL) never does."""
    from robot_rl.datasets.store import is_url

    if is_url(store):
        return
    o, s = Path(out).resolve(), Path(store).resolve()
    if o == s or s in o.parents:
        raise ConfigError("out", f"{out} overlaps the store {store} ({flag})",
                          "write the run to a directory apart from the store, e.g. runs/<name>")


def _record_store(a):
    """``eval --record STORE``: the store the evaluated episodes are appended to (created when missing), or None."""
    if not a.record:
        return None
    from robot_rl.datasets.store import ZarrStore

    _apart(Path(a.out), a.record, "--record")
    return ZarrStore.open_or_create(a.record)


def _summary(name: str, r: dict, out: Path, record) -> str:
    return (f"{name}: success {r['success_rate']:.3f} 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
            f"over {r['episodes']} episodes; report in {out / 'report.md'}"
            + (f"; episodes recorded to {record} (source: policy)" if record else ""))


def cmd_eval(a):
    _one_thread()
    cfg = _resolve(a)
    if a.server:
        return _eval_server(a, cfg)
    if not a.base:
        raise ConfigError("base", "missing", "pass --base CHECKPOINT (or --server ADDR to evaluate a running server)")
    from robot_rl.config import write_config
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.evaluation import evaluate, record_videos, write_report

    e, task, tk, env = cfg.eval, cfg.task.name, cfg.task.kwargs, cfg.env_kwargs(backend=True)
    base = load_policy(a.base)
    res = load_residual(a.residual, base) if a.residual else None
    out = Path(a.out)
    store = _record_store(a)
    write_config(cfg, out, _argv())
    r = evaluate(base, task, residual=res, n_episodes=e.episodes, n_envs=e.n_envs, seed_start=e.seed_start,
                 task_kwargs=tk, env_kwargs=env, seed=cfg.seed, record=store,
                 record_extra={"policy": {"base": str(a.base), "residual": str(a.residual or "")}})
    vids = record_videos(base, task, out / "videos", residual=res, task_kwargs=tk, env_kwargs=env,
                         seeds=range(e.seed_start, e.seed_start + e.videos)) if e.videos else []
    name = "base + residual" if res is not None else "base"
    write_report(out, {name: r}, {"videos": vids})
    print(_summary(name, r, out, a.record))


def _eval_server(a, cfg):
    """``eval --server ADDR``: the same evaluation, every action from a running policy server."""
    from robot_rl.config import write_config
    from robot_rl.serve.client import PolicyClient, RemotePolicy, ServerError, ServerTimeout
    from robot_rl.stages.evaluation import evaluate, record_videos, write_report

    if a.base or a.residual:
        raise ConfigError("server", "--server cannot be combined with --base/--residual",
                          "the server already holds the checkpoints; drop --base/--residual")
    e, task, tk, env = cfg.eval, cfg.task.name, cfg.task.kwargs, cfg.env_kwargs(backend=True)
    client = PolicyClient(a.server, **({"timeout_s": a.timeout} if a.timeout is not None else {}))
    try:
        meta = client.metadata()
        out = Path(a.out)
        store = _record_store(a)
        write_config(cfg, out, _argv())
        pol = RemotePolicy(client, min(e.n_envs, e.episodes), seed=0)
        r = evaluate(None, task, n_episodes=e.episodes, n_envs=e.n_envs, seed_start=e.seed_start, policy=pol,
                     task_kwargs=tk, env_kwargs=env, record=store,
                     record_extra={"policy": {"server": a.server, "base_version": meta["base"]["version"],
                                              "residual_version": meta["residual"]["version"]}})
        pol.close()
        vids = []
        if e.videos:
            one = RemotePolicy(client, 1, seed=0)
            vids = record_videos(None, task, out / "videos", seeds=range(e.seed_start, e.seed_start + e.videos),
                                 policy=one, task_kwargs=tk, env_kwargs=env)
            one.close()
    except ServerTimeout as err:
        raise ConfigError("server", str(err), f"start it with `robot-rl serve --checkpoint ...` at {a.server}") \
            from None
    except ServerError as err:
        fix = {"auth": "pass the server's token (ROBOT_RL_SERVER_TOKEN)",
               "capacity": "close idle sessions or wait for them to expire, or raise the server's serve.max_sessions",
               "version": "use a client and server of the same robot_rl version"}.get(
            err.code, "check that the server's policy matches this task")
        raise ConfigError("server", str(err), fix) from None
    finally:
        client.close()
    res = meta["residual"]
    name = "server: base + residual" if res["loaded"] else "server: base"
    write_report(out, {name: r}, {"videos": vids, "server": a.server, "base_version": meta["base"]["version"],
                                  "residual_version": res["version"]})
    print(_summary(name, r, out, a.record))


def _server_token(a, cfg) -> None:
    """``serve`` / ``learn``: the shared token, from ``--token-file``, else ``serve.token``, else
    ``$ROBOT_RL_SERVER_TOKEN``, else none (set on ``cfg.serve``; never printed by --print-config)."""
    import os

    token = None
    if a.token_file:
        try:
            token = Path(a.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError("token-file", f"cannot read {a.token_file} ({e.strerror})",
                              "pass a readable file holding the shared token") from None
        if not token:
            raise ConfigError("token-file", f"{a.token_file} is empty", "write the shared token into it")
    if token is not None:
        cfg.serve.token = token
    elif cfg.serve.token is None:
        cfg.serve.token = os.environ.get("ROBOT_RL_SERVER_TOKEN") or None


def cmd_serve(a):
    import torch

    from robot_rl.serve.server import serve

    mb = None if a.max_message_mb is None else a.max_message_mb * 2**20  # checked as serve.max_message_bytes
    cfg = _resolve(a, **{"serve.max_message_bytes": round(mb) if mb is not None and math.isfinite(mb) else mb})
    _server_token(a, cfg)
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError("threads", f"{a.threads} < 1", "pass a positive number of torch threads, e.g. 2")
        torch.set_num_threads(a.threads)
    serve(a.checkpoint, a.residual, cfg.serve.validate(), device=a.device, ready=lambda line: print(line, flush=True))


def cmd_learn(a):
    import signal
    import threading

    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.config import write_config
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.serve.learner import check_listen, learn_online
    from robot_rl.stages.evaluation import plot_learning_curve
    from robot_rl.stages.train_base import check_run_dir

    _one_thread()
    cfg = _resolve(a, preset={"algo": "td3"})
    if cfg.algo != "td3":
        raise ConfigError("algo", f"learn trains a td3 residual, not {cfg.algo}", "leave algo at td3")
    _server_token(a, cfg)
    check_listen(cfg.serve.host, cfg.serve.validate().token)
    out = Path(a.out)
    store = Path(a.store) if a.store else out / "episodes.zarr"
    if not a.resume:
        check_run_dir(out, overwrite=a.overwrite)
    base = load_policy(a.base)
    if not a.resume:
        check_run_dir(out, overwrite=a.overwrite, replace=True)
    write_config(cfg, out, _argv())
    stop = threading.Event()
    before = {sig: signal.signal(sig, lambda *_: stop.set())  # Ctrl-C / SIGTERM: stop at a request boundary, save
              for sig in (signal.SIGINT, signal.SIGTERM)}
    w = SummaryWriter(str(out / "tb"))
    try:
        _, curve = learn_online(base, cfg.task.name, cfg.td3_config(), out, store=store, host=cfg.serve.host,
                                port=cfg.serve.port, token=cfg.serve.token, residual=cfg.residual_config(),
                                demos=a.demos, task_kwargs=cfg.task.kwargs, env_kwargs=cfg.env_kwargs(backend=True),
                                backend=a.robot_backend, writer=w, resume=a.resume, stop=stop,
                                checkpoint_extra={"base_checkpoint": str(a.base)},
                                ready=lambda ep: print(f"robot-rl learn: serving on {ep}; episodes go to {store}",
                                                       flush=True))
    finally:
        w.close()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if curve:
        plot_learning_curve(curve, out / "learning_curve.png", label="residual TD3 (online)")
    print(json.dumps({"checkpoint": str(out / "checkpoint"), "store": str(store),
                      "last": curve[-1] if curve else None}, indent=1))


def cmd_transfer(a):
    from robot_rl.config import write_config
    from robot_rl.envs.env import check_env_options
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.transfer import transfer_report

    _one_thread()
    cfg = _resolve(a)
    if "env.backend" in cfg.given:
        raise ConfigError("env.backend", "transfer runs in transfer.train_backend and transfer.eval_backend",
                          "use --train-backend / --eval-backend (--set transfer.eval_backend=pybullet)")
    if "randomization.preset" not in cfg.given:  # the randomized conditions start from the default preset
        cfg.randomization.preset = "default"
    t, rnd, env = cfg.transfer, cfg.randomization.spec(), cfg.env_kwargs(randomization=False)
    for b in (t.train_backend, t.eval_backend):  # every condition's options, before loading anything
        check_env_options(cfg.task.name, cfg.task.kwargs, backend=b, randomization=rnd, **env)
    base = load_policy(a.checkpoint)
    res = load_residual(a.residual, base) if a.residual else None
    out = Path(a.out)
    write_config(cfg, out, _argv())
    r = transfer_report(base, cfg.task.name, out, residual=res, train_backend=t.train_backend,
                        eval_backend=t.eval_backend, randomization=rnd, task_kwargs=cfg.task.kwargs, env_kwargs=env,
                        n_episodes=t.episodes, n_envs=t.n_envs, seed_start=t.seed_start, videos=t.videos,
                        extra={"base": str(a.checkpoint), "residual": str(a.residual) if a.residual else None})
    for row in r["rows"]:
        print(f"{row['backend']:<9} {row['role']:<5} randomization {'on ' if row['randomized'] else 'off'}  "
              f"success {row['success_rate']:.3f} 95% CI [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
              f"over {row['episodes']} episodes")
    print(f"report: {r['report_md']}")


def cmd_distill(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.config import write_config
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.distill import PRESET, distill, student_config

    _one_thread()
    cfg = _resolve(a, preset=PRESET)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file", "pass a new directory for the run")
    if (out / "report.json").exists() or (out / "rollouts.zarr").exists():
        if not a.overwrite:
            raise ConfigError("out", f"{out} already holds a distillation run",
                              "pass a new --out, or --overwrite to replace it")
    env = cfg.env_kwargs(randomization=False, backend=True)  # backend: the rollouts'
    cams, size = env.pop("cameras", ()), env.pop("image_size", (64, 64))
    base = cfg.base_config()
    student_config(cfg.task.name, base, cams)  # a privileged student input fails before anything loads
    teacher = load_policy(a.teacher_base)
    res = load_residual(a.teacher_residual, teacher) if a.teacher_residual else None
    write_config(cfg, out, _argv())
    writers = []

    def writer_for(name):
        writers.append(SummaryWriter(str(out / "tb" / name)))
        return writers[-1]

    try:
        r = distill(teacher, cfg.task.name, out, teacher_residual=res, cfg=cfg.distill, base=base,
                    evaluation=cfg.eval, cameras=cams, image_size=size, randomization=cfg.randomization.spec(),
                    task_kwargs=cfg.task.kwargs, env_kwargs=env, seed=cfg.seed, writer_for=writer_for)
    finally:
        for w in writers:
            w.close()
    for row in r["rows"]:
        print(f"{row['condition']:<22} teacher {row['teacher']['success_rate']:.3f}  student "
              f"{row['student']['success_rate']:.3f}  ratio {row['ratio'] if row['ratio'] is None else round(row['ratio'], 3)}")
    print(f"wall time {r['wall_s']['total_s'] / 60:.1f} min; report: {r['report_md']}; student: "
          f"{r['student']['checkpoint']}")


def cmd_pipeline(a):
    from robot_rl.pipeline import resolve_config, run_pipeline

    cfg = _shown(a, resolve_config(a.preset, a.config or [], a.set or []))
    r = run_pipeline(cfg, a.out, argv=_argv())
    for name, v in r["results"].items():
        pt = v.get("paired_vs_base")
        paired = f"; vs base on the same seeds: +{pt['only_b']} / -{pt['only_a']} episodes, exact McNemar " \
                 f"p = {pt['p_value']:.2g}" if pt else ""
        print(f"{name}: success {v['success_rate']:.3f} 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] "
              f"over {v['episodes']} held-out episodes{paired}")
    print(f"wall time {r['wall_time_min']} min; report: {Path(a.out) / 'report.md'}")


def cmd_bringup(a):
    from robot_rl.config import parse_set
    from robot_rl.ros.bringup import bringup

    overrides = []
    for text in a.set or []:
        path, value = parse_set(text)  # the same parsing as every command's --set
        if len(path) < 2:
            raise ConfigError("--set", f"{text!r} is not NODE.PARAM=VALUE", "write e.g. --set "
                              "policy_node.control_rate=10 or --set sim_robot.task.tolerance=0.004")
        overrides.append((path[0], ".".join(path[1:]), value))
    return bringup(a.config, overrides, grace=a.grace, dry_run=a.dry_run)


def cmd_store(a):
    from robot_rl.datasets.store import ZarrStore, format_info, validate_store

    if a.action in ("import", "export"):
        return _store_convert(a)
    if a.action in ("filter", "merge", "migrate"):
        return _store_tools(a)
    if a.rest:
        raise ConfigError("path", f"store {a.action} takes one path", f"use robot-rl store {a.action} PATH")
    if a.action == "info":
        print(format_info(ZarrStore.open(a.path, mode="r").info()))
        return 0
    problems = validate_store(a.path)  # reports damage that would stop ZarrStore.open
    for p in problems:
        print(p)
    fatal = [p for p in problems if "torn" not in p]
    print("OK" if not fatal else f"{len(fatal)} problem(s)")
    return 1 if fatal else 0


def _store_convert(a):
    """``store import --format F SRC STORE`` / ``store export --format F STORE DST`` (robot_rl.datasets.formats)."""
    from robot_rl.datasets.formats import MetaDefaults, export_dataset, import_dataset, parse_key_map

    if a.format is None or len(a.rest) != 1:
        raise ConfigError("format" if a.format is None else "dst", "missing" if a.format is None or not a.rest
                          else "one destination only", f"use robot-rl store {a.action} --format FORMAT "
                          + ("SRC STORE" if a.action == "import" else "STORE DST"))
    a.dst = a.rest[0]
    key_map = parse_key_map(a.map)
    opts = {k: getattr(a, k) for k in ("fps", "vcodec", "crf", "gop", "storage") if getattr(a, k) is not None}
    both = {k: getattr(a, k) for k in ("action_topic", "control_rate") if getattr(a, k) is not None}
    if a.action == "import":
        if opts:
            raise ConfigError(next(iter(opts)), "is an export option", "drop it from store import")
        opts = {**both, **{k: getattr(a, k) for k in ("filter_key", "episode_topic", "max_obs_age")
                           if getattr(a, k) is not None}}
        if a.topic_map:
            opts["topics"] = a.topic_map
        given = {k: getattr(a, k) for k in ("task", "source", "backend", "robot", "seed_start")
                 if getattr(a, k) is not None}
        if a.success is not None:
            given["success"] = a.success == "true"
        r = import_dataset(a.format, a.path, a.dst, defaults=MetaDefaults(**given, force=tuple(a.force or ())),
                           key_map=key_map, overwrite=a.overwrite, **opts)
        print(f"imported {r['episodes']} episodes ({r['steps']} steps, keys {', '.join(r['keys'])}) from "
              f"{a.path} ({a.format}) into {r['store']}")
    else:
        r = export_dataset(a.format, a.path, a.dst, key_map=key_map, overwrite=a.overwrite, **opts, **both)
        print(f"exported {r['episodes']} episodes ({r['steps']} steps) of {a.path} to {r['path']} ({a.format})")
    return 0


def _store_tools(a):
    """``store filter SRC DST --sources/--tasks/--success/--seeds`` and ``store merge DST SRC...``."""
    from robot_rl.datasets.tools import filter_store, merge_stores, migrate_store

    if not a.rest:
        raise ConfigError("path", "missing", f"use robot-rl store {a.action} " + {
            "filter": "SRC DST ...", "merge": "DST SRC...", "migrate": "SRC DST"}[a.action])
    if a.action == "migrate":
        if len(a.rest) != 1:
            raise ConfigError("dst", "one destination only", "use robot-rl store migrate SRC DST")
        r = migrate_store(a.path, a.rest[0], overwrite=a.overwrite, progress=True)
        print(f"migrated {r['episodes']} episodes ({r['steps']} steps) of {a.path} (layout {r['from_version']}) "
              f"into {r['store']} (layout {r['to_version']})")
    elif a.action == "filter":
        if len(a.rest) != 1:
            raise ConfigError("dst", "one destination only", "use robot-rl store filter SRC DST [--sources ...]")
        r = filter_store(a.path, a.rest[0], sources=a.sources, tasks=a.tasks, seed_range=tuple(a.seeds) if a.seeds
                         else None, success=None if a.success is None else a.success == "true",
                         overwrite=a.overwrite, progress=True)
        print(f"kept {r['episodes']} episodes ({r['steps']} steps) of {a.path} in {r['store']}")
    else:
        r = merge_stores(a.rest, a.path, overwrite=a.overwrite, progress=True)
        print(f"merged {r['episodes']} episodes ({r['steps']} steps) into {r['store']}: "
              + ", ".join(f"{p['store']} {p['episodes']}" for p in r["per_store"]))
    return 0


def cmd_success_classifier(a):
    from robot_rl.config import write_config
    from robot_rl.stages.success import train_success_classifier

    cfg = _resolve(a)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file", "pass a new directory for the classifier")
    write_config(cfg, out, _argv())
    r = train_success_classifier(a.store, out, cfg.success, seed=cfg.seed)
    for name in ("held_out_frames", "held_out_episodes"):
        c = r[name]
        print(f"{name}: tp {c['tp']} fp {c['fp']} tn {c['tn']} fn {c['fn']}, precision {c['precision']:.3f}, "
              f"recall {c['recall']:.3f}")
    print(f"classifier in {out / 'checkpoint'}, report in {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------------------------------------- parser
class _Command:
    """A subcommand whose flags are shorthands for config fields (default None: not given)."""

    def __init__(self, sub, name: str, func, help: str, config: bool = True):
        self.p = sub.add_parser(name, help=help, description=help)
        self.flags: dict[str, str] = {}
        self.p.set_defaults(func=func, _flags=self.flags)
        if config:
            self.p.add_argument("--config", action="append", metavar="FILE",
                                help="YAML file of config sections (repeatable; e.g. a run's config.yaml)")
            self.p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                                help="set any config field, value parsed as YAML (repeatable), e.g. "
                                     "--set ppo.residual_l2=0.1 --set policy.down_dims=[32,64,128]")
            self.p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    def field(self, flag: str, to: str, help: str = "", **kw):
        """``flag`` sets config field ``to``."""
        kw.setdefault("default", None)
        act = self.p.add_argument(flag, help=f"{help} [{to}]".strip(), **kw)
        self.flags[act.dest] = to
        return self

    def arg(self, *names, **kw):
        self.p.add_argument(*names, **kw)
        return self


RAY_HELP = ("run the env workers as Ray actors (robot_rl.envs.ray_envs): 'local' starts Ray on this machine, 'auto' "
            "or HOST:PORT joins a running cluster (ray start --head); default: local subprocesses")
INIT_HELP = ("start from this run's residual and critics (same algo; RUN or RUN/state; same base, task and "
             "residual settings) with an empty replay, e.g. fine-tune a MuJoCo-trained residual on PyBullet or a robot")


def _square(text: str) -> list[int]:
    n = int(text)
    return [n, n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robot-rl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rnd_help = "domain randomization preset: none | default | visual"

    (_Command(sub, "collect", cmd_collect, "scripted demonstrations -> zarr store")
     .arg("--store", required=True)
     .arg("--overwrite", action="store_true", help="empty an existing store first (refused unless every file in it "
                                                   "belongs to the store)")
     .field("--task", "task.name").field("--episodes", "collect.episodes", type=int)
     .field("--seed", "seed", type=int).field("--noise", "collect.noise", type=float)
     .field("--bias", "collect.bias", type=float).field("--backend", "env.backend")
     .field("--cameras", "env.cameras", nargs="*").field("--image-size", "env.image_size", "N: N x N images",
                                                         type=_square)
     .field("--keep-failures", "collect.only_success", "store failed episodes too", action="store_const",
            const=False)
     .field("--randomization", "randomization.preset", rnd_help + " (stored per episode)")
     .field("--n-envs", "collect.n_envs", "parallel env workers", type=int))

    (_Command(sub, "train-base", cmd_train_base, "train a diffusion / BC base policy on a store")
     .arg("--store", required=True).arg("--out", required=True)
     .arg("--overwrite", action="store_true", help="replace the run already in --out (its checkpoint, logs and "
                                                   "config); without it such an --out is refused")
     .field("--kind", "base.kind", choices=["diffusion", "bc"]).field("--steps", "base.steps", type=int)
     .field("--batch-size", "base.batch_size", type=int).field("--lr", "base.lr", type=float)
     .field("--seed", "seed", type=int).field("--obs-keys", "base.obs_keys", nargs="*")
     .field("--image-keys", "base.image_keys", nargs="*")
     .field("--only-success", "base.only_success", "train on successful episodes only", action="store_const",
            const=True)
     .field("--sources", "base.sources", "episode sources to train on: scripted teleop policy intervention "
                                         "(default: all)", nargs="*", metavar="SOURCE"))

    (_Command(sub, "train-residual", cmd_train_residual, "residual RL (PPO, TD3 or SAC) on top of a frozen base")
     .arg("--base", required=True).arg("--out", required=True)
     .arg("--overwrite", action="store_true", help="replace the run already in --out (its checkpoints, logs and "
                                                   "config); without it such an --out is refused")
     .arg("--demos", metavar="STORE", help="td3/sac: zarr store of demonstrations for the demo half of the replay "
                                           "(relabelled with the base's actions; RLPD 50/50 sampling)")
     .arg("--resume", action="store_true", help="td3/sac: continue the run saved in --out/state")
     .arg("--compare", nargs="+", metavar="RUN", help="overlay these earlier runs' learning curves (e.g. a PPO run "
                                                    "on the same base) in learning_curve.png")
     .arg("--train-seeds", type=int, metavar="N", help="train N seeds (--seed, +1, ...) into --out/seed_S, evaluate "
                                                      "each and the base on the same held-out seeds (eval.*) and "
                                                      "report per-seed Wilson intervals, paired tests against the "
                                                      "base, and the IQM with a bootstrap CI over seeds (rliable)")
     .field("--algo", "algo", "residual learner: ppo | td3 | sac", choices=["ppo", "td3", "sac"])
     .field("--task", "task.name")
     .field("--env-steps", "ppo.total_env_steps|td3.total_env_steps|sac.total_env_steps", type=int)
     .field("--n-envs", "ppo.n_envs|td3.n_envs|sac.n_envs", type=int).field("--n-steps", "ppo.n_steps", type=int)
     .field("--actors", "td3.actors", "td3: actor processes acting through a policy server in the learner "
                                      "process (0: single process)", type=int)
     .field("--init-from", "td3.init_from|sac.init_from", "td3/sac: " + INIT_HELP, metavar="RUN")
     .field("--alpha", "residual.alpha", type=float).field("--seed", "seed", type=int)
     .field("--backend", "env.backend").field("--randomization", "randomization.preset", rnd_help)
     .field("--ray", "env.ray", RAY_HELP, metavar="ADDRESS"))

    (_Command(sub, "eval", cmd_eval, "held-out seeded evaluation with Wilson intervals, report and videos")
     .arg("--base", help="base checkpoint (required unless --server)").arg("--residual")
     .arg("--server", metavar="ADDR", help="evaluate the policy served at host:port (robot-rl serve)")
     .arg("--timeout", type=float, help="with --server: deadline of one request (s; default: the client's)")
     .arg("--out", required=True)
     .arg("--record", metavar="STORE", help="append every evaluated episode to this zarr store (source: policy; "
                                            "created when missing), e.g. to train the next base on successful "
                                            "rollouts")
     .field("--task", "task.name").field("--episodes", "eval.episodes", type=int)
     .field("--n-envs", "eval.n_envs", type=int).field("--seed-start", "eval.seed_start", type=int)
     .field("--videos", "eval.videos", type=int).field("--seed", "seed", type=int)
     .field("--backend", "env.backend", "simulator: mujoco | pybullet")
     .field("--randomization", "randomization.preset", rnd_help)
     .field("--ray", "env.ray", RAY_HELP, metavar="ADDRESS"))

    (_Command(sub, "transfer", cmd_transfer, "sim-to-sim transfer: train vs eval backend, with and without domain "
                                             "randomization, one table with Wilson intervals + videos")
     .arg("--checkpoint", required=True, help="base policy checkpoint directory")
     .arg("--residual", help="residual checkpoint directory (trained on this base)")
     .arg("--out", default="runs/transfer")
     .field("--task", "task.name").field("--train-backend", "transfer.train_backend")
     .field("--eval-backend", "transfer.eval_backend")
     .field("--randomization", "randomization.preset", "randomized conditions' preset, under the "
                                                       "randomization section's groups (transfer: default unless "
                                                       "given)")
     .field("--episodes", "transfer.episodes", "per condition (the same seeds in each)", type=int)
     .field("--n-envs", "transfer.n_envs", type=int).field("--seed-start", "transfer.seed_start", type=int)
     .field("--videos", "transfer.videos", "per condition", type=int)
     .field("--ray", "env.ray", RAY_HELP, metavar="ADDRESS"))

    (_Command(sub, "distill", cmd_distill, "distil a state teacher (base [+ residual]) into a camera student: "
                                           "teacher rollouts under visual randomization -> image BC / Diffusion "
                                           "Policy student (+ DAgger rounds) -> evaluation from pixels (ResiP)")
     .arg("--teacher-base", required=True, help="the teacher's base checkpoint (reads privileged state)")
     .arg("--teacher-residual", help="the teacher's residual checkpoint (trained on that base)")
     .arg("--out", required=True)
     .arg("--overwrite", action="store_true", help="replace the distillation run already in --out")
     .field("--task", "task.name").field("--cameras", "env.cameras", nargs="+")
     .field("--image-size", "env.image_size", "N: N x N images", type=_square)
     .field("--episodes", "distill.episodes", "teacher rollouts", type=int)
     .field("--dagger-rounds", "distill.dagger_rounds", type=int)
     .field("--dagger-episodes", "distill.dagger_episodes", "student episodes per DAgger round", type=int)
     .field("--dagger-steps", "distill.dagger_steps", "training steps after each DAgger round, from the previous "
                                                      "round's weights", type=int)
     .field("--kind", "base.kind", "the student", choices=["diffusion", "bc"])
     .field("--steps", "base.steps", "student training steps per round", type=int)
     .field("--eval-episodes", "eval.episodes", "held-out episodes per condition", type=int)
     .field("--n-envs", "eval.n_envs", type=int).field("--videos", "eval.videos", type=int)
     .field("--seed", "seed", type=int)
     .field("--randomization", "randomization.preset", rnd_help + " (rollouts and randomized conditions)")
     .field("--ray", "env.ray", RAY_HELP, metavar="ADDRESS"))

    (_Command(sub, "success-classifier", cmd_success_classifier,
              "train a success classifier (camera frame -> P(task done), SERL's reward classifier) on a store's "
              "labelled episodes; held-out confusion matrices in its report")
     .arg("--store", required=True).arg("--out", required=True)
     .field("--camera", "success.camera").field("--steps", "success.steps", type=int)
     .field("--seed", "seed", type=int))

    pp = _Command(sub, "pipeline", cmd_pipeline, "collect -> train base -> residual RL -> evaluate, end to end")
    pp.arg("--preset", default="quick", help="quick | full (MLP BC base) | full-diffusion (Diffusion Policy base)")
    pp.arg("--out", default="runs/pipeline")

    s = _Command(sub, "store", cmd_store, "inspect, validate, import, export, filter, merge or migrate zarr stores "
                                          "(formats: diffusion_policy, robomimic, lerobot, rosbag2; docs/DATASETS.md)",
                 config=False)
    s.arg("action", choices=["info", "validate", "import", "export", "filter", "merge", "migrate"])
    s.arg("path", help="the store (info, validate, export, filter), the dataset to import, or merge's new store")
    s.arg("rest", nargs="*", metavar="PATH", help="import: the new store; export: the new dataset; filter, migrate: "
                                                 "the new store; merge: the stores to merge, in order")
    s.arg("--sources", nargs="+", help="filter: keep these episode sources")
    s.arg("--tasks", nargs="+", help="filter: keep these tasks")
    s.arg("--seeds", nargs=2, type=int, metavar=("LO", "HI"), help="filter: keep seeds LO <= seed < HI")
    s.arg("--format", choices=["diffusion_policy", "robomimic", "lerobot", "rosbag2"],
          help="import/export: the other format")
    s.arg("--map", action="append", metavar="FROM=TO", help="rename a key (import: theirs=ours, after the format's "
                                                           "own naming; export: ours=theirs); repeatable")
    s.arg("--overwrite", action="store_true", help="replace an existing destination")
    s.arg("--task", help="import: task name of episodes that name none (e.g. place)")
    s.arg("--source", help="import: episode source (default teleop)")
    s.arg("--success", choices=["true", "false"], help="import: success of episodes the format does not judge "
                                                      "(default true); filter: keep these")
    s.arg("--backend", help="import: simulator or 'real' (default real)")
    s.arg("--robot", help="import: robot name (default panda)")
    s.arg("--seed-start", type=int, help="import: seed of the first episode without one (default 0)")
    s.arg("--force", nargs="+", choices=["task", "source", "success", "backend", "robot", "seed"],
          help="import: use these defaults even where the dataset has a value")
    s.arg("--filter-key", help="import robomimic: only the demos of mask/<KEY> (e.g. train)")
    s.arg("--topic-map", action="append", metavar="TOPIC=KEY", help="import rosbag2: observation topic -> store "
                                                                     "key (repeatable; default: our topics by name)")
    s.arg("--action-topic", help="rosbag2: the executed-action topic (default /arm_bridge/action)")
    s.arg("--control-rate", type=float, help="rosbag2: control rate in Hz (pairing window; export clock)")
    s.arg("--episode-topic", help="import rosbag2: a topic whose messages start episodes (e.g. /sim/privileged/episode)")
    s.arg("--max-obs-age", type=float, help="import rosbag2: skip rows whose observations are older (s)")
    s.arg("--storage", choices=["mcap", "sqlite3"], help="export rosbag2: bag storage (default mcap)")
    s.arg("--fps", type=float, help="export lerobot: frame rate (default 10)")
    s.arg("--vcodec", help="export lerobot: video encoder, libsvtav1 (AV1, LeRobot's default) or libx264")
    s.arg("--crf", type=int, help="export lerobot: constant rate factor (quality; default 30)")
    s.arg("--gop", type=int, help="export lerobot: keyframe interval in frames (default 2)")

    (_Command(sub, "serve", cmd_serve, "serve a frozen base (+ residual) over ZeroMQ: batching, async chunks, "
                                       "weight push (see robot_rl/serve)")
     .arg("--checkpoint", required=True, help="base policy checkpoint directory")
     .arg("--residual", help="residual checkpoint directory (trained on this base)")
     .arg("--token-file", help="file with a shared token every request must carry "
                               "(default: serve.token, else $ROBOT_RL_SERVER_TOKEN, else no authentication)")
     .arg("--max-message-mb", type=float, help="largest request accepted (MiB) [serve.max_message_bytes]")
     .arg("--threads", type=int, help="torch intra-op threads (default: torch's)")
     .arg("--device", default="cpu")
     .field("--host", "serve.host", "address to bind").field("--port", "serve.port", "TCP port (0 = any free "
                                                                                    "port, printed at start)",
                                                             type=int)
     .field("--max-batch", "serve.max_batch", "most sessions per batched base call", type=int)
     .field("--batch-window-ms", "serve.batch_window_ms", "longest wait (ms) for more sessions once one needs a "
                                                          "base call", type=float)
     .field("--control-rate", "serve.control_rate_hz", "control rate the policy runs at (Hz)", type=float)
     .field("--max-sessions", "serve.max_sessions", type=int)
     .field("--no-weight-push", "serve.allow_push", "refuse push_weights requests", action="store_const",
            const=False)
     .field("--seed", "serve.seed", "added to every session's default noise seed", type=int))

    (_Command(sub, "learn", cmd_learn, "residual TD3 that learns from a robot's policy node (or remote actors) "
                                       "through the policy server; each episode is committed to a store")
     .arg("--base", required=True, help="base policy checkpoint directory")
     .arg("--out", required=True)
     .arg("--store", help="zarr store the received episodes are committed to (default: OUT/episodes.zarr)")
     .arg("--demos", metavar="STORE", help="demonstrations for the demo half of the replay (RLPD)")
     .arg("--resume", action="store_true", help="continue the run saved in --out/state")
     .arg("--overwrite", action="store_true", help="replace the run already in --out")
     .arg("--token-file", help="file with the shared token (required to listen beyond loopback)")
     .arg("--robot-backend", default="robot", help="the episodes' backend name in the store (default: robot)")
     .field("--task", "task.name").field("--env-steps", "td3.total_env_steps", type=int)
     .field("--init-from", "td3.init_from", INIT_HELP, metavar="RUN")
     .field("--seed", "seed", type=int)
     .field("--host", "serve.host", "address to bind").field("--port", "serve.port", "TCP port (0 = any free "
                                                                                    "port, printed at start)",
                                                             type=int))

    (_Command(sub, "bringup", cmd_bringup, "start the ROS 2 nodes of a launch/*.yaml config as supervised "
                                           "subprocesses (ros2 launch without the launch package); Ctrl-C stops "
                                           "them cleanly", config=False)
     .arg("config", help="bringup YAML, e.g. launch/sim_bringup.yaml")
     .arg("--set", action="append", metavar="NODE.PARAM=VALUE",
          help="a node's ROS parameter (repeatable; NODE addresses a node of the config, not a config section; "
               "value parsed as YAML like every --set), e.g. --set sim_robot.task.tolerance=0.004")
     .arg("--grace", type=float, default=5.0, help="seconds each node gets to stop after SIGINT")
     .arg("--dry-run", action="store_true", help="print the node command lines and exit"))
    return p


_OS_FIX = {
    errno.ENOSPC: "free disk space or write to another disk; committed store episodes are kept (check with "
                  "`robot-rl store validate PATH`)",
    errno.EDQUOT: "free space within your disk quota or write elsewhere; committed store episodes are kept",
    errno.EACCES: "check its permissions, or pick a location you may write to",
    errno.EPERM: "check its permissions and owner, or pick a location you may write to",
    errno.EROFS: "the file system is read-only: pick a writable location",
    errno.EEXIST: "remove it or pick another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EISDIR: "it is a directory: pass a file path",
    errno.ENOENT: "check that the path exists",
    errno.ENAMETOOLONG: "use a shorter path",
}


def os_error_line(e: OSError) -> str:
    """``<path>: <problem> -> <fix>`` for a file-system error (the CLI's one translation of OSError)."""
    where = e.filename if e.filename is not None else "file system"
    problem = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    if e.filename2 is not None:
        problem += f" (with {e.filename2})"
    return f"{where}: {problem} -> {_OS_FIX.get(e.errno, 'check the path and the file system, then run again')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ARGV[:] = sys.argv[1:] if argv is None else [str(x) for x in argv]
    try:
        rc = args.func(args)
    except _Printed:
        return 0
    except ConfigError as e:
        print(f"robot-rl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the one translation of file-system errors: <path>: <problem> -> <fix>
        print(f"robot-rl: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robot-rl: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
