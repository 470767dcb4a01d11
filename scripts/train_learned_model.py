"""Train the small learned model shipped in ``samplers/assets/learned_mixture16`` (one CPU thread, ~20 min).

A diffusers ``UNet2DModel`` learns the exact ``GaussianMixtureModel`` (3x16x16, 8 components) from samples
drawn on the fly: DDPM epsilon loss ||eps_theta(alpha_t x0 + sigma_t eps, t) - eps||^2 (Ho et al. 2020, eq. 14)
with t uniform over the 1000 steps of the linear beta schedule, AdamW, cosine learning rate, EMA weights.
Deterministic given ``--seed`` and ``--threads``. Writes the ``DDPMPipeline`` layout (``model_index.json``,
``unet/``, ``scheduler/``) plus ``mixture.json`` (the exact mixture, the training run and quality numbers).

    python scripts/train_learned_model.py                      # the shipped model
    python scripts/train_learned_model.py --steps 200 --out /tmp/m --eval-samples 0   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

import samplers
from samplers.testbeds import GaussianMixtureModel
from samplers.testbeds.learned import ASSET_DIR, MIXTURE_FILE, distribution_metrics, eps_error, mixture_fingerprint

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                    "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False}
EPS_TIMESTEPS = (10, 50, 200, 500, 800, 950, 999)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="output folder (default: the shipped asset)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0, help="seed of the training run (data, noise, init)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (results depend on it; more than the free cores slows training badly)")
    p.add_argument("--mixture-seed", type=int, default=0)
    p.add_argument("--num-components", type=int, default=8)
    p.add_argument("--std", type=float, default=0.15)
    p.add_argument("--size", type=int, default=16, help="image side; the shape is (3, size, size)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for the quality check (0: skip)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[5, 10, 100], help="DPM-Solver++ 2M step counts")
    args = p.parse_args()
    for name in ("steps", "batch_size", "threads", "num_components", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % 4:
        p.error(f"--size must be a multiple of 4 (two downsamplings), got {args.size}")
    return args


def build_unet(size: int) -> UNet2DModel:
    """~1.06M parameters: three levels (16, 8, 4 px) and a mid block with global self-attention at 4 px."""
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3)


def noisy_batch(mixture: GaussianMixtureModel, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_t, t, eps) with x0 ~ mixture, t ~ U{0..T-1}, x_t = alpha_t x0 + sigma_t eps; float32."""
    x0 = mixture.sample_data(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, mixture.schedule.num_train_timesteps, (n,), generator=g)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in mixture.schedule.alpha_sigma(t.double()))
    return (alpha * x0 + sigma * eps).float(), t, eps.float()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], chunk: int = 512) -> float:
    """Mean eps MSE of ``model`` on a fixed batch."""
    x, t, eps = batch
    err = sum(float((model(x[i:i + chunk], t[i:i + chunk]).sample.float() - eps[i:i + chunk]).square().sum())
              for i in range(0, len(x), chunk))
    return err / eps.numel()


def train(unet: UNet2DModel, mixture: GaussianMixtureModel, args: argparse.Namespace) -> tuple[EMAModel, list]:
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(100, args.steps // 10),
                                               num_training_steps=args.steps)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay)
    losses, start = [], time.time()
    for step in range(args.steps):
        x, t, eps = noisy_batch(mixture, args.batch_size, g)
        loss = torch.nn.functional.mse_loss(unet(x, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step + 1:5d}/{args.steps}  loss(avg100) {recent:.5f}  {time.time() - start:6.1f} s",
                  flush=True)
    return ema, losses


@torch.no_grad()
def quality(unet: UNet2DModel, mixture: GaussianMixtureModel, args: argparse.Namespace) -> dict:
    """Frechet distance / log-likelihood of DPM-Solver++ 2M samples, learned vs exact model, and eps errors."""
    noise = samplers.noise_from_seeds(range(args.eval_samples), mixture.shape)
    true = mixture.sample_data(args.eval_samples, torch.Generator().manual_seed(12345))
    report = {"num_samples": args.eval_samples, "solver": "DPMSolverPlusPlusScheduler order 2, logsnr grid",
              "true_samples": distribution_metrics(true, mixture)}
    for name, model in (("learned", unet), ("exact", mixture)):
        for steps in args.eval_steps:
            scheduler = samplers.DPMSolverPlusPlusScheduler.from_config(SCHEDULER_CONFIG)
            start = time.time()
            x = torch.cat([samplers.sample(model, scheduler, chunk, steps).samples for chunk in noise.split(500)])
            report[f"{name}_{steps}_steps"] = distribution_metrics(x, mixture)
            print(f"{name:8s} {steps:4d} steps: {report[f'{name}_{steps}_steps']}  ({time.time() - start:.1f} s)",
                  flush=True)
    report["eps_error"] = eps_error(unet, mixture, EPS_TIMESTEPS, num_samples=512)
    return report


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mixture = GaussianMixtureModel.for_scheduler_config(SCHEDULER_CONFIG, shape=(3, args.size, args.size),
                                                        num_components=args.num_components, std=args.std,
                                                        seed=args.mixture_seed)
    unet = build_unet(args.size)
    num_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel with {num_params} parameters; mixture {mixture.shape}, K={args.num_components}, "
          f"std={args.std}", flush=True)
    start = time.time()
    ema, losses = train(unet, mixture, args)
    train_time = time.time() - start
    ema.copy_to(unet.parameters())
    unet.eval()
    held_out = noisy_batch(mixture, 4096, torch.Generator().manual_seed(args.seed + 1))
    training = {"seed": args.seed, "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "ema_decay": args.ema_decay, "num_parameters": num_params,
                "train_time_s": round(train_time, 1), "final_train_loss": sum(losses[-100:]) / len(losses[-100:]),
                "eval_loss_ema": eval_loss(unet, held_out), "eval_loss_exact_model": eval_loss(mixture, held_out)}
    print(json.dumps(training, indent=1), flush=True)
    spec = {"testbed": "samplers.testbeds.GaussianMixtureModel", "shape": list(mixture.shape),
            "num_components": args.num_components, "std": args.std, "seed": args.mixture_seed,
            "fingerprint": mixture_fingerprint(mixture), "scheduler": SCHEDULER_CONFIG, "training": training}
    if args.eval_samples:
        spec["quality"] = quality(unet, mixture, args)
    args.out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(args.out)
    (args.out / MIXTURE_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
