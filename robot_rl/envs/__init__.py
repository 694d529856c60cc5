"""Gymnasium environments: tasks (:mod:`~robot_rl.envs.tasks`), the env (:mod:`~robot_rl.envs.env`, Task +
Controller + Backend), domain randomization, scripted experts, vector envs and episode seed ranges
(:mod:`~robot_rl.envs.vector`).

``from robot_rl.envs import make_env`` is the public entry point."""

from robot_rl.envs.env import make_env

__all__ = ["make_env"]
