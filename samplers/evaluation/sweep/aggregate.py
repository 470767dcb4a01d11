"""Aggregation: every configuration's block artifacts merged (in block order) into one row of metric values, each
registered metric reduced against its target (`metrics.Metric.reduce`), the floors per model, and throughput."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .artifacts import Job, artifact_path, config_id, expand, read_artifact
from .spec import Component, Grid

if TYPE_CHECKING:
    from .run import Runner


def _blocks(grid: Grid, out: Path, model: Component, job: Callable[[int], Job]) -> Iterator[dict[str, np.ndarray]]:
    for b in range(grid.blocks(model)):
        yield read_artifact(artifact_path(out, grid, job(b)))


def targets(grid: Grid, runner: Runner, model_spec: Component) -> dict[str, Any]:
    """Metric name -> what ``model_spec``'s samples are compared with (`metrics.Metric.target`)."""
    model = runner.model(model_spec)
    seeds = [s for b in range(grid.blocks(model_spec)) for s in grid.block_seeds(b)]
    labels = runner.labels(model, seeds)
    return {m.name: m.target(runner, model, labels, len(seeds)) if m.enabled() else None for m in runner.metrics}


def aggregate(grid: Grid, out: str | Path, runner: Runner) -> dict[str, Any]:
    """Merge every config's block artifacts (in block order) into metrics; rows, floors and throughput."""
    from .run import versions

    out = Path(out)
    rows, floors, all_targets = [], [], {}
    active = [m for m in runner.metrics if m.enabled()]
    for m in grid.models:
        for g in grid.guidance:
            all_targets[m, g] = t = targets(grid, runner, m)
            floor = {"model": m.label, "guidance": g.label}
            for metric in active:
                floor.update(metric.data_floor(t[metric.name]))
            if grid.reference:
                ref_blocks = list(_blocks(grid, out, m, lambda b, m=m, g=g: Job("reference", m, g, b)))
                floor["reference"] = f"{grid.reference['solver'].label} @ {grid.reference['nfe']} NFE"
                for metric in active:
                    floor.update(metric.reference_floor(ref_blocks, t[metric.name]))
            floors.append(floor)
    for c in expand(grid):
        t = all_targets[c.model, c.guidance]
        blocks = list(_blocks(grid, out, c.model, lambda b, c=c: Job("sample", c.model, c.guidance, b, c)))
        seconds = sum(float(a["seconds"]) for a in blocks)
        count = sum(len(a["seeds"]) for a in blocks)
        row = {"model": c.model.label, "solver": c.solver.label, "accelerator": c.accelerator.label,
               "guidance": c.guidance.label, "nfe": c.nfe, "nfe_actual": max(int(a["nfe"]) for a in blocks),
               "samples": count}
        model = runner.model(c.model)
        for metric in runner.metrics:
            row.update(metric.reduce(blocks, t[metric.name], model) if metric.enabled()
                       else dict.fromkeys(metric.columns))
        row.update(seconds=seconds, images_per_s=count / seconds if seconds > 0 else None,
                   config_id=config_id(grid, c))
        rows.append(row)
    return {"rows": rows, "floors": floors, "throughput": throughput(rows), "device": str(runner.device),
            "versions": versions(), "grid": grid.raw}


def throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sampling throughput per model and NFE over its configs (sampling time only, no metrics or I/O)."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in sorted({r["nfe"] for r in rows}):
            mine = [r for r in rows if r["model"] == model and r["nfe"] == n]
            images, seconds = sum(r["samples"] for r in mine), sum(r["seconds"] for r in mine)
            table.append({"model": model, "nfe": n, "images": images, "seconds": seconds,
                          "images_per_s": images / max(seconds, 1e-12)})
    return table

