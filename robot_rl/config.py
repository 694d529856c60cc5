"""One configuration system for every command: dataclass defaults <- preset <- YAML file(s) <- flags and
``--set section.field=value``, resolved by :func:`resolve` into typed dataclass instances.

The dataclasses are the single source of defaults. A command uses some of these sections (:data:`COMMAND_SECTIONS`):

=================  ==================================================================================================
``seed``           the run's seed (an int, not a mapping): demonstrations, base training, PPO, policy noise
``task``           ``name`` (lift | place) plus any field of that task's dataclass (:mod:`robot_rl.envs.tasks`), e.g.
                   ``tolerance`` [m], ``max_steps``; the resolved config lists every field of the task
``env``            :class:`~robot_rl.envs.env.EnvConfig` fields (``randomization`` is its own section) plus
                   ``backend`` (mujoco | pybullet); ``cameras`` / ``image_size`` None = taken from the policy
                   checkpoint where one is rolled out, else EnvConfig's
``randomization``  ``preset`` (none | default | visual) and the groups ``physics`` / ``sensing`` / ``visual``
                   (:mod:`robot_rl.envs.randomization`); groups alone randomize only what they name
``collect``        :class:`~robot_rl.stages.collect.CollectConfig`
``base``           :class:`~robot_rl.stages.train_base.BaseTrainConfig` (its ``seed`` is the run's, its ``policy`` the
                   next section)
``policy``         :class:`~robot_rl.policies.base.PolicyConfig` hyper-parameters (kind, keys and dims come from
                   ``base`` and the store)
``algo``           the residual learner (a string, not a mapping): ``ppo`` (:mod:`robot_rl.rl.ppo`), ``td3``
                   (:mod:`robot_rl.rl.td3`) or ``sac`` (:mod:`robot_rl.rl.sac`); it also picks the residual's actor
                   head unless ``residual.head`` is set
``ppo``            :class:`~robot_rl.rl.ppo.PPOConfig` (its ``seed`` is the run's)
``td3``            :class:`~robot_rl.rl.td3.TD3Config` (its ``seed`` is the run's)
``sac``            :class:`~robot_rl.rl.sac.SACConfig` (its ``seed`` is the run's)
``residual``       :class:`~robot_rl.rl.residual.ResidualConfig` model fields (keys, dims filled in by the trainer)
``eval``           :class:`~robot_rl.stages.evaluation.EvalConfig`
``transfer``       :class:`~robot_rl.stages.transfer.TransferConfig`
``distill``        :class:`~robot_rl.stages.distill.DistillConfig` (the student trains with ``base`` / ``policy``)
``serve``          :class:`~robot_rl.serve.server.ServeConfig`
``success``        :class:`~robot_rl.stages.success.SuccessConfig` (``robot-rl success-classifier``)
=================  ==================================================================================================

One syntax everywhere: ``--set section.field=value`` with the value parsed as YAML (:func:`parse_value`), nested
fields by further dots (``--set policy.down_dims=[32,64,128]``, ``--set env.controller.pos_scale=0.01``,
``--set randomization.physics.object_mass=[0.7,1.3]``). A YAML file (``--config FILE``) holds the same sections as
mappings (``ppo: {residual_l2: 0.1}``); every command writes its resolved config as such a file
(``<out>/config.yaml``), and ``--config`` of it reproduces the run. Mappings merge key by key; any other value
replaces the one before. Bad input raises :class:`~robot_rl.errors.ConfigError` naming ``section.field``: an unknown
section or field (listing the valid ones), a section the command does not use (given by a flag or ``--set``; a YAML
file's other sections are skipped, so a pipeline's config.yaml serves ``eval`` too), a value of the wrong type, a
number that is not finite, does not fit int64 or lies outside its field's range (:data:`LIMITS`, checked by
:func:`check_number` for every value given, in every section), or a value its dataclass's own check refuses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from robot_rl.errors import ConfigError

ORDER = ("seed", "algo", "task", "env", "randomization", "collect", "base", "policy", "ppo", "td3", "sac", "residual",
         "eval", "transfer", "distill", "serve", "success")
SCALARS = {"seed": (int, 0), "algo": (str, "ppo")}  # top-level values that are not mappings of fields
ALGOS = {"ppo": "gaussian", "td3": "tanh", "sac": "tanh_gaussian"}  # residual learner -> the actor head it trains
OFFPOLICY_ALGOS = ("td3", "sac")  # the learners of robot_rl.rl.offpolicy (resumable, with a replay)
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "collect": ("seed", "task", "env", "randomization", "collect"),
    "train-base": ("seed", "base", "policy"),
    "train-residual": ("seed", "algo", "task", "env", "randomization", "ppo", "td3", "sac", "residual", "eval"),
    "eval": ("seed", "task", "env", "randomization", "eval"),
    "transfer": ("task", "env", "randomization", "transfer"),
    "distill": ("seed", "task", "env", "randomization", "base", "policy", "eval", "distill"),
    "pipeline": ("seed", "algo", "task", "env", "randomization", "collect", "base", "policy", "ppo", "td3", "sac",
                 "residual", "eval"),
    "serve": ("serve",),
    "learn": ("seed", "algo", "task", "env", "td3", "residual", "serve"),
    "success-classifier": ("seed", "success"),
}


# --------------------------------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class Limit:
    """The allowed values of a numeric config field (of each number in it, for a list / tuple field):
    ``lo <= v <= hi`` (``lo < v`` with ``lo_open``); None = unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def text(self) -> str:
        num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        hi = "" if self.hi is None else f"<= {num(self.hi)}"
        return " and ".join(t for t in (lo, hi) if t)

    def admits(self, v) -> bool:
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and \
            (self.hi is None or v <= self.hi)


INT64 = 2**63 - 1
SEED = Limit(0, 2**31 - 1)  # episode seeds are offsets from this (robot_rl.envs.vector), and torch/numpy take it
POS, NONNEG, FRACTION, RATE = Limit(1), Limit(0), Limit(0, 1), Limit(0, 1, lo_open=True)
COUNT, ENVS, WIDTH = Limit(1, 10**7), Limit(1, 256), Limit(1, 16384)
#: Bounds of every numeric config field, by dotted name (the one table; :func:`check_number` applies it, and a test
#: checks that every int/float field of every section has an entry). Every number is also finite and fits int64.
LIMITS: dict[str, Limit] = {
    "seed": SEED,
    "task.max_steps": Limit(1, 100_000), "task.tolerance": Limit(0, 0.05, lo_open=True),
    "task.lift_height": Limit(0, 1, lo_open=True),
    "env.control_dt": Limit(0, 1, lo_open=True), "env.physics_dt": Limit(0, 0.1, lo_open=True),
    "env.init_joint_noise": Limit(0, 1), "env.max_steps": Limit(1, 100_000), "env.image_size": Limit(8, 1024),
    "env.render_size": Limit(16, 4096), "env.controller.pos_scale": Limit(0, 1, lo_open=True),
    "env.controller.yaw_scale": Limit(0, math.pi, lo_open=True), "env.controller.max_width": Limit(0, 0.2),
    "env.controller.workspace_low": Limit(-5, 5), "env.controller.workspace_high": Limit(-5, 5),
    "env.controller.yaw_limit": Limit(0, math.pi), "env.controller.ik_iters": Limit(1, 1000),
    "env.controller.damping": Limit(0, 10), "env.controller.nullspace_gain": Limit(0, 10),
    "env.controller.max_joint_delta": Limit(0, math.pi, lo_open=True),
    "collect.episodes": Limit(1, 10**6), "collect.noise": Limit(0, 10), "collect.bias": Limit(-1, 1),
    "collect.max_attempts": COUNT, "collect.n_envs": ENVS,
    "base.steps": Limit(1, 10**8), "base.batch_size": Limit(1, 65536), "base.lr": Limit(0, 1, lo_open=True),
    "base.weight_decay": Limit(0, 1), "base.warmup_steps": Limit(0, 10**8), "base.val_ratio": Limit(0, 0.9),
    "base.val_every": Limit(1, 10**8), "base.loader_workers": Limit(0, 64),
    "policy.image_crop": Limit(1, 1024), "policy.n_obs_steps": Limit(1, 64), "policy.n_action_steps": Limit(1, 512),
    "policy.horizon": Limit(1, 512), "policy.down_dims": WIDTH, "policy.kernel_size": Limit(1, 31),
    "policy.n_groups": Limit(1, 1024), "policy.diffusion_step_embed_dim": WIDTH,
    "policy.num_train_timesteps": Limit(1, 10_000), "policy.num_inference_steps": Limit(1, 10_000),
    "policy.ema_power": Limit(0, 10, lo_open=True), "policy.ema_max_decay": FRACTION,
    "policy.image_channels": WIDTH, "policy.image_num_keypoints": Limit(1, 1024), "policy.image_feature_dim": WIDTH,
    "policy.bc_hidden": WIDTH,
    "ppo.total_env_steps": Limit(1, 10**10), "ppo.n_envs": ENVS, "ppo.n_steps": Limit(1, 100_000),
    "ppo.gamma": RATE, "ppo.gae_lambda": FRACTION, "ppo.clip_coef": Limit(0, 10, lo_open=True),
    "ppo.update_epochs": Limit(1, 1000), "ppo.n_minibatches": Limit(1, 100_000), "ppo.lr_actor": RATE,
    "ppo.lr_critic": RATE, "ppo.max_grad_norm": Limit(0, 1e6, lo_open=True), "ppo.target_kl": Limit(0, 1e3),
    "ppo.vf_coef": Limit(0, 1e3), "ppo.residual_l2": Limit(0, 1e6), "ppo.val_every": Limit(0, 10**10),
    "ppo.val_episodes": Limit(1, 100_000),
    "td3.total_env_steps": Limit(1, 10**10), "td3.n_envs": ENVS, "td3.batch_size": Limit(1, 65536),
    "td3.utd_ratio": Limit(0, 1000, lo_open=True), "td3.n_step": Limit(1, 1000), "td3.gamma": RATE,
    "td3.n_critics": Limit(1, 1000), "td3.n_target_critics": Limit(1, 1000), "td3.critic_hidden": WIDTH,
    "td3.lr_actor": RATE, "td3.lr_critic": RATE, "td3.tau": RATE, "td3.policy_delay": Limit(1, 10**6),
    "td3.target_noise": Limit(0, 10), "td3.target_noise_clip": Limit(0, 10), "td3.explore_std": Limit(0, 10),
    "td3.explore_decay_steps": Limit(0, 10**10), "td3.explore_std_final": Limit(0, 10),
    "td3.learning_starts": Limit(0, 10**10), "td3.warmup_noise": Limit(0, 1),
    "td3.critic_warmup_updates": Limit(0, 10**10), "td3.max_grad_norm": Limit(0, 1e6, lo_open=True),
    "td3.demo_ratio": FRACTION, "td3.intervention_penalty": Limit(0, 1e3), "td3.buffer_size": Limit(1, 10**9),
    "td3.log_every": Limit(1, 10**10), "td3.checkpoint_every": Limit(0, 10**10), "td3.val_every": Limit(0, 10**10),
    "td3.val_episodes": Limit(1, 100_000), "td3.actors": Limit(0, 256), "td3.push_every": Limit(1, 10**9),
    "td3.max_backlog": Limit(1, 10**9),
    "sac.init_temperature": Limit(0, 1e3, lo_open=True), "sac.lr_temperature": RATE,
    "sac.target_entropy": Limit(-1e3, 1e3),
    "residual.alpha": Limit(0, 1, lo_open=True), "residual.alpha_per_dim": Limit(0, 1, lo_open=True),
    "residual.hidden": WIDTH, "residual.log_std_init": Limit(-20, 5),
    "eval.episodes": Limit(1, 10**6), "eval.n_envs": ENVS, "eval.seed_start": SEED, "eval.videos": Limit(0, 1000),
    "distill.episodes": Limit(1, 10**6), "distill.dagger_rounds": Limit(0, 100), "distill.dagger_episodes":
    Limit(1, 10**6), "distill.dagger_steps": Limit(1, 10**8),
    "transfer.episodes": Limit(1, 10**6), "transfer.n_envs": ENVS, "transfer.seed_start": SEED,
    "transfer.videos": Limit(0, 1000),
    "serve.port": Limit(0, 65535), "serve.max_batch": Limit(1, 4096), "serve.batch_window_ms": Limit(0, 1000),
    "serve.max_message_bytes": Limit(1024, 2**30), "serve.control_rate_hz": Limit(0, 10_000, lo_open=True),
    "serve.max_sessions": Limit(1, 10**6), "serve.session_ttl_s": Limit(0, 10**7, lo_open=True), "serve.seed": SEED,
    "serve.max_sessions_per_client": Limit(1, 10**6), "serve.session_idle_s": Limit(0, 10**7, lo_open=True),
    "success.steps": Limit(1, 10**8), "success.batch_size": Limit(2, 65536), "success.lr": Limit(0, 1, lo_open=True),
    "success.weight_decay": Limit(0, 1), "success.val_fraction": Limit(0, 1, lo_open=True),
    "success.threshold": Limit(0, 1), "success.channels": Limit(4, 1024), "success.num_keypoints": Limit(1, 1024),
    "success.feature_dim": Limit(1, 65536), "success.crop": Limit(8, 1024),
}
_TD3_ONLY = ("target_noise", "target_noise_clip", "explore_std", "explore_decay_steps", "explore_std_final", "actors",
             "push_every", "max_backlog")  # the TD3Config fields SACConfig lacks (robot_rl.rl.td3)
LIMITS.update({f"sac.{k[4:]}": v for k, v in list(LIMITS.items())
               if k.startswith("td3.") and k[4:] not in _TD3_ONLY})  # the fields both share (robot_rl.rl.offpolicy)


def check_number(value, where: str) -> None:
    """THE number check of every config value: a float must be finite, an int must fit int64, and a field of
    :data:`LIMITS` (dotted name ``where``; list items ``where.<i>`` use their field's limit) must lie in its range.
    Non-numbers (and bools) pass. Raises ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(where, f"{value!r} is not a finite number", "give a finite number")
    if isinstance(value, int) and abs(value) > INT64:
        raise ConfigError(where, f"{value} does not fit a 64-bit integer", "give a smaller integer")
    field_name = where
    while field_name not in LIMITS and "." in field_name and field_name.rsplit(".", 1)[1].isdigit():
        field_name = field_name.rsplit(".", 1)[0]  # policy.down_dims.2 -> policy.down_dims
    limit = LIMITS.get(field_name)
    if limit is not None and not limit.admits(value):
        raise ConfigError(where, f"{value!r} is out of range (must be {limit.text()})",
                          f"give a value {limit.text()}")


def check_numbers(value, where: str) -> None:
    """:func:`check_number` on ``value`` and on every number nested in it (lists, tuples, mappings, dataclasses)."""
    if is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            check_numbers(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_numbers(v, f"{where}.{i}")
    else:
        check_number(value, where)


MAX_NODES = 10_000  # most values (list items, mapping entries, scalars) one --set or config file may expand to


def check_size(doc, where: str):
    """``doc`` (parsed YAML), unless it is cyclic (a recursive YAML alias) or expands to more than
    :data:`MAX_NODES` values with every alias counted where it is used (a "billion laughs" document is a few
    hundred bytes and would take the resolver hours). Raises ConfigError naming ``where``."""
    sizes: dict[int, int] = {}

    def size(v) -> int:
        if not isinstance(v, (list, tuple, dict)):
            return 1
        key = id(v)
        if key in sizes:
            if sizes[key] < 0:
                raise ConfigError(where, "holds a recursive YAML alias (a value that contains itself)",
                                  "write the value out without anchors (&name) and aliases (*name)")
            return sizes[key]
        sizes[key] = -1
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
        sizes[key] = 1 + sum(size(x) for x in items)
        return sizes[key]

    n = size(doc)
    if n > MAX_NODES:
        raise ConfigError(where, f"expands to {n} values (more than {MAX_NODES}; YAML aliases count each use)",
                          "give a config of ordinary size; write repeated values out without aliases (*name)")
    return doc


# --------------------------------------------------------------------------------------------------- values
def parse_value(text: str):
    """A command-line value parsed as YAML (``0.004`` -> float, ``[32, 64]`` -> list, ``{a: 1}`` -> dict, ``true``,
    ``null``); the empty string stays ``""``. Used by ``--set`` of every command, ``robot-rl bringup --set``
    included. Raises ConfigError (field ``--set``) when ``text`` is not YAML."""
    if text == "":
        return ""
    try:
        return check_size(yaml.safe_load(text), "--set")
    except yaml.YAMLError as e:
        raise ConfigError("--set", f"{text!r} is not a YAML value ({str(e).splitlines()[0]})",
                          "write e.g. --set ppo.n_envs=8 or --set policy.down_dims=[32,64,128]") from None


def parse_set(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=V"`` -> (``["a", "b", "c"]``, :func:`parse_value` ``(V)``). Raises ConfigError (field ``--set``)
    when there is no ``=`` or a key part is empty."""
    key, eq, val = text.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError("--set", f"{_short(text)} is not section.field=value", "write e.g. --set ppo.residual_l2=0.1")
    try:
        return parts, parse_value(val)
    except ConfigError as e:
        raise ConfigError("--set", f"{_short(text)}: {e.problem}", e.fix) from None


def plain(v):
    """``v`` as plain YAML/JSON data: dataclasses -> dicts, tuples -> lists, numpy scalars -> Python numbers."""
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        return v.item()
    return v


def _short(value, most: int = 120) -> str:
    """``repr(value)`` cut to ``most`` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    name = getattr(origin or hint, "__name__", str(hint))
    return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string", "list": "a list",
            "tuple": "a list", "dict": "a mapping"}.get(name, name)


def _number(value):
    """A YAML scalar that should be a number: PyYAML (YAML 1.1) reads ``1e6`` as a string, so numeric strings count."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def coerce(value, hint, where: str, example=None):
    """``value`` converted to the type ``hint`` (int, float, bool, str, list[X], tuple, dict[K, V], X | None, a
    dataclass given as a mapping of its fields); ints are accepted for floats and integral numbers for ints.
    Raises ConfigError naming ``where`` (with ``example`` in the fix) for anything else."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(why: str = ""):
        eg = f", e.g. --set {where}={json.dumps(plain(example))}" if example is not None else ""
        return ConfigError(where, f"{_short(value)} is not {_describe(hint)}{why}", f"give {_describe(hint)}{eg}")

    if hint in (Any, object) or hint is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, example)
            except ConfigError:
                pass
        raise bad()
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise bad()
        return build_dataclass(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        v = _number(value)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        if isinstance(v, float):
            if not v.is_integer():
                raise bad()
            return int(v)
        return int(v)
    if hint is float:
        v = _number(value)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        return float(v)
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    base = origin or hint
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if base is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise bad(f" of {len(args)} items")
            items = [coerce(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [coerce(v, args[0], f"{where}.{i}") if args else v for i, v in enumerate(value)]
        return tuple(items) if base is tuple else items
    if base is dict:
        if not isinstance(value, dict):
            raise bad()
        vh = args[1] if len(args) == 2 else Any
        return {k: coerce(v, vh, f"{where}.{k}") for k, v in value.items()}
    return value


@functools.cache
def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: fall back to the defaults' types
        return {}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_dataclass(cls, values: dict, where: str, start=None):
    """``cls`` built from its defaults (or from instance ``start``) with ``values`` (a mapping of its fields) applied,
    each converted by :func:`coerce`; nested dataclass fields merge key by key. Fields listed in the class's
    ``__not_settable__`` ({field: fix}) are refused. Raises ConfigError for an unknown field (listing the valid
    ones) or a value of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(where, f"is {values!r}, not a mapping of fields",
                          f"set its fields, e.g. --set {where}.{fields(cls)[0].name}=...")
    hints, fs = _hints(cls), {f.name: f for f in fields(cls)}
    refused = getattr(cls, "__not_settable__", {})
    kw = {n: (getattr(start, n) if start is not None else _default(f)) for n, f in fs.items()}
    for k, v in values.items():
        name = f"{where}.{k}"
        if k in refused:
            raise ConfigError(name, "is not a setting of this section", refused[k])
        if k not in fs:
            raise ConfigError(name, f"unknown field of {where}", f"use one of {', '.join(fs)}")
        hint = hints.get(k, type(kw[k]) if kw[k] is not None else Any)
        if is_dataclass(kw[k]) and isinstance(v, dict):
            kw[k] = build_dataclass(type(kw[k]), v, name, start=kw[k])
        else:
            kw[k] = coerce(v, hint, name, example=kw[k])
            check_numbers(kw[k], name)
    return cls(**kw)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def nest(path: Sequence[str], value) -> dict:
    """``(["a", "b"], 1)`` -> ``{"a": {"b": 1}}``."""
    for part in reversed(path):
        value = {part: value}
    return value


def _paths(d: dict, prefix: str = "") -> Iterable[str]:
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _paths(v, f"{prefix}{k}.")


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class TaskSection:
    """``name``: the task; ``kwargs``: every field of that task's dataclass (written flat in YAML:
    ``task: {name: place, tolerance: 0.004, ...}``)."""

    name: str = "place"
    kwargs: dict = field(default_factory=dict)


_TASK_INTERNAL = ("name", "derived_keys")  # Task dataclass fields that are not settings (see make_task)


def build_task(values: dict) -> TaskSection:
    """The ``task`` section from a flat mapping ``{name: ..., <field>: ...}``: the task is built (make_task checks
    every field name and value), and ``kwargs`` holds all of its fields. Raises ConfigError naming ``task.<field>``."""
    from robot_rl.envs.tasks import make_task

    if not isinstance(values, dict):
        raise ConfigError("task", f"is {values!r}, not a mapping of fields", "set its fields, e.g. --set task.name=lift")
    values = dict(values)
    check_numbers(values, "task")
    name = coerce(values.pop("name", TaskSection.name), str, "task.name", "place")
    if "kwargs" in values:
        raise ConfigError("task.kwargs", "is not a setting", "set the task's fields directly, e.g. "
                          "--set task.tolerance=0.004")
    task = make_task(name, **values)
    return TaskSection(name, {f.name: plain(getattr(task, f.name)) for f in fields(task)
                              if f.name not in _TASK_INTERNAL})


@dataclass
class RandomizationSection:
    """``preset``: ``none``, ``default`` or ``visual`` (:data:`robot_rl.envs.randomization.PRESETS`); ``physics`` / ``sensing``
    / ``visual``: parameters of each group (:data:`robot_rl.envs.randomization.PARAMS`), on top of the preset."""

    preset: str = "none"
    physics: dict = field(default_factory=dict)
    sensing: dict = field(default_factory=dict)
    visual: dict = field(default_factory=dict)

    def spec(self):
        """The spec :mod:`robot_rl.envs.randomization` takes: None (off), a preset name, or a dict."""
        groups = {g.name: getattr(self, g.name) for g in fields(self) if g.name != "preset" and getattr(self, g.name)}
        if not groups:
            return None if self.preset == "none" else self.preset
        return {"preset": self.preset, **groups}


def derived_section(name: str, cls, not_settable: dict[str, str], doc: str, extra=(), defaults=None):
    """A section dataclass with ``cls``'s fields (same types and defaults) except ``not_settable`` ({field: fix};
    setting one is a ConfigError with that fix), plus ``extra`` fields [(name, type, default)] first and
    ``defaults`` {field: (type, default)} replacing some."""
    hints, defaults = _hints(cls), defaults or {}
    specs = [(n, t, field(default=d)) for n, t, d in extra]
    for f in fields(cls):
        if f.name in not_settable:
            continue
        if f.name in defaults:
            t, d = defaults[f.name]
            specs.append((f.name, t, field(default=d)))
            continue
        fd = field(default=f.default) if f.default is not dataclasses.MISSING else \
            field(default_factory=f.default_factory)
        specs.append((f.name, hints.get(f.name, Any), fd))
    out = dataclasses.make_dataclass(name, specs, namespace={"__doc__": doc, "__module__": __name__})
    out.__not_settable__ = dict(not_settable)
    return out


@functools.cache
def section_classes() -> dict[str, type]:
    """{section name: dataclass} (imports the stage modules, hence torch: built on first use)."""
    from robot_rl.envs.env import EnvConfig
    from robot_rl.policies.base import PolicyConfig
    from robot_rl.rl.ppo import PPOConfig
    from robot_rl.rl.residual import ResidualConfig
    from robot_rl.rl.sac import SACConfig
    from robot_rl.rl.td3 import TD3Config
    from robot_rl.serve.server import ServeConfig
    from robot_rl.stages.collect import CollectConfig
    from robot_rl.stages.distill import DistillConfig
    from robot_rl.stages.evaluation import EvalConfig
    from robot_rl.stages.success import SuccessConfig
    from robot_rl.stages.train_base import BaseTrainConfig
    from robot_rl.stages.transfer import TransferConfig

    seed = "the run's seed is the top-level `seed`: use --set seed=N"
    store = "read from the demonstration store by train-base"
    env = derived_section(
        "EnvSection", EnvConfig, {"randomization": "use the randomization section, e.g. "
                                                   "--set randomization.preset=default"},
        "EnvConfig fields + backend + ray; cameras / image_size None = the policy's (rollouts) or EnvConfig's; ray: "
        "None = env workers are local subprocesses, an address (local | auto | HOST:PORT) = Ray actors on that "
        "cluster (robot_rl.envs.ray_envs).",
        extra=[("backend", str, "mujoco"), ("ray", str | None, None)],
        defaults={"cameras": (tuple | None, None), "image_size": (tuple | None, None)})
    base = derived_section("BaseSection", BaseTrainConfig,
                           {"seed": seed, "policy": "use the policy section, e.g. --set policy.horizon=16"},
                           BaseTrainConfig.__doc__)
    policy = derived_section("PolicySection", PolicyConfig, {
        "kind": "use --set base.kind=bc|diffusion", "obs_keys": "use --set base.obs_keys=[...]",
        "image_keys": "use --set base.image_keys=[...]", "obs_dims": store, "image_shape": store,
        "action_dim": store}, PolicyConfig.__doc__)
    ppo = derived_section("PPOSection", PPOConfig, {"seed": seed}, PPOConfig.__doc__)
    td3 = derived_section("TD3Section", TD3Config, {"seed": seed}, TD3Config.__doc__)
    sac = derived_section("SACSection", SACConfig, {"seed": seed}, SACConfig.__doc__)
    derived = "filled in by the trainer from the base policy and the task"
    residual = derived_section("ResidualSection", ResidualConfig,
                               {k: derived for k in ("obs_keys", "obs_dims", "action_dim")
                                if k in ResidualConfig.__dataclass_fields__}, ResidualConfig.__doc__)
    return {"task": TaskSection, "env": env, "randomization": RandomizationSection, "collect": CollectConfig,
            "base": base, "policy": policy, "ppo": ppo, "td3": td3, "sac": sac, "residual": residual, "eval": EvalConfig,
            "transfer": TransferConfig, "distill": DistillConfig, "serve": ServeConfig, "success": SuccessConfig}


# --------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    """A resolved configuration: one typed instance per section the command uses (the others are None).

    ``given``: the dotted fields a preset, file, flag or ``--set`` set (everything else is a dataclass default).
    The ``*_kwargs`` / ``*_config`` helpers give what the library functions take.
    """

    command: str
    sections: tuple
    seed: int = 0
    algo: str = "ppo"
    task: TaskSection | None = None
    env: Any = None
    randomization: RandomizationSection | None = None
    collect: Any = None
    base: Any = None
    policy: Any = None
    ppo: Any = None
    td3: Any = None
    sac: Any = None
    residual: Any = None
    eval: Any = None
    transfer: Any = None
    distill: Any = None
    serve: Any = None
    success: Any = None
    given: frozenset = frozenset()

    def to_dict(self) -> dict:
        """The resolved config as plain YAML data: {section: {field: value}} for the sections used."""
        out = {}
        for s in ORDER:
            if s not in self.sections:
                continue
            if s in SCALARS:
                out[s] = getattr(self, s)
            elif s == "task":
                out[s] = {"name": self.task.name, **plain(self.task.kwargs)}
            else:
                out[s] = plain(getattr(self, s))
        if "residual" in out:  # the head the run trains (residual_config): a --config of this reproduces the run
            out["residual"]["head"] = self.residual_config().head
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- what the library takes
    def env_kwargs(self, *, randomization: bool = True, backend: bool = False) -> dict:
        """:class:`~robot_rl.envs.env.EnvConfig` fields for ``make_env`` / ``make_vector_env`` / ``evaluate``: the
        ``env`` section without unset (None) cameras / image_size, plus ``randomization`` (its spec, when it turns
        something on and ``randomization``), ``backend`` (when ``backend``) and ``ray`` (when set: the vector envs'
        Ray cluster, :func:`robot_rl.envs.vector.make_vector_env`; ``make_env`` does not take it)."""
        kw = {k: v for k, v in ((f.name, getattr(self.env, f.name)) for f in fields(self.env))
              if not (k in ("cameras", "image_size") and v is None)}
        b, address = kw.pop("backend"), kw.pop("ray")
        if address is not None:
            kw["ray"] = address
        if backend:
            kw["backend"] = b
        spec = self.randomization.spec() if self.randomization is not None else None
        if randomization and spec is not None:
            kw["randomization"] = spec
        return kw

    def base_config(self):
        """:class:`~robot_rl.stages.train_base.BaseTrainConfig` (``policy`` = every policy field, ``seed``)."""
        from robot_rl.stages.train_base import BaseTrainConfig

        return BaseTrainConfig(**plain_fields(self.base), policy=plain(self.policy), seed=self.seed)

    def ppo_config(self):
        """:class:`~robot_rl.rl.ppo.PPOConfig` with the run's seed."""
        from robot_rl.rl.ppo import PPOConfig

        return PPOConfig(**plain_fields(self.ppo, keep_tuples=True), seed=self.seed)

    def td3_config(self):
        """:class:`~robot_rl.rl.td3.TD3Config` with the run's seed."""
        from robot_rl.rl.td3 import TD3Config

        return TD3Config(**plain_fields(self.td3, keep_tuples=True), seed=self.seed)

    def sac_config(self):
        """:class:`~robot_rl.rl.sac.SACConfig` with the run's seed."""
        from robot_rl.rl.sac import SACConfig

        return SACConfig(**plain_fields(self.sac, keep_tuples=True), seed=self.seed)

    def offpolicy_config(self):
        """The off-policy learner's config of ``algo`` (td3 or sac); ConfigError for ppo."""
        if self.algo not in OFFPOLICY_ALGOS:
            raise ConfigError("algo", f"{self.algo} is not an off-policy learner", "use --algo td3 or --algo sac")
        return self.td3_config() if self.algo == "td3" else self.sac_config()

    def residual_config(self):
        """:class:`~robot_rl.rl.residual.ResidualConfig` (its keys and dims left for the trainer to fill in); the
        actor head is the one ``algo`` trains (:data:`ALGOS`) unless ``residual.head`` was given."""
        from robot_rl.rl.residual import ResidualConfig

        kw = plain_fields(self.residual, keep_tuples=True)
        if "residual.head" not in self.given:
            kw["head"] = ALGOS.get(self.algo, kw["head"])
        return ResidualConfig(**kw)


def plain_fields(obj, keep_tuples: bool = False) -> dict:
    """{field: value} of a dataclass instance, one level deep (values converted by :func:`plain` unless
    ``keep_tuples``)."""
    return {f.name: (getattr(obj, f.name) if keep_tuples else plain(getattr(obj, f.name))) for f in fields(obj)}


def load_yaml(path: str | Path) -> dict:
    """A config file: a mapping of sections. Raises ConfigError (field ``config``) when it is missing, not YAML or
    not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"{p} not found", "pass an existing YAML file (e.g. a run's config.yaml)")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{p} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") \
            from None
    try:
        doc = {} if doc is None else check_size(doc, "config")
    except ConfigError as e:
        raise ConfigError("config", f"{p} {e.problem}", e.fix) from None
    if not isinstance(doc, dict):
        raise ConfigError("config", f"{p} holds a {type(doc).__name__}, not a mapping of sections",
                          "write e.g. 'ppo: {total_env_steps: 600000}'")
    return doc


def resolve(command: str, *, preset: dict | None = None, files: Sequence[str | Path] = (),
            flags: dict[str, Any] | None = None, sets: Sequence[str] = (), check: bool = True) -> Config:
    """THE configuration resolver: dataclass defaults <- ``preset`` (a mapping of sections) <- YAML ``files`` (in
    order) <- ``flags`` ({"section.field": value}, None = not given) <- ``sets`` (``"section.field=value"``, in
    order), for the sections of ``command`` (:data:`COMMAND_SECTIONS`).

    With ``check``, the sections are also checked together before anything runs: the task and env options
    (``check_env_options``, the randomization spec included), PPO's own ``validate``, the eval/transfer counts.
    Raises ConfigError (see the module doc)."""
    if command not in COMMAND_SECTIONS:
        raise ConfigError("command", f"unknown command {command!r}", f"use one of {', '.join(COMMAND_SECTIONS)}")
    used = COMMAND_SECTIONS[command]
    layers: list[tuple[dict, bool]] = []  # (mapping of sections, lenient: skip sections the command does not use)
    if preset:
        layers.append((preset, False))
    layers += [(load_yaml(f), True) for f in files]
    for k, v in (flags or {}).items():
        if v is not None:
            layers.append((nest(k.split("."), v), False))
    for s in sets:
        layers.append((nest(*parse_set(s)), False))
    raw: dict[str, Any] = {}
    given: set[str] = set()
    for doc, lenient in layers:
        for sec, body in doc.items():
            if sec not in ORDER:
                raise ConfigError(str(sec), "unknown config section", f"use one of {', '.join(used)}")
            if sec not in used:
                if lenient:
                    continue
                raise ConfigError(sec, f"`robot-rl {command}` does not use the {sec} section",
                                  f"its sections are {', '.join(used)}")
            if sec in SCALARS:
                raw[sec] = body
                given.add(sec)
                continue
            if not isinstance(body, dict):
                raise ConfigError(sec, f"is {body!r}, not a mapping of fields",
                                  f"set its fields, e.g. --set {sec}.<field>=... (see robot_rl/config.py)")
            raw[sec] = _merge(raw.get(sec, {}), body)
            given.update(f"{sec}.{p}" for p in _paths(body))
    classes = section_classes()
    cfg = Config(command=command, sections=used, given=frozenset(given))
    for sec in used:
        if sec in SCALARS:
            kind, default = SCALARS[sec]
            setattr(cfg, sec, coerce(raw.get(sec, default), kind, sec, default))
            check_number(getattr(cfg, sec), sec)
        elif sec == "task":
            cfg.task = build_task(raw.get("task", {}))
        else:
            setattr(cfg, sec, build_dataclass(classes[sec], raw.get(sec, {}), sec))
    if check:
        check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """The checks :func:`resolve` runs with ``check`` (each section's own validation, and the env options against
    the task). Raises ConfigError."""
    if cfg.env is not None and cfg.task is not None:
        from robot_rl.envs.env import check_env_options

        check_env_options(cfg.task.name, cfg.task.kwargs, **cfg.env_kwargs(backend=True))
    elif cfg.randomization is not None:
        from robot_rl.envs.randomization import resolve as resolve_randomization

        resolve_randomization(cfg.randomization.spec())
    if "algo" in cfg.sections and cfg.algo not in ALGOS:
        raise ConfigError("algo", f"unknown residual learner {cfg.algo!r}", f"use one of {', '.join(ALGOS)}")
    if cfg.ppo is not None:
        cfg.ppo_config().validate()
    if cfg.td3 is not None:
        cfg.td3_config().validate()
    if cfg.sac is not None:
        cfg.sac_config().validate()
    if cfg.residual is not None:
        _check_residual_section(cfg)
    for sec in ("eval", "transfer"):
        if getattr(cfg, sec) is not None:
            getattr(cfg, sec).validate(sec)
    if cfg.distill is not None:
        cfg.distill.validate()
    if cfg.collect is not None:
        for k in ("episodes",):
            v = getattr(cfg.collect, k)
            if v < 1:
                raise ConfigError(f"collect.{k}", f"{v} < 1", "ask for at least one episode")


def _check_residual_section(cfg: Config) -> None:
    """The residual's model fields, checked before any stage runs (a pipeline would otherwise find a bad one only
    after collecting demonstrations and training the base): ResidualConfig's own checks on stand-in keys, the PPO
    head, and fine keys the task observes."""
    from dataclasses import replace

    from robot_rl.envs.env import ACTION_NAMES, ROBOT_OBS_DIMS
    from robot_rl.envs.tasks import make_task
    from robot_rl.rl.residual import DEFAULT_FINE_KEYS

    rc = cfg.residual_config()
    want = ALGOS.get(cfg.algo) if "algo" in cfg.sections else None
    if want is not None and rc.head != want:
        raise ConfigError("residual.head", f"{cfg.algo} trains the {want} head, not {rc.head!r}",
                          f"use residual.head={want}, or leave it unset")
    fine = dict(DEFAULT_FINE_KEYS.get(cfg.task.name, {}) if rc.fine_keys is None else rc.fine_keys) \
        if cfg.task is not None else dict(rc.fine_keys or {})
    if cfg.task is not None:
        have = {**ROBOT_OBS_DIMS, **make_task(cfg.task.name, **cfg.task.kwargs).obs_dims()}
        for k in fine:
            if k not in have:
                raise ConfigError(f"residual.fine_keys.{k}", f"task {cfg.task.name!r} has no observation {k!r}",
                                  f"use keys from {sorted(have)} or residual.fine_keys={{}}")
    replace(rc, obs_keys=["joint_pos"], obs_dims={"joint_pos": 1, **{k: 1 for k in fine}}, fine_keys=fine,
            action_dim=len(ACTION_NAMES)).validate()  # the envs' action (alpha_per_dim gives one scale each)


def write_config(cfg: Config, out_dir: str | Path, argv: Sequence[str] | None = None) -> Path:
    """Write ``<out_dir>/config.yaml`` (the resolved config; ``argv``, the command line, as a comment) and return its
    path. ``robot-rl <command> --config <that file>`` (with the same paths) reproduces the run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = f"# robot-rl {cfg.command}: resolved config (reproduce: robot-rl {cfg.command} --config this-file ...)\n"
    if argv:
        head += "# command line: robot-rl " + " ".join(str(a) for a in argv) + "\n"
    p = out / "config.yaml"
    p.write_text(head + cfg.to_yaml())
    return p
