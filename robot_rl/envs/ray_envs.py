"""Env workers as Ray actors: a Gymnasium vector env whose sub-envs run on any node of a Ray cluster.

:class:`RayVectorEnv` has the interface of the local ``AsyncVectorEnv`` that :func:`robot_rl.envs.vector.make_vector_env`
builds (autoreset disabled, per-env seeds, ``options={"reset_mask": ...}``, ``get_attr``), so evaluation, transfer,
collection and residual training (PPO, and TD3 in one process) run on Ray unchanged: ``make_vector_env(...,
ray="local" | "auto" | "HOST:PORT")``, or ``env.ray`` / ``--ray ADDRESS`` on the command line.

- **Placement and resources.** One Ray actor per env (:class:`EnvWorker`), each asking for
  :data:`WORKER_NUM_CPUS` CPU and no GPU, spread over the nodes with a free CPU (Ray's ``SPREAD`` strategy: envs are
  CPU-bound, so spreading them balances the load).
- **What crosses the network.** Per control step, one action row to each worker and one observation row back; the
  policy (and a learner's weights) stay in the calling process, which batches the policy over every env. So no
  weights are broadcast: the learner's own process acts. (The actor-learner split of residual TD3 runs its actors as
  Ray actors too; they act through the policy server and get weights by its push: :mod:`robot_rl.serve.learner`.)
- **Same results.** An episode depends only on its seed and the actions sent, so the same seeds and actions give the
  same episodes as the local vector env, bit for bit on the same CPU kind.
- **Faults.** Each env keeps its episode's reset seed, options and the actions sent since. When a worker dies (its
  process killed, its node lost: Ray's ``RayActorError``), a new worker is started, the episode is re-run from its
  seed with the same actions, the re-run's observation is checked against the one the caller last received (a
  mismatch raises :class:`ReplayMismatch`: that node's physics differs), and the interrupted call is made again.
  The caller sees one unbroken episode: nothing counted twice, nothing lost. ``restarts`` counts the restarts; each
  is logged to stderr. A worker that dies :data:`MAX_RESTARTS` times in a row for one call raises RuntimeError.

Ray: https://docs.ray.io/en/latest/ray-core/actors.html (actors, ``ray.kill``, fault tolerance).
"""

from __future__ import annotations

import os
import sys

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from robot_rl.errors import ConfigError

#: CPUs each env worker asks Ray for (physics and rendering are single-threaded)
WORKER_NUM_CPUS = 1.0
#: restarts of one worker within one call before giving up
MAX_RESTARTS = 3
#: environment variables the workers need to render the way the caller does (they may run on other nodes)
_FORWARDED_ENV = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "EGL_DEVICE_ID")


class ReplayMismatch(RuntimeError):
    """A restarted worker's re-run of an episode did not reproduce the observation the caller had received."""


def connect(address: str) -> None:
    """Join (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:PORT"``) or start (``"local"``) a Ray cluster, once per
    process; a process already connected keeps its connection. Raises ConfigError (field ``env.ray``) when ray is not
    installed or the address cannot be reached."""
    try:
        import ray
    except ImportError:
        raise ConfigError("env.ray", "the ray package is not installed",
                          "pip install -e .[ray]  (or drop --ray to use local subprocesses)") from None
    if ray.is_initialized():
        return
    if not isinstance(address, str) or not address:
        raise ConfigError("env.ray", f"{address!r} is not an address", "use local, auto or HOST:PORT")
    if address not in ("local", "auto"):  # Ray waits minutes for an absent head; find out in seconds
        _reachable(address)
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kw = dict(runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
    try:
        if address == "local":
            ray.init(include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError("env.ray", f"cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0]})",
                          "start it first (ray start --head) and pass its address, or use --ray local") from None


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError (``env.ray``) unless a TCP connection to ``[ray://]HOST:PORT`` opens within ``timeout_s``."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("env.ray", f"{address!r} is not local, auto or HOST:PORT",
                          "pass the head node's address, e.g. --ray 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError("env.ray", f"no Ray head answers at {address} ({e.strerror or e})",
                          "start it first (ray start --head) and pass its address, or use --ray local") from None


class EnvWorker:
    """One env in a Ray actor process (:func:`robot_rl.envs.env.make_env`; one torch thread). Its methods mirror a
    Gymnasium env's; :meth:`restore` re-runs an episode from its seed and actions."""

    def __init__(self, task, backend, task_kwargs, env_kwargs):
        import torch

        from robot_rl.envs.env import make_env

        torch.set_num_threads(1)
        self.env = make_env(task, backend, task_kwargs=task_kwargs, **env_kwargs)

    def spaces(self):
        return self.env.observation_space, self.env.action_space

    def reset(self, seed, options):
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        return self.env.step(action)

    def get_attr(self, name):
        return getattr(self.env, name)

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def restore(self, seed, options, actions, expect) -> None:
        """Reset with ``seed``/``options``, apply ``actions``; raise ReplayMismatch unless the observation then
        equals ``expect`` on every key."""
        obs, _ = self.env.reset(seed=seed, options=options)
        for a in actions:
            obs = self.env.step(a)[0]
        bad = [k for k in expect if not np.array_equal(obs[k], expect[k])]
        if bad:
            raise ReplayMismatch(f"re-running the episode of seed {seed} ({len(actions)} steps) on a new worker "
                                 f"gave other observations ({bad}): this node's simulation differs from the dead "
                                 "worker's (another CPU kind or library version)")


class _Episode:
    """What re-runs an env's episode: reset seed and options, the actions sent since (the last observation
    returned is the vector env's ``_obs`` row)."""

    def __init__(self, seed, options):
        self.seed, self.options, self.actions = seed, options, []


class RayVectorEnv(gym.vector.VectorEnv):
    """``n_envs`` copies of ``make_env(task, backend, task_kwargs=..., **env_kwargs)`` as Ray actors (module doc).

    Args:
        task, n_envs, backend, task_kwargs, env_kwargs: as :func:`robot_rl.envs.vector.make_vector_env`.
        address: the Ray cluster (:func:`connect`).

    Observations are batched like the local vector envs' (Dict of (n_envs, ...) arrays); infos carry the
    ``_key`` masks Gymnasium's vector envs use. Attributes: ``restarts`` (workers restarted so far).
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.DISABLED}

    def __init__(self, task: str, n_envs: int, backend: str, task_kwargs: dict | None, env_kwargs: dict,
                 address: str):
        import ray

        connect(address)
        self._ray = ray
        self._actor_cls = ray.remote(num_cpus=WORKER_NUM_CPUS, num_gpus=0, max_restarts=0,
                                     scheduling_strategy="SPREAD")(EnvWorker)
        self._args = (task, backend, dict(task_kwargs or {}), dict(env_kwargs))
        self.num_envs = int(n_envs)
        self.workers = [self._actor_cls.remote(*self._args) for _ in range(self.num_envs)]
        self.single_observation_space, self.single_action_space = self._gather(
            [w.spaces.remote() for w in self.workers], lambda w, i: w.spaces.remote())[0]
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._episodes: list[_Episode | None] = [None] * self.num_envs
        self._obs: list = [None] * self.num_envs
        self.restarts = 0

    # ---- Gymnasium vector API
    def reset(self, *, seed=None, options=None):
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(f"{len(seed)} seeds for {self.num_envs} envs")
        options = dict(options or {})
        mask = np.asarray(options.pop("reset_mask", np.ones(self.num_envs, bool)), bool)
        idx = [int(i) for i in np.flatnonzero(mask)]
        sub = options or None
        res = self._gather([self.workers[i].reset.remote(seed[i], sub) for i in idx],
                           lambda w, j: w.reset.remote(seed[idx[j]], sub), idx, restore=False)
        infos: dict = {}
        for i, (obs, info) in zip(idx, res):
            self._obs[i] = obs
            self._episodes[i] = _Episode(seed[i], sub)
            infos = self._add_info(infos, info, i)
        return self._batch(), infos

    def step(self, actions):
        actions = np.asarray(actions)
        if any(e is None for e in self._episodes):
            raise RuntimeError("reset every env before stepping")
        rows = [np.array(actions[i], copy=True) for i in range(self.num_envs)]
        res = self._gather([w.step.remote(rows[i]) for i, w in enumerate(self.workers)],
                           lambda w, i: w.step.remote(rows[i]))
        rew = np.zeros(self.num_envs, np.float64)
        term, trunc = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        infos: dict = {}
        for i, (obs, r, te, tr, info) in enumerate(res):
            self._obs[i] = obs
            ep = self._episodes[i]
            ep.actions.append(rows[i])
            rew[i], term[i], trunc[i] = r, te, tr
            infos = self._add_info(infos, info, i)
        return self._batch(), rew, term, trunc, infos

    def get_attr(self, name: str) -> tuple:
        return tuple(self._gather([w.get_attr.remote(name) for w in self.workers],
                                  lambda w, i: w.get_attr.remote(name)))

    def placement(self) -> list[dict]:
        """Where each env's worker runs: {"node": Ray node id, "pid": OS process id on that node}."""
        return list(self._gather([w.where.remote() for w in self.workers], lambda w, i: w.where.remote()))

    def close_extras(self, **kwargs):
        for w in self.workers:
            try:
                self._ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []

    # ---- internals
    def _batch(self) -> dict:
        out = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(self.single_observation_space, self._obs, out)

    def _gather(self, refs: list, again, idx: list[int] | None = None, restore: bool = True) -> list:
        """``ray.get`` of each ref (the call to env ``idx[j]``); a dead worker is restarted (its episode restored
        when ``restore``) and ``again(worker, j)`` is called on the new one."""
        from ray.exceptions import RayActorError

        try:
            return self._ray.get(refs)  # one round trip for every env when none died
        except RayActorError:
            pass
        idx = list(range(len(refs))) if idx is None else idx
        out = []
        for j, ref in enumerate(refs):
            for attempt in range(MAX_RESTARTS + 1):
                try:
                    out.append(self._ray.get(ref))
                    break
                except RayActorError as e:
                    if attempt == MAX_RESTARTS:
                        raise RuntimeError(f"env worker {idx[j]} died {MAX_RESTARTS + 1} times in a row; last: "
                                           f"{str(e).splitlines()[0]}") from e
                    self._restart(idx[j], e, restore)
                    ref = again(self.workers[idx[j]], j)
        return out

    def _restart(self, i: int, err, restore: bool) -> None:
        from ray.exceptions import RayActorError

        self.restarts += 1
        ep = self._episodes[i] if restore else None
        what = f"re-running its episode (seed {ep.seed}, {len(ep.actions)} steps)" if ep else "no episode to re-run"
        print(f"robot-rl: env worker {i} died ({type(err).__name__}); starting a new one, {what}",
              file=sys.stderr, flush=True)
        for attempt in range(MAX_RESTARTS + 1):
            try:
                self._ray.kill(self.workers[i], no_restart=True)
            except Exception:  # already gone
                pass
            self.workers[i] = self._actor_cls.remote(*self._args)
            if ep is None:
                return
            try:
                self._ray.get(self.workers[i].restore.remote(ep.seed, ep.options, ep.actions, self._obs[i]))
                return
            except RayActorError:
                if attempt == MAX_RESTARTS:
                    raise
