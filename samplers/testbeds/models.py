"""Exact-score models: the ground truth for solver accuracy.

Each model has a closed-form posterior mean E[x0 | x_t] under x_t = alpha_t x0 + sigma_t eps and is wrapped to
look like a diffusers UNet: ``model(sample, timestep).sample`` returns the output of the configured
``prediction_type`` at the schedule's (possibly fractional) timestep. Computation is float64; the output is
cast to the input's dtype.

* `GaussianModel` - N(mu, U diag(l) U^T + s^2 I); the probability-flow ODE has a closed-form solution.
* `GaussianMixtureModel` - isotropic components N(mu_k, s_k^2 I) with weights w_k; optionally labelled by class
  (``class_labels=`` selects the conditional model p(x0 | c)).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from ..runtime.loop import ModelOutput
from ..solvers.prediction import check_prediction_type, from_data
from ..solvers.schedule import DiscreteVPSchedule, NoiseSchedule


def smooth_patterns(num: int, shape: tuple[int, ...], generator: torch.Generator, scale: float = 0.7) -> torch.Tensor:
    """``num`` smooth image-like patterns in about [-1, 1] (bilinearly upsampled 4x4 noise), float64."""
    c, h, w = shape
    coarse = torch.randn(num, c, 4, 4, generator=generator, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return scale * torch.tanh(fine)


class ExactScoreModel(torch.nn.Module):
    """Base: subclasses implement ``denoise(x, alpha, sigma, class_labels)`` = E[x0 | x_t = x] in float64."""

    def __init__(self, shape: tuple[int, ...], schedule: NoiseSchedule | None = None,
                 prediction_type: str = "epsilon"):
        super().__init__()
        self.shape = tuple(shape)
        self.schedule = schedule if schedule is not None else DiscreteVPSchedule.from_config({})
        self.prediction_type = check_prediction_type(prediction_type)
        self.register_buffer("_device_probe", torch.zeros((), dtype=torch.float64), persistent=False)
        self.config = SimpleNamespace(sample_size=self.shape[-1], in_channels=self.shape[0],
                                      out_channels=self.shape[0])
        self.num_calls = 0

    @classmethod
    def for_scheduler_config(cls, config: Mapping[str, Any], **kwargs: Any) -> ExactScoreModel:
        """Build with the noise schedule and prediction type of a diffusers scheduler config."""
        kwargs.setdefault("prediction_type", config.get("prediction_type", "epsilon"))
        return cls(schedule=DiscreteVPSchedule.from_config(config), **kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the model's (non-persistent) buffer, so ``.to(device)`` moves it like a diffusers model."""
        return self._device_probe.device

    @property
    def dtype(self) -> torch.dtype:
        """float32, the dtype pipelines cast inputs to; the computation itself is float64."""
        return torch.float32

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The posterior mean E[x0 | x_t = x] (float64) for x_t = alpha x0 + sigma eps; ``alpha`` and ``sigma`` are
        per-sample tensors broadcastable against ``x``, ``class_labels`` selects p(x0 | c) where supported."""
        raise NotImplementedError

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs: Any) -> ModelOutput | tuple[torch.Tensor]:
        """The exact ``prediction_type`` output at (possibly fractional, scalar or per-sample) ``timestep``, in the
        input's dtype, called like a diffusers UNet; extra keyword arguments are ignored. Counts ``num_calls``."""
        self.num_calls += 1
        x = sample.to(torch.float64)
        t = torch.as_tensor(timestep, dtype=torch.float64, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        alpha, sigma = self.schedule.alpha_sigma(t)
        view = (-1,) + (1,) * (x.ndim - 1)
        alpha, sigma = alpha.reshape(view), sigma.reshape(view)
        x0 = self.denoise(x, alpha, sigma, class_labels)
        out = from_data(x0, x, alpha, sigma, self.prediction_type).to(sample.dtype)
        return ModelOutput(sample=out) if return_dict else (out,)


class GaussianModel(ExactScoreModel):
    """Data N(mu, Sigma), Sigma = U diag(l) U^T + s^2 I with U (D x r) orthonormal."""

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), rank: int = 8, iso_std: float = 0.05,
                 seed: int = 0, **kwargs: Any):
        super().__init__(shape, **kwargs)
        g = torch.Generator().manual_seed(seed)
        dim = int(torch.tensor(shape).prod())
        self.mu = smooth_patterns(1, self.shape, g).reshape(dim)
        self.U = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0]
        self.l = torch.logspace(0, -2, rank, dtype=torch.float64) * 0.5
        self.iso_var = iso_std**2

    def _eigen_apply(self, y: torch.Tensor, fn_top: torch.Tensor, fn_iso: torch.Tensor) -> torch.Tensor:
        """Apply a spectral function: fn_top on span(U) (per eigenvalue), fn_iso on the complement."""
        U = self.U.to(y.device)
        c = y @ U
        return fn_iso * y + (c * (fn_top - fn_iso)) @ U.T

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian conditioning: E[x0 | x] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x - alpha mu), applied
        per eigen-direction of Sigma; ``class_labels`` is ignored (the model is unconditional)."""
        flat = x.reshape(x.shape[0], -1)
        a, s = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        mu = self.mu.to(x.device)
        ev_top = self.l.to(x.device) + self.iso_var
        y = flat - a * mu
        gain_top = a * ev_top / (a**2 * ev_top + s**2)
        gain_iso = a * self.iso_var / (a**2 * self.iso_var + s**2)
        return (mu + self._eigen_apply(y, gain_top, gain_iso)).reshape(x.shape)

    def ode_solution(self, x_s: torch.Tensor, t_s: float, t: float) -> torch.Tensor:
        """Exact probability-flow ODE map x_s -> x_t: each eigen-component of x - alpha mu scales by
        sqrt((sigma_t^2 + e alpha_t^2) / (sigma_s^2 + e alpha_s^2)) (Wang & Vastola 2024).
        ``t`` may be None for the data end (alpha = 1, sigma = 0)."""
        a_s, s_s = (float(v) for v in self.schedule.alpha_sigma(t_s))
        a_t, s_t = (1.0, 0.0) if t is None else (float(v) for v in self.schedule.alpha_sigma(t))
        flat = x_s.to(torch.float64).reshape(x_s.shape[0], -1)
        mu = self.mu.to(flat.device)
        ev_top = self.l.to(flat.device) + self.iso_var
        scale_top = torch.sqrt((s_t**2 + ev_top * a_t**2) / (s_s**2 + ev_top * a_s**2))
        scale_iso = ((s_t**2 + self.iso_var * a_t**2) / (s_s**2 + self.iso_var * a_s**2)) ** 0.5
        out = a_t * mu + self._eigen_apply(flat - a_s * mu, scale_top, torch.tensor(scale_iso, dtype=torch.float64))
        return out.reshape(x_s.shape)

    def sample_data(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact draws x0 ~ N(mu, Sigma), float64, shape (n, *shape)."""
        dim = self.mu.numel()
        z_top = torch.randn(n, self.U.shape[1], generator=generator, dtype=torch.float64) * self.l.sqrt()
        z_iso = torch.randn(n, dim, generator=generator, dtype=torch.float64) * self.iso_var**0.5
        return (self.mu + z_top @ self.U.T + z_iso).reshape(n, *self.shape)


class GaussianMixtureModel(ExactScoreModel):
    """Mixture of isotropic Gaussians N(mu_k, s_k^2 I), weights w_k; components may carry class labels."""

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), num_components: int = 8, std: float | tuple = 0.1,
                 seed: int = 0, num_classes: int | None = None, means: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(shape, **kwargs)
        g = torch.Generator().manual_seed(seed)
        dim = int(torch.tensor(shape).prod())
        if means is None:
            means = smooth_patterns(num_components, self.shape, g)
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, dim)
        k = self.means.shape[0]
        stds = torch.as_tensor(std, dtype=torch.float64).expand(k).clone()
        self.vars = stds**2
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.num_classes = num_classes
        self.labels = None if num_classes is None else torch.arange(k) % num_classes

    def log_responsibilities(self, flat: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                             class_labels: torch.Tensor | None) -> torch.Tensor:
        """log p(k | x_t) per sample and component, (B, K), for flat states (B, D) and per-sample ``a``, ``s`` (B, 1):
        log w_k + log N(x; a mu_k, (a^2 s_k^2 + s^2) I), normalised over k; with ``class_labels`` only the
        components of each sample's class count (ValueError if the mixture has no classes)."""
        means, var = self.means.to(flat.device), self.vars.to(flat.device)
        tot = a**2 * var + s**2  # (B, K)
        d2 = (flat.square().sum(1, keepdim=True) - 2 * a * flat @ means.T + a**2 * means.square().sum(1))
        logp = self.log_w.to(flat.device) - 0.5 * d2 / tot - 0.5 * flat.shape[1] * torch.log(tot)
        if class_labels is not None:
            if self.labels is None:
                raise ValueError("this mixture has no classes; build it with num_classes=")
            mask = self.labels.to(flat.device)[None, :] == torch.as_tensor(class_labels, device=flat.device)[:, None]
            logp = logp.masked_fill(~mask, -float("inf"))
        return torch.log_softmax(logp, dim=1)

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x] = sum_k r_k (mu_k + g_k (x - alpha mu_k)), g_k = alpha s_k^2 / (alpha^2 s_k^2 + sigma^2), with
        r_k the `log_responsibilities` (restricted to each sample's class when ``class_labels`` is given)."""
        flat = x.reshape(x.shape[0], -1)
        a, s = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        r = self.log_responsibilities(flat, a, s, class_labels).exp()  # (B, K)
        means, var = self.means.to(x.device), self.vars.to(x.device)
        gain = a * var / (a**2 * var + s**2)  # (B, K)
        # E[x0|x] = sum_k r_k (mu_k + gain_k (x - a mu_k))
        x0 = (r * (1 - a * gain)) @ means + (r * gain).sum(1, keepdim=True) * flat
        return x0.reshape(x.shape)

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact rectified-flow velocity E[eps - x0 | x_sigma = x] (alpha = 1 - sigma), float64, without dividing
        by sigma: sum_k r_k ((sigma - alpha s_k^2) (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2) - mu_k), so it is
        finite at sigma = 0 (v = -x) and at sigma = 1."""
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        a = torch.full((x.shape[0], 1), 1.0 - sigma, dtype=torch.float64, device=x.device)
        s = torch.full_like(a, sigma)
        r = self.log_responsibilities(flat, a, s, None).exp()  # (B, K)
        means, var = self.means.to(x.device), self.vars.to(x.device)
        w = r * (s - a * var) / (a**2 * var + s**2)  # (B, K)
        v = w.sum(1, keepdim=True) * flat - (w * a + r) @ means
        return v.reshape(x.shape)

    def sample_data(self, n: int, generator: torch.Generator, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` exact draws from the mixture, float64, shape (n, *shape); with ``class_labels`` (n labels, needs
        ``num_classes``) sample i is drawn from p(x0 | c_i)."""
        probs = self.log_w.exp()
        if class_labels is None:
            comp = torch.multinomial(probs, n, replacement=True, generator=generator)
        else:
            comp = torch.stack([torch.multinomial(probs * (self.labels == c), 1, generator=generator)[0]
                                for c in torch.as_tensor(class_labels).tolist()])
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[comp] + noise * self.vars[comp].sqrt()[:, None]).reshape(n, *self.shape)
