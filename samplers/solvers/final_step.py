"""A final step of order k to sigma = 0 from a multistep history (rhoAB in the limit rho_t -> 0).

In v = x / alpha and rho = sigma / alpha the probability-flow ODE is dv / drho = eps (DEIS, Zhang & Chen 2022,
Sec. 4), so the jump from the last evaluation rho_0 to the data end rho = 0 (alpha = 1) is

    x_0 = x / alpha_0 - int_0^{rho_0} eps(rho) drho.

With eps replaced by the Lagrange polynomial in rho through the last k evaluations the integral is finite and
exact by Gauss-Legendre quadrature on [0, rho_0]; in lambda = -log rho the same step is singular for k >= 2
(r = h_prev / h -> 0 as h -> inf). k = 1 is DDIM's x_0 = D_0. For a data-prediction history the noise at
evaluation j is eps_j = (X_j - alpha_j D_j) / sigma_j, so the step also needs the states X_j the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .deis import gauss_legendre, lagrange_basis


@dataclass(frozen=True)
class FinalStep:
    """x_0 = a * x + sum_j states[j] * X_j + sum_j b[j] * M_j: x the current state, X_j the states at which the
    model was evaluated and M_j its converted outputs (x0 or eps), both newest first."""

    a: float
    states: np.ndarray
    b: np.ndarray

    @property
    def points(self) -> int:
        """k, the number of evaluations the step uses."""
        return len(self.b)


def rho_coefficients(rho: Sequence[float]) -> np.ndarray:
    """c_j = int_{rho_0}^{0} l_j(r) dr, l_j the Lagrange basis in rho through ``rho`` (newest first, rho_0 > 0)."""
    rho = np.asarray(rho, dtype=np.float64)
    if rho.ndim != 1 or len(rho) == 0 or not np.all(rho > 0.0) or len(np.unique(rho)) != len(rho):
        raise ValueError(f"the final step needs distinct evaluation points with rho > 0, got {rho.tolist()}")
    r, w = gauss_legendre(np.array([rho[0], 0.0]), points=len(rho))
    return lagrange_basis(r, rho) @ w


def final_step(alpha: Sequence[float], sigma: Sequence[float], history_kind: str) -> FinalStep:
    """The k-point step to sigma = 0 from evaluations at (alpha_j, sigma_j), newest first (k = len(alpha))."""
    alpha, sigma = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    c = rho_coefficients(sigma / alpha)
    if history_kind == "noise":
        return FinalStep(1.0 / alpha[0], np.zeros(0), c)
    if history_kind == "data":
        return FinalStep(1.0 / alpha[0], c / sigma, -c * alpha / sigma)
    raise ValueError(f"history_kind must be 'data' or 'noise', got {history_kind!r}")
