"""Transition collector for residual RL: N vector envs driven by a frozen chunking base plus a residual actor.

Per control step the collector takes the next base action of every env from one
:class:`~robot_rl.policies.execution.ChunkExecutor` (one batched ``predict_chunk`` for the envs that need a new
chunk), builds the residual features, asks the actor for a residual, executes
``combine(base, residual)`` (:func:`robot_rl.rl.residual.combine`) and returns one named :class:`Transition`.
Ended episodes are reset with their own seeds from a :class:`~robot_rl.envs.vector.SeedSchedule` (the vector env
runs with autoreset disabled), AFTER their final observation has been put into the transition's ``next_obs``.

The interface knows nothing of the learner: PPO (:mod:`robot_rl.rl.ppo`) stores transitions in a rollout buffer,
TD3 (:mod:`robot_rl.rl.td3`) stores ``(x, residual, reward, terminated, truncated, next_x)`` in a replay buffer
(:mod:`robot_rl.rl.replay`). With ``next_features=True`` the collector also gives ``next_x``, the residual features
of the true next observation with the base action the base executes there (for an ended episode: the action it
would have executed had the episode gone on, :meth:`~robot_rl.policies.execution.ChunkExecutor.final_actions`),
which an off-policy critic bootstraps from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from robot_rl.envs.vector import SeedSchedule, reset_some
from robot_rl.policies.execution import ChunkExecutor


def env_obs_dims(venv) -> dict[str, int]:
    """{observation key: flat dimension} of a vector env's Dict observation space (what ``ResidualConfig.derive``
    takes)."""
    return {k: int(np.prod(s.shape)) for k, s in venv.single_observation_space.spaces.items()}


@dataclass
class Transition:
    """One step of N envs (row i = env i). Tensors are float32 torch on the CPU, arrays numpy.

    Attributes:
        obs: raw observation at t, ``{key: (N, ...)}`` (what the base and the features saw).
        x: residual features at t, (N, F) (:meth:`robot_rl.rl.residual.ResidualPolicy.features`).
        base_action: the base action at t, (N, A), normalized ([-1, 1] per dimension).
        residual: the actor's residual, (N, A), residual units.
        action: the executed action, normalized, (N, A): ``combine(base_action, residual)``.
        log_prob: (N,) log-probability of ``residual`` under the actor, or None when the actor gives none.
        value: (N,) the critic's V(x), or None.
        reward: (N,) float32, the env reward of this step.
        terminated: (N,) bool, the episode ended in a terminal state (success or failure).
        truncated: (N,) bool, the episode hit its time limit (not a terminal state of the MDP).
        next_obs: TRUE observation after the step, ``{key: (N, ...)}``: for ended episodes the final observation,
            not the first observation of the next episode (which is the collector's :attr:`Collector.obs`).
        success: (N,) bool, the env's ``info["success"]`` at this step.
        episode_seed: (N,) int64, the reset seed of the episode this step belongs to.
        episode_length: (N,) int64, steps of that episode so far, this one included.
        next_x: (N, F) residual features of ``next_obs`` with the next base action, or None (collector built
            without ``next_features``).
    """

    obs: dict
    x: torch.Tensor
    base_action: torch.Tensor
    residual: torch.Tensor
    action: torch.Tensor
    log_prob: torch.Tensor | None
    value: torch.Tensor | None
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_obs: dict
    success: np.ndarray
    episode_seed: np.ndarray
    episode_length: np.ndarray
    next_x: torch.Tensor | None = None

    @property
    def done(self) -> np.ndarray:
        """(N,) bool: the episode ended at this step (terminated or truncated)."""
        return np.logical_or(self.terminated, self.truncated)


class Collector:
    """Steps ``venv`` with the frozen ``base`` plus a residual actor and yields :class:`Transition` s.

    Args:
        venv: a Gymnasium vector env with autoreset disabled that accepts per-env reset seeds and
            ``options={"reset_mask": ...}`` (:func:`robot_rl.envs.vector.make_vector_env`); Dict observations
            holding the base's obs keys and the residual's fine keys; ``info["success"]`` per env.
        base: the frozen base policy (``.config``, ``.normalizer``, ``.predict_chunk``; see ChunkExecutor).
        policy: the residual: ``.features(normalizer, obs, base_n) -> (N, F)`` and ``.combine(base_n, res)``
            (a :class:`~robot_rl.rl.residual.ResidualPolicy`).
        seed_start: first episode seed; episodes take ``seed_start, seed_start + 1, ...`` in reset order.
        executor_seed: seed of the base's sampling generator (ChunkExecutor ``seed``).
        align_chunks: ChunkExecutor ``align_chunks``.
        explore: ``x (N, F) -> ActorStep(residual, log_prob, value)``, the exploring actor; default
            ``policy.explore``. Called without gradients.
        next_features: also compute :attr:`Transition.next_x` (one extra batched base call when episodes end
            with an empty chunk queue).

    Call :meth:`reset` once, then :meth:`step` (or :meth:`rollout`); :meth:`close` closes ``venv``.
    """

    def __init__(self, venv, base, policy, *, seed_start: int, executor_seed: int = 0, align_chunks: bool = False,
                 explore: Callable | None = None, next_features: bool = False):
        self.venv, self.base, self.policy = venv, base, policy
        self.next_features = next_features
        self.explore = policy.explore if explore is None else explore
        self.normalizer = base.normalizer
        self.n_envs = int(venv.num_envs)
        self.seeds = SeedSchedule(seed_start)
        self.executor = ChunkExecutor(base, self.n_envs, seed=executor_seed, align_chunks=align_chunks)
        self.obs: dict | None = None  # current raw observation (N, ...) per key
        self.episode_seed = np.full(self.n_envs, -1, dtype=np.int64)
        self.episode_length = np.zeros(self.n_envs, dtype=np.int64)
        # image features (N, F_img) of self.obs for a residual that reads images, kept from the last step's next_x
        # (the encoder runs once per frame, not twice); None: not known
        self.obs_images: torch.Tensor | None = None

    def reset(self) -> dict:
        """Reset every env with a fresh seed; returns the observation."""
        mask = np.ones(self.n_envs, dtype=bool)
        self._start(mask, None)
        return self.obs

    def _start(self, mask: np.ndarray, obs: dict | None) -> None:
        seeds = [self.seeds.take() if m else None for m in mask]
        self.obs = reset_some(self.venv, mask, seeds, obs)
        self.obs_images = None
        self.executor.reset(mask, self.obs)
        self.episode_seed[mask] = [s for s in seeds if s is not None]
        self.episode_length[mask] = 0

    def base_action(self, consume: bool = True) -> torch.Tensor:
        """The next base action of every env, (N, A) normalized; ``consume=False`` peeks (the next :meth:`step`
        executes the same action)."""
        raw = self.executor.actions() if consume else self.executor.peek()
        return self.normalizer.normalize("action", torch.as_tensor(raw))

    def features(self) -> torch.Tensor:
        """Residual features (N, F) of the current observation with the next base action (not consumed), e.g.
        to bootstrap a value at the end of a rollout."""
        return self.policy.features(self.normalizer, self.obs, self.base_action(consume=False))

    def step(self) -> Transition:
        """One control step of every env; ended episodes are reset (with new seeds) before returning."""
        if self.obs is None:
            self.reset()
        obs = self.obs
        base_n = self.base_action()
        x = self.policy.features(self.normalizer, obs, base_n, image_features=self.obs_images)
        out = self.explore(x)
        action = self.policy.combine(base_n, out.residual)
        next_obs, rew, term, trunc, info = self.venv.step(self.normalizer.unnormalize("action", action).numpy())
        term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
        done = np.logical_or(term, trunc)
        self.episode_length += 1
        tr = Transition(obs=obs, x=x, base_action=base_n, residual=out.residual, action=action,
                        log_prob=out.log_prob, value=out.value, reward=np.asarray(rew, dtype=np.float32),
                        terminated=term, truncated=trunc, next_obs=next_obs,
                        success=np.asarray(info.get("success", np.zeros(self.n_envs)), dtype=bool),
                        episode_seed=self.episode_seed.copy(), episode_length=self.episode_length.copy())
        final_base = self.executor.final_actions(done, next_obs) if self.next_features else None
        if done.any():
            self._start(done, next_obs)  # reset_some returns a new dict: next_obs keeps the final observations
        else:
            self.obs, self.obs_images = next_obs, None
        self.executor.observe(self.obs, ~done)
        if self.next_features:  # peek: the same batched call the next step's base_action() would make
            nb = self.executor.peek()
            nb[done] = final_base[done]
            nb_n = self.normalizer.normalize("action", torch.as_tensor(nb))
            images = self.policy.encode_images(next_obs) if getattr(self.policy.config, "image_keys", None) else None
            tr.next_x = self.policy.features(self.normalizer, next_obs, nb_n, image_features=images)
            if images is not None and not done.any():
                self.obs_images = images  # self.obs is next_obs
        return tr

    def rollout(self, n_steps: int) -> Iterator[Transition]:
        """``n_steps`` consecutive :meth:`step` s."""
        for _ in range(n_steps):
            yield self.step()

    @property
    def base_calls(self) -> int:
        """Batched ``predict_chunk`` calls of the base so far."""
        return self.executor.calls

    @property
    def base_chunks(self) -> int:
        """Env chunks the base predicted so far (sum of the batch sizes of :attr:`base_calls`)."""
        return self.executor.chunks

    def close(self) -> None:
        self.venv.close()
