"""``pixel_fd``: Frechet distance of average-pooled pixels to the data's moments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import positive_int
from .base import (
    DATA_SEED,
    Block,
    Metric,
    checked_stats,
    data_moments,
    exact_data,
    feature_moments,
    frechet_to,
    merged_stats,
    pixel_features,
)

if TYPE_CHECKING:
    from ..sweep.models import LoadedModel
    from ..sweep.run import Runner


@dataclass
class PixelTarget:
    """Target of `PixelFD`: the pooled features' moments and the Frechet distance of exact data samples to them."""

    moments: tuple[np.ndarray, np.ndarray] | None
    data_fd: float | None


class PixelFD(Metric):
    """Frechet distance ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of the samples' pixel features (average-
    pooled to ``pixel_resolution``) to the exact data moments of an exact-score model (pooled: P m, P S P^T) or to
    ``pixel_stats`` (a pytorch-fid ``.npz``)."""

    name = "pixel_fd"
    position = 0
    columns = {"pixel_fd": "pixel-space Frechet distance"}
    defaults = {"pixel_resolution": 8, "pixel_stats": None}

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        """``pixel_resolution`` is a positive integer."""
        positive_int(settings["pixel_resolution"], "metric.pixel_resolution")

    @property
    def resolution(self) -> int:
        """The pooled image size of the features."""
        return self.settings["pixel_resolution"]

    def feature_key(self) -> dict[str, Any]:
        """The pooling resolution."""
        return {"pixel_resolution": self.resolution}

    def _dims(self, model: LoadedModel) -> int:
        return pixel_features(torch.zeros(1, *model.shape), self.resolution).shape[1]

    def check(self, ctx: Runner, model: LoadedModel) -> None:
        """``pixel_stats`` has the features' dims."""
        if self.settings["pixel_stats"]:
            checked_stats(self.settings["pixel_stats"], self._dims(model), "metric.pixel_stats")

    def features(self, ctx: Runner, block: Block, x: torch.Tensor) -> dict[str, np.ndarray]:
        """``pixel_features`` (n, d) float64."""
        return {"pixel_features": pixel_features(x, self.resolution).cpu().numpy()}

    def target(self, ctx: Runner, model: LoadedModel, labels: torch.Tensor | None, num_samples: int) -> PixelTarget:
        """``pixel_stats`` or the exact moments, and the distance of ``num_samples`` exact data samples."""
        dims, moments, data_fd = self._dims(model), None, None
        if self.settings["pixel_stats"]:
            moments = checked_stats(self.settings["pixel_stats"], dims, "metric.pixel_stats")
        elif model.exact is not None:
            moments = feature_moments(*data_moments(model.exact, labels), model.shape, self.resolution)
        if model.exact is not None and moments is not None:
            data = exact_data(model.exact, num_samples, DATA_SEED, labels)
            data_fd = frechet_to(merged_stats([pixel_features(data, self.resolution).numpy()], dims), moments)
        return PixelTarget(moments, data_fd)

    def reduce(self, blocks: list[dict[str, np.ndarray]], target: PixelTarget, model: LoadedModel) -> dict[str, Any]:
        """The merged features' distance to the target moments."""
        stats = merged_stats([a["pixel_features"] for a in blocks], blocks[0]["pixel_features"].shape[1])
        return {"pixel_fd": frechet_to(stats, target.moments)}

    def data_floor(self, target: PixelTarget) -> dict[str, Any]:
        """``data_samples_pixel_fd``."""
        return {"data_samples_pixel_fd": target.data_fd}

    def reference_floor(self, blocks: list[dict[str, np.ndarray]], target: PixelTarget) -> dict[str, Any]:
        """``reference_pixel_fd``."""
        return {"reference_pixel_fd": self.reduce(blocks, target, None)["pixel_fd"]}
