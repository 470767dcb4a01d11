"""Gaussian teleportation (Wang & Vastola 2024, "The unreasonable effectiveness of Gaussian score approximation
for diffusion models and its applications"): while the noise is high the data distribution looks Gaussian, so
the probability-flow ODE from pure noise to a skip time has a closed form; the wrapped solver continues from there
on the remaining grid, saving the model evaluations of the skipped steps.

For data N(mu, Sigma), Sigma = sum_k l_k u_k u_k^T (+ a residual variance on the complement), the VP denoiser is
D(x) = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu) and the ODE solution is (paper eq. 9)

    x_t = alpha_t mu + sum_k sqrt((sigma_t^2 + l_k alpha_t^2) / (sigma_s^2 + l_k alpha_s^2)) c_k u_k,
    c_k = u_k^T (x_s - alpha_s mu),

the complement of span(u) scaling by the same factor with l = residual variance (sigma_t / sigma_s when 0).

Where the jump happens (`GaussianTeleport`): ``timesteps`` are only the remaining grid (NFE = n - skip index).
The jump is applied to the sample passed to ``scale_model_input`` at the first step, so the first network call
already sees the teleported state: zero overhead in `samplers.sample` and in pipelines that call
``scale_model_input`` (StableDiffusionPipeline and most diffusers pipelines). Pipelines that never call it
(DDPMPipeline, DDIMPipeline) evaluate the network once on x_T: the first ``step()`` then discards that output,
returns the teleported state and the live ``timesteps`` iteration yields the skip timestep once more - exactly
one extra model evaluation (``extra_nfe``), still n - skip index + 1 in all. Fidelity: docs/fidelity.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ..runtime.loop import model_device_dtype, model_fn_from_unet
from ..solvers.prediction import to_data
from ..solvers.schedule import model_schedule
from .base import SchedulerWrapper, SpecContext, grid_arguments, host_timesteps_of, start_at
from .timeshift import TimeShift

__all__ = ["GaussianStats", "GaussianTeleport"]

STATS_FILE = "gaussian_teleport_stats.npz"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz", ".pt")
MAX_FULL_DIM = 8192
STATS_KEYS = ("mean", "eigvecs", "eigvals", "residual_var")


@dataclass
class GaussianStats:
    """Mean and covariance U diag(eigvals) U^T + residual_var (I - U U^T) of data in model space.

    ``mean`` has the sample shape (e.g. 3x32x32); ``eigvecs`` is (D, r) with orthonormal columns, ``eigvals``
    (r,) >= 0. Full covariance: r = D. Computations are float64.
    """

    mean: torch.Tensor
    eigvecs: torch.Tensor
    eigvals: torch.Tensor
    residual_var: float = 0.0

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float64).cpu()
        self.eigvecs = torch.as_tensor(self.eigvecs, dtype=torch.float64).cpu()
        self.eigvals = torch.as_tensor(self.eigvals, dtype=torch.float64).cpu()
        self.residual_var = float(self.residual_var)
        dim = self.mean.numel()
        if self.mean.ndim == 0:
            raise ValueError("mean must have the sample shape (e.g. (3, 32, 32)), got a scalar")
        if self.eigvecs.ndim != 2 or self.eigvecs.shape[0] != dim:
            raise ValueError(f"eigvecs must have shape ({dim}, rank) for a mean of shape {tuple(self.mean.shape)}, "
                             f"got {tuple(self.eigvecs.shape)}")
        if self.eigvals.shape != (self.eigvecs.shape[1],):
            raise ValueError(f"eigvals must have shape ({self.eigvecs.shape[1]},) to match eigvecs, "
                             f"got {tuple(self.eigvals.shape)}")
        if not bool(torch.isfinite(self.eigvals).all()) or bool((self.eigvals < 0).any()):
            raise ValueError("eigvals must be finite and >= 0 (a covariance is positive semi-definite)")
        if not math.isfinite(self.residual_var) or self.residual_var < 0:
            raise ValueError(f"residual_var must be finite and >= 0, got {self.residual_var}")
        probe = torch.randn(self.rank, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        if not torch.allclose(self.eigvecs.T @ (self.eigvecs @ probe), probe, atol=1e-6):  # U^T U = I, O(D r)
            raise ValueError("eigvecs must have orthonormal columns")
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_covariance(cls, mean: torch.Tensor, cov: torch.Tensor, rank: int | None = None) -> GaussianStats:
        """Eigendecompose a (D, D) covariance; keep the top ``rank`` directions (all if None), the mean of the
        dropped eigenvalues becoming the residual variance."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        dim = mean.numel()
        if cov.shape != (dim, dim):
            raise ValueError(f"cov must have shape ({dim}, {dim}) for a mean of shape {tuple(mean.shape)}, "
                             f"got {tuple(cov.shape)}")
        vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
        return cls._truncate(mean, vecs, vals, float(vals.sum()), rank)

    @classmethod
    def from_samples(cls, samples: torch.Tensor, rank: int | None = None) -> GaussianStats:
        """Per-pixel mean and covariance of ``samples`` (N, *shape) (unbiased, float64); ``rank`` keeps the top
        directions (needed above D = 8192 values)."""
        x = torch.as_tensor(samples).to(torch.float64).cpu()
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"samples must have shape (N >= 2, *sample_shape), got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        mean, dim = flat.mean(0), flat.shape[1]
        centred = flat - mean
        if rank is None and dim > MAX_FULL_DIM:
            raise ValueError(f"a full covariance of D={dim} values is too large; pass rank= (e.g. rank=256)")
        if dim <= MAX_FULL_DIM:
            return cls.from_covariance(mean.reshape(x.shape[1:]), centred.T @ centred / (x.shape[0] - 1), rank)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        vals = s.square() / (x.shape[0] - 1)
        total = float(centred.square().sum()) / (x.shape[0] - 1)
        return cls._truncate(mean.reshape(x.shape[1:]), vh.T, vals, total, rank)

    @classmethod
    def from_folder(cls, path: str | Path, rank: int | None = None, size: int | tuple[int, int] | None = None,
                    limit: int | None = None) -> GaussianStats:
        """Statistics of a data set folder: images (png, jpg, ...) are mapped to [-1, 1] (pixel-space DDPMs),
        optionally resized to ``size``; .npy / .npz / .pt arrays of shape (N, *shape) are used as they are
        (e.g. VAE latents). ``limit`` caps the number of samples."""
        return cls.from_samples(load_folder(path, size=size, limit=limit), rank=rank)

    @classmethod
    def _truncate(cls, mean: torch.Tensor, vecs: torch.Tensor, vals: torch.Tensor, total: float,
                  rank: int | None) -> GaussianStats:
        dim = mean.numel()
        if rank is None:
            return cls(mean, vecs, vals)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim:
            raise ValueError(f"rank must be an int in [1, {dim}], got {rank!r}")
        rank = min(rank, vals.numel())
        residual = max(total - float(vals[:rank].sum()), 0.0) / max(dim - rank, 1)
        return cls(mean, vecs[:, :rank], vals[:rank], residual if rank < dim else 0.0)

    def save(self, path: str | Path) -> None:
        """Write an .npz with ``mean``, ``eigvecs``, ``eigvals``, ``residual_var``."""
        np.savez(path, mean=self.mean.numpy(), eigvecs=self.eigvecs.numpy(), eigvals=self.eigvals.numpy(),
                 residual_var=np.float64(self.residual_var))

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        """Read stats written by `save`; ValueError if the file lacks one of the arrays."""
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in STATS_KEYS if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not a GaussianStats file: it lacks {missing}")
            return cls(*(torch.from_numpy(np.array(data[k])) for k in STATS_KEYS[:3]), float(data["residual_var"]))

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample the stats describe."""
        return tuple(self.mean.shape)

    @property
    def rank(self) -> int:
        """Number of eigen-directions kept (the rest share ``residual_var``)."""
        return self.eigvecs.shape[1]

    @property
    def pixel_std(self) -> float:
        """sqrt(trace(Sigma) / D): the data's typical per-value standard deviation."""
        dim = self.mean.numel()
        return math.sqrt((float(self.eigvals.sum()) + self.residual_var * (dim - self.rank)) / dim)

    def check_shape(self, shape: Sequence[int], who: str = "GaussianStats") -> None:
        """ValueError unless ``shape`` (one sample's shape) is the shape the stats were computed in."""
        if tuple(shape) != self.shape:
            raise ValueError(f"{who}: the stats have sample shape {self.shape} but the sample has shape "
                             f"{tuple(shape)}; compute the stats in the model's input space")

    # ------------------------------------------------------------------ closed forms
    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.mean.reshape(-1).to(device), self.eigvecs.to(device),
                                          self.eigvals.to(device))
        return self._device_cache[device]

    def _spectral(self, y: torch.Tensor, f_top: torch.Tensor, f_rest: float) -> torch.Tensor:
        """f(Sigma) y for a spectral function given on the eigenvalues (f_top) and the residual (f_rest)."""
        _, vecs, _ = self._on(y.device)
        return f_rest * y + ((y @ vecs) * (f_top - f_rest)) @ vecs.T

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        self.check_shape(x.shape[1:])
        return x.to(torch.float64).reshape(x.shape[0], -1)

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x0 | x_t = x] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu), float64."""
        flat = self._flat(x)
        mean, _, vals = self._on(flat.device)

        def gain(v: torch.Tensor | float) -> torch.Tensor | float:
            return alpha * v / (alpha**2 * v + sigma**2)

        return (mean + self._spectral(flat - alpha * mean, gain(vals), gain(self.residual_var))).reshape(x.shape)

    def flow(self, x: torch.Tensor, source: tuple[float, float], target: tuple[float, float]) -> torch.Tensor:
        """Exact probability-flow ODE map from (alpha_s, sigma_s) to (alpha_t, sigma_t) (paper eq. 9), float64."""
        (a_s, s_s), (a_t, s_t) = source, target
        flat = self._flat(x)
        mean, _, vals = self._on(flat.device)

        def scale(v: torch.Tensor | float) -> torch.Tensor | float:
            ratio = (s_t**2 + v * a_t**2) / (s_s**2 + v * a_s**2)
            return ratio.sqrt() if isinstance(ratio, torch.Tensor) else math.sqrt(ratio)

        return (a_t * mean + self._spectral(flat - a_s * mean, scale(vals), scale(self.residual_var))).reshape(x.shape)


def _load_image(file: Path, size: int | tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image

    with Image.open(file) as img:
        img = img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB")
        if size is not None:
            img = img.resize((size, size) if isinstance(size, int) else (size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float64) / 127.5 - 1.0
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _load_array(file: Path) -> torch.Tensor:
    if file.suffix == ".pt":
        return torch.as_tensor(torch.load(file, map_location="cpu", weights_only=True))
    if file.suffix == ".npy":
        return torch.from_numpy(np.load(file, allow_pickle=False))
    with np.load(file, allow_pickle=False) as data:
        return torch.from_numpy(np.array(data[data.files[0]]))


def load_folder(path: str | Path, size: int | tuple[int, int] | None = None, limit: int | None = None) -> torch.Tensor:
    """All samples of a folder as one float64 tensor (N, *shape): images in [-1, 1], arrays as stored."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no data set folder at {folder}")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) or arrays "
                                f"({', '.join(ARRAY_SUFFIXES)})")
    chunks, count, shape = [], 0, None
    for file in files:
        batch = _load_image(file, size)[None] if file.suffix.lower() in IMAGE_SUFFIXES else _load_array(file)
        if shape is None:
            shape = tuple(batch.shape[1:])
        if tuple(batch.shape[1:]) != shape:
            raise ValueError(f"{file} has sample shape {tuple(batch.shape[1:])}, earlier files {shape}; "
                             f"pass size= to resize images")
        chunks.append(batch.to(torch.float64))
        count += batch.shape[0]
        if limit is not None and count >= limit:
            break
    return torch.cat(chunks)[:limit]


class GaussianTeleport(SchedulerWrapper):
    """Jump from pure noise to the skip time with the closed-form Gaussian ODE map, then run the wrapped solver
    on the remaining grid (see the module docstring for where the jump happens in each kind of loop).

    ``skip`` is the fraction of the step grid jumped over: with ``set_timesteps(n)`` the first
    round(skip * n) grid steps are replaced (at most n - 1). ``skip="auto"`` jumps to the last grid time at
    which the Gaussian denoiser and the model's denoiser still agree: on ``num_probes`` teleported probe states
    x_j, their disagreement is measured in noise units, d_j = RMS(alpha_j / sigma_j (D_model - D_gauss))
    (= RMS(eps_model - eps_gauss), the size of the change it makes to the ODE's velocity; in data units a learned
    eps-network's own error is amplified by sigma / alpha at high noise), minus the network's error floor
    d_1 at the noisiest probed time (in quadrature): grid time j is accepted while
    sqrt(max(d_j^2 - d_1^2, 0)) <= ``tol``. It needs a model, given as ``probe_model=`` (calibrated on
    ``set_timesteps``, cached per step count) or via `calibrate`. Calibration costs one batched model call per
    grid time it examines (``calibrations[n]["extra_nfe"]``), once per step count, not per sample.
    Put this wrapper innermost: ``TimeShift(DualFast(GaussianTeleport(s)))``.
    """

    registry_name = "teleport"

    @classmethod
    def from_spec(cls, scheduler: Any, options: dict[str, Any], context: SpecContext) -> GaussianTeleport:
        """From sweep options: ``stats: exact`` (default) takes the exact data moments of an exact-score model,
        ``stats: <file>`` a `GaussianStats.save` file; ``skip: auto`` probes with the model under test."""
        options = dict(options)
        source = options.pop("stats", "exact")
        if source == "exact":
            moments = context.exact_moments()
            if moments is None:
                raise ValueError(f"model {context.label} has no exact data moments; "
                                 "give stats: <file written by GaussianStats.save>")
            options["stats"] = GaussianStats.from_covariance(*moments)
        else:
            options["stats"] = GaussianStats.load(source)
        if options.get("skip") == "auto":
            options.setdefault("probe_model", context.network())
        return cls(scheduler, **options)

    def __init__(self, scheduler: Any, stats: GaussianStats, skip: float | str = 0.2, *, probe_model: Any = None,
                 tol: float = 0.02, num_probes: int = 4, seed: int = 0,
                 model_kwargs: dict[str, Any] | None = None):
        super().__init__(scheduler)
        inner = scheduler
        while isinstance(inner, SchedulerWrapper):
            if isinstance(inner, TimeShift):
                raise TypeError("GaussianTeleport must be innermost: wrap it instead, "
                                "e.g. TimeShift(DualFast(GaussianTeleport(scheduler, stats)))")
            inner = inner.inner
        if not isinstance(stats, GaussianStats):
            raise TypeError(f"stats must be a GaussianStats, got {type(stats).__name__}")
        if skip != "auto" and (isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip < 1):
            raise ValueError(f"skip must be in [0, 1) (the fraction of the step grid to jump over) or 'auto', "
                             f"got {skip!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
        self.stats, self.skip, self.tol, self.num_probes, self.seed = stats, skip, float(tol), num_probes, seed
        self.probe_model, self.model_kwargs = probe_model, dict(model_kwargs or {})
        self.schedule = model_schedule(scheduler, "GaussianTeleport")[0]
        self.calibrations: dict[int, dict[str, Any]] = {}

    def _describe(self) -> str:
        return f"skip={self.skip!r}, stats rank {self.stats.rank} of {self.stats.mean.numel()}"

    def _saved_options(self, directory: Path) -> dict[str, Any]:
        """Options, the stats (``gaussian_teleport_stats.npz``) and the skip calibrations made so far (a loaded
        ``skip="auto"`` teleport needs no probe model for those step counts). ``probe_model`` and its
        ``model_kwargs`` are not saved."""
        self.stats.save(directory / STATS_FILE)
        return {"skip": self.skip, "tol": self.tol, "num_probes": self.num_probes, "seed": self.seed,
                "calibrations": self.calibrations}

    @classmethod
    def _from_saved(cls, inner: Any, options: dict[str, Any], directory: Path) -> GaussianTeleport:
        calibrations = options.pop("calibrations", {})
        teleport = cls(inner, GaussianStats.load(directory / STATS_FILE), **options)
        teleport.calibrations = {int(n): calibration for n, calibration in calibrations.items()}
        return teleport

    def _reset(self) -> None:
        super()._reset()
        self._full: torch.Tensor | None = None
        self._full_host = np.zeros(0)
        self.skip_index = 0
        self._jump_done = self._jump_input = self._repeat = False
        self.extra_nfe = 0

    # ------------------------------------------------------------------ grid
    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        """The wrapped scheduler's grid; the skip index is chosen (``skip`` or the calibration) and the wrapped
        scheduler starts there."""
        self.inner.set_timesteps(num_inference_steps, device, **grid_arguments(sigmas, mu, timesteps))
        self._reset()
        full = torch.as_tensor(self.inner.timesteps).as_subclass(torch.Tensor).clone()
        self._full_host = host_timesteps_of(self.inner).copy()
        self.skip_index = self._skip_index(full)
        self._full = full
        if self.skip_index:
            start_at(self.inner, self.skip_index)

    def _skip_index(self, full: torch.Tensor) -> int:
        n = len(full)
        if self.skip != "auto":
            return min(int(math.floor(self.skip * n + 0.5)), n - 1)
        if n not in self.calibrations:
            if self.probe_model is None:
                raise RuntimeError("skip='auto' needs a model to probe: pass probe_model= to GaussianTeleport or "
                                   f"call calibrate(model, {n}) before set_timesteps({n})")
            self.calibrations[n] = self._calibrate(self.probe_model, full)
        return self.calibrations[n]["skip_index"]

    @property
    def full_timesteps(self) -> torch.Tensor:
        """The wrapped solver's whole grid; the jump starts at its first and lands on its ``skip_index``-th."""
        if self._full is None:
            raise RuntimeError("call set_timesteps first")
        return self._full

    @property
    def skip_timestep(self) -> float:
        """The timestep the jump lands on (the first remaining timestep)."""
        if self._full is None:
            raise RuntimeError("call set_timesteps first")
        return float(self._full_host[self.skip_index])

    def _nominal_timesteps(self) -> torch.Tensor:
        return super()._nominal_timesteps() if self._full is None else self._full[self.skip_index:]

    def _host_nominal_timesteps(self) -> np.ndarray:
        return super()._host_nominal_timesteps() if self._full is None else self._full_host[self.skip_index:]

    def _inner_iter(self) -> Iterator[tuple[torch.Tensor, float | None]]:
        return zip(self._nominal_timesteps().unbind(0), self.host_timesteps.tolist())

    def _repeat_element(self) -> bool:
        repeat, self._repeat = self._repeat, False
        return repeat

    # ------------------------------------------------------------------ the jump
    def _pending_jump(self) -> bool:
        return self.skip_index > 0 and not self._jump_done

    @property
    def discards_next_output(self) -> bool:
        return (self._pending_jump() and not self._jump_input) or super().discards_next_output

    def teleport(self, sample: torch.Tensor) -> torch.Tensor:
        """x_T (the state at the first grid time) -> the state at the skip time, in the sample's dtype."""
        if self._full is None:
            raise RuntimeError("call set_timesteps before teleporting")
        self.stats.check_shape(sample.shape[1:], "GaussianTeleport")
        t_start, t_skip = float(self._full_host[0]), float(self._full_host[self.skip_index])
        source = tuple(float(v) for v in self.schedule.alpha_sigma(t_start))
        target = tuple(float(v) for v in self.schedule.alpha_sigma(t_skip))
        x = sample.to(torch.float64) * self._vp_factor(self.schedule, t_start)
        out = self.stats.flow(x, source, target) / self._vp_factor(self.schedule, t_skip)
        return out.to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """At the first step: teleport x_T to the skip time, so the first network call already sees it."""
        if self._pending_jump():
            sample = self.teleport(sample)
            self._jump_input = True
        return super().scale_model_input(sample, timestep, *args, **kwargs)

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._pending_jump():
            self._jump_done = True
            jumped = self.teleport(sample)
            if not self._jump_input:
                self._repeat = True
                self.extra_nfe += 1
                return SchedulerOutput(prev_sample=jumped) if kwargs.get("return_dict", True) else (jumped,)
            sample = jumped
        return self._inner_step(model_output, timestep, sample, *args, **kwargs)

    # ------------------------------------------------------------------ automatic skip
    def calibrate(self, model: Any, num_inference_steps: int, **set_timesteps_kwargs: Any) -> dict[str, Any]:
        """Choose the skip index for ``num_inference_steps`` with ``model`` (see the class docstring); returns and
        caches ``{"skip_index", "skip_timestep", "errors", "extra_nfe", ...}``."""
        self.inner.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
        full = torch.as_tensor(self.inner.timesteps).as_subclass(torch.Tensor).clone()
        self.calibrations[len(full)] = self._calibrate(model, full)
        self._reset()
        return self.calibrations[len(full)]

    @torch.no_grad()
    def _calibrate(self, model: Any, full: torch.Tensor) -> dict[str, Any]:
        fn = model_fn_from_unet(model, **self.model_kwargs)
        device, dtype = model_device_dtype(model)
        g = torch.Generator().manual_seed(self.seed)
        x_start = torch.randn((self.num_probes, *self.stats.shape), generator=g, dtype=torch.float64)
        source = tuple(float(v) for v in self.schedule.alpha_sigma(float(full[0])))
        disagreement, errors, skip_index = [], [], 0
        for j in range(1, len(full)):
            alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(float(full[j])))
            x = self.stats.flow(x_start, source, (alpha, sigma))
            out = fn(x.to(device, dtype), full[j].to(device)).to("cpu", torch.float64)
            gap = to_data(out, x, alpha, sigma, self.prediction_type) - self.stats.denoise(x, alpha, sigma)
            disagreement.append(float((gap * (alpha / sigma)).square().mean().sqrt()))
            errors.append(math.sqrt(max(disagreement[-1] ** 2 - disagreement[0] ** 2, 0.0)))
            if errors[-1] > self.tol:
                break
            skip_index = j
        return {"num_inference_steps": len(full), "skip_index": skip_index, "skip_timestep": float(full[skip_index]),
                "skip_fraction": skip_index / len(full), "errors": errors, "disagreement": disagreement,
                "extra_nfe": len(errors), "tol": self.tol}
