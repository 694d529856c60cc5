"""Per-key min-max normalization owned by a policy, stored as module buffers (so it travels in the checkpoint).

Low-dim observations and actions are mapped affinely from the dataset's [min, max] to [-1, 1] per dimension, the
convention of Chi et al. 2023 "Diffusion Policy" (a diffusion model with ``clip_sample`` samples inside [-1, 1]).
Dimensions whose range is (almost) zero are only shifted: ``x - min`` (so they normalize to 0, never divide by ~0).
Images are not handled here: uint8 RGB is scaled to [-1, 1] inside the image encoder (``encoders.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robot_rl.errors import ConfigError

_MIN_RANGE = 1e-4


class Normalizer(nn.Module):
    """Min-max normalizer to [-1, 1] for a fixed set of keys.

    Args:
        dims: {key: feature dim d} for every key to normalize (low-dim obs keys and ``"action"``).
        stats: {key: {"min": (d,), "max": (d,), ...}} array-likes (extra entries such as "mean"/"std" are ignored);
            None builds an identity placeholder whose buffers are then filled by ``load_state_dict``.

    Buffers: ``<key>_min``, ``<key>_max`` (float32, (d,)) — part of ``state_dict()``.

    Raises:
        ConfigError: a key is missing from ``stats``, a statistic has the wrong shape or is not finite, or max < min.
    """

    def __init__(self, dims: dict[str, int], stats: dict | None = None):
        super().__init__()
        self.dims = dict(dims)
        for key, d in self.dims.items():
            lo, hi = -np.ones(d, np.float32), np.ones(d, np.float32)
            if stats is not None:
                if key not in stats:
                    raise ConfigError("stats", f"no statistics for '{key}'",
                                      f"compute min/max for '{key}' from the dataset (e.g. the store's stats)")
                lo, hi = (self._stat(stats[key], name, key, d) for name in ("min", "max"))
                if np.any(hi < lo):
                    raise ConfigError(f"stats['{key}']", "max < min in some dimension", "recompute the statistics")
            self.register_buffer(f"{key}_min", torch.from_numpy(lo))
            self.register_buffer(f"{key}_max", torch.from_numpy(hi))

    @staticmethod
    def _stat(entry: dict, name: str, key: str, d: int) -> np.ndarray:
        if name not in entry:
            raise ConfigError(f"stats['{key}']", f"missing '{name}'", "provide both 'min' and 'max' arrays")
        a = np.asarray(entry[name], dtype=np.float32).reshape(-1)
        if a.shape != (d,) or not np.all(np.isfinite(a)):
            raise ConfigError(f"stats['{key}']['{name}']", f"expected {d} finite values, got shape {a.shape}",
                              "recompute the statistics for the configured dimension")
        return a

    def _scale_offset(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) of ``key``, cached until its statistics change: a new buffer (``to``, ``load_state_dict``
        into a new tensor) or an in-place write (the tensor's version counter). Per-step callers (an actor's
        control step normalizes every observation key) would otherwise pay eight small tensor ops per key."""
        if key not in self.dims:
            raise ConfigError("key", f"'{key}' has no normalization statistics", f"use one of {sorted(self.dims)}")
        lo, hi = getattr(self, f"{key}_min"), getattr(self, f"{key}_max")
        cache = self.__dict__.setdefault("_affine", {})
        hit = cache.get(key)  # (lo, hi, their versions, scale, offset): holding lo / hi, so no new tensor is them
        if hit is not None and hit[0] is lo and hit[1] is hi and hit[2] == (lo._version, hi._version):
            return hit[3], hit[4]
        with torch.no_grad():
            rng = hi - lo
            ok = rng > _MIN_RANGE
            scale = torch.where(ok, 2.0 / torch.where(ok, rng, torch.ones_like(rng)), torch.ones_like(rng))
            offset = torch.where(ok, -1.0 - scale * lo, -lo)
        if not torch.is_inference_mode_enabled():  # an inference tensor could not be used outside that mode
            cache[key] = (lo, hi, (lo._version, hi._version), scale, offset)
        return scale, offset

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw float (..., d) -> normalized float32 (..., d), [min, max] -> [-1, 1]."""
        scale, offset = self._scale_offset(key)
        return x.float() * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Normalized (..., d) -> raw float32 (..., d); exact inverse of :meth:`normalize`."""
        scale, offset = self._scale_offset(key)
        return (x.float() - offset) / scale
