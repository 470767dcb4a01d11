"""The one adapter from coefficient formulas to diffusers' stateful scheduler API.

A solver subclass declares its extra config options (`solver_options`), builds a per-step plan of float64
coefficients in `_build_plan` (host side, once per `set_timesteps`), and applies step `i` in `_update`.
Everything else - config handling, the noise schedule, step grids, model-output conversion, dynamic
thresholding, float32/float64 state for low-precision models, input checks - lives here once.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .config_compat import (
    DIFFUSERS_OPTIONS,
    beta_grid,
    check_diffusers_options,
    check_unknown_options,
    effective_grid,
    foreign_config,
)
from .final_step import FinalStep, final_step
from .flow import FLOW_GRIDS, FLOW_OPTIONS, check_flow_config, flow_sigmas, translate_flow_config
from .grids import TIMESTEP_SCHEDULES, last_timestep, step_grid
from .prediction import check_prediction_type, dynamic_threshold, to_data, to_noise
from .schedule import DiscreteVPSchedule, FlowMatchingSchedule, betas_from_config

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
FINAL_STEP_ORDERS = (1, 2, 3, 4)
#: plans kept per scheduler instance (one per distinct grid), so repeated set_timesteps calls are a lookup
PLAN_CACHE_SIZE = 8

#: the longest log-SNR step taken with more than two history points on the default ``logsnr_interior`` grid:
#: third-order extrapolation over longer steps overshoots for samples near a mode boundary (few-step runs); the
#: other grids keep diffusers' orders, for parity
HIGH_ORDER_MAX_STEP = 1.5

#: evaluations at the start of a flow grid from pure noise that the higher-order step to sigma = 0 does not use: pure
#: noise itself and the next two, where the model's prediction still averages over modes (docs/flow-matching.md)
FLOW_FINAL_STEP_SKIP = 3

#: Options every project scheduler accepts; names, defaults and meaning follow diffusers where it has them.
COMMON_OPTIONS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "final_step_order": 1,
    "timestep_schedule": "logsnr_interior",
    "use_karras_sigmas": False,
    "lambda_min_clipped": -float("inf"),
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "check_finite": False,
    "tuned_timesteps": None,
}


def lincomb(x: torch.Tensor, a: float, history: Sequence[torch.Tensor], b: Sequence[float]) -> torch.Tensor:
    """a * x + sum_j b[j] * history[j], with one temporary."""
    out = x * a
    for h, c in zip(history, b):
        if c != 0.0:
            out.add_(h, alpha=float(c))
    return out


def multistep_orders(num_steps: int, order: int, lower_order_final: bool, final_to_zero: bool,
                     skip_first: bool = False) -> list[int]:
    """Points used at each multistep step: warm-up min(order, i + 1); with ``lower_order_final`` and fewer than
    15 steps the last two steps use at most 1 and 2 (diffusers' rule); a final jump to sigma = 0 uses 1.
    ``skip_first`` (a start at pure noise, lambda = -inf, which no polynomial in lambda can use): step i >= 1 uses
    at most i points."""
    orders = [min(order, max(i + 1 - skip_first, 1)) for i in range(num_steps)]
    if lower_order_final and num_steps < 15:
        orders[-1] = 1
        if num_steps >= 2:
            orders[-2] = min(orders[-2], 2)
    if final_to_zero:
        orders[-1] = 1
    return orders


def make_pipeline_loadable(cls: type) -> None:
    """diffusers' pipeline loader accepts a component class from a non-diffusers module only if that module also
    resolves the base-class name (``SchedulerMixin``): provide it, so ``DiffusionPipeline.from_pretrained`` can
    load a saved pipeline whose scheduler is one of ours."""
    module = sys.modules.get(cls.__module__)
    if module is not None and not hasattr(module, "SchedulerMixin"):
        module.SchedulerMixin = SchedulerMixin


#: the project's schedulers by registry name (``samplers.SCHEDULERS``, the sweep's ``solvers``): a subclass joins by
#: setting ``registry_name`` in its class body
SCHEDULERS: dict[str, type] = {}


class ExponentialIntegratorScheduler(SchedulerMixin, ConfigMixin):
    """Base of the project's diffusers schedulers (see module docstring)."""

    config_name = "scheduler_config.json"
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    #: this class's name in `SCHEDULERS` (None: not registered; subclasses do not inherit it)
    registry_name: str | None = None
    #: solver-specific config options and defaults, merged into the generated ``__init__`` signature
    solver_options: dict[str, Any] = {}
    #: allowed ``solver_order`` values
    solver_orders: tuple[int, ...] = (1, 2, 3)
    #: what the history buffer holds: "data" (x0 predictions) or "noise" (eps predictions)
    history_kind = "data"
    #: attributes `_plan_grid` sets; subclasses add those their `_build_plan` sets (they are cached with the plan)
    plan_attributes: tuple[str, ...] = ("grid_timesteps", "grid_alpha", "grid_sigma", "grid_lambda",
                                        "num_inference_steps", "_plan", "_final")
    #: the higher-order step to sigma = 0 of the current plan (`_final_step_plan`), None for a first-order one
    _final: FinalStep | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        make_pipeline_loadable(cls)
        if cls.__dict__.get("registry_name"):
            SCHEDULERS[cls.registry_name] = cls
        if "__init__" in cls.__dict__:
            return
        options = {**COMMON_OPTIONS, **DIFFUSERS_OPTIONS, **FLOW_OPTIONS, **cls.solver_options}

        def __init__(self, **config: Any) -> None:
            check_unknown_options(type(self).__name__, config, options)
            self._setup()

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in options.items()]
        __init__.__signature__ = inspect.Signature([self_param, *params])
        __init__.__doc__ = "Keyword options (defaults): " + ", ".join(f"{k}={v!r}" for k, v in options.items())
        cls.__init__ = register_to_config(__init__)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``, after translating a flow scheduler config (`FlowMatchEulerDiscreteScheduler`,
        or a multistep one with ``use_flow_sigmas``) into ``noise_schedule="flow"`` (`samplers.solvers.flow`); a config
        of another scheduler keeps the project's step grid (its ``timestep_spacing`` is not applied unless given as a
        keyword; see `samplers.solvers.config_compat`)."""
        if config is not None and not isinstance(config, dict) and not hasattr(config, "keys"):
            config = getattr(config, "config", config)
        if config is not None:
            config = foreign_config(translate_flow_config(config))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.config
        check_diffusers_options(cfg, COMMON_OPTIONS["timestep_schedule"])
        check_prediction_type(cfg.prediction_type)
        check_flow_config(cfg)
        if cfg.solver_order not in self.solver_orders:
            raise ValueError(f"solver_order must be one of {self.solver_orders} for {type(self).__name__}, "
                             f"got {cfg.solver_order!r}")
        if cfg.timestep_schedule not in TIMESTEP_SCHEDULES + FLOW_GRIDS:
            raise ValueError(f"timestep_schedule must be one of {TIMESTEP_SCHEDULES}, got {cfg.timestep_schedule!r}")
        if cfg.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {cfg.final_sigmas_type!r}")
        if cfg.final_step_order is not None and (isinstance(cfg.final_step_order, bool)
                                                 or cfg.final_step_order not in FINAL_STEP_ORDERS):
            raise ValueError(f"final_step_order must be one of {FINAL_STEP_ORDERS} (points of the step to sigma = 0) "
                             f"or None (the solver's default), got {cfg.final_step_order!r}")
        self._check_options()
        self._check_tuned_timesteps(cfg.tuned_timesteps)
        if self.is_flow:
            self.schedule = FlowMatchingSchedule(cfg.num_train_timesteps)
            self.timesteps = torch.arange(cfg.num_train_timesteps, 0, -1, dtype=torch.float32)
            #: flow sigmas of the evaluations plus the end point 0 (float32, as diffusers' flow schedulers keep them)
            self.sigmas = torch.cat([self.timesteps / cfg.num_train_timesteps, torch.zeros(1)])
        else:
            self.schedule = DiscreteVPSchedule.from_config(cfg)
            self.alphas_cumprod = self.schedule.alphas_cumprod.float()
            self.betas = betas_from_config(cfg)
            self.alphas = 1.0 - self.betas
            self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
            self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.host_timesteps = self.timesteps.double().numpy()
        self._plan: list[Any] | None = None
        self._plan_cache: dict[bytes, dict[str, Any]] = {}
        self._begin_index: int | None = None
        self._run_steps: int | None = None
        self._reset_state()

    def _check_options(self) -> None:
        """Subclass hook: validate solver-specific options."""

    @staticmethod
    def _check_tuned_timesteps(tuned: Any) -> None:
        """``tuned_timesteps`` (written by `samplers.tune`): {"n": n strictly decreasing timesteps}."""
        if tuned is None:
            return
        if not isinstance(tuned, dict):
            raise ValueError(f"tuned_timesteps must be a dict {{'n': [n timesteps]}} or None, "
                             f"got {type(tuned).__name__}")
        for key, grid in tuned.items():
            grid = np.asarray(grid, dtype=np.float64)
            if not str(key).isdigit() or grid.shape != (int(key),) or not np.all(np.diff(grid) < 0):
                raise ValueError(f"tuned_timesteps[{key!r}] must hold {key} strictly decreasing timesteps, "
                                 f"got {grid.tolist()}")

    def _reset_state(self) -> None:
        self._step_index = 0
        self.history: list[torch.Tensor] = []
        self._state: torch.Tensor | None = None
        self._returned: torch.Tensor | None = None

    @property
    def is_flow(self) -> bool:
        """Whether the scheduler integrates a flow-matching schedule (``noise_schedule="flow"``)."""
        return self.config.noise_schedule == "flow"

    @property
    def timestep_schedule(self) -> str:
        """The step grid in use. VP: ``timestep_schedule``, unless ``use_karras_sigmas`` (``karras``),
        ``use_lu_lambdas`` or ``use_exponential_sigmas`` (``logsnr``), ``use_beta_sigmas`` (``beta``) or
        ``timestep_spacing`` says otherwise (`samplers.solvers.config_compat`); a flow schedule applies its Karras /
        exponential / beta ramp to the flow sigmas itself (`samplers.solvers.flow`)."""
        if self.is_flow:
            return self.config.timestep_schedule
        return effective_grid(self.config)

    @property
    def _starts_at_noise(self) -> bool:
        """Whether the current grid starts at pure noise (alpha = 0, lambda = -inf: a flow schedule at sigma = 1);
        its first step is then DDIM's exact limit x_t = sigma_t x + alpha_t D, and multistep solvers warm up from
        the second evaluation."""
        return bool(self.grid_alpha[0] == 0.0)

    @property
    def step_index(self) -> int:
        """Index into ``timesteps`` of the next evaluation (a host int; the begin index plus the steps taken)."""
        return (self._begin_index or 0) + self._step_index

    @property
    def begin_index(self) -> int | None:
        """The evaluation the run started at (`set_begin_index`), None from the start."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img pipelines): the plan is rebuilt on the remaining grid, with
        the solver's low-order warm-up from there, as diffusers' multistep schedulers do; ``timesteps`` is kept."""
        if self._plan is None:
            raise RuntimeError("set_begin_index() needs set_timesteps() first")
        if begin_index == 0 and not self._begin_index:  # the plan already starts at timesteps[0]
            self._begin_index = 0
            self._reset_state()
            return
        if len(self.timesteps) != len(self.grid_timesteps) - 1 + (self._begin_index or 0):
            raise NotImplementedError(f"{type(self).__name__} makes several model calls per step; "
                                      "set_begin_index is supported for one call per step")
        if not 0 <= begin_index < len(self.timesteps):
            raise ValueError(f"begin_index must be in [0, {len(self.timesteps) - 1}], got {begin_index}")
        tail = np.append(self.host_timesteps, self.grid_timesteps[-1])[begin_index:]
        self._run_steps = len(self.timesteps)
        self._plan_grid(lambda: tail, (tail.tobytes(), self._run_steps))
        self._begin_index = begin_index
        self._reset_state()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """Build the step grid and the per-step coefficient plan (float64, on the host). ``timesteps`` goes to
        ``device``; ``host_timesteps`` keeps a float64 numpy copy that wrappers and guidance read without a
        device sync.

        A flow schedule takes diffusers' flow arguments (as ``retrieve_timesteps`` passes them): ``sigmas`` (the
        base grid, shifted like the config's default grid) and ``mu`` (with ``use_dynamic_shifting``); a
        ``tuned_timesteps`` grid for the step count replaces both. Explicit ``timesteps`` are used as given on any
        schedule (flow: sigma = t / num_train_timesteps, no shift)."""
        cfg = self.config
        self._run_steps = None
        if self.is_flow:
            self._set_flow_timesteps(num_inference_steps, sigmas, mu, timesteps)
        elif sigmas is not None or mu is not None:
            raise ValueError(f"{'sigmas' if sigmas is not None else 'mu'} is only accepted with noise_schedule='flow' "
                             "(a VP schedule takes num_inference_steps or timesteps)")
        elif timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            self._plan_evaluations(timesteps)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (or a timesteps list)")
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
            if not 1 <= num_inference_steps <= cfg.num_train_timesteps:
                raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps="
                                 f"{cfg.num_train_timesteps}, got {num_inference_steps}")
            n = int(num_inference_steps)
            tuned = (cfg.tuned_timesteps or {}).get(str(n))
            if tuned is not None:
                self._plan_evaluations(tuned)
            else:
                self._plan_grid(lambda: self._drop_repeated_timesteps(self._grid(n)), n)
        self._begin_index = None
        eval_t = self._evaluation_timesteps()
        if self.is_flow:  # float32 like diffusers' flow schedulers (pipelines pass t / 1000 to the transformer)
            dtype = torch.float32
            self.sigmas = torch.from_numpy(np.append(eval_t, 0.0) / cfg.num_train_timesteps).float()
        else:
            dtype = torch.int64 if np.all(eval_t == np.round(eval_t)) else torch.float64
            self.sigmas = torch.from_numpy(self.grid_sigma / self.grid_alpha).float()
        self.timesteps = torch.from_numpy(eval_t).to(device=device, dtype=dtype)
        self.host_timesteps = eval_t.copy()
        self._reset_state()

    def _set_flow_timesteps(self, num_inference_steps: int | None, sigmas: Sequence[float] | None,
                            mu: float | None, timesteps: Sequence[float] | None) -> None:
        """The flow grid: evaluation sigmas by `samplers.solvers.flow.flow_sigmas` (or t / N of explicit ``timesteps``),
        then the end point sigma = 0."""
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if timesteps is not None:
            if sigmas is not None or mu is not None:
                raise ValueError("pass timesteps alone (they are used as given), not with sigmas or mu")
            evals = np.asarray(timesteps, dtype=np.float64).reshape(-1) / n_train
            if num_inference_steps is not None and len(evals) != num_inference_steps:
                raise ValueError(f"timesteps has {len(evals)} entries but num_inference_steps={num_inference_steps}")
            if not (len(evals) and np.all(np.isfinite(evals)) and evals.min() > 0 and evals.max() <= 1
                    and np.all(np.diff(evals) < 0)):
                raise ValueError(f"flow timesteps must be strictly decreasing in (0, {n_train}], "
                                 f"got {np.asarray(timesteps).tolist()}")
        else:
            if sigmas is None:
                if num_inference_steps is None:
                    raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
                if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                        or num_inference_steps < 1:
                    raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            evals = flow_sigmas(cfg, cfg.timestep_schedule, num_inference_steps, sigmas, mu)
            tuned = (cfg.tuned_timesteps or {}).get(str(len(evals)))
            if tuned is not None:  # a tuned grid wins over the pipeline's sigmas / mu and the default grid
                evals = np.asarray(tuned, dtype=np.float64) / n_train
        grid = np.append(evals * n_train, 0.0)
        self._plan_grid(lambda: grid, grid.tobytes())

    def _plan_evaluations(self, timesteps: Sequence[float]) -> None:
        """Plan an explicit list of evaluation times (``timesteps=`` or a tuned grid), ending at t_min."""
        grid = np.append(np.asarray(timesteps, dtype=np.float64), self.schedule.t_min)
        if len(grid) < 2 or not np.all(np.diff(grid[:-1]) < 0):
            raise ValueError("timesteps must be a non-empty strictly decreasing sequence")
        self._plan_grid(lambda: grid, grid.tobytes())

    def _plan_grid(self, make_grid: Callable[[], np.ndarray], key: Hashable) -> None:
        """Schedule values on the grid (evaluation times + end point) and the per-step coefficient plan, cached
        under ``key`` (a step count or the grid's bytes): the config is fixed at construction, so the plan
        depends on the grid alone and a repeated ``set_timesteps`` is a lookup."""
        cached = self._plan_cache.get(key)
        if cached is None:
            self._compute_plan(make_grid())
            cached = {name: getattr(self, name) for name in self.plan_attributes}
            if len(self._plan_cache) >= PLAN_CACHE_SIZE:
                del self._plan_cache[next(iter(self._plan_cache))]
            self._plan_cache[key] = cached
        vars(self).update(cached)

    def _compute_plan(self, grid: np.ndarray) -> None:
        alpha, sigma = (v.numpy() for v in self.schedule.alpha_sigma(torch.from_numpy(grid)))
        if self.config.final_sigmas_type == "zero":
            alpha[-1], sigma[-1] = 1.0, 0.0
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        self.grid_timesteps, self.grid_alpha, self.grid_sigma, self.grid_lambda = grid, alpha, sigma, lam
        self.num_inference_steps = len(grid) - 1
        self._plan = self._build_plan()

    @property
    def _lower_order_final(self) -> bool:
        """``lower_order_final`` for a multistep plan; on the tail of a grid (`set_begin_index`) diffusers' rule
        "fewer than 15 steps" counts the whole run, as diffusers does."""
        return self.config.lower_order_final and (self._run_steps is None or self._run_steps < 15)

    def _drop_repeated_timesteps(self, grid: np.ndarray) -> np.ndarray:
        """Integer rounding can repeat a timestep (h = 0): keep each evaluation time once."""
        evals = grid[:-1][np.append(np.diff(grid[:-1]) < 0, True)]
        if self.config.final_sigmas_type == "sigma_min" and len(evals) > 1 and evals[-1] <= grid[-1]:
            evals = evals[:-1]
        return np.append(evals, grid[-1])

    def _grid(self, num_steps: int) -> np.ndarray:
        if self.timestep_schedule == "beta":
            return beta_grid(self.schedule, last_timestep(self.schedule, self.config.lambda_min_clipped), num_steps,
                             ends_at_zero=self.config.final_sigmas_type == "zero")
        return step_grid(self.schedule, self.timestep_schedule, num_steps,
                         lambda_min_clipped=self.config.lambda_min_clipped, steps_offset=self.config.steps_offset,
                         ends_at_zero=self.config.final_sigmas_type == "zero")

    def _limit_orders(self, orders: list[int]) -> list[int]:
        """At most two points for steps longer than `HIGH_ORDER_MAX_STEP` in lambda (``logsnr_interior`` only)."""
        if self.timestep_schedule != "logsnr_interior":
            return orders
        h = np.diff(self.grid_lambda)
        return [min(k, 2) if h[i] > HIGH_ORDER_MAX_STEP else k for i, k in enumerate(orders)]

    def _evaluation_timesteps(self) -> np.ndarray:
        return self.grid_timesteps[:-1]

    # ------------------------------------------------------------------ higher-order final step
    @property
    def final_step_points(self) -> int:
        """Points of the step to sigma = 0: ``final_step_order``, or the solver's default when it is None."""
        order = self.config.final_step_order
        return self.default_final_step_points if order is None else order

    #: points of the step to sigma = 0 when ``final_step_order`` is None
    default_final_step_points = 1

    def _final_step_plan(self) -> FinalStep | None:
        """The step to sigma = 0 through the last min(final_step_order, steps) evaluations
        (`samplers.solvers.final_step`); None where it stays first order. Multistep subclasses store it as
        ``_final``. On a flow grid from pure noise it leaves out that first evaluation and the next two
        (`FLOW_FINAL_STEP_SKIP`)."""
        n = self.num_inference_steps
        skip = FLOW_FINAL_STEP_SKIP if self.is_flow and self._starts_at_noise else self._starts_at_noise
        k = min(self.final_step_points, n - skip)
        if self.config.final_sigmas_type != "zero" or k < 2:
            return None
        last = slice(n - 1, n - 1 - k if n > k else None, -1)
        return final_step(self._eval_alpha[last], self._eval_sigma[last], self.history_kind)

    @property
    def _history_size(self) -> int:
        """Model outputs a multistep solver buffers: its order, or the points of a longer final step."""
        return max(self.config.solver_order, self._final.points if self._final is not None else 1)

    def _remember_evaluation(self, i: int, x: torch.Tensor) -> None:
        """Keep the states at the evaluations a data-history final step needs (rebinding, so that shallow copies
        of the scheduler, as in the DC ratio search, do not share the list)."""
        if self._final is None or not len(self._final.states):
            return
        first = self.num_inference_steps - self._final.points
        if i >= first:
            self._final_states = [x] if i == first else [x, *self._final_states]

    def _final_step_due(self, i: int) -> bool:
        return self._final is not None and i == self.num_inference_steps - 1

    def _final_update(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the higher-order step to sigma = 0 (after the newest output was pushed to the history)."""
        step = self._final
        states = self._final_states if len(step.states) else []
        return lincomb(x, step.a, [*states, *self.history], [*step.states, *step.b])

    def _build_plan(self) -> list[Any]:
        raise NotImplementedError

    def _update(self, i: int, x: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Step ``i`` from state ``x`` given the converted model output ``d`` (x0 or eps)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ stepping
    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The network input: the sample itself (VP states need no scaling)."""
        return sample

    def convert_model_output(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """Model output at evaluation ``i`` -> what the history holds (x0 or eps), thresholded if asked."""
        alpha, sigma = float(self._eval_alpha[i]), float(self._eval_sigma[i])
        out = model_output.to(x.dtype)
        if self.history_kind == "data":
            x0 = to_data(out, x, alpha, sigma, self.config.prediction_type)
            if self.config.thresholding:
                x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            return x0
        if self.config.thresholding or alpha == 0.0:
            x0 = to_data(out, x, alpha, sigma, self.config.prediction_type)
            if self.config.thresholding:
                x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            if alpha == 0.0:  # pure noise: eps = x carries nothing, the first step needs the data prediction
                return x0
            return (x - alpha * x0) / sigma
        return to_noise(out, x, alpha, sigma, self.config.prediction_type)

    @property
    def _eval_alpha(self) -> np.ndarray:
        return self.grid_alpha

    @property
    def _eval_sigma(self) -> np.ndarray:
        return self.grid_sigma

    def _push(self, value: torch.Tensor, keep: int) -> None:
        self.history.insert(0, value)
        del self.history[keep:]

    def _state_tensor(self, sample: torch.Tensor) -> torch.Tensor:
        """The solver state: our float32/float64 copy when the pipeline hands back what we returned."""
        if self._state is not None and sample is self._returned:
            return self._state
        if sample.dtype in (torch.float32, torch.float64):
            return sample
        return sample.float()

    def grid_position(self, timestep: Any) -> int | None:
        """Index of ``timestep`` in ``timesteps`` if it is an element of that tensor (a view, e.g. from iterating
        ``timesteps[k:]``, recognised by its storage offset without reading the device), else None."""
        ts = self.timesteps
        if not isinstance(timestep, torch.Tensor) or ts.ndim != 1 or timestep.dtype != ts.dtype:
            return None
        base = ts if ts._base is None else ts._base
        if timestep._base is not base or not (timestep.numel() == 1 or not any(timestep.stride())):
            return None
        offset, stride = timestep.storage_offset() - ts.storage_offset(), ts.stride(0)
        if stride > 0 and offset % stride == 0 and 0 <= offset // stride < len(ts):
            return offset // stride
        return None

    def _start_index(self, timestep: Any) -> int:
        """Position of ``timestep`` in ``timesteps`` (the first step of a run without a begin index starts there, as
        in diffusers). Found without a device read for an element of ``timesteps`` (`grid_position`), a host
        number or a CPU tensor; a device tensor of any other origin is read once (one host sync per run)."""
        position = self.grid_position(timestep)
        if position is not None:
            return position
        if isinstance(timestep, torch.Tensor):
            value = float(timestep.detach().reshape(-1)[0])
        else:
            value = float(np.asarray(timestep, dtype=np.float64).reshape(-1)[0])
        host = self.host_timesteps
        k = int(np.abs(host - value).argmin())
        gap = np.abs(np.diff(host[max(k - 1, 0) : k + 2])).min() if len(host) > 1 else 1.0
        if abs(host[k] - value) > min(0.5, gap / 4):  # tolerates a float16 copy of a timestep, nothing more
            raise ValueError(f"timestep {value:g} passed to step() is not one of {type(self).__name__}.timesteps "
                             f"({self.host_timesteps[0]:g} ... {self.host_timesteps[-1]:g}); step through "
                             f"scheduler.timesteps, or call set_begin_index() before a run that starts mid-grid")
        return k

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        eta: float = 0.0,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Advance the sample by one evaluation. On the first call of a run without `set_begin_index`, the run
        starts at ``timestep``'s position in ``timesteps`` (diffusers' rule: a loop over ``timesteps[k:]`` starts at
        k, with the solver's warm-up from there; see `_start_index`); after that a step counter decides which
        coefficients apply. ``eta`` (DDIMPipeline) must be 0: use an SDE variant instead."""
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps()")
        if eta:
            raise ValueError(f"{type(self).__name__} is deterministic: eta must be 0, got {eta}")
        if self._step_index == 0 and self._begin_index is None:
            start = self._start_index(timestep)
            if start:
                self.set_begin_index(start)
        i = self._step_index
        if i >= len(self._plan):
            raise RuntimeError(f"step() called {i + 1} times but set_timesteps() planned {len(self._plan)} steps")
        if model_output.shape != sample.shape:
            if model_output.shape[1] == 2 * sample.shape[1] and model_output.shape[2:] == sample.shape[2:]:
                model_output = model_output[:, : sample.shape[1]]
            else:
                raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                                 f"{tuple(sample.shape)}")
        if self.config.check_finite and not bool(torch.isfinite(model_output).all()):
            raise FloatingPointError(f"model output at step {self.step_index} "
                                     f"(timestep {self.host_timesteps[self.step_index]:g}) has NaN/Inf")
        x = self._state_tensor(sample)
        prev = self._update(i, x, self.convert_model_output(model_output, x, i), generator)
        self._step_index = i + 1
        self._state = prev
        self._returned = prev if prev.dtype == sample.dtype else prev.to(sample.dtype)
        if not return_dict:
            return (self._returned,)
        return SchedulerOutput(prev_sample=self._returned)

    def _noise(self, like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """Standard normal noise drawn like diffusers' ``randn_tensor`` (float32, on the generator's device);
        a list of generators draws sample ``k`` from ``generator[k]``."""
        if isinstance(generator, (list, tuple)):
            z = torch.cat([torch.randn((1, *like.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                           .to(like.device) for g in generator])
        else:
            device = generator.device if generator is not None else like.device
            z = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
        return z.to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ diffusers utilities
    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """Flow forward process (diffusers' ``scale_noise``, SD3/Flux img2img and inpainting):
        (1 - sigma) x0 + sigma noise with sigma = timestep / num_train_timesteps, computed on the device."""
        if not self.is_flow:
            raise ValueError("scale_noise is the flow-matching forward process; this scheduler has noise_schedule="
                             f"{self.config.noise_schedule!r} (use add_noise)")
        t = torch.as_tensor(timestep, device=sample.device)
        sigma = (t.to(torch.float64) / self.config.num_train_timesteps).to(sample.dtype).reshape(
            (-1,) + (1,) * (sample.ndim - 1))
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = alpha_t x0 + sigma_t eps at the given (possibly fractional) timesteps."""
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(timesteps, dtype=torch.float64).cpu())
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).reshape(shape)
        sigma = sigma.to(original_samples.device, original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
