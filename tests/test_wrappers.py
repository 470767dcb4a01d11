"""TimeShift and DualFast: identity at the off setting, the exact update rules, stock pipelines, bad input."""

import copy
import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from pipeline_factory import tiny_sd_pipeline, tiny_unet

import samplers
from samplers import DPMSolverPlusPlusScheduler, DualFast, GaussianStats, GaussianTeleport, TimeShift
from samplers.accelerators.base import SchedulerWrapper
from samplers.solvers.schedule import model_schedule, noise_schedule_of, vp_schedule
from samplers.testbeds import GaussianMixtureModel

SHAPE = (3, 8, 8)



@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureModel(shape=SHAPE, num_components=4, std=0.15)


@pytest.fixture(scope="module")
def noise():
    return samplers.noise_from_seeds(range(4), SHAPE, dtype=torch.float64)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


class Recorder(torch.nn.Module):
    """Calls a model and records the timestep argument of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, **kwargs):
        self.calls.append(torch.as_tensor(t).clone())
        return self.model(x, t, **kwargs)


SCHEDULERS = {
    "ours": lambda: DPMSolverPlusPlusScheduler(),
    "ddim": lambda: DDIMScheduler(),
    "dpmsolver": lambda: DPMSolverMultistepScheduler(),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("wrap", [
    lambda s: TimeShift(s, window=0),
    lambda s: TimeShift(s, window=30, cutoff=1000),
    lambda s: DualFast(s, scale=0),
    lambda s: TimeShift(DualFast(s, scale=0.0, form="extrapolate"), window=0, cutoff=0),
    lambda s: TimeShift(s, window=0, shift="target"),
    lambda s: TimeShift(s, window=0, shift="all"),
], ids=["timeshift-w0", "timeshift-cutoff-max", "dualfast-0", "composed", "timeshift-target-w0", "timeshift-all-w0"])
def test_off_settings_reproduce_the_wrapped_scheduler_bit_for_bit(name, wrap, mixture, noise):
    base = samplers.sample(mixture, SCHEDULERS[name](), noise, 6)
    wrapped = samplers.sample(mixture, wrap(SCHEDULERS[name]()), noise, 6)
    assert torch.equal(wrapped.samples, base.samples)
    assert wrapped.nfe == base.nfe == 6
    assert wrapped.timesteps == base.timesteps


def reference_shift(x, t_next, acp, window, cutoff):
    """TS-DPM's rule written out: per sample, the t in [t_next - w//2, t_next + w//2] closest in 1 - alphabar_t
    to the pixel variance of the state."""
    if t_next <= cutoff:
        return torch.tensor(t_next)
    half = window // 2
    cands = [min(max(t_next + k, 0), len(acp) - 1) for k in range(-half, half + 1)]
    var = x.reshape(x.shape[0], -1).var(dim=1).tolist()
    return torch.tensor([min(cands, key=lambda c: abs(v - (1 - float(acp[c])))) for v in var])


def test_timeshift_calls_the_model_at_the_shifted_time_with_nominal_solver_coefficients(mixture, noise):
    window, cutoff, steps = 40, 200, 8
    ddim = DDIMScheduler()
    ddim.set_timesteps(steps)
    x, expected_calls = noise, []
    for i, t in enumerate(ddim.timesteps):
        t_model = t if i == 0 else reference_shift(x, int(t), ddim.alphas_cumprod.double(), window, cutoff)
        expected_calls.append(t_model)
        x = ddim.step(mixture(x, t_model).sample, t, x).prev_sample
    model = Recorder(mixture)
    shifted = TimeShift(DDIMScheduler(), window=window, cutoff=cutoff)
    result = samplers.sample(model, shifted, noise, steps)
    assert result.nfe == steps
    torch.testing.assert_close(result.samples, x, rtol=0, atol=1e-12)
    assert len(model.calls) == steps
    for got, want in zip(model.calls, expected_calls):
        assert torch.equal(got.expand(4).double(), want.expand(4).double())
    offsets = torch.stack([h.offsets for h in shifted.shift_history])
    assert offsets[0].abs().max() == 0 and offsets.abs().max() <= window // 2
    assert offsets[1].unique().numel() > 1, "each sample should get its own shift"
    assert all(h.offsets.abs().max() == 0 for h in shifted.shift_history if h.nominal <= cutoff)
    assert [h.nominal for h in shifted.shift_history] == [float(t) for t in ddim.timesteps]


@pytest.mark.parametrize("shift", ["target", "all"])
def test_timeshift_target_and_all_step_from_the_shifted_time(shift, mixture, noise):
    """DDIM written out: eps from the network at t ("target") or t_s ("all"), x0 read at t_s, then
    x' = sqrt(abar') x0 + sqrt(1 - abar') eps (the official TS-DPM DDIM / DPM-Solver paths)."""
    window, cutoff, steps = 40, 200, 8
    ddim = DDIMScheduler()
    ddim.set_timesteps(steps)
    acp = ddim.alphas_cumprod.double()
    x, calls = noise, []
    for i, t in enumerate(ddim.timesteps):
        t_s = t.expand(4) if i == 0 else reference_shift(x, int(t), acp, window, cutoff).expand(4)
        t_model = t_s if shift == "all" else t
        calls.append(t_model)
        eps = mixture(x, t_model).sample
        a_s = acp[t_s.long()].sqrt().view(-1, 1, 1, 1)
        x0 = (x - (1 - a_s**2).sqrt() * eps) / a_s
        a_next = acp[int(ddim.timesteps[i + 1])].sqrt() if i + 1 < steps else acp.new_tensor(ddim.final_alpha_cumprod)
        x = a_next * x0 + (1 - a_next**2).sqrt() * eps
    model = Recorder(mixture)
    result = samplers.sample(model, TimeShift(DDIMScheduler(), window=window, cutoff=cutoff, shift=shift), noise, steps)
    torch.testing.assert_close(result.samples, x, rtol=0, atol=1e-6)  # DDIMScheduler keeps alphabar in float32
    for got, want in zip(model.calls, calls):
        assert torch.equal(got.expand(4).double(), want.expand(4).double())
    nominal = samplers.sample(mixture, TimeShift(DDIMScheduler(), window=window, cutoff=cutoff), noise, steps)
    assert float((nominal.samples - x).abs().max()) > 1e-3  # the modes differ


def test_timeshift_translates_a_copy_of_the_yielded_timestep(mixture, noise):
    """A loop that hands ``step`` a copy of ``t`` (not the object iterated) still gets nominal coefficients."""
    expected = samplers.sample(mixture, TimeShift(DDIMScheduler(), window=40, cutoff=200), noise, 6).samples
    scheduler = TimeShift(DDIMScheduler(), window=40, cutoff=200)
    scheduler.set_timesteps(6)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(mixture(x, t).sample, t.clone(), x).prev_sample
    assert torch.equal(x, expected)


def test_timeshift_batch_mean_mode_and_live_timesteps(mixture, noise):
    shifted = TimeShift(DPMSolverPlusPlusScheduler(), window=30, cutoff=300, per_sample=False)
    model = Recorder(mixture)
    result = samplers.sample(model, shifted, noise, 6)
    shifted_calls = [t for t in model.calls[1:] if t.ndim == 0 and float(t) > 300]
    assert shifted_calls and all(t.ndim == 0 for t in model.calls)
    assert any(h.offsets.abs().max() > 0 for h in shifted.shift_history)
    # after the run, iterating and indexing the timesteps gives the nominal grid (as samplers.sample reports)
    nominal = shifted.inner.timesteps
    assert result.timesteps == [float(t) for t in nominal]
    assert torch.equal(torch.stack(list(shifted.timesteps)), nominal)
    assert len(shifted.timesteps) == 6 and float(shifted.timesteps[1]) == float(nominal[1])
    assert type(copy.deepcopy(shifted.timesteps)) is torch.Tensor


def test_dualfast_matches_the_mixing_rule_written_out(mixture, noise):
    scale, steps = 0.4, 6
    for form, reference, space in (("interpolate", "first", "data"), ("extrapolate", "previous", "data"),
                                   ("extrapolate", "first", "noise")):
        ddim = DDIMScheduler()
        ddim.set_timesteps(steps)
        acp = ddim.alphas_cumprod.double()
        x, ref = noise, None
        for t in ddim.timesteps:
            out = mixture(x, t).sample
            a, s = acp[t].sqrt(), (1 - acp[t]).sqrt()
            p = (x - s * out) / a if space == "data" else out
            if ref is not None:
                c = scale * (1 - int(t) / 999)
                mixed = p + c * (ref - p) if form == "interpolate" else p + c * (p - ref)
                out = (x - a * mixed) / s if space == "data" else mixed
            if ref is None or reference == "previous":
                ref = p
            x = ddim.step(out, t, x).prev_sample
        wrapped = DualFast(DDIMScheduler(), scale=scale, form=form, reference=reference, space=space)
        result = samplers.sample(mixture, wrapped, noise, steps)
        torch.testing.assert_close(result.samples, x, rtol=0, atol=1e-10)
        assert result.nfe == steps
        assert wrapped.coefficients[0] == 0 and wrapped.coefficients[-1] == pytest.approx(scale)


def test_dualfast_defaults_on_our_solver_change_the_result_without_extra_calls(mixture, noise):
    base = samplers.sample(mixture, DPMSolverPlusPlusScheduler(), noise, 6)
    model = Recorder(mixture)
    mixed = samplers.sample(model, DualFast(DPMSolverPlusPlusScheduler(), scale=0.3), noise, 6)
    assert len(model.calls) == mixed.nfe == 6
    assert 1e-4 < float((mixed.samples - base.samples).abs().max()) < 1.0


def hooked(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(torch.as_tensor(args[1]).clone()))
    return calls, handle


@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
def test_stock_pipelines_run_each_wrapper(pipeline_cls, unet):
    stats = GaussianStats.from_samples(torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1)), rank=6)
    pipe = pipeline_cls(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    steps = 6
    cases = [
        (TimeShift(DPMSolverPlusPlusScheduler(), window=30, cutoff=300), steps),
        (DualFast(DDIMScheduler(), scale=0.3), steps),
        (TimeShift(DPMSolverMultistepScheduler(), window=20), steps),
        (DualFast(DPMSolverMultistepScheduler(), scale=0.2, form="extrapolate"), steps),
        (GaussianTeleport(DDIMScheduler(), stats, skip=0.3), steps - 2 + 1),
        (TimeShift(DualFast(GaussianTeleport(DPMSolverPlusPlusScheduler(), stats, skip=0.5), scale=0.2)),
         steps - 3 + 1),
    ]
    for scheduler, expected_calls in cases:
        pipe.scheduler = scheduler
        calls, handle = hooked(unet)
        image = pipe(batch_size=2, num_inference_steps=steps, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
        handle.remove()
        assert image.shape == (2, 3, 8, 8) and bool(torch.isfinite(image).all())
        assert len(calls) == expected_calls, repr(scheduler)
        if isinstance(scheduler, TimeShift):
            used = [h.timesteps for h in scheduler.shift_history]
            seen = [c.expand(2).double() for c in calls[-len(used):]]
            assert all(torch.equal(u, s) for u, s in zip(used, seen))


def test_ddim_pipeline_arguments_are_checked_for_schedulers_without_them(unet):
    pipe = DDIMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DualFast(DPMSolverMultistepScheduler(), scale=0.1)
    with pytest.raises(TypeError, match=r"DPMSolverMultistepScheduler.step\(\) does not take \['eta'\]"):
        pipe(batch_size=1, num_inference_steps=3, eta=0.5, output_type="pt")


@pytest.mark.parametrize("bad", [object(), DDIMScheduler, torch.nn.Linear(2, 2), "ddim"])
@pytest.mark.parametrize("wrapper", [TimeShift, DualFast])
def test_a_wrapper_around_a_non_scheduler_is_a_type_error(wrapper, bad):
    with pytest.raises(TypeError, match=f"{wrapper.__name__} (wraps a diffusers scheduler|needs a scheduler instance)"):
        wrapper(bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": -1}, r"window must be an int in \[0, 999\]"),
    ({"window": 1000}, r"window must be an int in \[0, 999\]"),
    ({"window": 2.5}, r"window must be an int"),
    ({"cutoff": -5}, r"cutoff must be a timestep in \[0, 1000\]"),
    ({"cutoff": 1001}, r"cutoff must be a timestep in \[0, 1000\]"),
    ({"shift": "network"}, r"shift must be one of \('input', 'target', 'all'\)"),
])
def test_timeshift_rejects_out_of_range_window_and_cutoff(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeShift(DDIMScheduler(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": -0.1, "form": "interpolate"}, r"scale must be a number in \[0, 1\] for form='interpolate'"),
    ({"scale": 1.5, "form": "interpolate"}, r"scale must be a number in \[0, 1\]"),
    ({"scale": 11.0}, r"scale must be a number in \[0, 10\] for form='extrapolate'"),
    ({"form": "blend"}, r"form must be one of \('interpolate', 'extrapolate'\)"),
    ({"reference": "last"}, r"reference must be one of"),
    ({"space": "v"}, r"space must be one of"),
])
def test_dualfast_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualFast(DDIMScheduler(), **kwargs)


def test_wrappers_pass_other_attributes_through():
    inner = DPMSolverPlusPlusScheduler(solver_order=3)
    wrapped = TimeShift(DualFast(inner, scale=0.1), window=10)
    wrapped.set_timesteps(5)
    assert wrapped.config.solver_order == 3 and wrapped.num_inference_steps == 5
    assert wrapped.init_noise_sigma == 1.0 and wrapped.order == inner.order and len(wrapped) == 1000
    x0, eps = torch.ones(1, *SHAPE), torch.zeros(1, *SHAPE)
    assert torch.equal(wrapped.add_noise(x0, eps, torch.tensor([500])), inner.add_noise(x0, eps, torch.tensor([500])))
    assert "window=10" in repr(wrapped)


def test_dualfast_schedule_option_and_the_noise_schedule_through_it():
    """``DualFast.schedule`` is its coefficient schedule option; code that reads a scheduler's noise schedule
    (`model_schedule`: guidance, wrappers above it) still finds the wrapped scheduler's, a flow one included."""
    flow = DPMSolverPlusPlusScheduler(noise_schedule="flow", prediction_type="flow_prediction")
    wrapped = DualFast(flow, scale=0.2, schedule="constant")
    assert wrapped.schedule == "constant" and wrapped.noise_schedule is flow.schedule
    assert wrapped.coefficient(500) == 0.2 and DualFast(flow, scale=0.2).coefficient(500) == pytest.approx(0.1)
    for stack in (wrapped, TimeShift(wrapped)):
        assert model_schedule(stack) == (flow.schedule, "flow_prediction")
        assert noise_schedule_of(stack) is flow.schedule
    vp = DPMSolverPlusPlusScheduler()
    assert vp_schedule(DualFast(vp)) is vp.schedule and noise_schedule_of(DDIMScheduler()) is None


# ---------------------------------------------------------------- save_pretrained / from_pretrained
def wrapped_stack(mixture):
    stats = GaussianStats.from_samples(mixture.sample_data(256, torch.Generator().manual_seed(1)), rank=8)
    teleport = GaussianTeleport(DPMSolverPlusPlusScheduler(solver_order=3), stats, skip="auto", tol=0.05)
    teleport.calibrate(mixture, 8)
    return TimeShift(DualFast(teleport, scale=0.3, form="interpolate", schedule="constant"), window=20, cutoff=150)


def test_wrapper_stack_round_trips_through_save_pretrained(mixture, noise, tmp_path):
    original = wrapped_stack(mixture)
    original.save_pretrained(tmp_path)
    loaded = SchedulerWrapper.from_pretrained(tmp_path)
    assert repr(loaded) == repr(original)
    layers = [loaded, loaded.inner, loaded.inner.inner]
    assert [type(layer).__name__ for layer in layers] == ["TimeShift", "DualFast", "GaussianTeleport"]
    assert (loaded.inner.schedule, loaded.inner.inner.calibrations) == ("constant", original.inner.inner.calibrations)
    saved = json.loads((tmp_path / "wrapper_config.json").read_text())
    assert {"_class_name": "DualFast", "schedule": "constant"}.items() <= next(
        layer for layer in saved["layers"] if layer["_class_name"] == "DualFast").items()
    assert type(loaded.inner.inner.inner) is DPMSolverPlusPlusScheduler and loaded.config.solver_order == 3
    assert torch.equal(loaded.inner.inner.stats.eigvecs, original.inner.inner.stats.eigvecs)
    runs = [samplers.sample(mixture, s, noise.clone(), 8) for s in (original, loaded)]  # auto skip: no probe model
    assert torch.equal(runs[0].samples, runs[1].samples) and runs[0].nfe == runs[1].nfe < 8


def test_saved_pipeline_loads_back_with_its_wrapped_scheduler(unet, tmp_path):
    pipe = DDPMPipeline(unet=unet, scheduler=TimeShift(DDIMScheduler(), window=20, cutoff=100))
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, TimeShift) and type(loaded.scheduler.inner) is DDIMScheduler
    images = [p(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
              .images for p in (pipe, loaded)]
    assert (images[0] == images[1]).all()


def test_loading_a_wrapper_checks_the_folder(tmp_path):
    DPMSolverPlusPlusScheduler().save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no wrapper_config.json in .*plain: it was not written by"):
        SchedulerWrapper.from_pretrained(tmp_path / "plain")
    DualFast(DDIMScheduler()).save_pretrained(tmp_path / "dualfast")
    with pytest.raises(TypeError, match="holds a DualFast, not a TimeShift"):
        TimeShift.from_pretrained(tmp_path / "dualfast")
    config = tmp_path / "dualfast" / "wrapper_config.json"
    config.write_text(config.read_text().replace('"DualFast"', '"Warp"'))
    with pytest.raises(ValueError, match="names an unknown wrapper 'Warp'"):
        SchedulerWrapper.from_pretrained(tmp_path / "dualfast")


def test_timeshift_shifts_in_img2img_which_iterates_a_tail_slice():
    from diffusers import StableDiffusionImg2ImgPipeline

    base = tiny_sd_pipeline()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = base.scheduler.config

    def go(scheduler):
        pipe = StableDiffusionImg2ImgPipeline(**base.components)
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        calls, handle = hooked(pipe.unet)
        out = pipe("a red cube", image=image, strength=0.6, num_inference_steps=10, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
        handle.remove()
        return out, calls

    plain, plain_calls = go(DPMSolverPlusPlusScheduler.from_config(cfg, timestep_schedule="linspace"))
    off, _ = go(TimeShift(DPMSolverPlusPlusScheduler.from_config(cfg, timestep_schedule="linspace"), window=0))
    shifted = TimeShift(DPMSolverPlusPlusScheduler.from_config(cfg, timestep_schedule="linspace"), window=40,
                        cutoff=0)
    out, calls = go(shifted)
    assert torch.equal(off, plain) and len(calls) == len(plain_calls) == 6
    nominal = [h.nominal for h in shifted.shift_history]
    assert nominal == [float(c.reshape(-1)[0]) for c in plain_calls]
    used = [c.reshape(-1)[0].double() for c in calls]
    assert torch.equal(torch.stack(used), torch.stack([h.timesteps[0] for h in shifted.shift_history]))
    assert any(h.offsets.abs().max() > 0 for h in shifted.shift_history[1:])
    assert not torch.equal(out, plain)
