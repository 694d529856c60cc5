"""Policy config and the base-policy interface shared by diffusion and BC policies.

Observation-history / action-chunk convention of Chi et al. 2023 "Diffusion Policy": the policy sees the last
``n_obs_steps`` (To) observations, predicts a ``horizon`` (T) step action sequence aligned so that index To-1 is the
current step, and the robot executes ``actions[To-1 : To-1+Ta]`` with Ta = ``n_action_steps``.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from robot_rl.errors import ConfigError
from robot_rl.policies.encoders import make_obs_encoder
from robot_rl.policies.normalizer import Normalizer

KINDS = ("diffusion", "bc")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers DDPMScheduler / DDIMScheduler


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy's modules (serialized into ``config.json``).

    Fields:
        kind: "diffusion" or "bc".
        obs_keys: low-dim observation keys, concatenated in this order; obs_dims: {key: dim} for each of them.
        image_keys: camera keys (uint8 (H, W, 3) RGB each); image_shape: [H, W, 3] or None (the same for every
            camera).
        image_crop: [h, w] crop (random in training, centered at inference) or None for no crop.
        action_dim: A; n_obs_steps: To; n_action_steps: Ta; horizon: T (Ta <= T - To + 1).
        down_dims, kernel_size, n_groups, diffusion_step_embed_dim: 1-D U-Net (n_groups also used by the image
            encoder's GroupNorm); num_train_timesteps, beta_schedule, clip_sample, prediction_type: DDPM training;
            num_inference_steps: DDIM steps at inference; ema_power, ema_max_decay: EMA warmup schedule.
        image_channels, image_num_keypoints, image_feature_dim: ResNet-style encoder stages, spatial-softmax
            keypoints, output features per camera.
        bc_hidden: hidden sizes of the BC MLP.
        shared_image_encoder: one image encoder for all cameras (their frames encoded in one batched call; features
            still concatenated per camera in ``image_keys`` order) instead of one per camera.
        freeze_image_encoder: the image encoder(s) are not trained: ``requires_grad`` False, eval mode (center
            crop) and ``no_grad`` in every forward, so a training step costs the rest of the policy's backward only.
            Its weights must come from elsewhere (``train-base``'s ``base.init_from``). No effect without cameras.

    A ``config.json`` written before a field existed loads with that field's default.
    """

    kind: str = "diffusion"
    obs_keys: list[str] = field(default_factory=list)
    obs_dims: dict[str, int] = field(default_factory=dict)
    image_keys: list[str] = field(default_factory=list)
    image_shape: list[int] | None = None
    image_crop: list[int] | None = None
    action_dim: int = 0
    n_obs_steps: int = 2
    n_action_steps: int = 8
    horizon: int = 16
    down_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    image_num_keypoints: int = 32
    image_feature_dim: int = 64
    bc_hidden: list[int] = field(default_factory=lambda: [256, 256])
    shared_image_encoder: bool = False
    freeze_image_encoder: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):  # tuples -> lists so that a JSON round trip compares equal
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                setattr(self, f.name, list(v))

    @property
    def cond_dim(self) -> int:
        """Global conditioning size: To * (sum of low-dim dims + n_cameras * image_feature_dim)."""
        per_step = sum(self.obs_dims[k] for k in self.obs_keys) + len(self.image_keys) * self.image_feature_dim
        return self.n_obs_steps * per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        """Build and validate. Raises ConfigError on unknown fields or an impossible config."""
        if not isinstance(d, dict):
            raise ConfigError("policy config", f"expected a JSON object, got {type(d).__name__}",
                              "pass a dict of PolicyConfig fields")
        names = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise ConfigError(k, "unknown policy config field", f"use only {sorted(names)}")
        return cls(**d).validate()

    def validate(self) -> "PolicyConfig":
        """Return self, or raise ConfigError naming the first impossible field and how to fix it."""
        def need(ok, fld, problem, fix):
            if not ok:
                raise ConfigError(fld, problem, fix)

        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        need(self.kind in KINDS, "kind", f"unknown policy kind {self.kind!r}", f"use one of {list(KINDS)}")
        for name in ("obs_keys", "image_keys"):
            need(isinstance(getattr(self, name), list), name, "must be a list of key names", f'e.g. {name}: ["state"]')
        need(isinstance(self.obs_dims, dict), "obs_dims", "must be a {key: dim} mapping", 'e.g. {"state": 9}')
        need(self.obs_keys or self.image_keys, "obs_keys", "no observations (obs_keys and image_keys are empty)",
             "list at least one low-dim key in obs_keys or a camera in image_keys")
        keys = list(self.obs_keys) + list(self.image_keys)
        for k in keys:
            need(isinstance(k, str) and k.isidentifier() and k != "action", "obs_keys",
                 f"bad key {k!r}", "use identifier-like names (letters, digits, '_'), not 'action'")
        need(len(set(keys)) == len(keys), "obs_keys", f"duplicate keys in {keys}", "list each key once")
        need(pos_int(self.n_groups), "n_groups", f"{self.n_groups!r} is not a positive int", "e.g. 8")
        for name in ("shared_image_encoder", "freeze_image_encoder"):
            need(isinstance(getattr(self, name), bool), name, f"{getattr(self, name)!r} is not true/false",
                 "use true or false")

        def pos_int_list(v):
            return isinstance(v, list) and len(v) > 0 and all(pos_int(c) for c in v)
        need(set(self.obs_dims) == set(self.obs_keys), "obs_dims",
             f"keys {sorted(self.obs_dims)} do not match obs_keys {sorted(self.obs_keys)}",
             "give exactly one dimension per low-dim obs key")
        for k in self.obs_keys:
            need(pos_int(self.obs_dims[k]), f"obs_dims['{k}']", f"{self.obs_dims[k]!r} is not a positive int",
                 "set the feature dimension of this key")
        if self.image_keys:
            s = self.image_shape
            need(isinstance(s, list) and len(s) == 3 and s[2] == 3 and all(pos_int(v) and v >= 8 for v in s[:2]),
                 "image_shape", f"{s!r} is not [H, W, 3] with H, W >= 8", "set image_shape to [H, W, 3]")
            if self.image_crop is not None:
                c = self.image_crop
                need(isinstance(c, list) and len(c) == 2 and all(pos_int(v) and v >= 8 for v in c)
                     and c[0] <= s[0] and c[1] <= s[1], "image_crop", f"{c!r} is not [h, w] within {s[:2]}",
                     "use [h, w] with 8 <= h <= H and 8 <= w <= W, or null")
            need(pos_int_list(self.image_channels) and all(c % self.n_groups == 0 for c in self.image_channels),
                 "image_channels", f"{self.image_channels!r} must be positive multiples of n_groups={self.n_groups}",
                 "adjust image_channels or n_groups")
            need(pos_int(self.image_num_keypoints), "image_num_keypoints", "must be a positive int", "e.g. 32")
            need(pos_int(self.image_feature_dim), "image_feature_dim", "must be a positive int", "e.g. 64")
        need(pos_int(self.action_dim), "action_dim", f"{self.action_dim!r} is not a positive int",
             "set action_dim to the action vector size")
        for name in ("n_obs_steps", "n_action_steps", "horizon", "n_groups"):
            need(pos_int(getattr(self, name)), name, f"{getattr(self, name)!r} is not a positive int (>= 1)",
                 f"set {name} >= 1")
        need(self.n_action_steps <= self.horizon - self.n_obs_steps + 1, "n_action_steps",
             f"Ta={self.n_action_steps} > horizon - n_obs_steps + 1 = {self.horizon - self.n_obs_steps + 1}",
             "lower n_action_steps / n_obs_steps or raise horizon")
        if self.kind == "diffusion":
            dd = self.down_dims
            need(pos_int_list(dd) and all(c % self.n_groups == 0 for c in dd), "down_dims",
                 f"{dd!r} must be positive multiples of n_groups={self.n_groups}", "e.g. [64, 128, 256]")
            need(self.horizon % 2 ** (len(dd) - 1) == 0, "horizon",
                 f"{self.horizon} is not divisible by 2**(len(down_dims)-1) = {2 ** (len(dd) - 1)}",
                 "use a horizon that the U-Net can halve at each level (e.g. 16 for 3 levels)")
            need(pos_int(self.kernel_size) and self.kernel_size % 2 == 1, "kernel_size", "must be odd", "e.g. 5")
            need(pos_int(self.diffusion_step_embed_dim) and self.diffusion_step_embed_dim % 2 == 0,
                 "diffusion_step_embed_dim", "must be a positive even int", "e.g. 128")
            need(pos_int(self.num_train_timesteps), "num_train_timesteps", "must be a positive int", "e.g. 100")
            need(pos_int(self.num_inference_steps) and self.num_inference_steps <= self.num_train_timesteps,
                 "num_inference_steps", f"must be in 1..num_train_timesteps={self.num_train_timesteps}", "e.g. 10")
            need(self.beta_schedule in BETA_SCHEDULES, "beta_schedule", f"{self.beta_schedule!r} unknown",
                 f"use one of {list(BETA_SCHEDULES)}")
            need(isinstance(self.clip_sample, bool), "clip_sample", f"{self.clip_sample!r} is not true/false",
                 "use true (samples kept in [-1, 1], as Diffusion Policy) or false")
            need(self.prediction_type in PREDICTION_TYPES, "prediction_type", f"{self.prediction_type!r} unknown",
                 f"use one of {list(PREDICTION_TYPES)}")
            need(all(isinstance(v, (int, float)) for v in (self.ema_power, self.ema_max_decay))
                 and self.ema_power > 0 and 0 < self.ema_max_decay < 1, "ema_power",
                 "need ema_power > 0 and 0 < ema_max_decay < 1", "e.g. 0.75 and 0.9999")
        else:
            need(pos_int_list(self.bc_hidden), "bc_hidden",
                 f"{self.bc_hidden!r} is not a non-empty list of positive ints", "e.g. [256, 256]")
        return self


class BasePolicy(nn.Module, abc.ABC):
    """Base policy: observation history -> action chunk. Owns its ``normalizer`` and ``obs_encoder``.

    Args:
        config: validated on construction (ConfigError if impossible).
        stats: normalization statistics {key: {"min", "max", ...}} for every low-dim obs key and "action";
            None for a placeholder to be filled by loading a checkpoint.
    """

    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__()
        self.config = config.validate()
        self.normalizer = Normalizer({**{k: config.obs_dims[k] for k in config.obs_keys},
                                      "action": config.action_dim}, stats)
        self.obs_encoder = make_obs_encoder(config)

    # --- subclass hooks -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _sample(self, cond: torch.Tensor, noise: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """cond (N, cond_dim) float32, noise (N, T, A) or None -> normalized action sequence (N, T, A)."""

    @abc.abstractmethod
    def _loss(self, cond: torch.Tensor, naction: torch.Tensor) -> torch.Tensor:
        """cond (B, cond_dim), normalized actions (B, T, A) -> scalar training loss."""

    # --- public API -----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Training loss on a sampler batch: obs keys raw (B, To, ...), ``action`` raw float (B, T, A).

        Raises ConfigError on missing keys or wrong shapes.
        """
        obs = self._obs_tensors(batch)
        b = next(iter(obs.values())).shape[0]
        act = self._as_tensor(batch.get("action"), "action", (b, self.config.horizon, self.config.action_dim))
        return self._loss(self.obs_encoder(obs, self.normalizer), self.normalizer.normalize("action", act))

    def predict_sequence(self, obs: dict, *, generator: torch.Generator | None = None,
                         init_noise: torch.Tensor | np.ndarray | None = None, num_samples: int = 1,
                         normalized: bool = False) -> np.ndarray:
        """Full T-step action sequence, float32 (B, T, A), or (B, K, T, A) when ``num_samples`` = K > 1.

        Args:
            obs: {key: array} numpy or torch; low-dim keys float (B, To, d), image keys uint8 (B, To, H, W, 3).
                Extra keys are ignored.
            generator: torch.Generator for the initial noise (drawn on its device, then moved); same seed -> same
                output.
            init_noise: (B, T, A) (or (B, K, T, A) for K > 1) normalized-space initial noise replacing the
                Gaussian draw (DSRL-style steering); only for stochastic policies.
            normalized: return the normalized sequence instead of raw actions.

        Runs under ``torch.no_grad`` in eval mode (the previous train/eval mode is restored).
        Raises ConfigError naming the key on missing keys, wrong shapes/dtypes or non-finite values.
        """
        k = num_samples
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError("num_samples", f"{k!r} is not a positive int", "pass num_samples >= 1")
        was_training = self.training
        if was_training:  # Module.train() walks every submodule (~1.6 ms for the U-Net): only when needed
            self.train(False)
        try:
            with torch.no_grad():
                o = self._obs_tensors(obs)
                b = next(iter(o.values())).shape[0]
                cond = self.obs_encoder(o, self.normalizer)
                cond = cond.repeat_interleave(k, dim=0) if k > 1 else cond
                t, a = self.config.horizon, self.config.action_dim
                noise = None
                if init_noise is not None:
                    shape = (b, t, a) if k == 1 else (b, k, t, a)
                    noise = self._as_tensor(init_noise, "init_noise", shape).reshape(b * k, t, a)
                seq = self._sample(cond, noise, generator)
                if not normalized:
                    seq = self.normalizer.unnormalize("action", seq)
                seq = seq.reshape(b, k, t, a) if k > 1 else seq
                return seq.cpu().numpy().astype(np.float32, copy=False)
        finally:
            if was_training:
                self.train(True)

    def predict_chunk(self, obs: dict, *, generator: torch.Generator | None = None,
                      init_noise: torch.Tensor | np.ndarray | None = None, num_samples: int = 1) -> np.ndarray:
        """Raw actions to execute, float32 (B, Ta, A) (or (B, K, Ta, A)): ``sequence[To-1 : To-1+Ta]``.

        Arguments and errors as :meth:`predict_sequence`.
        """
        seq = self.predict_sequence(obs, generator=generator, init_noise=init_noise, num_samples=num_samples)
        start = self.config.n_obs_steps - 1
        return np.ascontiguousarray(seq[..., start:start + self.config.n_action_steps, :])

    def freeze(self) -> "BasePolicy":
        """requires_grad=False on every parameter and eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    # --- input checking -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.normalizer.action_min.device

    def _as_tensor(self, x, name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Array-like -> tensor on the policy device; float32 unless ``dtype`` is required exactly."""
        fix = f"pass an array of shape {tuple(shape)}" + (" (one observation: add a batch axis, x[None])"
                                                            if name.startswith("obs") else "")
        if x is None:
            raise ConfigError(name, "missing", fix)
        try:
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))  # e.g. a BGR flip
        except (TypeError, ValueError) as e:
            raise ConfigError(name, f"not a numeric array ({e})", fix) from None
        if tuple(t.shape) != tuple(shape):
            raise ConfigError(name, f"expected shape {tuple(shape)}, got {tuple(t.shape)}", fix)
        if dtype is not None:
            if t.dtype != dtype:
                raise ConfigError(name, f"expected dtype {dtype}, got {t.dtype}", "pass uint8 RGB images")
        elif t.dtype == torch.bool or t.is_complex() or not torch.isfinite(t := t.float()).all():
            raise ConfigError(name, "must be finite real numbers", "check the source of this array (NaN/inf?)")
        return t.to(self.device)

    def _obs_tensors(self, obs: dict) -> dict[str, torch.Tensor]:
        """Validate and convert the configured obs keys to tensors on the policy device (extra keys dropped)."""
        c = self.config
        if not isinstance(obs, dict):
            raise ConfigError("obs", f"expected a dict of arrays, got {type(obs).__name__}", "pass {key: array}")
        for k in list(c.obs_keys) + list(c.image_keys):
            if k not in obs:
                raise ConfigError(f"obs['{k}']", f"missing (got keys {sorted(obs)})",
                                  f"provide all of {list(c.obs_keys) + list(c.image_keys)}")
        first = (c.obs_keys or c.image_keys)[0]
        b = np.shape(obs[first])[0] if np.ndim(obs[first]) > 0 else 0
        out = {k: self._as_tensor(obs[k], f"obs['{k}']", (b, c.n_obs_steps, c.obs_dims[k])) for k in c.obs_keys}
        out.update({k: self._as_tensor(obs[k], f"obs['{k}']", (b, c.n_obs_steps, *c.image_shape), torch.uint8)
                    for k in c.image_keys})
        return out

