"""Store tools on real zarr stores: filter_store, merge_stores (episodes copied bit-identical) and store info."""

import os

import numpy as np
import pytest

from robot_rl.datasets.store import ZarrStore, format_info
from robot_rl.datasets.tools import filter_store, matching_episodes, merge_stores
from robot_rl.errors import ConfigError

# (source, success, task, seed) of the episodes of store "a"
A_EPISODES = [("scripted", True, "lift", 0), ("teleop", False, "lift", 1), ("policy", True, "place", 2),
              ("scripted", False, "place", 3), ("policy", False, "lift", 10), ("teleop", True, "place", 11)]


def episode(rng, T, human=False, joint_dim=4):
    d = {"action": rng.normal(size=(T, 3)).astype(np.float32),
         "joint_pos": rng.normal(size=(T, joint_dim)).astype(np.float32),
         "image_front": rng.integers(0, 256, size=(T, 4, 4, 3), dtype=np.uint8),
         "intervention": rng.random(T) < 0.5}
    if human:
        h = rng.normal(size=(T, 3)).astype(np.float32)
        h[::2] = np.nan  # a human acted on odd steps only
        d["human_action"] = h
    return d


def make_store(path, rng, episodes, human=False, joint_dim=4):
    s = ZarrStore.create(path)
    for i, (source, success, task, seed) in enumerate(episodes):
        s.add_episode(episode(rng, 3 + i % 3, human, joint_dim), seed=seed, task=task, source=source,
                      success=success, backend="mujoco", extra={"friction": 0.1 * i + 1e-9, "tag": [i, "x"]})
    return ZarrStore.open(path)


@pytest.fixture(scope="module")
def a(tmp_path_factory):  # read-only in every test (the tools never write to a source)
    return make_store(tmp_path_factory.mktemp("src") / "a", np.random.default_rng(0), A_EPISODES)


@pytest.fixture(scope="module")
def b(tmp_path_factory):
    eps = [("intervention", True, "lift", 100), ("intervention", False, "place", 101), ("teleop", True, "lift", 102)]
    return make_store(tmp_path_factory.mktemp("src") / "b", np.random.default_rng(1), eps, human=True)


def assert_same_episode(src, i, dst, j, fill_nan=()):
    """Episode j of dst equals episode i of src: every array bit-identical (NaN where NaN), same metadata."""
    x, y = src.get_episode(i), dst.get_episode(j)
    assert set(y) == set(x) | set(fill_nan)
    for k in y:
        if k not in x:  # NaN-filled by the store
            assert y[k].dtype == np.float32 and y[k].shape == x["action"].shape and np.isnan(y[k]).all()
            continue
        assert y[k].dtype == x[k].dtype and y[k].shape == x[k].shape, k
        assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k
    strip = lambda m: {k: v for k, v in m.items() if k not in ("index", "start", "end")}  # noqa: E731
    assert strip(src.episode_meta(i)) == strip(dst.episode_meta(j))


@pytest.mark.parametrize("kw, want", [
    (dict(sources=["policy"]), [2, 4]),
    (dict(sources="teleop"), [1, 5]),
    (dict(success=True), [0, 2, 5]),
    (dict(success=False), [1, 3, 4]),
    (dict(tasks=["place"]), [2, 3, 5]),
    (dict(seed_range=(1, 11)), [1, 2, 3, 4]),
    (dict(sources=["scripted", "policy"], success=False, tasks=["lift", "place"], seed_range=(0, 11)), [3, 4]),
])
def test_filter_store(a, tmp_path, kw, want):
    assert matching_episodes(a, **kw) == want
    r = filter_store(a.path, tmp_path / "f", **kw)
    f = ZarrStore.open(tmp_path / "f")
    assert r == {"store": str(f.path), "episodes": len(want), "steps": f.n_steps, "indices": want}
    assert f.n_steps == sum(a.episode_meta(i)["length"] for i in want) and f.schema == a.schema
    for j, i in enumerate(want):
        assert_same_episode(a, i, f, j)
    assert f.validate() == []


def test_filter_errors_leave_dst_untouched(a, tmp_path):
    dst = tmp_path / "f"
    with pytest.raises(ConfigError, match=r"filter.*matches success=True, tasks=\['push'\].*tasks \['lift', 'place'\]"):
        filter_store(a.path, dst, success=True, tasks=["push"])
    for kw, field in [(dict(sources=["robot"]), "sources"), (dict(sources=[]), "sources"),
                      (dict(success="yes"), "success"), (dict(seed_range=(5, 5)), "seed_range"),
                      (dict(seed_range=(0, 1.5)), "seed_range")]:
        with pytest.raises(ConfigError, match=field):
            filter_store(a.path, dst, **kw)
    assert not dst.exists()
    with pytest.raises(ConfigError, match="dst"):  # into itself (with overwrite it would delete the source)
        filter_store(a.path, a.path, overwrite=True)
    with pytest.raises(ConfigError, match="dst"):
        filter_store(a.path, a.path / "inner")
    assert a.validate() == [] and ZarrStore.open(a.path).n_episodes == 6
    # an existing store at dst: refused without overwrite, byte for byte untouched
    filter_store(a.path, dst, tasks="lift")
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already exists"):
        filter_store(a.path, dst, tasks="place")
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert filter_store(a.path, dst, tasks="place", overwrite=True)["indices"] == [2, 3, 5]
    assert [m["task"] for m in ZarrStore.open(dst).episodes_meta()] == ["place"] * 3


def test_merge_stores_concatenates_exactly(a, b, tmp_path):
    r = merge_stores([a.path, b.path], tmp_path / "m")
    m = ZarrStore.open(tmp_path / "m")
    assert r["episodes"] == m.n_episodes == 9 and r["steps"] == m.n_steps == a.n_steps + b.n_steps
    assert r["per_store"] == [{"store": str(a.path), "episodes": 6, "steps": a.n_steps},
                              {"store": str(b.path), "episodes": 3, "steps": b.n_steps}]
    assert set(m.schema) == set(a.schema) | {"human_action"} and m.schema["human_action"]["dtype"] == "float32"
    for i in range(6):  # a has no human_action: NaN-filled, as add_episode would
        assert_same_episode(a, i, m, i, fill_nan=("human_action",))
    for i in range(3):
        assert_same_episode(b, i, m, 6 + i)
    assert m.validate() == []
    # the other order: human_action in the schema from the first episode on
    merge_stores([b.path, a.path], tmp_path / "m2")
    m2 = ZarrStore.open(tmp_path / "m2")
    assert m2.n_episodes == 9 and m2.validate() == []
    assert_same_episode(b, 2, m2, 2)
    assert_same_episode(a, 0, m2, 3, fill_nan=("human_action",))
    text = format_info(m2.info())
    assert "9 episodes" in text and "intervention" in text


def test_merge_errors(a, b, tmp_path):
    c = make_store(tmp_path / "c", np.random.default_rng(2), A_EPISODES[:2], joint_dim=5)
    dst = tmp_path / "m"
    with pytest.raises(ConfigError, match=f"joint_pos.*float32 \\(4,\\).*{a.path}.*float32 \\(5,\\).*{c.path}"):
        merge_stores([a.path, b.path, c.path], dst)
    d = ZarrStore.create(tmp_path / "d")
    d.add_episode({"action": np.zeros((2, 3), np.float32)}, seed=0, task="lift", source="scripted", success=True,
                  backend="mujoco")
    with pytest.raises(ConfigError, match=f"image_front.*in {a.path} but not in {d.path}"):
        merge_stores([a.path, d.path], dst)
    empty = ZarrStore.create(tmp_path / "e")
    with pytest.raises(ConfigError, match="srcs"):
        merge_stores([empty.path], dst)
    with pytest.raises(ConfigError, match="srcs"):
        merge_stores([], dst)
    with pytest.raises(ConfigError, match="dst"):
        merge_stores([a.path, b.path], b.path, overwrite=True)
    assert not dst.exists() and ZarrStore.open(b.path).n_episodes == 3
    assert merge_stores([empty.path, a.path], dst)["per_store"][0]["episodes"] == 0
    with pytest.raises(ConfigError, match="already exists"):
        merge_stores([b.path], dst)
    assert ZarrStore.open(dst).n_episodes == 6


def test_info_counts_per_source_and_task(a):
    info = a.info()
    assert info["successes"] == 3 and info["success_rate"] == pytest.approx(0.5)
    assert info["by_source"] == {"policy": {"episodes": 2, "successes": 1}, "scripted": {"episodes": 2, "successes": 1},
                                 "teleop": {"episodes": 2, "successes": 1}}
    assert info["by_task"] == {"lift": {"episodes": 3, "successes": 1}, "place": {"episodes": 3, "successes": 2}}
    assert info["sources"] == {"scripted": 2, "teleop": 2, "policy": 2} and info["tasks"] == {"lift": 3, "place": 3}
    lines = format_info(info).splitlines()
    assert "success 50.0% (3/6)" in lines[1]
    assert lines[2].split() == ["sources", "policy", "2", "episodes", "1", "successful", "(50.0%)"]
    assert lines[5].split() == ["tasks", "lift", "3", "episodes", "1", "successful", "(33.3%)"]
    assert lines[6].split() == ["place", "3", "episodes", "2", "successful", "(66.7%)"]


def test_info_empty_store(tmp_path):
    empty = ZarrStore.create(tmp_path / "empty").info()
    assert empty["by_source"] == {} and empty["successes"] == 0 and empty["success_rate"] is None
    text = format_info(empty)
    assert "sources  -" in text and "success n/a," in text and os.fspath(tmp_path / "empty") in text


def test_placement_errors_script_splits_the_final_error_by_label(tmp_path):
    """scripts/placement_errors.py: the cube-to-target error at each episode's last step, mean and spread per label."""
    import subprocess
    import sys
    from pathlib import Path

    st = ZarrStore.create(tmp_path / "p.zarr")
    for i, (dy, ok) in enumerate([(0.008, False), (0.006, False), (0.001, True)]):
        c2t = np.zeros((5, 3), np.float32)
        c2t[-1] = [0.0, dy, 0.0]
        c2t[:-1] = 0.5  # only the last step counts
        st.add_episode({"action": np.zeros((5, 5), np.float32), "cube_to_target": c2t}, seed=i, task="place",
                       source="policy", success=ok, backend="pybullet")
    script = Path(__file__).parent.parent / "scripts" / "placement_errors.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "p.zarr")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "3 episodes, 1 successes"
    assert lines[1] == ("failed (2): target - cube [mm] mean x +0.0 y +7.0, std x 0.0 y 1.0, median x +0.0 y +7.0, "
                        "median |error| 7.0")
    assert lines[2].startswith("succeeded (1): target - cube [mm] mean x +0.0 y +1.0")


def test_replay_actions_script_reproduces_a_recording_on_its_own_simulator(tmp_path):
    """scripts/replay_actions.py: recorded place episodes (robot-rl eval --record, fixture base, MuJoCo) replayed
    open loop on MuJoCo from their seeds retrace the recording exactly and succeed again; on PyBullet the script
    runs and reports the same fields."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.stages.evaluation import evaluate

    base = load_policy(Path(__file__).parent / "fixtures" / "place_bc_mujoco")
    st = ZarrStore.create(tmp_path / "mj.zarr")
    r = evaluate(base, "place", n_episodes=2, n_envs=1, task_kwargs={"tolerance": 0.01}, record=st, progress=False)
    assert r["successes"] == 2
    scripts = str(Path(__file__).parent.parent / "scripts")
    sys.path.insert(0, scripts)
    try:
        from replay_actions import replay, summary
    finally:
        sys.path.remove(scripts)
    s = summary(replay(ZarrStore.open(tmp_path / "mj.zarr", mode="r"), "mujoco", 0.01, 5))
    assert s["episodes"] == 2 and s["successes"] == 2
    assert s["ee_path_mm"] == [0.0, 0.0, 0.0] and s["final_cube_xy_mm"] == [0.0, 0.0]
    assert s["in_hand_mm"] == [0.0, 0.0, 0.0]  # the cube was lifted in both, and sits where it sat
    out = subprocess.run([sys.executable, f"{scripts}/replay_actions.py", str(tmp_path / "mj.zarr"), "--backend",
                          "pybullet", "--tolerance", "0.01", "--episodes", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "replayed 1 successful episodes on pybullet" in out.stdout and "final cube x y" in out.stdout
    json.dumps(s)  # plain numbers
