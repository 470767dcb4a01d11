"""diffusers' scheduler options on the project's schedulers: each is honoured, mapped to its equivalent, or refused.

The project's constructors take every option diffusers' ``DPMSolverMultistepScheduler``,
``UniPCMultistepScheduler`` and ``DEISMultistepScheduler`` take (`DIFFUSERS_OPTIONS` adds those the project has
no option of its own for) and raise ``TypeError`` on any other keyword; ``from_config`` ignores unknown keys of a
foreign config, as diffusers does. `check_diffusers_options` turns the diffusers options into the project's:

* step grids: ``use_lu_lambdas`` and ``use_exponential_sigmas`` are both uniform in log sigma = -lambda, i.e. the
  project's ``logsnr`` grid; ``use_beta_sigmas`` is `beta_grid`; ``use_karras_sigmas`` the project's ``karras``
  grid; ``timestep_spacing`` (given explicitly) is one of the ``timestep_schedule`` values it shares with diffusers.
* ``variance_type``: a learned-variance model's extra channels are dropped before the step, as diffusers does.
* values other schedulers' configs carry (a UniPC ``solver_type`` in a DPM-Solver config, ...) are replaced by the
  defaults diffusers replaces them with (`FOREIGN_VALUES`).
* flow-matching options are `samplers.solvers.flow`'s (a VP schedule refuses them by name; the project's configs carry
  no ``use_flow_sigmas`` key, because FluxPipeline reads it); options without a counterpart here (``solver_p``,
  UniPC's ``sigma_min`` / ``sigma_max``) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .schedule import NoiseSchedule

#: diffusers options the project has no option of its own for; defaults as in diffusers
DIFFUSERS_OPTIONS: dict[str, Any] = {
    "timestep_spacing": None,
    "use_lu_lambdas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "variance_type": None,
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "shift_terminal": None,
    "solver_p": None,
    "sigma_min": None,
    "sigma_max": None,
}

#: diffusers' ``timestep_spacing`` values (each is also a ``timestep_schedule``)
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
#: ``variance_type`` values of diffusers' configs; "learned"/"learned_range" models output 2x channels, the
#: variance half is dropped; the DDPM "fixed_*" values describe DDPM's own sampler and do nothing here (as in
#: diffusers' multistep schedulers)
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large",
                  "fixed_large_log")
TIME_SHIFT_TYPES = ("exponential", "linear")
#: the sigma-grid flags and the grid each selects; at most one may be set (diffusers' rule)
SIGMA_GRID_FLAGS = {"use_karras_sigmas": "karras", "use_lu_lambdas": "logsnr", "use_exponential_sigmas": "logsnr",
                    "use_beta_sigmas": "beta"}
#: shape parameters of diffusers' beta sigma grid (Lee et al. 2024, "Beta Sampling is All You Need")
BETA_GRID_ALPHA = BETA_GRID_BETA = 0.6

#: option -> {value found in another scheduler's config: value diffusers replaces it with}, per scheduler family
FOREIGN_VALUES: dict[str, dict[str, dict[Any, Any]]] = {
    "dpmsolver++": {"algorithm_type": {"deis": "dpmsolver++"},
                    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}},
    "unipc": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
    "deis": {"algorithm_type": {k: "deis" for k in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")},
             "solver_type": {k: "logrho" for k in ("midpoint", "heun", "bh1", "bh2")}},
}

#: refused option values: option -> (value that is accepted, why and what to use instead)
_REFUSED = {
    "solver_p": (None, "UniC on another scheduler's predictor is not supported; use UniPCScheduler (UniP "
                       "predictor + UniC corrector)"),
    "sigma_min": (None, "a custom sigma range is not supported; the grid spans the beta schedule's range (use "
                        "set_timesteps(timesteps=...) for a custom grid)"),
    "sigma_max": (None, "a custom sigma range is not supported; the grid spans the beta schedule's range (use "
                        "set_timesteps(timesteps=...) for a custom grid)"),
}


def check_unknown_options(cls_name: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """TypeError naming the keywords a constructor does not take (diffusers' constructors raise it too)."""
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise TypeError(f"{cls_name} got unexpected keyword argument(s) {unknown}; its options are "
                        f"{sorted(known)} (from_config ignores unknown keys of a config)")


def map_foreign_values(scheduler: Any, family: str) -> None:
    """Replace values from other schedulers' configs as diffusers does (`FOREIGN_VALUES`), in the config."""
    for option, replacements in FOREIGN_VALUES.get(family, {}).items():
        value = scheduler.config.get(option)
        if isinstance(value, str) and value in replacements:
            scheduler.register_to_config(**{option: replacements[value]})


def check_diffusers_options(config: Mapping[str, Any], default_schedule: str) -> None:
    """ValueError naming any diffusers option value that cannot be honoured, and the alternative
    (``default_schedule``: the constructor's default ``timestep_schedule``)."""
    for option, (accepted, why) in _REFUSED.items():
        value = config.get(option, accepted)
        if value is not accepted and value != accepted:
            raise ValueError(f"{option}={value!r} cannot be honoured: {why}")
    if config.get("time_shift_type", "exponential") not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {config['time_shift_type']!r}")
    if config.get("variance_type") not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {config['variance_type']!r}")
    spacing = config.get("timestep_spacing")
    if spacing is not None:
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS} (or use timestep_schedule), got "
                             f"{spacing!r}")
        schedule = config.get("timestep_schedule", default_schedule)
        if schedule not in (default_schedule, spacing):
            raise ValueError(f"timestep_spacing={spacing!r} and timestep_schedule={schedule!r} ask for different "
                             f"grids: pass only timestep_schedule")
    flags = [name for name in SIGMA_GRID_FLAGS if config.get(name, False)]
    if len(flags) > 1:
        raise ValueError(f"only one of {list(SIGMA_GRID_FLAGS)} can be set, got {flags}")


def effective_grid(config: Mapping[str, Any]) -> str:
    """The step grid a config selects: a sigma-grid flag, else ``timestep_spacing``, else ``timestep_schedule``."""
    for name, grid in SIGMA_GRID_FLAGS.items():
        if config.get(name, False):
            return grid
    return config.get("timestep_spacing") or config["timestep_schedule"]


def foreign_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config handed to the project's ``from_config``. A config without ``timestep_schedule`` comes from another
    scheduler: its ``timestep_spacing`` (diffusers' grid, "linspace" or "leading" in most saved configs) is
    dropped, so the project's own grid default applies; pass ``timestep_schedule=`` to choose a grid."""
    config = dict(config)
    if "timestep_schedule" not in config:
        config.pop("timestep_spacing", None)
    return config


def beta_grid(schedule: NoiseSchedule, t_start: float, num_steps: int, ends_at_zero: bool) -> np.ndarray:
    """diffusers' ``use_beta_sigmas`` grid: VE sigmas sigma_min + ppf(1 - u) (sigma_max - sigma_min), ppf the
    quantile of Beta(0.6, 0.6), u uniform on [0, 1], as descending timesteps followed by the end point t_min
    (``num_steps`` evaluation points with ``ends_at_zero``, else ``num_steps + 1`` points ending at t_min)."""
    import scipy.stats

    m = num_steps if ends_at_zero else num_steps + 1
    lam_start, lam_end = float(schedule.lambda_(t_start)), float(schedule.lambda_(schedule.t_min))
    sigma_max, sigma_min = np.exp(-lam_start), np.exp(-lam_end)
    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, m), BETA_GRID_ALPHA, BETA_GRID_BETA)
    sigmas = sigma_min + ppf * (sigma_max - sigma_min)
    ts = schedule.t_from_lambda(torch.from_numpy(-np.log(sigmas))).numpy().astype(np.float64)
    ts[0] = t_start
    if m > 1:
        ts[-1] = schedule.t_min
    return np.append(ts, schedule.t_min) if ends_at_zero else ts
