"""Models under test: the embedded testbeds (``gmm``, ``gaussian``, ``learned``) and diffusers UNet2DModels, as
`LoadedModel`; the network call in the state's dtype; the accelerator wrapped around a scheduler."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...solvers.schedule import FlowMatchingSchedule
from ...testbeds.models import ExactScoreModel, GaussianMixtureModel, GaussianModel
from .. import downloads
from ..errors import SweepError
from ..metrics import data_moments
from .spec import DTYPES, FLOW_MODEL_KEYS, MODEL_KEYS, SCHEDULE_KEYS, Component, _accelerator_class, model_family


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


def _flow_scheduler_config(spec: Component, opts: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config of a ``noise_schedule: flow`` testbed: that of SD3's
    ``FlowMatchEulerDiscreteScheduler(shift=shift)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    bad = sorted(set(opts) & set(SCHEDULE_KEYS))
    if bad:
        raise SweepError(f"model {spec.label}: {bad[0]!r} is a VP option; a noise_schedule: flow model takes 'shift'")
    shift = opts.get("shift", FLOW_MODEL_KEYS["shift"])
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise SweepError(f"model {spec.label}: shift must be a positive number, got {shift!r}")
    return dict(FlowMatchEulerDiscreteScheduler(shift=float(shift)).config)


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
    schedule = opts.get("noise_schedule", FLOW_MODEL_KEYS["noise_schedule"])
    if schedule not in ("vp", "flow"):
        raise SweepError(f"model {spec.label}: noise_schedule must be 'vp' or 'flow', got {schedule!r}")
    if "shift" in opts and schedule != "flow":
        raise SweepError(f"model {spec.label}: shift needs noise_schedule: flow")
    if spec.name in ("gmm", "gaussian"):
        cls = GaussianMixtureModel if spec.name == "gmm" else GaussianModel
        kwargs = {k: tuple(v) if k == "shape" else v for k, v in opts.items()
                  if k not in SCHEDULE_KEYS and k not in FLOW_MODEL_KEYS}
        try:
            if model_family(spec) == "flow":
                config = _flow_scheduler_config(spec, opts)
                exact = cls(schedule=FlowMatchingSchedule(config["num_train_timesteps"]),
                            prediction_type="flow_prediction", **kwargs)
            else:
                config = _scheduler_config(opts)
                exact = cls.for_scheduler_config(config, **kwargs)
        except (TypeError, ValueError) as err:
            raise SweepError(f"model {spec.label}: {err}") from None
        return LoadedModel(spec.label, exact.to(device), config, exact.shape, exact,
                           getattr(exact, "num_classes", None))
    if spec.name == "learned":
        from ...testbeds.learned import ASSET_DIR, load_learned_model

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


