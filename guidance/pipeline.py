"""Guidance in stock diffusers pipelines: ``attach(pipe, guider)`` / ``detach(pipe)``.

Nothing of the pipeline is copied. `attach` wraps ``pipe.unet.forward`` or, in transformer pipelines (SD3, Sana,
PixArt and their peers), ``pipe.transformer.forward`` (an instance attribute, so the model stays the same object):
the pipeline's CFG batch ``[x, x]`` with ``[uncond, cond]`` embeddings goes through the model, the guider turns
(cond, uncond) into its guided prediction g (converted to and from x0 with the scheduler's ``prediction_type``;
a flow model's velocity for the project's flow schedulers and diffusers' ``FlowMatch*`` ones), and the wrapper
returns the pair (g, g). The pipeline's own formula ``uncond + w (cond - uncond)`` then yields g exactly, for any
``guidance_scale > 1`` (the guider's scale is the one that counts; ``guidance_scale`` only switches the
pipeline's CFG batch on). Pipelines that run the conditional and the unconditional branch as two calls, the
conditional first (Flux's true CFG with ``true_cfg_scale``; Wan and CogView4 with ``guidance_scale > 1``), keep
both outputs, and the wrapped ``pipe.scheduler.step`` receives the guided prediction in place of the pipeline's
combination. Two-stage pipelines (Wan 2.2's ``transformer_2``) are refused. For FKC, ``pipe.scheduler.step``
is wrapped too: after each step the particles (``num_images_per_prompt`` per prompt) are reweighted and
resampled, together with every per-sample tensor the scheduler keeps. `detach` deletes both wrappers, which
restores the pipeline exactly (instance-level wrappers installed before, e.g. by accelerate's offload hooks,
are kept and put back).

Example::

    guider = guidance.APG(7.5, eta=0.0, norm_threshold=2.5, momentum=-0.5)
    guidance.attach(pipe, guider)
    images = pipe(prompt, guidance_scale=7.5).images
    guidance.detach(pipe)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from .base import GuidanceDriver, Guider

_ATTACHMENT = "_guidance_attachment"


def _denoiser(pipe: Any) -> tuple[Any, str | None]:
    """The pipeline's denoising network (``unet`` or ``transformer``) and, where it evaluates the conditional and
    unconditional branches as separate calls rather than one CFG batch, the argument that switches them on
    (``"true_cfg_scale"`` for Flux, ``"guidance_scale"`` for Wan and CogView4); None for a CFG batch."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        unet = getattr(pipe, "transformer", None)
    if unet is not None and getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(f"{type(pipe).__name__} has a second transformer (transformer_2, Wan 2.2's low-noise "
                         "stage); guidance.attach guides one denoising network per pipeline")
    if unet is not None and hasattr(pipe, "scheduler") and \
            "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters:
        return unet, "true_cfg_scale"
    if unet is None or not hasattr(type(pipe), "do_classifier_free_guidance") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"{type(pipe).__name__} has no classifier-free guidance batch (guidance.attach needs a "
                         "pipeline with a `unet` or `transformer`, a `scheduler` and a `do_classifier_free_guidance` "
                         "switch, such as StableDiffusionPipeline or StableDiffusion3Pipeline, or Flux's "
                         "true_cfg_scale path)")
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(f"{type(pipe).__name__}'s UNet is guidance-distilled (time_cond_proj_dim is set): the "
                         "pipeline never runs an unconditional branch, so there is nothing to guide")
    if unet is not getattr(pipe, "unet", None) and not _batches_cfg(type(pipe)):
        return unet, "guidance_scale"  # Wan, CogView4: a conditional call, then an unconditional one
    return unet, None


def _batches_cfg(cls: type) -> bool:
    """Whether a pipeline's ``__call__`` doubles its latents into one CFG batch (``torch.cat([latents] * 2)``)."""
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return "] * 2)" in source


def attach(pipe: Any, guider: Guider) -> Any:
    """Make ``pipe`` use ``guider`` (CFG, APG or FKC) instead of its own classifier-free guidance; returns pipe."""
    unet, switch = _denoiser(pipe)
    separate = switch is not None
    if getattr(pipe, _ATTACHMENT, None) is not None:
        raise ValueError("a guider is already attached to this pipeline; call guidance.detach(pipe) first")
    scheduler = pipe.scheduler
    driver = GuidanceDriver(guider, scheduler)
    inner_forward = unet.forward
    previous = {name: obj.__dict__[name] for obj, name in ((unet, "forward"), (scheduler, "step"))
                if name in obj.__dict__}

    sample_name = "hidden_states" if unet is not getattr(pipe, "unet", None) else "sample"
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # separate calls: (output, input) of this step's calls

    def check_scheduler() -> None:
        if pipe.scheduler is not scheduler:
            raise RuntimeError("pipe.scheduler was replaced after guidance.attach(); call guidance.detach(pipe) "
                               "and attach the guider again")

    @functools.wraps(inner_forward)
    def record(*args: Any, **kwargs: Any) -> Any:
        """Separate calls (conditional first, then unconditional): keep both outputs; the wrapped
        ``scheduler.step`` replaces the pipeline's combination by the guided prediction."""
        check_scheduler()
        if len(pending) == 2:
            raise RuntimeError("more than two transformer calls in one step: guidance.attach expects one "
                               "conditional and one unconditional call per step")
        out = inner_forward(*args, **kwargs)
        pending.append((out[0] if isinstance(out, tuple) else out.sample,
                        kwargs[sample_name] if sample_name in kwargs else args[0]))
        return out

    @functools.wraps(inner_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        sample = kwargs[sample_name] if sample_name in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        check_scheduler()
        if not pipe.do_classifier_free_guidance:
            raise ValueError(f"the pipeline ran without classifier-free guidance (guidance_scale="
                             f"{pipe.guidance_scale}); call it with guidance_scale > 1 so that it evaluates the "
                             f"unconditional branch - the attached {type(guider).__name__}'s own scale is used")
        out = inner_forward(*args, **kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        if pred.shape != sample.shape:
            raise ValueError(f"guidance.attach needs UNet outputs shaped like its input, got {tuple(pred.shape)} "
                             f"for input {tuple(sample.shape)} (learned-variance UNets are not supported)")
        uncond, cond = pred.chunk(2)
        if sample_name == "hidden_states" and getattr(scheduler, "step_index", None) is not None:
            timestep = scheduler.timesteps[scheduler.step_index]  # transformers may get a rescaled t (Flux: t / 1000)
        guided = driver.guide([cond, uncond], sample.chunk(2)[0], timestep)
        pair = torch.cat([guided, guided])
        return (pair, *out[1:]) if isinstance(out, tuple) else type(out)(sample=pair)

    unet.forward = record if separate else forward

    def guided_step_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The step's arguments with the model output replaced by the guided prediction of this step's calls."""
        calls = len(pending)
        if calls != 2:
            pending.clear()
            how = "true_cfg_scale > 1 and a negative prompt" if switch == "true_cfg_scale" else "guidance_scale > 1"
            raise ValueError(f"the pipeline made {calls} transformer call(s) in this step; call it with {how} so "
                             "that it evaluates the unconditional branch - the attached "
                             f"{type(guider).__name__}'s own scale is used")
        (cond, x), (uncond, _) = pending
        pending.clear()
        output = args[0] if args else kwargs["model_output"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        guided = driver.guide([cond, uncond], x, timestep).to(output.dtype)
        if args:
            return (guided, *args[1:]), kwargs
        return args, {**kwargs, "model_output": guided}

    if guider.resamples or separate:
        inner_step = scheduler.step

        @functools.wraps(inner_step)
        def step(*args: Any, **kwargs: Any) -> Any:
            if separate:
                args, kwargs = guided_step_arguments(args, kwargs)
            out = inner_step(*args, **kwargs)
            if not guider.resamples:
                return out
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            moved, index = driver.step_end(prev)
            if index is None:
                return out
            fields = out if isinstance(out, tuple) else out.values()
            reorder = [moved if v is prev else (v[index.to(v.device)]
                       if isinstance(v, torch.Tensor) and v.shape == prev.shape else v) for v in fields]
            return tuple(reorder) if isinstance(out, tuple) else type(out)(**dict(zip(out.keys(), reorder)))

        scheduler.step = step
    setattr(pipe, _ATTACHMENT, (guider, unet, scheduler, previous))
    return pipe


def detach(pipe: Any) -> Any:
    """Remove the attached guider: the pipeline runs its own classifier-free guidance again; returns pipe."""
    attachment = getattr(pipe, _ATTACHMENT, None)
    if attachment is None:
        raise ValueError("no guider is attached to this pipeline")
    _, unet, scheduler, previous = attachment
    for obj, name in ((unet, "forward"), (scheduler, "step")):
        obj.__dict__.pop(name, None)
        if name in previous:
            obj.__dict__[name] = previous[name]
    delattr(pipe, _ATTACHMENT)
    return pipe


def attached_guider(pipe: Any) -> Guider | None:
    """The guider attached to ``pipe``, or None."""
    attachment = getattr(pipe, _ATTACHMENT, None)
    return None if attachment is None else attachment[0]
