"""Store tools: a filtered copy of a store, the merge of several and the migration of one to the current layout
(``robot-rl store filter|merge|migrate``).

All three write a NEW store (:meth:`ZarrStore.create`) and copy committed episodes into it one at a time with
:meth:`ZarrStore.add_episode`, so the store's commit protocol holds (an interrupted copy leaves every episode it
committed intact and readable). Episodes are copied as they are: every data key with its dtype and per-step shape,
arrays bit-identical (NaN included), and the metadata (seed, success, task, source, backend, robot, extra).
Sources are only read; everything that can be refused (bad filter, nothing matches, disagreeing schemas, a
destination that exists or overlaps a source) is refused before the destination is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from robot_rl.datasets.store import META_FIELDS, OPTIONAL_KEYS, SOURCES, VERSION, ZarrStore
from robot_rl.errors import ConfigError
from robot_rl.progress import progress_bar


def matching_episodes(store: ZarrStore, *, sources: Sequence[str] | str | None = None, success: bool | None = None,
                      tasks: Sequence[str] | str | None = None,
                      seed_range: tuple[int, int] | None = None) -> list[int]:
    """Indices of the committed episodes of ``store`` that pass every given filter (all when none is given).

    ``sources``: episode source in this list (each one of ``SOURCES``). ``success``: episode success equals it.
    ``tasks``: task name in this list. ``seed_range``: ``(lo, hi)``, ``lo <= seed < hi``.

    Raises:
        ConfigError: an unknown source, an empty list, a non-bool success, a seed range that is not two ints
            with lo < hi.
    """
    sources, tasks = _names("sources", sources), _names("tasks", tasks)
    for s in sources or ():
        if s not in SOURCES:
            raise ConfigError("sources", f"unknown episode source {s!r}", f"use some of {list(SOURCES)}")
    if success is not None and not isinstance(success, (bool, np.bool_)):
        raise ConfigError("success", f"expected True, False or None, got {success!r}", "pass --success true|false")
    if seed_range is not None:
        ok = isinstance(seed_range, (tuple, list)) and len(seed_range) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in seed_range)
        if not ok or seed_range[0] >= seed_range[1]:
            raise ConfigError("seed_range", f"expected (lo, hi) integers with lo < hi, got {seed_range!r}",
                              "pass e.g. --seeds 0 100 (lo inclusive, hi exclusive)")
    return [m["index"] for m in store.episodes_meta()
            if (sources is None or m["source"] in sources) and (success is None or m["success"] == success)
            and (tasks is None or m["task"] in tasks)
            and (seed_range is None or seed_range[0] <= m["seed"] < seed_range[1])]


def filter_store(src: str | os.PathLike, dst: str | os.PathLike, *, sources: Sequence[str] | str | None = None,
                 success: bool | None = None, tasks: Sequence[str] | str | None = None,
                 seed_range: tuple[int, int] | None = None, overwrite: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Write a new store at ``dst`` holding the committed episodes of ``src`` that pass the filters (see
    :func:`matching_episodes`), in their order, copied exactly (module doc). ``overwrite``: replace an existing
    store at ``dst`` (as :meth:`ZarrStore.create`).

    Returns:
        ``{"store": dst, "episodes": n, "steps": n_steps, "indices": [source episode index, ...]}``.

    Raises:
        ConfigError: ``src`` is not a store; a bad filter; no episode matches (the message names the filter and
            what the store holds); ``dst`` exists without ``overwrite`` or is/contains/lies inside ``src``.
            ``dst`` is untouched in all these cases.
    """
    st = ZarrStore.open(src, mode="r")
    keep = matching_episodes(st, sources=sources, success=success, tasks=tasks, seed_range=seed_range)
    if not keep:
        metas = st.episodes_meta()
        have = (f"sources {sorted({m['source'] for m in metas})}, tasks {sorted({m['task'] for m in metas})}, "
                f"success {sorted({m['success'] for m in metas})}, seeds "
                f"{min(m['seed'] for m in metas)}..{max(m['seed'] for m in metas)}" if metas else "no episodes")
        wanted = {"sources": sources, "success": success, "tasks": tasks, "seed_range": seed_range}
        named = ", ".join(f"{k}={v!r}" for k, v in wanted.items() if v is not None) or "no filter"
        raise ConfigError("filter", f"no episode of {st.path} matches {named} (it has {have})",
                          "relax the filter; nothing was written")
    _check_distinct([st.path], dst)
    out = ZarrStore.create(dst, overwrite=overwrite)
    _copy(out, [(st, keep)], fill=(), desc="filter", progress=progress)
    return {"store": str(out.path), "episodes": out.n_episodes, "steps": out.n_steps, "indices": keep}


def merge_stores(srcs: Sequence[str | os.PathLike], dst: str | os.PathLike, *, overwrite: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Write a new store at ``dst`` holding every committed episode of each store in ``srcs``, store after store,
    each in its order, copied exactly (module doc). The stores' schemas (keys, dtypes, per-step shapes) must agree,
    except for ``human_action``: when some stores have it, the episodes of the others get it NaN-filled, as
    :meth:`ZarrStore.add_episode` does for an episode without one. Stores without episodes are allowed (they add
    nothing). The same store may be listed twice (its episodes are then copied twice).

    Returns:
        ``{"store": dst, "episodes": n, "steps": n_steps, "per_store": [{"store", "episodes", "steps"}, ...]}``
        (``per_store`` in the order of ``srcs``).

    Raises:
        ConfigError: no source, a source that is not a store, no episodes in any, a key missing from one store or
            with another dtype / per-step shape (naming the key and both stores), ``dst`` exists without
            ``overwrite`` or is/contains/lies inside a source. ``dst`` is untouched in all these cases.
    """
    if isinstance(srcs, (str, os.PathLike)) or not len(srcs):
        raise ConfigError("srcs", f"expected a list of stores, got {srcs!r}", "pass at least one source store")
    stores = [ZarrStore.open(p, mode="r") for p in srcs]
    filled = [s for s in stores if s.n_episodes]
    if not filled:
        raise ConfigError("srcs", f"none of {[str(s.path) for s in stores]} has a committed episode",
                          "merge stores that hold episodes")
    ref = filled[0]
    for other in filled[1:]:
        _check_schemas(ref, other)
    fill = tuple(k for k in OPTIONAL_KEYS if any(k in s.schema for s in filled))
    _check_distinct([s.path for s in stores], dst)
    out = ZarrStore.create(dst, overwrite=overwrite)
    _copy(out, [(s, range(s.n_episodes)) for s in stores], fill=fill, desc="merge", progress=progress)
    per = [{"store": str(s.path), "episodes": s.n_episodes, "steps": s.n_steps} for s in stores]
    return {"store": str(out.path), "episodes": out.n_episodes, "steps": out.n_steps, "per_store": per}


def migrate_store(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """Write a new store at ``dst`` in the current layout (``store.VERSION``) holding every committed episode of the
    store ``src`` (any layout this code reads, e.g. a version-1 store with one file per camera frame), in order,
    copied exactly (module doc). ``src`` is only read and stays usable as it is (stores of every readable version
    open, read and append without migrating); migrating gives the smaller, faster layout.

    Returns:
        ``{"store": dst, "episodes": n, "steps": n_steps, "from_version": v, "to_version": VERSION}``.

    Raises:
        ConfigError: ``src`` is not a store; ``dst`` exists without ``overwrite`` or is/contains/lies inside ``src``
            (``dst`` is untouched then).
    """
    st = ZarrStore.open(src, mode="r")
    _check_distinct([st.path], dst)
    out = ZarrStore.create(dst, overwrite=overwrite)
    _copy(out, [(st, range(st.n_episodes))], fill=(), desc="migrate", progress=progress)
    return {"store": str(out.path), "episodes": out.n_episodes, "steps": out.n_steps, "from_version": st.version,
            "to_version": VERSION}


def _check_schemas(a: ZarrStore, b: ZarrStore) -> None:
    """Raise ConfigError naming the first key whose presence, dtype or per-step shape differs between ``a`` and
    ``b`` (``OPTIONAL_KEYS`` may be absent from either)."""
    sa, sb = a.schema, b.schema
    for k in sorted(set(sa) | set(sb)):
        if k not in sa or k not in sb:
            if k in OPTIONAL_KEYS:
                continue
            has, lacks = (a, b) if k in sa else (b, a)
            raise ConfigError(k, f"is in {has.path} but not in {lacks.path}",
                              "merge stores recorded with the same keys (filter or convert one first)")
        if sa[k]["dtype"] != sb[k]["dtype"] or tuple(sa[k]["shape"]) != tuple(sb[k]["shape"]):
            raise ConfigError(k, f"is {sa[k]['dtype']} {tuple(sa[k]['shape'])} per step in {a.path} but "
                              f"{sb[k]['dtype']} {tuple(sb[k]['shape'])} in {b.path}",
                              "merge stores recorded with the same keys, dtypes and shapes")


def _check_distinct(srcs: Sequence[Path], dst: str | os.PathLike) -> None:
    """Raise ConfigError when ``dst`` is a source, lies inside one or contains one (creating or overwriting it
    would damage or delete that source)."""
    d = Path(dst).resolve()
    for s in srcs:
        s = Path(s).resolve()
        if d == s or s in d.parents or d in s.parents:
            raise ConfigError("dst", f"{dst} {'is' if d == s else 'overlaps'} the source store {s}",
                              "write the result to a new path outside every source store")


def _copy(out: ZarrStore, plan: list[tuple[ZarrStore, Sequence[int]]], fill: tuple[str, ...], desc: str,
          progress: bool) -> None:
    """Append episodes ``plan = [(store, indices)]`` to ``out`` one committed episode at a time; a key of ``fill``
    an episode lacks is given NaN-filled in the action's shape (the value the store would fill it with)."""
    bar = progress_bar(total=sum(len(ix) for _, ix in plan), desc=desc, unit="episode", disable=not progress)
    try:
        for st, indices in plan:
            metas = st.episodes_meta()  # one read per field
            for i in indices:
                data = st.get_episode(int(i))
                for k in fill:
                    if k not in data:
                        data[k] = np.full(data["action"].shape, np.nan, np.float32)
                out.add_episode(data, **{k: metas[int(i)][k] for k in META_FIELDS})
                bar.update(1)
    finally:
        bar.close()


def _names(field: str, value: Sequence[str] | str | None) -> list[str] | None:
    """``value`` as a list of names (a single string becomes a one-element list); None stays None."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(field, f"expected a non-empty list of names, got {value!r}",
                          f"pass e.g. --{field.rstrip('s')} NAME (repeatable), or leave the filter out")
    return names
