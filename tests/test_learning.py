"""Residual PPO learns: one update moves log-probabilities the right way, and on a toy point-reaching task the
residual cancels a deliberately biased base through the real training path (Collector -> RolloutBuffer -> GAE ->
ppo_update, via ``train_residual``). Also the collector's transitions and the validation checkpoint.

Both learning tests fail when the sign of the PPO policy loss is flipped (checked by hand when they were written).
"""

import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from robot_rl.policies.normalizer import Normalizer
from robot_rl.rl.collector import Collector
from robot_rl.rl.ppo import PPOConfig, make_optimizer, ppo_update, train_residual
from robot_rl.rl.residual import ActorStep, ResidualConfig, ResidualPolicy, load_residual

BIAS = np.array([0.3, -0.3], np.float32)  # the base's action error, normalized action units
STEP = 0.05  # metres moved per unit of (clipped) action


class PointEnv(gym.Env):
    """A point in the plane must reach a goal. Observation ``goal_rel`` = goal - position (2,) [m]; action: a
    velocity in [-1, 1]^2 (``STEP`` m per unit). Reward: 10 x progress towards the goal per step, 1 on success
    (within ``tol`` of the goal, terminated); truncated after ``max_steps``. Seeded start and goal in
    [-0.3, 0.3]^2 m."""

    def __init__(self, max_steps: int = 30, tol: float = 0.02):
        self.observation_space = gym.spaces.Dict({"goal_rel": gym.spaces.Box(-1, 1, (2,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.max_steps, self.tol = max_steps, tol

    def _obs(self):
        return {"goal_rel": (self.goal - self.pos).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.3, 0.3, 2)
        self.goal = self.np_random.uniform(-0.3, 0.3, 2)
        self.t = 0
        return self._obs(), {}

    def step(self, a):
        d0 = float(np.linalg.norm(self.goal - self.pos))
        self.pos = self.pos + STEP * np.clip(a, -1, 1)
        self.t += 1
        d = float(np.linalg.norm(self.goal - self.pos))
        success = d < self.tol
        trunc = not success and self.t >= self.max_steps
        return self._obs(), (1.0 if success else 10 * (d0 - d)), success, trunc, {"success": success}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Library code leaves torch's thread count to entry points; these small MLPs run fastest on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def point_venv(n: int, **kw) -> gym.vector.VectorEnv:
    return gym.vector.SyncVectorEnv([lambda: PointEnv(**kw) for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)


class BiasedBase:
    """A frozen 'base policy' for PointEnv: proportional control towards the goal plus a constant ``BIAS``, one
    action per chunk. With the bias its fixed point misses the goal by ~8.5 cm, so it rarely succeeds."""

    def __init__(self, gain: float = 5.0):
        self.gain = gain
        self.config = SimpleNamespace(obs_keys=["goal_rel"], obs_dims={"goal_rel": 2}, image_keys=[], n_obs_steps=1,
                                      n_action_steps=1, action_dim=2)
        unit = {"min": -np.ones(2, np.float32), "max": np.ones(2, np.float32)}  # identity normalization
        self.normalizer = Normalizer({"goal_rel": 2, "action": 2}, {"goal_rel": unit, "action": unit})

    def predict_chunk(self, batch, generator=None):
        e = np.asarray(batch["goal_rel"])[:, -1]
        return (np.clip(self.gain * e, -1, 1) + BIAS)[:, None, :].astype(np.float32)

    def freeze(self):
        return self


def _deterministic_rollouts(pol, n_steps=300, residual=True):
    """Success rate and mean executed correction alpha * residual of the deterministic policy on fresh seeds."""
    scale = 1.0 if residual else 0.0
    col = Collector(point_venv(8), BiasedBase(), pol, seed_start=1_000_000,
                    explore=lambda x: ActorStep(scale * pol.mean_residual(x)))
    col.reset()
    succ, corr = [], []
    with torch.no_grad():
        for tr in col.rollout(n_steps):
            succ.extend(tr.success[tr.done])
            corr.append((tr.action - tr.base_action).numpy())
    col.close()
    return float(np.mean(succ)), np.concatenate(corr).mean(0)


@pytest.fixture(params=["intact", "sign flipped"])
def loss_sign(request, monkeypatch):
    """Each learning test also runs with the policy loss's sign flipped and must then fail: proof that it can."""
    if request.param == "sign flipped":
        import robot_rl.rl.ppo as ppo_mod

        intact = ppo_mod.clipped_surrogate
        monkeypatch.setattr(ppo_mod, "clipped_surrogate", lambda a, r, c: -intact(a, r, c))
    return request.param


def test_ppo_update_moves_log_prob_with_the_advantage(loss_sign):
    torch.manual_seed(0)
    pol = ResidualPolicy(ResidualConfig(obs_keys=["o"], obs_dims={"o": 3}, action_dim=2, hidden=(32, 32)))
    x = torch.randn(256, pol.config.in_dim)
    with torch.no_grad():
        step = pol.explore(x)
    adv = torch.where(step.residual[:, 0] > 0, 1.0, -1.0)  # reward residuals pointing along +x
    cfg = PPOConfig(n_envs=1, n_steps=256, n_minibatches=1, update_epochs=1, lr_actor=1e-2, target_kl=0.0)
    ppo_update(pol, make_optimizer(pol, cfg), cfg, {"x": x, "residual": step.residual, "log_prob": step.log_prob,
                                                    "advantage": adv, "return": torch.zeros(256)})
    with torch.no_grad():
        delta = pol.dist(x).log_prob(step.residual).sum(-1) - step.log_prob
    learned = bool(delta[adv > 0].mean() > 0.01 and delta[adv < 0].mean() < -0.01
                   and (delta[adv > 0] > 0).float().mean() > 0.7 and (delta[adv < 0] < 0).float().mean() > 0.7)
    assert learned == (loss_sign == "intact"), (loss_sign, delta[adv > 0].mean(), delta[adv < 0].mean())


def test_residual_cancels_a_biased_base(tmp_path, loss_sign):
    """~5k env steps (10 PPO updates, ~3 s on one core): from ~6 % (base alone) to >= 90 % deterministic
    success, with the executed correction within 0.1 of -BIAS."""
    ppo = PPOConfig(total_env_steps=5120, n_envs=8, n_steps=64, lr_actor=3e-3, gamma=0.5, gae_lambda=0.5,
                    anneal_lr=False, seed=0)
    pol, curve = train_residual(BiasedBase(), "point", ppo, tmp_path,
                                residual=ResidualConfig(alpha=0.5, hidden=(64, 64)), make_venv=point_venv,
                                progress=False)
    base_rate, _ = _deterministic_rollouts(pol, residual=False)
    rate, corr = _deterministic_rollouts(pol)
    assert base_rate < 0.2, base_rate
    if loss_sign != "intact":
        assert rate < 0.5, (rate, curve[-1])  # broken learning must not pass
        return
    assert rate >= 0.9, (rate, curve[-1])
    assert np.all(np.abs(corr + BIAS) < 0.1), corr
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "checkpoint_best").exists()


def test_collector_keeps_final_observation_and_ends_apart():
    torch.manual_seed(0)
    base = BiasedBase()
    pol = ResidualPolicy(ResidualConfig(alpha=0.5, hidden=(16, 16)).derive(base.config, "point", {"goal_rel": 2}))
    col = Collector(point_venv(3, max_steps=4, tol=0.05), base, pol, seed_start=7)
    col.reset()
    seeds, ends = set(), 0
    for tr in col.rollout(40):
        assert tr.x.shape == (3, pol.config.in_dim) and tr.log_prob.shape == (3,) and tr.value.shape == (3,)
        executed = np.clip(base.normalizer.unnormalize("action", tr.action).numpy(), -1, 1)
        # the true next observation follows the dynamics from obs, for ended episodes too
        assert np.allclose(tr.next_obs["goal_rel"], tr.obs["goal_rel"] - STEP * executed, atol=1e-6)
        assert np.array_equal(tr.terminated, tr.success)
        assert np.array_equal(tr.truncated, (tr.episode_length == 4) & ~tr.success)
        for i in np.flatnonzero(tr.done):  # the env was reset: the collector's obs is a new episode's
            ends += 1
            assert not np.allclose(col.obs["goal_rel"][i], tr.next_obs["goal_rel"][i])
        seeds.update(tr.episode_seed.tolist())
    seeds.update(col.episode_seed.tolist())  # episodes started by the last step's resets
    col.close()
    assert ends >= 30 and seeds == set(range(7, 7 + 3 + ends))


def test_validation_keeps_the_best_checkpoint(tmp_path):
    scores, snapshots = iter([0.2, 0.5, 0.5, 0.1]), []

    def validate(pol, n_episodes):
        assert n_episodes == 3
        snapshots.append({k: v.clone() for k, v in pol.state_dict().items()})
        torch.rand(5)  # validation may draw random numbers; training's stream must not notice
        return next(scores)

    kw = dict(residual=ResidualConfig(hidden=(16, 16)), make_venv=point_venv, progress=False,
              checkpoint_extra={"base_checkpoint": "toy"})
    ppo = PPOConfig(total_env_steps=1000, n_envs=2, n_steps=50, val_every=300, val_episodes=3, seed=1)
    _, curve = train_residual(BiasedBase(), "point", ppo, tmp_path / "v", validate=validate, **kw)
    _, plain = train_residual(BiasedBase(), "point", ppo, tmp_path / "p", **kw)
    # validated after the updates ending at 300, 600, 900 env steps and at the end (1000)
    assert [(r["env_steps"], r.get("val_success")) for r in curve if "val_success" in r] == \
        [(300, 0.2), (600, 0.5), (900, 0.5), (1000, 0.1)]
    drop = ("wall_s", "val_success")
    assert [{k: v for k, v in r.items() if k not in drop} for r in curve] == \
        [{k: v for k, v in r.items() if k not in drop} for r in plain]
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert report["best"] == {"env_steps": 600, "val_success": 0.5} and len(report["rows"]) == 4
    best = load_residual(tmp_path / "v" / "checkpoint_best")
    assert all(torch.equal(v, snapshots[1][k]) for k, v in best.state_dict().items())  # ties keep the earlier
    meta = json.loads((tmp_path / "v" / "checkpoint_best" / "config.json").read_text())["extra"]
    assert meta == {"base_checkpoint": "toy", "env_steps": 600, "val_success": 0.5}
    last = load_residual(tmp_path / "v" / "checkpoint")
    assert all(torch.equal(v, snapshots[3][k]) for k, v in last.state_dict().items())


def test_ppo_rejects_an_off_policy_head(tmp_path):
    from robot_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="residual.head"):
        train_residual(BiasedBase(), "point", PPOConfig(total_env_steps=100, n_envs=1, n_steps=100), tmp_path,
                       residual=ResidualConfig(head="tanh"), make_venv=point_venv, progress=False)
