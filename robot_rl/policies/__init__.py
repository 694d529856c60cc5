"""Policies: the base-policy API and config (:mod:`~robot_rl.policies.base`), Diffusion Policy
(:mod:`~robot_rl.policies.diffusion`), MLP BC (:mod:`~robot_rl.policies.bc`), image encoders, the normalizer,
safetensors checkpoints (:mod:`~robot_rl.policies.checkpoint`) and policy execution (action-chunk queues and
observation history, :mod:`~robot_rl.policies.execution`).

:func:`make_policy` builds the policy class a :class:`~robot_rl.policies.base.PolicyConfig` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robot_rl.policies.base import BasePolicy, PolicyConfig


def make_policy(config: PolicyConfig, stats: dict | None = None) -> BasePolicy:
    """Construct the policy class named by ``config.kind`` with normalization ``stats`` ({key: {"min", "max"}}
    arrays) or None (identity until loaded from a checkpoint). Raises ConfigError if the config is impossible.

    The policy modules are imported here, on first use, so that importing ``robot_rl.policies.*`` (e.g. the
    normalizer in a ROS node) does not load diffusers."""
    from robot_rl.policies.bc import MLPBCPolicy
    from robot_rl.policies.diffusion import DiffusionPolicy

    config.validate()
    return {"diffusion": DiffusionPolicy, "bc": MLPBCPolicy}[config.kind](config, stats)
