"""Scripted demonstration collection into the zarr store.

Each episode is rolled out with the scripted expert from a seed, and committed atomically with its metadata
(seed, task, source="scripted", success, backend, the sampled reset parameters, the expert's noise and, with
domain randomization on, the episode's randomization sample: ``extra["randomization"]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from robot_rl.progress import progress_bar

from robot_rl.envs.env import check_env_options, make_env
from robot_rl.errors import ConfigError
from robot_rl.envs.experts import ScriptedExpert
from robot_rl.datasets.store import ZarrStore


def rollout_expert(env, expert: ScriptedExpert, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One expert episode. Returns (per-step arrays: every observation key + ``action``, success).

    Step t holds the observation seen *before* action t (the standard (o_t, a_t) pairing).
    """
    obs, _ = env.reset(seed=seed)
    expert.reset(seed)
    steps: dict[str, list] = {k: [] for k in obs}
    steps["action"] = []
    success = False
    while True:
        a = expert.act(obs)
        for k, v in obs.items():
            steps[k].append(v)
        steps["action"].append(a)
        obs, _, term, trunc, info = env.step(a)
        if term or trunc:
            success = bool(info["success"])
            break
    return {k: np.stack(v) for k, v in steps.items()}, success


def collect(store_path: str | Path, task: str, n_episodes: int, *, seed: int = 0, noise: float = 0.3,
            bias: float = 0.0, only_success: bool = True, backend: str = "mujoco", cameras=(),
            image_size=(96, 96), overwrite: bool = False, max_attempts: int | None = None,
            progress: bool = True, randomization=None) -> dict:
    """Collect ``n_episodes`` scripted demonstrations (successful ones only when ``only_success``).

    Seeds are ``seed, seed+1, ...``; failed attempts are skipped (and counted) when ``only_success``.
    Appends to an existing store unless ``overwrite``; raises ConfigError on an impossible request.
    ``randomization``: domain randomization spec (see :mod:`robot_rl.envs.randomization`); each episode's sample is
    stored in its metadata as ``extra["randomization"]`` ({} when off).
    """
    if n_episodes < 1:
        raise ConfigError("episodes", f"{n_episodes} < 1", "ask for at least one episode")
    path = Path(store_path)
    # bad input fails before the store is touched (an --overwrite would otherwise already have emptied it)
    check_env_options(task, None, backend=backend, cameras=tuple(cameras), image_size=tuple(image_size),
                      randomization=randomization)
    store = ZarrStore.open_or_create(path, overwrite=overwrite)
    env = make_env(task, backend, cameras=tuple(cameras), image_size=tuple(image_size), randomization=randomization)
    expert = ScriptedExpert(task, noise=noise, bias=bias, pos_scale=env.controller.cfg.pos_scale,
                            yaw_scale=env.controller.cfg.yaw_scale)
    max_attempts = max_attempts or 4 * n_episodes
    kept, attempts, successes, s = 0, 0, 0, seed
    bar = progress_bar(total=n_episodes, desc=f"collect {task}", unit="ep", disable=not progress)
    try:
        while kept < n_episodes and attempts < max_attempts:
            data, ok = rollout_expert(env, expert, s)
            attempts += 1
            successes += int(ok)
            if ok or not only_success:
                store.add_episode(data, seed=s, task=task, source="scripted", success=ok, backend=backend,
                                  extra={"params": env.params, "noise": noise, "bias": bias,
                                         "randomization": env.randomization})
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
