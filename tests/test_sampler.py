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


def dp_windows(lengths, horizon, pad_before, pad_after):
    """(episode, episode-relative steps) of every window diffusion_policy yields, in its order: create_indices'
    start range -pad_before .. L - T + pad_after, then sample_sequence's edge padding with sample[0] / sample[-1]
    (real-stanford/diffusion_policy, diffusion_policy/common/sampler.py)."""
    out = []
    for e, L in enumerate(lengths):
        for idx in range(-pad_before, L - horizon + pad_after + 1):
            b0, b1 = max(idx, 0), min(idx + horizon, L)  # buffer_start_idx, buffer_end_idx (episode-relative)
            s0, s1 = b0 - idx, horizon - (idx + horizon - b1)  # sample_start_idx, sample_end_idx
            sample = list(range(b0, b1))
            out.append((e, [sample[0]] * s0 + sample + [sample[-1]] * (horizon - s1)))
    return out


def test_pad_after_matches_diffusion_policy(store):
    # by hand: T=5, To=2, pad_after=1 (Ta=2): max(0, L - 5 + 1 + 1 + 1) windows -> 2, 0, 4
    s = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, pad_after=1)
    assert len(s) == 6 and (s.pad_before, s.pad_after) == (1, 1)
    assert [window_codes(s, i)[0] for i in range(6)] == [
        [0, 0, 1, 2, 3], [0, 1, 2, 3, 3],
        [200, 200, 201, 202, 203], [200, 201, 202, 203, 204], [201, 202, 203, 204, 205], [202, 203, 204, 205, 205]]
    assert [window_codes(s, i)[1] for i in (0, 5)] == [[0, 0], [202, 203]]
    # defaults are diffusion_policy's pad_before = To - 1, pad_after = T - To: one window per step
    for T, To, pb, pa in [(5, 2, None, None), (5, 2, 0, 0), (5, 2, 1, 4), (3, 1, 2, 0), (4, 4, 0, 3), (1, 1, 0, 0)]:
        s = SequenceSampler(store, KEYS, OBS, horizon=T, n_obs_steps=To, pad_before=pb, pad_after=pa)
        pb, pa = To - 1 if pb is None else pb, T - To if pa is None else pa
        want = dp_windows(LENGTHS, T, pb, pa)
        assert len(s) == len(want) == sum(max(0, L - T + pb + pa + 1) for L in LENGTHS), (T, To, pb, pa)
        for i, (e, steps) in enumerate(want):
            act, obs, _ = window_codes(s, i)
            assert act == [code(e, t) for t in steps] and obs == act[:To], (T, To, pb, pa, i)
    with pytest.raises(ConfigError, match="pad_after.*no window fits"):
        SequenceSampler(store, KEYS, OBS, horizon=8, n_obs_steps=2, pad_before=0, pad_after=0)


@pytest.mark.parametrize("cache", [False, True])
def test_key_first_k_and_float_images(store, cache):
    s = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=cache,
                        key_first_k={"image_front": 1, "action": 3})
    ref = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=cache)
    for i in (0, 3, 4, 5, 10):
        w, r = s[i], ref[i]
        assert w["image_front"].shape == (1, 4, 4, 3) and w["action"].shape == (3, 7) and w["joint_pos"].shape == (2, 9)
        np.testing.assert_array_equal(w["image_front"], r["image_front"][:1])
        np.testing.assert_array_equal(w["action"], r["action"][:3])
        np.testing.assert_array_equal(w["intervention"], r["intervention"])
    f = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=cache, float_images=True)
    for i in (0, 7):
        w, r = f[i], ref[i]
        img = w["image_front"]
        assert img.dtype == np.float32 and img.shape == (2, 3, 4, 4) and img.flags.c_contiguous
        assert 0.0 <= img.min() and img.max() <= 1.0
        np.testing.assert_array_equal(img, r["image_front"].transpose(0, 3, 1, 2).astype(np.float32) / 255)
        np.testing.assert_array_equal(w["action"], r["action"])
    b = WindowDataset(f)[10]
    assert b["image_front"].dtype == torch.float32 and b["image_front"].shape == (2, 3, 4, 4)
    assert b["image_front"][:, 0, 0, 0].tolist() == pytest.approx([204 / 255, 205 / 255])


def test_sampler_option_errors(store):
    for kw, field in [(dict(pad_after=5), "pad_after"), (dict(pad_after=-1), "pad_after"),
                      (dict(pad_before=1.0), "pad_before"), (dict(key_first_k={"ee_pos": 1}), "key_first_k"),
                      (dict(key_first_k={"action": 0}), "key_first_k"),
                      (dict(key_first_k={"action": 6}), "key_first_k"),
                      (dict(float_images="yes"), "float_images")]:
        with pytest.raises(ConfigError, match=field):
            SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, **kw)


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


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("float_images", [False, True])
def test_batch_and_getitems_equal_the_windows_one_by_one(store, cache, float_images):
    """``SequenceSampler.batch`` (and ``WindowDataset.__getitems__``, which a DataLoader with a batch size calls)
    give exactly the windows of ``sampler[i]``, in any order, repeats included; the DataLoader's batches too."""
    s = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, pad_after=2, cache_images=cache,
                        float_images=float_images, key_first_k={"action": 4})
    order = [6, 0, 3, 3, len(s) - 1, -1, 2]
    b = s.batch(order)
    for j, i in enumerate(order):
        for k, v in s[i].items():
            assert b[k][j].dtype == v.dtype and np.array_equal(b[k][j], v), (k, i)
    assert b["action"].shape == (len(order), 4, 7) and s.batch([])["joint_pos"].shape == (0, 2, 9)
    with pytest.raises(IndexError):
        s.batch([0, len(s)])
    ds = WindowDataset(s)
    items = ds.__getitems__(order)
    assert len(items) == len(order)
    for got, i in zip(items, order):
        want = ds[i]
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False))
    for j, batch in enumerate(batches):
        for k in KEYS:
            want = torch.stack([ds[i][k] for i in range(3 * j, min(3 * j + 3, len(ds)))])
            assert torch.equal(batch[k], want), (j, k)


def test_images_are_held_encoded_and_decoded_per_window(store, tmp_path):
    """cache_images keeps the store's encoded frames (``nbytes`` counts them), reads without caching go to the
    shard files per window; both equal zarr's decoding of the store."""
    c = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=True)
    d = SequenceSampler(store, KEYS, OBS, horizon=5, n_obs_steps=2, cache_images=False)
    frames = store.frames("image_front")
    assert c.nbytes > 0 and d.nbytes < c.nbytes  # the uncached sampler holds only the low-dim arrays
    assert c.nbytes - d.nbytes <= frames.encoded_nbytes()  # the encoded frames, no more than their shard files
    every = np.arange(store.n_steps)
    np.testing.assert_array_equal(frames[every], store["image_front"][:])
    np.testing.assert_array_equal(frames.load()[every[::-1]], store["image_front"][:][::-1])
    for i in range(len(c)):
        assert all(np.array_equal(c[i][k], d[i][k]) for k in KEYS)
