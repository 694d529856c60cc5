"""Residual policy on top of a frozen base (ResiP: Ankile et al. 2024, "From Imitation to Refinement -- Residual
RL for Precise Assembly"; see also Policy Decorator, Yuan et al. 2024, and ResFiT, Ankile et al. 2025).

The residual sees the normalized current observation, optional *fine features* and the normalized base action and
outputs a per-step correction. Fine features are goal-relative observation keys (e.g. ``cube_to_target``, metres)
fed as ``tanh(x / scale)``: min-max normalization over a whole workspace puts a 3 mm error at ~0.02 input units,
which on-policy RL picks up slowly; at ``scale = 1 cm`` the same error is ~0.3 and errors beyond a few
centimetres saturate (the base handles those). Executed action, in the base policy's normalized action space
([-1, 1] per dimension):

    a_exec = clip(a_base + alpha * a_res, -1, 1)        (:func:`combine`, the one place this happens)

Parts: ONE feature function (:func:`residual_input`), an actor head chosen by ``ResidualConfig.head`` and, for
PPO, a V critic (:mod:`robot_rl.rl.heads`; the Q ensemble of off-policy learners lives with the learner, not in
the deployable policy). Every actor head's last layer is zero-initialised, so an untrained residual's
deterministic output is exactly 0 and the executed action equals the base action.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from robot_rl.errors import ConfigError
from robot_rl.rl.heads import GaussianHead, TanhGaussianHead, TanhHead, VCritic

# residual fine features per task (key -> scale in metres), used when ResidualConfig.fine_keys is None
DEFAULT_FINE_KEYS = {"place": {"cube_to_target": 0.01}, "lift": {}}
HEADS = ("gaussian", "tanh", "tanh_gaussian")  # actor heads: PPO, TD3, SAC
# tensor layout of a saved residual, stored as "layout" in its config dict. 1: one module with actor.<i>.*,
# critic.<i>.* and log_std (before the head split; still loadable); 2: actor.net.<i>.*, actor.log_std, critic.net.*
RESIDUAL_LAYOUT = 2
# the base PolicyConfig fields that rebuild its image encoder (ResidualConfig.image_encoder)
IMAGE_ENCODER_FIELDS = ("image_channels", "image_num_keypoints", "image_feature_dim", "n_groups", "image_crop",
                        "shared_image_encoder")
IMAGE_BATCH = 256  # frames per encoder call in ResidualPolicy.encode_images (bounds the activations' memory)


def _plain(v):
    """A JSON-able copy of a config value (tuples -> lists)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclass
class ResidualConfig:
    """The residual model. Model fields are set by the user; ``obs_keys``, ``obs_dims``, ``action_dim`` (and a
    ``fine_keys`` of None) are derived from the base and the env by :meth:`derive` (the trainer calls it)."""

    obs_keys: list = field(default_factory=list)  # derived: the base's low-dim observation keys, in its order
    obs_dims: dict = field(default_factory=dict)  # derived: key -> dimension, for obs_keys and fine_keys
    # key -> scale (in the key's units, e.g. metres) of the tanh(x / scale) fine features; None: the task's
    # default (DEFAULT_FINE_KEYS) when trained, none for a policy built directly; {} for none
    fine_keys: dict | None = None
    action_dim: int = 5  # derived: the base's action dimension
    alpha: float = 0.1  # residual scale in a_exec = clip(a_base + alpha * a_res, -1, 1) (ResiP: 0.1)
    # one residual scale per action dimension in place of alpha ([] = alpha on every dimension), e.g.
    # [0.1, 0.1, 0.1, 0.1, 1.0]: small corrections of the end effector, full authority over the gripper (whose
    # base command crosses from closed to open in ~3 steps, so +-0.1 cannot hold a release back)
    alpha_per_dim: list = field(default_factory=list)
    hidden: tuple = (256, 256)  # hidden layer widths of the actor and critic MLPs (tanh activations)
    log_std_init: float = -1.0  # initial log-std of the Gaussian / tanh-Gaussian head (std 0.37, residual units)
    head: str = "gaussian"  # actor head: gaussian (PPO), tanh (TD3, deterministic), tanh_gaussian (SAC)
    image_keys: list = field(default_factory=list)  # derived: the base's camera keys (image_<camera>); [] = state
    # derived with image_keys: the base's image-encoder settings (PolicyConfig's image_channels,
    # image_num_keypoints, image_feature_dim, n_groups, image_crop, shared_image_encoder); the residual keeps a
    # frozen copy of that encoder (:meth:`ResidualPolicy.load_image_encoder`) and reads its features
    image_encoder: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if not self.obs_keys:
            raise ConfigError("residual.obs_keys", "empty", "list the low-dim observation keys")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError("residual.alpha", f"{self.alpha} outside (0, 1]", "use e.g. alpha=0.1")
        if self.alpha_per_dim and len(self.alpha_per_dim) != self.action_dim:
            raise ConfigError("residual.alpha_per_dim", f"{len(self.alpha_per_dim)} scales for {self.action_dim} "
                              "action dimensions", f"give {self.action_dim} scales, or [] for alpha on every one")
        for i, a in enumerate(self.alpha_per_dim):
            if not 0.0 < float(a) <= 1.0:
                raise ConfigError(f"residual.alpha_per_dim[{i}]", f"{a} outside (0, 1]", "use e.g. 0.1 or 1.0")
        for k, sc in (self.fine_keys or {}).items():
            if k not in self.obs_dims:
                raise ConfigError(f"residual.fine_keys.{k}", "no dimension given in obs_dims", "add it to obs_dims")
            if not float(sc) > 0:
                raise ConfigError(f"residual.fine_keys.{k}", f"scale {sc} <= 0", "use a positive scale, e.g. 0.01 (m)")
        if self.action_dim < 1:
            raise ConfigError("residual.action_dim", f"{self.action_dim} < 1", "set the base policy's action_dim")
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError("residual.hidden", f"{list(self.hidden)} is not a list of positive widths",
                              "use e.g. [256, 256]")
        if not math.isfinite(self.log_std_init):
            raise ConfigError("residual.log_std_init", f"{self.log_std_init} is not finite", "use e.g. -1.0")
        if self.head not in HEADS:
            raise ConfigError("residual.head", f"unknown head {self.head!r}", f"use one of {list(HEADS)}")
        missing = sorted(set(IMAGE_ENCODER_FIELDS) - set(self.image_encoder)) if self.image_keys else []
        if missing:
            raise ConfigError(f"residual.image_encoder.{missing[0]}", "missing for a residual that reads images",
                              "derive the residual from its image base (ResidualConfig.derive)")

    @property
    def scale(self) -> list[float]:
        """The residual scale of each action dimension, (A,) floats: ``alpha_per_dim``, else ``alpha`` on every one."""
        return [float(a) for a in self.alpha_per_dim] if self.alpha_per_dim else [float(self.alpha)] * self.action_dim

    @property
    def in_dim(self) -> int:
        """Width F of the residual features :func:`residual_input` builds."""
        return (sum(self.obs_dims[k] for k in [*self.obs_keys, *(self.fine_keys or {})]) + self.image_feature_dim
                + self.action_dim)

    @property
    def image_feature_dim(self) -> int:
        """Width of the image features: ``image_feature_dim`` per camera of ``image_keys`` (0 for state)."""
        return len(self.image_keys) * int(self.image_encoder.get("image_feature_dim", 0)) if self.image_keys else 0

    def derive(self, base_config, task: str, env_obs_dims: dict) -> ResidualConfig:
        """A copy with the derived fields filled in for ``base_config`` (obs_keys, obs_dims, action_dim) and
        ``fine_keys`` resolved (None -> ``DEFAULT_FINE_KEYS[task]``, or none for an image base: the defaults are
        object poses, which a policy from cameras does not read). An image base (``base_config.image_keys``) also
        gives ``image_keys`` and ``image_encoder``. ``env_obs_dims``: key -> dimension of every observation the env
        provides. Raises ConfigError for a fine key the env does not observe."""
        images = list(base_config.image_keys)
        default = {} if images else DEFAULT_FINE_KEYS.get(task, {})
        fine = dict(default if self.fine_keys is None else self.fine_keys)
        for k in fine:
            if k not in env_obs_dims:
                raise ConfigError(f"residual.fine_keys.{k}", f"task {task!r} has no observation {k!r}",
                                  f"use keys from {sorted(env_obs_dims)} or fine_keys={{}}")
        return replace(self, obs_keys=list(base_config.obs_keys), fine_keys=fine,
                       obs_dims={**base_config.obs_dims, **{k: int(env_obs_dims[k]) for k in fine}},
                       action_dim=int(base_config.action_dim), hidden=tuple(self.hidden), image_keys=images,
                       image_encoder=({k: _plain(getattr(base_config, k)) for k in IMAGE_ENCODER_FIELDS}
                                      if images else {}))


def combine(base_n: torch.Tensor, residual: torch.Tensor, alpha) -> torch.Tensor:
    """The executed action, normalized: ``clip(base_n + alpha * residual, -1, 1)``, shape (..., A) float32.

    ``base_n``: the base action in the base policy's normalized action space ([-1, 1] per dimension);
    ``residual``: the residual actor's output; ``alpha``: the residual scale, one float or one per action dimension
    ((A,) sequence or tensor: :attr:`ResidualConfig.scale`). The one place base and residual are combined
    (training, evaluation, the policy server). Source: ResiP (Ankile et al. 2024), executed action = base + alpha *
    residual.
    """
    return torch.clamp(base_n + torch.as_tensor(alpha, dtype=base_n.dtype) * residual, -1.0, 1.0)


def residual_input(normalizer, obs: dict, keys: list, base_action_n: np.ndarray | torch.Tensor,
                   fine_keys: dict | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
    """THE residual feature function: (B, F) float32 from raw batched obs ``{key: (B, d_k)}`` and the normalized
    base action (B, A): base-normalized ``keys`` (in order), then ``tanh(obs[k] / scale)`` for each fine key, then
    ``image_features`` (B, F_img) when given (:meth:`ResidualPolicy.encode_images`), then the normalized base
    action. Raises ConfigError for a fine key missing from ``obs``."""
    parts = [normalizer.normalize(k, torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32)) for k in keys]
    for k, sc in (fine_keys or {}).items():
        if k not in obs:
            raise ConfigError(f"residual.fine_keys.{k}", "not in the observation", "use keys the env provides")
        parts.append(torch.tanh(torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32) / float(sc)))
    if image_features is not None:
        parts.append(image_features)
    parts.append(torch.as_tensor(base_action_n, dtype=torch.float32))
    return torch.cat(parts, dim=-1)


@dataclass
class ActorStep:
    """What an exploring actor returns for features (B, F): ``residual`` (B, A) in residual units, and where the
    actor / critic provide them ``log_prob`` (B,) of that residual and the state value ``value`` (B,)."""

    residual: torch.Tensor
    log_prob: torch.Tensor | None = None
    value: torch.Tensor | None = None


class ResidualPolicy(nn.Module):
    """The deployable residual: feature spec + actor head (``config.head``) + a V critic for the PPO head.

    Features ``x`` are (B, F) float32 with F = ``config.in_dim`` (:meth:`features`). Attributes: ``actor``
    (a :mod:`robot_rl.rl.heads` actor head), ``critic`` (:class:`~robot_rl.rl.heads.VCritic`, or None for the
    off-policy heads, whose Q ensemble belongs to their learner). Raises ConfigError for a bad config.
    """

    def __init__(self, config: ResidualConfig):
        super().__init__()
        config.validate()
        self.config = config
        h, f, a = tuple(config.hidden), config.in_dim, config.action_dim
        if config.head == "gaussian":
            self.actor = GaussianHead(f, a, h, config.log_std_init)
            self.critic = VCritic(f, h)
        else:
            self.actor = TanhHead(f, a, h) if config.head == "tanh" else TanhGaussianHead(f, a, h, config.log_std_init)
            self.critic = None
        self.image_encoder = None
        if config.image_keys:
            from types import SimpleNamespace

            from robot_rl.policies.encoders import ObsEncoder

            # the base's encoder architecture, frozen (eval mode, center crop, no_grad); weights from the base
            enc = dict(config.image_encoder)
            self.image_encoder = ObsEncoder(SimpleNamespace(
                obs_keys=[], image_keys=list(config.image_keys), freeze_image_encoder=True,
                shared_image_encoder=bool(enc["shared_image_encoder"]), image_channels=list(enc["image_channels"]),
                image_num_keypoints=int(enc["image_num_keypoints"]), image_feature_dim=int(enc["image_feature_dim"]),
                n_groups=int(enc["n_groups"]), image_crop=enc["image_crop"]))

    def load_image_encoder(self, base) -> None:
        """Copy the frozen ``base`` policy's image-encoder weights into this residual's encoder (the trainers call
        it once; the copy is saved with the residual, so a residual checkpoint is self-contained). Raises
        ConfigError when the base's encoder has other tensors (another architecture or cameras)."""
        from robot_rl.policies.checkpoint import load_state_strict

        sd = {k: v for k, v in base.obs_encoder.state_dict().items() if k.startswith(("images.", "shared_image."))}
        load_state_strict(self.image_encoder, sd)

    @torch.no_grad()
    def encode_images(self, obs: dict) -> torch.Tensor:
        """Features (B, len(image_keys) * image_feature_dim) float32 of the current frames ``obs[k]`` (B, H, W, 3)
        uint8 RGB, by the frozen copy of the base's image encoder (center crop), in batches of IMAGE_BATCH."""
        keys = self.config.image_keys
        for k in keys:
            if k not in obs:
                raise ConfigError(f"residual.image_keys.{k}", "not in the observation",
                                  "render the base's cameras (env.cameras) for a residual that reads images")
        frames = {k: torch.as_tensor(np.asarray(obs[k])) for k in keys}
        n = frames[keys[0]].shape[0]
        out = [self.image_encoder({k: f[i:i + IMAGE_BATCH, None] for k, f in frames.items()}, None)
               for i in range(0, n, IMAGE_BATCH)]
        return torch.cat(out) if out else torch.zeros(0, self.config.image_feature_dim)

    def features(self, normalizer, obs: dict, base_action_n, image_features: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Residual input (B, F) float32 from raw batched obs (B, d_k) (+ camera frames (B, H, W, 3) uint8 for a
        residual that reads images) and the normalized base action (B, A). ``image_features``: this ``obs``'s
        :meth:`encode_images`, when the caller has it already (the collector reuses the next observation's)."""
        img = image_features if image_features is not None or not self.config.image_keys else self.encode_images(obs)
        return residual_input(normalizer, obs, self.config.obs_keys, base_action_n, self.config.fine_keys, img)

    def mean_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic residual (B, A), residual units (scaled by ``alpha`` in :func:`combine`)."""
        return self.actor.deterministic(x)

    @torch.no_grad()
    def act(self, normalizer, obs: dict, base_action_n) -> torch.Tensor:
        """Deterministic executed normalized action (B, A): ``clip(base + alpha * mean_residual, -1, 1)``."""
        return self.combine(torch.as_tensor(base_action_n, dtype=torch.float32),
                            self.mean_residual(self.features(normalizer, obs, base_action_n)))

    def combine(self, base_n: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Executed normalized action: :func:`combine` with this residual's scale (``config.scale``)."""
        return combine(base_n, res, self.config.scale)

    def dist(self, x: torch.Tensor) -> torch.distributions.Normal:
        """The Gaussian head's action distribution (batch shape (B, A)); PPO only."""
        self._need("gaussian", "dist")
        return self.actor.dist(x)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """V(x) (B,); PPO (gaussian head) only."""
        self._need("gaussian", "value")
        return self.critic(x)

    @torch.no_grad()
    def explore(self, x: torch.Tensor) -> ActorStep:
        """A stochastic residual for data collection (draws from torch's global RNG). Gaussian head: residual,
        summed log-prob and V(x); tanh-Gaussian head: residual and log-prob. The deterministic TD3 head has no
        exploration of its own (its learner adds noise): ConfigError."""
        if self.config.head == "gaussian":
            d = self.actor.dist(x)
            res = d.sample()
            return ActorStep(res, d.log_prob(res).sum(-1), self.critic(x))
        self._need("tanh_gaussian", "explore")
        return ActorStep(*self.actor.sample(x))

    def _need(self, head: str, what: str) -> None:
        if self.config.head != head:
            raise ConfigError("residual.head", f"{what}() needs the {head} head, this residual has "
                                               f"{self.config.head!r}", f"build the residual with head={head!r}")


def residual_for_base(config: ResidualConfig, base) -> ResidualPolicy:
    """An untrained residual for the frozen ``base`` (``config`` derived from it, :meth:`ResidualConfig.derive`);
    for an image base, with the base's image-encoder weights copied in (:meth:`ResidualPolicy.load_image_encoder`).
    The one way the trainers build their residual."""
    pol = ResidualPolicy(config)
    if config.image_keys:
        pol.load_image_encoder(base)
    return pol


def residual_config_dict(policy: ResidualPolicy) -> dict:
    """The residual's config as a JSON-able dict (what ``config.json`` and the server's weight push carry),
    with the tensor ``layout`` version; :func:`build_residual` rebuilds the same module from it."""
    d = asdict(policy.config)
    d["hidden"] = list(d["hidden"])
    d["fine_keys"] = dict(d["fine_keys"] or {})
    d["layout"] = RESIDUAL_LAYOUT
    return d


def build_residual(cfg: dict) -> ResidualPolicy:
    """An untrained :class:`ResidualPolicy` from a config dict (as saved in a residual checkpoint or sent with a
    weight push; ``layout`` optional). Raises ConfigError naming the field for unknown fields, a newer layout or
    values of the wrong type."""
    if not isinstance(cfg, dict):
        raise ConfigError("residual.config", "not a map", "send ResidualConfig fields")
    cfg = dict(cfg)
    layout = cfg.pop("layout", RESIDUAL_LAYOUT)
    if layout not in (1, RESIDUAL_LAYOUT):
        raise ConfigError("residual.layout", f"{layout!r} is not a layout this robot_rl reads "
                                             f"(1..{RESIDUAL_LAYOUT})", "upgrade robot_rl")
    names = set(ResidualConfig.__dataclass_fields__)
    bad = sorted(set(cfg) - names)
    if bad:
        raise ConfigError(f"residual.{bad[0]}", "unknown residual config field", f"use only {sorted(names)}")
    for k, v in cfg.items():
        _check_field_type(k, v)
    try:
        return ResidualPolicy(ResidualConfig(**{**cfg, "hidden": tuple(cfg.get("hidden", (256, 256)))}))
    except ConfigError:
        raise
    except Exception as e:  # wrong types inside the config
        raise ConfigError("residual.config", f"cannot build the residual ({type(e).__name__}: {e})"[:300],
                          "use the config saved with the residual checkpoint") from None


# field -> (kind of the value, kind of its items / map values) as JSON carries them; from ResidualConfig's annotations
_JSON_KINDS = {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list",
               dict: "a map", type(None): "null"}
_ITEM_KINDS = {"obs_keys": str, "hidden": int, "obs_dims": int, "fine_keys": float, "image_keys": str}


def _is_kind(v, kind) -> bool:
    if kind is int:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if kind is float:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    if kind in (list, tuple):
        return isinstance(v, (list, tuple))
    return isinstance(v, kind)


def _check_field_type(name: str, value) -> None:
    """Raise ConfigError naming ``residual.<name>`` when a config value (e.g. from ``config.json`` or a weight
    push) is not of its :class:`ResidualConfig` annotation's kind (``"alpha": "0.1"``, ``"hidden": "256"``), or a
    list / map holds items of the wrong kind (``hidden: [256, "x"]``)."""
    import typing

    hint = typing.get_type_hints(ResidualConfig)[name]
    kinds = [typing.get_origin(a) or a for a in (typing.get_args(hint) or (hint,))]
    want = " or ".join(_JSON_KINDS.get(kd, kd.__name__) for kd in kinds)
    if not any(_is_kind(value, kd) for kd in kinds):
        shown = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        raise ConfigError(f"residual.{name}", f"{shown[:60]} is not {want}",
                          "fix config.json (or the pushed config): use the values saved with the checkpoint")
    item = _ITEM_KINDS.get(name)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    if item is not None and not all(_is_kind(x, item) for x in items):
        raise ConfigError(f"residual.{name}", f"holds items that are not {_JSON_KINDS[item]}",
                          "fix config.json (or the pushed config): use the values saved with the checkpoint")
    if isinstance(value, dict) and not all(isinstance(x, str) for x in value):
        raise ConfigError(f"residual.{name}", "has keys that are not strings", "use observation key names")


def check_compatible(residual_config: ResidualConfig, base_config) -> None:
    """Raise ConfigError unless the residual was made for this base: same action dim and low-dim obs keys."""
    rc, bc = residual_config, base_config
    if rc.action_dim != bc.action_dim:
        raise ConfigError("residual.action_dim", f"{rc.action_dim} != base action_dim {bc.action_dim}",
                          "use a residual trained on this base checkpoint")
    if list(rc.obs_keys) != list(bc.obs_keys):
        raise ConfigError("residual.obs_keys", f"{list(rc.obs_keys)} != base obs_keys {list(bc.obs_keys)}",
                          "use a residual trained on this base checkpoint")
    if not set(rc.image_keys) <= set(bc.image_keys):
        raise ConfigError("residual.image_keys", f"{list(rc.image_keys)} are not all among the base's cameras "
                                                 f"{list(bc.image_keys)}", "use a residual trained on this base checkpoint")


def freeze(policy: ResidualPolicy) -> ResidualPolicy:
    """``eval()`` and ``requires_grad=False`` on every parameter; returns the policy."""
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy



def apply_residual(normalizer, residual, obs: Mapping, base_raw) -> tuple[np.ndarray, np.ndarray]:
    """Base action + a residual's deterministic correction, for B steps or envs.

    Args:
        normalizer: the base policy's normalizer (``normalize`` / ``unnormalize`` of ``"action"`` and obs keys).
        residual: a :class:`ResidualPolicy`, or None.
        obs: raw batched observation {key: (B, d)} with the residual's keys (others are ignored).
        base_raw: raw base actions (B, A).

    Returns:
        (residual (B, A) float32: the residual's mean in residual units, before alpha; executed (B, A) float32 raw:
        ``unnormalize(combine(normalize(base), residual))`` with :func:`combine`). Without a
        residual: (zeros, ``base_raw``).
    """
    base_raw = np.asarray(base_raw, dtype=np.float32)
    if residual is None:
        return np.zeros_like(base_raw), base_raw
    with torch.no_grad():
        base_n = normalizer.normalize("action", torch.as_tensor(base_raw))
        r = residual.mean_residual(residual.features(normalizer, obs, base_n))
        executed = normalizer.unnormalize("action", residual.combine(base_n, r))
    return r.numpy().astype(np.float32, copy=False), executed.numpy().astype(np.float32, copy=False)

RESIDUAL_FORMAT = "robot_rl.residual"


def save_residual(policy: ResidualPolicy, path_dir, extra: dict | None = None):
    """Save as ``model.safetensors`` + ``config.json`` (no pickle). ``extra`` e.g. the base checkpoint path."""
    from robot_rl.policies.checkpoint import save_module_safetensors

    return save_module_safetensors(policy, path_dir, residual_config_dict(policy), format_name=RESIDUAL_FORMAT,
                                   extra=extra)


def _layout1_names(tensors: dict) -> dict:
    """Tensor names of a layout-1 residual (``actor.<i>.*``, ``critic.<i>.*``, ``log_std``) in layout 2."""
    if "log_std" not in tensors:
        return tensors
    out = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        out["actor.log_std" if k == "log_std" else f"{head}.net.{rest}"] = v
    return out


def residual_from_tensors(cfg: dict, tensors: dict, base=None) -> ResidualPolicy:
    """A frozen residual from a config dict and a {name: tensor} state dict (a weight push or a checkpoint of
    either layout), checked against ``base`` when given. Raises ConfigError for bad configs, mismatched tensors or
    a residual of another base."""
    from robot_rl.policies.checkpoint import load_state_strict

    pol = build_residual(cfg)
    if base is not None:
        check_compatible(pol.config, base.config)
    load_state_strict(pol, _layout1_names(tensors))
    return freeze(pol)


def load_residual(path, base=None) -> ResidualPolicy:
    """Load a frozen residual checkpoint directory; with ``base`` given, check it matches the base's obs keys and
    action dim. Raises ConfigError for pickle/corrupt/mismatched checkpoints."""
    from robot_rl.policies.checkpoint import read_checkpoint

    tensors, meta = read_checkpoint(path, RESIDUAL_FORMAT)
    return residual_from_tensors(meta["config"], tensors, base)
