"""LeRobot dataset v3.0 converter (robot_rl.datasets.formats.lerobot), against a real dataset written by lerobot 0.4.4
(tests/fixtures/lerobot_v3_tiny, a copy of ../shared/fixtures; see tests/fixtures/THIRD_PARTY.md) and by round trips through real files on disk."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from robot_rl.datasets.formats import Episode, MetaDefaults, export_dataset, import_dataset
from robot_rl.datasets.formats import lerobot
from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"  # written by lerobot 0.4.4 itself (fixtures/THIRD_PARTY.md)
FIXTURE, EXPECTED = FIXTURES / "lerobot_v3_tiny", FIXTURES / "lerobot_v3_tiny.expected.npz"
TASK_TEXT = "place the red cube on the green target"
# Video round trip of the 38 smooth 64x64 frames below, decoded with PyAV (uint8 levels), measured:
#   AV1 (libsvtav1, crf 30, g 2): mean abs error 1.82, worst frame 3.24, largest single value 42, PSNR 40.0 dB
#   H.264 (libx264, crf 23, g 4): mean abs error 1.83-1.84, worst frame 1.98-2.00, largest single value 21-22,
#   PSNR 40.5 dB (x264's threads make it vary slightly from run to run)
# (the RGB -> yuv420p -> RGB conversion alone costs 1.42 on these frames). Bounds with margin:
VIDEO_MEAN_ABS, VIDEO_FRAME_MEAN_ABS, VIDEO_PSNR_DB = 2.2, 4.0, 37.0


def _frames(t: int, e: int, size: int = 64) -> np.ndarray:
    """Smooth uint8 RGB frames (t, size, size, 3): colour gradients and a soft blob moving across."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((t, size, size, 3), np.uint8)
    for i in range(t):
        cx, cy = 12 + 40 * i / max(t - 1, 1), 20 + 10 * e
        blob = 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 8.0 ** 2))
        out[i] = np.clip(np.stack([40 + 2 * x + blob, 40 + 2 * y, 100 + 30 * e + blob / 2], -1), 0, 255).round()
    return out


EPISODES = [  # (T, metadata, intervention steps)
    (12, dict(seed=7, task="place", source="scripted", success=True, backend="mujoco", robot="panda",
              extra={"language_instruction": "put the red cube on the green target"}), None),
    (16, dict(seed=8, task="place", source="intervention", success=False, backend="pybullet", robot="panda",
              extra={"friction": 0.8, "nested": {"a": [1, 2]}}), slice(5, 10)),
    (10, dict(seed=9, task="lift", source="teleop", success=True, backend="real", robot="panda", extra={}), None),
]


@pytest.fixture
def store(tmp_path: Path) -> ZarrStore:
    """A store of the three EPISODES: action (T, 7), state (T, 9), ee_pos (T, 3), image_front, intervention, and
    human_action on the episode with an intervention (NaN-filled on the others by the store)."""
    st = ZarrStore.create(tmp_path / "ours.zarr")
    rng = np.random.default_rng(0)
    for e, (t, meta, hold) in enumerate(EPISODES):
        data = {"action": rng.normal(size=(t, 7)).astype(np.float32),
                "state": rng.normal(size=(t, 9)).astype(np.float32),
                "ee_pos": rng.normal(size=(t, 3)).astype(np.float32), "image_front": _frames(t, e),
                "intervention": np.zeros(t, bool)}
        if hold is not None:
            data["intervention"][hold] = True
            data["human_action"] = np.full((t, 7), np.nan, np.float32)
            data["human_action"][hold] = rng.normal(size=(hold.stop - hold.start, 7))
        st.add_episode(data, **meta)
    return st


def _video_error(decoded: np.ndarray, written: np.ndarray) -> tuple[float, float, int, float]:
    """(mean abs error, worst per-frame mean abs error, largest single error, PSNR dB) in uint8 levels."""
    err = np.abs(decoded.astype(np.int64) - written.astype(np.int64))
    mse = float(np.mean(err.astype(np.float64) ** 2))
    psnr = 10 * np.log10(255 ** 2 / mse)
    return float(err.mean()), float(err.reshape(len(err), -1).mean(1).max()), int(err.max()), float(psnr)


# --------------------------------------------------------------------------------------- the real lerobot dataset
def test_import_real_lerobot_dataset(tmp_path):
    z = np.load(EXPECTED)
    summary = import_dataset("lerobot", FIXTURE, tmp_path / "s.zarr", defaults=MetaDefaults(task="place"),
                             progress=False)
    assert (summary["episodes"], summary["steps"]) == (3, 60)
    st = ZarrStore.open(tmp_path / "s.zarr")
    assert [m["length"] for m in st.episodes_meta()] == [20, 25, 15] == z["episode_lengths"].tolist()
    assert sorted(st.keys) == ["action", "image_front", "intervention", "state"]
    for key in ("state", "action"):
        assert st[key].dtype == np.float32 and np.array_equal(st[key][:], z[key])  # exact
    mean, frame_worst, _, psnr = _video_error(st["image_front"][:], z["frames"])
    assert mean <= 2.5 and frame_worst <= 4.0 and psnr > 30, (mean, frame_worst, psnr)  # README: 2.17 / 3.68 / 32.6
    assert not st["intervention"][:].any()
    for m in st.episodes_meta():
        assert m["task"] == "place" and m["robot"] == "panda" and m["source"] == "teleop" and m["success"]
        assert m["extra"] == {"language_instruction": TASK_TEXT, "imported_from": "lerobot"}


def test_stats_reproduce_lerobot_bit_for_bit():
    """Per-episode stats (meta/episodes) and dataset stats (meta/stats.json) of the fixture, recomputed from the
    arrays lerobot was given: identical, except image std, where lerobot squares uint8 pixels (wraps; we do not)."""
    z = np.load(EXPECTED)
    rows = pq.read_table(FIXTURE / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    total, start = {}, 0
    for e, (row, t) in enumerate(zip(rows, z["episode_lengths"])):
        sl, start = slice(start, start + t), start + t
        arrays = {"observation.state": z["state"][sl], "action": z["action"][sl], "timestamp": np.arange(t) / 10,
                  "frame_index": np.arange(t), "episode_index": np.full(t, e), "index": np.arange(sl.start, sl.stop),
                  "task_index": np.zeros(t, np.int64)}
        stats = {k: lerobot.feature_stats(v.reshape(t, -1), t) for k, v in arrays.items()}
        stats["observation.images.front"] = lerobot.image_stats(z["frames"][sl])
        for name, s in stats.items():
            for k, v in s.items():
                if not (name == "observation.images.front" and k == "std"):
                    assert v.tolist() == row[f"stats/{name}/{k}"], (e, name, k)
            total[name] = lerobot.aggregate_stats(total[name], s) if name in total else s
        wrapped = lerobot.feature_stats(z["frames"][sl].reshape(-1, 3), t)["std"]  # uint8, as lerobot squares it
        assert (wrapped / 255.0).reshape(3, 1, 1).tolist() == row["stats/observation.images.front/std"]
    ref = json.loads((FIXTURE / "meta/stats.json").read_text())
    assert set(ref) == set(total)
    for name, s in total.items():
        assert list(s) == list(ref[name])
        for k, v in s.items():
            if not (name == "observation.images.front" and k == "std"):
                assert v.tolist() == ref[name][k], (name, k)


def test_import_image_dtype_features(tmp_path):
    """A camera stored as dtype ``image`` (PNG bytes in the data parquet) instead of video: read losslessly."""
    import PIL.Image

    z, ds = np.load(EXPECTED), tmp_path / "images_ds"
    shutil.copytree(FIXTURE, ds, ignore=shutil.ignore_patterns("videos"))
    info = json.loads((ds / "meta/info.json").read_text())
    info["features"]["observation.images.front"] = {"dtype": "image", "shape": [96, 96, 3],
                                                    "names": ["height", "width", "channels"]}
    info["video_path"] = None
    (ds / "meta/info.json").write_text(json.dumps(info, indent=4))
    pngs = []
    for frame in z["frames"]:
        buf = io.BytesIO()
        PIL.Image.fromarray(frame).save(buf, format="png")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    data = pq.read_table(ds / "data/chunk-000/file-000.parquet")
    pq.write_table(data.append_column("observation.images.front", pa.array(pngs)),
                   ds / "data/chunk-000/file-000.parquet")
    eps = list(lerobot.read(ds))
    assert np.array_equal(np.concatenate([e.data["image_front"] for e in eps]), z["frames"])
    assert np.array_equal(np.concatenate([e.data["state"] for e in eps]), z["state"])


def test_video_cursor_jumps_back_and_seeks():
    """Episodes read out of file order (reopen + seek to the keyframe before) give the frames of a sequential decode."""
    mp4 = FIXTURE / "videos/observation.images.front/chunk-000/file-000.mp4"
    with av.open(str(mp4)) as c:
        sequential = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    cursor = lerobot.VideoCursor()
    try:
        for start, n, first in ((4.5, 15, 45), (0.0, 20, 0), (2.0, 25, 20), (2.1, 3, 21)):
            assert np.array_equal(cursor.read(mp4, start, n, 10), sequential[first:first + n]), start
    finally:
        cursor.close()


# --------------------------------------------------------------------------------------- ours -> lerobot -> ours
def _check_layout_like_fixture(dst: Path) -> None:
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/info.json",
                     "meta/stats.json", "meta/tasks.parquet", "videos/observation.images.front/chunk-000/file-000.mp4"]
    if not FIXTURE.is_dir():
        return
    ours, ref = (json.loads((d / "meta/info.json").read_text()) for d in (dst, FIXTURE))
    assert list(ours) == list(ref)
    for name in ("observation.state", "observation.images.front", *lerobot.INDEX_FEATURES):
        f, g = ours["features"][name], ref["features"][name]
        same = ("dtype", "names") if name != "observation.state" else ("dtype",)  # we have no joint names
        assert [f[k] for k in same] + [len(f["shape"]), list(f.get("info", {}))] == [g[k] for k in same] + [
            len(g["shape"]), list(g.get("info", {}))], name
    assert ours["features"]["observation.images.front"]["info"]["video.codec"] == "av1"
    assert {k: (f["dtype"], f["shape"]) for k, f in ours["features"].items() if k not in ref["features"]} == {
        "observation.ee_pos": ("float32", [3]), "robot_rl.intervention": ("bool", [1]),
        "robot_rl.human_action": ("float32", [7])}
    for rel in ("data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet"):
        mine, theirs = pq.read_schema(dst / rel), pq.read_schema(FIXTURE / rel)
        for field in theirs:
            if field.name.startswith(("action", "stats/action/")):  # their action has 5 values, ours 7
                assert str(mine.field(field.name).type).replace("[7]", "[5]") == str(field.type)
            else:
                assert mine.field(field.name).type == field.type, field.name
        groups = [pq.ParquetFile(d / rel).metadata.num_row_groups for d in (dst, FIXTURE)]
        assert groups[0] == groups[1], rel  # data: one row group per episode, like lerobot's ParquetWriter
    assert set(pq.read_schema(dst / "meta/episodes/chunk-000/file-000.parquet").names) - set(
        pq.read_schema(FIXTURE / "meta/episodes/chunk-000/file-000.parquet").names) == {
        lerobot.META_COLUMN, *(f"stats/observation.ee_pos/{k}" for k in ("min", "max", "mean", "std", "count",
                                                                         *lerobot.QUANTILES))}
    stats, ref_stats = (json.loads((d / "meta/stats.json").read_text()) for d in (dst, FIXTURE))
    for name in ("observation.state", "observation.images.front", *lerobot.INDEX_FEATURES):
        assert {k: np.shape(v) for k, v in stats[name].items()} == {k: np.shape(v) for k, v in ref_stats[name].items()}


def test_round_trip_ours_lerobot_ours(store, tmp_path):
    dst = tmp_path / "lerobot_ds"
    summary = export_dataset("lerobot", store.path, dst)
    assert summary == {"path": str(dst), "episodes": 3, "steps": 38, "tasks": 3, "videos": ["observation.images.front"],
                       "fps": 10}
    _check_layout_like_fixture(dst)
    import_dataset("lerobot", dst, tmp_path / "back.zarr", progress=False)  # no --task: robot_rl/meta carries it
    back = ZarrStore.open(tmp_path / "back.zarr")
    assert back.n_episodes == 3 and sorted(back.keys) == sorted(store.keys)
    decoded, written = [], []
    for i in range(3):
        a, b = store.get_episode(i), back.get_episode(i)
        for key in a:
            if key == "image_front":
                decoded.append(b[key]), written.append(a[key])
            else:  # bit-identical, NaN payloads of human_action included
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                assert a[key].tobytes() == b[key].tobytes(), key
        m, n = store.episode_meta(i), back.episode_meta(i)
        assert {k: m[k] for k in ("seed", "task", "source", "success", "backend", "robot", "length")} == {
            k: n[k] for k in ("seed", "task", "source", "success", "backend", "robot", "length")}
        assert n["extra"] == {**m["extra"], "imported_from": "lerobot"}
    assert np.isnan(back["human_action"][:12]).all() and back["intervention"][12 + 5:12 + 10].all()
    mean, frame_worst, worst, psnr = _video_error(np.concatenate(decoded), np.concatenate(written))
    print(f"AV1 round trip: mean abs {mean:.3f}, worst frame {frame_worst:.3f}, max {worst}, PSNR {psnr:.1f} dB")
    assert mean <= VIDEO_MEAN_ABS and frame_worst <= VIDEO_FRAME_MEAN_ABS and psnr >= VIDEO_PSNR_DB


def test_h264_and_encoder_settings(store, tmp_path):
    dst = tmp_path / "h264"
    export_dataset("lerobot", store.path, dst, vcodec="libx264", crf=23, gop=4, fps=15)
    info = json.loads((dst / "meta/info.json").read_text())
    assert info["fps"] == 15 and info["features"]["observation.images.front"]["info"]["video.codec"] == "h264"
    with av.open(str(dst / "videos/observation.images.front/chunk-000/file-000.mp4")) as c:
        s = c.streams.video[0]
        keys = [round(float(p.pts * s.time_base) * 15) for p in c.demux(s) if p.dts is not None and p.is_keyframe]
    assert sorted(keys) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]  # every 4th frame of each episode (starts 0, 12, 28)
    eps = list(lerobot.read(dst))
    mean, frame_worst, worst, psnr = _video_error(np.concatenate([e.data["image_front"] for e in eps]),
                                                  store["image_front"][:])
    print(f"H.264 round trip: mean abs {mean:.3f}, worst frame {frame_worst:.3f}, max {worst}, PSNR {psnr:.1f} dB")
    assert mean <= VIDEO_MEAN_ABS and frame_worst <= VIDEO_FRAME_MEAN_ABS and psnr >= VIDEO_PSNR_DB


# --------------------------------------------------------------------------------------- read as lerobot reads
def test_export_reads_the_way_lerobot_reads(store, tmp_path):
    dst = tmp_path / "lerobot_ds"
    export_dataset("lerobot", store.path, dst)
    info = json.loads((dst / "meta/info.json").read_text())
    data = pq.read_table(dst / info["data_path"].format(chunk_index=0, file_index=0))
    lengths = [t for t, _, _ in EPISODES]
    assert info["total_frames"] == data.num_rows == sum(lengths) and info["total_episodes"] == 3
    assert data["index"].to_pylist() == list(range(sum(lengths)))
    assert data["episode_index"].to_pylist() == [e for e, t in enumerate(lengths) for _ in range(t)]
    frame_index = np.concatenate([np.arange(t) for t in lengths])
    assert data["frame_index"].to_pylist() == frame_index.tolist()
    assert data["timestamp"].type == "float" and np.array_equal(data["timestamp"].to_numpy(),
                                                                 (frame_index / 10).astype(np.float32))
    tasks = pq.read_table(dst / "meta/tasks.parquet").to_pandas()  # lerobot: pd.read_parquet, the index is the task
    text = {int(i): s for s, i in zip(tasks.index, tasks["task_index"])}
    per_row = [text[i] for i in data["task_index"].to_pylist()]
    assert per_row == [s for (t, _, _), s in zip(EPISODES, ("put the red cube on the green target", "place", "lift"))
                       for _ in range(t)]
    episodes = pq.read_table(dst / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["tasks"] for r in episodes] == [["put the red cube on the green target"], ["place"], ["lift"]]
    stats = {k: {s: np.array(v) for s, v in st.items()}  # lerobot's load_stats / cast_stats_to_numpy
             for k, st in json.loads((dst / "meta/stats.json").read_text()).items()}
    assert stats["observation.images.front"]["mean"].shape == (3, 1, 1) and stats["action"]["count"].tolist() == [38]
    assert not any(k.startswith("robot_rl.") for k in stats)
    video = dst / info["video_path"].format(video_key="observation.images.front", chunk_index=0, file_index=0)
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        assert s.frames == sum(lengths) and s.average_rate == 10 and s.codec.canonical_name == "av1"
        times = np.array([f.time for f in c.decode(s)])
    assert len(times) == sum(lengths)
    # lerobot's _query_videos: frame of row i = from_timestamp(episode) + timestamp[i], within tolerance_s = 1e-4
    starts = np.repeat([r["videos/observation.images.front/from_timestamp"] for r in episodes], lengths)
    query = starts + data["timestamp"].to_numpy()
    assert np.abs(times[None, :] - query[:, None]).min(1).max() < 1e-4
    assert [r["videos/observation.images.front/to_timestamp"] for r in episodes] == pytest.approx([1.2, 2.8, 3.8])


# --------------------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        import_dataset("lerobot", tmp_path / "empty", tmp_path / "a.zarr", defaults=MetaDefaults(task="place"),
                       progress=False)
    assert e.value.field == "meta/info.json" and "LeRobot" in e.value.fix
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    info = json.loads((FIXTURE / "meta/info.json").read_text()) if FIXTURE.is_dir() else {"fps": 10, "features": {}}
    (old / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(ConfigError) as e:
        import_dataset("lerobot", old, tmp_path / "b.zarr", defaults=MetaDefaults(task="place"), progress=False)
    assert e.value.field == "codebase_version" and "'v2.1'" in e.value.problem
    assert "convert_dataset_v21_to_v30" in e.value.fix
    ep = Episode({"action": np.zeros((3, 2), np.float32)}, {"task": "place"})
    from robot_rl.datasets.formats import check_options

    with pytest.raises(ConfigError) as e:  # export_dataset checks options against write's signature
        check_options(lerobot.write, {"bitrate": 5}, "lerobot", "export")
    assert e.value.field == "bitrate" and "vcodec" in e.value.fix
    for kwargs, field in (({"fps": 12.5}, "fps"), ({"vcodec": "mpeg4"}, "vcodec")):
        with pytest.raises(ConfigError) as e:
            lerobot.write([ep], tmp_path / f"w_{field}", **kwargs)
        assert e.value.field == field and not (tmp_path / f"w_{field}").exists()
    with pytest.raises(ConfigError) as e:  # no task name and no language instruction; the half-written folder goes
        lerobot.write([ep, Episode(ep.data, {})], tmp_path / "w_task")
    assert e.value.field == "task" and not (tmp_path / "w_task").exists()
    if FIXTURE.is_dir():  # a dataset whose video lost frames: ConfigError naming the file, not a short episode
        broken = tmp_path / "broken"
        shutil.copytree(FIXTURE, broken)
        rows = pq.read_table(broken / "meta/episodes/chunk-000/file-000.parquet")
        col = rows.schema.get_field_index("videos/observation.images.front/from_timestamp")
        pq.write_table(rows.set_column(col, rows.schema.field(col), [[0.0, 2.0, 5.0]]),
                       broken / "meta/episodes/chunk-000/file-000.parquet")
        with pytest.raises(ConfigError, match="frames"):
            list(lerobot.read(broken))
