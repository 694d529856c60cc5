"""diffusion_policy ReplayBuffer zarr (format 2) <-> store: the real fixture written by diffusion_policy's own
ReplayBuffer imports exactly; ours -> theirs -> ours is bit-identical (metadata, interventions and human actions
included); the export is the layout ReplayBuffer writes; bad input gets a one-line error naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from robot_rl.datasets.formats import MetaDefaults, export_dataset, import_dataset
from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"  # written by diffusion_policy's own ReplayBuffer (fixtures/THIRD_PARTY.md)
FIXTURE = FIXTURES / "diffusion_policy_tiny.zarr"


def make_store(path, n_episodes=3, seed=0):
    """A store with an image, low-dim keys, one intervention episode with human actions, varied metadata."""
    rng = np.random.default_rng(seed)
    st = ZarrStore.create(path)
    for e in range(n_episodes):
        T = 8 + 3 * e
        data = {"action": rng.uniform(-1, 1, (T, 5)).astype(np.float32),
                "ee_pos": rng.normal(size=(T, 3)).astype(np.float32),
                "gripper_width": rng.uniform(0, 0.08, (T, 1)).astype(np.float32),
                "image_front": rng.integers(0, 256, (T, 24, 32, 3), dtype=np.uint8)}
        if e == 1:
            data["intervention"] = np.arange(T) >= T // 2
            data["human_action"] = np.where(data["intervention"][:, None], data["action"] + 0.1, np.nan)
            data["human_action"] = data["human_action"].astype(np.float32)
        st.add_episode(data, seed=100 + e, task="place", source=("scripted", "intervention", "policy")[e % 3],
                       success=e != 2, backend=("mujoco", "pybullet", "real")[e % 3], robot="panda",
                       extra={"noise": 0.1 * e, "params": {"mass": [0.05, e]}})
    return ZarrStore.open(path)


def assert_same_store(a: ZarrStore, b: ZarrStore):
    assert a.keys == b.keys and list(a.episode_ends) == list(b.episode_ends)
    for k in a.keys:
        x, y = a[k][:], b[k][:]
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k
    for ma, mb in zip(a.episodes_meta(), b.episodes_meta()):
        mb["extra"].pop("imported_from")
        assert ma == mb


def test_the_real_replay_buffer_imports_exactly(tmp_path):
    want = np.load(FIXTURES / "diffusion_policy_tiny.expected.npz")
    r = import_dataset("diffusion_policy", FIXTURE, tmp_path / "s.zarr", defaults=MetaDefaults(task="place"),
                       progress=False)
    assert r["episodes"] == 3 and r["steps"] == 60
    st = ZarrStore.open(tmp_path / "s.zarr")
    assert list(st.episode_ends) == want["episode_ends"].tolist()
    for ours, theirs in (("image_img", "img"), ("state", "state"), ("action", "action")):
        got = st[ours][:]
        assert got.dtype == want[theirs].dtype and np.array_equal(got, want[theirs]), ours
    m = st.episode_meta(2)
    assert (m["task"], m["source"], m["success"], m["backend"], m["seed"]) == ("place", "teleop", True, "real", 2)
    assert m["extra"] == {"imported_from": "diffusion_policy"}
    with pytest.raises(ConfigError, match="task"):  # the format names no task: a default is required
        import_dataset("diffusion_policy", FIXTURE, tmp_path / "t.zarr", progress=False)


def test_ours_to_theirs_to_ours_is_bit_identical_and_looks_like_a_replay_buffer(tmp_path):
    st = make_store(tmp_path / "a.zarr")
    dst = tmp_path / "dp.zarr"
    r = export_dataset("diffusion_policy", tmp_path / "a.zarr", dst)
    assert r["episodes"] == 3 and "front" in r["keys"]
    # the layout diffusion_policy's ReplayBuffer writes (compare the real fixture): zarr format 2, data/<key>,
    # meta/episode_ends int64 uncompressed, Blosc lz4 level 5 without shuffle, one camera frame per chunk
    root = zarr.open_group(str(dst), mode="r", zarr_format=2)
    assert sorted(root["data"].array_keys()) == sorted(["action", "ee_pos", "gripper_width", "front",
                                                        "intervention", "human_action"])
    assert root["meta/episode_ends"][:].tolist() == list(st.episode_ends)
    front = json.loads((dst / "data" / "front" / ".zarray").read_text())
    assert front["chunks"] == [1, 24, 32, 3] and front["zarr_format"] == 2
    assert front["compressor"] == {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 0, "blocksize": 0}
    ends = json.loads((dst / "meta" / "episode_ends" / ".zarray").read_text())
    assert ends["dtype"] == "<i8" and ends["compressor"] is None
    if FIXTURE.is_dir():
        theirs = json.loads((FIXTURE / "data" / "img" / ".zarray").read_text())
        assert {k: theirs[k] for k in ("compressor", "order", "dimension_separator", "filters")} == \
               {k: front[k] for k in ("compressor", "order", "dimension_separator", "filters")}
    import_dataset("diffusion_policy", dst, tmp_path / "b.zarr", progress=False)
    assert_same_store(st, ZarrStore.open(tmp_path / "b.zarr"))


def test_bad_input_names_the_field(tmp_path):
    g = zarr.open_group(str(tmp_path / "no_meta.zarr"), mode="w", zarr_format=2)
    g.create_group("data").create_array("action", shape=(4, 2), dtype="f4")
    with pytest.raises(ConfigError, match="meta/episode_ends"):
        import_dataset("diffusion_policy", tmp_path / "no_meta.zarr", tmp_path / "x.zarr", progress=False)
    make_store(tmp_path / "a.zarr", n_episodes=1)
    export_dataset("diffusion_policy", tmp_path / "a.zarr", tmp_path / "dp.zarr")
    with pytest.raises(ConfigError, match="already exists"):
        export_dataset("diffusion_policy", tmp_path / "a.zarr", tmp_path / "dp.zarr")
    with pytest.raises(ConfigError, match="action"):  # renamed away: no action left
        import_dataset("diffusion_policy", tmp_path / "dp.zarr", tmp_path / "y.zarr", key_map={"action": "act"},
                       progress=False)
    assert not (tmp_path / "y.zarr" / "meta").exists() or ZarrStore.open(tmp_path / "y.zarr").n_episodes == 0
    r = subprocess.run([sys.executable, "-m", "robot_rl.cli", "store", "export", "--format", "diffusion_policy",
                        str(tmp_path / "a.zarr"), str(tmp_path / "z.zarr"), "--vcodec", "libx264"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("robot-rl: error: vcodec")
