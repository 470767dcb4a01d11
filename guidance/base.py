"""The guider interface and the driver that connects a guider to a scheduler.

A `Guider` turns the model's data predictions for several conditions at one evaluation into the single data
prediction (x0) the solver consumes: ``combine([D_cond, D_uncond, ...], x, alpha, sigma) -> D``. Calling a
guider with raw model outputs converts them from and back to the model's parameterisation (eps / v / x0) with
`samplers.solvers.prediction`, so guidance always acts on the denoised prediction whatever the model predicts.

Stateful guiders have two hooks: `reset` (new sampling run) and `advance` (once per solver step, not once per
model call). `GuidanceDriver` calls them: it reads which evaluation of the run the scheduler is at (its
``step_index``, or the position of the timestep in ``scheduler.timesteps``), starts a new run when that index
does not increase, and advances when a new solver step begins. A multi-stage scheduler (diffusers'
``order > 1``, e.g. Heun) evaluates the model ``order`` times per step: momentum then advances once per step
and all stages of a step share it (a warning says so). Guiders that resample particles (FKC) have a third hook,
`Guider.step_end`, called by `GuidanceDriver.step_end` after each ``scheduler.step``; with a multi-stage
scheduler that reports ``state_in_first_order`` (diffusers' Heun) they reweight and resample once per whole step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from samplers.accelerators.base import host_timestep, host_timesteps_of, is_project_scheduler
from samplers.solvers.prediction import check_prediction_type, from_data, to_data
from samplers.solvers.schedule import model_schedule


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the argument and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def batch_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The non-batch dimensions ``(1, ..., t.ndim - 1)`` of ``t``, for per-sample reductions."""
    return tuple(range(1, t.ndim))


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Euclidean norm over all non-batch dimensions (float64)."""
    return t.double().square().sum(dim=batch_dims(t))


#: the guiders by registry name (the sweep's ``guidance``): a subclass joins by setting ``registry_name``
GUIDERS: dict[str, type] = {}


class Guider:
    """Combines data predictions for several conditions into the one data prediction a solver consumes."""

    #: this class's name in `GUIDERS` (None: not registered; subclasses do not inherit it)
    registry_name: str | None = None

    #: how many predictions `combine` takes (None: any number, checked by the guider)
    num_inputs: int | None = 2
    #: True for guiders with per-step state (momentum): the driver calls `advance` once per solver step
    has_step_state = False
    #: True for guiders that reweight and resample particles: the driver calls `step_end` after each step
    resamples = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("registry_name"):
            GUIDERS[cls.registry_name] = cls
        if "end_step" in cls.__dict__ and "step_end" not in cls.__dict__:
            warnings.warn(f"{cls.__name__}.end_step: the hook after each solver step is now called step_end; "
                          "end_step is used for now and will be removed", DeprecationWarning, stacklevel=2)
            cls.step_end = cls.__dict__["end_step"]

    def reset(self) -> None:
        """Start a new sampling run."""

    def advance(self) -> None:
        """Commit per-step state; called once per solver step, before the step's first evaluation."""

    def step_end(self, alpha_next: float, sigma_next: float, last: bool) -> torch.Tensor | None:
        """After each solver step, for guiders that resample (``resamples = True``): reweight and resample given
        the next point's alpha, sigma (``last``: the step that ends the run); returns the flat ancestor index of
        every particle, or None when nothing moved. The driver calls it from `GuidanceDriver.step_end`."""
        return None

    def end_step(self, alpha_next: float, sigma_next: float, last: bool) -> torch.Tensor | None:
        """Deprecated name of `step_end` (warns)."""
        warnings.warn("Guider.end_step is now called step_end", DeprecationWarning, stacklevel=2)
        return self.step_end(alpha_next, sigma_next, last)

    def bind(self, scheduler: Any) -> None:
        """Told the scheduler the driver runs with (FKC checks an `FKCScheduler`'s exponent sum against it)."""

    def combine(self, x0: Sequence[torch.Tensor], x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """The guided data prediction D from the per-condition data predictions ``x0`` at state ``x`` = alpha x0 +
        sigma eps (all in the work dtype, see `__call__`); each guider implements it."""
        raise NotImplementedError

    def check_inputs(self, x0: Sequence[torch.Tensor]) -> None:
        """ValueError unless ``x0`` holds ``num_inputs`` predictions; `__call__` runs it before `combine`."""
        if self.num_inputs is not None and len(x0) != self.num_inputs:
            raise ValueError(f"{type(self).__name__} combines {self.num_inputs} predictions (cond, uncond), "
                             f"got {len(x0)}")

    def __call__(self, outputs: Sequence[torch.Tensor], x: torch.Tensor, alpha: float, sigma: float,
                 prediction_type: str = "epsilon") -> torch.Tensor:
        """Model outputs of ``prediction_type`` at state ``x`` -> the guided output of the same type.

        Arithmetic runs in float64 (float32 on MPS, which has no float64); the result has the outputs' dtype.
        """
        check_prediction_type(prediction_type)
        work = torch.float32 if x.device.type == "mps" else torch.float64
        xw = x.to(work)
        x0 = [to_data(o.to(work), xw, alpha, sigma, prediction_type) for o in outputs]
        self.check_inputs(x0)
        guided = self.combine(x0, xw, alpha, sigma)
        return from_data(guided, xw, alpha, sigma, prediction_type).to(outputs[0].dtype)


def evaluation_index(scheduler: Any, timestep: Any) -> int:
    """Which evaluation of the current run the scheduler is at: ``step_index`` when the scheduler keeps one
    (None before the first step means 0), else the first position of ``timestep`` in ``scheduler.timesteps``."""
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        return 0 if index is None else int(index)
    timesteps = torch.as_tensor(scheduler.timesteps).double().cpu()
    hits = (timesteps == float(torch.as_tensor(timestep).double().reshape(-1)[0])).nonzero()
    if len(hits) == 0:
        raise ValueError(f"timestep {float(torch.as_tensor(timestep).reshape(-1)[0])} is not in "
                         f"{type(scheduler).__name__}.timesteps and the scheduler has no step_index")
    return int(hits[0])


def permute_state(scheduler: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reorder particles: returns ``x[index]`` and applies the same reordering to every per-sample tensor the
    scheduler keeps (any tensor of ``x``'s shape among its attributes, in lists or tuples, or in a wrapped
    scheduler), so multistep histories follow their particles. Shared tensors stay shared."""
    moved: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == x.shape:
            if id(value) not in moved:
                moved[id(value)] = value[index.to(value.device)]
            return moved[id(value)]
        if isinstance(value, list):
            value[:] = [take(v) for v in value]
        elif isinstance(value, tuple):
            return tuple(take(v) for v in value)
        elif hasattr(value, "set_timesteps") and hasattr(value, "__dict__"):
            visit(value)
        return value

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in list(vars(obj).items()):
            new = take(value)
            if new is not value:
                setattr(obj, name, new)

    visit(scheduler)
    return take(x)


class GuidanceDriver:
    """Runs a guider inside a sampling loop driven by ``scheduler`` (see module docstring)."""

    def __init__(self, guider: Guider, scheduler: Any):
        if not isinstance(guider, Guider):
            raise TypeError(f"guider must be a guidance.Guider (CFG, APG, FKC), got {type(guider).__name__}")
        self.guider, self.scheduler = guider, scheduler
        guider.bind(scheduler)
        self.schedule, prediction_type = model_schedule(scheduler, "guidance")
        self.prediction_type = check_prediction_type(prediction_type)
        self.order = int(getattr(scheduler, "order", 1))
        name = type(scheduler).__name__
        if guider.resamples and self.order > 1 and not hasattr(scheduler, "state_in_first_order"):
            raise ValueError(f"{type(guider).__name__} resamples particles after every solver step and needs a "
                             f"single-stage scheduler or one that reports state_in_first_order (diffusers' Heun); "
                             f"{name} has order={self.order}")
        if guider.has_step_state and self.order > 1:
            warnings.warn(f"{type(guider).__name__} momentum with the multi-stage {name} (order={self.order}): the "
                          f"running average advances once per solver step (every {self.order} model calls) and "
                          "all stages of a step use the same running average", UserWarning, stacklevel=3)
        self._last: int | None = None
        self._pending_end = False
        self._host: np.ndarray | None = None

    def alpha_sigma(self, timestep: Any, index: int) -> tuple[float, float]:
        """alpha, sigma at evaluation ``index``. Its timestep is read without a device sync: from the scheduler's
        host copy (the project's schedulers and wrappers) or, for other schedulers that count their steps, from
        one copy of their timesteps per run."""
        on_device = isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"
        if on_device and not is_project_scheduler(self.scheduler) and hasattr(self.scheduler, "step_index"):
            if self._host is None:
                self._host = host_timesteps_of(self.scheduler)
            t = float(self._host[index])
        else:
            t = host_timestep(self.scheduler, timestep, index)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return float(alpha), float(sigma)

    def guide(self, outputs: Sequence[torch.Tensor], x: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The guided model output (model parameterisation) for the evaluation at ``timestep``."""
        k = evaluation_index(self.scheduler, timestep)
        if self._last is None or k <= self._last:
            self.guider.reset()
            self._pending_end = False
            self._host = None
        elif k // self.order > self._last // self.order:
            self.guider.advance()
        if self._pending_end:
            raise RuntimeError(f"{type(self.guider).__name__} reweights particles after every solver step: call "
                               "step_end after each scheduler.step (guidance.sample and guidance.attach do; with "
                               "samplers.sample pass callback=guided.step_end)")
        self._last = k
        self._pending_end = self.guider.resamples
        alpha, sigma = self.alpha_sigma(timestep, k)
        return self.guider(outputs, x, alpha, sigma, self.prediction_type)

    def step_end(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After ``scheduler.step``: let a resampling guider reweight and resample; returns the (possibly
        reordered) state and the particle index used (None when nothing moved)."""
        if not self.guider.resamples or self._last is None:
            return x, None
        self._pending_end = False
        timesteps = self.scheduler.timesteps
        last = self._last + 1 >= len(timesteps)
        if not last and not getattr(self.scheduler, "state_in_first_order", True):
            return x, None  # inside a multi-stage step (Heun): reweight and resample at its end
        alpha_next, sigma_next = (1.0, 0.0) if last else self.alpha_sigma(timesteps[self._last + 1], self._last + 1)
        index = self.guider.step_end(alpha_next, sigma_next, last)
        if index is None:
            return x, None
        return permute_state(self.scheduler, x, index), index
