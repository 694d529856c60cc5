"""Policy execution: the one place that owns a chunking policy's observation history and action-chunk queue.

A chunking policy (Diffusion Policy, Chi et al. 2023; ACT, Zhao et al. 2023) sees the last ``n_obs_steps`` (To)
observations and predicts a chunk of ``n_action_steps`` (Ta) actions for the steps from the current one on. Every
place that executes one uses the classes here:

- :class:`ActionQueue` — one stream's predicted actions indexed by control step, from one or more chunks: the
  newest chunk's row for a step or, with ``ensemble_decay``, temporal ensembling of every chunk's prediction.
- :class:`ChunkStream` — one stream: the observation history, an :class:`ActionQueue`, the step clock ``t`` and
  (optionally) the stream's own noise generator. The policy server keeps one per session (own generator seeded at
  reset), :class:`robot_rl.serve.client.AsyncChunkClient` one per control loop (history of frames not yet sent,
  ensembled queue), :class:`robot_rl.serve.client.PolicyClient` one per session (the frames a restarted server
  needs to re-create it).
- :func:`predict_chunks` — one batched ``predict_chunk`` call over several streams' histories.
- :class:`ChunkExecutor` — N streams of an in-process policy (vector envs: evaluation's ``CombinedPolicy``, residual
  PPO, the policy node's in-process source): the streams whose queue runs dry get their next chunk from ONE
  batched call; optional chunk alignment and temporal ensembling.

Adding a residual's correction to the base action is :func:`robot_rl.rl.residual.apply_residual`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from robot_rl.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, so that the policy client (which keeps its history and queue here) works
# without it.


def check_ensemble_decay(ensemble_decay) -> float | None:
    """A temporal-ensembling decay as a float (or None: no ensembling). Raises ConfigError unless finite and >= 0."""
    if ensemble_decay is None:
        return None
    if isinstance(ensemble_decay, bool) or not isinstance(ensemble_decay, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(ensemble_decay) and ensemble_decay >= 0):
        raise ConfigError("ensemble_decay", f"{ensemble_decay!r} is not a finite number >= 0",
                          "use e.g. 0.01 (ACT), or None to switch to the newest chunk")
    return float(ensemble_decay)


def ensemble_weights(n: int, decay: float) -> np.ndarray:
    """Temporal-ensembling weights of ``n`` predictions for one step, oldest first: ``exp(-decay * i)``, i = 0 for
    the oldest, normalized to sum 1 (ACT, Zhao et al. 2023, sec. 3.3), float64 (n,)."""
    w = np.exp(-decay * np.arange(n))
    return w / w.sum()


def _generator(seed: int) -> "torch.Generator":
    import torch

    return torch.Generator().manual_seed(seed)


class ActionQueue:
    """The predicted actions of one stream, indexed by control step.

    A chunk predicted for step ``s`` holds the actions for steps ``s, s + 1, ...`` (row i for step ``s + i``). Without
    ensembling (``ensemble_decay=None``) the newest chunk replaces the previous one and :meth:`action` is its row for
    the step (receding-horizon execution). With ``ensemble_decay`` m >= 0 every chunk that still covers a coming
    step is kept, and :meth:`action` is the weighted mean of all predictions for that step with weights
    :func:`ensemble_weights` (ACT's temporal ensembling; m = 0.01 in ACT; m = 0 is a plain mean).

    Args:
        ensemble_decay: m, or None. Raises ConfigError for a negative or non-finite m.

    Attributes:
        chunks: ``[(start step, rows float32 (n, A)), ...]``, oldest first (treat as read-only).
    """

    def __init__(self, ensemble_decay: float | None = None):
        self.decay = check_ensemble_decay(ensemble_decay)
        self.chunks: list[tuple[int, np.ndarray]] = []

    def clear(self) -> None:
        """Forget every queued action (the next step needs a new chunk)."""
        self.chunks = []

    def add(self, chunk, start: int, now: int | None = None) -> None:
        """Queue the rows of a chunk predicted for step ``start``: array-like (n, A), cast to float32 (copied).

        ``now``: the current step (default ``start``). Rows for steps before ``now`` are stale (a chunk that arrived
        late) and dropped; a chunk with no row left is ignored. Chunks that end before ``now`` are dropped.
        """
        rows = np.array(chunk, dtype=np.float32)
        now = start if now is None else now
        if now > start:
            rows, start = rows[now - start:], now
        if not len(rows):
            return
        if self.decay is None:
            self.chunks = [(start, rows)]
        else:
            self.chunks = [(s, c) for s, c in self.chunks if s + len(c) > now]
            self.chunks.append((start, rows))

    def remaining(self, step: int) -> int:
        """How many steps from ``step`` on (``step`` included) have a queued action, 0 when none: the queue's
        end (last covered step + 1) minus ``step``."""
        end = max((s + len(c) for s, c in self.chunks), default=step)
        return max(0, end - step)

    def covers(self, step: int) -> bool:
        """True when some chunk has a row for ``step``."""
        return any(s <= step < s + len(c) for s, c in self.chunks)

    def predictions(self, step: int) -> list[np.ndarray]:
        """Every queued prediction for ``step``, oldest chunk first: a list of float32 (A,) views."""
        return [c[step - s] for s, c in self.chunks if s <= step < s + len(c)]

    def action(self, step: int) -> np.ndarray:
        """The action for ``step``, float32 (A,) (a new array): the newest chunk's row, or the temporal ensemble.
        Raises KeyError when no chunk covers ``step``."""
        if self.decay is None and self.chunks:  # the common path (vector rollouts): one chunk
            s, c = self.chunks[-1]
            if s <= step < s + len(c):
                return c[step - s].copy()
        preds = self.predictions(step)
        if not preds:
            raise KeyError(f"no queued action for step {step}")
        if self.decay is None or len(preds) == 1:
            return preds[-1].copy()
        return np.tensordot(ensemble_weights(len(preds), self.decay), np.stack(preds), axes=1).astype(np.float32)

    def rows(self, step: int) -> np.ndarray:
        """The newest chunk's rows from ``step`` to its end, float32 (n, A) (a view; n = 0 when it does not cover
        ``step``)."""
        if not self.chunks:
            return np.zeros((0, 0), np.float32)
        s, c = self.chunks[-1]
        return c[step - s:] if s <= step < s + len(c) else c[:0]


class ChunkStream:
    """One stream of a chunking policy: its observation history, its :class:`ActionQueue` and its step clock.

    Args:
        n_obs_steps: To, the history length (frames kept).
        ensemble_decay: see :class:`ActionQueue` (None: newest chunk).
        seed: seeds the stream's own ``torch.Generator`` (``gen``) for its diffusion noise, so a stream's actions do
            not depend on which other streams share a batched call (the policy server's sessions). None: no own
            generator (:class:`ChunkExecutor` draws from one generator shared by its streams).

    Attributes:
        hist: deque of the last To frames ({key: array}), oldest first.
        queue: the stream's :class:`ActionQueue`.
        t: the control step whose action comes next (-1 before the first :meth:`reset`); the owner advances it.
        gen: the stream's generator or None.
    """

    def __init__(self, n_obs_steps: int, ensemble_decay: float | None = None, seed: int | None = None):
        if not (isinstance(n_obs_steps, (int, np.integer)) and n_obs_steps >= 1):
            raise ConfigError("n_obs_steps", f"{n_obs_steps!r} < 1", "use the policy's n_obs_steps (>= 1)")
        self.To = int(n_obs_steps)
        self.hist: deque = deque(maxlen=self.To)
        self.queue = ActionQueue(ensemble_decay)
        self.t = -1
        self.gen = _generator(seed) if seed is not None else None
        self._new = 0  # frames observed since the last new_frames()

    def reset(self, frames: Sequence[Mapping], step: int = 0, seed: int | None = None) -> None:
        """Start an episode at ``step``: the history becomes To copies of ``frames[0]`` followed by ``frames[1:]``
        (at least one frame; the last To count), the queue is emptied, and the stream's generator is re-seeded
        with ``seed`` (created when the stream had none) when given."""
        if not len(frames):
            raise ConfigError("frames", "empty", "reset with at least the episode's first observation")
        self.hist.clear()
        for _ in range(self.To):
            self.hist.append(frames[0])
        for f in frames[1:]:
            self.hist.append(f)
        self.queue.clear()
        self.t = step
        self._new = min(len(frames), self.To)
        if seed is not None:
            self.gen = _generator(seed)

    def observe(self, frame: Mapping) -> None:
        """Append the newest observation ({key: array}, one frame; stored as given, not copied)."""
        self.hist.append(frame)
        self._new = min(self._new + 1, self.To)

    @property
    def latest(self) -> Mapping:
        """The newest frame."""
        return self.hist[-1]

    def window(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The history stacked per key, {key: (To, ...)} (``keys``: default those of the newest frame)."""
        keys = list(self.hist[-1]) if keys is None else keys
        return {k: np.stack([f[k] for f in self.hist]) for k in keys}

    def new_frames(self) -> dict[str, np.ndarray]:
        """The frames observed since the previous call (or the reset), at most To, stacked {key: (F, ...)}; the
        count restarts. A client sends these with its next request (the server holds the rest of the history)."""
        n, self._new = self._new, 0
        frames = list(self.hist)[self.To - n:] if n else []
        return {k: np.stack([f[k] for f in frames]) for k in (frames[0] if frames else {})}

    def needs_chunk(self, threshold: int = 0) -> bool:
        """True when at most ``threshold`` queued actions remain from step ``t`` on."""
        return self.queue.remaining(self.t) <= threshold

    def action(self) -> np.ndarray:
        """The queued (or ensembled) action for step ``t``, float32 (A,). Raises KeyError when none is queued."""
        return self.queue.action(self.t)


def predict_chunks(policy, streams: Sequence[ChunkStream], keys: Sequence[str],
                   generator: torch.Generator | None = None) -> np.ndarray:
    """One batched ``policy.predict_chunk`` over the streams' histories: raw actions float32 (B, Ta, A), row j for
    ``streams[j]`` from its current step on.

    Noise (stochastic policies): with ``generator`` the policy draws the whole batch's initial noise from it (one
    draw of (B, T, A)); without, each stream draws its own (1, T, A) from its generator (``stream.gen``; the global
    RNG when it has none) and the stacked noise is passed as ``init_noise`` — so batching never changes a stream's
    actions, and a stream of one reproduces ``ChunkExecutor(policy, 1, seed)``'s draw exactly.
    Raises ConfigError (from the policy) for observations of the wrong keys or shapes.
    """
    import torch

    batch = {k: np.stack([np.stack([f[k] for f in s.hist]) for s in streams]) for k in keys}
    if generator is not None:
        return policy.predict_chunk(batch, generator=generator)
    noise = None
    cfg = policy.config
    if cfg.kind == "diffusion":
        noise = torch.cat([torch.randn((1, cfg.horizon, cfg.action_dim), generator=s.gen) for s in streams])
    return policy.predict_chunk(batch, init_noise=noise)


class ChunkExecutor:
    """Executes a chunking base policy in N envs (N :class:`ChunkStream` s, one shared noise generator).

    Per step: :meth:`actions` (or :meth:`peek` without consuming) gives every env's base action; the envs whose queue
    has at most ``threshold`` actions left get a new chunk, all of them from ONE batched ``predict_chunk`` call
    predicted from their current history; then :meth:`observe` appends the new observations, and :meth:`reset`
    starts new episodes.

    Args:
        policy: a :class:`~robot_rl.policies.base.BasePolicy` (``predict_chunk`` on raw obs (B, To, ...)).
        n_envs: number of envs.
        seed: seed of the torch generator used for diffusion sampling (reproducible rollouts).
        align_chunks: cut every chunk short so that it ends on a multiple of the action horizon Ta counted in
            :meth:`actions` calls. Only the first chunk after a mid-stream reset is ever cut; from then on that env
            asks for its next chunk on the same step as every other env, so one batched ``predict_chunk`` serves
            all N envs instead of N batch-1 calls spread over Ta steps (ResiP gets this for free from fixed-length
            episodes; ours end early on success or a missed place). On CPU a batch-8 call costs far less than 8
            batch-1 calls (docs/MEASUREMENTS.md; ``bench/bench_ppo.py``).
            Changes what the base does only in that first, shortened chunk (it re-plans sooner); keep it off
            where rollouts must equal single-env execution (evaluation, the policy server).
        ensemble_decay: temporal ensembling (see :class:`ActionQueue`); None (default): execute each chunk as is.
        threshold: ask for the next chunk once at most this many queued actions remain (0, default: when the queue
            is empty; ``Ta - 1``: every step, as ACT with temporal ensembling does). 0 with ``align_chunks``.

    Raises ConfigError for a threshold outside 0..Ta-1, alignment with a threshold, or a bad ``ensemble_decay``.

    Attributes: ``calls`` (predict_chunk calls so far), ``chunks`` (env chunks: the sum of their batch sizes),
    ``t`` (:meth:`actions` calls so far: the shared step clock), ``streams``.
    """

    def __init__(self, policy, n_envs: int, seed: int = 0, align_chunks: bool = False,
                 ensemble_decay: float | None = None, threshold: int = 0):
        self.policy = policy
        cfg = policy.config
        self.keys = list(cfg.obs_keys) + list(cfg.image_keys)
        self.To, self.Ta, self.n = cfg.n_obs_steps, cfg.n_action_steps, n_envs
        if not (isinstance(threshold, int) and 0 <= threshold < self.Ta):
            raise ConfigError("threshold", f"{threshold!r} not in 0..n_action_steps-1 = {self.Ta - 1}",
                              "use 0 (new chunk when the queue is empty) up to n_action_steps - 1 (every step)")
        if align_chunks and threshold:
            raise ConfigError("align_chunks", "chunk alignment needs threshold 0",
                              "use either align_chunks or a threshold (with temporal ensembling)")
        self.streams = [ChunkStream(self.To, ensemble_decay) for _ in range(n_envs)]
        self.gen = _generator(seed)
        self.align, self.threshold, self.t = align_chunks, threshold, 0
        self.calls = self.chunks = 0

    def reset(self, mask: np.ndarray, obs: dict) -> None:
        """Start an episode in the envs of ``mask`` (bool (N,)): empty their queues and fill their history with
        the first observation (``obs``: batched raw obs {key: (N, ...)})."""
        for i in np.flatnonzero(mask):
            self.streams[i].reset([{k: obs[k][i] for k in self.keys}])

    def observe(self, obs: dict, mask: np.ndarray | None = None) -> None:
        """Append the new observation of every env (or those in ``mask``)."""
        for i in range(self.n) if mask is None else np.flatnonzero(mask):
            self.streams[i].observe({k: obs[k][i] for k in self.keys})

    def drop_chunks(self, mask: np.ndarray | None = None) -> None:
        """Forget the queued actions of every env (or those in ``mask``): their next action comes from a new chunk
        predicted from the current history (e.g. after the robot held still, or to re-plan every step)."""
        for i in range(self.n) if mask is None else np.flatnonzero(mask):
            self.streams[i].queue.clear()

    def queued(self, i: int) -> np.ndarray:
        """Env ``i``'s queued base actions from its current step to the end of its newest chunk, float32 (n, A)."""
        s = self.streams[i]
        return s.queue.rows(s.t).copy()

    def peek(self) -> np.ndarray:
        """Next base action for every env, (N, A) raw float32, without consuming it. Queues with at most
        ``threshold`` actions left are refilled with one batched ``predict_chunk`` call over those envs."""
        self._refill(range(self.n), self.Ta - self.t % self.Ta if self.align else None)
        return np.stack([s.action() for s in self.streams])

    def _refill(self, envs, keep: int | None) -> None:
        """One batched ``predict_chunk`` for those of ``envs`` whose queue is (nearly) empty; their chunks are queued
        cut to ``keep`` actions (None: whole)."""
        need = [i for i in envs if self.streams[i].needs_chunk(self.threshold)]
        if need:
            chunks = predict_chunks(self.policy, [self.streams[i] for i in need], self.keys, self.gen)
            self.calls += 1
            self.chunks += len(need)
            for j, i in enumerate(need):
                s = self.streams[i]
                s.queue.add(chunks[j][:keep], s.t)

    def final_actions(self, mask: np.ndarray, obs: dict) -> np.ndarray:
        """The base action each env of ``mask`` (bool (N,)) would execute next at ``obs`` (batched raw obs, the
        final observation of an episode that just ended), (N, A) raw float32; rows outside ``mask`` are NaN.

        For bootstrapping a truncated episode in off-policy RL: the frame is appended to those envs' histories and
        their queued chunk is used (one batched ``predict_chunk`` for those whose queue is empty), so the action
        is what the base would have done had the episode gone on. Call :meth:`reset` on those envs afterwards."""
        out = np.full((self.n, self.policy.config.action_dim), np.nan, dtype=np.float32)
        idx = np.flatnonzero(mask)
        if not len(idx):
            return out
        self.observe(obs, mask)
        self._refill(idx, None)
        for i in idx:
            out[i] = self.streams[i].action()
        return out

    def actions(self) -> np.ndarray:
        """Next base action for every env, (N, A) raw float32 (consumed: every env's clock advances one step)."""
        a = self.peek()
        for s in self.streams:
            s.t += 1
        self.t += 1
        return a
