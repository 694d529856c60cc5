"""Residual TD3 / SAC and their replay: n-step returns by hand, truncation bootstrapped and termination not, demo
relabelling with the frozen (chunking) base, the untrained residual is the base, TD3 and SAC each learn a toy task
(and fail with the critic target's sign flipped), and a resumed run continues the same run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from robot_rl.datasets.store import ZarrStore
from robot_rl.errors import ConfigError
from robot_rl.policies.normalizer import Normalizer
from robot_rl.rl.collector import Collector
from robot_rl.rl.replay import NStep, ReplayBuffer, demo_buffer, relabel_base_actions, sample_mixed
from robot_rl.rl.residual import ActorStep, ResidualConfig, ResidualPolicy, load_residual
from robot_rl.rl.offpolicy import train_residual_offpolicy
from robot_rl.rl.sac import SACConfig, SACLearner
from robot_rl.rl.td3 import TD3Config, TD3Learner
from test_learning import BIAS, BiasedBase, _deterministic_rollouts, one_torch_thread, point_venv  # noqa: F401


def _push(ns, x, r, term=False, trunc=False, nx=None):
    f = torch.tensor([[float(x)]])
    return ns.push(f, torch.zeros(1, 1), np.array([r], np.float32), np.array([term]), np.array([trunc]),
                   torch.tensor([[float(nx if nx is not None else x + 1)]]))


def test_n_step_returns_by_hand():
    g = 0.5
    ns = NStep(1, 3, g)
    assert len(_push(ns, 0, 1.0)["x"]) == 0 and len(_push(ns, 1, 2.0)["x"]) == 0
    out = _push(ns, 2, 4.0)  # x=0's window is complete: 1 + 0.5*2 + 0.25*4 = 3, bootstrap from x=3 with 0.5^3
    assert out["x"].tolist() == [[0.0]] and out["reward"].tolist() == [3.0]
    assert out["discount"].tolist() == [0.125] and out["next_x"].tolist() == [[3.0]]
    # termination at the next step: every pending window ends there, none bootstraps
    out = _push(ns, 3, 8.0, term=True, nx=99)
    assert out["x"].flatten().tolist() == [1.0, 2.0, 3.0]
    assert out["reward"].tolist() == [2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8, 8.0]
    assert out["discount"].tolist() == [0.0, 0.0, 0.0]
    # truncation: the pending windows are cut there and bootstrap from the true final observation
    _push(ns, 10, 0.0)
    out = _push(ns, 11, 1.0, trunc=True, nx=42)
    assert out["x"].flatten().tolist() == [10.0, 11.0]
    assert out["reward"].tolist() == [0.5, 1.0] and out["discount"].tolist() == [0.25, 0.5]
    assert out["next_x"].flatten().tolist() == [42.0, 42.0]


def test_n_step_carries_each_steps_flag():
    """The flag of a step (e.g. a human drove it) comes out with the transition that starts at that step."""
    ns = NStep(1, 2, 0.5)
    flags = [False, True, False]
    out = []
    for t, f in enumerate(flags):
        tr = ns.push(torch.tensor([[float(t)]]), torch.zeros(1, 1), np.array([0.0], np.float32), np.array([False]),
                     np.array([t == 2]), torch.tensor([[t + 1.0]]), flags=np.array([f]))
        out += list(zip(tr["x"][:, 0].tolist(), ns.emitted_flags.tolist()))
    assert out == [(0.0, False), (1.0, True), (2.0, False)]


def test_envs_keep_their_own_windows():
    ns = NStep(2, 2, 1.0)
    f = lambda a, b: torch.tensor([[a], [b]], dtype=torch.float32)  # noqa: E731
    ns.push(f(0, 100), torch.zeros(2, 1), np.array([1, 10], np.float32), np.array([False, True]),
            np.array([False, False]), f(1, 101))
    out = ns.push(f(1, 200), torch.zeros(2, 1), np.array([2, 20], np.float32), np.zeros(2, bool), np.zeros(2, bool),
                  f(2, 201))
    assert out["x"].flatten().tolist() == [0.0] and out["reward"].tolist() == [3.0]


def test_replay_buffer_wraps_and_round_trips():
    buf = ReplayBuffer(4, 1, 1)
    for i in range(6):
        buf.add(torch.tensor([[i]]), torch.zeros(1, 1), torch.tensor([i]), torch.ones(1), torch.tensor([[i + 1]]))
    assert len(buf) == 4 and buf.added == 6 and sorted(buf.x.flatten().tolist()) == [2, 3, 4, 5]
    st = buf.state()
    assert st["x"].flatten().tolist() == [2, 3, 4, 5]  # oldest first
    other = ReplayBuffer(4, 1, 1)
    other.load_state(st)
    assert other.state()["x"].flatten().tolist() == [2, 3, 4, 5] and other.added == 6
    with pytest.raises(ConfigError):
        ReplayBuffer(4, 2, 1).load_state(st)
    demos = ReplayBuffer(8, 1, 1)
    demos.add(-torch.ones(8, 1), torch.zeros(8, 1), torch.zeros(8), torch.zeros(8), torch.zeros(8, 1))
    b = sample_mixed(buf, demos, 10, 0.5)
    assert (b["x"][:5] == -1).all() and (b["x"][5:] >= 2).all()


def test_truncation_bootstraps_from_the_final_observation():
    """Through the collector: a truncated transition's next_x is the final observation's features with the base
    action the base takes there, and its stored discount is gamma^m; a terminated one's is 0."""
    torch.manual_seed(0)
    base = BiasedBase()
    pol = ResidualPolicy(ResidualConfig(alpha=0.5, hidden=(16, 16), head="tanh").derive(base.config, "point",
                                                                                           {"goal_rel": 2}))
    col = Collector(point_venv(4, max_steps=5, tol=0.05), base, pol, seed_start=3, next_features=True,
                    explore=lambda x: ActorStep(torch.zeros(x.shape[0], 2)))
    ns = NStep(4, 2, 0.9)
    col.reset()
    seen = {"trunc": 0, "term": 0}
    for tr in col.rollout(60):
        expect_base = base.normalizer.normalize("action", torch.as_tensor(base.predict_chunk(
            {"goal_rel": tr.next_obs["goal_rel"][:, None]})[:, 0]))
        want = pol.features(base.normalizer, tr.next_obs, expect_base)
        assert torch.allclose(tr.next_x, want, atol=1e-6)
        out = ns.push(tr.x, tr.residual, tr.reward, tr.terminated, tr.truncated, tr.next_x)
        for i in np.flatnonzero(tr.done):
            last = out["x"].shape[0] - 1  # the env's last window is among this step's outputs
            rows = [j for j in range(last + 1) if torch.equal(out["next_x"][j], tr.next_x[i])]
            assert rows
            if tr.truncated[i]:
                seen["trunc"] += 1
                assert sorted(out["discount"][rows].tolist()) == pytest.approx([0.81, 0.9][:len(rows)])
            else:
                seen["term"] += 1
                assert out["discount"][rows].eq(0).all()
    col.close()
    assert seen["trunc"] > 5 and seen["term"] > 5


class ChunkBase:
    """A base that plans from the first observation of each chunk: Ta = 3 copies of ``obs * 2`` (clipped)."""

    def __init__(self):
        self.config = SimpleNamespace(obs_keys=["goal_rel"], obs_dims={"goal_rel": 2}, image_keys=[], n_obs_steps=1,
                                      n_action_steps=3, action_dim=2, kind="bc")
        unit = {"min": -np.ones(2, np.float32), "max": np.ones(2, np.float32)}
        self.normalizer = Normalizer({"goal_rel": 2, "action": 2}, {"goal_rel": unit, "action": unit})

    def predict_chunk(self, batch, generator=None, init_noise=None):
        o = np.clip(2 * np.asarray(batch["goal_rel"])[:, -1], -1, 1)
        return np.repeat(o[:, None], 3, axis=1).astype(np.float32)

    def freeze(self):
        return self


def _demo_store(path, episodes):
    st = ZarrStore.create(path)
    for k, (obs, act, success, source, inter) in enumerate(episodes):
        data = {"goal_rel": obs.astype(np.float32), "action": act.astype(np.float32)}
        if inter is not None:
            data["intervention"] = inter
        st.add_episode(data, seed=k, task="point", source=source, success=success, backend="toy")
    return path


def test_demo_relabelling_uses_the_frozen_base(tmp_path):
    rng = np.random.default_rng(0)
    obs = [rng.uniform(-0.4, 0.4, (7, 2)), rng.uniform(-0.4, 0.4, (5, 2)), rng.uniform(-0.4, 0.4, (6, 2))]
    base = ChunkBase()
    # the base's action at step t is planned at the start of t's chunk (t - t % 3), not at t
    raw = relabel_base_actions(base, {"goal_rel": np.concatenate(obs)}, [7, 5, 6])
    for o, a in zip(obs, np.split(raw, [7, 12])):
        want = np.clip(2 * o[(np.arange(len(o)) // 3) * 3], -1, 1)
        assert np.allclose(a, want, atol=1e-6)
    # demonstrated actions within the residual's reach (alpha 0.5) of the base's, except episode 0's step 3
    acts = [np.clip(a + rng.uniform(-0.4, 0.4, a.shape), -1, 1) for a in np.split(raw, [7, 12])]
    acts[0][3] = np.clip(raw[3] + np.where(raw[3] > 0, -0.9, 0.9), -1, 1)
    inter = np.array([False, False, True, True, False, False])
    path = _demo_store(tmp_path / "d.zarr", [(obs[0], acts[0], True, "scripted", None),
                                            (obs[1], acts[1], False, "teleop", None),
                                            (obs[2], acts[2], False, "policy", inter)])
    pol = ResidualPolicy(ResidualConfig(alpha=0.5, hidden=(8,), head="tanh", fine_keys={}).derive(
        base.config, "point", {"goal_rel": 2}))
    buf, stats = demo_buffer(path, base, pol, n_step=1, gamma=0.9, task="point", max_steps=7)
    # episode 0 (7 steps, success): all but the unreachable step 3, reward 1 on the last; episode 1 (5 < 7 steps:
    # terminal): all 5; episode 2 (policy): only its 2 intervention steps
    assert stats == {"episodes": 3, "transitions": 13, "intervention_steps": 2, "successes": 1, "unreachable": 1}
    st = buf.state()
    x, res = torch.as_tensor(st["x"]), torch.as_tensor(st["residual"])
    base_part = x[:, -2:]  # the features end with the normalized base action
    rows = [0, 1, 2, 4, 5, 6, *range(7, 12), 14, 15]
    want_base = torch.as_tensor(raw[rows])
    assert torch.allclose(base_part, want_base, atol=1e-6)
    executed = torch.as_tensor(np.concatenate(acts)[rows], dtype=torch.float32)
    assert torch.allclose(res, (executed - want_base) / 0.5, atol=1e-5)
    assert st["reward"].tolist() == [0] * 5 + [1] + [0] * 7
    assert st["discount"][5] == 0 and st["discount"][10] == 0 and st["discount"][0] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="holds no"):
        demo_buffer(path, base, pol, n_step=1, gamma=0.9, task="lift", max_steps=7)


def test_untrained_residual_is_the_base():
    base = BiasedBase()
    pol = ResidualPolicy(ResidualConfig(hidden=(32, 32), head="tanh").derive(base.config, "point", {"goal_rel": 2}))
    learner = TD3Learner(pol, TD3Config(n_critics=3, critic_hidden=(16,)))
    obs = {"goal_rel": np.random.default_rng(1).uniform(-0.3, 0.3, (64, 2)).astype(np.float32)}
    base_n = base.normalizer.normalize("action", torch.as_tensor(base.predict_chunk(
        {"goal_rel": obs["goal_rel"][:, None]})[:, 0]))
    assert torch.equal(pol.act(base.normalizer, obs, base_n), base_n.clamp(-1, 1))
    assert torch.equal(learner.actor_target.mean_residual(pol.features(base.normalizer, obs, base_n)),
                       torch.zeros(64, 2))
    with pytest.raises(ConfigError, match="tanh"):
        TD3Learner(ResidualPolicy(ResidualConfig(obs_keys=["o"], obs_dims={"o": 1})), TD3Config())


def test_exploration_noise_follows_its_schedule():
    """Constant by default; with explore_decay_steps the std falls linearly from explore_std at learning_starts to
    explore_std_final, then stays; the explorer's noise has that std (the actor's mean is 0 untrained)."""
    from robot_rl.rl.offpolicy import Explorer

    assert TD3Config(explore_std=0.5).explore_std_at(10**9) == 0.5
    cfg = TD3Config(explore_std=0.5, explore_std_final=0.1, explore_decay_steps=1000, learning_starts=200)
    assert [cfg.explore_std_at(s) for s in (0, 200, 700, 1200, 10**6)] == pytest.approx([0.5, 0.5, 0.3, 0.1, 0.1])
    pol = ResidualPolicy(ResidualConfig(obs_keys=["o"], obs_dims={"o": 3}, action_dim=4, head="tanh"))
    ex = Explorer(pol, cfg)
    x = torch.zeros(20_000, pol.actor.net[0].in_features)
    for steps, std in ((200, 0.5), (700, 0.3), (5000, 0.1)):
        ex.steps = steps
        assert ex(x).residual.std().item() == pytest.approx(std, rel=0.05)  # clip at +-1 trims < 1 % at 0.5


TOY = dict(n_envs=8, batch_size=128, utd_ratio=0.5, n_critics=4, critic_hidden=(64, 64), lr_actor=1e-3,
           lr_critic=1e-3, learning_starts=500, critic_warmup_updates=200, gamma=0.9, log_every=500, explore_std=0.2)
TOY_RES = dict(alpha=0.5, hidden=(64, 64), head="tanh")


@pytest.fixture(params=["intact", "target sign flipped"])
def target_sign(request, monkeypatch):
    """The learning test also runs with the critic target's sign flipped and must then fail: proof that it can."""
    if request.param != "intact":
        import robot_rl.rl.sac as sac_mod
        import robot_rl.rl.td3 as td3_mod

        for mod in (td3_mod, sac_mod):
            monkeypatch.setattr(mod, "td_target", lambda r, d, q, intact=mod.td_target: -intact(r, d, q))
    return request.param


def toy_config(algo: str, **kw):
    """The toy settings for ``algo`` (SAC explores with its own actor: no explore_std) and its residual."""
    if algo == "td3":
        return TD3Config(**{**TOY, **kw}), ResidualConfig(**TOY_RES)
    return SACConfig(**{k: v for k, v in {**TOY, **kw}.items() if k != "explore_std"}), \
        ResidualConfig(**{**TOY_RES, "head": "tanh_gaussian"})


@pytest.mark.parametrize("algo", ["td3", "sac"])
def test_offpolicy_cancels_a_biased_base(tmp_path, target_sign, algo):
    """4 000 env steps (~1 750 updates, a few seconds): from ~6 % (base alone) to >= 90 % deterministic success,
    the executed correction within 0.1 of -BIAS; with the critic target's sign flipped, < 50 %."""
    cfg, res = toy_config(algo, total_env_steps=4000, seed=0)
    pol, curve = train_residual_offpolicy(BiasedBase(), "point", cfg, tmp_path, residual=res, make_venv=point_venv,
                                          progress=False)
    rate, corr = _deterministic_rollouts(pol)
    if target_sign != "intact":
        assert rate < 0.5, (rate, curve[-1])
        return
    assert _deterministic_rollouts(pol, residual=False)[0] < 0.2
    assert rate >= 0.9, (rate, curve[-1])
    assert np.all(np.abs(corr + BIAS) < 0.1), corr
    assert curve[-1]["updates"] == int((4000 - 500) * 0.5) and curve[-1]["online_size"] > 3900
    saved = load_residual(tmp_path / "checkpoint")
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in saved.state_dict().items())
    if algo == "sac":  # the temperature is learned and logged: it moved from its start
        assert curve[-1]["temperature"] != pytest.approx(cfg.init_temperature, rel=0.05), curve[-1]
        assert np.isfinite(curve[-1]["entropy"])


@pytest.mark.parametrize("algo", ["td3", "sac"])
def test_resumed_run_continues_the_same_run(tmp_path, algo):
    """A run stopped at 2 000 env steps and resumed to 4 000 keeps its curve, counters, buffer and learned weights
    (SAC: its temperature and that optimiser too) and learns on to the same result as the uninterrupted run."""
    run = lambda out, steps, **kw: train_residual_offpolicy(  # noqa: E731
        BiasedBase(), "point", toy_config(algo, total_env_steps=steps)[0], tmp_path / out,
        residual=toy_config(algo)[1], make_venv=point_venv, progress=False, **kw)
    _, straight = run("s", 4000)
    _, first = run("r", 2000)
    saved = json.loads((tmp_path / "r" / "state" / "config.json").read_text())["config"]
    assert saved["env_steps"] == 2000 and saved["updates"] == first[-1]["updates"] and saved["algo"] == algo
    pol, resumed = run("r", 4000, resume=True)
    drop = ("wall_s", "unix_time")
    strip = lambda rows: json.dumps([{k: v for k, v in r.items() if k not in drop} for r in rows])  # noqa: E731
    assert strip(resumed[:len(first)]) == strip(first)  # the first half is the stopped run's, unchanged
    assert strip(first) == strip(straight[:len(first)])  # ... which is the straight run's first half
    assert [r["env_steps"] for r in resumed] == [r["env_steps"] for r in straight]
    assert resumed[-1]["updates"] == straight[-1]["updates"] and resumed[-1]["online_size"] > 3900
    rate, _ = _deterministic_rollouts(pol)
    assert rate >= 0.9, resumed[-1]
    with pytest.raises(ConfigError, match="no saved state"):
        run("none", 100, resume=True)


def test_init_from_starts_from_a_trained_run_with_an_empty_replay(tmp_path):
    """``td3.init_from``: a new run takes a trained run's residual and critics (not its replay or counters) and
    explores with that residual from its first step; a fresh run with the same settings warms up from the base."""
    kw = dict(make_venv=point_venv, progress=False)
    trained, _ = train_residual_offpolicy(BiasedBase(), "point", TD3Config(total_env_steps=4000, **TOY),
                                          tmp_path / "a", residual=ResidualConfig(**TOY_RES), **kw)
    short = {**TOY, "learning_starts": 10_000, "log_every": 400}  # no update in the new runs: what acts is loaded
    from_a = TD3Config(total_env_steps=400, init_from=str(tmp_path / "a"), **short)
    pol, curve = train_residual_offpolicy(BiasedBase(), "point", from_a, tmp_path / "b",
                                          residual=ResidualConfig(**TOY_RES), **kw)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in pol.state_dict().items())
    assert curve[-1]["updates"] == 0 and 350 < curve[-1]["online_size"] <= 400  # this run's steps only
    _, fresh = train_residual_offpolicy(BiasedBase(), "point", TD3Config(total_env_steps=400, **short),
                                        tmp_path / "c", residual=ResidualConfig(**TOY_RES), **kw)
    assert curve[-1]["success_rate"] >= 0.8 and fresh[-1]["success_rate"] <= 0.3, (curve[-1], fresh[-1])
    with pytest.raises(ConfigError, match="td3.init_from"):  # another residual model
        train_residual_offpolicy(BiasedBase(), "point", from_a, tmp_path / "d",
                                 residual=ResidualConfig(**{**TOY_RES, "hidden": (32, 32)}), **kw)
    with pytest.raises(ConfigError, match="td3.init_from"):  # no state there
        TD3Config(init_from=str(tmp_path / "nothing")).validate()
    sac, sac_res = toy_config("sac", total_env_steps=400, init_from=str(tmp_path / "a"), learning_starts=10_000)
    with pytest.raises(ConfigError, match="sac.init_from.*holds a td3 state"):  # another algorithm's networks
        train_residual_offpolicy(BiasedBase(), "point", sac, tmp_path / "e", residual=sac_res, **kw)


def test_intervention_steps_join_the_demo_side_unless_the_residual_cannot_reach_them(tmp_path):
    """OffPolicyRun.add with interventions (HIL-SERL): a human step's transition goes to both replay sides; one whose
    action lies beyond base +- alpha (its residual clipped, so never what was executed) goes to neither."""
    from robot_rl.rl.offpolicy import OffPolicyRun

    run = OffPolicyRun(BiasedBase(), "point", TD3Config(total_env_steps=100, n_step=1, **{k: v for k, v in TOY.items()
                                                                                     if k != "n_envs"}, n_envs=1),
                 tmp_path, obs_dims={"goal_rel": 2}, n_slots=1, residual=ResidualConfig(**TOY_RES), progress=False)
    F = run.policy.config.in_dim
    x = torch.zeros(4, F)
    z = np.zeros(4)
    run.add(x, torch.zeros(4, 2), z, z.astype(bool), z.astype(bool), x, z.astype(bool), slots=[0, 0, 0, 0],
            interventions=np.array([False, True, True, False]), unreachable=np.array([False, False, True, False]))
    assert len(run.online) == 3 and len(run.demos) == 1  # the unreachable human step is on neither side
    assert run.demo_stats["intervention_steps"] == 1 and run.demo_stats["unreachable"] == 1
    run.close()


def test_actor_learner_split_streams_every_step_and_never_mixes_versions(tmp_path):
    """Two actor processes act through the learner's policy server on real MuJoCo envs while the learner trains and
    pushes weights every 2 actor updates: every executed step reaches the replay once, versions advance during
    acting, and no action chunk mixes two versions."""
    from pathlib import Path

    from robot_rl.policies.checkpoint import load_policy, read_checkpoint
    from robot_rl.serve.learner import train_residual_td3_actors
    from robot_rl.rl.offpolicy import STATE_FORMAT

    base = load_policy(Path(__file__).parent / "fixtures" / "place_bc_mujoco")
    td3 = TD3Config(total_env_steps=480, n_envs=4, actors=2, learning_starts=120, critic_warmup_updates=0,
                    push_every=2, utd_ratio=0.25, batch_size=32, log_every=60, val_every=0, critic_hidden=(32, 32),
                    n_critics=4, lr_actor=1e-3)
    pol, curve = train_residual_td3_actors(base, "place", td3, tmp_path, progress=False)
    assert curve[-1]["env_steps"] == 480 and curve[-1]["updates"] == int((480 - 120) * 0.25)
    assert curve[-1]["weight_version"] >= 5 and max(r["policy_lag"] for r in curve) > 0
    assert all(r["mixed_version_chunks"] == 0 for r in curve)
    assert sum(r["episodes"] for r in curve) > 0
    _, meta = read_checkpoint(tmp_path / "state", STATE_FORMAT)
    added = meta["config"]["replay_added"]  # n-step windows still open at the end: at most n-1 per env
    assert 480 - 4 * (td3.n_step - 1) <= added <= 480
    saved = load_residual(tmp_path / "checkpoint", base)
    assert float(saved.actor.net[-1].weight.abs().sum()) > 0  # trained (the last layer starts at zero)
    assert json.loads((tmp_path / "td3_config.json").read_text())["actors"] == 2
    # resume: the learner continues from its state (networks, buffer, counters, curve); the actors start fresh
    # episodes on seed blocks the first run never used
    seed_start = meta["config"]["next_seed"]
    td3.total_env_steps = 720
    _, curve2 = train_residual_td3_actors(base, "place", td3, tmp_path, progress=False, resume=True)
    assert json.dumps(curve2[:len(curve)]) == json.dumps(curve) and curve2[-1]["env_steps"] == 720  # NaN == NaN
    assert curve2[-1]["updates"] == int((720 - 120) * 0.25) and curve2[-1]["weight_version"] >= 1
    _, meta2 = read_checkpoint(tmp_path / "state", STATE_FORMAT)
    assert meta2["config"]["replay_added"] >= added + 240 - 4 * (td3.n_step - 1)
    assert meta2["config"]["next_seed"] == seed_start + 2 * 1_000_000


def _image_base(size=32):
    """An untrained image BC base for ``place``: proprioception + front and wrist cameras, no object pose."""
    from robot_rl.policies import make_policy
    from robot_rl.policies.base import PolicyConfig

    dims = {"ee_pos": 3, "ee_quat": 4, "gripper_width": 1}
    unit = lambda d: {"min": -np.ones(d, np.float32), "max": np.ones(d, np.float32)}  # noqa: E731
    torch.manual_seed(0)
    return make_policy(PolicyConfig(
        kind="bc", obs_keys=list(dims), obs_dims=dims, image_keys=["image_front", "image_wrist"],
        image_shape=[size, size, 3], image_crop=[size - 4, size - 4], action_dim=5, n_obs_steps=2, n_action_steps=4,
        horizon=8, image_channels=[8, 16], image_num_keypoints=8, image_feature_dim=16, n_groups=4, bc_hidden=[32]),
        {**{k: unit(d) for k, d in dims.items()}, "action": unit(5)}).freeze()


def test_residual_on_an_image_base_reads_its_frozen_encoder(tmp_path):
    """A residual on an image base reads proprioception + the features of a frozen copy of the base's image
    encoder (no object pose: the task's default fine key is dropped), starts as the base, keeps the copy frozen
    through TD3 updates, and saves / reloads self-contained; the split mode refuses it with a clear error."""
    from robot_rl.rl.residual import residual_for_base
    from robot_rl.serve.learner import train_residual_td3_actors

    base = _image_base()
    rng = np.random.default_rng(0)
    env_dims = {"ee_pos": 3, "ee_quat": 4, "gripper_width": 1, "cube_to_target": 3, "image_front": 3072}
    rcfg = ResidualConfig(head="tanh", hidden=(32,)).derive(base.config, "place", env_dims)
    assert rcfg.fine_keys == {} and rcfg.image_keys == ["image_front", "image_wrist"] and rcfg.in_dim == 8 + 32 + 5
    pol = residual_for_base(rcfg, base)
    obs = {"ee_pos": rng.uniform(-1, 1, (6, 3)), "ee_quat": rng.uniform(-1, 1, (6, 4)),
           "gripper_width": rng.uniform(0, 1, (6, 1)),
           **{k: rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for k in rcfg.image_keys}}
    base_n = torch.as_tensor(rng.uniform(-1, 1, (6, 5)), dtype=torch.float32)
    x = pol.features(base.normalizer, obs, base_n)
    with torch.no_grad():
        want = torch.cat(base.obs_encoder._image_features({k: torch.as_tensor(obs[k])[:, None]
                                                           for k in rcfg.image_keys}), -1).flatten(1)
    assert x.shape == (6, 45) and torch.allclose(x[:, 8:40], want) and torch.equal(x[:, 40:], base_n)
    assert torch.equal(pol.act(base.normalizer, obs, base_n), base_n)  # untrained residual = base
    enc0 = {k: v.clone() for k, v in pol.image_encoder.state_dict().items()}
    actor0 = pol.actor.net[-1].weight.clone()
    learner = TD3Learner(pol, TD3Config(n_critics=2, critic_hidden=(16,), critic_warmup_updates=0, policy_delay=1,
                                        lr_actor=1e-2))
    batch = {"x": x, "residual": torch.zeros(6, 5), "reward": torch.ones(6), "discount": torch.full((6,), 0.9),
             "next_x": x}
    for _ in range(3):
        learner.update(batch)
    assert not torch.equal(pol.actor.net[-1].weight, actor0)
    assert all(torch.equal(v, enc0[k]) for k, v in pol.image_encoder.state_dict().items())
    from robot_rl.rl.residual import save_residual

    save_residual(pol, tmp_path / "res")
    again = load_residual(tmp_path / "res", base)
    assert torch.equal(again.features(base.normalizer, obs, base_n), x)
    with pytest.raises(ConfigError, match="image_wrist"):
        pol.features(base.normalizer, {k: v for k, v in obs.items() if k != "image_wrist"}, base_n)
    with pytest.raises(ConfigError, match="td3.actors"):
        train_residual_td3_actors(base, "place", TD3Config(actors=1, n_envs=1), tmp_path / "split")


def test_td3_on_an_image_base_in_mujoco(tmp_path):
    """TD3 end to end on real MuJoCo with both cameras rendered (32 x 32): the collector encodes each frame once
    (a step's features reuse the last step's next ones) and gets the features a fresh encoding gives, updates run,
    and the checkpoint drives the base in evaluation."""
    from robot_rl.envs.vector import env_kwargs_for, make_vector_env
    from robot_rl.rl.collector import env_obs_dims
    from robot_rl.rl.residual import residual_for_base
    from robot_rl.stages.evaluation import evaluate

    base = _image_base()
    venv = make_vector_env("place", 2, **env_kwargs_for(base.config, "place", None, {"max_steps": 12}))
    pol = residual_for_base(ResidualConfig(head="tanh", hidden=(16,)).derive(base.config, "place",
                                                                             env_obs_dims(venv)), base)
    calls = []
    encode = pol.encode_images
    pol.encode_images = lambda obs: calls.append(1) or encode(obs)
    col = Collector(venv, base, pol, seed_start=0, next_features=True,
                    explore=lambda x: ActorStep(torch.zeros(x.shape[0], 5)))
    resets = 0
    for _ in range(30):
        tr = col.step()
        resets += bool(tr.done.any())
        assert torch.allclose(tr.x, pol.features(base.normalizer, tr.obs, tr.base_action), atol=1e-6)
        assert torch.allclose(tr.next_x[:, :-5], pol.features(base.normalizer, tr.next_obs, tr.base_action)[:, :-5],
                              atol=1e-6)
    col.close()
    # per step: the 2 checks + one encoding; one more at the start and on the step after each reset
    assert resets == 2 and len(calls) == 30 * 3 + 1 + resets
    cfg = TD3Config(total_env_steps=120, n_envs=2, learning_starts=60, batch_size=16, n_critics=2,
                    critic_hidden=(16,), critic_warmup_updates=0, utd_ratio=0.5, log_every=60, policy_delay=1)
    pol, curve = train_residual_offpolicy(base, "place", cfg, tmp_path / "r",
                                          residual=ResidualConfig(head="tanh", hidden=(16,)), progress=False)
    assert curve[-1]["updates"] == 30 and curve[-1]["online_size"] > 100
    assert pol.config.image_keys == ["image_front", "image_wrist"] and pol.config.fine_keys == {}
    assert pol.actor.net[-1].weight.abs().sum() > 0  # the zero-initialised last layer moved
    res = load_residual(tmp_path / "r" / "checkpoint", base)
    out = evaluate(base, "place", n_episodes=2, n_envs=2, residual=res, env_kwargs={"max_steps": 20},
                   progress=False)
    assert out["episodes"] == 2
