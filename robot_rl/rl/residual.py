"""Residual policy on top of a frozen base (ResiP: Ankile et al. 2024, "From Imitation to Refinement -- Residual
RL for Precise Assembly"; see also Policy Decorator, Yuan et al. 2024, and ResFiT, Ankile et al. 2025).

The residual sees the normalized current observation, optional *fine features* and the normalized base action and
outputs a per-step correction. Fine features are goal-relative observation keys (e.g. ``cube_to_target``, metres)
fed as ``tanh(x / scale)``: min-max normalization over a whole workspace puts a 3 mm error at ~0.02 input units,
which on-policy RL picks up slowly; at ``scale = 1 cm`` the same error is ~0.3 and errors beyond a few
centimetres saturate (the base handles those). Executed action, in the base policy's normalized action space ([-1, 1] per dimension):

    a_exec = clip(a_base + alpha * a_res, -1, 1)

The actor's last layer is zero-initialised, so an untrained residual's mean is exactly 0 and the deterministic
executed action equals the base action.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from robot_rl.errors import ConfigError


@dataclass
class ResidualConfig:
    """obs_keys: low-dim observation keys (same order as the base); obs_dims: key -> dim for obs_keys and
    fine_keys; fine_keys: key -> scale (in the key's units, e.g. metres) of the fine features; action_dim;
    alpha = residual scale."""

    obs_keys: list = field(default_factory=list)
    obs_dims: dict = field(default_factory=dict)
    fine_keys: dict = field(default_factory=dict)
    action_dim: int = 5
    alpha: float = 0.1
    hidden: tuple = (256, 256)
    log_std_init: float = -1.0

    def validate(self) -> None:
        if not self.obs_keys:
            raise ConfigError("residual.obs_keys", "empty", "list the low-dim observation keys")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError("residual.alpha", f"{self.alpha} outside (0, 1]", "use e.g. alpha=0.1")
        for k, sc in self.fine_keys.items():
            if k not in self.obs_dims:
                raise ConfigError(f"residual.fine_keys.{k}", "no dimension given in obs_dims", "add it to obs_dims")
            if not float(sc) > 0:
                raise ConfigError(f"residual.fine_keys.{k}", f"scale {sc} <= 0", "use a positive scale, e.g. 0.01 (m)")
        if self.action_dim < 1:
            raise ConfigError("residual.action_dim", f"{self.action_dim} < 1", "set the base policy's action_dim")

    @property
    def in_dim(self) -> int:
        return sum(self.obs_dims[k] for k in [*self.obs_keys, *self.fine_keys]) + self.action_dim


def combine(base_n: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
    """The executed action, normalized: ``clip(base_n + alpha * residual, -1, 1)``, shape (..., A) float32.

    ``base_n``: the base action in the base policy's normalized action space ([-1, 1] per dimension);
    ``residual``: the residual actor's output. The one place base and residual are combined (training, evaluation,
    the policy server). Source: ResiP (Ankile et al. 2024), executed action = base + alpha * residual.
    """
    return torch.clamp(base_n + alpha * residual, -1.0, 1.0)


def mlp(sizes, act=nn.Tanh) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class ResidualPolicy(nn.Module):
    """Gaussian residual actor + value critic.

    Inputs are ``x = [normalized obs (D,), normalized base action (A,)]`` float32 of shape (B, D + A).
    """

    def __init__(self, config: ResidualConfig):
        super().__init__()
        config.validate()
        self.config = config
        h = list(config.hidden)
        self.actor = mlp([config.in_dim, *h, config.action_dim])
        self.critic = mlp([config.in_dim, *h, 1])
        self.log_std = nn.Parameter(torch.full((config.action_dim,), float(config.log_std_init)))
        nn.init.zeros_(self.actor[-1].weight)
        nn.init.zeros_(self.actor[-1].bias)
        nn.init.orthogonal_(self.critic[-1].weight, gain=1.0)
        nn.init.zeros_(self.critic[-1].bias)

    def dist(self, x: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.actor(x), self.log_std.exp().expand(x.shape[0], -1))

    def features(self, normalizer, obs: dict, base_action_n) -> torch.Tensor:
        """Residual input (B, in_dim) float32 from raw batched obs (B, d_k) and the normalized base action (B, A)."""
        return residual_input(normalizer, obs, self.config.obs_keys, base_action_n, self.config.fine_keys)

    @torch.no_grad()
    def act(self, normalizer, obs: dict, base_action_n) -> torch.Tensor:
        """Deterministic executed normalized action (B, A): ``clip(base + alpha * mean_residual, -1, 1)``."""
        return self.combine(torch.as_tensor(base_action_n, dtype=torch.float32),
                            self.mean_residual(self.features(normalizer, obs, base_action_n)))

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).squeeze(-1)

    def mean_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic residual (B, A), residual units (scaled by ``alpha`` in :func:`combine`)."""
        return self.actor(x)

    def combine(self, base_n: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Executed normalized action: :func:`combine` with this residual's ``alpha``."""
        return combine(base_n, res, self.config.alpha)


def residual_input(normalizer, obs: dict, keys: list, base_action_n: np.ndarray | torch.Tensor,
                   fine_keys: dict | None = None) -> torch.Tensor:
    """Build the residual input (B, D + F + A) from raw batched obs (B, d_k): base-normalized ``keys``, then
    ``tanh(obs[k] / scale)`` for each fine key, then the normalized base action."""
    parts = [normalizer.normalize(k, torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32)) for k in keys]
    for k, sc in (fine_keys or {}).items():
        if k not in obs:
            raise ConfigError(f"residual.fine_keys.{k}", "not in the observation", "use keys the env provides")
        parts.append(torch.tanh(torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32) / float(sc)))
    parts.append(torch.as_tensor(base_action_n, dtype=torch.float32))
    return torch.cat(parts, dim=-1)


RESIDUAL_FORMAT = "robot_rl.residual"


def residual_config_dict(policy: ResidualPolicy) -> dict:
    """The residual's config as a JSON-able dict (what ``config.json`` and the server's weight push carry)."""
    d = asdict(policy.config)
    d["hidden"] = list(d["hidden"])
    return d


def build_residual(cfg: dict) -> ResidualPolicy:
    """An untrained :class:`ResidualPolicy` from a config dict (as saved in a residual checkpoint or sent with a
    weight push). Raises ConfigError naming the field for unknown fields or values of the wrong type."""
    if not isinstance(cfg, dict):
        raise ConfigError("residual.config", "not a map", "send ResidualConfig fields")
    names = set(ResidualConfig.__dataclass_fields__)
    bad = sorted(set(cfg) - names)
    if bad:
        raise ConfigError(f"residual.{bad[0]}", "unknown residual config field", f"use only {sorted(names)}")
    try:
        return ResidualPolicy(ResidualConfig(**{**cfg, "hidden": tuple(cfg.get("hidden", (256, 256)))}))
    except ConfigError:
        raise
    except Exception as e:  # wrong types inside the config
        raise ConfigError("residual.config", f"cannot build the residual ({type(e).__name__}: {e})"[:300],
                          "use the config saved with the residual checkpoint") from None


def check_compatible(residual_config: ResidualConfig, base_config) -> None:
    """Raise ConfigError unless the residual was made for this base: same action dim and low-dim obs keys."""
    rc, bc = residual_config, base_config
    if rc.action_dim != bc.action_dim:
        raise ConfigError("residual.action_dim", f"{rc.action_dim} != base action_dim {bc.action_dim}",
                          "use a residual trained on this base checkpoint")
    if list(rc.obs_keys) != list(bc.obs_keys):
        raise ConfigError("residual.obs_keys", f"{list(rc.obs_keys)} != base obs_keys {list(bc.obs_keys)}",
                          "use a residual trained on this base checkpoint")


def freeze(policy: ResidualPolicy) -> ResidualPolicy:
    """``eval()`` and ``requires_grad=False`` on every parameter; returns the policy."""
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy


def save_residual(policy: ResidualPolicy, path_dir, extra: dict | None = None):
    """Save as ``model.safetensors`` + ``config.json`` (no pickle). ``extra`` e.g. the base checkpoint path."""
    from robot_rl.policies.checkpoint import save_module_safetensors

    return save_module_safetensors(policy, path_dir, residual_config_dict(policy), format_name=RESIDUAL_FORMAT,
                                   extra=extra)


def residual_from_tensors(cfg: dict, tensors: dict, base=None) -> ResidualPolicy:
    """A frozen residual from a config dict and a {name: tensor} state dict (a weight push), checked against
    ``base`` when given. Raises ConfigError for bad configs, mismatched tensors or a residual of another base."""
    from robot_rl.policies.checkpoint import load_state_strict

    pol = build_residual(cfg)
    if base is not None:
        check_compatible(pol.config, base.config)
    load_state_strict(pol, tensors)
    return freeze(pol)


def load_residual(path, base=None) -> ResidualPolicy:
    """Load a frozen residual checkpoint directory; with ``base`` given, check it matches the base's obs keys and
    action dim. Raises ConfigError for pickle/corrupt/mismatched checkpoints."""
    from robot_rl.policies.checkpoint import load_module_safetensors

    pol, _ = load_module_safetensors(path, build_residual, format_name=RESIDUAL_FORMAT)
    if base is not None:
        check_compatible(pol.config, base.config)
    return freeze(pol)
