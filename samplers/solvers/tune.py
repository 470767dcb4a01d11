"""Per-model few-step tuning of the step grid: ``samplers.tune(model, scheduler, n)``.

Trajectories of one model share their shape (Chen et al., ICML 2024, "GITS"), so a grid fitted on a few teacher
trajectories transfers to new noises. `tune`:

1. solves a teacher trajectory for each calibration and hold-out noise (DPM-Solver++ 3M, ``teacher_steps`` steps on
   a uniform log-SNR grid, a 3-point final step to sigma = 0);
2. runs the user's scheduler with ``n`` model evaluations on candidate grids and scores each by the median plus the
   90th percentile of the per-sample RMS errors to the teacher, plus ``tail_weight`` times the mean of the worst
   10 % (`samplers.evaluation.quality.ErrorSummary.score`; a grid that sends a few percent of the noises to another
   mode shows in that term, not in the p90): first the built-in grids (``logsnr_interior``,
   ``logsnr``, ``time_uniform``, ``time_quadratic``, ``karras``; on a flow schedule its three flow grids), then a
   Nelder-Mead search from the best of them over the log-SNR gaps of the grid (softmax parameters, so every
   candidate is a valid descending grid inside the schedule; a flow grid keeps its first evaluation at sigma = 1);
3. accepts the tuned grid only if it also beats the scheduler's own grid on the hold-out noises (disjoint seeds):
   objective lower by at least `ACCEPT_MARGIN`, and neither the median nor the p90 higher;
   otherwise it keeps the untuned grid and says so (`TunedSchedule.improved`, `TunedSchedule.message`).

The result's ``scheduler`` is a copy of the one passed in whose config records the grid under
``tuned_timesteps``: a stock pipeline calling ``set_timesteps(n)`` gets the tuned grid, and ``save_pretrained``
(alone or inside a pipeline) keeps it. Cost: the teacher (2 x ``teacher_steps`` batched model calls) plus n calls
per candidate grid, at most ``budget`` batched calls in all (default 2,000).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm import tqdm

from ..evaluation.quality import ErrorSummary, per_sample_error
from ..runtime.loop import model_device_dtype, model_fn_from_unet, noise_from_seeds, sample
from .dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .flow import FLOW_GRIDS
from .grids import step_grid
from .scheduler_base import ExponentialIntegratorScheduler

#: grids every tuning run scores before the search starts
START_GRIDS = ("logsnr_interior", "logsnr", "time_uniform", "time_quadratic", "karras")
#: seeds far from those evaluations usually use (0, 1, 2, ...), so tuning never sees the evaluation noises
CALIBRATION_SEEDS = range(1_000_000_000, 1_000_000_064)
HOLDOUT_SEEDS = range(1_000_001_000, 1_000_001_064)
DEFAULT_BUDGET = 2000
#: the tuned grid is kept only if its hold-out objective is at least this much lower than the untuned grid's
ACCEPT_MARGIN = 0.01


class TuningError(ValueError):
    """Bad input to `tune`; the message names the argument and what to pass instead."""


@dataclass
class TunedSchedule:
    """What `tune` found for one step count.

    ``timesteps`` are the n evaluation times (descending floats) for ``scheduler.set_timesteps(timesteps=...)``;
    ``scheduler`` is a copy of the tuned scheduler that uses them for ``set_timesteps(n)``. ``improved`` says
    whether the tuned grid beat the scheduler's own grid on the hold-out noises (if not, ``timesteps`` is that own
    grid). Errors are per-sample RMS summaries against the teacher; ``model_evaluations`` counts batched model
    calls (teacher included).
    """

    timesteps: list[float]
    scheduler: ExponentialIntegratorScheduler
    num_inference_steps: int
    improved: bool
    calibration: ErrorSummary
    holdout: ErrorSummary
    default_calibration: ErrorSummary
    default_holdout: ErrorSummary
    model_evaluations: int
    message: str


class _CountedModel:
    """``fn(x, t)`` that counts calls (the budget itself is kept by `tune`) and names the timestep of a non-finite
    output."""

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor], bar: tqdm):
        self.fn, self.bar, self.calls = fn, bar, 0

    def __call__(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        out = self.fn(x, t)
        self.calls += 1
        self.bar.update(1)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"the model returned NaN/Inf at timestep {float(t):g} during tuning "
                                     f"(model call {self.calls}); check the model and model_kwargs")
        return out


def _run(model: _CountedModel, scheduler: Any, noise: torch.Tensor, timesteps: np.ndarray | None = None,
         num_inference_steps: int | None = None) -> torch.Tensor:
    """The framework's loop on ``timesteps`` (or ``num_inference_steps``), without autograd."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps)
    with torch.no_grad():
        return sample(model, scheduler, noise).samples


def teacher_scheduler(scheduler: ExponentialIntegratorScheduler) -> ExponentialIntegratorScheduler:
    """The high-accuracy solver the errors are measured against: DPM-Solver++ 3M on a uniform log-SNR grid
    (``logsnr_interior`` on a flow schedule, which starts at sigma = 1) with a 3-point step to sigma = 0, on the same
    noise schedule and prediction type as ``scheduler``."""
    grid = "logsnr_interior" if scheduler.is_flow else "logsnr"
    return DPMSolverPlusPlusScheduler.from_config(
        scheduler.config, solver_order=3, timestep_schedule=grid, final_sigmas_type="zero",
        final_step_order=3, lower_order_final=True, thresholding=False, tuned_timesteps=None)


def _check_scheduler(scheduler: Any) -> ExponentialIntegratorScheduler:
    if not isinstance(scheduler, ExponentialIntegratorScheduler):
        name = type(scheduler).__name__
        raise TuningError(
            f"tune needs a project scheduler that takes custom timesteps; {name} is not one. Tune the equivalent "
            f"project scheduler instead, e.g. samplers.UniPCScheduler.from_config(scheduler.config) or "
            f"samplers.DPMSolverPlusPlusScheduler.from_config(scheduler.config) (wrappers: tune the inner "
            f"scheduler, then wrap the tuned one)")
    if scheduler.config.final_sigmas_type != "zero":
        raise TuningError("tune needs final_sigmas_type='zero' (the tuned grid ends with the jump to sigma = 0), "
                          f"got {scheduler.config.final_sigmas_type!r}")
    return scheduler


def _check_nfe(num_inference_steps: Any) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TuningError(f"num_inference_steps must be an int >= 2, got {num_inference_steps!r}")
    if num_inference_steps < 2:
        raise TuningError(f"num_inference_steps must be >= 2 to tune a grid (one evaluation has no grid to "
                          f"choose), got {num_inference_steps}")
    return int(num_inference_steps)


def _sample_shape(model: Any) -> tuple[int, ...] | None:
    config = getattr(model, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    if channels is None or size is None:
        shape = getattr(model, "shape", None)
        return tuple(shape) if shape is not None else None
    return (channels, *(size if isinstance(size, (tuple, list)) else (size, size)))


def _noise(given: torch.Tensor | None, seeds: range, shape: tuple[int, ...] | None, name: str,
           device: torch.device) -> torch.Tensor:
    if given is None:
        if shape is None:
            raise TuningError(f"cannot tell the sample shape from the model: pass {name} (a (batch, C, H, W) tensor)")
        return noise_from_seeds(seeds, shape, device=device)
    if not isinstance(given, torch.Tensor) or given.ndim < 2 or given.shape[0] < 2:
        raise TuningError(f"{name} must be a tensor (batch >= 2, *sample shape), got "
                          f"{tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__}")
    if shape is not None and tuple(given.shape[1:]) != tuple(shape):
        raise TuningError(f"{name} has sample shape {tuple(given.shape[1:])}, but the model takes {tuple(shape)}")
    return given.to(device)


class _GridSpace:
    """Grids as log-SNR gaps: softmax(u) splits [lambda_hi, lambda_lo] into the offset of the first free evaluation,
    the steps between evaluations and the gap before the jump to sigma = 0. VP: all n evaluations are free on
    [lambda(t_max), lambda(t_min)]. Flow: the first evaluation stays at pure noise (sigma = 1, its exact first
    step; lambda is -inf there) and the other n - 1 are free on [lambda(t_max - 1), lambda(t_min + 1)], one
    training timestep inside each end."""

    def __init__(self, scheduler: ExponentialIntegratorScheduler, n: int):
        schedule = scheduler.schedule
        self.schedule, self.n = schedule, n
        self.t_max, self.t_min = float(schedule.t_max), float(schedule.t_min)
        self.fixed = np.array([self.t_max]) if scheduler.is_flow else np.array([])
        inset = 1.0 if scheduler.is_flow else 0.0
        self.lam_hi = float(schedule.lambda_(torch.tensor(self.t_max - inset, dtype=torch.float64)))
        self.lam_lo = float(schedule.lambda_(torch.tensor(self.t_min + inset, dtype=torch.float64)))
        self.free = n - len(self.fixed)

    def timesteps(self, u: np.ndarray) -> np.ndarray:
        w = np.exp(u - u.max())
        frac = np.cumsum(w / w.sum())[: self.free]
        lam = self.lam_hi + (self.lam_lo - self.lam_hi) * frac
        ts = self.schedule.t_from_lambda(torch.from_numpy(lam)).numpy().astype(np.float64)
        return np.concatenate([self.fixed, np.minimum(ts, self.t_max)])

    def params(self, timesteps: np.ndarray) -> np.ndarray:
        free = np.asarray(timesteps, dtype=np.float64)[len(self.fixed):]
        lam = self.schedule.lambda_(torch.as_tensor(free)).numpy()
        frac = np.clip((lam - self.lam_hi) / (self.lam_lo - self.lam_hi), 0.0, 1.0)
        gaps = np.diff(np.concatenate([[0.0], frac, [1.0]]))
        return np.log(np.maximum(gaps, 1e-4))

    def valid(self, timesteps: np.ndarray) -> bool:
        return bool(len(timesteps) == self.n and np.all(np.isfinite(timesteps)) and np.all(np.diff(timesteps) < 0)
                    and timesteps[-1] > self.t_min)


def _start_grids(scheduler: ExponentialIntegratorScheduler, n: int) -> list[np.ndarray]:
    """The built-in grids scored before the search: `START_GRIDS` on a VP schedule, the flow grids on a flow one
    (the scheduler's own grid is scored separately)."""
    if scheduler.is_flow:
        grids = []
        for kind in FLOW_GRIDS:
            if kind == scheduler.config.timestep_schedule:
                continue
            other = type(scheduler).from_config(scheduler.config, timestep_schedule=kind, tuned_timesteps=None)
            other.set_timesteps(n)
            grids.append(other.host_timesteps.copy())
        return grids
    return [step_grid(scheduler.schedule, kind, n, lambda_min_clipped=scheduler.config.lambda_min_clipped,
                      ends_at_zero=kind == "logsnr_interior")[:-1] for kind in START_GRIDS]


def tune(
    model: Callable[..., Any],
    scheduler: ExponentialIntegratorScheduler,
    num_inference_steps: int,
    *,
    calibration_noise: torch.Tensor | None = None,
    holdout_noise: torch.Tensor | None = None,
    stats: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
    budget: int = DEFAULT_BUDGET,
    teacher_steps: int = 100,
    num_noises: int = 64,
    tail_weight: float = 0.0,
    progress: bool = True,
) -> TunedSchedule:
    """Tune ``scheduler``'s n-evaluation step grid for ``model`` (see the module docstring).

    ``model`` is a diffusers-style network (``model(x, t, **model_kwargs).sample``) or ``fn(x, t) -> tensor``; put
    classifier-free guidance inside it (e.g. ``guidance.CFG`` applied by a small wrapper) to tune a guided
    sampler. Noises default to ``num_noises`` calibration and as many hold-out noises from disjoint seeds (the
    shape is read from ``model.config``). ``stats`` (a `samplers.GaussianStats`) is only checked against the sample
    shape here: choose the teleport landing point with ``GaussianTeleport(skip="auto")`` on the tuned scheduler.
    ``tail_weight`` > 0 adds the mean of the worst 10 % of the errors to the objective (see docs/few-step.md for
    when it helps and when it makes tuning keep the untuned grid).
    """
    n = _check_nfe(num_inference_steps)
    scheduler = _check_scheduler(scheduler)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2 * teacher_steps + 8 * n:
        raise TuningError(f"budget must be an int >= 2 * teacher_steps + 8 * num_inference_steps = "
                          f"{2 * teacher_steps + 8 * n} batched model calls, got {budget!r}")
    device = model_device_dtype(model)[0]
    shape = _sample_shape(model)
    if isinstance(tail_weight, bool) or not isinstance(tail_weight, (int, float)) or not tail_weight >= 0:
        raise TuningError(f"tail_weight must be a number >= 0, got {tail_weight!r}")
    if isinstance(num_noises, bool) or not isinstance(num_noises, int) or num_noises < 2:
        raise TuningError(f"num_noises must be an int >= 2, got {num_noises!r}")
    calib = _noise(calibration_noise, CALIBRATION_SEEDS[:num_noises], shape, "calibration_noise", device)
    if shape is None:
        shape = tuple(calib.shape[1:])
    hold = _noise(holdout_noise, HOLDOUT_SEEDS[:num_noises], shape, "holdout_noise", device)
    if stats is not None:
        stats.check_shape(shape, "tune(stats=...)")
    base = type(scheduler).from_config(scheduler.config)
    space = _GridSpace(base, n)
    bar = tqdm(total=budget, desc=f"tuning {type(scheduler).__name__} at {n} steps", disable=not progress)
    fn = _CountedModel(model_fn_from_unet(model, **dict(model_kwargs or {})), bar)
    try:
        teacher = teacher_scheduler(base)
        ref_calib = _run(fn, teacher, calib, num_inference_steps=teacher_steps)
        ref_hold = _run(fn, teacher, hold, num_inference_steps=teacher_steps)

        seen: dict[bytes, ErrorSummary] = {}

        def score(timesteps: np.ndarray, noise: torch.Tensor, ref: torch.Tensor) -> ErrorSummary:
            summary = ErrorSummary.of(per_sample_error(_run(fn, base, noise, timesteps=timesteps), ref))
            if noise is calib:
                seen[np.asarray(timesteps).tobytes()] = summary
            return summary

        base.set_timesteps(n)
        default_grid = base.host_timesteps.copy()
        default_calib = score(default_grid, calib, ref_calib)
        best_grid, best = default_grid, default_calib
        for grid in _start_grids(base, n):
            if not space.valid(grid) or np.allclose(grid, default_grid):
                continue
            summary = score(grid, calib, ref_calib)
            if summary.score(tail_weight) < best.score(tail_weight):
                best_grid, best = grid, summary
        hold_back = 2 * n  # the hold-out check at the end
        max_runs = (budget - fn.calls - hold_back) // n

        def objective(u: np.ndarray) -> float:
            grid = space.timesteps(u)
            if not space.valid(grid):
                return math.inf
            return score(grid, calib, ref_calib).score(tail_weight)

        if max_runs > 0:
            u0 = space.params(best_grid)
            simplex = np.vstack([u0, u0 + 0.5 * np.eye(len(u0))])
            found = minimize(objective, u0, method="Nelder-Mead",
                             options={"maxfev": max_runs, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-7})
            candidate = space.timesteps(found.x)
            if candidate.tobytes() in seen and found.fun < best.score(tail_weight):
                best_grid, best = candidate, seen[candidate.tobytes()]
        tuned_hold = score(best_grid, hold, ref_hold)
        default_hold = score(default_grid, hold, ref_hold)
    finally:
        bar.close()
    improved = (tuned_hold.score(tail_weight) < (1 - ACCEPT_MARGIN) * default_hold.score(tail_weight)
                and tuned_hold.median <= default_hold.median and tuned_hold.p90 <= default_hold.p90
                and not np.array_equal(best_grid, default_grid))
    grid = best_grid if improved else default_grid
    if improved:
        message = (f"tuned grid: hold-out median {tuned_hold.median:.4g} / p90 {tuned_hold.p90:.4g} vs "
                   f"{default_hold.median:.4g} / {default_hold.p90:.4g} with the scheduler's own grid")
    else:
        what = "median + p90" + (f" + {tail_weight:g} x worst-10 % mean" if tail_weight else "")
        message = (f"kept the scheduler's own grid: the best calibration grid scored "
                   f"{tuned_hold.score(tail_weight):.4g} ({what}) on the hold-out noises vs "
                   f"{default_hold.score(tail_weight):.4g}")
    tuned = dict(scheduler.config.get("tuned_timesteps") or {})
    tuned[str(n)] = [float(t) for t in grid]
    return TunedSchedule(
        timesteps=[float(t) for t in grid], scheduler=type(scheduler).from_config(scheduler.config,
                                                                                  tuned_timesteps=tuned),
        num_inference_steps=n, improved=improved, calibration=best if improved else default_calib,
        holdout=tuned_hold if improved else default_hold, default_calibration=default_calib,
        default_holdout=default_hold, model_evaluations=fn.calls, message=message)
