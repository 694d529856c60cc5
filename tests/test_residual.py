"""Residual policy: zero-init identity with the base, checkpoints, GAE."""

import numpy as np
import pytest
import torch

from robot_rl.errors import ConfigError
from robot_rl.stages.evaluation import CombinedPolicy, wilson_interval
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, load_residual, save_residual
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


def test_untrained_residual_equals_base(base):
    res = ResidualPolicy(ResidualConfig(obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5))
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
        res.actor[-1].bias.fill_(1.0)
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
                assert all(len(q) == Ta - 1 - t % Ta for q in e.queue), t
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
