"""Residual policy: zero-init identity with the base, actor heads and critics, checkpoints, GAE."""

import numpy as np
import pytest
import torch

from robot_rl.errors import ConfigError
from robot_rl.stages.evaluation import CombinedPolicy, wilson_interval
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.rl.heads import GaussianHead, QEnsemble, TanhGaussianHead, TanhHead, VCritic
from robot_rl.rl.residual import (DEFAULT_FINE_KEYS, HEADS, ResidualConfig, ResidualPolicy, build_residual,
                                  load_residual, residual_config_dict, residual_from_tensors, save_residual)
from robot_rl.rl.ppo import PPOConfig, gae
from robot_rl.policies.execution import ChunkExecutor

KEYS = {"ee_pos": 3, "cube_pos": 3}


def _stats(d, lo=-1.0, hi=1.0):
    return {"min": np.full(d, lo, np.float32), "max": np.full(d, hi, np.float32),
            "mean": np.zeros(d, np.float32), "std": np.ones(d, np.float32)}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = PolicyConfig(kind="diffusion", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, down_dims=[16, 32],
                       diffusion_step_embed_dim=16, num_inference_steps=4)
    return make_policy(cfg, {"ee_pos": _stats(3), "cube_pos": _stats(3), "action": _stats(5, -0.5, 0.8)}).freeze()


def _obs(rng, n):
    return {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in KEYS.items()}


@pytest.mark.parametrize("head", HEADS)
def test_untrained_residual_equals_base(base, head):
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, head=head))
    rng = np.random.default_rng(0)
    obs0 = _obs(rng, 3)
    a, b = CombinedPolicy(base, None, 3, seed=7), CombinedPolicy(base, res, 3, seed=7)
    mask = np.ones(3, dtype=bool)
    a.reset(mask, obs0)
    b.reset(mask, obs0)
    for t in range(20):
        o = _obs(rng, 3)
        x, y = a.act(o), b.act(o)
        assert np.max(np.abs(x - y)) <= 1e-6, t
        a.observe(o, None)
        b.observe(o, None)
    # a trained (non-zero) residual does change the action
    with torch.no_grad():
        res.actor.net[-1].bias.fill_(1.0)
    assert np.max(np.abs(a.act(o) - b.act(o))) > 1e-3


def test_aligned_chunks_batch_every_env_into_one_base_call(base):
    """Staggered resets: free-running chunks re-plan each env on its own clock (many small base calls); aligned
    chunks cut only the first chunk after a reset, so every queue runs dry on the same step (one call per Ta)."""
    n, Ta, rng = 4, base.config.n_action_steps, np.random.default_rng(3)
    resets = {3: [0], 5: [1, 2], 13: [3]}  # step -> envs whose episode ended there
    ex = {a: ChunkExecutor(base, n, seed=1, align_chunks=a) for a in (False, True)}
    for e in ex.values():
        e.reset(np.ones(n, bool), _obs(rng, n))
    for t in range(4 * Ta):
        o = _obs(rng, n)
        mask = np.zeros(n, bool)
        mask[resets.get(t, [])] = True
        for a, e in ex.items():
            e.reset(mask, o)
            e.observe(o, ~mask)
            e.actions()
            if a:  # aligned: all queues empty together on every multiple of Ta
                assert all(len(e.queued(i)) == Ta - 1 - t % Ta for i in range(n)), t
    assert Ta == 8 and ex[True].t == 32
    # free: env 0 plans at 0,3,11,19,27; envs 1,2 at 0,5,13,21,29; env 3 at 0,8,13,21,29 -> 10 distinct steps
    # aligned: the resets at 3, 5, 13 plus the shared boundaries 0, 8, 16, 24 -> 7
    assert (ex[False].calls, ex[True].calls) == (10, 7)
    assert ex[True].chunks == 4 + 1 + 2 + 4 + 1 + 4 + 4  # t = 0, 3, 5, 8, 13, 16, 24


def test_residual_checkpoint_round_trip(tmp_path, base):
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, alpha=0.2))
    with torch.no_grad():
        for p in res.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_residual(res, tmp_path / "r")
    back = load_residual(tmp_path / "r", base)
    x = torch.randn(4, res.config.in_dim)
    assert torch.equal(res.actor(x), back.actor(x)) and back.config.alpha == 0.2
    assert not any(p.requires_grad for p in back.parameters())


def test_residual_base_mismatch(tmp_path, base):
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=4))
    save_residual(res, tmp_path / "r")
    with pytest.raises(ConfigError, match="action_dim"):
        load_residual(tmp_path / "r", base)


def test_bad_residual_config():
    with pytest.raises(ConfigError, match="alpha"):
        ResidualPolicy(ResidualConfig(obs_keys=["a"], obs_dims={"a": 1}, alpha=3.0))
    with pytest.raises(ConfigError, match=r"alpha_per_dim.*2 scales for 5"):
        ResidualPolicy(ResidualConfig(obs_keys=["a"], obs_dims={"a": 1}, alpha_per_dim=[0.1, 1.0]))
    with pytest.raises(ConfigError, match=r"alpha_per_dim\[4\]"):
        ResidualPolicy(ResidualConfig(obs_keys=["a"], obs_dims={"a": 1}, alpha_per_dim=[0.1] * 4 + [0.0]))
    with pytest.raises(ConfigError, match="residual_l2"):
        PPOConfig(residual_l2=-0.1).validate()


def test_gae_matches_hand_computation():
    r = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    v = torch.tensor([[0.5], [0.6], [0.7], [0.2]])
    d = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    adv, ret = gae(r, v, d, torch.tensor([0.3]), gamma=0.9, lam=1.0)
    # with lambda = 1 the return is the discounted sum up to the episode end (then bootstrap from last value)
    assert torch.allclose(ret[:3, 0], torch.tensor([0.81, 0.9, 1.0]))
    assert torch.allclose(ret[3, 0], torch.tensor(0.9 * 0.3))
    # lambda = 0.95, by hand: deltas 0.04, 0.03, 0.3 (episode ends at t=2: no bootstrap), 0.07; A_t = delta_t +
    # 0.9 * 0.95 * A_{t+1} within the episode
    adv, _ = gae(r, v, d, torch.tensor([0.3]), gamma=0.9, lam=0.95)
    a1 = 0.03 + 0.855 * 0.3
    assert torch.allclose(adv[:, 0], torch.tensor([0.04 + 0.855 * a1, a1, 0.3, 0.07]))


def test_wilson_interval():
    lo, hi = wilson_interval(90, 100)
    assert 0.82 < lo < 0.84 and 0.94 < hi < 0.95
    assert wilson_interval(0, 20)[0] == 0.0


def test_actor_heads_shapes_bounds_and_zero_init():
    torch.manual_seed(0)
    x = torch.randn(7, 12) * 5
    heads = {"gaussian": GaussianHead(12, 3, (32, 32), -1.0), "tanh": TanhHead(12, 3, (32, 32)),
             "tanh_gaussian": TanhGaussianHead(12, 3, (32, 32), -1.0)}
    for name, h in heads.items():
        assert torch.equal(h.deterministic(x), torch.zeros(7, 3)), name  # zero-init: no correction before training
    g, t, s = heads.values()
    assert g.dist(x).sample().shape == (7, 3) and torch.allclose(g.dist(x).stddev, torch.full((7, 3), np.exp(-1.0)))
    a, logp = s.sample(x)
    assert a.shape == (7, 3) and logp.shape == (7,)
    with torch.no_grad():  # trained-looking weights: outputs stay inside (-1, 1)
        for h in (t, s):
            for p in h.parameters():
                p.normal_(0, 3.0)
    assert t(x).abs().max() <= 1 and s.sample(x)[0].abs().max() <= 1 and s.deterministic(x).abs().max() <= 1
    assert torch.isfinite(s.sample(x)[1]).all()  # saturated tanh: the log-prob stays finite
    # the tanh-Gaussian log-prob equals torch's change of variables through TanhTransform
    s2 = TanhGaussianHead(4, 2, (8,), -0.5)
    with torch.no_grad():
        s2.net[-1].weight.normal_(0, 0.3)
    xs = torch.randn(5, 4)
    a, logp = s2.sample(xs)
    mu, log_std = s2.net(xs).split(2, dim=-1)
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, log_std.exp()),
                                                      [torch.distributions.transforms.TanhTransform()])
    assert torch.allclose(logp, ref.log_prob(a.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1), atol=1e-3)
    assert logp.requires_grad  # reparameterised: SAC's actor loss differentiates through the sample


def test_critics_shapes():
    torch.manual_seed(0)
    x, a = torch.randn(6, 10), torch.randn(6, 3)
    assert VCritic(10, (32, 32))(x).shape == (6,)
    q = QEnsemble(10, 3, (32, 32), n_heads=5)
    out = q(x, a)
    assert out.shape == (5, 6) and out.dtype == torch.float32
    assert (out[0] - out[1]).abs().max() > 1e-4  # independent members
    assert sum(p.numel() for p in q.parameters()) == 5 * ((13 * 32 + 32) + (32 * 32 + 32) + (32 + 1) + 4 * 32)
    heads = torch.tensor([3, 1])  # the REDQ target's subset: those members' values, not a full forward
    assert torch.allclose(q(x, a, heads), out[heads], atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in q.parameters())


@pytest.mark.parametrize("head", HEADS)
def test_residual_config_dict_round_trip(head):
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims={**KEYS, "cube_to_target": 3},
                                        fine_keys={"cube_to_target": 0.01}, action_dim=5, alpha=0.2, hidden=(32, 16),
                                        head=head))
    d = residual_config_dict(res)
    assert d["layout"] == 2 and d["hidden"] == [32, 16]
    back = residual_from_tensors(d, res.state_dict())
    assert back.config == res.config and (back.critic is None) == (head != "gaussian")
    x = torch.randn(3, res.config.in_dim)
    assert torch.equal(back.mean_residual(x), res.mean_residual(x))
    with pytest.raises(ConfigError, match="head"):
        build_residual({**d, "head": "beta"})


def test_layout1_checkpoint_loads(base):
    """A residual saved before the head split (tensors actor.<i>, critic.<i>, log_std) still loads."""
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5))
    with torch.no_grad():
        res.actor.net[-1].bias.fill_(0.5)
    old = {("log_std" if k == "actor.log_std" else k.replace(".net.", ".", 1)): v for k, v in res.state_dict().items()}
    cfg = {k: v for k, v in residual_config_dict(res).items() if k not in ("layout", "head")}
    back = residual_from_tensors(cfg, old, base)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in res.state_dict().items())


def test_derive_fills_in_the_base_and_task_fields():
    bc = PolicyConfig(kind="bc", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5)
    env_dims = {**KEYS, "cube_to_target": 3}
    rc = ResidualConfig(alpha=0.2).derive(bc, "place", env_dims)
    assert (rc.obs_keys, rc.action_dim, rc.alpha) == (list(KEYS), 5, 0.2)
    assert rc.fine_keys == DEFAULT_FINE_KEYS["place"] and rc.obs_dims["cube_to_target"] == 3
    assert ResidualConfig(fine_keys={}).derive(bc, "place", env_dims).fine_keys == {}
    with pytest.raises(ConfigError, match="fine_keys.nope"):
        ResidualConfig(fine_keys={"nope": 0.01}).derive(bc, "place", env_dims)


def test_a_residual_scale_per_action_dimension(tmp_path, base):
    """alpha_per_dim scales each dimension on its own (here: the gripper with full authority), in combine, through
    a saved and reloaded checkpoint, and in the demo relabelling's reach (base + scale * label, clipped)."""
    rc = ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, alpha_per_dim=[0.1, 0.1, 0.1, 0.1, 1.0])
    res = ResidualPolicy(rc)
    assert rc.scale == [0.1] * 4 + [1.0] and ResidualConfig(alpha=0.2).scale == [0.2] * 5
    base_n = torch.tensor([[0.0, 0.5, -0.95, 0.0, -0.4]])
    r = torch.tensor([[1.0, -1.0, -1.0, 0.5, 1.0]])
    assert torch.allclose(res.combine(base_n, r), torch.tensor([[0.1, 0.4, -1.0, 0.05, 0.6]]))
    save_residual(res, tmp_path / "r")
    back = load_residual(tmp_path / "r", base)
    assert back.config.scale == rc.scale and torch.equal(back.combine(base_n, r), res.combine(base_n, r))
    # a release the base starts (gripper -0.4) is one the residual can now hold back (executed +0.6: still closed)
    from robot_rl.rl.replay import reaches

    assert reaches(res, base_n, r, res.combine(base_n, r)).all()
    assert not reaches(ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5)), base_n,
                       r, res.combine(base_n, r)).any()
