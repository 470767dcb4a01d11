"""Sample quality against a reference: per-sample error quantiles and the pixel Frechet distance.

Per-sample error e_i = ||x_i - x_ref,i|| / sqrt(D) to a reference solution of the same noises, summarised by its
median, 90th percentile and RMS sqrt(mean e_i^2) (the sweep's ``rmse_median``, ``rmse_p90``, ``rmse``; quantiles
are robust to the few samples that switch mixture component, which dominate the RMS); the Frechet distance of
feature rows to target moments is `samplers.evaluation.fid.frechet_distance`. `samplers.tune` and the benches use
these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .fid import frechet_distance


def per_sample_error(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """RMS over all non-batch dimensions of ``samples - reference`` (float64, shape (batch,))."""
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape")
    diff = samples.to(torch.float64) - reference.to(device=samples.device, dtype=torch.float64)
    return diff.reshape(diff.shape[0], -1).square().mean(1).sqrt()


@dataclass(frozen=True)
class ErrorSummary:
    """Median, 90th percentile and RMS of the per-sample errors of one run."""

    median: float
    p90: float
    rms: float
    #: mean of the worst 10 % of the errors (at least one sample): the tail beyond the p90
    tail: float = float("nan")

    @classmethod
    def of(cls, errors: torch.Tensor) -> ErrorSummary:
        """Summarise per-sample errors (a tensor or array; non-finite errors make every field inf). The median of an
        even count is the mean of the two middle values and the p90 interpolates linearly (numpy's definitions),
        the same numbers the sweep's ``rmse`` metric reports."""
        e = torch.as_tensor(errors).detach().to("cpu", torch.float64).numpy().ravel()
        if not np.isfinite(e).all():
            return cls(float("inf"), float("inf"), float("inf"), float("inf"))
        worst = np.sort(e)[-max(1, len(e) // 10):]
        return cls(float(np.median(e)), float(np.quantile(e, 0.9)), float(np.sqrt(np.mean(e**2))), float(worst.mean()))

    def score(self, tail_weight: float = 0.0) -> float:
        """median + p90 + ``tail_weight`` x the mean of the worst 10 %: `samplers.tune`'s objective."""
        return self.objective + tail_weight * self.tail if tail_weight else self.objective

    def metrics(self) -> dict[str, float]:
        """The summary under the sweep's metric names: ``rmse_median``, ``rmse_p90``, ``rmse``."""
        return {"rmse_median": self.median, "rmse_p90": self.p90, "rmse": self.rms}

    @property
    def objective(self) -> float:
        """median + p90: the tuning objective by default (both the typical sample and the tail count)."""
        return self.median + self.p90


def pixel_frechet(features: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Frechet distance of feature rows (n, d) to target moments (pytorch-fid numerics)."""
    features = np.asarray(features, dtype=np.float64)
    return frechet_distance(features.mean(0), np.cov(features, rowvar=False), mean, cov)
