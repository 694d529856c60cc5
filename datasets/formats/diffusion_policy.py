"""diffusion_policy's ReplayBuffer zarr (Chi et al. 2023, ``diffusion_policy/common/replay_buffer.py``), zarr format 2,
read and written with zarr-python's v2 support.

Layout (as its ``ReplayBuffer.create_empty_zarr`` + ``add_episode`` write it)::

    <root>/.zgroup
      data/<key>          (N, ...) every per-step array, episodes concatenated (N = total steps)
      meta/episode_ends   int64 (E,) exclusive cumulative end of each episode

Mapping (import; export is the reverse):

- ``data/<key>`` -> ``<key>``; uint8 (N, H, W, C) arrays with C in {1, 3, 4} are camera frames and become
  ``image_<key>`` unless already named ``image_*`` (diffusion_policy's ``img`` -> ``image_img``; export writes our
  ``image_<cam>`` as ``data/<cam>``). ``--map`` renames anything else (e.g. ``--map img=image_front``). ``action``
  must exist after renaming.
- Per-episode metadata the format lacks (seed, task, source, success, backend, robot, extra) comes from the
  import defaults; our exports keep it in the ``meta`` group's attribute ``robot_rl_episodes`` (a list of per-episode
  maps that diffusion_policy ignores), and an import reads it back, so ours -> theirs -> ours is lossless.
  ``intervention`` and ``human_action`` travel as ordinary ``data/`` arrays.
- Export compression and chunks follow the ReplayBuffer's defaults: Blosc lz4, level 5, no shuffle; camera frames
  one frame per chunk, other arrays in time chunks of up to 1024 steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr

from robot_rl.datasets.formats import Episode
from robot_rl.datasets.store import is_image
from robot_rl.errors import ConfigError

META_ATTR = "robot_rl_episodes"
TIME_CHUNK = 1024


def _store_name(key: str, arr) -> str:
    return f"image_{key}" if is_image(arr.dtype, tuple(arr.shape[1:])) and not key.startswith("image_") else key


def read(src: Path) -> Iterator[Episode]:
    """Episodes of the ReplayBuffer zarr at ``src`` (format 2 or 3), data keys named as in the module doc.

    Raises ConfigError naming the field for a group without ``data`` or ``meta/episode_ends``, episode ends that are
    not positive and increasing, or a data array shorter than ``episode_ends[-1]``."""
    try:
        root = zarr.open_group(str(src), mode="r")
    except Exception as e:  # noqa: BLE001 - not a zarr group at all
        raise ConfigError("src", f"{src} is not a zarr group ({type(e).__name__})",
                          "pass the .zarr directory of a diffusion_policy ReplayBuffer") from None
    if "data" not in root or "meta" not in root or "episode_ends" not in root["meta"]:
        raise ConfigError("meta/episode_ends", f"{src} has no data group or meta/episode_ends",
                          "pass a ReplayBuffer zarr (data/<key> arrays and meta/episode_ends)")
    ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
    if ends.ndim != 1 or (len(ends) and (ends[0] < 1 or np.any(np.diff(ends) < 1))):
        raise ConfigError("meta/episode_ends", f"{ends[:8].tolist()}... is not positive and strictly increasing",
                          "repair the dataset's episode_ends")
    arrays = {k: root["data"][k] for k in sorted(root["data"].array_keys())}
    if not arrays:
        raise ConfigError("data", f"{src} has no data arrays", "pass a ReplayBuffer zarr with data/<key> arrays")
    n = int(ends[-1]) if len(ends) else 0
    for k, a in arrays.items():
        if a.shape[0] < n:
            raise ConfigError(f"data/{k}", f"{a.shape[0]} steps < episode_ends[-1] = {n}",
                              "the dataset is truncated; restore it from a copy")
    metas = root["meta"].attrs.get(META_ATTR)
    if not (isinstance(metas, list) and len(metas) == len(ends)):
        metas = [{}] * len(ends)
    names = {k: _store_name(k, a) for k, a in arrays.items()}
    start = 0
    for end, meta in zip(ends, metas):
        yield Episode({names[k]: np.asarray(a[start:end]) for k, a in arrays.items()}, dict(meta))
        start = int(end)


def write(episodes: Iterable[Episode], dst: Path, compressor_level: int = 5) -> dict:
    """Write ``episodes`` as a new ReplayBuffer zarr (format 2) at ``dst`` (which must not exist).

    Every episode must have the same keys, dtypes and per-step shapes (a store's do). Returns {path, episodes,
    steps, keys}. Raises ConfigError for episodes that disagree."""
    import numcodecs

    comp = numcodecs.Blosc(cname="lz4", clevel=int(compressor_level), shuffle=numcodecs.Blosc.NOSHUFFLE)
    root = zarr.open_group(str(dst), mode="w-", zarr_format=2)
    data, meta = root.create_group("data"), root.create_group("meta")
    arrays: dict[str, zarr.Array] = {}
    names: dict[str, str] = {}
    ends, metas, n = [], [], 0
    for ep in episodes:
        T = len(ep.data["action"]) if "action" in ep.data else len(next(iter(ep.data.values())))
        if not arrays:
            for k, v in ep.data.items():
                names[k] = k[len("image_"):] if k.startswith("image_") and is_image(v.dtype, v.shape[1:]) else k
                chunks = (1, *v.shape[1:]) if is_image(v.dtype, v.shape[1:]) else (TIME_CHUNK, *v.shape[1:])
                arrays[k] = data.create_array(names[k], shape=(0, *v.shape[1:]), chunks=chunks, dtype=v.dtype,
                                              compressors=comp, fill_value=0)
        if set(ep.data) != set(arrays):
            raise ConfigError("data", f"episode {len(ends)} has keys {sorted(ep.data)}, the first had "
                                      f"{sorted(arrays)}", "export episodes with one schema (one store)")
        for k, a in arrays.items():
            v = np.asarray(ep.data[k])
            if v.dtype != a.dtype or v.shape[1:] != a.shape[1:] or len(v) != T:
                raise ConfigError(f"data/{k}", f"episode {len(ends)}: {v.dtype} {v.shape}, expected {a.dtype} "
                                               f"(T, {', '.join(map(str, a.shape[1:]))})",
                                  "export episodes with one schema (one store)")
            a.resize((n + T, *a.shape[1:]))
            a[n:n + T] = v
        n += T
        ends.append(n)
        metas.append(ep.meta)
    meta.create_array("episode_ends", data=np.asarray(ends, dtype=np.int64), chunks=(max(1, len(ends)),),
                      compressors=None)
    meta.attrs[META_ATTR] = json.loads(json.dumps(metas, default=_plain))
    return {"path": str(dst), "episodes": len(ends), "steps": n, "keys": [names[k] for k in arrays]}


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
