"""Time-Shift: what moves to the shifted time, side by side (``TimeShift(shift=...)``).

On the testbeds of scripts/bench_accelerators.py (exact Gaussian, exact mixture, and the shipped learned model
if present; 3x16x16, linear betas), DDIM and DPM-Solver++(2M) at NFE 5, 6, 10, paper settings window=30
cutoff=300: the plain solver and the three shift modes ("input": network at t_s, the paper's text; "target":
the official DDIM/PNDM code; "all": the official DPM-Solver code). Metrics: per-sample RMS error to the
reference (median and 90th percentile) and, where the true distribution is known, the pixel-space Frechet
distance (FD) of all samples. Prints a table, writes ``timeshift_modes.csv``.

    python scripts/bench_timeshift.py [--out results/timeshift] [--samples 512] [--no-learned]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_accelerators import build_testbeds

import samplers
from samplers import DPMSolverPlusPlusScheduler, TimeShift
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.evaluation.sweep import write_csv
from samplers.testbeds.learned import distribution_metrics

BASES = {"DDIM": 1, "DPM++2M": 2}
MODES = ("plain", "input", "target", "all")


@torch.no_grad()
def measure(testbed: dict, scheduler: object, nfe: int) -> dict:
    x = samplers.sample(testbed["model"], scheduler, testbed["noise"], nfe).samples.double()
    ref = testbed["reference"]
    summary = ErrorSummary.of(per_sample_error(x[: len(ref)], ref))
    row = {"rmse_median": summary.median, "rmse_p90": summary.p90}
    if testbed["mixture"] is not None:
        row["pixel_fd"] = distribution_metrics(x, testbed["mixture"])["pixel_fd"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/timeshift"))
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 10])
    p.add_argument("--window", type=int, default=30)
    p.add_argument("--cutoff", type=float, default=300)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--learned-samples", type=int, default=256)
    p.add_argument("--ref-samples", type=int, default=128)
    p.add_argument("--learned-ref-samples", type=int, default=64)
    p.add_argument("--learned-ref-steps", type=int, default=500)
    p.add_argument("--stats-samples", type=int, default=64)
    p.add_argument("--no-learned", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for testbed in build_testbeds(args):
        for base, order in BASES.items():
            for nfe in args.nfe:
                for mode in MODES:
                    t0 = time.time()
                    scheduler = DPMSolverPlusPlusScheduler(solver_order=order)
                    if mode != "plain":
                        scheduler = TimeShift(scheduler, args.window, args.cutoff, shift=mode)
                    row = {"testbed": testbed["name"], "base": base, "nfe": nfe, "shift": mode,
                           **measure(testbed, scheduler, nfe), "seconds": round(time.time() - t0, 2)}
                    rows.append(row)
                    print(row, flush=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
    write_csv(args.out / "timeshift_modes.csv", rows, fields)
    print("\n| testbed | base | NFE | shift | pixel_fd | rmse_median | rmse_p90 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        fd = f"{r['pixel_fd']:.4g}" if "pixel_fd" in r else "-"
        print(f"| {r['testbed']} | {r['base']} | {r['nfe']} | {r['shift']} | {fd} | {r['rmse_median']:.4g} | "
              f"{r['rmse_p90']:.4g} |")


if __name__ == "__main__":
    main()
