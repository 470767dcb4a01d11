"""Pipelines and wrapper stacks saved by the flat layout (commit 928b71b, `tests/fixtures/make_old_layout.py`) load
with the sub-package layout and draw the same images."""

from pathlib import Path

import torch
from diffusers import DDPMPipeline
from pipeline_factory import tiny_unet
from safetensors.torch import load_file

import samplers
from samplers.solvers import dc_solver

FIXTURE = Path(__file__).parent / "fixtures" / "old_layout"


def draw(pipe: DDPMPipeline) -> torch.Tensor:
    """Seed 0, 5 steps, on one CPU thread as the fixture was drawn (the UNet's sums depend on the thread count)."""
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        torch.set_num_threads(threads)
    return torch.from_numpy(out.images)


def test_the_fixture_names_the_flat_layout_module_paths():
    index = (FIXTURE / "pipeline" / "model_index.json").read_text()
    assert '"samplers.wrappers"' in index and "DCDPMSolverPlusPlusScheduler" in (
        FIXTURE / "pipeline" / "scheduler" / "scheduler_config.json").read_text()


def test_a_pipeline_saved_by_the_flat_layout_loads_and_draws_the_same_images():
    loaded = DDPMPipeline.from_pretrained(FIXTURE / "pipeline")
    stack = loaded.scheduler
    assert type(stack) is samplers.TimeShift and type(stack.inner) is samplers.DualFast
    dc = samplers.with_dynamic_compensation(samplers.DPMSolverPlusPlusScheduler)
    assert type(stack.inner.inner) is dc and dc.__module__ == "samplers.solvers.dc_solver"
    assert (stack.window, stack.cutoff, stack.inner.scale, stack.inner.form) == (20, 150.0, 0.3, "interpolate")
    assert stack.inner.schedule == "linear"  # DualFast's saved "schedule" option (stored as .ramp before)
    assert stack.config.dc_ratios == [1.0, 1.0, 0.97, 1.03, 1.0] and stack.config.solver_order == 3

    rebuilt = DDPMPipeline(unet=tiny_unet(), scheduler=samplers.TimeShift(samplers.DualFast(
        dc(solver_order=3, timestep_schedule="linspace", dc_ratios=[1.0, 1.0, 0.97, 1.03, 1.0]),
        scale=0.3, form="interpolate"), window=20, cutoff=150))
    images = draw(loaded)
    assert torch.equal(images, draw(rebuilt))  # same weights, same stack, same code
    # drawn by the flat layout on another machine: float32 convolutions round differently across CPUs, so the
    # cross-machine check allows round-off; the bit-exact check is the same-machine one above
    torch.testing.assert_close(images, load_file(FIXTURE / "images.safetensors")["images"], rtol=0, atol=1e-4)


def test_a_wrapper_stack_and_a_dc_scheduler_saved_by_the_flat_layout_load():
    stack = samplers.SchedulerWrapper.from_pretrained(FIXTURE / "pipeline" / "scheduler")
    assert repr(stack) == repr(DDPMPipeline.from_pretrained(FIXTURE / "pipeline").scheduler)
    dc = dc_solver.DCDPMSolverPlusPlusScheduler.from_pretrained(FIXTURE / "dc_scheduler")
    assert dc.config.dc_ratios == [1.0, 1.0, 1.1] and dc.config.solver_order == 2


def test_the_flat_layout_module_names_resolve_to_exactly_the_saved_classes():
    import importlib

    for name in samplers.saved_layout.OLD_MODULES:
        module = importlib.import_module(name)
        assert module is samplers.saved_layout and module.SchedulerMixin is not None
    assert importlib.import_module("samplers.dc_solver").DCUniPCScheduler is samplers.DCSolverScheduler
