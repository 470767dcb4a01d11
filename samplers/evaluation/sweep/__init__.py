"""Resumable, sharded sampler sweeps: model x solver x accelerator x guidance x NFE x seed block.

A grid spec (YAML file or dict, see :func:`parse_grid`) expands into configs; each (config, seed block) is one
work item whose result is one atomic artifact ``blocks/<config id>/block_<k>.npz`` holding what the metrics need
and nothing else: the samples' pixel features (average-pooled to ``metric.pixel_resolution``), Inception features
when Inception weights are given, per-sample squared errors to a high-accuracy reference solution of the same
noises, the sampling time and a SHA-256 digest of the samples. Stats are merged from the stored features in block
order, so a result never depends on which process computed a block.

* Sample ``i`` starts from ``noise_from_seeds([seed_i])`` and never depends on batch size or process count.
* Work item ``k`` runs on rank ``k % world_size`` (``torchrun`` / ``accelerate launch`` environment, gloo
  barriers only); with no launcher there is one rank. After a barrier rank 0 reads all artifacts and writes
  ``results.{csv,json,md}``, plots, ``manifest.json``, ``config_used.yaml`` and ``versions.json``.
* A killed sweep resumes: finished artifacts are skipped, half-written temp files are never read. The manifest
  records a SHA-256 checksum per block; on resume a block whose file no longer matches it (or, for a block
  finished after the last manifest was written, that does not load) is recomputed with a warning naming it.

Metrics: Frechet distance (pytorch-fid numerics) of the pixel features to the exact data moments of an exact-score
model (or to ``metric.pixel_stats``), RMS error to the reference solution, Inception FID against
``metric.fid_stats`` (a stats file, or a reference name such as ``cifar10-train``) or Inception stats of exact
data samples (the registered metrics of `samplers.evaluation.metrics`). Hub models, Inception weights and CIFAR-10
are downloaded on first use unless offline.

Layout: `spec` (grid parsing and validation, defaults, registry look-ups), `models` (loading the models under test),
`artifacts` (work list, ids, atomic block files), `run` (`Runner`, `Dist`, resume), `aggregate` (metrics merged
per configuration, floors, throughput), `report` (CSV, JSON, markdown, plots). The metrics themselves are the
registry `samplers.evaluation.metrics.METRICS`. This package re-exports the names of all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import SweepError
from ..metrics import (
    DATA_SEED,
    DEFAULT_WEIGHTS,
    METRICS,
    Metric,
    data_moments,
    exact_data,
    feature_moments,
    label_weights,
    pixel_features,
)
from .aggregate import aggregate, targets, throughput
from .artifacts import (
    Config,
    Job,
    artifact_path,
    config_id,
    digest,
    expand,
    feature_spec,
    file_checksum,
    read_artifact,
    reference_id,
    work_list,
    write_atomic,
    write_text_atomic,
)
from .models import LoadedModel, build_accelerator, load_model, network
from .report import (
    best_per_nfe,
    csv_columns,
    image_grid,
    labelled_image_grid,
    markdown,
    plot_results,
    read_results,
    write_csv,
    write_results,
)
from .run import Dist, Runner, versions
from .spec import (
    DEFAULT_REFERENCE,
    DEFAULT_SPEC,
    DEFAULT_TUNED,
    DTYPES,
    FLOW_MODEL_KEYS,
    MODEL_KEYS,
    MODEL_KINDS,
    SAMPLING_KEYS,
    SCHEDULE_KEYS,
    SEED_KEYS,
    SPEED_KEYS,
    TOP_KEYS,
    TUNE_KEYS,
    Component,
    Grid,
    _accelerator_class,
    _guidance_class,
    build_guider,
    build_solver,
    default_grid,
    default_models,
    default_solvers,
    load_grid,
    metric_defaults,
    model_family,
    parse_component,
    parse_grid,
    serves,
    solver_class,
)

__all__ = [
    "DATA_SEED", "DEFAULT_REFERENCE", "DEFAULT_SPEC", "DEFAULT_TUNED", "DEFAULT_WEIGHTS", "DTYPES", "FLOW_MODEL_KEYS",
    "METRICS", "MODEL_KEYS", "MODEL_KINDS", "SAMPLING_KEYS", "SCHEDULE_KEYS", "SEED_KEYS", "SPEED_KEYS", "TOP_KEYS",
    "TUNE_KEYS", "Component", "Config", "Dist", "Grid", "Job", "LoadedModel", "Metric", "Runner", "SweepError",
    "_accelerator_class", "_guidance_class", "aggregate", "artifact_path", "best_per_nfe", "build_accelerator",
    "build_guider", "build_solver", "config_id", "csv_columns", "data_moments", "default_grid", "default_models",
    "default_solvers", "digest", "exact_data", "expand", "feature_moments", "feature_spec", "file_checksum",
    "image_grid", "label_weights", "labelled_image_grid", "load_grid", "load_model", "markdown", "metric_defaults",
    "model_family", "network", "parse_component", "parse_grid", "pixel_features", "plot_results", "read_artifact",
    "read_results", "reference_id", "run_sweep", "serves", "solver_class", "targets", "throughput", "versions",
    "work_list", "write_atomic", "write_csv", "write_results", "write_text_atomic",
]


def run_sweep(raw: Mapping[str, Any] | None, out: str | Path, *, device: str | None = None,
              stop_after: int | None = None, log: Callable[[str], None] | None = None,
              offline: bool | None = None) -> dict[str, Any] | None:
    """Parse ``raw`` (None: the default grid), run this process's share and, on rank 0, aggregate.
    ``offline`` (default: ``HF_HUB_OFFLINE``) downloads nothing and names every missing file at once."""
    grid = parse_grid(default_grid() if raw is None else raw)
    return Runner(grid, out, device=device, log=log, offline=offline).run(stop_after=stop_after)
