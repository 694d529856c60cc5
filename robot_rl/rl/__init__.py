"""Residual reinforcement learning on top of a frozen base policy.

- :mod:`robot_rl.rl.residual`: the deployable residual (``ResidualConfig``, ``ResidualPolicy``), THE feature
  function (``residual_input``), THE base + residual combination (``combine``), save / load / weight-push helpers.
- :mod:`robot_rl.rl.heads`: actor heads (Gaussian for PPO, tanh for TD3, tanh-Gaussian for SAC) and critics
  (V, a LayerNorm Q ensemble).
- :mod:`robot_rl.rl.collector`: ``Collector`` steps vector envs with base + residual and yields named
  ``Transition`` s (terminated / truncated apart, true next observation), for any learner.
- :mod:`robot_rl.rl.buffers`: ``RolloutBuffer``, preallocated named storage of one on-policy rollout.
- :mod:`robot_rl.rl.ppo`: ``PPOConfig``, ``train_residual`` (PPO + GAE, validation checkpoint), ``ppo_update``.
- :mod:`robot_rl.rl.offpolicy`: what the off-policy learners share: ``OffPolicyConfig``, ``OffPolicyRun``
  (replay sides, n-step windows, warm-up, UTD schedule, curve, validation), ``train_residual_offpolicy`` and the
  resumable state.
- :mod:`robot_rl.rl.td3`: ``TD3Config``, ``TD3Learner`` (residual TD3, ResFiT style).
- :mod:`robot_rl.rl.sac`: ``SACConfig``, ``SACLearner`` (residual SAC with a learned temperature).
- :mod:`robot_rl.rl.replay`: the n-step replay buffer and the demo side relabelled with the frozen base (RLPD).

Nothing is imported here: import the module you need.
"""
