"""On-policy residual RL with PPO (Schulman et al. 2017) and GAE (Schulman et al. 2016), ResiP style
(Ankile et al. 2024): the frozen base emits action chunks in N subprocess envs (one batched base call for the envs
that need a chunk), the residual acts per step, reward is the task's sparse success reward.

Time-limit truncations are treated as terminal (the time limit is part of the task; the value is not bootstrapped).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from robot_rl.progress import progress_bar

from robot_rl.errors import ConfigError
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy
from robot_rl.envs.vector import TRAIN_SEED_START, SeedSchedule, env_kwargs_for, make_vector_env, reset_some
from robot_rl.policies.execution import ChunkExecutor

DEFAULT_FINE_KEYS = {"place": {"cube_to_target": 0.01}, "lift": {}}  # residual fine features per task (key: scale m)


@dataclass
class PPOConfig:
    """PPO hyper-parameters. ``total_env_steps`` counts control steps summed over all envs."""

    total_env_steps: int = 200_000
    n_envs: int = 8
    n_steps: int = 100  # rollout length per env per update
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    update_epochs: int = 5
    n_minibatches: int = 4
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    max_grad_norm: float = 0.5
    target_kl: float = 0.05
    anneal_lr: bool = True  # linear decay of both learning rates to 0 over training (Huang et al. 2022, PPO details)
    vf_coef: float = 0.5
    alpha: float = 0.1
    log_std_init: float = -1.0
    hidden: tuple = (256, 256)
    fine_keys: dict | None = None  # None: the task's default (DEFAULT_FINE_KEYS); {} for none
    align_chunks: bool = True  # one batched base call for all envs per Ta steps (see ChunkExecutor)
    # L2 penalty 0.5 * residual_l2 * |mean residual|^2 (residual units, summed over action dims): where the return
    # carries no consistent signal (e.g. approach and grasp on the place task) PPO's noisy updates otherwise
    # random-walk the residual away from 0, and its pushes then spoil grasps the base made reliably (measured on
    # the full-diffusion run: pre-grasp mean |residual| 0.5-1.2 vs 0.3-0.8 while carrying; 26 % of episodes lost
    # to missed grasps, 2 % for the base alone). 0 (default) turns it off; the full-diffusion preset uses 0.1.
    residual_l2: float = 0.0
    seed: int = 0

    def validate(self):
        for k in ("total_env_steps", "n_envs", "n_steps", "update_epochs", "n_minibatches"):
            if getattr(self, k) < 1:
                raise ConfigError(f"ppo.{k}", f"{getattr(self, k)} < 1", "use a positive integer")
        if self.residual_l2 < 0:
            raise ConfigError("ppo.residual_l2", f"{self.residual_l2} < 0", "use 0 (off) or a small positive weight")
        if (self.n_envs * self.n_steps) % self.n_minibatches:
            raise ConfigError("ppo.n_minibatches", "must divide n_envs * n_steps", "pick a divisor, e.g. 4")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("ppo.gamma", "gamma must be in (0,1], gae_lambda in [0,1]", "use 0.99 / 0.95")


def gae(rewards, values, dones, last_value, gamma, lam):
    """Generalized advantage estimation over (T, N) tensors; ``dones[t]`` marks the end of an episode at step t."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        next_v = last_value if t == T - 1 else values[t + 1]
        nonterm = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_v * nonterm - values[t]
        last = delta + gamma * lam * nonterm * last
        adv[t] = last
    return adv, adv + values


def train_residual(base, task: str, cfg: PPOConfig, out_dir: str | Path, *, task_kwargs: dict | None = None,
                   env_kwargs: dict | None = None, writer=None, progress: bool = True) -> tuple[ResidualPolicy, list]:
    """Train a residual policy on top of the frozen ``base`` policy.

    Returns (residual policy, learning curve rows {env_steps, success_rate, episodes, wall_s}).
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)  # the env workers own the other cores; OpenMP oversubscription is catastrophic
    base.freeze()
    bc = base.config
    if bc.image_keys:
        raise ConfigError("base.image_keys", "residual RL currently runs on state observations only",
                          "train the base on low-dim obs keys")
    fine = dict(DEFAULT_FINE_KEYS.get(task, {}) if cfg.fine_keys is None else cfg.fine_keys)
    N, T = cfg.n_envs, cfg.n_steps
    venv = make_vector_env(task, N, task_kwargs=task_kwargs, **env_kwargs_for(bc, task, task_kwargs, env_kwargs))
    space = venv.single_observation_space
    for k in fine:
        if k not in space.spaces:
            venv.close()
            raise ConfigError(f"residual.fine_keys.{k}", f"task {task!r} has no observation {k!r}",
                              f"use keys from {sorted(space.spaces)} or fine_keys={{}}")
    rcfg = ResidualConfig(obs_keys=list(bc.obs_keys),
                          obs_dims={**bc.obs_dims, **{k: int(space[k].shape[0]) for k in fine}},
                          fine_keys=fine, action_dim=bc.action_dim, alpha=cfg.alpha, hidden=tuple(cfg.hidden),
                          log_std_init=cfg.log_std_init)
    pol = ResidualPolicy(rcfg)
    opt = torch.optim.Adam([{"params": pol.actor.parameters(), "lr": cfg.lr_actor},
                            {"params": [pol.log_std], "lr": cfg.lr_actor},
                            {"params": pol.critic.parameters(), "lr": cfg.lr_critic}], eps=1e-5)
    norm = base.normalizer
    seeds = SeedSchedule(TRAIN_SEED_START + cfg.seed * 10_000_000)
    ex = ChunkExecutor(base, N, seed=cfg.seed, align_chunks=cfg.align_chunks)
    all_mask = np.ones(N, dtype=bool)
    obs = reset_some(venv, all_mask, [seeds.take() for _ in range(N)], None)
    ex.reset(all_mask, obs)
    n_updates = max(1, cfg.total_env_steps // (N * T))
    curve, steps, t0 = [], 0, time.time()
    bar = progress_bar(total=n_updates * N * T, desc="residual PPO", unit="step", disable=not progress)
    buf = {k: [] for k in ("x", "res", "logp", "val", "rew", "done")}
    try:
        base_lrs = [g["lr"] for g in opt.param_groups]
        for update in range(n_updates):
            if cfg.anneal_lr:
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr0 * (1.0 - update / n_updates)
            for k in buf:
                buf[k].clear()
            ep_succ = []
            for _ in range(T):
                base_n = norm.normalize("action", torch.as_tensor(ex.actions()))
                x = pol.features(norm, obs, base_n)
                with torch.no_grad():
                    d = pol.dist(x)
                    res = d.sample()
                    logp, val = d.log_prob(res).sum(-1), pol.value(x)
                exec_raw = norm.unnormalize("action", pol.combine(base_n, res)).numpy()
                obs, rew, term, trunc, info = venv.step(exec_raw)
                done = np.logical_or(term, trunc)
                for k, v in zip(buf, (x, res, logp, val, torch.as_tensor(rew, dtype=torch.float32),
                                      torch.as_tensor(done, dtype=torch.float32))):
                    buf[k].append(v)
                if done.any():
                    ep_succ.extend(bool(s) for s in np.asarray(info["success"])[done])
                    obs = reset_some(venv, done, [seeds.take() if m else None for m in done], obs)
                    ex.reset(done, obs)
                ex.observe(obs, ~done)
            steps += N * T
            bar.update(N * T)
            with torch.no_grad():
                x_last = pol.features(norm, obs, norm.normalize("action", torch.as_tensor(ex.peek())))
                last_v = pol.value(x_last)
            X, RES, LOGP, VAL, REW, DONE = (torch.stack(buf[k]) for k in buf)
            adv, ret = gae(REW, VAL, DONE, last_v, cfg.gamma, cfg.gae_lambda)
            X, RES, LOGP, ADV, RET = (t.reshape(N * T, *t.shape[2:]) for t in (X, RES, LOGP, adv, ret))
            stats = _ppo_update(pol, opt, cfg, X, RES, LOGP, ADV, RET)
            row = {"env_steps": steps, "episodes": len(ep_succ),
                   "success_rate": float(np.mean(ep_succ)) if ep_succ else float("nan"),
                   "wall_s": time.time() - t0, **stats, "std": float(pol.log_std.detach().exp().mean()),
                   "base_calls": ex.calls, "base_chunks": ex.chunks}
            curve.append(row)
            bar.set_postfix(success=f"{row['success_rate']:.2f}", kl=f"{stats['approx_kl']:.3f}")
            if writer is not None:
                for k, v in row.items():
                    if k != "env_steps":
                        writer.add_scalar(f"residual/{k}", v, steps)
    finally:
        bar.close()
        venv.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning_curve.json").write_text(json.dumps(curve, indent=1))
    (out / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return pol, curve


def _ppo_update(pol, opt, cfg, X, RES, LOGP, ADV, RET) -> dict:
    n = X.shape[0]
    mb = n // cfg.n_minibatches
    kls, clipfracs, vlosses, plosses, l2s = [], [], [], [], []
    for _ in range(cfg.update_epochs):
        perm = torch.randperm(n)
        for s in range(0, n, mb):
            idx = perm[s:s + mb]
            d = pol.dist(X[idx])
            logp = d.log_prob(RES[idx]).sum(-1)
            ratio = (logp - LOGP[idx]).exp()
            a = ADV[idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            pl = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
            vl = 0.5 * (pol.value(X[idx]) - RET[idx]).pow(2).mean()
            l2 = 0.5 * d.mean.pow(2).sum(-1).mean()
            loss = pl + cfg.vf_coef * vl + cfg.residual_l2 * l2
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(pol.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                kls.append(float(((ratio - 1) - (logp - LOGP[idx])).mean()))
                clipfracs.append(float(((ratio - 1).abs() > cfg.clip_coef).float().mean()))
            vlosses.append(float(vl.detach()))
            plosses.append(float(pl.detach()))
            l2s.append(float(l2.detach()))
        if cfg.target_kl and np.mean(kls[-cfg.n_minibatches:]) > cfg.target_kl:
            break
    return {"approx_kl": float(np.mean(kls)), "clipfrac": float(np.mean(clipfracs)),
            "value_loss": float(np.mean(vlosses)), "policy_loss": float(np.mean(plosses)),
            "residual_sq": 2 * float(np.mean(l2s))}
