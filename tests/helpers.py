"""Shared test utilities: run a scheduler over a model, relative errors, convergence slopes."""

from __future__ import annotations

import numpy as np
import torch


def run(scheduler, model, x: torch.Tensor, steps: int | None = None, generator=None, stop: int | None = None):
    """Sample with a bare diffusers-style loop (as stock pipelines do); ``stop`` ends after that many steps."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    kwargs = {"generator": generator} if generator is not None else {}
    for i, t in enumerate(scheduler.timesteps):
        if stop is not None and i == stop:
            break
        out = model(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def slope(ns, errs) -> float:
    """Least-squares slope of -log(err) against log(n): the measured order of convergence."""
    return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])
