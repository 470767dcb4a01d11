"""guidance.attach / detach in an offline tiny StableDiffusionPipeline with project and diffusers schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, HeunDiscreteScheduler
from pipeline_factory import tiny_sd_pipeline, tiny_unet

import guidance
import samplers


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def rel_err(a, b):
    """Norm-relative error (float32 latents reach ~30, so elementwise tolerances would be meaningless)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def project_scheduler(**kwargs):
    return samplers.DPMSolverPlusPlusScheduler(**SD_SCHEDULE, **kwargs)


def ddim():
    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def run(pipe, w=5.0, steps=4, per_prompt=1, **kwargs):
    return pipe(["a red cat", "blue sky"], num_inference_steps=steps, guidance_scale=w, output_type="latent",
                num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("make_scheduler", [project_scheduler, ddim])
def test_attached_cfg_reproduces_the_pipeline_and_detach_is_bit_identical(pipe, make_scheduler):
    pipe.scheduler = scheduler = make_scheduler()
    stock = run(pipe)
    config, unet, unet_dict = dict(pipe.config), pipe.unet, dict(pipe.unet.__dict__)
    for guider in (guidance.CFG(5.0), guidance.APG(5.0, eta=1.0, norm_threshold=0.0, momentum=0.0)):
        guidance.attach(pipe, guider)
        assert guidance.attached_guider(pipe) is guider
        assert rel_err(run(pipe), stock) < 1e-6
        guidance.detach(pipe)
    assert torch.equal(run(pipe), stock)
    assert dict(pipe.config) == config and pipe.unet is unet and pipe.unet.__dict__.keys() == unet_dict.keys()
    assert "forward" not in pipe.unet.__dict__ and "step" not in scheduler.__dict__
    assert guidance.attached_guider(pipe) is None


@pytest.mark.parametrize("make_scheduler", [project_scheduler, ddim])
def test_apg_runs_in_the_stock_pipeline(pipe, make_scheduler):
    pipe.scheduler = make_scheduler()
    stock = run(pipe, w=9.0)
    apg = guidance.APG(9.0, eta=0.0, norm_threshold=2.5, momentum=-0.5)
    guidance.attach(pipe, apg)
    try:
        out = run(pipe, w=9.0, steps=5)
        assert apg.steps_advanced == 4  # once per solver step, reset per run
        again = run(pipe, w=2.0, steps=5)  # the pipeline's scale only switches CFG on
    finally:
        guidance.detach(pipe)
    assert out.shape == stock.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out, again)
    assert float((out - run(pipe, w=9.0, steps=5)).abs().max()) > 1e-3


@pytest.mark.parametrize("make_scheduler, eta", [
    (lambda: project_scheduler(algorithm_type="sde-dpmsolver++", solver_order=2), 0.0),
    (ddim, 1.0),
    (lambda: guidance.FKC(5.0).scheduler(ddim().config), 0.0),
])
def test_fkc_cfg_runs_in_the_stock_pipeline(pipe, make_scheduler, eta):
    pipe.scheduler = scheduler = make_scheduler()
    fkc = guidance.FKC(5.0, num_particles=3, seed=0)
    guidance.attach(pipe, fkc)
    try:
        out = run(pipe, steps=5, per_prompt=3, eta=eta)
    finally:
        guidance.detach(pipe)
    h = fkc.history
    assert out.shape == (6, 4, 8, 8) and bool(torch.isfinite(out).all())
    assert h["log_weights"].shape == (5, 2, 3) and h["resampled"][:-1].all() and not h["resampled"][-1].any()
    assert bool(((h["ess"] >= 1 - 1e-9) & (h["ess"] <= 3 + 1e-9)).all())
    assert bool(((fkc.chosen // 3) == torch.arange(2)).all())
    torch.testing.assert_close(fkc.select(out), out[fkc.chosen])
    assert "step" not in scheduler.__dict__


def test_fkc_with_scale_one_in_the_pipeline_is_the_plain_conditional_sampler(pipe):
    """w = 1: zero increments, resampling keeps every particle in place (history of the 2nd-order SDE solver
    included), so the result is the stock pipeline's at guidance_scale = 1 + tiny (the conditional model)."""
    pipe.scheduler = project_scheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    guidance.attach(pipe, guidance.FKC(1.0, num_particles=2, seed=0))
    try:
        out = run(pipe, per_prompt=2)
    finally:
        guidance.detach(pipe)
    guidance.attach(pipe, guidance.CFG(1.0))
    try:
        ref = run(pipe, per_prompt=2)
    finally:
        guidance.detach(pipe)
    assert rel_err(out, ref) < 1e-6


def test_bad_pipelines_and_calls(pipe):
    unet = tiny_unet()
    with pytest.raises(ValueError, match="DDPMPipeline has no classifier-free guidance"):
        guidance.attach(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), guidance.APG(5.0))
    with pytest.raises(ValueError, match="no guider is attached"):
        guidance.detach(pipe)
    pipe.scheduler = ddim()
    guidance.attach(pipe, guidance.APG(5.0))
    try:
        with pytest.raises(ValueError, match="already attached"):
            guidance.attach(pipe, guidance.CFG(5.0))
        with pytest.raises(ValueError, match="ran without classifier-free guidance \\(guidance_scale=1.0\\)"):
            run(pipe, w=1.0)
        pipe.scheduler = project_scheduler()
        with pytest.raises(RuntimeError, match="pipe.scheduler was replaced after guidance.attach"):
            run(pipe)
    finally:
        guidance.detach(pipe)
    pipe.scheduler = HeunDiscreteScheduler(**SD_SCHEDULE)
    with pytest.warns(UserWarning, match="momentum with the multi-stage HeunDiscreteScheduler"):
        guidance.attach(pipe, guidance.APG(5.0, momentum=-0.5))
    guidance.detach(pipe)
    pipe.scheduler = type("TwoStageDDIM", (DDIMScheduler,), {"order": 2})(**SD_SCHEDULE)  # no state_in_first_order
    with pytest.raises(ValueError, match="needs a single-stage scheduler or one that reports state_in_first_order"):
        guidance.attach(pipe, guidance.FKC(5.0))
    assert guidance.attached_guider(pipe) is None and "forward" not in pipe.unet.__dict__
