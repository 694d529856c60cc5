"""Off-policy residual RL with TD3 over a frozen chunking base, ResFiT style (Ankile et al. 2025, "Residual
Off-Policy RL for Finetuning Behavior Cloning Policies"), with RLPD's demonstration replay (Ball et al. 2023).

This file is TD3's settings, update rule and exploration; the replay, UTD schedule, warm-up, training loop and
resumable state it shares with SAC are :mod:`robot_rl.rl.offpolicy`.

- Actor: the deployable :class:`~robot_rl.rl.residual.ResidualPolicy` with the ``tanh`` head (residual in
  [-1, 1], executed as ``clip(base + alpha * residual, -1, 1)``, last layer zero: the untrained residual is the
  base). Critic: a :class:`~robot_rl.rl.heads.QEnsemble` of K LayerNorm heads in one batched matmul per layer.
- Target (REDQ, Chen et al. 2021; TD3, Fujimoto et al. 2018): ``y = R + discount * min_{k in M} Q'_k(x', a')``
  with ``M`` a random subset of ``n_target_critics`` heads and ``a' = clip(pi'(x') + clip(eps, -c, c), -1, 1)``,
  ``eps ~ N(0, target_noise)`` (target-policy smoothing); ``R`` and ``discount`` are n-step
  (:mod:`robot_rl.rl.replay`: truncations bootstrapped, terminations not).
- Updates: every head regresses on the same ``y``; the actor maximises the mean over heads of ``Q_k(x, pi(x))``
  every ``policy_delay`` critic updates (delayed actor updates), after ``critic_warmup_updates`` critic-only
  updates; Polyak-averaged targets (``tau``); global gradient-norm clipping per optimiser.
- Exploration after warm-up: ``clip(pi(x) + N(0, explore_std), -1, 1)``, residual units (optionally decaying).
- Actor-learner split and learning on a robot: :mod:`robot_rl.serve.learner` (TD3 only: its actors add this
  Gaussian noise to the served residual).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from robot_rl.errors import ConfigError
from robot_rl.rl.offpolicy import OffPolicyConfig, OffPolicyLearner, polyak, td_target
from robot_rl.rl.residual import ResidualPolicy


@dataclass
class TD3Config(OffPolicyConfig):
    """TD3 hyper-parameters: the shared off-policy ones (:class:`~robot_rl.rl.offpolicy.OffPolicyConfig`) plus
    target-policy smoothing, Gaussian exploration and the actor-learner split, each default with its source."""

    algo = "td3"
    head = "tanh"

    target_noise: float = 0.2  # std of the target-policy smoothing noise, residual units (TD3: 0.2)
    target_noise_clip: float = 0.5  # clip of that noise (TD3: 0.5)
    # Gaussian exploration noise, residual units: 0.5 = 0.05 action units at alpha 0.1, the top of ResFiT's 0.025-0.05
    # action units (0.1 explored too little to move a 4 mm placement: see the README's TD3 section)
    explore_std: float = 0.5
    # linear decay of explore_std to explore_std_final over this many env steps after learning_starts (DrQ-v2,
    # Yarats et al. 2021: linear(1.0, 0.1, 500 k) frames); 0: constant explore_std
    explore_decay_steps: int = 0
    explore_std_final: float = 0.1
    # actor-learner split (robot_rl.serve.learner): actor processes sharing the n_envs (0: single process; SERL
    # and ResFiT's real-robot runs use separate actor and learner processes)
    actors: int = 0
    push_every: int = 50  # actor updates between weight pushes to the actors (SERL: steps_per_update 50)
    max_backlog: int = 256  # rows the learner may fall behind before actors wait (keeps the UTD ratio)

    def explore_std_at(self, env_steps: int) -> float:
        """Exploration noise std (residual units) after ``env_steps`` env steps: ``explore_std``, or with
        ``explore_decay_steps`` > 0 the linear schedule from it at ``learning_starts`` to ``explore_std_final``."""
        if self.explore_decay_steps <= 0:
            return float(self.explore_std)
        f = min(1.0, max(0.0, (env_steps - self.learning_starts) / self.explore_decay_steps))
        return float(self.explore_std + f * (self.explore_std_final - self.explore_std))

    def explore(self, policy: ResidualPolicy, x: torch.Tensor, env_steps: int) -> torch.Tensor:
        """``clip(pi(x) + N(0, explore_std_at(env_steps)), -1, 1)`` (B, A), residual units."""
        shape = (x.shape[0], policy.config.action_dim)
        return (policy.actor(x) + torch.randn(shape) * self.explore_std_at(env_steps)).clamp(-1.0, 1.0)

    def make_learner(self, policy: ResidualPolicy) -> TD3Learner:
        return TD3Learner(policy, self)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        super().validate()
        for k in ("target_noise", "target_noise_clip", "explore_std", "explore_std_final", "explore_decay_steps"):
            if getattr(self, k) < 0:
                raise ConfigError(f"td3.{k}", f"{getattr(self, k)} < 0", "use 0 (off) or a positive value")
        if self.actors < 0 or (self.actors and self.n_envs % self.actors):
            raise ConfigError("td3.actors", f"{self.actors} is negative or does not divide n_envs ({self.n_envs})",
                              "use 0 (single process) or a divisor of td3.n_envs")
        for k in ("push_every", "max_backlog"):
            if getattr(self, k) < 1:
                raise ConfigError(f"td3.{k}", f"{getattr(self, k)} < 1", "use a positive integer")


class TD3Learner(OffPolicyLearner):
    """Residual TD3 (module doc): the shared critics and optimisers of
    :class:`~robot_rl.rl.offpolicy.OffPolicyLearner` (same arguments and errors; ``tanh`` head) plus a Polyak
    target copy of the actor, for the smoothed target action."""

    def __init__(self, policy: ResidualPolicy, cfg: TD3Config):
        super().__init__(policy, cfg)
        self.actor_target = copy.deepcopy(policy).requires_grad_(False)
        self.modules["actor_target"] = self.actor_target

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One critic update (and, when due, one actor update + target Polyak step) on a batch of
        :data:`~robot_rl.rl.replay.FIELDS`. Returns {critic_loss, q_mean, target_mean[, actor_loss]}."""
        cfg = self.cfg
        x, res, nx = batch["x"], batch["residual"], batch["next_x"]
        with torch.no_grad():
            eps = (torch.randn_like(res) * cfg.target_noise).clamp(-cfg.target_noise_clip, cfg.target_noise_clip)
            a2 = (self.actor_target.actor(nx) + eps).clamp(-1.0, 1.0)
            y = td_target(batch["reward"], batch["discount"], self.target_min_q(nx, a2))
        out = self.critic_step(batch, y)
        if self.actor_due():
            actor_loss = -self.mean_q(x, self.policy.actor(x)).mean()
            self.clipped_step("opt_actor", actor_loss, self.policy.actor.parameters())
            self.actor_updates += 1
            out["actor_loss"] = float(actor_loss.detach())
            polyak(self.actor_target.actor, self.policy.actor, cfg.tau)  # not the frozen image-encoder copy
        polyak(self.critic_target, self.critic, cfg.tau)
        return out
