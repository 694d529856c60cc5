"""On-policy residual RL with PPO (Schulman et al. 2017) and GAE (Schulman et al. 2016), ResiP style
(Ankile et al. 2024): the frozen base emits action chunks in N subprocess envs (one batched base call for the envs
that need a chunk), the residual acts per step, reward is the task's sparse success reward.

Data path: :class:`~robot_rl.rl.collector.Collector` (named transitions) -> :class:`~robot_rl.rl.buffers.RolloutBuffer`
(preallocated, named) -> :func:`gae` -> :func:`ppo_update`.

Time-limit truncations are treated as terminal (the time limit is part of the task; the value is not bootstrapped):
GAE's ``dones`` is ``terminated | truncated``. The collector keeps the two apart and the true final observation,
so a learner that bootstraps truncations can.

Model selection: with a ``validate`` callback, the residual is scored every ``val_every`` env steps and at the end;
the best one is kept in ``out_dir/checkpoint_best`` next to the last one in ``out_dir/checkpoint``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robot_rl.envs.vector import TRAIN_SEED_START, all_cores, env_kwargs_for, make_vector_env
from robot_rl.errors import ConfigError
from robot_rl.progress import progress_bar
from robot_rl.rl.buffers import RolloutBuffer
from robot_rl.rl.collector import Collector, env_obs_dims
from robot_rl.rl.residual import ResidualConfig, ResidualPolicy, residual_for_base, save_residual
from robot_rl.rl.validation import Validation


@dataclass
class PPOConfig:
    """PPO hyper-parameters (the residual model's fields are in :class:`~robot_rl.rl.residual.ResidualConfig`)."""

    total_env_steps: int = 200_000  # control steps summed over all envs; updates = total // (n_envs * n_steps)
    n_envs: int = 8  # parallel envs (one subprocess each)
    n_steps: int = 100  # rollout length per env per update
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95  # GAE lambda (Schulman et al. 2016)
    clip_coef: float = 0.2  # PPO ratio clip epsilon (Schulman et al. 2017)
    update_epochs: int = 5  # passes over each rollout
    n_minibatches: int = 4  # minibatches per pass; must divide n_envs * n_steps
    lr_actor: float = 3e-4  # Adam learning rate of the actor mean and its log-std
    lr_critic: float = 1e-3  # Adam learning rate of the V critic
    max_grad_norm: float = 0.5  # global gradient-norm clip per minibatch step
    target_kl: float = 0.05  # stop an update's epochs once the last epoch's mean approx. KL exceeds this (0: off)
    anneal_lr: bool = True  # linear decay of both learning rates to 0 over training (Huang et al. 2022, PPO details)
    vf_coef: float = 0.5  # weight of the value loss
    align_chunks: bool = True  # one batched base call for all envs per Ta steps (see ChunkExecutor)
    # L2 penalty 0.5 * residual_l2 * |mean residual|^2 (residual units, summed over action dims): where the return
    # carries no consistent signal (e.g. approach and grasp on the place task) PPO's noisy updates otherwise
    # random-walk the residual away from 0 and spoil grasps the base made reliably (docs/MEASUREMENTS.md).
    # 0 (default) turns it off; the full-diffusion preset uses 0.1.
    residual_l2: float = 0.0
    seed: int = 0  # torch seed, base sampling seed and training episode seeds (TRAIN_SEED_START + seed * 10^7)
    val_every: int = 100_000  # env steps between validations (and one at the end) when validate is given; 0: off
    val_episodes: int = 50  # episodes per validation

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for k in ("total_env_steps", "n_envs", "n_steps", "update_epochs", "n_minibatches", "val_episodes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"ppo.{k}", f"{getattr(self, k)} < 1", "use a positive integer")
        if self.val_every < 0:
            raise ConfigError("ppo.val_every", f"{self.val_every} < 0", "use 0 (off) or env steps, e.g. 100000")
        if self.residual_l2 < 0:
            raise ConfigError("ppo.residual_l2", f"{self.residual_l2} < 0", "use 0 (off) or a small positive weight")
        if (self.n_envs * self.n_steps) % self.n_minibatches:
            raise ConfigError("ppo.n_minibatches", "must divide n_envs * n_steps", "pick a divisor, e.g. 4")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("ppo.gamma", "gamma must be in (0,1], gae_lambda in [0,1]", "use 0.99 / 0.95")


def gae(rewards, values, dones, last_value, gamma, lam):
    """Generalized advantage estimation over (T, N) tensors; ``dones[t]`` marks the end of an episode at step t
    (no bootstrap across it). Returns (advantages, returns = advantages + values), both (T, N)."""
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


def make_optimizer(pol: ResidualPolicy, cfg: PPOConfig) -> torch.optim.Adam:
    """Adam (eps 1e-5) with param groups [actor mean, actor log-std] at ``lr_actor`` and [critic] at ``lr_critic``."""
    return torch.optim.Adam([{"params": pol.actor.net.parameters(), "lr": cfg.lr_actor},
                             {"params": [pol.actor.log_std], "lr": cfg.lr_actor},
                             {"params": pol.critic.parameters(), "lr": cfg.lr_critic}], eps=1e-5)


def clipped_surrogate(advantage: torch.Tensor, ratio: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """PPO's clipped surrogate policy loss (Schulman et al. 2017, eq. 7, negated for minimisation):
    ``mean(max(-A·r, -A·clip(r, 1-eps, 1+eps)))`` over (M,) advantages and probability ratios."""
    return torch.max(-advantage * ratio, -advantage * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()


def ppo_update(pol: ResidualPolicy, opt: torch.optim.Optimizer, cfg: PPOConfig, batch: dict) -> dict:
    """One PPO update (clipped surrogate + value loss + optional residual L2) on a flat rollout.

    ``batch``: (M, ...) tensors ``x`` (M, F), ``residual`` (M, A), ``log_prob`` (M,) of the behaviour policy,
    ``advantage`` (M,), ``return`` (M,). ``update_epochs`` passes over ``n_minibatches`` random minibatches
    (``torch.randperm``, global RNG), advantages normalized per minibatch; early stop when an epoch's mean
    approx. KL (Schulman's k3 estimator) exceeds ``target_kl``. Returns mean stats {approx_kl, clipfrac,
    value_loss, policy_loss, residual_sq}.
    """
    X, RES, LOGP, ADV, RET = (batch[k] for k in ("x", "residual", "log_prob", "advantage", "return"))
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
            pl = clipped_surrogate(a, ratio, cfg.clip_coef)
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


def train_residual(base, task: str, ppo: PPOConfig, out_dir: str | Path, *, residual: ResidualConfig | None = None,
                   task_kwargs: dict | None = None, env_kwargs: dict | None = None, writer=None,
                   progress: bool = True, validate: Callable | None = None, checkpoint_extra: dict | None = None,
                   make_venv: Callable | None = None) -> tuple[ResidualPolicy, list]:
    """Train a residual policy with PPO on top of the frozen ``base`` policy (state observations only).

    Args:
        base: frozen base policy (``.config`` with obs_keys/obs_dims/image_keys/n_obs_steps/n_action_steps/
            action_dim, ``.normalizer``, ``.predict_chunk``, ``.freeze``).
        task: task name (``make_vector_env``; also picks the default fine features, ``DEFAULT_FINE_KEYS``).
        ppo: algorithm settings; ``residual``: model settings (default ``ResidualConfig()``), derived fields are
            filled in here (:meth:`ResidualConfig.derive`).
        task_kwargs, env_kwargs: passed to ``make_vector_env`` (EnvConfig fields in ``env_kwargs``).
        writer: TensorBoard SummaryWriter or None; every curve field is logged as ``residual/<field>``.
        validate: ``validate(residual_policy, n_episodes) -> success rate`` or None. Called every
            ``ppo.val_every`` env steps and after the last update (unless that update was just validated), with
            the training residual (do not modify it); the caller evaluates on its validation seeds (e.g. from
            ``robot_rl.envs.vector.VAL_SEED_START``). It runs under ``torch.random.fork_rng``, so it does not
            change the training's random stream. The best score's residual is saved to ``out_dir/checkpoint_best``
            (ties keep the earlier), scores go to the curve (``val_success``) and ``out_dir/validation.json``.
        checkpoint_extra: JSON-able metadata saved with the checkpoints (e.g. ``{"base_checkpoint": path}``);
            ``env_steps`` (and ``val_success`` for the best) is added.
        make_venv: ``make_venv(n_envs) -> vector env`` used instead of ``make_vector_env(task, ...)`` (then
            ``task_kwargs`` / ``env_kwargs`` are unused): a test seam for toy envs. The env must meet
            :class:`~robot_rl.rl.collector.Collector`'s contract.

    Writes ``out_dir/{checkpoint, learning_curve.json, ppo_config.json}`` (+ ``checkpoint_best``,
    ``validation.json`` with ``validate``). Returns (the final residual policy, learning curve rows {env_steps,
    episodes, success_rate, wall_s, approx_kl, clipfrac, value_loss, policy_loss, residual_sq, std, base_calls,
    base_chunks[, val_success]}), one row per update. Raises ConfigError for bad configs.
    """
    ppo.validate()
    torch.manual_seed(ppo.seed)
    base.freeze()
    bc = base.config
    N, T = ppo.n_envs, ppo.n_steps
    if make_venv is None:
        venv = make_vector_env(task, N, task_kwargs=task_kwargs, **env_kwargs_for(bc, task, task_kwargs, env_kwargs))
    else:
        venv = make_venv(N)
    try:
        rcfg = (residual or ResidualConfig()).derive(bc, task, env_obs_dims(venv))
        if rcfg.head != "gaussian":
            raise ConfigError("residual.head", f"PPO trains the gaussian head, not {rcfg.head!r}", "use head=gaussian")
        pol = residual_for_base(rcfg, base)
    except ConfigError:
        venv.close()
        raise
    opt = make_optimizer(pol, ppo)
    col = Collector(venv, base, pol, seed_start=TRAIN_SEED_START + ppo.seed * 10_000_000, executor_seed=ppo.seed,
                    align_chunks=ppo.align_chunks)
    buf = RolloutBuffer(T, N, rcfg.in_dim, rcfg.action_dim)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = Validation(validate, ppo.val_every, ppo.val_episodes, out, checkpoint_extra)
    n_updates = max(1, ppo.total_env_steps // (N * T))
    curve, steps, t0 = [], 0, time.time()
    bar = progress_bar(total=n_updates * N * T, desc="residual PPO", unit="step", disable=not progress)
    try:
        col.reset()
        base_lrs = [g["lr"] for g in opt.param_groups]
        for update in range(n_updates):
            if ppo.anneal_lr:
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr0 * (1.0 - update / n_updates)
            buf.clear()
            ep_succ = []
            for tr in col.rollout(T):
                buf.add(tr)
                ep_succ.extend(bool(s) for s in tr.success[tr.done])
            steps += N * T
            bar.update(N * T)
            with torch.no_grad():
                last_v = pol.value(col.features())
            adv, ret = gae(buf.reward, buf.value, buf.done(), last_v, ppo.gamma, ppo.gae_lambda)
            with all_cores():  # the env workers wait for the next rollout meanwhile
                stats = ppo_update(pol, opt, ppo, buf.flat({"advantage": adv, "return": ret}))
            row = {"env_steps": steps, "episodes": len(ep_succ),
                   "success_rate": float(np.mean(ep_succ)) if ep_succ else float("nan"),
                   "wall_s": time.time() - t0, **stats, "std": float(pol.actor.log_std.detach().exp().mean()),
                   "base_calls": col.base_calls, "base_chunks": col.base_chunks}
            if val.due(steps, last=update == n_updates - 1):
                row["val_success"] = val.run(pol, steps)
            curve.append(row)
            bar.set_postfix(success=f"{row['success_rate']:.2f}", kl=f"{stats['approx_kl']:.3f}")
            if writer is not None:
                for k, v in row.items():
                    if k != "env_steps":
                        writer.add_scalar(f"residual/{k}", v, steps)
    finally:
        bar.close()
        col.close()
    save_residual(pol, out / "checkpoint", extra={**(checkpoint_extra or {}), "env_steps": steps})
    (out / "learning_curve.json").write_text(json.dumps(curve, indent=1))
    (out / "ppo_config.json").write_text(json.dumps(asdict(ppo), indent=1))
    return pol, curve
