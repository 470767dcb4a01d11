"""`UniPCScheduler`: UniPC predictor-corrector (Zhao et al. 2023), bh1/bh2, data or noise prediction
(fidelity to the paper and diffusers: docs/fidelity.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import unipc
from .scheduler_base import ExponentialIntegratorScheduler, lincomb

#: diffusers maps the DPM-Solver / DEIS solver types to bh2 when a config is shared between schedulers
_DIFFUSERS_ALIASES = ("midpoint", "heun", "logrho")


@dataclass(frozen=True)
class _Step:
    a: float
    b: np.ndarray
    corrector: tuple[float, np.ndarray] | None


class UniPCScheduler(ExponentialIntegratorScheduler):
    """UniPC multistep (Zhao et al. 2023): UniP-p predictor plus the UniC corrector, which re-uses the model
    output at the predicted point (no extra NFE) and is skipped after the last step.

    Options keep diffusers' ``UniPCMultistepScheduler`` names and defaults: ``solver_type`` "bh2" (B(h) = e^h - 1)
    or "bh1" (B(h) = h), ``predict_x0``, ``lower_order_final`` (order min(p, steps left), no 15-step limit, as
    in diffusers' UniPC), ``disable_corrector`` (indices k whose predicted point is not corrected). The step to
    sigma = 0 (``final_sigmas_type="zero"``) is UniP-1, the only finite limit of UniP there, unless
    ``final_step_order`` > 1 (`samplers.solvers.final_step`: Lagrange in rho through that many evaluations).
    """

    registry_name = "unipc"

    solver_options = {"solver_type": "bh2", "predict_x0": True, "disable_corrector": []}

    @property
    def history_kind(self) -> str:
        return "data" if self.config.predict_x0 else "noise"

    def _check_options(self) -> None:
        cfg = self.config
        if cfg.solver_type in _DIFFUSERS_ALIASES:
            self.register_to_config(solver_type="bh2")
        elif cfg.solver_type not in unipc.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {unipc.SOLVER_TYPES}, got {cfg.solver_type!r}")
        if not isinstance(cfg.predict_x0, bool):
            raise TypeError(f"predict_x0 must be a bool, got {cfg.predict_x0!r}")
        if cfg.noise_schedule == "flow" and not cfg.predict_x0:
            raise ValueError("predict_x0=False is not available with noise_schedule='flow' (the noise prediction "
                             "carries no information at pure noise); use predict_x0=True")
        bad = [k for k in cfg.disable_corrector if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
        if bad:
            raise TypeError(f"disable_corrector must be a list of step indices (ints), got {cfg.disable_corrector!r}")

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_sample: torch.Tensor | None = None

    def _orders(self) -> list[int]:
        """Predictor order at each step: warm-up min(p, i + 1), then min(p, n - i) with lower_order_final."""
        cfg, n = self.config, self.num_inference_steps
        first = self._starts_at_noise  # lambda = -inf at pure noise: warm up from the next evaluation
        orders = [min(cfg.solver_order, max(i + 1 - first, 1), n - i if cfg.lower_order_final else cfg.solver_order)
                  for i in range(n)]
        if cfg.final_sigmas_type == "zero":
            orders[-1] = 1
        return self._limit_orders(orders)

    def _coefficients(self, fn, s: int, order: int) -> tuple[float, np.ndarray]:
        """``fn`` (unipc.predictor or unipc.corrector) for the step from grid point s to s + 1."""
        alpha, sigma, lam = self.grid_alpha, self.grid_sigma, self.grid_lambda
        h = lam[s + 1] - lam[s]
        rks = (lam[s - np.arange(1, order)] - lam[s]) / h
        return fn(alpha[s + 1], sigma[s + 1], alpha[s], sigma[s], h, rks, self.config.solver_type,
                  self.config.predict_x0)

    def _build_plan(self) -> list[_Step]:
        orders = self._orders()
        disabled = set(self.config.disable_corrector)
        plan = []
        for i, order in enumerate(orders):
            corr = None
            if i == 1 and self._starts_at_noise and 0 not in disabled:
                corr = self._corrector_from_noise()
            elif i > 0 and i - 1 not in disabled:
                corr = self._coefficients(unipc.corrector, i - 1, orders[i - 1])
            a, b = self._coefficients(unipc.predictor, i, order)
            plan.append(_Step(a, b, corr))
        self._final = self._final_step_plan()
        return plan

    def _corrector_from_noise(self) -> tuple[float, np.ndarray]:
        """UniC-1 of the first step from pure noise (h = inf, data prediction): with rho = 1/2 and B(h) -> -1
        (bh2) it is x_1 = sigma_1 x_noise + alpha_1 (M_1 + M_0) / 2."""
        if self.config.solver_type != "bh2":
            raise ValueError("the corrector of the step from pure noise needs solver_type='bh2' (B(h) = h is "
                             "unbounded there); use bh2 or disable_corrector=[0]")
        return self.grid_sigma[1] / self.grid_sigma[0], 0.5 * self.grid_alpha[1] * np.ones(2)

    def correct(self, i: int, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """UniC at evaluation ``i``: the corrected state given the predicted state ``x`` and the converted model
        output ``d`` there (returns ``x`` itself where the corrector is off)."""
        corr = self._plan[i].corrector
        if corr is None:
            return x
        return lincomb(self._last_sample, corr[0], [d, *self.history], corr[1])

    def _update(self, i: int, x: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        step = self._plan[i]
        self._remember_evaluation(i, x)
        x = self.correct(i, x, d)
        self._push(d, self._history_size)
        self._last_sample = x
        if self._final_step_due(i):
            return self._final_update(x)
        return lincomb(x, step.a, self.history, step.b)
