"""``rmse``, ``rmse_median``, ``rmse_p90``: the per-sample RMS error to a reference solution of the same noises."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..quality import ErrorSummary
from .base import Block, Metric

if TYPE_CHECKING:
    from ..sweep.models import LoadedModel
    from ..sweep.run import Runner


class RMSError(Metric):
    """Per-sample RMS error ``e_i = ||x_i - x_ref,i|| / sqrt(D)`` to a reference solution of the same noises,
    summarised as ``sqrt(mean e_i^2)`` (``rmse``), the median and the 90th percentile. Needs ``reference:``."""

    name = "rmse"
    position = 1
    columns = {"rmse": "RMS error to the reference solution",
               "rmse_median": "median per-sample RMS error to the reference",
               "rmse_p90": "90th percentile of the per-sample RMS error to the reference"}

    def feature_key(self) -> dict[str, Any]:
        """Nothing beyond the reference, which artifact ids already hash."""
        return {}

    def features(self, ctx: Runner, block: Block, x: torch.Tensor) -> dict[str, np.ndarray]:
        """``sq_err``: per-sample squared error summed over the sample's values (sampling blocks only)."""
        if block.reference is None:
            return {}
        err = x.to(torch.float64).cpu().reshape(len(x), -1) - torch.from_numpy(block.reference).reshape(len(x), -1)
        return {"sq_err": err.square().sum(1).numpy()}

    def reduce(self, blocks: list[dict[str, np.ndarray]], target: Any, model: LoadedModel) -> dict[str, Any]:
        """RMS, median and p90 of the per-sample errors (None without a reference)."""
        sq_err = [a["sq_err"] for a in blocks if "sq_err" in a]
        if not sq_err:
            return dict.fromkeys(self.columns)
        per_sample = np.sqrt(np.concatenate(sq_err) / int(np.prod(model.shape)))
        summary = ErrorSummary.of(per_sample)
        return {"rmse": summary.rms, "rmse_median": summary.median, "rmse_p90": summary.p90}
