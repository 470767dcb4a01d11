"""Grid specs: parsing and validation (`parse_grid`, `load_grid`, `Grid`, `Component`), the default grid, and the
registry look-ups that check solver, accelerator and guidance names before anything runs."""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ...accelerators.base import ACCELERATORS
from ...runtime.guidance_check import import_guidance
from .. import metrics as _metrics
from ..errors import SweepError
from ..errors import positive_int as _positive_int

MODEL_KINDS = ("gmm", "gaussian", "learned", "diffusers")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOP_KEYS = ("models", "solvers", "accelerators", "guidance", "nfe", "seeds", "reference", "metric", "sampling")
SEED_KEYS = ("start", "num_blocks", "block_size")
#: the ``metric:`` keys that belong to the sweep itself (each metric in `metrics.METRICS` adds its ``defaults``)
SWEEP_METRIC_DEFAULTS = {"image_grid": 8}
#: the order of the ``metric:`` section in ``config_used.yaml`` (keys not listed follow in registration order)
METRIC_KEY_ORDER = ("pixel_resolution", "inception_weights", "inception_dims", "fid_stats", "pixel_stats",
                    "image_grid", "data_samples")
SAMPLING_KEYS = ("dtype",)
SCHEDULE_KEYS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "prediction_type": "epsilon"}
#: options of the loaded model kinds (gmm / gaussian take their testbed's constructor arguments)
SPEED_KEYS = ("compile", "channels_last")
#: options of the exact testbeds (gmm / gaussian) that choose their noise schedule: ``noise_schedule: flow`` gives a
#: rectified-flow model (x_sigma = (1 - sigma) x0 + sigma eps, velocity output) whose scheduler config is diffusers'
#: ``FlowMatchEulerDiscreteScheduler(shift=shift)``, SD3's stock scheduler at the default shift
FLOW_MODEL_KEYS = {"noise_schedule": "vp", "shift": 3.0}
MODEL_KEYS = {"learned": ("path", *SPEED_KEYS),
              "diffusers": ("path", "subfolder", "local_files_only", "dtype", "null_class", *SCHEDULE_KEYS,
                            *SPEED_KEYS)}
DEFAULT_REFERENCE = {"solver": {"name": "dpmsolver++", "solver_order": 3}, "nfe": 100, "dtype": "float64"}
DEFAULT_SPEC = {"accelerators": ["none"], "guidance": ["none"], "nfe": [5, 10, 20],
                "seeds": {"start": 0, "num_blocks": 8, "block_size": 64}, "reference": DEFAULT_REFERENCE,
                "sampling": {"dtype": "float32"}}


def metric_defaults() -> dict[str, Any]:
    """The ``metric:`` section's keys and defaults: the sweep's own plus every registered metric's."""
    merged = dict(SWEEP_METRIC_DEFAULTS)
    for cls in _metrics.registered():
        merged.update(copy.deepcopy(cls.defaults))
    rank = {k: i for i, k in enumerate(METRIC_KEY_ORDER)}
    return {k: merged[k] for k in sorted(merged, key=lambda k: rank.get(k, len(rank)))}


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
TUNE_KEYS = ("budget", "teacher_steps", "num_noises", "tail_weight")
#: the main job's tuned row: UniPC with its grid tuned per model and NFE by `samplers.tune` on a small budget
#: (64 calibration and 64 hold-out noises, a 60-step teacher, 300 batched model calls: the main job stays short)
DEFAULT_TUNED = {"name": "unipc", "label": "unipc tuned", "tune": {"budget": 300, "teacher_steps": 60}}


def default_solvers() -> list[Any]:
    """DPM-Solver++ at orders 1-3 (order 1 = DDIM), every other registered solver with its defaults, by name
    (except DC-Solver, which needs a per-model ratio search: it is in ``configs/embedded.yaml`` with
    ``dc_ratios: search``), UniPC tuned by `samplers.tune`, and diffusers' stock DPMSolverMultistepScheduler as the
    baseline."""
    from ... import SCHEDULERS

    solvers: list[Any] = [{"name": "dpmsolver++", "solver_order": k} for k in (1, 2, 3)]
    others = [name for name in sorted(SCHEDULERS) if name not in ("dpmsolver++", "dc-solver")]
    return [*solvers, *others, DEFAULT_TUNED, "diffusers:DPMSolverMultistepScheduler",
            "diffusers:FlowMatchEulerDiscreteScheduler"]


def model_family(model: Component) -> str:
    """``"flow"`` for a testbed built with ``noise_schedule: flow``, else ``"vp"`` (the learned model, diffusers
    UNets and the default testbeds)."""
    return "flow" if dict(model.options).get("noise_schedule", "vp") == "flow" else "vp"


def serves(solver: Component, family: str) -> bool:
    """Whether a solver row applies to a model family: the project's solvers integrate both (``from_config`` of the
    model's scheduler config picks the schedule); diffusers' ``FlowMatch*`` classes and rows that set
    ``use_flow_sigmas: true`` only flow models, its other classes only VP models."""
    if not solver.name.startswith("diffusers:"):
        return True
    flow = solver.name.split(":", 1)[1].startswith("FlowMatch") or bool(dict(solver.options).get("use_flow_sigmas"))
    return family == ("flow" if flow else "vp")


def default_models() -> list[dict[str, Any]]:
    """A 3x16x16 Gaussian mixture (exact score), the shipped learned model when its files are present, and the same
    mixture under rectified flow with SD3's scheduler config (exact velocity)."""
    mixture = {"name": "gmm", "shape": [3, 16, 16], "num_components": 8, "std": 0.1}
    models: list[dict[str, Any]] = [{**mixture, "label": "gmm-3x16x16"}]
    models += [{"name": "learned", "label": "learned-3x16x16", "num_blocks": 2}] if _learned_available() else []
    return [*models, {**mixture, "label": "gmm-flow-3x16x16", "noise_schedule": "flow", "shift": 3.0}]


def default_grid() -> dict[str, Any]:
    """The embedded sweep: :func:`default_solvers` x NFE 5/10/20 on :func:`default_models`, 8 blocks of 64."""
    return {"models": default_models(), "solvers": default_solvers(), **copy.deepcopy(DEFAULT_SPEC),
            "metric": metric_defaults()}


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
    defaults = metric_defaults()
    metric = {**defaults, **_check_keys(spec.get("metric") or {}, tuple(defaults), "metric")}
    _positive_int(metric["image_grid"], "metric.image_grid", minimum=0)
    for cls in _metrics.registered():
        cls.validate(metric)
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
    from ... import SCHEDULERS

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
        from ...testbeds.learned import ASSET_DIR, REQUIRED_FILES
    except ImportError:
        return False
    return all((ASSET_DIR / f).is_file() for f in REQUIRED_FILES)




def build_guider(spec: Component, where: str = "guidance") -> Any:
    """The guider ``spec`` names (``guidance.CFG`` / ``guidance.APG`` with its options), or None for "none"."""
    cls = _guidance_class(spec, where)
    if cls is None:
        return None
    try:
        return cls(**{k: v for k, v in spec.options})
    except (TypeError, ValueError) as err:
        raise SweepError(f"{where} ({spec.label}): {err}") from None

