"""A small learned diffusion model whose true data distribution is known exactly.

Approximation error (what Time-Shift and DualFast correct) exists only with a learned network, and distribution
distances are exact only if the data distribution is known. The shipped model is a diffusers ``UNet2DModel``
(epsilon prediction, linear betas, 1000 steps) trained by ``scripts/train_learned_model.py`` on samples of a
fixed `GaussianMixtureModel`. The asset folder has the ``DDPMPipeline`` layout (``model_index.json``, ``unet/``,
``scheduler/``) plus ``mixture.json`` describing the mixture and the training run.

Metrics against the true distribution p = sum_k w_k N(mu_k, s_k^2 I):

* exact moments: mean = sum_k w_k mu_k, cov = sum_k w_k (s_k^2 I + mu_k mu_k^T) - mean mean^T;
* pixel-space Frechet distance of samples to those moments (`samplers.evaluation.fid.frechet_distance`);
* exact log-likelihood log p(x) = logsumexp_k [log w_k + log N(x; mu_k, s_k^2 I)];
* per-sample spread around the most likely component, |x - mu_k|^2 / (D s_k^2): 1 for data, > 1 noisy, < 1 blurred.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from ..evaluation.quality import pixel_frechet
from .models import GaussianMixtureModel

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "learned_mixture16"
MIXTURE_FILE = "mixture.json"
REGENERATE = "python scripts/train_learned_model.py"
REQUIRED_FILES = ("model_index.json", MIXTURE_FILE, "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "scheduler/scheduler_config.json")
MIXTURE_KEYS = ("shape", "num_components", "std", "seed", "fingerprint", "scheduler")

__all__ = [
    "ASSET_DIR",
    "LearnedModelError",
    "distribution_metrics",
    "eps_error",
    "frechet_distance_to_mixture",
    "load_learned_model",
    "mixture_fingerprint",
    "mixture_from_spec",
    "mixture_log_prob",
    "mixture_moments",
    "spread_ratio",
]


class LearnedModelError(ValueError):
    """The shipped learned-model folder is corrupt or inconsistent; the message says how to regenerate it."""


def mixture_fingerprint(mixture: GaussianMixtureModel) -> list[float]:
    """[sum mu, sum mu^2, sum s_k^2, sum w_k mu_k[0]]: detects a mixture that no longer matches the weights."""
    w = mixture.log_w.exp()
    return [float(mixture.means.sum()), float(mixture.means.square().sum()), float(mixture.vars.sum()),
            float(w @ mixture.means[:, 0])]


def mixture_from_spec(spec: Mapping[str, Any]) -> GaussianMixtureModel:
    """Rebuild the exact mixture of ``mixture.json`` (with the noise schedule the UNet was trained on)."""
    return GaussianMixtureModel.for_scheduler_config(
        spec["scheduler"], shape=tuple(spec["shape"]), num_components=int(spec["num_components"]),
        std=float(spec["std"]), seed=int(spec["seed"]))


def _corrupt(path: Path, what: str) -> LearnedModelError:
    return LearnedModelError(f"learned model folder {path} is corrupt: {what}. Regenerate it with `{REGENERATE}`.")


def _read_mixture_spec(path: Path) -> dict[str, Any]:
    file = path / MIXTURE_FILE
    try:
        spec = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, f"{file.name} is not valid JSON ({err})") from err
    if not isinstance(spec, dict):
        raise _corrupt(path, f"{file.name} must hold a JSON object, got {type(spec).__name__}")
    missing = [k for k in MIXTURE_KEYS if k not in spec]
    if missing:
        raise _corrupt(path, f"{file.name} lacks the keys {missing}")
    return spec


def load_learned_model(path: str | Path | None = None,
                       device: str | torch.device = "cpu") -> tuple[UNet2DModel, GaussianMixtureModel]:
    """Load the shipped UNet (offline, ``from_pretrained`` on a local folder) and rebuild its exact training mixture.

    Returns ``(unet, mixture)``: ``unet`` in eval mode on ``device``; ``mixture`` is the exact-score model of the
    data distribution with the same noise schedule and prediction type, so ``mixture(x, t).sample`` is the eps
    that a perfect network would output. Raises FileNotFoundError if files are missing, LearnedModelError if
    they are corrupt; both messages say how to regenerate the folder.
    """
    path = Path(ASSET_DIR if path is None else path).expanduser()
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"learned model folder {path} is missing {missing}. "
                                f"Regenerate it with `{REGENERATE}` (or pass the folder it wrote).")
    spec = _read_mixture_spec(path)
    try:
        unet = UNet2DModel.from_pretrained(str(path), subfolder="unet", local_files_only=True)
    except Exception as err:  # diffusers raises OSError, ValueError, RuntimeError or safetensors errors
        raise _corrupt(path, f"the UNet does not load ({type(err).__name__}: {err})") from err
    try:
        mixture = mixture_from_spec(spec)
    except (TypeError, ValueError, KeyError) as err:
        raise _corrupt(path, f"{MIXTURE_FILE} does not describe a mixture ({type(err).__name__}: {err})") from err
    if not np.allclose(mixture_fingerprint(mixture), spec["fingerprint"], rtol=1e-9, atol=1e-9):
        raise _corrupt(path, f"the mixture rebuilt from {MIXTURE_FILE} has fingerprint {mixture_fingerprint(mixture)}"
                             f", expected {spec['fingerprint']} (did samplers.testbeds change?)")
    if tuple(spec["shape"]) != (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size):
        raise _corrupt(path, f"mixture shape {spec['shape']} does not match the UNet's input")
    return unet.to(device).eval(), mixture.to(device)


def mixture_moments(mixture: GaussianMixtureModel) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance (float64): mean = sum w mu, cov = sum w (s^2 I + mu mu^T) - mean mean^T."""
    w = mixture.log_w.exp().cpu()
    means, var = mixture.means.cpu(), mixture.vars.cpu()
    mean = w @ means
    cov = (means.T * w) @ means + torch.diag(torch.full_like(mean, float(w @ var))) - torch.outer(mean, mean)
    return mean.numpy(), cov.numpy()


def mixture_log_prob(x: torch.Tensor, mixture: GaussianMixtureModel) -> torch.Tensor:
    """Exact log density log p(x) per sample (float64): logsumexp_k [log w_k - |x - mu_k|^2 / (2 s_k^2)
    - D/2 log(2 pi s_k^2)]."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    means, var = mixture.means.to(flat.device), mixture.vars.to(flat.device)
    if flat.shape[1] != means.shape[1]:
        raise ValueError(f"samples have {flat.shape[1]} values each, the mixture has dimension {means.shape[1]}")
    d2 = torch.cdist(flat, means).square()
    log_n = -0.5 * d2 / var - 0.5 * flat.shape[1] * torch.log(2 * math.pi * var)
    return torch.logsumexp(mixture.log_w.to(flat.device) + log_n, dim=1)


def spread_ratio(x: torch.Tensor, mixture: GaussianMixtureModel) -> torch.Tensor:
    """Per sample (float64): |x - mu_k|^2 / (D s_k^2) for its most likely component k, i.e. how far the sample
    lies from that component's mean relative to the component's own samples. About 1 for samples of the data;
    above 1: leftover noise; below 1: over-smoothed (pulled towards a mean). ValueError on a dimension mismatch."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    means, var = mixture.means.to(flat.device), mixture.vars.to(flat.device)
    if flat.shape[1] != means.shape[1]:
        raise ValueError(f"samples have {flat.shape[1]} values each, the mixture has dimension {means.shape[1]}")
    d2 = torch.cdist(flat, means).square()
    k = (mixture.log_w.to(flat.device) - 0.5 * d2 / var - 0.5 * flat.shape[1] * torch.log(var)).argmax(1)
    return d2.gather(1, k[:, None])[:, 0] / (flat.shape[1] * var[k])


def _flat_numpy(samples: torch.Tensor, dim: int) -> np.ndarray:
    flat = samples.detach().reshape(samples.shape[0], -1).to(torch.float64).cpu().numpy()
    if flat.shape[1] != dim:
        raise ValueError(f"samples have {flat.shape[1]} values each, the mixture has dimension {dim}")
    if flat.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {flat.shape[0]}")
    return flat


@lru_cache(maxsize=4)
def _cached_moments(mixture: GaussianMixtureModel) -> tuple[np.ndarray, np.ndarray]:
    """`mixture_moments`, cached per mixture object."""
    return mixture_moments(mixture)


def frechet_distance_to_mixture(samples: torch.Tensor, mixture: GaussianMixtureModel) -> float:
    """Pixel-space Frechet distance between the samples' mean/covariance (S1) and the mixture's exact moments (S2):
    |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), by `samplers.evaluation.fid.frechet_distance` (pytorch-fid's
    numerics) through `samplers.evaluation.quality.pixel_frechet`.

    Estimated from N samples it is biased upward (for true samples with cov = c I, by about c D (D/4 + 1) / N),
    so only compare values computed from the same N; the value of N true samples is the floor.
    """
    mean, cov = _cached_moments(mixture)
    return pixel_frechet(_flat_numpy(samples, mean.shape[0]), mean, cov)


def distribution_metrics(samples: torch.Tensor, mixture: GaussianMixtureModel) -> dict[str, float]:
    """``pixel_fd``: Frechet distance to the true distribution at full resolution (the sweep's ``pixel_fd`` with
    no pooling), and ``loglik_per_dim``: mean exact log-likelihood per dimension (nats)."""
    dim = mixture.means.shape[1]
    return {"pixel_fd": frechet_distance_to_mixture(samples, mixture),
            "loglik_per_dim": float(mixture_log_prob(samples, mixture).mean()) / dim}


@torch.no_grad()
def eps_error(unet: torch.nn.Module, mixture: GaussianMixtureModel, timesteps: Sequence[int],
              num_samples: int = 256, seed: int = 0) -> list[dict[str, float]]:
    """Approximation error of a network against the exact mixture eps at ``timesteps``.

    x_t = alpha_t x0 + sigma_t eps with x0 from the mixture; returns per timestep the RMS of
    (network eps - exact eps) and the RMS of the exact eps.
    """
    if mixture.prediction_type != "epsilon":
        raise ValueError(f"eps_error needs an epsilon-prediction mixture, got {mixture.prediction_type!r}")
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample_data(num_samples, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    device = next(unet.parameters()).device
    rows = []
    for t in timesteps:
        alpha, sigma = (float(v) for v in mixture.schedule.alpha_sigma(float(t)))
        x = alpha * x0 + sigma * noise
        exact = mixture(x, t).sample
        learned = unet(x.to(device, torch.float32), t).sample.to("cpu", torch.float64)
        rows.append({"timestep": float(t), "rms_error": float((learned - exact).square().mean().sqrt()),
                     "rms_exact": float(exact.square().mean().sqrt())})
    return rows
