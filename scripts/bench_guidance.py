"""Guidance benchmarks on exact-score testbeds; prints tables and writes CSV, JSON and PNG plots to ``--out``.

(a) Class-conditional exact Gaussian mixture (classes close together, so conditional and unconditional
    predictions disagree until late): CFG vs APG at guidance scales 1-15 with DPM-Solver++(2M). Metrics:
    saturation = mean |x0| of the samples (and the peak mean |D| of the guided predictions along the run),
    RMS distance to the nearest component of the requested class, class accuracy (the nearest component's
    class), diversity (mean per-pixel std within a class).
(c) The same mixture, CFG vs APG saturation over NFE 5-50 at w = 7.5 and 15 (DPM-Solver++, default grid): APG's
    momentum decayed with the log-SNR step (default) and applied per step (the paper's rule), and APG with the
    norm threshold matched per element to this small testbed. Saturation = mean |x0| / the data's; over-saturation
    = how far that exceeds 1.
(b) 2-D mixtures with exact scores: FKC annealing p^beta (beta = 2, 3) and the product p1 p2 against the same
    SDE without weights (naive score scaling / score sum), KL(samples' histogram || target) on a grid, ESS.

    python scripts/bench_guidance.py [--out results/guidance] [--quick] [--part cfg nfe fkc]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import guidance  # noqa: E402
import samplers  # noqa: E402
from guidance.toy2d import (  # noqa: E402
    Mixture2D,
    cell_probabilities,
    grid_centers,
    histogram,
    kl_divergence,
    sample_cells,
)
from samplers.evaluation.sweep import write_csv  # noqa: E402
from samplers.testbeds import GaussianMixtureModel, smooth_patterns  # noqa: E402


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------- (a) CFG vs APG
def conditional_mixture(args: argparse.Namespace) -> GaussianMixtureModel:
    shape = tuple(args.shape)
    g = torch.Generator().manual_seed(0)
    means = (smooth_patterns(1, shape, g, scale=0.8)
             + smooth_patterns(2 * args.classes, shape, g, scale=args.class_offset))
    return GaussianMixtureModel(shape=shape, means=means, num_classes=args.classes, std=args.std)


def class_metrics(model: GaussianMixtureModel, x: torch.Tensor, labels: torch.Tensor) -> dict:
    flat = x.reshape(len(x), -1).double()
    dist = torch.cdist(flat, model.means) / flat.shape[1] ** 0.5
    own = (model.labels[None, :] == labels[:, None])
    return {
        "saturation": float(flat.abs().mean()),
        "dist_to_class": float(dist.masked_fill(~own, math.inf).min(1).values.mean()),
        "accuracy": float((model.labels[dist.argmin(1)] == labels).double().mean()),
        "diversity": float(torch.stack([flat[labels == c].std(0).mean() for c in labels.unique()]).mean()),
    }


def recording(guider: guidance.Guider) -> tuple[guidance.Guider, list[float]]:
    """The guider, with the mean |D| of every guided data prediction recorded."""
    trace: list[float] = []
    combine = guider.combine

    def recorded(x0, x, alpha, sigma):
        d = combine(x0, x, alpha, sigma)
        trace.append(float(d.abs().mean()))
        return d

    guider.combine = recorded
    return guider, trace


def bench_cfg_apg(args: argparse.Namespace, out: Path) -> list[dict]:
    model = conditional_mixture(args)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    data = class_metrics(model, model.sample_data(len(labels), torch.Generator().manual_seed(1),
                                                  class_labels=labels), labels)
    rows = [{"method": "data", "scale": 0.0, **data, "saturation_vs_data": 1.0, "peak_pred_saturation": math.nan}]
    noise = samplers.noise_from_seeds(range(len(labels)), model.shape, dtype=torch.float64)
    methods = {
        "CFG": lambda w: guidance.CFG(w),
        "APG (defaults: eta=0, r=2.5, beta=-0.5 fading with the step)": lambda w: guidance.APG(w),
        "APG no momentum (eta=0, r=2.5)": lambda w: guidance.APG(w, momentum=0.0),
    }
    for w in args.scales:
        for name, make in methods.items():
            guider, trace = recording(make(w))
            scheduler = samplers.DPMSolverPlusPlusScheduler(timestep_schedule="logsnr")
            result = guidance.sample(model, guider, scheduler, noise, args.steps,
                                     cond_kwargs={"class_labels": labels}, uncond_kwargs={})
            m = class_metrics(model, result.samples, labels)
            rows.append({"method": name, "scale": float(w), **m,
                         "saturation_vs_data": m["saturation"] / data["saturation"],
                         "peak_pred_saturation": max(trace)})
    write_csv(out / "cfg_apg.csv", rows)
    print_table(f"(a) CFG vs APG, class-conditional exact mixture {'x'.join(map(str, model.shape))}, "
                f"{args.classes} classes x 2 components, std {args.std}, {len(labels)} samples, "
                f"DPM-Solver++(2M) {args.steps} steps (NFE {2 * args.steps} per sample)", rows,
                ["method", "scale", "saturation", "saturation_vs_data", "peak_pred_saturation", "dist_to_class",
                 "accuracy", "diversity"])
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    keys = ["saturation_vs_data", "peak_pred_saturation", "dist_to_class", "accuracy"]
    for ax, key in zip(axes, keys):
        for name in methods:
            pts = [(r["scale"], r[key]) for r in rows if r["method"] == name]
            ax.plot(*zip(*pts), "o-", label=name)
        if key != "peak_pred_saturation":
            ax.axhline(rows[0][key], color="k", ls="--", lw=1, label="data")
        ax.set_xlabel("guidance scale w")
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cfg_apg.png", dpi=120)
    plt.close(fig)
    return rows


# -------------------------------------------------------------------------------- (c) saturation vs NFE (CFG, APG)
#: r in data units is a per-sample norm; the paper's 2.5 is for 4x64x64 latents: the same cap per element here
LATENT_DIM = 4 * 64 * 64


def saturation_methods(dim: int) -> dict:
    """CFG and the APG variants compared over NFE, by name (``w -> guider``)."""
    r_small = 2.5 * math.sqrt(dim / LATENT_DIM)
    return {
        "CFG": lambda w: guidance.CFG(w),
        "APG (defaults)": lambda w: guidance.APG(w),
        "APG, per-step momentum (paper rule)": lambda w: guidance.APG(w, momentum_step=None),
        f"APG (defaults, r={r_small:.3g} per-element match)": lambda w: guidance.APG(w, norm_threshold=r_small),
    }


def bench_saturation_vs_nfe(args: argparse.Namespace, out: Path) -> list[dict]:
    model = conditional_mixture(args)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    data = class_metrics(model, model.sample_data(len(labels), torch.Generator().manual_seed(1),
                                                  class_labels=labels), labels)
    noise = samplers.noise_from_seeds(range(len(labels)), model.shape, dtype=torch.float64)
    methods = saturation_methods(math.prod(model.shape))
    rows = []
    for w in args.nfe_scales:
        for nfe in args.nfes:
            for name, make in methods.items():
                result = guidance.sample(model, make(w), samplers.DPMSolverPlusPlusScheduler(), noise, nfe,
                                         cond_kwargs={"class_labels": labels}, uncond_kwargs={})
                m = class_metrics(model, result.samples, labels)
                ratio = m["saturation"] / data["saturation"]
                rows.append({"method": name, "scale": float(w), "nfe": nfe, "saturation_vs_data": ratio,
                             "over_saturation": max(0.0, ratio - 1), "accuracy": m["accuracy"]})
    write_csv(out / "cfg_apg_nfe.csv", rows)
    print_table(f"(c) saturation vs NFE, class-conditional exact mixture {'x'.join(map(str, model.shape))}, "
                f"{len(labels)} samples, DPM-Solver++ (default order and grid); NFE = solver steps", rows,
                ["method", "scale", "nfe", "saturation_vs_data", "over_saturation", "accuracy"])
    cfg = {(r["scale"], r["nfe"]): r["over_saturation"] for r in rows if r["method"] == "CFG"}
    for name in list(methods)[1:]:
        worse = [(r["scale"], r["nfe"]) for r in rows
                 if r["method"] == name and r["over_saturation"] > cfg[r["scale"], r["nfe"]]]
        print(f"{name}: over-saturates more than CFG at (w, NFE) {worse}" if worse
              else f"{name}: never over-saturates more than CFG")
    return rows


# ---------------------------------------------------------------------------------------------- (b) FKC in 2-D
BASE = Mixture2D([[-2, -2], [2, 2], [-2, 2], [2, -2], [0, 0]], std=[0.6, 0.4, 0.5, 0.3, 0.45],
                 weights=[0.4, 0.25, 0.15, 0.12, 0.08])
RING = Mixture2D([[2.5 * math.cos(k * math.pi / 3), 2.5 * math.sin(k * math.pi / 3)] for k in range(6)], std=0.7,
                 weights=[0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
BLOBS = Mixture2D([[-1.5, 1.0], [1.5, -1.0], [1.0, 2.0]], std=[1.0, 0.9, 0.8], weights=[0.5, 0.3, 0.2])


def fkc_targets(limit: float, bins: int) -> dict:
    grid = grid_centers(limit, bins)
    product = RING.product(BLOBS)
    return {
        "anneal beta=2": {"mode": "anneal", "beta": 2.0, "experts": [(BASE, {})],
                          "target": cell_probabilities(2.0 * BASE.log_prob(grid))},
        "anneal beta=3": {"mode": "anneal", "beta": 3.0, "experts": [(BASE, {})],
                          "target": cell_probabilities(3.0 * BASE.log_prob(grid))},
        "product ring x blobs": {"mode": "product", "beta": 1.0, "experts": [(RING, {}), (BLOBS, {})],
                                 "target": cell_probabilities(product.log_prob(grid)), "exact": product},
    }


def bench_fkc(args: argparse.Namespace, out: Path) -> tuple[list[dict], dict]:
    limit, bins, k, pops = args.limit, args.bins, args.particles, args.populations
    n = k * pops
    methods = {  # name: (resample, ess_threshold, steps multiplier)
        "FKC, resample every step": ("systematic", 1.0, 1),
        "FKC, resample at ESS < K/2": ("systematic", 0.5, 1),
        "weights only (IS, no resampling)": (None, 1.0, 1),
        "same SDE without weights": (None, 1.0, 1),
        "same SDE without weights, 4x steps": (None, 1.0, 4),
    }
    rows, traces, panels = [], {}, {}
    for target_name, spec in fkc_targets(limit, bins).items():
        g = torch.Generator().manual_seed(7)
        exact = spec["exact"].sample_data(n, g) if "exact" in spec else sample_cells(spec["target"], n, limit, bins, g)
        floor = kl_divergence(histogram(exact, limit, bins), spec["target"])
        rows.append({"target": target_name, "method": "exact samples (noise floor)", "particles": f"{pops}x{k}",
                     "nfe_per_particle": 0, "kl": floor, "kl_excess": 0.0, "mean_ess_frac": math.nan,
                     "min_ess_frac": math.nan, "seconds": 0.0})
        panels[target_name] = {"target": spec["target"]}
        for name, (resample, threshold, mult) in methods.items():
            steps = args.fkc_steps * mult
            fkc = guidance.FKC(num_particles=k, mode=spec["mode"], beta=spec["beta"], resample=resample,
                               ess_threshold=threshold, seed=0)
            scheduler = fkc.scheduler(num_inputs=len(spec["experts"]))
            noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            start = time.perf_counter()
            result = guidance.sample(None, fkc, scheduler, noise, steps, experts=spec["experts"],
                                     generator=torch.Generator().manual_seed(1))
            seconds = time.perf_counter() - start
            weighted = name.startswith("FKC") or name.startswith("weights")
            weights = torch.softmax(result.history["log_weights"][-1], -1) if weighted else None
            kl = kl_divergence(histogram(result.samples, limit, bins, weights), spec["target"])
            ess = result.history["ess"].mean(1) / k
            rows.append({"target": target_name, "method": name, "particles": f"{pops}x{k}",
                         "nfe_per_particle": result.nfe, "kl": kl, "kl_excess": kl - floor,
                         "mean_ess_frac": float(ess.mean()) if weighted else math.nan,
                         "min_ess_frac": float(ess.min()) if weighted else math.nan, "seconds": seconds})
            if name == "FKC, resample every step" or name == "same SDE without weights":
                panels[target_name][name] = histogram(result.samples, limit, bins, weights)
            if weighted and mult == 1:
                traces[(target_name, name)] = ess.tolist()
    write_csv(out / "fkc.csv", rows)
    print_table(f"(b) FKC on 2-D exact mixtures: KL(samples || target) on a {bins}x{bins} grid over "
                f"[-{limit}, {limit}]^2, populations x particles = {pops}x{k}, FKC.scheduler() (Euler-Maruyama) "
                f"{args.fkc_steps} linspace steps", rows,
                ["target", "method", "particles", "nfe_per_particle", "kl", "kl_excess", "mean_ess_frac",
                 "min_ess_frac", "seconds"])
    ratios = {}
    for target_name in panels:
        by = {r["method"]: r for r in rows if r["target"] == target_name}
        ratios[target_name] = by["same SDE without weights"]["kl"] / by["FKC, resample every step"]["kl"]
        print(f"{target_name}: KL(naive) / KL(FKC) = {ratios[target_name]:.2f}")
    plot_fkc(panels, traces, limit, bins, out)
    return rows, ratios


def plot_fkc(panels: dict, traces: dict, limit: float, bins: int, out: Path) -> None:
    fig, axes = plt.subplots(len(panels), 3, figsize=(10, 3.3 * len(panels)))
    for row, (target_name, maps) in zip(axes, panels.items()):
        for ax, key in zip(row, ["target", "same SDE without weights", "FKC, resample every step"]):
            ax.imshow(maps[key].reshape(bins, bins).T, origin="lower", extent=[-limit, limit, -limit, limit],
                      cmap="viridis")
            ax.set_title(f"{target_name}: {key}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "fkc_samples.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (target_name, name), ess in traces.items():
        ax.plot(ess, label=f"{target_name} / {name}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean ESS / K (before resampling)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fkc_ess.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/guidance"))
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 3, 5, 7, 10, 15])
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 4, 4])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--class-offset", type=float, default=0.3, help="scale of the class-specific patterns")
    parser.add_argument("--std", type=float, default=0.25)
    parser.add_argument("--per-class", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--particles", type=int, default=16, help="FKC particles per population (K)")
    parser.add_argument("--populations", type=int, default=2000)
    parser.add_argument("--fkc-steps", type=int, default=100)
    parser.add_argument("--limit", type=float, default=4.5)
    parser.add_argument("--bins", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nfes", type=int, nargs="+", default=[5, 6, 8, 10, 12, 15, 20, 30, 40, 50])
    parser.add_argument("--nfe-scales", type=float, nargs="+", default=[7.5, 15])
    parser.add_argument("--part", nargs="+", choices=["cfg", "nfe", "fkc"], default=["cfg", "nfe", "fkc"],
                        help="which benchmarks to run: (a) cfg, (c) nfe, (b) fkc")
    args = parser.parse_args()
    if args.quick:
        args.scales, args.per_class, args.populations, args.fkc_steps = [1, 7, 15], 32, 200, 40
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if "cfg" in args.part:
        summary["cfg_apg"] = bench_cfg_apg(args, args.out)
    if "nfe" in args.part:
        summary["cfg_apg_nfe"] = bench_saturation_vs_nfe(args, args.out)
    if "fkc" in args.part:
        summary["fkc"], summary["kl_ratio_naive_over_fkc"] = bench_fkc(args, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nwrote {args.out}: summary.json and the CSV/PNG files of the parts {args.part}")


if __name__ == "__main__":
    main()
