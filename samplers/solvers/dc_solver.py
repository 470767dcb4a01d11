"""DC-Solver (Zhao et al. 2024, arXiv 2409.03755): dynamic compensation for multistep samplers.

Before the update that leaves t_i, the newest buffered model output M_i is replaced by the Lagrange polynomial
**in time** through the last K + 1 buffered outputs (K = ``dc_order`` = 2), evaluated at
t_i^rho = t_{i-1} + rho_i (t_i - t_{i-1})  (official ``dynamic_compensation``).
rho_i = 1 is skipped, so all-ones ratios reproduce the base solver bit for bit; the first K ratios must be 1.
The compensated output stays in the buffer, so later steps (and UniPC's next corrector) use it, as in the
official code. Whatever the start (``set_begin_index`` in img2img, a wrapper or teleportation that starts the
solver late), nothing is compensated until K + 1 outputs of the current run are buffered; a late start on a
tail of the planned grid keeps the full run's ratios for the remaining steps. docs/fidelity.md (DC-Solver)
lists where this follows the paper and the official code.

* `DynamicCompensation` - mixin for any `ExponentialIntegratorScheduler` that pushes one model output per
  step (multistep solvers); `DCSolverScheduler` = UniPC + DC; `with_dynamic_compensation(cls)` builds the plug-in
  for predictor-only solvers (DPM-Solver++ 2M/3M, DEIS ...).
* `search_dc_ratios` - greedy per-step search of rho_i on a few noises against a many-step reference
  trajectory (official ``find_optim_ratio``: AdamW, lr 0.1, loss = MSE of the state after the step to the truth).
* `CascadePolynomialRegression` - predicts ratios for unseen (NFE, guidance scale) (official
  ``cascade_polynomial_regression``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.loop import model_fn_from_unet, sample
from .dpmsolver_scheduler import DPMSolverPlusPlusScheduler
from .scheduler_base import ExponentialIntegratorScheduler
from .unipc_scheduler import UniPCScheduler

#: config options the dynamic-compensation mixin adds to a solver
DC_OPTIONS: dict[str, Any] = {"dc_ratios": None, "dc_order": 2, "cpr_coeffs": None, "guidance_scale": 1.0}


def lagrange_weights(nodes: Sequence[float], t: Any) -> list[Any]:
    """Weights l_j(t) = prod_{k != j} (t - t_k) / (t_j - t_k) of the Lagrange polynomial through ``nodes``
    (``t`` may be a float or a tensor, for the differentiable ratio search)."""
    out = []
    for j, tj in enumerate(nodes):
        w = 1.0
        for k, tk in enumerate(nodes):
            if k != j:
                w = w * (t - tk) / (tj - tk)
        out.append(w)
    return out


def compensation_weights(times: Sequence[float], i: int, ratio: Any, order: int = 2) -> list[Any]:
    """Weights on (M_i, M_{i-1}, ..., M_{i-order}) of the compensated output at t_{i-1} + ratio (t_i - t_{i-1})."""
    t = times[i - 1] + ratio * (times[i] - times[i - 1])
    return lagrange_weights([float(times[i - j]) for j in range(order + 1)], t)


def _check_ratios(name: str, ratios: Any) -> list[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"{name} must be a list of numbers, got {type(ratios).__name__}")
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)) or not math.isfinite(r):
            raise ValueError(f"{name} must hold finite numbers, got {r!r}")
        out.append(float(r))
    return out


class DynamicCompensation:
    """Mixin adding dynamic compensation to an `ExponentialIntegratorScheduler` subclass.

    Options: ``dc_ratios`` (one ratio per step; the first ``dc_order`` must be 1), or ``cpr_coeffs`` (36 CPR
    coefficients) with ``guidance_scale`` to predict the ratios for any step count; neither means rho = 1
    (the plain base solver). ``dc_order`` is K, the degree of the Lagrange polynomial (K + 1 buffered outputs).
    """

    def _check_options(self) -> None:
        super()._check_options()
        cfg = self.config
        if isinstance(cfg.dc_order, bool) or cfg.dc_order not in (1, 2, 3):
            raise ValueError(f"dc_order must be 1, 2 or 3, got {cfg.dc_order!r}")
        if cfg.dc_ratios is not None and cfg.cpr_coeffs is not None:
            raise ValueError("pass either dc_ratios or cpr_coeffs, not both")
        if cfg.dc_ratios is not None:
            _check_ratios("dc_ratios", cfg.dc_ratios)
        if cfg.cpr_coeffs is not None:
            CascadePolynomialRegression(cfg.cpr_coeffs)
        if not isinstance(cfg.guidance_scale, (int, float)) or not math.isfinite(cfg.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {cfg.guidance_scale!r}")

    def dc_ratio_schedule(self, num_inference_steps: int) -> list[float]:
        """The ratios used for ``num_inference_steps`` steps (given, CPR-predicted, or all ones)."""
        cfg, n = self.config, num_inference_steps
        if cfg.cpr_coeffs is not None:
            return CascadePolynomialRegression(cfg.cpr_coeffs).predict(n, cfg.guidance_scale, cfg.dc_order)
        if cfg.dc_ratios is None:
            return [1.0] * n
        ratios = _check_ratios("dc_ratios", cfg.dc_ratios)
        if len(ratios) != n:
            raise ValueError(f"dc_ratios has {len(ratios)} entries but num_inference_steps={n}: give one ratio "
                             f"per step (search them for this step count or use cpr_coeffs)")
        if any(r != 1.0 for r in ratios[: cfg.dc_order]):
            raise ValueError(f"the first {cfg.dc_order} dc_ratios must be 1 (the buffer holds fewer than "
                             f"{cfg.dc_order + 1} outputs there), got {ratios[: cfg.dc_order]}")
        return ratios

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None,
                      timesteps: Sequence[float] | None = None) -> None:
        """The base solver's `set_timesteps`, then the DC schedule: the model-evaluation times and the per-step ratios
        (`dc_ratio_schedule`); ValueError if the solver makes more than one model evaluation per step."""
        offset = self._tail_offset(timesteps)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.dc_times = np.asarray(self._evaluation_timesteps(), dtype=np.float64)
        if len(self.dc_times) != self.num_inference_steps:
            raise ValueError(f"dynamic compensation needs one model evaluation per step (a multistep solver); "
                             f"{type(self).__name__} makes {len(self.dc_times)} for {self.num_inference_steps} steps")
        if offset:
            self.dc_ratios = self._dc_full[1][offset:]
        else:
            self.dc_ratios = self.dc_ratio_schedule(self.num_inference_steps)
            self._dc_full = (self.dc_times, self.dc_ratios)
        self._dc_run = (self.dc_times, self.dc_ratios)
        self._dc_trial_ratio: torch.Tensor | None = None

    def _tail_offset(self, timesteps: Sequence[float] | None) -> int:
        """How many steps of the planned run an explicit ``timesteps`` list skips when it is a proper tail of that
        run's evaluation times (a wrapper or teleportation starting the solver late); 0 otherwise."""
        full = getattr(self, "_dc_full", None)
        if timesteps is None or full is None:
            return 0
        given = np.asarray(timesteps, dtype=np.float64)
        offset = len(full[0]) - len(given)
        return offset if 0 < offset and np.array_equal(full[0][offset:], given) else 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img: the ratios and times of the remaining steps apply from there."""
        super().set_begin_index(begin_index)
        times, ratios = self._dc_run
        self.dc_times, self.dc_ratios = times[begin_index:], ratios[begin_index:]

    def _dc_weights(self, i: int) -> list[Any] | None:
        if self._dc_trial_ratio is not None:
            return compensation_weights(self.dc_times, i, self._dc_trial_ratio, self.config.dc_order)
        if self.dc_ratios[i] == 1.0:
            return None
        return compensation_weights(self.dc_times, i, self.dc_ratios[i], self.config.dc_order)

    def _push(self, value: torch.Tensor, keep: int) -> None:
        """Buffer the newest output M_i replaced by its compensated value (official ``dynamic_compensation``),
        once the buffer holds the K older outputs of this run the Lagrange polynomial needs."""
        w = self._dc_weights(self._step_index) if len(self.history) >= self.config.dc_order else None
        if w is not None:
            value = value * w[0] + sum(m * c for m, c in zip(self.history, w[1:]))
        super()._push(value, max(keep, self.config.dc_order))


#: named option sets: "paper-sd" is the paper's Stable Diffusion setup (official scripts): UniPC bh2 of order 2,
#: no corrector after the first step's predictor, linspace timesteps, final sigma at t = 0
PRESETS: dict[str, dict[str, Any]] = {
    "paper-sd": {"solver_type": "bh2", "solver_order": 2, "disable_corrector": [0], "timestep_schedule": "linspace",
                 "final_sigmas_type": "zero"},
}


class DCSolverScheduler(DynamicCompensation, UniPCScheduler):
    """DC-Solver: UniPC (all `UniPCScheduler` options) with dynamic compensation before every predictor.

    ``DCSolverScheduler.from_config(cfg, dc_ratios=search_dc_ratios(...))`` or ``cpr_coeffs=..., guidance_scale=``.
    The defaults are UniPC's; ``DCSolverScheduler.from_preset("paper-sd", cfg)`` gives the paper's SD setup.
    """

    registry_name = "dc-solver"

    solver_options = {**UniPCScheduler.solver_options, **DC_OPTIONS}

    @classmethod
    def from_preset(cls, name: str, config: Mapping[str, Any] | None = None, **options: Any) -> DCSolverScheduler:
        """A scheduler with the named `PRESETS` options over ``config`` (e.g. a pipeline's scheduler config);
        ``options`` override both."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls.from_config({**dict(config or {}), **PRESETS[name], **options})


_PLUGINS: dict[type, type] = {DCSolverScheduler: DCSolverScheduler, UniPCScheduler: DCSolverScheduler}


def with_dynamic_compensation(scheduler_cls: type) -> type:
    """The DC plug-in: ``scheduler_cls`` (a multistep `ExponentialIntegratorScheduler`, e.g.
    `DPMSolverPlusPlusScheduler`) with the `DynamicCompensation` options added. UniPC maps to `DCSolverScheduler`."""
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, ExponentialIntegratorScheduler)):
        raise TypeError(f"dynamic compensation plugs into ExponentialIntegratorScheduler subclasses, "
                        f"got {scheduler_cls!r}")
    if issubclass(scheduler_cls, DynamicCompensation):
        return scheduler_cls
    if scheduler_cls not in _PLUGINS:
        name = "DC" + scheduler_cls.__name__
        options = {**scheduler_cls.solver_options, **DC_OPTIONS}
        _PLUGINS[scheduler_cls] = type(name, (DynamicCompensation, scheduler_cls),
                                       {"solver_options": options, "__module__": __name__,
                                        "__doc__": f"{scheduler_cls.__name__} with dynamic compensation."})
    return _PLUGINS[scheduler_cls]


def __getattr__(name: str) -> type:
    """``DC<Scheduler>`` plug-in classes by name, e.g. ``DCDPMSolverPlusPlusScheduler``: saved configs and pipelines
    name them, and a fresh process has not built them yet (PEP 562 module attribute)."""
    import samplers

    base = getattr(samplers, name[2:], None) if name.startswith("DC") else None
    if isinstance(base, type) and issubclass(base, ExponentialIntegratorScheduler):
        return with_dynamic_compensation(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dc_scheduler(scheduler: Any, **options: Any) -> DynamicCompensation:
    if isinstance(scheduler, type) or not isinstance(scheduler, ExponentialIntegratorScheduler):
        raise TypeError(f"expected a project scheduler instance (ExponentialIntegratorScheduler), got {scheduler!r}")
    if getattr(scheduler.config, "method", "multistep") != "multistep":
        raise ValueError(f"dynamic compensation needs a multistep solver, got method={scheduler.config.method!r}")
    return with_dynamic_compensation(type(scheduler)).from_config(scheduler.config, **options)


# ---------------------------------------------------------------------------------------------- reference


def _refined_grid(scheduler: ExponentialIntegratorScheduler, per_interval: int) -> tuple[np.ndarray, list[int]]:
    """Evaluation times of a fine grid that contains every point of ``scheduler``'s grid (each interval split
    uniformly in lambda), and the fine index of each coarse grid point (the last one is the end point)."""
    schedule, grid = scheduler.schedule, scheduler.grid_timesteps
    zero_end = scheduler.config.final_sigmas_type == "zero"
    times = grid[:-1] if zero_end else grid
    if zero_end and times[-1] > schedule.t_min:
        times = np.append(times, schedule.t_min)
    lam = schedule.lambda_(torch.from_numpy(times)).numpy()
    points, index = [times[0]], [0]
    for k in range(len(times) - 1):
        sub = schedule.t_from_lambda(torch.from_numpy(np.linspace(lam[k], lam[k + 1], per_interval + 1)[1:])).numpy()
        sub[-1] = times[k + 1]
        points.extend(sub)
        index.append(len(points) - 1)
    points = np.asarray(points)
    n = scheduler.num_inference_steps
    if zero_end:
        return points, index[:n] + [len(points)]
    return points[:-1], index


@torch.no_grad()
def reference_trajectory(model: Callable[..., Any], scheduler: ExponentialIntegratorScheduler, noise: torch.Tensor,
                         steps: int = 500, model_kwargs: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
    """Ground-truth states at every point of ``scheduler``'s current grid (``set_timesteps`` first): DPM-Solver++(3M)
    with about ``steps`` steps on a lambda-uniform refinement of that grid, same noise schedule and end point."""
    if scheduler.num_inference_steps is None:
        raise RuntimeError("call scheduler.set_timesteps() before reference_trajectory()")
    per_interval = max(1, math.ceil(steps / scheduler.num_inference_steps))
    fine, index = _refined_grid(scheduler, per_interval)
    config = {k: v for k, v in scheduler.config.items() if k not in DC_OPTIONS}
    ref = DPMSolverPlusPlusScheduler.from_config(
        config, solver_order=3, solver_type="midpoint", method="multistep", algorithm_type="dpmsolver++",
        lower_order_final=True, euler_at_final=False)
    ref.set_timesteps(timesteps=fine, device=noise.device)
    wanted = {j: k for k, j in enumerate(index)}
    states: list[torch.Tensor | None] = [None] * len(index)
    states[0] = noise

    def record(i: int, t: Any, x: torch.Tensor) -> None:
        if i + 1 in wanted:
            states[wanted[i + 1]] = x

    sample(model, ref, noise, model_kwargs=dict(model_kwargs or {}), callback=record)
    return states


# ---------------------------------------------------------------------------------------------- search


def _state_after_step(trial: Any, fn: Callable, i: int, x_next: torch.Tensor) -> torch.Tensor:
    """The state at t_{i+1} once step i is complete: UniPC also applies the corrector with the model output at
    the predicted point (one model call, as the official search does); predictor-only solvers are done."""
    if not hasattr(trial, "correct") or i + 1 >= trial.num_inference_steps:
        return x_next
    t = trial.timesteps[i + 1]
    d = trial.convert_model_output(fn(x_next, t), x_next, i + 1)
    return trial.correct(i + 1, x_next, d)


#: ratio parameterisations of the official search (``bound_func``): the raw parameter, or 1 + tanh(p) / 2 in (0.5, 1.5)
BOUNDS: dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": (1.0, lambda p: p),
    "tanh": (0.0, lambda p: 1.0 + 0.5 * torch.tanh(p)),
}


def _optimise_ratio(scheduler: Any, fn: Callable, i: int, x: torch.Tensor, out: torch.Tensor, target: torch.Tensor,
                    num_iters: int, lr: float, bound: str) -> float:
    """AdamW on rho_i from 1 (official ``find_optim_ratio``); each trial steps a shallow copy of the scheduler."""
    start, to_ratio = BOUNDS[bound]
    param = torch.nn.Parameter(torch.full((), start, dtype=torch.float64, device=x.device))
    optimizer = torch.optim.AdamW([param], lr=lr)
    t = scheduler.timesteps[i]
    for _ in range(num_iters):
        optimizer.zero_grad()
        trial = copy.copy(scheduler)
        trial.history = list(scheduler.history)
        with torch.enable_grad():
            trial._dc_trial_ratio = to_ratio(param)
            x_next = trial.step(out, t, x).prev_sample
            loss = torch.nn.functional.mse_loss(_state_after_step(trial, fn, i, x_next), target)
            loss.backward()
        optimizer.step()
    return float(to_ratio(param.detach()))


def _cache_key(model_id: str, nfe: int, guidance_scale: float, scheduler: Any, extra: Mapping[str, Any]) -> str:
    solver = {k: v for k, v in scheduler.config.items() if not k.startswith("_") and k not in DC_OPTIONS}
    return json.dumps({"model": model_id, "nfe": nfe, "guidance_scale": guidance_scale,
                       "solver": type(scheduler).__name__, "config": solver, **extra}, sort_keys=True, default=str)


def search_dc_ratios(
    model: Callable[..., Any],
    scheduler: ExponentialIntegratorScheduler,
    noises: torch.Tensor,
    num_inference_steps: int,
    *,
    num_iters: int = 40,
    lr: float = 0.1,
    reference_steps: int = 500,
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    bound: str = "none",
    cache: str | os.PathLike | None = None,
    model_id: str | None = None,
) -> list[float]:
    """Search the DC ratios greedily, step by step (official ``search_dc`` / ``find_optim_ratio``).

    ``scheduler`` is a multistep project scheduler (UniPC for DC-Solver, or DPM-Solver++/DEIS for the plug-in);
    its config is used, it is not modified. ``noises`` (~10) start both the solver and the ground truth, a
    ``reference_steps`` DPM-Solver++(3M) run of the same model through the same grid. For i >= dc_order, rho_i
    starts at 1 and takes ``num_iters`` AdamW steps (lr ``lr``; 40 and 0.1 as in the paper) on the MSE between
    the state after step i (after UniPC's corrector) and the ground truth at t_{i+1}; then the step is taken with
    the found rho_i.
    ``bound="tanh"`` searches rho = 1 + tanh(p) / 2 in (0.5, 1.5) (the official ``bound_func`` option) instead of
    rho itself. ``model`` is the (guided) model exactly as sampling will call it (for a class-conditional model
    e.g. ``guidance.ClassifierFreeGuidedModel``); ``guidance_scale`` only labels the cache.
    With ``cache`` (a JSON file) and ``model_id``, results are stored under (model id, NFE, guidance scale,
    solver config, search settings) and reused.
    """
    if cache is not None and not model_id:
        raise ValueError("caching searched ratios needs model_id= (the cache is keyed by model, NFE, scale, solver)")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {tuple(BOUNDS)}, got {bound!r}")
    if noises.ndim < 2 or noises.shape[0] < 1:
        raise ValueError(f"noises must be a batch (B, C, H, W) of initial noise, got shape {tuple(noises.shape)}")
    dc = _dc_scheduler(scheduler, dc_ratios=None, cpr_coeffs=None)
    dc.set_timesteps(num_inference_steps, device=noises.device)
    key = None
    if cache is not None:
        settings = {"num_noises": noises.shape[0], "num_iters": num_iters, "lr": lr, "reference_steps": reference_steps,
                    "bound": bound}
        key = _cache_key(model_id, dc.num_inference_steps, guidance_scale, dc, settings)
        stored = json.loads(Path(cache).read_text()) if Path(cache).exists() else {}
        if key in stored:
            return stored[key]
    truth = reference_trajectory(model, dc, noises, reference_steps, model_kwargs)
    fn = model_fn_from_unet(model, **dict(model_kwargs or {}))
    ratios = [1.0] * dc.num_inference_steps
    x = noises * dc.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(dc.timesteps):
            out = fn(x, t)
            if i >= dc.config.dc_order:
                ratios[i] = _optimise_ratio(dc, fn, i, x, out, truth[i + 1], num_iters, lr, bound)
                dc.dc_ratios[i] = ratios[i]
            x = dc.step(out, t, x).prev_sample
    if key is not None:
        stored = json.loads(Path(cache).read_text()) if Path(cache).exists() else {}
        stored[key] = ratios
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(stored, indent=1))
    return ratios


# ---------------------------------------------------------------------------------------------- CPR


class CascadePolynomialRegression:
    """Cascade polynomial regression of the DC ratios (official ``cascade_polynomial_regression``):

    rho(s) = sum_{k=0}^{3} c_k x^k, x = s / N (s = 1..N the 1-based step), c_k = sum_j a_kj g^(2-j),
    g = CFG / 12, a_kj = sum_l coeffs[k, j, l] n^(2-l), n = N / 50: 4 x 3 x 3 = 36 numbers, laid out as the
    official ``.npy`` files. rho is linear in them, so `fit` is a (ridge) least-squares solve.
    """

    def __init__(self, coeffs: Any):
        c = np.asarray(coeffs, dtype=np.float64)
        if c.size != 36 or not np.all(np.isfinite(c)):
            raise ValueError(f"CPR needs 36 finite coefficients (4 x 3 x 3), got shape {c.shape}")
        self.coeffs = c.reshape(4, 3, 3)

    @staticmethod
    def features(num_inference_steps: int, guidance_scale: float, steps: Sequence[int]) -> np.ndarray:
        """Design matrix (len(steps), 36) for 1-based steps ``steps``."""
        n = num_inference_steps
        x = np.asarray(steps, dtype=np.float64) / n
        pk = x[:, None] ** np.arange(4)  # (S, 4): x^k
        pj = (guidance_scale / 12.0) ** np.array([2, 1, 0])  # CFG^2, CFG, 1
        pl = (n / 50.0) ** np.array([2, 1, 0])  # N^2, N, 1
        return (pk[:, :, None, None] * pj[None, None, :, None] * pl[None, None, None, :]).reshape(len(x), 36)

    @classmethod
    def fit(cls, searched: Mapping[tuple[int, float], Sequence[float]], ridge: float = 0.0,
            dc_order: int = 2) -> CascadePolynomialRegression:
        """Fit from ``{(NFE, guidance_scale): searched ratios}``; steps before ``dc_order`` (always 1) are left out.
        The default is the paper's least-squares fit (minimum-norm where the grid does not pin down all 36
        numbers); ``ridge`` > 0 pulls the coefficients towards rho = 1 (no compensation): min |A c - rho|^2 +
        ridge |c - c_1|^2, c_1 the coefficients of the constant 1 (steadier at the edges of a small grid,
        further from held-out ratios on the official SD2.1 surface: docs/fidelity.md)."""
        if not searched:
            raise ValueError("CPR fit needs searched ratios for at least one (NFE, guidance scale)")
        rows, targets = [], []
        for (n, scale), ratios in searched.items():
            ratios = _check_ratios(f"ratios for {(n, scale)}", ratios)
            if len(ratios) != n:
                raise ValueError(f"ratios for (NFE={n}, scale={scale}) have {len(ratios)} entries, expected {n}")
            rows.append(cls.features(n, scale, range(dc_order + 1, n + 1)))
            targets.extend(ratios[dc_order:])
        a, y = np.concatenate(rows), np.asarray(targets)
        prior = np.zeros((4, 3, 3))
        prior[0, 2, 2] = 1.0  # x^0 (CFG/12)^0 (N/50)^0
        prior = prior.reshape(36)
        lhs = np.concatenate([a, math.sqrt(ridge) * np.eye(36)])
        return cls(np.linalg.lstsq(lhs, np.concatenate([y, math.sqrt(ridge) * prior]), rcond=None)[0])

    def predict(self, num_inference_steps: int, guidance_scale: float, dc_order: int = 2) -> list[float]:
        """Ratios for every step; the first ``dc_order`` are 1 (official: steps 1 and 2)."""
        n = int(num_inference_steps)
        steps = list(range(dc_order + 1, n + 1))
        pred = self.features(n, guidance_scale, steps) @ self.coeffs.reshape(36) if steps else np.zeros(0)
        return [1.0] * min(dc_order, n) + [float(r) for r in pred]

    def save(self, path: str | os.PathLike) -> None:
        """Write the 36 coefficients and their layout as JSON (read back by `load`), creating the parent folder."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"cpr_coeffs": self.coeffs.reshape(36).tolist(),
                                          "layout": "coeffs[k][j][l]: x^k, (CFG/12)^(2-j), (N/50)^(2-l)"}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CascadePolynomialRegression:
        """From `save`'s JSON or an official ``.npy`` file (36 numbers)."""
        if str(path).endswith(".npy"):
            return cls(np.load(path))
        return cls(json.loads(Path(path).read_text())["cpr_coeffs"])

    def to_list(self) -> list[float]:
        """The 36 coefficients, for ``DCSolverScheduler(cpr_coeffs=...)``."""
        return self.coeffs.reshape(36).tolist()
