"""Direct chunk and shard I/O for the zarr v3 arrays of a store directory: the store's write path and its frame reads.

zarr-python 3 spends about a millisecond of event-loop and codec-pipeline overhead per array call and per chunk
(measured: 8 of the 8.4 s of a 50-episode write were ``sync()``), so the store writes and reads the files of the
arrays it created itself, in the zarr v3 format that zarr reads back:

- :class:`ArrayFiles` parses one array's ``zarr.json`` (shape, data type, fill value, chunk grid, chunk key encoding,
  codecs, a ``sharding_indexed`` codec) and encodes / decodes one chunk with numcodecs (codecs ``bytes``,
  ``vlen-utf8``, ``blosc``, ``zstd``, ``crc32c``; anything else raises :class:`Unsupported`, and the store then uses
  zarr itself).
- :class:`AppendWriter` writes rows ``[start, start + n)`` of one array: every chunk (or shard) file that holds them
  and then ``zarr.json`` with the new shape, each file replaced atomically (temp file + rename, the temp file named
  as zarr's ``LocalStore`` names it: ``<name minus suffix>.<32 hex>.partial``). Rows below ``start`` are kept as they
  are: the encoded frames of a shard keep their bytes AND their offsets (a reader holding the shard's previous index
  reads the same bytes from the new file), a partially filled unsharded chunk is decoded and re-encoded with the
  new rows (a chunk file is read by one ``open``, so readers never mix two versions of it).
- :class:`FrameReader` reads rows of an array whose chunks (or inner chunks of shards) hold one row each (camera
  frames): per frame one ``pread`` of its encoded bytes and one decode; the index of a shard is read once per
  version of the shard file (identified by inode, size and mtime). :meth:`FrameReader.load` keeps the encoded frames
  of the committed rows in memory (:class:`FrameCache`): the size of the store's frames, decoded per window.

Files are reached through a :class:`LocalFiles` (``os`` calls, one ``pread`` per frame on an open descriptor) or a
:class:`RemoteFiles` (any fsspec filesystem: ``s3://``, ``gs://``, ``http(s)://``; one ranged read per frame, one
whole-file read per shard in :meth:`FrameReader.load`): both read the same paths (``Path`` locally, ``PurePosixPath``
inside the remote filesystem, a :class:`RemotePath`). Writes are local only.

Shard file (zarr v3 ``sharding_indexed``, index at the end): the encoded inner chunks, then the index, uint64
little-endian ``(chunks_per_shard..., 2)`` = (offset, nbytes) per inner chunk (2**64-1 twice: absent), followed by
its CRC32C (4 bytes, little-endian). Blosc calls run single-threaded (``numcodecs.blosc.use_threads = False`` around
them), so a DataLoader worker forked from a process that encoded frames never waits on blosc's global thread pool.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import google_crc32c  # a dependency of zarr >= 3.1 (its crc32c codec)
import numcodecs
import numpy as np
from numcodecs import blosc as _blosc

from robot_rl.errors import ConfigError

MAX_U64 = 2**64 - 1
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class Unsupported(Exception):
    """The array uses a codec or layout this module does not write or read itself (use zarr for it)."""


@contextmanager
def single_threaded_blosc():
    """Run the block with numcodecs' blosc calls single-threaded (its context API): fork-safe, and frames are
    smaller than one blosc block anyway."""
    prev = _blosc.use_threads
    _blosc.use_threads = False
    try:
        yield
    finally:
        _blosc.use_threads = prev


def atomic_write(path: Path, data, mkdir: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (temp file in the same directory + ``os.replace``); parents are
    created unless ``mkdir`` is False. The temp file is named like zarr's (``path.with_suffix(".<hex>.partial")``),
    so the store's foreign-file check and tail repair recognise one left by a killed writer. No fsync: safe against
    a killed process, as zarr's LocalStore."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class NotRegularFile(OSError):
    """The path exists but is not a regular file (a directory, a device...)."""


class _LocalHandle:
    def __init__(self, fd: int, st: os.stat_result):
        self.fd, self.size, self.ident = fd, st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        os.close(self.fd)


class LocalFiles:
    """Read access to files on this machine (paths are ``Path``)."""

    remote = False

    def kind(self, path) -> str | None:
        """``"file"`` (a regular file, links followed), ``"other"`` (exists, not a regular file) or None (absent)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return "other" if os.path.lexists(path) else None
        return "file" if stat.S_ISREG(st.st_mode) else "other"

    def read(self, path) -> bytes:
        """The whole file. Raises FileNotFoundError, or OSError (e.g. a directory)."""
        return Path(path).read_bytes()

    def size(self, path) -> int:
        return os.stat(path).st_size

    def open(self, path) -> _LocalHandle:
        """A handle with ``size``, ``ident`` (changes when the file is replaced) and ``pread(n, offset)``; close it.
        Raises FileNotFoundError, NotRegularFile, or OSError."""
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotRegularFile(str(path))
        return _LocalHandle(fd, st)

    def walk(self, root) -> list[tuple[str, int]]:
        """``[(path relative to root, size), ...]`` of every file below ``root``."""
        root = Path(root)
        return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file()]


class _RemoteHandle:
    def __init__(self, fs, path: str, info: dict):
        self.fs, self.path, self.size = fs, path, int(info["size"])
        self.ident = (info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"), self.size)

    def pread(self, n: int, offset: int) -> bytes:
        return self.fs.cat_file(self.path, start=offset, end=offset + n)

    def close(self) -> None:
        pass


class RemotePath(str):
    """A path inside a remote filesystem (a key, or a whole URL for HTTP); ``/`` joins with one slash and keeps a
    URL's ``//`` (``PurePosixPath`` would fold it)."""

    def __truediv__(self, other) -> "RemotePath":
        return RemotePath(self.rstrip("/") + "/" + str(other).lstrip("/"))


class RemoteFiles:
    """Read access to files of an fsspec filesystem (paths are :class:`RemotePath` in it): S3 (s3fs), GCS
    (gcsfs), HTTP(S) (aiohttp), ``memory://``... Credentials and endpoints come from fsspec's usual sources (the
    filesystem's environment variables, e.g. ``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID``, or ``FSSPEC_<PROTOCOL>_*``
    options)."""

    remote = True

    def __init__(self, fs):
        self.fs = fs

    def _info(self, path) -> dict:
        return self.fs.info(str(path))

    def kind(self, path) -> str | None:
        try:
            return "file" if self._info(path)["type"] == "file" else "other"
        except FileNotFoundError:
            return None

    def read(self, path) -> bytes:
        return self.fs.cat_file(str(path))  # one GET; an absent key raises FileNotFoundError

    def size(self, path) -> int:
        return int(self._info(path)["size"])

    def open(self, path) -> _RemoteHandle:
        info = self._info(path)
        if info["type"] != "file":
            raise NotRegularFile(str(path))
        return _RemoteHandle(self.fs, str(path), info)

    def walk(self, root) -> list[tuple[str, int]]:
        root = str(root).rstrip("/")
        found = self.fs.find(root, detail=True)
        return [(k[len(root) + 1:] if k.startswith(root + "/") else k, int(v.get("size") or 0))
                for k, v in found.items() if v.get("type") == "file"]


LOCAL = LocalFiles()


def _fill_value(value: Any, dtype: np.dtype) -> Any:
    if dtype == object:
        return "" if value is None else value
    if isinstance(value, str):
        if value in ("NaN", "Infinity", "-Infinity"):
            return dtype.type({"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[value])
        if value.startswith("0x"):  # float given by its bit pattern
            bits = int(value, 16).to_bytes(dtype.itemsize, "big")
            return np.frombuffer(bits, dtype.newbyteorder(">"))[0].astype(dtype)
        raise Unsupported(f"fill value {value!r}")
    return dtype.type(0 if value is None else value)


class _Chain:
    """One (inner) chunk's codec chain: an array-to-bytes codec (``bytes`` or ``vlen-utf8``) then bytes-to-bytes
    codecs (``blosc``, ``zstd``, ``crc32c``). ``encode(chunk)`` takes a full chunk; ``decode(data, out)`` fills
    ``out`` (the chunk shape) or returns a new array."""

    def __init__(self, codecs: list[dict], dtype: np.dtype, shape: tuple[int, ...]):
        if not codecs:
            raise Unsupported("no codecs")
        self.dtype, self.shape = dtype, tuple(shape)
        first, rest = codecs[0], codecs[1:]
        name = first.get("name")
        if name == "bytes":
            endian = (first.get("configuration") or {}).get("endian", "little")
            if dtype == object:
                raise Unsupported("bytes codec on strings")
            self.raw = dtype.newbyteorder("<" if endian == "little" else ">")
            self.vlen = None
        elif name == "vlen-utf8" and dtype == object:
            self.raw, self.vlen = None, numcodecs.VLenUTF8()
        else:
            raise Unsupported(f"array-to-bytes codec {name!r}")
        self.b2b: list[tuple[str, Any]] = []
        for c in rest:
            cfg = c.get("configuration") or {}
            if c.get("name") == "blosc":
                kw = {"cname": cfg["cname"], "clevel": int(cfg["clevel"]), "shuffle": _SHUFFLE[cfg["shuffle"]],
                      "blocksize": int(cfg.get("blocksize", 0))}
                try:
                    codec = numcodecs.Blosc(**kw, typesize=int(cfg.get("typesize") or max(dtype.itemsize, 1)))
                except TypeError:  # numcodecs < 0.16: typesize comes from the input array
                    codec = numcodecs.Blosc(**kw)
                self.b2b.append(("blosc", codec))
            elif c.get("name") == "zstd":
                self.b2b.append(("zstd", numcodecs.Zstd(level=int(cfg.get("level", 0)),
                                                        checksum=bool(cfg.get("checksum", False)))))
            elif c.get("name") == "crc32c":
                self.b2b.append(("crc32c", None))
            else:
                raise Unsupported(f"codec {c.get('name')!r}")
        self.blosc_only = self.vlen is None and [n for n, _ in self.b2b] == ["blosc"]

    def encode(self, chunk: np.ndarray) -> bytes:
        if self.vlen is not None:
            data = self.vlen.encode(np.asarray(chunk, dtype=object).reshape(-1))
        else:
            data = np.ascontiguousarray(chunk, dtype=self.raw)
        for name, codec in self.b2b:
            if name == "crc32c":
                data = bytes(data) + np.uint32(google_crc32c.value(bytes(data))).tobytes()
            else:
                data = codec.encode(data)
        return bytes(data)

    def decode(self, data, out: np.ndarray | None = None) -> np.ndarray:
        if self.blosc_only and out is not None and out.dtype == self.raw and out.flags.c_contiguous:
            _blosc.decompress(data, out)  # the hot path of frame reads: no numcodecs wrapper
            return out
        for j in range(len(self.b2b) - 1, -1, -1):
            name, codec = self.b2b[j]
            if name == "crc32c":
                body = bytes(data[:-4])
                if np.uint32(google_crc32c.value(body)).tobytes() != bytes(data[-4:]):
                    raise ValueError("crc32c checksum mismatch")
                data = body
            elif j == 0 and self.vlen is None and out is not None and name == "blosc" and \
                    out.dtype == self.raw and out.flags.c_contiguous:
                codec.decode(data, out=out)  # straight into the caller's frame
                return out
            else:
                data = codec.decode(data)
        if self.vlen is not None:
            arr = self.vlen.decode(data).reshape(self.shape)
        else:
            buf = data if isinstance(data, (bytes, bytearray, memoryview)) else np.ascontiguousarray(data)
            arr = np.frombuffer(buf, dtype=self.raw).reshape(self.shape)
        if out is None:
            return arr.astype(self.dtype) if arr.dtype != self.dtype else arr.copy()
        out[...] = arr
        return out


class ArrayFiles:
    """The files of one zarr v3 array of a local directory store, from its ``zarr.json``.

    Attributes:
        dir: array directory (``Path``, or a :class:`RemotePath` in ``io``'s filesystem); io: :class:`LocalFiles` or
        :class:`RemoteFiles`; doc: the parsed ``zarr.json``; shape, dtype (numpy; ``object`` for strings), fill.
        file_rows: rows per chunk file (the shard's rows when sharded); inner_rows: rows per (inner) chunk.
        sharded: bool; n_inner: inner chunks per shard (1 when not sharded).

    Raises:
        Unsupported: a layout or codec not handled here (chunks that split a non-time axis, a transpose codec...).
    """

    def __init__(self, array_dir, doc: dict, io: "LocalFiles | RemoteFiles" = LOCAL):
        self.dir, self.doc, self.io = array_dir if io.remote else Path(array_dir), doc, io
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
            raise Unsupported("not a zarr v3 array")
        dt = doc["data_type"]
        self.dtype = np.dtype(object) if dt == "string" else np.dtype(dt if isinstance(dt, str) else "invalid")
        self.shape = tuple(int(s) for s in doc["shape"])
        if not self.shape:
            raise Unsupported("0-d array")
        grid = doc["chunk_grid"]
        if grid.get("name") != "regular":
            raise Unsupported("irregular chunk grid")
        chunk = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        if chunk[1:] != self.shape[1:]:
            raise Unsupported("chunks split a per-step axis")
        enc = doc.get("chunk_key_encoding", {})
        sep = (enc.get("configuration") or {}).get("separator", "/")
        if enc.get("name") != "default" or sep not in ("/", "."):
            raise Unsupported(f"chunk key encoding {enc!r}")
        self._sep, self._tail = sep, (0,) * (len(self.shape) - 1)
        self.fill = _fill_value(doc.get("fill_value"), self.dtype)
        codecs = doc["codecs"]
        self.file_rows = chunk[0]
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            inner = tuple(int(c) for c in cfg["chunk_shape"])
            if inner[1:] != self.shape[1:] or self.file_rows % inner[0]:
                raise Unsupported("inner chunks split a per-step axis")
            self.sharded, self.inner_rows = True, inner[0]
            self.n_inner = self.file_rows // self.inner_rows
            self.chain = _Chain(cfg["codecs"], self.dtype, inner)
            index_codecs = [c.get("name") for c in cfg.get("index_codecs", [])]
            if index_codecs not in (["bytes"], ["bytes", "crc32c"]) or \
                    (cfg["index_codecs"][0].get("configuration") or {}).get("endian", "little") != "little":
                raise Unsupported(f"shard index codecs {cfg.get('index_codecs')!r}")
            self.index_crc = index_codecs[-1] == "crc32c"
            self.index_at_end = cfg.get("index_location", "end") == "end"
            self.index_nbytes = 16 * self.n_inner + 4 * self.index_crc
        else:
            self.sharded, self.inner_rows, self.n_inner = False, self.file_rows, 1
            self.chain = _Chain(codecs, self.dtype, chunk)

    @classmethod
    def load(cls, array_dir, io: "LocalFiles | RemoteFiles" = LOCAL) -> "ArrayFiles":
        """Parse ``array_dir/zarr.json``. Raises OSError / ValueError (unreadable) or Unsupported."""
        return cls(array_dir, json.loads(io.read(array_dir / "zarr.json")), io)

    def key(self, i: int) -> str:
        """Relative key of chunk (or shard) file ``i`` along the time axis (e.g. ``c/3/0/0/0``)."""
        return "c" + self._sep + self._sep.join(str(c) for c in (i, *self._tail))

    def file(self, i: int):
        """Path of chunk (or shard) file ``i`` (in ``io``)."""
        return self.dir / self.key(i)

    def with_shape(self, n: int) -> dict:
        """A copy of ``zarr.json`` with ``n`` rows."""
        return {**self.doc, "shape": [int(n), *self.shape[1:]]}

    def empty_chunk(self, rows: int | None = None) -> np.ndarray:
        """A fill-valued chunk of ``rows`` (default: one inner chunk) rows."""
        out = np.empty((self.inner_rows if rows is None else rows, *self.shape[1:]), self.dtype)
        out[...] = self.fill
        return out

    # ---------------------------------------------------------------- shards
    def parse_index(self, tail: bytes, file_size: int) -> np.ndarray:
        """uint64 (n_inner, 2) (offset, nbytes) from the index bytes of a shard of ``file_size`` bytes. Raises
        ValueError for a bad checksum or entries pointing outside the file."""
        if len(tail) != self.index_nbytes:
            raise ValueError(f"shard of {file_size} bytes is shorter than its index ({self.index_nbytes} bytes)")
        body = tail[:16 * self.n_inner]
        if self.index_crc and np.uint32(google_crc32c.value(body)).tobytes() != tail[-4:]:
            raise ValueError("shard index checksum mismatch")
        index = np.frombuffer(body, "<u8").reshape(self.n_inner, 2).astype(np.uint64)
        present = index[:, 0] != MAX_U64
        start = 0 if self.index_at_end else self.index_nbytes
        end = file_size - self.index_nbytes if self.index_at_end else file_size
        if present.any():
            off, size = index[present, 0], index[present, 1]
            if off.min() < start or (off + size).max() > end:
                raise ValueError("shard index points outside the shard")
        return index

    def read_index(self, handle) -> np.ndarray:
        """The index of the shard open as ``handle`` (``io.open``; see :meth:`parse_index`)."""
        at = handle.size - self.index_nbytes if self.index_at_end else 0
        return self.parse_index(handle.pread(self.index_nbytes, max(at, 0)) if at >= 0 else b"", handle.size)

    def build_shard(self, prefix: bytes, entries: list[tuple[int, int]], new: list[bytes]) -> bytes:
        """Shard bytes (index at the end): ``prefix`` (kept verbatim, so the ``entries`` (offset, nbytes) of the first
        inner chunks stay valid) followed by the encoded inner chunks ``new``; later inner chunks are absent."""
        if not self.index_at_end:
            raise Unsupported("writing a shard whose index is at the start")
        index = np.full((self.n_inner, 2), MAX_U64, np.uint64)
        if entries:
            index[:len(entries)] = np.asarray(entries, np.uint64)
        pos, parts = len(prefix), [prefix]
        for j, enc in enumerate(new, start=len(entries)):
            index[j] = (pos, len(enc))
            parts.append(enc)
            pos += len(enc)
        body = index.astype("<u8").tobytes()
        parts.append(body)
        if self.index_crc:
            parts.append(np.uint32(google_crc32c.value(body)).tobytes())
        return b"".join(parts)


class AppendWriter:
    """Writes rows of one array (see the module doc); not thread-safe; hold the store's writer lock while using it.

    The tail (the last, partially filled chunk or shard) written last is kept in memory, so appending the next
    rows reads nothing from disk; :meth:`write` with another ``start`` reads that file first. A committed row that
    is missing from disk (a missing file or an absent inner chunk) raises ConfigError: appending never papers over
    damage.
    """

    def __init__(self, files: ArrayFiles, name: str):
        self.files, self.name = files, name
        self._tail: tuple[int, int, bytes, list, np.ndarray | None] | None = None  # (file, rows, prefix, entries, part)
        self._dirs: set[Path] = set()  # directories known to exist

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``values`` (n, *shape) as rows ``[start, start + n)``; rows ``< start`` of the touched files are
        kept (read from the tail kept in memory or from disk). ``zarr.json`` is not touched: call :meth:`set_shape`
        or :meth:`reserve` after. Raises ConfigError when a kept row is missing or damaged on disk, OSError when a
        write fails (the file is then as it was)."""
        f, n = self.files, len(values)
        end, R, C = start + n, f.file_rows, f.inner_rows
        with single_threaded_blosc():
            for k in range(start // R, -(-end // R)):
                k0 = k * R
                a, b = max(start, k0), min(end, k0 + R)
                prefix, entries, part = self._committed(k, a - k0) if a > k0 else (b"", [], None)
                rows = values[a - start:b - start]
                if part is not None and len(part):
                    rows = np.concatenate([part, rows])
                q = len(entries)  # whole committed inner chunks kept as they are
                new, full = [], (b - k0) // C
                for j in range(q, -(-(b - k0) // C)):
                    chunk = rows[(j - q) * C:(j - q + 1) * C]
                    if len(chunk) < C:
                        padded = f.empty_chunk()
                        padded[:len(chunk)] = chunk
                        chunk = padded
                    new.append(f.chain.encode(chunk))
                if f.sharded:
                    data = f.build_shard(prefix, entries, new)
                else:
                    data = new[0]
                path = f.file(k)
                atomic_write(path, data, mkdir=path.parent not in self._dirs)
                self._dirs.add(path.parent)
                if b < k0 + R:  # this file stays partial: remember what the next append keeps
                    if f.sharded:
                        keep, pos = list(entries), len(prefix)
                        for enc in new[:full - q]:
                            keep.append((pos, len(enc)))
                            pos += len(enc)
                        tail_prefix = prefix + b"".join(new[:full - q])
                    else:
                        keep, tail_prefix = [], b""
                    tail_part = rows[(full - q) * C:] if (b - k0) % C else None
                    self._tail = (k, b, tail_prefix, keep, None if tail_part is None else tail_part.copy())
                else:
                    self._tail = None

    def set_shape(self, n: int) -> None:
        """Write ``zarr.json`` with ``n`` rows (atomically)."""
        doc = self.files.with_shape(n)
        atomic_write(self.files.dir / "zarr.json", json.dumps(doc, indent=2).encode(), mkdir=False)
        self.files.doc, self.files.shape = doc, (int(n), *self.files.shape[1:])

    def reserve(self, n: int, step: int) -> None:
        """Make the array at least ``n`` rows long: when it is shorter, write ``zarr.json`` with ``n`` rounded up to a
        multiple of ``step`` (so the shape changes once per ``step`` rows, not once per append)."""
        if self.files.shape[0] < n:
            self.set_shape(-(-n // step) * step)

    def _committed(self, k: int, p: int) -> tuple[bytes, list[tuple[int, int]], np.ndarray | None]:
        """What file ``k`` keeps of its first ``p`` rows: (verbatim byte prefix, (offset, nbytes) of the whole inner
        chunks in it, decoded rows of the partial inner chunk or None)."""
        t = self._tail
        if t is not None and t[0] == k and t[1] - k * self.files.file_rows == p:
            return t[2], t[3], t[4]
        f, C = self.files, self.files.inner_rows
        path = f.file(k)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._damage(k, "is missing or not a file") from None
        if not f.sharded:
            try:
                return b"", [], f.chain.decode(data)[:p]
            except Exception as e:  # noqa: BLE001
                raise self._damage(k, f"cannot be decoded ({type(e).__name__})") from None
        try:
            index = f.parse_index(data[-f.index_nbytes:] if f.index_at_end else data[:f.index_nbytes], len(data))
        except ValueError as e:
            raise self._damage(k, f"has a bad index ({e})") from None
        q, r = p // C, p % C
        if (index[:q + (r > 0), 0] == MAX_U64).any():
            raise self._damage(k, f"lacks inner chunks of its first {p} rows")
        entries = [(int(o), int(s)) for o, s in index[:q]]
        stop = max((o + s for o, s in entries), default=0)
        part = None
        if r:
            o, s = (int(x) for x in index[q])
            try:
                part = f.chain.decode(data[o:o + s])[:r]
            except Exception as e:  # noqa: BLE001
                raise self._damage(k, f"cannot be decoded ({type(e).__name__})") from None
        return data[:stop], entries, part

    def _damage(self, k: int, what: str) -> ConfigError:
        return ConfigError(self.name, f"{self.files.key(k)} {what}; it holds committed rows",
                           "run `robot-rl store validate PATH`; restore the store from a copy")


class FrameReader:
    """Rows of an array whose (inner) chunks hold one row each, read from its files (local or remote) without zarr
    (module doc).

    ``reader[idx]`` (idx: int array of rows ``< n``) returns ``(len(idx), *shape)`` in the array's dtype; repeated
    consecutive rows (edge padding) are decoded once. A missing chunk or shard file, or an absent inner chunk, of a
    requested row raises ConfigError naming the array when ``strict`` (reads as the fill value otherwise); a file
    that is not a regular file, a bad shard index or an undecodable frame always raises ConfigError.

    Attributes:
        n, shape (per row), dtype, name (``data/<key>``).
    """

    def __init__(self, files: ArrayFiles, n: int, strict: bool, name: str):
        if files.inner_rows != 1 or files.dtype == object:
            raise Unsupported("frames need one row per (inner) chunk")
        self.files, self.n, self.strict, self.name = files, int(n), strict, name
        self.shape, self.dtype = files.shape[1:], files.dtype
        self._index: dict[int, tuple[tuple, np.ndarray]] = {}  # file -> (ident, index)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> np.ndarray:
        idx = committed_rows(idx, self.n)
        if len(idx) > 16 and np.any(np.diff(idx) < 0):  # a batch of windows: each file opened once per call
            rows, inverse = np.unique(idx, return_inverse=True)
            return self[rows][inverse]
        out = np.empty((len(idx), *self.shape), self.dtype)
        R = self.files.file_rows
        with single_threaded_blosc():
            j = 0
            while j < len(idx):  # rows of one file are read through one open descriptor
                k = int(idx[j]) // R
                e = j + 1
                while e < len(idx) and int(idx[e]) // R == k:
                    e += 1
                self._read_file(k, idx[j:e], out[j:e])
                j = e
        return out

    def _read_file(self, k: int, rows: np.ndarray, out: np.ndarray) -> None:
        f = self.files
        try:
            h = f.io.open(f.file(k))
        except FileNotFoundError:
            if self.strict:
                raise self._error(k, "is missing; it would read as the fill value") from None
            out[...] = f.fill
            return
        except OSError:
            raise self._error(k, "is not a regular file") from None
        try:
            if f.sharded:
                index = self._shard_index(k, h)
            prev = -1
            for j, row in enumerate(rows):
                row = int(row)
                if row == prev:
                    out[j] = out[j - 1]
                    continue
                prev = row
                if f.sharded:
                    off, size = index[row % f.file_rows]
                    if off == MAX_U64:
                        if self.strict:
                            raise self._error(k, f"lacks row {row}; it would read as the fill value")
                        out[j] = f.fill
                        continue
                    data = h.pread(int(size), int(off))
                else:
                    data = h.pread(h.size, 0)
                try:
                    f.chain.decode(data, out=out[j])
                except Exception as e:  # noqa: BLE001 - damaged bytes
                    raise self._error(k, f"cannot be decoded at row {row} ({type(e).__name__})") from None
        finally:
            h.close()

    def _shard_index(self, k: int, h) -> np.ndarray:
        hit = self._index.get(k)
        if hit is not None and hit[0] == h.ident:
            return hit[1]
        try:
            index = self.files.read_index(h)
        except ValueError as e:
            raise self._error(k, f"has a bad index ({e})") from None
        self._index[k] = (h.ident, index)
        return index

    def _error(self, k: int, what: str) -> ConfigError:
        R = self.files.file_rows
        return ConfigError(self.name, f"{'shard' if self.files.sharded else 'chunk'} file {self.files.key(k)} (rows "
                           f"{k * R}-{min((k + 1) * R, self.n) - 1}) {what}",
                           "run `robot-rl store validate PATH`; restore the damaged files from a copy of the store")

    def encoded_nbytes(self) -> int:
        """Bytes on disk of the files holding the committed rows (a stat per file)."""
        total = 0
        for k in range(-(-self.n // self.files.file_rows)):
            try:
                total += self.files.io.size(self.files.file(k))
            except OSError:
                pass
        return total

    def load(self) -> "FrameCache":
        """The encoded frames of every committed row, in memory (:class:`FrameCache`). Raises as ``reader[...]``."""
        f, R = self.files, self.files.file_rows
        parts, lengths = [], np.zeros(self.n, np.int64)
        for k in range(-(-self.n // R)):
            rows = range(k * R, min((k + 1) * R, self.n))
            try:
                data = f.io.read(f.file(k))
            except FileNotFoundError:
                if self.strict:
                    raise self._error(k, "is missing; it would read as the fill value") from None
                continue  # zero-length frames decode as the fill value
            except OSError:
                raise self._error(k, "is not a regular file") from None
            if not f.sharded:
                parts.append(data)
                lengths[k] = len(data)
                continue
            try:
                index = f.parse_index(data[-f.index_nbytes:] if f.index_at_end else data[:f.index_nbytes], len(data))
            except ValueError as e:
                raise self._error(k, f"has a bad index ({e})") from None
            view = memoryview(data)
            for row in rows:
                off, size = index[row - k * R]
                if off == MAX_U64:
                    if self.strict:
                        raise self._error(k, f"lacks row {row}; it would read as the fill value")
                    continue
                parts.append(view[int(off):int(off + size)])
                lengths[row] = int(size)
        buf = np.frombuffer(b"".join(parts), np.uint8)
        return FrameCache(f, buf, np.concatenate([[0], np.cumsum(lengths)]), self.name)


def committed_rows(idx, n: int) -> np.ndarray:
    """Row indices as int64 (k,); raises IndexError for one outside the ``n`` committed rows."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"rows out of range for {n} committed steps")
    return idx


class FrameCache:
    """The encoded frames of an array's committed rows in memory; ``cache[idx]`` decodes them like
    :class:`FrameReader` (a zero-length frame decodes as the fill value). ``nbytes``: the memory it holds."""

    def __init__(self, files: ArrayFiles, buf: np.ndarray, offsets: np.ndarray, name: str):
        self.files, self.buf, self.offsets, self.name = files, buf, offsets, name
        self.n, self.shape, self.dtype = len(offsets) - 1, files.shape[1:], files.dtype
        self.nbytes = int(buf.nbytes + offsets.nbytes)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> np.ndarray:
        idx = committed_rows(idx, self.n)
        out = np.empty((len(idx), *self.shape), self.dtype)
        mv, off, chain = memoryview(self.buf), self.offsets, self.files.chain
        with single_threaded_blosc():
            prev = -1
            for j, row in enumerate(idx.tolist()):
                if row == prev:
                    out[j] = out[j - 1]
                    continue
                prev = row
                a, b = int(off[row]), int(off[row + 1])
                if a == b:
                    out[j] = self.files.fill
                    continue
                try:
                    chain.decode(mv[a:b], out=out[j])
                except Exception as e:  # noqa: BLE001
                    raise ConfigError(self.name, f"frame {row} cannot be decoded ({type(e).__name__})",
                                      "run `robot-rl store validate PATH`") from None
        return out
