"""Step grids: which timesteps a sampler visits.

Every grid returns ``n + 1`` descending timesteps (float64): the ``n`` model-evaluation times followed by the
end point ``t_min``. With ``ends_at_zero`` (a scheduler with ``final_sigmas_type="zero"`` then replaces the end
point by sigma = 0) the continuous grids put their ``n`` evaluation points on [t_max, t_min] inclusive, so the
last step is the short denoising jump from sigma_min to 0 (as diffusers' Karras and Lu-lambda grids do);
otherwise ``n + 1`` points span [t_max, t_min] and the last step lands on t_min.

* ``linspace`` / ``leading`` / ``trailing`` reproduce diffusers' ``timestep_spacing`` of
  ``DPMSolverMultistepScheduler`` (integer timesteps).
* ``logsnr`` - uniform in lambda (the official DPM-Solver default, best at low resolution).
* ``logsnr_interior`` (the project default) - uniform in lambda, but with a final jump to sigma = 0 no
  evaluation is spent at t_min (the last step would then be a nearly free jump), nor at a pure-noise start where
  the model can only return the data mean (`interior_logsnr_timesteps`; see ``docs/few-step.md``). Without a
  jump to zero it equals ``logsnr``.
* ``time_uniform`` / ``time_quadratic`` - uniform in t or in sqrt(t) of the official code's continuous time.
* ``karras`` - Karras et al. (2022) eq. 5 with rho = 7 in the VE sigma = sigma_t / alpha_t.
"""

from __future__ import annotations

import numpy as np
import torch

from .schedule import DiscreteVPSchedule, NoiseSchedule

TIMESTEP_SCHEDULES = ("linspace", "leading", "trailing", "logsnr", "logsnr_interior", "time_uniform", "time_quadratic",
                      "karras")

#: the noisiest log-SNR the ``logsnr_interior`` grid spans: alpha / sigma = e^-5.1 is pure noise for any image
#: model, and below it a cosine schedule's last few timesteps would take half of a uniform-lambda grid (diffusers
#: recommends the same clip, ``lambda_min_clipped=-5.1``, for cosine schedules)
INTERIOR_LAMBDA_MIN = -5.1

#: a start at or below this log-SNR is pure noise (alpha / sigma <= 0.018): ``logsnr_interior`` spends no
#: evaluation there, since the model can only return the data mean
PURE_NOISE_LAMBDA = -4.0


def interior_logsnr_timesteps(schedule: NoiseSchedule, t_start: float, n: int) -> np.ndarray:
    """``n`` evaluation times spaced h apart in lambda on [lambda_a, lambda_b] = [max(lambda(t_start), -5.1),
    lambda(t_min)], none at lambda_b: the step after the last one is the jump to sigma = 0.

    From a pure-noise start (lambda_a <= `PURE_NOISE_LAMBDA`) the evaluations sit at lambda_a + k h, k = 1..n, with
    h = span / (n + 1) (the model can only return the data mean at lambda_a). Otherwise the first is at lambda_a and
    the last half a step below lambda_b, h = span / (n - 1/2): such schedules (scaled-linear, Stable Diffusion's)
    end at a larger sigma_min, and a shorter final jump measured 1.3-2x lower error on exact mixtures.
    """
    lam_a = max(float(schedule.lambda_(t_start)), INTERIOR_LAMBDA_MIN)
    lam_b = float(schedule.lambda_(schedule.t_min))
    skip = lam_a <= PURE_NOISE_LAMBDA
    h = (lam_b - lam_a) / (n + 1 if skip else n - 0.5)
    lam = lam_a + h * (torch.arange(n, dtype=torch.float64) + skip)
    ts = schedule.t_from_lambda(lam).numpy()
    ts[0] = min(ts[0], t_start)
    return ts


def last_timestep(schedule: NoiseSchedule, lambda_min_clipped: float = -float("inf")) -> float:
    """The noisiest timestep to start from, after diffusers' ``lambda_min_clipped`` (for cosine schedules)."""
    if not isinstance(schedule, DiscreteVPSchedule) or lambda_min_clipped == -float("inf"):
        return schedule.t_max
    n = schedule.num_train_timesteps
    lambdas = schedule.lambda_(torch.arange(n, dtype=torch.float64)).float()
    clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor(lambda_min_clipped, dtype=torch.float32)))
    return float(n - clipped - 1)


def step_grid(
    schedule: NoiseSchedule,
    kind: str,
    num_steps: int,
    *,
    lambda_min_clipped: float = -float("inf"),
    steps_offset: int = 0,
    karras_rho: float = 7.0,
    ends_at_zero: bool = True,
) -> np.ndarray:
    """``num_steps + 1`` descending timesteps: evaluation times, then the end point ``schedule.t_min``."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    t_start, t_end = last_timestep(schedule, lambda_min_clipped), schedule.t_min
    n = int(num_steps)
    m = n if ends_at_zero else n + 1  # points of a continuous grid on [t_start, t_end]
    if kind in ("linspace", "leading", "trailing"):
        if not isinstance(schedule, DiscreteVPSchedule):
            raise ValueError(f"timestep_schedule={kind!r} needs a discrete-time schedule; use 'logsnr' or 'karras'")
        last = int(t_start) + 1
        if kind == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif kind == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
        else:
            ts = np.arange(last, 0, -schedule.num_train_timesteps / n).round() - 1
        return np.append(ts.astype(np.float64), t_end)
    if kind == "logsnr_interior" and ends_at_zero:
        return np.append(interior_logsnr_timesteps(schedule, t_start, n), t_end)
    if kind in ("logsnr", "logsnr_interior"):
        lam = torch.linspace(float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)), m,
                             dtype=torch.float64)
        ts = schedule.t_from_lambda(lam).numpy()
    elif kind == "karras":
        lam_start, lam_end = float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end))
        ramp = np.linspace(0, 1, m)
        inv_max, inv_min = np.exp(-lam_start / karras_rho), np.exp(-lam_end / karras_rho)
        sigmas = (inv_max + ramp * (inv_min - inv_max)) ** karras_rho
        ts = schedule.t_from_lambda(torch.from_numpy(-np.log(sigmas))).numpy()
    elif kind in ("time_uniform", "time_quadratic"):
        origin, scale = schedule.time_origin, schedule.time_scale
        c_start, c_end = (t_start - origin) / scale, (t_end - origin) / scale
        if kind == "time_uniform":
            cont = np.linspace(c_start, c_end, m)
        else:
            cont = np.linspace(np.sqrt(c_start), np.sqrt(c_end), m) ** 2
        ts = cont * scale + origin
    else:
        raise ValueError(f"timestep_schedule must be one of {TIMESTEP_SCHEDULES}, got {kind!r}")
    ts = np.asarray(ts, dtype=np.float64)
    ts[0] = t_start
    if m > 1:
        ts[-1] = t_end
    return np.append(ts, t_end) if ends_at_zero else ts
