"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) as coefficient formulas.

Every update is linear: x_t = a * x_s + sum_j b[j] * D_j (+ c * z for the SDE variant), where D_0, D_1, ...
are the data predictions x0 at the newest, previous, ... evaluated points. The functions below return
``(a, b)`` (and ``c``) in float64 from the grid values; the scheduler applies them to tensors. Notation:
h = lambda_t - lambda_s, e = expm1(-h) (e^{-h} - 1 without cancellation).

``solver_type`` follows diffusers: ``"midpoint"`` is the paper's Algorithm 2 (D = D0 + (D0 - D1) / (2 r)),
``"heun"`` uses the phi_2 weight (e / h + 1) on the first divided difference.
"""

from __future__ import annotations

import math

import numpy as np

SOLVER_TYPES = ("midpoint", "heun")


def _expm1_neg(h: float) -> float:
    return -1.0 if math.isinf(h) else math.expm1(-h)


def _phi2(h: float) -> float:
    """alpha-free weight of the first divided difference, (e^{-h} - 1) / h + 1."""
    return 1.0 if math.isinf(h) else _expm1_neg(h) / h + 1.0


def _phi3(h: float) -> float:
    """(e^{-h} - 1 + h) / h^2 - 1/2, the weight of the second divided difference."""
    return -0.5 if math.isinf(h) else (_expm1_neg(h) + h) / h**2 - 0.5


def first_order(alpha_t: float, sigma_t: float, sigma_s: float, h: float) -> tuple[float, np.ndarray]:
    """DPM-Solver++(1) = DDIM: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_0  (paper eq. 5 with k=1)."""
    return sigma_t / sigma_s, np.array([-alpha_t * _expm1_neg(h)])


def _second_order(alpha_t: float, h: float, base: np.ndarray, d1: np.ndarray, solver_type: str) -> np.ndarray:
    """x0 weights of a second-order step expanded at ``base`` with first divided difference ``d1``."""
    e = _expm1_neg(h)
    if solver_type == "midpoint":
        return -alpha_t * e * base - 0.5 * alpha_t * e * d1
    return -alpha_t * e * base + alpha_t * _phi2(h) * d1


def multistep_second(
    alpha_t: float, sigma_t: float, sigma_s: float, h: float, h_prev: float, solver_type: str
) -> tuple[float, np.ndarray]:
    """DPM-Solver++(2M), Algorithm 2: r = h_prev / h, D1 = (D_0 - D_1) / r, expanded at D_0."""
    m = np.eye(2)
    r = h_prev / h
    return sigma_t / sigma_s, _second_order(alpha_t, h, m[0], (m[0] - m[1]) / r, solver_type)


def multistep_third(
    alpha_t: float, sigma_t: float, sigma_s: float, h: float, h_0: float, h_1: float
) -> tuple[float, np.ndarray]:
    """DPM-Solver++(3M): second divided difference with phi_2, phi_3 weights (r0 = h_0 / h, r1 = h_1 / h)."""
    m = np.eye(3)
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    b = -alpha_t * _expm1_neg(h) * m[0] + alpha_t * _phi2(h) * d1 - alpha_t * _phi3(h) * d2
    return sigma_t / sigma_s, b


def singlestep_second(
    alpha_t: float, sigma_t: float, sigma_s: float, h: float, h_mid: float, solver_type: str
) -> tuple[float, np.ndarray]:
    """DPM-Solver++(2S) from the anchor s through one intermediate point (h_mid = lambda_mid - lambda_s).

    History order: D_0 at the intermediate point, D_1 at the anchor. r = h_mid / h, expanded at the anchor.
    """
    m = np.eye(2)
    r = h_mid / h
    return sigma_t / sigma_s, _second_order(alpha_t, h, m[1], (m[0] - m[1]) / r, solver_type)


def singlestep_third(
    alpha_t: float, sigma_t: float, sigma_s: float, h: float, h_mid0: float, h_mid1: float, solver_type: str
) -> tuple[float, np.ndarray]:
    """DPM-Solver++(3S) from the anchor s through two intermediate points.

    History order: D_0 at the second intermediate (h_mid0 = its lambda - lambda_s), D_1 at the first
    (h_mid1), D_2 at the anchor. ``midpoint`` uses only the newest difference (Lu et al. 2022, Alg. 1 style);
    ``heun`` adds the second divided difference.
    """
    m = np.eye(3)
    r0, r1 = h_mid0 / h, h_mid1 / h
    d1_0, d1_1 = (m[1] - m[2]) / r1, (m[0] - m[2]) / r0
    e = _expm1_neg(h)
    if solver_type == "midpoint":
        b = -alpha_t * e * m[2] + alpha_t * _phi2(h) * d1_1
    else:
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        b = -alpha_t * e * m[2] + alpha_t * _phi2(h) * d1 - alpha_t * _phi3(h) * d2
    return sigma_t / sigma_s, b


def sde_first_order(alpha_t: float, sigma_t: float, sigma_s: float, h: float) -> tuple[float, np.ndarray, float]:
    """SDE-DPM-Solver++(1): x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D_0
    + sigma_t sqrt(1 - e^{-2h}) z."""
    one_minus = 1.0 if math.isinf(h) else -math.expm1(-2.0 * h)
    decay = 0.0 if math.isinf(h) else math.exp(-h)
    return sigma_t / sigma_s * decay, np.array([alpha_t * one_minus]), sigma_t * math.sqrt(one_minus)


def sde_second_order(
    alpha_t: float, sigma_t: float, sigma_s: float, h: float, h_prev: float, solver_type: str
) -> tuple[float, np.ndarray, float]:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, eq. for the SDE solver; diffusers' form)."""
    m = np.eye(2)
    d1 = (m[0] - m[1]) / (h_prev / h)
    a, b0, c = sde_first_order(alpha_t, sigma_t, sigma_s, h)
    one_minus = b0[0] / alpha_t
    if solver_type == "midpoint":
        b = alpha_t * one_minus * m[0] + 0.5 * alpha_t * one_minus * d1
    else:
        b = alpha_t * one_minus * m[0] + alpha_t * (one_minus / (-2.0 * h) + 1.0) * d1
    return a, b, c


def singlestep_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each evaluation of a singlestep solver: groups [1, 2, ..., order] (diffusers' order list)."""
    group = list(range(1, order + 1))
    full, rest = divmod(num_steps, order)
    if not lower_order_final:
        return (group * full + group[:rest])[:num_steps]
    if rest == 0 and order > 1:
        orders = group * (full - 1) + list(range(1, order)) + [1]
    else:
        orders = group * full + group[:rest]
    return orders
