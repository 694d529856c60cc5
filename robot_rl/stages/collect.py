"""Scripted demonstration collection into the zarr store.

Each episode is rolled out with the scripted expert from a seed, and committed atomically with its metadata
(seed, task, source="scripted", success, backend, the sampled reset parameters, the expert's noise and, with
domain randomization on, the episode's randomization sample: ``extra["randomization"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from robot_rl.progress import progress_bar

from robot_rl.envs.env import check_env_options, make_env
from robot_rl.errors import ConfigError
from robot_rl.envs.experts import ScriptedExpert
from robot_rl.datasets.episodes import EpisodeWriter
from robot_rl.datasets.store import ZarrStore


@dataclass
class CollectConfig:
    """The ``collect`` config section (``robot-rl collect``, the pipeline's first stage).

    episodes: demonstrations to keep; noise / bias: the scripted expert's action noise (std, in action units) and
    constant bias (m) (:class:`~robot_rl.envs.experts.ScriptedExpert`); only_success: keep successful episodes only;
    max_attempts: most episodes tried (None = 4 x episodes); nominal_task: collect on the task's default settings,
    ignoring the ``task`` section's fields other than its name (the pipeline presets do: demonstrations are kept when
    they succeed at the default tolerance, the residual is trained and evaluated at ``task.tolerance``).
    """

    episodes: int = 100
    noise: float = 0.3
    bias: float = 0.0
    only_success: bool = True
    max_attempts: int | None = None
    nominal_task: bool = False


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


def collect(store_path: str | Path, task: str, n_episodes: int, *, seed: int = 0, noise: float = CollectConfig.noise,
            bias: float = CollectConfig.bias, only_success: bool = CollectConfig.only_success,
            backend: str = "mujoco", cameras=(), image_size=(96, 96), overwrite: bool = False,
            max_attempts: int | None = None, progress: bool = True, randomization=None,
            task_kwargs: dict | None = None, env_kwargs: dict | None = None) -> dict:
    """Collect ``n_episodes`` scripted demonstrations (successful ones only when ``only_success``).

    Seeds are ``seed, seed+1, ...``; failed attempts are skipped (and counted) when ``only_success``.
    Appends to an existing store unless ``overwrite``; raises ConfigError on an impossible request.
    ``randomization``: domain randomization spec (see :mod:`robot_rl.envs.randomization`); each episode's sample is
    stored in its metadata as ``extra["randomization"]`` ({} when off). ``task_kwargs``: task field overrides (e.g.
    ``{"tolerance": 0.004}``); ``env_kwargs``: further :class:`~robot_rl.envs.EnvConfig` fields (e.g. ``control_dt``).
    """
    if n_episodes < 1:
        raise ConfigError("episodes", f"{n_episodes} < 1", "ask for at least one episode")
    path = Path(store_path)
    # bad input fails before the store is touched (an --overwrite would otherwise already have emptied it)
    env_kwargs = dict(env_kwargs or {})
    check_env_options(task, task_kwargs, backend=backend, cameras=tuple(cameras), image_size=tuple(image_size),
                      randomization=randomization, **env_kwargs)
    store = ZarrStore.open_or_create(path, overwrite=overwrite)
    env = make_env(task, backend, task_kwargs=task_kwargs, cameras=tuple(cameras), image_size=tuple(image_size),
                   randomization=randomization, **env_kwargs)
    expert = ScriptedExpert(task, noise=noise, bias=bias, pos_scale=env.controller.cfg.pos_scale,
                            yaw_scale=env.controller.cfg.yaw_scale)
    max_attempts = max_attempts or 4 * n_episodes
    # the task settings the success flags were judged under (an off-policy learner checks them: robot_rl.rl.replay)
    recorded = {k: getattr(env.task, k) for k in ("tolerance", "max_steps", "lift_height") if hasattr(env.task, k)}
    kept, attempts, successes, s = 0, 0, 0, seed
    bar = progress_bar(total=n_episodes, desc=f"collect {task}", unit="ep", disable=not progress)
    try:
        while kept < n_episodes and attempts < max_attempts:
            episode, ok = rollout_expert(env, expert, s)
            attempts += 1
            successes += int(ok)
            if ok or not only_success:
                episode.commit(store, seed=s, task=task, source="scripted", success=ok, backend=backend,
                               extra={"params": env.params, "noise": noise, "bias": bias,
                                      "randomization": env.randomization, "task_kwargs": recorded})
                kept += 1
                bar.update(1)
            s += 1
    finally:
        bar.close()
        env.close()
    if kept < n_episodes:
        raise ConfigError("noise", f"only {kept}/{n_episodes} successful episodes in {attempts} attempts",
                          "lower the expert noise or raise max_attempts")
    return {"episodes": kept, "attempts": attempts, "successes": successes, "expert_success_rate": successes / attempts,
            "store": str(path), "n_steps": store.n_steps}
