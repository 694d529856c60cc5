"""Network parts of a residual policy: actor heads and critics over the residual features ``x`` (B, F) float32
(see :func:`robot_rl.rl.residual.residual_input`).

Actor heads output a residual in *residual units*; :func:`robot_rl.rl.residual.combine` scales it by ``alpha`` and
adds it to the normalized base action. Every actor head's last layer starts at zero, so an untrained head's
deterministic residual is exactly 0 and base + residual executes the base action.

- :class:`GaussianHead`: PPO (Schulman et al. 2017); mean = MLP(x), state-independent log-std (ResiP, Ankile et
  al. 2024). Unbounded residual (the executed action is clipped to [-1, 1] in ``combine``).
- :class:`TanhHead`: TD3 (Fujimoto et al. 2018); deterministic ``tanh(MLP(x))`` in [-1, 1] (float32 tanh
  saturates at +-1), so the executed correction is bounded by ``alpha`` per dimension.
- :class:`TanhGaussianHead`: SAC (Haarnoja et al. 2018); ``tanh(u)``, ``u ~ N(mu(x), sigma(x))``, with the
  change-of-variables log-probability (SAC paper, appendix C).
- :class:`VCritic`: state value V(x) for PPO.
- :class:`QEnsemble`: K independent Q(x, a_res) heads with LayerNorm after every hidden layer, evaluated in one
  batched matmul per layer (REDQ, Chen et al. 2021; LayerNorm critics as in RLPD, Ball et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes, act=nn.Tanh) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` through ``sizes`` (no activation after the last layer)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _zero_last(net: nn.Sequential) -> None:
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)


class GaussianHead(nn.Module):
    """PPO actor head: ``N(mean(x), exp(log_std))`` per action dimension, (B, A).

    ``log_std`` (A,) is a free parameter (state-independent), initialised to ``log_std_init``; the mean MLP's
    last layer is zero-initialised (mean 0 before training).
    """

    def __init__(self, in_dim: int, action_dim: int, hidden=(256, 256), log_std_init: float = -1.0):
        super().__init__()
        self.net = mlp([in_dim, *hidden, action_dim])
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))
        _zero_last(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean residual (B, A)."""
        return self.net(x)

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """The executed (evaluation) residual: the mean, (B, A)."""
        return self.net(x)

    def dist(self, x: torch.Tensor) -> torch.distributions.Normal:
        """The action distribution, batch shape (B, A); sum ``log_prob`` over the last dim for the joint."""
        return torch.distributions.Normal(self.net(x), self.log_std.exp().expand(x.shape[0], -1))


class TanhHead(nn.Module):
    """TD3 actor head: deterministic residual ``tanh(MLP(x))`` (B, A), each entry in (-1, 1).

    With ``combine`` the executed correction is at most ``alpha`` per normalized action dimension. Exploration
    noise (and its clipping) belongs to the learner, not the head. Zero-initialised last layer: tanh(0) = 0.
    """

    def __init__(self, in_dim: int, action_dim: int, hidden=(256, 256)):
        super().__init__()
        self.net = mlp([in_dim, *hidden, action_dim])
        _zero_last(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x))

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """Residual (B, A) in (-1, 1)."""
        return self.forward(x)


class TanhGaussianHead(nn.Module):
    """SAC actor head: ``a = tanh(u)``, ``u ~ N(mu(x), exp(log_std(x)))``; a (B, A) in (-1, 1).

    One MLP outputs ``[mu, log_std]`` (2A); its last layer's weights are zero and its bias is 0 for ``mu`` and
    ``log_std_init`` for ``log_std``, so before training mu = 0 (deterministic residual tanh(0) = 0) and the
    exploration std is ``exp(log_std_init)`` everywhere. ``log_std`` is clamped to [log_std_min, log_std_max]
    (SAC's reference implementation uses [-20, 2]; -5 keeps the log-probability finite in float32).
    """

    def __init__(self, in_dim: int, action_dim: int, hidden=(256, 256), log_std_init: float = -1.0,
                 log_std_min: float = -5.0, log_std_max: float = 2.0):
        super().__init__()
        self.action_dim, self.log_std_min, self.log_std_max = action_dim, log_std_min, log_std_max
        self.net = mlp([in_dim, *hidden, 2 * action_dim])
        _zero_last(self.net)
        with torch.no_grad():
            self.net[-1].bias[action_dim:] = float(log_std_init)

    def _mu_log_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(x).split(self.action_dim, dim=-1)
        return mu, log_std.clamp(self.log_std_min, self.log_std_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deterministic(x)

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """Residual ``tanh(mu(x))`` (B, A) in (-1, 1)."""
        return torch.tanh(self._mu_log_std(x)[0])

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample (differentiable in the head's parameters) and its log-probability.

        Returns (a (B, A) in (-1, 1), log_prob (B,)): ``log N(u; mu, sigma) - sum log(1 - tanh(u)^2)``, the last
        term computed stably as ``2 (log 2 - u - softplus(-2u))`` (SAC appendix C).
        """
        mu, log_std = self._mu_log_std(x)
        u = mu + log_std.exp() * torch.randn_like(mu)
        logp = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), logp


class VCritic(nn.Module):
    """State-value critic V(x): (B, F) -> (B,). Last layer orthogonal (gain 1), zero bias (PPO implementation
    details, Huang et al. 2022)."""

    def __init__(self, in_dim: int, hidden=(256, 256)):
        super().__init__()
        self.net = mlp([in_dim, *hidden, 1])
        nn.init.orthogonal_(self.net[-1].weight, gain=1.0)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class EnsembleLinear(nn.Module):
    """K independent ``Linear(in_dim, out_dim)`` layers applied to (K, B, in_dim) in one ``baddbmm``.

    Initialised like ``nn.Linear`` per member: weight and bias ~ U(-1/sqrt(in_dim), 1/sqrt(in_dim)).
    """

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))

    def forward(self, h: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """(K, B, in_dim) -> (K, B, out_dim); with ``members`` (k,) int64, only those members: (k, B, in_dim) ->
        (k, B, out_dim)."""
        if members is None:
            return torch.baddbmm(self.bias, h, self.weight)
        return torch.baddbmm(self.bias[members], h, self.weight[members])


class QEnsemble(nn.Module):
    """K action-value heads ``Q_k(x, a_res)``: input ``cat(x (B, F), a_res (B, A))``, output (K, B) float32.

    Each member is ``[EnsembleLinear -> LayerNorm (per-member affine) -> ReLU] * len(hidden) -> EnsembleLinear``;
    members share no parameters (REDQ, Chen et al. 2021, uses K = 10 and a random subset of 2 for the target).
    ``a_res`` is the residual action in residual units (what the actor head outputs).
    """

    def __init__(self, in_dim: int, action_dim: int, hidden=(256, 256), n_heads: int = 10):
        super().__init__()
        self.n_heads = n_heads
        sizes = [in_dim + action_dim, *hidden]
        self.layers = nn.ModuleList(EnsembleLinear(n_heads, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.ln_weight = nn.ParameterList(nn.Parameter(torch.ones(n_heads, 1, h)) for h in hidden)
        self.ln_bias = nn.ParameterList(nn.Parameter(torch.zeros(n_heads, 1, h)) for h in hidden)
        self.out = EnsembleLinear(n_heads, sizes[-1], 1)

    def forward(self, x: torch.Tensor, a_res: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """(K, B) Q values; with ``heads`` (k,) int64 indices, only those heads' (k, B): the REDQ target's subset
        costs k/K of a full forward."""
        k = self.n_heads if heads is None else len(heads)
        h = torch.cat([x, a_res], dim=-1).unsqueeze(0).expand(k, -1, -1)
        for lin, w, b in zip(self.layers, self.ln_weight, self.ln_bias):
            if heads is not None:
                w, b = w[heads], b[heads]
            h = lin(h, heads)
            h = F.relu(F.layer_norm(h, h.shape[-1:]) * w + b)
        return self.out(h, heads).squeeze(-1)
