"""DC-Solver benchmark on an exact class-conditional Gaussian mixture under classifier-free guidance.

For every (NFE, guidance scale) of the grid: search the DC ratios on a few noises, then measure on OTHER noises the
RMS error of the final sample against a many-step reference, for UniPC alone, DC-Solver with the searched ratios,
and DC-Solver with ratios predicted by cascade polynomial regression fitted WITHOUT that (NFE, scale) pair
(leave-one-out: every row is a held-out prediction). The DC plug-in on DPM-Solver++ (2M, 3M) is measured the same
way (searched ratios). Both diffusers' default linspace grid (the official DC-Solver setting) and the logSNR grid
are run. Errors use the sweep's metric names: ``rmse`` (RMS over all samples, what the search minimises) and
``rmse_median`` (median per-sample RMS): with strong guidance a few trajectories switch mixture component, which
dominates the RMS.
Prints tables and writes ``dc_solver.csv``, ``dc_solver.json``, ``plugin.csv``, ``cpr_<grid>.json`` (CPR fitted on
the whole grid) and the ratio cache ``ratios_cache.json`` (re-runs reuse the searches) into ``--out``.

    python scripts/bench_dc_solver.py                      # default: ~10 min on one CPU core
    python scripts/bench_dc_solver.py --nfe 5 6 7 --scales 1 2 3 --eval-noises 20 --no-plugin   # quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from guidance import ClassifierFreeGuidedModel
from samplers import (
    CascadePolynomialRegression,
    DCSolverScheduler,
    DPMSolverPlusPlusScheduler,
    UniPCScheduler,
    sample,
    search_dc_ratios,
    with_dynamic_compensation,
)
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.evaluation.sweep import write_csv
from samplers.runtime.loop import noise_from_seeds
from samplers.solvers.dc_solver import reference_trajectory
from samplers.testbeds import GaussianMixtureModel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/dc_solver"))
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 7, 8, 9, 10])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0])
    p.add_argument("--shape", type=int, nargs=3, default=[3, 16, 16])
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--std", type=float, default=0.2, help="component std of the mixture")
    p.add_argument("--ridge", type=float, default=0.0, help="CPR ridge towards rho = 1 (0: the paper's least squares)")
    p.add_argument("--search-noises", type=int, default=10)
    p.add_argument("--eval-noises", type=int, default=100)
    p.add_argument("--iters", type=int, default=40, help="AdamW iterations per ratio (the paper: 40)")
    p.add_argument("--bound", default="tanh", choices=["none", "tanh"], help="ratio parameterisation of the search")
    p.add_argument("--reference-steps", type=int, default=500)
    p.add_argument("--order", type=int, default=2, help="UniPC solver_order (DC-Solver's base)")
    p.add_argument("--timestep-schedules", nargs="+", default=["linspace", "logsnr"],
                   help="step grids to run (linspace = diffusers' default and the official DC-Solver setting)")
    p.add_argument("--plugin-scale", type=float, default=1.0, help="guidance scale of the DPM-Solver++ plug-in rows")
    p.add_argument("--no-plugin", action="store_true", help="skip the DPM-Solver++ plug-in rows")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small tensors: 1 is fastest)")
    return p.parse_args()


class Testbed:
    """Class-conditional mixture; search noises use seeds 0.., evaluation noises seeds 10000.. (disjoint)."""

    def __init__(self, args: argparse.Namespace):
        self.mixture = GaussianMixtureModel(shape=tuple(args.shape), num_components=args.components,
                                            num_classes=args.classes, std=args.std, seed=0)
        self.search_noise = noise_from_seeds(range(args.search_noises), args.shape, dtype=torch.float64)
        self.eval_noise = noise_from_seeds(range(10000, 10000 + args.eval_noises), args.shape, dtype=torch.float64)
        self.search_labels = torch.arange(args.search_noises) % args.classes
        self.eval_labels = torch.arange(10000, 10000 + args.eval_noises) % args.classes

    def model(self, scale: float, split: str) -> ClassifierFreeGuidedModel:
        labels = self.search_labels if split == "search" else self.eval_labels
        return ClassifierFreeGuidedModel(self.mixture, labels, scale)


def geo_mean(values) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).log().mean().exp())


def evaluate(model, scheduler, noise: torch.Tensor, nfe: int, truth: torch.Tensor) -> tuple[float, float]:
    """RMS error over all samples and the median of the per-sample RMS errors (robust to a few mode flips)."""
    summary = ErrorSummary.of(per_sample_error(sample(model, scheduler, noise, nfe).samples, truth))
    return summary.rms, summary.median


def dc_solver_rows(args: argparse.Namespace, bed: Testbed, grid: str, cache: Path, model_id: str) -> list[dict]:
    """Search every (NFE, scale), then evaluate UniPC, DC (searched) and DC-CPR (leave-one-out) on held-out noises."""
    base = UniPCScheduler(solver_order=args.order, timestep_schedule=grid)
    searched, truths = {}, {}
    for nfe in args.nfe:
        for scale in args.scales:
            searched[nfe, scale] = search_dc_ratios(
                bed.model(scale, "search"), base, bed.search_noise, nfe, num_iters=args.iters,
                reference_steps=args.reference_steps, guidance_scale=scale, bound=args.bound, cache=cache,
                model_id=model_id)
            base.set_timesteps(nfe)
            truths[nfe, scale] = reference_trajectory(bed.model(scale, "eval"), base, bed.eval_noise,
                                                      args.reference_steps)[-1]
    CascadePolynomialRegression.fit(searched, ridge=args.ridge).save(args.out / f"cpr_{grid}.json")
    rows = []
    for (nfe, scale), ratios in searched.items():
        held_out = {k: v for k, v in searched.items() if k != (nfe, scale)}
        cpr = CascadePolynomialRegression.fit(held_out, ridge=args.ridge).predict(nfe, scale)
        model, truth = bed.model(scale, "eval"), truths[nfe, scale]
        e_base = evaluate(model, UniPCScheduler.from_config(base.config), bed.eval_noise, nfe, truth)
        e_dc = evaluate(model, DCSolverScheduler.from_config(base.config, dc_ratios=ratios), bed.eval_noise, nfe, truth)
        e_cpr = evaluate(model, DCSolverScheduler.from_config(base.config, dc_ratios=cpr), bed.eval_noise, nfe, truth)
        interior = min(args.nfe) < nfe < max(args.nfe) and min(args.scales) < scale < max(args.scales)
        rows.append(dict(grid=grid, nfe=nfe, scale=scale, interior=interior, unipc_rmse=e_base[0], dc_rmse=e_dc[0],
                         dc_cpr_rmse=e_cpr[0], dc_ratio=e_dc[0] / e_base[0], cpr_ratio=e_cpr[0] / e_base[0],
                         unipc_rmse_median=e_base[1], dc_rmse_median=e_dc[1], dc_cpr_rmse_median=e_cpr[1],
                         searched_ratios=ratios, cpr_ratios=cpr))
    return rows


def plugin_rows(args: argparse.Namespace, bed: Testbed, grid: str, cache: Path, model_id: str) -> list[dict]:
    """The DC plug-in on DPM-Solver++ 2M / 3M: searched ratios, same protocol, one guidance scale."""
    scale = args.plugin_scale
    model, search_model = bed.model(scale, "eval"), bed.model(scale, "search")
    rows = []
    for order in (2, 3):
        dpm = DPMSolverPlusPlusScheduler(solver_order=order, timestep_schedule=grid)
        for nfe in args.nfe:
            ratios = search_dc_ratios(search_model, dpm, bed.search_noise, nfe, num_iters=args.iters,
                                      reference_steps=args.reference_steps, guidance_scale=scale, bound=args.bound,
                                      cache=cache, model_id=model_id)
            dpm.set_timesteps(nfe)
            truth = reference_trajectory(model, dpm, bed.eval_noise, args.reference_steps)[-1]
            e_base = evaluate(model, DPMSolverPlusPlusScheduler.from_config(dpm.config), bed.eval_noise, nfe, truth)
            dc = with_dynamic_compensation(DPMSolverPlusPlusScheduler).from_config(dpm.config, dc_ratios=ratios)
            e_dc = evaluate(model, dc, bed.eval_noise, nfe, truth)
            rows.append(dict(grid=grid, solver=f"dpm++{order}m", nfe=nfe, scale=scale, base_rmse=e_base[0],
                             dc_rmse=e_dc[0], dc_ratio=e_dc[0] / e_base[0], base_rmse_median=e_base[1],
                             dc_rmse_median=e_dc[1], searched_ratios=ratios))
    return rows


def print_dc_solver(args: argparse.Namespace, rows: list[dict]) -> None:
    shape = "x".join(map(str, args.shape))
    print(f"\nDC-Solver (UniPC-{args.order}, {rows[0]['grid']} grid) on a {args.components}-component {shape} "
          f"mixture (std {args.std}) under CFG: error vs a {args.reference_steps}-step reference on {args.eval_noises} "
          f"held-out noises.\nDC-CPR is leave-one-out (CPR fitted without that pair); * = interior pair. "
          f"rmse (RMS over all samples) | rmse_median (median per-sample RMS).")
    print(f"{'NFE':>4} {'scale':>6} {'UniPC':>9} {'DC':>9} {'DC-CPR':>9} {'DC/UniPC':>8} {'CPR/UniPC':>9} | "
          f"{'UniPC':>9} {'DC':>9} {'DC-CPR':>9}")
    for r in rows:
        print(f"{r['nfe']:>4} {r['scale']:>5.1f}{'*' if r['interior'] else ' '} {r['unipc_rmse']:>9.2e} "
              f"{r['dc_rmse']:>9.2e} {r['dc_cpr_rmse']:>9.2e} {r['dc_ratio']:>8.3f} {r['cpr_ratio']:>9.3f} | "
              f"{r['unipc_rmse_median']:>9.2e} {r['dc_rmse_median']:>9.2e} {r['dc_cpr_rmse_median']:>9.2e}")
    for name, sel in (("all pairs", rows), ("interior pairs", [r for r in rows if r["interior"]])):
        if sel:
            dc, cpr = geo_mean(r["dc_ratio"] for r in sel), geo_mean(r["cpr_ratio"] for r in sel)
            print(f"geometric mean over {name} ({len(sel)}): DC/UniPC {dc:.3f}, DC-CPR/UniPC {cpr:.3f} "
                  f"(CPR keeps {(1 - cpr) / (1 - dc):.0%} of the searched gain)")


def print_plugin(rows: list[dict]) -> None:
    print(f"\nDC plug-in on DPM-Solver++ ({rows[0]['grid']} grid, scale {rows[0]['scale']}), searched ratios, "
          f"same protocol")
    print(f"{'solver':>8} {'NFE':>4} {'base':>10} {'DC':>10} {'DC/base':>8}")
    for r in rows:
        print(f"{r['solver']:>8} {r['nfe']:>4} {r['base_rmse']:>10.3e} {r['dc_rmse']:>10.3e} {r['dc_ratio']:>8.3f}")


def write_table(path: Path, rows: list[dict]) -> None:
    """The rows as CSV without the ratio lists (those are in dc_solver.json)."""
    write_csv(path, rows, [k for k in rows[0] if not k.endswith("ratios")])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "ratios_cache.json"
    bed = Testbed(args)
    model_id = f"mixture{args.components}x{args.classes}-std{args.std}-{'x'.join(map(str, args.shape))}-seed0"
    start = time.time()
    rows, plugin = [], []
    for grid in args.timestep_schedules:
        rows += dc_solver_rows(args, bed, grid, cache, model_id)
        print_dc_solver(args, [r for r in rows if r["grid"] == grid])
        if not args.no_plugin:
            plugin += plugin_rows(args, bed, grid, cache, model_id)
            print_plugin([r for r in plugin if r["grid"] == grid])
    write_table(args.out / "dc_solver.csv", rows)
    if plugin:
        write_table(args.out / "plugin.csv", plugin)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "dc_solver.json").write_text(json.dumps({"settings": settings, "model_id": model_id,
                                                         "dc_solver": rows, "plugin": plugin}, indent=1))
    print(f"\nwrote dc_solver.csv, dc_solver.json, plugin.csv, cpr_<grid>.json and ratios_cache.json to {args.out} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
