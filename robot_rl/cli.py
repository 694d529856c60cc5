"""``robot-rl`` command line: collect, train-base, train-residual, eval, transfer, pipeline, store, serve, bringup.

Bad input ends with one line ``robot-rl: error: <field>: <problem> -> <fix>`` and exit code 2.
Every command that produces outputs writes its resolved arguments to ``<out>/config.yaml`` once its input has been
validated (a rejected run leaves an existing ``<out>`` as it was).
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


def _check_counts(a, **minimum) -> None:
    """Integer arguments with a lower bound (``n_envs=1, videos=0``), checked before anything is loaded or written."""
    for k, lo in minimum.items():
        v = getattr(a, k)
        if v < lo:
            flag = "--" + k.replace("_", "-")
            raise ConfigError(flag, f"{v} < {lo}", f"pass {flag} {max(lo, 1)} or more")


def cmd_collect(a):
    from robot_rl.stages.collect import collect

    r = collect(a.store, a.task, a.episodes, seed=a.seed, noise=a.noise, bias=a.bias, backend=a.backend,
                cameras=a.cameras, image_size=(a.image_size, a.image_size), overwrite=a.overwrite,
                only_success=not a.keep_failures, randomization=_randomization_arg(a.randomization))
    print(json.dumps(r, indent=1))


def cmd_train_base(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.stages.train_base import BaseTrainConfig, train_base

    out = Path(a.out)
    policy = _yaml_arg("policy", a.policy, "'{down_dims: [32, 64, 128]}'") if a.policy else {}
    if not isinstance(policy, dict):
        raise ConfigError("policy", f"{a.policy!r} is not a mapping of PolicyConfig fields",
                          "pass e.g. --policy '{down_dims: [32, 64, 128], n_action_steps: 8}'")
    cfg = BaseTrainConfig(kind=a.kind, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                          obs_keys=a.obs_keys or [], image_keys=a.image_keys or [], policy=policy,
                          only_success=a.only_success, sources=a.sources or [])
    writers = []

    def on_start():  # input validated: now write the config and open TensorBoard
        _write_cfg(out, a)
        writers.append(SummaryWriter(str(out / "tb")))
        return writers[0]

    try:
        r = train_base(a.store, out, cfg, on_start=on_start)
    finally:
        for w in writers:
            w.close()
    print(json.dumps({k: v for k, v in r.items() if k != "history"}, indent=1))


def cmd_train_residual(a):
    from torch.utils.tensorboard import SummaryWriter

    from robot_rl.stages.evaluation import plot_learning_curve
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import save_residual
    from robot_rl.rl.ppo import PPOConfig, train_residual

    out = Path(a.out)
    task_kwargs, env_kwargs = _env_kwargs(a)  # before anything is written
    cfg = PPOConfig(total_env_steps=a.env_steps, n_envs=a.n_envs, n_steps=a.n_steps, alpha=a.alpha, seed=a.seed)
    cfg.validate()
    base = load_policy(a.base)
    _write_cfg(out, a)
    w = SummaryWriter(str(out / "tb"))
    res, curve = train_residual(base, a.task, cfg, out, writer=w, task_kwargs=task_kwargs, env_kwargs=env_kwargs)
    w.close()
    ck = save_residual(res, out / "checkpoint", extra={"base_checkpoint": str(a.base)})
    plot_learning_curve(curve, out / "learning_curve.png")
    print(json.dumps({"checkpoint": str(ck), "last": curve[-1]}, indent=1))


def _record_store(a):
    """``eval --record STORE``: the store the evaluated episodes are appended to (created when missing), or None."""
    if not a.record:
        return None
    from robot_rl.datasets.store import ZarrStore

    return ZarrStore.open_or_create(a.record)


def cmd_eval(a):
    _check_counts(a, episodes=1, n_envs=1, videos=0)
    task_kwargs, env_kwargs = _env_kwargs(a, backends=(a.backend,))
    if a.server:
        return _eval_server(a, task_kwargs, env_kwargs)
    if not a.base:
        raise ConfigError("base", "missing", "pass --base CHECKPOINT (or --server ADDR to evaluate a running server)")
    from robot_rl.stages.evaluation import evaluate, record_videos, write_report
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual

    base = load_policy(a.base)
    res = load_residual(a.residual, base) if a.residual else None
    out = Path(a.out)
    store = _record_store(a)
    _write_cfg(out, a)
    r = evaluate(base, a.task, residual=res, n_episodes=a.episodes, n_envs=a.n_envs, seed_start=a.seed_start,
                 task_kwargs=task_kwargs, env_kwargs=env_kwargs, backend=a.backend, record=store,
                 record_extra={"policy": {"base": str(a.base), "residual": str(a.residual or "")}})
    vids = record_videos(base, a.task, out / "videos", residual=res, task_kwargs=task_kwargs, backend=a.backend,
                         env_kwargs=env_kwargs, seeds=range(a.seed_start, a.seed_start + a.videos)) if a.videos else []
    name = "base + residual" if res is not None else "base"
    write_report(out, {name: r}, {"videos": vids})
    print(f"{name}: success {r['success_rate']:.3f} 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
          f"over {r['episodes']} episodes; report in {out / 'report.md'}"
          + (f"; episodes recorded to {a.record} (source: policy)" if a.record else ""))


def _eval_server(a, task_kwargs: dict, env_kwargs: dict):
    """``eval --server ADDR``: the same evaluation, every action from a running policy server."""
    from robot_rl.stages.evaluation import evaluate, record_videos, write_report
    from robot_rl.serve.client import PolicyClient, RemotePolicy, ServerError, ServerTimeout

    if a.base or a.residual:
        raise ConfigError("server", "--server cannot be combined with --base/--residual",
                          "the server already holds the checkpoints; drop --base/--residual")
    client = PolicyClient(a.server, timeout_s=a.timeout)
    try:
        meta = client.metadata()
        out = Path(a.out)
        store = _record_store(a)
        _write_cfg(out, a)
        pol = RemotePolicy(client, min(a.n_envs, a.episodes), seed=0)
        r = evaluate(None, a.task, n_episodes=a.episodes, n_envs=a.n_envs, seed_start=a.seed_start, policy=pol,
                     task_kwargs=task_kwargs, env_kwargs=env_kwargs, backend=a.backend, record=store,
                     record_extra={"policy": {"server": a.server, "base_version": meta["base"]["version"],
                                              "residual_version": meta["residual"]["version"]}})
        pol.close()
        vids = []
        if a.videos:
            one = RemotePolicy(client, 1, seed=0)
            vids = record_videos(None, a.task, out / "videos", seeds=range(a.seed_start, a.seed_start + a.videos),
                                 policy=one, task_kwargs=task_kwargs, env_kwargs=env_kwargs, backend=a.backend)
            one.close()
    except ServerTimeout as e:
        raise ConfigError("server", str(e), f"start it with `robot-rl serve --checkpoint ...` at {a.server}") from None
    except ServerError as e:
        raise ConfigError("server", str(e), "check that the server's policy matches this task") from None
    finally:
        client.close()
    res = meta["residual"]
    name = "server: base + residual" if res["loaded"] else "server: base"
    write_report(out, {name: r}, {"videos": vids, "server": a.server, "base_version": meta["base"]["version"],
                                  "residual_version": res["version"]})
    print(f"{name}: success {r['success_rate']:.3f} 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
          f"over {r['episodes']} episodes; report in {out / 'report.md'}"
          + (f"; episodes recorded to {a.record} (source: policy)" if a.record else ""))


def cmd_serve(a):
    import os

    import torch

    from robot_rl.serve.server import ServeConfig, serve

    token = None
    if a.token_file:
        try:
            token = Path(a.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError("token-file", f"cannot read {a.token_file} ({e.strerror})",
                              "pass a readable file holding the shared token") from None
        if not token:
            raise ConfigError("token-file", f"{a.token_file} is empty", "write the shared token into it")
    else:
        token = os.environ.get("ROBOT_RL_SERVER_TOKEN") or None
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError("threads", f"{a.threads} < 1", "pass a positive number of torch threads, e.g. 2")
        torch.set_num_threads(a.threads)
    cfg = ServeConfig(host=a.host, port=a.port, max_batch=a.max_batch, batch_window_ms=a.batch_window_ms,
                      max_message_bytes=int(a.max_message_mb * 2**20), token=token, control_rate_hz=a.control_rate,
                      max_sessions=a.max_sessions, allow_push=not a.no_weight_push, seed=a.seed)
    serve(a.checkpoint, a.residual, cfg.validate(), device=a.device, ready=lambda line: print(line, flush=True))


def _env_options(a, backends=(), randomization_required: bool = False) -> tuple[dict, dict, object]:
    """``--set`` overrides (``task_kwargs.<field>=V``, ``env.<field>=V``, ``randomization.<group>.<key>=V``) plus
    ``--randomization``, validated with ``backends`` against the task and :class:`~robot_rl.envs.EnvConfig` before
    anything is loaded or written. Returns (task_kwargs, env_kwargs, randomization spec or None)."""
    from robot_rl.envs.env import check_env_options

    rnd = _randomization_arg(getattr(a, "randomization", None))
    sets = a.set or []
    if randomization_required or any(ov.startswith("randomization.") for ov in sets):
        rnd = {"preset": rnd} if isinstance(rnd, str) else dict(rnd or {})
    task_kwargs, env_kwargs = {}, {}
    for ov in sets:
        key, eq, val = ov.partition("=")
        head, _, rest = key.partition(".")
        if not eq or not rest or head not in ("task_kwargs", "randomization", "env"):
            raise ConfigError("--set", f"{ov!r} is not task_kwargs.<field>=V, randomization.<group>.<key>=V or "
                              "env.<field>=V", "write e.g. --set task_kwargs.tolerance=0.003")
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError:
            raise ConfigError("--set", f"{ov!r}: value is not YAML", "write e.g. --set env.max_steps=120") from None
        {"task_kwargs": task_kwargs, "randomization": rnd, "env": env_kwargs}[head][rest] = value
    if "randomization" in env_kwargs or "backend" in env_kwargs:
        raise ConfigError("--set", "env.randomization / env.backend are not --set fields",
                          "use --randomization (and --backend where the command has it)")
    for b in backends or (None,):
        check_env_options(a.task, task_kwargs, backend=b, randomization=rnd, **env_kwargs)
    return task_kwargs, env_kwargs, rnd


def _env_kwargs(a, backends=()) -> tuple[dict, dict]:
    """:func:`_env_options` for commands with one env setting: (task_kwargs, env_kwargs incl. ``randomization``)."""
    task_kwargs, env_kwargs, rnd = _env_options(a, backends)
    if rnd is not None:
        env_kwargs["randomization"] = rnd
    return task_kwargs, env_kwargs


SET_HELP = ("override a task or env field, repeatable: task_kwargs.<field>=V, env.<field>=V or "
            "randomization.<group>.<key>=V, e.g. --set task_kwargs.tolerance=0.004")


def _yaml_arg(field: str, text: str, example: str):
    """Parse a YAML/JSON command-line value; ConfigError naming ``field`` (with ``example``) when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(field, f"{text!r} is not YAML ({str(e).splitlines()[0]})", f"pass e.g. --{field} "
                          f"{example}") from None


def _randomization_arg(text: str | None):
    """``--randomization`` value: a preset name (``default``, ``none``) or a YAML/JSON dict of overrides."""
    if text is None:
        return None
    return _yaml_arg("randomization", text, "default or '{physics: {object_mass: [0.7, 1.3]}}'")


def cmd_transfer(a):
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual
    from robot_rl.stages.transfer import transfer_report

    _check_counts(a, episodes=1, n_envs=1, videos=0)
    task_kwargs, env_kwargs, rnd = _env_options(a, backends=(a.train_backend, a.eval_backend),
                                                randomization_required=True)  # before loading anything
    base = load_policy(a.checkpoint)
    res = load_residual(a.residual, base) if a.residual else None
    out = Path(a.out)
    _write_cfg(out, a)
    r = transfer_report(base, a.task, out, residual=res, train_backend=a.train_backend, eval_backend=a.eval_backend,
                        randomization=rnd, task_kwargs=task_kwargs, env_kwargs=env_kwargs, n_episodes=a.episodes,
                        n_envs=a.n_envs, seed_start=a.seed_start, videos=a.videos,
                        extra={"base": str(a.checkpoint), "residual": str(a.residual) if a.residual else None})
    for row in r["rows"]:
        print(f"{row['backend']:<9} {row['role']:<5} randomization {'on ' if row['randomized'] else 'off'}  "
              f"success {row['success_rate']:.3f} 95% CI [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
              f"over {row['episodes']} episodes")
    print(f"report: {r['report_md']}")


def cmd_pipeline(a):
    from robot_rl.pipeline import resolve_config, run_pipeline

    cfg = resolve_config(a.preset, a.config, a.set or [])
    r = run_pipeline(cfg, a.out)
    for name, v in r["results"].items():
        print(f"{name}: success {v['success_rate']:.3f} 95% CI [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] "
              f"over {v['episodes']} held-out episodes")
    print(f"wall time {r['wall_time_min']} min; report: {Path(a.out) / 'report.md'}")


def cmd_bringup(a):
    from robot_rl.ros.bringup import bringup

    return bringup(a.config, a.set or [], grace=a.grace, dry_run=a.dry_run)


def cmd_store(a):
    from robot_rl.datasets.store import ZarrStore, format_info, validate_store

    if a.action == "info":
        print(format_info(ZarrStore.open(a.path, mode="r").info()))
        return 0
    problems = validate_store(a.path)  # reports damage that would stop ZarrStore.open
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
    c.add_argument("--randomization", help="domain randomization: a preset (default, none) or a YAML dict, "
                                           "e.g. '{physics: {object_mass: [0.7, 1.3]}}'; stored per episode")
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
    t.add_argument("--only-success", action="store_true", help="train on successful episodes only")
    t.add_argument("--sources", nargs="*", metavar="SOURCE",
                   help="episode sources to train on: scripted teleop policy intervention (default: all)")
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
    r.add_argument("--randomization", help="train under domain randomization: a preset (default) or a YAML dict")
    r.add_argument("--set", action="append", help=SET_HELP)
    r.set_defaults(func=cmd_train_residual)

    e = sub.add_parser("eval", help="held-out seeded evaluation with Wilson intervals, report and videos")
    e.add_argument("--base", help="base checkpoint (required unless --server)")
    e.add_argument("--residual")
    e.add_argument("--server", metavar="ADDR", help="evaluate the policy served at host:port (robot-rl serve)")
    e.add_argument("--timeout", type=float, default=5.0, help="with --server: deadline of one request (s)")
    e.add_argument("--task", default="place")
    e.add_argument("--out", required=True)
    e.add_argument("--episodes", type=int, default=200)
    e.add_argument("--n-envs", type=int, default=4)
    e.add_argument("--seed-start", type=int, default=1_000_000)
    e.add_argument("--videos", type=int, default=3)
    e.add_argument("--backend", default="mujoco", help="simulator to evaluate in: mujoco | pybullet")
    e.add_argument("--randomization", help="evaluate under domain randomization: a preset (default) or a YAML dict")
    e.add_argument("--record", metavar="STORE", help="append every evaluated episode to this zarr store (source: "
                   "policy; created when missing), e.g. to train the next base on successful rollouts")
    e.add_argument("--set", action="append", help=SET_HELP)
    e.set_defaults(func=cmd_eval)

    tr = sub.add_parser("transfer", help="sim-to-sim transfer: train vs eval backend, with and without domain "
                                         "randomization, one table with Wilson intervals + videos")
    tr.add_argument("--checkpoint", required=True, help="base policy checkpoint directory")
    tr.add_argument("--residual", help="residual checkpoint directory (trained on this base)")
    tr.add_argument("--train-backend", default="mujoco")
    tr.add_argument("--eval-backend", default="pybullet")
    tr.add_argument("--task", default="place")
    tr.add_argument("--randomization", default="default",
                    help="randomized conditions: a preset (default) or a YAML dict of overrides")
    tr.add_argument("--set", action="append", help=SET_HELP)
    tr.add_argument("--episodes", type=int, default=100, help="episodes per condition (same seeds in each)")
    tr.add_argument("--n-envs", type=int, default=2)
    tr.add_argument("--seed-start", type=int, default=1_000_000)
    tr.add_argument("--videos", type=int, default=1, help="videos per condition")
    tr.add_argument("--out", default="runs/transfer")
    tr.set_defaults(func=cmd_transfer)

    pp = sub.add_parser("pipeline", help="collect -> train base -> residual RL -> evaluate, end to end")
    pp.add_argument("--preset", default="quick", help="quick | full (MLP BC base) | full-diffusion (Diffusion Policy base)")
    pp.add_argument("--config", help="YAML file overriding the preset")
    pp.add_argument("--set", action="append", help="override one field, e.g. --set residual.n_envs=8")
    pp.add_argument("--out", default="runs/pipeline")
    pp.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("store", help="inspect or validate a zarr store")
    s.add_argument("action", choices=["info", "validate"])
    s.add_argument("path")
    s.set_defaults(func=cmd_store)

    sv = sub.add_parser("serve", help="serve a frozen base (+ residual) over ZeroMQ: batching, async chunks, "
                                      "weight push (see robot_rl/serve)")
    sv.add_argument("--checkpoint", required=True, help="base policy checkpoint directory")
    sv.add_argument("--residual", help="residual checkpoint directory (trained on this base)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=5555, help="TCP port (0 = any free port, printed at start)")
    sv.add_argument("--max-batch", type=int, default=16, help="most sessions per batched base call")
    sv.add_argument("--batch-window-ms", type=float, default=10.0,
                    help="longest wait (ms) for more sessions once one needs a base call; skipped when every "
                         "recently active session is already waiting")
    sv.add_argument("--max-message-mb", type=float, default=16.0, help="largest request accepted (MiB)")
    sv.add_argument("--token-file", help="file with a shared token every request must carry "
                                         "(default: $ROBOT_RL_SERVER_TOKEN, else no authentication)")
    sv.add_argument("--control-rate", type=float, default=10.0, help="control rate the policy runs at (Hz)")
    sv.add_argument("--max-sessions", type=int, default=1024)
    sv.add_argument("--no-weight-push", action="store_true", help="refuse push_weights requests")
    sv.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--seed", type=int, default=0, help="added to every session's default noise seed")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bringup", help="start the ROS 2 nodes of a launch/*.yaml config as supervised subprocesses "
                                       "(ros2 launch without the launch package); Ctrl-C stops them cleanly")
    b.add_argument("config", help="bringup YAML, e.g. launch/sim_bringup.yaml")
    b.add_argument("--set", action="append", help="NODE.PARAM=VALUE parameter override (repeatable)")
    b.add_argument("--grace", type=float, default=5.0, help="seconds each node gets to stop after SIGINT")
    b.add_argument("--dry-run", action="store_true", help="print the node command lines and exit")
    b.set_defaults(func=cmd_bringup)
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
