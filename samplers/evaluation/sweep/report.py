"""Reports: ``results.{csv,json,md}``, the markdown tables (best per NFE, one table per model and metric column,
floors, throughput), plots of metric vs NFE and labelled sample grids; `write_csv` and `read_results` for every
result table (sweep and benches), the latter mapping old column names to the current ones."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..metrics import metric_columns, rename_legacy
from .artifacts import Config, Job, artifact_path, expand, read_artifact, write_text_atomic
from .spec import Grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the columns of ``results.csv`` around the metric columns
ROW_KEYS = ("model", "solver", "accelerator", "guidance", "nfe", "nfe_actual", "samples")
TAIL_KEYS = ("seconds", "images_per_s", "config_id")


def csv_columns() -> tuple[str, ...]:
    """The columns of ``results.csv``: the config, every registered metric's columns, time and id."""
    return (*ROW_KEYS, *(col for col, _ in metric_columns()), *TAIL_KEYS)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Iterable[str] | None = None) -> None:
    """Rows as CSV: ``columns`` (default: every key of the rows, in first-seen order); missing cells empty, keys
    not in ``columns`` left out. Writes nothing for no rows."""
    if not rows:
        return
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a result table (``.csv``, or ``.json``: a list of rows or a sweep's ``{"rows": ...}``), with
    old column names (``rms``, ``median``, ``p90``, ``frechet``, ``fd``) renamed to the current metric names; CSV
    cells parsed as int / float where they are numbers, empty cells as None."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) else data
    return [rename_legacy(r) for r in rows]


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-+" else "_" for ch in text).strip("_")


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return row["solver"], row["accelerator"], row["guidance"]


def best_per_nfe(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per model and NFE, the configuration with the lowest pixel FD, its median / p90 error, and
    its FD ratio to the best ``diffusers:`` configuration (above 1 = better than diffusers' best)."""
    lines = ["### Best per NFE (lowest pixel FD)", "",
             "| model | NFE | best configuration | pixel FD | median / p90 error | best diffusers FD | ratio |",
             "|---|---:|---|---:|---|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in sorted({r["nfe"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["nfe"] == n and r["pixel_fd"] is not None]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["pixel_fd"])
            peers = [r["pixel_fd"] for r in mine if r["solver"].startswith("diffusers:")]
            peer = min(peers) if peers else None
            label = " / ".join(k for k in _row_key(best) if k != "none")
            errors = f"{_fmt(best['rmse_median'])} / {_fmt(best['rmse_p90'])}" if best["rmse_median"] else ""
            ratio = _fmt(peer / best["pixel_fd"]) if peer and best["pixel_fd"] > 0 else ""
            lines.append(f"| {model} | {n} | {label} | {_fmt(best['pixel_fd'])} | {errors} | {_fmt(peer)} | {ratio} |")
    return [*lines, ""]


def markdown(results: Mapping[str, Any]) -> str:
    """The best configuration per NFE, then one table per model and metric: rows solver / accelerator /
    guidance, columns NFE."""
    rows = results["rows"]
    nfes = sorted({r["nfe"] for r in rows})
    lines = best_per_nfe(rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for key, title in metric_columns():
            if all(r[key] is None for r in mine):
                continue
            lines += [f"### {model}: {title}", "", "| solver | accelerator | guidance | "
                      + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|---|" + "---:|" * len(nfes)]
            for rk in dict.fromkeys(_row_key(r) for r in mine):
                cells = {r["nfe"]: _fmt(r[key]) for r in mine if _row_key(r) == rk}
                lines.append("| " + " | ".join(rk) + " | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
            lines.append("")
    floors = results["floors"]
    if floors:
        keys = [k for k in floors[0] if k not in ("model", "guidance")]
        lines += ["### Floors (same seeds / same sample count)", "", "| model | guidance | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(f.get(k)) for k in ("model", "guidance", *keys)) + " |" for f in floors]
        lines.append("")
    lines += ["### Sampling throughput", "", "| model | NFE | images | seconds | images/s |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['model']} | {t['nfe']} | {t['images']} | {t['seconds']:.2f} | {t['images_per_s']:.1f} |"
              for t in results["throughput"]]
    return "\n".join(lines) + "\n"


def write_results(grid: Grid, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """results.csv / .json / .md, plots; prints the table and the throughput to stdout."""
    columns = csv_columns()
    write_csv(out / "results.csv", [{k: r[k] for k in columns} for r in results["rows"]], columns)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    table = markdown(results)
    write_text_atomic(out / "results.md", table)
    results["plots"] = [str(p.relative_to(out)) for p in plot_results(grid, out, results)]
    print(table, flush=True)  # the results go to stdout, progress messages (``log``) to stderr
    print(f"sampling throughput on {results['device']}, {torch.get_num_threads()} thread(s) per process:")
    for t in results["throughput"]:
        print(f"  {t['model']}: NFE {t['nfe']}: {t['images']} images in {t['seconds']:.2f} s = "
              f"{t['images_per_s']:.1f} images/s", flush=True)
    return results


def plot_results(grid: Grid, out: Path, results: Mapping[str, Any]) -> list[Path]:
    """Metric vs NFE per solver (log-log) for each model, and labelled sample grids (rows = NFE, columns = seeds)
    for image models. Draws on Agg canvases: the process's matplotlib backend is left alone."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written, rows = [], results["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for key, title in metric_columns():
            if all(r[key] is None for r in mine):
                continue
            fig = Figure(figsize=(6.4, 4.4))
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            for rk in dict.fromkeys(_row_key(r) for r in mine):
                pts = sorted((r["nfe"], r[key]) for r in mine if _row_key(r) == rk and r[key] is not None)
                ax.plot(*zip(*pts), marker="o", label=" / ".join(k for k in rk if k != "none"))
            floor = [f.get("data_samples_pixel_fd") for f in results["floors"] if f["model"] == model]
            if key == "pixel_fd" and floor and floor[0] is not None:
                ax.axhline(floor[0], color="gray", linestyle="--", label="exact data samples")
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=title, title=model)
            ax.set_xticks(grid.nfe, [str(n) for n in grid.nfe])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(folder / f"{_slug(model)}_{key}.png")
            fig.savefig(written[-1], dpi=110)
    for c in expand(grid):
        if c.nfe != grid.nfe[0]:
            continue
        thumbs, nfes, seeds = [], [], []
        for n in grid.nfe:
            path = artifact_path(out, grid, Job("sample", c.model, c.guidance, 0, Config(
                c.model, c.solver, c.accelerator, c.guidance, n)))
            art = read_artifact(path)
            if "thumbs" in art:
                thumbs.append(art["thumbs"])
                nfes.append(n)
                seeds = [int(s) for s in art["seeds"][:len(art["thumbs"])]]
        if thumbs:
            written.append(folder / "samples" / f"{_slug(c.model.label)}__{_slug(c.solver.label)}__"
                           f"{_slug(c.accelerator.label)}__{_slug(c.guidance.label)}.png")
            written[-1].parent.mkdir(exist_ok=True)
            title = " / ".join(x.label for x in (c.model, c.solver, c.accelerator, c.guidance) if x.label != "none")
            labelled_image_grid(thumbs, [f"NFE {n}" for n in nfes], [f"seed {s}" for s in seeds],
                                title).savefig(written[-1], dpi=110)
    return written


def labelled_image_grid(rows: list[np.ndarray], row_labels: Sequence[str], column_labels: Sequence[str],
                        title: str = "", scale: int = 4, pad: int = 2) -> Figure:
    """`image_grid` of ``rows`` as a matplotlib Figure (Agg canvas, global backend untouched) with one label per
    row (left) and per column (top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, h, w, _ = rows[0].shape
    canvas = image_grid(rows, scale, pad)
    fig = Figure(figsize=(max(1.2 + canvas.shape[1] / 90, 0.5 + 0.07 * len(title)), 0.6 + canvas.shape[0] / 90))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + i * (h * scale + pad) + h * scale / 2 for i in range(len(rows))], list(row_labels))
    ax.set_xticks([pad + j * (w * scale + pad) + w * scale / 2 for j in range(n)], list(column_labels),
                  rotation=90 if n > 4 else 0, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_xlabel(title, fontsize=8)
    fig.tight_layout()
    return fig


def image_grid(rows: list[np.ndarray], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC batches (one per row) into one RGB image, upscaled ``scale`` x, white padding."""
    n, h, w, c = rows[0].shape
    canvas = np.full((len(rows) * (h * scale + pad) + pad, n * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, batch in enumerate(rows):
        for j, img in enumerate(batch):
            big = np.kron(img, np.ones((scale, scale, 1), np.uint8))
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            canvas[y:y + h * scale, x:x + w * scale] = big if c == 3 else big.repeat(3, axis=2)
    return canvas
