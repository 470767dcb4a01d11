"""Diffusion solvers as diffusers schedulers, accelerators that wrap any scheduler, and a sampling loop."""

import importlib as _importlib
import pkgutil as _pkgutil

from . import saved_layout
from .accelerators.base import SchedulerWrapper
from .accelerators.dualfast import DualFast
from .accelerators.teleport import GaussianStats, GaussianTeleport
from .accelerators.timeshift import TimeShift
from .runtime.graph import CapturedSampler
from .runtime.guidance_check import import_guidance, warn_if_shadowed
from .runtime.loop import SampleResult, noise_from_seeds, per_sample_generators, sample
from .solvers.dc_solver import (
    CascadePolynomialRegression,
    DCSolverScheduler,
    search_dc_ratios,
    with_dynamic_compensation,
)
from .solvers.deis_scheduler import DEISScheduler
from .solvers.dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .solvers.schedule import ContinuousVPSchedule, DiscreteVPSchedule, FlowMatchingSchedule, NoiseSchedule, VESchedule
from .solvers.scheduler_base import SCHEDULERS
from .solvers.tune import TunedSchedule, tune
from .solvers.unipc_scheduler import UniPCScheduler

# Extensions register themselves on import: every module of the solvers and accelerators sub-packages is imported,
# so a new solver or accelerator module needs no line here to join SCHEDULERS / ACCELERATORS and the sweep.
for _package in ("solvers", "accelerators"):
    for _info in _pkgutil.iter_modules(_importlib.import_module(f"{__name__}.{_package}").__path__):
        _importlib.import_module(f"{__name__}.{_package}.{_info.name}")

saved_layout.install()  # pipelines saved by the flat layout name its module paths
warn_if_shadowed()  # the PyPI package `guidance` (LLM control) uses our guidance package's import name

#: Project configurations and their diffusers counterparts, for side-by-side benchmarks:
#: (label, (registry name, options), (diffusers class name, options)).
DIFFUSERS_PEERS: list[tuple[str, tuple[str, dict], tuple[str, dict]]] = [
    ("DDIM / DPM++ 1", ("dpmsolver++", {"solver_order": 1}), ("DDIMScheduler", {})),
    ("DPM++ 2M", ("dpmsolver++", {"solver_order": 2}), ("DPMSolverMultistepScheduler", {"solver_order": 2})),
    ("DPM++ 3M", ("dpmsolver++", {"solver_order": 3}), ("DPMSolverMultistepScheduler", {"solver_order": 3})),
    ("DEIS 3", ("deis", {"solver_order": 3}), ("DEISMultistepScheduler", {"solver_order": 3})),
    ("UniPC bh2 p2", ("unipc", {"solver_order": 2}), ("UniPCMultistepScheduler", {"solver_order": 2})),
    ("UniPC bh2 p3", ("unipc", {"solver_order": 3}), ("UniPCMultistepScheduler", {"solver_order": 3})),
]

__all__ = [
    "DIFFUSERS_PEERS",
    "SCHEDULERS",
    "CapturedSampler",
    "CascadePolynomialRegression",
    "ContinuousVPSchedule",
    "DCSolverScheduler",
    "DEISScheduler",
    "DPMSolverPlusPlusScheduler",
    "DiscreteVPSchedule",
    "DualFast",
    "FlowMatchingSchedule",
    "GaussianStats",
    "GaussianTeleport",
    "NoiseSchedule",
    "SampleResult",
    "SchedulerWrapper",
    "TimeShift",
    "TunedSchedule",
    "UniPCScheduler",
    "VESchedule",
    "import_guidance",
    "noise_from_seeds",
    "per_sample_generators",
    "sample",
    "search_dc_ratios",
    "tune",
    "with_dynamic_compensation",
]
