"""Feynman-Kac correctors (Skreta et al. 2025, arXiv 2503.02819): SMC for products of powers of densities.

Target q_t = prod_i p_{i,t}^{a_i}. With forward SDE dx = f dt + g dW (f = (d log alpha / dt) x) and scores
s_i, simulate in sampling time tau (= -t) the SDE with drift v = -f + g^2 sum_i a_i s_i and accumulate
log-weights at rate

    G = (S - 1) div f + 1/2 g^2 (||sum_i a_i s_i||^2 - sum_i a_i ||s_i||^2),        S = sum_i a_i,

which gives the paper's three cases (Props. 3.2 and 3.3 and the CFG case):

* annealing p^beta      a = (beta,):      (beta - 1) div f + 1/2 g^2 beta (beta - 1) ||s||^2   (Prop. 3.2)
* product p1 p2         a = (1, 1):       div f + g^2 <s1, s2>                                 (Prop. 3.3)
* CFG p_c^w p_u^(1-w)   a = (w, 1 - w):   1/2 g^2 w (w - 1) ||s_c - s_u||^2

(G is what makes the weighted SDE solve the Fokker-Planck-with-killing equation of q_t; the tests check it
against finite differences of an exact log q_t.) In x0 space s_i = alpha e_i / sigma^2 with e_i = D_i - x/alpha,
and g^2 d tau = 2 sigma^2 d lambda for any schedule, so freezing the e_i over a step [lambda, lambda'] integrates
exactly: log w += 1/2 Q (SNR' - SNR) + (S - 1) d log(alpha / alpha'), SNR = alpha^2 / sigma^2, with
Q = ||sum a_i e_i||^2 - sum a_i ||e_i||^2 = (1 - 1/S) ||sum a_i e_i||^2 - 1/(2S) sum_ij a_i a_j ||D_i - D_j||^2
(the second form avoids cancellation). The solver consumes the x0 of the drift, D = sum a_i D_i + (1 - S) x/alpha.
That frozen-e increment is ``weight_rule="frozen"``; the default ``"euler"`` is the paper's left-point rule,
G(x_i, t_i) times the step: Q alpha^2 / sigma^4 log(alpha' / alpha) (+ the same divergence term). ``clamp``
subtracts the population's mean increment and clamps it (the official code: 1 with Euler-Maruyama);
``start_resampling_step`` leaves the first steps unweighted (the official code's start window).
`FKCScheduler` (built by `FKC.scheduler`) is the step that integrates the guided SDE: Euler-Maruyama on the VP
SDE as in the paper (default), optionally with the tempered noise of annealing. docs/fidelity.md (FKC) gives the
measured comparison with a paper-style sampler.

The batch holds populations of K = ``num_particles`` consecutive particles (a pipeline's
``num_images_per_prompt``). Log-weights are float64 and normalised per population; a population is resampled
when its ESS <= ``ess_threshold`` * K (1.0: every step), then its weights are reset. The last step adds no
weight (its frozen-score integral diverges at sigma = 0; the official code also stops there) and never
resamples; at the end one particle per population is drawn from the final weights (`chosen`, `select`).
The SDE must be stochastic for the weights to be exact: `FKCScheduler` (`FKC.scheduler`; measured in
docs/fidelity.md), or e.g. ``DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++")``, ``DDPMScheduler``,
``DDIMScheduler`` with ``eta=1`` for S = 1 (these freeze the x0 of a drift whose exponents do not sum to one); with
an ODE sampler the weights are the usual heuristic (as the official EDM2 code does with Heun; diffusers' Heun is
weighted once per step, from its first stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from samplers.solvers.scheduler_base import ExponentialIntegratorScheduler, lincomb

from .base import Guider, check_real, sq_norm

MODES = ("cfg", "anneal", "product")
RESAMPLERS = ("systematic", "multinomial", "stratified")
WEIGHT_RULES = ("euler", "frozen")
#: what `FKC.scheduler` takes from another scheduler's config: the noise schedule and the model's output type
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr")
INTEGRATORS = ("exponential", "euler_maruyama")


def weight_exponents(mode: str, num_inputs: int, scale: float, beta: float) -> tuple[float, ...]:
    """Exponents a_i of the target prod_i p_i^{a_i} for the given inputs: cfg (w, 1 - w) on (cond, uncond);
    anneal beta (one input) or beta (w, 1 - w) (annealed CFG, two inputs); product (1, ..., 1) beta."""
    if mode == "product":
        if num_inputs < 2:
            raise ValueError(f"FKC mode='product' combines at least 2 experts, got {num_inputs} prediction(s)")
        return (beta,) * num_inputs
    if num_inputs == 2:
        return (beta * scale, beta * (1 - scale))
    if mode == "anneal" and num_inputs == 1:
        if scale != 1.0:
            raise ValueError(f"FKC scale={scale} needs an unconditional prediction; with one prediction use scale=1")
        return (beta,)
    raise ValueError(f"FKC mode={mode!r} combines (cond, uncond) predictions"
                     f"{' or one prediction' if mode == 'anneal' else ''}, got {num_inputs}")


def drift_data_prediction(x0: Sequence[torch.Tensor], x_over_alpha: torch.Tensor,
                          a: Sequence[float]) -> torch.Tensor:
    """The x0 whose score is sum_i a_i s_i: sum a_i D_i + (1 - S) x / alpha."""
    out = sum(ai * d for ai, d in zip(a, x0))
    rest = 1.0 - sum(a)
    return out + rest * x_over_alpha if abs(rest) > 1e-12 else out


def score_quadratic(x0: Sequence[torch.Tensor], x_over_alpha: torch.Tensor, a: Sequence[float]) -> torch.Tensor:
    """Q = ||sum a_i e_i||^2 - sum a_i ||e_i||^2 with e_i = D_i - x/alpha, per sample in float64 (with S = 1, as
    for CFG, only the pair term remains, so x / alpha is not needed: finite at pure noise, alpha = 0)."""
    s = sum(a)
    pairs = sum(a[i] * a[j] * sq_norm(x0[i] - x0[j]) for i in range(len(a)) for j in range(i + 1, len(a)))
    if abs(s - 1.0) <= 1e-12:
        return -pairs / s
    mixed = sum(ai * (d.double() - x_over_alpha.double()) for ai, d in zip(a, x0))
    return (1 - 1 / s) * sq_norm(mixed) - pairs / s


def log_weight_increment(q: torch.Tensor, a: Sequence[float], dim: int, alpha: float, sigma: float,
                         alpha_next: float, sigma_next: float, rule: str = "euler") -> torch.Tensor:
    """int G d tau over one step, (S - 1) d log(alpha / alpha') plus the score term: ``"frozen"`` (e_i frozen over
    the step) 1/2 Q (SNR' - SNR); ``"euler"`` (left point, the paper's rule) Q alpha^2 / sigma^4 log(alpha' /
    alpha), using int g^2 / 2 d tau = log(alpha' / alpha) on a VP schedule. From pure noise (alpha = 0, a flow
    schedule at sigma = 1) the Euler term is its limit 0, and exponents summing to 1 (CFG) have no (S - 1) term."""
    if rule == "frozen":
        score = 0.5 * q * ((alpha_next / sigma_next) ** 2 - (alpha / sigma) ** 2)
    else:
        score = q * (alpha**2 / sigma**4 * math.log(alpha_next / alpha)) if alpha > 0 else q * 0.0
    if abs(sum(a) - 1.0) <= 1e-12:
        return score
    return score + (sum(a) - 1) * dim * math.log(alpha / alpha_next)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum w_k^2 of the normalised weights, per population (rows of ``log_w``)."""
    return 1.0 / torch.softmax(log_w, dim=-1).square().sum(-1)


def resample_indices(weights: torch.Tensor, scheme: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (P, K) for normalised weights (P, K): systematic (one uniform per population),
    stratified (one uniform per stratum) or multinomial resampling (Douc & Cappe 2005); on the weights' device."""
    p, k = weights.shape
    if scheme == "multinomial":
        return torch.multinomial(weights, k, replacement=True, generator=generator)
    device = weights.device
    if scheme == "systematic":
        u = torch.rand(p, 1, generator=generator, dtype=torch.float64, device=device)
    elif scheme == "stratified":
        u = torch.rand(p, k, generator=generator, dtype=torch.float64, device=device)
    else:
        raise ValueError(f"resample must be one of {RESAMPLERS}, got {scheme!r}")
    points = (u + torch.arange(k, dtype=torch.float64, device=device)) / k
    return torch.searchsorted(weights.cumsum(-1).contiguous(), points.contiguous()).clamp(max=k - 1)


class FKC(Guider):
    """Feynman-Kac corrector guider (see module docstring).

    ``mode="cfg"``: target p_c^w p_u^(1-w) from ``[D_cond, D_uncond]`` (w = ``scale``); ``"anneal"``: p^beta from
    one prediction, or (p_c^w p_u^(1-w))^beta from two; ``"product"``: (p_1 p_2 ...)^beta from expert predictions.
    ``resample=None`` keeps the weights without resampling (importance sampling). ``seed`` makes the resampling
    draws reproducible (re-seeded every run, from a generator on the sampling device, so CPU and CUDA draw
    different streams). Weights, resampling and the history stay on the sampling device: no host sync per step.
    ``weight_rule`` ("euler": the paper's left-point rule; "frozen"), ``clamp`` (mean-subtracted increments
    clamped to [-clamp, clamp]; None: off) and ``start_resampling_step`` (steps before it are neither weighted
    nor resampled) follow the official code's options; `scheduler` builds the matching `FKCScheduler`.
    After a run: `chosen`, `select`, `history`.
    """

    num_inputs = None
    resamples = True

    def __init__(self, scale: float = 1.0, num_particles: int = 4, mode: str = "cfg", beta: float = 1.0,
                 resample: str | None = "systematic", ess_threshold: float = 1.0, seed: int | None = None,
                 weight_rule: str = "euler", clamp: float | None = None, start_resampling_step: int = 0):
        self.scale = check_real("scale", scale, low=0.0)
        if weight_rule not in WEIGHT_RULES:
            raise ValueError(f"weight_rule must be one of {WEIGHT_RULES}, got {weight_rule!r}")
        self.weight_rule = weight_rule
        self.clamp = None if clamp is None else check_real("clamp", clamp, low=0.0, low_open=True)
        if (isinstance(start_resampling_step, bool) or not isinstance(start_resampling_step, int)
                or start_resampling_step < 0):
            raise ValueError(f"start_resampling_step must be an integer >= 0, got {start_resampling_step!r}")
        self.start_resampling_step = start_resampling_step
        self._scheduler: object | None = None
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if resample is not None and resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {RESAMPLERS} or None, got {resample!r}")
        self.num_particles, self.mode, self.resample, self.seed = num_particles, mode, resample, seed
        self.beta = check_real("beta", beta, low=0.0, low_open=True)
        self.ess_threshold = check_real("ess_threshold", ess_threshold, low=0.0, high=1.0, low_open=True)
        self.reset()

    def reset(self) -> None:
        """Start a new sampling run: clear the log-weights, history and `chosen`, re-seed the resampling draws."""
        self.log_w: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None
        self._pending: tuple | None = None
        self._steps_done = 0
        self._history: dict[str, list[torch.Tensor]] = {"log_weights": [], "ess": [], "resampled": []}
        self._generator: torch.Generator | None = None

    def check_inputs(self, x0: Sequence[torch.Tensor]) -> None:
        """ValueError unless the number of predictions fits ``mode`` (see `weight_exponents`) and the batch is a
        whole number of populations of ``num_particles``."""
        weight_exponents(self.mode, len(x0), self.scale, self.beta)
        batch = x0[0].shape[0]
        if batch % self.num_particles:
            raise ValueError(f"FKC with num_particles={self.num_particles} needs a batch of populations x "
                             f"particles, got batch size {batch} (in a pipeline pass "
                             f"num_images_per_prompt={self.num_particles})")

    def combine(self, x0: Sequence[torch.Tensor], x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """The drift's data prediction D = sum_i a_i D_i + (1 - S) x / alpha; also keeps this evaluation's Q
        (`score_quadratic`) for the log-weight increment that `step_end` adds (Prop. 3.2 / 3.3, module docstring)."""
        a = weight_exponents(self.mode, len(x0), self.scale, self.beta)
        if alpha == 0.0 and abs(sum(a) - 1.0) > 1e-12:
            raise ValueError(f"FKC mode={self.mode!r} (exponents summing to {sum(a):g}, not 1) has no drift at pure "
                             "noise (alpha = 0, the first point of a flow schedule); use mode='cfg' there")
        x_over_alpha = x / alpha if alpha > 0.0 else torch.zeros_like(x)  # unused when S = 1
        if self.log_w is None:
            self.log_w = torch.zeros(x.shape[0] // self.num_particles, self.num_particles, dtype=torch.float64,
                                     device=x.device)
            if self.seed is not None:
                self._generator = torch.Generator(x.device).manual_seed(self.seed)
        wanted = getattr(getattr(self._scheduler, "config", None), "exponent_sum", None)
        if wanted is not None and abs(wanted - sum(a)) > 1e-9 * max(1.0, abs(wanted)):
            raise ValueError(f"{type(self._scheduler).__name__} was built for exponent_sum={wanted:g} but this "
                             f"FKC target has exponents summing to {sum(a):g}: build it with FKC.scheduler()")
        if self._pending is None:  # a multi-stage step (Heun) weights with its first stage: the left point
            self._pending = (score_quadratic(x0, x_over_alpha, a), a, x[0].numel(), alpha, sigma)
        return drift_data_prediction(x0, x_over_alpha, a)

    def step_end(self, alpha_next: float, sigma_next: float, last: bool) -> torch.Tensor | None:
        """Add the step's log-weight increment, record the history and resample; returns the flat ancestor
        index of every particle (itself where its population was not resampled), or None when resampling is off
        or at the last step. Which populations resample is decided on the device (no host sync)."""
        if self._pending is None:
            return None
        q, a, dim, alpha, sigma = self._pending
        self._pending = None
        active = not last and self._steps_done >= self.start_resampling_step
        self._steps_done += 1
        if active:
            inc = log_weight_increment(q, a, dim, alpha, sigma, alpha_next, sigma_next,
                                       self.weight_rule).view_as(self.log_w)
            if self.clamp is not None:
                inc = (inc - inc.mean(-1, keepdim=True)).clamp(-self.clamp, self.clamp)
            self.log_w += inc
        ess = effective_sample_size(self.log_w)
        do = torch.zeros_like(ess, dtype=torch.bool)
        if active and self.resample is not None:
            do = ess <= self.ess_threshold * self.num_particles * (1 + 1e-12)
        self._history["log_weights"].append(self.log_w.clone())
        self._history["ess"].append(ess)
        self._history["resampled"].append(do)
        if last:
            self.chosen = self._draw_chosen()
        if not active or self.resample is None:
            return None
        k, device = self.num_particles, self.log_w.device
        ancestors = resample_indices(torch.softmax(self.log_w, dim=-1), self.resample, self._generator)
        local = torch.where(do[:, None], ancestors, torch.arange(k, device=device))
        self.log_w = torch.where(do[:, None], 0.0, self.log_w)
        return (local + k * torch.arange(len(local), device=device)[:, None]).flatten()

    def _draw_chosen(self) -> torch.Tensor:
        pick = torch.multinomial(torch.softmax(self.log_w, dim=-1), 1, generator=self._generator)[:, 0]
        return pick + self.num_particles * torch.arange(len(pick), device=pick.device)

    def select(self, samples: torch.Tensor | Sequence) -> torch.Tensor | list:
        """One particle per population, drawn from the final weights (tensors or lists, e.g. PIL images)."""
        if self.chosen is None:
            raise RuntimeError("FKC.select needs a finished sampling run")
        if isinstance(samples, torch.Tensor):
            return samples[self.chosen.to(samples.device)]
        return [samples[int(i)] for i in self.chosen]

    @property
    def history(self) -> dict[str, torch.Tensor]:
        """Per step (steps, populations[, particles]): ``log_weights`` after the step's increment (before
        resampling), ``ess`` and ``resampled``."""
        return {k: torch.stack(v) if v else torch.empty(0) for k, v in self._history.items()}

    def bind(self, scheduler: object) -> None:
        """Remember the scheduler the driver runs with, so `combine` can check an `FKCScheduler`'s exponent sum."""
        self._scheduler = scheduler

    def exponent_sum(self, num_inputs: int = 2) -> float:
        """S = sum_i a_i of the target for ``num_inputs`` predictions (experts for ``mode="product"``)."""
        return sum(weight_exponents(self.mode, num_inputs, self.scale, self.beta))

    def scheduler(self, config: dict | None = None, num_inputs: int = 2, tempered_noise: bool = False,
                  **options: object) -> FKCScheduler:
        """An `FKCScheduler` for this target, with the noise schedule and prediction type of a scheduler
        ``config`` if given (its solver options are not taken); ``tempered_noise`` (annealing) uses noise
        g / sqrt(S) with drift (S + 1) / (2 S) g^2 s_q (the paper's tempered-noise SDE for p^beta: drift
        (beta + 1) / 2 g^2 s); ``num_inputs``: predictions per evaluation (1 for plain annealing, the number of
        experts for a product)."""
        s = self.exponent_sum(num_inputs)
        options = {"exponent_sum": s, "noise_scale": 1 / math.sqrt(s) if tempered_noise else 1.0, **options}
        schedule = {k: v for k, v in (config or {}).items() if k in SCHEDULE_KEYS}
        return FKCScheduler.from_config({**schedule, **options})

    def __repr__(self) -> str:
        return (f"FKC(scale={self.scale}, num_particles={self.num_particles}, mode={self.mode!r}, beta={self.beta}, "
                f"resample={self.resample!r}, ess_threshold={self.ess_threshold}, weight_rule={self.weight_rule!r}, "
                f"clamp={self.clamp}, start_resampling_step={self.start_resampling_step})")


def _phi(k: float, h: float) -> float:
    """(1 - e^{-k h}) / k, with its limit h at k = 0 and 1 / k at h = inf (k > 0)."""
    if math.isinf(h):
        return 1.0 / k
    return h if abs(k) < 1e-12 else -math.expm1(-k * h) / k


class FKCScheduler(ExponentialIntegratorScheduler):
    """First-order step of the guided reverse SDE dx = [-f x + c g^2 s_q] d tau + eta g dW, c = (1 + eta^2) / 2
    (``noise_scale`` eta; eta = 1 is the reverse SDE), whose score s_q = (alpha D - x) / sigma^2 comes from the
    drift's data prediction D = sum a_i D_i + (1 - S) x / alpha that FKC hands over (S = ``exponent_sum``).

    ``integrator="exponential"``: the linear part -f x - c g^2 S x / sigma^2 is integrated exactly with
    B = sum a_i D_i frozen (k = 2 c S, h = lambda' - lambda):
    x' = (alpha'/alpha) e^{-k h} x + alpha' (1 - e^{-k h}) / S B + eta sigma' sqrt((1 - e^{-2 (k-1) h}) / (k - 1)) z;
    with S = 1, eta = 1 it is SDE-DPM-Solver++(1). ``"euler_maruyama"``: Euler-Maruyama on the VP SDE in t
    with the coefficients at the step's start (f = -beta / 2, g^2 = beta): x' = x + (beta x / 2 + c beta s_q) dt
    + eta sqrt(beta dt) z, dt = t - t'. The weights (FKC) do not depend on eta.
    See docs/fidelity.md (FKC) for how this compares with the paper's sampler.
    """

    solver_options = {"solver_order": 1, "integrator": "euler_maruyama", "exponent_sum": 1.0, "noise_scale": 1.0,
                      "timestep_schedule": "linspace"}
    solver_orders = (1,)

    def _check_options(self) -> None:
        cfg = self.config
        if cfg.integrator not in INTEGRATORS:
            raise ValueError(f"integrator must be one of {INTEGRATORS}, got {cfg.integrator!r}")
        check_real("exponent_sum", cfg.exponent_sum, low=0.0, low_open=True)
        check_real("noise_scale", cfg.noise_scale, low=0.0)

    def _build_plan(self) -> list[tuple[float, float, float]]:
        alpha, sigma, lam = self.grid_alpha, self.grid_sigma, self.grid_lambda
        s, eta = float(self.config.exponent_sum), float(self.config.noise_scale)
        c = (1 + eta**2) / 2
        plan = []
        for i in range(self.num_inference_steps):
            a0, s0, a1, s1, h = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], lam[i + 1] - lam[i]
            if self.config.integrator == "euler_maruyama":
                g2dt = self._beta(self.grid_timesteps[i]) * (self.grid_timesteps[i] - self.grid_timesteps[i + 1])
                plan.append((1 + g2dt / 2 - c * g2dt / s0**2, c * g2dt * a0 / s0**2, eta * math.sqrt(g2dt)))
                continue
            k = 2 * c * s
            b = a1 * 2 * c * _phi(k, h)
            decay = 0.0 if math.isinf(h) else a1 / a0 * math.exp(-k * h)
            noise = 0.0 if s1 == 0 else eta * s1 * math.sqrt(2 * _phi(2 * (k - 1), h))
            plan.append((decay - b * (1 - s) / a0, b, noise))
        return plan

    def _beta(self, t: float) -> float:
        """beta(t) = g^2 = -2 d log alpha / dt (VP), by a central difference over one training step."""
        lo, hi = max(t - 0.5, self.schedule.t_min), min(t + 0.5, self.schedule.t_max)
        log_alpha = self.schedule.log_alpha(torch.tensor([lo, hi], dtype=torch.float64))
        return -2.0 * float(log_alpha[1] - log_alpha[0]) / (hi - lo)

    def _update(self, i: int, x: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        a, b, noise = self._plan[i]
        out = lincomb(x, a, [d], np.array([b]))
        if noise:
            out.add_(self._noise(x, generator), alpha=noise)
        return out
