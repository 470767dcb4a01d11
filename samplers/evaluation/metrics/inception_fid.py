"""``inception_fid``: FID with pytorch-fid's Inception network and numerics."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import downloads, fid
from ..errors import SweepError, positive_int
from .base import DATA_SEED, DEFAULT_WEIGHTS, Block, Metric, checked_stats, exact_data, frechet_to, merged_stats

if TYPE_CHECKING:
    from ..sweep.models import LoadedModel
    from ..sweep.run import Runner


class InceptionFID(Metric):
    """FID (Heusel et al. 2017): `fid.frechet_distance` of Inception pool features of image samples to
    ``fid_stats`` (a stats file or a reference name such as ``cifar10-train``) or, for an exact-score model, to the
    Inception stats of ``data_samples`` exact data samples. On when ``inception_weights`` is set (or implied by
    ``fid_stats``)."""

    name = "inception_fid"
    position = 2
    columns = {"inception_fid": "Inception FID"}
    defaults = {"inception_weights": None, "inception_dims": 2048, "fid_stats": None, "data_samples": 10000}

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__(settings)
        self._net: fid.FIDInceptionV3 | None = None
        self._fid_stats: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        """``data_samples`` >= 2, ``inception_dims`` a pytorch-fid block; ``fid_stats`` implies the weights."""
        positive_int(settings["data_samples"], "metric.data_samples", minimum=2)
        if settings["inception_dims"] not in fid.FID_DIMS:
            raise SweepError(f"metric.inception_dims must be one of {fid.FID_DIMS}, got {settings['inception_dims']!r}")
        if settings["fid_stats"] and settings["inception_weights"] is None:
            settings["inception_weights"] = DEFAULT_WEIGHTS  # FID stats imply Inception features

    def enabled(self) -> bool:
        """Only with Inception weights."""
        return self.settings["inception_weights"] is not None

    def feature_key(self) -> dict[str, Any]:
        """The Inception feature dims (None when off)."""
        return {"inception_dims": self.settings["inception_dims"] if self.enabled() else None}

    def _weights(self) -> str | None:
        weights = self.settings["inception_weights"]
        return None if weights == DEFAULT_WEIGHTS else weights

    def network(self, ctx: Runner) -> fid.FIDInceptionV3 | None:
        """The FID Inception network (loaded once), or None when off."""
        if self.enabled() and self._net is None:
            self._net = fid.load_fid_inception(self._weights(), self.settings["inception_dims"], ctx.device,
                                               ctx.offline)
        return self._net

    def fid_stats(self, ctx: Runner) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of ``fid_stats``: a pytorch-fid ``.npz`` or a reference name such as ``cifar10-train``
        (computed once and cached, see :func:`samplers.evaluation.fid.reference_stats`)."""
        if self._fid_stats is None:
            name, dims = self.settings["fid_stats"], self.settings["inception_dims"]
            if name in fid.REFERENCE_STATS:
                self._fid_stats = fid.reference_stats(name, self.network(ctx), offline=ctx.offline)
            else:
                self._fid_stats = checked_stats(name, dims, "metric.fid_stats")
        return self._fid_stats

    def missing_inputs(self, ctx: Runner) -> list[downloads.Missing]:
        """The Inception weights and a named reference's data, when offline."""
        if not (ctx.offline and self.enabled()):
            return []
        names = [self.settings["fid_stats"]] if self.settings["fid_stats"] in fid.REFERENCE_STATS else []
        return fid.missing_inputs(self._weights(), self.settings["inception_dims"], names)

    def prepare(self, ctx: Runner) -> None:
        """Load the network and ``fid_stats``."""
        if self.network(ctx) is not None and self.settings["fid_stats"]:
            self.fid_stats(ctx)

    def features(self, ctx: Runner, block: Block, x: torch.Tensor) -> dict[str, np.ndarray]:
        """``inception_features`` of image samples (mapped from [-1, 1] to uint8, grey expanded to RGB)."""
        net = self.network(ctx)
        if net is None or not block.model.is_image:
            return {}
        images = fid.samples_to_uint8(x).expand(-1, 3, -1, -1)
        return {"inception_features": net.features(images).cpu().numpy()}

    def target(self, ctx: Runner, model: LoadedModel, labels: torch.Tensor | None,
               num_samples: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``fid_stats``, or the exact data's Inception stats; None for non-image models or when off."""
        net = self.network(ctx)
        if net is None or not model.is_image:
            return None
        if self.settings["fid_stats"]:
            return self.fid_stats(ctx)
        if model.exact is not None:
            return self._exact_stats(ctx, model, net, labels)
        raise SweepError(f"Inception FID for model {model.label} needs metric.fid_stats: a reference name "
                         f"({', '.join(fid.REFERENCE_STATS)}) or a pytorch-fid .npz of the data")

    def _exact_stats(self, ctx: Runner, model: LoadedModel, net: fid.FIDInceptionV3,
                     labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """Inception stats of ``data_samples`` exact data samples (cached as a pytorch-fid .npz)."""
        from ..sweep.artifacts import digest

        n = self.settings["data_samples"]
        labels = None if labels is None else labels.cpu()[torch.arange(n) % len(labels)]
        key = [model.label, n, self.settings["inception_dims"], None if labels is None else labels.tolist()]
        path = ctx.out / "reference" / f"inception_{digest(key)}.npz"
        if not path.is_file():
            stats = fid.stats_from_samples(exact_data(model.exact, n, DATA_SEED + 1, labels), net)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            stats.to_npz(tmp)
            os.replace(tmp, path)
        return fid.load_stats(path)

    def reduce(self, blocks: list[dict[str, np.ndarray]], target: Any, model: LoadedModel) -> dict[str, Any]:
        """The merged Inception features' FID to the target (None without features or target)."""
        feats = [a["inception_features"] for a in blocks if "inception_features" in a]
        if not feats or target is None:
            return {"inception_fid": None}
        return {"inception_fid": frechet_to(merged_stats(feats, feats[0].shape[1]), target)}

    def reference_floor(self, blocks: list[dict[str, np.ndarray]], target: Any) -> dict[str, Any]:
        """``reference_inception_fid`` when there is a target."""
        if target is None:
            return {}
        stats = merged_stats([a["inception_features"] for a in blocks], self.settings["inception_dims"])
        return {"reference_inception_fid": frechet_to(stats, target)}
