"""Base policy training (diffusion or BC) from the zarr store.

Train/val split by episode, normalization statistics from the training episodes, AdamW with a cosine
schedule and warm-up (diffusers ``get_scheduler``), EMA of the weights (diffusion), TensorBoard logs, and a
safetensors checkpoint whose inference weights are the EMA weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from robot_rl.progress import progress_bar

from robot_rl.errors import ConfigError
from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.policies.checkpoint import save_policy
from robot_rl.policies.diffusion import make_ema
from robot_rl.datasets.sampler import SequenceSampler, WindowDataset, compute_normalization, split_episodes
from robot_rl.datasets.store import ZarrStore

DEFAULT_OBS_KEYS = {"place": ["ee_pos", "ee_quat", "gripper_width", "cube_pos", "cube_quat", "target_pos"],
                    "lift": ["ee_pos", "ee_quat", "gripper_width", "cube_pos", "cube_quat"]}


@dataclass
class BaseTrainConfig:
    """steps: gradient steps; batch_size; lr; weight_decay; warmup_steps; val_ratio: fraction of episodes held out;
    only_success: train on successful episodes only; sources: episode sources to train on (``scripted``, ``teleop``,
    ``policy``, ``intervention``; empty = all) — e.g. demos plus successful policy rollouts (``eval --record``);
    loader_workers: DataLoader worker processes that fetch the training windows and decode their camera frames
    (0 = in the training process); the batches, hence the run, are the same whatever the number;
    init_from: a policy checkpoint directory whose weights initialise the new policy wherever a tensor's name and
    shape match (the normalization statistics excepted: they come from this run's training episodes); needed by
    ``policy.freeze_image_encoder``, which must find every image-encoder tensor there;
    init_normalizer: with ``init_from``, take the normalization statistics from that checkpoint too: continued
    training on more of the same data (DAgger's rounds), where statistics recomputed over new, out-of-range labels
    would rescale every input and output the weights were trained for."""

    kind: str = "diffusion"
    obs_keys: list = field(default_factory=list)
    image_keys: list = field(default_factory=list)
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    val_ratio: float = 0.05
    val_every: int = 500
    seed: int = 0
    policy: dict = field(default_factory=dict)  # PolicyConfig overrides (horizon, down_dims, ...)
    only_success: bool = False
    sources: list = field(default_factory=list)
    loader_workers: int = 0
    init_from: str | None = None
    init_normalizer: bool = False


# what a training run writes (train-base; train-residual adds the best-on-validation checkpoint and its curves)
RUN_FILES = ("checkpoint", "checkpoint_best", "train_summary.json", "train_config.json", "config.yaml", "tb",
             "learning_curve.json", "validation.json", "ppo_config.json")


def check_run_dir(out: str | Path, overwrite: bool = False, replace: bool = False) -> None:
    """Check that ``out`` may receive a training run: it must not be a file, and unless ``overwrite`` it must not
    hold a run already (any of :data:`RUN_FILES`). With ``overwrite`` and ``replace``, the previous run's files are
    deleted (nothing else in ``out``). Raises ConfigError (field ``out``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a run directory", "pass a new directory path for the run")
    found = [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []
    if found and not overwrite:
        raise ConfigError("out", f"{out} already holds a run ({', '.join(found)})",
                          "pass a new --out, or --overwrite to replace that run")
    if found and replace:
        for n in found:
            p = out / n
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def select_episodes(store: ZarrStore, only_success: bool = False, sources=()) -> np.ndarray:
    """Indices of the committed episodes that pass the filters (all when none is set). Raises ConfigError for an
    unknown source or when fewer than 2 episodes remain."""
    from robot_rl.datasets.store import SOURCES

    sources = [sources] if isinstance(sources, str) else list(sources)
    for s in sources:
        if s not in SOURCES:
            raise ConfigError("sources", f"unknown episode source {s!r}", f"use some of {list(SOURCES)}")
    metas = store.episodes_meta()
    keep = [i for i, m in enumerate(metas)
            if (m["success"] or not only_success) and (not sources or m["source"] in sources)]
    if len(keep) < 2:
        have = sorted({(m["source"], bool(m["success"])) for m in metas})
        raise ConfigError("sources" if sources else "only_success",
                          f"{len(keep)} of {len(metas)} episodes pass the filter (the store has (source, success) "
                          f"{have})", "relax the filter or collect more episodes")
    return np.asarray(keep, dtype=np.int64)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a ``torchrun`` launch (its ``RANK`` / ``WORLD_SIZE`` environment),
    (0, 1) otherwise."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _Loss(torch.nn.Module):
    """The policy's training loss as a module's forward, so DistributedDataParallel sees (and all-reduces) it."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.compute_loss(batch)


def train_base(store_path: str | Path, out_dir: str | Path, cfg: BaseTrainConfig, *, writer=None,
               progress: bool = True, on_start=None) -> dict:
    """Train a base policy and save it to ``out_dir/checkpoint``. Returns a summary dict.

    ``writer``: a TensorBoard ``SummaryWriter`` (or None). ``on_start()``: called once the store and config are
    validated, before training; a non-None return value becomes the writer (the CLI writes its config.yaml and
    opens TensorBoard there, so a rejected run leaves ``out_dir`` untouched).

    Distributed (``torchrun --nproc-per-node N -m robot_rl.cli train-base ...``, ``WORLD_SIZE`` > 1): one process per
    rank with torch DistributedDataParallel (gloo on CPU, NCCL on GPU): every rank builds the same policy (same
    seed; DDP also broadcasts rank 0's weights), takes ``batch_size / N`` windows per step from its shard of the
    training windows (``DistributedSampler``, reshuffled per epoch), and the gradients are averaged, so a step sees
    ``batch_size`` windows as in one process. Rank 0 alone calls ``on_start``, writes the checkpoint, the summary and
    TensorBoard, shows progress and computes the validation loss; every rank returns the summary.

    Raises:
        ConfigError: missing/malformed store, unknown keys, impossible config; ``batch_size`` not divisible by the
            number of ranks; ``loader_workers`` not an int >= 0; ``init_from`` unreadable or without a matching
            tensor, or ``policy.freeze_image_encoder`` without ``init_from`` (field ``base.init_from``).
    """
    rank, world = distributed_rank()
    if world > 1 and cfg.batch_size % world:
        raise ConfigError("batch_size", f"{cfg.batch_size} is not divisible by the {world} ranks",
                          f"use a multiple of {world} (the global batch is split evenly)")
    torch.manual_seed(cfg.seed)
    store = ZarrStore.open(store_path, mode="r")
    for k, example in (("steps", 3000), ("batch_size", 256)):
        if not getattr(cfg, k) >= 1:
            raise ConfigError(k, f"{getattr(cfg, k)!r} < 1", f"use a positive integer, e.g. {k}={example}")
    w = cfg.loader_workers
    if not (isinstance(w, int) and not isinstance(w, bool) and w >= 0):
        raise ConfigError("base.loader_workers", f"{w!r} is not an integer >= 0",
                          "use 0 (frames decoded in the training process) or a few worker processes, e.g. 2")
    if store.n_episodes < 2:
        raise ConfigError("store", f"{store_path} has {store.n_episodes} episode(s)", "collect at least 2 episodes")
    if not cfg.obs_keys:
        task = store.episode_meta(0)["task"]
        cfg.obs_keys = list(DEFAULT_OBS_KEYS.get(task, []))
    for name, keys in (("obs_keys", cfg.obs_keys), ("image_keys", cfg.image_keys), ("action", ["action"])):
        for k in keys:
            if k not in store.schema:
                fix = ("collect with --cameras (image keys are image_<camera>)" if name == "image_keys"
                       else f"use keys from {store.keys}")
                raise ConfigError(name, f"{k!r} is not in the store {store_path}", fix)
    schema = store.schema
    image_shape = list(schema[cfg.image_keys[0]]["shape"]) if cfg.image_keys else None
    pcfg = PolicyConfig.from_dict({
        "kind": cfg.kind, "obs_keys": list(cfg.obs_keys),
        "obs_dims": {k: int(np.prod(schema[k]["shape"])) for k in cfg.obs_keys},
        "image_keys": list(cfg.image_keys), "image_shape": image_shape,
        "action_dim": int(schema["action"]["shape"][0]), **cfg.policy})
    if pcfg.freeze_image_encoder and pcfg.image_keys and cfg.init_from is None:
        raise ConfigError("base.init_from", "policy.freeze_image_encoder is set but no checkpoint gives the frozen "
                          "image encoder its weights", "set base.init_from to a trained image policy's checkpoint "
                          "directory, or unset policy.freeze_image_encoder")
    init = _read_init(cfg.init_from) if cfg.init_from is not None else None
    eligible = select_episodes(store, cfg.only_success, list(cfg.sources))
    train_eps, val_eps = (eligible[i] for i in split_episodes(len(eligible), cfg.val_ratio, cfg.seed))
    stats = compute_normalization(store, [*cfg.obs_keys, "action"], train_eps)
    keys = [*cfg.obs_keys, *cfg.image_keys, "action"]
    obs = [*cfg.obs_keys, *cfg.image_keys]
    mk = lambda eps: WindowDataset(SequenceSampler(store, keys, obs, pcfg.horizon, pcfg.n_obs_steps, eps))
    train_ds = mk(train_eps)
    val_ds = mk(val_eps) if len(val_eps) else None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=len(train_ds) >= world)
    else:  # the shuffle has its own generator: the loader draws a base seed from `generator` per iterator, and
        # persistent workers keep theirs across epochs, so a shared one would shuffle differently with workers
        sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed))
    per_rank = cfg.batch_size // world
    workers = cfg.loader_workers
    # worker i seeds torch, numpy and random from base seed + i (torch's worker loop); a seeded `generator` makes
    # that base seed reproducible and keeps the loader off the global torch RNG (the crops and diffusion noise)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=per_rank, sampler=sampler,
                                         drop_last=len(train_ds) // world > per_rank, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed + 1 + rank))
    policy = make_policy(pcfg, stats)
    if init is not None:
        _init_weights(policy, init, cfg.init_from, normalizer=cfg.init_normalizer)
    loss_fn = _Loss(policy)
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(cfg.seed + 1000 * rank)  # each rank its own diffusion noise; weights come from rank 0
        loss_fn = DistributedDataParallel(loss_fn)
    if on_start is not None and rank == 0:
        writer = on_start() or writer
    if rank != 0:
        writer, progress = None, False
    ema = make_ema(policy) if cfg.kind == "diffusion" else None
    trained = [p for p in policy.parameters() if p.requires_grad]  # a frozen image encoder's are not
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.95, 0.999))
    from diffusers.optimization import get_scheduler

    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=min(cfg.warmup_steps, cfg.steps // 10),
                          num_training_steps=cfg.steps)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    history, step, epoch, t0 = [], 0, 0, time.time()
    bar = progress_bar(total=cfg.steps, desc=f"train {cfg.kind}", unit="step", disable=not progress)
    policy.train()
    while step < cfg.steps:
        if world > 1:
            sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            loss = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.step(policy.parameters())
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if writer is not None:
                    writer.add_scalar("base/train_loss", loss.item(), step)
            if rank == 0 and val_ds is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                vl = _val_loss(policy, val_ds, cfg.batch_size)
                history.append({"step": step, "train_loss": loss.item(), "val_loss": vl})
                if writer is not None:
                    writer.add_scalar("base/val_loss", vl, step)
            if step >= cfg.steps:
                break
    bar.close()
    summary = {"checkpoint": str(out / "checkpoint"), "train_episodes": int(len(train_eps)),
               "val_episodes": int(len(val_eps)), "windows": len(train_ds), "final_loss": float(loss.item()),
               "history": history, "wall_s": time.time() - t0, "world_size": world}
    if rank == 0:
        save_policy(policy, out / "checkpoint", ema=ema,
                    extra={"store": str(store_path), "train_episodes": len(train_eps), "steps": cfg.steps})
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is written before any rank returns
        dist.destroy_process_group()
    return summary


def _read_init(path) -> dict[str, torch.Tensor]:
    """The tensors of the policy checkpoint ``path`` (safetensors; pickle refused). ConfigError ``base.init_from``."""
    from robot_rl.policies.checkpoint import POLICY_FORMAT, read_checkpoint

    try:
        tensors, _ = read_checkpoint(path, POLICY_FORMAT)
    except ConfigError as e:
        raise ConfigError("base.init_from", f"{path}: {e.field}: {e.problem}", e.fix) from None
    return tensors


def _init_weights(policy, tensors: dict[str, torch.Tensor], path, normalizer: bool = False) -> list[str]:
    """Copy into ``policy`` the ``tensors`` whose name and shape match one of its own (normalizer buffers only with
    ``normalizer``).
    Returns the names copied. Raises ConfigError ``base.init_from`` when none matches, or when the policy freezes
    its image encoder and some of that encoder's tensors are not among them."""
    own = policy.state_dict()
    match = {k: v for k, v in tensors.items()
             if k in own and own[k].shape == v.shape and (normalizer or not k.startswith("normalizer."))}
    if not match:
        raise ConfigError("base.init_from", f"no tensor of {path} matches this policy's names and shapes",
                          "initialise from a checkpoint of the same kind of policy (same cameras, image_channels, "
                          "shared_image_encoder)")
    if policy.config.freeze_image_encoder:
        frozen = {id(p) for enc in policy.obs_encoder.image_encoders() for p in enc.parameters()}
        enc = [n for n, p in policy.named_parameters() if id(p) in frozen]
        missing = [k for k in enc if k not in match]
        if missing:
            raise ConfigError("base.init_from", f"{path} has no matching weights for {len(missing)} of the {len(enc)} "
                              f"frozen image-encoder tensors (e.g. {missing[0]})",
                              "initialise from a checkpoint with the same image_keys, image_channels, "
                              "image_num_keypoints, image_feature_dim and shared_image_encoder")
    policy.load_state_dict(match, strict=False)
    return sorted(match)


@torch.no_grad()
def _val_loss(policy, ds, bs) -> float:
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)
    losses = [float(policy.compute_loss(b)) for b in loader]
    torch.random.set_rng_state(torch_state)
    return float(np.mean(losses))
