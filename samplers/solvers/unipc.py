"""UniPC (Zhao et al. 2023, arXiv 2302.04867) as coefficient formulas.

Every update is linear in the state and the buffered model outputs, so each function returns ``(a, b)`` in
float64: x_t = a * x_s + sum_j b[j] * M_j. Notation (paper Sec. 3): h = lambda_t - lambda_s,
r_m = (lambda_{s_m} - lambda_s) / h for the older points s_m, D_m = (M_m - M_0) / r_m.

With data prediction (``predict_x0=True``, the paper's UniP / UniC written on x0), hh = -h and
x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{hh} - 1) M_0 - alpha_t B(h) sum_m rho_m D_m;
with noise prediction, hh = h and alpha <-> sigma swap roles. B(h) = hh ("bh1") or e^{hh} - 1 ("bh2").
The rho_m solve sum_m rho_m r_m^{k-1} = k! g_k(hh) / B(h), k = 1..p (the order conditions of the paper's Thm 3.1), where
g_k(hh) = sum_{j>=1} hh^j / (j + k)! (= h phi_{k+1} up to sign conventions). Only the products
B(h) rho_m enter an update, so they are solved for directly: this keeps the step to sigma = 0 finite
(diffusers multiplies B(h) = -inf by an empty residual 0 there and returns NaN with bh1).
Like the official code and diffusers, UniP-2 and UniC-1 use the simplified rho = 1/2.
"""

from __future__ import annotations

import math

import numpy as np

SOLVER_TYPES = ("bh1", "bh2")


def g_coefficients(hh: float, order: int) -> np.ndarray:
    """k! g_k(hh) for k = 1..order: the right-hand side of the UniPC order conditions times B(h) (Thm 3.1).

    Computed by the recursion g_1 = (e^{hh} - 1) / hh - 1, g_{k+1} = g_k / hh - 1 / (k + 1)! for |hh| >= 1/2
    and by the series sum_{j>=1} hh^j / (j + k)! below (the recursion cancels catastrophically as hh -> 0)."""
    out = np.empty(order)
    if abs(hh) < 0.5:
        for k in range(1, order + 1):
            out[k - 1] = math.factorial(k) * sum(hh**j / math.factorial(j + k) for j in range(1, 25))
        return out
    g = math.expm1(hh) / hh - 1.0
    for k in range(1, order + 1):
        out[k - 1] = math.factorial(k) * g
        g = g / hh - 1.0 / math.factorial(k + 1)
    return out


def b_of_h(hh: float, solver_type: str) -> float:
    """B(h) of the paper: hh for "bh1", e^{hh} - 1 for "bh2"."""
    if solver_type == "bh1":
        return hh
    if solver_type == "bh2":
        return math.expm1(hh)
    raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")


def _exponential_part(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, h: float,
                      predict_x0: bool) -> tuple[float, float, float, float]:
    """(a, c0, mult, hh): x_t = a x_s + c0 M_0 + mult * (B(h)-weighted differences), the first-order part
    (DDIM in data or noise form); limits taken at sigma_t = 0 (h = inf)."""
    if predict_x0:
        c0 = alpha_t if math.isinf(h) else -alpha_t * math.expm1(-h)
        return sigma_t / sigma_s, c0, -alpha_t, -h
    c0 = -(alpha_t * sigma_s / alpha_s - sigma_t) if math.isinf(h) else -sigma_t * math.expm1(h)
    return alpha_t / alpha_s, c0, -sigma_t, h


def _weighted_differences(w: np.ndarray, rks: np.ndarray) -> np.ndarray:
    """Coefficients on (M_0, M_1, ..., M_{p-1}) of sum_m w_m (M_m - M_0) / r_m."""
    b = np.zeros(len(rks) + 1)
    b[1:] = w / rks
    b[0] = -b[1:].sum()
    return b


def predictor(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, h: float, rks: np.ndarray,
              solver_type: str, predict_x0: bool = True) -> tuple[float, np.ndarray]:
    """UniP-p (paper Sec. 3.2), p = len(rks) + 1, on history (M_0, ..., M_{p-1}) newest first.

    rks = (r_1, ..., r_{p-1}); p = 2 uses rho = 1/2, p >= 3 solves the p - 1 order conditions."""
    rks = np.asarray(rks, dtype=np.float64)
    order = len(rks) + 1
    a, c0, mult, hh = _exponential_part(alpha_t, sigma_t, alpha_s, sigma_s, h, predict_x0)
    if order == 1:
        return a, np.array([c0])
    if math.isinf(h):
        raise ValueError("the step to sigma = 0 must be first order (UniP-p > 1 is undefined at h = inf)")
    if order == 2:
        w = np.array([0.5 * b_of_h(hh, solver_type)])
    else:
        w = np.linalg.solve(np.vander(rks, increasing=True).T, g_coefficients(hh, order - 1))
    b = mult * _weighted_differences(w, rks)
    b[0] += c0
    return a, b


def corrector(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, h: float, rks: np.ndarray,
              solver_type: str, predict_x0: bool = True) -> tuple[float, np.ndarray]:
    """UniC-p (paper Sec. 3.1), p = len(rks) + 1: re-computes x_t from x_s with the model output M_t at
    the predicted x_t. History order: (M_t, M_0, M_1, ..., M_{p-1}). p = 1 uses rho = 1/2."""
    rks = np.asarray(rks, dtype=np.float64)
    order = len(rks) + 1
    a, c0, mult, hh = _exponential_part(alpha_t, sigma_t, alpha_s, sigma_s, h, predict_x0)
    if math.isinf(h):
        raise ValueError("UniC is undefined for the step to sigma = 0 (h = inf)")
    if order == 1:
        w = np.array([0.5 * b_of_h(hh, solver_type)])
    else:
        nodes = np.append(rks, 1.0)
        w = np.linalg.solve(np.vander(nodes, increasing=True).T, g_coefficients(hh, order))
    diff = mult * _weighted_differences(w, np.append(rks, 1.0))
    b = np.zeros(order + 1)
    b[0] = diff[-1]  # M_t enters as the node r = 1
    b[1] = c0 + diff[0]
    b[2:] = diff[1:-1]
    return a, b
