"""Flow-matching benchmark: the project's solvers vs the stock flow schedulers of SD3, Flux and Wan.

Testbed: exact-velocity `GaussianMixtureModel`s under rectified flow (x_sigma = (1 - sigma) x0 + sigma eps, velocity
output) at two sizes (3x16x16 and 3x32x32) and several mixture seeds, each with its own block of noises; reference:
`samplers.testbeds.reference.flow_reference_solution` (float64 RK4 in u, sigma = u^2). Each stock config is driven
the way its pipeline drives it, and the project's DPM-Solver++ (2M), UniPC (bh2, p2) and DEIS (2 points) are built
with ``from_config(stock.config)`` and driven the same way:

* ``SD3`` - `FlowMatchEulerDiscreteScheduler(shift=3)`, ``set_timesteps(n)``;
* ``Flux`` - `FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)`, ``set_timesteps(sigmas=linspace(1, 1 / n,
  n), mu=calculate_shift(--seq-len))`` as `FluxPipeline` calls it (the project's schedulers honour those sigmas);
* ``Flux+own`` - the same stock rows; the project's schedulers built with ``use_flow_sigmas=True``, for which
  `FluxPipeline` drops its sigmas and passes ``mu`` alone (``set_timesteps(n, mu=mu)``: the project's grid);
* ``Wan`` - `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3)`.

Metric: per-sample RMS error to the reference. Per config, size and NFE the table gives the median and the 90th
percentile over all noises of that size (every mixture seed pooled) and the stock / ours ratios; ``worst`` is the
smallest ratio over the single (size, mixture seed) cases (> 1: ours lower in every case).

Tuned section (``--tables tuned`` or ``all``): `samplers.tune` on the project's UniPC and DPM-Solver++ built with
``from_config(FlowMatchEulerDiscreteScheduler(shift=3).config)`` (SD3's config), calibrated and accepted on tune's
own seeds (1,000,000,000+ and 1,000,001,000+), vs the best of diffusers' flow configurations (`DIFFUSERS_FLOW`:
`FlowMatchEulerDiscreteScheduler` at shifts 1, 3, 6, also with Karras sigmas; `DPMSolverMultistepScheduler` 2M / 3M,
`UniPCMultistepScheduler` and `DEISMultistepScheduler` with ``use_flow_sigmas`` at flow shifts 1, 3, 6), all
evaluated on noises from seeds 10,000 + 1000 k + range(--tuned-samples) for mixture seed k (disjoint from the
calibration and hold-out noises and from the stock tables' noises) at NFE 5, 6, 8 and 10. Per size and NFE the
table names the best diffusers configuration by median and by p90 (pooled over the mixture seeds; each is the best
of its own column) and gives best diffusers / tuned ours (above 1: ours lower; the issue's target is 1.5).

    python scripts/bench_flow.py --out results/flow [--samples 64] [--seeds 0 1 2] [--quick] [--tables all]

Writes ``results.csv`` and ``results.json`` (one row per config x size x mixture seed x scheduler x NFE, plus the
pooled rows with ``seed="all"``); the tuned section writes ``tuned.csv`` (one row per size x mixture seed x
scheduler x NFE, pooled rows with ``seed="all"``; a diffusers configuration that raises is a ``crash`` row),
``tuned_summary.csv`` (the printed table) and ``tuned.json`` (settings, rows and summary).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import samplers
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.evaluation.sweep import write_csv
from samplers.solvers.schedule import FlowMatchingSchedule
from samplers.solvers.tune import CALIBRATION_SEEDS, HOLDOUT_SEEDS
from samplers.testbeds import GaussianMixtureModel
from samplers.testbeds.reference import flow_reference_solution

NFES = (4, 5, 6, 8, 10, 12, 15, 20)
OURS = {"DPM++2M": "dpmsolver++", "UniPC": "unipc", "DEIS": "deis"}
SHAPES = ((3, 16, 16), (3, 32, 32))
TUNED_NFES = (5, 6, 8, 10)
#: the project's schedulers tuned in the tuned section, each built with from_config(SD3's FlowMatchEuler config)
TUNED = {"UniPC": samplers.UniPCScheduler, "DPM++2M": samplers.DPMSolverPlusPlusScheduler}
#: evaluation noises of the tuned section: seeds TUNED_EVAL_SEED + 1000 k + range(samples) for mixture seed k
TUNED_EVAL_SEED = 10_000


def diffusers_flow_configs() -> dict[str, Callable[[], Any]]:
    """diffusers' flow configurations the tuned section compares against, as constructors (a configuration that
    raises is recorded as a crash)."""
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
    configs: dict[str, Callable[[], Any]] = {}
    for shift in (1.0, 3.0, 6.0):
        configs[f"Euler shift {shift:g}"] = lambda s=shift: FlowMatchEulerDiscreteScheduler(shift=s)
    for shift in (1.0, 3.0, 6.0):
        configs[f"Euler Karras shift {shift:g}"] = \
            lambda s=shift: FlowMatchEulerDiscreteScheduler(shift=s, use_karras_sigmas=True)
    for shift in (1.0, 3.0, 6.0):
        for order in (2, 3):
            configs[f"DPM++{order}M flow shift {shift:g}"] = \
                lambda s=shift, o=order: DPMSolverMultistepScheduler(solver_order=o, flow_shift=s, **flow)
        configs[f"UniPC flow shift {shift:g}"] = lambda s=shift: UniPCMultistepScheduler(flow_shift=s, **flow)
        configs[f"DEIS flow shift {shift:g}"] = lambda s=shift: DEISMultistepScheduler(flow_shift=s, **flow)
    return configs


def calculate_shift(seq_len: int, base_seq: int = 256, max_seq: int = 4096, base: float = 0.5,
                    top: float = 1.15) -> float:
    """Flux's mu: linear in the image sequence length between (base_seq, base) and (max_seq, top)."""
    return base + (top - base) * (seq_len - base_seq) / (max_seq - base_seq)


def stock_configs(seq_len: int) -> dict[str, tuple[Any, dict[str, Any], Callable[[Any, int], None],
                                                   Callable[[Any, int], None]]]:
    """Per model family: stock scheduler, extra ``from_config`` options of ours, how the pipeline calls the stock
    scheduler's ``set_timesteps`` and how it calls ours."""
    mu = calculate_shift(seq_len)

    def flux(s: Any, n: int) -> None:  # FluxPipeline: its own sigmas, unless the scheduler has use_flow_sigmas
        if getattr(s.config, "use_flow_sigmas", False):
            s.set_timesteps(n, mu=mu)
        else:
            s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)

    def plain(s: Any, n: int) -> None:
        s.set_timesteps(n)

    flux_stock = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return {
        "SD3": (FlowMatchEulerDiscreteScheduler(shift=3.0), {}, plain, plain),
        "Flux": (flux_stock, {}, flux, flux),
        "Flux+own": (flux_stock, {"use_flow_sigmas": True}, flux, flux),
        "Wan": (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
                {}, plain, plain),
    }


def errors_of(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """`quality.per_sample_error` as an array (pooled over mixtures below)."""
    return per_sample_error(out, ref).cpu().numpy()


def stats(err: np.ndarray) -> tuple[float, float]:
    """(median, p90) of per-sample errors, by `quality.ErrorSummary` (the sweep's definitions)."""
    summary = ErrorSummary.of(err)
    return summary.median, summary.p90


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/flow"))
    p.add_argument("--samples", type=int, default=64, help="noises per (size, mixture seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2),
                   help="mixture seeds; seed k draws its noises from seeds 1000 k + range(samples)")
    p.add_argument("--ref-steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=1024, help="Flux image sequence length for mu (1024: 512x512)")
    p.add_argument("--tables", choices=("stock", "tuned", "all"), default="all",
                   help="stock: the stock-config tables; tuned: tuned ours vs the best diffusers flow configuration")
    p.add_argument("--tuned-samples", type=int, default=256, help="evaluation noises per (size, mixture seed), tuned")
    p.add_argument("--tune-budget", type=int, default=2000, help="samplers.tune budget (batched model calls)")
    p.add_argument("--teacher-steps", type=int, default=200, help="samplers.tune teacher steps")
    p.add_argument("--tune-noises", type=int, default=64, help="calibration and hold-out noises each")
    p.add_argument("--tail-weight", type=float, default=0.0,
                   help="samplers.tune's tail_weight (0: median + p90; 1 adds the mean of the worst 10 %%)")
    p.add_argument("--tuned-sizes", nargs="+", default=None, metavar="CxHxW",
                   help="sample shapes of the tuned section (default: 3x16x16 3x32x32; --quick: 3x16x16)")
    p.add_argument("--tuned-nfes", type=int, nargs="+", default=TUNED_NFES)
    p.add_argument("--quick", action="store_true", help="16 samples, mixture seeds 0 1, 300 reference steps; "
                   "tuned: 3x16x16 only, 64 samples, budget 300, 60 teacher steps")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seeds, args.ref_steps = 16, (0, 1), 300
        args.tuned_samples, args.tune_budget, args.teacher_steps = 64, 300, 60
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables in ("stock", "all"):
        stock_tables(args)
    if args.tables in ("tuned", "all"):
        tuned_tables(args)


def stock_tables(args: argparse.Namespace) -> None:
    start = time.time()
    cases = {}
    for shape in SHAPES:
        for seed in args.seeds:
            model = GaussianMixtureModel(shape, seed=seed, schedule=FlowMatchingSchedule(),
                                         prediction_type="flow_prediction")
            noise = samplers.noise_from_seeds(range(1000 * seed, 1000 * seed + args.samples), shape,
                                              dtype=torch.float64)
            cases[shape, seed] = (model, noise, flow_reference_solution(model, noise, steps=args.ref_steps))
    print(f"references: {len(cases)} cases x {args.samples} samples, {args.ref_steps} RK4 steps, "
          f"{time.time() - start:.0f}s")
    rows: list[dict[str, Any]] = []
    errors: dict[tuple, np.ndarray] = {}
    for family, (stock, options, drive_stock, drive_ours) in stock_configs(args.seq_len).items():
        schedulers = {"stock": (stock, drive_stock)}
        schedulers |= {label: (samplers.SCHEDULERS[name].from_config(stock.config, **options), drive_ours)
                       for label, name in OURS.items()}
        for label, (scheduler, drive) in schedulers.items():
            for (shape, seed), (model, noise, ref) in cases.items():
                for nfe in NFES:
                    drive(scheduler, nfe)
                    err = errors_of(samplers.sample(model, scheduler, noise.clone()).samples, ref)
                    errors[family, label, shape, seed, nfe] = err
                    rows.append({"config": family, "size": "x".join(map(str, shape)), "seed": seed,
                                 "scheduler": label, "nfe": nfe, **dict(zip(("median", "p90"), stats(err)))})
        for shape in SHAPES:
            size = "x".join(map(str, shape))
            print(f"\n{family}, {size} ({len(args.seeds)} mixtures x {args.samples} noises): per-sample RMS error, "
                  "median / p90 (stock / ours; worst case over mixtures)")
            print("| NFE | stock | " + " | ".join(OURS) + " |")
            print("|---|---|" + "---|" * len(OURS))
            for nfe in NFES:
                pooled = {label: np.concatenate([errors[family, label, shape, s, nfe] for s in args.seeds])
                          for label in schedulers}
                for label, err in pooled.items():
                    rows.append({"config": family, "size": size, "seed": "all", "scheduler": label, "nfe": nfe,
                                 **dict(zip(("median", "p90"), stats(err)))})
                s_med, s_p90 = stats(pooled["stock"])
                cells = []
                for label in OURS:
                    med, p90 = stats(pooled[label])
                    worst = min(min(a / b for a, b in zip(stats(errors[family, "stock", shape, s, nfe]),
                                                          stats(errors[family, label, shape, s, nfe])))
                                for s in args.seeds)
                    cells.append(f"{med:.4f} / {p90:.4f} ({s_med / med:.1f}x / {s_p90 / p90:.1f}x; {worst:.2f})")
                print(f"| {nfe} | {s_med:.4f} / {s_p90:.4f} | " + " | ".join(cells) + " |")
    write_csv(args.out / "results.csv", rows)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out / 'results.csv'} and results.json ({time.time() - start:.0f}s)")


def _fmt(x: float) -> str:
    return f"{x:.2g}" if x < 1e-3 else f"{x:.4f}"


def tuned_tables(args: argparse.Namespace) -> None:
    """Tuned ours vs the best diffusers flow configuration (see the module docstring)."""
    start = time.time()
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.tuned_sizes:
        shapes = tuple(tuple(int(d) for d in size.split("x")) for size in args.tuned_sizes)
    nfes = tuple(args.tuned_nfes)
    k = args.tune_noises
    rows: list[dict[str, Any]] = []
    errors: dict[tuple, np.ndarray] = {}
    accepted: dict[tuple, list[bool]] = {}
    crashes: dict[str, str] = {}
    tune_seconds = 0.0
    for shape in shapes:
        size = "x".join(map(str, shape))
        calibration = samplers.noise_from_seeds(CALIBRATION_SEEDS[:k], shape, dtype=torch.float64)
        holdout = samplers.noise_from_seeds(HOLDOUT_SEEDS[:k], shape, dtype=torch.float64)
        for seed in args.seeds:
            model = GaussianMixtureModel(shape, seed=seed, schedule=FlowMatchingSchedule(),
                                         prediction_type="flow_prediction")
            first = TUNED_EVAL_SEED + 1000 * seed
            noise = samplers.noise_from_seeds(range(first, first + args.tuned_samples), shape, dtype=torch.float64)
            ref = flow_reference_solution(model, noise, steps=args.ref_steps)

            def record(label: str, kind: str, nfe: int, err: np.ndarray | None, size: str = size, seed: int = seed,
                       **extra: Any) -> None:
                if err is not None:
                    errors[size, seed, label, nfe] = err
                    med, p90 = stats(err)
                else:
                    med = p90 = None
                rows.append({"size": size, "seed": seed, "scheduler": label, "kind": kind, "nfe": nfe,
                             "median": med, "p90": p90, **extra})

            for nfe in nfes:
                for label, build in diffusers_flow_configs().items():
                    try:
                        scheduler = build()
                        scheduler.set_timesteps(nfe)
                        out = samplers.sample(model, scheduler, noise.clone()).samples
                        err = errors_of(out, ref)
                        if not np.all(np.isfinite(err)):
                            raise FloatingPointError("non-finite samples")
                    except Exception as e:  # a configuration diffusers refuses or that blows up: a crash row
                        crashes[label] = f"{type(e).__name__}: {e}"
                        record(label, "diffusers", nfe, None, status=f"crash: {crashes[label]}")
                        continue
                    record(label, "diffusers", nfe, err, status="ok")
                for name, cls in TUNED.items():
                    base = cls.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
                    base.set_timesteps(nfe)
                    record(f"{name} untuned", "ours untuned", nfe,
                           errors_of(samplers.sample(model, base, noise.clone()).samples, ref), status="ok")
                    t0 = time.time()
                    result = samplers.tune(model, base, nfe, calibration_noise=calibration, holdout_noise=holdout,
                                           budget=args.tune_budget, teacher_steps=args.teacher_steps,
                                           tail_weight=args.tail_weight, progress=False)
                    seconds = time.time() - t0
                    tune_seconds += seconds
                    accepted.setdefault((size, name, nfe), []).append(result.improved)
                    tuned = result.scheduler
                    tuned.set_timesteps(nfe)
                    record(f"{name} tuned", "ours tuned", nfe,
                           errors_of(samplers.sample(model, tuned, noise.clone()).samples, ref), status="ok",
                           improved=result.improved, tune_seconds=round(seconds, 2),
                           model_evaluations=result.model_evaluations,
                           timesteps=" ".join(f"{t:.2f}" for t in result.timesteps), message=result.message)
            print(f"tuned section: {size} mixture {seed} done ({time.time() - start:.0f}s)")
    labels = list(dict.fromkeys(r["scheduler"] for r in rows))
    kinds = {r["scheduler"]: r["kind"] for r in rows}
    summary: list[dict[str, Any]] = []
    for shape in shapes:
        size = "x".join(map(str, shape))
        for nfe in nfes:
            pooled = {label: np.concatenate([errors[size, s, label, nfe] for s in args.seeds]) for label in labels
                      if all((size, s, label, nfe) in errors for s in args.seeds)}
            for label, err in pooled.items():
                med, p90 = stats(err)
                rows.append({"size": size, "seed": "all", "scheduler": label, "kind": kinds[label], "nfe": nfe,
                             "median": med, "p90": p90, "status": "ok"})
            theirs = {label: stats(err) for label, err in pooled.items() if kinds[label] == "diffusers"}
            best_med = min(theirs, key=lambda lb: theirs[lb][0])
            best_p90 = min(theirs, key=lambda lb: theirs[lb][1])
            for name in TUNED:
                med, p90 = stats(pooled[f"{name} tuned"])
                u_med, u_p90 = stats(pooled[f"{name} untuned"])
                # smallest ratio over the single mixtures, each against that mixture's best diffusers median / p90
                worst = min(min(min(stats(errors[size, s, lb, nfe])[0] for lb in theirs)
                                / stats(errors[size, s, f"{name} tuned", nfe])[0],
                                min(stats(errors[size, s, lb, nfe])[1] for lb in theirs)
                                / stats(errors[size, s, f"{name} tuned", nfe])[1]) for s in args.seeds)
                summary.append({
                    "size": size, "nfe": nfe, "ours": name, "best_median_config": best_med,
                    "best_median": theirs[best_med][0], "best_p90_config": best_p90, "best_p90": theirs[best_p90][1],
                    "untuned_median": u_med, "untuned_p90": u_p90, "tuned_median": med, "tuned_p90": p90,
                    "median_ratio": theirs[best_med][0] / med, "p90_ratio": theirs[best_p90][1] / p90,
                    "worst_mixture_ratio": worst, "accepted": sum(accepted[size, name, nfe]),
                    "mixtures": len(args.seeds)})
    n_eval = args.tuned_samples * len(args.seeds)
    print(f"\nTuned ours vs the best diffusers flow configuration ({len(args.seeds)} mixtures x {args.tuned_samples} "
          f"evaluation noises per size, seeds {TUNED_EVAL_SEED}+; tune: {k} calibration + {k} hold-out noises, "
          f"budget {args.tune_budget}, {args.teacher_steps} teacher steps, tail_weight {args.tail_weight:g}). "
          f"Per-sample RMS error, median / p90 over "
          f"the {n_eval} noises; ratio = best diffusers / tuned ours (> 1: ours lower; target 1.5); worst = smallest "
          f"median or p90 ratio over the single mixtures; accepted = mixtures where tune kept its grid")
    print("| size | NFE | ours | best diffusers by median | best diffusers by p90 | ours untuned | ours tuned "
          "| ratio median / p90 | worst | accepted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['size']} | {r['nfe']} | {r['ours']} | {r['best_median_config']}: {_fmt(r['best_median'])} "
              f"| {r['best_p90_config']}: {_fmt(r['best_p90'])} | {_fmt(r['untuned_median'])} / "
              f"{_fmt(r['untuned_p90'])} | {_fmt(r['tuned_median'])} / {_fmt(r['tuned_p90'])} "
              f"| {r['median_ratio']:.1f}x / {r['p90_ratio']:.1f}x | {r['worst_mixture_ratio']:.2f} "
              f"| {r['accepted']}/{r['mixtures']} |")
    for label, message in crashes.items():
        print(f"crash: {label}: {message}")
    settings = {"sizes": ["x".join(map(str, s)) for s in shapes], "mixture_seeds": list(args.seeds),
                "eval_samples": args.tuned_samples, "eval_seed_start": TUNED_EVAL_SEED, "nfes": list(nfes),
                "tune_budget": args.tune_budget, "teacher_steps": args.teacher_steps,
                "tail_weight": args.tail_weight, "tune_noises": k,
                "ref_steps": args.ref_steps, "tune_seconds": round(tune_seconds, 1),
                "diffusers_configs": list(diffusers_flow_configs())}
    write_csv(args.out / "tuned.csv", rows)
    write_csv(args.out / "tuned_summary.csv", summary)
    (args.out / "tuned.json").write_text(json.dumps({"settings": settings, "rows": rows, "summary": summary},
                                                    indent=1))
    print(f"\nwrote {args.out / 'tuned.csv'}, tuned_summary.csv and tuned.json ({time.time() - start:.0f}s, "
          f"{tune_seconds:.0f}s tuning)")


if __name__ == "__main__":
    main()
