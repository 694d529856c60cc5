"""``robot-rl learn``: residual TD3 learning from an actor the learner did not start (a robot's policy node, here a
simulated actor process), through the policy server: every row is learned from, every ended episode is committed
to the store with what was executed, and a restarted learner continues with the stored episodes intact."""

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from robot_rl.datasets.store import ZarrStore
from robot_rl.envs.vector import env_kwargs_for
from robot_rl.errors import ConfigError
from robot_rl.policies.checkpoint import load_policy
from robot_rl.rl.residual import combine
from robot_rl.rl.td3 import TD3Config
from robot_rl.serve.actor import ActorSpec, run_actor
from robot_rl.serve.learner import SessionSlots, learn_online

FIXTURE = Path(__file__).parent / "fixtures" / "place_bc_mujoco"
TK = {"max_steps": 30}


def _learn(base, td3, run_dir, store, seed_start, resume=False):
    """learn_online in this process, one actor process of 2 MuJoCo envs started once the server listens."""
    ctx = mp.get_context("spawn")
    stop, procs = ctx.Event(), []

    def ready(endpoint):
        spec = ActorSpec(endpoint=endpoint, index=0, task="place", n_envs=2, seed_start=seed_start, max_backlog=64,
                         task_kwargs=TK, env_kwargs=env_kwargs_for(base.config, "place", TK, None))
        procs.append(ctx.Process(target=run_actor, args=(spec, stop), daemon=True))
        procs[0].start()

    try:
        return learn_online(base, "place", td3, run_dir, store=store, task_kwargs=TK, ready=ready, progress=False,
                            resume=resume, max_sessions=4)
    finally:
        stop.set()
        for p in procs:  # the actor stops on the learner's "stop" reply, or on the event
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def test_learn_online_learns_from_an_external_actor_and_commits_every_episode(tmp_path):
    torch.set_num_threads(1)
    base = load_policy(FIXTURE)
    td3 = TD3Config(total_env_steps=300, n_envs=2, learning_starts=90, critic_warmup_updates=0, push_every=2,
                    utd_ratio=0.25, batch_size=32, log_every=60, val_every=0, critic_hidden=(32, 32), n_critics=4,
                    lr_actor=1e-3, checkpoint_every=60)
    run, store_path = tmp_path / "run", tmp_path / "episodes.zarr"
    pol, curve = _learn(base, td3, run, store_path, seed_start=7_000_000)
    assert curve[-1]["env_steps"] == 300 and curve[-1]["updates"] == int((300 - 90) * 0.25)
    assert curve[-1]["weight_version"] >= 5 and all(r["mixed_version_chunks"] == 0 for r in curve)
    assert float(pol.actor.net[-1].weight.detach().abs().sum()) > 0  # trained (the last layer starts at zero)

    st = ZarrStore.open(store_path)
    metas = st.episodes_meta()
    lengths = [len(st.get_episode(i, keys=["action"])["action"]) for i in range(st.n_episodes)]
    assert len(metas) >= 8 and all(m["source"] == "policy" for m in metas) and max(lengths) == 30
    assert 300 - 2 * 30 < sum(lengths) <= 300  # every kept row of every ended episode; 2 episodes still running
    versions = []
    for i, m in enumerate(metas):
        e = st.get_episode(i, keys=["action", "base_action", "residual", "reward", "residual_version",
                                    "intervention", "human_action", "ee_pos", "cube_pos"])
        # what was executed is the base + alpha * residual of the same row (raw units through the base's normalizer)
        want = base.normalizer.unnormalize("action", combine(
            base.normalizer.normalize("action", torch.as_tensor(e["base_action"])), torch.as_tensor(e["residual"]),
            pol.config.alpha))
        assert np.allclose(e["action"], want.numpy(), atol=1e-5)
        assert e["reward"].dtype == np.float32 and bool(m["success"]) == bool(e["reward"].max() > 0)
        assert not e["intervention"].any() and np.isnan(e["human_action"]).all()
        assert np.all(np.diff(e["residual_version"]) >= 0)
        versions.append(int(e["residual_version"].max()))
    assert versions[-1] >= 1  # later episodes ran pushed weights

    # a restarted learner resumes its state; the store keeps every episode and grows
    before = {k: v.copy() for k, v in st.get_episode(0).items()}
    n_before = st.n_episodes
    td3.total_env_steps = 420
    _, curve2 = _learn(base, td3, run, store_path, seed_start=8_000_000, resume=True)
    assert curve2[:len(curve)][-1]["env_steps"] == 300 and curve2[-1]["env_steps"] == 420
    st2 = ZarrStore.open(store_path)
    assert st2.n_episodes >= n_before + 3
    after = st2.get_episode(0)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_session_slots_reuse_and_evict():
    evicted = []
    s = SessionSlots(2, lambda sid, slot: evicted.append((sid, slot)))
    a, b = s.take("a"), s.take("b")
    assert {a, b} == {0, 1} and s.take("a") == a  # same session, same window
    s.release("b")
    assert s.take("c") == b and not evicted  # a freed window is reused
    d = s.take("d")  # full: the least recently used session ("a") loses its window
    assert evicted == [("a", a)] and d == a


def test_learn_online_refuses_a_store_of_other_keys(tmp_path):
    from robot_rl.serve.learner import EpisodeLog

    st = ZarrStore.open_or_create(tmp_path / "s.zarr")
    st.add_episode({"other": np.zeros((2, 3), np.float32), "action": np.zeros((2, 5), np.float32)}, seed=0,
                   task="place", source="scripted", success=False, backend="mujoco")
    log = EpisodeLog(tmp_path / "s.zarr", "place", "robot")
    A = 5
    req = {"sessions": ["r0"], "obs": {"ee_pos": np.zeros((1, 3), np.float32)}, "executed": np.zeros((1, A), "f4"),
           "base": np.zeros((1, A), "f4"), "residual": np.zeros((1, A), "f4"), "reward": np.zeros(1, "f4"),
           "residual_version": np.zeros(1, "i8"), "terminated": np.ones(1, bool), "truncated": np.zeros(1, bool),
           "success": np.zeros(1, bool)}
    with pytest.raises(ConfigError):
        log.add(req, 1)
    assert ZarrStore.open(tmp_path / "s.zarr").n_episodes == 1  # nothing stored, nothing lost
