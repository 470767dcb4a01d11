"""Guidance in the framework's own sampling loop (`samplers.sample`) with any scheduler."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from samplers.runtime.loop import SampleResult, model_fn_from_unet
from samplers.runtime.loop import sample as run_sampler

from .base import GuidanceDriver, Guider


class GuidedModel:
    """``fn(x, t)`` -> the guided output in the model's parameterisation; calls every expert once per
    evaluation. Pass ``callback=guided.step_end`` to `samplers.sample` for guiders that resample (FKC)."""

    def __init__(self, experts: Sequence[tuple[Callable[..., Any], Mapping[str, Any]]], guider: Guider,
                 scheduler: Any):
        if not experts:
            raise ValueError("guided_model needs at least one (model, kwargs) expert")
        self.fns = [model_fn_from_unet(model, **dict(kwargs)) for model, kwargs in experts]
        self.driver = GuidanceDriver(guider, scheduler)
        self.guider = guider
        self.model_calls = 0

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        outputs = [fn(x, t) for fn in self.fns]
        self.model_calls += len(outputs)
        return self.driver.guide(outputs, x, t)

    def step_end(self, i: int, t: Any, x: torch.Tensor) -> torch.Tensor:
        """`samplers.sample` callback: reweight and resample particles (and the scheduler's per-sample state)."""
        return self.driver.step_end(x)[0]


def guided_model(model: Callable[..., Any] | None, guider: Guider, cond_kwargs: Mapping[str, Any] | None = None,
                 uncond_kwargs: Mapping[str, Any] | None = None, *, scheduler: Any,
                 experts: Sequence[tuple[Callable[..., Any], Mapping[str, Any]]] | None = None) -> GuidedModel:
    """A guided model function for `samplers.sample`.

    The inputs are ``model`` called with ``cond_kwargs`` and (if given) ``uncond_kwargs`` - e.g.
    ``{"class_labels": y}`` and ``{}`` - or an explicit list of ``experts`` as ``(model, kwargs)`` pairs (product
    of experts). ``scheduler`` supplies the noise schedule, the prediction type and the step counter.
    """
    if experts is None:
        if model is None:
            raise ValueError("guided_model needs a model or a list of experts")
        experts = [(model, cond_kwargs or {})]
        if uncond_kwargs is not None:
            experts.append((model, uncond_kwargs))
    elif model is not None or cond_kwargs is not None or uncond_kwargs is not None:
        raise ValueError("pass either model with cond_kwargs/uncond_kwargs or experts, not both")
    return GuidedModel(experts, guider, scheduler)


@dataclass
class GuidedSampleResult(SampleResult):
    """`SampleResult` plus guidance facts: ``nfe`` counts network calls (all conditions), ``evaluations``
    solver evaluations; for FKC ``chosen`` (one particle per population) and the weight ``history``."""

    evaluations: int = 0
    chosen: torch.Tensor | None = None
    history: dict[str, torch.Tensor] | None = None


def sample(model: Callable[..., Any] | None, guider: Guider, scheduler: Any, noise: torch.Tensor,
           num_inference_steps: int | None = None, *, cond_kwargs: Mapping[str, Any] | None = None,
           uncond_kwargs: Mapping[str, Any] | None = None,
           experts: Sequence[tuple[Callable[..., Any], Mapping[str, Any]]] | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, progress: bool = False,
           ) -> GuidedSampleResult:
    """Guided sampling with `samplers.sample`. For FKC the batch is populations x ``num_particles``
    consecutive particles; ``samples`` holds all particles after the last step."""
    guided = guided_model(model, guider, cond_kwargs, uncond_kwargs, scheduler=scheduler, experts=experts)
    result = run_sampler(guided, scheduler, noise, num_inference_steps, generator=generator, progress=progress,
                         callback=guided.step_end)
    chosen = guider.select(result.samples) if guider.resamples else None
    history = guider.history if guider.resamples else None
    return GuidedSampleResult(samples=result.samples, nfe=guided.model_calls, timesteps=result.timesteps,
                              evaluations=result.nfe, chosen=chosen, history=history)
