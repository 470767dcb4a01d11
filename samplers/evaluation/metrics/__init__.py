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

Adding a metric is one module in this package (a subclass with a ``name``) and its test: this package imports every
module in it, the sweep iterates `METRICS`. `unregister` removes one (tests). The protocol and the shared helpers
are in `base`; `registered` lists the metrics in the order of their result columns (``position``).

Built in: ``pixel_fd`` (Frechet distance of average-pooled pixels to the data's moments), ``rmse`` (RMS, median
and 90th percentile of the per-sample RMS error to a reference solution of the same noises) and ``inception_fid``
(Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium", with
pytorch-fid's Inception weights and numerics). The Frechet distance is ``fid.frechet_distance``.

Older result files (the benches before the names were unified) used ``rms`` / ``median`` / ``p90`` / ``frechet`` /
``fd``; `canonical_name` and `rename_legacy` map them to the names here.
"""

from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil

from .base import (
    DATA_SEED,
    DEFAULT_WEIGHTS,
    LEGACY_NAMES,
    METRICS,
    Block,
    Metric,
    canonical_name,
    checked_stats,
    data_moments,
    exact_data,
    feature_moments,
    frechet_to,
    label_weights,
    merged_stats,
    metric_columns,
    pixel_features,
    registered,
    rename_legacy,
    unregister,
)
from .inception_fid import InceptionFID
from .pixel_fd import PixelFD, PixelTarget
from .rmse import RMSError

# Extensions register themselves on import: every module of this package is imported (`registered` orders them by
# their ``position``).
for _info in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DATA_SEED", "DEFAULT_WEIGHTS", "LEGACY_NAMES", "METRICS", "Block", "InceptionFID", "Metric", "PixelFD",
    "PixelTarget", "RMSError", "canonical_name", "checked_stats", "data_moments", "exact_data", "feature_moments",
    "frechet_to", "label_weights", "merged_stats", "metric_columns", "pixel_features", "registered", "rename_legacy",
    "unregister",
]
