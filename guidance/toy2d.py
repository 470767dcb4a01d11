"""2-D Gaussian mixtures with exact scores and densities at every noise level, and grid metrics.

`Mixture2D` is the project's `GaussianMixtureModel` testbed in two dimensions (same denoiser, same UNet-like
call) plus the exact log density log p_t(x) = logsumexp_k [log w_k + log N(x; alpha mu_k,
(alpha^2 s_k^2 + sigma^2) I)] and the closed-form product of two mixtures. Targets that are not mixtures
(p^beta) are evaluated on a grid; sample quality is the KL divergence between the (weighted) histogram of the
samples and the target's cell probabilities on that grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samplers.testbeds import GaussianMixtureModel


class Mixture2D(GaussianMixtureModel):
    """Isotropic 2-D Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) as an exact-score model."""

    def __init__(self, means: Any, std: float | Any = 0.5, weights: Any = None, **kwargs: Any):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.shape[1] != 2:
            raise ValueError(f"means must have shape (K, 2), got {tuple(means.shape)}")
        super().__init__(shape=(2,), means=means, std=std, weights=weights, **kwargs)

    def log_prob(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """log p_t(x) for x of shape (N, 2); ``t=None`` is the data distribution."""
        alpha, sigma = (1.0, 0.0) if t is None else (float(v) for v in self.schedule.alpha_sigma(t))
        x = x.to(torch.float64)
        var = alpha**2 * self.vars.to(x.device) + sigma**2  # (K,)
        d2 = (x[:, None, :] - alpha * self.means.to(x.device)[None]).square().sum(-1)
        log_n = -0.5 * d2 / var - torch.log(2 * math.pi * var)
        return torch.logsumexp(self.log_w.to(x.device) + log_n, dim=1)

    def product(self, other: Mixture2D) -> Mixture2D:
        """The normalised product p q of two mixtures, itself a mixture: N(m1, v1) N(m2, v2) =
        N(m1; m2, v1 + v2) N((v2 m1 + v1 m2) / (v1 + v2), v1 v2 / (v1 + v2))."""
        v1, v2 = self.vars[:, None], other.vars[None, :]
        m1, m2 = self.means[:, None, :], other.means[None, :, :]
        tot = v1 + v2
        log_c = -0.5 * (m1 - m2).square().sum(-1) / tot - torch.log(2 * math.pi * tot)
        log_w = self.log_w[:, None] + other.log_w[None, :] + log_c
        means = (v2[..., None] * m1 + v1[..., None] * m2) / tot[..., None]
        return Mixture2D(means.reshape(-1, 2), std=(v1 * v2 / tot).sqrt().reshape(-1),
                         weights=torch.softmax(log_w.reshape(-1), 0), schedule=self.schedule,
                         prediction_type=self.prediction_type)


def grid_centers(limit: float, bins: int) -> torch.Tensor:
    """Centres (bins^2, 2) of a bins x bins grid on [-limit, limit]^2, row-major in (x, y)."""
    edges = torch.linspace(-limit, limit, bins + 1, dtype=torch.float64)
    c = 0.5 * (edges[1:] + edges[:-1])
    return torch.cartesian_prod(c, c)


def cell_probabilities(log_density: torch.Tensor) -> torch.Tensor:
    """Normalised cell probabilities from unnormalised log densities at the cell centres."""
    return torch.softmax(log_density.reshape(-1).double(), 0)


def histogram(samples: torch.Tensor, limit: float, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cell probabilities of (weighted) 2-D samples on the grid of `grid_centers`; mass outside is dropped."""
    x = samples.reshape(-1, 2).double().cpu()
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.reshape(-1).double().cpu()
    idx = torch.floor((x + limit) / (2 * limit) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    flat = idx[inside, 0] * bins + idx[inside, 1]
    counts = torch.zeros(bins * bins, dtype=torch.float64).index_add_(0, flat, w[inside])
    return counts / w.sum()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) = sum_{p > 0} p log(p / q) over grid cells (p: samples' histogram, q: target)."""
    mask = p > 0
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


def sample_cells(probabilities: torch.Tensor, n: int, limit: float, bins: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact draws from a gridded density (cell by probability, then uniform within the cell)."""
    cells = torch.multinomial(probabilities, n, replacement=True, generator=generator)
    width = 2 * limit / bins
    corner = torch.stack([cells // bins, cells % bins], 1).double() * width - limit
    return corner + width * torch.rand(n, 2, generator=generator, dtype=torch.float64)
