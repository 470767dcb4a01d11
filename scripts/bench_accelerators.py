"""Accelerator benchmark: error vs NFE with and without TimeShift, DualFast and Gaussian teleportation.

Testbeds (3x16x16, linear betas, epsilon prediction):

* ``gaussian`` - `GaussianModel`; reference: the closed-form ODE solution.
* ``mixture`` - the exact `GaussianMixtureModel` the learned model was trained on (K=8, std 0.15); reference:
  `samplers.testbeds.reference.reference_solution` (2000-step float64 DPM-Solver++(3M)).
* ``learned`` - the shipped `UNet2DModel` (`samplers.testbeds.learned.load_learned_model`), if present; reference:
  its own ``--learned-ref-steps``-step (default 1000) DPM-Solver++(2M) solution. Only here is there approximation error,
  the error Time-Shift and DualFast address.

Every configuration starts from the same noises. Metrics (the sweep's names): ``rmse``, the RMS error to the reference,
and ``rmse_median``, the per-sample median of the RMS error (on the first ``--ref-samples`` /
``--learned-ref-samples`` samples), and for the mixture and learned models ``pixel_fd``, the pixel-space Frechet
distance, and ``loglik_per_dim``, the exact log-likelihood of all ``--samples``
(``--learned-samples``) samples against the true data distribution (as many true samples give the floor).
Teleport stats are estimated from ``--stats-samples`` data samples (full covariance). Teleport runs use the tail of
an n-step grid with n - round(skip * n) = NFE, so they spend exactly the NFE of the row.

    python scripts/bench_accelerators.py --out results/accelerators [--quick] [--no-learned]

Writes ``results.csv`` (one row per testbed x configuration x NFE), ``summary.json`` (tables, Time-Shift shifts,
teleport calibrations, the NFE-6 target) and ``error_vs_nfe.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import samplers
from samplers import DPMSolverPlusPlusScheduler, DualFast, GaussianStats, GaussianTeleport, TimeShift, UniPCScheduler
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.evaluation.sweep import write_csv
from samplers.testbeds import GaussianMixtureModel, GaussianModel
from samplers.testbeds.reference import reference_solution

SHAPE = (3, 16, 16)
# base solvers (logSNR grids) and the accelerator families tried on each
BASES: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "DPM++2M": (lambda: DPMSolverPlusPlusScheduler(solver_order=2), ("TimeShift", "DualFast", "Teleport")),
    "DDIM": (lambda: DPMSolverPlusPlusScheduler(solver_order=1), ("TimeShift", "DualFast")),
    "DPM++3M": (lambda: DPMSolverPlusPlusScheduler(solver_order=3), ("Teleport",)),
    "UniPC-3": (lambda: UniPCScheduler(solver_order=3), ("Teleport",)),
}
TIME_SHIFTS = [(30, 300), (10, 700)]  # (window, cutoff): the paper's DDIM/DPM-Solver-2M and DEIS settings
# (space, form, scale): the default form at two scales, interpolation, and the data-space reading of the paper
DUALFAST = [("noise", "extrapolate", 0.1), ("noise", "extrapolate", 0.3), ("noise", "interpolate", 0.1),
            ("data", "interpolate", 0.1)]
SKIPS = [0.2, 0.3, 0.35, 0.4]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/accelerators"))
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    p.add_argument("--samples", type=int, default=1024, help="samples per configuration on the exact testbeds")
    p.add_argument("--learned-samples", type=int, default=256, help="samples per configuration, learned model")
    p.add_argument("--ref-samples", type=int, default=256, help="samples with a reference trajectory (exact)")
    p.add_argument("--learned-ref-samples", type=int, default=64, help="samples with a reference, learned model")
    p.add_argument("--stats-samples", type=int, default=4000, help="data samples for the teleport GaussianStats")
    p.add_argument("--learned-ref-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--no-learned", action="store_true", help="skip the learned model")
    p.add_argument("--quick", action="store_true", help="64 samples, 16 with references, NFE 6 and 10")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.learned_samples, args.ref_samples, args.learned_ref_samples = 128, 64, 32, 16
        args.nfe = [6, 10]
        args.learned_ref_steps = 200
    return args


# ---------------------------------------------------------------------------------------------------- testbeds
def build_testbeds(args: argparse.Namespace) -> list[dict[str, Any]]:
    noise = samplers.noise_from_seeds(range(args.samples), SHAPE, dtype=torch.float64)
    g = torch.Generator().manual_seed(12345)
    testbeds = []
    gaussian = GaussianModel(shape=SHAPE, rank=16, iso_std=0.1)
    testbeds.append({"name": "gaussian", "model": gaussian, "noise": noise, "mixture": None,
                     "reference": gaussian.ode_solution(noise[: args.ref_samples], 999.0, None),
                     "stats": GaussianStats.from_samples(gaussian.sample_data(args.stats_samples, g))})
    learned = None if args.no_learned else load_learned()
    mixture = learned[1] if learned else GaussianMixtureModel(shape=SHAPE, num_components=8, std=0.15)
    stats = GaussianStats.from_samples(mixture.sample_data(args.stats_samples, g))
    t0 = time.time()
    reference = reference_solution(mixture, noise[: args.ref_samples])
    print(f"mixture reference: {time.time() - t0:.1f}s", flush=True)
    testbeds.append({"name": "mixture", "model": mixture, "noise": noise, "mixture": mixture,
                     "reference": reference, "stats": stats})
    if learned:
        unet, mixture, note = learned
        t0 = time.time()
        with torch.no_grad():
            ref = samplers.sample(unet, DPMSolverPlusPlusScheduler(), noise[: args.learned_ref_samples].float(),
                                  args.learned_ref_steps).samples
        print(f"learned-model reference ({args.learned_ref_steps} steps): {time.time() - t0:.1f}s", flush=True)
        testbeds.append({"name": "learned", "model": unet, "noise": noise[: args.learned_samples].float(),
                         "mixture": mixture,
                         "reference": ref.double(), "stats": stats, "note": note})
    return testbeds


def load_learned() -> tuple[Any, GaussianMixtureModel, str] | None:
    try:
        from samplers.testbeds.learned import ASSET_DIR, load_learned_model
        unet, mixture = load_learned_model()
    except (ImportError, OSError, ValueError) as err:
        print(f"learned model unavailable ({type(err).__name__}: {err}); exact testbeds only", flush=True)
        return None
    spec = json.loads((ASSET_DIR / "mixture.json").read_text())
    steps = spec.get("training", {}).get("steps")
    return unet, mixture, f"UNet2DModel trained {steps} optimiser steps on {spec['shape']} mixture"


# ---------------------------------------------------------------------------------------------------- configs
def teleport_steps(nfe: int, skip: float) -> int | None:
    """Smallest grid size n whose tail after round(skip * n) steps has exactly ``nfe`` steps."""
    for n in range(nfe, 4 * nfe + 1):
        if n - min(int(math.floor(skip * n + 0.5)), n - 1) == nfe:
            return n
    return None


def auto_teleport(base: Callable[[], Any], stats: GaussianStats, model: Any, nfe: int,
                  cache: dict) -> tuple[GaussianTeleport, int] | None:
    """GaussianTeleport(skip="auto") on the largest grid whose automatic tail has at most ``nfe`` steps."""
    tele = cache.setdefault("tele", GaussianTeleport(base(), stats, skip="auto", probe_model=model))
    best = None
    for n in range(nfe, 3 * nfe + 1):
        if n not in tele.calibrations:
            tele.calibrations[n] = tele.calibrate(model, n)
        if n - tele.calibrations[n]["skip_index"] <= nfe:
            best = n
    if best is None:
        return None
    fresh = GaussianTeleport(base(), stats, skip="auto", probe_model=model)
    fresh.calibrations = tele.calibrations
    return fresh, best


def configs(testbed: dict[str, Any], nfe: int, cache: dict) -> list[tuple[str, str, str, Any, int]]:
    """(family, base, label, scheduler, num_inference_steps) for one testbed and NFE."""
    stats, model = testbed["stats"], testbed["model"]
    rows = []
    for base_name, (base, families) in BASES.items():
        rows.append(("plain", base_name, base_name, base(), nfe))
        if "TimeShift" in families:
            for window, cutoff in TIME_SHIFTS:
                rows.append(("TimeShift", base_name, f"TS(w={window},c={cutoff})", TimeShift(base(), window, cutoff),
                             nfe))
        if "DualFast" in families:
            for space, form, scale in DUALFAST:
                rows.append(("DualFast", base_name, f"DF({space},{form[:6]},{scale})",
                             DualFast(base(), scale, form=form, space=space), nfe))
        if "Teleport" not in families:
            continue
        for skip in SKIPS:
            n = teleport_steps(nfe, skip)
            if n is not None:
                rows.append(("Teleport", base_name, f"TP(skip={skip})", GaussianTeleport(base(), stats, skip), n))
        auto = auto_teleport(base, stats, model, nfe, cache.setdefault(base_name, {}))
        if auto is not None:
            rows.append(("Teleport", base_name, "TP(auto)", *auto))
    return rows


def combined(testbed: dict[str, Any], rows: list[dict], nfe: int) -> list[tuple[str, str, str, Any, int]]:
    """TimeShift(DualFast(GaussianTeleport(DPM++2M))) with the best setting of each at this NFE, if each helped."""
    def best(family: str) -> dict | None:
        cands = [r for r in rows if r["testbed"] == testbed["name"] and r["nfe"] == nfe and r["family"] == family
                 and r["base"] == "DPM++2M"]
        return min(cands, key=lambda r: r["rmse"], default=None)

    tp, df, ts = best("Teleport"), best("DualFast"), best("TimeShift")
    plain = best("plain")
    if tp is None or plain is None:
        return []
    sched: Any = GaussianTeleport(BASES["DPM++2M"][0](), testbed["stats"], tp["skip"], probe_model=testbed["model"])
    label = tp["config"]
    if df is not None and df["rmse"] < plain["rmse"]:
        space, form, scale = df["config"][3:-1].split(",")
        sched = DualFast(sched, float(scale), form="interpolate" if form == "interp" else "extrapolate", space=space)
        label += "+" + df["config"]
    if ts is not None and ts["rmse"] < plain["rmse"]:
        window, cutoff = (int(v.split("=")[1]) for v in ts["config"][3:-1].split(","))
        sched = TimeShift(sched, window, cutoff)
        label += "+" + ts["config"]
    return [("Combined", "DPM++2M", label, sched, tp["steps"])] if "+" in label else []


# ---------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate(testbed: dict[str, Any], family: str, base: str, label: str, scheduler: Any, steps: int,
             nfe_target: int) -> dict[str, Any]:
    t0 = time.time()
    result = samplers.sample(testbed["model"], scheduler, testbed["noise"], steps)
    x = result.samples.double()
    ref = testbed["reference"]
    summary = ErrorSummary.of(per_sample_error(x[: len(ref)], ref))
    row = {"testbed": testbed["name"], "family": family, "base": base, "config": label, "nfe": nfe_target,
           "nfe_used": result.nfe + getattr(scheduler, "extra_nfe", 0), "steps": steps,
           "rmse": summary.rms, "rmse_median": summary.median,
           "seconds": round(time.time() - t0, 2)}
    if testbed["mixture"] is not None:
        from samplers.testbeds.learned import distribution_metrics
        row.update(distribution_metrics(x, testbed["mixture"]))
    tele = find(scheduler, GaussianTeleport)
    if tele is not None:
        row["skip"] = tele.skip
        row["skip_timestep"] = round(tele.skip_timestep, 1)
        if tele.skip == "auto":
            row["probe_nfe"] = tele.calibrations[steps]["extra_nfe"]
    shift = find(scheduler, TimeShift)
    if shift is not None:
        row["shifts"] = [[round(h.nominal, 1), round(float(h.offsets.mean()), 2), float(h.offsets.min()),
                          float(h.offsets.max())] for h in shift.shift_history]
    return row


def find(scheduler: Any, cls: type) -> Any:
    while scheduler is not None:
        if isinstance(scheduler, cls):
            return scheduler
        scheduler = getattr(scheduler, "__dict__", {}).get("inner")
    return None


# ---------------------------------------------------------------------------------------------------- report
def table(rows: list[dict], testbed: str, nfes: list[int], metric: str) -> list[str]:
    labels = list(dict.fromkeys((r["base"], r["config"]) for r in rows if r["testbed"] == testbed))
    lines = [f"{'base':8s} {'config':34s} " + " ".join(f"NFE={n:<7d}" for n in nfes)]
    for base, label in labels:
        cells = []
        for n in nfes:
            r = next((r for r in rows if r["testbed"] == testbed and r["base"] == base and r["config"] == label
                      and r["nfe"] == n), None)
            cells.append(f"{r[metric]:<11.4g}" if r is not None and metric in r else f"{'-':11s}")
        lines.append(f"{base:8s} {label:34s} " + " ".join(cells))
    return lines


def target(rows: list[dict], testbed: str) -> dict[str, Any] | None:
    """Best accelerated configuration at NFE 6 vs plain DPM++2M at each NFE."""
    acc = [r for r in rows if r["testbed"] == testbed and r["nfe"] == 6 and r["family"] != "plain"]
    plain = {r["nfe"]: r for r in rows if r["testbed"] == testbed and r["family"] == "plain" and r["base"] == "DPM++2M"}
    if not acc or 10 not in plain:
        return None
    out = {}
    for metric in ("rmse", "rmse_median", "pixel_fd"):
        if metric not in acc[0]:
            continue
        best = min(acc, key=lambda r: r[metric])
        out[metric] = {"best": f"{best['base']} {best['config']}", "best_at_6": best[metric],
                       "nfe_used": best["nfe_used"],
                       "dpm2m": {n: r[metric] for n, r in sorted(plain.items())},
                       "met": best[metric] <= plain[10][metric]}
    return out


def plot(rows: list[dict], testbeds: list[str], path: Path) -> None:
    """Per testbed (columns) and metric (rows: RMS, per-sample median): plain DPM++2M and the best configuration
    of each accelerator family around it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(testbeds), figsize=(5.5 * len(testbeds), 8), squeeze=False)
    for col, name in enumerate(testbeds):
        sub = [r for r in rows if r["testbed"] == name and r["base"] == "DPM++2M"]
        for ax, metric in zip(axes[:, col], ("rmse", "rmse_median")):
            for family in ("plain", "TimeShift", "DualFast", "Teleport", "Combined"):
                best: dict[int, dict] = {}
                for r in sub:
                    if r["family"] == family and (r["nfe"] not in best or r[metric] < best[r["nfe"]][metric]):
                        best[r["nfe"]] = r
                if best:
                    nfes = sorted(best)
                    label = "DPM++2M" if family == "plain" else f"best {family}"
                    ax.semilogy(nfes, [best[n][metric] for n in nfes], "o-", label=label)
            ax.set(title=f"{name}: DPM++2M base", xlabel="NFE", ylabel=f"{metric} error to reference")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    testbeds = build_testbeds(args)
    rows: list[dict] = []
    for testbed in testbeds:
        if testbed["mixture"] is not None:
            from samplers.testbeds.learned import distribution_metrics
            data = testbed["mixture"].sample_data(len(testbed["noise"]), torch.Generator().manual_seed(7))
            testbed["floor"] = distribution_metrics(data, testbed["mixture"])
        cache: dict = {}
        for nfe in args.nfe:
            for family, base, label, scheduler, steps in configs(testbed, nfe, cache):
                rows.append(evaluate(testbed, family, base, label, scheduler, steps, nfe))
            for family, base, label, scheduler, steps in combined(testbed, rows, nfe):
                rows.append(evaluate(testbed, family, base, label, scheduler, steps, nfe))
            print(f"{testbed['name']} NFE {nfe}: {len(rows)} rows", flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "shifts"))
    write_csv(args.out / "results.csv", rows, keys)
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "testbeds": {}}
    for testbed in testbeds:
        name = testbed["name"]
        metrics = ["rmse", "rmse_median"] + (["pixel_fd", "loglik_per_dim"] if testbed["mixture"] is not None else [])
        tables = {m: table(rows, name, args.nfe, m) for m in metrics}
        floor = testbed.get("floor", {})
        for m in metrics:
            print(f"\n== {name}: {m} ==" + (f" ({testbed['note']})" if "note" in testbed else "")
                  + (f"  [{len(testbed['noise'])} true samples: {floor[m]:.4g}]" if m in floor else ""))
            print("\n".join(tables[m]))
        shifts = {f"{r['base']} {r['config']} NFE={r['nfe']}": r["shifts"] for r in rows
                  if r["testbed"] == name and "shifts" in r}
        for key, value in shifts.items():
            if key.startswith("DPM++2M TS(w=30"):
                print(f"Time-Shift offsets {key} (nominal t, mean, min, max per step): {value}")
        calib = {f"{r['base']} NFE={r['nfe']}": {"steps": r["steps"], "skip_timestep": r["skip_timestep"],
                                                 "probe_nfe": r["probe_nfe"]}
                 for r in rows if r["testbed"] == name and r.get("skip") == "auto"}
        goal = target(rows, name)
        summary["testbeds"][name] = {"tables": tables, "timeshift_shifts": shifts, "auto_teleport": calib,
                                     "target_nfe6_vs_dpm2m": goal, "true_samples": floor,
                                     "note": testbed.get("note", "")}
        if goal:
            for metric, g in goal.items():
                print(f"target ({name}, {metric}): best at NFE 6 = {g['best']} {g['best_at_6']:.4g}; "
                      f"DPM++2M: " + ", ".join(f"NFE {n}: {v:.4g}" for n, v in g["dpm2m"].items())
                      + f" -> {'met' if g['met'] else 'not met'}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    plot(rows, [t["name"] for t in testbeds], args.out / "error_vs_nfe.png")
    print(f"\nwrote {args.out / 'results.csv'}, {args.out / 'summary.json'}, {args.out / 'error_vs_nfe.png'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
