"""Whole-loop CUDA-graph capture: a fixed-NFE sampling run recorded once and replayed for every batch.

A sampling run is thousands of small kernels (a model call plus a few element-wise solver ops per step). Recorded
as one CUDA graph (PyTorch's whole-network capture recipe: warm up on a side stream, capture, then replay) the
run is a single launch with no host work between steps. That needs a loop without host syncs - the project's
schedulers and wrappers have none (tests/test_device_ready.py runs them on the ``meta`` device, where any read of
a device value fails) - a fixed noise shape and step count, and a model that is capture-safe itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..accelerators.base import host_timesteps_of
from .loop import SampleResult, _loop, _model_dtype, _raise_if_nonfinite, model_device_dtype, model_fn_from_unet


class CapturedSampler:
    """``CapturedSampler(model, scheduler, shape, num_inference_steps)(noise)`` -> `SampleResult`, like
    ``samplers.sample(model, scheduler, noise, num_inference_steps)`` for a fixed batch ``shape``.

    On CUDA the first call records the whole loop into a CUDA graph (after ``warmup`` eager runs on a side
    stream, which also lets ``torch.compile`` and cuDNN settle) and every call copies ``noise`` into the graph's
    input buffer and replays it; the non-finite check reads one flag tensor after the replay. SDE solvers must
    draw from the default CUDA generator (no ``generator`` argument), which graphs support. On other devices the
    same loop runs eagerly, so the same code runs anywhere. The scheduler belongs to the captured graph: use
    another instance for other step counts. Returned samples are a copy (the graph's output buffer is reused).
    ``memory_format`` is passed to the loop (see `samplers.sample`).
    """

    def __init__(self, model: Callable[..., Any], scheduler: Any, shape: Sequence[int], num_inference_steps: int,
                 *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 model_kwargs: dict[str, Any] | None = None, warmup: int = 2,
                 memory_format: torch.memory_format | None = None):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager runs before capture), got {warmup!r}")
        self.model, self.scheduler, self.shape = model, scheduler, tuple(int(n) for n in shape)
        self.num_inference_steps, self.warmup, self.dtype = num_inference_steps, warmup, dtype
        self.memory_format = memory_format
        self.device = torch.device(device) if device is not None else model_device_dtype(model)[0]
        self.fn = model_fn_from_unet(model, **(model_kwargs or {}))
        self.model_dtype = _model_dtype(model)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        self.timesteps = host_timesteps_of(scheduler).tolist()
        self.graph: torch.cuda.CUDAGraph | None = None
        self._noise = self._out = self._nonfinite = self._captured_timesteps = None
        self._captured_step_index: int | None = None
        self.nfe = 0

    @property
    def captures(self) -> bool:
        """True where the loop is replayed from a CUDA graph (a CUDA device), False where it runs eagerly."""
        return self.device.type == "cuda"

    def _run(self, noise: torch.Tensor, check_syncs: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One eager run from a fresh ``set_timesteps``; ``check_syncs`` makes any CUDA sync inside the loop (not
        the grid's own copy to the device) an error."""
        self.scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        previous = torch.cuda.get_sync_debug_mode() if check_syncs else None
        if check_syncs:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                return _loop(self.fn, self.scheduler, noise, self.model_dtype, memory_format=self.memory_format)
        finally:
            if check_syncs:
                torch.cuda.set_sync_debug_mode(previous)

    def _capture(self) -> None:
        """Warm up and capture on one side stream (so cuBLAS/cuDNN handles exist before capture); warm-up runs
        after the first (which may copy one-off tables to the device) run with CUDA's sync check set to error,
        so a model or scheduler that syncs fails there with a clear message instead of corrupting the capture."""
        self._noise = torch.randn(self.shape, device=self.device, dtype=self.dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        name = type(self.scheduler).__name__
        with torch.cuda.stream(side):
            for run in range(self.warmup):
                try:
                    self._run(self._noise, check_syncs=run > 0)
                except RuntimeError as err:
                    raise RuntimeError(f"the sampling loop of {name} with this model synchronizes with the host "
                                       f"({err}), so it cannot be captured in a CUDA graph; use samplers.sample "
                                       "instead") from err
            self.scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, stream=side):
                self._out, self._nonfinite, self.nfe = _loop(self.fn, self.scheduler, self._noise, self.model_dtype,
                                                             memory_format=self.memory_format)
        except RuntimeError as err:
            raise RuntimeError(f"could not capture the sampling loop of {name} in a CUDA graph ({err}); use "
                               "samplers.sample instead") from err
        self.graph = graph
        self._captured_timesteps = self.scheduler.timesteps  # keeps the device grid the graph reads alive
        self._captured_step_index = getattr(self.scheduler, "step_index", None)

    def __call__(self, noise: torch.Tensor) -> SampleResult:
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise must have the captured shape {self.shape}, got {tuple(noise.shape)}")
        if not self.captures:
            x, nonfinite, self.nfe = self._run(noise.to(self.device, self.dtype))
        else:
            if self.graph is None:
                self._capture()
            elif getattr(self.scheduler, "step_index", None) != self._captured_step_index:
                raise RuntimeError(f"the {type(self.scheduler).__name__} captured by this CapturedSampler was reset "
                                   "(set_timesteps) or stepped elsewhere; its graph holds the old run - give each "
                                   "CapturedSampler a scheduler of its own")
            self._noise.copy_(noise)
            self.graph.replay()
            x, nonfinite = self._out.clone(), self._nonfinite
        _raise_if_nonfinite(nonfinite, self.timesteps)
        return SampleResult(samples=x, nfe=self.nfe, timesteps=list(self.timesteps))

