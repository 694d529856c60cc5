"""What the off-policy residual learners share (:mod:`robot_rl.rl.td3`, :mod:`robot_rl.rl.sac`): the settings they
have in common, the run (both replay sides, n-step windows, exploration warm-up, UTD schedule, curve, validation), the
single-process training loop and the resumable state. Each algorithm's own file holds its config subclass, its
update rule and its exploration; this one holds no update rule.

- Data: ``utd_ratio`` gradient updates per env transition (RLPD's definition); each batch half online, half
  demonstrations (``demo_ratio``; :func:`~robot_rl.rl.replay.sample_mixed`), the demos relabelled with the frozen
  base's actions (:func:`~robot_rl.rl.replay.demo_buffer`); n-step returns with truncations bootstrapped and
  terminations not (:mod:`robot_rl.rl.replay`).
- Observations: state, or for a base that reads cameras, its low-dim keys plus the features of a frozen copy of
  the base's image encoder (:meth:`~robot_rl.rl.residual.ResidualPolicy.encode_images`; no object poses). The
  replay stores features, not frames (2 x 64 floats a step instead of two 96x96 images), and no encoder is trained.
- Exploration: the first ``learning_starts`` env steps execute base + uniform noise of ``warmup_noise`` residual
  units (ResFiT's ``use_base_policy_for_warmup``); after that the algorithm's own rule
  (:meth:`OffPolicyConfig.explore`).

Resume: ``out_dir/state`` (written every ``checkpoint_every`` env steps and at the end) holds the actor, critics,
their targets, the optimisers, the online replay buffer, the RNG states and the counters in one safetensors file
(+ JSON), no pickle. ``train_residual_offpolicy(..., resume=True)`` continues from it: in-flight episodes are not in
a checkpoint (the simulators' states are not saved), so the resumed run starts fresh episodes with the next seeds of
the same seed schedule; everything learned and every stored transition carries over.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from robot_rl.envs.vector import TRAIN_SEED_START, all_cores, env_kwargs_for, make_vector_env
from robot_rl.errors import ConfigError
from robot_rl.progress import progress_bar
from robot_rl.rl.collector import Collector, env_obs_dims
from robot_rl.rl.heads import QEnsemble
from robot_rl.rl.replay import NStep, ReplayBuffer, demo_buffer, sample_mixed
from robot_rl.rl.residual import ActorStep, ResidualConfig, ResidualPolicy, residual_for_base, save_residual
from robot_rl.rl.validation import Validation

STATE_FORMAT = "robot_rl.td3_state"  # the format name of every off-policy state (kept from when TD3 was the only one)
# the learning-curve fields every off-policy update reports; any other key an update returns (SAC's temperature)
# becomes a curve column of its own
STANDARD_STATS = ("critic_loss", "q_mean", "target_mean", "actor_loss")


@dataclass
class OffPolicyConfig:
    """Settings every off-policy residual learner shares, each default with its source (the residual model's fields
    are in :class:`~robot_rl.rl.residual.ResidualConfig`, whose ``alpha`` 0.1 is ResFiT's residual scale). Use a
    subclass: :class:`~robot_rl.rl.td3.TD3Config` or :class:`~robot_rl.rl.sac.SACConfig`.

    ResFiT's defaults were tuned for GPU learners; the presets of :mod:`robot_rl.pipeline` set smaller critics and a
    lower UTD so that a run fits a 2-core CPU, and say so.
    """

    algo: ClassVar[str] = ""  # the config section and ``--algo`` name
    head: ClassVar[str] = ""  # the residual actor head it trains (robot_rl.rl.heads)

    total_env_steps: int = 100_000  # env transitions, summed over all envs
    n_envs: int = 8  # parallel envs (one subprocess each)
    batch_size: int = 256  # ResFiT / RLPD
    # gradient updates per env transition (RLPD's UTD). ResFiT: 4 updates per vector step of its envs.
    utd_ratio: float = 0.5
    n_step: int = 3  # n-step returns (ResFiT: 3)
    gamma: float = 0.99  # discount (ResFiT: 0.99-0.995)
    n_critics: int = 10  # Q ensemble size K (REDQ, ResFiT: 10)
    n_target_critics: int = 2  # heads in the target's min (REDQ: a random 2 of K)
    critic_hidden: tuple = (256, 256)  # widths of each Q head (LayerNorm + ReLU after each)
    # Adam. ResFiT: 1e-6 to 5e-6 over its GPU-sized update counts; with the ~25 k updates a CPU run affords, 1e-6
    # left the TD3 residual at the base (place 4 mm: 0.505 -> 0.55 at 40 k steps), 3e-5 gave 0.78 (README, issue 16)
    lr_actor: float = 3e-5
    lr_critic: float = 1e-4  # Adam (ResFiT: 1e-4)
    tau: float = 0.005  # Polyak rate of the target networks (TD3, ResFiT: 0.005)
    policy_delay: int = 2  # critic updates per actor update (TD3: 2)
    learning_starts: int = 5_000  # env steps of warm-up exploration before any update (ResFiT: 10 000)
    warmup_noise: float = 0.5  # warm-up residual ~ U(-w, w), residual units (ResFiT: 0.2; here as wide as explore_std)
    critic_warmup_updates: int = 2_000  # critic-only updates before the actor trains (ResFiT: 10 000)
    max_grad_norm: float = 1.0  # global gradient-norm clip of each optimiser step
    demo_ratio: float = 0.5  # share of each batch from demonstrations (RLPD symmetric sampling: 0.5)
    use_interventions: bool = True  # human intervention steps join the demo side (HIL-SERL)
    intervention_penalty: float = 0.0  # reward penalty on the step before an intervention (RLIF); 0: off
    buffer_size: int = 1_000_000  # online replay capacity (transitions)
    align_chunks: bool = True  # one batched base call for all envs per Ta steps (see ChunkExecutor)
    log_every: int = 2_000  # env steps between learning-curve rows
    checkpoint_every: int = 0  # env steps between resumable ``state`` checkpoints (0: at the end only)
    seed: int = 0  # torch seed, base sampling seed and training episode seeds (TRAIN_SEED_START + seed * 10^7)
    val_every: int = 10_000  # env steps between validations (and one at the end) when validate is given; 0: off
    val_episodes: int = 50  # episodes per validation
    # a run directory of the same algo (or its ``state``) whose actor, critics, targets and optimiser moments this
    # run starts from, with an empty replay and zeroed counters: fine-tuning a residual learnt in one simulator on
    # another or on the robot (ResFiT's real-robot runs start from the sim-trained residual). "": a fresh residual
    init_from: str = ""

    def warming_up(self, env_steps: int) -> bool:
        """Warm-up exploration (base + uniform noise) is due: before ``learning_starts`` env steps, unless the run
        starts from a trained residual (``init_from``), which then explores with its own actor."""
        return env_steps < self.learning_starts and not self.init_from

    def make_learner(self, policy: ResidualPolicy) -> OffPolicyLearner:
        """The algorithm's learner (networks, optimisers, update rule) for ``policy``, trained in place."""
        raise NotImplementedError

    def explore(self, policy: ResidualPolicy, x: torch.Tensor, env_steps: int) -> torch.Tensor:
        """The exploring residual (B, A) in [-1, 1], residual units, after warm-up (draws from torch's global RNG)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field (``<algo>.<field>``)."""
        s = self.algo
        for k in ("total_env_steps", "n_envs", "batch_size", "n_step", "n_critics", "policy_delay", "buffer_size",
                  "log_every", "val_episodes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{s}.{k}", f"{getattr(self, k)} < 1", "use a positive integer")
        if not 1 <= self.n_target_critics <= self.n_critics:
            raise ConfigError(f"{s}.n_target_critics", f"{self.n_target_critics} not in 1..n_critics "
                              f"({self.n_critics})", "use 2 (REDQ) or at most n_critics")
        if not 0.0 <= self.demo_ratio <= 1.0:
            raise ConfigError(f"{s}.demo_ratio", f"{self.demo_ratio} outside [0, 1]", "use 0.5 (RLPD) or 0 (no demos)")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"{s}.gamma", f"{self.gamma} outside (0, 1]", "use e.g. 0.99")
        for k in ("utd_ratio", "tau", "lr_actor", "lr_critic", "max_grad_norm"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"{s}.{k}", f"{getattr(self, k)} <= 0", "use a positive number")
        for k in ("warmup_noise", "intervention_penalty", "learning_starts", "critic_warmup_updates",
                  "checkpoint_every", "val_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{s}.{k}", f"{getattr(self, k)} < 0", "use 0 (off) or a positive value")
        if self.init_from and not _state_dir(self.init_from).joinpath("model.safetensors").is_file():
            raise ConfigError(f"{s}.init_from", f"no {s} state in {self.init_from}",
                              f"give a {s} run's output directory (it holds state/) or leave it empty")
        if not self.critic_hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                         for h in self.critic_hidden):
            raise ConfigError(f"{s}.critic_hidden", f"{list(self.critic_hidden)} is not a list of positive widths",
                              "use e.g. [256, 256]")


def td_target(reward: torch.Tensor, discount: torch.Tensor, next_q: torch.Tensor) -> torch.Tensor:
    """The TD target ``reward + discount * next_q`` (B,): n-step return plus the discounted bootstrap (``discount``
    is 0 after a termination, :mod:`robot_rl.rl.replay`). The one place the target is formed."""
    return reward + discount * next_q


def polyak(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """``target <- (1 - tau) target + tau source``, parameter by parameter (in place)."""
    with torch.no_grad():
        for tp, p in zip(target.parameters(), source.parameters()):
            tp.lerp_(p, tau)


class OffPolicyLearner:
    """The parts of a learner the run relies on: ``cfg``, ``policy`` (the residual, trained in place), ``critic``
    (a :class:`~robot_rl.rl.heads.QEnsemble` of ``n_critics`` LayerNorm heads) and its Polyak target
    ``critic_target``, ``modules`` and ``optimizers`` (name -> object, everything a checkpoint holds; this class
    puts the actor, the critics and their Adam optimisers there, a subclass adds its own parts), the counters ``updates`` (critic updates)
    and ``actor_updates``. A subclass implements :meth:`update`.

    Raises ConfigError for a residual whose actor head is not the one ``cfg`` trains (``cfg.head``).
    """

    def __init__(self, policy: ResidualPolicy, cfg: OffPolicyConfig):
        if policy.config.head != cfg.head:
            raise ConfigError("residual.head", f"{cfg.algo.upper()} trains the {cfg.head} head, not "
                              f"{policy.config.head!r}", f"use residual.head={cfg.head} (the default with --algo "
                              f"{cfg.algo})")
        self.cfg, self.policy = cfg, policy
        rc = policy.config
        self.critic = QEnsemble(rc.in_dim, rc.action_dim, tuple(int(h) for h in cfg.critic_hidden), cfg.n_critics)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.modules: dict[str, torch.nn.Module] = {"actor": policy, "critic": self.critic,
                                                    "critic_target": self.critic_target}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "opt_actor": torch.optim.Adam(policy.actor.parameters(), lr=cfg.lr_actor),
            "opt_critic": torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)}
        self.updates = 0  # critic updates so far
        self.actor_updates = 0

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One gradient step on a batch of :data:`~robot_rl.rl.replay.FIELDS`; returns the scalars of
        :data:`STANDARD_STATS` it computed (and any of its own)."""
        raise NotImplementedError

    # ---- the steps both algorithms take
    def target_min_q(self, next_x: torch.Tensor, next_res: torch.Tensor) -> torch.Tensor:
        """``min_{k in M} Q'_k(next_x, next_res)`` (B,) over a random subset ``M`` of ``n_target_critics`` target
        heads (REDQ, Chen et al. 2021), evaluating only those heads. No gradient."""
        with torch.no_grad():
            heads = torch.randperm(self.cfg.n_critics)[:self.cfg.n_target_critics]
            return self.critic_target(next_x, next_res, heads).min(0).values

    def critic_step(self, batch: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
        """Every Q head regresses on the same target ``y`` (B,) (each head's own MSE, summed), one clipped Adam step
        on ``optimizers["opt_critic"]``; counts the update. Returns {critic_loss (per head), q_mean, target_mean}."""
        q = self.critic(batch["x"], batch["residual"])
        loss = (q - y).pow(2).mean(1).sum()
        self.clipped_step("opt_critic", loss, self.critic.parameters())
        self.updates += 1
        return {"critic_loss": float(loss.detach()) / self.cfg.n_critics, "q_mean": float(q.detach().mean()),
                "target_mean": float(y.mean())}

    def actor_due(self) -> bool:
        """An actor update is due after this critic update: past ``critic_warmup_updates``, every ``policy_delay``."""
        return self.updates > self.cfg.critic_warmup_updates and self.updates % self.cfg.policy_delay == 0

    def mean_q(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """The mean over all heads of ``Q_k(x, res)`` (B,), differentiable in ``res`` only (the actor's objective;
        the critic's parameters get no gradient)."""
        self.critic.requires_grad_(False)
        try:
            return self.critic(x, res).mean(0)
        finally:
            self.critic.requires_grad_(True)

    def clipped_step(self, opt: str, loss: torch.Tensor, params) -> None:
        """``loss.backward()``, global gradient-norm clip at ``max_grad_norm``, one step of ``optimizers[opt]``."""
        params = list(params)
        self.optimizers[opt].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizers[opt].step()

    # ---- checkpoint
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the learner (networks, targets, optimiser moments) under prefixed names."""
        out = {}
        for name, mod in self.modules.items():
            out.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        for name, opt in self.optimizers.items():
            for i, st in opt.state_dict()["state"].items():
                out.update({f"{name}.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
        return out

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`. Raises ConfigError for missing or mis-shaped tensors."""
        from robot_rl.policies.checkpoint import load_state_strict

        for name, mod in self.modules.items():
            load_state_strict(mod, {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")})
        for name, opt in self.optimizers.items():
            sd = opt.state_dict()
            state: dict[int, dict] = {}
            for k, v in t.items():
                if k.startswith(name + "."):
                    i, key = k[len(name) + 1:].split(".", 1)
                    state.setdefault(int(i), {})[key] = v.clone()
            sd["state"] = state
            opt.load_state_dict(sd)


class Explorer:
    """The exploring actor the collector calls: base + U(-warmup_noise, warmup_noise) while warming up
    (:meth:`OffPolicyConfig.warming_up`), then the algorithm's rule (:meth:`OffPolicyConfig.explore`), residual
    units. The loop sets ``steps`` (env steps so far). Draws from torch's global RNG."""

    def __init__(self, policy: ResidualPolicy, cfg: OffPolicyConfig):
        self.policy, self.cfg, self.steps = policy, cfg, 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> ActorStep:
        if self.cfg.warming_up(self.steps):
            shape = (x.shape[0], self.policy.config.action_dim)
            return ActorStep((torch.rand(shape) * 2 - 1) * self.cfg.warmup_noise)
        return ActorStep(self.cfg.explore(self.policy, x, self.steps))


class OffPolicyRun:
    """One off-policy training run (TD3 or SAC, by the type of ``cfg``): the learner, both replay sides, the
    n-step windows, the curve, validation and the resumable state. The single-process loop
    (:func:`train_residual_offpolicy`) and TD3's actor-learner split (:mod:`robot_rl.serve.learner`) differ only in
    where transitions come from; both feed them to :meth:`add`.

    Args:
        base, task, cfg, out_dir, residual, demos, task_kwargs, writer, progress, validate, checkpoint_extra,
            resume: as for :func:`train_residual_offpolicy`.
        obs_dims: {observation key: flat dim} of the env (:func:`robot_rl.rl.collector.env_obs_dims`).
        n_slots: n-step windows kept apart (one per env or actor session).

    Attributes: ``policy`` (the residual, trained in place), ``learner``, ``online``, ``demos`` (or None),
    ``explorer``, ``steps`` (env transitions so far), ``curve``, ``seed_start`` (the first episode seed to use:
    the run's, or the saved next one when resuming). Raises ConfigError for bad configs, a bad demo store or a
    missing/mismatched saved state.
    """

    def __init__(self, base, task: str, cfg: OffPolicyConfig, out_dir: str | Path, *, obs_dims: dict, n_slots: int,
                 residual: ResidualConfig | None = None, demos: str | Path | None = None,
                 task_kwargs: dict | None = None, writer=None, progress: bool = True, validate: Callable | None = None,
                 checkpoint_extra: dict | None = None, resume: bool = False):
        cfg.validate()
        base.freeze()
        bc = base.config
        self.cfg, self.writer, self.checkpoint_extra = cfg, writer, checkpoint_extra
        self.out = Path(out_dir)
        self.state_dir = self.out / "state"
        if resume and not (self.state_dir / "model.safetensors").is_file():
            raise ConfigError("resume", f"no saved state in {self.state_dir}", "run without --resume to start the run")
        rcfg = (residual or ResidualConfig(head=cfg.head)).derive(bc, task, obs_dims)
        self.policy = residual_for_base(rcfg, base)  # an image base: its encoder's features too (module doc)
        self.learner = cfg.make_learner(self.policy)
        self.demos, self.demo_stats = None, {"transitions": 0, "intervention_steps": 0, "unreachable": 0}
        if demos is not None and cfg.demo_ratio > 0:
            from robot_rl.envs.tasks import make_task

            tk = make_task(task, **(task_kwargs or {}))
            self.demos, self.demo_stats = demo_buffer(
                demos, base, self.policy, n_step=cfg.n_step, gamma=cfg.gamma, task=task, max_steps=tk.max_steps,
                tolerance=getattr(tk, "tolerance", None), intervention_penalty=cfg.intervention_penalty,
                use_interventions=cfg.use_interventions, seed=cfg.seed)
            if progress:
                st = self.demo_stats
                print(f"{cfg.algo.upper()} demo side: {st['transitions']} transitions from {st['episodes']} episodes "
                      f"of {demos} "
                      f"({st['unreachable']} steps beyond the residual's reach dropped, {st['intervention_steps']} "
                      "intervention steps)", file=sys.stderr, flush=True)
            if len(self.demos) < cfg.batch_size:
                print(f"{cfg.algo.upper()} demo side: warning: {len(self.demos)} transitions fill "
                      f"{cfg.demo_ratio:.0%} of every "
                      f"{cfg.batch_size}-row batch; collect demos closer to the base (lower noise) or set "
                      f"{cfg.algo}.demo_ratio=0", file=sys.stderr, flush=True)
        self.online = ReplayBuffer(min(cfg.buffer_size, cfg.total_env_steps), rcfg.in_dim, rcfg.action_dim)
        self.explorer = Explorer(self.policy, cfg)
        self.seed_start = TRAIN_SEED_START + cfg.seed * 10_000_000
        self.steps, self.curve = 0, []
        if resume:
            self.steps, self.curve, self.seed_start = _load_state(self.state_dir, self.learner, self.online, self.out)
        elif cfg.init_from:
            _load_weights(_state_dir(cfg.init_from), self.learner, field=f"{cfg.algo}.init_from")
        self.nstep = NStep(n_slots, cfg.n_step, cfg.gamma)
        self.out.mkdir(parents=True, exist_ok=True)
        self.val = Validation(validate, cfg.val_every, cfg.val_episodes, self.out, checkpoint_extra)
        if resume:
            self.val.restore()
        self.gen = torch.Generator().manual_seed(cfg.seed + self.steps)
        self.t0 = time.time() - (self.curve[-1]["wall_s"] if self.curve else 0.0)
        self.window = {"succ": [], "stats": [], "res": []}
        self.bar = progress_bar(total=cfg.total_env_steps, desc=f"residual {cfg.algo.upper()}", unit="step",
                                disable=not progress)
        self.bar.update(self.steps)
        self.next_log = (self.steps // cfg.log_every + 1) * cfg.log_every
        ce = cfg.checkpoint_every
        self.next_ckpt = (self.steps // ce + 1) * ce if ce else None

    @property
    def done(self) -> bool:
        """The run has its ``total_env_steps``."""
        return self.steps >= self.cfg.total_env_steps

    def add(self, x, residual, reward, terminated, truncated, next_x, success, slots=None,
            interventions=None, unreachable=None) -> None:
        """Store B executed steps (see :meth:`robot_rl.rl.replay.NStep.push` for the arrays; ``success`` (B,) bool;
        ``slots``: each row's n-step window, default row i -> window i) and count them as env steps.

        ``interventions`` (B,) bool, optional: steps a human drove (their ``residual`` the human action's
        residual-unit equivalent). With ``cfg.use_interventions`` their n-step transitions join the demo side too,
        as HIL-SERL adds intervention steps to both buffers (Luo et al. 2024); a demo side is created for them when
        the run has none (not saved in ``state``: a resumed run gets them back from the store with ``--demos``).
        ``unreachable`` (B,) bool, optional: intervention steps whose executed action the residual cannot reach
        (their ``residual`` is clipped); transitions starting there are stored on neither side, as
        :func:`~robot_rl.rl.replay.demo_buffer` drops such demo steps (a clipped label was never executed)."""
        flags = None
        if interventions is not None:
            flags = np.asarray(interventions, bool).astype(np.int8)
            if unreachable is not None:
                flags[np.asarray(unreachable, bool)] = 2
        tr = self.nstep.push(x, residual, reward, terminated, truncated, next_x, slots=slots, flags=flags)
        ef = self.nstep.emitted_flags
        if (ef == 2).any():
            self.demo_stats["unreachable"] += int((ef == 2).sum())
            tr = {k: v[torch.as_tensor(ef != 2)] for k, v in tr.items()}
            ef = ef[ef != 2]
        self.online.add(*tr.values())
        if interventions is not None and self.cfg.use_interventions and (ef == 1).any():
            m = torch.as_tensor(ef == 1)
            if self.demos is None:
                rc = self.policy.config
                self.demos = ReplayBuffer(min(self.cfg.buffer_size, self.cfg.total_env_steps), rc.in_dim,
                                          rc.action_dim)
            self.demos.add(*(v[m] for v in tr.values()))
            self.demo_stats["transitions"] += int(m.sum())
            self.demo_stats["intervention_steps"] += int(m.sum())
        done = np.logical_or(np.asarray(terminated, dtype=bool), np.asarray(truncated, dtype=bool))
        self.window["succ"].extend(bool(v) for v in np.asarray(success, dtype=bool)[done])
        self.window["res"].append(float(torch.as_tensor(residual).abs().mean()))
        self.steps += int(x.shape[0])
        self.bar.update(int(x.shape[0]))

    def train(self) -> None:
        """The gradient updates owed at the UTD ratio for the env steps so far (none before ``learning_starts``)."""
        cfg = self.cfg
        if self.steps < cfg.learning_starts:
            return
        owed = int((self.steps - cfg.learning_starts) * cfg.utd_ratio) - self.learner.updates
        for _ in range(owed):
            self.window["stats"].append(self.learner.update(
                sample_mixed(self.online, self.demos, cfg.batch_size, cfg.demo_ratio, self.gen)))

    def log(self, base_calls: int, extra: dict | None = None) -> None:
        """When due (every ``log_every`` env steps and at the end): one curve row (+ ``extra`` fields), validation
        when due, TensorBoard scalars, the progress postfix."""
        last = self.done
        if not (self.steps >= self.next_log or last):
            return
        self.next_log += self.cfg.log_every
        row = {**_row(self.steps, self.window, self.learner, self.online, self.demos, self.demo_stats, base_calls,
                      self.t0), **(extra or {})}
        if self.val.due(self.steps, last=last):
            row["val_success"] = self.val.run(self.policy, self.steps)
        self.curve.append(row)
        self.window = {"succ": [], "stats": [], "res": []}
        self.bar.set_postfix(success=f"{row['success_rate']:.2f}", q=f"{row['q_mean']:.2f}")
        if self.writer is not None:
            for k, v in row.items():
                if k != "env_steps" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"residual/{k}", v, self.steps)

    def checkpoint(self, next_seed: int) -> None:
        """Write the resumable state when due (every ``checkpoint_every`` env steps and at the end)."""
        if self.next_ckpt is not None and (self.steps >= self.next_ckpt or self.done):
            self.next_ckpt += self.cfg.checkpoint_every
            _save_state(self.state_dir, self.learner, self.online, self.steps, self.curve, next_seed, self.cfg)

    def close(self) -> None:
        self.bar.close()

    def finish(self, next_seed: int, extra: dict | None = None) -> tuple[ResidualPolicy, list]:
        """The end of the run: the state (unless the schedule just saved it), the deployable ``checkpoint``
        (``extra`` added to its metadata), ``learning_curve.json`` and ``<algo>_config.json``."""
        self.close()
        if self.next_ckpt is None or not self.done:  # not yet saved at this step (stopped before the end: learn)
            _save_state(self.state_dir, self.learner, self.online, self.steps, self.curve, next_seed, self.cfg)
        save_residual(self.policy, self.out / "checkpoint",
                      extra={**(self.checkpoint_extra or {}), "env_steps": self.steps, "algo": self.cfg.algo,
                             **(extra or {})})
        (self.out / "learning_curve.json").write_text(json.dumps(self.curve, indent=1))
        (self.out / f"{self.cfg.algo}_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        return self.policy, self.curve


def train_residual_offpolicy(base, task: str, cfg: OffPolicyConfig, out_dir: str | Path, *,
                             residual: ResidualConfig | None = None, demos: str | Path | None = None,
                             task_kwargs: dict | None = None, env_kwargs: dict | None = None, writer=None,
                             progress: bool = True, validate: Callable | None = None,
                             checkpoint_extra: dict | None = None, make_venv: Callable | None = None,
                             resume: bool = False) -> tuple[ResidualPolicy, list]:
    """Train a residual with TD3 or SAC (``cfg``: a :class:`~robot_rl.rl.td3.TD3Config` or
    :class:`~robot_rl.rl.sac.SACConfig`) on top of the frozen ``base`` (state observations), in this process: one
    Collector steps ``cfg.n_envs`` vector envs and the updates run between steps (TD3's actor-learner split is
    :func:`robot_rl.serve.learner.train_residual_td3_actors`).

    Args:
        base, task, task_kwargs, env_kwargs, writer, validate, checkpoint_extra, make_venv: as for
            :func:`robot_rl.rl.ppo.train_residual` (``validate`` every ``cfg.val_every`` env steps, best kept in
            ``checkpoint_best``).
        cfg: algorithm settings; ``residual``: model settings (default: ``ResidualConfig(head=cfg.head)``).
        demos: a zarr store of demonstrations for the demo side of the replay (:func:`robot_rl.rl.replay.demo_buffer`);
            None (or ``cfg.demo_ratio`` 0): online replay only.
        resume: continue the run saved in ``out_dir/state`` (ConfigError when there is none).

    Writes ``out_dir/{checkpoint, state, learning_curve.json, <algo>_config.json}`` (+ ``checkpoint_best``,
    ``validation.json``). Returns (the residual, learning-curve rows {env_steps, episodes, success_rate, wall_s,
    unix_time, updates, actor_updates, utd, critic_loss, q_mean, target_mean, actor_loss, residual_abs, online_size,
    demo_size, intervention_share, unreachable_steps, base_calls[, val_success]}), one row per ``log_every`` env steps.
    Raises ConfigError for bad configs or a bad demo store.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    N = cfg.n_envs
    venv = make_venv(N) if make_venv is not None else make_vector_env(
        task, N, task_kwargs=task_kwargs, **env_kwargs_for(base.config, task, task_kwargs, env_kwargs))
    try:
        run = OffPolicyRun(base, task, cfg, out_dir, obs_dims=env_obs_dims(venv), n_slots=N, residual=residual,
                           demos=demos, task_kwargs=task_kwargs, writer=writer, progress=progress, validate=validate,
                           checkpoint_extra=checkpoint_extra, resume=resume)
    except ConfigError:
        venv.close()
        raise
    col = Collector(venv, base, run.policy, seed_start=run.seed_start, executor_seed=cfg.seed + run.steps,
                    align_chunks=cfg.align_chunks, explore=run.explorer, next_features=True)
    try:
        col.reset()
        while not run.done:
            run.explorer.steps = run.steps
            tr = col.step()
            run.add(tr.x, tr.residual, tr.reward, tr.terminated, tr.truncated, tr.next_x, tr.success)
            with all_cores():  # the env workers wait for the next step meanwhile
                run.train()
            run.log(col.base_calls)
            run.checkpoint(col.seeds.next)
    finally:
        run.close()
        col.close()
    return run.finish(col.seeds.next)




def _row(steps, window, learner, online, demo_buf, demo_stats, base_calls, t0) -> dict:
    st = window["stats"]
    mean = lambda k: float(np.mean([s[k] for s in st if k in s])) if any(k in s for s in st) else float("nan")  # noqa
    n_demo = len(demo_buf) if demo_buf is not None else 0
    succ = window["succ"]
    now = time.time()
    return {"env_steps": steps, "episodes": len(succ), "success_rate": float(np.mean(succ)) if succ else float("nan"),
            "wall_s": now - t0, "unix_time": now, "updates": learner.updates, "actor_updates": learner.actor_updates,
            "utd": learner.updates / max(steps, 1), "critic_loss": mean("critic_loss"), "q_mean": mean("q_mean"),
            "target_mean": mean("target_mean"), "actor_loss": mean("actor_loss"),
            "residual_abs": float(np.mean(window["res"])) if window["res"] else float("nan"),
            "online_size": len(online), "demo_size": n_demo,
            "intervention_share": demo_stats["intervention_steps"] / max(1, demo_stats["transitions"]),
            "unreachable_steps": demo_stats["unreachable"],
            "base_calls": base_calls,
            **{k: mean(k) for k in sorted({k for s in st for k in s} - set(STANDARD_STATS))}}  # e.g. SAC's temperature


def _save_state(d: Path, learner: OffPolicyLearner, online: ReplayBuffer, steps: int, curve: list, next_seed: int,
                cfg: OffPolicyConfig) -> None:
    """Write the resumable state (see the module doc) atomically per file."""
    from robot_rl.policies.checkpoint import save_module_safetensors

    tensors = learner.tensors()
    buf = online.state()
    tensors.update({f"replay.{k}": torch.as_tensor(v) for k, v in buf.items() if k != "added"})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"env_steps": steps, "updates": learner.updates, "actor_updates": learner.actor_updates,
            "replay_added": int(buf["added"]), "next_seed": int(next_seed), "algo": cfg.algo,
            cfg.algo: _jsonable(asdict(cfg)),
            "residual": _jsonable(asdict(learner.policy.config)),
            "curve": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                      for r in curve]}
    save_module_safetensors(learner.critic, d, meta, format_name=STATE_FORMAT, state_dict=tensors)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def _state_dir(path: str | Path) -> Path:
    """A run directory's ``state``, or ``path`` itself when it is one."""
    p = Path(path)
    return p / "state" if (p / "state").is_dir() else p


def _load_weights(d: Path, learner: OffPolicyLearner, field: str) -> tuple[dict, dict]:
    """Load the networks and optimiser moments of a :func:`_save_state` directory into ``learner``; returns (its
    tensors, its saved config). Raises ConfigError (naming ``field``) for a state of another algorithm or residual
    model."""
    from robot_rl.policies.checkpoint import read_checkpoint

    tensors, meta = read_checkpoint(d, STATE_FORMAT)
    cfg = meta["config"]
    algo = learner.cfg.algo
    if cfg.get("algo", "td3") != algo:  # states written before SAC existed are TD3's
        raise ConfigError(field, f"{d} holds a {cfg.get('algo', 'td3')} state, this run trains {algo}",
                          f"give a {algo} run's directory, or train with --algo {cfg.get('algo', 'td3')}")
    want = _jsonable(asdict(learner.policy.config))
    # fields added to ResidualConfig after the state was written are absent there; empty here means the same model
    saved = {**{k: v for k, v in want.items() if v in (None, [], {})}, **cfg["residual"]}
    if saved != want:
        diff = ", ".join(f"{k}: {saved.get(k)!r} there, {want.get(k)!r} here"
                         for k in sorted(set(want) | set(saved)) if saved.get(k) != want.get(k))
        raise ConfigError(field, f"the saved residual model in {d} differs from this run's ({diff})",
                          "use the same base, task and residual settings (the run's config.yaml)")
    learner.load_tensors({k: v for k, v in tensors.items() if not k.startswith(("replay.", "rng."))})
    return tensors, cfg


def _load_state(d: Path, learner: OffPolicyLearner, online: ReplayBuffer, out: Path) -> tuple[int, list, int]:
    """Restore a :func:`_save_state` directory into ``learner`` and ``online``; returns (env steps, curve rows, the
    next episode seed). Raises ConfigError for a state of another residual model."""
    tensors, cfg = _load_weights(d, learner, field="resume")
    learner.updates, learner.actor_updates = int(cfg["updates"]), int(cfg["actor_updates"])
    online.load_state({**{k[len("replay."):]: v for k, v in tensors.items() if k.startswith("replay.")},
                       "added": cfg["replay_added"]})
    torch.set_rng_state(tensors["rng.torch"])
    curve = [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in cfg["curve"]]
    return int(cfg["env_steps"]), curve, int(cfg["next_seed"])
