"""Diffusion solvers as diffusers schedulers, accelerators that wrap any scheduler, and a sampling loop."""

from .deis_scheduler import DEISScheduler
from .dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .loop import SampleResult, noise_from_seeds, per_sample_generators, sample
from .schedule import ContinuousVPSchedule, DiscreteVPSchedule, NoiseSchedule, VESchedule
from .teleport import GaussianStats, GaussianTeleport
from .wrappers import DualFast, TimeShift

SCHEDULERS: dict[str, type] = {
    "dpmsolver++": DPMSolverPlusPlusScheduler,
    "deis": DEISScheduler,
}

__all__ = [
    "SCHEDULERS",
    "ContinuousVPSchedule",
    "DEISScheduler",
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
