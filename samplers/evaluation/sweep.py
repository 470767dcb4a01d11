"""Resumable, sharded sampler sweeps: model x solver x accelerator x guidance x NFE x seed block.

A grid spec (YAML file or dict, see :func:`parse_grid`) expands into configs; each (config, seed block) is one
work item whose result is one atomic artifact ``blocks/<config id>/block_<k>.npz`` holding what the metrics need
and nothing else: the samples' pixel features (average-pooled to ``metric.pixel_resolution``), Inception features
when Inception weights are given, per-sample squared errors to a high-accuracy reference solution of the same
noises, the sampling time and a SHA-256 digest of the samples. Stats are merged from the stored features in block
order, so a result never depends on which process computed a block.

* Sample ``i`` starts from ``noise_from_seeds([seed_i])`` and never depends on batch size or process count.
* Work item ``k`` runs on rank ``k % world_size`` (``torchrun`` / ``accelerate launch`` environment, gloo
  barriers only); with no launcher there is one rank. After a barrier rank 0 reads all artifacts and writes
  ``results.{csv,json,md}``, plots, ``manifest.json``, ``config_used.yaml`` and ``versions.json``.
* A killed sweep resumes: finished artifacts are skipped, half-written temp files are never read. The manifest
  records a SHA-256 checksum per block; on resume a block whose file no longer matches it (or, for a block
  finished after the last manifest was written, that does not load) is recomputed with a warning naming it.

Metrics: Frechet distance (pytorch-fid numerics) of the pixel features to the exact data moments of an exact-score
model (or to ``metric.pixel_stats``), RMS error to the reference solution, Inception FID against
``metric.fid_stats`` (a stats file, or a reference name such as ``cifar10-train``) or Inception stats of exact
data samples. Hub models, Inception weights and CIFAR-10 are downloaded on first use unless offline.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ..accelerators.base import ACCELERATORS
from ..runtime.guidance_check import import_guidance
from ..runtime.loop import noise_from_seeds, per_sample_generators, sample
from ..testbeds.models import ExactScoreModel, GaussianMixtureModel, GaussianModel
from . import downloads, fid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODEL_KINDS = ("gmm", "gaussian", "learned", "diffusers")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOP_KEYS = ("models", "solvers", "accelerators", "guidance", "nfe", "seeds", "reference", "metric", "sampling")
SEED_KEYS = ("start", "num_blocks", "block_size")
METRIC_KEYS = ("pixel_resolution", "inception_weights", "inception_dims", "fid_stats", "pixel_stats",
               "image_grid", "data_samples")
SAMPLING_KEYS = ("dtype",)
SCHEDULE_KEYS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "prediction_type": "epsilon"}
#: options of the loaded model kinds (gmm / gaussian take their testbed's constructor arguments)
SPEED_KEYS = ("compile", "channels_last")
MODEL_KEYS = {"learned": ("path", *SPEED_KEYS),
              "diffusers": ("path", "subfolder", "local_files_only", "dtype", "null_class", *SCHEDULE_KEYS,
                            *SPEED_KEYS)}
DEFAULT_WEIGHTS = "pytorch-fid"  # metric.inception_weights: pytorch-fid's file, cached or downloaded on first use
DATA_SEED = 12345  # exact data samples for the floors and the Inception reference stats
DEFAULT_REFERENCE = {"solver": {"name": "dpmsolver++", "solver_order": 3}, "nfe": 100, "dtype": "float64"}
DEFAULT_METRIC = {"pixel_resolution": 8, "inception_weights": None, "inception_dims": 2048, "fid_stats": None,
                  "pixel_stats": None, "image_grid": 8, "data_samples": 10000}
DEFAULT_SPEC = {"accelerators": ["none"], "guidance": ["none"], "nfe": [5, 10, 20],
                "seeds": {"start": 0, "num_blocks": 8, "block_size": 64}, "reference": DEFAULT_REFERENCE,
                "metric": DEFAULT_METRIC, "sampling": {"dtype": "float32"}}


class SweepError(ValueError):
    """A user error in a sweep (grid spec, names, files, output folder); the message says what to fix."""


# ------------------------------------------------------------------------------------------------ grid spec


@dataclass(frozen=True)
class Component:
    """One grid entry: a registry name plus options (solver, accelerator, guidance or model)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    custom_label: str | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """The entry as a dict, ``{"name": ..., **options}`` (what artifact ids hash)."""
        return {"name": self.name, **dict(self.options)}

    @property
    def label(self) -> str:
        """The display name: the entry's ``label`` if given, else ``name(option=value, ...)``."""
        if self.custom_label:
            return self.custom_label
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}({opts})" if opts else self.name


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    return value


def parse_component(entry: Any, where: str) -> Component:
    """``"name"`` or ``{name: ..., label: ..., **options}`` -> Component; SweepError names ``where``."""
    if isinstance(entry, str):
        return Component(entry)
    if not isinstance(entry, Mapping):
        raise SweepError(f"{where} must be a name or a mapping with a 'name' key, got {entry!r}")
    if not isinstance(entry.get("name"), str):
        raise SweepError(f"{where} needs a 'name' key (a string), got {dict(entry)!r}")
    options = tuple(sorted((str(k), _freeze(v)) for k, v in entry.items() if k not in ("name", "label")))
    return Component(entry["name"], options, entry.get("label"))


def _positive_int(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SweepError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_keys(section: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise SweepError(f"{where} must be a mapping, got {section!r}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise SweepError(f"unknown key {unknown[0]!r} in {where}; expected one of {list(allowed)}")
    return dict(section)


def _component_list(raw: Any, where: str) -> list[Component]:
    entries = raw if isinstance(raw, list) else [raw]
    if not entries:
        raise SweepError(f"{where} must not be empty")
    return [parse_component(e, f"{where}[{i}]") for i, e in enumerate(entries)]


@dataclass
class Grid:
    """A validated grid spec (``raw`` is the normalised spec written to ``config_used.yaml``)."""

    models: list[Component]
    solvers: list[Component]
    accelerators: list[Component]
    guidance: list[Component]
    nfe: list[int]
    seed_start: int
    num_blocks: int
    block_size: int
    reference: dict[str, Any] | None
    metric: dict[str, Any]
    dtype: str
    raw: dict[str, Any] = field(default_factory=dict)

    def blocks(self, model: Component) -> int:
        """Seed blocks of ``model``: its own ``num_blocks`` option (for slow models) or ``seeds.num_blocks``."""
        return dict(model.options).get("num_blocks", self.num_blocks)

    def block_seeds(self, block: int) -> list[int]:
        """The ``block_size`` consecutive seeds of seed block ``block`` (starting at ``seeds.start``)."""
        first = self.seed_start + block * self.block_size
        return list(range(first, first + self.block_size))


#: options of a solver entry's ``tune:`` mapping (passed to `samplers.tune`)
TUNE_KEYS = ("budget", "teacher_steps", "num_noises")
#: the main job's tuned row: UniPC with its grid tuned per model and NFE by `samplers.tune` on a small budget
#: (64 calibration and 64 hold-out noises, a 60-step teacher, 300 batched model calls: the main job stays short)
DEFAULT_TUNED = {"name": "unipc", "label": "unipc tuned", "tune": {"budget": 300, "teacher_steps": 60}}


def default_solvers() -> list[Any]:
    """DPM-Solver++ at orders 1-3 (order 1 = DDIM), every other registered solver with its defaults, by name
    (except DC-Solver, whose ratio search costs more than the rest of the job: it is in ``configs/embedded.yaml``
    with ``dc_ratios: search``), UniPC tuned by `samplers.tune`, and diffusers' stock DPMSolverMultistepScheduler
    as the baseline."""
    from .. import SCHEDULERS

    solvers: list[Any] = [{"name": "dpmsolver++", "solver_order": k} for k in (1, 2, 3)]
    others = [name for name in sorted(SCHEDULERS) if name not in ("dpmsolver++", "dc-solver")]
    return [*solvers, *others, DEFAULT_TUNED, "diffusers:DPMSolverMultistepScheduler"]


def default_models() -> list[dict[str, Any]]:
    """A 3x16x16 Gaussian mixture (exact score), plus the shipped learned model when its files are present."""
    models: list[dict[str, Any]] = [{"name": "gmm", "label": "gmm-3x16x16", "shape": [3, 16, 16],
                                     "num_components": 8, "std": 0.1}]
    return models + ([{"name": "learned", "label": "learned-3x16x16", "num_blocks": 2}] if _learned_available() else [])


def default_grid() -> dict[str, Any]:
    """The embedded sweep: :func:`default_solvers` x NFE 5/10/20 on :func:`default_models`, 8 blocks of 64."""
    return {"models": default_models(), "solvers": default_solvers(), **copy.deepcopy(DEFAULT_SPEC)}


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a YAML grid spec (keys missing from it take the default grid's values)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"grid spec {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"grid spec {path} must hold a mapping with keys {list(TOP_KEYS)}, got {type(raw).__name__}")
    return raw


def parse_grid(raw: Mapping[str, Any]) -> Grid:
    """Validate a grid spec; keys it omits come from :func:`default_grid`. Names are checked against the
    registries here, so a typo fails before any sampling."""
    raw = _check_keys(raw, TOP_KEYS, "grid spec")
    spec = {**copy.deepcopy(DEFAULT_SPEC), **raw}
    if "models" not in spec:
        spec["models"] = default_models()
    if "solvers" not in spec:
        spec["solvers"] = default_solvers()
    nfe = spec["nfe"] if isinstance(spec["nfe"], list) else [spec["nfe"]]
    if not nfe:
        raise SweepError("nfe must be a non-empty list of positive integers")
    nfe = [_positive_int(n, f"nfe[{i}] (number of function evaluations)") for i, n in enumerate(nfe)]
    seeds = {**DEFAULT_SPEC["seeds"], **_check_keys(spec["seeds"], SEED_KEYS, "seeds")}
    start = _positive_int(seeds["start"], "seeds.start", minimum=0)
    num_blocks = _positive_int(seeds["num_blocks"], "seeds.num_blocks")
    block_size = _positive_int(seeds["block_size"], "seeds.block_size")
    if num_blocks * block_size < 2:
        raise SweepError(f"a Frechet distance needs at least 2 samples; seeds.num_blocks x seeds.block_size = "
                         f"{num_blocks * block_size}")
    metric = {**DEFAULT_METRIC, **_check_keys(spec["metric"] or {}, METRIC_KEYS, "metric")}
    _positive_int(metric["pixel_resolution"], "metric.pixel_resolution")
    _positive_int(metric["image_grid"], "metric.image_grid", minimum=0)
    _positive_int(metric["data_samples"], "metric.data_samples", minimum=2)
    if metric["inception_dims"] not in fid.FID_DIMS:
        raise SweepError(f"metric.inception_dims must be one of {fid.FID_DIMS}, got {metric['inception_dims']!r}")
    if metric["fid_stats"] and metric["inception_weights"] is None:
        metric["inception_weights"] = DEFAULT_WEIGHTS  # FID stats imply Inception features
    sampling = _check_keys(spec["sampling"] or {}, SAMPLING_KEYS, "sampling")
    dtype = sampling.get("dtype", "float32")
    if dtype not in DTYPES:
        raise SweepError(f"sampling.dtype must be one of {list(DTYPES)}, got {dtype!r}")
    grid = Grid(
        models=_component_list(spec["models"], "models"),
        solvers=_component_list(spec["solvers"], "solvers"),
        accelerators=_component_list(spec["accelerators"], "accelerators"),
        guidance=_component_list(spec["guidance"], "guidance"),
        nfe=nfe, seed_start=start, num_blocks=num_blocks, block_size=block_size,
        reference=_parse_reference(spec["reference"]), metric=metric, dtype=dtype,
    )
    for i, m in enumerate(grid.models):
        if m.name not in MODEL_KINDS:
            raise SweepError(f"models[{i}]: unknown model {m.name!r}; expected one of {list(MODEL_KINDS)}")
        if _positive_int(grid.blocks(m), f"models[{i}].num_blocks") * block_size < 2:
            raise SweepError(f"a Frechet distance needs at least 2 samples; models[{i}].num_blocks x "
                             f"seeds.block_size = {grid.blocks(m) * block_size}")
    for where, comps in (("solvers", grid.solvers), ("accelerators", grid.accelerators),
                         ("guidance", grid.guidance)):
        labels = [c.label for c in comps]
        duplicate = next((lab for lab in labels if labels.count(lab) > 1), None)
        if duplicate:
            raise SweepError(f"{where} lists {duplicate!r} twice; give one of them a distinct 'label'")
    for i, s in enumerate(grid.solvers):
        build_solver(s, {}, where=f"solvers[{i}]")
    for i, a in enumerate(grid.accelerators):
        _check_accelerator(a, f"accelerators[{i}]")
    for i, g in enumerate(grid.guidance):
        build_guider(g, f"guidance[{i}]")
    grid.raw = {"models": [m.spec | ({"label": m.custom_label} if m.custom_label else {}) for m in grid.models],
                "solvers": [s.spec for s in grid.solvers], "accelerators": [a.spec for a in grid.accelerators],
                "guidance": [g.spec for g in grid.guidance], "nfe": nfe,
                "seeds": {"start": start, "num_blocks": num_blocks, "block_size": block_size},
                "reference": grid.reference and {**grid.reference, "solver": grid.reference["solver"].spec},
                "metric": metric, "sampling": {"dtype": dtype}}
    grid.raw = json.loads(json.dumps(grid.raw))
    return grid


def _parse_reference(raw: Any) -> dict[str, Any] | None:
    if raw is None or raw is False:
        return None
    ref = {**DEFAULT_REFERENCE, **_check_keys(raw, ("solver", "nfe", "dtype"), "reference")}
    solver = parse_component(ref["solver"], "reference.solver")
    build_solver(solver, {}, where="reference.solver")
    if ref["dtype"] not in DTYPES:
        raise SweepError(f"reference.dtype must be one of {list(DTYPES)}, got {ref['dtype']!r}")
    return {"solver": solver, "nfe": _positive_int(ref["nfe"], "reference.nfe"), "dtype": ref["dtype"]}


# ------------------------------------------------------------------------------------------------ registries


def solver_class(name: str, where: str = "solver") -> type:
    """A registry name (``samplers.SCHEDULERS``) or ``diffusers:<SchedulerClass>`` -> scheduler class."""
    from .. import SCHEDULERS

    if name.startswith("diffusers:"):
        import diffusers
        from diffusers.schedulers.scheduling_utils import SchedulerMixin

        cls = getattr(diffusers, name.split(":", 1)[1], None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise SweepError(f"{where}: {name!r} is not a diffusers scheduler class (e.g. "
                             "diffusers:DPMSolverMultistepScheduler, diffusers:UniPCMultistepScheduler)")
        return cls
    if name not in SCHEDULERS:
        raise SweepError(f"{where}: unknown solver {name!r}; known solvers: {sorted(SCHEDULERS)} "
                         "or diffusers:<SchedulerClass>")
    return SCHEDULERS[name]


def build_solver(spec: Component, base_config: Mapping[str, Any], where: str = "solver") -> Any:
    """A fresh scheduler: ``cls.from_config(model's scheduler config, **options)``; unknown options are errors.
    The sweep-only options ``tune`` and ``dc_ratios: search`` are applied by the runner (`Runner._scheduler`)."""
    cls = solver_class(spec.name, where)
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.options
               if k != "tune" and not (k == "dc_ratios" and v == "search")}
    tune_opts = dict(spec.options).get("tune")
    if isinstance(tune_opts, tuple):
        unknown = sorted(set(dict(tune_opts)) - set(TUNE_KEYS))
        if unknown:
            raise SweepError(f"{where} ({spec.label}): tune has no option {unknown[0]!r}; expected {list(TUNE_KEYS)}")
    elif tune_opts is not None and not isinstance(tune_opts, bool):
        raise SweepError(f"{where} ({spec.label}): tune must be true or a mapping of {list(TUNE_KEYS)}, "
                         f"got {tune_opts!r}")
    if spec.name == "dc-solver" and not any(k in dict(spec.options) for k in ("dc_ratios", "cpr_coeffs")):
        raise SweepError(f"{where} ({spec.label}): dc-solver needs dc_ratios (a list, or 'search' to search them per "
                         "model and NFE) or cpr_coeffs; without them it is plain UniPC")
    unknown = sorted(set(options) - known)
    if unknown:
        raise SweepError(f"{where}: {spec.name} has no option {unknown[0]!r}; its options are {sorted(known)}")
    try:
        return cls.from_config(dict(base_config), **options)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise SweepError(f"{where} ({spec.label}): {err}") from None


def _registered(registry: Mapping[str, type], spec: Component, kind: str, where: str) -> type | None:
    """The class registered under ``spec.name`` (None for "none")."""
    if spec.name == "none":
        return None
    if spec.name not in registry:
        raise SweepError(f"{where}: unknown {kind} {spec.name!r}; expected one of {['none', *registry]}")
    return registry[spec.name]


def _accelerator_class(spec: Component, where: str = "accelerator") -> type | None:
    return _registered(ACCELERATORS, spec, "accelerator", where)


def _check_accelerator(spec: Component, where: str) -> None:
    cls = _accelerator_class(spec, where)
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "scheduler"} if cls else set()
    unknown = sorted({k for k, _ in spec.options} - known)
    if unknown:
        raise SweepError(f"{where}: accelerator {spec.name} has no option {unknown[0]!r}; its options are "
                         f"{sorted(known)}")


def _guidance_class(spec: Component, where: str = "guidance") -> type | None:
    if spec.name == "none":
        return None
    try:
        guidance = import_guidance()  # a clear error if the import name is taken by the PyPI package `guidance`
    except ImportError as err:
        raise SweepError(f"{where}: {err}") from None
    return _registered(guidance.GUIDERS, spec, "guidance", where)


def _learned_available() -> bool:
    try:
        from ..testbeds.learned import ASSET_DIR, REQUIRED_FILES
    except ImportError:
        return False
    return all((ASSET_DIR / f).is_file() for f in REQUIRED_FILES)


# ------------------------------------------------------------------------------------------------ models


@dataclass
class LoadedModel:
    """A model ready to sample: the network, its scheduler config, and the exact data model when known."""

    label: str
    net: torch.nn.Module
    scheduler_config: dict[str, Any]
    shape: tuple[int, ...]
    exact: ExactScoreModel | None = None
    num_classes: int | None = None
    null_class: int | None = None
    memory_format: torch.memory_format | None = None

    def exact_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact data mean (sample shape) and covariance, for an exact-score model (`SpecContext`)."""
        if self.exact is None:
            return None
        mean, cov = data_moments(self.exact)
        return mean.reshape(self.shape), cov

    def network(self) -> Callable[..., torch.Tensor]:
        """The network as ``(x, t) -> output`` (`SpecContext`; see the module-level `network`)."""
        return network(self)

    def uncond_kwargs(self, n: int, device: torch.device) -> dict[str, Any]:
        """Model kwargs of the unconditional branch: no labels for exact models, else the null class."""
        if isinstance(self.net, ExactScoreModel):
            return {}
        if self.null_class is None:
            raise SweepError(f"model {self.label}: guidance needs the unconditional label; set null_class: <id>")
        return {"class_labels": torch.full((n,), self.null_class, device=device)}

    @property
    def is_image(self) -> bool:
        """True for (1 or 3, H, W) samples: those get Inception features and image grids."""
        return len(self.shape) == 3 and self.shape[0] in (1, 3)


def _scheduler_config(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options.get(k, default) for k, default in SCHEDULE_KEYS.items()}


def load_model(spec: Component, device: torch.device, offline: bool | None = None) -> LoadedModel:
    """Build an embedded model (``gmm``, ``gaussian``, ``learned``) or load a diffusers UNet2DModel
    (``{name: diffusers, path: <folder or hub id>, subfolder: unet}``; a hub id is downloaded into the Hugging
    Face cache on first use unless ``offline`` or ``HF_HUB_OFFLINE=1``)."""
    opts = {k: v for k, v in spec.options if k != "num_blocks"}
    allowed = MODEL_KEYS.get(spec.name)
    unknown = sorted(set(opts) - set(allowed)) if allowed is not None else []
    if unknown:
        raise SweepError(f"model {spec.label}: unknown option {unknown[0]!r}; expected one of "
                         f"{sorted(allowed) + ['label', 'num_blocks']}")
    if spec.name in ("gmm", "gaussian"):
        cls = GaussianMixtureModel if spec.name == "gmm" else GaussianModel
        config = _scheduler_config(opts)
        kwargs = {k: tuple(v) if k == "shape" else v for k, v in opts.items() if k not in SCHEDULE_KEYS}
        try:
            exact = cls.for_scheduler_config(config, **kwargs)
        except (TypeError, ValueError) as err:
            raise SweepError(f"model {spec.label}: {err}") from None
        return LoadedModel(spec.label, exact.to(device), config, exact.shape, exact,
                           getattr(exact, "num_classes", None))
    if spec.name == "learned":
        from ..testbeds.learned import ASSET_DIR, load_learned_model

        path = Path(opts.get("path", ASSET_DIR))
        try:
            unet, mixture = load_learned_model(path, device=device)
        except (FileNotFoundError, ValueError) as err:
            raise SweepError(f"model learned: {err}") from None
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        net, memory_format = _fast_network(spec.label, unet, opts)
        return LoadedModel(spec.label, net, _scheduler_config(config), mixture.shape, mixture, None,
                           memory_format=memory_format)
    return _load_diffusers_unet(spec, opts, device, downloads.is_offline(offline))


def _load_diffusers_unet(spec: Component, opts: dict[str, Any], device: torch.device, offline: bool) -> LoadedModel:
    from diffusers import UNet2DModel
    from huggingface_hub import constants

    if "path" not in opts:
        raise SweepError(f"model {spec.label}: a diffusers model needs 'path' (a local folder or a hub id)")
    path, subfolder = str(opts["path"]), opts.get("subfolder")
    local_only = bool(opts.get("local_files_only", offline))
    attempts = [subfolder] if subfolder is not None else ["unet", None]
    hub = not Path(path).expanduser().is_dir()
    cached = hub and _in_hub_cache(path, attempts)
    unet, errors = None, []
    for sub in attempts:
        try:
            unet = UNet2DModel.from_pretrained(path, subfolder=sub, local_files_only=local_only)
            break
        except (OSError, ValueError) as err:
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    if unet is None and hub and offline:
        raise downloads.MissingFiles([downloads.Missing(f"diffusers model {path} (model {spec.label})",
                                                        f"the Hugging Face cache {constants.HF_HUB_CACHE}",
                                                        f"`huggingface-cli download {path}`")])
    if unet is None:
        how = ("not a local folder and not in the Hugging Face cache; download it once with `huggingface-cli "
               f"download {path}` or set local_files_only: false" if local_only else
               f"not a local folder, and the Hugging Face Hub download failed; check the id and the network. "
               f"{downloads.offline_hint(constants.HF_HUB_CACHE)}")
        raise SweepError(f"model {spec.label}: cannot load a UNet2DModel from {path!r}"
                         f"{' offline' if local_only else ''} ({how}). Last error: {errors[-1]}")
    if hub and not cached and not local_only:
        downloads.say(f"fetched diffusers model {path} into the Hugging Face cache {constants.HF_HUB_CACHE}")
    config = next((c for sub in ("scheduler", None) if (c := _scheduler_file(path, sub, local_only))), None)
    overrides = {k: v for k, v in opts.items() if k in SCHEDULE_KEYS}
    if config is None and not overrides:
        raise SweepError(f"model {spec.label}: no scheduler_config.json in {path!r} (or its scheduler/ folder); "
                         "give the training noise schedule in the model spec (beta_schedule, beta_start, ...)")
    config = {k: v for k, v in (config or {}).items() if not k.startswith("_")} | overrides
    dtype = DTYPES.get(opts.get("dtype", "float32")) or getattr(torch, str(opts.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise SweepError(f"model {spec.label}: unknown dtype {opts.get('dtype')!r}")
    cfg = unet.config
    shape = (cfg.in_channels, *((cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else cfg.sample_size))
    num_classes = getattr(cfg, "num_class_embeds", None)
    net, memory_format = _fast_network(spec.label, unet.to(device, dtype).eval(), opts)
    return LoadedModel(spec.label, net, _scheduler_config(config) | config, tuple(shape), None, num_classes,
                       opts.get("null_class"), memory_format)


def _in_hub_cache(repo_id: str, subfolders: list[str | None]) -> bool:
    """Whether a hub model's config.json is already in the Hugging Face cache (no request made)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, f"{sub}/config.json" if sub else "config.json"), str)
                   for sub in subfolders)
    except ValueError:  # not a valid repo id: from_pretrained reports it
        return False


def _fast_network(label: str, net: torch.nn.Module,
                  opts: dict[str, Any]) -> tuple[torch.nn.Module, torch.memory_format | None]:
    """The model spec's speed options: ``channels_last: true`` (the network and the sampling state in channels-last
    layout) and ``compile: true`` or a mapping of `torch.compile` arguments (e.g. ``{mode: max-autotune}``)."""
    channels_last, compile_args = opts.get("channels_last", False), opts.get("compile", False)
    if isinstance(compile_args, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                               for p in compile_args):
        compile_args = dict(compile_args)  # a mapping, frozen by parse_component
    if not isinstance(channels_last, bool):
        raise SweepError(f"model {label}: channels_last must be true or false, got {channels_last!r}")
    if not isinstance(compile_args, (bool, dict)):
        raise SweepError(f"model {label}: compile must be true, false or a mapping of torch.compile arguments "
                         f"(e.g. {{mode: max-autotune}}), got {compile_args!r}")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile_args is not False:
        try:
            net = torch.compile(net, **({} if compile_args is True else compile_args))
        except (TypeError, RuntimeError) as err:
            raise SweepError(f"model {label}: torch.compile rejected {compile_args!r}: {err}") from None
    return net, torch.channels_last if channels_last else None


def _scheduler_file(path: str, subfolder: str | None, local_only: bool) -> dict[str, Any] | None:
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(path, subfolder=subfolder, local_files_only=local_only))
    except (OSError, ValueError):
        return None


def network(model: LoadedModel) -> Callable[..., torch.Tensor]:
    """``net(x, t, **kwargs)``: the model called at its own dtype, its output returned in the state's dtype."""
    dtype = None if isinstance(model.net, ExactScoreModel) else next(model.net.parameters()).dtype

    def net(x: torch.Tensor, t: Any, **kwargs: Any) -> torch.Tensor:
        out = model.net(x if dtype is None else x.to(dtype), t, **kwargs)
        return (out.sample if hasattr(out, "sample") else out).to(x.dtype)

    return net


def build_accelerator(spec: Component, scheduler: Any, model: LoadedModel) -> Any:
    """Wrap ``scheduler`` in the accelerator ``spec`` names, by its class's ``from_spec`` (which may ask ``model``,
    a `SpecContext`, for what its options need, e.g. teleport's exact data moments)."""
    cls = _accelerator_class(spec)
    if cls is None:
        return scheduler
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.options}
    try:
        return cls.from_spec(scheduler, opts, model)
    except (TypeError, ValueError) as err:
        raise SweepError(f"accelerator {spec.label}: {err}") from None


def build_guider(spec: Component, where: str = "guidance") -> Any:
    """The guider ``spec`` names (``guidance.CFG`` / ``guidance.APG`` with its options), or None for "none"."""
    cls = _guidance_class(spec, where)
    if cls is None:
        return None
    try:
        return cls(**{k: v for k, v in spec.options})
    except (TypeError, ValueError) as err:
        raise SweepError(f"{where} ({spec.label}): {err}") from None


# ------------------------------------------------------------------------------------------------ metrics


def pixel_features(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Samples -> float64 feature rows: images average-pooled to ``resolution`` (if larger), then flattened."""
    x = x.to(torch.float64)
    if x.ndim == 4 and x.shape[-1] > resolution:
        x = F.adaptive_avg_pool2d(x, resolution)
    return x.reshape(x.shape[0], -1)


def label_weights(mixture: GaussianMixtureModel, class_labels: torch.Tensor | None) -> torch.Tensor:
    """Component weights of the data the samples target: p(x) or the average of p(x | c_i) over their labels."""
    w = mixture.log_w.exp().cpu()
    if class_labels is None:
        return w
    per_class = torch.stack([w * (mixture.labels == c) for c in range(mixture.num_classes)])
    per_class = per_class / per_class.sum(1, keepdim=True)
    return per_class[torch.as_tensor(class_labels).cpu()].mean(0)


def data_moments(exact: ExactScoreModel, class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Exact mean and covariance (float64, flattened) of the data an exact-score model describes.
    Mixture: mean = sum w mu, cov = sum w (s^2 I + mu mu^T) - mean mean^T. Gaussian: U diag(l) U^T + s^2 I."""
    if isinstance(exact, GaussianMixtureModel):
        w, means = label_weights(exact, class_labels), exact.means.cpu()
        mean = w @ means
        cov = (means.T * w) @ means - torch.outer(mean, mean)
        return mean, cov + torch.eye(len(mean), dtype=torch.float64) * float(w @ exact.vars.cpu())
    if isinstance(exact, GaussianModel):
        U = exact.U.cpu()
        cov = (U * exact.l) @ U.T + exact.iso_var * torch.eye(len(exact.mu), dtype=torch.float64)
        return exact.mu.cpu(), cov
    raise SweepError(f"no closed-form data moments for {type(exact).__name__}")


def feature_moments(mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...],
                    resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Moments of the pooled features: the pooling P is linear, so mean -> P mean and cov -> P cov P^T."""
    def pool(rows: torch.Tensor) -> torch.Tensor:
        return pixel_features(rows.reshape(-1, *shape), resolution)

    return pool(mean[None])[0].numpy(), pool(pool(cov).T.contiguous()).numpy()


def _stats(blocks: list[np.ndarray], dims: int) -> fid.FeatureStats:
    stats = fid.FeatureStats(dims)
    for b in blocks:
        stats.update(b)
    return stats


def _checked_stats(path: str, dims: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = fid.load_stats(Path(path).expanduser())
    if mu.shape[0] != dims:
        raise SweepError(f"{what} {path} holds {mu.shape[0]}-dim stats, but the sweep's features have {dims} dims")
    return mu, sigma


# ------------------------------------------------------------------------------------------------ work list


@dataclass(frozen=True)
class Config:
    """One point of the grid: model x solver x accelerator x guidance x NFE."""

    model: Component
    solver: Component
    accelerator: Component
    guidance: Component
    nfe: int


@dataclass(frozen=True)
class Job:
    """One unit of work: a seed block of a reference (``config`` None) or of a sampling config."""

    kind: str  # "reference" or "sample"
    model: Component
    guidance: Component
    block: int
    config: Config | None = None


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _feature_spec(grid: Grid) -> dict[str, Any]:
    inception = grid.metric["inception_weights"] is not None
    return {"pixel_resolution": grid.metric["pixel_resolution"],
            "inception_dims": grid.metric["inception_dims"] if inception else None}


def reference_id(grid: Grid, model: Component, guidance: Component) -> str:
    """Hash of everything a reference block depends on (model, guidance, seeds, reference solver, NFE, dtype and
    feature settings); names its artifact folder."""
    ref = grid.reference
    return _digest({"model": model.spec, "guidance": guidance.spec, "seeds": [grid.seed_start, grid.block_size],
                    "solver": ref["solver"].spec, "nfe": ref["nfe"], "dtype": ref["dtype"],
                    "features": _feature_spec(grid)})


def config_id(grid: Grid, config: Config) -> str:
    """Hash of everything a block's artifact depends on (a changed grid never reuses stale artifacts)."""
    ref = reference_id(grid, config.model, config.guidance) if grid.reference else None
    return _digest({"model": config.model.spec, "solver": config.solver.spec, "accelerator": config.accelerator.spec,
                    "guidance": config.guidance.spec, "nfe": config.nfe, "dtype": grid.dtype, "reference": ref,
                    "seeds": [grid.seed_start, grid.block_size], "features": _feature_spec(grid)})


def expand(grid: Grid) -> list[Config]:
    """Every config of the grid, in a fixed order (model, guidance, solver, accelerator, NFE)."""
    return [Config(m, s, a, g, n) for m in grid.models for g in grid.guidance for s in grid.solvers
            for a in grid.accelerators for n in grid.nfe]


def work_list(grid: Grid) -> tuple[list[Job], list[Job]]:
    """(reference jobs, sampling jobs) in a fixed order; job ``k`` of each list belongs to rank ``k % world``."""
    refs = [Job("reference", m, g, b) for m in grid.models for g in grid.guidance for b in range(grid.blocks(m))
            ] if grid.reference else []
    jobs = [Job("sample", c.model, c.guidance, b, c) for c in expand(grid) for b in range(grid.blocks(c.model))]
    return refs, jobs


def artifact_path(out: Path, grid: Grid, job: Job) -> Path:
    """Where ``job``'s block lives: ``out/reference/<reference_id>/`` or ``out/blocks/<config_id>/``,
    ``block_<nnnnn>.npz``."""
    if job.kind == "reference":
        return out / "reference" / reference_id(grid, job.model, job.guidance) / f"block_{job.block:05d}.npz"
    return out / "blocks" / config_id(grid, job.config) / f"block_{job.block:05d}.npz"


def write_atomic(path: Path, arrays: Mapping[str, Any]) -> None:
    """Write an ``.npz`` to a temp file in the same folder, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_checksum(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_artifact(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a block's ``.npz`` (loaded eagerly, pickles refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Dist:
    """Rank and world size from the launcher's environment (torchrun / accelerate set RANK and WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """From RANK, WORLD_SIZE and LOCAL_RANK (a single process when they are unset)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        """Join the gloo process group when there are several ranks (24 h timeout: ranks wait on slow blocks)."""
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group if `init` joined one."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``device`` checked (SweepError if malformed or CUDA is missing); default cuda:LOCAL_RANK, else cpu."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        return fid.resolve_device(device)
    except fid.FIDError as err:
        raise SweepError(str(err)) from None


class Runner:
    """Executes one rank's share of a grid and (on rank 0) aggregates the artifacts."""

    def __init__(self, grid: Grid, out: str | Path, device: str | torch.device | None = None,
                 dist: Dist | None = None, log: Callable[[str], None] | None = None, offline: bool | None = None):
        self.grid, self.out = grid, Path(out)
        self.offline = downloads.is_offline(offline)
        self.dist = dist or Dist.from_env()
        self.device = resolve_device(device, self.dist.local_rank)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._models: dict[Component, LoadedModel] = {}
        self._inception: fid.FIDInceptionV3 | None = None
        self._fid_stats: tuple[np.ndarray, np.ndarray] | None = None
        self._budget = float("inf")  # blocks this process may still compute (--stop-after)

    # -- set-up
    def prepare_output(self) -> None:
        """Create the output folder (rank 0), check it is writable, remove temp files of killed runs."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write_probe.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise SweepError(f"output folder {self.out} is not writable: {err.strerror or err}") from None
        for stale in [*self.out.glob("*/.*.tmp"), *self.out.glob("*/*/.*.tmp")]:
            stale.unlink(missing_ok=True)

    def model(self, spec: Component) -> LoadedModel:
        """The loaded model of ``spec`` (cached); SweepError if the grid guides a model without classes."""
        if spec not in self._models:
            loaded = load_model(spec, self.device, self.offline)
            for g in self.grid.guidance:
                if g.name != "none" and loaded.num_classes is None:
                    raise SweepError(f"guidance {g.label!r} needs a class-conditional model; model {spec.label} "
                                     "has no classes (e.g. gmm with num_classes: 4)")
            self._models[spec] = loaded
        return self._models[spec]

    def check_inputs(self) -> None:
        """Fail before any sampling: every model loads (downloads happen here) and every stats file matches the
        feature dims. Offline, one error names every missing file."""
        metric = self.grid.metric
        missing: list[downloads.Missing] = []
        for spec in self.grid.models:
            try:
                model = self.model(spec)
            except downloads.MissingFiles as err:
                missing += err.items
                continue
            if metric["pixel_stats"]:
                dims = pixel_features(torch.zeros(1, *model.shape), metric["pixel_resolution"]).shape[1]
                _checked_stats(metric["pixel_stats"], dims, "metric.pixel_stats")
        weights = metric["inception_weights"]
        if self.offline and weights is not None:
            names = [metric["fid_stats"]] if metric["fid_stats"] in fid.REFERENCE_STATS else []
            missing += fid.missing_inputs(None if weights == DEFAULT_WEIGHTS else weights, metric["inception_dims"],
                                          names)
        downloads.require(missing)
        if self.inception() is not None and metric["fid_stats"]:
            self.fid_stats()

    def inception(self) -> fid.FIDInceptionV3 | None:
        """The FID Inception network (loaded once), or None when ``metric.inception_weights`` is not set."""
        weights = self.grid.metric["inception_weights"]
        if weights is not None and self._inception is None:
            self._inception = fid.load_fid_inception(None if weights == DEFAULT_WEIGHTS else weights,
                                                     self.grid.metric["inception_dims"], self.device, self.offline)
        return self._inception

    def fid_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of ``metric.fid_stats``: a pytorch-fid ``.npz`` or a reference name such as
        ``cifar10-train`` (computed once and cached, see :func:`samplers.evaluation.fid.reference_stats`)."""
        if self._fid_stats is None:
            name, dims = self.grid.metric["fid_stats"], self.grid.metric["inception_dims"]
            if name in fid.REFERENCE_STATS:
                self._fid_stats = fid.reference_stats(name, self.inception(), offline=self.offline)
            else:
                self._fid_stats = _checked_stats(name, dims, "metric.fid_stats")
        return self._fid_stats

    def labels(self, model: LoadedModel, seeds: list[int]) -> torch.Tensor | None:
        """Class labels of a block, ``seed % num_classes`` per sample; None for an unconditional model."""
        if model.num_classes is None:
            return None
        return torch.tensor([s % model.num_classes for s in seeds], device=self.device)

    # -- one block
    def _solve(self, job: Job, solver: Component, accelerator: Component | None, nfe: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, int, float]:
        model = self.model(job.model)
        seeds = self.grid.block_seeds(job.block)
        scheduler = self._scheduler(job, solver, nfe)
        if accelerator is not None:
            scheduler = build_accelerator(accelerator, scheduler, model)
        labels = self.labels(model, seeds)
        cond = {} if labels is None else {"class_labels": labels}
        guider = build_guider(job.guidance)
        fn, callback = functools.partial(network(model), **cond), None
        if guider is not None:
            import guidance

            fn = guidance.guided_model(network(model), guider, cond, model.uncond_kwargs(len(seeds), self.device),
                                       scheduler=scheduler)
            callback = fn.step_end
        noise = noise_from_seeds(seeds, model.shape, self.device, dtype)
        generators = per_sample_generators(seeds, self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = sample(fn, scheduler, noise, nfe, generator=generators, callback=callback,
                            memory_format=model.memory_format)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result.samples, result.nfe, time.perf_counter() - start

    def _scheduler(self, job: Job, solver: Component, nfe: int) -> Any:
        """``build_solver``; a solver entry with ``tune: true`` (or a mapping of `samplers.tune` options:
        ``budget``, ``teacher_steps``, ``num_noises``) gets the grid `samplers.tune` finds for this model and NFE,
        tuned once and cached in ``tuned/<id>.json`` (calibration seeds far from the sweep's)."""
        options = dict(solver.options)
        if options.get("dc_ratios") == "search":
            return self._dc_search(job, solver, options, nfe)
        config = self.model(job.model).scheduler_config
        tune_opts = options.get("tune")
        if not tune_opts:
            return build_solver(solver, config)
        from ..solvers.tune import CALIBRATION_SEEDS, HOLDOUT_SEEDS, tune

        tune_opts = dict(tune_opts) if isinstance(tune_opts, tuple) else {}
        path = self.out / "tuned" / f"{_digest({'model': job.model.spec, 'solver': solver.spec, 'nfe': nfe})}.json"
        if not path.is_file():
            model = self.model(job.model)
            self.log(f"tuning {solver.label} for {model.label} at NFE {nfe}")
            k = tune_opts.pop("num_noises", 64)
            noises = [noise_from_seeds(seeds[:k], model.shape, self.device) for seeds in (CALIBRATION_SEEDS,
                                                                                           HOLDOUT_SEEDS)]
            try:
                result = tune(network(model), build_solver(solver, config), nfe, calibration_noise=noises[0],
                              holdout_noise=noises[1], progress=False, **tune_opts)
            except ValueError as err:
                raise SweepError(f"solver {solver.label}: {err}") from None
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"timesteps": result.timesteps, "improved": result.improved,
                                                "message": result.message,
                                                "model_evaluations": result.model_evaluations}))
        tuned = {str(nfe): json.loads(path.read_text())["timesteps"]}
        return build_solver(solver, {**config, "tuned_timesteps": tuned})

    def _dc_search(self, job: Job, solver: Component, options: dict[str, Any], nfe: int) -> Any:
        """``dc_ratios: search``: DC-Solver ratios searched for this model and NFE on 10 noises (seeds far from the
        sweep's, a 200-step ground truth), cached in ``dc_ratios.json``."""
        from ..solvers.dc_solver import search_dc_ratios
        from ..solvers.tune import CALIBRATION_SEEDS

        model = self.model(job.model)
        scheduler = build_solver(solver, model.scheduler_config)
        noises = noise_from_seeds(CALIBRATION_SEEDS[:10], model.shape, self.device)
        options["dc_ratios"] = search_dc_ratios(network(model), scheduler, noises, nfe, reference_steps=200,
                                                cache=self.out / "dc_ratios.json", model_id=_digest(job.model.spec))
        return build_solver(Component(solver.name, tuple(options.items()), solver.custom_label),
                            model.scheduler_config)

    def _features(self, job: Job, x: torch.Tensor) -> dict[str, np.ndarray]:
        model = self.model(job.model)
        arrays = {"pixel_features": pixel_features(x, self.grid.metric["pixel_resolution"]).cpu().numpy(),
                  "digest": np.array(hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())}
        inception = self.inception()
        if inception is not None and model.is_image:
            images = fid.samples_to_uint8(x).expand(-1, 3, -1, -1)
            arrays["inception_features"] = inception.features(images).cpu().numpy()
        return arrays

    def run_job(self, job: Job) -> None:
        """Sample one block and write its artifact atomically: samples (reference) or squared errors to the
        reference and thumbnails (sampling), plus features, seeds, NFE, seconds, device and rank.
        FloatingPointError if the samples are not finite."""
        if job.kind == "reference":
            ref = self.grid.reference
            x, nfe, seconds = self._solve(job, ref["solver"], None, ref["nfe"], DTYPES[ref["dtype"]])
            arrays = {"samples": x.to(torch.float64).cpu().numpy()}
        else:
            cfg = job.config
            x, nfe, seconds = self._solve(job, cfg.solver, cfg.accelerator, cfg.nfe, DTYPES[self.grid.dtype])
            arrays = {}
            if self.grid.reference:
                ref = read_artifact(artifact_path(self.out, self.grid, Job("reference", job.model, job.guidance,
                                                                           job.block)))["samples"]
                err = x.to(torch.float64).cpu().reshape(len(x), -1) - torch.from_numpy(ref).reshape(len(x), -1)
                arrays["sq_err"] = err.square().sum(1).numpy()
            k = self.grid.metric["image_grid"]
            if job.block == 0 and k and self.model(job.model).is_image:
                arrays["thumbs"] = fid.samples_to_uint8(x[:k].clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{job.kind} block {job.block} of {self._job_label(job)} produced NaN/Inf")
        arrays.update(self._features(job, x))
        arrays.update(seeds=np.array(self.grid.block_seeds(job.block)), nfe=np.array(nfe), seconds=np.array(seconds),
                      device=np.array(str(self.device)), rank=np.array(self.dist.rank))
        write_atomic(artifact_path(self.out, self.grid, job), arrays)

    @staticmethod
    def _job_label(job: Job) -> str:
        if job.config is None:
            return f"{job.model.label} / {job.guidance.label} reference"
        c = job.config
        return f"{c.model.label} / {c.solver.label} / {c.accelerator.label} / {c.guidance.label} / NFE {c.nfe}"

    # -- the sweep
    def run(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Run this rank's share; returns the aggregated results on rank 0 (None elsewhere or when stopped)."""
        self.dist.init()
        try:
            if self.dist.rank == 0:
                self.check_inputs()  # rank 0 downloads and caches first; the others then find it all there
            self.dist.barrier()
            if self.dist.rank != 0:
                self.check_inputs()
            refs, jobs = work_list(self.grid)
            if self.dist.rank == 0:
                self.prepare_output()
                self.drop_damaged_blocks(refs + jobs)
                self.write_manifest()
                done = sum(artifact_path(self.out, self.grid, j).is_file() for j in refs + jobs)
                if done:
                    self.log(f"resuming: {done} of {len(refs) + len(jobs)} blocks already done, skipping them")
            self.dist.barrier()
            self._budget = float("inf") if stop_after is None else stop_after
            self._run_phase(refs, "references")
            self.dist.barrier()
            if all(artifact_path(self.out, self.grid, j).is_file() for j in refs):
                self._run_phase(jobs, "sampling")
            self.dist.barrier()
            if self.dist.rank != 0:
                return None
            self.write_manifest()
            missing = sum(not artifact_path(self.out, self.grid, j).is_file() for j in refs + jobs)
            if missing:
                self.log(f"stopped with {missing} of {len(refs) + len(jobs)} blocks left (--stop-after); "
                         "rerun the same command to resume")
                return None
            return write_results(self.grid, self.out, aggregate(self.grid, self.out, self))
        finally:
            self.dist.close()

    def _run_phase(self, jobs: list[Job], name: str) -> None:
        """Run this rank's unfinished jobs of ``jobs`` until the ``--stop-after`` budget (if any) runs out."""
        mine = [j for k, j in enumerate(jobs) if k % self.dist.world == self.dist.rank]
        todo = [j for j in mine if not artifact_path(self.out, self.grid, j).is_file()]
        if len(todo) < len(mine):
            self.log(f"rank {self.dist.rank}: {name}: skipped {len(mine) - len(todo)} finished blocks")
        with tqdm(todo, desc=name, unit="block", disable=self.dist.rank != 0 or not todo, dynamic_ncols=True) as bar:
            for job in bar:
                if self._budget <= 0:
                    return
                bar.set_postfix_str(self._job_label(job), refresh=False)
                self.run_job(job)
                self._budget -= 1

    def drop_damaged_blocks(self, jobs: list[Job]) -> None:
        """Before resuming: delete every finished block whose file differs from the checksum in ``manifest.json``
        or, without a recorded checksum, does not load, with a warning naming it, so it is recomputed."""
        try:
            recorded = json.loads((self.out / "manifest.json").read_text()).get("checksums", {})
        except (OSError, ValueError, AttributeError):
            recorded = {}
        for job in jobs:
            path = artifact_path(self.out, self.grid, job)
            if not path.is_file():
                continue
            name = path.relative_to(self.out).as_posix()
            if name in recorded:
                problem = None if file_checksum(path) == recorded[name] else "its SHA-256 differs from the manifest's"
            else:
                try:
                    read_artifact(path)
                    problem = None
                except Exception as err:  # any damage: truncated zip, bad CRC, bad array header
                    problem = f"it does not load ({type(err).__name__}: {err})"
            if problem is not None:
                message = f"sweep block {name} ({self._job_label(job)}, block {job.block}) is damaged: {problem}; " \
                          "recomputing it"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.log(message)
                path.unlink()

    def write_manifest(self) -> None:
        """Write ``manifest.json`` (configs, references, finished blocks per id with their SHA-256 checksums,
        world size, versions), ``config_used.yaml`` and ``versions.json`` into the output folder."""
        refs, jobs = work_list(self.grid)
        done: dict[str, list[int]] = {}
        checksums: dict[str, str] = {}
        for job in refs + jobs:
            path = artifact_path(self.out, self.grid, job)
            if path.is_file():
                done.setdefault(path.parent.name, []).append(job.block)
                checksums[path.relative_to(self.out).as_posix()] = file_checksum(path)
        configs = [{"id": config_id(self.grid, c), "model": c.model.label, "solver": c.solver.spec,
                    "accelerator": c.accelerator.spec, "guidance": c.guidance.spec, "nfe": c.nfe}
                   for c in expand(self.grid)]
        references = [{"id": reference_id(self.grid, m, g), "model": m.label, "guidance": g.spec}
                      for m in self.grid.models for g in self.grid.guidance] if self.grid.reference else []
        manifest = {"format": 1, "grid": self.grid.raw, "configs": configs, "references": references,
                    "num_blocks": {m.label: self.grid.blocks(m) for m in self.grid.models}, "done": done,
                    "checksums": checksums,
                    "world_size": self.dist.world, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions()}
        write_text_atomic(self.out / "manifest.json", json.dumps(manifest, indent=1))
        write_text_atomic(self.out / "config_used.yaml", yaml.safe_dump(self.grid.raw, sort_keys=False))
        write_text_atomic(self.out / "versions.json", json.dumps(versions(), indent=1))


def versions() -> dict[str, str]:
    """Versions of python and the packages a result depends on (torch with its build tag), and the GPU."""
    import diffusers
    import scipy

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        out["samplers"] = importlib.metadata.version("diffusion-samplers")
    except importlib.metadata.PackageNotFoundError:
        out["samplers"] = "not installed (run from a source tree)"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


# ------------------------------------------------------------------------------------------------ aggregation


def _blocks(grid: Grid, out: Path, model: Component, job: Callable[[int], Job]) -> Iterator[dict[str, np.ndarray]]:
    for b in range(grid.blocks(model)):
        yield read_artifact(artifact_path(out, grid, job(b)))


def _frechet(stats: fid.FeatureStats, target: tuple[np.ndarray, np.ndarray] | None) -> float | None:
    return None if target is None else fid.frechet_distance(stats.mean(), stats.cov(), *target)


@dataclass
class _Targets:
    """What one (model, guidance) pair's samples are compared with."""

    pixel: tuple[np.ndarray, np.ndarray] | None
    inception: tuple[np.ndarray, np.ndarray] | None
    data_fd: float | None


def _targets(grid: Grid, out: Path, runner: Runner, model_spec: Component) -> _Targets:
    model = runner.model(model_spec)
    res = grid.metric["pixel_resolution"]
    seeds = [s for b in range(grid.blocks(model_spec)) for s in grid.block_seeds(b)]
    labels = runner.labels(model, seeds)
    pixel, data_fd, inception = None, None, None
    dims = pixel_features(torch.zeros(1, *model.shape), res).shape[1]
    if grid.metric["pixel_stats"]:
        pixel = _checked_stats(grid.metric["pixel_stats"], dims, "metric.pixel_stats")
    elif model.exact is not None:
        pixel = feature_moments(*data_moments(model.exact, labels), model.shape, res)
    if model.exact is not None and pixel is not None:
        data = exact_data(model.exact, len(seeds), DATA_SEED, labels)
        data_fd = _frechet(_stats([pixel_features(data, res).numpy()], dims), pixel)
    net = runner.inception()
    if net is not None and model.is_image:
        if grid.metric["fid_stats"]:
            inception = runner.fid_stats()
        elif model.exact is not None:
            inception = _exact_inception_stats(grid, out, model, net, labels)
        else:
            raise SweepError(f"Inception FID for model {model.label} needs metric.fid_stats: a reference name "
                             f"({', '.join(fid.REFERENCE_STATS)}) or a pytorch-fid .npz of the data")
    return _Targets(pixel, inception, data_fd)


def exact_data(exact: ExactScoreModel, n: int, seed: int, class_labels: torch.Tensor | None) -> torch.Tensor:
    """``n`` samples of the exact data distribution (of each label's class when labels are given)."""
    g = torch.Generator().manual_seed(seed)
    if class_labels is None:
        return exact.sample_data(n, g)
    return exact.sample_data(n, g, class_labels=class_labels.cpu())


def _exact_inception_stats(grid: Grid, out: Path, model: LoadedModel, net: fid.FIDInceptionV3,
                           labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Inception stats of ``metric.data_samples`` exact data samples (cached as a pytorch-fid .npz)."""
    n = grid.metric["data_samples"]
    labels = None if labels is None else labels.cpu()[torch.arange(n) % len(labels)]
    key = [model.label, n, grid.metric["inception_dims"], None if labels is None else labels.tolist()]
    path = out / "reference" / f"inception_{_digest(key)}.npz"
    if not path.is_file():
        stats = fid.stats_from_samples(exact_data(model.exact, n, DATA_SEED + 1, labels), net)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        stats.to_npz(tmp)
        os.replace(tmp, path)
    return fid.load_stats(path)


def aggregate(grid: Grid, out: str | Path, runner: Runner) -> dict[str, Any]:
    """Merge every config's block artifacts (in block order) into metrics; rows, floors and throughput."""
    out = Path(out)
    rows, floors, targets = [], [], {}
    for m in grid.models:
        for g in grid.guidance:
            targets[m, g] = t = _targets(grid, out, runner, m)
            floor = {"model": m.label, "guidance": g.label, "data_samples_pixel_fd": t.data_fd}
            if grid.reference:
                ref_blocks = list(_blocks(grid, out, m, lambda b, m=m, g=g: Job("reference", m, g, b)))
                floor["reference"] = f"{grid.reference['solver'].label} @ {grid.reference['nfe']} NFE"
                floor["reference_pixel_fd"] = _frechet(_stats([a["pixel_features"] for a in ref_blocks],
                                                              ref_blocks[0]["pixel_features"].shape[1]), t.pixel)
                if t.inception is not None:
                    floor["reference_inception_fid"] = _frechet(
                        _stats([a["inception_features"] for a in ref_blocks], grid.metric["inception_dims"]),
                        t.inception)
            floors.append(floor)
    for c in expand(grid):
        t = targets[c.model, c.guidance]
        pixel, incep, sq_err, seconds, nfe = None, None, [], 0.0, 0
        for a in _blocks(grid, out, c.model, lambda b, c=c: Job("sample", c.model, c.guidance, b, c)):
            pixel = pixel or fid.FeatureStats(a["pixel_features"].shape[1])
            pixel.update(a["pixel_features"])
            if "inception_features" in a:
                incep = incep or fid.FeatureStats(a["inception_features"].shape[1])
                incep.update(a["inception_features"])
            if "sq_err" in a:
                sq_err.append(a["sq_err"])
            seconds, nfe = seconds + float(a["seconds"]), max(nfe, int(a["nfe"]))
        dim = int(np.prod(runner.model(c.model).shape))
        per_sample = np.sqrt(np.concatenate(sq_err) / dim) if sq_err else None
        rows.append({
            "model": c.model.label, "solver": c.solver.label, "accelerator": c.accelerator.label,
            "guidance": c.guidance.label, "nfe": c.nfe, "nfe_actual": nfe, "samples": pixel.count,
            "pixel_fd": _frechet(pixel, t.pixel),
            "rmse": None if per_sample is None else float(np.sqrt(np.mean(per_sample**2))),
            "rmse_median": None if per_sample is None else float(np.median(per_sample)),
            "rmse_p90": None if per_sample is None else float(np.quantile(per_sample, 0.9)),
            "inception_fid": None if incep is None or t.inception is None else _frechet(incep, t.inception),
            "seconds": seconds, "images_per_s": pixel.count / seconds if seconds > 0 else None,
            "config_id": config_id(grid, c),
        })
    return {"rows": rows, "floors": floors, "throughput": throughput(rows), "device": str(runner.device),
            "versions": versions(), "grid": grid.raw}


def throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sampling throughput per model and NFE over its configs (sampling time only, no metrics or I/O)."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in sorted({r["nfe"] for r in rows}):
            mine = [r for r in rows if r["model"] == model and r["nfe"] == n]
            images, seconds = sum(r["samples"] for r in mine), sum(r["seconds"] for r in mine)
            table.append({"model": model, "nfe": n, "images": images, "seconds": seconds,
                          "images_per_s": images / max(seconds, 1e-12)})
    return table


# ------------------------------------------------------------------------------------------------ outputs

METRICS = (("pixel_fd", "pixel-space Frechet distance"), ("rmse", "RMS error to the reference solution"),
           ("rmse_median", "median per-sample RMS error to the reference"),
           ("rmse_p90", "90th percentile of the per-sample RMS error to the reference"),
           ("inception_fid", "Inception FID"))
CSV_COLUMNS = ("model", "solver", "accelerator", "guidance", "nfe", "nfe_actual", "samples", "pixel_fd", "rmse",
               "rmse_median", "rmse_p90", "inception_fid", "seconds", "images_per_s", "config_id")


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-+" else "_" for ch in text).strip("_")


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return row["solver"], row["accelerator"], row["guidance"]


def best_per_nfe(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per model and NFE, the configuration with the lowest pixel FD, its median / p90 error, and
    its FD ratio to the best ``diffusers:`` configuration (above 1 = better than diffusers' best)."""
    lines = ["### Best per NFE (lowest pixel FD)", "",
             "| model | NFE | best configuration | pixel FD | median / p90 error | best diffusers FD | ratio |",
             "|---|---:|---|---:|---|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for n in sorted({r["nfe"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["nfe"] == n and r["pixel_fd"] is not None]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["pixel_fd"])
            peers = [r["pixel_fd"] for r in mine if r["solver"].startswith("diffusers:")]
            peer = min(peers) if peers else None
            label = " / ".join(k for k in _row_key(best) if k != "none")
            errors = f"{_fmt(best['rmse_median'])} / {_fmt(best['rmse_p90'])}" if best["rmse_median"] else ""
            ratio = _fmt(peer / best["pixel_fd"]) if peer and best["pixel_fd"] > 0 else ""
            lines.append(f"| {model} | {n} | {label} | {_fmt(best['pixel_fd'])} | {errors} | {_fmt(peer)} | {ratio} |")
    return [*lines, ""]


def markdown(results: Mapping[str, Any]) -> str:
    """The best configuration per NFE, then one table per model and metric: rows solver / accelerator /
    guidance, columns NFE."""
    rows = results["rows"]
    nfes = sorted({r["nfe"] for r in rows})
    lines = best_per_nfe(rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for key, title in METRICS:
            if all(r[key] is None for r in mine):
                continue
            lines += [f"### {model}: {title}", "", "| solver | accelerator | guidance | "
                      + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|---|" + "---:|" * len(nfes)]
            for rk in dict.fromkeys(_row_key(r) for r in mine):
                cells = {r["nfe"]: _fmt(r[key]) for r in mine if _row_key(r) == rk}
                lines.append("| " + " | ".join(rk) + " | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
            lines.append("")
    floors = results["floors"]
    if floors:
        keys = [k for k in floors[0] if k not in ("model", "guidance")]
        lines += ["### Floors (same seeds / same sample count)", "", "| model | guidance | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(f.get(k)) for k in ("model", "guidance", *keys)) + " |" for f in floors]
        lines.append("")
    lines += ["### Sampling throughput", "", "| model | NFE | images | seconds | images/s |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['model']} | {t['nfe']} | {t['images']} | {t['seconds']:.2f} | {t['images_per_s']:.1f} |"
              for t in results["throughput"]]
    return "\n".join(lines) + "\n"


def write_results(grid: Grid, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """results.csv / .json / .md, plots; prints the table and the throughput to stdout."""
    import csv

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in CSV_COLUMNS} for r in results["rows"])
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    table = markdown(results)
    write_text_atomic(out / "results.md", table)
    results["plots"] = [str(p.relative_to(out)) for p in plot_results(grid, out, results)]
    print(table, flush=True)  # the results go to stdout, progress messages (``log``) to stderr
    print(f"sampling throughput on {results['device']}, {torch.get_num_threads()} thread(s) per process:")
    for t in results["throughput"]:
        print(f"  {t['model']}: NFE {t['nfe']}: {t['images']} images in {t['seconds']:.2f} s = "
              f"{t['images_per_s']:.1f} images/s", flush=True)
    return results


def plot_results(grid: Grid, out: Path, results: Mapping[str, Any]) -> list[Path]:
    """Metric vs NFE per solver (log-log) for each model, and labelled sample grids (rows = NFE, columns = seeds)
    for image models. Draws on Agg canvases: the process's matplotlib backend is left alone."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written, rows = [], results["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for key, title in METRICS:
            if all(r[key] is None for r in mine):
                continue
            fig = Figure(figsize=(6.4, 4.4))
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            for rk in dict.fromkeys(_row_key(r) for r in mine):
                pts = sorted((r["nfe"], r[key]) for r in mine if _row_key(r) == rk and r[key] is not None)
                ax.plot(*zip(*pts), marker="o", label=" / ".join(k for k in rk if k != "none"))
            floor = [f.get("data_samples_pixel_fd") for f in results["floors"] if f["model"] == model]
            if key == "pixel_fd" and floor and floor[0] is not None:
                ax.axhline(floor[0], color="gray", linestyle="--", label="exact data samples")
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=title, title=model)
            ax.set_xticks(grid.nfe, [str(n) for n in grid.nfe])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(folder / f"{_slug(model)}_{key}.png")
            fig.savefig(written[-1], dpi=110)
    for c in expand(grid):
        if c.nfe != grid.nfe[0]:
            continue
        thumbs, nfes, seeds = [], [], []
        for n in grid.nfe:
            path = artifact_path(out, grid, Job("sample", c.model, c.guidance, 0, Config(
                c.model, c.solver, c.accelerator, c.guidance, n)))
            art = read_artifact(path)
            if "thumbs" in art:
                thumbs.append(art["thumbs"])
                nfes.append(n)
                seeds = [int(s) for s in art["seeds"][:len(art["thumbs"])]]
        if thumbs:
            written.append(folder / "samples" / f"{_slug(c.model.label)}__{_slug(c.solver.label)}__"
                           f"{_slug(c.accelerator.label)}__{_slug(c.guidance.label)}.png")
            written[-1].parent.mkdir(exist_ok=True)
            title = " / ".join(x.label for x in (c.model, c.solver, c.accelerator, c.guidance) if x.label != "none")
            labelled_image_grid(thumbs, [f"NFE {n}" for n in nfes], [f"seed {s}" for s in seeds],
                                title).savefig(written[-1], dpi=110)
    return written


def labelled_image_grid(rows: list[np.ndarray], row_labels: Sequence[str], column_labels: Sequence[str],
                        title: str = "", scale: int = 4, pad: int = 2) -> Figure:
    """`image_grid` of ``rows`` as a matplotlib Figure (Agg canvas, global backend untouched) with one label per
    row (left) and per column (top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, h, w, _ = rows[0].shape
    canvas = image_grid(rows, scale, pad)
    fig = Figure(figsize=(max(1.2 + canvas.shape[1] / 90, 0.5 + 0.07 * len(title)), 0.6 + canvas.shape[0] / 90))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + i * (h * scale + pad) + h * scale / 2 for i in range(len(rows))], list(row_labels))
    ax.set_xticks([pad + j * (w * scale + pad) + w * scale / 2 for j in range(n)], list(column_labels),
                  rotation=90 if n > 4 else 0, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_xlabel(title, fontsize=8)
    fig.tight_layout()
    return fig


def image_grid(rows: list[np.ndarray], scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC batches (one per row) into one RGB image, upscaled ``scale`` x, white padding."""
    n, h, w, c = rows[0].shape
    canvas = np.full((len(rows) * (h * scale + pad) + pad, n * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, batch in enumerate(rows):
        for j, img in enumerate(batch):
            big = np.kron(img, np.ones((scale, scale, 1), np.uint8))
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            canvas[y:y + h * scale, x:x + w * scale] = big if c == 3 else big.repeat(3, axis=2)
    return canvas


def run_sweep(raw: Mapping[str, Any] | None, out: str | Path, *, device: str | None = None,
              stop_after: int | None = None, log: Callable[[str], None] | None = None,
              offline: bool | None = None) -> dict[str, Any] | None:
    """Parse ``raw`` (None: the default grid), run this process's share and, on rank 0, aggregate.
    ``offline`` (default: ``HF_HUB_OFFLINE``) downloads nothing and names every missing file at once."""
    grid = parse_grid(default_grid() if raw is None else raw)
    return Runner(grid, out, device=device, log=log, offline=offline).run(stop_after=stop_after)
