"""Converters between the robot_rl store (:mod:`robot_rl.datasets.store`) and other robot-learning dataset formats:
``robot-rl store import|export --format F``. Each mapping is written down in ``docs/DATASETS.md``.

One module per format, each reading and writing with that format's own library and exposing two functions over
one in-memory form, :class:`Episode`::

    read(src: Path, **options) -> Iterator[Episode]        # the foreign dataset, episode by episode
    write(episodes: Iterable[Episode], dst: Path, **options) -> dict   # a new foreign dataset; returns a summary

Formats (:data:`FORMATS`): ``diffusion_policy`` (its ReplayBuffer zarr, format 2), ``robomimic`` (HDF5 through
h5py), ``lerobot`` (LeRobot dataset v3.0 through pyarrow and PyAV), ``rosbag2`` (MCAP / sqlite3 through rosbags).

This module owns what is common: key renaming (``key_map``, both directions), filling the per-episode metadata the
other format lacks (:class:`MetaDefaults`, every default overridable, a missing required field is a one-line
ConfigError), and the store side (:func:`import_dataset` commits each episode with ``ZarrStore.add_episode``, so a
failed import leaves every committed episode intact; :func:`export_dataset` reads committed episodes only).

Episode data use the store's key conventions: ``action`` float32 (T, A); camera frames ``image_<camera>`` uint8
(T, H, W, 3) RGB; any other key is a per-step low-dim array (T, *shape); ``intervention`` bool (T,) and
``human_action`` (T, A) as the store defines them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from robot_rl.datasets.store import META_FIELDS, SOURCES, ZarrStore
from robot_rl.errors import ConfigError

FORMATS = ("diffusion_policy", "robomimic", "lerobot", "rosbag2")


@dataclass
class Episode:
    """One episode in transit. ``data``: {store key: (T, ...) numpy array}, every array with the same T >= 1.
    ``meta``: whatever per-episode metadata the format carries, a subset of :data:`META_FIELDS` (``seed`` int,
    ``task`` / ``source`` / ``backend`` / ``robot`` str, ``success`` bool, ``extra`` JSON-able dict)."""

    data: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetaDefaults:
    """Per-episode metadata for episodes whose format does not carry it (``robot-rl store import`` flags).

    task: the task name (e.g. ``place``); required unless every episode names one. source: one of the store's
    SOURCES (imported demonstrations default to ``teleop``). success: imported demonstrations are successes unless
    the format says otherwise. backend: ``real`` (data from a robot) unless the format says which simulator.
    robot: ``panda``. seed_start: episode i gets seed ``seed_start + i`` when the format has none.
    force: fields set from these defaults even where the format has a value.
    """

    task: str | None = None
    source: str = "teleop"
    success: bool = True
    backend: str = "real"
    robot: str = "panda"
    seed_start: int = 0
    force: tuple = ()

    def fill(self, meta: dict, index: int, fmt: str) -> dict:
        """``add_episode`` keyword arguments for the ``index``-th imported episode. Raises ConfigError naming the
        field when one is missing and has no default."""
        out = dict(meta)
        for k in ("task", "source", "success", "backend", "robot"):
            if k not in out or out[k] is None or k in self.force:
                out[k] = getattr(self, k)
        if "seed" not in out or "seed" in self.force:
            out["seed"] = self.seed_start + index
        if out["task"] is None:
            raise ConfigError("task", f"{fmt} episode {index} names no task and no default was given",
                              "pass --task NAME (e.g. --task place)")
        if out["source"] not in SOURCES:
            raise ConfigError("source", f"{out['source']!r} is not a store source", f"use one of {list(SOURCES)}")
        out["extra"] = {**dict(out.get("extra") or {}), "imported_from": fmt}
        return {k: out[k] for k in META_FIELDS}


def parse_key_map(items: Iterable[str] | None, field: str = "map", flag: str = "--map img=image_front") -> dict[str, str]:
    """``["FROM=TO", ...]`` (the ``--map`` flags; rosbag2's ``--topic-map``) -> {FROM: TO}. Raises ConfigError naming
    ``field`` (with ``flag`` as the example) for a malformed item, a name mapped twice, or two names mapped to one."""
    out: dict[str, str] = {}
    for it in items or ():
        a, sep, b = str(it).partition("=")
        if not sep or not a or not b:
            raise ConfigError(field, f"{it!r} is not FROM=TO", f"use e.g. {flag}")
        if a in out:
            raise ConfigError(field, f"{a!r} is mapped twice", f"give each one {flag.split()[0]}")
        out[a] = b
    if len(set(out.values())) != len(out):
        raise ConfigError(field, f"two names are mapped to one ({out})", "give every one its own target name")
    return out


def rename(data: dict[str, np.ndarray], key_map: dict[str, str]) -> dict[str, np.ndarray]:
    """``data`` with keys renamed by ``key_map`` (keys not in it keep their names). Raises ConfigError when two
    keys end up with one name."""
    out: dict[str, np.ndarray] = {}
    for k, v in data.items():
        name = key_map.get(k, k)
        if name in out:
            raise ConfigError("map", f"two keys become {name!r}", "map one of them to another name (--map)")
        out[name] = v
    return out


def format_module(fmt: str):
    """The converter module of ``fmt``. Raises ConfigError for an unknown format."""
    if fmt not in FORMATS:
        raise ConfigError("format", f"{fmt!r} is not a supported format", f"use one of {list(FORMATS)}")
    return importlib.import_module(f"robot_rl.datasets.formats.{fmt}")


def import_dataset(fmt: str, src: str | os.PathLike, store: str | os.PathLike, *, defaults: MetaDefaults | None = None,
                   key_map: dict[str, str] | None = None, overwrite: bool = False, progress: bool = True,
                   **options) -> dict:
    """Read ``src`` in format ``fmt`` and write a new store at ``store``, one committed episode at a time.

    ``key_map``: {their key (after the format's own naming, see docs/DATASETS.md): store key}. ``options``: the
    format's read options. Returns {episodes, steps, keys, store}. Raises ConfigError (unknown format, missing
    source, an existing store without ``overwrite``, bad or missing fields), nothing half-committed.
    """
    from robot_rl.progress import progress_bar

    mod = format_module(fmt)
    check_options(mod.read, options, fmt, "import")
    src = Path(src)
    if not src.exists():
        raise ConfigError("src", f"{src} does not exist", f"pass the path of a {fmt} dataset")
    defaults = defaults or MetaDefaults()
    st = ZarrStore.create(store, overwrite=overwrite)
    n = 0
    bar = progress_bar(total=None, desc=f"import {fmt}", unit="episode", disable=not progress)
    try:
        for i, ep in enumerate(mod.read(src, **options)):
            data = rename(ep.data, key_map or {})
            if "action" not in data:
                raise ConfigError("action", f"{fmt} episode {i} has no 'action' key (keys: {sorted(data)})",
                                  "map the action key, e.g. --map actions=action")
            st.add_episode(data, **defaults.fill(ep.meta, i, fmt))
            n += 1
            bar.update(1)
    finally:
        bar.close()
    if n == 0:
        raise ConfigError("src", f"{src} holds no episodes", f"pass a {fmt} dataset with at least one episode")
    return {"store": str(st.path), "episodes": st.n_episodes, "steps": st.n_steps, "keys": st.keys}


def store_episodes(store: ZarrStore, key_map: dict[str, str] | None = None) -> Iterator[Episode]:
    """Committed episodes of ``store`` as :class:`Episode` s (keys renamed by ``key_map``: {store key: theirs})."""
    for i in range(store.n_episodes):
        m = store.episode_meta(i)
        yield Episode(rename(store.get_episode(i), key_map or {}), {k: m[k] for k in META_FIELDS})


def export_dataset(fmt: str, store: str | os.PathLike, dst: str | os.PathLike, *,
                   key_map: dict[str, str] | None = None, overwrite: bool = False, **options) -> dict:
    """Write the committed episodes of ``store`` as a new ``fmt`` dataset at ``dst``.

    ``key_map``: {store key: their key}. ``options``: the format's write options (e.g. LeRobot's video codec).
    Returns the format's summary. Raises ConfigError (unknown format, an empty store, ``dst`` exists without
    ``overwrite``, data the format cannot hold)."""
    mod = format_module(fmt)
    check_options(mod.write, options, fmt, "export")
    st = ZarrStore.open(store)
    if st.n_episodes == 0:
        raise ConfigError("store", f"{store} has no committed episodes", "export a store with episodes")
    dst = Path(dst)
    prepare_destination(dst, overwrite)
    return mod.write(store_episodes(st, key_map), dst, **options)


def check_options(func, options: dict, fmt: str, what: str) -> None:
    """Raise ConfigError naming the first option ``func`` (a format's read or write) does not take."""
    import inspect

    params = inspect.signature(func).parameters
    for k in options:
        if k not in params or k in ("src", "dst", "episodes"):
            raise ConfigError(k, f"is not an option of the {fmt} {what}",
                              f"the {fmt} {what} takes {[p for p in params if p not in ('src', 'dst', 'episodes')]}")


def prepare_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing ``dst`` unless ``overwrite`` (then it is removed). Raises ConfigError."""
    import shutil

    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise ConfigError("dst", f"{dst} already exists", "choose a new path or pass --overwrite")
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
