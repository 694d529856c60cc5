"""The learner of the actor-learner split for residual TD3: the policy server and the learner in one process,
actors in others.

- The learner process owns the buffers and the updates (:class:`robot_rl.rl.td3.TD3Run`, the same object the
  single-process loop uses) and runs a :class:`~robot_rl.serve.server.PolicyServer` on a background thread, serving
  the frozen base plus the residual.
- Actors (:mod:`robot_rl.serve.actor`, ``td3.actors`` processes with ``n_envs / actors`` envs each) act through that
  server and stream every executed step back as ``transitions`` requests (:class:`TransitionInbox` queues them).
- Weights reach the actors through the server's own weight push (``push_weights``, a :class:`PolicyClient` of the
  learner), versioned 1, 2, ... every ``td3.push_every`` actor updates. The server pins each session's residual for
  the whole action chunk it was planned with, so no chunk mixes two versions; the learner counts any row that
  would (``mixed_version_chunks`` in the curve, 0 by construction) and logs how stale the acting weights were
  (``policy_lag``: learner version minus the row's, mean per curve row).

Why the policy server and not a separate channel: it is the path a robot already uses (the ROS 2 policy node
acts through it), so a robot becomes one more actor (the next issue), with the same typed protocol and no pickle.
The single-process mode (:func:`robot_rl.rl.td3.train_residual_td3`, ``td3.actors = 0``) stays for debugging.

Where the actors run (:class:`ActorPool`): local ``spawn`` processes, or with ``env.ray`` set Ray tasks of
:data:`~robot_rl.envs.ray_envs.WORKER_NUM_CPUS` CPU each, on any node; then the server listens on this node's
address with a random token. Weights still travel by the server's push, not Ray's object store: it is the robot's
path too, versioned and pinned per action chunk, and one 300 kB push takes milliseconds (``bench/bench_learner.py``).
A Ray actor that dies is started again on a fresh seed range; the rows it had sent are kept (a retried request is
dropped, so none counts twice), its slots' unfinished n-step windows are dropped, and its interrupted episodes are
not re-run (the learner has already trained on part of them). Local actor processes that die end the run.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue
import secrets
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robot_rl.envs.vector import env_kwargs_for, make_vector_env
from robot_rl.errors import ConfigError
from robot_rl.rl.collector import env_obs_dims
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, freeze
from robot_rl.rl.td3 import TD3Config, TD3Run
from robot_rl.serve.actor import ActorSpec, run_actor
from robot_rl.serve.client import PolicyClient
from robot_rl.serve.server import PolicyServer, PolicyService, ServeConfig

ACTOR_SEED_STRIDE = 1_000_000  # episode seeds of actor k: the run's seed start + k * this
RESTART_SEED_STRIDE = 100_000  # ... + r * this after its r-th restart (Ray actors)


class ActorPool:
    """The actors of one run: ``spec(k, r)`` is actor k's :class:`ActorSpec` after r restarts.

    ``address`` None: ``spawn`` processes (one dying ends the run: RuntimeError from :meth:`check`); an address:
    Ray tasks (:func:`robot_rl.envs.ray_envs.connect`), a dead one started again by :meth:`check`, which returns the
    indices restarted."""

    def __init__(self, n: int, spec, address: str | None):
        self.n, self.spec, self.address = n, spec, address
        self.restarts = [0] * n
        if address is None:
            ctx = mp.get_context("spawn")
            self.stop_event = ctx.Event()
            self.procs = [ctx.Process(target=run_actor, name=f"actor{k}", daemon=True, args=(spec(k, 0),
                                                                                               self.stop_event))
                          for k in range(n)]
        else:
            import ray

            from robot_rl.envs.ray_envs import WORKER_NUM_CPUS

            self.ray = ray
            self.task = ray.remote(num_cpus=WORKER_NUM_CPUS, num_gpus=0, max_retries=0)(run_actor)
            self.refs: list = [None] * n
        self._checked = 0.0

    def start(self) -> None:
        if self.address is None:
            for p in self.procs:
                p.start()
        else:
            self.refs = [self.task.remote(self.spec(k, 0), None) for k in range(self.n)]

    def check(self, every_s: float = 1.0) -> list[int]:
        """Look for dead actors (at most every ``every_s``); returns the Ray actors restarted."""
        now = time.monotonic()
        if now - self._checked < every_s:
            return []
        self._checked = now
        if self.address is None:
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"actor process {dead[0].name} exited with code {dead[0].exitcode}; "
                                   "its error is printed above")
            return []
        done, _ = self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        out = []
        for ref in done:
            k = self.refs.index(ref)
            try:
                self.ray.get(ref)
                why = "returned before the run ended"
            except Exception as e:  # the worker process died or the actor raised
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            self.restarts[k] += 1
            if self.restarts[k] > 3:
                raise RuntimeError(f"actor {k} failed {self.restarts[k]} times; last: {why}")
            print(f"robot-rl: actor {k} stopped ({why}); starting it again on new seeds", file=sys.stderr,
                  flush=True)
            self.refs[k] = self.task.remote(self.spec(k, self.restarts[k]), None)
            out.append(k)
        return out

    def stop(self) -> None:
        if self.address is None:
            self.stop_event.set()
            for p in self.procs:
                p.join(timeout=15)
                if p.is_alive():
                    p.terminate()
            return
        _, left = self.ray.wait(self.refs, num_returns=len(self.refs), timeout=15)
        for ref in left:
            self.ray.cancel(ref, force=True)


class TransitionInbox:
    """The learner's end of ``transitions`` requests (attached as ``PolicyService.learner``; called on the
    serving thread). Queues each request whole, drops a retried request id, and answers with the learner's state.

    Args:
        td3: the run's settings (``learning_starts``, ``warmup_noise``, ``explore_std_at``).
        received: rows already counted (a resumed run).
    """

    def __init__(self, td3: TD3Config, received: int = 0):
        self.td3 = td3
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.received = self.consumed = int(received)
        self.stop = False
        self._seen: deque = deque(maxlen=100_000)
        self._seen_set: set = set()

    def receive(self, req: dict) -> dict:
        k = len(req["sessions"])
        dup = req["id"] in self._seen_set
        if not dup and not self.stop:
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(req["id"])
            self._seen_set.add(req["id"])
            self.queue.put(req)
            self.received += k
        return {"accepted": 0 if dup or self.stop else k, **self.status()}

    def status(self) -> dict:
        td3 = self.td3
        warm = self.received < td3.learning_starts
        return {"backlog": self.received - self.consumed, "stop": self.stop,
                "explore": {"mode": "warmup" if warm else "policy", "warmup_noise": float(td3.warmup_noise),
                            "std": td3.explore_std_at(self.received)}}

    def drain(self, timeout_s: float) -> list[dict]:
        """Every queued request (waiting up to ``timeout_s`` for the first)."""
        try:
            out = [self.queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


def train_residual_td3_actors(base, task: str, td3: TD3Config, out_dir: str | Path, *,
                              residual: ResidualConfig | None = None, demos: str | Path | None = None,
                              task_kwargs: dict | None = None, env_kwargs: dict | None = None, writer=None,
                              progress: bool = True, validate: Callable | None = None,
                              checkpoint_extra: dict | None = None,
                              resume: bool = False) -> tuple[ResidualPolicy, list]:
    """Residual TD3 with ``td3.actors`` actor processes and this process as learner + policy server (module doc).

    Arguments, outputs and errors as :func:`robot_rl.rl.td3.train_residual_td3`; the curve rows add
    ``weight_version``, ``policy_lag``, ``mixed_version_chunks`` and ``backlog``. Episode seeds:
    actor k takes ``seed_start + k * ACTOR_SEED_STRIDE, +1, ...``. Raises RuntimeError when an actor process dies.
    """
    td3.validate()
    if td3.actors < 1:
        raise ConfigError("td3.actors", f"{td3.actors} < 1", "use train_residual_td3 for the single-process mode")
    if base.config.image_keys:
        raise ConfigError("td3.actors", "the actors stream low-dim observations only; a residual on an image base "
                          "reads camera frames", "train it in one process (td3.actors=0)")
    torch.manual_seed(td3.seed)
    ekw = env_kwargs_for(base.config, task, task_kwargs, env_kwargs)
    address = ekw.pop("ray", None)  # the actors' placement; each steps its envs in its own process
    probe = make_vector_env(task, 1, task_kwargs=task_kwargs, asynchronous=False, **ekw)
    try:
        dims = env_obs_dims(probe)
    finally:
        probe.close()
    run = TD3Run(base, task, td3, out_dir, obs_dims=dims, n_slots=td3.n_envs, residual=residual, demos=demos,
                 task_kwargs=task_kwargs, writer=writer, progress=progress, validate=validate,
                 checkpoint_extra=checkpoint_extra, resume=resume)
    pol, norm = run.policy, base.normalizer
    host, token = "127.0.0.1", None
    if address is not None:  # actors on other nodes reach the server at this node's address, with a token
        from robot_rl.envs.ray_envs import connect

        connect(address)
        import ray

        host, token = ray.util.get_node_ip_address(), secrets.token_urlsafe(24)
    service = PolicyService(base, residual=freeze(copy.deepcopy(pol)),
                            config=ServeConfig(host=host, port=0, token=token, max_batch=td3.n_envs,
                                               batch_window_ms=2.0, allow_push=True, seed=td3.seed,
                                               max_sessions_per_client=max(64, td3.n_envs)))
    inbox = TransitionInbox(td3, received=run.steps)
    service.learner = inbox
    server = PolicyServer(service)
    endpoint = server.bind()
    thread = threading.Thread(target=server.serve_forever, name="policy-server", daemon=True)
    thread.start()
    per = td3.n_envs // td3.actors
    actors = ActorPool(td3.actors, lambda k, r: ActorSpec(
        endpoint=endpoint, index=k, task=task, n_envs=per,
        seed_start=run.seed_start + k * ACTOR_SEED_STRIDE + r * RESTART_SEED_STRIDE, seed=td3.seed + r,
        max_backlog=td3.max_backlog, task_kwargs=dict(task_kwargs or {}), env_kwargs=ekw, token=token), address)
    slot = {f"actor{k}-env{i}": k * per + i for k in range(td3.actors) for i in range(per)}
    pusher = PolicyClient(endpoint, token=token, timeout_s=30.0)
    version, pushed_at = 0, run.learner.actor_updates
    chunk_version: dict[str, int] = {}
    mixed, lag = 0, []
    next_seed = run.seed_start + td3.actors * ACTOR_SEED_STRIDE
    try:
        actors.start()
        while not run.done:
            reqs = inbox.drain(1.0)
            for k in actors.check():  # a restarted actor's sessions begin new episodes
                run.nstep.clear([k * per + i for i in range(per)])
                for i in range(per):
                    chunk_version.pop(f"actor{k}-env{i}", None)
            if not reqs:
                continue
            for req in reqs:
                k = min(len(req["sessions"]), td3.total_env_steps - run.steps)
                if k <= 0:
                    inbox.consumed += len(req["sessions"])
                    continue
                sess = req["sessions"][:k]
                for j, sid in enumerate(sess):  # one residual version per chunk (the server's pinning, checked)
                    v = int(req["residual_version"][j])
                    if not req["new_chunk"][j] and chunk_version.get(sid, v) != v:
                        mixed += 1
                    chunk_version[sid] = v
                    lag.append(version - v)
                with torch.no_grad():
                    x = pol.features(norm, {key: np.array(a[:k]) for key, a in req["obs"].items()},
                                     norm.normalize("action", torch.as_tensor(np.array(req["base"][:k]))))
                    nx = pol.features(norm, {key: np.array(a[:k]) for key, a in req["next_obs"].items()},
                                      norm.normalize("action", torch.as_tensor(np.array(req["next_base"][:k]))))
                run.add(x, torch.as_tensor(np.array(req["residual"][:k])), req["reward"][:k], req["terminated"][:k],
                        req["truncated"][:k], nx, req["success"][:k], slots=[slot[s] for s in sess])
                run.train()
                inbox.consumed += len(req["sessions"])
                if run.learner.actor_updates - pushed_at >= td3.push_every:
                    version += 1
                    pusher.push_weights(pol, version)
                    pushed_at = run.learner.actor_updates
                extra = {"weight_version": version, "policy_lag": float(np.mean(lag)) if lag else 0.0,
                         "mixed_version_chunks": mixed, "backlog": inbox.received - inbox.consumed}
                n_rows = len(run.curve)
                run.log(service.stats["batches"], extra)
                if len(run.curve) > n_rows:
                    lag = []
                run.checkpoint(next_seed)
    finally:
        inbox.stop = True
        actors.stop()
        server.stop()
        thread.join(timeout=5)
        pusher.close()
        run.close()
    return run.finish(next_seed, extra={"actors": td3.actors, "weight_version": version,
                                        "actor_restarts": sum(actors.restarts)})
