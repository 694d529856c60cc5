"""Off-policy residual RL with SAC over a frozen chunking base: soft actor-critic (Haarnoja et al. 2018, "Soft
Actor-Critic Algorithms and Applications") with a REDQ ensemble of LayerNorm critics and RLPD's demonstration replay
(Ball et al. 2023), the learner of SERL / HIL-SERL (Luo et al. 2024), here on a residual.

This file is SAC's settings, update rule and exploration; the replay, UTD schedule, warm-up, training loop and
resumable state it shares with TD3 are :mod:`robot_rl.rl.offpolicy`.

- Actor: the deployable :class:`~robot_rl.rl.residual.ResidualPolicy` with the ``tanh_gaussian`` head
  (:class:`~robot_rl.rl.heads.TanhGaussianHead`: ``res = tanh(u)``, ``u ~ N(mu(x), sigma(x))``; executed as
  ``clip(base + alpha * res, -1, 1)``; deployed and evaluated with the deterministic ``tanh(mu(x))``, which is 0
  before training: the untrained residual is the base).
- Critic: a :class:`~robot_rl.rl.heads.QEnsemble` of K LayerNorm heads; no target actor (SAC's target action is a
  fresh sample of the current actor).
- Target (SAC; REDQ's min over a random ``n_target_critics`` of K): ``y = R + discount * (min_{k in M}
  Q'_k(x', a') - T log pi(a'|x'))``, ``a' ~ pi(.|x')``; the entropy term only with ``backup_entropy`` (RLPD's
  default). ``R`` and ``discount`` are n-step (truncations bootstrapped, terminations not).
- Actor, every ``policy_delay`` critic updates after ``critic_warmup_updates``: minimise
  ``E[T log pi(a|x) - mean_k Q_k(x, a)]``, ``a ~ pi(.|x)`` reparameterised.
- Temperature ``T`` (learned, SAC's automatic tuning): minimise ``-log T * (log pi(a|x) + target_entropy)``, so the
  policy's entropy is held near ``target_entropy`` (default ``-A / 2``, RLPD).
- Exploration after warm-up: a sample of the actor itself (no added noise).

One process only: the actor-learner split and ``robot-rl learn`` drive TD3, whose actors add Gaussian noise to the
served deterministic residual (:mod:`robot_rl.serve.learner`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from robot_rl.errors import ConfigError
from robot_rl.rl.offpolicy import OffPolicyConfig, OffPolicyLearner, polyak, td_target
from robot_rl.rl.residual import ResidualPolicy


@dataclass
class SACConfig(OffPolicyConfig):
    """SAC hyper-parameters: the shared off-policy ones (:class:`~robot_rl.rl.offpolicy.OffPolicyConfig`) plus the
    entropy temperature's, each default with its source. The actor's initial std is ``residual.log_std_init``."""

    algo = "sac"
    head = "tanh_gaussian"

    # initial temperature T. RLPD: 1.0 with D4RL's dense per-step rewards; here the reward is one sparse 1 on the
    # success step, which a bonus of 1.0 per step would outweigh a hundredfold
    init_temperature: float = 0.01
    lr_temperature: float = 3e-4  # Adam on log T (SAC, RLPD: 3e-4)
    # entropy the temperature holds the policy at, nats; None: -A / 2 (RLPD; SAC's original -A)
    target_entropy: float | None = None
    backup_entropy: bool = True  # the target subtracts T log pi(a'|x') (SAC, RLPD: True)

    def explore(self, policy: ResidualPolicy, x: torch.Tensor, env_steps: int) -> torch.Tensor:
        """A sample of the tanh-Gaussian actor (B, A) in (-1, 1), residual units."""
        return policy.explore(x).residual

    def make_learner(self, policy: ResidualPolicy) -> SACLearner:
        return SACLearner(policy, self)

    def entropy_target(self, action_dim: int) -> float:
        """``target_entropy``, or -action_dim / 2 when it is None."""
        return -action_dim / 2.0 if self.target_entropy is None else float(self.target_entropy)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        super().validate()
        for k in ("init_temperature", "lr_temperature"):
            v = getattr(self, k)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"sac.{k}", f"{v} is not a positive number", "use e.g. 0.01 / 3e-4")
        if self.target_entropy is not None and not math.isfinite(self.target_entropy):
            raise ConfigError("sac.target_entropy", f"{self.target_entropy} is not finite",
                              "use a number of nats, or null for -action_dim / 2")


class LogTemperature(nn.Module):
    """SAC's learned temperature, kept as ``log T`` (a scalar parameter) so that it stays positive."""

    def __init__(self, init: float):
        super().__init__()
        self.log_value = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return self.log_value.exp()


class SACLearner(OffPolicyLearner):
    """Residual SAC (module doc) on :class:`~robot_rl.rl.offpolicy.OffPolicyLearner`'s critics and optimisers
    (same arguments and errors; ``tanh_gaussian`` head), with no target actor, plus the learned temperature and
    its own Adam."""

    def __init__(self, policy: ResidualPolicy, cfg: SACConfig):
        super().__init__(policy, cfg)
        self.temperature = LogTemperature(cfg.init_temperature)
        self.target_entropy = cfg.entropy_target(policy.config.action_dim)
        self.modules["temperature"] = self.temperature
        self.optimizers["opt_temperature"] = torch.optim.Adam(self.temperature.parameters(), lr=cfg.lr_temperature)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One critic update (and, when due, one actor and one temperature update), then the critic targets'
        Polyak step, on a batch of :data:`~robot_rl.rl.replay.FIELDS`. Returns {critic_loss, q_mean, target_mean[,
        actor_loss, temperature, entropy]} (entropy: the batch's mean ``-log pi``, nats)."""
        cfg = self.cfg
        x, nx = batch["x"], batch["next_x"]
        with torch.no_grad():
            a2, logp2 = self.policy.actor.sample(nx)
            next_v = self.target_min_q(nx, a2)
            if cfg.backup_entropy:
                next_v = next_v - self.temperature() * logp2
            y = td_target(batch["reward"], batch["discount"], next_v)
        out = self.critic_step(batch, y)
        if self.actor_due():
            a, logp = self.policy.actor.sample(x)
            t = self.temperature().detach()
            actor_loss = (t * logp - self.mean_q(x, a)).mean()
            self.clipped_step("opt_actor", actor_loss, self.policy.actor.parameters())
            temp_loss = -(self.temperature.log_value * (logp.detach() + self.target_entropy)).mean()
            self.clipped_step("opt_temperature", temp_loss, self.temperature.parameters())
            self.actor_updates += 1
            out.update(actor_loss=float(actor_loss.detach()), temperature=float(self.temperature().detach()),
                       entropy=float(-logp.detach().mean()))
        polyak(self.critic_target, self.critic, cfg.tau)
        return out
