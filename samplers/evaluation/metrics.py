"""Sweep metrics: one `Metric` protocol, a registry every metric joins by subclassing, and the feature helpers.

A metric declares

* ``name`` (its registry key) and ``columns``: the result columns it fills (CSV, JSON, markdown tables, plots),
  each with a one-line description used as the table and plot title;
* ``defaults``: the keys it reads from the grid's ``metric:`` section, with default values (`validate` checks them);
* `features`: the arrays it stores per block of samples (the Runner writes them into the block's artifact);
  `feature_key`: the settings those arrays depend on (hashed into artifact ids, so a changed setting never reuses
  stale blocks);
* `target`: what one model's samples are compared with (exact data moments, a stats file, ...);
* `reduce`: the merged blocks of one configuration against the target -> its column values; `data_floor` and
  `reference_floor`: the same metric for exact data samples and for the reference solver (the floors table).

Adding a metric is one subclass with a ``name`` (in its own module, imported before the sweep runs, or here) and
its test; the sweep iterates `METRICS`. `unregister` removes one (tests).

Built in: ``pixel_fd`` (Frechet distance of average-pooled pixels to the data's moments), ``rmse`` (RMS, median
and 90th percentile of the per-sample RMS error to a reference solution of the same noises) and ``inception_fid``
(Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium", with
pytorch-fid's Inception weights and numerics). The Frechet distance is ``fid.frechet_distance``.

Older result files (the benches before the names were unified) used ``rms`` / ``median`` / ``p90`` / ``frechet`` /
``fd``; `canonical_name` and `rename_legacy` map them to the names here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..testbeds.models import ExactScoreModel, GaussianMixtureModel, GaussianModel
from . import downloads, fid
from .errors import SweepError, positive_int

if TYPE_CHECKING:
    from .sweep.models import LoadedModel
    from .sweep.run import Runner

#: metric.inception_weights: pytorch-fid's file, cached or downloaded on first use
DEFAULT_WEIGHTS = "pytorch-fid"
#: seed of the exact data samples behind the floors and the Inception reference stats
DATA_SEED = 12345

#: registry name -> metric class, in registration order (the order of the result columns)
METRICS: dict[str, type[Metric]] = {}

#: names older result files used -> the metric names of `METRICS`
LEGACY_NAMES = {"rms": "rmse", "median": "rmse_median", "p90": "rmse_p90", "frechet": "pixel_fd", "fd": "pixel_fd",
                "fd_of_reference": "reference_pixel_fd"}


def canonical_name(name: str) -> str:
    """The current name of a result column (``rms`` -> ``rmse``, ``frechet`` -> ``pixel_fd``, ...)."""
    return LEGACY_NAMES.get(name, name)


def rename_legacy(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with old column names replaced by `canonical_name` (a current name already present wins)."""
    out = dict(row)
    for old, new in LEGACY_NAMES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


# ------------------------------------------------------------------------------------------------ features


def pixel_features(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Samples -> float64 feature rows: images average-pooled to ``resolution`` (if larger), then flattened."""
    x = x.to(torch.float64)
    if x.ndim == 4 and x.shape[-1] > resolution:
        x = F.adaptive_avg_pool2d(x, resolution)
    return x.reshape(x.shape[0], -1)


def label_weights(mixture: GaussianMixtureModel, class_labels: torch.Tensor | None) -> torch.Tensor:
    """Component weights of the data the samples target: p(x) or the average of p(x | c_i) over their labels."""
    w = mixture.log_w.exp().cpu()
    if class_labels is None:
        return w
    per_class = torch.stack([w * (mixture.labels == c) for c in range(mixture.num_classes)])
    per_class = per_class / per_class.sum(1, keepdim=True)
    return per_class[torch.as_tensor(class_labels).cpu()].mean(0)


def data_moments(exact: ExactScoreModel, class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Exact mean and covariance (float64, flattened) of the data an exact-score model describes.
    Mixture: mean = sum w mu, cov = sum w (s^2 I + mu mu^T) - mean mean^T. Gaussian: U diag(l) U^T + s^2 I."""
    if isinstance(exact, GaussianMixtureModel):
        w, means = label_weights(exact, class_labels), exact.means.cpu()
        mean = w @ means
        cov = (means.T * w) @ means - torch.outer(mean, mean)
        return mean, cov + torch.eye(len(mean), dtype=torch.float64) * float(w @ exact.vars.cpu())
    if isinstance(exact, GaussianModel):
        U = exact.U.cpu()
        cov = (U * exact.l) @ U.T + exact.iso_var * torch.eye(len(exact.mu), dtype=torch.float64)
        return exact.mu.cpu(), cov
    raise SweepError(f"no closed-form data moments for {type(exact).__name__}")


def feature_moments(mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...],
                    resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Moments of the pooled features: the pooling P is linear, so mean -> P mean and cov -> P cov P^T."""
    def pool(rows: torch.Tensor) -> torch.Tensor:
        return pixel_features(rows.reshape(-1, *shape), resolution)

    return pool(mean[None])[0].numpy(), pool(pool(cov).T.contiguous()).numpy()


def exact_data(exact: ExactScoreModel, n: int, seed: int, class_labels: torch.Tensor | None) -> torch.Tensor:
    """``n`` samples of the exact data distribution (of each label's class when labels are given)."""
    g = torch.Generator().manual_seed(seed)
    if class_labels is None:
        return exact.sample_data(n, g)
    return exact.sample_data(n, g, class_labels=class_labels.cpu())


def merged_stats(blocks: list[np.ndarray], dims: int) -> fid.FeatureStats:
    """Mean and covariance of feature rows given block by block (merged in block order)."""
    stats = fid.FeatureStats(dims)
    for b in blocks:
        stats.update(b)
    return stats


def frechet_to(stats: fid.FeatureStats, target: tuple[np.ndarray, np.ndarray] | None) -> float | None:
    """`fid.frechet_distance` of the merged features to the target moments (None without a target)."""
    return None if target is None else fid.frechet_distance(stats.mean(), stats.cov(), *target)


def checked_stats(path: str, dims: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a pytorch-fid stats file; SweepError if its dims are not the features' ``dims``."""
    mu, sigma = fid.load_stats(Path(path).expanduser())
    if mu.shape[0] != dims:
        raise SweepError(f"{what} {path} holds {mu.shape[0]}-dim stats, but the sweep's features have {dims} dims")
    return mu, sigma


# ------------------------------------------------------------------------------------------------ protocol


@dataclass
class Block:
    """What a metric's `Metric.features` may use besides the samples: the model, and for a sampling block the
    reference solution of the same noises (float64 numpy, None for a reference block or a grid without one)."""

    model: LoadedModel
    reference: np.ndarray | None = None


class Metric:
    """A sweep metric bound to the grid's ``metric:`` section (``self.settings``); see the module docstring.

    Subclasses with a ``name`` register themselves in `METRICS`; the sweep builds one instance per run."""

    #: registry key (None: an abstract base, not registered)
    name: ClassVar[str | None] = None
    #: result column -> description (markdown table and plot title)
    columns: ClassVar[dict[str, str]] = {}
    #: keys of the grid's ``metric:`` section this metric reads -> default values
    defaults: ClassVar[dict[str, Any]] = {}
    #: bumped when `features` changes what it stores (part of the default `feature_key`)
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return
        if name in METRICS:
            raise ValueError(f"a sweep metric named {name!r} is already registered ({METRICS[name].__name__})")
        taken = {col for other in METRICS.values() for col in other.columns}
        clash = sorted(taken & set(cls.columns))
        if clash:
            raise ValueError(f"metric {name!r}: column {clash[0]!r} is already filled by another metric")
        METRICS[name] = cls

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = dict(settings)

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        """Check this metric's keys of the (defaults-filled) ``metric:`` section; may fill implied values.
        SweepError naming the key."""

    def enabled(self) -> bool:
        """Whether this run computes the metric (a disabled metric's columns are empty)."""
        return True

    def feature_key(self) -> dict[str, Any]:
        """The settings the stored features depend on (merged into every artifact id)."""
        return {f"metric:{self.name}": self.version}

    def check(self, ctx: Runner, model: LoadedModel) -> None:
        """Before sampling, per model: fail early on inputs that do not fit it (e.g. a stats file's dims)."""

    def missing_inputs(self, ctx: Runner) -> list[downloads.Missing]:
        """Offline, before sampling: the files this metric would download (named in one error)."""
        return []

    def prepare(self, ctx: Runner) -> None:
        """Before sampling, after the downloads check: load what the metric needs (networks, stats)."""

    def features(self, ctx: Runner, block: Block, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The arrays to store for one block of samples ``x`` (on the run's device)."""
        return {}

    def target(self, ctx: Runner, model: LoadedModel, labels: torch.Tensor | None, num_samples: int) -> Any:
        """What ``model``'s samples are compared with (``labels``: the class labels of all its seeds)."""
        return None

    def reduce(self, blocks: list[dict[str, np.ndarray]], target: Any, model: LoadedModel) -> dict[str, Any]:
        """One configuration's blocks (in block order) against ``target`` -> a value (or None) per column."""
        raise NotImplementedError

    def data_floor(self, target: Any) -> dict[str, Any]:
        """Floors table entries of exact data samples (``data_samples_<column>``); none by default."""
        return {}

    def reference_floor(self, blocks: list[dict[str, np.ndarray]], target: Any) -> dict[str, Any]:
        """Floors table entries of the reference solver's blocks (``reference_<column>``); none by default."""
        return {}


def unregister(name: str) -> type[Metric]:
    """Remove a metric from `METRICS` (returns its class); KeyError if it is not registered."""
    return METRICS.pop(name)


def metric_columns() -> list[tuple[str, str]]:
    """(column, description) of every registered metric, in registration order."""
    return [(col, desc) for cls in METRICS.values() for col, desc in cls.columns.items()]


# ------------------------------------------------------------------------------------------------ built-in metrics


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


class RMSError(Metric):
    """Per-sample RMS error ``e_i = ||x_i - x_ref,i|| / sqrt(D)`` to a reference solution of the same noises,
    summarised as ``sqrt(mean e_i^2)`` (``rmse``), the median and the 90th percentile. Needs ``reference:``."""

    name = "rmse"
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
        return {"rmse": float(np.sqrt(np.mean(per_sample**2))), "rmse_median": float(np.median(per_sample)),
                "rmse_p90": float(np.quantile(per_sample, 0.9))}


class InceptionFID(Metric):
    """FID (Heusel et al. 2017): `fid.frechet_distance` of Inception pool features of image samples to
    ``fid_stats`` (a stats file or a reference name such as ``cifar10-train``) or, for an exact-score model, to the
    Inception stats of ``data_samples`` exact data samples. On when ``inception_weights`` is set (or implied by
    ``fid_stats``)."""

    name = "inception_fid"
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
        from .sweep.artifacts import digest

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
