"""The one execution path (robot_rl.policies.execution) and the one episode writer (robot_rl.datasets.episodes).

Executor: receding-horizon queues, reset, dropped chunks, chunk alignment, temporal ensembling (ACT weights, equal to
the per-step bookkeeping the async client used to do itself), per-stream noise that batching cannot change, the
base + residual step. Writer: a round trip through a real ZarrStore on disk, stored dtypes, bad input.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from robot_rl.datasets.episodes import EpisodeWriter
from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError
from robot_rl.policies.execution import ActionQueue, ChunkExecutor, ChunkStream, ensemble_weights, predict_chunks
from robot_rl.rl.residual import apply_residual


class StubPolicy:
    """A deterministic chunking policy: the chunk predicted from history h has rows ``10 * h[-1] + i`` (i = row), so
    an action tells which observation its chunk was predicted from. ``noise=True``: returns the initial noise."""

    def __init__(self, To=2, Ta=4, A=2, kind="bc", noise=False):
        self.config = SimpleNamespace(obs_keys=["x"], image_keys=[], n_obs_steps=To, n_action_steps=Ta,
                                      horizon=Ta + To, action_dim=A, kind=kind)
        self.noise, self.batches = noise, []

    def predict_chunk(self, obs, *, generator=None, init_noise=None):
        x = np.asarray(obs["x"], np.float32)  # (B, To, 1)
        self.batches.append(x.copy())
        if self.noise:
            noise = init_noise if init_noise is not None else torch.randn(
                (len(x), self.config.horizon, self.config.action_dim), generator=generator)
            return np.asarray(noise, np.float32)[:, :self.config.n_action_steps]
        rows = 10 * x[:, -1, :1] + np.arange(self.config.n_action_steps, dtype=np.float32)[None, :]
        return np.repeat(rows[:, :, None], self.config.action_dim, axis=2)


def _obs(values):
    return {"x": np.asarray(values, np.float32).reshape(-1, 1)}


# --- ActionQueue ----------------------------------------------------------------------------------------------------
def test_queue_newest_chunk_replaces_and_late_rows_are_dropped():
    q = ActionQueue()
    assert q.remaining(0) == 0 and not q.covers(0)
    with pytest.raises(KeyError):
        q.action(0)
    q.add(np.arange(8, dtype=np.float32).reshape(4, 2), start=0)
    assert q.covers(3) and not q.covers(4) and q.remaining(1) == 3
    np.testing.assert_array_equal(q.action(2), [4, 5])
    np.testing.assert_array_equal(q.rows(1), [[2, 3], [4, 5], [6, 7]])
    q.add(np.full((4, 2), 9.0), start=2, now=3)  # predicted for step 2, arrived at step 3: row 0 is stale
    assert q.chunks[0][0] == 3 and len(q.chunks) == 1 and q.remaining(3) == 3
    np.testing.assert_array_equal(q.action(3), [9, 9])
    q.add(np.zeros((2, 2)), start=0, now=5)  # nothing left of it: ignored, the queue stays
    assert q.remaining(3) == 3
    q.clear()
    assert q.remaining(3) == 0
    with pytest.raises(ConfigError, match="ensemble_decay"):
        ActionQueue(-0.1)


def _legacy_ensemble(events, decay):
    """The bookkeeping AsyncChunkClient did before it used ActionQueue: {step: [predictions]}, oldest first."""
    preds, out = {}, []
    for kind, t, payload in events:
        if kind == "chunk":
            start, chunk = payload
            for i, a in enumerate(chunk):
                if start + i >= t:
                    preds.setdefault(start + i, []).append(a)
        else:
            for s in [s for s in preds if s < t]:
                del preds[s]
            p = preds[t]
            if decay is None or len(p) == 1:
                out.append(np.asarray(p[-1], dtype=np.float32))
            else:
                w = np.exp(-decay * np.arange(len(p)))
                out.append((np.tensordot(w / w.sum(), np.stack(p), axes=1)).astype(np.float32))
    return np.stack(out)


@pytest.mark.parametrize("decay", [None, 0.0, 0.01, 0.5])
def test_temporal_ensemble_equals_the_act_weighting(decay):
    rng = np.random.default_rng(0)
    Ta, events, starts, last_req = 4, [], [], 0
    for t in range(40):
        if t and rng.random() < 0.6:  # a chunk requested at an earlier step (not before the last one) arrives now
            last_req = int(rng.integers(last_req, t + 1))
            starts.append(last_req)
            events.append(("chunk", t, (last_req, rng.normal(size=(Ta, 3)).astype(np.float32))))
        if not any(s <= t < s + Ta for s in starts):  # nothing for this step: the client waits for a chunk
            last_req = t
            starts.append(t)
            events.append(("chunk", t, (t, rng.normal(size=(Ta, 3)).astype(np.float32))))
        events.append(("act", t, None))
    q, got = ActionQueue(decay), []
    for kind, tt, payload in events:
        if kind == "chunk":
            q.add(payload[1], payload[0], now=tt)
        else:
            got.append(q.action(tt))
    np.testing.assert_array_equal(np.stack(got), _legacy_ensemble(events, decay))


def test_ensemble_weights():
    w = ensemble_weights(3, 0.5)
    np.testing.assert_allclose(w, np.exp(-0.5 * np.arange(3)) / np.exp(-0.5 * np.arange(3)).sum())
    assert w[0] > w[1] > w[2]  # the oldest prediction weighs most (ACT)
    np.testing.assert_allclose(ensemble_weights(4, 0.0), 0.25)


# --- ChunkStream ------------------------------------------------------------------------------------------------------
def test_stream_history_reset_and_new_frames():
    s = ChunkStream(3)
    assert s.t == -1 and s.new_frames() == {}
    s.reset([{"x": np.array([1.0])}], step=5)
    assert s.t == 5 and [float(f["x"][0]) for f in s.hist] == [1, 1, 1]
    np.testing.assert_array_equal(s.new_frames()["x"], [[1.0]])
    assert s.new_frames() == {}
    for v in (2, 3, 4, 5):
        s.observe({"x": np.array([float(v)])})
    np.testing.assert_array_equal(s.window()["x"][:, 0], [3, 4, 5])
    np.testing.assert_array_equal(s.new_frames()["x"][:, 0], [3, 4, 5])  # at most To frames
    s.reset([{"x": np.array([7.0])}, {"x": np.array([8.0])}], seed=3)  # the server's reset with two frames
    np.testing.assert_array_equal(s.window()["x"][:, 0], [7, 7, 8])
    assert s.gen is not None and s.queue.remaining(0) == 0


def test_per_stream_noise_does_not_depend_on_the_batch():
    """Each stream's diffusion noise comes from its own generator: a stream alone, or batched with others in any
    order, gets the same initial noise — the draw ChunkExecutor(policy, 1, seed) makes."""
    pol = StubPolicy(kind="diffusion", noise=True)
    def stream(seed, x):
        s = ChunkStream(2, seed=seed)
        s.reset([{"x": np.array([x], np.float32)}])
        return s
    alone = predict_chunks(pol, [stream(11, 0.0)], ["x"])[0]
    batched = predict_chunks(pol, [stream(5, 1.0), stream(11, 0.0), stream(7, 2.0)], ["x"])[1]
    np.testing.assert_array_equal(alone, batched)
    ex = ChunkExecutor(pol, 1, seed=11)
    ex.reset(np.ones(1, bool), _obs([0.0]))
    ex.peek()
    np.testing.assert_array_equal(ex.queued(0), alone)


# --- ChunkExecutor ------------------------------------------------------------------------------------------------
def test_executor_receding_horizon_reset_and_drop():
    pol = StubPolicy(Ta=4)
    ex = ChunkExecutor(pol, 2, seed=0)
    ex.reset(np.ones(2, bool), _obs([1, 2]))
    acts = []
    for t in range(6):
        acts.append(ex.actions()[:, 0])
        ex.observe(_obs([t + 10, t + 20]))
    # chunk from obs 1 (rows 10..13), then after 4 steps a chunk from the newest obs (t=3: 13 -> rows 130, 131)
    np.testing.assert_array_equal(np.stack(acts)[:, 0], [10, 11, 12, 13, 130, 131])
    assert ex.calls == 2 and ex.chunks == 4 and ex.t == 6
    assert pol.batches[0].shape == (2, 2, 1) and np.all(pol.batches[0][0] == 1)  # history filled by the reset
    np.testing.assert_array_equal(ex.queued(0)[:, 0], [132, 133])
    ex.reset(np.array([False, True]), _obs([0, 7]))  # env 1 starts over: new chunk for it alone
    a = ex.peek()
    assert a[1, 0] == 70 and a[0, 0] == 132 and ex.calls == 3 and pol.batches[-1].shape[0] == 1
    assert np.array_equal(ex.peek(), a) and ex.calls == 3  # peek does not consume
    ex.drop_chunks(np.array([True, False]))
    assert ex.peek()[0, 0] == 10 * 15 and ex.calls == 4  # re-planned from env 0's newest observation


def test_executor_alignment_cuts_only_the_first_chunk_after_a_reset():
    pol = StubPolicy(Ta=4)
    ex = ChunkExecutor(pol, 3, align_chunks=True)
    ex.reset(np.ones(3, bool), _obs([0, 0, 0]))
    sizes = []
    for t in range(12):
        n0 = len(pol.batches)
        ex.actions()
        if len(pol.batches) > n0:
            sizes.append((t, pol.batches[-1].shape[0]))
        o = _obs([t + 1] * 3)
        m = np.array([t == 1, False, False])  # env 0's episode ends after step 1
        ex.reset(m, o)
        ex.observe(o, ~m)
    # env 0's first chunk after its reset (step 2) is cut to 2 rows, so from step 4 on all envs re-plan together
    assert sizes == [(0, 3), (2, 1), (4, 3), (8, 3)]
    with pytest.raises(ConfigError, match="align_chunks"):
        ChunkExecutor(pol, 3, align_chunks=True, threshold=1)
    with pytest.raises(ConfigError, match="threshold"):
        ChunkExecutor(pol, 3, threshold=4)


def test_executor_temporal_ensembling_replans_every_step():
    """threshold = Ta - 1: a chunk every step (ACT); the action for step s is the exp(-m i)-weighted mean of the
    predictions of every chunk that covers s, oldest first."""
    Ta, m = 3, 0.3
    pol = StubPolicy(Ta=Ta, A=1)
    ex = ChunkExecutor(pol, 1, ensemble_decay=m, threshold=Ta - 1)
    ex.reset(np.ones(1, bool), _obs([0]))
    got = []
    for t in range(6):
        got.append(float(ex.actions()[0, 0]))
        ex.observe(_obs([t + 1]))
    assert ex.calls == 6
    # chunk made at step k (from observation k) predicts 10 k + (s - k) for step s
    for s, a in enumerate(got):
        preds = [10 * k + (s - k) for k in range(max(0, s - Ta + 1), s + 1)]
        assert a == pytest.approx(float(np.dot(ensemble_weights(len(preds), m), preds)), abs=1e-5)


# --- base + residual ----------------------------------------------------------------------------------------------
def test_apply_residual_is_the_residual_combine():
    from robot_rl.policies.normalizer import Normalizer
    from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, combine

    keys = {"ee_pos": 3}
    norm = Normalizer({"ee_pos": 3, "action": 2},
                      {"ee_pos": {"min": np.full(3, -1, np.float32), "max": np.ones(3, np.float32)},
                       "action": {"min": np.full(2, -0.5, np.float32), "max": np.full(2, 0.8, np.float32)}})
    rng = np.random.default_rng(0)
    obs = {"ee_pos": rng.uniform(-1, 1, (4, 3)).astype(np.float32)}
    base = rng.uniform(-0.5, 0.8, (4, 2)).astype(np.float32)
    r0, e0 = apply_residual(norm, None, obs, base)
    assert np.all(r0 == 0) and np.array_equal(e0, base)
    res = ResidualPolicy(ResidualConfig(obs_keys=["ee_pos"], obs_dims=keys, action_dim=2, hidden=(8,), alpha=0.5))
    r, e = apply_residual(norm, res, obs, base)  # untrained: exactly the base
    assert np.all(r == 0) and np.allclose(e, base, atol=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in res.parameters():
            p.add_(torch.randn_like(p))
    r, e = apply_residual(norm, res, obs, base)
    base_n = norm.normalize("action", torch.as_tensor(base))
    want = norm.unnormalize("action", combine(base_n, torch.as_tensor(r), 0.5)).numpy()
    assert r.dtype == e.dtype == np.float32 and np.array_equal(e, want) and not np.allclose(e, base)


# --- EpisodeWriter --------------------------------------------------------------------------------------------------
def _step(rng, t):
    return {"ee_pos": rng.normal(size=3),  # float64: stored as float32
            "image_front": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)}


def test_episode_writer_round_trip_through_a_store_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    store = ZarrStore.open_or_create(tmp_path / "demo.zarr")
    w = EpisodeWriter(human_action=True)
    obs, acts = [], []
    for t in range(5):
        o, a = _step(rng, t), rng.uniform(-1, 1, 5)
        obs.append({k: v.copy() for k, v in o.items()})
        acts.append(a)
        w.add(o, a, intervention=t == 2, human_action=np.ones(5) * t if t == 2 else None)
        o["ee_pos"][:] = 99.0  # the writer copied the step
    assert len(w) == 5 and w.intervened
    idx = w.commit(store, seed=3, task="place", source="intervention", success=True, backend="mujoco",
                   extra={"params": {"target_xy": [0.1, 0.2]}})
    assert idx == 0 and len(w) == 0
    w2 = EpisodeWriter(human_action=True)
    for t in range(3):
        w2.add(_step(rng, t), np.zeros(5))
    assert not w2.intervened
    w2.commit(store, seed=4, task="place", source="policy", success=False, backend="mujoco")

    back = ZarrStore.open(tmp_path / "demo.zarr")
    assert back.n_episodes == 2 and back.n_steps == 8
    sch = back.schema
    assert sch["ee_pos"] == {"dtype": "float32", "shape": (3,)}
    assert sch["image_front"] == {"dtype": "uint8", "shape": (8, 8, 3)}
    assert sch["action"]["dtype"] == "float32" and sch["intervention"]["dtype"] == "bool"
    ep = back.get_episode(0)
    np.testing.assert_array_equal(ep["ee_pos"], np.stack([o["ee_pos"] for o in obs]).astype(np.float32))
    np.testing.assert_array_equal(ep["image_front"], np.stack([o["image_front"] for o in obs]))
    np.testing.assert_array_equal(ep["action"], np.stack(acts).astype(np.float32))
    np.testing.assert_array_equal(ep["intervention"], [False, False, True, False, False])
    assert np.all(np.isnan(ep["human_action"][[0, 1, 3, 4]])) and np.all(ep["human_action"][2] == 2.0)
    meta = back.episode_meta(0)
    assert (meta["seed"], meta["source"], meta["success"], meta["length"]) == (3, "intervention", True, 5)
    assert meta["extra"] == {"params": {"target_xy": [0.1, 0.2]}}
    assert back.episode_meta(1)["length"] == 3 and np.all(np.isnan(back.get_episode(1)["human_action"]))


def test_episode_writer_optional_fields_and_bad_input(tmp_path):
    w = EpisodeWriter()
    w.add({"x": np.zeros(2)}, np.zeros(3), reward=1.0)
    w.add({"x": np.ones(2)}, np.zeros(3), reward=0.5)
    arr = w.arrays()
    assert arr["reward"].dtype == np.float32 and arr["reward"].tolist() == [1.0, 0.5]
    assert set(arr) == {"x", "action", "intervention", "reward"}  # no human_action column unless asked for
    with pytest.raises(ConfigError, match="fields"):
        w.add({"x": np.ones(2)}, np.zeros(3))  # reward given at the first step: needed at every step
    with pytest.raises(ConfigError, match="missing keys"):
        w.add({"y": np.ones(2)}, np.zeros(3), reward=0.0)
    with pytest.raises(ConfigError, match="unexpected keys"):
        w.add({"x": np.ones(2), "y": np.ones(2)}, np.zeros(3), reward=0.0)
    with pytest.raises(ConfigError, match="shape"):
        w.add({"x": np.ones(3)}, np.zeros(3), reward=0.0)
    with pytest.raises(ConfigError, match="reserved"):
        EpisodeWriter().add({"action": np.ones(2)}, np.zeros(3))
    with pytest.raises(ConfigError, match="human_action"):
        EpisodeWriter().add({"x": np.ones(2)}, np.zeros(3), human_action=np.zeros(2))
    assert len(w) == 2  # a refused step leaves nothing behind
    picked = EpisodeWriter(obs_keys=["x"])
    picked.add({"x": np.ones(2), "ignored": np.ones(4)}, np.zeros(3))
    assert set(picked.arrays()) == {"x", "action", "intervention"}
    store = ZarrStore.open_or_create(tmp_path / "s.zarr")
    picked.commit(store, seed=0, task="place", source="scripted", success=True, backend="mujoco")
    other = EpisodeWriter()
    other.add({"z": np.ones(2)}, np.zeros(3))
    with pytest.raises(ConfigError):
        other.commit(store, seed=1, task="place", source="scripted", success=True, backend="mujoco")
    assert len(other) == 1 and store.n_episodes == 1  # nothing written, the steps are kept
    with pytest.raises(ConfigError, match="no steps"):
        EpisodeWriter().arrays()
