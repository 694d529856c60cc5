"""Observation encoders in plain torch (no torchvision).

The image encoder follows the recipe of Chi et al. 2023 "Diffusion Policy" (a ResNet whose BatchNorm is replaced by
GroupNorm, so that EMA weights and small batches behave) and of robomimic's visual encoder (Mandlekar et al. 2021):
residual conv stages, then a spatial softmax that turns each feature map into the expected (x, y) image position of a
learned keypoint (Levine et al. 2016 "End-to-End Training of Deep Visuomotor Policies"), then a linear layer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class _ResBlock2d(nn.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus a (1x1, strided) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, n_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(n_groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(n_groups, c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out
                     else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(n_groups, c_out)))

    def forward(self, x):
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(h)) + self.skip(x))


class SpatialSoftmax(nn.Module):
    """(N, C, h, w) features -> (N, 2K) expected keypoint coordinates in [-1, 1] (x then y per keypoint).

    A 1x1 conv maps C channels to K keypoint maps; a softmax over the h*w positions (divided by a learned
    temperature, initialised to 1) gives a distribution whose mean position is the keypoint.
    """

    def __init__(self, channels: int, num_keypoints: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, num_keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        f = self.proj(x)
        n, k, h, w = f.shape
        p = torch.softmax(f.reshape(n, k, h * w) / self.log_temperature.exp(), dim=-1).reshape(n, k, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=p.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=p.dtype)
        ex = (p.sum(dim=2) * xs).sum(-1)  # (n, k)
        ey = (p.sum(dim=3) * ys).sum(-1)
        return torch.stack([ex, ey], dim=-1).reshape(n, 2 * k)


class ImageEncoder(nn.Module):
    """uint8 RGB images (N, H, W, 3) -> float32 features (N, feature_dim).

    Pixels are scaled to [-1, 1]. With ``crop`` = (h, w), training mode takes an independent random crop per image
    (the augmentation used by Diffusion Policy) and eval mode the center crop. Stem: 5x5 stride-2 conv + GN + ReLU;
    then one residual block per entry of ``channels`` (stride 2 after the first); spatial softmax; linear.
    """

    def __init__(self, channels: list[int], num_keypoints: int, feature_dim: int, n_groups: int,
                 crop: list[int] | None = None):
        super().__init__()
        self.crop = tuple(crop) if crop else None
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 5, 2, 2, bias=False), nn.GroupNorm(n_groups, c0), nn.ReLU())
        self.blocks = nn.Sequential(*[_ResBlock2d(ci, co, 1 if i == 0 else 2, n_groups)
                                      for i, (ci, co) in enumerate(zip([c0] + channels[:-1], channels))])
        self.keypoints = SpatialSoftmax(channels[-1], num_keypoints)
        self.out = nn.Linear(2 * num_keypoints, feature_dim)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        ch, cw = self.crop
        if self.training:
            oy = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)
            ox = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
            rows = oy + torch.arange(ch, device=x.device).view(1, ch, 1)
            cols = ox + torch.arange(cw, device=x.device).view(1, 1, cw)
            return x[torch.arange(n, device=x.device).view(n, 1, 1), rows, cols]
        oy, ox = (h - ch) // 2, (w - cw) // 2
        return x[:, oy:oy + ch, ox:ox + cw]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._crop(images) if self.crop else images
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.out(self.keypoints(self.blocks(self.stem(x))))


class ObsEncoder(nn.Module):
    """Observation history -> global conditioning vector.

    Per obs step: [normalized low-dim obs in ``config.obs_keys`` order ‖ image features of each camera in
    ``config.image_keys`` order], then flattened over the To steps: output float32 (B, config.cond_dim).

    Image encoders (:class:`ImageEncoder`, ``image_feature_dim`` features per camera and step):
        one per camera (``images[key]``, state-dict names ``images.<key>.*``), or with
        ``config.shared_image_encoder`` a single one (``shared_image``, names ``shared_image.*``) that encodes every
        camera's frames in one batched call. With ``config.freeze_image_encoder`` their parameters have
        ``requires_grad`` False and they stay in eval mode (center crop, whatever ``train()`` says) and run under
        ``torch.no_grad``: training then backpropagates through the rest of the policy only.
    """

    def __init__(self, config):
        super().__init__()
        self.obs_keys, self.image_keys = list(config.obs_keys), list(config.image_keys)
        self.shared = bool(getattr(config, "shared_image_encoder", False))
        self.frozen = bool(getattr(config, "freeze_image_encoder", False))

        def make():
            return ImageEncoder(config.image_channels, config.image_num_keypoints, config.image_feature_dim,
                                config.n_groups, config.image_crop)

        if self.shared and self.image_keys:
            self.shared_image = make()
        else:
            self.images = nn.ModuleDict({k: make() for k in self.image_keys})
        for enc in self.image_encoders():
            enc.requires_grad_(not self.frozen)
        self.train(self.training)  # a frozen encoder is in eval mode from the start

    def image_encoders(self) -> list[ImageEncoder]:
        """The image encoders: one (shared) or one per camera in ``image_keys`` order; empty without cameras."""
        return [self.shared_image] if hasattr(self, "shared_image") else list(self.images.values())

    def train(self, mode: bool = True) -> "ObsEncoder":
        """``nn.Module.train``, except that a frozen image encoder stays in eval mode."""
        super().train(mode)
        for enc in self.image_encoders() if self.frozen else ():
            enc.train(False)
        return self

    def forward(self, obs: dict[str, torch.Tensor], normalizer) -> torch.Tensor:
        """obs: low-dim float (B, To, d_k), images uint8 (B, To, H, W, 3); normalizer: a ``Normalizer``."""
        parts = [normalizer.normalize(k, obs[k]) for k in self.obs_keys]
        if self.image_keys:
            with torch.no_grad() if self.frozen else contextlib.nullcontext():
                parts.extend(self._image_features(obs))
        return torch.cat(parts, dim=-1).flatten(1)

    def _image_features(self, obs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """[(B, To, feature_dim) per camera, in image_keys order]."""
        b, t = obs[self.image_keys[0]].shape[:2]
        if not self.shared:
            return [self.images[k](obs[k].flatten(0, 1)).reshape(b, t, -1) for k in self.image_keys]
        x = torch.cat([obs[k].flatten(0, 1) for k in self.image_keys])  # (n_cameras * B * To, H, W, 3)
        return [f.reshape(b, t, -1) for f in self.shared_image(x).chunk(len(self.image_keys))]


def make_obs_encoder(config) -> ObsEncoder:
    """Build the observation encoder for a ``PolicyConfig`` (one image encoder per camera key, or one shared by all
    cameras with ``shared_image_encoder``)."""
    return ObsEncoder(config)
