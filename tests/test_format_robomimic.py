"""robomimic HDF5 converter (robot_rl.datasets.formats.robomimic): fixture import, round trip, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from robot_rl.datasets.formats import Episode, MetaDefaults, export_dataset, import_dataset
from robot_rl.datasets.formats import robomimic
from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "robomimic_tiny.hdf5"


def test_import_fixture(tmp_path):
    out = import_dataset("robomimic", FIXTURE, tmp_path / "s.zarr", defaults=MetaDefaults(task="lift"), progress=False)
    st = ZarrStore.open(tmp_path / "s.zarr")
    names = ["demo_0", "demo_2", "demo_10"]  # numeric order, not lexical
    assert out["episodes"] == 3 and out["steps"] == 37
    assert set(st.keys) == {"action", "intervention", "robot0_eef_pos", "image_agentview"}
    with h5py.File(FIXTURE, "r") as f:
        for i, name in enumerate(names):
            demo, ep, meta = f["data"][name], st.get_episode(i), st.episode_meta(i)
            assert meta["length"] == demo.attrs["num_samples"] == len(demo["actions"])
            assert ep["action"].dtype == np.float32
            np.testing.assert_array_equal(ep["action"], demo["actions"][()].astype(np.float32))
            np.testing.assert_array_equal(ep["robot0_eef_pos"], demo["obs/robot0_eef_pos"][()])
            assert ep["robot0_eef_pos"].dtype == np.float64
            np.testing.assert_array_equal(ep["image_agentview"], demo["obs/agentview_image"][()])
            assert not ep["intervention"].any()
            assert meta["task"] == "Lift"  # env_args' env_name wins over the default
            assert (meta["source"], meta["backend"], meta["seed"]) == ("teleop", "real", i)
    assert [st.episode_meta(i)["success"] for i in range(3)] == [True, False, True]  # reward / none / done only
    valid = list(robomimic.read(FIXTURE, filter_key="valid"))
    assert len(valid) == 1 and len(valid[0].data["action"]) == 15 and valid[0].meta["success"] is False


def _store(path: Path) -> ZarrStore:
    rng = np.random.default_rng(1)
    st = ZarrStore.create(path)
    for i, T in enumerate((5, 7, 4)):
        data = {"action": rng.normal(size=(T, 4)).astype(np.float32),
                "image_front": rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8),
                "ee_pos": rng.normal(size=(T, 3)).astype(np.float32),
                "cube_pos": rng.normal(size=(T, 3)).astype(np.float32)}
        if i == 1:
            data["intervention"] = np.array([False, False, True, True, True, False, False])
            data["human_action"] = np.where(data["intervention"][:, None], rng.normal(size=(T, 4)), np.nan)
        st.add_episode(data, seed=100 + i, task=("lift", "place", "lift")[i], source=("scripted", "intervention",
                       "policy")[i], success=i != 2, backend=("mujoco", "pybullet", "real")[i],
                       robot="panda", extra={"noise": 0.1 * i, "tags": ["a", i]})
    return st


def test_round_trip_bit_identical(tmp_path):
    st = _store(tmp_path / "a.zarr")
    h5 = tmp_path / "out.hdf5"
    summary = export_dataset("robomimic", st.path, h5)
    assert summary == {"path": str(h5), "episodes": 3, "steps": 16, "obs_keys": ["cube_pos", "ee_pos", "front_image"]}
    with h5py.File(h5, "r") as f:
        assert list(f) == ["data"] and f["data"].attrs["total"] == 16
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "lift,place" and set(env_args) == {"env_name", "type", "env_kwargs"}
        for i, T in enumerate((5, 7, 4)):
            demo = f[f"data/demo_{i}"]
            assert demo.attrs["num_samples"] == T and demo["actions"].shape == (T, 4)
            assert set(demo["obs"]) == {"cube_pos", "ee_pos", "front_image"}
            assert demo["obs/front_image"].dtype == np.uint8 and demo["obs/front_image"].shape == (T, 8, 8, 3)
            assert demo["rewards"].dtype == np.float64 and demo["dones"].dtype == np.int64
            assert demo["rewards"][-1] == demo["dones"][-1] == (i != 2) and not demo["rewards"][:-1].any()
            assert ("robot_rl_intervention" in demo) == ("robot_rl_human_action" in demo) == (i == 1)
            assert json.loads(demo.attrs["robot_rl_meta"])["seed"] == 100 + i
    import_dataset("robomimic", h5, tmp_path / "b.zarr", defaults=MetaDefaults(task="other"), progress=False)
    st2 = ZarrStore.open(tmp_path / "b.zarr")
    assert st2.n_episodes == 3 and set(st2.keys) == set(st.keys)
    for i in range(3):
        a, b = st.get_episode(i), st2.get_episode(i)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k  # bit-identical (NaNs too)
        ma, mb = st.episode_meta(i), st2.episode_meta(i)
        assert mb["extra"].pop("imported_from") == "robomimic"
        assert ma == mb


def _bad_file(path: Path, **demo) -> Path:
    with h5py.File(path, "w") as f:
        g = f.create_group("data/demo_0")
        for k, v in demo.items():
            g.create_dataset(k, data=v)
    return path


def test_bad_input(tmp_path):
    with h5py.File(tmp_path / "nodata.hdf5", "w") as f:
        f.create_dataset("actions", data=np.zeros((3, 2)))
    cases = {
        "data": tmp_path / "nodata.hdf5",
        "data/demo_0/obs/robot0_eef_pos": _bad_file(tmp_path / "len.hdf5", actions=np.zeros((4, 2)),
                                                    **{"obs/robot0_eef_pos": np.zeros((3, 3))}),
        "data/demo_0/actions": _bad_file(tmp_path / "noact.hdf5", **{"obs/x": np.zeros((3, 3))}),
        "data/demo_0/obs/agentview_image": _bad_file(tmp_path / "img.hdf5", actions=np.zeros((2, 2)),
                                                     **{"obs/agentview_image": np.zeros((2, 4, 4, 3))}),
    }
    for field, path in cases.items():
        with pytest.raises(ConfigError) as e:
            import_dataset("robomimic", path, tmp_path / f"{path.stem}.zarr", defaults=MetaDefaults(task="lift"),
                           progress=False)
        assert e.value.field == field, e.value
    with pytest.raises(ConfigError, match="filter_key"):
        list(robomimic.read(FIXTURE, filter_key="test"))
    low_dim_as_image = Episode({"action": np.zeros((2, 2), np.float32), "depth_image": np.zeros((2, 3))})
    with pytest.raises(ConfigError, match="depth_image"):
        robomimic.write([low_dim_as_image], tmp_path / "x.hdf5")
    assert not list(tmp_path.glob("*x.hdf5*"))  # nothing left behind
