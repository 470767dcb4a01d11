"""Time-Shift sampler: the network sees the training timestep whose noise level matches the state's variance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..solvers.prediction import from_data, to_data
from ..solvers.schedule import FlowMatchingSchedule, model_schedule
from .base import SchedulerWrapper, prev_sample

__all__ = ["SHIFT_MODES", "Shift", "TimeShift"]


SHIFT_MODES = ("input", "target", "all")


@dataclass
class Shift:
    """One step of `TimeShift`: the nominal timestep and the timestep(s) the network was called with (float64,
    on the sampling device: reading them is left to the caller, after the run)."""

    step: int
    nominal: float
    timesteps: torch.Tensor

    @property
    def offsets(self) -> torch.Tensor:
        """Shifted minus nominal timestep, per sample."""
        return self.timesteps - self.nominal


#: TimeShift's default cutoff as a fraction of ``num_train_timesteps`` (the paper's 300 of 1000)
DEFAULT_CUTOFF_FRACTION = 0.3


class TimeShift(SchedulerWrapper):
    """Time-shift sampler (Li et al. 2024, "Alleviating exposure bias ... with shifted time steps", Alg. 1-2).

    After each step the per-sample variance of the state over all pixels (VP scale) is compared with
    1 - alphabar(t) for the training timesteps t in a window around the next nominal timestep; the network is
    called at the closest one, t_s, while the wrapped solver's coefficients stay nominal. No shift at the first
    step, at or below ``cutoff`` (default 0.3 ``num_train_timesteps``: 300 for 1000), or with ``window=0``
    (identity).

    ``window`` is the full width in training timesteps (candidates t + k, |k| <= window // 2, as in the official
    TS-DPM DDIM / DPM-Solver code); paper settings: DDIM or DPM-Solver-2M at 5-10 steps window=30, cutoff=300.
    ``per_sample=True`` gives each sample its own t_s (the network receives a batch of timesteps; with CFG the
    shifts are tiled to the batch seen by ``scale_model_input``); ``False`` uses the batch-mean variance.
    The shifts are recorded in ``shift_history`` (a `Shift` per step).

    ``shift`` says what moves to t_s: ``"input"`` (default, the paper's text) only the network's timestep;
    ``"target"`` (the official DDIM/PNDM code) keeps the network at the nominal timestep and takes the step as
    if the state were at t_s; ``"all"`` (the official DPM-Solver code) both. "As if at t_s" is applied to any
    wrapped solver by re-expressing the state at the nominal level: x0, eps read from the output at (alpha_s,
    sigma_s), then x_in = alpha_t x0 + sigma_t eps, so a first-order step from t is the step from t_s and the
    solver's history holds the moved x0 (docs/fidelity.md, Time-Shift, has the measured comparison).
    """

    registry_name = "timeshift"

    saved_options = ("window", "cutoff", "per_sample", "shift")

    def __init__(self, scheduler: Any, window: int = 30, cutoff: float | None = None, per_sample: bool = True,
                 shift: str = "input"):
        if shift not in SHIFT_MODES:
            raise ValueError(f"shift must be one of {SHIFT_MODES}, got {shift!r}")
        self.shift = shift
        super().__init__(scheduler)
        self.schedule = model_schedule(scheduler, "TimeShift")[0]
        num_train = self.schedule.num_train_timesteps
        if cutoff is None:
            cutoff = DEFAULT_CUTOFF_FRACTION * num_train
        if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < num_train:
            raise ValueError(f"window must be an int in [0, {num_train - 1}] (full width of the search window in "
                             f"training timesteps), got {window!r}")
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 <= cutoff <= num_train:
            raise ValueError(f"cutoff must be a timestep in [0, {num_train}] (no shifting at or below it), "
                             f"got {cutoff!r}")
        self.window, self.cutoff, self.per_sample = window, float(cutoff), bool(per_sample)
        self._candidates: dict[float, int] = {}
        self._table: tuple[torch.Tensor, ...] | None = None
        self._table_key: tuple[bytes, torch.device] | None = None

    def _describe(self) -> str:
        return f"window={self.window}, cutoff={self.cutoff:g}, per_sample={self.per_sample}, shift={self.shift!r}"

    def _reset(self) -> None:
        super()._reset()
        self._state: torch.Tensor | None = None
        self._moved: tuple[torch.Tensor, torch.Tensor] | None = None
        self._model_batch: int | None = None
        self.shift_history: list[Shift] = []

    def _prepare(self, nominal: torch.Tensor) -> None:
        """Candidate timesteps t + k (|k| <= window // 2, clamped) and 1 - alphabar there for every nominal
        timestep, computed on the host and copied to the device once per grid (kept while the grid is the same,
        so a replayed or CUDA-graph-captured run copies nothing)."""
        if self.window == 0:
            return
        host = self.host_timesteps
        key = (host.tobytes(), nominal.device)
        if key != self._table_key:
            self._candidates = {float(t): row for row, t in enumerate(host)}
            self._table = tuple(v.to(device=nominal.device) for v in self._candidate_table(host))
            self._table_key = key

    def _candidate_table(self, host: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.window // 2
        cand = torch.from_numpy(host)[:, None] + torch.arange(-half, half + 1, dtype=torch.float64)
        cand = cand.clamp(self.schedule.t_min, self.schedule.t_max)
        alpha, sigma = self.schedule.alpha_sigma(cand)
        if isinstance(self.schedule, FlowMatchingSchedule):  # the VP-scaled state's noise fraction
            return cand, sigma**2 / (alpha**2 + sigma**2)
        return cand, 1.0 - alpha**2

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Records the batch the network sees (a CFG pipeline doubles it) for per-sample shifts."""
        self._model_batch = sample.shape[0]
        return super().scale_model_input(sample, timestep, *args, **kwargs)

    def _model_timestep(self, nominal: torch.Tensor, host: float | None) -> torch.Tensor:
        self._moved = None
        if self.window == 0 or self._state is None:
            return nominal
        host = float(nominal) if host is None else host
        if host <= self.cutoff:
            return nominal
        shifted = self._shift(nominal, host)
        return nominal if self.shift == "target" else shifted

    def _shift(self, nominal: torch.Tensor, host: float) -> torch.Tensor:
        """argmin over t in the window of |Var(x) - (1 - alphabar_t)| (TS-DPM's ``time_shift``), on the device."""
        x = self._state.to(torch.float64) * self._vp_factor(self.schedule, host)
        if isinstance(self.schedule, FlowMatchingSchedule):  # to VP scale: x / sqrt(alpha^2 + sigma^2)
            alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(host))
            x = x / (alpha**2 + sigma**2) ** 0.5
        var = x.reshape(x.shape[0], -1).var(dim=1)
        batch = self._model_batch or x.shape[0]
        per_sample = self.per_sample and batch % x.shape[0] == 0
        if not per_sample:
            var = var.mean(0, keepdim=True)
        row = self._candidates.get(host)
        if row is None or self._table is None:
            cand, one_minus_abar = (v[0].to(var.device) for v in self._candidate_table(np.array([host])))
        else:
            cand, one_minus_abar = (v[row].to(var.device) for v in self._table)
        pick = (var[:, None] - one_minus_abar[None, :]).abs().argmin(dim=1)
        if self.shift != "input":  # alpha_s, sigma_s per sample (VP), for `_move`
            var_s = one_minus_abar[pick].reshape(-1, *([1] * (x.ndim - 1)))
            self._moved = ((1.0 - var_s).sqrt(), var_s.sqrt())
        t_s = cand[pick]
        t_s = t_s.repeat(batch // x.shape[0]) if per_sample else t_s[0]
        return t_s.to(dtype=nominal.dtype)

    def _move(self, model_output: torch.Tensor, sample: torch.Tensor, host: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (output, state) pair at the nominal timestep that carries the x0 and eps read at t_s:
        x_in = alpha_t x0 + sigma_t eps, output re-expressed at (alpha_t, sigma_t) ("target" and "all")."""
        alpha_s, sigma_s = self._moved
        alpha_t, sigma_t = (float(v) for v in self.schedule.alpha_sigma(host))
        factor = self._vp_factor(self.schedule, host)
        pred = self.prediction_type
        x = sample.to(torch.float64) * factor
        x0 = to_data(model_output.to(torch.float64), x, alpha_s, sigma_s, pred)
        x_in = alpha_t * x0 + sigma_t * (x - alpha_s * x0) / sigma_s
        out = from_data(x0, x_in, alpha_t, sigma_t, pred)
        return out.to(model_output.dtype), (x_in / factor).to(sample.dtype)

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        discard = self.discards_next_output
        if not discard and self._yielded is not None and timestep is self._yielded[1]:
            used = torch.as_tensor(self._yielded[0]).to(torch.float64).reshape(-1)
            used = used[: sample.shape[0]].expand(sample.shape[0]).clone()
            self.shift_history.append(Shift(len(self.shift_history), self._host_value(timestep), used))
            if self._moved is not None:
                model_output, sample = self._move(model_output, sample, self._host_value(timestep))
        out = self._inner_step(model_output, timestep, sample, *args, **kwargs)
        if not discard:
            self._state = prev_sample(out)
        return out
