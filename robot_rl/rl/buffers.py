"""Preallocated, named storage for on-policy rollouts (filled from :class:`robot_rl.rl.collector.Transition`)."""

from __future__ import annotations

import torch

from robot_rl.errors import ConfigError


class RolloutBuffer:
    """One rollout of ``n_steps`` steps x ``n_envs`` envs, preallocated as (T, N, ...) tensors.

    Fields (float32 unless noted): ``x`` (T, N, F) residual features, ``base_action`` (T, N, A) normalized base
    action, ``residual`` (T, N, A), ``log_prob`` (T, N), ``value`` (T, N), ``reward`` (T, N), ``terminated`` and
    ``truncated`` (T, N) bool. :meth:`add` writes row ``t`` from a Transition (which must carry ``log_prob`` and
    ``value``), :meth:`clear` starts a new rollout without reallocating.
    """

    def __init__(self, n_steps: int, n_envs: int, feature_dim: int, action_dim: int):
        T, N = n_steps, n_envs
        self.n_steps, self.n_envs = T, N
        self.x = torch.zeros(T, N, feature_dim)
        self.base_action = torch.zeros(T, N, action_dim)
        self.residual = torch.zeros(T, N, action_dim)
        self.log_prob = torch.zeros(T, N)
        self.value = torch.zeros(T, N)
        self.reward = torch.zeros(T, N)
        self.terminated = torch.zeros(T, N, dtype=torch.bool)
        self.truncated = torch.zeros(T, N, dtype=torch.bool)
        self.t = 0

    def clear(self) -> None:
        self.t = 0

    @property
    def full(self) -> bool:
        return self.t == self.n_steps

    def add(self, tr) -> None:
        """Store one :class:`~robot_rl.rl.collector.Transition` at the next row. Raises ConfigError when the
        buffer is full or the transition has no log-prob / value (an actor without them cannot be trained by PPO)."""
        if self.full:
            raise ConfigError("rollout_buffer", f"full ({self.n_steps} steps)", "clear() it before the next rollout")
        if tr.log_prob is None or tr.value is None:
            raise ConfigError("residual.head", "the actor gives no log-prob or value",
                              "use the gaussian head (ResidualPolicy.explore) for PPO")
        t = self.t
        self.x[t] = tr.x
        self.base_action[t] = tr.base_action
        self.residual[t] = tr.residual
        self.log_prob[t] = tr.log_prob
        self.value[t] = tr.value
        self.reward[t] = torch.as_tensor(tr.reward)
        self.terminated[t] = torch.as_tensor(tr.terminated)
        self.truncated[t] = torch.as_tensor(tr.truncated)
        self.t += 1

    def done(self) -> torch.Tensor:
        """(T, N) float32: 1 where the episode ended at that step (terminated or truncated)."""
        return (self.terminated | self.truncated).float()

    def flat(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``x``, ``residual``, ``log_prob`` and the named (T, N, ...) tensors in ``extra`` (e.g. advantages),
        reshaped to (T * N, ...) in time-major order (row ``t * N + i`` = step t of env i)."""
        n = self.n_steps * self.n_envs
        parts = {"x": self.x, "residual": self.residual, "log_prob": self.log_prob, **(extra or {})}
        return {k: v.reshape(n, *v.shape[2:]) for k, v in parts.items()}
