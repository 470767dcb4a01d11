"""`DEISScheduler`: DEIS (Zhang & Chen 2022) - log-rho AB (diffusers' variant), tAB, rhoAB, rhoRK and iPNDM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from . import deis
from .schedule import DiscreteVPSchedule
from .scheduler_base import ExponentialIntegratorScheduler, lincomb, multistep_orders

#: diffusers' DEISMultistepScheduler maps these values (from DPM-Solver / UniPC configs) to its own defaults
FOREIGN_ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2")
MAX_ORDER = {"logrho": 3, "tab": 4, "rhoab": 4, "ipndm": 4, "rhork": 4}


@dataclass(frozen=True)
class _Eval:
    """One model evaluation: out = a * anchor + sum_j b[j] * eps_j (history newest first)."""

    a: float
    b: np.ndarray
    keep: int
    new_anchor: bool


class DEISScheduler(ExponentialIntegratorScheduler):
    """DEIS (Zhang & Chen 2022, arXiv 2204.13902) on eps predictions; see `samplers.solvers.deis` for the formulas.

    Options beyond the common ones (diffusers' names where ``DEISMultistepScheduler`` has them):

    * ``solver_type``: ``"logrho"`` (default; diffusers' variant, Lagrange in log rho, ``solver_order`` 1-3),
      ``"tab"`` (Lagrange in t, Gauss-Legendre coefficients), ``"rhoab"`` (Lagrange in rho), ``"ipndm"``
      (fixed AB weights) - all multistep with ``solver_order`` 1-4 points (paper tAB-r = ``solver_order`` r+1,
      official iPNDM = 4) - or ``"rhork"`` (Runge-Kutta in rho, one model call per stage).
    * ``rk_method``: ``"1euler"``, ``"2heun"``, ``"3kutta"``, ``"4rk"`` for ``rhork``; ``None`` picks the
      method of order ``solver_order``. Stage evaluations are extra entries of ``timesteps`` (NFE = stages x steps,
      except that a final jump to sigma = 0 is one DDIM call).
    * ``lower_order_final`` (diffusers' rule: below 15 steps the last two steps use 1 and 2 points) applies to
      every multistep variant; the official DEIS code does not lower the final order (pass False to match it).
    * ``final_step_order`` (multistep variants): points of the jump to sigma = 0, rhoAB through the last
      evaluations whatever the variant (`samplers.solvers.final_step`); 1 is DDIM's x_0 = D; None (default) means 3 for
      the multistep variants of order 2 and up, 1 for ``rhork`` and order 1 (`default_final_step_points`).
    * The step grid is ``timestep_schedule`` (default ``"logsnr_interior"``, uniform in log rho without an
      evaluation at t_min; ``"logsnr"`` includes it); the official DEIS default is quadratic in time
      (``"time_quadratic"`` is close but not verified to be the same grid: docs/fidelity.md), and ``"karras"`` is
      its rho-power grid (power 7). ``"linspace"`` with
      ``final_sigmas_type="sigma_min"`` reproduces diffusers' ``DEISMultistepScheduler`` grid.

    ``algorithm_type`` accepts only ``"deis"``; like diffusers, the DPM-Solver algorithm types and the
    DPM-Solver / UniPC solver types found in other schedulers' configs are replaced by ``"deis"`` / ``"logrho"``.
    """

    registry_name = "deis"

    solver_options = {"algorithm_type": "deis", "solver_type": "logrho", "rk_method": None, "final_step_order": None}
    solver_orders = (1, 2, 3, 4)
    history_kind = "noise"

    @property
    def default_final_step_points(self) -> int:
        """3 for the multistep variants (the rhoAB step to sigma = 0 through the last three evaluations: on exact
        mixtures it removes the O(sigma_min^2) floor that made DEIS lose to diffusers' DEIS, which lands on
        sigma_min), 1 (DDIM) for ``rhork`` and for first-order DEIS (which is DDIM throughout)."""
        return 1 if self.config.solver_type == "rhork" or self.config.solver_order == 1 else 3

    def _check_options(self) -> None:
        cfg = self.config
        if cfg.algorithm_type in FOREIGN_ALGORITHM_TYPES:
            self.register_to_config(algorithm_type="deis")
        elif cfg.algorithm_type != "deis":
            raise ValueError(f"algorithm_type must be 'deis' for DEISScheduler, got {cfg.algorithm_type!r}")
        if cfg.solver_type in FOREIGN_SOLVER_TYPES:
            self.register_to_config(solver_type="logrho")
        elif cfg.solver_type not in deis.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {deis.SOLVER_TYPES}, got {cfg.solver_type!r}")
        cfg = self.config
        if cfg.solver_order > MAX_ORDER[cfg.solver_type]:
            raise ValueError(f"solver_order must be at most {MAX_ORDER[cfg.solver_type]} for "
                             f"solver_type={cfg.solver_type!r}, got {cfg.solver_order}")
        if cfg.rk_method is not None and cfg.rk_method not in deis.RK_TABLEAUS:
            raise ValueError(f"rk_method must be one of {tuple(deis.RK_TABLEAUS)} or None, got {cfg.rk_method!r}")
        if cfg.solver_type == "rhork" and cfg.noise_schedule == "flow":
            raise ValueError("solver_type='rhork' is not available with noise_schedule='flow' (its stages from pure "
                             "noise, rho = inf, are undefined); use a multistep solver_type")
        if cfg.solver_type == "rhork" and (cfg.final_step_order or 1) > 1:
            raise ValueError(f"final_step_order > 1 needs a multistep solver_type, got solver_type='rhork' "
                             f"(final_step_order={cfg.final_step_order})")
        self.order = self._tableau().stages if cfg.solver_type == "rhork" else 1

    plan_attributes = (*ExponentialIntegratorScheduler.plan_attributes, "_rho", "_eval_t", "_alpha_e", "_sigma_e")

    def _tableau(self) -> deis.ButcherTableau:
        return deis.RK_TABLEAUS[self.config.rk_method or deis.RK_BY_ORDER[self.config.solver_order]]

    # ------------------------------------------------------------------ plan
    def _build_plan(self) -> list[_Eval]:
        with np.errstate(divide="ignore"):  # rho = inf at pure noise (flow), used only by its exact first step
            self._rho = self.grid_sigma / self.grid_alpha
        self._eval_t, self._alpha_e, self._sigma_e = self.grid_timesteps[:-1], self.grid_alpha, self.grid_sigma
        return self._rk_plan() if self.config.solver_type == "rhork" else self._multistep_plan()

    def _interpolation(self) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, np.ndarray | None]:
        """The coordinate eps is interpolated in, as a function of u = log rho; its values at the grid points;
        the values of u where it has kinks."""
        kind = self.config.solver_type
        if kind == "logrho":
            return (lambda u: u), -self.grid_lambda, None
        if kind == "rhoab":
            return np.exp, self._rho, None
        schedule = self.schedule

        def model_time(u: np.ndarray) -> np.ndarray:
            return schedule.t_from_lambda(torch.from_numpy(-u)).numpy()

        return model_time, self.grid_timesteps, self._knots

    @cached_property
    def _knots(self) -> np.ndarray | None:
        """log rho at the integer timesteps, where the piecewise-linear log-alpha schedule has kinks (a flow
        schedule has none)."""
        if not isinstance(self.schedule, DiscreteVPSchedule):
            return None
        return -self.schedule.lambda_(torch.arange(self.schedule.num_train_timesteps, dtype=torch.float64)).numpy()

    def _multistep_plan(self) -> list[_Eval]:
        cfg, rho, alpha = self.config, self._rho, self.grid_alpha
        orders = self._limit_orders(multistep_orders(self.num_inference_steps, cfg.solver_order,
                                                     self._lower_order_final, cfg.final_sigmas_type == "zero",
                                                     self._starts_at_noise))
        if cfg.solver_type != "ipndm":
            coord, nodes, knots = self._interpolation()
        self._final = self._final_step_plan()
        plan = []
        for i, k in enumerate(orders):
            if i == 0 and self._starts_at_noise:  # from pure noise: the history holds the data prediction
                plan.append(_Eval(self.grid_sigma[1], np.array([alpha[1]]), self._history_size, True))
                continue
            if cfg.solver_type == "ipndm":
                c = deis.ipndm_coefficients(rho[i], rho[i + 1], k)
            else:
                c = deis.ei_ab_coefficients(rho[i], rho[i + 1], nodes[i::-1][:k], coord, knots)
            plan.append(_Eval(alpha[i + 1] / alpha[i], alpha[i + 1] * c, self._history_size, True))
        return plan

    def _rk_plan(self) -> list[_Eval]:
        rho, alpha, t = self._rho, self.grid_alpha, self.grid_timesteps
        n, zero_end = self.num_inference_steps, self.config.final_sigmas_type == "zero"
        tableaus = [self._tableau()] * (n - 1) + [deis.RK_TABLEAUS["1euler"] if zero_end else self._tableau()]
        c = np.concatenate([tab.c for tab in tableaus])
        step = np.repeat(np.arange(n), [tab.stages for tab in tableaus])
        stage_rho = np.concatenate([deis.rk_stage_rhos(tab, rho[i], rho[i + 1]) for i, tab in enumerate(tableaus)])
        times = self.schedule.t_from_lambda(torch.from_numpy(-np.log(stage_rho))).numpy()
        times[c == 0.0], times[c == 1.0] = t[step[c == 0.0]], t[step[c == 1.0] + 1]
        self._eval_t = times
        self._alpha_e, self._sigma_e = (v.numpy() for v in self.schedule.alpha_sigma(torch.from_numpy(times)))
        plan, first = [], 0
        for i, tab in enumerate(tableaus):
            targets = [*self._alpha_e[first + 1 : first + tab.stages], alpha[i + 1]]
            for k, (b, a_next) in enumerate(zip(deis.rk_stage_coefficients(tab, rho[i], rho[i + 1]), targets)):
                plan.append(_Eval(a_next / alpha[i], a_next * b, k + 1, k == 0))
            first += tab.stages
        return plan

    def _evaluation_timesteps(self) -> np.ndarray:
        return self._eval_t

    @property
    def _eval_alpha(self) -> np.ndarray:
        return self._alpha_e

    @property
    def _eval_sigma(self) -> np.ndarray:
        return self._sigma_e

    # ------------------------------------------------------------------ stepping
    def _update(self, i: int, x: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        ev = self._plan[i]
        self._push(d, ev.keep)
        if self._final_step_due(i):
            return self._final_update(x)
        if ev.new_anchor:
            self._anchor = x
        return lincomb(self._anchor, ev.a, self.history, ev.b)
