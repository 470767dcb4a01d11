"""FKC against a paper-style sampler on 2-D exact targets, at 40 and 200 steps; prints a table, writes CSV.

Targets (exact scores): annealing p^2, product p1 p2, CFG p_c^3 p^-2. Quality: KL(weighted histogram of all
particles || target) on a 20 x 20 grid over [-4.5, 4.5]^2, populations x particles = 1000 x 8 (8000 particles;
i.i.d. target draws score the noise floor). The reference ("paper-style") is written here from the paper:
Euler-Maruyama on the VP SDE on a uniform time grid, drift -f x + g^2 s_q, left-point Euler log-weights
G(x_i, t_i) dt, systematic resampling every step but the last. Ours is `guidance.FKC` with
`FKCScheduler` in the variants listed in ``VARIANTS`` (and the SDE-DPM-Solver++(1) step of earlier releases);
"tempered noise" is the SDE with noise g / sqrt(S) and drift (S + 1) / (2 S) g^2 s_q (the paper's tempered-noise
SDE for annealing, (beta + 1) / 2 g^2 s; S = 1 for CFG, where it is the plain SDE).

    python scripts/bench_fkc.py [--out results/fkc] [--steps 40 200] [--populations 1000] [--all]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import HeunDiscreteScheduler

import guidance
import samplers
from guidance.fkc import resample_indices
from guidance.toy2d import Mixture2D, cell_probabilities, grid_centers, histogram, kl_divergence, sample_cells
from samplers.evaluation.sweep import write_csv

BASE = Mixture2D([[-2, -2], [2, 2], [-2, 2], [2, -2], [0, 0]], std=[0.6, 0.4, 0.5, 0.3, 0.45],
                 weights=[0.4, 0.25, 0.15, 0.12, 0.08])
RING = Mixture2D([[2.5 * math.cos(k * math.pi / 3), 2.5 * math.sin(k * math.pi / 3)] for k in range(6)], std=0.7,
                 weights=[0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
BLOBS = Mixture2D([[-1.5, 1.0], [1.5, -1.0], [1.0, 2.0]], std=[1.0, 0.9, 0.8], weights=[0.5, 0.3, 0.2])
#: class c holds components c and c + 2
CLASSES = Mixture2D([[-1.5, -1.0], [1.5, 1.0], [0.5, -1.5], [-0.5, 1.5]], std=[0.7, 0.6, 0.8, 0.5],
                    weights=[0.3, 0.3, 0.2, 0.2], num_classes=2)
CLASS0 = Mixture2D([[-1.5, -1.0], [0.5, -1.5]], std=[0.7, 0.8], weights=[0.6, 0.4])

#: our variants: name -> (FKC options, `FKC.scheduler` options, or None: SDE-DPM-Solver++(1) (earlier releases),
#: or "heun": diffusers' HeunDiscreteScheduler)
VARIANTS = {
    "ours: euler_maruyama, linspace (default)": ({}, {}),
    "ours: euler_maruyama, logsnr": ({}, {"timestep_schedule": "logsnr"}),
    "ours: euler_maruyama, linspace, frozen-e weights": ({"weight_rule": "frozen"}, {}),
    "ours: euler_maruyama, linspace, clamp 1": ({"clamp": 1.0}, {}),
    "ours: euler_maruyama, linspace, tempered noise": ({}, {"tempered_noise": True}),
    "ours: exponential, linspace": ({}, {"integrator": "exponential"}),
    "ours: exponential, logsnr": ({}, {"integrator": "exponential", "timestep_schedule": "logsnr"}),
    "diffusers Heun (an ODE solver), clamp 2 (the official EDM2 setting)": ({"clamp": 2.0}, "heun"),
    "before: SDE-DPM-Solver++(1), frozen-e weights": ({"weight_rule": "frozen"}, None),
}
PAPER = "paper-style Euler-Maruyama"
DEFAULT = "ours: euler_maruyama, linspace (default)"


def targets(limit: float, bins: int, n: int) -> dict:
    grid = grid_centers(limit, bins)
    labels = torch.zeros(n, dtype=torch.long)
    return {
        "anneal p^2": {"fkc": {"mode": "anneal", "beta": 2.0}, "experts": [(BASE, {})],
                       "target": cell_probabilities(2.0 * BASE.log_prob(grid))},
        "product p1 p2": {"fkc": {"mode": "product"}, "experts": [(RING, {}), (BLOBS, {})],
                          "target": cell_probabilities(RING.log_prob(grid) + BLOBS.log_prob(grid))},
        "CFG w=3": {"fkc": {"mode": "cfg", "scale": 3.0},
                    "experts": [(CLASSES, {"class_labels": labels}), (CLASSES, {})],
                    "target": cell_probabilities(3.0 * CLASS0.log_prob(grid) - 2.0 * CLASSES.log_prob(grid))},
    }


def paper_style(spec: dict, steps: int, populations: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama FKC on the VP SDE (uniform t grid, left-point weights, systematic resampling every step but
    the last); returns all particles and their final log-weights."""
    experts = spec["experts"]
    mode, beta, w = spec["fkc"]["mode"], spec["fkc"].get("beta", 1.0), spec["fkc"].get("scale", 1.0)
    a = {"anneal": (beta,), "product": (1.0, 1.0), "cfg": (w, 1.0 - w)}[mode]
    schedule = experts[0][0].schedule
    n = populations * k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    log_w = torch.zeros(populations, k, dtype=torch.float64)
    t_max = float(schedule.t_max) if hasattr(schedule, "t_max") else 999.0
    ts = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)

    def beta_at(t: float) -> float:  # beta(t) = -2 d log alpha / dt, by a central difference
        lo, hi = max(t - 0.5, 0.0), min(t + 0.5, t_max)
        return -2.0 * float(schedule.log_alpha(torch.tensor(hi)) - schedule.log_alpha(torch.tensor(lo))) / (hi - lo)

    for i in range(steps):
        t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
        alpha, sigma = (v.reshape(()) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        scores = [(alpha * m.denoise(x, alpha, sigma, **kw) - x) / sigma**2 for m, kw in experts]
        s_q = sum(ai * s for ai, s in zip(a, scores))
        b = beta_at(t)
        x = x + (0.5 * b * x + b * s_q) * dt + math.sqrt(b * dt) * torch.randn(n, 2, generator=g, dtype=torch.float64)
        if i == steps - 1:
            break
        rate = (sum(a) - 1) * (-b) + 0.5 * b * (s_q.square().sum(1) - sum(ai * s.square().sum(1)
                                                                          for ai, s in zip(a, scores)))
        log_w += (rate * dt).view(populations, k)
        idx = resample_indices(torch.softmax(log_w, -1), "systematic", g)
        x = x[(idx + k * torch.arange(populations)[:, None]).flatten()]
        log_w.zero_()
    return x, log_w


def ours(spec: dict, steps: int, populations: int, k: int, seed: int, fkc_options: dict,
         scheduler_options: dict | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    fkc = guidance.FKC(num_particles=k, seed=seed, **spec["fkc"], **fkc_options)
    if scheduler_options is None:
        scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=1,
                                                        timestep_schedule="logsnr")
    elif scheduler_options == "heun":
        scheduler = HeunDiscreteScheduler()
    else:
        scheduler = fkc.scheduler(num_inputs=len(spec["experts"]), **scheduler_options)
    noise = torch.randn(populations * k, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    experts = [(m, {kk: v[: len(noise)] for kk, v in kw.items()}) for m, kw in spec["experts"]]
    result = guidance.sample(None, fkc, scheduler, noise, steps, experts=experts,
                             generator=torch.Generator().manual_seed(seed + 1))
    return result.samples, result.history["log_weights"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/fkc"))
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--populations", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2, help="runs per cell (KL averaged)")
    parser.add_argument("--all", action="store_true", help="every variant, not just the default and 'before'")
    parser.add_argument("--limit", type=float, default=4.5)
    parser.add_argument("--bins", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    pops, k = args.populations, args.particles
    variants = VARIANTS if args.all else {v: VARIANTS[v] for v in (
        DEFAULT, "ours: euler_maruyama, linspace, frozen-e weights", "ours: euler_maruyama, linspace, tempered noise",
        "before: SDE-DPM-Solver++(1), frozen-e weights")}
    rows = []
    for name, spec in targets(args.limit, args.bins, pops * k).items():
        exact = sample_cells(spec["target"], pops * k, args.limit, args.bins, torch.Generator().manual_seed(0))
        floor = kl_divergence(histogram(exact, args.limit, args.bins), spec["target"])
        for steps in args.steps:
            for method in [PAPER, *variants]:
                start = time.perf_counter()
                kls = []
                for seed in range(args.seeds):
                    x, log_w = (paper_style(spec, steps, pops, k, seed) if method == PAPER
                                else ours(spec, steps, pops, k, seed, *variants[method]))
                    weights = torch.softmax(log_w.double(), -1)
                    kls.append(kl_divergence(histogram(x, args.limit, args.bins, weights), spec["target"]))
                rows.append({"target": name, "steps": steps, "method": method, "kl": sum(kls) / len(kls),
                             "kl_runs": " ".join(f"{v:.4f}" for v in kls), "iid_floor": floor,
                             "seconds": (time.perf_counter() - start) / args.seeds})
                print(f"{name:14s} {steps:4d} {method:50s} KL {rows[-1]['kl']:.4f}  ({rows[-1]['kl_runs']})",
                      flush=True)
    write_csv(args.out / "fkc_vs_paper.csv", rows)
    print("\n| target | steps | method | KL | i.i.d. floor | ours / paper-style |\n|---|---|---|---|---|---|")
    for r in rows:
        ref = next(q["kl"] for q in rows if q["target"] == r["target"] and q["steps"] == r["steps"]
                   and q["method"] == PAPER)
        print(f"| {r['target']} | {r['steps']} | {r['method']} | {r['kl']:.4f} | {r['iid_floor']:.4f} | "
              f"{r['kl'] / ref:.2f} |")


if __name__ == "__main__":
    main()
