"""`DPMSolverPlusPlusScheduler`: DPM-Solver++ multistep (1-3), singlestep (2S/3S) and SDE-DPM-Solver++ (1, 2M)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import dpm_solver
from .config_compat import map_foreign_values
from .scheduler_base import ExponentialIntegratorScheduler, lincomb, multistep_orders

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
METHODS = ("multistep", "singlestep")


@dataclass(frozen=True)
class _Step:
    a: float
    b: np.ndarray
    noise: float = 0.0
    from_anchor: bool = False


class DPMSolverPlusPlusScheduler(ExponentialIntegratorScheduler):
    """DPM-Solver++ (Lu et al. 2022). ``solver_order=1`` is DDIM. ``method="singlestep"`` groups grid intervals
    into 2S/3S steps whose intermediate points are grid points (diffusers' singlestep layout; on a uniform-lambda
    grid these are the paper's r = 1/2 and r = 1/3, 2/3). Multistep DPM-Solver++ with ``final_step_order`` k > 1
    ends with the k-point step to sigma = 0 of `samplers.solvers.final_step` instead of x_0 = D (diffusers' choice).
    Differences from the paper's official code (3S midpoint): docs/fidelity.md."""

    registry_name = "dpmsolver++"

    solver_options = {
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "method": "multistep",
        "euler_at_final": False,
    }

    def _check_options(self) -> None:
        map_foreign_values(self, "dpmsolver++")
        cfg = self.config
        if cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(f"algorithm_type={cfg.algorithm_type!r} (noise-prediction DPM-Solver, deprecated in "
                             f"diffusers) is not implemented; use {cfg.algorithm_type + '++'!r}")
        if cfg.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {ALGORITHM_TYPES}, got {cfg.algorithm_type!r}")
        if cfg.solver_type not in dpm_solver.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {dpm_solver.SOLVER_TYPES}, got {cfg.solver_type!r}")
        if cfg.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
        if cfg.noise_schedule == "flow" and cfg.method == "singlestep" and cfg.solver_order > 1:
            raise ValueError("method='singlestep' with solver_order > 1 is not available with noise_schedule='flow' "
                             "(its first step from pure noise has no intermediate point in log-SNR); use multistep")
        if cfg.algorithm_type == "sde-dpmsolver++" and (cfg.method != "multistep" or cfg.solver_order > 2):
            raise ValueError("sde-dpmsolver++ supports multistep solver_order 1 or 2")
        if (cfg.final_step_order or 1) > 1 and (cfg.method != "multistep" or cfg.algorithm_type != "dpmsolver++"
                                         or cfg.euler_at_final):
            raise ValueError(f"final_step_order > 1 needs method='multistep', algorithm_type='dpmsolver++' and "
                             f"euler_at_final=False, got method={cfg.method!r}, algorithm_type={cfg.algorithm_type!r}"
                             f", euler_at_final={cfg.euler_at_final!r}")

    def _orders(self) -> list[int]:
        """Order used at each evaluation (warm-up, lower_order_final as in diffusers)."""
        cfg, n = self.config, self.num_inference_steps
        if cfg.method == "singlestep":
            orders = dpm_solver.singlestep_orders(n, cfg.solver_order, cfg.lower_order_final)
        else:
            orders = self._limit_orders(multistep_orders(n, cfg.solver_order, self._lower_order_final, False,
                                                         self._starts_at_noise))
        if cfg.euler_at_final or cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def _build_plan(self) -> list[_Step]:
        alpha, sigma, lam = self.grid_alpha, self.grid_sigma, self.grid_lambda
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        solver_type, singlestep = self.config.solver_type, self.config.method == "singlestep"
        plan = []
        for i, order in enumerate(self._orders()):
            t = i + 1
            s = i - order + 1 if singlestep else i
            h = lam[t] - lam[s]
            if sde:
                if order == 1:
                    a, b, c = dpm_solver.sde_first_order(alpha[t], sigma[t], sigma[s], h)
                else:
                    a, b, c = dpm_solver.sde_second_order(alpha[t], sigma[t], sigma[s], h, lam[i] - lam[i - 1],
                                                          solver_type)
                plan.append(_Step(a, b, c))
                continue
            if order == 1:
                a, b = dpm_solver.first_order(alpha[t], sigma[t], sigma[s], h)
            elif singlestep and order == 2:
                a, b = dpm_solver.singlestep_second(alpha[t], sigma[t], sigma[s], h, lam[i] - lam[s], solver_type)
            elif singlestep:
                a, b = dpm_solver.singlestep_third(alpha[t], sigma[t], sigma[s], h, lam[i] - lam[s],
                                                   lam[i - 1] - lam[s], solver_type)
            elif order == 2:
                a, b = dpm_solver.multistep_second(alpha[t], sigma[t], sigma[s], h, lam[i] - lam[i - 1], solver_type)
            else:
                a, b = dpm_solver.multistep_third(alpha[t], sigma[t], sigma[s], h, lam[i] - lam[i - 1],
                                                  lam[i - 1] - lam[i - 2])
            plan.append(_Step(a, b, from_anchor=order > 1 and singlestep))
        self._final = self._final_step_plan()
        return plan

    def _update(self, i: int, x: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        step = self._plan[i]
        self._push(d, self._history_size)
        self._remember_evaluation(i, x)
        if self._final_step_due(i):
            return self._final_update(x)
        if not step.from_anchor:
            self._anchor = x
        out = lincomb(self._anchor, step.a, self.history, step.b)
        if step.noise:
            out.add_(self._noise(x, generator), alpha=step.noise)
        return out
