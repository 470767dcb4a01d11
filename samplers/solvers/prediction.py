"""Model-output parameterisations and dynamic thresholding.

With x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0 (Salimans & Ho 2022):
x0 = (x - sigma eps) / alpha = alpha x - sigma v, eps = (x - alpha x0) / sigma = sigma x + alpha v.
A flow-matching model predicts the velocity u = eps - x0 (``flow_prediction``); from x = (alpha + sigma) x0 +
sigma u: x0 = (x - sigma u) / (alpha + sigma), eps = (x + alpha u) / (alpha + sigma) (rectified flow, alpha + sigma
= 1: x0 = x - sigma u, eps = x + (1 - sigma) u). Neither divides by alpha, so both hold at pure noise (alpha = 0).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` unchanged when it is one of diffusers' `PREDICTION_TYPES`, else a ValueError listing them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def to_data(output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """Data prediction x0 from a model output of the given type."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow_prediction":
        return (x - sigma * output) / (alpha + sigma)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def to_noise(output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """Noise prediction eps from a model output of the given type."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * x
    if prediction_type == "sample":
        return (x - alpha * output) / sigma
    if prediction_type == "flow_prediction":
        return (x + alpha * output) / (alpha + sigma)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def from_data(x0: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """The model output of the given type that corresponds to the data prediction x0 (inverse of `to_data`)."""
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x - x0) / sigma
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return (x - (alpha + sigma) * x0) / sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022): per sample s = quantile(|x0|, ratio) clamped to
    [1, max_value]; x0 <- clamp(x0, -s, s) / s."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.maximum(torch.minimum(flat, s), -s) / s
    return flat.reshape(x0.shape).to(dtype)
