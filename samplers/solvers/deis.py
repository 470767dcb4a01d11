"""DEIS (Zhang & Chen 2022, arXiv 2204.13902) as coefficient formulas.

Every DEIS variant integrates the probability-flow ODE written for v = x / alpha in rho = sigma / alpha,
dv / drho = eps (the paper's rho / v change of variables), so a step from grid point s to t is

    x_t = (alpha_t / alpha_s) x_s + alpha_t * sum_j c_j eps_j,

with eps_0, eps_1, ... the noise predictions at the newest, previous, ... points. The variants differ in how
eps is interpolated between points:

* ``tab`` (tAB): Lagrange polynomial in the model time t. The exponential-integrator kernel
  (alpha_t / alpha_tau) (-d log alpha / dtau) / sigma_tau dtau equals alpha_t drho, so
  C_j = alpha_t * int_{rho_s}^{rho_t} l_j(t(rho)) drho, computed by Gauss-Legendre quadrature in log rho
  (split at the knots of a piecewise-defined schedule, where t(rho) has kinks).
* ``rhoab`` (rhoAB): Lagrange polynomial in rho, integrated to roundoff (the integrand is entire in log rho).
* ``logrho``: Lagrange polynomial in log rho (the only variant diffusers' ``DEISMultistepScheduler`` ships).
* ``ipndm``: fixed Adams-Bashforth weights times the DDIM increment rho_t - rho_s (the paper's improved PNDM).
* ``rhork`` (rhoRK): a classical Runge-Kutta method on dv / drho = eps; see `RK_TABLEAUS`.

Paper orders tAB-r / rhoAB-r use r + 1 points; here ``order`` counts points, so ``order=1`` is DDIM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SOLVER_TYPES = ("logrho", "tab", "rhoab", "rhork", "ipndm")

#: iPNDM's Adams-Bashforth weights on eps (newest first) for 1..4 points (as in the official iPNDM)
IPNDM_WEIGHTS = (
    np.array([1.0]),
    np.array([3.0, -1.0]) / 2,
    np.array([23.0, -16.0, 5.0]) / 12,
    np.array([55.0, -59.0, 37.0, -9.0]) / 24,
)

QUADRATURE_POINTS = 16


@dataclass(frozen=True)
class ButcherTableau:
    """Explicit Runge-Kutta method: stage times ``c``, lower-triangular ``a`` (row k has k entries), weights ``b``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    @property
    def stages(self) -> int:
        """Number of stages (model evaluations per step)."""
        return len(self.c)


RK_TABLEAUS: dict[str, ButcherTableau] = {
    "1euler": ButcherTableau((0.0,), ((),), (1.0,)),
    "2heun": ButcherTableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "3kutta": ButcherTableau((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 4 / 6, 1 / 6)),
    "4rk": ButcherTableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                          (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}

#: ``rk_method`` chosen by ``solver_order`` when not given explicitly
RK_BY_ORDER = {1: "1euler", 2: "2heun", 3: "3kutta", 4: "4rk"}


def lagrange_basis(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """l_j(x) = prod_{k != j} (x - x_k) / (x_j - x_k), shape (len(nodes), len(x))."""
    x, nodes = np.asarray(x, dtype=np.float64), np.asarray(nodes, dtype=np.float64)
    out = np.ones((len(nodes), len(x)))
    for j, xj in enumerate(nodes):
        for k, xk in enumerate(nodes):
            if k != j:
                out[j] *= (x - xk) / (xj - xk)
    return out


@lru_cache
def _legendre_nodes(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


def gauss_legendre(edges: np.ndarray, points: int = QUADRATURE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre rule on the panels between consecutive ``edges`` (any direction)."""
    x, w = _legendre_nodes(points)
    lo, hi = edges[:-1, None], edges[1:, None]
    half = 0.5 * (hi - lo)
    return ((lo + hi) / 2 + half * x).ravel(), (half * w).ravel()


def ei_ab_coefficients(
    rho_s: float,
    rho_t: float,
    nodes: np.ndarray,
    coord: Callable[[np.ndarray], np.ndarray],
    breaks: np.ndarray | None = None,
    points: int = QUADRATURE_POINTS,
) -> np.ndarray:
    """c_j = int_{rho_s}^{rho_t} l_j(coord(rho)) drho for the Lagrange basis through ``nodes`` (in coord units).

    Integrated in u = log rho (c_j = int l_j(coord(e^u)) e^u du) with Gauss-Legendre on panels split at
    ``breaks`` (values of log rho where ``coord`` is not smooth). One node gives rho_t - rho_s exactly, which is
    also the only case allowed at rho_t = 0 (the final denoising jump).
    """
    nodes = np.atleast_1d(np.asarray(nodes, dtype=np.float64))
    if len(nodes) == 1 and rho_t == 0.0:
        return np.array([rho_t - rho_s])
    if not (rho_s > 0.0 and rho_t > 0.0):
        raise ValueError(f"multi-point DEIS coefficients need rho > 0 at both ends, got {rho_s} -> {rho_t}")
    u_s, u_t = np.log(rho_s), np.log(rho_t)
    inner = np.array([]) if breaks is None else np.asarray(breaks, dtype=np.float64)
    inner = inner[(inner > min(u_s, u_t)) & (inner < max(u_s, u_t))]
    edges = np.concatenate([[u_s], np.sort(inner)[:: 1 if u_t > u_s else -1], [u_t]])
    u, w = gauss_legendre(edges, points)
    return lagrange_basis(coord(u), nodes) @ (w * np.exp(u))


def ipndm_coefficients(rho_s: float, rho_t: float, num_points: int) -> np.ndarray:
    """iPNDM: c_j = (rho_t - rho_s) * w_j with the fixed Adams-Bashforth weights of ``num_points`` points."""
    return (rho_t - rho_s) * IPNDM_WEIGHTS[num_points - 1]


def rk_stage_rhos(tableau: ButcherTableau, rho_s: float, rho_t: float) -> np.ndarray:
    """rho at each stage: rho_s + c_k (rho_t - rho_s)."""
    return rho_s + np.asarray(tableau.c) * (rho_t - rho_s)


def rk_stage_coefficients(tableau: ButcherTableau, rho_s: float, rho_t: float) -> list[np.ndarray]:
    """Per evaluation k (newest-first over the stage slopes k..0): the increment weights of v that lead to the
    next stage (rows of ``a``) or, after the last stage, to the end point (``b``), each times drho."""
    drho = rho_t - rho_s
    rows = [*tableau.a[1:], tableau.b]
    return [drho * np.asarray(row, dtype=np.float64)[::-1] for row in rows]
