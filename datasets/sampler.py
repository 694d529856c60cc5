"""Training windows over a :class:`~robot_rl.datasets.store.ZarrStore` (diffusion_policy convention).

For step ``t`` of an episode of length ``L`` the window covers steps ``t-To+1 ... t-To+T`` (``T`` = horizon,
``To`` = n_obs_steps): the last observed frame is ``t`` and the first action is the one taken at ``t-To+1``.
Indices outside ``[0, L-1]`` are edge-padded with that episode's first/last frame, so a window never reads another
episode. Observation keys return the first ``To`` frames, every other key (``action``, ``intervention``...) all ``T``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from robot_rl.errors import ConfigError
from robot_rl.datasets.store import ZarrStore, is_image


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _episode_indices(store: ZarrStore, episode_indices) -> np.ndarray:
    """Episode indices as int64, each in 0..n_episodes-1 (all episodes when None). Raises ConfigError."""
    if episode_indices is None:
        eps = np.arange(store.n_episodes)
    else:
        eps = np.asarray(episode_indices)
        if eps.ndim != 1 or (eps.size and eps.dtype.kind not in "iu"):
            raise ConfigError("episode_indices", f"{episode_indices!r} is not a list of integer episode indices",
                              "pass e.g. [0, 1, 2] (see split_episodes)")
        eps = eps.astype(np.int64)
    if eps.size == 0 or eps.min() < 0 or eps.max() >= store.n_episodes:
        raise ConfigError("episode_indices", f"need >= 1 episode in 0..{store.n_episodes - 1}, got {eps.tolist()}",
                          "collect episodes first or fix the split")
    return eps


class SequenceSampler:
    """Random access to fixed-length windows, one per step of the selected episodes.

    Args:
        store: an open store.
        keys: data keys to return (must include every obs key); e.g. ``["joint_pos", "image_front", "action"]``.
        obs_keys: keys cut to the first ``n_obs_steps`` frames of the window.
        horizon: T >= 1, window length.
        n_obs_steps: To, 1 <= To <= T.
        episode_indices: episodes to draw from (default: all committed).
        cache_images: load image keys into memory (None: only if they total <= ``cache_limit_bytes``).
            Low-dim keys are always loaded once; uncached images are read from zarr per window (one read per key).

    ``sampler[i]`` returns ``{key: np.ndarray}`` with shape ``(To, *shape)`` for obs keys and ``(T, *shape)`` for the
    others, in the store dtype. ``len(sampler)`` = total steps of the selected episodes.

    Raises:
        ConfigError: unknown key, obs key not in keys, bad horizon/n_obs_steps, empty or out-of-range episodes.
    """

    def __init__(self, store: ZarrStore, keys: Sequence[str], obs_keys: Sequence[str], horizon: int,
                 n_obs_steps: int, episode_indices: Sequence[int] | None = None, *,
                 cache_images: bool | None = None, cache_limit_bytes: int = 1 << 30):
        keys, obs_keys = list(keys), list(obs_keys)
        for k in keys:
            if k not in store.schema:
                raise ConfigError("keys", f"{k!r} is not in the store", f"use keys from {store.keys}")
        if not set(obs_keys) <= set(keys):
            raise ConfigError("obs_keys", f"{sorted(set(obs_keys) - set(keys))} not in keys", "add them to keys")
        if not (_is_int(horizon) and horizon >= 1):
            raise ConfigError("horizon", f"must be an int >= 1, got {horizon!r}", "set horizon to e.g. 16")
        if not (_is_int(n_obs_steps) and 1 <= n_obs_steps <= horizon):
            raise ConfigError("n_obs_steps", f"must be an int in 1..horizon={horizon}, got {n_obs_steps!r}",
                              "set n_obs_steps to e.g. 2")
        horizon, n_obs_steps = int(horizon), int(n_obs_steps)
        eps = _episode_indices(store, episode_indices)
        self.keys, self.obs_keys, self.horizon, self.n_obs_steps = keys, obs_keys, horizon, n_obs_steps
        self.episode_indices = eps
        ends = store.episode_ends
        starts, lengths = np.where(eps > 0, ends[eps - 1], 0), ends[eps] - np.where(eps > 0, ends[eps - 1], 0)
        # per sample: global start of its episode, episode length, step within the episode
        self._start = np.repeat(starts, lengths)
        self._len = np.repeat(lengths, lengths)
        self._t = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        images = [k for k in keys if is_image(np.dtype(store.schema[k]["dtype"]), store.schema[k]["shape"])]
        if cache_images is None:
            cache_images = sum(int(np.prod(store[k].shape)) for k in images) <= cache_limit_bytes
        self.image_keys = images
        self._arrays = {k: store[k] if k in images and not cache_images else store[k][:] for k in keys}
        self._offsets = np.arange(horizon) - n_obs_steps + 1

    def __len__(self) -> int:
        return len(self._t)

    def indices(self, i: int) -> np.ndarray:
        """Global store steps (int64 (T,)) of window ``i``, edge-padded inside its episode."""
        return self._start[i] + np.clip(self._t[i] + self._offsets, 0, self._len[i] - 1)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)}")
        idx = self.indices(int(i) % len(self))
        out = {}
        for k in self.keys:
            sel = idx[: self.n_obs_steps] if k in self.obs_keys else idx
            out[k] = np.asarray(self._arrays[k][sel])  # uncached images: one contiguous zarr read
        return out


def split_episodes(n_episodes: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle episode indices with ``seed`` and split them: ``round(n * val_ratio)`` go to validation, but at least
    one episode stays in training. Returns sorted int64 arrays ``(train_idx, val_idx)``; deterministic in ``seed``.

    Raises:
        ConfigError: ``n_episodes`` < 1 or ``val_ratio`` outside [0, 1).
    """
    if not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise ConfigError("n_episodes", f"need >= 1 episode, got {n_episodes!r}", "collect demonstrations first")
    if not (isinstance(val_ratio, (int, float, np.floating)) and 0.0 <= val_ratio < 1.0):
        raise ConfigError("val_ratio", f"must be in [0, 1), got {val_ratio!r}", "use e.g. 0.1")
    perm = np.random.default_rng(seed).permutation(int(n_episodes))
    n_val = min(int(round(n_episodes * val_ratio)), int(n_episodes) - 1)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def compute_normalization(store: ZarrStore, keys: Sequence[str],
                          episode_indices: Sequence[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-dimension statistics of each numeric key over the steps of the selected episodes.

    Returns ``{key: {"min", "max", "mean", "std"}}``, each a float32 array of the per-step shape (``std`` is the
    population std). uint8 (image) and bool keys are skipped. NaN entries (e.g. ``human_action`` outside
    interventions) are ignored; a dimension with no finite value gets NaN stats.

    Raises:
        ConfigError: unknown key or bad episode indices.
    """
    eps = _episode_indices(store, episode_indices)
    stats = {}
    for k in keys:
        if k not in store.schema:
            raise ConfigError("keys", f"{k!r} is not in the store", f"use keys from {store.keys}")
        dt = np.dtype(store.schema[k]["dtype"])
        if dt == np.uint8 or dt.kind == "b":
            continue
        full = store[k][:]
        x = np.concatenate([full[store.episode_slice(int(e))] for e in eps]).astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN dimensions
            s = {"min": np.nanmin(x, 0), "max": np.nanmax(x, 0), "mean": np.nanmean(x, 0), "std": np.nanstd(x, 0)}
        stats[k] = {n: v.astype(np.float32) for n, v in s.items()}
    return stats


class WindowDataset(torch.utils.data.Dataset):
    """``torch`` view of a :class:`SequenceSampler`: ``{key: tensor}``, uint8 image keys stay uint8 (To, H, W, C),
    everything else becomes float32. Works with ``DataLoader`` (any ``num_workers``; zarr resets its IO loop on fork)."""

    def __init__(self, sampler: SequenceSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) if v.dtype == np.uint8 else torch.from_numpy(v.astype(np.float32))
                for k, v in self.sampler[i].items()}
