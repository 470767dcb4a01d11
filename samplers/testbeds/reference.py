"""High-accuracy reference solutions of the probability-flow ODE for exact-score models.

The reference integrates in lambda all the way to sigma ~ 0 (lambda_end = 20) with DPM-Solver++(3M) on a
uniform-lambda grid, calling the model's closed-form denoiser at (alpha, sigma) directly, so it is not limited
by the discrete schedule's sigma_min and matches solvers that finish with a jump to sigma = 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..solvers import dpm_solver
from .models import ExactScoreModel, GaussianMixtureModel


def _alpha_sigma(lam: float) -> tuple[float, float]:
    """VP identities: alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda)."""
    return math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))


@torch.no_grad()
def reference_solution(model: ExactScoreModel, x_T: torch.Tensor, t_T: float | None = None, steps: int = 2000,
                       lambda_end: float = 20.0, **denoise_kwargs) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at timestep ``t_T`` (default: the schedule's t_max) to
    sigma = 0, in float64, with ``steps`` DPM-Solver++(3M) steps uniform in lambda."""
    t_T = model.schedule.t_max if t_T is None else t_T
    lams = np.linspace(float(model.schedule.lambda_(t_T)), lambda_end, steps + 1)
    x = x_T.to(torch.float64)
    history: list[torch.Tensor] = []

    def denoise(x: torch.Tensor, lam: float) -> torch.Tensor:
        alpha, sigma = (torch.full((x.shape[0],) + (1,) * (x.ndim - 1), v, dtype=torch.float64, device=x.device)
                        for v in _alpha_sigma(lam))
        return model.denoise(x, alpha, sigma, **denoise_kwargs)

    for i in range(steps):
        (_, s_s), (a_t, s_t) = _alpha_sigma(lams[i]), _alpha_sigma(lams[i + 1])
        history.insert(0, denoise(x, lams[i]))
        del history[3:]
        h = lams[i + 1] - lams[i]
        if len(history) == 1:
            a, b = dpm_solver.first_order(a_t, s_t, s_s, h)
        elif len(history) == 2:
            a, b = dpm_solver.multistep_second(a_t, s_t, s_s, h, lams[i] - lams[i - 1], "heun")
        else:
            a, b = dpm_solver.multistep_third(a_t, s_t, s_s, h, lams[i] - lams[i - 1], lams[i - 1] - lams[i - 2])
        x = a * x + sum(float(c) * d for c, d in zip(b, history))
    # at lambda_end sigma is ~2e-9: finish with the denoiser (an O(sigma^2) jump)
    return denoise(x, lams[-1])


@torch.no_grad()
def flow_reference_solution(model: GaussianMixtureModel, x_1: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """Solve the rectified-flow ODE dx / dsigma = v(x, sigma) from pure noise ``x_1`` (sigma = 1) to sigma = 0 in
    float64 with classical RK4 in u, sigma = u^2 (dx / du = 2 u v(x, u^2): steps dense near the data), using the
    mixture's exact `velocity`."""
    x = x_1.to(torch.float64)
    us = np.linspace(1.0, 0.0, steps + 1)

    def f(x: torch.Tensor, u: float) -> torch.Tensor:
        return 2.0 * u * model.velocity(x, u * u)

    for u0, u1 in zip(us[:-1], us[1:]):
        du = u1 - u0
        k1 = f(x, u0)
        k2 = f(x + 0.5 * du * k1, u0 + 0.5 * du)
        k3 = f(x + 0.5 * du * k2, u0 + 0.5 * du)
        k4 = f(x + du * k3, u1)
        x = x + du / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
