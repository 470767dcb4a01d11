"""Flow-matching benchmark: the project's solvers vs the stock flow schedulers of SD3, Flux and Wan.

Testbed: the exact-velocity `GaussianMixtureModel` under rectified flow (x_sigma = (1 - sigma) x0 + sigma eps, velocity
output), reference: `samplers.testbeds.reference.flow_reference_solution` (float64 RK4 in u, sigma = u^2). Each stock
config is driven the way its pipeline drives it, and the project's DPM-Solver++ (2M), UniPC (bh2, p2) and DEIS
(2 points) are built with ``from_config(stock.config)``:

* ``SD3`` - `FlowMatchEulerDiscreteScheduler(shift=3)`, ``set_timesteps(n)``;
* ``Flux`` - `FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)`, ``set_timesteps(sigmas=linspace(1, 1 / n,
  n), mu=calculate_shift(--seq-len))`` as `FluxPipeline` calls it;
* ``Wan`` - `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3)`.

Metric: per-sample RMS error to the reference; the tables give its median and 90th percentile per NFE and the
stock / ours ratios.

    python scripts/bench_flow.py --out results/flow [--samples 64] [--quick]

Writes ``results.csv`` (one row per stock config x scheduler x NFE).
"""

from __future__ import annotations

import argparse
import csv
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
OURS = {"DPM++2M": ("dpmsolver++", {}), "UniPC": ("unipc", {}), "DEIS": ("deis", {})}


def calculate_shift(seq_len: int, base_seq: int = 256, max_seq: int = 4096, base: float = 0.5,
                    top: float = 1.15) -> float:
    """Flux's mu: linear in the image sequence length between (base_seq, base) and (max_seq, top)."""
    return base + (top - base) * (seq_len - base_seq) / (max_seq - base_seq)


def stock_configs(seq_len: int) -> dict[str, tuple[Any, Callable[[Any, int], None]]]:
    """Stock scheduler and how its pipeline calls ``set_timesteps``, per model family."""
    mu = calculate_shift(seq_len)

    def flux(s: Any, n: int) -> None:
        s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)

    def plain(s: Any, n: int) -> None:
        s.set_timesteps(n)

    return {
        "SD3": (FlowMatchEulerDiscreteScheduler(shift=3.0), plain),
        "Flux": (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), flux),
        "Wan": (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
                plain),
    }


def per_sample_error(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (out.double() - ref).flatten(1).pow(2).mean(1).sqrt().numpy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/flow"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    p.add_argument("--ref-steps", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=1024, help="Flux image sequence length for mu (1024: 512x512)")
    p.add_argument("--quick", action="store_true", help="16 samples, 3x16x16, 300 reference steps")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.shape, args.ref_steps = 16, (3, 16, 16), 300
    torch.set_num_threads(1)
    shape = tuple(args.shape)
    model = GaussianMixtureModel(shape, schedule=FlowMatchingSchedule(), prediction_type="flow_prediction")
    noise = samplers.noise_from_seeds(range(args.samples), shape, dtype=torch.float64)
    start = time.time()
    ref = flow_reference_solution(model, noise, steps=args.ref_steps)
    print(f"reference: {args.samples} samples {shape}, {args.ref_steps} RK4 steps, {time.time() - start:.1f}s")
    rows = []
    for family, (stock, drive) in stock_configs(args.seq_len).items():
        schedulers = {"stock": stock, **{label: samplers.SCHEDULERS[name].from_config(stock.config, **opts)
                                         for label, (name, opts) in OURS.items()}}
        table: dict[str, dict[int, tuple[float, float]]] = {}
        for label, scheduler in schedulers.items():
            table[label] = {}
            for nfe in NFES:
                drive(scheduler, nfe)
                err = per_sample_error(samplers.sample(model, scheduler, noise.clone()).samples, ref)
                med, p90 = float(np.median(err)), float(np.quantile(err, 0.9))
                table[label][nfe] = (med, p90)
                rows.append({"config": family, "scheduler": label, "nfe": nfe, "median": med, "p90": p90})
        print(f"\n{family}: per-sample RMS error to the reference, median / p90 (ratio stock / ours)")
        print("| NFE | stock | " + " | ".join(OURS) + " |")
        print("|---|---|" + "---|" * len(OURS))
        for nfe in NFES:
            s_med, s_p90 = table["stock"][nfe]
            cells = [f"{m:.4f} / {q:.4f} ({s_med / m:.1f}x / {s_p90 / q:.1f}x)"
                     for m, q in (table[label][nfe] for label in OURS)]
            print(f"| {nfe} | {s_med:.4f} / {s_p90:.4f} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out / 'results.csv'} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
