"""The one episode writer: per-step (observation, action) rows -> one committed episode of a :class:`ZarrStore`.

Scripted collection (:mod:`robot_rl.stages.collect`), ``robot-rl eval --record``
(:func:`robot_rl.stages.evaluation.evaluate`) and the ROS 2 recorder (:mod:`robot_rl.ros.recorder`) all build their
episodes with :class:`EpisodeWriter`, so what a store holds does not depend on where an episode came from.

What is stored, per step t (decided here and nowhere else):

- every observation key (or the writer's ``obs_keys``) of o_t, the observation the action acts on (the standard
  (o_t, a_t) pairing): floating arrays as float32, uint8 images ``(H, W, 3)`` and other integer / bool arrays
  unchanged;
- ``action`` float32 (A,): a_t, what was sent to the env / robot;
- ``intervention`` bool: a human took over at this step (False unless given);
- ``human_action`` float32 (A,): the human's command, NaN where there was none; stored when the writer was made
  with ``human_action=True`` or any step gave one;
- optional per-step fields (``reward`` and any other name passed to :meth:`EpisodeWriter.add`): floating as
  float32, others unchanged; a field given at the first step must be given at every step.

Per-episode metadata (seed, task, source, success, backend, robot, extra) is passed to :meth:`EpisodeWriter.commit`,
which appends the episode atomically with :meth:`ZarrStore.add_episode` (the store format is the store's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError

RESERVED = ("action", "intervention", "human_action")


def stored_dtype(value: np.ndarray) -> np.ndarray:
    """A per-step value as it is stored: floating -> float32 (a copy), anything else unchanged (a copy)."""
    a = np.asarray(value)
    return a.astype(np.float32) if a.dtype.kind == "f" else a.copy()


class EpisodeWriter:
    """Accumulates one episode step by step, then commits it to a store.

    Args:
        obs_keys: observation keys to store (None: every key of the first step's observation; later steps must
            have the same keys).
        human_action: always store a ``human_action`` column (NaN rows where none was given), e.g. for a recorder
            whose store holds interventions.

    Raises ConfigError (naming the key) from :meth:`add` for a missing or unexpected key, a shape that changes from
    one step to the next, a non-numeric value, or a field given at some steps only.
    """

    def __init__(self, obs_keys: Sequence[str] | None = None, human_action: bool = False):
        self.obs_keys = list(obs_keys) if obs_keys is not None else None
        self._all_keys = obs_keys is None  # every step must have exactly the first step's keys
        self.human_action = bool(human_action)
        self.clear()

    def clear(self) -> None:
        """Drop every step (start a new episode)."""
        self.steps: dict[str, list[np.ndarray]] = {}
        self._fields: list[str] = []
        self._shapes: dict[str, tuple] = {}
        self._human: list = []
        self._n = 0

    def __len__(self) -> int:
        """Number of steps added."""
        return self._n

    @property
    def intervened(self) -> bool:
        """True when some step was flagged as a human intervention."""
        return bool(np.any(self.steps.get("intervention", [])))

    def _row(self, key: str, value, where: str) -> np.ndarray:
        """``value`` in its stored dtype, checked against the key's shape at earlier steps."""
        try:
            a = stored_dtype(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(where, f"not an array ({str(e).splitlines()[0]})", "pass numeric arrays") from None
        if a.dtype.kind not in "biuf":
            raise ConfigError(where, f"dtype {a.dtype} is not numeric", "pass numeric arrays")
        want = self._shapes.get(key, a.shape)
        if a.shape != want:
            raise ConfigError(where, f"shape {a.shape} at step {self._n}, {want} before",
                              "keep every key's shape fixed within an episode")
        return a

    def add(self, obs: Mapping, action, *, intervention: bool = False, human_action=None, reward=None,
            **fields) -> None:
        """Append step t: ``obs`` {key: array} (o_t; arrays are copied), ``action`` (A,) a_t, the ``intervention``
        flag, the human's command ``human_action`` (A,) or None, an optional ``reward`` (a float) and other
        optional per-step ``fields`` ({name: array})."""
        if not isinstance(obs, Mapping):
            raise ConfigError("obs", f"expected a dict of arrays, got {type(obs).__name__}", "pass {key: array}")
        if self.obs_keys is None:  # the first step fixes the keys
            self.obs_keys = list(obs)
        keys = self.obs_keys
        missing = [k for k in keys if k not in obs]
        unexpected = sorted(set(obs) - set(keys)) if self._all_keys else []
        if missing or unexpected:
            raise ConfigError("obs", f"step {self._n}: missing keys {missing}, unexpected keys {unexpected}",
                              f"pass the same observation keys at every step ({keys})")
        given = {"reward": reward, **fields} if reward is not None else dict(fields)
        for k in (*keys, *given):
            if k in RESERVED or (k in given and k in keys):
                raise ConfigError(f"obs[{k!r}]" if k in keys else f"fields[{k!r}]",
                                  "clashes with an observation key or a reserved key",
                                  f"rename it (reserved: {list(RESERVED)})")
        if self._n == 0:
            self._fields = sorted(given)
        elif sorted(given) != self._fields:
            raise ConfigError("fields", f"step {self._n} gives {sorted(given)}, the first step gave {self._fields}",
                              "give every optional field at every step")
        row = {k: self._row(k, obs[k], f"obs[{k!r}]") for k in keys}  # all checked before anything is kept
        row["action"] = self._row("action", np.asarray(action, dtype=np.float32), "action")
        row.update({k: self._row(k, given[k], f"fields[{k!r}]") for k in self._fields})
        row["intervention"] = np.bool_(bool(intervention))
        human = None
        if human_action is not None:
            human = np.array(human_action, dtype=np.float32)
            if human.shape != row["action"].shape:
                raise ConfigError("human_action", f"shape {human.shape} != the action's {row['action'].shape}",
                                  "give the human command in the action space")
        for k, v in row.items():
            self._shapes.setdefault(k, v.shape)
            self.steps.setdefault(k, []).append(v)
        self._human.append(human)
        self._n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The episode as ``{key: (T, ...)}`` arrays in their stored dtypes (what :meth:`commit` writes)."""
        if not self._n:
            raise ConfigError("episode", "no steps", "add at least one step before committing")
        out = {k: np.stack(v) for k, v in self.steps.items()}
        if self.human_action or any(h is not None for h in self._human):
            nan = np.full(out["action"].shape[1:], np.nan, np.float32)
            out["human_action"] = np.stack([nan if h is None else h for h in self._human])
        return out

    def commit(self, store: ZarrStore, *, seed: int, task: str, source: str, success: bool, backend: str,
               robot: str = "panda", extra: dict | None = None) -> int:
        """Append the episode to ``store`` (open for appending) with its metadata (see
        :meth:`ZarrStore.add_episode`), clear the writer and return the episode's index. Raises ConfigError when
        the episode does not fit the store's schema or the metadata is bad (nothing is written then, and the
        steps are kept)."""
        idx = store.add_episode(self.arrays(), seed=int(seed), task=task, source=source, success=bool(success),
                                backend=backend, robot=robot, extra=extra)
        self.clear()
        return idx
