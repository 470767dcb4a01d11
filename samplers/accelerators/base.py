"""Training-free accelerators that wrap ANY diffusers scheduler (ours or diffusers' own) and are schedulers again.

A wrapper exposes what stock pipelines and `samplers.sample` use - ``timesteps``, ``set_timesteps``, ``step``,
``scale_model_input``, ``init_noise_sigma``, ``order``, ``config``, ``add_noise`` - and passes every other
attribute through to the wrapped scheduler, so wrappers compose: ``TimeShift(DualFast(GaussianTeleport(s)))``.

How a wrapper changes the timestep the network sees. Pipelines (DDPMPipeline, DDIMPipeline,
StableDiffusionPipeline) and `samplers.sample` all run ``for t in scheduler.timesteps: unet(x, t); step(.., t, x)``.
``wrapper.timesteps`` is a `LiveTimesteps`: a real tensor holding the nominal grid (``len``, indexing, ``.to`` and
every tensor op see the nominal values) whose *iteration* is lazy: element ``i`` is computed when the loop asks
for it, i.e. after ``step()`` of step ``i - 1`` returned. `TimeShift` yields its shifted timesteps there, and
``step()`` recognises the yielded object and hands the wrapped scheduler the nominal timestep, so solver
coefficients never change. Only an iteration that starts before the first ``step()`` after ``set_timesteps`` is
live; a later one (e.g. `samplers.sample` listing the timesteps after the run) yields the nominal grid.

Wrappers never read a device tensor back on the host while sampling: the value of each nominal timestep comes
from ``host_timesteps`` (a float64 numpy copy that the project's schedulers keep, copied once per
``set_timesteps`` from other schedulers), and Time-Shift's choice stays on the device.

Wrappers at their "off" setting (``TimeShift(window=0)``, ``DualFast(scale=0)``) reproduce the wrapped scheduler
bit for bit, with the same number of model evaluations.
"""

from __future__ import annotations

import inspect
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..solvers.prediction import check_prediction_type
from ..solvers.schedule import NoiseSchedule
from ..solvers.scheduler_base import ExponentialIntegratorScheduler, make_pipeline_loadable

__all__ = ["ACCELERATORS", "WRAPPER_CLASSES", "LiveTimesteps", "SchedulerWrapper", "SpecContext", "host_timestep",
           "host_timesteps_of", "prev_sample", "start_at"]


def check_scheduler(scheduler: Any, wrapper: str) -> None:
    """TypeError unless ``scheduler`` is a diffusers-style scheduler instance."""
    if isinstance(scheduler, type):
        raise TypeError(f"{wrapper} needs a scheduler instance (e.g. {scheduler.__name__}.from_config(cfg)), "
                        f"got the class {scheduler.__name__}")
    missing = [a for a in ("set_timesteps", "step") if not callable(getattr(scheduler, a, None))]
    missing += [a for a in ("timesteps", "config") if not hasattr(scheduler, a)]
    if missing:
        raise TypeError(f"{wrapper} wraps a diffusers scheduler (with set_timesteps, step, timesteps and config); "
                        f"got {type(scheduler).__name__}, which lacks {missing}")


def start_at(scheduler: Any, index: int) -> None:
    """Make the next ``step()`` of a scheduler just set up by ``set_timesteps`` apply step ``index`` of its grid,
    with the solver's usual low-order warm-up from there (no history before ``index``).

    Project schedulers are re-planned on the remaining grid (``set_timesteps(timesteps=...)``); diffusers'
    multistep schedulers get ``set_begin_index``; stateless ones (DDIM, DDPM) read the timestep argument.
    """
    if isinstance(scheduler, SchedulerWrapper):
        scheduler.set_begin_index(index)
    elif isinstance(scheduler, ExponentialIntegratorScheduler):
        tail = scheduler.grid_timesteps[index:-1].tolist()
        scheduler.set_timesteps(timesteps=tail, device=scheduler.timesteps.device)
        scheduler.set_begin_index(0)  # the run starts at the tail's first timestep, whatever tensor step() gets
    elif callable(getattr(scheduler, "set_begin_index", None)):
        scheduler.set_begin_index(index)


def host_timesteps_of(scheduler: Any) -> np.ndarray:
    """``scheduler.timesteps`` as float64 numpy: the scheduler's own host copy when it keeps one (the project's
    schedulers and wrappers), else one device-to-host copy."""
    host = getattr(scheduler, "host_timesteps", None)
    if host is not None:
        return np.asarray(host, dtype=np.float64)
    return torch.as_tensor(scheduler.timesteps).as_subclass(torch.Tensor).detach().double().cpu().numpy()


def grid_arguments(sigmas: Any, mu: float | None, timesteps: Any) -> dict[str, Any]:
    """The grid arguments of a ``set_timesteps`` call that were given (schedulers without them are not passed
    them)."""
    return {k: v for k, v in (("sigmas", sigmas), ("mu", mu), ("timesteps", timesteps)) if v is not None}


def is_project_scheduler(scheduler: Any) -> bool:
    """True for the project's schedulers and wrappers, which keep their timesteps on the host too."""
    return isinstance(scheduler, (ExponentialIntegratorScheduler, SchedulerWrapper))


def host_timestep(scheduler: Any, timestep: Any, index: int) -> float:
    """The value of ``timestep``, the scheduler's evaluation ``index`` of the current run, as a float without a
    device sync where possible: numbers and CPU tensors are read directly, the project's schedulers answer from
    ``host_timesteps``, wrappers for the timestep they handed out; anything else is read from the device."""
    if not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu":
        return float(torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0])
    if isinstance(scheduler, SchedulerWrapper):
        known = scheduler._known_host(timestep)
        if known is not None:
            return known
    elif isinstance(scheduler, ExponentialIntegratorScheduler):
        position = scheduler.grid_position(timestep)  # a run over timesteps[k:] has not located its start yet
        index = index if position is None else position
        if 0 <= index < len(scheduler.host_timesteps):
            return float(scheduler.host_timesteps[index])
    return float(timestep.reshape(-1)[0])


class LiveTimesteps(torch.Tensor):
    """The nominal timestep tensor of a wrapper whose iteration asks the wrapper for each element lazily. A tail
    slice (``timesteps[k:]``, what img2img pipelines iterate) is live too."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __iter__(self) -> Iterator[torch.Tensor]:
        owner = getattr(self, "_owner", None)
        return super().__iter__() if owner is None else owner._iterate(self.as_subclass(torch.Tensor))

    def __getitem__(self, key: Any) -> torch.Tensor:
        item = super().__getitem__(key)
        owner = getattr(self, "_owner", None)
        if owner is None or not (isinstance(key, slice) and key.stop is None and key.step in (None, 1)):
            return item
        live = item.as_subclass(LiveTimesteps)
        live._owner = owner
        return live

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


WRAPPER_CONFIG_NAME = "wrapper_config.json"
#: every wrapper class by name, for `SchedulerWrapper.from_pretrained`
WRAPPER_CLASSES: dict[str, type] = {}
#: the accelerators by registry name (the sweep's ``accelerators``): a subclass joins by setting ``registry_name``
ACCELERATORS: dict[str, type] = {}


class SpecContext(Protocol):
    """What `SchedulerWrapper.from_spec` may ask of the run that builds it (the sweep's model under test)."""

    label: str

    def exact_moments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data mean (model's sample shape) and covariance (flattened), if the model knows them exactly."""

    def network(self) -> Any:
        """The model as a callable ``(x, t) -> output`` (e.g. for a probe evaluation)."""


def scheduler_class(name: str) -> type:
    """A scheduler class by its ``_class_name``: diffusers' own or one of the project's."""
    import samplers
    from samplers.solvers import dc_solver

    cls = getattr(diffusers, name, None) or getattr(samplers, name, None) or getattr(dc_solver, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"unknown scheduler class {name!r} (neither a diffusers nor a samplers scheduler)")
    return cls


class SchedulerWrapper(SchedulerMixin):
    """Base of the accelerators: delegates to ``self.inner`` and translates the timesteps it hands out.

    Subclasses override ``_model_timestep`` (what the network sees for a nominal timestep), ``_step`` (the step
    given the nominal timestep) and ``_reset`` (state cleared by ``set_timesteps``), and list the constructor
    options that `save_pretrained` stores in ``saved_options``.
    """

    saved_options: tuple[str, ...] = ()
    #: this class's name in `ACCELERATORS` (None: not registered; subclasses do not inherit it)
    registry_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        WRAPPER_CLASSES[cls.__name__] = cls
        if cls.__dict__.get("registry_name"):
            ACCELERATORS[cls.registry_name] = cls
        make_pipeline_loadable(cls)

    @classmethod
    def from_spec(cls, scheduler: Any, options: dict[str, Any], context: SpecContext) -> SchedulerWrapper:
        """Build from a sweep spec's ``options`` (plain values from YAML / JSON) around ``scheduler``; an
        accelerator whose options need the model under test (``context``) overrides this. TypeError / ValueError
        for bad options."""
        return cls(scheduler, **options)

    def __init__(self, scheduler: Any):
        check_scheduler(scheduler, type(self).__name__)
        self.inner = scheduler
        self._reset()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        try:
            return getattr(self.inner, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (wrapping {type(self.inner).__name__}) has no attribute "
                                 f"{name!r}") from None

    def __len__(self) -> int:
        return len(self.inner)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.inner).__name__}, {self._describe()})"

    def _describe(self) -> str:
        return ""

    @property
    def compatibles(self) -> list[type]:
        """The schedulers the wrapped scheduler's config can be loaded into (the wrapped scheduler's list)."""
        return self.inner.compatibles

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Same as `save_config` (a scheduler's saved state is its config)."""
        self.save_config(save_directory, **kwargs)

    def save_config(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save the wrapped scheduler (its own ``save_config``) and ``wrapper_config.json`` listing every
        wrapper layer, outermost first, so that `from_pretrained` - and ``DiffusionPipeline.from_pretrained`` of
        a saved pipeline - rebuilds the same stack."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers, base = [], self
        while isinstance(base, SchedulerWrapper):
            layers.append({"_class_name": type(base).__name__, **base._saved_options(directory)})
            base = base.inner
        if not callable(getattr(base, "save_config", None)):
            raise TypeError(f"the wrapped {type(base).__name__} has no save_config")
        base.save_config(directory, **kwargs)
        (directory / WRAPPER_CONFIG_NAME).write_text(json.dumps({"layers": layers}, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        **kwargs: Any) -> SchedulerWrapper:
        """Rebuild a wrapper stack saved by `save_pretrained` (a local folder; ``kwargs`` go to the wrapped
        scheduler's ``from_pretrained``)."""
        directory = Path(pretrained_model_name_or_path) / (subfolder or "")
        config_file = directory / WRAPPER_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"no {WRAPPER_CONFIG_NAME} in {directory}: it was not written by "
                                    f"SchedulerWrapper.save_pretrained (a plain scheduler loads with its own class)")
        try:
            layers = json.loads(config_file.read_text())["layers"]
            inner_name = json.loads((directory / "scheduler_config.json").read_text())["_class_name"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{directory} does not hold a saved scheduler wrapper: {err}") from err
        scheduler = scheduler_class(inner_name).from_pretrained(directory, **kwargs)
        for layer in reversed(layers):
            options = dict(layer)
            name = options.pop("_class_name")
            if name not in WRAPPER_CLASSES:
                raise ValueError(f"{config_file} names an unknown wrapper {name!r}; known: {sorted(WRAPPER_CLASSES)}")
            scheduler = WRAPPER_CLASSES[name]._from_saved(scheduler, options, directory)
        if not isinstance(scheduler, cls):
            raise TypeError(f"{directory} holds a {type(scheduler).__name__}, not a {cls.__name__}")
        return scheduler

    def _saved_options(self, directory: Path) -> dict[str, Any]:
        """This layer's constructor options (files it needs are written into ``directory``)."""
        return {name: getattr(self, name) for name in self.saved_options}

    @classmethod
    def _from_saved(cls, inner: Any, options: dict[str, Any], directory: Path) -> SchedulerWrapper:
        return cls(inner, **options)

    # ------------------------------------------------------------------ delegated scheduler API
    @property
    def config(self) -> Any:
        """The wrapped scheduler's config."""
        return self.inner.config

    @property
    def init_noise_sigma(self) -> Any:
        """The wrapped scheduler's initial noise scale (1 for diffusers' flow schedulers, which have none)."""
        return getattr(self.inner, "init_noise_sigma", 1.0)

    @property
    def order(self) -> int:
        """Model calls per solver step of the wrapped scheduler."""
        return self.inner.order

    @property
    def prediction_type(self) -> str:
        """The model parameterisation (``prediction_type`` of the config, epsilon by default; a velocity for
        diffusers' ``FlowMatch*`` schedulers, whose config has ``shift`` and no ``prediction_type``)."""
        default = "flow_prediction" if "shift" in self.config else "epsilon"
        return check_prediction_type(self.config.get("prediction_type", default))

    @property
    def discards_next_output(self) -> bool:
        """True when the next ``step()`` ignores its model output (see `GaussianTeleport`)."""
        return bool(getattr(self.inner, "discards_next_output", False))

    @property
    def timesteps(self) -> LiveTimesteps:
        """The nominal grid as a `LiveTimesteps` (its iteration yields what the network sees)."""
        live = self._nominal_timesteps().as_subclass(LiveTimesteps)
        live._owner = self
        return live

    def _nominal_timesteps(self) -> torch.Tensor:
        return torch.as_tensor(self.inner.timesteps).as_subclass(torch.Tensor)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None) -> None:
        """The wrapped scheduler's ``set_timesteps``; clears this wrapper's per-run state. ``sigmas``, ``mu`` and
        ``timesteps`` are passed on when given (diffusers' ``retrieve_timesteps`` reads this signature)."""
        self.inner.set_timesteps(num_inference_steps, device, **grid_arguments(sigmas, mu, timesteps))
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the wrapped scheduler at step ``begin_index`` (img2img pipelines; see `start_at`)."""
        start_at(self.inner, begin_index)
        self._host = None

    @property
    def host_timesteps(self) -> np.ndarray:
        """The nominal ``timesteps`` as float64 numpy, taken from the wrapped scheduler once per run."""
        if self._host is None:
            self._host = self._host_nominal_timesteps()
        return self._host

    def _host_nominal_timesteps(self) -> np.ndarray:
        return host_timesteps_of(self.inner)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped scheduler's input scaling at the nominal timestep (none for diffusers' flow schedulers)."""
        if not callable(getattr(self.inner, "scale_model_input", None)):
            return sample
        return self.inner.scale_model_input(sample, self._nominal(timestep), *args, **kwargs)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """One step of the wrapped solver at the nominal timestep, with this wrapper's change applied."""
        out = self._step(model_output, self._nominal(timestep), sample, *args, **kwargs)
        self._steps_taken += 1
        return out

    # ------------------------------------------------------------------ hooks
    def _reset(self) -> None:
        self._steps_taken = 0
        self._yielded: tuple[Any, Any, float | None] | None = None
        self._host: np.ndarray | None = None

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._inner_step(model_output, timestep, sample, *args, **kwargs)

    def _inner_step(self, *args: Any, **kwargs: Any) -> Any:
        """``inner.step`` without the keyword arguments it does not take, if they hold DDIMPipeline's defaults
        (``eta=0``, ``use_clipped_model_output``, ``variance_noise=None``): DDIMPipeline passes them to any
        scheduler. A ``generator`` (DDPMPipeline passes one) is dropped for a step that takes none: such a step
        is deterministic, there is nothing for it to draw."""
        params = inspect.signature(self.inner.step).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return self.inner.step(*args, **kwargs)
        extra = {k: v for k, v in kwargs.items() if k not in params}
        unusable = [k for k, v in extra.items()
                    if not (k == "generator" or v is None or v is False or (k == "eta" and v == 0))]
        if unusable:
            raise TypeError(f"{type(self.inner).__name__}.step() does not take {unusable}")
        return self.inner.step(*args, **{k: v for k, v in kwargs.items() if k in params})

    def _model_timestep(self, nominal: torch.Tensor, host: float | None) -> torch.Tensor:
        """What the network sees for the nominal timestep (``host``: its value, None if only the device knows)."""
        return nominal

    def _inner_iter(self) -> Iterator[tuple[torch.Tensor, float | None]]:
        """The wrapped grid's elements, each with its host value (None where only the device knows it)."""
        if isinstance(self.inner, SchedulerWrapper):
            return ((t, self.inner._known_host(t)) for t in self.inner.timesteps)
        return zip(self.inner.timesteps, self.host_timesteps.tolist())

    def _repeat_element(self) -> bool:
        """True if the element just yielded must be yielded once more (a step that consumed no evaluation)."""
        return False

    def _iterate(self, nominal: torch.Tensor) -> Iterator[torch.Tensor]:
        if self._steps_taken:
            yield from nominal.unbind(0)
            return
        self._prepare(nominal)
        tail_start = max(len(self.host_timesteps) - len(nominal), 0)  # iterating a tail slice (img2img)
        for t, host in itertools.islice(self._inner_iter(), tail_start, None):
            while True:
                model_t = self._model_timestep(t, host)
                self._yielded = (model_t, t, host)
                yield model_t
                if not self._repeat_element():
                    break

    def _prepare(self, nominal: torch.Tensor) -> None:
        """Hook run when a live iteration starts (``nominal`` is on the sampling device)."""

    def _known_host(self, timestep: Any) -> float | None:
        """The host value of a timestep this wrapper handed out last, when known without a device sync."""
        if self._yielded is None:
            return None
        model_t, nominal, host = self._yielded
        return host if timestep is nominal or (timestep is model_t and model_t is nominal) else None

    def _host_value(self, timestep: Any) -> float:
        """A nominal timestep as a float: from ``host_timesteps`` when it is the one handed out last, else read
        from the tensor (a device sync)."""
        host = self._known_host(timestep)
        return float(timestep) if host is None else host

    def _nominal(self, timestep: Any) -> Any:
        """The nominal timestep for a timestep handed back by the caller: translated if it is (or equals) the one
        we yielded last, passed on unchanged otherwise."""
        if self._yielded is None:
            return timestep
        model_t, nominal, _ = self._yielded
        if timestep is model_t or (isinstance(timestep, torch.Tensor) and timestep.shape == model_t.shape
                                   and torch.equal(timestep.cpu(), model_t.cpu())):
            return nominal
        return timestep

    # ------------------------------------------------------------------ VP-space helpers
    def _vp_factor(self, schedule: NoiseSchedule, timestep: float) -> float:
        """x = factor * state in the schedule's own (alpha, sigma): alpha_t for schedulers whose state is
        x / alpha_t (Euler, Heun: init sigma > 1), else 1 (VP and flow states)."""
        if float(self.init_noise_sigma) <= 1.0 + 1e-6:
            return 1.0
        return float(schedule.alpha_sigma(timestep)[0])


def prev_sample(out: Any) -> torch.Tensor:
    """The next state from a scheduler's ``step`` output (a tuple or a ``SchedulerOutput``)."""
    return out[0] if isinstance(out, tuple) else out.prev_sample

