"""DualFast: corrects the network's approximation error with a prediction cached at a noisier step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..solvers.prediction import from_data, to_data, to_noise
from ..solvers.schedule import model_schedule
from .base import SchedulerWrapper

__all__ = ["DualFast"]


class DualFast(SchedulerWrapper):
    """DualFast (Yu et al. 2025, arXiv 2506.13058): approximation-error correction with no extra NFE.

    The network's approximation error shrinks at noisier steps, so the prediction at the current step, P_i, is
    combined with the prediction cached from an earlier, noisier step, P_ref:

        extrapolate:  P_i <- P_i + c_i (P_i - P_ref)     (default)
        interpolate:  P_i <- P_i + c_i (P_ref - P_i)

    with c_i = scale * (1 - t_i / T) ("linear": grows as the noise falls) or c_i = scale ("constant").
    P is the noise prediction (``space="noise"``, default) or the data prediction x0 (``space="data"``); the
    reference is the first step's output (``reference="first"``, default) or the previous step's
    (``"previous"``). The corrected P is converted back to the model's output type and handed to the wrapped
    solver, whose own discretization is untouched; ``coefficients`` records the c_i used. ``scale=0`` reproduces
    the wrapped scheduler bit for bit. How the default form relates to the paper (not verified against it, hence
    every part is an option) and its measured effect: docs/fidelity.md (DualFast).
    """

    registry_name = "dualfast"

    forms = ("interpolate", "extrapolate")
    references = ("first", "previous")
    spaces = ("data", "noise")
    schedules = ("linear", "constant")

    def __init__(self, scheduler: Any, scale: float = 0.2, form: str = "extrapolate", reference: str = "first",
                 space: str = "noise", schedule: str = "linear"):
        super().__init__(scheduler)
        self.noise_schedule = model_schedule(scheduler, "DualFast")[0]
        for name, value, allowed in (("form", form, self.forms), ("reference", reference, self.references),
                                     ("space", space, self.spaces), ("schedule", schedule, self.schedules)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        limit = 1.0 if form == "interpolate" else 10.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= limit:
            raise ValueError(f"scale must be a number in [0, {limit:g}] for form={form!r}, got {scale!r}")
        self.scale, self.form, self.reference, self.space = float(scale), form, reference, space
        self.schedule = schedule

    def _describe(self) -> str:
        return f"scale={self.scale:g}, form={self.form!r}, reference={self.reference!r}, space={self.space!r}"

    def _reset(self) -> None:
        super()._reset()
        self._ref: torch.Tensor | None = None
        self.coefficients: list[float] = []

    def _saved_options(self, directory: Path) -> dict[str, Any]:
        return {"scale": self.scale, "form": self.form, "reference": self.reference, "space": self.space,
                "schedule": self.schedule}

    def coefficient(self, timestep: Any) -> float:
        """c_i at a nominal timestep."""
        if self.schedule == "constant":
            return self.scale
        return self.scale * (1.0 - float(timestep) / self.noise_schedule.t_max)

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale == 0.0 or self.discards_next_output:
            return self._inner_step(model_output, timestep, sample, *args, **kwargs)
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        t = self._host_value(timestep)
        x = sample.to(dtype) * self._vp_factor(self.noise_schedule, t)
        alpha, sigma = (float(v) for v in self.noise_schedule.alpha_sigma(t))
        out = model_output.to(dtype)
        convert = to_data if self.space == "data" else to_noise
        d = convert(out, x, alpha, sigma, self.prediction_type)
        ref = self._ref
        if ref is None or self.reference == "previous":
            self._ref = d
        if ref is None:
            self.coefficients.append(0.0)
            return self._inner_step(model_output, timestep, sample, *args, **kwargs)
        c = self.coefficient(t)
        self.coefficients.append(c)
        sign = 1.0 if self.form == "extrapolate" else -1.0
        mixed = d + (sign * c) * (d - ref)
        x0 = mixed if self.space == "data" else (x - sigma * mixed) / alpha
        new_output = from_data(x0, x, alpha, sigma, self.prediction_type).to(model_output.dtype)
        return self._inner_step(new_output, timestep, sample, *args, **kwargs)
