"""Actors of the actor-learner split: simulated envs driven through the policy server, their executed steps streamed
back to the learner as ``transitions`` (:mod:`robot_rl.serve.protocol`).

An actor is one process (:func:`run_actor`) with ``n_envs`` envs stepped in that process. Per control step it sends
one pipelined round of ``act`` requests (one session per env, so the server batches the base calls across every
actor's envs and serves base + the newest residual pinned per action chunk), adds the exploration the learner
asks for, steps its envs and sends the completed rows of the previous step in one ``transitions`` request. A row is
complete once the base action at its next observation is known: the next step's for a running episode, or, for
an episode that ended, one more ``act`` on the final observation (the action the base would have executed there,
as :meth:`robot_rl.policies.execution.ChunkExecutor.final_actions` gives the in-process learner).

Exploration (what the learner's replies say; the same rule as :class:`robot_rl.rl.offpolicy.Explorer` with
:meth:`robot_rl.rl.td3.TD3Config.explore`): ``warmup`` ->
residual ~ U(-warmup_noise, warmup_noise); ``policy`` -> ``clip(residual_mean + N(0, std), -1, 1)``, residual
units. The executed action is ``unnormalize(clip(normalize(base) + alpha * residual, -1, 1))``
(:func:`robot_rl.rl.residual.combine`), with the base's action normalization from the server's metadata.

Backpressure: when the learner's backlog (rows received, not yet trained on) exceeds ``max_backlog``, the actor
waits, so the UTD ratio the learner keeps is the one configured and the residual the actors run lags the learner
by a bounded amount. A robot would not wait; simulated envs can.

:class:`EpisodeActor` is a robot as an actor (``robot-rl learn``): one session per episode, exploration as the
learner says, a human's action taking a step over as an intervention, and the episode's rows sent whole once the
episode is labelled (success / failure / time limit), or dropped when it is discarded. It never waits on the
learner's backlog. It acts through the server (a round trip per control step), or, with :class:`LocalActs`,
on its own copy of the learner's weights in its own process (the control path never waits for the learner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from robot_rl.envs.vector import SeedSchedule, make_vector_env, reset_some
from robot_rl.policies.normalizer import Normalizer
from robot_rl.rl.residual import combine
from robot_rl.serve.client import ActResult, PolicyClient
from robot_rl.serve.protocol import MAX_TRANSITIONS

#: pause between backlog polls while the learner catches up: each poll is a request the server thread answers (and
#: a GIL hand-over the learner thread pays), so poll at a fraction of an update's time, not in a busy loop
WAIT_S = 0.02


@dataclass
class ActorSpec:
    """What one actor process needs (plain data: it crosses a process boundary).

    endpoint: the policy server (``tcp://host:port``); index: the actor's number (session ids
    ``actor<index>-env<i>``, noise seed); task / task_kwargs / env_kwargs: the envs (``make_vector_env``);
    n_envs: envs in this process; seed_start: its first episode seed (episodes take ``seed_start, +1, ...``);
    seed: exploration-noise seed; max_backlog: learner backlog (rows) above which the actor waits.
    """

    endpoint: str
    index: int
    task: str
    n_envs: int
    seed_start: int
    seed: int = 0
    max_backlog: int = 256
    task_kwargs: dict = field(default_factory=dict)
    env_kwargs: dict = field(default_factory=dict)
    token: str | None = None


def run_actor(spec: ActorSpec, stop) -> None:
    """Process entry point: run :class:`SimActor` until ``stop`` (a multiprocessing Event) is set or the learner
    says stop. One torch thread (the learner and the server own the other core)."""
    torch.set_num_threads(1)
    venv = make_vector_env(spec.task, spec.n_envs, task_kwargs=spec.task_kwargs, asynchronous=False,
                           **spec.env_kwargs)
    client = PolicyClient(spec.endpoint, token=spec.token, timeout_s=60.0, retries=2)
    try:
        client.wait_ready(60.0)
        SimActor(venv, client, spec).run(stop)
    finally:
        venv.close()
        client.close()


class _Acting:
    """What every actor shares: the server's metadata (alpha, low-dim keys, the base's action normalization), the
    exploration the learner asks for, the executed action, and the ``transitions`` message."""

    def __init__(self, client: PolicyClient, rng: np.random.Generator, max_backlog: int | None):
        self.client, self.rng, self.max_backlog = client, rng, max_backlog
        meta = client.metadata()
        if not meta["residual"]["loaded"]:
            raise RuntimeError("the policy server serves no residual; the learner starts it with one")
        self.alpha = torch.as_tensor(meta["residual"]["alpha"], dtype=torch.float32)  # (A,) or a scalar
        self.low_keys = [k for k, s in meta["obs_spec"].items() if s["dtype"] == "float32"]
        A = int(meta["action_spec"]["shape"][0])
        self.norm = Normalizer({"action": A}, {"action": meta["normalization"]["action"]})
        self.explore = {"mode": "warmup", "warmup_noise": 0.0, "std": 0.0}  # until the learner's first reply
        self.stop_now = False
        self.steps_sent = self.waits = 0

    def _residual(self, mean: np.ndarray) -> np.ndarray:
        e = self.explore
        if e["mode"] == "warmup":
            return self.rng.uniform(-1.0, 1.0, mean.shape).astype(np.float32) * float(e["warmup_noise"])
        noisy = mean + self.rng.standard_normal(mean.shape).astype(np.float32) * float(e["std"])
        return np.clip(noisy, -1.0, 1.0).astype(np.float32)

    def _executed(self, base_raw: np.ndarray, residual: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            base_n = self.norm.normalize("action", torch.as_tensor(base_raw))
            out = self.norm.unnormalize("action", combine(base_n, torch.as_tensor(residual), self.alpha))
        return out.numpy().astype(np.float32)

    def _send(self, rows: list[dict]) -> None:
        if not rows:
            return
        msg = {"sessions": [r["session"] for r in rows]}
        for k in ("obs", "next_obs"):
            msg[k] = {key: np.stack([r[k][key] for r in rows]).astype(np.float32) for key in self.low_keys}
        for k, dt in (("steps", np.int64), ("base", np.float32), ("residual", np.float32),
                      ("executed", np.float32), ("reward", np.float32), ("terminated", bool), ("truncated", bool),
                      ("success", bool), ("next_base", np.float32), ("residual_version", np.int64),
                      ("new_chunk", bool), ("intervention", bool)):
            msg[k] = np.asarray([r.get(k, False) for r in rows], dtype=dt)
        rep = self.client.send_transitions(msg)
        self.steps_sent += len(rows)
        self._follow(rep)

    def _follow(self, rep: dict) -> None:
        """Take the learner's exploration setting; wait while its backlog is above ``max_backlog`` (None: never)."""
        self.explore, self.stop_now = rep["explore"], bool(rep["stop"])
        backlog = int(rep["backlog"])
        while self.max_backlog is not None and backlog > self.max_backlog and not self.stop_now:
            self.waits += 1
            time.sleep(WAIT_S)
            st = self.client.ping()["learner"]
            backlog, self.stop_now, self.explore = int(st["backlog"]), bool(st["stop"]), st["explore"]


class SimActor(_Acting):
    """The actor loop over a vector env (autoreset off, per-env seeds) and a :class:`PolicyClient`.

    Attributes: ``steps_sent`` (rows sent), ``episodes`` (episodes finished), ``waits`` (backpressure waits).
    """

    def __init__(self, venv, client: PolicyClient, spec: ActorSpec):
        super().__init__(client, np.random.default_rng([spec.seed, spec.index]), spec.max_backlog)
        self.venv, self.spec = venv, spec
        self.n = int(venv.num_envs)
        self.sessions = [f"actor{spec.index}-env{i}" for i in range(self.n)]
        self.seeds = SeedSchedule(spec.seed_start)
        self.episodes = 0

    # --- pieces -------------------------------------------------------------------------------------------------
    def _act(self, envs, obs: dict, steps, reset=None, seeds=None) -> list:
        items = []
        for j, i in enumerate(envs):
            it = dict(session=self.sessions[i], step=int(steps[j]), obs={k: v[i] for k, v in obs.items()})
            if reset is not None and reset[j]:
                it.update(reset=True, seed=int(seeds[j]))
            items.append(it)
        return self.client.act_many(items)

    # --- loop ---------------------------------------------------------------------------------------------------
    def run(self, stop=None, max_steps: int | None = None) -> None:
        """Step until ``stop`` is set, the learner says stop, or ``max_steps`` control steps (tests)."""
        n, every = self.n, np.arange(self.n)
        seeds = [self.seeds.take() for _ in range(n)]
        obs = reset_some(self.venv, np.ones(n, bool), seeds, None)
        step = np.zeros(n, np.int64)
        fresh = np.ones(n, bool)
        pending: list[dict | None] = [None] * n  # the previous step's row of each env, waiting for its next base
        ready: list[dict] = []  # complete rows to send
        t = 0
        while not self.stop_now and (stop is None or not stop.is_set()) and (max_steps is None or t < max_steps):
            res = self._act(every, obs, step, fresh, seeds)
            base = np.stack([r.base[0] for r in res])
            for i in every:
                if pending[i] is not None:
                    ready.append({**pending[i], "next_base": base[i]})
                    pending[i] = None
            self._send(ready)
            ready = []
            residual = self._residual(np.stack([r.residual[0] for r in res]))
            executed = self._executed(base, residual)
            next_obs, rew, term, trunc, info = self.venv.step(executed)
            term, trunc = np.asarray(term, bool), np.asarray(trunc, bool)
            done = term | trunc
            success = np.asarray(info.get("success", np.zeros(n)), bool)
            for i in every:
                pending[i] = {"session": self.sessions[i], "steps": step[i],
                              "obs": {k: obs[k][i] for k in self.low_keys}, "base": base[i],
                              "residual": residual[i], "executed": executed[i], "reward": float(rew[i]),
                              "terminated": term[i], "truncated": trunc[i], "success": success[i],
                              "next_obs": {k: next_obs[k][i] for k in self.low_keys},
                              "residual_version": res[i].residual_version, "new_chunk": res[i].new_chunk}
            ended = np.flatnonzero(done)
            if len(ended):  # the base action at each final observation completes those rows now
                final = self._act(ended, next_obs, step[ended] + 1)
                for j, i in enumerate(ended):
                    ready.append({**pending[i], "next_base": final[j].base[0]})
                    pending[i] = None
                self.episodes += len(ended)
                for i in ended:
                    seeds[i] = self.seeds.take()
                obs = reset_some(self.venv, done, seeds, next_obs)
            else:
                obs = next_obs
            step = np.where(done, 0, step + 1)
            fresh = done
            t += 1
        if ready and not self.stop_now:
            self._send(ready)


class LocalActs:
    """The policy server's per-step ``act`` answered in this process, from a frozen copy of the learner's weights:
    what an actor runs when its control loop must not wait for the learner (SERL / HIL-SERL actors act on their own
    copy of the parameters, refreshed between episodes). ``act`` and ``close_session`` take
    :meth:`robot_rl.serve.client.PolicyClient.act`'s arguments and give its :class:`ActResult` for row 0 only,
    with the server's arithmetic: the base through a one-env :class:`~robot_rl.policies.execution.ChunkExecutor`
    seeded with the session's seed (a stream of one draws the server's noise), a new chunk when the queue runs out,
    and the residual's mean on this step's observation (:func:`robot_rl.rl.residual.apply_residual`, a batch of
    one, as the server's row 0). One session at a time (a robot's episode), steps one apart.

    Args:
        base: the frozen base (the learner's: the same weights digest). residual: the copy of its residual
            (:meth:`PolicyClient.fetch_residual`), or None. residual_version: that copy's version (every row says
            it). :meth:`load` swaps in a newer copy.
    """

    def __init__(self, base, residual, residual_version: int):
        from robot_rl.serve.server import weights_digest

        self.base = base
        self.low_keys = list(base.config.obs_keys)
        self.base_version = weights_digest(base)
        self.load(residual, residual_version)
        self.session, self.ex = None, None

    def load(self, residual, residual_version: int) -> None:
        """Act on this copy of the learner's residual from the next session on (call between episodes)."""
        self.residual, self.residual_version = residual, int(residual_version)
        # what the residual reads: the base's low-dim keys and its fine keys (e.g. cube_to_target), as the server
        self.res_keys = [*self.low_keys, *((residual.config.fine_keys or {}) if residual is not None else {})]

    def act(self, session: str, step: int, obs: dict, *, reset: bool = False, seed: int | None = None,
            timeout_s: float | None = None) -> ActResult:
        """This step's base action, residual mean and executed action (each float32 (1, A)); ``obs``: one frame
        {key: array} with the base's keys. Raises RuntimeError for a step of a session never reset."""
        import zlib

        from robot_rl.policies.execution import ChunkExecutor
        from robot_rl.rl.residual import apply_residual

        b = {k: np.asarray(v)[None] for k, v in obs.items()}
        if reset:
            seed = seed if seed is not None else zlib.crc32(session.encode()) % 2**63
            self.session, self.ex = session, ChunkExecutor(self.base, 1, seed=seed)
            self.ex.reset(np.ones(1, bool), b)
        elif session != self.session:
            raise RuntimeError(f"session {session!r} was not started here (reset=True first)")
        else:
            self.ex.observe(b)
        calls = self.ex.calls
        base = self.ex.actions()
        r, executed = apply_residual(self.base.normalizer, self.residual,
                                     {k: b[k] for k in self.res_keys if k in b}, base)
        return ActResult(session=session, step=step, chunk_start=step, base=base, residual=r, executed=executed,
                         base_version=self.base_version, residual_version=self.residual_version,
                         new_chunk=self.ex.calls > calls, timing={})

    def close_session(self, session: str, timeout_s: float | None = None) -> None:
        if session == self.session:
            self.session, self.ex = None, None


class EpisodeActor(_Acting):
    """A robot as an actor (``robot-rl learn``): one server session per episode, one ``act`` per control step with
    the exploration the learner asks for, and the episode's rows kept until the episode is labelled, then sent in
    one go (or dropped).

    Why whole episodes: the reward of a robot episode is known only when it is labelled (an operator's success /
    failure, or a success classifier), a discarded or e-stopped episode must never reach the replay, and the
    learner's updates then run between episodes, away from the control loop's deadlines.

    Per step (:meth:`act`): the residual is the server's mean plus exploration (the learner's last reply: uniform
    ``warmup_noise`` during warm-up, else Gaussian ``std``, residual units, clipped to [-1, 1]); the executed action
    is ``unnormalize(clip(normalize(base) + alpha * residual, -1, 1))``. With ``human`` (a human drove the step,
    raw action (A,)) the row is an intervention: executed = the human's action, residual = its residual-unit
    equivalent ``clip((normalize(human) - normalize(base)) / alpha, -1, 1)``. With ``human_within_reach`` the arm
    executes the human's action projected into the residual's reach instead, ``combine(base, that residual)``: each
    normalized base action dimension moves by at most ``alpha`` (of [-1, 1]) toward the human's, so a takeover
    becomes a bounded nudge whose every row the residual can imitate (a full takeover's steps beyond that reach
    are dropped by the learner, as ``demo_buffer`` drops unreachable demo steps); the row's (and the store's) human
    action is then the executed, projected one.

    :meth:`end` labels the episode: ``success`` True -> reward 1 and ``terminated`` on the last row; False (a
    failure mark or the time limit) -> reward 0 and ``truncated`` (bootstrapped: the task goes on past the cut).
    The last row's next base action is one more ``act`` on the final observation (the action the base would have
    executed there), as the simulated actors do.

    Where a step's base action and residual mean come from: the server (one ``act`` round trip per step), or an
    episode's :class:`LocalActs` (``start(acts=...)``: this process, on a copy of the learner's weights; only the
    episode's start and its rows talk to the learner).

    Args:
        client: a :class:`PolicyClient` of the learner's server. name: session prefix. seed: exploration seed.
        human_within_reach: execute interventions projected into the residual's reach (above); default False.
    Attributes: ``episodes`` (episodes sent), ``steps_sent``, ``rows`` (the running episode's rows).
    """

    def __init__(self, client: PolicyClient, name: str = "robot", seed: int = 0, human_within_reach: bool = False):
        super().__init__(client, np.random.default_rng([seed, 17]), None)
        self.human_within_reach = bool(human_within_reach)
        self.name, self.episode, self.episodes = name, 0, 0
        self.session, self.rows, self.pending = None, [], None
        self.final_base = None  # the base action at the final observation, once asked (a label may be retried)
        self.acts = client

    def start(self, seed: int | None = None, acts: LocalActs | None = None) -> None:
        """Begin an episode: a new session (``seed``: its base sampling seed), the learner's exploration now;
        ``acts``: this episode's steps run on that local copy instead of through the server."""
        self.discard()
        self.acts = acts if acts is not None else self.client
        self.session = f"{self.name}-{self.episode}"
        self.episode += 1
        self.step, self.reset_seed = 0, seed
        st = self.client.ping().get("learner")
        if st is not None:
            self.explore, self.stop_now = st["explore"], bool(st["stop"])

    def _act(self, obs: dict, timeout_s: float | None):
        # a step index is used once, answered or not (the server refuses a step that does not increase)
        step, self.step = self.step, self.step + 1
        return self.acts.act(self.session, step, obs, reset=step == 0,
                             seed=self.reset_seed if step == 0 else None, timeout_s=timeout_s)

    def act(self, obs: dict, human: np.ndarray | None = None, timeout_s: float | None = None) -> np.ndarray:
        """This step's executed action, float32 (A,) raw units; ``obs`` as the server's obs_spec (one frame)."""
        if self.session is None:
            raise RuntimeError("start() an episode first")
        r = self._act(obs, timeout_s)
        base = np.array(r.base[0], np.float32)
        if self.pending is not None:
            self.rows.append({**self.pending, "next_obs": {k: obs[k] for k in self.low_keys}, "next_base": base})
        if human is not None:
            executed = np.asarray(human, np.float32)
            with torch.no_grad():
                d = (self.norm.normalize("action", torch.as_tensor(executed))
                     - self.norm.normalize("action", torch.as_tensor(base))) / self.alpha
            residual = np.clip(d.numpy(), -1.0, 1.0).astype(np.float32)
            if self.human_within_reach:
                executed = self._executed(base, residual)
        else:
            residual = self._residual(np.asarray(r.residual[0], np.float32))
            executed = self._executed(base, residual)
        self.pending = {"session": self.session, "steps": self.step - 1, "obs": {k: obs[k] for k in self.low_keys},
                        "base": base, "residual": residual, "executed": executed, "reward": 0.0,
                        "terminated": False, "truncated": False, "success": False,
                        "residual_version": r.residual_version, "new_chunk": r.new_chunk,
                        "intervention": human is not None}
        return executed

    def end(self, final_obs: dict, success: bool, timeout_s: float | None = None) -> int:
        """Label and send the running episode (see the class doc); returns the rows sent. When the learner cannot
        be reached (TimeoutError, ConnectionError from the client) the episode is kept, to be labelled again."""
        if self.pending is None:
            self.discard()
            return 0
        if self.final_base is None:  # raises (learner unreachable): nothing changed, label again
            self.final_base = np.array(self._act(final_obs, timeout_s).base[0], np.float32)
        rows = self.rows + [{**self.pending, "next_obs": {k: final_obs[k] for k in self.low_keys},
                             "next_base": self.final_base, "reward": float(bool(success)),
                             "terminated": bool(success), "truncated": not success, "success": bool(success)}]
        for i in range(0, len(rows), MAX_TRANSITIONS):
            self._send(rows[i:i + MAX_TRANSITIONS])
        self.rows, self.pending, self.final_base = [], None, None
        self.episodes += 1
        self._close()
        return len(rows)

    def discard(self) -> None:
        """Drop the running episode (nothing reaches the learner)."""
        self.rows, self.pending, self.final_base = [], None, None
        self._close()

    def _close(self) -> None:
        if self.session is not None:
            try:
                self.acts.close_session(self.session, timeout_s=1.0)
            except Exception:  # noqa: BLE001 - best effort (the server also expires idle sessions)
                pass
            self.session = None
