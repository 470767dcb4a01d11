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
from diffusers.utils import BaseOutput
from tqdm import tqdm

from ..accelerators.base import host_timesteps_of


class ModelOutput(BaseOutput):
    """A model's output, like diffusers' ``UNet2DOutput``: ``.sample`` is the prediction (exact-score testbeds and
    wrapped models return it)."""

    sample: torch.Tensor


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


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Where a model runs: its ``device``/``dtype`` attributes, else its first parameter's (CPU float32 for
    parameterless callables)."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = getattr(model, "device", None) or (param.device if param is not None else torch.device("cpu"))
    dtype = getattr(model, "dtype", None) or (param.dtype if param is not None else torch.float32)
    return torch.device(device), dtype


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


def _model_dtype(model: Any) -> torch.dtype | None:
    """fp16/bf16 modules get inputs in their dtype (the solver state stays float32); None otherwise."""
    dtype = model_device_dtype(model)[1]
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _loop(fn: Callable[[torch.Tensor, Any], torch.Tensor], scheduler: Any, noise: torch.Tensor,
          model_dtype: torch.dtype | None, generator: Any = None, progress: bool = False,
          callback: Callable[[int, Any, torch.Tensor], torch.Tensor | None] | None = None,
          memory_format: torch.memory_format | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The sampling loop proper: no host sync of its own (non-finite outputs are flagged on the device), so it can
    be captured in a CUDA graph. Returns the samples, the per-step non-finite flags and the number of model calls."""
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # diffusers' flow schedulers have none: unit noise
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    nonfinite = torch.zeros(len(scheduler.timesteps), dtype=torch.bool, device=noise.device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    nfe = 0
    scale = getattr(scheduler, "scale_model_input", None)  # diffusers' flow schedulers have none (no scaling)
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling")):
        x_in = x if scale is None else scale(x, t)
        out = fn(x_in if model_dtype is None else x_in.to(model_dtype), t)
        nfe += 1
        nonfinite[i] = ~torch.isfinite(out).all()
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if callback is not None:
            replaced = callback(i, t, x)
            x = x if replaced is None else replaced
    return x, nonfinite, nfe


def _raise_if_nonfinite(nonfinite: torch.Tensor, timesteps: Sequence[float]) -> None:
    """One host sync after the run: FloatingPointError naming the first step whose model output was NaN/Inf."""
    if bool(nonfinite.any()):
        first = int(nonfinite.nonzero()[0])
        raise FloatingPointError(f"model output at step {first} (timestep {timesteps[first]:.3f}) contains NaN or "
                                 f"Inf; {int(nonfinite.sum())} of {len(nonfinite)} steps affected")


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
    memory_format: torch.memory_format | None = None,
) -> SampleResult:
    """Run ``scheduler`` with ``model`` from ``noise``; returns the samples and the number of model calls.

    ``model`` is a diffusers-style module (``model(x, t).sample``) or any ``fn(x, t) -> tensor``.
    If ``num_inference_steps`` is given, ``scheduler.set_timesteps`` is called with it.
    ``callback(i, t, x)`` may return a replacement for ``x`` (e.g. resampling particles).
    ``memory_format=torch.channels_last`` keeps the state, and so every model input, channels-last (pair it with
    ``model.to(memory_format=torch.channels_last)`` for faster convolutions on GPUs).
    Raises ``FloatingPointError`` naming the first step whose model output was NaN/Inf.
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    fn = model_fn_from_unet(model, **(model_kwargs or {}))
    x, nonfinite, nfe = _loop(fn, scheduler, noise, _model_dtype(model), generator, progress, callback, memory_format)
    timesteps = host_timesteps_of(scheduler).tolist()
    _raise_if_nonfinite(nonfinite, timesteps)
    return SampleResult(samples=x, nfe=nfe, timesteps=timesteps)
