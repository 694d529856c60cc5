"""Replay for off-policy residual RL: n-step transitions in a circular buffer, online and demonstration sides.

A stored transition is ``(x, residual, reward, discount, next_x)``:

- ``x`` (F,) float32: residual features at t (:func:`robot_rl.rl.residual.residual_input`);
- ``residual`` (A,) float32: the residual that was executed, residual units, in [-1, 1];
- ``reward``: the n-step return ``sum_{k<m} gamma^k r_{t+k}`` over the ``m <= n`` steps up to the episode's end;
- ``discount``: ``gamma^m`` when the value of ``next_x`` is to be bootstrapped, 0 when the episode TERMINATED within
  those m steps. A time-limit truncation is not a terminal state: it is bootstrapped from the true final
  observation (Pardo et al. 2018, "Time Limits in Reinforcement Learning");
- ``next_x`` (F,): features of the observation at t + m.

The TD target is then ``reward + discount * Q'(next_x, pi'(next_x))`` with no further case analysis.

:class:`NStep` turns a stream of per-step transitions of N envs into these (Sutton & Barto, ch. 7; n = 3 in ResFiT,
Ankile et al. 2025). :class:`ReplayBuffer` is the circular storage (``capacity`` rows, oldest overwritten).
:func:`demo_buffer` fills one from a zarr store, relabelled with the frozen base's actions (RLPD's offline side,
Ball et al. 2023; HIL-SERL's intervention steps, Luo et al. 2024). :func:`sample_mixed` draws RLPD's symmetric
batch: half online, half demonstrations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robot_rl.errors import ConfigError

FIELDS = ("x", "residual", "reward", "discount", "next_x")


class ReplayBuffer:
    """Circular buffer of n-step transitions (see the module doc), preallocated float32 torch tensors.

    Args:
        capacity: rows; once full, the oldest row is overwritten.
        feature_dim: F, action_dim: A.

    Attributes: the :data:`FIELDS` tensors (``capacity`` rows), ``size`` (rows filled), ``ptr`` (next row to
    write), ``added`` (rows ever added).
    """

    def __init__(self, capacity: int, feature_dim: int, action_dim: int):
        if capacity < 1:
            raise ConfigError("td3.buffer_size", f"{capacity} < 1", "use a positive capacity, e.g. 1000000")
        self.capacity, self.feature_dim, self.action_dim = int(capacity), int(feature_dim), int(action_dim)
        self.x = torch.zeros(capacity, feature_dim)
        self.residual = torch.zeros(capacity, action_dim)
        self.reward = torch.zeros(capacity)
        self.discount = torch.zeros(capacity)
        self.next_x = torch.zeros(capacity, feature_dim)
        self.size = self.ptr = self.added = 0

    def __len__(self) -> int:
        return self.size

    def add(self, x, residual, reward, discount, next_x) -> None:
        """Append B rows: x (B, F), residual (B, A), reward (B,), discount (B,), next_x (B, F)."""
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, self.feature_dim)
        b = x.shape[0]
        if b == 0:
            return
        if b > self.capacity:  # only the newest capacity rows survive anyway
            return self.add(*(torch.as_tensor(v)[-self.capacity:] for v in (x, residual, reward, discount, next_x)))
        idx = (self.ptr + torch.arange(b)) % self.capacity
        self.x[idx] = x
        self.residual[idx] = torch.as_tensor(residual, dtype=torch.float32).reshape(b, self.action_dim)
        self.reward[idx] = torch.as_tensor(reward, dtype=torch.float32).reshape(b)
        self.discount[idx] = torch.as_tensor(discount, dtype=torch.float32).reshape(b)
        self.next_x[idx] = torch.as_tensor(next_x, dtype=torch.float32).reshape(b, self.feature_dim)
        self.ptr = int((self.ptr + b) % self.capacity)
        self.size = min(self.size + b, self.capacity)
        self.added += b

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``batch_size`` rows drawn uniformly with replacement, {field: (B, ...)}. Raises ConfigError when empty."""
        if self.size == 0:
            raise ConfigError("replay", "sampled while empty", "add transitions first (td3.learning_starts > 0)")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {k: getattr(self, k)[idx] for k in FIELDS}

    def state(self) -> dict[str, np.ndarray]:
        """The filled rows in insertion order (oldest first) as numpy arrays, for a checkpoint."""
        order = torch.arange(self.size) if self.size < self.capacity else \
            (self.ptr + torch.arange(self.capacity)) % self.capacity
        return {k: getattr(self, k)[order].numpy() for k in FIELDS} | {"added": np.array(self.added)}

    def load_state(self, state: dict) -> None:
        """Refill from :meth:`state` (a checkpoint); raises ConfigError for arrays of the wrong width."""
        self.size = self.ptr = 0
        try:
            self.add(*(state[k] for k in FIELDS))
        except (KeyError, RuntimeError, ValueError) as e:
            raise ConfigError("replay", f"the saved buffer does not fit this learner ({type(e).__name__}: {e})"[:300],
                              "resume with the same residual config, or start a new run") from None
        self.added = int(state.get("added", self.added))


class NStep:
    """n-step transitions from the per-step stream of N envs (each env's pending steps kept apart).

    :meth:`push` takes one step of every env and returns the transitions that became complete: an env's oldest
    pending step once it has ``n`` successors' rewards, and all of its pending steps when its episode ends
    (terminated: discount 0; truncated: bootstrapped from the final ``next_x``). Returned as a dict of
    :data:`FIELDS` (B, ...) tensors (B may be 0).
    """

    def __init__(self, n_envs: int, n: int, gamma: float):
        if n < 1:
            raise ConfigError("td3.n_step", f"{n} < 1", "use 1 (one-step TD) or more, e.g. 3")
        self.n, self.gamma = int(n), float(gamma)
        self.pending: list[list[tuple]] = [[] for _ in range(n_envs)]

    def push(self, x, residual, reward, terminated, truncated, next_x, slots=None,
             flags=None) -> dict[str, torch.Tensor]:
        """One step of B envs: x (B, F), residual (B, A), reward (B,), terminated / truncated (B,) bool,
        next_x (B, F). ``slots`` (B ints): the window of each row (rows of one window in step order); default all
        N windows, row i -> window i. ``flags`` (B,) small ints (or bool), optional: carried with each step;
        afterwards ``emitted_flags`` (int8 array) holds the flag of the first step of each returned transition (e.g.
        "a human drove it"). Raises ConfigError for a slot outside 0..N-1."""
        out = []
        slots = range(len(self.pending)) if slots is None else slots
        for i, j in enumerate(slots):
            if not 0 <= j < len(self.pending):
                raise ConfigError("slot", f"{j} outside 0..{len(self.pending) - 1}", "use one window per env/session")
            pend = self.pending[j]
            pend.append((x[i], residual[i], float(reward[i]), int(flags[i]) if flags is not None else 0))
            if bool(terminated[i]) or bool(truncated[i]):
                while pend:
                    out.append(self._emit(pend, next_x[i], bool(terminated[i])))
                    pend.pop(0)
            elif len(pend) == self.n:
                out.append(self._emit(pend, next_x[i], False))
                pend.pop(0)
        self.emitted_flags = np.array([f for *_, f in out], dtype=np.int8)
        return stack([row for *row, _ in out], x.shape[-1], residual.shape[-1])

    def _emit(self, pend: list, next_x, terminal: bool) -> tuple:
        ret = sum(self.gamma ** k * r for k, (_, _, r, _) in enumerate(pend))
        disc = 0.0 if terminal else self.gamma ** len(pend)
        return pend[0][0], pend[0][1], ret, disc, next_x, pend[0][3]

    def clear(self, slots=None) -> None:
        """Drop the pending steps of ``slots`` (default every window), e.g. of an actor that died mid-episode."""
        for j in range(len(self.pending)) if slots is None else slots:
            self.pending[j].clear()


def stack(rows: list[tuple], feature_dim: int, action_dim: int) -> dict[str, torch.Tensor]:
    """A list of (x, residual, reward, discount, next_x) tuples as {field: (B, ...)} float32 tensors."""
    if not rows:
        return {"x": torch.zeros(0, feature_dim), "residual": torch.zeros(0, action_dim), "reward": torch.zeros(0),
                "discount": torch.zeros(0), "next_x": torch.zeros(0, feature_dim)}
    cols = list(zip(*rows))
    return {"x": torch.stack([torch.as_tensor(v) for v in cols[0]]).float(),
            "residual": torch.stack([torch.as_tensor(v) for v in cols[1]]).float(),
            "reward": torch.tensor(cols[2], dtype=torch.float32), "discount": torch.tensor(cols[3], dtype=torch.float32),
            "next_x": torch.stack([torch.as_tensor(v) for v in cols[4]]).float()}


def sample_mixed(online: ReplayBuffer, demos: ReplayBuffer | None, batch_size: int, demo_ratio: float,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """RLPD's symmetric sampling (Ball et al. 2023): ``round(batch_size * demo_ratio)`` rows from ``demos`` and the
    rest from ``online``, concatenated (demo rows first). Without demos (None or empty) the whole batch is online."""
    n_demo = int(round(batch_size * demo_ratio)) if demos is not None and len(demos) else 0
    if n_demo == 0:
        return online.sample(batch_size, generator)
    if len(online) == 0 or n_demo >= batch_size:
        return demos.sample(batch_size, generator)
    a, b = demos.sample(n_demo, generator), online.sample(batch_size - n_demo, generator)
    return {k: torch.cat([a[k], b[k]]) for k in FIELDS}


# ------------------------------------------------------------------------------------------------ demonstrations
DEMO_SOURCES = ("scripted", "teleop", "intervention")  # whole episodes of these sources join the demo side


def relabel_base_actions(base, obs: dict, lengths: list[int], seed: int = 0) -> np.ndarray:
    """The frozen base's action at every step of recorded episodes, as it would be executed there.

    ``obs``: {key: (sum(lengths), ...)} raw observations of the episodes, concatenated; the base runs one
    :class:`~robot_rl.policies.execution.ChunkExecutor` stream per episode over the recorded observations (chunks
    of Ta, history of To, exactly as in a rollout; diffusion noise from ``seed``). Returns raw base actions
    (sum(lengths), A) float32.
    """
    from robot_rl.policies.execution import ChunkExecutor

    keys = list(base.config.obs_keys) + list(base.config.image_keys)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    ex = ChunkExecutor(base, len(lengths), seed=seed)
    out = np.zeros((int(sum(lengths)), base.config.action_dim), np.float32)

    def frame(t: int) -> dict:  # step t of every episode (the last one repeated past an episode's end)
        rows = starts + np.minimum(t, np.asarray(lengths) - 1)
        return {k: np.asarray(obs[k][rows]) for k in keys}

    ex.reset(np.ones(len(lengths), bool), frame(0))
    for t in range(max(lengths)):
        a = ex.actions()
        live = np.flatnonzero(t < np.asarray(lengths))
        out[starts[live] + t] = a[live]
        ex.observe(frame(t + 1))
    return out


def reaches(policy, base_n: torch.Tensor, residual: torch.Tensor, executed_n: torch.Tensor) -> np.ndarray:
    """(B,) bool: ``policy.combine(base_n, residual)`` gives the executed action (normalized, (B, A)) within 1e-3 in
    every dimension, i.e. the residual label is what was executed, not a clipped stand-in for an action beyond
    base +- alpha (demo steps and a human's interventions; such steps are kept out of the replay)."""
    return ((policy.combine(base_n, residual) - executed_n).abs() <= 1e-3).all(-1).numpy()


def demo_buffer(store_path: str | Path, base, policy, *, n_step: int, gamma: float, task: str, max_steps: int,
                tolerance: float | None = None, intervention_penalty: float = 0.0,
                use_interventions: bool = True, max_episodes: int | None = None, seed: int = 0,
                capacity: int | None = None) -> tuple[ReplayBuffer, dict]:
    """The demonstration side of the replay, from a zarr store (:mod:`robot_rl.datasets.store`).

    Which steps: every step of episodes whose source is in :data:`DEMO_SOURCES`, and (``use_interventions``) the
    intervention steps (``intervention`` flag) of ``policy`` episodes, whose executed action is the human's
    (``human_action`` where stored, else ``action``) — HIL-SERL (Luo et al. 2024) puts these on the demo side.

    Relabelling: the frozen ``base`` is run over each episode's recorded observations
    (:func:`relabel_base_actions`); the residual label is ``(action_n - base_n) / alpha`` clipped to [-1, 1]
    (normalized actions, ``alpha = policy.config.scale``, per action dimension). A step whose demonstrated action
    the residual cannot reach (``combine(base, label)`` differs from it by more than 1e-3 in some dimension) is not
    stored: its clipped label was never executed, and crediting it with the demo's return teaches the critic that
    saturated residuals pay (with noisy scripted demos and alpha 0.1 that made TD3 collapse; docs/MEASUREMENTS.md).
    Features are built by ``policy.features`` with that base action (the next step's for ``next_x``).

    Rewards: the task's sparse reward, 1 on the last step of an episode the store marks successful, 0 elsewhere.
    The store's success flag is taken as the training task's: an episode recorded under other task settings
    (``extra.task_kwargs``, written by ``robot-rl collect``) whose ``tolerance`` differs from ``tolerance`` (the
    training task's, m; None: not checked) raises ConfigError (collect the demos with ``collect.nominal_task=false``). RLIF (Luo et al. 2023): with
    ``intervention_penalty`` > 0 the policy step right before an intervention starts gets ``-penalty``.

    Episode ends: the last step is terminal when the episode succeeded or ended before ``max_steps`` (the training
    task's limit); otherwise (a time-limit truncation, whose final observation a store does not keep) the last step is
    dropped and the one before it bootstraps from the last recorded observation.

    Returns (buffer, stats {episodes, transitions, intervention_steps, successes, unreachable}). Raises ConfigError for a
    missing / damaged store or a store without episodes of the task.
    """
    from robot_rl.datasets.store import ZarrStore

    st = ZarrStore.open(store_path)
    limit = int(max_steps)
    metas = st.episodes_meta()
    picks = []
    for i, m in enumerate(metas):
        if m["task"] != task:
            continue
        if m["source"] in DEMO_SOURCES or (use_interventions and m["source"] == "policy"):
            picks.append(i)
    if max_episodes is not None:
        picks = picks[:max_episodes]
    if not picks:
        raise ConfigError("demos", f"{store_path} holds no {task!r} episodes of sources {list(DEMO_SOURCES)}",
                          "collect demonstrations first (robot-rl collect), or set td3.demo_ratio=0")
    for i in picks:
        rec = (metas[i].get("extra") or {}).get("task_kwargs")
        if rec and "tolerance" in rec and tolerance is not None and float(rec["tolerance"]) != float(tolerance):
            raise ConfigError("demos", f"episode {i} of {store_path} was recorded at tolerance {rec['tolerance']} m, "
                              f"training runs at {tolerance} m: its success flag is not this task's reward",
                              "collect the demos at the training task (--set collect.nominal_task=false)")
    bc, rc = base.config, policy.config
    keys = sorted(set(bc.obs_keys) | set(bc.image_keys) | set(rc.obs_keys) | set(rc.fine_keys or {}))
    eps = [st.get_episode(i, keys=[*keys, "action", "intervention"]
                          + (["human_action"] if "human_action" in st.keys else [])) for i in picks]
    lengths = [len(e["action"]) for e in eps]
    cat = {k: np.concatenate([e[k] for e in eps]) for k in keys}
    base_raw = relabel_base_actions(base, cat, lengths, seed=seed)
    norm = base.normalizer
    with torch.no_grad():
        base_n = norm.normalize("action", torch.as_tensor(base_raw))
        executed = np.concatenate([_executed(e) for e in eps])
        act_n = norm.normalize("action", torch.as_tensor(executed, dtype=torch.float32))
        label = ((act_n - base_n) / torch.as_tensor(rc.scale)).clamp(-1.0, 1.0)
        reachable = reaches(policy, base_n, label, act_n)
        x_all = policy.features(norm, cat, base_n)
    buf = ReplayBuffer(capacity or max(1, int(sum(lengths))), rc.in_dim, rc.action_dim)
    nstep = NStep(1, n_step, gamma)
    stats = {"episodes": len(picks), "transitions": 0, "intervention_steps": 0, "successes": 0, "unreachable": 0}
    start = 0
    for i, e in zip(picks, eps):
        T, m = len(e["action"]), metas[i]
        success = bool(m["success"])
        terminal = success or T < limit
        inter = np.asarray(e["intervention"], bool)
        keep = (np.ones(T, bool) if m["source"] in DEMO_SOURCES else inter).copy()
        stats["unreachable"] += int((keep & ~reachable[start:start + T]).sum())
        keep &= reachable[start:start + T]
        reward = np.zeros(T, np.float32)
        if success:
            reward[-1] = 1.0
        if intervention_penalty > 0:
            starts_ = np.flatnonzero(inter[1:] & ~inter[:-1])  # step before each intervention begins
            reward[starts_] -= intervention_penalty
        stats["intervention_steps"] += int(inter.sum())
        stats["successes"] += int(success)
        last = T if terminal else T - 1  # a truncated episode's last step has no recorded next observation
        pushed = []
        for t in range(last):
            end_term = terminal and t == T - 1
            end_trunc = not terminal and t == T - 2
            nx = x_all[start + t] if end_term else x_all[start + t + 1]
            pushed.append(nstep.push(x_all[start + t][None], label[start + t][None], reward[t:t + 1],
                                     np.array([end_term]), np.array([end_trunc]), nx[None]))
        nstep.clear()
        start += T
        if not pushed:
            continue
        # one env: the windows come out in order of their start step; keep those that start at a kept step
        emitted = {k: torch.cat([p[k] for p in pushed]) for k in FIELDS}
        sel = torch.as_tensor(keep[:last])
        buf.add(*(emitted[k][sel] for k in FIELDS))
        stats["transitions"] += int(sel.sum())
    return buf, stats


def _executed(ep: dict) -> np.ndarray:
    """The executed action of every step: the human's where an intervention stored one, else ``action``."""
    a = np.asarray(ep["action"], np.float32)
    if "human_action" in ep:
        h = np.asarray(ep["human_action"], np.float32)
        use = np.asarray(ep["intervention"], bool) & np.isfinite(h).all(-1)
        a = np.where(use[:, None], h, a)
    return a
