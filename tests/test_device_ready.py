"""CUDA readiness without a GPU: no host syncs, checked on the ``meta`` device, and the captured sampler's API.

On ``meta`` tensors carry shapes but no data, so anything that reads a device value on the host - ``.item()``,
``float(t)``, ``bool(x.any())``, ``.cpu()``, ``nonzero`` - raises. Host-side values (the float64 coefficient
plans, numpy timestep copies) are unaffected. A loop that runs on ``meta`` therefore makes no per-step host
sync on CUDA. A second run of the same loop must also copy nothing between host and device (what a CUDA graph
capture cannot contain; one-off tables are copied in the first, warm-up run). The negative controls show both
checks catch real syncs and copies.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from pipeline_factory import tiny_unet
from torch.utils._python_dispatch import TorchDispatchMode

import guidance
import samplers
from samplers import DualFast, GaussianStats, GaussianTeleport, TimeShift
from samplers.runtime.loop import _loop
from samplers.testbeds import GaussianMixtureModel

META = torch.device("meta")
FLOW = {"noise_schedule": "flow", "prediction_type": "flow_prediction"}
SHAPE = (4, 3, 8, 8)

SCHEDULER_CONFIGS = [
    ("dpmsolver++", {"solver_order": 1}),
    ("dpmsolver++", {"solver_order": 2}),
    ("dpmsolver++", {"solver_order": 3, "prediction_type": "v_prediction"}),
    ("dpmsolver++", {"solver_order": 2, "thresholding": True}),
    ("dpmsolver++", {"method": "singlestep", "solver_order": 3}),
    ("dpmsolver++", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    ("deis", {"solver_order": 3}),
    ("deis", {"solver_type": "tab", "solver_order": 3}),
    ("deis", {"solver_type": "rhoab", "solver_order": 3}),
    ("deis", {"solver_type": "rhork", "solver_order": 3}),
    ("deis", {"solver_type": "ipndm", "solver_order": 3}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_type": "bh1", "solver_order": 2, "prediction_type": "sample"}),
    ("dc-solver", {}),
    ("dpmsolver++", {"solver_order": 2, "final_step_order": 3}),
    ("deis", {"solver_type": "rhoab", "solver_order": 2, "final_step_order": 3}),
    ("unipc", {"solver_order": 2, "final_step_order": 3}),
    ("dpmsolver++", {**FLOW, "flow_shift": 3.0}),
    ("deis", {**FLOW, "solver_order": 3}),
    ("unipc", {**FLOW, "thresholding": True}),
]


def half_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x


class HostDeviceCopies(TorchDispatchMode):
    """Records the aten ops that mix host and device tensors (host-to-device or device-to-host copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        values = (*args, *(kwargs or {}).values(), out)
        if len({v.device.type for v in values if isinstance(v, torch.Tensor)}) > 1:
            self.ops.append(func.overloadpacket.__name__)
        return out


def run_on_meta(scheduler, steps: int = 6, model=half_model, model_dtype=None, copies_allowed: bool = False,
                **kwargs) -> torch.Tensor:
    """Two runs on ``meta``: any host read raises; the second may not copy between host and device."""
    for _ in range(2):
        scheduler.set_timesteps(steps, device=META)
        with HostDeviceCopies() as copies:
            x, nonfinite, nfe = _loop(model, scheduler, torch.empty(SHAPE, device=META), model_dtype, **kwargs)
        assert x.device == META and x.shape == SHAPE and nonfinite.shape == (len(scheduler.timesteps),)
    assert copies_allowed or not copies.ops, f"host<->device copies in a repeated run: {copies.ops}"
    return x


@pytest.mark.parametrize("name,options", SCHEDULER_CONFIGS, ids=lambda v: str(v))
def test_project_schedulers_step_without_host_sync(name, options):
    run_on_meta(samplers.SCHEDULERS[name](**options))


def test_low_precision_model_and_per_sample_sde_generators_make_no_sync():
    scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    x = run_on_meta(scheduler, model_dtype=torch.bfloat16, generator=samplers.per_sample_generators(range(4)),
                    copies_allowed=True)
    assert x.dtype == torch.float32
    with pytest.raises(AssertionError, match="host<->device copies in a repeated run"):
        run_on_meta(scheduler, generator=samplers.per_sample_generators(range(4)))


def test_dynamic_compensation_plugin_makes_no_sync():
    cls = samplers.with_dynamic_compensation(samplers.DPMSolverPlusPlusScheduler)
    run_on_meta(cls(solver_order=3, dc_ratios=[1.0, 1.0, 1.0, 0.9, 0.95, 1.0]))


def stats() -> GaussianStats:
    return GaussianStats.from_samples(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)), rank=8)


@pytest.mark.parametrize("make", [
    lambda: TimeShift(samplers.DPMSolverPlusPlusScheduler(), window=20, cutoff=100),
    lambda: TimeShift(samplers.UniPCScheduler(), window=20, cutoff=100, per_sample=False),
    lambda: TimeShift(samplers.DPMSolverPlusPlusScheduler(), window=20, cutoff=100, shift="all"),
    lambda: TimeShift(samplers.UniPCScheduler(), window=20, cutoff=100, per_sample=False, shift="target"),
    lambda: DualFast(samplers.DEISScheduler(), scale=0.3),
    lambda: DualFast(samplers.DPMSolverPlusPlusScheduler(), space="data", reference="previous"),
    lambda: GaussianTeleport(samplers.UniPCScheduler(), stats(), skip=0.4),
    lambda: TimeShift(DualFast(GaussianTeleport(samplers.DEISScheduler(), stats(), skip=0.4)), window=10),
    lambda: TimeShift(DualFast(GaussianTeleport(samplers.UniPCScheduler(**FLOW), stats(), skip=0.4)), cutoff=50),
], ids=["timeshift", "timeshift-batch", "timeshift-all", "timeshift-target-batch", "dualfast", "dualfast-data",
        "teleport", "composed", "composed-flow"])
def test_wrappers_make_no_sync(make):
    scheduler = make()
    run_on_meta(scheduler, steps=8)
    if isinstance(scheduler, TimeShift):
        shifted = [h for h in scheduler.shift_history if h.nominal > scheduler.cutoff]
        assert shifted and all(h.timesteps.device == META for h in shifted)


@pytest.mark.parametrize("guider", [guidance.CFG(4.0), guidance.APG(7.5, eta=0.0, norm_threshold=2.5)],
                         ids=["cfg", "apg"])
def test_guided_model_makes_no_sync(guider):
    scheduler = samplers.DPMSolverPlusPlusScheduler(solver_order=2)
    guided = guidance.guided_model(None, guider, scheduler=scheduler,
                                   experts=[(half_model, {}), (lambda x, t: 0.25 * x, {})])
    run_on_meta(scheduler, model=guided)
    assert guided.model_calls == 2 * 6 * 2  # two runs, six steps, two experts


@pytest.mark.parametrize("resample", ["systematic", "stratified", "multinomial"])
def test_fkc_weights_and_resampling_make_no_sync(resample):
    fkc = guidance.FKC(3.0, num_particles=2, resample=resample, ess_threshold=0.5, clamp=1.0, start_resampling_step=1)
    scheduler = fkc.scheduler()
    guided = guidance.guided_model(None, fkc, scheduler=scheduler,
                                   experts=[(half_model, {}), (lambda x, t: 0.25 * x, {})])
    run_on_meta(scheduler, model=guided, callback=guided.step_end)
    history = fkc.history
    assert history["log_weights"].shape == (6, 2, 2) and history["log_weights"].device == META
    assert fkc.chosen.shape == (2,) and fkc.chosen.device == META


def test_guidance_reads_a_diffusers_schedulers_timesteps_from_one_host_copy_per_run():
    scheduler = diffusers.DPMSolverMultistepScheduler()
    driver = guidance.GuidanceDriver(guidance.CFG(3.0), scheduler)
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = guidance.base.evaluation_index(scheduler, t)
        seen.append(driver.alpha_sigma(t.to(META), index))  # reading a device timestep would raise
        return 0.5 * x

    samplers.sample(model, scheduler, torch.randn(SHAPE), 6)
    assert seen == [tuple(float(v) for v in driver.schedule.alpha_sigma(float(t))) for t in scheduler.timesteps]


def test_diffusers_unet_with_project_scheduler_makes_no_sync():
    unet = tiny_unet().to(META)
    run_on_meta(samplers.UniPCScheduler(solver_order=3), model=lambda x, t: unet(x, t).sample)


def test_meta_check_catches_a_host_sync():
    """Negative control: diffusers' multistep scheduler looks its step index up with ``nonzero``/``item``."""
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        run_on_meta(diffusers.DPMSolverMultistepScheduler())

    def syncing_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().max())

    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        run_on_meta(samplers.DPMSolverPlusPlusScheduler(), model=syncing_model)


def test_channels_last_state_feeds_the_model_channels_last_and_changes_no_value(float64_default):
    model = GaussianMixtureModel((3, 8, 8), num_components=4)
    layouts = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return model(x, t).sample

    noise = samplers.noise_from_seeds(range(4), (3, 8, 8), dtype=torch.float64)
    ref = samplers.sample(model, samplers.UniPCScheduler(solver_order=3), noise, 6).samples
    out = samplers.sample(fn, samplers.UniPCScheduler(solver_order=3), noise, 6,
                          memory_format=torch.channels_last).samples
    assert layouts == [True] * 6 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- CapturedSampler (eager off CUDA)
def test_captured_sampler_matches_sample_and_replays_with_new_noise():
    unet = tiny_unet()
    noises = [samplers.noise_from_seeds(seeds, (3, 8, 8)) for seeds in ([0, 1], [5, 6])]
    captured = samplers.CapturedSampler(unet, samplers.UniPCScheduler(solver_order=3), (2, 3, 8, 8), 5)
    assert not captured.captures and captured.device == torch.device("cpu")
    for noise in noises:
        out = captured(noise)
        with torch.no_grad():
            ref = samplers.sample(unet, samplers.UniPCScheduler(solver_order=3), noise, 5)
        assert torch.equal(out.samples, ref.samples)
        assert out.nfe == ref.nfe == 5 and out.timesteps == ref.timesteps
    assert not torch.equal(captured(noises[0]).samples, captured(noises[1]).samples)


def test_captured_sampler_checks_inputs_and_reports_nonfinite_outputs():
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        samplers.CapturedSampler(half_model, samplers.DEISScheduler(), SHAPE, 5, warmup=0)
    captured = samplers.CapturedSampler(half_model, samplers.DEISScheduler(), SHAPE, 5)
    with pytest.raises(ValueError, match=r"noise must have the captured shape \(4, 3, 8, 8\), got \(2, 3, 8, 8\)"):
        captured(torch.zeros(2, 3, 8, 8))

    def nan_late(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * torch.where(t < 400, torch.nan, 0.5)

    captured = samplers.CapturedSampler(nan_late, samplers.DEISScheduler(), SHAPE, 5)
    first = next(i for i, t in enumerate(captured.timesteps) if t < 400)
    bad = sum(t < 400 for t in captured.timesteps)
    assert 0 < first < bad + first == 5
    with pytest.raises(FloatingPointError, match=rf"model output at step {first} \(timestep "
                       rf"{captured.timesteps[first]:.3f}\) contains NaN or Inf; {bad} of 5 steps"):
        captured(torch.randn(SHAPE))


# ---------------------------------------------------------------- on a CUDA device (skipped elsewhere)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_SCHEDULERS = [
    lambda: samplers.DPMSolverPlusPlusScheduler(solver_order=3),
    lambda: samplers.UniPCScheduler(solver_order=2, final_step_order=3),
    lambda: TimeShift(samplers.DEISScheduler(), window=20, cutoff=100),
]


@cuda_only
@pytest.mark.parametrize("make", CUDA_SCHEDULERS, ids=["dpm3m", "unipc-final3", "timeshift-deis"])
def test_captured_sampler_on_cuda_matches_eager_loop(make):
    unet = tiny_unet().cuda()
    noise = samplers.noise_from_seeds(range(8), (3, 8, 8), device="cuda")
    captured = samplers.CapturedSampler(unet, make(), noise.shape, 8)
    outs = [captured(noise), captured(noise.flip(0))]
    with torch.no_grad():
        refs = [samplers.sample(unet, make(), n, 8) for n in (noise, noise.flip(0))]
    assert captured.captures and captured.graph is not None
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.samples, ref.samples, rtol=1e-5, atol=1e-5)
    captured.scheduler.set_timesteps(5, device="cuda")
    with pytest.raises(RuntimeError, match="was reset .* give each CapturedSampler a scheduler of its own"):
        captured(noise)


@cuda_only
def test_eager_loop_on_cuda_makes_no_sync_with_a_bf16_model():
    unet = tiny_unet().cuda().to(torch.bfloat16)
    scheduler = TimeShift(samplers.UniPCScheduler(solver_order=3), window=20, cutoff=100)
    noise = samplers.noise_from_seeds(range(8), (3, 8, 8), device="cuda")
    for check in (False, True):  # the first run copies Time-Shift's table to the device
        scheduler.set_timesteps(8, device="cuda")
        torch.cuda.set_sync_debug_mode("error" if check else "default")
        try:
            with torch.no_grad():
                x, _, _ = _loop(lambda x, t: unet(x, t).sample, scheduler, noise, torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
