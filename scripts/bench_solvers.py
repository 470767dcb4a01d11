"""Accuracy and overhead benchmark: project solvers vs diffusers' schedulers on exact-score testbeds.

For each testbed and NFE, every solver configuration starts from the same noises; the error of the final
sample is measured against the exact (Gaussian) or a 2000-step float64 reference solution of the
probability-flow ODE to sigma = 0. Every project configuration that has a final jump to sigma = 0 runs once per
``--final-step-orders`` value (default 1 = DDIM's x_0 = D, and 3 = the 3-point step in rho), printed side by side
with the error ratios. Prints tables, writes CSV/JSON and a PNG plot per testbed, then times the per-step solver
overhead (no model) against diffusers' counterparts at batch 64x3x32x32.

    python scripts/bench_solvers.py --out results/bench_solvers [--quick] [--final-step-orders 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import diffusers
import numpy as np
import torch

import samplers
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.evaluation.sweep import write_csv
from samplers.solvers.scheduler_base import FINAL_STEP_ORDERS
from samplers.testbeds import GaussianMixtureModel, GaussianModel
from samplers.testbeds.reference import reference_solution

TESTBEDS = {
    # name: (model class, model kwargs, scheduler config)
    "gaussian-linear-eps": (GaussianModel, dict(rank=16, iso_std=0.1), dict(beta_schedule="linear")),
    "mixture-linear-eps": (GaussianMixtureModel, dict(num_components=8, std=0.1), dict(beta_schedule="linear")),
    "mixture-cosine-v": (GaussianMixtureModel, dict(num_components=16, std=0.2, seed=1),
                         dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
    "mixture-scaled-eps": (GaussianMixtureModel, dict(num_components=4, std=0.05, seed=2),
                           dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
}

# (label, registry name, options); entries whose registry name is not available are skipped
PROJECT_CONFIGS = [
    ("DPM++ 2M logsnr", "dpmsolver++", dict(solver_order=2)),
    ("DPM++ 3M logsnr", "dpmsolver++", dict(solver_order=3)),
    ("DPM++ 3M time_quadratic", "dpmsolver++", dict(solver_order=3, timestep_schedule="time_quadratic")),
    ("DPM++ 2M karras", "dpmsolver++", dict(solver_order=2, timestep_schedule="karras")),
    ("DPM++ 3M karras", "dpmsolver++", dict(solver_order=3, timestep_schedule="karras")),
    ("DPM++ 2S logsnr", "dpmsolver++", dict(solver_order=2, method="singlestep")),
    ("DPM++ 3S logsnr", "dpmsolver++", dict(solver_order=3, method="singlestep")),
    ("DEIS tAB3 time_quadratic", "deis", dict(solver_type="tab", solver_order=3, timestep_schedule="time_quadratic")),
    ("DEIS tAB3 logsnr", "deis", dict(solver_type="tab", solver_order=3)),
    ("DEIS rhoAB3 logsnr", "deis", dict(solver_type="rhoab", solver_order=3)),
    ("DEIS iPNDM logsnr", "deis", dict(solver_type="ipndm", solver_order=3)),
    ("UniPC bh2 p2 logsnr", "unipc", dict(solver_type="bh2", solver_order=2)),
    ("UniPC bh2 p3 logsnr", "unipc", dict(solver_type="bh2", solver_order=3)),
    ("UniPC bh1 p3 logsnr", "unipc", dict(solver_type="bh1", solver_order=3)),
]

DIFFUSERS_CONFIGS = [
    ("DDIM", "DDIMScheduler", dict(set_alpha_to_one=True, timestep_spacing="trailing")),
    ("DPMSolverMultistep 2M", "DPMSolverMultistepScheduler", dict(solver_order=2)),
    ("DPMSolverMultistep 3M", "DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistep 2M karras", "DPMSolverMultistepScheduler", dict(solver_order=2, use_karras_sigmas=True)),
    ("DPMSolverMultistep 3M karras", "DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("DPMSolverMultistep 2M lu", "DPMSolverMultistepScheduler", dict(solver_order=2, use_lu_lambdas=True)),
    ("UniPC bh2 p2", "UniPCMultistepScheduler", dict(solver_order=2)),
    ("UniPC bh2 p3", "UniPCMultistepScheduler", dict(solver_order=3)),
    ("DEIS logrho 3", "DEISMultistepScheduler", dict(solver_order=3)),
]


def make_scheduler(family: str, name: str, options: dict, testbed_config: dict):
    cls = samplers.SCHEDULERS[name] if family == "ours" else getattr(diffusers, name)
    return cls(**testbed_config, **options)


def project_configs(final_step_orders: list[int]) -> list[tuple[str, str, str, str, dict, int | None]]:
    """(family, label, label suffix, registry name, options, final_step_order) for every project configuration and
    final-step order it supports (singlestep and Runge-Kutta configurations keep the first-order jump)."""
    out = []
    for label, name, options in PROJECT_CONFIGS:
        if name not in samplers.SCHEDULERS:
            continue
        for k in final_step_orders:
            try:
                samplers.SCHEDULERS[name](**options, final_step_order=k)
            except ValueError:
                continue
            suffix = f" fs{k}" if len(final_step_orders) > 1 else ""
            out.append(("ours", label, suffix, name, {**options, "final_step_order": k}, k))
    return out


def run_to_nfe(scheduler, model, x: torch.Tensor, nfe: int) -> torch.Tensor | None:
    """Sample with exactly ``nfe`` model calls (None when the scheduler cannot hit that budget)."""
    scheduler.set_timesteps(nfe)
    per_step = len(scheduler.timesteps) / nfe
    if per_step != 1:
        steps = nfe / per_step
        if steps != int(steps):
            return None
        scheduler.set_timesteps(int(steps))
    if len(scheduler.timesteps) != nfe:
        return None
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def accuracy(testbed: str, nfes: list[int], num_samples: int, final_step_orders: list[int]) -> list[dict]:
    model_cls, model_kwargs, cfg = TESTBEDS[testbed]
    model = model_cls.for_scheduler_config(cfg, shape=(3, 32, 32), **model_kwargs)
    noise = torch.randn(num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = (model.ode_solution(noise, model.schedule.t_max, None) if isinstance(model, GaussianModel)
           else reference_solution(model, noise))
    rows = []
    configs = project_configs(final_step_orders)
    configs += [("diffusers", label, "", name, options, None) for label, name, options in DIFFUSERS_CONFIGS]
    for family, label, suffix, name, options, final in configs:
        for nfe in nfes:
            row = dict(testbed=testbed, family=family, config=label, solver=label + suffix, nfe=nfe, rmse=math.nan,
                       rmse_median=math.nan, final_step_order=final)
            try:
                x = run_to_nfe(make_scheduler(family, name, options, cfg), model, noise.clone(), nfe)
            except Exception as err:  # diffusers' known defects (docs/swap-a-scheduler.md) are recorded, not fatal
                row["status"] = f"crash: {type(err).__name__}"
                rows.append(row)
                continue
            if x is None:
                continue
            per_sample = per_sample_error(x, ref)
            finite = bool(torch.isfinite(per_sample).all())
            summary = ErrorSummary.of(per_sample)
            row.update(rmse=summary.rms if finite else math.nan, rmse_median=summary.median if finite else math.nan,
                       status="ok" if finite else "nan")
            rows.append(row)
    return rows


def best_by_family(rows: list[dict], testbed: str, nfe: int, family: str, key: str) -> dict | None:
    cands = [r for r in rows if r["testbed"] == testbed and r["nfe"] == nfe and r["family"] == family
             and r["status"] == "ok"]
    return min(cands, key=lambda r: r[key]) if cands else None


def with_final_step(rows: list[dict], k: int) -> list[dict]:
    """Diffusers' rows and our runs with ``final_step_order=k``, plus our configurations that only have the
    first-order jump (singlestep, Runge-Kutta): what a user choosing ``k`` where available gets."""
    has_k = {r["config"] for r in rows if r["final_step_order"] == k}
    return [r for r in rows if r["family"] != "ours" or r["final_step_order"] == k
            or (r["final_step_order"] == 1 and r["config"] not in has_k)]


def print_table(rows: list[dict], testbed: str, nfes: list[int]) -> list[str]:
    lines = [f"\n## {testbed}: RMS error of the final sample vs the reference (lower is better)\n",
             "| family | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    labels = dict.fromkeys((r["family"], r["solver"]) for r in rows if r["testbed"] == testbed)
    for family, label in labels:
        cells = []
        for n in nfes:
            r = next((r for r in rows if r["testbed"] == testbed and r["solver"] == label and r["nfe"] == n), None)
            cells.append("-" if r is None else (f"{r['rmse']:.2e}" if r["status"] == "ok" else r["status"]))
        lines.append(f"| {family} | {label} | " + " | ".join(cells) + " |")
    return lines


def final_step_table(rows: list[dict], testbed: str, nfes: list[int], orders: list[int]) -> list[str]:
    """Per configuration and NFE: error with the first-order jump / error with a k-point final step (> 1: better)."""
    runs = {(r["config"], r["final_step_order"], r["nfe"]): r for r in rows
            if r["testbed"] == testbed and r["family"] == "ours" and r["status"] == "ok"}
    lines = []
    for k in [k for k in orders if k != 1 and 1 in orders]:
        lines += [f"\n## {testbed}: error ratio, final step 1 / final step {k} (> 1: the {k}-point step is better)\n",
                  "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for config in dict.fromkeys(c for c, order, _ in runs if order == k):
            pairs = [(runs.get((config, 1, n)), runs.get((config, k, n))) for n in nfes]
            cells = [f"{old['rmse'] / new['rmse']:.2f}" if old and new else "-" for old, new in pairs]
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict], nfes: list[int], orders: list[int]) -> tuple[list[str], list[dict]]:
    """Best project configuration (per final-step order) vs best diffusers configuration, by RMS and by median
    per-sample error (the median is robust to the few samples that a coarse solve sends to another component)."""
    head = "".join(f" best ours fs{k} | error | diffusers / ours |" for k in orders)
    lines = ["\n## Best project configuration vs best diffusers configuration\n",
             "| testbed | NFE | metric | best diffusers | error |" + head,
             "|---|---|---|---|---|" + "---|---|---|" * len(orders)]
    out = []
    for testbed in dict.fromkeys(r["testbed"] for r in rows):
        for n in nfes:
            for key in ("rmse", "rmse_median"):
                theirs = best_by_family(rows, testbed, n, "diffusers", key)
                best = {k: best_by_family(with_final_step(rows, k), testbed, n, "ours", key) for k in orders}
                if theirs is None or any(v is None for v in best.values()):
                    continue
                cells = ""
                for k, ours in best.items():
                    ratio = theirs[key] / ours[key]
                    out.append(dict(testbed=testbed, nfe=n, metric=key, final_step_order=k, ours=ours["solver"],
                                    ours_error=ours[key], diffusers=theirs["solver"], diffusers_error=theirs[key],
                                    ratio=ratio))
                    cells += f" {ours['solver']} | {ours[key]:.2e} | {ratio:.2f}x |"
                lines.append(f"| {testbed} | {n} | {key} | {theirs['solver']} | {theirs[key]:.2e} |" + cells)
    return lines, out


def plot(rows: list[dict], testbed: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    labels = dict.fromkeys((r["family"], r["solver"]) for r in rows if r["testbed"] == testbed)
    for family, label in labels:
        pts = sorted((r["nfe"], r["rmse"]) for r in rows
                     if r["testbed"] == testbed and r["solver"] == label and r["status"] == "ok")
        if pts:
            ax.loglog(*zip(*pts), "-o" if family == "ours" else "--x", ms=3, label=f"{family}: {label}")
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMS error vs reference")
    ax.set_title(testbed)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_steps(scheduler, outputs: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one step() over ``repeats`` runs of the whole loop (model outputs precomputed)."""
    times = []
    for _ in range(repeats):
        scheduler.set_timesteps(len(outputs))
        start = time.perf_counter()
        y = x
        for t, out in zip(scheduler.timesteps, outputs):
            y = scheduler.step(out, t, y).prev_sample
        times.append((time.perf_counter() - start) / len(outputs))
    return float(np.median(times))


def overhead(steps: int = 10, repeats: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    outputs = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(steps)]
    rows = []
    for label, (ours_name, ours_opts), (theirs_name, theirs_opts) in samplers.DIFFUSERS_PEERS:
        if ours_name not in samplers.SCHEDULERS:
            continue
        ours = time_steps(samplers.SCHEDULERS[ours_name](**ours_opts), outputs, x, repeats)
        theirs = time_steps(getattr(diffusers, theirs_name)(**theirs_opts), outputs, x, repeats)
        rows.append(dict(solver=label, ours_us=ours * 1e6, diffusers_us=theirs * 1e6, ratio=ours / theirs))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/bench_solvers"))
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20, 50])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    parser.add_argument("--final-step-orders", type=int, nargs="+", default=[1, 3],
                        help="final_step_order values run for every project configuration (default: 1 3)")
    parser.add_argument("--quick", action="store_true", help="two testbeds, NFE 5/10/20, 8 samples")
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small tensors, and no thrashing on a shared machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.nfe, args.samples, args.testbeds = [5, 10, 20], 8, ["gaussian-linear-eps", "mixture-linear-eps"]
    if any(n <= 0 for n in args.nfe):
        parser.error("--nfe values must be positive integers")
    orders = list(dict.fromkeys(args.final_step_orders))
    if any(k not in FINAL_STEP_ORDERS for k in orders):
        parser.error(f"--final-step-orders values must be in {FINAL_STEP_ORDERS}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    rows, report = [], []
    for testbed in args.testbeds:
        start = time.perf_counter()
        rows += accuracy(testbed, args.nfe, args.samples, orders)
        lines = print_table(rows, testbed, args.nfe) + final_step_table(rows, testbed, args.nfe, orders)
        report += lines
        plot(rows, testbed, args.out / f"{testbed}.png")
        print("\n".join(lines), f"\n({time.perf_counter() - start:.1f} s)", flush=True)
    lines, best = summary(rows, args.nfe, orders)
    report += lines
    print("\n".join(lines))
    over = [] if args.no_overhead else overhead()
    if over:
        over_lines = ["\n## Per-step solver overhead, batch 64x3x32x32 float32, CPU (no model)\n",
                      "| solver | ours (us/step) | diffusers (us/step) | ours / diffusers |", "|---|---|---|---|"]
        over_lines += [f"| {r['solver']} | {r['ours_us']:.0f} | {r['diffusers_us']:.0f} | {r['ratio']:.2f} |"
                       for r in over]
        report += over_lines
        print("\n".join(over_lines))
    write_csv(args.out / "accuracy.csv", rows, ["testbed", "family", "config", "solver", "final_step_order", "nfe",
                                                 "rmse", "rmse_median", "status"])
    (args.out / "results.json").write_text(json.dumps(dict(accuracy=rows, best=best, overhead=over), indent=1))
    (args.out / "results.md").write_text("\n".join(report) + "\n")
    print(f"\nwrote {args.out}/results.md, accuracy.csv, results.json and one PNG per testbed")


if __name__ == "__main__":
    main()
