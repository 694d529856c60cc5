"""ZarrStore on a real directory store: round trip, input errors, torn writes, a real SIGKILL mid-episode."""

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
from robot_rl.datasets.store import ZarrStore, format_info


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


def add(store, i, T, **kw):
    return store.add_episode(make_episode(i, T, **kw), seed=i, task="lift", source="scripted", success=i % 2 == 0,
                             backend="mujoco", extra={"friction": 0.5 + i, "cube_xy": np.array([0.1, i])})


def test_round_trip(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
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
    assert g.attrs["format"] == "robot_rl.datasets.store" and g.attrs["version"] == 1
    assert g["data/image_front"].chunks == (1, 8, 8, 3) and g["data/action"].chunks[0] == 1024
    assert g["data/image_front"].compressors[0].cname.value == "zstd"
    info = r.info()
    assert info["episodes"] == 3 and info["steps"] == 18 and info["sources"] == {"scripted": 3}
    assert info["success_rate"] == pytest.approx(2 / 3) and info["size_bytes"] > 0
    text = format_info(info)
    assert "3 episodes" in text and "image_front" in text and "66.7%" in text
    assert r.validate() == []


def test_human_action_added_later_and_flags(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
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


def test_human_action_added_after_a_full_chunk(tmp_path):
    """human_action first given after more than one time chunk (1024 steps): the earlier chunks are written as
    NaN too, so none of the committed steps reads from a missing chunk file (which would be damage)."""
    s = ZarrStore.create(tmp_path / "s")
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
    # nothing was written by the rejected calls
    assert s.n_episodes == 1 and s.validate() == []
    r = ZarrStore.open(tmp_path / "s", "r")
    assert all(r._root["data"][k].shape[0] == 4 for k in r.keys)
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
    """The crash states add_episode can leave: arrays grown past the commit, and episode_ends resized but its
    chunk not yet written (reads as the fill value 0)."""
    s = ZarrStore.create(tmp_path / "s")
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


def test_validate_reports_corruption(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
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
    assert g["data/action"].shape[0] == 12 and g["meta/episode_ends"].shape == (3,)


def test_reader_sees_only_committed_and_refresh(tmp_path):
    w = ZarrStore.create(tmp_path / "s")
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
    s = ZarrStore.create({path!r})
    for i in range({n_small}):
        s.add_episode(make_episode(i, 20, hw=32), seed=i, task="lift", source="scripted", success=True,
                      backend="mujoco", extra={{"i": i}})
        print("committed", i, flush=True)
    big = make_episode({n_small}, {big_T}, hw=32)
    print("begin", {n_small}, flush=True)
    s.add_episode(big, seed=99, task="lift", source="scripted", success=True, backend="mujoco")
    print("committed", {n_small}, flush=True)
""")


def test_sigkill_mid_episode(tmp_path):
    path, n_small = tmp_path / "s", 4
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), n_small=n_small, big_T=6000)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split())
            if lines[-1][0] == "begin":
                break
        assert lines[-1] == ["begin", str(n_small)], lines
        # kill once the big episode is visibly being written (data arrays grown past the commit)
        meta = path / "data" / "image_front" / "zarr.json"
        deadline = time.time() + 30
        while json.loads(meta.read_text())["shape"][0] <= 20 * n_small and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(0.05)
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
    assert any("data/image_front" in p for p in problems), problems  # the kill really landed mid-write

    a = ZarrStore.open(path, "a")
    assert a.validate() == [] and not list(path.rglob("*.partial"))
    assert a.add_episode(make_episode(7, 9, hw=32), seed=7, task="lift", source="policy", success=False,
                         backend="pybullet") == n_small
    r = ZarrStore.open(path, "r")
    assert r.n_episodes == n_small + 1 and r.validate() == []
    for k, v in make_episode(7, 9, hw=32).items():
        np.testing.assert_array_equal(r.get_episode(n_small)[k], v)
    np.testing.assert_array_equal(r.get_episode(n_small - 1)["image_front"], make_episode(n_small - 1, 20, hw=32)["image_front"])


@pytest.mark.parametrize("damage", ["marker_json", "data_chunk", "meta_array", "data_array"])
def test_damaged_store_gives_one_line_errors_and_validate_reports_it(tmp_path, damage):
    """Damage on disk never surfaces as a traceback: opening (or reading the damaged steps) raises ConfigError and
    ``validate_store`` lists the problem without raising."""
    import shutil

    from robot_rl.datasets.store import validate_store

    p = tmp_path / "s.zarr"
    st = ZarrStore.create(p)
    for i in range(3):
        add(st, i, 5 + i)
    assert validate_store(p) == []
    if damage == "marker_json":
        (p / "meta" / "episode_ends" / "zarr.json").write_text("{garbage")
    elif damage == "data_chunk":
        chunk = next(f for f in (p / "data" / "action").rglob("*") if f.is_file() and f.name != "zarr.json")
        chunk.write_bytes(b"x" * 16)
    elif damage == "meta_array":
        shutil.rmtree(p / "meta" / "episode_success")
    else:
        shutil.rmtree(p / "data" / "action")
    problems = validate_store(p)
    assert any(q.startswith("error: ") for q in problems), problems
    if damage == "data_chunk":  # metadata intact: opens, and reading the damaged steps names the array
        st = ZarrStore.open(p)
        with pytest.raises(ConfigError) as e:
            st.get_episode(0)
        assert e.value.field == "data/action"
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
