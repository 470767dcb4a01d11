"""Flow-matching (rectified-flow) step grids and the translation of diffusers' flow scheduler configs.

A project scheduler with ``noise_schedule="flow"`` integrates x_sigma = (1 - sigma) x0 + sigma eps (see
`samplers.solvers.schedule.FlowMatchingSchedule`) with a velocity model (``prediction_type="flow_prediction"``). Its
evaluation sigmas are built like diffusers' flow schedulers build theirs:

* base grid: ``"logsnr_interior"`` (the project default) - pure noise, then ``n - 1`` points uniform in log-SNR from the
  shifted 1 - 1 / n towards the last sigma of the ``"flow_match"`` grid below (same shift and end point, with the
  interior spread evenly in lambda, where the solvers' polynomials live; at most `MAX_INTERIOR_STEP` apart, so with
  few steps the grid stops short of that end); ``"flow_match"`` -
  `FlowMatchEulerDiscreteScheduler`'s, linspace(1, sigma_min, n) with sigma_min its
  (statically shifted) smallest training sigma; ``"linspace"`` - the flow grid of diffusers' multistep schedulers
  (`UniPCMultistepScheduler`), linspace(1, 1 / N, n + 1) without its last point; or the ``sigmas`` a pipeline passes;
* shift: static s sigma / (1 + (s - 1) sigma) (``flow_shift``) or, with ``use_dynamic_shifting``, the pipeline's
  ``mu``: e^mu / (e^mu + 1 / sigma - 1) (``time_shift_type="exponential"``) or mu / (mu + 1 / sigma - 1) (``"linear"``);
* ``shift_terminal``: 1 - (1 - sigma) / ((1 - sigma_last) / (1 - terminal)), so the last sigma equals it;
* ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` (``"flow_match"`` grid only): Karras'
  rho = 7 ramp, a geometric ramp, or Beta(0.6, 0.6) quantiles between the first and the last sigma.

The sampler then steps from the first sigma (exactly 1: pure noise) to sigma = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: flow options of every project scheduler (diffusers' names and defaults); used only with noise_schedule="flow"
FLOW_OPTIONS: dict[str, Any] = {
    "noise_schedule": "vp",
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift_terminal": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_flow_sigmas": False,
}
NOISE_SCHEDULES = ("vp", "flow")
#: the longest step in log-SNR between the evaluations of the default flow grid (``"logsnr_interior"``; why and how it
#: was chosen: docs/flow-matching.md)
MAX_INTERIOR_STEP = 1.25
FLOW_GRIDS = ("logsnr_interior", "flow_match", "linspace")
TIME_SHIFT_TYPES = ("exponential", "linear")
#: options diffusers' FlowMatchEulerDiscreteScheduler has and the project refuses (no equivalent)
_REFUSED = {
    "invert_sigmas": "inverted sigmas (Mochi) are not supported",
    "stochastic_sampling": "stochastic flow sampling is not supported; use algorithm_type='sde-dpmsolver++'",
}
#: options that only mean something with noise_schedule="flow"
_FLOW_ONLY = ("use_dynamic_shifting", "shift_terminal", "use_flow_sigmas")


def static_shift(sigma: np.ndarray, shift: float) -> np.ndarray:
    """SD3's shift: s sigma / (1 + (s - 1) sigma)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def dynamic_shift(sigma: np.ndarray, mu: float, kind: str) -> np.ndarray:
    """Flux's resolution-dependent shift: e^mu / (e^mu + 1 / sigma - 1) (exponential) or mu / (mu + 1 / sigma - 1)."""
    m = math.exp(mu) if kind == "exponential" else mu
    with np.errstate(divide="ignore"):
        return m / (m + (1.0 / sigma - 1.0))


def stretch_to_terminal(sigma: np.ndarray, terminal: float) -> np.ndarray:
    """LTX-Video's stretch: 1 - (1 - sigma) / ((1 - sigma_last) / (1 - terminal))."""
    one_minus = 1.0 - sigma
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def _ramp(sigma: np.ndarray, kind: str) -> np.ndarray:
    """Karras / exponential / beta ramp between sigma[0] and sigma[-1] (diffusers' ``_convert_to_*``)."""
    hi, lo, n = float(sigma[0]), float(sigma[-1]), len(sigma)
    if kind == "karras":
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    import scipy.stats

    return lo + scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)


def flow_sigmas(config: Mapping[str, Any], kind: str, num_steps: int | None, sigmas: Sequence[float] | None,
                mu: float | None) -> np.ndarray:
    """The ``n`` descending evaluation sigmas (float64) of a flow config: base grid (``kind`` or ``sigmas``),
    then shift, terminal stretch and ramp as diffusers applies them (module docstring)."""
    n_train = int(config["num_train_timesteps"])
    dynamic = bool(config["use_dynamic_shifting"])
    if dynamic and mu is None:
        raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True (the pipeline computes "
                         "it from the image sequence length)")
    if mu is not None and not dynamic:
        raise ValueError(f"mu={mu!r} was passed to set_timesteps but use_dynamic_shifting=False; set "
                         "use_dynamic_shifting=True or drop mu")
    if sigmas is not None:
        base = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if num_steps is not None and len(base) != num_steps:
            raise ValueError(f"sigmas has {len(base)} entries but num_inference_steps={num_steps}")
    elif kind in ("logsnr_interior", "flow_match"):
        # FlowMatchEulerDiscreteScheduler: linspace between its largest and smallest training sigma
        train_min = 1.0 / n_train if dynamic else float(static_shift(np.float64(1.0 / n_train), config["flow_shift"]))
        base = np.linspace(1.0, train_min, num_steps)
        if kind == "logsnr_interior" and num_steps > 2:
            base[1] = 1.0 - 1.0 / num_steps
            return _logsnr_interior(flow_sigmas(config, "flow_match", None, base, mu))
    else:
        base = np.linspace(1.0, 1.0 / n_train, num_steps + 1)[:-1]
    if len(base) < 1 or not np.all(np.isfinite(base)) or base.min() <= 0 or base.max() > 1:
        raise ValueError(f"flow sigmas must lie in (0, 1], got {base.tolist()}")
    if dynamic:
        out = dynamic_shift(base, mu, config["time_shift_type"])
    else:
        out = static_shift(base, float(config["flow_shift"]))
    if config["shift_terminal"]:
        out = stretch_to_terminal(out, float(config["shift_terminal"]))
    ramp = _ramp_kind(config)
    if ramp is not None:
        out = _ramp(out, ramp)
    if len(out) > 1 and not np.all(np.diff(out) < 0):
        raise ValueError(f"flow sigmas must be strictly decreasing, got {out.tolist()}")
    return out


def _logsnr_interior(sigma: np.ndarray) -> np.ndarray:
    """Keep sigma[0] (pure noise) and put the other n - 1 points h apart in lambda = log((1 - sigma) / sigma) from
    sigma[1], the last one a full step h before sigma[-1] (the stock grid's last sigma): as on the VP
    ``logsnr_interior`` grid, no evaluation is spent next to the data where the jump to sigma = 0 is nearly free.
    h is at most `MAX_INTERIOR_STEP`: with few steps (n <= 7 at SD3's shift 3 or Flux's mu) the grid then stops short
    of sigma[-1] and the final jump to sigma = 0 is longer, so that the steps out of pure noise, where a sample's
    mode is decided, stay short (measurements: docs/flow-matching.md)."""
    lam_a, lam_b = math.log((1 - sigma[1]) / sigma[1]), math.log((1 - sigma[-1]) / sigma[-1])
    h = min((lam_b - lam_a) / (len(sigma) - 1), MAX_INTERIOR_STEP)
    lam = lam_a + h * np.arange(len(sigma) - 1)
    return np.append(sigma[0], 1.0 / (1.0 + np.exp(lam)))


def _ramp_kind(config: Mapping[str, Any]) -> str | None:
    flags = {"karras": config["use_karras_sigmas"], "exponential": config["use_exponential_sigmas"],
             "beta": config["use_beta_sigmas"]}
    on = [k for k, v in flags.items() if v]
    return on[0] if on else None


def check_flow_config(config: Mapping[str, Any]) -> None:
    """ValueError naming the first option a flow (or VP) config sets that the project cannot honour."""
    schedule, timestep_schedule = config["noise_schedule"], config["timestep_schedule"]
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
    on = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config[k]]
    if schedule == "vp":
        if config["prediction_type"] == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs a flow-matching schedule: pass "
                             "noise_schedule='flow' (diffusers: use_flow_sigmas=True), not a VP beta schedule")
        bad = [k for k in _FLOW_ONLY if config[k]] + [k for k in _REFUSED if config[k]]
        bad += ["flow_shift"] if config["flow_shift"] != 1.0 else []
        bad += ["timestep_schedule"] if timestep_schedule == "flow_match" else []
        if bad:
            raise ValueError(f"{bad[0]}={config[bad[0]]!r} needs noise_schedule='flow'")
        return
    for key, why in _REFUSED.items():
        if config[key]:
            raise ValueError(f"{key}=True: {why}")
    if config["prediction_type"] not in ("flow_prediction", "sample"):
        raise ValueError(f"noise_schedule='flow' needs prediction_type='flow_prediction' (or 'sample'), got "
                         f"{config['prediction_type']!r}")
    if timestep_schedule not in FLOW_GRIDS:
        raise ValueError(f"timestep_schedule must be one of {FLOW_GRIDS} with noise_schedule='flow', got "
                         f"{timestep_schedule!r}")
    if config["final_sigmas_type"] != "zero":
        raise ValueError(f"final_sigmas_type must be 'zero' with noise_schedule='flow' (the flow ends at sigma = 0), "
                         f"got {config['final_sigmas_type']!r}")
    if len(on) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set, got {on}")
    if on and timestep_schedule != "flow_match":
        raise ValueError(f"{on[0]}=True needs timestep_schedule='flow_match' with noise_schedule='flow'")
    if config["time_shift_type"] not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {config['time_shift_type']!r}")
    shift = config["flow_shift"]
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"flow_shift must be a positive number, got {shift!r}")
    terminal = config["shift_terminal"]
    if terminal is not None and not 0 <= terminal < 1:
        raise ValueError(f"shift_terminal must be in [0, 1), got {terminal!r}")


def translate_flow_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers flow scheduler config in the project's terms: `FlowMatch*` configs (recognised by their class name
    or their ``shift`` key, which no other scheduler has; ``shift`` -> ``flow_shift``)
    and multistep configs with ``use_flow_sigmas=True`` (kept: `FluxPipeline` then passes ``mu`` without its own
    ``sigmas``, as it does for diffusers' multistep schedulers) get ``noise_schedule="flow"`` (FlowMatch: and
    ``prediction_type="flow_prediction"``) on the project's ``"logsnr_interior"`` flow grid (``"flow_match"`` when a
    Karras / exponential / beta ramp is set); any other config is returned unchanged."""
    config = dict(config)
    if str(config.get("_class_name", "")).startswith("FlowMatch") or "shift" in config:
        config.update(noise_schedule="flow", prediction_type="flow_prediction", flow_shift=config.pop("shift", 1.0))
    elif config.get("use_flow_sigmas", False):
        config.update(noise_schedule="flow")
    else:
        return config
    if _ramp_kind({k: config.get(k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                     "use_beta_sigmas")}):
        config["timestep_schedule"] = "flow_match"  # the ramps are defined on diffusers' own grid
    return config
