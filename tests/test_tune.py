"""`samplers.tune`: per-model step-grid tuning, its use by stock pipelines, saving, and its input errors."""

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, DPMSolverMultistepScheduler
from pipeline_factory import tiny_sd_pipeline, tiny_unet

import samplers
from samplers import TunedSchedule, UniPCScheduler, tune
from samplers.evaluation.quality import ErrorSummary, per_sample_error
from samplers.runtime.loop import noise_from_seeds
from samplers.solvers.tune import TuningError, teacher_scheduler
from samplers.testbeds import GaussianMixtureModel

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureModel(shape=SHAPE, num_components=8, std=0.1)


@pytest.fixture(scope="module")
def tuned(mixture):
    return tune(mixture, UniPCScheduler(), 5, calibration_noise=noise_from_seeds(range(32), SHAPE),
                holdout_noise=noise_from_seeds(range(100, 132), SHAPE), budget=700, teacher_steps=50,
                progress=False)


def errors(model, scheduler, noise, n):
    ref = samplers.sample(model, teacher_scheduler(UniPCScheduler()), noise, 100).samples
    return ErrorSummary.of(per_sample_error(samplers.sample(model, scheduler, noise, n).samples, ref))


def test_tuned_grid_beats_the_default_on_unseen_noises(mixture, tuned):
    """Accepted on hold-out noises, and better again on a third, disjoint seed set (median and p90)."""
    assert isinstance(tuned, TunedSchedule) and tuned.improved and "tuned grid" in tuned.message
    assert tuned.model_evaluations <= 700
    assert len(tuned.timesteps) == 5 and np.all(np.diff(tuned.timesteps) < 0)
    noise = noise_from_seeds(range(5000, 5064), SHAPE)
    ours, default = errors(mixture, tuned.scheduler, noise, 5), errors(mixture, UniPCScheduler(), noise, 5)
    assert ours.median < 0.5 * default.median and ours.p90 < 0.5 * default.p90, (ours, default)


def test_tuned_scheduler_uses_the_grid_for_set_timesteps_n(tuned):
    s = tuned.scheduler
    s.set_timesteps(5)
    np.testing.assert_array_equal(s.host_timesteps, tuned.timesteps)
    s.set_timesteps(6)  # other step counts keep the scheduler's own grid
    plain = UniPCScheduler()
    plain.set_timesteps(6)
    np.testing.assert_array_equal(s.host_timesteps, plain.host_timesteps)


def test_tuned_scheduler_saves_and_loads(tuned, tmp_path):
    tuned.scheduler.save_pretrained(tmp_path)
    loaded = UniPCScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(5)
    np.testing.assert_array_equal(loaded.host_timesteps, tuned.timesteps)


def test_ddpm_pipeline_tuned_saved_and_reloaded(tmp_path):
    """Tune with a DDPMPipeline's UNet; the pipeline runs the tuned grid, and the saved pipeline reloads with it
    and gives the same images."""
    unet = tiny_unet()
    result = tune(unet, UniPCScheduler(), 4, budget=120, teacher_steps=20, progress=False,
                  calibration_noise=noise_from_seeds(range(4), SHAPE),
                  holdout_noise=noise_from_seeds(range(9, 13), SHAPE))
    pipe = DDPMPipeline(unet=unet, scheduler=result.scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_array_equal(pipe.scheduler.host_timesteps, result.timesteps)
    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler) is UniPCScheduler
    np.testing.assert_array_equal(
        again(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images,
        images)


def test_stable_diffusion_tuned_with_prompt_embeddings_and_cfg():
    """Tune the guided sampler of a tiny StableDiffusionPipeline (CFG 7.5 inside the tuned model, prompt
    embeddings as conditioning); the pipeline then samples on that grid."""
    pipe = tiny_sd_pipeline()
    cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="")
    scale = 7.5

    def guided(x, t):
        embeddings = torch.cat([uncond.expand(len(x), -1, -1), cond.expand(len(x), -1, -1)])
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample
        u, c = out.chunk(2)
        return u + scale * (c - u)

    scheduler = UniPCScheduler.from_config(pipe.scheduler.config)
    result = tune(guided, scheduler, 4, budget=120, teacher_steps=20, progress=False,
                  calibration_noise=noise_from_seeds(range(3), (4, 8, 8)),
                  holdout_noise=noise_from_seeds(range(9, 12), (4, 8, 8)))
    pipe.scheduler = result.scheduler
    seen = []
    pipe(prompt="a cat", num_inference_steps=4, guidance_scale=scale, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or kw)
    assert seen == pytest.approx(result.timesteps)


def test_nan_model_names_the_timestep(mixture):
    def broken(x, t):
        out = mixture(x, t).sample
        return out * float("nan") if float(t) < 500 else out

    with pytest.raises(FloatingPointError, match=r"NaN/Inf at timestep \d"):
        tune(broken, UniPCScheduler(), 4, calibration_noise=noise_from_seeds(range(4), SHAPE), progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=1), "num_inference_steps must be >= 2"),
        (dict(num_inference_steps=5.0), "num_inference_steps must be an int"),
        (dict(calibration_noise=torch.zeros(8, 3, 4, 4)), r"calibration_noise has sample shape \(3, 4, 4\), but the "
                                                          r"model takes \(3, 8, 8\)"),
        (dict(scheduler=DPMSolverMultistepScheduler()), "DPMSolverMultistepScheduler is not one.*"
                                                        "samplers.UniPCScheduler.from_config"),
        (dict(scheduler=UniPCScheduler(final_sigmas_type="sigma_min")), "final_sigmas_type='zero'"),
        (dict(budget=10), "budget must be an int >="),
        (dict(stats=samplers.GaussianStats.from_samples(torch.randn(16, 3, 4, 4))), "shape"),
    ],
)
def test_bad_input(mixture, kwargs, message):
    args = dict(scheduler=UniPCScheduler(), num_inference_steps=5)
    args.update(kwargs)
    with pytest.raises((TuningError, ValueError), match=message):
        tune(mixture, args.pop("scheduler"), args.pop("num_inference_steps"), progress=False, **args)


def test_tuned_timesteps_config_is_checked():
    with pytest.raises(ValueError, match=r"tuned_timesteps\['3'\] must hold 3 strictly decreasing"):
        UniPCScheduler(tuned_timesteps={"3": [900.0, 100.0]})


def test_flow_scheduler_tuned_from_an_sd3_config():
    """A flow schedule keeps its first evaluation at pure noise (sigma = 1) and tunes the rest; the tuned grid beats
    the default on a third seed set."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from samplers.solvers.schedule import FlowMatchingSchedule
    from samplers.testbeds.reference import flow_reference_solution

    model = GaussianMixtureModel(SHAPE, schedule=FlowMatchingSchedule(), prediction_type="flow_prediction")
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    result = tune(model, UniPCScheduler.from_config(config), 6, budget=500, teacher_steps=40, progress=False,
                  calibration_noise=noise_from_seeds(range(32), SHAPE),
                  holdout_noise=noise_from_seeds(range(100, 132), SHAPE))
    assert result.improved and result.timesteps[0] == 1000.0 and len(result.timesteps) == 6
    noise = noise_from_seeds(range(5000, 5064), SHAPE, dtype=torch.float64)
    ref = flow_reference_solution(model, noise, steps=400)

    def median(scheduler):
        return ErrorSummary.of(per_sample_error(samplers.sample(model, scheduler, noise, 6).samples, ref)).median

    assert median(result.scheduler) < 0.5 * median(UniPCScheduler.from_config(config))


def test_tail_weight_adds_the_worst_ten_percent_to_the_objective(mixture):
    """``tail_weight`` scores grids by median + p90 + w x mean of the worst 10 %; a bad value names the argument."""
    calib, hold = noise_from_seeds(range(64), SHAPE), noise_from_seeds(range(100, 164), SHAPE)
    result = tune(mixture, UniPCScheduler(), 5, calibration_noise=calib, holdout_noise=hold, budget=400,
                  teacher_steps=40, tail_weight=1.0, progress=False)
    assert ("worst-10 % mean" in result.message) != result.improved
    summary = ErrorSummary.of(torch.arange(1.0, 21.0))
    assert summary.score(2.0) == pytest.approx(10.5 + 18.1 + 2 * 19.5) and summary.score() == summary.objective
    for bad in (-1.0, "1", True):
        with pytest.raises(TuningError, match="tail_weight must be a number >= 0"):
            tune(mixture, UniPCScheduler(), 5, tail_weight=bad, progress=False)
