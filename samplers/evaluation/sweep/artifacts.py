"""The work list and its artifacts: one config per grid point, one job per seed block, ids that hash everything a
block depends on, and atomic ``.npz`` / text writes with SHA-256 checksums (what resume relies on)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import registered
from .spec import Component, Grid, model_family, serves


@dataclass(frozen=True)
class Config:
    """One point of the grid: model x solver x accelerator x guidance x NFE."""

    model: Component
    solver: Component
    accelerator: Component
    guidance: Component
    nfe: int


@dataclass(frozen=True)
class Job:
    """One unit of work: a seed block of a reference (``config`` None) or of a sampling config."""

    kind: str  # "reference" or "sample"
    model: Component
    guidance: Component
    block: int
    config: Config | None = None


def digest(obj: Any) -> str:
    """A short (12 hex digits) SHA-1 of ``obj`` as sorted-key JSON: names artifact folders and caches."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def feature_spec(grid: Grid) -> dict[str, Any]:
    """What the stored features depend on: every registered metric's `Metric.feature_key` for this grid."""
    key: dict[str, Any] = {}
    for cls in registered():
        key.update(cls(grid.metric).feature_key())
    return key


def reference_id(grid: Grid, model: Component, guidance: Component) -> str:
    """Hash of everything a reference block depends on (model, guidance, seeds, reference solver, NFE, dtype and
    feature settings); names its artifact folder."""
    ref = grid.reference
    return digest({"model": model.spec, "guidance": guidance.spec, "seeds": [grid.seed_start, grid.block_size],
                    "solver": ref["solver"].spec, "nfe": ref["nfe"], "dtype": ref["dtype"],
                    "features": feature_spec(grid)})


def config_id(grid: Grid, config: Config) -> str:
    """Hash of everything a block's artifact depends on (a changed grid never reuses stale artifacts)."""
    ref = reference_id(grid, config.model, config.guidance) if grid.reference else None
    return digest({"model": config.model.spec, "solver": config.solver.spec, "accelerator": config.accelerator.spec,
                    "guidance": config.guidance.spec, "nfe": config.nfe, "dtype": grid.dtype, "reference": ref,
                    "seeds": [grid.seed_start, grid.block_size], "features": feature_spec(grid)})


def expand(grid: Grid) -> list[Config]:
    """Every config of the grid, in a fixed order (model, guidance, solver, accelerator, NFE); a solver row runs
    only on the models whose family it serves (`serves`: diffusers' flow schedulers on flow models, ...)."""
    return [Config(m, s, a, g, n) for m in grid.models for g in grid.guidance for s in grid.solvers
            if serves(s, model_family(m)) for a in grid.accelerators for n in grid.nfe]


def work_list(grid: Grid) -> tuple[list[Job], list[Job]]:
    """(reference jobs, sampling jobs) in a fixed order; job ``k`` of each list belongs to rank ``k % world``."""
    refs = [Job("reference", m, g, b) for m in grid.models for g in grid.guidance for b in range(grid.blocks(m))
            ] if grid.reference else []
    jobs = [Job("sample", c.model, c.guidance, b, c) for c in expand(grid) for b in range(grid.blocks(c.model))]
    return refs, jobs


def artifact_path(out: Path, grid: Grid, job: Job) -> Path:
    """Where ``job``'s block lives: ``out/reference/<reference_id>/`` or ``out/blocks/<config_id>/``,
    ``block_<nnnnn>.npz``."""
    if job.kind == "reference":
        return out / "reference" / reference_id(grid, job.model, job.guidance) / f"block_{job.block:05d}.npz"
    return out / "blocks" / config_id(grid, job.config) / f"block_{job.block:05d}.npz"


def write_atomic(path: Path, arrays: Mapping[str, Any]) -> None:
    """Write an ``.npz`` to a temp file in the same folder, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_checksum(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_artifact(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a block's ``.npz`` (loaded eagerly, pickles refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
