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

    python scripts/bench_flow.py --out results/flow [--samples 64] [--seeds 0 1 2] [--quick]

Writes ``results.csv`` and ``results.json`` (one row per config x size x mixture seed x scheduler x NFE, plus the
pooled rows with ``seed="all"``).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

import samplers
from samplers.solvers.schedule import FlowMatchingSchedule
from samplers.testbeds import GaussianMixtureModel
from samplers.testbeds.reference import flow_reference_solution

NFES = (4, 5, 6, 8, 10, 12, 15, 20)
OURS = {"DPM++2M": "dpmsolver++", "UniPC": "unipc", "DEIS": "deis"}
SHAPES = ((3, 16, 16), (3, 32, 32))


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


def per_sample_error(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (out.double() - ref).flatten(1).pow(2).mean(1).sqrt().numpy()


def stats(err: np.ndarray) -> tuple[float, float]:
    return float(np.median(err)), float(np.quantile(err, 0.9))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/flow"))
    p.add_argument("--samples", type=int, default=64, help="noises per (size, mixture seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2),
                   help="mixture seeds; seed k draws its noises from seeds 1000 k + range(samples)")
    p.add_argument("--ref-steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=1024, help="Flux image sequence length for mu (1024: 512x512)")
    p.add_argument("--quick", action="store_true", help="16 samples, mixture seeds 0 1, 300 reference steps")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seeds, args.ref_steps = 16, (0, 1), 300
    torch.set_num_threads(1)
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
                    err = per_sample_error(samplers.sample(model, scheduler, noise.clone()).samples, ref)
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
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out / 'results.csv'} and results.json ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
