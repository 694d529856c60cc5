"""Vector envs and episode seeds shared by collection, evaluation and residual RL.

- :func:`make_vector_env`: a Gymnasium ``AsyncVectorEnv`` (one subprocess per env), or with ``ray`` a
  :class:`~robot_rl.envs.ray_envs.RayVectorEnv` (one Ray actor per env, on any node of a cluster), with autoreset
  DISABLED; the caller resets finished envs with explicit per-episode seeds (``reset_mask``), so every episode is
  reproducible from its seed regardless of how many workers ran it, or where.
- :class:`SeedSchedule`: hands out episode seeds from a range.
- Seed ranges: demonstrations from :data:`DEMO_SEED_START`, residual-RL training from :data:`TRAIN_SEED_START`
  (+ 10 000 000 per training seed), validation from :data:`VAL_SEED_START`, evaluation from
  :data:`EVAL_SEED_START`: disjoint, so no evaluated episode was ever trained or selected on.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from functools import partial

import gymnasium as gym
import numpy as np

from robot_rl.envs.env import check_env_options, make_env
from robot_rl.errors import ConfigError

DEMO_SEED_START = 0
TRAIN_SEED_START = 100_000
VAL_SEED_START = 500_000
EVAL_SEED_START = 1_000_000


def _env_fn(task, backend, task_kwargs, env_kwargs):
    import torch as _t

    _t.set_num_threads(1)
    return make_env(task, backend, task_kwargs=task_kwargs, **env_kwargs)


def worker_context():
    """The ``multiprocessing`` context of local env and actor workers: ``forkserver`` (safe beside torch's thread
    pools), its server preloading this module (the simulators) and torch, so each worker forks with them imported
    (about 0.2 s per worker against 3 s importing them anew). The preload list has no effect once this process's
    fork server runs (it is started by the first worker)."""
    multiprocessing.set_forkserver_preload([__name__, "torch"])
    return multiprocessing.get_context("forkserver")


@contextmanager
def all_cores():
    """Run torch on every core inside the block: for work this process does while its env workers wait (the
    updates of a synchronous collect-then-train loop). Elsewhere the entry points keep torch on one thread (the
    workers own the other cores; OpenMP oversubscription is catastrophic). The core count is ``OMP_NUM_THREADS``
    when set (so a test runner sharing the machine can cap it), else the cores this process may run on."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_vector_env(task: str, n_envs: int, backend: str = "mujoco", *, task_kwargs: dict | None = None,
                    asynchronous: bool = True, ray: str | None = None, **env_kwargs) -> gym.vector.VectorEnv:
    """``n_envs`` copies of ``make_env(task, backend, ...)`` with autoreset disabled.

    ``ray``: None -> local workers: subprocesses (``asynchronous`` and ``n_envs`` > 1) or in this process; an
    address (``"local"`` starts Ray here, ``"auto"`` / ``"HOST:PORT"`` joins a running cluster) -> one Ray actor per
    env (:class:`~robot_rl.envs.ray_envs.RayVectorEnv`: same episodes for the same seeds and actions, a dead worker
    restarted and its episode re-run). Raises ConfigError for bad env options (before any worker starts) or an
    unreachable cluster (field ``env.ray``).

    Local workers start with the ``forkserver`` method (safe with torch's thread pools), so a script that calls
    this must guard its entry point with ``if __name__ == "__main__":`` (standard multiprocessing rule); see
    :func:`worker_context`.
    """
    check_env_options(task, task_kwargs, **env_kwargs)  # bad input fails here, not in a worker
    if ray is not None:
        from robot_rl.envs.ray_envs import RayVectorEnv

        return RayVectorEnv(task, n_envs, backend, task_kwargs, env_kwargs, ray)
    fns = [partial(_env_fn, task, backend, task_kwargs or {}, env_kwargs) for _ in range(n_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if asynchronous and n_envs > 1:
        worker_context()
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="forkserver")
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


def env_kwargs_for(policy_config, task: str, task_kwargs: dict | None, env_kwargs: dict | None) -> dict:
    """:class:`~robot_rl.envs.EnvConfig` fields for rolling out a policy in ``task``: every observation key the
    policy reads is checked against the task's observations, and an image policy's cameras and image size
    (``image_<camera>`` keys, ``image_shape``) are filled in unless given. Raises ConfigError naming the key."""
    from robot_rl.envs.env import ROBOT_OBS_DIMS
    from robot_rl.envs.tasks import make_task

    kw = dict(env_kwargs or {})
    have = {*ROBOT_OBS_DIMS, *make_task(task, **(task_kwargs or {})).obs_dims()}
    for k in policy_config.obs_keys:
        if k not in have:
            raise ConfigError(f"obs_keys.{k}", f"the policy reads {k!r}, which task {task!r} does not observe",
                              "roll it out on the task it was trained on (--task), or retrain without that key")
    cams = tuple(k[len("image_"):] for k in policy_config.image_keys)
    if cams:
        given = tuple(kw.setdefault("cameras", cams))
        if set(cams) - set(given):
            raise ConfigError("env.cameras", f"{list(given)} lacks the policy's {list(cams)}",
                              "drop env.cameras (it is taken from the checkpoint) or add those cameras")
        hw = tuple(int(v) for v in policy_config.image_shape[:2])
        if tuple(kw.setdefault("image_size", hw)) != hw:
            raise ConfigError("env.image_size", f"{tuple(kw['image_size'])} != the policy's images {hw}",
                              f"drop env.image_size or set it to [{hw[0]}, {hw[1]}]")
    return kw


class SeedSchedule:
    """Episode seeds ``start, start+1, ...`` (``count`` of them, or unbounded when count is None)."""

    def __init__(self, start: int, count: int | None = None):
        self.next, self.end = start, None if count is None else start + count

    def take(self) -> int | None:
        if self.end is not None and self.next >= self.end:
            return None
        s, self.next = self.next, self.next + 1
        return s


def reset_some(venv, mask: np.ndarray, seeds: list[int | None], obs: dict | None) -> dict:
    """Reset the envs selected by ``mask`` with their seeds; returns the full batched observation."""
    if obs is None or mask.all():
        o, _ = venv.reset(seed=[int(s) if s is not None else None for s in seeds])
        return o
    full = [int(s) if (m and s is not None) else None for s, m in zip(seeds, mask)]
    o, _ = venv.reset(seed=full, options={"reset_mask": mask.astype(bool)})
    return o
