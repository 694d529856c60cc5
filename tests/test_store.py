"""ZarrStore on a real directory store: round trip, input errors, torn writes, a real SIGKILL mid-episode; both
layouts (version 2, sharded frames written by the store's own file writer; version 1, one file per frame, which
existing stores use and which must keep opening, reading and appending)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from robot_rl.errors import ConfigError
from robot_rl.datasets import zarrio
from robot_rl.datasets.store import VERSION, ZarrStore, format_info, validate_store


def make_episode(i: int, T: int, hw: int = 8, human: bool = False) -> dict[str, np.ndarray]:
    """Deterministic episode content from its index (regenerated to check what was stored)."""
    rng = np.random.default_rng(1000 + i)
    ep = {"action": rng.normal(size=(T, 7)).astype(np.float32),
          "joint_pos": rng.normal(size=(T, 9)).astype(np.float32),
          "cube_pos": np.full((T, 3), i, np.float64),
          "image_front": rng.integers(0, 256, size=(T, hw, hw, 3), dtype=np.uint8)}
    if human:
        ep["intervention"] = np.arange(T) % 2 == 0
        ep["human_action"] = rng.normal(size=(T, 7)).astype(np.float32)
    return ep


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (but the writer lock) with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".writer.lock"}


def add(store, i, T, **kw):
    return store.add_episode(make_episode(i, T, **kw), seed=i, task="lift", source="scripted", success=i % 2 == 0,
                             backend="mujoco", extra={"friction": 0.5 + i, "cube_xy": np.array([0.1, i])})


@pytest.mark.parametrize("version", [2, 1])
def test_round_trip(tmp_path, version):
    s = ZarrStore.create(tmp_path / "s", version=version)
    lengths = [5, 1, 12]
    for i, T in enumerate(lengths):
        assert add(s, i, T) == i
    r = ZarrStore.open(tmp_path / "s", "r")
    assert (r.n_episodes, r.n_steps, len(r)) == (3, 18, 3)
    np.testing.assert_array_equal(r.episode_ends, np.cumsum(lengths))
    assert r.keys == ["action", "cube_pos", "image_front", "intervention", "joint_pos"]
    assert r.schema["image_front"] == {"dtype": "uint8", "shape": (8, 8, 3)}
    assert r.schema["cube_pos"]["dtype"] == "float64"  # non-action floats keep their dtype
    for i, T in enumerate(lengths):
        got, want = r.get_episode(i), make_episode(i, T)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
        assert not got["intervention"].any() and got["intervention"].dtype == bool
        m = r.episode_meta(i)
        assert m == {"index": i, "seed": i, "success": i % 2 == 0, "length": T, "start": r.episode_slice(i).start,
                     "end": r.episode_slice(i).stop, "task": "lift", "source": "scripted", "backend": "mujoco",
                     "robot": "panda", "extra": {"friction": 0.5 + i, "cube_xy": [0.1, float(i)]}}
    assert r.episodes_meta() == [r.episode_meta(i) for i in range(3)]
    assert r.episode_slice(-1) == slice(6, 18)
    # lazy committed view
    img = r["image_front"]
    assert img.shape == (18, 8, 8, 3) and len(img) == 18
    np.testing.assert_array_equal(img[[17, 6, 6]], np.asarray(img)[[17, 6, 6]])
    np.testing.assert_array_equal(img[-1], make_episode(2, 12)["image_front"][-1])
    with pytest.raises(IndexError):
        img[18]
    # on-disk layout and chunking
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert g.attrs["format"] == "robot_rl.datasets.store" and g.attrs["version"] == version == r.version
    assert g["data/image_front"].chunks == (1, 8, 8, 3) and g["data/action"].chunks[0] == 1024
    if version == 1:
        assert g["data/image_front"].shards is None and g["data/image_front"].compressors[0].cname.value == "zstd"
        assert g["data/image_front"].shape[0] == 18 and g["meta/episode_seed"].shape == (3,)
    else:  # frames in shards (one file for all 18 here); lengths of data/* and meta/episodes are capacities
        assert g["data/image_front"].shards == (1024, 8, 8, 3)
        assert g["data/image_front"].compressors[0].cname.value == "lz4"  # random frames: lz4hc gains nothing
        assert g["data/action"].shape[0] == 1024 and g["meta/episodes"].shape == (1024,)
        assert g["meta/episode_ends"].shape == (3,)  # exact: the commit marker
        assert sorted(p.name for p in (tmp_path / "s" / "data" / "image_front").rglob("*") if p.is_file()) == \
            ["0", "zarr.json"]
    info = r.info()
    assert info["episodes"] == 3 and info["steps"] == 18 and info["sources"] == {"scripted": 3}
    assert info["success_rate"] == pytest.approx(2 / 3) and info["size_bytes"] > 0
    text = format_info(info)
    assert "3 episodes" in text and "image_front" in text and "66.7%" in text
    assert r.validate() == []


def test_frame_codec_is_chosen_on_the_first_episode(tmp_path):
    """Version 2 compresses frames with lz4hc when it saves >= 20 % over lz4 on the first episode's frames (renders),
    else with lz4 (sensor noise); the choice is in zarr.json and both read back exactly."""
    y, x = np.mgrid[0:64, 0:64]
    shaded = np.stack([100 + y, 80 + y // 2, 60 + (x + y) // 4], -1).astype(np.uint8)  # lz4hc: 55 % of lz4
    frames = np.repeat(shaded[None], 6, 0)
    for t in range(6):
        frames[t, 4 + t:12 + t, 4:12] = (200, 30, 30)
    noisy = np.random.default_rng(0).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    for name, img, want in (("render", frames, "lz4hc"), ("noise", noisy, "lz4")):
        st = ZarrStore.create(tmp_path / name)
        st.add_episode({"action": np.zeros((6, 2), np.float32), "image_front": img}, seed=0, task="lift",
                       source="scripted", success=True, backend="mujoco")
        assert zarr.open_group(str(tmp_path / name), mode="r")["data/image_front"].compressors[0].cname.value == want
        np.testing.assert_array_equal(ZarrStore.open(tmp_path / name)["image_front"][:], img)


@pytest.mark.parametrize("version", [2, 1])
def test_human_action_added_later_and_flags(tmp_path, version):
    s = ZarrStore.create(tmp_path / "s", version=version)
    add(s, 0, 4)
    s.add_episode(make_episode(1, 6, human=True), seed=1, task="lift", source="intervention", success=True,
                  backend="mujoco")
    add(s, 2, 3)
    r = ZarrStore.open(tmp_path / "s")
    assert "human_action" in r.keys
    assert np.isnan(r.get_episode(0)["human_action"]).all() and np.isnan(r.get_episode(2)["human_action"]).all()
    e1 = r.get_episode(1)
    np.testing.assert_array_equal(e1["human_action"], make_episode(1, 6, human=True)["human_action"])
    np.testing.assert_array_equal(e1["intervention"], np.arange(6) % 2 == 0)
    assert r.episode_meta(1)["extra"] == {} and r.info()["sources"] == {"scripted": 2, "intervention": 1}
    assert r.validate() == []


@pytest.mark.parametrize("version", [2, 1])
def test_human_action_added_after_a_full_chunk(tmp_path, version):
    """human_action first given after more than one time chunk (1024 steps): the earlier chunks are written as
    NaN too, so none of the committed steps reads from a missing chunk file (which would be damage)."""
    s = ZarrStore.create(tmp_path / "s", version=version)
    s.add_episode({"action": np.zeros((2100, 2), np.float32)}, seed=0, task="lift", source="scripted", success=True,
                  backend="mujoco")
    h = np.array([[1, 2], [3, 4]], np.float32)
    s.add_episode({"action": np.ones((2, 2), np.float32), "human_action": h, "intervention": np.ones(2, bool)},
                  seed=1, task="lift", source="intervention", success=True, backend="mujoco")
    assert s.validate() == []
    r = ZarrStore.open(tmp_path / "s")
    assert np.isnan(r.get_episode(0)["human_action"]).all()
    np.testing.assert_array_equal(r.get_episode(1)["human_action"], h)


def test_float64_action_cast_and_schema_errors(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
    ep = make_episode(0, 4)
    ep["action"] = ep["action"].astype(np.float64)
    add_kw = dict(seed=0, task="lift", source="teleop", success=True, backend="mujoco")
    s.add_episode(ep, **add_kw)
    assert s.schema["action"]["dtype"] == "float32"
    before = snapshot(tmp_path / "s")

    def err(data, field, **kw):
        with pytest.raises(ConfigError) as e:
            s.add_episode(data, **{**add_kw, **kw})
        assert field in str(e.value) and "->" in str(e.value)
        return str(e.value)

    bad = make_episode(1, 4)
    bad["joint_pos"] = bad["joint_pos"][:, :7]
    msg = err(bad, "data['joint_pos']")
    assert "(9,)" in msg and "(7,)" in msg
    bad = make_episode(1, 4)
    bad["image_front"] = bad["image_front"].astype(np.float32)
    assert "uint8" in err(bad, "data['image_front']")
    bad = make_episode(1, 4)
    del bad["cube_pos"]
    assert "missing ['cube_pos']" in err(bad, "data")
    bad = make_episode(1, 4)
    bad["extra_key"] = np.zeros(4)
    assert "unexpected ['extra_key']" in err(bad, "data")
    bad = make_episode(1, 4)
    bad["joint_pos"] = bad["joint_pos"][:3]
    err(bad, "data")
    err({k: v[:0] for k, v in make_episode(1, 4).items()}, "data")
    err({"joint_pos": np.zeros((3, 9))}, "data")
    bad = make_episode(1, 4)
    bad["action"][2, 1] = np.nan
    err(bad, "data['action']")
    bad = make_episode(1, 4)
    bad["intervention"] = np.zeros(4, np.int64)
    err(bad, "data['intervention']")
    assert "scripted" in err(make_episode(1, 4), "source", source="human")
    err(make_episode(1, 4), "task", task="")
    err(make_episode(1, 4), "seed", seed=1.5)
    err(make_episode(1, 4), "extra", extra={"f": object()})
    err(make_episode(1, 4), "extra", extra={"f": float("nan")})
    # nothing was written by the rejected calls: every file as it was
    assert s.n_episodes == 1 and s.validate() == [] and snapshot(tmp_path / "s") == before
    r = ZarrStore.open(tmp_path / "s", "r")
    with pytest.raises(ConfigError, match="mode"):
        r.add_episode(make_episode(1, 4), **add_kw)
    with pytest.raises(ConfigError, match="episode"):
        r.episode_meta(1)
    with pytest.raises(ConfigError, match="key"):
        r["nope"]


def test_open_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        ZarrStore.open(tmp_path / "missing")
    assert "path" in str(e.value) and "missing" in str(e.value) and "robot-rl collect" in str(e.value)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a robot_rl store"):
        ZarrStore.open(tmp_path / "plain", "a")
    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["format"] = "something.else"
    with pytest.raises(ConfigError, match="path"):
        ZarrStore.open(tmp_path / "other")
    with pytest.raises(ConfigError, match="mode"):
        ZarrStore.open(tmp_path / "plain", "w")
    # create never deletes silently, and never deletes a non-store even with overwrite
    add(ZarrStore.create(tmp_path / "s"), 0, 3)
    with pytest.raises(ConfigError, match="overwrite=True"):
        ZarrStore.create(tmp_path / "s")
    assert ZarrStore.open(tmp_path / "s").n_episodes == 1
    with pytest.raises(ConfigError, match="refusing"):
        ZarrStore.create(tmp_path / "plain", overwrite=True)
    assert (tmp_path / "plain" / "notes.txt").read_text() == "keep me"
    assert ZarrStore.create(tmp_path / "s", overwrite=True).n_episodes == 0


def test_torn_commit_marker_is_ignored_and_repaired(tmp_path):
    """The crash states a version-1 add_episode can leave: arrays grown past the commit, and episode_ends resized
    but its chunk not yet written (reads as the fill value 0)."""
    s = ZarrStore.create(tmp_path / "s", version=1)
    add(s, 0, 5)
    add(s, 1, 7)
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    for k in s.keys:
        a = g["data"][k]
        a.resize((20, *a.shape[1:]))
    for k in ("episode_seed", "episode_task", "episode_ends"):
        g["meta"][k].resize((3,))
    r = ZarrStore.open(tmp_path / "s", "r")
    assert (r.n_episodes, r.n_steps) == (2, 12) and r["action"].shape == (12, 7)
    problems = r.validate()
    assert problems and all(p.startswith("warning: torn tail") for p in problems), problems
    a = ZarrStore.open(tmp_path / "s", "a")
    assert a.validate() == []
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert g["data/image_front"].shape[0] == 12 and g["meta/episode_ends"].shape == (2,)
    assert add(a, 2, 4) == 2
    r = ZarrStore.open(tmp_path / "s", "r")
    np.testing.assert_array_equal(r.episode_ends, [5, 12, 16])
    np.testing.assert_array_equal(r.get_episode(1)["image_front"], make_episode(1, 7)["image_front"])
    np.testing.assert_array_equal(r.get_episode(2)["joint_pos"], make_episode(2, 4)["joint_pos"])
    assert r.validate() == []


class Killed(BaseException):
    """Stands for a SIGKILL at a file write (not an Exception: nothing in the store may catch it)."""


@pytest.mark.parametrize("leave_temp", [False, True])
def test_a_write_interrupted_at_any_file_leaves_every_committed_episode(tmp_path, monkeypatch, leave_temp):
    """Version 2: add_episode interrupted before each of its file writes in turn (with ``leave_temp``: after the
    temp file is written, before its rename, as a SIGKILL there leaves it), including the commit itself. Committed
    episodes read back exactly (also through a reader opened before the write and a frame reader holding the tail
    shard's old index), nothing is reported but a torn tail, and the store appends and reads on."""
    real, calls = zarrio.atomic_write, []

    def counting(path, data, mkdir=True):
        calls.append(path)
        real(path, data, mkdir)

    ref = ZarrStore.create(tmp_path / "ref")
    for i, T in enumerate((7, 5)):
        add(ref, i, T)
    monkeypatch.setattr(zarrio, "atomic_write", counting)
    add(ref, 2, 40)
    n_writes = len(calls)
    assert n_writes >= 8 and calls[-1].as_posix().endswith("meta/episode_ends/zarr.json")  # the commit is last
    for k in range(n_writes):
        path = tmp_path / f"s{k}"
        st = ZarrStore.create(path)
        for i, T in enumerate((7, 5)):
            add(st, i, T)
        reader, frames = ZarrStore.open(path), st.frames("image_front")
        frames[np.arange(12)]  # caches the tail shard's index
        count = [0]

        def failing(p, data, mkdir=True):
            if count[0] == k:
                if leave_temp:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.with_suffix(".0123456789abcdef0123456789abcdef.partial").write_bytes(bytes(data)[:7])
                raise Killed
            count[0] += 1
            real(p, data, mkdir)

        monkeypatch.setattr(zarrio, "atomic_write", failing)
        with pytest.raises(Killed):
            add(st, 2, 40)
        monkeypatch.setattr(zarrio, "atomic_write", real)
        for r in (ZarrStore.open(path), reader):
            assert (r.n_episodes, r.n_steps) == (2, 12), k
            for i, T in enumerate((7, 5)):
                got, want = r.get_episode(i), make_episode(i, T)
                assert all(np.array_equal(got[key], v) for key, v in want.items()), (k, i)
            assert r.episodes_meta() == ref.episodes_meta()[:2]
        np.testing.assert_array_equal(frames[np.arange(12)], ZarrStore.open(path)["image_front"][:12])
        problems = validate_store(path)
        assert all(p.startswith("warning: torn tail") for p in problems), (k, problems)
        a = ZarrStore.open(path, "a")
        assert a.validate() == [] and not list(path.rglob("*.partial"))
        add(a, 2, 40)
        add(a, 3, 3)
        r = ZarrStore.open(path)
        assert r.n_episodes == 4 and r.validate() == []
        for i, T in enumerate((7, 5, 40, 3)):
            got, want = r.get_episode(i), make_episode(i, T)
            assert all(np.array_equal(got[key], v) for key, v in want.items()), (k, i)


def test_appending_keeps_committed_frames_at_their_offsets(tmp_path):
    """Version 2 rewrites the tail shard on each append: the committed frames keep their bytes and their offsets,
    so a reader that read the shard's index before the rename reads the same bytes from the new file."""
    st = ZarrStore.create(tmp_path / "s")
    add(st, 0, 5)
    files = zarrio.ArrayFiles.load(tmp_path / "s" / "data" / "image_front")
    shard = files.file(0)

    def index_and_bytes():
        data = shard.read_bytes()
        index = files.parse_index(data[-files.index_nbytes:], len(data))
        return index, data

    old_index, old = index_and_bytes()
    add(st, 1, 3)
    add(st, 2, 4)
    new_index, new = index_and_bytes()
    np.testing.assert_array_equal(new_index[:5], old_index[:5])
    for off, size in old_index[:5].tolist():
        assert new[off:off + size] == old[off:off + size]
    assert (new_index[5:12, 0] != zarrio.MAX_U64).all() and (new_index[12:, 0] == zarrio.MAX_U64).all()


@pytest.mark.parametrize("version", [2, 1])
def test_validate_reports_corruption(tmp_path, version):
    s = ZarrStore.create(tmp_path / "s", version=version)
    for i in range(3):
        add(s, i, 4)
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    g["meta/episode_ends"][1] = 2  # non-monotonic in the middle
    g["data/action"][0, 0] = np.nan
    g["data/joint_pos"].resize((3, 9))
    problems = ZarrStore.open(tmp_path / "s").validate()
    assert any("not strictly increasing" in p for p in problems)
    assert any("data/joint_pos has 3 steps" in p for p in problems)
    assert any("NaN" in p for p in problems)
    assert all(p.startswith("error: ") for p in problems), problems
    with pytest.raises(ConfigError, match="damaged"):  # never "repair" committed data away
        ZarrStore.open(tmp_path / "s", "a")
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert g["data/action"].shape[0] == (12 if version == 1 else 1024) and g["meta/episode_ends"].shape == (3,)


@pytest.mark.parametrize("version", [2, 1])
def test_reader_sees_only_committed_and_refresh(tmp_path, version):
    w = ZarrStore.create(tmp_path / "s", version=version)
    add(w, 0, 3)
    r = ZarrStore.open(tmp_path / "s")
    add(w, 1, 2)
    assert r.n_episodes == 1 and r["action"].shape == (3, 7)
    r.refresh()
    assert r.n_episodes == 2 and r["action"].shape == (5, 7)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import make_episode
    from robot_rl.datasets.store import ZarrStore
    s = ZarrStore.create({path!r}, version={version})
    for i in range({n_small}):
        s.add_episode(make_episode(i, 20, hw=32), seed=i, task="lift", source="scripted", success=True,
                      backend="mujoco", extra={{"i": i}})
        print("committed", i, flush=True)
    big = make_episode({n_small}, {big_T}, hw=32)
    print("begin", {n_small}, flush=True)
    s.add_episode(big, seed=99, task="lift", source="scripted", success=True, backend="mujoco")
    print("committed", {n_small}, flush=True)
""")


@pytest.mark.parametrize("version", [2, 1])
def test_sigkill_mid_episode(tmp_path, version):
    """A writer killed with SIGKILL while it writes a big episode: every committed episode reads back exactly, only
    a torn tail is reported, and the store appends on. Version 2 is killed once its third image shard file is on
    disk (frames 1364+ of the big episode: the last, partial shard of the committed steps was rewritten by then);
    version 1 once its arrays were resized past the commit."""
    path, n_small = tmp_path / "s", 4
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), n_small=n_small,
                         big_T=12000 if version == 2 else 6000, version=version)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split())
            if lines[-1][0] == "begin":
                break
        assert lines[-1] == ["begin", str(n_small)], lines
        # kill once the big episode is visibly being written
        meta = path / "data" / "image_front" / "zarr.json"
        third_shard = path / "data" / "image_front" / "c" / "2" / "0" / "0" / "0"
        deadline = time.time() + 60
        if version == 1:  # data arrays grown past the commit
            while json.loads(meta.read_text())["shape"][0] <= 20 * n_small and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(0.05)
        else:
            while not third_shard.exists() and time.time() < deadline:
                time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    r = ZarrStore.open(path, "r")
    assert r.n_episodes == n_small and r.n_steps == 20 * n_small
    for i in range(n_small):
        got, want = r.get_episode(i), make_episode(i, 20, hw=32)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)
        assert r.episode_meta(i)["extra"] == {"i": i}
    problems = r.validate()
    assert all(p.startswith("warning: torn tail") for p in problems), problems
    if version == 1:
        assert any("data/image_front" in p for p in problems), problems  # the kill really landed mid-write
    else:  # frames of the uncommitted episode are on disk: the kill landed mid-write
        assert third_shard.exists() and r.n_steps < 2 * 682

    a = ZarrStore.open(path, "a")
    assert a.validate() == [] and not list(path.rglob("*.partial"))
    assert a.add_episode(make_episode(7, 9, hw=32), seed=7, task="lift", source="policy", success=False,
                         backend="pybullet") == n_small
    r = ZarrStore.open(path, "r")
    assert r.n_episodes == n_small + 1 and r.validate() == []
    for k, v in make_episode(7, 9, hw=32).items():
        np.testing.assert_array_equal(r.get_episode(n_small)[k], v)
    np.testing.assert_array_equal(r.get_episode(n_small - 1)["image_front"], make_episode(n_small - 1, 20, hw=32)["image_front"])
    # a later episode over the rows (and shard files) the killed writer left behind reads back as written
    a.add_episode(make_episode(8, 1500, hw=32), seed=8, task="lift", source="policy", success=True, backend="mujoco")
    r = ZarrStore.open(path, "r")
    assert r.validate() == []
    for k, v in make_episode(8, 1500, hw=32).items():
        np.testing.assert_array_equal(r.get_episode(n_small + 1)[k], v)


BOTH = ["marker_json", "data_chunk", "meta_array", "data_array"]
V2 = ["meta_row", "shard_missing", "shard_index", "frame_dropped", "frame_bytes"]


@pytest.mark.parametrize("version,damage", [(2, d) for d in BOTH + V2] + [(1, d) for d in BOTH])
def test_damaged_store_gives_one_line_errors_and_validate_reports_it(tmp_path, damage, version):
    """Damage on disk never surfaces as a traceback: opening (or reading the damaged steps) raises ConfigError and
    ``validate_store`` lists the problem without raising. Version 2 frames: a missing shard file, a shard index
    that fails its checksum, a frame absent from a shard's index (it would read as zeros) and undecodable frame
    bytes are each reported, and raise on reads through zarr and through the store's frame reader alike."""
    import shutil

    p = tmp_path / "s.zarr"
    st = ZarrStore.create(p, version=version)
    for i in range(3):
        add(st, i, 5 + i)
    assert validate_store(p) == []
    shard = p / "data" / "image_front" / "c" / "0" / "0" / "0" / "0"
    if damage == "marker_json":
        (p / "meta" / "episode_ends" / "zarr.json").write_text("{garbage")
    elif damage == "data_chunk":
        chunk = next(f for f in (p / "data" / "action").rglob("*") if f.is_file() and f.name != "zarr.json")
        chunk.write_bytes(b"x" * 16)
    elif damage == "meta_array":
        shutil.rmtree(p / "meta" / ("episode_success" if version == 1 else "episodes"))
    elif damage == "meta_row":
        g = zarr.open_group(str(p), mode="r+")
        g["meta/episodes"][1] = '{"seed": 1}'
    elif damage == "data_array":
        shutil.rmtree(p / "data" / "action")
    elif damage == "shard_missing":
        shard.unlink()
    elif damage == "shard_index":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "frame_dropped":  # zarr's own write skips an all-zero frame: the index then lacks it
        g = zarr.open_group(str(p), mode="r+")
        g["data/image_front"][3] = 0
    else:  # frame_bytes
        files = zarrio.ArrayFiles.load(p / "data" / "image_front")
        data = bytearray(shard.read_bytes())
        off = int(files.parse_index(bytes(data[-files.index_nbytes:]), len(data))[2, 0])
        data[off:off + 16] = b"\xff" * 16
        shard.write_bytes(bytes(data))
    problems = validate_store(p)
    assert any(q.startswith("error: ") for q in problems), problems
    if damage in ("data_chunk", "meta_row", "shard_missing", "shard_index", "frame_dropped", "frame_bytes"):
        st = ZarrStore.open(p)  # metadata intact: opens, and reading the damaged steps names the array
        with pytest.raises(ConfigError) as e:
            st.episodes_meta() if damage == "meta_row" else st.get_episode(0)
        assert e.value.field == {"data_chunk": "data/action", "meta_row": "meta/episodes"}.get(damage,
                                                                                             "data/image_front")
        if damage not in ("data_chunk", "meta_row"):
            for reader in (lambda: st.frames("image_front")[np.arange(5)], lambda: st.frames("image_front").load()):
                with pytest.raises(ConfigError) as e:
                    reader()[np.arange(5)] if damage == "frame_bytes" else reader()
                assert e.value.field == "data/image_front"
            with pytest.raises(ConfigError, match="damaged"):
                ZarrStore.open(p, "a")  # never appended to while damaged
    else:
        with pytest.raises(ConfigError):
            ZarrStore.open(p)


def test_committed_array_indexing(tmp_path):
    """Boolean masks select rows (they were once cast to 0/1 indices); other index types get ConfigError("index"),
    not the "damaged on disk" error; ConfigError survives pickling (vector-env workers send it to the parent)."""
    import pickle

    st = ZarrStore.create(tmp_path / "s.zarr")
    st.add_episode({"action": np.zeros((5, 2), np.float32), "x": np.arange(5) * 10}, seed=0, task="place",
                   source="scripted", success=True, backend="mujoco")
    x = st["x"]
    assert x[np.array([0, 1, 0, 1, 0], bool)].tolist() == [10, 30] and x[[4, 0]].tolist() == [40, 0]
    for bad in ("a", None, 1.5, np.array([0.5]), np.array([True, False])):
        with pytest.raises(ConfigError) as e:
            x[bad]
        assert e.value.field == "index"
    e2 = pickle.loads(pickle.dumps(ConfigError("f", "p", "x")))
    assert (type(e2), e2.field, e2.problem, e2.fix, str(e2)) == (ConfigError, "f", "p", "x", "f: p -> x")


def test_version1_store_opens_reads_appends_and_migrates(tmp_path):
    """Stores written before the sharded layout (version 1: one file per camera frame, one array per metadata
    field) keep working as they are: open, read (zarr and the frame reader), sample, append (in their own layout)
    and validate; ``migrate_store`` copies them exactly into the current layout."""
    from robot_rl.datasets.sampler import SequenceSampler
    from robot_rl.datasets.tools import migrate_store

    old = ZarrStore.create(tmp_path / "v1", version=1)
    add(old, 0, 6)
    add(old, 1, 9, human=True)
    assert (tmp_path / "v1" / "data" / "image_front" / "c" / "14" / "0" / "0" / "0").is_file()  # a file per frame
    assert (tmp_path / "v1" / "meta" / "episode_success" / "zarr.json").is_file()
    a = ZarrStore.open(tmp_path / "v1", "a")
    assert a.version == 1
    add(a, 2, 4)
    r = ZarrStore.open(tmp_path / "v1")
    assert (r.n_episodes, r.n_steps, r.version, r.validate()) == (3, 19, 1, [])
    assert zarr.open_group(str(tmp_path / "v1"), mode="r").attrs["version"] == 1  # appending never converts
    want = [make_episode(0, 6), make_episode(1, 9, human=True), make_episode(2, 4)]
    for i, w in enumerate(want):
        got = r.get_episode(i)
        for k, v in w.items():
            np.testing.assert_array_equal(got[k], v)
    idx = np.array([0, 0, 7, 18, 3])
    np.testing.assert_array_equal(r.frames("image_front")[idx], r["image_front"][idx])
    np.testing.assert_array_equal(r.frames("image_front").load()[idx], r["image_front"][idx])

    info = migrate_store(tmp_path / "v1", tmp_path / "v2")
    assert info == {"store": str(tmp_path / "v2"), "episodes": 3, "steps": 19, "from_version": 1,
                    "to_version": VERSION}
    new = ZarrStore.open(tmp_path / "v2")
    assert new.version == VERSION == 2 and new.validate() == [] and new.schema == r.schema
    assert new.episodes_meta() == r.episodes_meta()
    for i in range(3):
        a_ep, b_ep = r.get_episode(i), new.get_episode(i)
        assert all(np.array_equal(a_ep[k], b_ep[k], equal_nan=k == "human_action") for k in r.keys)
    for cache in (False, True):
        keys, obs = ["image_front", "joint_pos", "action"], ["image_front", "joint_pos"]
        s1 = SequenceSampler(r, keys, obs, horizon=4, n_obs_steps=2, cache_images=cache)
        s2 = SequenceSampler(new, keys, obs, horizon=4, n_obs_steps=2, cache_images=cache)
        assert len(s1) == len(s2) == 19
        for i in range(19):
            assert all(np.array_equal(s1[i][k], s2[i][k]) for k in keys)
    assert ZarrStore.open(tmp_path / "v1").validate() == []  # the source is only read
    with pytest.raises(ConfigError, match="already exists"):
        migrate_store(tmp_path / "v1", tmp_path / "v2")
    with pytest.raises(ConfigError, match="dst"):
        migrate_store(tmp_path / "v1", tmp_path / "v1" / "inside")
    with pytest.raises(ConfigError, match="version"):
        ZarrStore.create(tmp_path / "v3", version=3)
    g = zarr.open_group(str(tmp_path / "v2"), mode="r+")
    g.attrs["version"] = 3  # written by a newer robot_rl
    with pytest.raises(ConfigError, match="upgrade robot_rl"):
        ZarrStore.open(tmp_path / "v2")
