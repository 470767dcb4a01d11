"""The framework's own sampling loop: ``sample(model, scheduler, noise)``.

A plain loop over ``scheduler.timesteps`` that works with any diffusers scheduler (ours or diffusers' own, bare
or wrapped). Per-sample generators make SDE noise depend only on each sample's seed. Non-finite model outputs
are tracked on the device (no per-step host sync) and reported with the first bad step index at the end.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm


@dataclass
class SampleResult:
    samples: torch.Tensor
    nfe: int
    timesteps: list[float] = field(default_factory=list)


def model_fn_from_unet(unet: Callable[..., Any], **model_kwargs: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Adapt a diffusers-style model (``unet(x, t, **kw).sample`` or a plain tensor) to ``fn(x, t) -> tensor``."""

    def fn(x: torch.Tensor, t: Any) -> torch.Tensor:
        out = unet(x, t, **model_kwargs)
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)

    return fn


def sde_seed(seed: int) -> int:
    """The seed of a sample's SDE-noise stream: a 32-bit hash of ``("sde", seed)``. torch's CPU generator keeps
    only the low 32 bits of a seed, so an additive offset such as 2**40 would replay the initial noise."""
    return int.from_bytes(hashlib.sha256(f"sde:{int(seed)}".encode()).digest()[:4], "little")


def per_sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample for the sampler's own noise (SDE solvers), determined by that sample's seed
    alone (EDM's generate.py convention) and distinct from the stream `noise_from_seeds` uses."""
    return [torch.Generator(device).manual_seed(sde_seed(s)) for s in seeds]


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise where sample i depends only on seeds[i] (never on batch size or process count)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)),
                                    dtype=torch.float64) for s in seeds]).to(device=device, dtype=dtype)


def sample(
    model: Callable[..., Any],
    scheduler: Any,
    noise: torch.Tensor,
    num_inference_steps: int | None = None,
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    callback: Callable[[int, Any, torch.Tensor], torch.Tensor | None] | None = None,
) -> SampleResult:
    """Run ``scheduler`` with ``model`` from ``noise``; returns the samples and the number of model calls.

    ``model`` is a diffusers-style module (``model(x, t).sample``) or any ``fn(x, t) -> tensor``.
    If ``num_inference_steps`` is given, ``scheduler.set_timesteps`` is called with it.
    ``callback(i, t, x)`` may return a replacement for ``x`` (e.g. resampling particles).
    Raises ``FloatingPointError`` naming the first step whose model output was NaN/Inf.
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    fn = model_fn_from_unet(model, **(model_kwargs or {}))
    model_dtype = getattr(model, "dtype", None)  # fp16/bf16 modules get inputs in their dtype; the state stays fp32
    if model_dtype not in (torch.float16, torch.bfloat16):
        model_dtype = None
    x = noise * scheduler.init_noise_sigma
    nonfinite = torch.zeros(len(scheduler.timesteps), dtype=torch.bool, device=noise.device)
    timesteps = scheduler.timesteps
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    nfe = 0
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
        x_in = scheduler.scale_model_input(x, t)
        out = fn(x_in if model_dtype is None else x_in.to(model_dtype), t)
        nfe += 1
        nonfinite[i] = ~torch.isfinite(out).all()
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if callback is not None:
            replaced = callback(i, t, x)
            x = x if replaced is None else replaced
    if bool(nonfinite.any()):
        first = int(nonfinite.nonzero()[0])
        raise FloatingPointError(f"model output at step {first} (timestep {float(timesteps[first]):.3f}) "
                                 f"contains NaN or Inf; {int(nonfinite.sum())} of {len(timesteps)} steps affected")
    return SampleResult(samples=x, nfe=nfe, timesteps=[float(t) for t in timesteps])
