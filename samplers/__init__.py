"""Diffusion solvers as diffusers schedulers, accelerators that wrap any scheduler, and a sampling loop."""

from .dc_solver import CascadePolynomialRegression, DCSolverScheduler, search_dc_ratios, with_dynamic_compensation
from .deis_scheduler import DEISScheduler
from .dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .loop import SampleResult, noise_from_seeds, per_sample_generators, sample
from .schedule import ContinuousVPSchedule, DiscreteVPSchedule, NoiseSchedule, VESchedule
from .teleport import GaussianStats, GaussianTeleport
from .unipc_scheduler import UniPCScheduler
from .wrappers import DualFast, TimeShift

SCHEDULERS: dict[str, type] = {
    "dpmsolver++": DPMSolverPlusPlusScheduler,
    "deis": DEISScheduler,
    "unipc": UniPCScheduler,
    "dc-solver": DCSolverScheduler,
}

__all__ = [
    "SCHEDULERS",
    "CascadePolynomialRegression",
    "ContinuousVPSchedule",
    "DCSolverScheduler",
    "DEISScheduler",
    "DPMSolverPlusPlusScheduler",
    "DiscreteVPSchedule",
    "DualFast",
    "GaussianStats",
    "GaussianTeleport",
    "NoiseSchedule",
    "SampleResult",
    "TimeShift",
    "UniPCScheduler",
    "VESchedule",
    "noise_from_seeds",
    "per_sample_generators",
    "sample",
    "search_dc_ratios",
    "with_dynamic_compensation",
]
