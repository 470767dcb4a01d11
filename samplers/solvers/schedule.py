"""Noise schedules: x_t = alpha_t x0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t).

Three forms share one interface (`log_alpha`, `alpha_sigma`, `lambda_`, `t_from_lambda`):

* `DiscreteVPSchedule` - a diffusers beta table (DDPM-style models). ``log alpha`` is interpolated piecewise
  linearly in the timestep index, exactly as the official DPM-Solver code's ``NoiseScheduleVP('discrete')``
  does, so integer timesteps reproduce ``alphas_cumprod`` and fractional ones are well defined.
* `ContinuousVPSchedule` - the score-SDE linear VP SDE, t in [t_min, 1].
* `VESchedule` - EDM / VE form, alpha = 1 and sigma = t.

All tables and arithmetic are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine alpha-bar (Nichol & Dhariwal 2021), built like diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The float32 beta table a diffusers scheduler config describes (same arithmetic as diffusers)."""
    n = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(np.asarray(trained), dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {schedule!r}")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation on an increasing grid ``xp`` (device-side, clamps at the ends)."""
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1) - 1
    x0, x1, f0, f1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 * (1 - w) + f1 * w


class NoiseSchedule:
    """Interface of a noise schedule; subclasses define `log_alpha` and `t_from_lambda`."""

    t_min: float
    t_max: float
    #: timestep units used by the time grids' "time" coordinate: t_cont = (t - time_origin) / time_scale
    time_origin: float = 0.0
    time_scale: float = 1.0

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t at timesteps ``t`` (float64); each subclass defines it."""
        raise NotImplementedError

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t = 1/2 log(1 - alpha_t^2) (VP: alpha^2 + sigma^2 = 1), via expm1 so it stays accurate as
        alpha_t -> 1."""
        la = self.log_alpha(t)
        return 0.5 * torch.log(-torch.expm1(2 * la))

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64 at timesteps ``t`` (tensor or float)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.log_alpha(t).exp(), self.log_sigma(t).exp()

    def lambda_(self, t: torch.Tensor | float) -> torch.Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, DPM-Solver Sec. 3.1), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.log_alpha(t) - self.log_sigma(t)

    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `lambda_`: the timestep t with lambda_t = ``lam`` (float64); each subclass defines it."""
        raise NotImplementedError

    @staticmethod
    def log_alpha_from_lambda(lam: torch.Tensor) -> torch.Tensor:
        """VP identity alpha^2 = sigmoid(2 lambda)."""
        return -0.5 * torch.nn.functional.softplus(-2 * lam)


class DiscreteVPSchedule(NoiseSchedule):
    """VP schedule of a diffusers beta table; timesteps are (fractional) indices into ``alphas_cumprod``."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if acp.ndim != 1 or len(acp) < 2:
            raise ValueError("alphas_cumprod must be a 1-D table with at least 2 entries")
        if not bool(((acp > 0) & (acp < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        self.alphas_cumprod = acp
        self.num_train_timesteps = len(acp)
        self.t_min, self.t_max = 0.0, float(len(acp) - 1)
        self.time_origin, self.time_scale = -1.0, float(len(acp))
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiscreteVPSchedule:
        """From a diffusers scheduler config (beta table by `betas_from_config`); a zero-terminal-SNR table gets its
        last ``alphas_cumprod`` set to 2**-24, as diffusers does."""
        acp = torch.cumprod(1.0 - betas_from_config(config), dim=0)
        if config.get("rescale_betas_zero_snr", False):
            acp[-1] = 2**-24
        return cls(acp)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            t = torch.arange(self.num_train_timesteps, dtype=torch.float64, device=device)
            log_alpha = 0.5 * torch.log(self.alphas_cumprod.to(device))
            self._tables[device] = (t, log_alpha, log_alpha.flip(0))
        return self._tables[device]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = 1/2 log alphas_cumprod[t], linear in t between integer indices and clamped to
        [0, N - 1] (the official DPM-Solver's discrete ``NoiseScheduleVP.marginal_log_mean_coeff``)."""
        ts, la, _ = self._table(t.device)
        return _interp(t.to(torch.float64), ts, la)

    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `lambda_`: log alpha from the VP identity alpha^2 = sigmoid(2 lambda), then the piecewise-linear
        log-alpha table read backwards (the official DPM-Solver's discrete ``inverse_lambda``)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        ts, _, la_flipped = self._table(lam.device)
        return _interp(self.log_alpha_from_lambda(lam), la_flipped, ts.flip(0))


class ContinuousVPSchedule(NoiseSchedule):
    """Score-SDE linear VP: log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, t in [t_min, 1]."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min, self.beta_max = beta_min, beta_max
        self.t_min, self.t_max = t_min, 1.0

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (Song et al. 2021, linear VP SDE)."""
        t = t.to(torch.float64)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `lambda_` in closed form, the positive root of log alpha_t = -1/2 log(1 + e^(-2 lam)):
        t = L / (sqrt(beta_min^2 + L) + beta_min) / (beta_max - beta_min), L = 2 (beta_max - beta_min)
        log(1 + e^(-2 lam)) (cancellation-free form of the official DPM-Solver's ``inverse_lambda``)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        tmp = 2.0 * (self.beta_max - self.beta_min) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_min**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)


class VESchedule(NoiseSchedule):
    """EDM / VE form: alpha = 1, sigma = t, lambda = -log t."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max = sigma_min, sigma_max

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = 0 (alpha = 1)."""
        return torch.zeros_like(t, dtype=torch.float64)

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t = log t (sigma = t)."""
        return torch.log(t.to(torch.float64))

    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `lambda_`: t = sigma = exp(-lam)."""
        return torch.exp(-torch.as_tensor(lam, dtype=torch.float64))


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, alpha = 1 - sigma, sigma = t / num_train_timesteps.

    Timesteps follow diffusers' flow convention (t = sigma * N, floats, t in [0, N]); lambda = log((1 - sigma) /
    sigma) is -inf at pure noise (t = N) and +inf at the data (t = 0)."""

    def __init__(self, num_train_timesteps: int = 1000):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.t_min, self.t_max = 0.0, float(num_train_timesteps)
        self.time_origin, self.time_scale = 0.0, float(num_train_timesteps)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma = t / N (float64)."""
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t = log(1 - t / N) (log1p, accurate near the data)."""
        return torch.log1p(-self.sigma(t))

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t = log(t / N)."""
        return torch.log(self.sigma(t))

    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of `lambda_`: sigma = sigmoid(-lambda), t = N sigma."""
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64)) * self.num_train_timesteps


def noise_schedule_of(scheduler: Any) -> NoiseSchedule | None:
    """The `NoiseSchedule` a project scheduler keeps as ``.schedule``, looked up through wrappers (``.inner``)
    whose own ``schedule`` is something else (`DualFast`'s coefficient schedule); None for other schedulers."""
    while scheduler is not None:
        schedule = getattr(scheduler, "schedule", None)
        if isinstance(schedule, NoiseSchedule):
            return schedule
        scheduler = getattr(scheduler, "inner", None)
    return None


def model_schedule(scheduler: Any, who: str = "this wrapper") -> tuple[NoiseSchedule, str]:
    """The noise schedule and model parameterisation a scheduler samples with: the project's flow schedule, a
    rectified flow with velocity output for diffusers' ``FlowMatch*`` schedulers (their config has ``shift``), else
    `vp_schedule` with the config's ``prediction_type``."""
    config = scheduler.config
    schedule = noise_schedule_of(scheduler)
    if isinstance(schedule, FlowMatchingSchedule):
        return schedule, config.prediction_type
    if "shift" in config:
        return FlowMatchingSchedule(config.get("num_train_timesteps", 1000)), "flow_prediction"
    if config.get("use_flow_sigmas", False):
        raise ValueError(f"{who} does not support diffusers' multistep schedulers with use_flow_sigmas (their integer "
                         "timesteps do not give the sigmas they step with); use the project's scheduler built with "
                         "from_config of the same config")
    return vp_schedule(scheduler, who), config.get("prediction_type", "epsilon")


def vp_schedule(scheduler: Any, wrapper: str = "this wrapper") -> DiscreteVPSchedule:
    """The float64 VP schedule of any diffusers-style scheduler: the project's ``.schedule``, else one built from
    diffusers' ``alphas_cumprod`` (zero-SNR tables clamped at 2**-24 as diffusers does)."""
    schedule = noise_schedule_of(scheduler)
    if isinstance(schedule, DiscreteVPSchedule):
        return schedule
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise TypeError(f"{wrapper} needs a discrete-time VP scheduler with an alphas_cumprod table (DDIM, DDPM, "
                        f"DPM-Solver, UniPC, DEIS, Euler, ours); {type(scheduler).__name__} has none")
    acp = torch.as_tensor(acp, dtype=torch.float64).cpu().clamp(min=2.0**-24)
    return DiscreteVPSchedule(acp)
