"""Vectorized rollouts shared by evaluation and residual RL.

- :func:`make_vector_env`: a Gymnasium ``AsyncVectorEnv`` (one subprocess per env) with autoreset DISABLED; the
  caller resets finished envs with explicit per-episode seeds (``reset_mask``), so every episode is reproducible
  from its seed regardless of how many workers ran it.
- :class:`ChunkExecutor`: per-env observation history (To frames) and action-chunk queue for a base policy;
  envs whose queue is empty get a new chunk from ONE batched ``predict_chunk`` call.
- :class:`SeedSchedule`: hands out episode seeds from a range.
"""

from __future__ import annotations

from collections import deque
from functools import partial

import gymnasium as gym
import numpy as np
import torch

from robot_rl.envs import check_env_options, make_env
from robot_rl.errors import ConfigError


def _env_fn(task, backend, task_kwargs, env_kwargs):
    import torch as _t

    _t.set_num_threads(1)
    return make_env(task, backend, task_kwargs=task_kwargs, **env_kwargs)


def make_vector_env(task: str, n_envs: int, backend: str = "mujoco", *, task_kwargs: dict | None = None,
                    asynchronous: bool = True, **env_kwargs) -> gym.vector.VectorEnv:
    """``n_envs`` copies of ``make_env(task, backend, ...)`` with autoreset disabled.

    Workers start with the ``forkserver`` method (safe with torch's thread pools), so a script that calls this
    must guard its entry point with ``if __name__ == "__main__":`` (standard multiprocessing rule).
    """
    check_env_options(task, task_kwargs, **env_kwargs)  # bad input fails here, not in a worker
    fns = [partial(_env_fn, task, backend, task_kwargs or {}, env_kwargs) for _ in range(n_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if asynchronous and n_envs > 1:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="forkserver")
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


def env_kwargs_for(policy_config, task: str, task_kwargs: dict | None, env_kwargs: dict | None) -> dict:
    """:class:`~robot_rl.envs.EnvConfig` fields for rolling out a policy in ``task``: every observation key the
    policy reads is checked against the task's observations, and an image policy's cameras and image size
    (``image_<camera>`` keys, ``image_shape``) are filled in unless given. Raises ConfigError naming the key."""
    from robot_rl.envs import ROBOT_OBS_DIMS
    from robot_rl.tasks import make_task

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


class ChunkExecutor:
    """Executes a chunking base policy in N envs.

    Args:
        policy: a :class:`~robot_rl.policies.base.BasePolicy` (``predict_chunk`` on raw obs (B, To, ...)).
        n_envs: number of envs.
        seed: seed of the torch generator used for diffusion sampling (reproducible rollouts).
        align_chunks: cut every chunk short so that it ends on a multiple of the action horizon Ta counted in
            :meth:`actions` calls. Only the first chunk after a mid-stream reset is ever cut; from then on that env
            asks for its next chunk on the same step as every other env, so one batched ``predict_chunk`` serves
            all N envs instead of N batch-1 calls spread over Ta steps (ResiP gets this for free from fixed-length
            episodes; ours end early on success or a missed place). On CPU a batch-8 call costs ~2.6x a batch-1
            call, not 8x; measured 3x fewer base calls and 1.14x env steps/s in residual PPO (``bench/bench_ppo.py``).
            Changes what the base does only in that first, shortened chunk (it re-plans sooner); keep it off
            where rollouts must equal single-env execution (evaluation, the policy server).
    """

    def __init__(self, policy, n_envs: int, seed: int = 0, align_chunks: bool = False):
        self.policy = policy
        cfg = policy.config
        self.keys = list(cfg.obs_keys) + list(cfg.image_keys)
        self.To, self.Ta, self.n = cfg.n_obs_steps, cfg.n_action_steps, n_envs
        self.hist = [deque(maxlen=self.To) for _ in range(n_envs)]
        self.queue = [deque() for _ in range(n_envs)]
        self.gen = torch.Generator().manual_seed(seed)
        self.align, self.t = align_chunks, 0  # t: actions() calls so far (the shared step clock)
        self.calls = self.chunks = 0  # predict_chunk calls and env chunks (sum of their batch sizes) so far

    def reset(self, mask: np.ndarray, obs: dict) -> None:
        """Clear history/queue of the envs in ``mask`` and fill their history with the first observation."""
        for i in np.flatnonzero(mask):
            self.hist[i].clear()
            self.queue[i].clear()
            frame = {k: obs[k][i] for k in self.keys}
            for _ in range(self.To):
                self.hist[i].append(frame)

    def observe(self, obs: dict, mask: np.ndarray | None = None) -> None:
        """Append the new observation of every env (or those in ``mask``)."""
        for i in range(self.n) if mask is None else np.flatnonzero(mask):
            self.hist[i].append({k: obs[k][i] for k in self.keys})

    def peek(self) -> np.ndarray:
        """Next base action for every env, (N, A) raw float32, without consuming it. Empty queues are refilled
        with one batched ``predict_chunk`` call over the envs that need a new chunk."""
        need = [i for i in range(self.n) if not self.queue[i]]
        if need:
            batch = {k: np.stack([np.stack([f[k] for f in self.hist[i]]) for i in need]) for k in self.keys}
            chunks = self.policy.predict_chunk(batch, generator=self.gen)
            self.calls += 1
            self.chunks += len(need)
            keep = self.Ta - self.t % self.Ta if self.align else None
            for j, i in enumerate(need):
                self.queue[i].extend(np.asarray(chunks[j][:keep], dtype=np.float32))
        return np.stack([self.queue[i][0] for i in range(self.n)])

    def actions(self) -> np.ndarray:
        """Next base action for every env, (N, A) raw float32 (consumed from the queues)."""
        a = self.peek()
        for q in self.queue:
            q.popleft()
        self.t += 1
        return a
