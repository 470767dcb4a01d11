"""The `Metric` protocol, the registry `METRICS` every metric joins by subclassing, the feature helpers the
built-in metrics share (pooled pixel features, exact data moments, merged feature statistics), and the mapping of
old result-column names to the current ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ...testbeds.models import ExactScoreModel, GaussianMixtureModel, GaussianModel
from .. import downloads, fid
from ..errors import SweepError

if TYPE_CHECKING:
    from ..sweep.models import LoadedModel
    from ..sweep.run import Runner

#: metric.inception_weights: pytorch-fid's file, cached or downloaded on first use
DEFAULT_WEIGHTS = "pytorch-fid"
#: seed of the exact data samples behind the floors and the Inception reference stats
DATA_SEED = 12345

#: registry name -> metric class (`registered` gives them in column order)
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
    #: where its columns go among the metrics' (ties: registration order); the built-ins use 0-2
    position: ClassVar[int] = 100

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


def registered() -> list[type[Metric]]:
    """The registered metric classes in column order (``position``, then registration order)."""
    return sorted(METRICS.values(), key=lambda cls: cls.position)


def metric_columns() -> list[tuple[str, str]]:
    """(column, description) of every registered metric, in column order."""
    return [(col, desc) for cls in registered() for col, desc in cls.columns.items()]
