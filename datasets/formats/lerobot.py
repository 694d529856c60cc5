"""LeRobot dataset v3.0 (``codebase_version`` "v3.0") <-> robot_rl episodes, with pyarrow and PyAV only.

The layout follows LeRobot's published v3.0 spec as lerobot 0.4.4 writes it (``LeRobotDataset.create``,
``save_episode``, ``finalize``; checked against a dataset written by lerobot 0.4.4 itself)::

    meta/info.json                               codebase_version, fps, robot_type, totals, paths, features
    meta/stats.json                              {feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}
    meta/tasks.parquet                           task_index (int64), the language string as pandas index
    meta/episodes/chunk-000/file-000.parquet     one row per episode: tasks, length, data/video file indices,
                                                 dataset_from/to_index, videos/<key>/from/to_timestamp, stats/...
    data/chunk-000/file-000.parquet              one row per frame, one row group per episode
    videos/<key>/chunk-000/file-000.mp4          every episode of one camera, concatenated

Key mapping (robot_rl store <-> LeRobot feature):

| robot_rl | LeRobot v3.0 |
|---|---|
| ``action`` float32 (T, A) | ``action`` float32 [A] |
| ``state`` (T, D) | ``observation.state`` [D] |
| ``<name>`` (T, D) or (T,), any other low-dim key | ``observation.<name>`` [D] or [1] (a scalar column) |
| ``image_<cam>`` uint8 (T, H, W, 3) RGB | ``observation.images.<cam>``, dtype ``video`` (mp4) |
| ``intervention`` bool (T,) | ``robot_rl.intervention`` bool [1] |
| ``human_action`` float32 (T, A), NaN where no human acted | ``robot_rl.human_action`` float32 [A] |
| meta ``extra["language_instruction"]``, else ``task`` | ``tasks`` (meta/tasks.parquet, ``task_index``) |
| meta seed, task, source, success, backend, robot, extra | ``robot_rl/meta`` column of meta/episodes (JSON) |

Import: a LeRobot task string goes to ``extra["language_instruction"]`` and ``task`` stays unset (the caller's
default fills it), ``robot_type`` becomes ``robot``, unless the ``robot_rl/meta`` column is present (then it gives
the metadata as exported). Image features (dtype ``image``, PNG in parquet) are read too; an image/video feature
``observation.<n>`` outside ``observation.images.`` becomes ``image_<n>``. (T, 1) arrays come back as (T,).
Any other LeRobot feature keeps its name (e.g. ``next.reward``); ``string`` features are skipped. Features with a
``robot_rl`` prefix are ignored by lerobot's policies (``dataset_to_policy_features`` keeps only ``observation*``
and ``action*``), and lerobot reads meta/episodes with ``datasets``, where extra columns are harmless.

Stats: as lerobot 0.4.4's ``compute_stats`` (per episode over all frames; images sampled by ``sample_indices``,
per channel, shape (3, 1, 1), scaled to [0, 1]; quantiles from a 5000-bin histogram; dataset stats folded episode
by episode with ``aggregate_stats``). Two deliberate differences: image ``std`` is computed in float64 (lerobot
squares uint8 pixels, which wraps and usually reports 0), and the ``robot_rl.*`` features get no stats (not
training inputs; ``human_action`` holds NaN). Video: one PyAV-encoded mp4 per episode (``g``, ``crf``, preset 12
for SVT-AV1, pts = frame_index, so timestamps are frame_index / fps), remuxed without re-encoding into one file
per camera, as lerobot's ``concatenate_video_files`` does. Lossy: decoded frames differ from the written ones
(AV1 crf 30: mean abs error about 2 uint8 levels). One chunk-000/file-000 per kind; files are not rolled at
``data_files_size_in_mb`` / ``video_files_size_in_mb`` (lerobot reads larger files fine).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from robot_rl.datasets.formats import META_FIELDS, Episode
from robot_rl.errors import ConfigError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE, DATA_FILES_MB, VIDEO_FILES_MB = 1000, 100, 200  # lerobot 0.4.4 defaults (written to info.json)
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
IMAGES = "observation.images."
META_COLUMN = "robot_rl/meta"
EXTRA_FEATURES = {"intervention": "robot_rl.intervention", "human_action": "robot_rl.human_action"}
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
HIST_BINS = 5000
ENCODERS = {"libsvtav1": "libsvtav1", "av1": "libsvtav1", "libx264": "libx264", "h264": "libx264"}
V30_FIX = ("convert it with lerobot >= 0.4: python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
           "--repo-id=ID --root=PATH --push-to-hub=false")


def lerobot_key(key: str) -> str:
    """LeRobot feature name of store key ``key`` (see the module table)."""
    if key in EXTRA_FEATURES:
        return EXTRA_FEATURES[key]
    if key.startswith("image_"):
        return IMAGES + key[len("image_"):]
    return key if key == "action" else f"observation.{key}"


def store_key(feature: str, dtype: str) -> str:
    """Store key of LeRobot feature ``feature`` of dtype ``dtype`` (see the module table)."""
    extra = {v: k for k, v in EXTRA_FEATURES.items()}
    if feature in extra:
        return extra[feature]
    if dtype in ("video", "image"):
        return "image_" + feature.removeprefix(IMAGES).removeprefix("observation.")
    return feature.removeprefix("observation.")


# ---------------------------------------------------------------------------------------------------- statistics
def feature_stats(flat: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """lerobot 0.4.4 ``get_feature_stats`` of ``flat`` (N, D) along axis 0 (same dtypes, so the same bits).

    Returns {min, max, mean, std: (D,), count: [count], q01..q99: (D,)}; quantiles from a histogram of
    HIST_BINS bins over [min - 1e-10, max + 1e-10], linearly interpolated inside a bin."""
    lo, hi, mean = flat.min(0), flat.max(0), flat.mean(0)
    if len(flat) < 2:  # lerobot's _compute_basic_stats: quantiles = mean
        out = {"min": lo, "max": hi, "mean": mean, "std": flat.std(0), "count": np.array([count])}
        return {**out, **{q: mean.copy() for q in QUANTILES}}
    std = np.sqrt(np.maximum(0, (flat ** 2).mean(0) - mean ** 2))
    out = {"min": lo, "max": hi, "mean": mean, "std": std, "count": np.array([count])}
    qs = np.empty((len(QUANTILES), flat.shape[1]))
    for j in range(flat.shape[1]):
        edges = np.linspace(lo[j] - 1e-10, hi[j] + 1e-10, HIST_BINS + 1)
        cum = np.cumsum(np.histogram(flat[:, j], bins=edges)[0])
        for i, q in enumerate(QUANTILES.values()):
            target = q * len(flat)
            k = int(np.searchsorted(cum, target))
            if k == 0 or k >= len(cum):
                qs[i, j] = edges[0] if k == 0 else edges[-1]
                continue
            inbin = cum[k] - cum[k - 1]
            frac = (target - cum[k - 1]) / inbin if inbin else 0.0
            qs[i, j] = edges[k] + frac * (edges[k + 1] - edges[k])
    return {**out, **{name: qs[i] for i, name in enumerate(QUANTILES)}}


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 frames (T, H, W, C) as lerobot 0.4.4 ``compute_episode_stats`` (sampled frames,
    downsampled from 300 px, scaled to [0, 1], shape (C, 1, 1)), but with std computed in float64."""
    n = len(frames) if len(frames) < 100 else max(100, min(int(len(frames) ** 0.75), 10_000))
    imgs = frames[np.round(np.linspace(0, len(frames) - 1, n)).astype(int)]
    h, w = imgs.shape[1:3]
    if max(h, w) >= 300:
        f = int(w / 150) if w > h else int(h / 150)
        imgs = imgs[:, ::f, ::f]
    stats = feature_stats(imgs.reshape(-1, imgs.shape[-1]).astype(np.float64), n)
    return {k: v if k == "count" else (v / 255.0).reshape(-1, 1, 1) for k, v in stats.items()}


def aggregate_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lerobot 0.4.4 ``aggregate_feature_stats([a, b])``: count-weighted mean, pooled variance and quantiles."""
    counts = np.stack([a["count"], b["count"]])
    total = counts.sum(0)
    means = np.stack([a["mean"], b["mean"]])
    c = counts.reshape(counts.shape + (1,) * (means.ndim - counts.ndim))
    mean = (means * c).sum(0) / total
    var = ((np.stack([a["std"] ** 2, b["std"] ** 2]) + (means - mean) ** 2) * c).sum(0) / total
    out = {"min": np.minimum(a["min"], b["min"]), "max": np.maximum(a["max"], b["max"]), "mean": mean,
           "std": np.sqrt(var), "count": total}
    return {**out, **{q: (np.stack([a[q], b[q]]) * c).sum(0) / total for q in QUANTILES}}


# ---------------------------------------------------------------------------------------------------- video
def encode_episode(frames: np.ndarray, fps: int, encoder: str, crf: int, gop: int, pix_fmt: str) -> io.BytesIO:
    """One episode's uint8 RGB frames (T, H, W, 3) as an in-memory mp4 (pts = frame index, time base 1/fps).
    Raises ConfigError when the encoder refuses the settings or the frame size."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints info lines on stderr otherwise
    opts = {"g": str(gop), "crf": str(crf), **({"preset": "12"} if encoder == "libsvtav1" else {})}
    buf = io.BytesIO()
    try:
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream(encoder, rate=fps, options=opts)
            stream.pix_fmt, stream.height, stream.width = pix_fmt, frames.shape[1], frames.shape[2]
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    except (av.FFmpegError, ValueError) as e:
        raise ConfigError("vcodec", f"{encoder} cannot encode {frames.shape[2]}x{frames.shape[1]} {pix_fmt} frames "
                          f"with crf={crf} g={gop} ({e})", "use even frame sizes, pix_fmt yuv420p, or vcodec libx264"
                          ) from None
    buf.seek(0)
    return buf


class VideoAppender:
    """One camera's mp4 file: episode mp4s appended by remuxing (no re-encoding), timestamps shifted by the
    duration so far, like lerobot 0.4.4 ``concatenate_video_files``."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.stream, self.offset, self.seconds = path, None, 0, 0.0
        self.out = av.open(str(path), "w", options={"movflags": "faststart"})

    def append(self, episode_mp4: io.BytesIO) -> tuple[float, float]:
        """Append one episode; returns its (from_timestamp, to_timestamp) in this file, seconds."""
        with av.open(episode_mp4) as inp:
            src = inp.streams.video[0]
            if self.stream is None:
                self.stream = self.out.add_stream_from_template(src, opaque=True)
                self.stream.time_base = src.time_base
            for pkt in inp.demux(src):
                if pkt.dts is None:  # flush packet
                    continue
                pkt.pts, pkt.dts, pkt.stream = pkt.pts + self.offset, pkt.dts + self.offset, self.stream
                self.out.mux(pkt)
            start, self.offset = self.seconds, self.offset + src.duration
            self.seconds = start + float(src.duration * src.time_base)  # lerobot: get_video_duration_in_s
        return start, self.seconds

    def close(self) -> None:
        """Write the file's index (moov); safe to call twice."""
        if self.out is not None:
            self.out.close()
            self.out = None


class VideoCursor:
    """Sequential frame reader of one camera: episodes are read in file order, so each mp4 is decoded once (a jump
    backwards or to another file reopens and seeks to the keyframe before the episode)."""

    def __init__(self):
        self.path, self.container, self.frames, self.head = None, None, iter(()), None

    def read(self, path: Path, start: float, n: int, fps: float) -> np.ndarray:
        """The ``n`` frames at ``start + i / fps`` s of ``path``: uint8 RGB (n, H, W, 3). Raises ConfigError when
        the file is missing or does not hold them."""
        if path != self.path or self.head is None or self.head.time > start + 0.5 / fps:
            self._open(path, start)
        out: list[np.ndarray] = []
        while self.head is not None:
            i = round((self.head.time - start) * fps)
            if i >= n:
                break
            if i == len(out):
                out.append(self.head.to_ndarray(format="rgb24"))
            self.head = next(self.frames, None)
        if len(out) != n:
            raise ConfigError(str(path), f"holds {len(out)} of the {n} frames from t={start:.4f} s at {fps} fps",
                              "check videos/*/from_timestamp in meta/episodes, or re-encode the dataset")
        return np.stack(out)

    def _open(self, path: Path, start: float) -> None:
        self.close()
        if not path.is_file():
            raise ConfigError(str(path), "is missing", "restore the dataset's videos/ folder (or download it again)")
        self.path, self.container = path, av.open(str(path))
        stream = self.container.streams.video[0]
        if start > 0:
            self.container.seek(int(start / stream.time_base), stream=stream, backward=True)
        self.frames = iter(self.container.decode(stream))
        self.head = next(self.frames, None)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.path, self.container, self.head = None, None, None


# ---------------------------------------------------------------------------------------------------- read
def load_info(src: Path) -> dict:
    """meta/info.json of the LeRobot dataset at ``src``. Raises ConfigError when it is missing, not JSON, not
    codebase_version v3.0, or lacks fps / features / data_path."""
    path = src / "meta" / "info.json"
    if not path.is_file():
        raise ConfigError("meta/info.json", f"{src} has no meta/info.json: not a LeRobot dataset",
                          "pass the root folder of a LeRobot v3.0 dataset (holding meta/, data/, videos/)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("meta/info.json", f"is not valid JSON ({e})", "restore the file from the dataset") from None
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise ConfigError("codebase_version", f"{path} says {version!r}; only {CODEBASE_VERSION!r} is read", V30_FIX)
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ConfigError(f"meta/info.json:{key}", "is missing", "restore meta/info.json from the dataset")
    return info


def column_array(col: pa.ChunkedArray, feature: dict) -> np.ndarray:
    """One parquet column of T rows as (T, *shape) numpy of the feature's dtype ((T,) for shape [1]); image
    features (PNG structs) decode to uint8 (T, H, W, 3)."""
    if feature["dtype"] == "image":
        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(v["bytes"])).convert("RGB")) for v in col.to_pylist()])
    arr = col.combine_chunks()
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
    shape = tuple(feature["shape"])
    out = arr.to_numpy(zero_copy_only=False).astype(feature["dtype"], copy=False)
    return out.reshape(len(col), *(() if shape == (1,) else shape))


def episode_rows(src: Path) -> tuple[list[dict], dict[int, str]]:
    """The meta/episodes rows of ``src`` (stats/ columns left out) in episode_index order, and
    {task_index: task string} from meta/tasks.parquet. Raises ConfigError when either is missing."""
    paths = sorted((src / "meta" / "episodes").glob("*/*.parquet"))
    if not paths or not (src / "meta" / "tasks.parquet").is_file():
        raise ConfigError("meta/episodes", f"{src} lacks meta/episodes/*/*.parquet or meta/tasks.parquet",
                          "restore the dataset's meta/ folder")
    tables = [pq.read_table(p, columns=[c for c in pq.read_schema(p).names if not c.startswith("stats/")])
              for p in paths]
    rows = pa.concat_tables(tables, promote_options="permissive").sort_by("episode_index").to_pylist()
    df = pq.read_table(src / "meta" / "tasks.parquet").to_pandas()  # lerobot: the task string is the index
    return rows, dict(zip(df["task_index"], df["task"] if "task" in df else df.index))


def read(src: Path) -> Iterator[Episode]:
    """Episodes of the LeRobot v3.0 dataset at ``src``, in episode_index order (see the module table for keys).

    Each episode: low-dim arrays in their feature dtype ((T,) for shape [1]); video/image features as uint8 RGB
    (T, H, W, 3), decoded with PyAV at the episode's from_timestamp + frame_index / fps. meta: the ``robot_rl/meta``
    JSON when the dataset was written by :func:`write`, else {robot: robot_type, extra: {language_instruction}}.
    Raises ConfigError for a missing or non-v3.0 dataset, and missing rows, files or frames."""
    src = Path(src)
    info = load_info(src)
    rows, tasks = episode_rows(src)
    wanted = {k: f for k, f in info["features"].items() if k not in INDEX_FEATURES and f["dtype"] != "string"}
    names = {k: store_key(k, f["dtype"]) for k, f in wanted.items()}
    if len(set(names.values())) != len(names):
        raise ConfigError("features", f"two LeRobot features map to one store key ({names})",
                          "rename one of them in meta/info.json (and the data parquet)")
    cursors = {k: VideoCursor() for k, f in wanted.items() if f["dtype"] == "video"}
    table = table_path = episodes = frames = None
    try:
        for row in rows:
            path = src / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                  file_index=row["data/file_index"])
            if path != table_path:
                if not path.is_file():
                    raise ConfigError(str(path), "is missing", "restore the dataset's data/ folder")
                table, table_path = pq.read_table(path), path
                episodes, frames = table["episode_index"].to_numpy(), table["frame_index"].to_numpy()
            idx = np.flatnonzero(episodes == row["episode_index"])
            idx = idx[np.argsort(frames[idx], kind="stable")]
            if len(idx) != row["length"]:
                raise ConfigError(str(path), f"holds {len(idx)} rows of episode {row['episode_index']}, "
                                  f"meta/episodes says {row['length']}", "restore the dataset's data/ folder")
            ep, data = table.take(idx), {}
            for k, f in wanted.items():
                if k in cursors:
                    video = src / info["video_path"].format(video_key=k, chunk_index=row[f"videos/{k}/chunk_index"],
                                                            file_index=row[f"videos/{k}/file_index"])
                    data[names[k]] = cursors[k].read(video, row[f"videos/{k}/from_timestamp"], len(idx), info["fps"])
                else:
                    data[names[k]] = column_array(ep[k], f)
            if row.get(META_COLUMN):
                meta = {k: v for k, v in json.loads(row[META_COLUMN]).items() if k in META_FIELDS}
            else:
                texts = row.get("tasks") or [tasks[i] for i in dict.fromkeys(ep["task_index"].to_pylist())]
                extra = {"language_instruction": texts[0], **({"language_instructions": texts} if texts[1:] else {})}
                meta = {"extra": extra, **({"robot": info["robot_type"]} if info.get("robot_type") else {})}
            yield Episode(data, meta)
    finally:
        for c in cursors.values():
            c.close()


# ---------------------------------------------------------------------------------------------------- write
def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class _Writer:
    """State of one :func:`write`: the schema fixed by the first episode, the data parquet writer, one
    VideoAppender per camera, the meta/episodes rows, the task strings and the folded dataset stats."""

    def __init__(self, dst: Path, fps: int, video: dict):
        self.dst, self.fps, self.video = dst, fps, video
        self.features: dict[str, dict] = {}
        self.keys: dict[str, tuple] = {}  # store key -> (dtype, per-step shape)
        self.rows: list[dict] = []
        self.tasks: dict[str, int] = {}
        self.stats: dict[str, dict] = {}
        self.videos: dict[str, VideoAppender] = {}
        self.parquet: pq.ParquetWriter | None = None
        self.frames = 0

    def _schema(self, data: dict[str, np.ndarray]) -> None:
        rank = {"state": 0, "action": 2, **{k: 4 for k in EXTRA_FEATURES}}
        order = sorted(data, key=lambda k: (3 if k.startswith("image_") else rank.get(k, 1), list(data).index(k)))
        for k in order:
            v = data[k]
            if k.startswith("image_"):
                if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
                    raise ConfigError(f"data[{k!r}]", f"expected uint8 (T, H, W, 3) RGB, got {v.dtype} {v.shape}",
                                      "store camera frames as uint8 RGB, or map the key to a non-image name")
                self.features[lerobot_key(k)] = {"dtype": "video", "shape": list(v.shape[1:]),
                                                 "names": ["height", "width", "channels"]}
            elif v.ndim > 2 or v.dtype.kind not in "biuf":
                raise ConfigError(f"data[{k!r}]", f"LeRobot features are 1-D per step, got {v.dtype} {v.shape}",
                                  "reshape it to (T, D) before exporting")
            else:
                dtype = "bool" if v.dtype.kind == "b" else str(v.dtype)
                self.features[lerobot_key(k)] = {"dtype": dtype, "shape": [v.shape[1] if v.ndim == 2 else 1],
                                                 "names": None}
            self.keys[k] = (v.dtype, v.shape[1:])
        for k in INDEX_FEATURES:
            self.features[k] = {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}

    def add(self, ep: Episode) -> None:
        """Write one episode. Raises ConfigError for keys/dtypes/shapes unlike the first episode's, or no task."""
        data, e = {k: np.asarray(v) for k, v in ep.data.items()}, len(self.rows)
        if not self.features:
            self._schema(data)
        got = {k: (v.dtype, v.shape[1:]) for k, v in data.items()}
        if got != self.keys:
            raise ConfigError("data", f"episode {e} has keys/dtypes/shapes {got}, the first had {self.keys}",
                              "export episodes that share one schema")
        if len({len(v) for v in data.values()}) != 1:
            raise ConfigError("data", f"episode {e} has arrays of lengths {sorted({len(v) for v in data.values()})}",
                              "give every key one value per step")
        text = str((ep.meta.get("extra") or {}).get("language_instruction") or ep.meta.get("task") or "")
        if not text:
            raise ConfigError("task", f"episode {e} has no task name and no extra['language_instruction']",
                              "give every episode a task")
        t = len(next(iter(data.values())))
        task = self.tasks.setdefault(text, len(self.tasks))
        cols = {lerobot_key(k): v for k, v in data.items()}
        cols.update(timestamp=np.arange(t) / self.fps, frame_index=np.arange(t), episode_index=np.full(t, e),
                    index=np.arange(self.frames, self.frames + t), task_index=np.full(t, task))
        row = {"episode_index": e, "tasks": [text], "length": t, "data/chunk_index": 0, "data/file_index": 0,
               "dataset_from_index": self.frames, "dataset_to_index": self.frames + t}
        ep_stats = {}
        for name, f in self.features.items():
            v = cols[name]
            if f["dtype"] == "video":
                if name not in self.videos:
                    self.videos[name] = VideoAppender(self.dst / VIDEO_PATH.format(video_key=name, chunk_index=0,
                                                                                    file_index=0))
                lo, hi = self.videos[name].append(encode_episode(v, self.fps, **self.video))
                row.update({f"videos/{name}/chunk_index": 0, f"videos/{name}/file_index": 0,
                            f"videos/{name}/from_timestamp": lo, f"videos/{name}/to_timestamp": hi})
                ep_stats[name] = image_stats(v)
            elif not name.startswith("robot_rl."):
                ep_stats[name] = feature_stats(v.reshape(t, -1).astype(np.int64 if v.dtype == bool else v.dtype), t)
        self._write_rows(cols, t)
        for name, s in ep_stats.items():
            self.stats[name] = aggregate_stats(self.stats[name], s) if name in self.stats else s
            row.update({f"stats/{name}/{k}": v.tolist() for k, v in s.items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                    META_COLUMN: json.dumps({k: ep.meta[k] for k in META_FIELDS if k in ep.meta}, sort_keys=True,
                                            default=_json_default)})
        self.rows.append(row)
        self.frames += t

    def _write_rows(self, cols: dict[str, np.ndarray], t: int) -> None:
        """One row group of the data parquet, typed as ``datasets`` writes LeRobot features (fixed-size lists)."""
        arrays, hf = {}, {}
        for name, f in self.features.items():
            if f["dtype"] == "video":
                continue
            value = pa.from_numpy_dtype(np.dtype(f["dtype"]))
            flat = pa.array(np.ascontiguousarray(cols[name], dtype=f["dtype"]).reshape(-1), type=value)
            hf[name] = {"dtype": f["dtype"], "_type": "Value"}
            if len(flat) != t:  # a vector per step: datasets Sequence(length=n) -> fixed_size_list<element>[n]
                flat = pa.FixedSizeListArray.from_arrays(flat, type=pa.list_(pa.field("element", value), f["shape"][0]))
                hf[name] = {"feature": hf[name], "length": f["shape"][0], "_type": "List"}
            arrays[name] = flat
        table = pa.table(arrays)
        if self.parquet is None:
            meta = {"huggingface": json.dumps({"info": {"features": hf}})}
            path = self.dst / DATA_PATH.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parquet = pq.ParquetWriter(path, table.schema.with_metadata(meta), compression="snappy",
                                            use_dictionary=True)
        self.parquet.write_table(table.replace_schema_metadata(self.parquet.schema.metadata))

    def abort(self) -> None:
        """Close every open file (after an error; the caller removes the folder)."""
        for v in self.videos.values():
            v.close()
        if self.parquet is not None:
            self.parquet.close()
        self.videos, self.parquet = {}, None

    def close(self, robot_type: str) -> dict:
        """Finish the files (meta/ last); returns the summary."""
        paths = {k: v.path for k, v in self.videos.items()}
        self.abort()
        if not self.rows:
            raise ConfigError("episodes", "there is no episode to write", "export a store with episodes")
        meta = self.dst / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), self.dst / EPISODES_PATH, compression="snappy")
        import pandas as pd  # lerobot writes tasks.parquet with pandas: the task string is the index

        tasks = pa.Table.from_pandas(pd.DataFrame({"task_index": list(self.tasks.values())}, index=list(self.tasks)))
        pq.write_table(tasks.cast(pa.schema([tasks.schema.field(0), pa.field("__index_level_0__", pa.large_string())],
                                            metadata=tasks.schema.metadata)), meta / "tasks.parquet")
        for name, f in self.features.items():
            if f["dtype"] == "video":
                with av.open(str(paths[name])) as c:
                    s = c.streams.video[0]
                    f["info"] = {"video.height": s.height, "video.width": s.width,
                                 "video.codec": s.codec.canonical_name, "video.pix_fmt": s.pix_fmt,
                                 "video.is_depth_map": False, "video.fps": int(s.base_rate),
                                 "video.channels": 3, "has_audio": False}
        n = len(self.rows)
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": n,
                "total_frames": self.frames, "total_tasks": len(self.tasks), "chunks_size": CHUNKS_SIZE,
                "data_files_size_in_mb": DATA_FILES_MB, "video_files_size_in_mb": VIDEO_FILES_MB, "fps": self.fps,
                "splits": {"train": f"0:{n}"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if paths else None, "features": self.features}
        stats = {k: {s: v.tolist() for s, v in st.items()} for k, st in self.stats.items()}
        for name, obj in (("stats.json", stats), ("info.json", info)):  # info.json last: it marks a dataset
            (meta / name).write_text(json.dumps(obj, indent=4, ensure_ascii=False))
        return {"path": str(self.dst), "episodes": n, "steps": self.frames, "tasks": len(self.tasks),
                "videos": sorted(paths), "fps": self.fps}


def write(episodes: Iterable[Episode], dst: Path, *, fps: float = 10.0, vcodec: str = "libsvtav1", crf: int = 30,
          gop: int = 2, pix_fmt: str = "yuv420p", robot_type: str = "panda") -> dict:
    """Write ``episodes`` as a new LeRobot v3.0 dataset at ``dst`` (which must not exist).

    fps: frames per second (an integer, as LeRobot requires); timestamps are frame_index / fps. vcodec: libsvtav1
    (AV1, LeRobot's default) or libx264 (H.264); crf, gop (keyframe interval, frames), pix_fmt: the encoder's
    settings. robot_type: info.json ``robot_type``. Returns {path, episodes, steps, tasks, videos, fps}. Raises
    ConfigError for bad options, data LeRobot cannot hold or an episode without task; ``dst`` is removed on error.
    """
    if not float(fps).is_integer() or fps <= 0:
        raise ConfigError("fps", f"{fps!r} is not a positive integer", "LeRobot datasets need an integer fps, e.g. 10")
    if vcodec not in ENCODERS:
        raise ConfigError("vcodec", f"{vcodec!r} is not supported", f"use one of {sorted(ENCODERS)}")
    dst = Path(dst)
    if dst.exists():
        raise ConfigError("dst", f"{dst} already exists", "choose a new path or pass --overwrite")
    writer = _Writer(dst, int(fps), {"encoder": ENCODERS[vcodec], "crf": int(crf), "gop": int(gop),
                                     "pix_fmt": pix_fmt})
    try:
        for ep in episodes:
            writer.add(ep)
        return writer.close(robot_type)
    except BaseException:
        writer.abort()
        shutil.rmtree(dst, ignore_errors=True)
        raise
