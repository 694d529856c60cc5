"""Zarr v3 demonstration store: episodes of per-step arrays plus per-episode metadata.

Layout, version 2 (new stores; a directory store, diffusion_policy ReplayBuffer idea)::

    <root>/                      group attrs: format="robot_rl.datasets.store", version=2, chunks_complete=true,
                                 schema={key: {dtype, shape}}
      data/<key>                 (>= N, *shape) arrays concatenated over time (N = committed steps, see below)
        action                   float32 (N, A)           always present
        intervention             bool    (N,)             always present (False unless a human took over)
        human_action             float32 (N, A)           present once any episode gave it; NaN where absent
        image_<cam>              uint8   (N, H, W, 3)     SHARDED (zarr v3 sharding_indexed): one shard file per
                                                          2 MiB of decoded frames (75 of 96x96x3; 1 to 1024), one
                                                          frame per inner chunk, Blosc lz4hc-4 or lz4-5 (image_codec)
        <low-dim>                any     (N, *shape)      time chunks (<= 1024 steps, <= 4 MiB), Blosc-zstd
      meta/episode_ends          int64 (E,)  exclusive cumulative end of each episode -- the COMMIT MARKER
      meta/episodes              variable-length UTF-8 (>= E,), one JSON object per episode: seed (int), success
                                 (bool), length (int), task, source, backend, robot (str), extra (object)

Lengths: ``meta/episode_ends`` has exactly E entries; the length of ``data/<key>`` and ``meta/episodes`` is a
capacity, grown by whole chunks or shards (about 1024 rows at a time), so that an append rewrites the commit
marker's ``zarr.json`` only (another array's once per ~1024 rows). Rows past the commit are not data (the fill value, or what a killed writer
left, overwritten by the next append): read ``data/<key>[:episode_ends[-1]]``, as diffusion_policy's ReplayBuffer
does. File count: one file per data key per 1024 steps (low-dim) or per shard (frames), ~2 per 1024 episodes for
the metadata: 107 files and 199 directories for 50 place episodes (version 1: 3 289 files, 9 717 directories).

Layout, version 1 (stores written before; opened, read, validated and appended in their own layout, never converted
implicitly; ``ZarrStore.create(path, version=1)`` still writes it, ``robot_rl.datasets.tools.migrate_store`` copies
one into version 2): every array exactly as long as the commit; frames one per chunk file (Blosc-zstd); one
metadata array per field: ``meta/episode_seed`` int64, ``episode_success`` bool, ``episode_length`` int64,
``episode_task|source|backend|robot|extra`` variable-length strings (``extra``: JSON).

Writing (version 2): zarr-python 3 spends about a millisecond per array call and per chunk in its event loop and
codec pipeline (8 of the 8.4 s of a 50-episode version-1 write were ``sync()``), and a file system a fraction of a
millisecond per created or replaced file. So ``add_episode`` writes the files itself
(:mod:`robot_rl.datasets.zarrio`: the zarr v3 format, read back by zarr and checked so by the tests): per episode
one file per data key (its last chunk or shard), one ``meta/episodes`` chunk, and the commit marker's chunk and
``zarr.json``; frames are encoded straight by numcodecs. Frames go into shards (a file per 75 frames, not per
frame); low-dim arrays are not sharded: a partial inner chunk of a shard would be re-encoded at the same offset,
so a reader holding the shard's previous index could decode a mix of two versions, while an unsharded chunk file
is read by one ``open``.

Strings use zarr v3's variable-length UTF-8 data type (``dtype=str``, vlen-utf8 codec): no length limit (a fixed
``<U16`` would truncate or force a rewrite), no ``UnstableSpecificationWarning`` (fixed-length UTF-32 has no v3 spec
yet), one array (a crash cannot leave a bytes array and its offsets array out of sync). ``extra`` is strict JSON
(``json.dumps(extra, sort_keys=True)``: no NaN/inf).

Crash safety: ``add_episode`` writes every data array first, then the per-episode metadata, and ``meta/episode_ends``
last. Every file is replaced atomically (a temp file, then a rename: zarr's LocalStore in version 1,
:func:`robot_rl.datasets.zarrio.atomic_write` in version 2), so after a SIGKILL each file is either its old or its
new version. Appending rewrites the last, partial chunk or shard of each array, and both versions hold every
committed step: a new shard keeps the committed frames' encoded bytes at their offsets, a new chunk re-encodes the
committed rows losslessly; so committed data reads back identical whichever version a kill leaves (tested: a kill
before each file write in turn, and a real SIGKILL). Version 2 commits by replacing ``episode_ends/zarr.json`` (its
chunk, holding the new entry past the old length, is written first); version 1 resizes first, and a resize whose
chunk write never landed reads as the fill value 0. Readers trust only the committed prefix of ``episode_ends``
(strictly increasing, positive). Opening in mode ``"a"`` removes what lies beyond the commit (a "torn tail":
version 1 truncates its arrays; both delete temp files), never anything committed.

Writers: any number of processes may append to one store. Every write (create, repair at open, each
``add_episode``) holds an exclusive ``fcntl.flock`` on ``<root>/.writer.lock`` (:func:`writer_lock`) and re-reads the
commit marker under it, so concurrent writers' episodes interleave and none is lost (version 2: two small reads,
the schema and the length of ``episode_ends``, which every commit grows; a full refresh when either changed); a
writer waits at most ``LOCK_TIMEOUT_S`` for another's commit, then raises ConfigError. The kernel drops the lock of
a killed process. Readers take no lock (call :meth:`ZarrStore.refresh` to see newly committed episodes).

Chunk verification: zarr reads a missing chunk file as the fill value (zeros). Stores created by this code carry
the group attribute ``chunks_complete=true`` and write every chunk, fill-valued ones included
(``write_empty_chunks``), so a chunk or shard file of committed steps that is missing or is not a regular file, or a
shard whose index (CRC32C-checked) lacks a committed frame, is damage: :func:`validate_store` reports it and reads
raise ConfigError naming the array. Older stores (no such attribute) may legitimately lack all-fill chunks, so only a
non-file in place of a chunk (and a missing ``episode_ends`` chunk) is reported there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from robot_rl.datasets.zarrio import (LOCAL, AppendWriter, ArrayFiles, FrameReader, LocalFiles, RemoteFiles, RemotePath,
                                      Unsupported, single_threaded_blosc)
from robot_rl.errors import ConfigError

FORMAT, VERSION = "robot_rl.datasets.store", 2  # VERSION: the layout new stores get; READABLE: what opens and appends
READABLE = (1, 2)
SOURCES = ("scripted", "teleop", "policy", "intervention")
#: the per-episode metadata ``add_episode`` takes as keywords (and ``episode_meta`` returns, with more)
META_FIELDS = ("seed", "task", "source", "success", "backend", "robot", "extra")
META_NUM = {"episode_seed": np.int64, "episode_success": np.bool_, "episode_length": np.int64}
META_STR = ("episode_task", "episode_source", "episode_backend", "episode_robot", "episode_extra")
META_ROW = "episodes"  # version 2: meta/episodes, one JSON object per episode (module doc)
ROW_FIELDS = {"seed": int, "success": bool, "length": int, "task": str, "source": str, "backend": str, "robot": str,
              "extra": dict}
META_CHUNK, TIME_CHUNK, MAX_CHUNK_BYTES = 1024, 1024, 4 << 20
_FIX_CREATE = "create it with `robot-rl collect` (or ZarrStore.create(path)) first"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")  # a URL's scheme (is_url)
LOCK_NAME = ".writer.lock"  # inside the store directory; never deleted (a deleted lock file would let two in)
LOCK_TIMEOUT_S = 120.0  # longest wait for another writer's create / repair / commit
COMPLETE_ATTR = "chunks_complete"  # group attr: every chunk of the committed steps was written (see module doc)
_WRITE_ALL = {"array.write_empty_chunks": True}
IMAGE_SHARD_BYTES, IMAGE_SHARD_FRAMES = 2 << 20, 1024  # version 2: one image shard's decoded bytes / frames at most
# version 2 frames, Blosc: lz4hc where it pays (renders: -37 % bytes, as fast to decode), else lz4 (image_codec)
IMAGE_CODECS = ({"cname": "lz4hc", "clevel": 4, "shuffle": "noshuffle"},
                {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"})
IMAGE_CODEC_GAIN = 0.8  # lz4hc is chosen when the sample frames take at most this fraction of lz4's bytes
OPTIONAL_KEYS = ("human_action",)  # data keys an episode may lack (NaN-filled); may join the schema later


def is_image(dtype: np.dtype, shape: tuple[int, ...]) -> bool:
    """True for per-step uint8 (H, W, C) arrays with C in {1, 3, 4}: stored one frame per chunk."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4)


class CommittedArray:
    """Lazy read-only view of ``data/<key>`` truncated to the committed steps.

    Supports ``len``, ``shape``, ``dtype``, ``np.asarray(view)`` and indexing on the first axis by int, slice, an
    integer array or a boolean mask of length ``n`` (further axes may follow in a tuple); any other index raises
    ConfigError("index"). Only the requested frames are read from disk. A chunk file of the requested steps that is
    missing or not a regular file raises ConfigError naming the array (see :class:`ChunkCheck`), never reads as zeros.
    """

    def __init__(self, array: zarr.Array, n: int, chunks: "ChunkCheck | None" = None):
        self.array, self.n, self.chunks = array, n, chunks
        self.dtype, self.shape = array.dtype, (n, *array.shape[1:])

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        first = index[0] if isinstance(index, tuple) else index
        if not isinstance(first, (int, np.integer, slice, list, np.ndarray)) or isinstance(first, bool):
            raise ConfigError("index", f"{first!r} is not an int, slice, integer array or boolean mask",
                              "index the time axis with e.g. arr[0], arr[10:20] or arr[[1, 5]]")
        if isinstance(first, (list, np.ndarray)):
            a = np.asarray(first)
            if a.dtype == bool:
                if a.shape != (self.n,):
                    raise ConfigError("index", f"boolean mask of shape {a.shape} for {self.n} committed steps",
                                      f"pass a mask of shape ({self.n},)")
                first = np.flatnonzero(a)
            elif a.size and a.dtype.kind not in "iu":
                raise ConfigError("index", f"index array of dtype {a.dtype}", "pass integer step indices")
            index = (first, *index[1:]) if isinstance(index, tuple) else first
        try:
            return self._get(index)
        except (IndexError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - a chunk that cannot be read/decoded: damaged on disk
            raise ConfigError(f"data/{self.array.basename}", f"cannot be read ({_first_line(e)})",
                              "run `robot-rl store validate PATH` to find the damaged steps; restore the store "
                              "from a copy") from None

    def _get(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, slice):
            start, stop, step = first.indices(self.n)
            if step == 1:
                self._require(start, max(start, stop))
                return self.array[(slice(start, max(start, stop)), *rest)]
            first = np.arange(start, stop, step)
        if isinstance(first, (int, np.integer)):
            if not -self.n <= first < self.n:
                raise IndexError(f"index {first} out of range for {self.n} committed steps")
            self._require(int(first) % self.n, int(first) % self.n + 1)
            return self.array[(int(first) % self.n, *rest)]
        idx = np.asarray(first, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"indices out of range for {self.n} committed steps")
        idx = idx % max(self.n, 1)
        if idx.size == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        self._require(lo, hi)
        return self.array[(slice(lo, hi), *rest)][idx - lo]  # one contiguous read, then gather

    def _require(self, lo: int, hi: int) -> None:
        if self.chunks is not None:
            self.chunks.require(lo, hi)

    def __repr__(self) -> str:
        return f"CommittedArray(shape={self.shape}, dtype={self.dtype})"


class ChunkCheck:
    """Presence check of the chunk (or shard) files that hold rows ``[lo, hi)`` of one array of a store on disk.

    zarr reads an absent chunk file as the fill value; here a chunk of committed rows must be a regular file when
    ``strict`` (a store created with ``chunks_complete``, see the module doc). A directory (or anything but a file)
    in its place is always damage. For a sharded array the file is the shard, and when ``strict`` its index must also
    list every inner chunk of the requested rows (an absent inner chunk reads as the fill value too). Files found
    complete are remembered with the rows checked (committed rows are never deleted by a writer; the last, partial
    file is replaced atomically by one that keeps them).
    """

    def __init__(self, root_dir, array: zarr.Array, strict: bool, io: LocalFiles | RemoteFiles = LOCAL):
        self.dir, self.array, self.strict, self.io = root_dir / array.path, array, strict, io
        shards = getattr(array, "shards", None) if array.ndim else None
        self.sharded = bool(shards)
        self.rows = int(shards[0]) if shards else int(array.chunks[0]) if array.ndim else 1
        self._ok: dict[int, int] = {}  # file index -> rows of it found complete (from its first row)
        self._files: ArrayFiles | None = None

    def problems(self, lo: int, hi: int, first: bool = False) -> list[tuple[int, str]]:
        """``[(file index, what is wrong), ...]`` for the files holding rows ``[lo, hi)``: ``"is missing"`` (only when
        strict), ``"is not a regular file"``, ``"lacks inner chunks of committed rows"`` (strict shards) or ``"has a
        bad index (...)"``; with ``first``, stop at the first damaged file (a hostile zarr.json may claim any number of
        rows)."""
        out: list[tuple[int, str]] = []
        tail = (0,) * max(self.array.ndim - 1, 0)
        for i in range(lo // self.rows, -(-hi // self.rows) if hi > lo else lo // self.rows):
            need = min(hi, (i + 1) * self.rows) - i * self.rows
            if self._ok.get(i, 0) >= need:
                continue
            p = self.dir / self.array.metadata.encode_chunk_key((i, *tail))
            kind = self.io.kind(p)
            if kind == "file":
                what = self._inner(p, need) if self.sharded and self.strict else None
                if what is None:
                    self._ok[i] = need
                else:
                    out.append((i, what))
            elif kind is not None:
                out.append((i, "is not a regular file"))
            elif self.strict:
                out.append((i, "is missing"))
            else:
                self._ok[i] = need  # an old store may not have written an all-fill chunk: it reads as that fill
            if first and out:
                break
        return out

    def _inner(self, path, need: int) -> str | None:
        """None when the shard at ``path`` lists an inner chunk for each of its first ``need`` rows, else what is
        wrong."""
        try:
            if self._files is None:
                self._files = ArrayFiles.load(self.dir, self.io)
            f = self._files
            h = self.io.open(path)
            try:
                index = f.read_index(h)
            finally:
                h.close()
        except Unsupported:
            return None  # a layout zarrio does not parse: zarr's own read reports what it cannot decode
        except (OSError, ValueError) as e:
            return f"has a bad index ({_first_line(e)})"
        if (index[:-(-need // f.inner_rows), 0] == np.iinfo(np.uint64).max).any():
            return "lacks inner chunks of committed rows"
        return None

    def describe(self, lo: int, hi: int) -> str | None:
        """One line naming the first damaged chunk (or shard) file of rows ``[lo, hi)``, or None when all are in
        place."""
        found = self.problems(lo, hi, first=True)
        if not found:
            return None
        i, what = found[0]
        key = self.array.metadata.encode_chunk_key((i, *(0,) * (self.array.ndim - 1)))
        fill = "" if what.startswith("has a bad index") else "; it would read as the fill value"
        return (f"{'shard' if self.sharded else 'chunk'} file {key} (rows {i * self.rows}-"
                f"{min((i + 1) * self.rows, hi) - 1}) {what}{fill}")

    def require(self, lo: int, hi: int) -> None:
        """Raise ConfigError (naming the array) when a chunk of rows ``[lo, hi)`` is missing or not a file."""
        problem = self.describe(lo, hi)
        if problem:
            raise ConfigError(self.array.path, problem, "run `robot-rl store validate PATH`; restore the damaged "
                              "files from a copy of the store (committed chunks are never rewritten)")


class ZarrStore:
    """A demonstration store on disk. Build with :meth:`create` or :meth:`open`, not the constructor.

    Attributes:
        path: store directory (``Path``), or the URL of a remote store (``str``; read-only, see :meth:`open`).
        mode: ``"r"`` (read-only) or ``"a"`` (append; a torn tail was repaired at open).
        version: the store's layout, 1 or 2 (module doc); appends keep it.
    """

    def __init__(self, where: "_Where", group: zarr.Group, mode: str):
        self._where, self.path, self._root, self.mode = where, where.path, group, mode
        self._writers: dict[str, AppendWriter] = {}
        self.refresh()

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | os.PathLike, overwrite: bool = False, *, version: int = VERSION) -> "ZarrStore":
        """Create an empty store at ``path`` (a new or empty directory) and return it open in mode ``"a"``.
        ``version``: the layout (module doc); 1 only to write stores as earlier releases did (tests, comparisons).

        Raises:
            ConfigError: ``path`` is a file; or it is a non-empty directory without ``overwrite=True``; or
                ``overwrite=True`` but the directory is not a robot_rl store or holds files that are not part of one
                (named in the message; nothing is deleted then).
        """
        if version not in READABLE or isinstance(version, bool):
            raise ConfigError("version", f"{version!r} is not a store layout version", f"use one of {READABLE}")
        return cls._create(_local(path), overwrite, append=False, version=version)

    @classmethod
    def _create(cls, path: Path, overwrite: bool, append: bool, version: int = VERSION) -> "ZarrStore":
        if path.exists() and not path.is_dir():
            raise ConfigError("path", f"{path} is a file, not a store directory", "pick a new or empty directory")
        if path.is_dir() and not (path / LOCK_NAME).exists():
            cls._check_replaceable(path, overwrite, append)  # before a lock file is made in someone's directory
        path.mkdir(parents=True, exist_ok=True)
        with writer_lock(path):  # checked again under the lock: another writer may have created it meanwhile
            if cls._check_replaceable(path, overwrite, append):
                for e in path.iterdir():
                    if e.name != LOCK_NAME:
                        shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
                return cls._init_group(path, version)
        return cls.open(path, mode="a")  # created by another writer meanwhile (open takes the lock itself)

    @staticmethod
    def _check_replaceable(path: Path, overwrite: bool, append: bool) -> bool:
        """True when the directory ``path`` may be (emptied and) made a new store; False when it is a store to
        append to (``append`` without ``overwrite``). Raises ConfigError otherwise, deleting nothing."""
        entries = [e.name for e in path.iterdir() if e.name != LOCK_NAME]
        if not entries:
            return True
        if not _is_store(path):
            raise ConfigError("path", f"{path} exists and is not a robot_rl store (holds {_listing(entries)}); "
                              f"refusing to {'delete' if overwrite else 'use'} it",
                              "pass a new or empty directory for the store (or remove that one yourself)")
        if append and not overwrite:
            return False
        if not overwrite:
            raise ConfigError("path", f"{path} already exists (store data is never deleted implicitly)",
                              "pick a new path, open it with ZarrStore.open(path, mode='a'), or pass overwrite=True")
        foreign = foreign_files(path)
        if foreign:
            raise ConfigError("path", f"{path} holds files that are not part of a robot_rl store "
                              f"({_listing(foreign)}); refusing to overwrite it",
                              "move those files out of the store directory, or pick a new path")
        return True

    @classmethod
    def _init_group(cls, path: Path, version: int = VERSION) -> "ZarrStore":
        """A new empty store in the (empty but for the lock file) directory ``path``; call under the writer lock."""
        root = zarr.open_group(str(path), mode="a")
        root.create_group("data")
        meta = root.create_group("meta")
        meta.create_array("episode_ends", shape=(0,), dtype=np.int64, chunks=(META_CHUNK,), fill_value=0)
        if version == 1:
            for name, dt in META_NUM.items():
                meta.create_array(name, shape=(0,), dtype=dt, chunks=(META_CHUNK,), fill_value=dt(0))
            for name in META_STR:
                meta.create_array(name, shape=(0,), dtype=str, chunks=(META_CHUNK,))
        else:
            meta.create_array(META_ROW, shape=(0,), dtype=str, chunks=(META_CHUNK,))
        # the format attrs LAST: a directory is a store (_is_store) only once every array of it exists
        root.attrs.update({"format": FORMAT, "version": version, "schema": {}, COMPLETE_ATTR: True})
        return cls(_where(path), root, "a")

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, overwrite: bool = False) -> "ZarrStore":
        """The store at ``path`` open for appending (mode ``"a"``), created when missing or an empty directory (or,
        with ``overwrite``, replaced: see :meth:`create`). Safe when several processes do this at once (one
        creates, the others append). Raises ConfigError as :meth:`open` / :meth:`create`; a non-empty directory
        that is not a store is refused, naming what it holds."""
        path = _local(path)
        if path.is_dir() and not overwrite and _is_store(path):
            return cls.open(path, mode="a")
        held = [e.name for e in path.iterdir() if e.name != LOCK_NAME] if path.is_dir() else []
        if held and not overwrite and not (path / LOCK_NAME).exists():  # (with a lock file: maybe being created)
            raise ConfigError("path", f"{path} is a directory but not a robot_rl store (it holds {_listing(held)})",
                              "pass a new or empty directory for the store, or the path of an existing store")
        return cls._create(path, overwrite, append=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ZarrStore":
        """Open an existing store. ``mode="a"`` repairs a torn tail (see module doc) before returning.

        Raises:
            ConfigError: bad ``mode``; ``path`` missing, or not a robot_rl store, or a newer format version.
        """
        if mode not in ("r", "a"):
            raise ConfigError("mode", f"{mode!r} is not a store mode", "use 'r' (read) or 'a' (append)")
        where = _existing_store(path, mode)
        path = where.path
        try:
            root = zarr.open_group(where.zarr, mode="r" if mode == "r" else "r+")
            version = root.attrs.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE:
                raise ConfigError("path", f"{path} has store version {version!r}; this code reads versions "
                                  f"{READABLE}", "upgrade robot_rl")
            store = cls(where, root, mode)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged store, said in one line
            raise _damaged(path, e) from None
        if mode == "a":
            with writer_lock(path):
                store.refresh()
                store._repair()
        return store

    def refresh(self) -> None:
        """Re-read the commit marker and reopen arrays (shows episodes committed by another process since open)."""
        w = self._where
        root = zarr.open_group(w.zarr, mode="r" if self.mode == "r" else "r+")
        ends = root["meta/episode_ends"]
        ChunkCheck(w.dir, ends, True, w.io).require(0, ends.shape[0] - 1)  # all but a torn last entry
        raw = np.asarray(ends[:], dtype=np.int64)  # the commit marker is read FIRST
        self._ends = raw[: _committed_prefix(raw)]
        self._open_arrays(root)
        self._writers = {}
        missing = [k for k in self._schema if k not in self._data]
        if missing and len(self._ends):
            raise ConfigError(f"data/{missing[0]}", f"missing from {self.path} (the schema lists it)",
                              "run `robot-rl store validate PATH`; restore the store from a copy")

    def _open_arrays(self, root: zarr.Group) -> None:
        """Take the zarr group, its attributes and arrays from ``root`` (the commit marker is read by the caller)."""
        self._root, self.version = root, int(root.attrs.get("version", 1))
        self._meta = {k: root["meta"][k] for k in ("episode_ends", *_meta_fields(self.version))}
        self._schema_attr = dict(root.attrs.get("schema", {}))
        self._schema = {k: {"dtype": v["dtype"], "shape": tuple(v["shape"])} for k, v in self._schema_attr.items()}
        self._data = {k: root["data"][k] for k in self._schema if k in root["data"]}
        self._strict, self._chunks, self._stale = root.attrs.get(COMPLETE_ATTR) is True, {}, False

    def _fresh(self) -> None:
        """Reopen the zarr arrays after this object wrote files directly (their cached shapes are old); the commit
        this object knows stays."""
        if self._stale:
            self._open_arrays(zarr.open_group(self._where.zarr, mode="r" if self.mode == "r" else "r+"))

    # ------------------------------------------------------------------ read
    @property
    def n_episodes(self) -> int:
        """Number of committed episodes."""
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        """Number of committed steps (``episode_ends[-1]``, 0 when empty)."""
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def episode_ends(self) -> np.ndarray:
        """int64 (E,) exclusive cumulative end index of each committed episode (a copy)."""
        return self._ends.copy()

    @property
    def keys(self) -> list[str]:
        """Sorted data keys of the schema (empty before the first episode)."""
        return sorted(self._schema)

    @property
    def schema(self) -> dict[str, dict[str, Any]]:
        """``{key: {"dtype": str, "shape": tuple}}`` (per-step shape), fixed by the first episode."""
        return {k: dict(v) for k, v in self._schema.items()}

    def __len__(self) -> int:
        return self.n_episodes

    def __repr__(self) -> str:
        return f"ZarrStore({str(self.path)!r}, mode={self.mode!r}, episodes={self.n_episodes}, steps={self.n_steps})"

    def __getitem__(self, key: str) -> CommittedArray:
        """Lazy view of ``data/<key>`` truncated to committed steps. Raises ConfigError for an unknown key."""
        if key not in self._data:
            raise ConfigError("key", f"{key!r} is not in the store", f"use one of {self.keys}")
        self._fresh()
        arr = self._data[key]
        return CommittedArray(arr, self.n_steps, self._chunk_check(arr))

    def frames(self, key: str) -> FrameReader | None:
        """A reader of the committed frames of the image key ``key`` straight from its chunk or shard files
        (:class:`~robot_rl.datasets.zarrio.FrameReader`: ``reader[idx]`` -> (len(idx), H, W, C) uint8; ``.load()``
        keeps the encoded frames in memory), or None when the array is not one frame per (inner) chunk or uses a
        codec that reader does not decode (read it through ``store[key]`` then). Damage raises ConfigError as
        ``store[key]`` does. Raises ConfigError for an unknown key."""
        if key not in self._data:
            raise ConfigError("key", f"{key!r} is not in the store", f"use one of {self.keys}")
        try:
            files = ArrayFiles.load(self._where.dir / "data" / key, self._where.io)
            return FrameReader(files, self.n_steps, self._strict, f"data/{key}")
        except Unsupported:
            return None
        except (OSError, ValueError) as e:
            raise _damaged(self.path, e) from None

    def episode_slice(self, i: int) -> slice:
        """Steps ``slice(start, end)`` of episode ``i`` (negative indices allowed). Raises ConfigError if out of range."""
        i = self._check_episode(i)
        return slice(int(self._ends[i - 1]) if i else 0, int(self._ends[i]))

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """All (or the given) data arrays of episode ``i``: ``{key: (T, *shape)}`` numpy arrays."""
        sl = self.episode_slice(i)
        return {k: self[k][sl] for k in (keys or self.keys)}

    def episode_meta(self, i: int) -> dict[str, Any]:
        """Metadata of episode ``i``: index, seed, success, length, start, end, task, source, backend, robot, extra."""
        i = self._check_episode(i)
        return self._meta_rows(slice(i, i + 1), first=i)[0]

    def episodes_meta(self) -> list[dict[str, Any]]:
        """Metadata of every committed episode (one read per field), see :meth:`episode_meta`."""
        return self._meta_rows(slice(0, self.n_episodes), first=0) if self.n_episodes else []

    def _meta_rows(self, sl: slice, first: int) -> list[dict[str, Any]]:
        self._fresh()
        for k in _meta_fields(self.version):
            self._chunk_check(self._meta[k]).require(sl.start, sl.stop)
        ends = self._ends[sl]
        if self.version >= 2:
            rows = []
            for j, text in enumerate(self._meta[META_ROW][sl]):
                i = first + j
                try:
                    row = _parse_row(str(text))
                except ValueError as e:
                    raise ConfigError(f"meta/{META_ROW}", f"entry {i} is damaged ({e})",
                                      "run `robot-rl store validate PATH`; restore the store from a copy") from None
                rows.append({"index": i, **{k: row[k] for k in ("seed", "success", "length")},
                             "start": int(self._ends[i - 1]) if i else 0, "end": int(ends[j]),
                             **{k: row[k] for k in ("task", "source", "backend", "robot", "extra")}})
            return rows
        cols = {k: self._meta[k][sl] for k in (*META_NUM, *META_STR)}
        rows = []
        for j, end in enumerate(ends):
            i = first + j
            rows.append({"index": i, "seed": int(cols["episode_seed"][j]),
                         "success": bool(cols["episode_success"][j]), "length": int(cols["episode_length"][j]),
                         "start": int(self._ends[i - 1]) if i else 0, "end": int(end),
                         **{k[len("episode_"):]: str(cols[k][j]) for k in META_STR if k != "episode_extra"},
                         "extra": json.loads(str(cols["episode_extra"][j]) or "{}")})
        return rows

    def _chunk_check(self, arr: zarr.Array) -> ChunkCheck:
        if arr.path not in self._chunks:
            self._chunks[arr.path] = ChunkCheck(self._where.dir, arr, self._strict, self._where.io)
        return self._chunks[arr.path]

    def _check_episode(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or not -self.n_episodes <= i < self.n_episodes:
            raise ConfigError("episode", f"index {i!r} out of range for {self.n_episodes} episodes",
                              f"use 0..{self.n_episodes - 1}")
        return int(i) % self.n_episodes

    # ------------------------------------------------------------------ write
    def add_episode(self, data: dict[str, np.ndarray], *, seed: int, task: str, source: str, success: bool,
                    backend: str, robot: str = "panda", extra: dict | None = None) -> int:
        """Append one episode atomically (for readers) and return its index.

        Args:
            data: ``{key: (T, *shape) array}``, T >= 1 and equal for all keys. ``action`` (float, (T, A), finite) is
                required; ``intervention`` (bool (T,)) defaults to all False; ``human_action`` (T, A) is optional
                (NaN-filled when absent). Keys/dtypes/per-step shapes must match the store schema (fixed by the
                first episode); floating arrays are cast to the schema's float dtype (float32 for actions).
            seed: reset seed. task/backend/robot: non-empty names. source: one of ``SOURCES``.
            success: task success. extra: JSON-serialisable dict (e.g. randomisation parameters).

        Raises:
            ConfigError: read-only store or any bad input (names the field/key, expected vs got). Nothing is
                written when validation fails. Also after waiting ``LOCK_TIMEOUT_S`` for another writer.
            OSError: the file system refused a write (full disk, permissions; ``filename`` is the store when the
                error had none): the episode is not committed, the store stays valid (a torn tail at most).
        """
        if self.mode != "a":
            raise ConfigError("mode", "store is open read-only", "open it with ZarrStore.open(path, mode='a')")
        try:
            with writer_lock(self.path), zarr.config.set(_WRITE_ALL):
                self._sync()  # under the lock: episodes other writers committed since open
                return self._append(data, seed=seed, task=task, source=source, success=success, backend=backend,
                                    robot=robot, extra=extra)
        except OSError as e:  # e.g. ENOSPC: nothing committed (episode_ends is written last); say which store
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def _append(self, data, *, seed, task, source, success, backend, robot, extra) -> int:
        data, schema = self._validated(data)
        meta_str = {"episode_task": _name("task", task), "episode_source": source,
                    "episode_backend": _name("backend", backend), "episode_robot": _name("robot", robot),
                    "episode_extra": _encode_extra(extra)}
        if source not in SOURCES:
            raise ConfigError("source", f"{source!r} is not a known episode source", f"use one of {list(SOURCES)}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ConfigError("seed", f"expected an int, got {type(seed).__name__}", "pass the integer reset seed")
        if not isinstance(success, (bool, np.bool_)):
            raise ConfigError("success", f"expected a bool, got {type(success).__name__}", "pass True or False")

        T, E, n0 = len(data["action"]), self.n_episodes, self.n_steps
        meta = {"episode_seed": int(seed), "episode_success": bool(success), "episode_length": T, **meta_str}
        if self.version >= 2:
            meta = {META_ROW: json.dumps({k[len("episode_"):]: v for k, v in meta.items() if k != "episode_extra"}
                                         | {"extra": json.loads(meta_str["episode_extra"])}, sort_keys=True,
                                         allow_nan=False)}
        if schema != self._schema:  # first episode, or first episode with human_action
            if E == 0:
                for k in list(self._root["data"].array_keys()):
                    del self._root["data"][k]
                    self._writers.pop(f"data/{k}", None)
                self._data = {}
            self._schema_attr = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in schema.items()}
            self._root.attrs["schema"] = self._schema_attr
            self._schema = schema
        added = [k for k in schema if k not in self._data]
        for k in added:
            self._data[k] = _create_data_array(self._root["data"], k, schema[k], self.version, data[k])
        if self.version >= 2:
            return self._append_files(data, meta, added, T, E, n0)
        for k, spec in schema.items():
            arr = self._data[k]
            arr.resize((n0 + T, *spec["shape"]))
            if k in added and n0:  # human_action first given after n0 steps: write the earlier (NaN) chunks too, so
                rows = int(arr.chunks[0])  # that none is missing (a missing chunk of committed steps is damage)
                for a in range(0, n0, rows):
                    arr[a:min(a + rows, n0)] = arr.fill_value
            arr[n0:n0 + T] = data[k]
        for k, value in meta.items():
            self._meta[k].resize((E + 1,))
            self._meta[k][E] = value
        ends = self._meta["episode_ends"]  # commit marker LAST
        ends.resize((E + 1,))
        ends[E] = n0 + T
        self._ends = np.append(self._ends, np.int64(n0 + T))
        return E

    def _sync(self) -> None:
        """Under the writer lock: bring this object to the store's last commit. Version 2: when neither the schema
        nor the length of ``meta/episode_ends`` changed since this object's last write or refresh (nobody else
        committed: a commit always grows it), two small file reads; otherwise (and for version 1) a full refresh."""
        if self.version >= 2:
            try:
                group = json.loads((self.path / "zarr.json").read_text())
                ends = json.loads((self.path / "meta" / "episode_ends" / "zarr.json").read_text())
                if group["attributes"].get("schema") == self._schema_attr and ends["shape"] == [self.n_episodes]:
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the full refresh below reports what is wrong
        self.refresh()

    def _writer(self, name: str) -> AppendWriter:
        """The AppendWriter of array ``name`` (``data/<key>`` or ``meta/<field>``), kept between episodes."""
        w = self._writers.get(name)
        if w is None:
            try:
                w = self._writers[name] = AppendWriter(ArrayFiles.load(self.path / name), name)
            except (Unsupported, OSError, ValueError) as e:
                raise ConfigError(name, f"cannot be appended to ({_first_line(e)})",
                                  "run `robot-rl store validate PATH`; copy the store with `robot-rl store migrate`"
                                  ) from None
        return w

    def _append_files(self, data: dict[str, np.ndarray], meta: dict[str, Any], added: list[str], T: int, E: int,
                      n0: int) -> int:
        """Version 2: write episode ``E`` (rows ``[n0, n0 + T)``) through :class:`AppendWriter`: one write per array,
        in the commit order of the module doc (data, then per-episode metadata, then ``meta/episode_ends``)."""
        for k, spec in self._schema.items():
            w, values, start = self._writer(f"data/{k}"), data[k], n0
            if n0 and (k in added or w.files.shape[0] < n0):
                if k not in OPTIONAL_KEYS:
                    raise ConfigError(f"data/{k}", f"has {w.files.shape[0]} steps, {n0} are committed",
                                      "run `robot-rl store validate PATH`; restore the store from a copy")
                # first given after n0 steps (or its first writer was killed): the earlier steps are written as
                # the fill value too, so that no committed row lacks its chunk
                values = np.concatenate([np.broadcast_to(w.files.empty_chunk(1), (n0, *values.shape[1:])), values])
                start = 0
            w.write(start, values)
            w.reserve(n0 + T, w.files.file_rows * -(-TIME_CHUNK // w.files.file_rows))  # capacity (module doc)
        w = self._writer(f"meta/{META_ROW}")
        w.write(E, np.array([meta[META_ROW]], dtype=object))
        w.reserve(E + 1, META_CHUNK)
        w = self._writer("meta/episode_ends")  # commit marker LAST: its chunk, then its zarr.json (the commit)
        w.write(E, np.array([n0 + T], np.int64))
        w.set_shape(E + 1)
        self._ends = np.append(self._ends, np.int64(n0 + T))
        self._stale = True  # the zarr arrays this object holds still have their old shapes
        return E

    def _validated(self, data: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """Check ``data`` against the schema; return (arrays ready to write, schema after this episode)."""
        if not isinstance(data, dict) or "action" not in data:
            raise ConfigError("data", "an episode needs a dict with an 'action' array", "pass {'action': (T, A), ...}")
        out = {}
        for k, v in data.items():
            if not isinstance(k, str) or not k or "/" in k or k.startswith((".", "__")):
                raise ConfigError("data", f"bad key {k!r}", "use a non-empty name without '/' (e.g. 'image_front')")
            v = np.asarray(v)
            if v.ndim == 0 or v.dtype.kind not in "biuf":
                raise ConfigError(f"data[{k!r}]", f"expected a numeric (T, ...) array, got dtype {v.dtype} "
                                  f"shape {v.shape}", "stack per-step values along a first time axis")
            out[k] = v
        T = len(out["action"])
        bad = {k: len(v) for k, v in out.items() if len(v) != T}
        if T == 0 or bad:
            raise ConfigError("data", f"arrays must share one length >= 1; action has {T}, others {bad}",
                              "pass the same number of steps for every key")
        out["action"] = out["action"].astype(np.float32)
        if not np.all(np.isfinite(out["action"])):
            raise ConfigError("data['action']", "contains NaN or inf", "fix the controller/teleop output")
        out["intervention"] = out.get("intervention", np.zeros(T, bool))
        if out["intervention"].dtype.kind != "b" or out["intervention"].shape != (T,):
            raise ConfigError("data['intervention']", f"expected bool ({T},), got {out['intervention'].dtype} "
                              f"{out['intervention'].shape}", "pass a boolean per-step flag array")
        a_shape = out["action"].shape[1:]
        schema = dict(self._schema) if self.n_episodes else {}
        if not schema:
            schema = {k: {"dtype": "float32" if k in ("action", "human_action") else str(v.dtype),
                          "shape": v.shape[1:]} for k, v in out.items()}
        if "human_action" in out and "human_action" not in schema:
            schema["human_action"] = {"dtype": "float32", "shape": a_shape}
        if "human_action" in schema and "human_action" not in out:
            out["human_action"] = np.full((T, *a_shape), np.nan, np.float32)
        if "human_action" in schema and out["human_action"].shape[1:] != tuple(a_shape):
            raise ConfigError("data['human_action']", f"shape {out['human_action'].shape} does not match action "
                              f"{out['action'].shape}", "give the human command in the action space")
        if set(out) != set(schema):
            raise ConfigError("data", f"keys {sorted(out)} do not match the store schema {sorted(schema)} "
                              f"(missing {sorted(set(schema) - set(out))}, unexpected {sorted(set(out) - set(schema))})",
                              "record the same keys as the first episode, or use a new store")
        for k, spec in schema.items():
            v, want = out[k], np.dtype(spec["dtype"])
            if v.dtype != want and v.dtype.kind == want.kind == "f":
                v = out[k] = v.astype(want)
            if v.dtype != want or v.shape[1:] != tuple(spec["shape"]):
                raise ConfigError(f"data[{k!r}]", f"expected {want} per-step shape {tuple(spec['shape'])}, "
                                  f"got {v.dtype} {v.shape[1:]}", "match the store schema (see `robot-rl info`)")
        return out, schema

    # ------------------------------------------------------------------ repair / inspect
    def _repair(self) -> None:
        """Truncate everything beyond the commit (mode 'a' only). Committed data is never touched: a store with
        errors (not just a torn tail) is refused before anything is modified."""
        errors = [p for p in self.validate() if p.startswith("error")]
        if errors:
            raise ConfigError("path", f"{self.path} is damaged, not appending ({'; '.join(errors[:3])})",
                              "open it with mode='r' and copy the good episodes into a new store; nothing was modified")
        E, N = self.n_episodes, self.n_steps
        for name, arr in self._meta.items():  # version 2: the per-episode arrays' length is a capacity
            if arr.shape[0] > E and (self.version == 1 or name == "episode_ends"):
                arr.resize((E,))
        if E == 0 and self._schema:  # a first episode that never committed: forget its schema and arrays
            for k in list(self._root["data"].array_keys()):
                del self._root["data"][k]
            self._root.attrs["schema"] = {}
            self._schema, self._schema_attr, self._data = {}, {}, {}
        for arr in self._data.values():
            if arr.shape[0] > N and self.version == 1:
                arr.resize((N, *arr.shape[1:]))
        for p in self.path.rglob("*.partial"):  # temp files of writes killed before their rename
            p.unlink(missing_ok=True)

    def validate(self) -> list[str]:
        """Check the store; return problems, each prefixed ``"error: "`` or ``"warning: "`` (empty = healthy).

        Errors: bad format attrs, non-monotonic ``episode_ends``, arrays shorter than the commit, schema mismatch,
        per-episode length mismatch, unknown source, bad extra JSON, NaN/inf in ``action``, a chunk file of
        committed steps missing or not a regular file (see :class:`ChunkCheck`). Warnings: a torn tail
        (uncommitted data from an interrupted write; harmless, truncated by opening in mode ``"a"``).
        """
        return validate_store(self.path)

    def info(self) -> dict[str, Any]:
        """Summary: path, version (layout), episodes, steps, keys ({key: {dtype, shape}}), success_rate (None when
        empty), successes (count), sources / tasks / backends (episode counts), by_source / by_task ({name:
        {"episodes": n, "successes": k}}), size_bytes (on disk; None for a remote store that cannot be listed)."""
        meta = self.episodes_meta()

        def tally(field: str) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for m in meta:
                row = out.setdefault(m[field], {"episodes": 0, "successes": 0})
                row["episodes"] += 1
                row["successes"] += int(m["success"])
            return dict(sorted(out.items()))

        return {"path": str(self.path), "version": self.version, "episodes": self.n_episodes, "steps": self.n_steps,
                "keys": self.schema,
                "success_rate": float(np.mean([m["success"] for m in meta])) if meta else None,
                "successes": sum(int(m["success"]) for m in meta),
                "sources": dict(Counter(m["source"] for m in meta)),
                "tasks": dict(Counter(m["task"] for m in meta)),
                "backends": dict(Counter(m["backend"] for m in meta)),
                "by_source": tally("source"), "by_task": tally("task"),
                "size_bytes": self._size()}

    def _size(self) -> int | None:
        """Bytes of the store's files; None where the filesystem cannot list them (plain HTTP)."""
        files = self._where.io.walk(self._where.dir)
        return sum(size for _, size in files) if files or not self._where.io.remote else None


def validate_store(path: str | os.PathLike) -> list[str]:
    """Check a store on disk without opening it for use (so that damage is reported, not raised); return
    problems, each prefixed ``"error: "`` or ``"warning: "`` (empty = healthy). See :meth:`ZarrStore.validate`;
    every data chunk of the committed steps is also read and decoded."""
    where = _existing_store(path)
    out: list[str] = []
    try:
        root = zarr.open_group(where.zarr, mode="r")
        version = root.attrs.get("version")
        if root.attrs.get("format") != FORMAT or isinstance(version, bool) or version not in READABLE:
            out.append(f"error: group attrs format/version are {root.attrs.get('format')!r}/{root.attrs.get('version')!r}")
        raw = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
        E = _committed_prefix(raw)
        ends, N = raw[:E], int(raw[E - 1]) if E else 0
        torn = E == len(raw) - 1 and raw[-1] == 0
        if E < len(raw) and torn:
            out.append(f"warning: torn tail: meta/episode_ends has an unwritten entry {E} (not committed)")
        elif E < len(raw):  # corrupt, not a crash: check lengths against what the marker claims
            out.append(f"error: meta/episode_ends is not strictly increasing at index {E} "
                       f"({raw[max(E - 1, 0):E + 1].tolist()}); only {E} episodes are trusted")
            ends, E, N = raw, len(raw), int(raw.max())
        fields = _meta_fields(version if version in READABLE else VERSION)
        for k in fields:
            if k not in root["meta"]:
                out.append(f"error: meta/{k} is missing")
                continue
            n = root["meta"][k].shape[0]
            if n < E:
                out.append(f"error: meta/{k} has {n} entries, {E} episodes are committed")
            elif n > E and version == 1:  # version 2: the length is a capacity (module doc)
                out.append(f"warning: torn tail: meta/{k} has {n - E} uncommitted entries")
        schema = dict(root.attrs.get("schema", {}))
        if E and "action" not in schema:
            out.append("error: schema has no 'action' key")
        for k in sorted(set(schema) | set(root["data"].array_keys())):
            if k not in schema:
                out.append(f"error: data/{k} is not in the schema")
                continue
            if k not in root["data"]:
                if E:
                    out.append(f"error: data/{k} is missing")
                continue
            arr, spec = root["data"][k], schema[k]
            if str(arr.dtype) != spec["dtype"] or list(arr.shape[1:]) != list(spec["shape"]):
                out.append(f"error: data/{k} is {arr.dtype} {arr.shape[1:]}, schema says {spec['dtype']} "
                           f"{tuple(spec['shape'])}")
            if arr.shape[0] < N:
                out.append(f"error: data/{k} has {arr.shape[0]} steps, {N} are committed")
            elif arr.shape[0] > N and version == 1:
                out.append(f"warning: torn tail: data/{k} has {arr.shape[0] - N} uncommitted steps")
        partial = sorted(name for name, _ in where.io.walk(where.dir) if name.endswith(".partial"))
        if partial:
            out.append(f"warning: torn tail: {len(partial)} temp file(s) of an interrupted write ({_listing(partial)})")
        if E and all(k in root["meta"] for k in fields) and root["meta"][fields[0]].shape[0] >= E:
            if version == 1:
                lengths = root["meta/episode_length"][:E]
                sources = {str(s) for s in root["meta/episode_source"][:E]}
                if sources - set(SOURCES):
                    out.append(f"error: unknown episode sources {sorted(sources - set(SOURCES))}")
                for i, s in enumerate(root["meta/episode_extra"][:E]):
                    try:
                        json.loads(str(s) or "{}")
                    except ValueError:
                        out.append(f"error: meta/episode_extra[{i}] is not valid JSON")
            else:
                lengths = np.full(E, -1, np.int64)
                for i, s in enumerate(root[f"meta/{META_ROW}"][:E]):
                    try:
                        lengths[i] = _parse_row(str(s))["length"]
                    except ValueError as e:
                        out.append(f"error: meta/{META_ROW}[{i}] is damaged ({e})")
            bad = np.flatnonzero(np.diff(ends, prepend=0) != lengths)
            if bad.size:
                out.append(f"error: the episode lengths in meta disagree with episode_ends at episodes "
                           f"{bad[:10].tolist()}")
            if "action" in root["data"] and root["data/action"].shape[0] >= N:
                act = root["data/action"][:N]
                bad_steps = np.flatnonzero(~np.isfinite(act.reshape(N, -1)).all(axis=1))
                if bad_steps.size:
                    out.append(f"error: data/action has NaN/inf at {bad_steps.size} steps (first {bad_steps[0]})")
    except Exception as e:  # noqa: BLE001 - whatever is unreadable is reported, never raised
        out.append(f"error: store metadata cannot be read ({_first_line(e)})")
        return out
    strict = root.attrs.get(COMPLETE_ATTR) is True
    ends_arr = root["meta/episode_ends"]
    checks = [(ends_arr, max(ends_arr.shape[0] - 1, 0), True)]  # its last entry may be a torn (unwritten) one
    checks += [(root["meta"][k], min(E, root["meta"][k].shape[0]), strict) for k in fields
               if k in root["meta"]]
    checks += [(root["data"][k], min(N, root["data"][k].shape[0]), strict) for k in schema if k in root["data"]]
    for arr, n, strict_k in checks:
        problem = ChunkCheck(where.dir, arr, strict_k, where.io).describe(0, n)
        if problem:
            out.append(f"error: {arr.path}: {problem}")
    for k in schema:
        if k in root["data"]:
            arr = root["data"][k]
            step = max(1, min(N, 256))
            for a in range(0, min(N, arr.shape[0]), step):
                try:
                    arr[a:a + step]
                except Exception as e:  # noqa: BLE001
                    out.append(f"error: data/{k} steps {a}-{min(a + step, N) - 1} cannot be read ({_first_line(e)})")
                    break
    return out



@dataclass(frozen=True)
class _Where:
    """Where a store lives: ``path`` as the user named it (``Path``, or the URL), ``dir`` the root as ``io`` paths,
    ``io`` the file access (:class:`LocalFiles` / :class:`RemoteFiles`), ``zarr`` what ``zarr.open_group`` takes."""
    path: Path | str
    dir: Path | RemotePath
    io: LocalFiles | RemoteFiles
    zarr: Any


def is_url(path: str | os.PathLike) -> bool:
    """True for a remote store URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://``...; not ``file://``)."""
    m = _URL.match(str(path)) if isinstance(path, str) else None
    return bool(m) and m.group(1).lower() != "file"


def _where(path: str | os.PathLike) -> _Where:
    if not is_url(path):
        p = Path(str(path)[len("file://"):] if str(path).startswith("file://") else path)
        return _Where(p, p, LOCAL, str(p))
    url = str(path).rstrip("/")
    try:
        import fsspec
        fs, root = fsspec.core.url_to_fs(url)
        store = zarr.storage.FsspecStore.from_url(url, read_only=True)
    except (ImportError, ValueError) as e:  # unknown protocol, or its filesystem package is not installed
        raise ConfigError("path", f"cannot open {url} ({_first_line(e)})",
                          "install the filesystem for the URL's scheme (`pip install robot_rl[remote]` gives s3fs "
                          "and aiohttp; gcsfs for gs://), or copy the store to a local directory") from None
    return _Where(url, RemotePath(root), RemoteFiles(fs), store)


def _local(path: str | os.PathLike) -> Path:
    """``path`` as a local directory to write; ConfigError for a remote URL (remote stores are read-only)."""
    if is_url(path):
        raise ConfigError("path", f"{path} is remote; remote stores are read-only",
                          "write to a local store, then upload it (e.g. `aws s3 sync DIR s3://...`)")
    return _where(path).path


def _existing_store(path: str | os.PathLike, mode: str = "r") -> _Where:
    """Where the store at ``path`` (a directory or a URL) lives; ConfigError when it does not exist or is not a
    robot_rl store, or when a remote store is to be written (``mode="a"``)."""
    where = _where(path)
    if where.io.remote:
        if mode != "r":
            _local(path)  # raises
        try:
            where.io.read(where.dir / "zarr.json")
        except FileNotFoundError:
            raise ConfigError("path", f"no store at {where.path} (no zarr.json there)", _FIX_CREATE) from None
        except Exception as e:  # noqa: BLE001 - network, credentials, endpoint: said in one line
            raise ConfigError("path", f"{where.path} cannot be read ({_first_line(e)})",
                              "check the URL and the credentials / endpoint fsspec uses (for S3: AWS_ACCESS_KEY_ID, "
                              "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
    elif not where.path.exists():
        raise ConfigError("path", f"store {where.path} does not exist", _FIX_CREATE)
    if not _is_store(where.dir, where.io):
        raise ConfigError("path", f"{where.path} is not a robot_rl store (no zarr group with format={FORMAT!r})",
                          f"point at a store directory; {_FIX_CREATE}")
    return where


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _damaged(path: Path, e: BaseException) -> ConfigError:
    return ConfigError("path", f"{path} is damaged ({_first_line(e)})",
                       "run `robot-rl store validate PATH` to see what; committed episodes are never rewritten, so "
                       "restore the damaged files from a copy")


def format_info(info: dict[str, Any]) -> str:
    """Short human-readable text for :meth:`ZarrStore.info`: totals, then episodes and successes per source and per
    task, episode counts per backend, and the keys."""
    rate = "n/a" if info["success_rate"] is None else f"{100 * info['success_rate']:.1f}%"
    counts = lambda d: ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
    size = "size unknown" if info["size_bytes"] is None else next(
        f"{info['size_bytes'] / 2**e:.1f} {u} on disk" for e, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
        if info["size_bytes"] >= 2**e or e == 0)
    total = f" ({info['successes']}/{info['episodes']})" if "successes" in info and info["episodes"] else ""
    layout = f" (layout {info['version']})" if "version" in info else ""
    lines = [f"store    {info['path']}{layout}",
             f"         {info['episodes']} episodes, {info['steps']} steps, success {rate}{total}, {size}"]
    for label, by, plain in (("sources", "by_source", "sources"), ("tasks", "by_task", "tasks")):
        rows = info.get(by)
        if not rows:
            lines.append(f"{label:<8} {counts(info[plain])}")
            continue
        width = max(len(name) for name in rows)
        for j, (name, r) in enumerate(rows.items()):
            lines.append(f"{label if j == 0 else '':<8} {name:<{width}} {r['episodes']:>6} episodes "
                         f"{r['successes']:>6} successful ({100 * r['successes'] / r['episodes']:.1f}%)")
    lines += [f"backends {counts(info.get('backends', {}))}", "keys"]
    lines += [f"  {k:<20} {v['dtype']:<8} {tuple(v['shape'])}" for k, v in sorted(info["keys"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------- helpers
@contextmanager
def writer_lock(path: str | os.PathLike, timeout: float | None = None):
    """Hold the exclusive writer lock of the store directory ``path`` (``fcntl.flock`` on ``path/.writer.lock``,
    created when missing) for the ``with`` block; wait up to ``timeout`` s (default ``LOCK_TIMEOUT_S``) for another
    holder. Not re-entrant (a second hold from the same process waits for the first). Raises ConfigError (field
    ``path``) on timeout; OSError (e.g. PermissionError on a read-only store) when the lock file cannot be opened."""
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    fd = os.open(Path(path) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never through a link
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 >= timeout:
                    raise ConfigError("path", f"another process has been writing to {path} for over {timeout:.0f} s "
                                      "(it holds the store's writer lock)", "wait for it to finish (or stop it), "
                                      "then run again; nothing was written") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


_OURS_DIR = re.compile(r"(data|meta)(/[^/]+(/c(/[0-9]+)*)?)?")
_OURS_FILE = re.compile(r"zarr\.json|(data|meta)(/[^/]+)?/zarr\.json|(data|meta)/[^/]+/c(/[0-9]+)+")
_PARTIAL = re.compile(r"(.*)\.[0-9a-f]{32}\.partial")


def foreign_files(path: str | os.PathLike) -> list[str]:
    """Paths (relative, sorted) under the store directory ``path`` that a robot_rl store never writes: anything
    but zarr metadata, chunk files of ``data/*`` and ``meta/*``, the writer lock and temp files (``*.partial``) of
    interrupted writes. Symbolic links are foreign. ``--overwrite`` refuses a store that holds any."""
    root, out = Path(path), []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel = (lambda n: n if rel_dir == "." else f"{rel_dir}/{n}")  # noqa: E731
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)) or not _OURS_DIR.fullmatch(rel(d)):
                out.append(rel(d) + "/")
                dirnames.remove(d)
        for f in filenames:
            r = rel(f)
            tmp = _PARTIAL.fullmatch(r)  # zarr's temp file "<name minus suffix>.<hex>.partial"
            ours = r == LOCK_NAME or _OURS_FILE.fullmatch(r) or (
                tmp is not None and (_OURS_FILE.fullmatch(tmp[1]) or _OURS_FILE.fullmatch(tmp[1] + ".json")))
            if os.path.islink(os.path.join(dirpath, f)) or not ours:
                out.append(r)
    return sorted(out)


def _listing(names, most: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _is_store(path, io: LocalFiles | RemoteFiles = LOCAL) -> bool:
    try:
        attrs = json.loads(io.read(path / "zarr.json"))
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and attrs.get("node_type") == "group" and \
        attrs.get("attributes", {}).get("format") == FORMAT


def _meta_fields(version: int) -> tuple[str, ...]:
    """Names of the per-episode metadata arrays of a store of layout ``version`` (``meta/episode_ends`` aside)."""
    return (*META_NUM, *META_STR) if version == 1 else (META_ROW,)


def _parse_row(text: str) -> dict[str, Any]:
    """One ``meta/episodes`` entry (version 2) as a dict of ``ROW_FIELDS``. Raises ValueError saying what is wrong
    (not JSON, not an object, a missing field or one of another type, an unknown source)."""
    row = json.loads(text)
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    for k, t in ROW_FIELDS.items():
        v = row.get(k)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise ValueError(f"field {k!r} is {v!r}, expected {t.__name__}")
    if row["source"] not in SOURCES:
        raise ValueError(f"unknown source {row['source']!r}")
    return row


def _committed_prefix(raw: np.ndarray) -> int:
    """Length of the prefix of ``raw`` that is positive and strictly increasing (the committed episodes)."""
    ok = np.diff(raw, prepend=0) > 0
    return int(np.argmin(ok)) if not ok.all() else len(raw)


def _create_data_array(group: zarr.Group, key: str, spec: dict, version: int, first: np.ndarray) -> zarr.Array:
    """Create the empty ``data/<key>`` array of a store of layout ``version`` (see the module doc); ``first``: the
    values of the episode that creates it (version-2 frames: their codec is chosen on them, see
    :func:`image_codec`)."""
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    fill = np.nan if key == "human_action" else dtype.type(0)
    if is_image(dtype, shape):
        frame = (1, *shape)
        if version == 1:  # one file per frame; bitshuffle: slower, larger
            return group.create_array(key, shape=(0, *shape), dtype=dtype, chunks=frame, fill_value=fill,
                                      compressors=BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"))
        rows = image_shard_rows(shape)
        return group.create_array(key, shape=(0, *shape), dtype=dtype, chunks=frame, shards=(rows, *shape),
                                  compressors=BloscCodec(**image_codec(first)), fill_value=fill)
    step_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    chunks = (max(1, min(TIME_CHUNK, MAX_CHUNK_BYTES // max(step_bytes, 1))), *shape)
    return group.create_array(key, shape=(0, *shape), dtype=dtype, chunks=chunks, fill_value=fill,
                              compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))


def image_codec(frames: np.ndarray, sample: int = 16) -> dict[str, Any]:
    """The Blosc settings (one of ``IMAGE_CODECS``) for a version-2 image array whose first episode has ``frames``
    (T, H, W, C) uint8: lz4hc when up to ``sample`` frames spread over the episode compress to at most
    ``IMAGE_CODEC_GAIN`` of lz4's bytes (rendered or clean frames), else lz4 (sensor noise: lz4hc would cost ~15x
    the time for ~1 % of bytes). Both decode at about the same speed."""
    pick = frames[np.linspace(0, len(frames) - 1, min(sample, len(frames))).astype(int)]
    sizes = []
    with single_threaded_blosc():
        for cfg in IMAGE_CODECS:
            codec = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=numcodecs.Blosc.NOSHUFFLE)
            sizes.append(sum(len(codec.encode(np.ascontiguousarray(f))) for f in pick))
    return dict(IMAGE_CODECS[0] if sizes[0] <= IMAGE_CODEC_GAIN * sizes[1] else IMAGE_CODECS[1])


def image_shard_rows(shape: tuple[int, ...]) -> int:
    """Frames per shard file of a version-2 image array with per-step ``shape`` (H, W, C): ``IMAGE_SHARD_BYTES`` of
    decoded frames (96x96x3: 606), between 1 and ``IMAGE_SHARD_FRAMES`` (its index: 16 bytes per frame)."""
    return max(1, min(IMAGE_SHARD_FRAMES, IMAGE_SHARD_BYTES // max(1, int(np.prod(shape, dtype=np.int64)))))


def _name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, f"expected a non-empty string, got {value!r}", f"pass the {field} name")
    return value


def _encode_extra(extra: dict | None) -> str:
    if extra is None:
        return "{}"
    if not isinstance(extra, dict):
        raise ConfigError("extra", f"expected a dict, got {type(extra).__name__}", "pass a JSON-serialisable dict")

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.dumps(extra, sort_keys=True, default=default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError("extra", f"not JSON-serialisable ({e})",
                          "use str/int/float (finite)/bool/list/dict/numpy values") from None
