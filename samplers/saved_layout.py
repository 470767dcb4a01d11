"""What pipelines saved before the sub-package layout name: diffusers records a component as (module, class), e.g.
``["samplers.wrappers", "TimeShift"]`` or ``["samplers.dc_solver", "DCDPMSolverPlusPlusScheduler"]``. Those module
names (`OLD_MODULES`) resolve to this module, which holds exactly the classes they held (and diffusers'
``SchedulerMixin``, which its loader looks up beside them); ``tests/test_saved_layout.py`` loads such a pipeline."""

from __future__ import annotations

import sys

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .accelerators.base import SchedulerWrapper
from .accelerators.dualfast import DualFast
from .accelerators.teleport import GaussianTeleport
from .accelerators.timeshift import TimeShift
from .solvers import dc_solver
from .solvers.dc_solver import DCSolverScheduler
from .solvers.deis_scheduler import DEISScheduler
from .solvers.dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .solvers.unipc_scheduler import UniPCScheduler

#: module paths of the flat layout that saved pipelines name
OLD_MODULES = ("samplers.wrappers", "samplers.teleport", "samplers.dpmsolver_scheduler", "samplers.deis_scheduler",
               "samplers.unipc_scheduler", "samplers.dc_solver")

__all__ = ["DCSolverScheduler", "DEISScheduler", "DPMSolverPlusPlusScheduler", "DualFast", "GaussianTeleport",
           "SchedulerMixin", "SchedulerWrapper", "TimeShift", "UniPCScheduler"]


def __getattr__(name: str) -> type:
    """``DC<Scheduler>`` plug-in classes, built on first use (see `samplers.solvers.dc_solver.__getattr__`)."""
    return getattr(dc_solver, name)


def install() -> None:
    """Make `OLD_MODULES` importable as this module."""
    for name in OLD_MODULES:
        sys.modules.setdefault(name, sys.modules[__name__])
