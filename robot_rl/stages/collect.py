"""Scripted demonstration collection into the zarr store.

Each episode is rolled out with the scripted expert from a seed, and committed atomically with its metadata
(seed, task, source="scripted", success, backend, the sampled reset parameters, the expert's noise and, with
domain randomization on, the episode's randomization sample: ``extra["randomization"]``).

With ``n_envs`` > 1 (or a Ray address) the episodes run on a vector env
(:func:`~robot_rl.envs.vector.make_vector_env`), one scripted expert per worker in this process; finished episodes
are committed in seed order under the serial rule, so the store is the one a single env writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_rl.progress import progress_bar

from robot_rl.envs.env import EnvConfig, check_env_options, make_env
from robot_rl.errors import ConfigError
from robot_rl.envs.experts import ScriptedExpert
from robot_rl.datasets.episodes import EpisodeWriter
from robot_rl.datasets.store import ZarrStore

RECORDED_TASK_FIELDS = ("tolerance", "max_steps", "lift_height")


@dataclass
class CollectConfig:
    """The ``collect`` config section (``robot-rl collect``, the pipeline's first stage).

    episodes: demonstrations to keep; noise / bias: the scripted expert's action noise (std, in action units) and
    constant bias (m) (:class:`~robot_rl.envs.experts.ScriptedExpert`); only_success: keep successful episodes only;
    max_attempts: most episodes tried (None = 4 x episodes); nominal_task: collect on the task's default settings,
    ignoring the ``task`` section's fields other than its name (the pipeline presets do: demonstrations are kept when
    they succeed at the default tolerance, the residual is trained and evaluated at ``task.tolerance``); n_envs:
    parallel env workers (an integer >= 1; 1 = one env in this process). The store does not depend on it: episodes
    are committed in seed order and kept or counted exactly as with one env.
    """

    episodes: int = 100
    noise: float = 0.3
    bias: float = 0.0
    only_success: bool = True
    max_attempts: int | None = None
    nominal_task: bool = False
    n_envs: int = 1


def rollout_expert(env, expert: ScriptedExpert, seed: int) -> tuple[EpisodeWriter, bool]:
    """One expert episode. Returns (the episode in an :class:`~robot_rl.datasets.episodes.EpisodeWriter`: every
    observation key + ``action``, success).

    Step t holds the observation seen *before* action t (the standard (o_t, a_t) pairing).
    """
    obs, _ = env.reset(seed=seed)
    expert.reset(seed)
    episode = EpisodeWriter()
    while True:
        a = expert.act(obs)
        episode.add(obs, a)
        obs, _, term, trunc, info = env.step(a)
        if term or trunc:
            return episode, bool(info["success"])


class _SerialRule:
    """Which attempts a serial collection counts and keeps: attempts are taken in seed order, each is counted, a
    successful one (any one unless ``only_success``) is kept, and collection stops once ``n_episodes`` are kept or
    ``max_attempts`` were tried."""

    def __init__(self, n_episodes: int, max_attempts: int, only_success: bool):
        self.n_episodes, self.max_attempts, self.only_success = n_episodes, max_attempts, only_success
        self.kept = self.attempts = self.successes = 0

    @property
    def done(self) -> bool:
        return self.kept >= self.n_episodes or self.attempts >= self.max_attempts

    def count(self, ok: bool) -> bool:
        """Count the next attempt (in seed order; only while not :attr:`done`); True when it is kept."""
        self.attempts += 1
        self.successes += int(ok)
        keep = ok or not self.only_success
        self.kept += int(keep)
        return keep


def collect(store_path: str | Path, task: str, n_episodes: int, *, seed: int = 0, noise: float = CollectConfig.noise,
            bias: float = CollectConfig.bias, only_success: bool = CollectConfig.only_success,
            backend: str = "mujoco", cameras=(), image_size=(96, 96), overwrite: bool = False,
            max_attempts: int | None = None, progress: bool = True, randomization=None,
            task_kwargs: dict | None = None, env_kwargs: dict | None = None,
            n_envs: int = CollectConfig.n_envs) -> dict:
    """Collect ``n_episodes`` scripted demonstrations (successful ones only when ``only_success``).

    Seeds are ``seed, seed+1, ...``; failed attempts are skipped (and counted) when ``only_success``.
    Appends to an existing store unless ``overwrite``; raises ConfigError on an impossible request (before the store
    is touched) or when fewer than ``n_episodes`` were kept in ``max_attempts`` tries.
    ``randomization``: domain randomization spec (see :mod:`robot_rl.envs.randomization`); each episode's sample is
    stored in its metadata as ``extra["randomization"]`` ({} when off). ``task_kwargs``: task field overrides (e.g.
    ``{"tolerance": 0.004}``); ``env_kwargs``: further :class:`~robot_rl.envs.EnvConfig` fields (e.g. ``control_dt``)
    and ``ray`` (an address: the env workers are Ray actors, :func:`~robot_rl.envs.vector.make_vector_env`).

    ``n_envs``: parallel env workers (an integer >= 1, at most ``max_attempts`` are started). With more than one, or
    with a Ray address, the episodes run on a vector env; whatever ``n_envs``, the same seeds are tried, the same
    episodes kept and the store holds the same arrays and metadata in the same order as with one env (episodes that
    finish early wait for the earlier seeds; those past the point where one env would stop are dropped, uncounted).

    Returns {episodes (kept), attempts, successes, expert_success_rate, store (the path), n_steps (the store's)}.
    """
    if n_episodes < 1:
        raise ConfigError("episodes", f"{n_episodes} < 1", "ask for at least one episode")
    if not (isinstance(n_envs, int) and not isinstance(n_envs, bool) and n_envs >= 1):
        raise ConfigError("collect.n_envs", f"{n_envs!r} is not an integer >= 1",
                          "use an integer >= 1, e.g. --n-envs 4 (1 = one env in this process)")
    path = Path(store_path)
    # bad input fails before the store is touched (an --overwrite would otherwise already have emptied it)
    env_kwargs = dict(env_kwargs or {}, cameras=tuple(cameras), image_size=tuple(image_size),
                      randomization=randomization)
    _, options = check_env_options(task, task_kwargs, backend=backend, **env_kwargs)
    ray = env_kwargs.pop("ray", None)  # make_vector_env's; make_env does not take it
    controller = EnvConfig(**options).controller
    expert_kw = dict(noise=noise, bias=bias, pos_scale=controller.pos_scale, yaw_scale=controller.yaw_scale)
    ScriptedExpert(task, **expert_kw)  # a task without an expert, or a bad noise, fails here too
    store = ZarrStore.open_or_create(path, overwrite=overwrite)
    rule = _SerialRule(n_episodes, max_attempts or 4 * n_episodes, only_success)
    bar = progress_bar(total=n_episodes, desc=f"collect {task}", unit="ep", disable=not progress)

    def commit(episode: EpisodeWriter, s: int, ok: bool, params: dict, rnd: dict, recorded: dict) -> None:
        episode.commit(store, seed=s, task=task, source="scripted", success=ok, backend=backend,
                       extra={"params": params, "noise": noise, "bias": bias, "randomization": rnd,
                              "task_kwargs": recorded})
        bar.update(1)

    try:
        if n_envs == 1 and ray is None:
            _collect_serial(task, backend, task_kwargs, env_kwargs, expert_kw, seed, rule, commit)
        else:
            _collect_vector(task, backend, task_kwargs, env_kwargs, ray, n_envs, expert_kw, seed, rule, commit)
    finally:
        bar.close()
    if rule.kept < n_episodes:
        raise ConfigError("noise", f"only {rule.kept}/{n_episodes} successful episodes in {rule.attempts} attempts",
                          "lower the expert noise or raise max_attempts")
    return {"episodes": rule.kept, "attempts": rule.attempts, "successes": rule.successes,
            "expert_success_rate": rule.successes / rule.attempts, "store": str(path), "n_steps": store.n_steps}


def _recorded(task_obj) -> dict:
    """The task settings the success flags were judged under (an off-policy learner checks them:
    :mod:`robot_rl.rl.replay`)."""
    return {k: getattr(task_obj, k) for k in RECORDED_TASK_FIELDS if hasattr(task_obj, k)}


def _collect_serial(task, backend, task_kwargs, env_kwargs, expert_kw, seed, rule: _SerialRule, commit) -> None:
    """One env in this process: seeds ``seed, seed+1, ...`` rolled out one after the other."""
    env = make_env(task, backend, task_kwargs=task_kwargs, **env_kwargs)
    try:
        expert = ScriptedExpert(task, **expert_kw)
        recorded = _recorded(env.task)
        s = seed
        while not rule.done:
            episode, ok = rollout_expert(env, expert, s)
            if rule.count(ok):
                commit(episode, s, ok, env.params, env.randomization, recorded)
            s += 1
    finally:
        env.close()


def _collect_vector(task, backend, task_kwargs, env_kwargs, ray, n_envs, expert_kw, seed, rule: _SerialRule,
                    commit) -> None:
    """``n_envs`` env workers (at most ``rule.max_attempts``), one expert each here. Seeds are handed out in order
    (at most ``max_attempts`` of them); a finished episode is buffered with its success and the params /
    randomization its env reports before being reset, and the buffer is drained in seed order through ``rule``
    until it is done (what is still running or buffered then is dropped)."""
    from robot_rl.envs.vector import SeedSchedule, make_vector_env, reset_some

    if rule.done:  # max_attempts < 1: nothing to try (as with one env)
        return
    n = min(n_envs, rule.max_attempts)
    venv = make_vector_env(task, n, backend, task_kwargs=task_kwargs, ray=ray, **env_kwargs)
    try:
        recorded = _recorded(venv.get_attr("task")[0])
        experts = [ScriptedExpert(task, **expert_kw) for _ in range(n)]
        writers = [EpisodeWriter() for _ in range(n)]
        seeds = SeedSchedule(seed, rule.max_attempts)
        cur = [seeds.take() for _ in range(n)]  # the seed each env runs (None: no more seeds, the env idles)
        active = np.ones(n, dtype=bool)
        obs = reset_some(venv, active, cur, None)
        for i in range(n):
            experts[i].reset(cur[i])
        finished: dict[int, tuple] = {}  # seed -> (episode, success, params, randomization), waiting for its turn
        next_seed = seed  # the next seed the serial rule takes
        while not rule.done and active.any():
            acts: list = [None] * n
            for i in np.flatnonzero(active):
                o = {k: v[i] for k, v in obs.items()}
                acts[i] = experts[i].act(o)
                writers[i].add(o, acts[i])
            idle = np.zeros_like(next(a for a in acts if a is not None))  # the action of an env without a seed
            obs, _, term, trunc, info = venv.step(np.stack([idle if a is None else a for a in acts]))
            done = np.logical_or(term, trunc) & active
            if not done.any():
                continue
            params, rnd = venv.get_attr("params"), venv.get_attr("randomization")
            for i in np.flatnonzero(done):
                finished[cur[i]] = (writers[i], bool(info["success"][i]), params[i], rnd[i])
                writers[i] = EpisodeWriter()
                cur[i] = seeds.take()
                active[i] = cur[i] is not None
            while next_seed in finished and not rule.done:
                episode, ok, p, r = finished.pop(next_seed)
                if rule.count(ok):
                    commit(episode, next_seed, ok, p, r, recorded)
                next_seed += 1
            reset_mask = done & active
            if reset_mask.any() and not rule.done:
                obs = reset_some(venv, reset_mask, cur, obs)
                for i in np.flatnonzero(reset_mask):
                    experts[i].reset(cur[i])
    finally:
        venv.close()
