"""``robot-rl learn``: residual TD3 learning from an actor the learner did not start (a robot's policy node, here a
simulated actor process), through the policy server: every row is learned from, every ended episode is committed
to the store with what was executed, and a restarted learner continues with the stored episodes intact."""

import json
import multiprocessing as mp
import threading
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
from robot_rl.serve.learner import EpisodeLog, SessionSlots, learn_online

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
    # the resumed learner's weights carry versions above the first run's: a stored version names one residual
    resumed = [st2.get_episode(i, keys=["residual_version"])["residual_version"] for i in range(n_before,
                                                                                                st2.n_episodes)]
    assert min(int(v.min()) for v in resumed) > max(versions)

    # episodes the learner took after its last saved state (here: two stored episodes taken again, as if it had
    # received them after the state at 420 and died before saving) are learned from again on resume
    log = EpisodeLog(store_path, "place", "robot")
    keys = list(pol.config.obs_keys)
    again = list(log.rows_after(0, keys))[:2]
    assert len(again) == 2 and all(r["truncated"][-1] for r in again)
    win = again[1]  # the second one ends as a success (terminated, reward 1): both kinds of last row
    win["truncated"][-1], win["terminated"][-1], win["success"][-1], win["reward"][-1] = False, True, True, 1.0
    first = 420
    for r in again:
        n = len(r["sessions"])
        log.add({**r, "sessions": [f"late-{first}"] * n}, n, first_step=first)
        first += n
    assert [len(r["sessions"]) for r in log.rows_after(420, keys)] == [len(r["sessions"]) for r in again]
    td3.total_env_steps = 10_000
    halt = threading.Event()
    halt.set()  # no actor: only what resuming does
    learn_online(base, "place", td3, run, store=store_path, task_kwargs=TK, progress=False, resume=True, stop=halt)
    saved = json.loads((run / "state" / "config.json").read_text())["config"]
    assert saved["env_steps"] == first and saved["replay_added"] == first  # 420 + the rows taken again


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

    st = ZarrStore.open_or_create(tmp_path / "s.zarr")
    st.add_episode({"other": np.zeros((2, 3), np.float32), "action": np.zeros((2, 5), np.float32)}, seed=0,
                   task="place", source="scripted", success=False, backend="mujoco")
    log = EpisodeLog(tmp_path / "s.zarr", "place", "robot")
    A = 5
    req = {"sessions": ["r0"], "obs": {"ee_pos": np.zeros((1, 3), np.float32)}, "executed": np.zeros((1, A), "f4"),
           "base": np.zeros((1, A), "f4"), "residual": np.zeros((1, A), "f4"), "reward": np.zeros(1, "f4"),
           "residual_version": np.zeros(1, "i8"), "terminated": np.ones(1, bool), "truncated": np.zeros(1, bool),
           "success": np.zeros(1, bool), "next_obs": {"ee_pos": np.zeros((1, 3), np.float32)},
           "next_base": np.zeros((1, A), "f4")}
    with pytest.raises(ConfigError):
        log.add(req, 1)
    assert ZarrStore.open(tmp_path / "s.zarr").n_episodes == 1  # nothing stored, nothing lost


def test_a_robot_actor_sends_labelled_episodes_and_never_a_discarded_one(tmp_path):
    """EpisodeActor (what a robot's policy node runs) on a MuJoCo env standing in for the arm, against
    learn_online: labelled episodes reach the learner whole (success -> terminated with reward 1, failure or time
    limit -> truncated), discarded ones never do, and a human-driven step is stored as an intervention with the
    human's action and its residual-unit equivalent; with ``human_within_reach`` the arm executes that action
    projected into the residual's reach, and the rows join the demo side."""

    from robot_rl.envs.env import make_env
    from robot_rl.serve.actor import EpisodeActor
    from robot_rl.serve.client import PolicyClient

    torch.set_num_threads(1)
    base = load_policy(FIXTURE)
    td3 = TD3Config(total_env_steps=10_000, n_envs=1, learning_starts=60, critic_warmup_updates=0, push_every=2,
                    utd_ratio=0.25, batch_size=16, log_every=20, val_every=0, critic_hidden=(16, 16), n_critics=2,
                    lr_actor=1e-3)
    stop, endpoint, out = threading.Event(), [], {}
    t = threading.Thread(target=lambda: out.update(r=learn_online(
        base, "place", td3, tmp_path / "run", store=tmp_path / "ep.zarr", task_kwargs=TK, progress=False, stop=stop,
        ready=endpoint.append)), daemon=True)
    t.start()
    while not endpoint and t.is_alive():
        t.join(0.05)
    env = make_env("place", task_kwargs=TK, render_mode=None,
                   **env_kwargs_for(base.config, "place", TK, None))
    client = PolicyClient(endpoint[0], timeout_s=30.0)
    actor = EpisodeActor(client, name="arm", seed=0)
    sent, labels, human_rows = 0, [], {1: [], 3: []}
    try:
        for ep in range(5):
            obs, _ = env.reset(seed=9_000_000 + ep)
            actor.start(seed=ep)
            actor.human_within_reach = ep == 3
            for step in range(TK["max_steps"]):
                o = {k: obs[k] for k in base.config.obs_keys}
                human = None
                if ep in (1, 3) and step in (3, 4):  # a human takes over for two steps
                    human = np.array([0.5, 0.0, 0.0, 0.0, 1.0], np.float32)
                    human_rows[ep].append(step)
                a = actor.act(o, human=human)
                obs, _, term, trunc, info = env.step(a)
                if term or trunc:
                    break
            final = {k: obs[k] for k in base.config.obs_keys}
            if ep == 2:
                actor.discard()  # e.g. an e-stop the operator does not keep
                continue
            # the operator's label: ep 3 marked failed, ep 4 marked successful, else the sim's predicate
            success = {3: False, 4: True}.get(ep, bool(info.get("success", False)))
            sent += actor.end(final, success)
            labels.append(success)
        deadline = 60
        while out.get("r") is None and deadline > 0:  # the learner takes every row before it is stopped
            st = client.ping()["learner"]
            if st["backlog"] == 0:
                break
            deadline -= 1
            t.join(0.5)
    finally:
        stop.set()
        t.join(60)
        client.close()
        env.close()
    pol, curve = out["r"]
    assert curve[-1]["env_steps"] == sent == actor.steps_sent and sent >= 4 * 2
    # HIL-SERL puts human-driven steps on the demo side too; episode 1's two are beyond the residual's reach (a
    # gripper command against the base's), so they are stored on neither side (OffPolicyRun.add) but counted; episode
    # 3's, executed within reach, join the demo side
    assert curve[-1]["demo_size"] == 2 and curve[-1]["unreachable_steps"] == 2
    steps = np.diff([0] + [r["env_steps"] for r in curve])  # the rows each curve row covers
    assert sum(r["intervention_rate"] * n for r, n in zip(curve, steps)) == pytest.approx(4, abs=1e-6)
    st = ZarrStore.open(tmp_path / "ep.zarr")
    assert st.n_episodes == 4 and [bool(m["success"]) for m in st.episodes_meta()] == labels
    assert sum(len(st.get_episode(i, keys=["reward"])["reward"]) for i in range(4)) == sent  # no discarded row
    norm, human = base.normalizer, torch.tensor([0.5, 0.0, 0.0, 0.0, 1.0])
    for i, ep in ((1, 1), (2, 3)):  # store index, episode (episode 2 was discarded)
        e = st.get_episode(i, keys=["action", "base_action", "residual", "intervention", "human_action", "reward"])
        assert list(np.flatnonzero(e["intervention"])) == human_rows[ep]
        h = e["intervention"]
        base_n = norm.normalize("action", torch.as_tensor(e["base_action"][h]))
        want = ((norm.normalize("action", human) - base_n) / pol.config.alpha).clamp(-1, 1)
        assert np.allclose(e["residual"][h], want.numpy(), atol=1e-5)
        executed = human.expand(2, -1) if ep == 1 else norm.unnormalize("action", combine(base_n, want,
                                                                                          pol.config.alpha))
        assert np.allclose(e["action"][h], executed.numpy(), atol=1e-5)
        assert np.allclose(e["human_action"][h], e["action"][h])
    assert not np.allclose(e["action"][h], human.numpy(), atol=1e-2)  # projected: not the human's action
    for i in range(st.n_episodes):
        r = st.get_episode(i, keys=["reward"])["reward"]
        assert r[:-1].sum() == 0 and r[-1] == float(labels[i])
    # the end-of-run report: every labelled episode against robot time (10 Hz control)
    assert (tmp_path / "run" / "robot_learning.png").stat().st_size > 10_000
    from robot_rl.stages.evaluation import robot_learning_report

    rep = robot_learning_report(st, tmp_path / "rep")
    assert rep["episodes"] == 4 and rep["steps"] == sent and rep["intervention_steps"] == 4
    assert rep["robot_minutes"] == pytest.approx(sent / 10 / 60, abs=0.01) and rep["successes"] == sum(labels)
