"""set_timesteps caches coefficient plans per grid: reusing one must be indistinguishable from a fresh scheduler."""

from __future__ import annotations

import pytest
import torch
from test_device_ready import SCHEDULER_CONFIGS

import samplers
from samplers.testbeds import GaussianMixtureModel


def run(scheduler, model, noise, steps=None, timesteps=None) -> torch.Tensor:
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    return x


@pytest.mark.parametrize("name,options", SCHEDULER_CONFIGS, ids=lambda v: str(v))
def test_cached_plans_reproduce_fresh_schedulers_bit_for_bit(name, options, float64_default):
    cls = samplers.SCHEDULERS[name]
    model = GaussianMixtureModel((3, 4, 4), num_components=4, prediction_type=options.get("prediction_type", "epsilon"))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    reused = cls(**options)
    custom = [900.0, 700.0, 420.5, 200.0, 90.0, 10.0]
    runs = [dict(steps=6), dict(steps=9), dict(timesteps=custom), dict(steps=6), dict(timesteps=custom), dict(steps=9)]
    for kwargs in runs:
        assert torch.equal(run(reused, model, noise, **kwargs), run(cls(**options), model, noise, **kwargs)), kwargs
    assert len(reused._plan_cache) == 3


def test_plan_cache_is_bounded_and_img2img_tail_uses_its_own_plan():
    scheduler = samplers.UniPCScheduler(solver_order=3)
    for n in range(4, 4 + 2 * samplers.solvers.scheduler_base.PLAN_CACHE_SIZE):
        scheduler.set_timesteps(n)
    assert len(scheduler._plan_cache) == samplers.solvers.scheduler_base.PLAN_CACHE_SIZE
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    fresh = samplers.UniPCScheduler(solver_order=3)
    fresh.set_timesteps(timesteps=scheduler.host_timesteps[4:].tolist())
    assert [len(v) for v in (scheduler._plan, scheduler.grid_timesteps)] == [6, 7]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(scheduler.grid_sigma, fresh.grid_sigma))
