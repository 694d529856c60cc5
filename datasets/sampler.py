"""Training windows over a :class:`~robot_rl.datasets.store.ZarrStore` (diffusion_policy convention).

A window is ``T`` (= horizon) consecutive steps ``s ... s+T-1`` of one episode of length ``L``; indices outside
``[0, L-1]`` are edge-padded with that episode's first/last frame, so a window never reads another episode.
Observation keys return the first ``To`` (= n_obs_steps) frames, every other key (``action``, ``intervention``...)
all ``T``. The window start ``s`` runs over ``-pad_before ... L - T + pad_after``, exactly as diffusion_policy's
``create_indices`` (``diffusion_policy/common/sampler.py``), so an episode gives ``max(0, L - T + pad_before +
pad_after + 1)`` windows. The defaults, ``pad_before = To - 1`` and ``pad_after = T - To``, give one window per step
``t`` (the last observed frame, ``s = t - To + 1``): ``L`` windows per episode, the last ones holding up to
``T - To`` padded copies of the final action. diffusion_policy's training configs use ``pad_before = To - 1`` and
``pad_after = Ta - 1`` (Ta = n_action_steps): no window then pads more than ``Ta - 1`` steps after an episode's end.

Data: low-dim keys are loaded once, decoded. Camera frames are held in memory as the store encodes them
(``cache_images``; a fraction of their decoded size) and decoded per window, or read per window from their chunk or
shard files (:meth:`ZarrStore.frames`: one ``pread`` per frame). :meth:`SequenceSampler.batch` fetches many windows
at once (what a DataLoader with a batch size calls, through :meth:`WindowDataset.__getitems__`).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from robot_rl.errors import ConfigError
from robot_rl.datasets.store import ZarrStore, is_image
from robot_rl.datasets.zarrio import FrameCache, FrameReader


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
    """Random access to fixed-length windows of the selected episodes (see the module doc for the window rule).

    Args:
        store: an open store.
        keys: data keys to return (must include every obs key); e.g. ``["joint_pos", "image_front", "action"]``.
        obs_keys: keys cut to the first ``n_obs_steps`` frames of the window.
        horizon: T >= 1, window length.
        n_obs_steps: To, 1 <= To <= T.
        episode_indices: episodes to draw from (default: all committed).
        pad_before: int in 0..T-1, how many steps a window may start before its episode (edge-padded);
            default ``To - 1`` (diffusion_policy's ``pad_before``, which its configs set to ``To - 1`` too).
        pad_after: int in 0..T-1, how many steps a window may reach past its episode's end (edge-padded with the
            last frame); default ``T - To`` (one window per step). diffusion_policy's ``pad_after``, usually
            ``Ta - 1``. Unlike diffusion_policy, a value outside 0..T-1 is an error (it clamps silently).
        key_first_k: ``{key: k}``, 1 <= k <= T: only the first ``k`` frames of the window are read and returned for
            these keys, shape ``(k, *shape)`` (for an obs key this replaces ``To``). diffusion_policy reads the
            same ``k`` frames but returns ``(T, *shape)`` with the frames past ``k`` left NaN ("should never be
            used"; its datasets then keep ``[:To]``); here the unread frames are simply not returned, which also
            works for uint8 and bool keys, where NaN does not exist.
        float_images: return image keys (uint8 (H, W, C) in the store) as float32 ``(n, C, H, W)`` in [0, 1]
            (value / 255) instead of uint8 ``(n, H, W, C)``. The in-memory cache stays as stored.
        cache_images: hold image keys in memory (None: only if their files total <= ``cache_limit_bytes``). The
            frames are held as the store encodes them (compressed: the size of the store's frames, see ``nbytes``)
            and decoded per window, in the process that indexes the sampler (DataLoader workers included).
            Uncached frames are read from their chunk or shard files per window (one read per frame,
            :meth:`ZarrStore.frames`); an image array in a layout that reader does not handle is read through zarr
            (and cached decoded). Low-dim keys are always loaded once, decoded.

    ``sampler[i]`` returns ``{key: np.ndarray}``, ``(n, *shape)`` in the store dtype with ``n`` = ``k`` for
    ``key_first_k`` keys, ``To`` for the other obs keys and ``T`` for the rest (image keys: see ``float_images``).
    ``len(sampler)`` = sum over the selected episodes of ``max(0, L - T + pad_before + pad_after + 1)`` (= their
    total steps with the default padding).

    Raises:
        ConfigError: unknown key, obs key not in keys, bad horizon/n_obs_steps/pad_before/pad_after/key_first_k/
            float_images, empty or out-of-range episodes, or no window at all (every episode too short for the
            padding).
    """

    def __init__(self, store: ZarrStore, keys: Sequence[str], obs_keys: Sequence[str], horizon: int,
                 n_obs_steps: int, episode_indices: Sequence[int] | None = None, *, pad_before: int | None = None,
                 pad_after: int | None = None, key_first_k: Mapping[str, int] | None = None,
                 float_images: bool = False, cache_images: bool | None = None, cache_limit_bytes: int = 1 << 30):
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
        T, To = int(horizon), int(n_obs_steps)
        pad_before = _padding("pad_before", pad_before, To - 1, T)
        pad_after = _padding("pad_after", pad_after, T - To, T)
        frames = {k: To for k in obs_keys}
        for k, n in dict(key_first_k or {}).items():
            if k not in keys:
                raise ConfigError("key_first_k", f"{k!r} is not one of the sampled keys {keys}", "add it to keys")
            if not (_is_int(n) and 1 <= n <= T):
                raise ConfigError("key_first_k", f"{k!r}: k must be an int in 1..horizon={T}, got {n!r}",
                                  f"use e.g. {{{k!r}: {To}}} (n_obs_steps)")
            frames[k] = int(n)
        if not isinstance(float_images, (bool, np.bool_)):
            raise ConfigError("float_images", f"expected a bool, got {float_images!r}", "pass True or False")
        eps = _episode_indices(store, episode_indices)
        self.keys, self.obs_keys, self.horizon, self.n_obs_steps = keys, obs_keys, T, To
        self.pad_before, self.pad_after, self.float_images = pad_before, pad_after, bool(float_images)
        self.frames = {k: frames.get(k, T) for k in keys}  # frames returned per key
        self.episode_indices = eps
        ends = store.episode_ends
        starts = np.where(eps > 0, ends[eps - 1], 0)
        lengths = ends[eps] - starts
        counts = np.maximum(lengths - T + pad_before + pad_after + 1, 0)  # diffusion_policy's create_indices
        if counts.sum() == 0:
            raise ConfigError("pad_after", f"no window fits: each of the {len(eps)} episodes is shorter than horizon "
                              f"- pad_before - pad_after = {T - pad_before - pad_after} steps (longest: "
                              f"{int(lengths.max())})", "raise pad_after / pad_before, lower horizon or select "
                              "longer episodes")
        # per window: global start of its episode, episode length, first step of the window within the episode
        self._start = np.repeat(starts, counts)
        self._len = np.repeat(lengths, counts)
        self._s = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) - pad_before
        images = [k for k in keys if is_image(np.dtype(store.schema[k]["dtype"]), store.schema[k]["shape"])]
        readers = {k: store.frames(k) for k in images}
        if cache_images is None:
            cache_images = sum(r.encoded_nbytes() if r is not None else int(np.prod(store[k].shape))
                               for k, r in readers.items()) <= cache_limit_bytes
        self.image_keys = images
        self._arrays = {}
        for k in keys:
            r = readers.get(k)
            if k in images and r is not None:
                self._arrays[k] = r.load() if cache_images else r
            else:
                self._arrays[k] = store[k] if k in images and not cache_images else store[k][:]
        self._offsets = np.arange(T)

    @property
    def nbytes(self) -> int:
        """Bytes of store data this sampler holds in memory: decoded low-dim arrays, encoded (or, for a layout
        :meth:`ZarrStore.frames` does not read, decoded) cached frames; 0 for frames read from disk per window."""
        return sum(int(a.nbytes) for a in self._arrays.values() if isinstance(a, (np.ndarray, FrameCache)))

    def __len__(self) -> int:
        return len(self._s)

    def indices(self, i: int) -> np.ndarray:
        """Global store steps (int64 (T,)) of window ``i``, edge-padded inside its episode."""
        return self._start[i] + np.clip(self._s[i] + self._offsets, 0, self._len[i] - 1)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)}")
        idx = self.indices(int(i) % len(self))
        out = {}
        for k in self.keys:
            x = np.asarray(self._arrays[k][idx[: self.frames[k]]])  # uncached images: one read per frame
            if self.float_images and k in self.image_keys:
                x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
                x /= 255.0
            out[k] = x
        return out

    def batch(self, windows: Sequence[int]) -> dict[str, np.ndarray]:
        """Several windows at once: ``{key: (B, n, *shape)}`` for the B indices ``windows``, equal to stacking
        ``self[i][key]`` over them (image keys with ``float_images``: ``(B, n, C, H, W)`` float32); one gather per
        low-dim key and each needed frame decoded once. Raises IndexError for an index out of range."""
        w = np.asarray(windows, dtype=np.int64).reshape(-1)
        if w.size and (w.min() < -len(self) or w.max() >= len(self)):
            raise IndexError(f"a window index of {w.min()}..{w.max()} is out of range for {len(self)}")
        w = w % len(self)
        idx = self._start[w, None] + np.clip(self._s[w, None] + self._offsets, 0, self._len[w, None] - 1)  # (B, T)
        out = {}
        for k in self.keys:
            n, a = self.frames[k], self._arrays[k]
            sel = idx[:, :n]
            if isinstance(a, np.ndarray):
                x = a[sel]
            elif isinstance(a, (FrameCache, FrameReader)):
                x = a[sel.reshape(-1)].reshape(len(w), n, *a.shape)
            else:  # frames read through zarr (a layout FrameReader does not handle): one read per window
                x = np.stack([np.asarray(a[r]) for r in sel]) if len(w) else np.empty((0, n, *a.shape[1:]), a.dtype)
            if self.float_images and k in self.image_keys:
                x = np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3), dtype=np.float32)
                x /= 255.0
            out[k] = x
        return out


def _padding(field: str, value, default: int, horizon: int) -> int:
    """``value`` (None: ``default``) checked to be an int in 0..horizon-1. Raises ConfigError naming ``field``."""
    if value is None:
        return default
    if not (_is_int(value) and 0 <= value <= horizon - 1):
        raise ConfigError(field, f"must be an int in 0..horizon-1={horizon - 1}, got {value!r}",
                          "diffusion_policy uses pad_before = n_obs_steps - 1, pad_after = n_action_steps - 1")
    return int(value)


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
    """``torch`` view of a :class:`SequenceSampler`: ``{key: tensor}``, uint8 image keys stay uint8 (To, H, W, C)
    (float32 (To, C, H, W) in [0, 1] with the sampler's ``float_images``), everything else becomes float32. Works
    with ``DataLoader`` (any ``num_workers``: frames are read with plain file reads or from the sampler's encoded
    copy, and decoded in the worker; zarr resets its IO loop on fork). A DataLoader with a batch size fetches each
    batch through :meth:`__getitems__` (one :meth:`SequenceSampler.batch` call), with the same tensors."""

    def __init__(self, sampler: SequenceSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v if v.dtype == np.uint8 else v.astype(np.float32, copy=False))
                for k, v in self.sampler[i].items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """What a ``DataLoader`` with a batch size calls (torch >= 2.1): the batch's windows from one
        :meth:`SequenceSampler.batch`, returned as per-window views of it (the collate function stacks them), equal
        to ``[self[i] for i in indices]``."""
        b = {k: torch.from_numpy(v if v.dtype == np.uint8 else v.astype(np.float32, copy=False))
             for k, v in self.sampler.batch(indices).items()}
        keys, parts = list(b), [t.unbind(0) for t in b.values()]
        return [dict(zip(keys, row)) for row in zip(*parts)] if parts else [{} for _ in indices]
