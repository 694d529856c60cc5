"""SequenceSampler windows, padding, splits and normalization on a real store."""

import numpy as np
import pytest
import torch

from robot_rl.errors import ConfigError
from robot_rl.datasets.sampler import SequenceSampler, WindowDataset, compute_normalization, split_episodes
from robot_rl.datasets.store import ZarrStore

LENGTHS = [4, 1, 6]


def code(e, t):
    """Value identifying (episode, step): every frame of every key carries it."""
    return 100 * e + t


@pytest.fixture
def store(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
    for e, T in enumerate(LENGTHS):
        c = code(e, np.arange(T))
        s.add_episode({"action": np.repeat(c[:, None], 7, 1).astype(np.float32),
                       "joint_pos": np.repeat(c[:, None], 9, 1).astype(np.float32) + np.arange(9),
                       "image_front": np.broadcast_to((c % 256).astype(np.uint8)[:, None, None, None],
                                                      (T, 4, 4, 3)).copy(),
                       "intervention": c % 2 == 1},
                      seed=e, task="lift", source="scripted", success=True, backend="mujoco")
    return ZarrStore.open(tmp_path / "s")


KEYS, OBS = ["joint_pos", "image_front", "action", "intervention"], ["joint_pos", "image_front"]


def window_codes(sampler, i):
    w = sampler[i]
    return w["action"][:, 0].astype(int).tolist(), w["joint_pos"][:, 0].astype(int).tolist(), w


@pytest.mark.parametrize("cache", [False, True])
def test_windows_padding_exact(store, cache):
    s = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=cache)
    assert len(s) == sum(LENGTHS)
    # episode 0 (L=4): window of t covers t-1 .. t+3, edge-padded
    act, obs, w = window_codes(s, 0)
    assert act == [0, 0, 1, 2, 3] and obs == [0, 0]
    assert w["action"].shape == (5, 7) and w["joint_pos"].shape == (2, 9) and w["image_front"].shape == (2, 4, 4, 3)
    assert w["image_front"].dtype == np.uint8 and w["image_front"][:, 0, 0, 0].tolist() == [0, 0]
    np.testing.assert_array_equal(w["joint_pos"][1], np.arange(9))
    assert w["intervention"].tolist() == [False, False, True, False, True]
    act, obs, _ = window_codes(s, 1)
    assert act == [0, 1, 2, 3, 3] and obs == [0, 1]
    act, obs, _ = window_codes(s, 3)  # last step of episode 0
    assert act == [2, 3, 3, 3, 3] and obs == [2, 3]
    act, obs, _ = window_codes(s, 4)  # the single-step episode 1
    assert act == [100] * 5 and obs == [100, 100]
    act, obs, w = window_codes(s, 5)  # first step of episode 2
    assert act == [200, 200, 201, 202, 203] and w["image_front"][:, 0, 0, 0].tolist() == [200, 200]
    act, obs, _ = window_codes(s, -1)
    assert act == [204, 205, 205, 205, 205] and obs == [204, 205]
    with pytest.raises(IndexError):
        s[len(s)]


def test_no_cross_episode_leakage_and_selection(store):
    s = SequenceSampler(store, KEYS, OBS, horizon=8, n_obs_steps=3, episode_indices=[2, 0])
    assert len(s) == LENGTHS[2] + LENGTHS[0]
    eps = [2] * LENGTHS[2] + [0] * LENGTHS[0]
    for i, e in enumerate(eps):
        w = s[i]
        for k, v in w.items():
            if k != "intervention":
                vals = v.reshape(len(v), -1)[:, 0].astype(int)
                assert np.all(vals // 100 == e), (i, k, vals)
        assert len(w["action"]) == 8 and len(w["joint_pos"]) == 3
    # To == T: obs and action windows are the same steps
    s = SequenceSampler(store, KEYS, OBS, horizon=3, n_obs_steps=3)
    w = s[2]
    assert w["action"][:, 0].tolist() == w["joint_pos"][:, 0].tolist() == [0, 1, 2]


def test_sampler_errors(store):
    for kw, field in [(dict(keys=["nope"], obs_keys=[]), "keys"), (dict(obs_keys=["ee_pos"]), "obs_keys"),
                      (dict(horizon=0), "horizon"), (dict(n_obs_steps=9), "n_obs_steps"),
                      (dict(episode_indices=[3]), "episode_indices"), (dict(episode_indices=[]), "episode_indices")]:
        args = dict(keys=KEYS, obs_keys=OBS, horizon=4, n_obs_steps=2) | kw
        with pytest.raises(ConfigError, match=field):
            SequenceSampler(store, **args)


def test_split_episodes():
    tr, va = split_episodes(20, 0.25, seed=3)
    assert len(va) == 5 and len(tr) == 15 and sorted(np.concatenate([tr, va]).tolist()) == list(range(20))
    tr2, va2 = split_episodes(20, 0.25, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, split_episodes(20, 0.25, seed=4)[1])
    assert [len(x) for x in split_episodes(1, 0.9, seed=0)] == [1, 0]
    assert [len(x) for x in split_episodes(2, 0.9, seed=0)] == [1, 1]
    assert [len(x) for x in split_episodes(5, 0.0, seed=0)] == [5, 0]
    with pytest.raises(ConfigError, match="val_ratio"):
        split_episodes(5, 1.0, seed=0)
    with pytest.raises(ConfigError, match="n_episodes"):
        split_episodes(0, 0.1, seed=0)


def test_compute_normalization(store):
    stats = compute_normalization(store, ["action", "joint_pos", "image_front", "intervention"], [0, 2])
    assert set(stats) == {"action", "joint_pos"}  # uint8 images and bool flags skipped
    codes = np.concatenate([code(0, np.arange(4)), code(2, np.arange(6))]).astype(np.float64)
    a = stats["action"]
    assert all(v.dtype == np.float32 and v.shape == (7,) for v in a.values())
    np.testing.assert_allclose(a["min"], 0)
    np.testing.assert_allclose(a["max"], 205)
    np.testing.assert_allclose(a["mean"], codes.mean(), rtol=1e-6)
    np.testing.assert_allclose(a["std"], codes.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["joint_pos"]["mean"], codes.mean() + np.arange(9), rtol=1e-6)
    np.testing.assert_allclose(stats["joint_pos"]["max"], 205 + np.arange(9))
    full = compute_normalization(store, ["action"])["action"]
    np.testing.assert_allclose(full["max"], 205)
    np.testing.assert_allclose(full["min"], 0)
    with pytest.raises(ConfigError, match="keys"):
        compute_normalization(store, ["nope"])


def test_normalization_ignores_nan_human_action(tmp_path):
    s = ZarrStore.create(tmp_path / "s")
    s.add_episode({"action": np.zeros((3, 2), np.float32)}, seed=0, task="t", source="scripted", success=True,
                  backend="b")
    s.add_episode({"action": np.ones((2, 2), np.float32), "human_action": np.array([[1, 2], [3, 4]], np.float32),
                   "intervention": np.ones(2, bool)}, seed=1, task="t", source="intervention", success=True,
                  backend="b")
    h = compute_normalization(s, ["human_action"])["human_action"]
    np.testing.assert_allclose(h["mean"], [2, 3])
    np.testing.assert_allclose(h["min"], [1, 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_window_dataset_dataloader(store, workers):
    ds = WindowDataset(SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    batches = list(loader)
    assert sum(len(b["action"]) for b in batches) == len(ds) == 11
    b = batches[0]
    assert b["image_front"].dtype == torch.uint8 and b["image_front"].shape == (4, 2, 4, 4, 3)
    assert b["action"].dtype == torch.float32 and b["action"].shape == (4, 5, 7)
    assert b["joint_pos"].shape == (4, 2, 9) and b["intervention"].dtype == torch.float32
    assert b["action"][0, :, 0].tolist() == [0, 0, 1, 2, 3]
