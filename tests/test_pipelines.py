"""Every project scheduler swapped into stock diffusers pipelines built offline from tiny configs."""

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler
from pipeline_factory import tiny_sd_pipeline, tiny_unet

import samplers

SCHEDULER_CLASSES = sorted(samplers.SCHEDULERS.items())


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("name, cls", SCHEDULER_CLASSES)
@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
def test_unconditional_pipelines(unet, name, cls, pipeline_cls):
    scheduler = cls.from_config(DDPMScheduler().config)
    pipe = pipeline_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"eta": 0.0} if pipeline_cls is DDIMPipeline else {}

    def go(seed):
        return pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(seed),
                    output_type="np", **kwargs).images

    a, b, c = go(0), go(0), go(1)
    assert a.shape == (2, 8, 8, 3)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("name, cls", SCHEDULER_CLASSES)
def test_saved_pipeline_loads_back_with_our_scheduler(unet, name, cls, tmp_path):
    scheduler = cls.from_config(DDPMScheduler().config, solver_order=3, timestep_schedule="linspace")
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    def options(s):
        return {k: v for k, v in s.config.items() if not k.startswith("_")}

    assert type(loaded.scheduler) is cls and options(loaded.scheduler) == options(scheduler)
    images = [p(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
              .images for p in (pipe, loaded)]
    assert (images[0] == images[1]).all()


def test_saved_pipeline_loads_back_with_a_dc_plugin_scheduler(unet, tmp_path):
    cls = samplers.with_dynamic_compensation(samplers.DPMSolverPlusPlusScheduler)
    scheduler = cls(solver_order=3, dc_ratios=[1.0, 1.0, 0.95, 1.02, 1.0])
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path).scheduler
    assert type(loaded) is cls and loaded.config.dc_ratios == [1.0, 1.0, 0.95, 1.02, 1.0]
    with pytest.raises(AttributeError, match="has no attribute 'DCNoSuchScheduler'"):
        getattr(samplers.solvers.dc_solver, "DCNoSuchScheduler")  # noqa: B009


@pytest.mark.parametrize("name, cls", SCHEDULER_CLASSES)
def test_stable_diffusion_pipeline(name, cls):
    pipe = tiny_sd_pipeline()
    pipe.scheduler = cls.from_config(pipe.scheduler.config)

    def go(seed):
        return pipe("a red cube", num_inference_steps=5, guidance_scale=5.0, height=16, width=16,
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images

    a, b = go(0), go(0)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_fp16_pipeline_keeps_float32_solver_state():
    unet = tiny_unet().half()
    scheduler = samplers.DPMSolverPlusPlusScheduler.from_config(DDPMScheduler().config)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(torch.float16)
    try:
        pipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    except RuntimeError as err:  # CPU half convolutions are unsupported on some torch builds
        pytest.skip(f"fp16 UNet on CPU: {err}")
    assert scheduler._state.dtype == torch.float32


def test_sample_loop_feeds_a_bf16_unet_and_keeps_float32_state():
    unet = tiny_unet().to(torch.bfloat16)
    noise = samplers.noise_from_seeds(range(2), (3, 8, 8))
    out = samplers.sample(unet, samplers.DPMSolverPlusPlusScheduler(), noise, 4)
    assert out.samples.dtype == torch.float32 and torch.isfinite(out.samples).all()


def test_sample_loop_feeds_a_plain_bf16_module_in_its_dtype():
    class Denoiser(torch.nn.Module):  # no .dtype attribute: the loop reads its parameters' dtype
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, t):
            return self.conv(x)

    net = Denoiser().to(torch.bfloat16)
    noise = samplers.noise_from_seeds(range(2), (3, 8, 8))
    out = samplers.sample(net, samplers.UniPCScheduler(), noise, 4)
    assert out.samples.dtype == torch.float32 and torch.isfinite(out.samples).all()


def test_img2img_begin_index_matches_diffusers():
    """StableDiffusionImg2ImgPipeline starts mid-grid via set_begin_index; ours must re-plan like diffusers."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    base = tiny_sd_pipeline()
    image = torch.rand(1, 3, 16, 16)

    def go(scheduler):
        pipe = StableDiffusionImg2ImgPipeline(**base.components)
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red cube", image=image, strength=0.6, num_inference_steps=10, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    cfg = base.scheduler.config
    ours = go(samplers.DPMSolverPlusPlusScheduler.from_config(cfg, timestep_schedule="linspace", solver_order=2))
    ref = go(DPMSolverMultistepScheduler.from_config(cfg, solver_order=2))
    assert torch.isfinite(ours).all()
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
    for name, cls in SCHEDULER_CLASSES:
        assert torch.isfinite(go(cls.from_config(cfg))).all(), name
