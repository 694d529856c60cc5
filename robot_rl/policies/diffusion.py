"""Diffusion Policy (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning via Action Diffusion", RSS):
a conditional 1-D temporal U-Net denoises a T-step action sequence conditioned on the encoded observation history.

Every residual block is conditioned with FiLM (Perez et al. 2018, "FiLM: Visual Reasoning with a General
Conditioning Layer"): a per-channel scale and bias predicted from [sinusoidal diffusion-step embedding ‖ global obs
conditioning]. Training uses diffusers' ``DDPMScheduler`` (squaredcos_cap_v2, 100 steps, clip_sample); inference runs
``DDIMScheduler`` (Song et al. 2021) built from the same config with ``num_inference_steps`` deterministic (eta=0)
steps. Weights are averaged with diffusers' ``EMAModel`` (warmup power 0.75) — see :func:`make_ema`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn

from robot_rl.policies.base import BasePolicy, PolicyConfig


class SinusoidalEmbedding(nn.Module):
    """Diffusion step (N,) int/float -> (N, dim) [sin ‖ cos] embedding (Vaswani et al. 2017 frequencies)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / (half - 1 if half > 1 else 1)))
        arg = t.float()[:, None] * freq[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm -> Mish on (N, C, T)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), nn.Mish())


class FiLMResidualBlock(nn.Module):
    """x (N, c_in, T), cond (N, cond_dim) -> (N, c_out, T): block1 -> FiLM(scale, bias) -> block2, + residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        return self.block2(scale * self.block1(x) + bias) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """1-D temporal U-Net over the action sequence (Chi et al. 2023, Fig. / Sec. "CNN-based Diffusion Policy").

    forward(sample (N, T, A), timestep (N,) or scalar, global_cond (N, cond_dim)) -> (N, T, A).
    Levels ``down_dims``: two FiLM residual blocks each, stride-2 conv downsampling between levels, two mid blocks,
    mirrored up path with skip connections and transposed-conv upsampling. T must be divisible by 2**(levels-1).
    """

    def __init__(self, action_dim: int, cond_dim: int, down_dims: list[int], kernel_size: int, n_groups: int,
                 step_embed_dim: int):
        super().__init__()
        d = step_embed_dim
        self.step_encoder = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))
        c = d + cond_dim
        dims = [action_dim, *down_dims]
        n = len(down_dims)

        def res(i, o):
            return FiLMResidualBlock(i, o, c, kernel_size, n_groups)

        self.down = nn.ModuleList(
            nn.ModuleList([res(i, o), res(o, o), nn.Conv1d(o, o, 3, 2, 1) if lvl < n - 1 else nn.Identity()])
            for lvl, (i, o) in enumerate(zip(dims[:-1], dims[1:])))
        self.mid = nn.ModuleList([res(dims[-1], dims[-1]), res(dims[-1], dims[-1])])
        ups = list(zip(down_dims[:-1], down_dims[1:]))[::-1]  # (i, o) pairs of the down path, deepest first
        self.up = nn.ModuleList(
            nn.ModuleList([res(2 * o, i), res(i, i), nn.ConvTranspose1d(i, i, 4, 2, 1)]) for i, o in ups)
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        x = sample.transpose(1, 2)
        t = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        cond = torch.cat([self.step_encoder(t), global_cond], dim=-1)
        skips = []
        for r1, r2, down in self.down:
            x = r2(r1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for r in self.mid:
            x = r(x, cond)
        for r1, r2, up in self.up:
            x = up(r2(r1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final(x).transpose(1, 2)


class DiffusionPolicy(BasePolicy):
    """Diffusion Policy over normalized action sequences (see module docstring and :class:`BasePolicy`).

    Sampling builds nothing mutable per call: the DDIM scheduler's timesteps are set once at construction and
    ``DDIMScheduler.step`` only reads scheduler state, so concurrent / batched ``predict_*`` calls are safe.
    """

    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__(config, stats)
        c = self.config
        self.unet = ConditionalUnet1D(c.action_dim, c.cond_dim, c.down_dims, c.kernel_size, c.n_groups,
                                      c.diffusion_step_embed_dim)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                             clip_sample=c.clip_sample, prediction_type=c.prediction_type)
        self.inference_scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        self.inference_scheduler.set_timesteps(c.num_inference_steps)

    def _loss(self, cond, naction):
        noise = torch.randn_like(naction)
        t = torch.randint(0, self.config.num_train_timesteps, (naction.shape[0],), device=naction.device)
        noisy = self.noise_scheduler.add_noise(naction, noise, t)
        pred = self.unet(noisy, t, cond)
        target = {"epsilon": lambda: noise, "sample": lambda: naction,
                  "v_prediction": lambda: self.noise_scheduler.get_velocity(naction, noise, t)}
        return F.mse_loss(pred, target[self.config.prediction_type]())

    def _sample(self, cond, noise, generator):
        shape = (cond.shape[0], self.config.horizon, self.config.action_dim)
        if noise is None:  # drawn on the generator's device, so a CPU seed gives the same noise on any device
            dev = generator.device if generator is not None else cond.device
            noise = torch.randn(shape, generator=generator, device=dev).to(cond.device)
        x = noise
        sched = self.inference_scheduler
        for t in sched.timesteps:
            x = sched.step(self.unet(x, t, cond), t, x).prev_sample
        return x


def make_ema(policy: BasePolicy) -> EMAModel:
    """diffusers ``EMAModel`` over ``policy.parameters()`` with the Diffusion Policy warmup schedule:
    decay = min(1 - (1 + step)**-ema_power, ema_max_decay). Call ``ema.step(policy.parameters())`` after each
    optimizer step and pass ``ema=`` to ``checkpoint.save_policy`` so that the averaged weights are saved.
    """
    c = policy.config
    return EMAModel(policy.parameters(), decay=c.ema_max_decay, min_decay=0.0, use_ema_warmup=True, inv_gamma=1.0,
                    power=c.ema_power)
