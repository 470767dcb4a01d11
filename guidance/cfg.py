"""Classifier-free guidance (Ho & Salimans 2022) and adaptive projected guidance (Sadat et al. 2025).

Both act on the data predictions D_c (conditional) and D_u (unconditional) at one evaluation.

APG conventions compared (all three share the projection onto the conditional prediction):

============================  ==========================  =============================  ==========================
                              ours (paper, Alg. 1)        diffusers AdaptiveProjected-   ComfyUI ``APG`` node
                                                          Guidance (0.42)
============================  ==========================  =============================  ==========================
applied to                    denoised D (x0)             the pipeline's prediction      denoised (ComfyUI models
                                                          (eps for SD)                   output x0)
output                        D_c + (w - 1) * update      D_u + w * update (default;     D_c + w * update
                                                          ``use_original_formulation``:
                                                          D_c + w * update, Ho & Salimans'
                                                          w, i.e. ours at scale w + 1)
eta (parallel part)           0.0                         1.0                            1.0
norm threshold r              2.5                         15.0 (``..._rescale``)         5.0
momentum beta                 -0.5 (reverse, beta < 0)    None (off)                     0.0, range [0, 1]
momentum update               run <- diff + beta_h * run  same, beta per call            same; also resets the
                              (beta_h: beta decayed with                                 average when sigma rises
                              the log-SNR step, see APG)
projection precision          float64                     float64                        model dtype
============================  ==========================  =============================  ==========================

Momentum and the step size: ours reads beta as the momentum per ``momentum_step`` of log-SNR
lambda = log(alpha / sigma) and applies beta_h = sign(beta) |beta|^max(1, h / momentum_step) for a step of h: the
paper's beta on fine grids (the default 0.2 is about the step of a 50-step grid, where the paper tuned beta),
fading momentum on coarse ones. ``momentum_step=None`` applies beta once per step whatever its size (the paper,
diffusers, ComfyUI). Why, and the measured effect on coarse grids: docs/guidance-in-a-pipeline.md.

So ours with eta=1, r=0, beta=0 is exactly CFG; diffusers' default is CFG only when eta=1 and r=0 too
(D_u + w * diff), and ComfyUI's eta=1, r=0, beta=0 is CFG with scale w + 1. With eta != 1 the conventions
differ beyond the scale: without threshold and momentum, D_c + (w - 1) * update - (D_u + w * update) =
(1 - eta) * diff_parallel. Because ours works on D rather than eps, the norm threshold is in data units:
||D_c - D_u|| per sample over all non-batch dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from samplers.runtime.loop import ModelOutput

from .base import Guider, batch_dims, check_real


def classifier_free(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The classifier-free guidance combination uncond + w (cond - uncond) (Ho & Salimans 2022, Eq. 6 written
    with w = 1 + their w). It is affine in its inputs, so at a fixed state x_t it gives the same guided x0
    whether applied to x0, eps or v predictions (all affine in x0 at fixed x_t)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4): match the per-sample std of the guided prediction to the
    conditional one, D <- phi * D * std(D_c) / std(D) + (1 - phi) * D. Applied here to the x0 prediction
    (diffusers' ``rescale_noise_cfg`` applies the same formula to the noise prediction)."""
    dims = batch_dims(guided)
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * guided * ratio + (1 - rescale) * guided


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample split of ``v`` into the parts parallel and orthogonal to ``onto`` (in float64)."""
    dims = batch_dims(v)
    v64, unit = v.double(), torch.nn.functional.normalize(onto.double().flatten(1), dim=1).view(onto.shape)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


class CFG(Guider):
    """Classifier-free guidance D = D_u + w (D_c - D_u), optionally with guidance rescale ``rescale`` in [0, 1].

    Inputs: ``[D_cond, D_uncond]``. w = 1 is the conditional model, w = 0 the unconditional one.
    """

    registry_name = "cfg"

    def __init__(self, scale: float, rescale: float = 0.0):
        self.scale = check_real("scale", scale, low=0.0)
        self.rescale = check_real("rescale", rescale, low=0.0, high=1.0)

    def combine(self, x0: Sequence[torch.Tensor], x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """D = D_u + w (D_c - D_u) (Ho & Salimans 2022, written on x0), then guidance rescale (Lin et al. 2023,
        Sec. 3.4) when ``rescale`` > 0."""
        cond, uncond = x0
        guided = classifier_free(cond, uncond, self.scale)
        return rescale_guidance(guided, cond, self.rescale) if self.rescale else guided

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale}, rescale={self.rescale})"


class APG(Guider):
    """Adaptive projected guidance (Sadat et al. 2025, Algorithm 1) on the data prediction.

    diff = D_c - D_u; with momentum, diff <- diff + beta_h * running (running <- diff, once per solver step);
    diff *= min(1, r / ||diff||) per sample (r = ``norm_threshold``, 0 disables); diff = diff_perp + eta diff_par
    with respect to D_c (float64); output D_c + (w - 1) diff. eta=1, r=0, beta=0 is exactly CFG.
    beta_h = sign(beta) |beta|^max(1, h / momentum_step) for a step of h in log-SNR since the running average was
    committed (``momentum_step=None``: beta_h = beta, the paper's per-step rule); see the module docstring.
    Paper defaults: eta = 0, beta in [-0.75, -0.5], r model dependent (2.5 to 15; in data units, a per-sample norm,
    so smaller for small images).
    Inputs: ``[D_cond, D_uncond]``. See the module docstring for diffusers' and ComfyUI's conventions.
    """

    registry_name = "apg"

    def __init__(self, scale: float, eta: float = 0.0, norm_threshold: float = 2.5, momentum: float = -0.5,
                 momentum_step: float | None = 0.2):
        self.scale = check_real("scale", scale, low=0.0)
        self.eta = check_real("eta", eta)
        self.norm_threshold = check_real("norm_threshold", norm_threshold, low=0.0)
        self.momentum = check_real("momentum", momentum, low=-1.0, high=1.0, low_open=True, high_open=True)
        self.momentum_step = (None if momentum_step is None
                              else check_real("momentum_step", momentum_step, low=0.0, low_open=True))
        self.has_step_state = self.momentum != 0.0
        self.reset()

    def reset(self) -> None:
        """Start a new sampling run: drop the momentum running average."""
        self.running: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self.running_lambda: float | None = None  # log-SNR of the step that produced ``running``
        self._pending_lambda: float | None = None
        self.steps_advanced = 0

    def advance(self) -> None:
        """Commit the last step's momentum-adjusted difference as the running average (Algorithm 1, once per
        solver step)."""
        if self._pending is not None:
            self.running, self.running_lambda = self._pending, self._pending_lambda
            self.steps_advanced += 1

    def step_momentum(self, lam: float | None) -> float:
        """beta_h for an evaluation at log-SNR ``lam``: beta decayed as |beta|^(h / momentum_step) over the step
        h = lam - lambda(running) when that exceeds ``momentum_step``; beta itself otherwise or when unknown."""
        if self.momentum_step is None or lam is None or self.running_lambda is None:
            return self.momentum
        exponent = max(1.0, (lam - self.running_lambda) / self.momentum_step)
        return math.copysign(abs(self.momentum) ** exponent, self.momentum)

    def combine(self, x0: Sequence[torch.Tensor], x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """Algorithm 1 of Sadat et al. 2025 on x0: diff = D_c - D_u plus momentum beta * running (kept for
        `advance`), rescaled to norm <= r (r = 0: off), split by the projection diff_par = (<diff, D_c> /
        ||D_c||^2) D_c, diff_perp = diff - diff_par (float64); returns D_c + (w - 1) (diff_perp + eta diff_par)."""
        cond, uncond = x0
        diff = cond - uncond
        if self.momentum:
            lam = math.log(alpha / sigma) if alpha > 0 and sigma > 0 else None
            if self.running is not None:
                diff = diff + self.step_momentum(lam) * self.running.to(diff)
            self._pending, self._pending_lambda = diff, lam
        if self.norm_threshold > 0:
            norm = diff.flatten(1).norm(dim=1).view(-1, *(1,) * (diff.ndim - 1))
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        parallel, orthogonal = project(diff, cond)
        return cond + (self.scale - 1) * (orthogonal + self.eta * parallel)

    def __repr__(self) -> str:
        return (f"APG(scale={self.scale}, eta={self.eta}, norm_threshold={self.norm_threshold}, "
                f"momentum={self.momentum}, momentum_step={self.momentum_step})")


class ClassifierFreeGuidedModel(torch.nn.Module):
    """A class-conditional diffusers-style model under classifier-free guidance with fixed labels, as one model
    (for the tools that take a model rather than a guider and a scheduler: `samplers.sample`,
    `samplers.search_dc_ratios`, `samplers.solvers.dc_solver.reference_trajectory`):
    out = `classifier_free`(out_c, out_u, w) on the model's own outputs. All prediction types are affine in x0 at
    a fixed x_t, so this equals `CFG` (w) on the data predictions, x0 = x0_u + w (x0_c - x0_u).
    ``class_labels`` must match the batch the sampler passes in."""

    def __init__(self, model: Callable[..., Any], class_labels: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.model, self.class_labels, self.guidance_scale = model, class_labels, float(guidance_scale)

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> ModelOutput:
        """The guided output, from one unconditional and one conditional call of the model (``kwargs`` are ignored)."""
        if sample.shape[0] != self.class_labels.shape[0]:
            raise ValueError(f"batch of {sample.shape[0]} samples but {self.class_labels.shape[0]} class labels")
        uncond = self.model(sample, timestep).sample
        cond = self.model(sample, timestep, class_labels=self.class_labels).sample
        return ModelOutput(sample=classifier_free(cond, uncond, self.guidance_scale))
