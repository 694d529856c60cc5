"""Behaviour-cloning baseline: an MLP from the encoded observation history to the whole T-step normalized action
sequence, trained with MSE (the "MLP BC" row of Chi et al. 2023's comparisons; same obs encoder and chunking)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from robot_rl.errors import ConfigError
from robot_rl.policies.base import BasePolicy, PolicyConfig


class MLPBCPolicy(BasePolicy):
    """Deterministic MLP policy: cond (B, cond_dim) -> Linear/Mish x len(bc_hidden) -> Linear -> (B, T, A).

    ``predict_*`` with ``num_samples`` = K repeats the single prediction K times; ``init_noise`` is refused
    (ConfigError) because there is no noise to steer.
    """

    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__(config, stats)
        c = self.config
        sizes = [c.cond_dim, *c.bc_hidden]
        layers = [m for i, o in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(i, o), nn.Mish())]
        self.mlp = nn.Sequential(*layers, nn.Linear(sizes[-1], c.horizon * c.action_dim))

    def _sample(self, cond, noise, generator):
        if noise is not None:
            raise ConfigError("init_noise", "the BC policy is deterministic and has no initial noise",
                              "pass init_noise=None, or use kind='diffusion' for noise-space steering")
        return self.mlp(cond).reshape(cond.shape[0], self.config.horizon, self.config.action_dim)

    def _loss(self, cond, naction):
        return F.mse_loss(self.mlp(cond).reshape(naction.shape), naction)
