"""Drop-in contract with diffusers' DPMSolverMultistep / UniPC / DEIS schedulers: mid-grid starts, config switches,
every diffusers option honoured (parity) or refused (error), attributes, save/load, wrappers as schedulers."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDPMPipeline, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils import logging as diffusers_logging
from pipeline_factory import tiny_unet

from samplers import (
    DCSolverScheduler,
    DEISScheduler,
    DPMSolverPlusPlusScheduler,
    DualFast,
    GaussianStats,
    GaussianTeleport,
    TimeShift,
    UniPCScheduler,
)
from samplers.accelerators.base import SchedulerWrapper, host_timestep

diffusers_logging.set_verbosity_error()  # diffusers warns about our extra config keys (timestep_schedule, ...)

PEERS = {DPMSolverPlusPlusScheduler: DPMSolverMultistepScheduler, UniPCScheduler: UniPCMultistepScheduler,
         DEISScheduler: DEISMultistepScheduler}
#: our options that put each scheduler on diffusers' linspace grid
LINSPACE = {DPMSolverPlusPlusScheduler: {"final_sigmas_type": "sigma_min"}, UniPCScheduler: {},
            DEISScheduler: {"final_sigmas_type": "sigma_min"}}
PROJECT = [DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler, DCSolverScheduler]
SHAPE = (2, 3, 4, 4)


def start(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model that depends on x and on t (as a float: integer grids only give diffusers' exact timesteps)."""
    return 0.3 * x + 1e-4 * torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)


def tail_run(scheduler, steps: int, k: int, begin: bool = False, host: bool = False) -> torch.Tensor:
    """img2img-style loop: noise x0 to timesteps[k], then step over timesteps[k:]."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps[k:]
    if begin:
        scheduler.set_begin_index(k)
    x0, noise = start()
    x = scheduler.add_noise(x0, noise, ts[:1])
    for t in ts:
        t_arg = int(t) if host else t
        x = scheduler.step(model(x, t), t_arg, x).prev_sample
    return x


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> bool:
    return float((ours - theirs).abs().max()) <= rtol * float(theirs.abs().max())


# ------------------------------------------------------------------------------------------------ mid-grid starts
@pytest.mark.parametrize("cls", list(PEERS))
@pytest.mark.parametrize("steps,k", [(10, 5), (20, 7)])
def test_loop_over_a_tail_matches_diffusers_without_set_begin_index(cls, steps, k):
    ours = cls(timestep_schedule="linspace", solver_order=3, **LINSPACE[cls])
    theirs = PEERS[cls].from_config(ours.config)
    expected = tail_run(theirs, steps, k)
    located = tail_run(ours, steps, k)
    assert close(located, expected, 2e-6)
    assert ours.begin_index == k and ours.step_index == steps
    assert torch.equal(tail_run(ours, steps, k, begin=True), located)
    assert torch.equal(tail_run(ours, steps, k, host=True), located)


def test_issue_repro_zero_model_from_mid_grid():
    s = DPMSolverPlusPlusScheduler(timestep_schedule="linspace", final_sigmas_type="sigma_min")
    s.set_timesteps(10)
    ts = s.timesteps[5:]
    x = s.add_noise(torch.ones(1, 1), torch.zeros(1, 1), ts[:1])
    for t in ts:
        x = s.step(torch.zeros_like(x), t, x).prev_sample
    assert float(x) == pytest.approx(0.99995, abs=5e-5)  # diffusers: 0.99995; counting steps from 0 gave 12.25


@pytest.mark.parametrize("cls", PROJECT)
def test_tail_loop_on_meta_makes_no_host_read(cls):
    """A tail slice of ``timesteps`` is located from its storage offset: no device read (meta would raise)."""
    s = cls()
    s.set_timesteps(6, device="meta")
    x = torch.empty(SHAPE, device="meta")
    for t in s.timesteps[2:]:
        x = s.step(0.5 * x, t, x).prev_sample
    assert s.begin_index == 2 and s.step_index == 6 and x.device.type == "meta"


def test_guidance_reads_a_tail_timestep_from_the_host_copy():
    """Guidance asks for alpha, sigma before the first step() of a tail run: its timestep's position, not the
    step counter, names the grid point (on meta, a device read would raise)."""
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(8, device="meta")
    tail = list(s.timesteps[3:])
    assert s.grid_position(tail[0]) == 3 and s.grid_position(tail[0].clone()) is None
    assert host_timestep(s, tail[0], s.step_index) == s.host_timesteps[3]


def test_timestep_not_on_the_grid_is_an_error():
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(8)
    x = torch.zeros(SHAPE)
    s.step(x, s.timesteps[3].half(), x)  # a float16 copy of a fractional timestep still names its grid point
    assert s.begin_index == 3
    s = DPMSolverPlusPlusScheduler(timestep_schedule="linspace")
    s.set_timesteps(5)
    with pytest.raises(ValueError, match=r"timestep 123 passed to step\(\) is not one of "
                                         r"DPMSolverPlusPlusScheduler.timesteps \(999 ... 200\).*set_begin_index"):
        s.step(x, 123, x)


def test_wrapped_tail_loop_locates_the_start():
    ours = DPMSolverPlusPlusScheduler(timestep_schedule="linspace", final_sigmas_type="sigma_min")
    wrapped = TimeShift(DualFast(DPMSolverPlusPlusScheduler.from_config(ours.config), scale=0), window=0)
    assert torch.equal(tail_run(wrapped, 10, 4), tail_run(ours, 10, 4))


def test_kandinsky22_controlnet_img2img_slices_timesteps_without_set_begin_index():
    """Stock KandinskyV22ControlnetImg2ImgPipeline iterates timesteps[t_start:] and never calls set_begin_index."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=8, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, norm_num_groups=4, addition_embed_type="image_hint", encoder_hid_dim=16,
        encoder_hid_dim_type="image_proj", cross_attention_dim=16)
    movq = diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                             layers_per_block=1, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, num_vq_embeddings=16,
                             vq_embed_dim=4)
    ours = DPMSolverPlusPlusScheduler(timestep_schedule="linspace", final_sigmas_type="sigma_min")
    pipe = diffusers.KandinskyV22ControlnetImg2ImgPipeline(unet=unet, scheduler=ours, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    inputs = dict(image_embeds=torch.randn(1, 16, generator=g), negative_image_embeds=torch.randn(1, 16, generator=g),
                  image=torch.rand(1, 3, 8, 8, generator=g), hint=torch.rand(1, 3, 64, 64, generator=g), height=8,
                  width=8, num_inference_steps=10, strength=0.5, guidance_scale=2.0, output_type="pt")
    images = pipe(**inputs, generator=torch.Generator().manual_seed(1)).images
    assert ours.begin_index == 5
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(ours.config)
    expected = pipe(**inputs, generator=torch.Generator().manual_seed(1)).images
    assert float((images - expected).abs().max()) < 1e-5  # counting steps from timesteps[0] differed by 0.33


# ------------------------------------------------------------------------------------------------ config switches
FOREIGN = {
    "dpm": DPMSolverMultistepScheduler(),
    "dpm-sde": DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "dpm-singlestep": diffusers.DPMSolverSinglestepScheduler(),
    "unipc": UniPCMultistepScheduler(),
    "unipc-bh1": UniPCMultistepScheduler(solver_type="bh1"),
    "deis": DEISMultistepScheduler(),
    "ddim": diffusers.DDIMScheduler(),
    "ddpm": diffusers.DDPMScheduler(variance_type="fixed_small"),
}
MAPPED = {DPMSolverPlusPlusScheduler: {"solver_type": {"midpoint", "heun"}},
          UniPCScheduler: {"solver_type": {"bh1", "bh2"}}, DEISScheduler: {"solver_type": {"logrho"},
                                                                            "algorithm_type": {"deis"}},
          DCSolverScheduler: {"solver_type": {"bh1", "bh2"}}}


@pytest.mark.parametrize("source", FOREIGN)
@pytest.mark.parametrize("cls", PROJECT)
def test_from_config_switches_through_diffusers_configs_and_back(cls, source):
    cfg = FOREIGN[source].config
    ours = cls.from_config(cfg)
    for option, allowed in MAPPED[cls].items():
        assert ours.config[option] in allowed
    if source == "unipc-bh1" and cls in (UniPCScheduler, DCSolverScheduler):
        assert ours.config.solver_type == "bh1"
    assert ours.timestep_schedule == "logsnr_interior"  # a foreign config's timestep_spacing does not replace our grid
    assert torch.equal(ours.alphas_cumprod, FOREIGN[source].alphas_cumprod)
    if cls is DEISScheduler and isinstance(FOREIGN[source], DPMSolverMultistepScheduler):
        return  # diffusers' DPMSolverMultistep refuses final_sigmas_type="zero" with a mapped algorithm_type "deis"
    back = type(FOREIGN[source]).from_config(ours.config)
    assert {k: back.config[k] for k in ("beta_schedule", "num_train_timesteps", "prediction_type")} == \
           {k: cfg[k] for k in ("beta_schedule", "num_train_timesteps", "prediction_type")}
    assert public(type(ours).from_config(ours.config).config) == public(ours.config)


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_foreign_values_are_mapped_as_diffusers_maps_them():
    deis_cfg = DEISMultistepScheduler().config
    assert DPMSolverPlusPlusScheduler.from_config(deis_cfg).config.algorithm_type == \
           DPMSolverMultistepScheduler.from_config(deis_cfg).config.algorithm_type == "dpmsolver++"
    for solver_type in ("logrho", "bh1", "bh2"):
        assert DPMSolverPlusPlusScheduler(solver_type=solver_type).config.solver_type == \
               DPMSolverMultistepScheduler(solver_type=solver_type).config.solver_type == "midpoint"


def test_timestep_spacing_given_explicitly_is_honoured():
    ddpm_cfg = diffusers.DDPMScheduler(timestep_spacing="leading").config
    assert DPMSolverPlusPlusScheduler.from_config(ddpm_cfg).timestep_schedule == "logsnr_interior"
    assert DPMSolverPlusPlusScheduler.from_config(ddpm_cfg, timestep_spacing="trailing").timestep_schedule == \
           "trailing"
    ours = UniPCScheduler(timestep_spacing="leading", steps_offset=1)
    ours.set_timesteps(7)
    theirs = UniPCMultistepScheduler(timestep_spacing="leading", steps_offset=1)
    theirs.set_timesteps(7)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = start()[1]
    assert close(samplers_run(ours, x, 7), samplers_run(theirs, x, 7), 2e-6)
    saved = UniPCScheduler.from_config(ours.config)
    assert saved.timestep_schedule == "leading"


def samplers_run(scheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("cls", PROJECT)
def test_unknown_keyword_is_a_type_error_but_from_config_ignores_unknown_keys(cls):
    with pytest.raises(TypeError, match=r"got unexpected keyword argument\(s\) \['no_such_option'\]; its options "
                                        r"are \[.*'solver_order'"):
        cls(no_such_option=1)
    x = start()[1]
    loaded = cls.from_config({**cls().config, "no_such_option": 1})
    assert torch.equal(samplers_run(loaded, x, 6), samplers_run(cls(), x, 6))


SIGMA_GRIDS = [(DPMSolverPlusPlusScheduler, "use_karras_sigmas"), (UniPCScheduler, "use_karras_sigmas"),
               (DPMSolverPlusPlusScheduler, "use_lu_lambdas"), (DPMSolverPlusPlusScheduler, "use_exponential_sigmas"),
               (UniPCScheduler, "use_exponential_sigmas"), (DPMSolverPlusPlusScheduler, "use_beta_sigmas"),
               (UniPCScheduler, "use_beta_sigmas")]


@pytest.mark.parametrize("cls,option", SIGMA_GRIDS)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_sigma_grid_options_match_diffusers(cls, option, beta_schedule):
    """Same sigmas and, with a model that does not read t, the same result (diffusers rounds the timesteps it
    hands the model; ours are the exact fractional ones)."""
    theirs = PEERS[cls](**{option: True}, beta_schedule=beta_schedule, solver_order=3)
    ours = cls.from_config(theirs.config)
    assert ours.config[option] is True
    x = start()[1]
    results = []
    for s in (ours, theirs):
        s.set_timesteps(10)
        y = x
        for t in s.timesteps:
            y = s.step(0.3 * y, t, y).prev_sample
        results.append(y)
    torch.testing.assert_close(ours.sigmas[:-1], theirs.sigmas[:-1].float(), rtol=1e-5, atol=0)
    assert float(ours.sigmas[-1]) == float(theirs.sigmas[-1]) == 0.0
    # diffusers steps in float32. On the beta grid (long last jumps) float32 rounding is amplified: our own float32
    # run differs from our float64 one by up to 8e-6 of the max, diffusers' by up to 1.2e-5; other grids: < 1e-6
    assert close(*results, 3e-5 if option == "use_beta_sigmas" else 2e-6)


HONOURED = [
    (DPMSolverPlusPlusScheduler, {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
                                  "prediction_type": "sample"}),
    (DPMSolverPlusPlusScheduler, {"euler_at_final": True, "solver_order": 3}),
    (DPMSolverPlusPlusScheduler, {"solver_type": "heun", "lower_order_final": False}),
    (DPMSolverPlusPlusScheduler, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}),
    (DPMSolverPlusPlusScheduler, {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()}),
    (DPMSolverPlusPlusScheduler, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}),
    # noise prediction: diffusers returns NaN on a step to sigma = 0 (and with bh1 at the last step)
    (UniPCScheduler, {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    (UniPCScheduler, {"disable_corrector": [0, 2], "prediction_type": "v_prediction"}),
    (UniPCScheduler, {"thresholding": True, "sample_max_value": 0.5, "timestep_spacing": "trailing"}),
    (DEISScheduler, {"solver_order": 3, "lower_order_final": False, "beta_schedule": "scaled_linear"}),
    (DEISScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1}),
]


@pytest.mark.parametrize("cls,options", HONOURED, ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(sorted(v)))
def test_honoured_options_match_diffusers_over_a_full_run(cls, options):
    schedule = {} if "timestep_spacing" in options else {"timestep_schedule": "linspace"}
    ours = cls(**schedule, **LINSPACE[cls], **options)
    theirs = PEERS[cls].from_config(ours.config)
    x = start()[1]
    assert close(samplers_run(ours, x, 8), samplers_run(theirs, x, 8), 2e-6)


@pytest.mark.parametrize("option", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_deis_sigma_grids_match_diffusers_grid(option):
    """diffusers' DEIS repeats the last sigma (a zero-length last step); its evaluation sigmas equal ours."""
    theirs = DEISMultistepScheduler(**{option: True})
    ours = DEISScheduler.from_config(theirs.config)
    for s in (ours, theirs):
        s.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas[:-1], theirs.sigmas[:-1].float(), rtol=1e-5, atol=0)


def test_variance_type_learned_drops_the_variance_channels_like_diffusers():
    x = start()[1]
    results = []
    for s in (DPMSolverPlusPlusScheduler(timestep_schedule="linspace", variance_type="learned_range"),
              DPMSolverMultistepScheduler(variance_type="learned_range")):
        s.set_timesteps(6)
        y = x
        for t in s.timesteps:
            y = s.step(torch.cat([model(y, t), torch.full_like(y, 7.0)], dim=1), t, y).prev_sample
        results.append(y)
    assert results[0].shape == SHAPE and close(*results, 2e-6)


def test_flow_shift_on_a_vp_schedule_is_refused():
    """diffusers ignores flow_shift without flow sigmas; ours names it instead of ignoring it."""
    with pytest.raises(ValueError, match="flow_shift=3.0 needs noise_schedule='flow'"):
        UniPCScheduler(flow_shift=3.0)


@pytest.mark.parametrize("cls", PROJECT)
@pytest.mark.parametrize("options,message", [
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction' needs a flow-matching schedule"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True needs noise_schedule='flow'"),
    ({"shift_terminal": 0.1}, "shift_terminal=0.1 needs noise_schedule='flow'"),
    ({"solver_p": "DDIMScheduler"}, "solver_p='DDIMScheduler' cannot be honoured"),
    ({"sigma_min": 0.1}, "sigma_min=0.1 cannot be honoured: a custom sigma range .* set_timesteps\\(timesteps="),
    ({"sigma_max": 10.0}, "sigma_max=10.0 cannot be honoured"),
    ({"time_shift_type": "cubic"}, "time_shift_type must be one of \\('exponential', 'linear'\\)"),
    ({"variance_type": "large"}, "variance_type must be one of \\(None, 'learned'"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing must be one of \\('linspace', 'leading', 'trailing'\\)"),
    ({"timestep_spacing": "trailing", "timestep_schedule": "karras"},
     "timestep_spacing='trailing' and timestep_schedule='karras' ask for different grids: pass only"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of \\['use_karras_sigmas', 'use_lu_lambdas'"),
])
def test_options_that_cannot_be_honoured_are_refused_by_name(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "sde-dpmsolver"])
def test_noise_prediction_dpm_solver_is_refused_with_the_alternative(algorithm_type):
    cfg = DPMSolverMultistepScheduler(algorithm_type=algorithm_type, final_sigmas_type="sigma_min").config
    with pytest.raises(ValueError, match=f"algorithm_type='{algorithm_type}' .* use '{algorithm_type}\\+\\+'"):
        DPMSolverPlusPlusScheduler.from_config(cfg)


# ------------------------------------------------------------------------------------------------ attributes, noise
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_alphas_sigmas_and_add_noise_match_diffusers(beta_schedule):
    theirs = DPMSolverMultistepScheduler(beta_schedule=beta_schedule)
    ours = DPMSolverPlusPlusScheduler.from_config(theirs.config, timestep_schedule="linspace")
    for name in ("betas", "alphas", "alphas_cumprod", "sigmas"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name).float(), rtol=1e-6, atol=0)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), rtol=1e-5, atol=0)
    x0, noise = start()
    t = theirs.timesteps[[0, 3]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("make", [
    lambda: DPMSolverPlusPlusScheduler(solver_order=3, use_karras_sigmas=True),
    lambda: UniPCScheduler(solver_type="bh1", timestep_spacing="trailing"),
    lambda: DEISScheduler(solver_type="tab", use_beta_sigmas=True),
    lambda: DCSolverScheduler(dc_ratios=[1.0, 1.0, 0.9, 1.1, 1.0, 1.0]),
    lambda: TimeShift(DualFast(DPMSolverPlusPlusScheduler(), scale=0.2), window=10),
    lambda: DualFast(UniPCMultistepScheduler(), scale=0.1),
    lambda: GaussianTeleport(UniPCScheduler(), GaussianStats.from_samples(
        torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(5)), rank=6), skip=0.3),
], ids=["dpm", "unipc", "deis", "dc", "timeshift-dualfast", "dualfast-diffusers", "teleport"])
@pytest.mark.parametrize("method", ["save_config", "save_pretrained"])
def test_save_and_load_round_trip(make, method, tmp_path):
    original = make()
    getattr(original, method)(tmp_path)
    cls = SchedulerWrapper if isinstance(original, SchedulerWrapper) else type(original)
    loaded = cls.from_pretrained(tmp_path)
    if isinstance(original, SchedulerWrapper):
        assert repr(loaded) == repr(original) and public(loaded.config) == public(original.config)
    else:
        assert type(loaded) is type(original) and public(loaded.config) == public(original.config)
    x = start()[1]
    assert torch.equal(samplers_run(loaded, x, 6), samplers_run(original, x, 6))


# ------------------------------------------------------------------------------------------------ wrappers
def test_wrapper_exposes_compatibles_and_names_itself_in_attribute_errors():
    wrapped = TimeShift(DPMSolverPlusPlusScheduler())
    assert wrapped.compatibles == DPMSolverPlusPlusScheduler().compatibles
    assert DPMSolverMultistepScheduler in wrapped.compatibles
    with pytest.raises(AttributeError, match="TimeShift \\(wrapping DPMSolverPlusPlusScheduler\\) has no attribute "
                                             "'no_such_attribute'"):
        _ = wrapped.no_such_attribute


@pytest.mark.parametrize("num_train_timesteps,cutoff", [(1000, 300.0), (100, 30.0), (50, 15.0)])
def test_timeshift_default_cutoff_scales_with_the_training_steps(num_train_timesteps, cutoff):
    assert TimeShift(DPMSolverPlusPlusScheduler(num_train_timesteps=num_train_timesteps), window=10).cutoff == cutoff


def test_wrapper_in_ddpm_pipeline_drops_the_generator_for_a_deterministic_step():
    """DDPMPipeline passes generator= to step(); diffusers' UniPC step takes none (and is deterministic)."""
    unet = tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=TimeShift(UniPCMultistepScheduler(), window=0))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    bare = UniPCMultistepScheduler()
    bare.set_timesteps(5)
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in bare.timesteps:
            x = bare.step(unet(x, t).sample, t, x).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() < 1e-6
    wrapped = TimeShift(UniPCMultistepScheduler(), window=0)
    wrapped.set_timesteps(3)
    t = wrapped.timesteps[0]
    with pytest.raises(TypeError, match="UniPCMultistepScheduler.step\\(\\) does not take \\['eta'\\]"):
        wrapped.step(x, t, x, eta=0.5, generator=torch.Generator())
    with pytest.raises(TypeError, match="does not take \\['variance_noise'\\]"):
        wrapped.step(x, t, x, variance_noise=torch.zeros_like(x))


@pytest.mark.parametrize("make", [DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler, DCSolverScheduler,
                                  lambda: TimeShift(DualFast(DPMSolverPlusPlusScheduler(), scale=0.1), window=10)],
                         ids=["dpm", "unipc", "deis", "dc", "wrapped"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 5), (3, 6)])
def test_step_keeps_the_sample_shape_and_returns_a_tuple_without_return_dict(make, shape):
    scheduler = make()
    scheduler.set_timesteps(4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(0.5 * x, t, x, return_dict=i % 2 == 0)
        x = out.prev_sample if i % 2 == 0 else out[0]
        assert (isinstance(out, tuple) == (i % 2 == 1)) and x.shape == shape and torch.isfinite(x).all()
