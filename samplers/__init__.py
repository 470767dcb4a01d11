"""Diffusion solvers as diffusers schedulers, accelerators that wrap any scheduler, and a sampling loop."""

from .dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .loop import SampleResult, noise_from_seeds, per_sample_generators, sample
from .schedule import ContinuousVPSchedule, DiscreteVPSchedule, NoiseSchedule, VESchedule
from .teleport import GaussianStats, GaussianTeleport
from .wrappers import DualFast, TimeShift

SCHEDULERS: dict[str, type] = {
    "dpmsolver++": DPMSolverPlusPlusScheduler,
}

__all__ = [
    "SCHEDULERS",
    "ContinuousVPSchedule",
    "DPMSolverPlusPlusScheduler",
    "DiscreteVPSchedule",
    "DualFast",
    "GaussianStats",
    "GaussianTeleport",
    "NoiseSchedule",
    "SampleResult",
    "TimeShift",
    "VESchedule",
    "noise_from_seeds",
    "per_sample_generators",
    "sample",
]
