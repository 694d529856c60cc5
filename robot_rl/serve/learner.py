"""The learner of the actor-learner split for residual TD3: the policy server and the learner in one process,
actors in others.

- The learner process owns the buffers and the updates (:class:`robot_rl.rl.offpolicy.OffPolicyRun`, the same
  object the single-process loop uses) and runs a :class:`~robot_rl.serve.server.PolicyServer` on a background
  thread, serving the frozen base plus the residual.
- Actors (:mod:`robot_rl.serve.actor`, ``td3.actors`` processes with ``n_envs / actors`` envs each) act through that
  server and stream every executed step back as ``transitions`` requests (:class:`TransitionInbox` queues them).
- Weights reach the actors through the server's own weight push (``push_weights``, a :class:`PolicyClient` of the
  learner), versioned 1, 2, ... every ``td3.push_every`` actor updates (a resumed run goes on above the versions it
  pushed before: :func:`resumed_version`). The server pins each session's residual for
  the whole action chunk it was planned with, so no chunk mixes two versions; the learner counts any row that
  would (``mixed_version_chunks`` in the curve, 0 by construction) and logs how stale the acting weights were
  (``policy_lag``: learner version minus the row's, mean per curve row).

Why the policy server and not a separate channel: it is the path a robot already uses (the ROS 2 policy node
acts through it), so a robot becomes one more actor (the next issue), with the same typed protocol and no pickle.
The single-process mode (:func:`robot_rl.rl.offpolicy.train_residual_offpolicy`, ``td3.actors = 0``) stays for
debugging.
:func:`learn_online` (``robot-rl learn``) is the same learner for actors it does not start (a robot's policy node,
sim actors on other machines): it listens on a given address and commits every received episode to a store.

Where the actors run (:class:`ActorPool`): local processes (forkserver), or with ``env.ray`` set Ray tasks of
:data:`~robot_rl.envs.ray_envs.WORKER_NUM_CPUS` CPU each, on any node; then the server listens on this node's
address with a random token. Weights still travel by the server's push, not Ray's object store: it is the robot's
path too, versioned and pinned per action chunk, and one 300 kB push takes milliseconds (``bench/bench_learner.py``).
A Ray actor that dies is started again on a fresh seed range; the rows it had sent are kept (a retried request is
dropped, so none counts twice), its slots' unfinished n-step windows are dropped, and its interrupted episodes are
not re-run (the learner has already trained on part of them). Local actor processes that die end the run.
"""

from __future__ import annotations

import copy
import dataclasses
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

from robot_rl.envs.vector import env_kwargs_for, make_vector_env, worker_context
from robot_rl.errors import ConfigError
from robot_rl.rl.collector import env_obs_dims
from robot_rl.rl.offpolicy import OffPolicyRun
from robot_rl.rl.replay import reaches
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, freeze
from robot_rl.rl.td3 import TD3Config
from robot_rl.serve.actor import ActorSpec, run_actor
from robot_rl.serve.client import PolicyClient
from robot_rl.serve.server import LOOPBACK, PolicyServer, PolicyService, ServeConfig

ACTOR_SEED_STRIDE = 1_000_000  # episode seeds of actor k: the run's seed start + k * this
RESTART_SEED_STRIDE = 100_000  # ... + r * this after its r-th restart (Ray actors)
LEARN_CHECKPOINT_EVERY = 1_000  # learn_online's resumable state, env steps, when td3.checkpoint_every is 0
# Python's GIL switch interval while a learner serves: the serving thread shares the GIL with the updates, and with
# the default 5 ms a request waits up to that long at each hand-off (several per request) while an update runs
GIL_SWITCH_INTERVAL_S = 0.0005


class ActorPool:
    """The actors of one run: ``spec(k, r)`` is actor k's :class:`ActorSpec` after r restarts.

    ``address`` None: local processes (:func:`~robot_rl.envs.vector.worker_context`) (one dying ends the run: RuntimeError from :meth:`check`); an address:
    Ray tasks (:func:`robot_rl.envs.ray_envs.connect`), a dead one started again by :meth:`check`, which returns the
    indices restarted."""

    def __init__(self, n: int, spec, address: str | None):
        self.n, self.spec, self.address = n, spec, address
        self.restarts = [0] * n
        if address is None:
            ctx = worker_context()
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
        warm = td3.warming_up(self.received)
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


class LearnerHost:
    """The serving side of a learner: a :class:`PolicyService` of the frozen base + a frozen copy of the residual
    (weight pushes allowed, a :class:`TransitionInbox` attached) on a background server thread, the client that
    pushes the learner's weights to it, and the bookkeeping of versions per action chunk.

    :meth:`consume` is the learner's whole reaction to one ``transitions`` request: rows into the run (features of
    ``obs`` and ``next_obs`` with the base actions, n-step windows per slot), the updates owed, a weight push every
    ``td3.push_every`` actor updates (versions 1, 2, ...), the curve row and the checkpoint when due. Both the
    actor-learner split (:func:`train_residual_td3_actors`) and learning from external actors
    (:func:`learn_online`, a robot's policy node) use it.

    Args:
        run: the :class:`~robot_rl.rl.offpolicy.OffPolicyRun` (its ``policy`` is served).
        base: the frozen base. host / port / token: where the server listens (port 0: any free port).
        max_sessions: sessions one client may hold open.
    """

    def __init__(self, run: OffPolicyRun, base, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_sessions: int = 64):
        td3 = self.td3 = run.cfg
        self.run, self.norm = run, base.normalizer
        self.service = PolicyService(base, residual=freeze(copy.deepcopy(run.policy)),
                                     config=ServeConfig(host=host, port=port, token=token, max_batch=td3.n_envs,
                                                        batch_window_ms=2.0, allow_push=True, seed=td3.seed,
                                                        max_sessions_per_client=max(max_sessions, td3.n_envs)))
        self.inbox = TransitionInbox(td3, received=run.steps)
        self.service.learner = self.inbox
        self.server = PolicyServer(self.service)
        self.endpoint = self.server.bind()
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.thread = threading.Thread(target=self.server.serve_forever, name="policy-server", daemon=True)
        self.thread.start()
        self.pusher = PolicyClient(self.endpoint.replace("0.0.0.0", "127.0.0.1"), token=token, timeout_s=30.0)
        self.version, self.pushed_at = 0, run.learner.actor_updates
        self.serve_as(resumed_version(run))
        self.chunk_version: dict[str, int] = {}
        self.mixed, self.lag = 0, []
        self.rows = self.intervened = 0  # rows and human-driven rows since the last curve row

    def serve_as(self, version: int) -> None:
        """Push the residual as it is now under ``version`` when that is above the served one (a resumed run's
        restored weights: versions go on rising across restarts, so a stored ``residual_version`` names one set of
        weights)."""
        if version > self.version:
            self.version = version
            self.pusher.push_weights(self.run.policy, version)

    def forget(self, sessions) -> None:
        """Sessions that begin new episodes without a final row (a restarted actor): no chunk to continue."""
        for sid in sessions:
            self.chunk_version.pop(sid, None)

    def consume(self, req: dict, slots: list[int], replayed: bool = False) -> None:
        """Learn from one ``transitions`` request whose first ``len(slots)`` rows are kept (row j -> n-step window
        ``slots[j]``; rows past ``td3.total_env_steps`` are dropped by the caller); see the class doc.
        ``replayed``: rows read back from the store on resume (:meth:`EpisodeLog.rows_after`), not from the
        inbox: learned from alike, without the version bookkeeping of live chunks."""
        run, td3, pol, norm = self.run, self.td3, self.run.policy, self.norm
        k = len(slots)
        if not k:  # nothing kept (the run has its steps): counted as consumed, no update, no curve row
            self.inbox.consumed += 0 if replayed else len(req["sessions"])
            return
        for j, sid in enumerate(req["sessions"][:k] if not replayed else []):  # one residual version per chunk
            v = int(req["residual_version"][j])  # (the server's pinning, checked)
            if not req["new_chunk"][j] and self.chunk_version.get(sid, v) != v:
                self.mixed += 1
            self.chunk_version[sid] = v
            self.lag.append(self.version - v)
        with torch.no_grad():
            x = pol.features(norm, {key: np.array(a[:k]) for key, a in req["obs"].items()},
                             norm.normalize("action", torch.as_tensor(np.array(req["base"][:k]))))
            nx = pol.features(norm, {key: np.array(a[:k]) for key, a in req["next_obs"].items()},
                              norm.normalize("action", torch.as_tensor(np.array(req["next_base"][:k]))))
        inter = req.get("intervention")
        self.rows += k
        self.intervened += int(np.sum(inter[:k])) if inter is not None else 0
        res = torch.as_tensor(np.array(req["residual"][:k]))
        unreachable = None
        if inter is not None and np.any(inter[:k]):  # a human's action beyond base +- alpha: its residual is clipped
            with torch.no_grad():
                base_n = norm.normalize("action", torch.as_tensor(np.array(req["base"][:k])))
                exe_n = norm.normalize("action", torch.as_tensor(np.array(req["executed"][:k])))
                unreachable = ~reaches(pol, base_n, res, exe_n) & np.asarray(inter[:k], bool)
        run.add(x, res, req["reward"][:k], req["terminated"][:k], req["truncated"][:k], nx, req["success"][:k],
                slots=slots, interventions=None if inter is None else np.asarray(inter[:k], bool),
                unreachable=unreachable)
        run.train()
        self.inbox.consumed += 0 if replayed else len(req["sessions"])
        if run.learner.actor_updates - self.pushed_at >= td3.push_every:
            self.version += 1
            self.pusher.push_weights(pol, self.version)
            self.pushed_at = run.learner.actor_updates
        n_rows = len(run.curve)
        run.log(self.service.stats["batches"], self.extra())
        if len(run.curve) > n_rows:
            self.lag, self.rows, self.intervened = [], 0, 0

    def extra(self) -> dict:
        """The learner's curve fields: weight_version, policy_lag (mean over the row), mixed_version_chunks, backlog,
        intervention_rate (share of the row's env steps a human drove)."""
        return {"weight_version": self.version, "policy_lag": float(np.mean(self.lag)) if self.lag else 0.0,
                "mixed_version_chunks": self.mixed, "backlog": self.inbox.received - self.inbox.consumed,
                "intervention_rate": self.intervened / max(1, self.rows)}

    def close(self) -> None:
        """Stop accepting transitions (replies say ``stop``), stop the server and the pushing client."""
        self.inbox.stop = True
        self.server.stop()
        self.thread.join(timeout=5)
        self.pusher.close()
        sys.setswitchinterval(self.switch_interval)


def resumed_version(run: OffPolicyRun) -> int:
    """The weight version a resumed run serves its restored residual as: above every version pushed before its
    saved state (the last curve row's ``weight_version`` plus at most one push per ``td3.push_every`` actor updates
    since that row). 0 for a fresh run (the untrained residual is version 0)."""
    rows = [r for r in run.curve if "weight_version" in r and "actor_updates" in r]
    if not rows:
        return 0
    since = max(0, run.learner.actor_updates - int(rows[-1]["actor_updates"]))
    return int(rows[-1]["weight_version"]) + since // run.cfg.push_every + 1


def train_residual_td3_actors(base, task: str, td3: TD3Config, out_dir: str | Path, *,
                              residual: ResidualConfig | None = None, demos: str | Path | None = None,
                              task_kwargs: dict | None = None, env_kwargs: dict | None = None, writer=None,
                              progress: bool = True, validate: Callable | None = None,
                              checkpoint_extra: dict | None = None,
                              resume: bool = False) -> tuple[ResidualPolicy, list]:
    """Residual TD3 with ``td3.actors`` actor processes and this process as learner + policy server (module doc).

    Arguments, outputs and errors as :func:`robot_rl.rl.offpolicy.train_residual_offpolicy`; the curve rows add
    ``weight_version``, ``policy_lag``, ``mixed_version_chunks`` and ``backlog``. Episode seeds:
    actor k takes ``seed_start + k * ACTOR_SEED_STRIDE, +1, ...``. Raises RuntimeError when an actor process dies.
    """
    td3.validate()
    if td3.actors < 1:
        raise ConfigError("td3.actors", f"{td3.actors} < 1", "use train_residual_offpolicy for the single-process mode")
    if base.config.image_keys:
        raise ConfigError("td3.actors", "the actors stream low-dim observations only; a residual on an image base "
                          "reads camera frames", "train it in one process (td3.actors=0)")
    torch.manual_seed(td3.seed)
    ekw = env_kwargs_for(base.config, task, task_kwargs, env_kwargs)
    address = ekw.pop("ray", None)  # the actors' placement; each steps its envs in its own process
    run = OffPolicyRun(base, task, td3, out_dir, obs_dims=_obs_dims(task, task_kwargs, ekw), n_slots=td3.n_envs,
                 residual=residual, demos=demos, task_kwargs=task_kwargs, writer=writer, progress=progress,
                 validate=validate, checkpoint_extra=checkpoint_extra, resume=resume)
    host, token = "127.0.0.1", None
    if address is not None:  # actors on other nodes reach the server at this node's address, with a token
        from robot_rl.envs.ray_envs import connect

        connect(address)
        import ray

        host, token = ray.util.get_node_ip_address(), secrets.token_urlsafe(24)
    lh = LearnerHost(run, base, host=host, token=token)
    per = td3.n_envs // td3.actors
    actors = ActorPool(td3.actors, lambda k, r: ActorSpec(
        endpoint=lh.endpoint, index=k, task=task, n_envs=per,
        seed_start=run.seed_start + k * ACTOR_SEED_STRIDE + r * RESTART_SEED_STRIDE, seed=td3.seed + r,
        max_backlog=td3.max_backlog, task_kwargs=dict(task_kwargs or {}), env_kwargs=ekw, token=token), address)
    slot = {f"actor{k}-env{i}": k * per + i for k in range(td3.actors) for i in range(per)}
    next_seed = run.seed_start + td3.actors * ACTOR_SEED_STRIDE
    try:
        actors.start()
        while not run.done:
            reqs = lh.inbox.drain(1.0)
            for k in actors.check():  # a restarted actor's sessions begin new episodes
                run.nstep.clear([k * per + i for i in range(per)])
                lh.forget([f"actor{k}-env{i}" for i in range(per)])
            for req in reqs:
                k = max(0, min(len(req["sessions"]), td3.total_env_steps - run.steps))
                lh.consume(req, [slot[s] for s in req["sessions"][:k]])
                run.checkpoint(next_seed)
    finally:
        lh.inbox.stop = True
        actors.stop()
        lh.close()
        run.close()
    return run.finish(next_seed, extra={"actors": td3.actors, "weight_version": lh.version,
                                        "actor_restarts": sum(actors.restarts)})


def _obs_dims(task: str, task_kwargs: dict | None, env_kwargs: dict) -> dict:
    """{observation key: flat dim} of the task's env (one env built and closed)."""
    probe = make_vector_env(task, 1, task_kwargs=task_kwargs, asynchronous=False, **env_kwargs)
    try:
        return env_obs_dims(probe)
    finally:
        probe.close()


class SessionSlots:
    """n-step windows for sessions the learner did not start (robots, remote actors): a session takes a free
    window on its first row and gives it back with the row that ends its episode; when all ``n`` are taken, the
    least recently used session loses its window (its unfinished n-step steps are dropped: ``on_evict(sid, slot)``).
    """

    def __init__(self, n: int, on_evict: Callable[[str, int], None]):
        from collections import OrderedDict

        self.free, self.used, self.on_evict = list(range(n - 1, -1, -1)), OrderedDict(), on_evict

    def take(self, sid: str) -> int:
        if sid in self.used:
            self.used.move_to_end(sid)
            return self.used[sid]
        if not self.free:
            old, slot = self.used.popitem(last=False)
            self.on_evict(old, slot)
            self.free.append(slot)
        self.used[sid] = slot = self.free.pop()
        return slot

    def release(self, sid: str) -> None:
        slot = self.used.pop(sid, None)
        if slot is not None:
            self.free.append(slot)


class EpisodeLog:
    """Commits every episode the learner receives to a zarr store when its last row arrives, so that nothing a
    robot did is lost when the learner stops (:class:`robot_rl.datasets.episodes.EpisodeWriter`, the one episode
    writer).

    Stored per step: the low-dim observation keys of the rows (float32), ``action`` = the executed action (raw
    units), ``intervention`` and ``human_action`` (the executed action on intervention rows, NaN elsewhere), and
    the fields ``reward`` (float32), ``base_action`` (raw, float32 (A,)), ``residual`` (residual units) and
    ``residual_version`` (int64), ``learner_step`` (int64: the learner's env-step count at the row, so a resumed
    learner finds the rows its saved state lacks: :meth:`rows_after`; left out in a store whose episodes were
    written without it). Episode metadata: source ``policy`` (intervention steps are flagged, so only they join a
    later run's demo side, :func:`robot_rl.rl.replay.demo_buffer`), success = the last row's ``success``, seed -1
    (a robot has none), ``extra`` {session, weight versions, final: {obs, base} (the next observation and base
    action after the last row)}.

    Args:
        store: path of the store (created when missing). task / backend: episode metadata.
    Raises ConfigError from :meth:`add` when an episode does not fit the store's schema (e.g. a store of other
    observation keys); the store is left as it was.
    """

    def __init__(self, store: str | Path, task: str, backend: str):
        from robot_rl.datasets.store import ZarrStore

        self.store, self.task, self.backend = ZarrStore.open_or_create(store), task, backend
        # learner_step per row (what rows_after reads), unless the store's episodes were written without it
        self.with_step = self.store.n_episodes == 0 or "learner_step" in self.store.keys
        self.writers: dict = {}
        self.committed = 0

    def add(self, req: dict, k: int, first_step: int = 0) -> None:
        """Append the first ``k`` rows of a ``transitions`` request; commit the episodes they end. ``first_step``:
        the learner's env-step count before these rows (row j is stored with ``learner_step`` = first_step + j)."""
        from robot_rl.datasets.episodes import EpisodeWriter

        inter = req.get("intervention")
        for j in range(k):
            sid = req["sessions"][j]
            w = self.writers.setdefault(sid, EpisodeWriter(human_action=True))
            flagged = bool(inter[j]) if inter is not None else False
            w.add({key: a[j] for key, a in req["obs"].items()}, req["executed"][j], intervention=flagged,
                  human_action=req["executed"][j] if flagged else None, reward=float(req["reward"][j]),
                  base_action=req["base"][j], residual=req["residual"][j],
                  residual_version=np.int64(req["residual_version"][j]),
                  **({"learner_step": np.int64(first_step + j)} if self.with_step else {}))
            if req["terminated"][j] or req["truncated"][j]:
                versions = self.writers[sid].steps["residual_version"]
                final = {"obs": {key: [float(v) for v in a[j]] for key, a in req["next_obs"].items()},
                         "base": [float(v) for v in req["next_base"][j]]}
                self.writers.pop(sid).commit(
                    self.store, seed=-1, task=self.task, source="policy", success=bool(req["success"][j]),
                    backend=self.backend, extra={"session": sid, "residual_versions": [int(min(versions)),
                                                                                       int(max(versions))],
                                                 "final": final})
                self.committed += 1

    def rows_after(self, step: int, obs_keys: list[str]):
        """The stored rows the learner took at env step ``step`` or later (``learner_step``), one
        ``transitions``-shaped request per episode (``sessions`` ``store-<episode>``, ``new_chunk`` true): what a
        learner resumed from a state saved at ``step`` had learned from before it stopped and lost with it. The
        next observation of a row is the next row's, and for the last one the episode's ``final`` (its metadata);
        without that (a store written before it was kept) the last row of a failure is left out. Yields dicts."""
        st = self.store
        if "learner_step" not in st.keys:
            return
        for i, meta in enumerate(st.episodes_meta()):
            keep = st.get_episode(i, keys=["learner_step"])["learner_step"] >= step  # the rest only when needed
            if not keep.any():
                continue
            e = st.get_episode(i, keys=[*obs_keys, "base_action", "residual", "action", "reward", "residual_version",
                                        "intervention"])
            ok, final = bool(meta["success"]), (meta.get("extra") or {}).get("final")
            n = len(e["reward"])
            end = np.zeros(n, bool)
            end[-1] = True
            if final is None and not ok:  # no next observation for the last row of a failure: left out
                keep[-1] = False
            fin = final or {"obs": {k: e[k][-1] for k in obs_keys}, "base": e["base_action"][-1]}
            nxt = lambda a, last: np.concatenate([a[1:], np.asarray(last, a.dtype)[None]])  # noqa: E731
            row = {"sessions": [f"store-{i}"] * int(keep.sum()),
                   "obs": {k: e[k][keep] for k in obs_keys},
                   "next_obs": {k: nxt(e[k], fin["obs"][k])[keep] for k in obs_keys},
                   "base": e["base_action"][keep], "next_base": nxt(e["base_action"], fin["base"])[keep],
                   "residual": e["residual"][keep], "executed": e["action"][keep], "reward": e["reward"][keep],
                   "terminated": (end & ok)[keep], "truncated": (end & ~ok)[keep], "success": (end & ok)[keep],
                   "residual_version": e["residual_version"][keep], "new_chunk": np.ones(int(keep.sum()), bool),
                   "intervention": e["intervention"][keep].astype(bool)}
            if len(row["sessions"]):
                yield row

    def drop(self, sid: str) -> None:
        """Forget a session's unfinished episode (it is not committed)."""
        self.writers.pop(sid, None)


UPDATE_THREAD_NICE = 10  # how much lower than the serving thread the learner's updates run (Linux thread nice)


def yield_cpu_to_serving() -> None:
    """Lower the calling (updating) thread's CPU priority by :data:`UPDATE_THREAD_NICE` below the process's, so that
    the serving thread, on a robot's control path, gets the CPU first when both want it (Linux: ``setpriority`` of
    one thread; elsewhere, or when refused, nothing changes)."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + UPDATE_THREAD_NICE))
    except (AttributeError, OSError):
        pass


def check_listen(host: str, token: str | None) -> None:
    """A learner beyond loopback needs a token: actors elsewhere would act, and the learner push weights, without
    one (the server refuses unauthenticated pushes off loopback). Raises ConfigError (``serve.token``)."""
    if token is None and host not in LOOPBACK:
        raise ConfigError("serve.token", f"none, and the learner would listen on {host}",
                          "give a shared token (--token-file or $ROBOT_RL_SERVER_TOKEN), or listen on 127.0.0.1")


def learn_online(base, task: str, td3: TD3Config, out_dir: str | Path, *, store: str | Path,
                 host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 residual: ResidualConfig | None = None, demos: str | Path | None = None,
                 task_kwargs: dict | None = None, env_kwargs: dict | None = None, backend: str = "robot",
                 writer=None, progress: bool = True, checkpoint_extra: dict | None = None, resume: bool = False,
                 max_sessions: int = 64, stop: threading.Event | None = None,
                 ready: Callable[[str], None] | None = None) -> tuple[ResidualPolicy, list]:
    """Residual TD3 learning from actors this process does not start (a robot's policy node, remote sim actors):
    serve the frozen base + the residual at ``host:port`` and learn from every ``transitions`` request that
    arrives, as :class:`LearnerHost` does for the split; each ended episode is committed to ``store``
    (:class:`EpisodeLog`). Runs until ``td3.total_env_steps`` rows were learned from, or ``stop`` is set (Ctrl-C
    as well), then writes the state and the checkpoint like :func:`robot_rl.rl.offpolicy.train_residual_offpolicy`.

    The observation dims are the task env's (a robot's policy node assembles the same observation dict). Sessions
    take n-step windows as they come (:class:`SessionSlots`, ``max_sessions`` of them). Exploration is the
    actors' to add, as the learner's replies say (``explore``). ``ready(endpoint)`` is called once the server
    listens. ``resume``: continue the run in ``out_dir/state`` (its episodes stay in ``store``), first learning again
    from the stored rows it took after that state was saved (:meth:`EpisodeLog.rows_after`: the replay, env-step
    count and updates a learner that died lost with them). The state is saved every ``td3.checkpoint_every`` env
    steps (0: every :data:`LEARN_CHECKPOINT_EVERY`); every labelled episode is in ``store`` from the moment it
    arrived, so a learner that dies loses only the rows of episodes not yet ended.

    Raises ConfigError for bad settings, an image base (transitions carry low-dim observations only) or an episode
    that does not fit ``store``.
    """
    td3.validate()
    check_listen(host, token)
    if base.config.image_keys:
        raise ConfigError("base", "transitions carry low-dim observations only; this base reads camera frames",
                          "learn online with a state base (the residual on image features needs frames, next step)")
    if not td3.checkpoint_every:  # a robot's learner must survive a crash: save every ~100 s of 10 Hz control
        td3 = dataclasses.replace(td3, checkpoint_every=LEARN_CHECKPOINT_EVERY)
    torch.manual_seed(td3.seed)
    ekw = env_kwargs_for(base.config, task, task_kwargs, env_kwargs)
    ekw.pop("ray", None)
    episodes = EpisodeLog(store, task, backend)
    run = OffPolicyRun(base, task, td3, out_dir, obs_dims=_obs_dims(task, task_kwargs, ekw), n_slots=max_sessions,
                 residual=residual, demos=demos, task_kwargs=task_kwargs, writer=writer, progress=progress,
                 checkpoint_extra=checkpoint_extra, resume=resume)

    def evict(sid: str, slot: int) -> None:
        run.nstep.clear([slot])
        episodes.drop(sid)

    slots = SessionSlots(max_sessions, evict)
    lh = LearnerHost(run, base, host=host, port=port, token=token, max_sessions=max_sessions)
    yield_cpu_to_serving()
    if resume:  # what it learned from after its last saved state, it learns from again (the store has it)
        n_rows = n_eps = 0
        lost = list(episodes.rows_after(run.steps, list(run.policy.config.obs_keys)))
        if lost:  # above what the lost run pushed, too
            lh.serve_as(max(int(np.max(req["residual_version"])) for req in lost) + 1)
        for req in lost:
            k = max(0, min(len(req["sessions"]), td3.total_env_steps - run.steps))
            sid = req["sessions"][0]
            lh.consume(req, [slots.take(sid)] * k, replayed=True)
            slots.release(sid)
            n_rows, n_eps = n_rows + k, n_eps + 1
        if progress and n_rows:
            print(f"robot-rl learn: {n_rows} rows of {n_eps} stored episodes taken after the saved state, learned "
                  "from again", file=sys.stderr, flush=True)
    if ready is not None:
        ready(lh.endpoint)
    try:
        while not run.done and not (stop is not None and stop.is_set()):
            for req in lh.inbox.drain(0.5):
                k = max(0, min(len(req["sessions"]), td3.total_env_steps - run.steps))
                episodes.add(req, k, run.steps)
                taken = [slots.take(sid) for sid in req["sessions"][:k]]
                for j in range(k):
                    if req["terminated"][j] or req["truncated"][j]:
                        slots.release(req["sessions"][j])
                lh.consume(req, taken)
                run.checkpoint(0)
    finally:
        lh.close()
        run.close()
    if progress and episodes.writers:
        print(f"robot-rl learn: {len(episodes.writers)} unfinished episodes not committed", file=sys.stderr,
              flush=True)
    if episodes.store.n_episodes:  # robot_learning.{png,md}: success, interventions, length, version vs robot time
        from robot_rl.stages.evaluation import robot_learning_report

        robot_learning_report(episodes.store, out_dir, control_rate_hz=1.0 / float(ekw.get("control_dt", 0.1)))
    return run.finish(0, extra={"episodes_committed": episodes.committed, "weight_version": lh.version})
